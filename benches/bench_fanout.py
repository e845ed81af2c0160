"""Fan-out: k intrinsics invoked at once on the same conversation, as one batch, against
invoking them one by one; our runtime and PEFT (aLoRA with the base cache reused by hand,
and plain LoRA), with the base model prefilling only the invocations as the lower bound.

python benches/bench_fanout.py           # N=1024, k in 1 2 4 8 (~5 min on 2 CPU cores)
python benches/bench_fanout.py --quick   # < 1 min smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_baselines import (
    AdapterSpec,
    bench_model,
    build_peft_model,
    computed_hf,
    fmt,
    fresh_copy,
    hf_generate,
    model_info,
    random_state_dict,
)
from results_meta import RESULTS, write_result

from alora import AdapterRuntime

# system -> (engine, adapters, mode)
SYSTEMS = (
    "ours-alora/batch",
    "ours-alora/seq",
    "ours-lora/batch",
    "ours-lora/seq",
    "peft-alora/batch",
    "peft-alora/seq",
    "peft-lora/batch",
    "peft-lora/seq",
    "base/batch",
    "base/seq",
)

Outcome = dict[str, Any]  # wall_s, ttft_s (per intrinsic), computed


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024, help="conversation tokens")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="fan-out widths")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--intrinsic-tokens", type=int, default=4)
    ap.add_argument("--inv-len", type=int, default=6)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument(
        "--model", default=None, help="'smollm2' or a local transformers model directory"
    )
    ap.add_argument("--layers", type=int, default=None, help="demo model with this many layers")
    # One thread: see bench_chain.py (shared machine; 2 threads are far noisier here).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="fanout")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.length, a.ks, a.repeats, a.intrinsic_tokens = 128, [1, 2], 1, 2
        a.name = a.name if a.name != "fanout" else "fanout_quick"
    return a


class Bench:
    """Every system primed on one conversation; `run(system, k)` fans out k intrinsics."""

    def __init__(self, model: Any, a: argparse.Namespace) -> None:
        self.a = a
        kmax = max(a.ks)
        vocab = model.config.vocab_size
        rng = np.random.default_rng(7)
        # A conversation that already holds a base answer (no invocation ids: those are 3..15).
        self.history = [int(t) for t in rng.integers(16, vocab, size=a.length)]
        self.invs = [[3 + j] + [3 + (j + i) % 13 for i in range(1, a.inv_len)] for j in range(kmax)]
        specs = [
            AdapterSpec(f"int{j}", "alora", a.rank, tuple(a.targets), tuple(self.invs[j]), 100 + j)
            for j in range(kmax)
        ]
        sds = [random_state_dict(model, s) for s in specs]
        self.names = [s.name for s in specs]
        need = {s.split("/")[0] for s in a.systems}
        self.rt: AdapterRuntime | None = None
        if need & {"ours-alora", "ours-lora"}:
            self.rt = AdapterRuntime(fresh_copy(model), max_model_len=a.length + 256)
            for s, sd in zip(specs, sds, strict=True):
                self.rt.load_adapter(s.name, state_dict=sd, config=s.config("alora"))
                self.rt.load_adapter(f"{s.name}_lora", state_dict=sd, config=s.config("lora"))
        self.hf: dict[str, Any] = {}
        for kind in ("alora", "lora"):
            if f"peft-{kind}" in need:
                pairs = zip(specs, sds, strict=True)
                self.hf[f"peft-{kind}"] = build_peft_model(
                    model, [(s.name, s.config(kind), sd) for s, sd in pairs]
                )
        if "base" in need:
            self.hf["base"] = fresh_copy(model)
        # Base caches of the conversation (all but its last token, as after a base turn).
        self.caches: dict[str, Any] = {}
        ids = torch.tensor([self.history[:-1]])
        with torch.inference_mode():
            for eng in ("peft-alora", "base"):
                if eng in self.hf:
                    m = self.hf[eng]
                    ctx = m.disable_adapter() if eng != "base" else _null()
                    with ctx:
                        self.caches[eng] = m(input_ids=ids, use_cache=True).past_key_values

    def prime_ours(self) -> None:
        """Put the conversation's base KV into our prefix cache (what the base turn leaves)."""
        assert self.rt is not None
        self.rt.reset_prefix_cache()
        self.rt.generate([self.history], None, max_new_tokens=1, stop_token_ids=())

    def run(self, system: str, k: int) -> Outcome:
        engine, mode = system.split("/")
        prompts = [self.history + inv for inv in self.invs[:k]]
        names = self.names[:k]
        g = self.a.intrinsic_tokens
        if engine.startswith("ours"):
            assert self.rt is not None
            adapters = names if engine == "ours-alora" else [f"{n}_lora" for n in names]
            if engine == "ours-lora":
                # LoRA KV of an earlier repeat would be a cache hit; a fresh fan-out has none.
                self.prime_ours()
            t0 = time.perf_counter()
            if mode == "batch":
                res = self.rt.generate(prompts, adapters, max_new_tokens=g, stop_token_ids=())
            else:
                res = [
                    self.rt.generate([p], ad, max_new_tokens=g, stop_token_ids=())[0]
                    for p, ad in zip(prompts, adapters, strict=True)
                ]
            wall = time.perf_counter() - t0
            if mode == "batch":
                ttft = [r.time_to_first_token or 0.0 for r in res]
            else:  # time from the fan-out's start, as a caller of the chain sees it
                ttft, acc = [], 0.0
                for r in res:
                    ttft.append(acc + (r.time_to_first_token or 0.0))
                    acc += r.latency
            return {"wall_s": wall, "ttft_s": ttft, "computed": sum(r.computed_tokens for r in res)}
        m = self.hf[engine]
        L = len(prompts[0])
        cached = L - 1 - self.a.inv_len if engine != "peft-lora" else 0
        t0 = time.perf_counter()
        ttft = []
        if mode == "batch":
            ids = torch.tensor(prompts)
            kw: dict[str, Any] = {}
            cache = None
            if engine != "peft-lora":
                cache = copy.deepcopy(self.caches[engine])  # kept for the next repeat
                cache.batch_repeat_interleave(k)
            if engine != "base":
                kw["adapter_names"] = names
            out = hf_generate(m, ids, max_new_tokens=g, past_key_values=cache, **kw)
            ttft = [out.ttft] * k
        else:
            for p, name in zip(prompts, names, strict=True):
                ids = torch.tensor([p])
                start = time.perf_counter() - t0
                if engine == "peft-alora":
                    m.set_adapter(name)
                    out = hf_generate(
                        m,
                        ids,
                        max_new_tokens=g,
                        past_key_values=self.caches[engine],
                        copy_cache=True,
                    )
                elif engine == "peft-lora":
                    m.set_adapter(name)
                    out = hf_generate(m, ids, max_new_tokens=g)
                else:
                    cache = self.caches["base"]
                    n0 = cache.get_seq_length()
                    out = hf_generate(m, ids, max_new_tokens=g, past_key_values=cache)
                    cache.crop(n0 - cache.get_seq_length())
                ttft.append(start + out.ttft)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ttft_s": ttft, "computed": k * computed_hf(L, cached, g)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> int:
    a = parse()
    torch.set_num_threads(a.threads)
    model, _tok = bench_model(a.model, a.layers)
    bench = Bench(model, a)
    systems = [s for s in SYSTEMS if s in a.systems]
    if bench.rt is not None:
        bench.prime_ours()
    for s in systems:  # warm-up: one-off first-call costs are not what is compared
        bench.run(s, 1)

    raw: dict[tuple[str, int], list[Outcome]] = {}
    jobs = [(k, r, s) for k in a.ks for r in range(a.repeats) for s in systems]
    # Systems interleaved within each (k, repeat), so machine noise hits them alike.
    for k, _r, s in tqdm(jobs, desc="fan-out", unit="run"):
        if s.startswith("ours-alora"):
            bench.prime_ours()
        raw.setdefault((s, k), []).append(bench.run(s, k))

    rows = []
    for k in a.ks:
        for s in systems:
            outs = raw[(s, k)]
            rows.append(
                {
                    "system": s,
                    "k": k,
                    "wall_s": statistics.median(o["wall_s"] for o in outs),
                    "wall_all_s": [o["wall_s"] for o in outs],
                    "ttft_mean_s": statistics.median(statistics.mean(o["ttft_s"]) for o in outs),
                    "ttft_max_s": statistics.median(max(o["ttft_s"]) for o in outs),
                    "computed_tokens": outs[0]["computed"],
                }
            )

    print(f"\nN={a.length}")
    print(f"{'k':>3} {'system':18s} {'wall s':>8} {'mean TTFT':>9} {'max TTFT':>9} {'computed':>9}")
    for r in rows:
        print(
            f"{r['k']:3d} {r['system']:18s} {fmt(r['wall_s']):>8} {fmt(r['ttft_mean_s']):>9}"
            f" {fmt(r['ttft_max_s']):>9} {r['computed_tokens']:9d}"
        )
    ratios = _ratios(rows, max(a.ks))
    for key, v in ratios.items():
        print(f"k={max(a.ks)}: {key} = {fmt(v, '.2f')}x")

    png = Path(os.environ.get("ALORA_RESULTS_DIR", RESULTS)) / f"{a.name}.png"
    _plot(rows, systems, a, png)
    path = write_result(
        a.name,
        {
            "bench": "fanout",
            "params": vars(a),
            "model_info": model_info(model, a.model),
            "notes": [
                "wall = the whole fan-out (all k answers); TTFT measured from the fan-out's"
                " start (for one-by-one calls, the earlier calls' time is included).",
                "Base KV of the conversation is resident before each run (our prefix cache /"
                " a hand-kept DynamicCache); peft-alora/batch deep-copies and expands it to k"
                " rows, peft-alora/seq deep-copies it per call (PEFT's recipe), base/seq crops.",
                "ours-lora starts without cached LoRA KV (a fresh fan-out recomputes the"
                " conversation per adapter).",
                f"median of {a.repeats} repeats; systems interleaved; 1 torch thread.",
            ],
            "rows": rows,
            "ratios": ratios,
            "plot": png.name,
        },
    )
    print(f"wrote {path} and {png}")
    return 0


