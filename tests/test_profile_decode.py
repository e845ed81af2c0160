"""Smoke test of benches/profile_decode.py on a tiny model: the adapter forms take the same
number of steps, the base runs as many as an adapter run, the timed form really calls the
CPU kernel, and the breakdown adds up; and the probe's read form reads as many bytes as the
call's rows."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import profile_decode
from bench_runtime import KernelProbe


def test_profile_runs_every_form_and_times_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALORA_RESULTS_DIR", str(tmp_path))
    assert profile_decode.main(["--quick", "--name", "profile_smoke"]) == 0
    out = json.loads((tmp_path / "profile_smoke.json").read_text())
    steps = out["steps_per_form"]
    per_form = {steps[f] for f in profile_decode.ADAPTER_FORMS}
    assert len(per_form) == 1 and per_form.pop() > 0
    assert steps["base"] == sum(steps[f] for f in profile_decode.ADAPTER_FORMS)
    import alora.cpu_backend
    from alora import _core

    assert alora.cpu_backend._core is _core  # the swap is undone
    for row in out["percentiles"].values():
        assert row["kernel_inside_ms"] > 0
        parts = row["kernel_inside_ms"] + row["after_kernel_ms"]
        assert parts == pytest.approx(row["kernel_ms"])
        assert row["base_ms"] + row["host_ms"] == pytest.approx(row["no kernel_ms"])
        floor = row["no kernel_ms"] + row["read_floor_ms"]
        assert floor == pytest.approx(row["read only_ms"])


def test_other_build_takes_its_turns_and_gets_the_kernel_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alora import _core

    # A copy of this build stands in for another one (the same file path would be the same
    # module to the loader).
    other = tmp_path / "other" / Path(_core.__file__).name
    other.parent.mkdir()
    shutil.copyfile(_core.__file__, other)
    monkeypatch.setenv("ALORA_RESULTS_DIR", str(tmp_path))
    args = ["--quick", "--name", "ab_smoke", "--other-core", str(other)]
    assert profile_decode.main(args) == 0
    out = json.loads((tmp_path / "ab_smoke.json").read_text())
    steps = out["steps_per_form"]
    assert steps["other build"] == steps["adapters"] > 0
    assert steps["base"] == sum(v for k, v in steps.items() if k != "base")
    for row in out["percentiles"].values():
        kernel = row["other build_ms"] - row["no kernel_ms"]
        assert row["other_kernel_ms"] == pytest.approx(kernel)


def test_other_mode_calls_the_other_module() -> None:
    class Other:
        def __init__(self) -> None:
            self.args: tuple = ()

        def cpu_add_lora(self, *args: object) -> None:
            self.args = args

    probe = KernelProbe("other")
    probe.other = Other()
    probe.cpu_add_lora(*_call_args(1, 4, 4))
    assert len(probe.other.args) == 8 and probe.calls == 1


def _call_args(rows: int, a_width: int, bt_width: int) -> tuple:
    segments = np.array([1, rows, 0, 0, 1, 0, rows, *range(rows), *range(rows)], np.int64)
    empty = np.zeros(0, np.float32)
    return (empty, empty, empty, (0, a_width, a_width), empty, (0, bt_width, bt_width),
            segments, np.ones(1, np.float32))  # fmt: skip


def test_read_form_reads_the_calls_bytes_in_turn_and_refuses_a_short_buffer() -> None:
    probe = KernelProbe("read")
    probe.read_buffer = torch.ones(100)
    probe.cpu_add_lora(*_call_args(2, 10, 20))  # 2 rows of 10 + 20 elements
    assert probe._read_at == 60
    probe.cpu_add_lora(*_call_args(1, 10, 20))  # 30 more: ends at 90
    assert probe._read_at == 90
    probe.cpu_add_lora(*_call_args(1, 10, 10))  # 20 do not fit after 90: starts over
    assert probe._read_at == 20
    with pytest.raises(ValueError, match="read_buffer"):
        probe.cpu_add_lora(*_call_args(4, 10, 20))
    assert probe.calls == 4


def test_a_result_records_the_arguments_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from results_meta import command_line

    monkeypatch.setattr(sys, "argv", ["bench.py", "--from-the-shell"])
    assert command_line("x.py", ["--quick"]) == "python benches/x.py --quick"
    assert command_line("x.py", []) == "python benches/x.py"
    assert command_line("x.py") == "python benches/x.py --from-the-shell"


def test_a_bench_run_as_a_script_records_its_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import results_meta

    script = str(results_meta.ROOT / "benches" / "bench_chain.py")
    monkeypatch.setattr(sys, "argv", [script, "--model", "smollm2"])
    made = json.loads(results_meta.write_result("r", {"x": 1}, out_dir=tmp_path).read_text())
    assert made["command"] == "python benches/bench_chain.py --model smollm2"
    own = {"command": "python benches/bench_chain.py --quick", "x": 1}
    kept = json.loads(results_meta.write_result("r", own, out_dir=tmp_path).read_text())
    assert kept["command"] == "python benches/bench_chain.py --quick"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "-q"])
    assert "command" not in json.loads(results_meta.write_result("r", {}, tmp_path).read_text())
