"""The CPU LoRA kernel (`_core.cpu_add_lora`, crates/alora-cpu) on one thread, two questions:

1. Bandwidth: one decode step's worth of rows (16 adapters, rank 16, q/k/v/o of every layer
   of the demo model's shape) from memory (caches flushed between repeats) and from cache
   (one module's rows, repeated), against `torch.sum` over the same bytes, the read rate one
   core gets.
2. Crossover: the kernel vs the torch reference (`TorchBackend`) on one segment of T tokens
   (and 16 segments), which sets `CpuBackend.max_seg_tokens`.

    python benches/bench_cpu_kernel.py              # writes benches/results/cpu_kernel.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import write_result

from alora import _core
from alora.backend import TorchBackend
from alora.cpu_backend import CpuBackend
from alora.testing import make_lora_batch

RANK = 16


def _median_s(fn: Callable[[], object], repeats: int, before: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth(layers: int, din: int, outs: tuple[int, ...], adapters: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    mods = []
    for _ in range(layers):
        for dout in outs:
            mods.append(
                (
                    rng.standard_normal((adapters * RANK, din), dtype=np.float32),
                    rng.standard_normal((adapters * RANK, dout), dtype=np.float32),
                    rng.standard_normal((adapters, din), dtype=np.float32),
                    np.zeros((adapters, dout), dtype=np.float32),
                )
            )
    rows = np.arange(adapters * RANK)
    seg = np.arange(adapters + 1)
    packed = np.concatenate(
        [[adapters, adapters * RANK], np.arange(adapters), seg, seg * RANK, rows, rows]
    ).astype(np.int64)
    scale = np.ones(adapters, dtype=np.float32)
    flush = np.ones(64 << 20, dtype=np.float32)  # 256 MB: more than the last-level cache

    def call(m: tuple) -> None:
        a, bt, x, y = m
        _core.cpu_add_lora(
            y.reshape(-1), x.reshape(-1), a.reshape(-1), (0, din, din),
            bt.reshape(-1), (0, bt.shape[1], bt.shape[1]), packed, scale,
        )  # fmt: skip

    def step() -> None:
        for m in mods:
            call(m)

    def read_all() -> None:
        for a, bt, _x, _y in mods:
            torch.from_numpy(a).sum()
            torch.from_numpy(bt).sum()

    step_bytes = sum(a.nbytes + bt.nbytes for a, bt, _x, _y in mods)
    one_bytes = mods[0][0].nbytes + mods[0][1].nbytes
    cold = {
        name: step_bytes / _median_s(fn, repeats, flush.sum) / 1e9
        for name, fn in (("kernel", step), ("torch_sum", read_all))
    }
    hot_kernel = _median_s(lambda: [call(mods[0]) for _ in range(32)], repeats, lambda: None)
    hot_sum = _median_s(
        lambda: [(torch.from_numpy(mods[0][0]).sum(), torch.from_numpy(mods[0][1]).sum())
                 for _ in range(32)],
        repeats, lambda: None,
    )  # fmt: skip
    hot = {"kernel": 32 * one_bytes / hot_kernel / 1e9, "torch_sum": 32 * one_bytes / hot_sum / 1e9}
    return {
        "step_mb": step_bytes / 1e6,
        "module_mb": one_bytes / 1e6,
        "from_memory_gb_s": cold,
        "from_cache_gb_s": hot,
        "kernel_over_torch_sum_from_memory": cold["kernel"] / cold["torch_sum"],
        "kernel_over_torch_sum_from_cache": hot["kernel"] / hot["torch_sum"],
    }


def crossover(din: int, shapes: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64 * RANK, din, generator=g)
    bt = torch.randn(64 * RANK, din, generator=g)
    kernel, reference = CpuBackend(max_seg_tokens=1 << 20), TorchBackend()
    out = []
    for nseg, tokens in shapes:
        x = torch.randn(nseg * tokens, din, generator=g)
        y = torch.zeros(nseg * tokens, din)
        seg_tokens = [list(range(s * tokens, (s + 1) * tokens)) for s in range(nseg)]
        rows = [list(range(s * 3 * RANK, s * 3 * RANK + RANK)) for s in range(nseg)]
        t = {}
        for name, backend in (("kernel", kernel), ("torch", reference)):
            times = []
            for _ in range(repeats):
                batch = make_lora_batch(seg_tokens, [RANK] * nseg, rows, [0.5] * nseg)
                batch.cpu_segments  # noqa: B018  (built once per step in the runtime)
                t0 = time.perf_counter()
                backend.add_lora(y, x, a, bt, batch)
                times.append(time.perf_counter() - t0)
            t[name] = statistics.median(times)
        out.append(
            {
                "in": din,
                "segments": nseg,
                "tokens_per_segment": tokens,
                "kernel_us": t["kernel"] * 1e6,
                "torch_us": t["torch"] * 1e6,
                "kernel_over_torch": t["kernel"] / t["torch"],
            }
        )
        print(
            f"in {din:5d}, {nseg:2d} segment(s) x {tokens:3d} tokens: kernel "
            f"{t['kernel'] * 1e6:7.1f} us, torch {t['torch'] * 1e6:7.1f} us, "
            f"ratio {t['kernel'] / t['torch']:.2f}"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--name", default="cpu_kernel")
    ap.add_argument(
        "--quick", action="store_true", help="few shapes, few repeats, results to a temp dir"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 5 if a.quick else a.repeats
    bw = bandwidth(layers=8, din=512, outs=(512, 256, 256, 512), adapters=16, repeats=repeats)
    print(
        f"one decode step's rows ({bw['step_mb']:.1f} MB) from memory: kernel "
        f"{bw['from_memory_gb_s']['kernel']:.1f} GB/s, torch.sum "
        f"{bw['from_memory_gb_s']['torch_sum']:.1f} GB/s; one module's rows "
        f"({bw['module_mb']:.2f} MB) from cache: kernel {bw['from_cache_gb_s']['kernel']:.1f} "
        f"GB/s, torch.sum {bw['from_cache_gb_s']['torch_sum']:.1f} GB/s"
    )
    shapes = [(1, 4), (1, 64)] if a.quick else [
        (1, 4), (1, 8), (1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (1, 512), (1, 1024),
        (16, 4), (16, 16), (4, 128),
    ]  # fmt: skip
    cross = [row for din in (576, 1536) for row in crossover(din, shapes, repeats)]
    path = write_result(
        a.name,
        {
            "bench": "bench_cpu_kernel.py",
            "torch_threads": 1,
            "rank": RANK,
            "bandwidth": {"layers": 8, "in": 512, "out": [512, 256, 256, 512], **bw},
            "crossover": cross,
            "current_max_seg_tokens": CpuBackend().max_seg_tokens,
            "quick": bool(a.quick),
        },
        # A smoke run never overwrites the committed results.
        Path(tempfile.mkdtemp(prefix="alora-bench-")) if a.quick else None,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