def _ratios(rows: list[dict[str, Any]], k: int) -> dict[str, float | None]:
    w = {r["system"]: r["wall_s"] for r in rows if r["k"] == k}

    def div(x: str, y: str) -> float | None:
        return w[x] / w[y] if x in w and y in w and w[y] else None

    return {
        "ours-alora seq/batch wall": div("ours-alora/seq", "ours-alora/batch"),
        "peft-alora seq/batch wall": div("peft-alora/seq", "peft-alora/batch"),
        "peft-alora batch / ours-alora batch wall": div("peft-alora/batch", "ours-alora/batch"),
        "peft-lora batch / ours-alora batch wall": div("peft-lora/batch", "ours-alora/batch"),
        "ours-lora batch / ours-alora batch wall": div("ours-lora/batch", "ours-alora/batch"),
        "ours-alora batch / base batch wall": div("ours-alora/batch", "base/batch"),
    }


def _plot(rows: list[dict[str, Any]], systems: list[str], a: Any, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s in systems:
        pts = [(r["k"], r["wall_s"]) for r in rows if r["system"] == s]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            linestyle="-" if s.endswith("batch") else "--",
            label=s,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("intrinsics invoked at once (k)")
    ax.set_ylabel("fan-out wall time (s)")
    ax.set_title(f"fan-out on a {a.length}-token conversation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
