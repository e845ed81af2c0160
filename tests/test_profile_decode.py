"""Smoke test of benches/profile_decode.py on a tiny model: every form runs the same number
of decode steps, the timed form really calls the CPU kernel, and the breakdown adds up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import profile_decode


def test_profile_runs_every_form_and_times_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALORA_RESULTS_DIR", str(tmp_path))
    assert profile_decode.main(["--quick", "--name", "profile_smoke"]) == 0
    out = json.loads((tmp_path / "profile_smoke.json").read_text())
    counts = set(out["steps_per_form"].values())
    assert len(counts) == 1 and counts.pop() > 0
    import alora.cpu_backend
    from alora import _core

    assert alora.cpu_backend._core is _core  # the swap is undone
    for row in out["percentiles"].values():
        assert row["kernel_inside_ms"] > 0
        parts = row["kernel_inside_ms"] + row["after_kernel_ms"]
        assert parts == pytest.approx(row["kernel_ms"])
        assert row["base_ms"] + row["host_ms"] == pytest.approx(row["no kernel_ms"])
