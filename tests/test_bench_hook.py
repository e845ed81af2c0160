"""Smoke test of benches/bench_hook.py: both hook paths run with the kernel a no-op and
running, the probe is undone, and the figures are positive."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import bench_hook


def test_bench_hook_times_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALORA_RESULTS_DIR", str(tmp_path))
    assert bench_hook.main(["--quick", "--features", "64", "--adapters", "4", "--rank", "4"]) == 0
    out = json.loads((tmp_path / "hook.json").read_text())
    assert set(out["us_per_call"]) == {
        f"{form}, kernel {m}" for form in ("bound", "add_lora") for m in ("no-op", "running")
    }
    assert all(v > 0 for v in out["us_per_call"].values())
    import alora.cpu_backend
    from alora import _core

    assert alora.cpu_backend._core is _core  # the probe's swap is undone
