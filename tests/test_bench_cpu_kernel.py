"""Smoke test of benches/bench_cpu_kernel.py on tiny shapes: both measurements run against
the real kernel and report what the README and the backend's docstring quote."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import bench_cpu_kernel as bk


def test_bandwidth_and_crossover_run_on_tiny_shapes() -> None:
    bw = bk.bandwidth(layers=1, din=64, outs=(64, 32), adapters=2, repeats=1)
    assert bw["step_mb"] > 0
    assert set(bw["from_memory_gb_s"]) == set(bw["from_cache_gb_s"]) == {"kernel", "torch_sum"}
    assert all(v > 0 for v in bw["from_memory_gb_s"].values())
    rows = bk.crossover(64, [(1, 4), (2, 8)], repeats=2)
    assert [(r["segments"], r["tokens_per_segment"]) for r in rows] == [(1, 4), (2, 8)]
    assert all(r["kernel_us"] > 0 and r["torch_us"] > 0 for r in rows)
