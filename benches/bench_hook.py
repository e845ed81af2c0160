"""Host time of one LoRA hook call on the CPU (issue #12: Python per hook in decode), warm, 1
thread: the hook with the backend's bound call (`CpuBackend.bind`, what the runtime uses) vs
the same hook on a backend without `bind` (the generic path: reshape and view, then
`add_lora`), with the kernel's call a no-op (host time only) and with the kernel running.

The shape is one SmolLM2 q_proj in a 16-adapter decode step: 16 one-token segments of rank 16,
576 -> 576, rows in cache. Forms alternate within each repeat; per form the best repeat's mean.

    python benches/bench_hook.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import KernelProbe
from results_meta import command_line, smoke_dir, write_result

from alora.backend import LoraBatch
from alora.cpu_backend import CpuBackend
from alora.lora import LoraStep, _make_hook, lora_step
from alora.testing import make_lora_batch


class Unbound:
    """A CpuBackend seen without `bind`: the hook takes the generic path."""

    name = "cpu-unbound"

    def __init__(self) -> None:
        self.inner = CpuBackend()

    def add_lora(self, *args: Any) -> None:
        self.inner.add_lora(*args)


def _per_call(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--features", type=int, default=576)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5000, help="calls per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="few calls, results to a temp dir")
    a = ap.parse_args(argv)
    if a.quick:
        a.calls, a.repeats = 50, 2
    torch.set_num_threads(1)
    n, r, d = a.adapters, a.rank, a.features
    pool = torch.randn(2, n * r, d)
    pools = SimpleNamespace(a_layers={"q_proj": (pool[0],)}, bt_layers={"q_proj": (pool[1],)})
    batch: LoraBatch = make_lora_batch(
        [[i] for i in range(n)], [r] * n, [list(range(i * r, (i + 1) * r)) for i in range(n)],
        [1.0] * n,
    )  # fmt: skip
    owner = object()
    linear = torch.nn.Linear(d, d)
    backends: dict[str, Any] = {"bound": CpuBackend(), "add_lora": Unbound()}
    best: dict[str, float] = {}
    with torch.inference_mode(), KernelProbe() as probe:
        x = torch.randn(1, n, d)
        y = linear(x)
        for rep in range(a.repeats):
            for mode in ("skip", "run"):
                probe.mode = mode
                forms = list(backends.items())
                for form, backend in forms if rep % 2 else forms[::-1]:
                    hook = _make_hook(owner, 0, "q_proj")
                    step = LoraStep(owner=owner, batches={"q_proj": batch}, pools=pools,  # type: ignore[arg-type]
                                    backend=backend)  # fmt: skip
                    with lora_step(step):
                        hook(linear, (x,), {}, y)  # binds (the bound form), warms up
                        t = _per_call(lambda h=hook: h(linear, (x,), {}, y), a.calls)
                    key = f"{form}, kernel {'no-op' if mode == 'skip' else 'running'}"
                    best[key] = min(best.get(key, float("inf")), t)
    us = {k: v * 1e6 for k, v in best.items()}
    for k, v in us.items():
        print(f"{k:32s} {v:7.2f} us per hook call")
    ratio = {
        m: us[f"bound, kernel {m}"] / us[f"add_lora, kernel {m}"] for m in ("no-op", "running")
    }
    print(f"bound / add_lora: {ratio['no-op']:.2f}x (host only), {ratio['running']:.2f}x (kernel)")
    path = write_result(
        "hook",
        {
            "bench": "bench_hook.py",
            "command": command_line("bench_hook.py", argv),
            "quick": bool(a.quick),
            "torch_threads": 1,
            "shape": {"features": d, "adapters": n, "rank": r, "tokens": n},
            "calls": a.calls,
            "repeats": a.repeats,
            "us_per_call": us,
            "bound_over_add_lora": ratio,
        },
        smoke_dir(a.quick),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
