"""Where a multi-adapter decode step's time goes (issue #12's profile of its 16-adapter
target): the same 16 requests decoded in five forms:

- base: no adapters;
- adapters: 16 distinct rank-16 adapters (half aLoRA, half LoRA), as `bench_runtime.py`;
- no kernel: the same, with the CPU LoRA kernel's call replaced by a no-op (every other
  piece of the adapter path still runs: plans, batches, hooks, argument checks);
- timed: the same as adapters, with the kernel's calls timed from inside the step;
- read only: the same as no kernel, plus a plain `torch.sum` over as many bytes as each
  kernel call's rows, read as one contiguous run: what the rows' bytes alone cost a step at
  a stream's read rate, after-effect on the caches included, whatever the kernel does.

Base runs alternate with adapter runs; inside an adapter run the four adapter forms take
turns step by step (order shuffled per round), so they see the same batch, the same cache
lengths and the same machine noise. From per-step CPU times (percentiles over every step of
every round): host = no kernel - base; kernel = adapters - no kernel, of which the time inside
the kernel's calls (timed) and the rest, the base ops after them running slower (their data
evicted by the rows' stream); read floor = read only - no kernel. The kernel's read rate is
the step's adapter-row bytes over the time inside it; base / read only is the ratio a kernel
as fast as a plain stream read would give.

    python benches/profile_decode.py                     # demo model
    python benches/profile_decode.py --model smollm2 --name decode_profile_smollm2

With `--other-core FILE` (another build's `_core` extension module, copied out of its tree)
a sixth form, "other build", takes its turns with the adapter forms, its kernel calls sent to
that build: an A/B of two kernels in the same steps, which this machine's drift between runs
would otherwise swamp.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import (
    INVOCATION,
    PROMPT_LOW,
    TAIL,
    KernelProbe,
    _lora_bytes_per_step,
    load_core,
)
from results_meta import command_line, smoke_dir, write_result

import alora
from alora.testing import make_peft_adapter

# How each form runs the kernel's calls (`KernelProbe.mode`); every form but base takes turns
# step by step inside the same adapter runs.
MODES = {
    "base": "run",
    "adapters": "run",
    "no kernel": "skip",
    "timed": "time",
    "read only": "read",
    "other build": "other",
}
ADAPTER_FORMS = ("adapters", "no kernel", "timed", "read only")


def _steps(
    rt: alora.AdapterRuntime, prompts: Sequence[list[int]], adapters: Sequence[str | None],
    forms: Sequence[str], steps: int, probe: KernelProbe,
) -> dict[str, tuple[list[float], list[float]]]:  # fmt: skip
    """Prefill every request, then decode `steps` steps, step i in form `forms[i % len]`:
    per form, (CPU seconds per step, seconds inside the kernel per step)."""
    for p, a in zip(prompts, adapters, strict=True):
        rt.add_request(p, adapter=a, max_new_tokens=steps + 1, stop_token_ids=())
    probe.mode = "run"
    started: set[int] = set()
    while len(started) < len(prompts):
        started |= {o.request_id for o in rt.step() if o.new_token is not None}
    out: dict[str, tuple[list[float], list[float]]] = {f: ([], []) for f in forms}
    i = 0
    while rt.has_unfinished():
        form = forms[i % len(forms)]
        probe.mode = MODES[form]
        probe.inside = 0.0
        t = time.process_time()
        rt.step()
        out[form][0].append(time.process_time() - t)
        out[form][1].append(probe.inside)
        i += 1
    return out


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", help="'smollm2' or a local transformers model (default: demo)")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    ap.add_argument(
        "--tokens", type=int, default=6, help="decode steps per form per round (each request)"
    )
    ap.add_argument("--rounds", type=int, default=40, help="rounds of a base and an adapter run")
    ap.add_argument("--name", default="decode_profile")
    ap.add_argument("--other-core", help="another build's _core module file: an A/B form")
    ap.add_argument(
        "--quick", action="store_true", help="tiny model and sizes, results to a temp dir"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        from alora.testing import tiny_model

        model = tiny_model("granite", max_position_embeddings=1024)
        a.adapters, a.rank, a.prompt, a.tokens, a.rounds = 2, 4, 32, 3, 1
    else:
        from alora.demo_model import load_model

        model, _tok = load_model(a.model)
    vocab = int(model.config.vocab_size)
    rt = alora.AdapterRuntime(model, max_num_seqs=max(64, a.adapters))
    work = Path(tempfile.mkdtemp(prefix="alora-profile-"))
    names = []
    for i in range(a.adapters):
        kind = "alora" if i % 2 == 0 else "lora"
        d = make_peft_adapter(
            model, work / f"{kind}{i:02d}", kind, r=a.rank, seed=100 + i,
            invocation_tokens=INVOCATION if kind == "alora" else None,
        )  # fmt: skip
        rt.load_adapter(f"{kind}{i:02d}", d)
        names.append(f"{kind}{i:02d}")
    rng = np.random.default_rng(7)
    body = a.prompt - len(INVOCATION) - TAIL
    prompts = [
        [*map(int, rng.integers(PROMPT_LOW, vocab, size=body)), *INVOCATION,
         *map(int, rng.integers(PROMPT_LOW, vocab, size=TAIL))]
        for _ in range(a.adapters)
    ]  # fmt: skip
    lora_bytes = _lora_bytes_per_step(model, a.rank, a.adapters)
    adapter_forms = ADAPTER_FORMS + (("other build",) if a.other_core else ())
    forms_all = ("base", *adapter_forms)
    cpu: dict[str, list[float]] = {f: [] for f in forms_all}
    inside: list[float] = []
    # Each adapter form gets `tokens` steps per round; the base run decodes as many steps as
    # an adapter run, so both see the same cache lengths.
    steps_per_run = a.tokens * len(adapter_forms)
    order = np.random.default_rng(11)
    try:
        with KernelProbe() as probe:
            probe.read_buffer = torch.ones(lora_bytes // 4)
            if a.other_core:
                probe.other = load_core(a.other_core)
            for r in range(a.rounds + 1):  # round 0 warms up, unrecorded
                turns = tuple(str(f) for f in order.permutation(adapter_forms))
                runs = [(("base",), [None] * len(prompts)), (turns, names)]
                for forms, adapters in runs if r % 2 else runs[::-1]:
                    got = _steps(rt, prompts, adapters, forms, steps_per_run, probe)
                    if r:
                        for form, (steps, ins) in got.items():
                            cpu[form] += steps
                            if form == "timed":
                                inside += ins
    finally:
        rt.detach()
    table: dict[str, dict[str, float]] = {}
    for q in (10, 25, 50):
        s = {f: _pct(cpu[f], q) for f in forms_all}
        k_in = _pct(inside, q)
        table[f"p{q}"] = {
            **{f"{f}_ms": s[f] * 1e3 for f in forms_all},
            "host_ms": (s["no kernel"] - s["base"]) * 1e3,
            "kernel_ms": (s["adapters"] - s["no kernel"]) * 1e3,
            "kernel_inside_ms": k_in * 1e3,
            "after_kernel_ms": (s["adapters"] - s["no kernel"] - k_in) * 1e3,
            "read_floor_ms": (s["read only"] - s["no kernel"]) * 1e3,
            "adapters_over_base": s["base"] / s["adapters"],
            "read_only_over_base": s["base"] / s["read only"],
            "kernel_gb_s": lora_bytes / k_in / 1e9 if k_in > 0 else float("nan"),
        }
        if a.other_core:
            table[f"p{q}"]["other_kernel_ms"] = (s["other build"] - s["no kernel"]) * 1e3
    for q, row in table.items():
        print(
            f"{q}: base {row['base_ms']:.2f} ms, adapters {row['adapters_ms']:.2f} ms "
            f"(ratio {row['adapters_over_base']:.3f}x): host {row['host_ms']:.2f} ms, kernel "
            f"{row['kernel_ms']:.2f} ms = {row['kernel_inside_ms']:.2f} inside "
            f"({row['kernel_gb_s']:.1f} GB/s) + {row['after_kernel_ms']:.2f} after; "
            f"read floor {row['read_floor_ms']:.2f} ms (read only "
            f"{row['read_only_over_base']:.3f}x)"
        )
        if a.other_core:
            print(
                f"{q}: kernel over the no-op form: this build {row['kernel_ms']:.2f} ms, "
                f"other build {row['other_kernel_ms']:.2f} ms"
            )
    path = write_result(
        a.name,
        {
            "bench": "profile_decode.py",
            "command": command_line("profile_decode.py", argv),
            "model": "tiny-granite" if a.quick else (a.model or "demo-granite"),
            "quick": bool(a.quick),
            "torch_threads": 1,
            "adapters": a.adapters,
            "rank": a.rank,
            "other_core": a.other_core,
            "steps_per_form": {f: len(cpu[f]) for f in forms_all},
            "lora_mb_per_step": lora_bytes / 1e6,
            "percentiles": table,
        },
        smoke_dir(a.quick),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
