"""Multi-adapter serving trace in the style of S-LoRA: n adapters (a mix of LoRA and aLoRA,
ranks 8-64), power-law adapter popularity, Poisson arrivals, prompt and output lengths drawn
from ranges. The same request sequence is served by

  ours        our runtime: continuous batching, adapters paged in and out of its row pools
  ours-base   our runtime, every request on the base model (adapter overhead reference)
  peft        PEFT mixed-batch inference (`adapter_names=`), arrivals grouped into fixed
              batches of --batch as a PEFT user would, padded, one `generate` per batch
  base        the base model alone, same fixed batches (Hugging Face `generate`)

Time is simulated from measured compute: a virtual clock advances by the wall time of each
step (ours) or each batch's `generate` (HF); requests join when the clock passes their arrival.
So every system sees the same arrivals and no run sleeps, and other load on the machine only
stretches compute, not the arrival process.

python benches/bench_trace.py            # n in 1 8 64 512 (~10 min on 2 CPU cores)
python benches/bench_trace.py --quick    # < 1 min smoke run

Issue 11's trace (up to 10,000 adapters on disk, one memory budget vs fixed splits): bench_memory.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
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
    fmt,
    fresh_copy,
    hf_generate,
    left_pad,
    mean,
    model_info,
    percentile,
    random_state_dict,
)
from results_meta import RESULTS, write_result

from alora import AdapterRuntime

SYSTEMS = ("ours", "ours-base", "peft", "base")
TARGET_N = 64
TARGET_VS_PEFT = 5.0  # throughput >= 5x PEFT's
TARGET_DECODE_VS_BASE = 0.9  # decode throughput >= 0.9x the base model's


@dataclass
class Request:
    arrival: float
    prompt: list[int]
    out_len: int
    adapter: int  # index into the adapter list


@dataclass
class Served:
    first: float  # virtual time of the first token
    finish: float  # virtual time of the last token


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 8, 64, 512], help="adapter counts")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent")
    ap.add_argument("--alora-frac", type=float, default=0.5, help="share of aLoRA adapters")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--output-len", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--inv-len", type=int, default=3)
    # q/v only: 512 adapters on all 7 modules do not fit PEFT's memory (nor this CPU's time).
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--batch", type=int, default=8, help="PEFT/base fixed batch size")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument(
        "--decode-batch", type=int, default=16, help="requests in the decode probe (0: off)"
    )
    ap.add_argument("--decode-tokens", type=int, default=24, help="tokens per probe request")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument(
        "--model", default=None, help="'smollm2' or a local transformers model directory"
    )
    ap.add_argument("--layers", type=int, default=None, help="demo model with this many layers")
    # One thread: see bench_chain.py (shared machine; 2 threads are far noisier here).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="trace")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.ns, a.requests, a.prompt_len, a.output_len = [1, 8], 12, [16, 48], [4, 8]
        a.decode_batch, a.decode_tokens, a.decode_repeats = 4, 6, 1
        a.name = a.name if a.name != "trace" else "trace_quick"
    return a


def make_adapters(a: argparse.Namespace, n: int) -> list[AdapterSpec]:
    rng = np.random.default_rng(a.seed)
    specs = []
    for i in range(n):
        kind = "alora" if rng.random() < a.alora_frac else "lora"
        inv = None
        if kind == "alora":  # ids 3..15 never occur in prompt bodies
            inv = tuple(int(t) for t in rng.integers(3, 16, size=a.inv_len))
        specs.append(
            AdapterSpec(f"ad{i}", kind, int(rng.choice(a.ranks)), tuple(a.targets), inv, 1000 + i)
        )
    return specs


def make_trace(
    a: argparse.Namespace, n: int, specs: list[AdapterSpec], vocab: int
) -> list[Request]:
    rng = np.random.default_rng(a.seed + n)
    pop = 1.0 / np.arange(1, n + 1) ** a.alpha
    pop /= pop.sum()
    arrivals = np.cumsum(rng.exponential(1.0 / a.rate, size=a.requests))
    reqs = []
    for t in arrivals:
        ad = int(rng.choice(n, p=pop))
        plen = int(rng.integers(a.prompt_len[0], a.prompt_len[1] + 1))
        prompt = [int(x) for x in rng.integers(16, vocab, size=plen)]
        inv = specs[ad].invocation
        if inv:  # the intrinsic's invocation ends the prompt
            prompt[-len(inv) :] = list(inv)
        out = int(rng.integers(a.output_len[0], a.output_len[1] + 1))
        reqs.append(Request(float(t - arrivals[0]), prompt, out, ad))
    return reqs


def serve_ours(
    rt: AdapterRuntime, reqs: list[Request], names: list[str] | None
) -> tuple[list[Served], dict[str, Any]]:
    """Continuous batching driven by add_request/step on the virtual clock."""
    rt.reset_prefix_cache()
    before = rt.stats()
    served: dict[int, Served] = {}
    rid_of: dict[int, int] = {}
    first: dict[int, float] = {}
    clock, i = 0.0, 0
    decode_s, decode_tokens, steps = 0.0, 0, 0
    while len(served) < len(reqs):
        while i < len(reqs) and reqs[i].arrival <= clock:
            r = reqs[i]
            rid = rt.add_request(
                r.prompt,
                adapter=None if names is None else names[r.adapter],
                max_new_tokens=r.out_len,
                stop_token_ids=(),
            )
            rid_of[rid] = i
            i += 1
        if not rt.has_unfinished():
            clock = reqs[i].arrival  # idle until the next arrival
            continue
        # A pure decode step: nothing waiting and every admitted request past its prefill.
        st = rt.stats()
        pure_decode = st["waiting"] == 0 and all(
            rid in first for rid in rid_of if rid_of[rid] not in served
        )
        t0 = time.perf_counter()
        outs = rt.step()
        dt = time.perf_counter() - t0
        clock += dt
        steps += 1
        new = 0
        for o in outs:
            if o.new_token is not None:
                new += 1
                first.setdefault(o.request_id, clock)
            if o.finished:
                served[rid_of[o.request_id]] = Served(first[o.request_id], clock)
        if pure_decode:
            decode_s += dt
            decode_tokens += new
    after = rt.stats()
    extra = {
        "decode_s": decode_s,
        "decode_tokens": decode_tokens,
        "steps": steps,
        "adapter_loads": after["adapter_loads"] - before["adapter_loads"],
        "adapter_evictions": after["adapter_evictions"] - before["adapter_evictions"],
        "preemptions": after["preemptions"] - before["preemptions"],
    }
    return [served[j] for j in range(len(reqs))], extra


def serve_batched(
    model: Any, reqs: list[Request], names: list[str] | None, batch: int
) -> tuple[list[Served], dict[str, Any]]:
    """Fixed batches of consecutive arrivals: a batch starts when its last member has arrived
    and the previous batch is done; it generates max(out_len) tokens for every member."""
    served: list[Served] = []
    clock = 0.0
    decode_s, decode_tokens = 0.0, 0
    for b0 in range(0, len(reqs), batch):
        group = reqs[b0 : b0 + batch]
        start = max(clock, group[-1].arrival)
        ids, mask = left_pad([r.prompt for r in group])
        kw: dict[str, Any] = {}
        if names is not None:
            kw["adapter_names"] = [names[r.adapter] for r in group]
        g = hf_generate(
            model, ids, attention_mask=mask, max_new_tokens=max(r.out_len for r in group), **kw
        )
        for r in group:
            served.append(Served(start + g.step_times[0], start + g.step_times[r.out_len - 1]))
        clock = start + g.latency
        decode_s += g.latency - g.step_times[0]
        decode_tokens += sum(r.out_len - 1 for r in group)  # useful tokens only
    extra = {
        "decode_s": decode_s,
        "decode_tokens": decode_tokens,
        "steps": None,
        "adapter_loads": 0,  # every adapter stays resident in PEFT (host memory)
        "adapter_evictions": 0,
        "preemptions": 0,
    }
    return served, extra


def decode_probe(
    rt: AdapterRuntime | None,
    pm: Any,
    bm: Any,
    reqs: list[Request],
    names: list[str],
    new_tokens: int,
) -> dict[str, float]:
    """Decode tokens/s of one fixed batch (the same requests, all prefilled first) in each
    system: the like-for-like decode comparison the trace's mixed steps cannot give."""
    out: dict[str, float] = {}
    if rt is not None:
        for label, use in (("ours", True), ("ours-base", False)):
            first: set[int] = set()
            rids = [
                rt.add_request(
                    r.prompt,
                    adapter=names[r.adapter] if use else None,
                    max_new_tokens=new_tokens,
                    stop_token_ids=(),
                )
                for r in reqs
            ]
            while len(first) < len(rids):  # prefill (and the first token) untimed
                first.update(o.request_id for o in rt.step() if o.new_token is not None)
            t0, tokens = time.perf_counter(), 0
            while rt.has_unfinished():
                tokens += sum(o.new_token is not None for o in rt.step())
            out[label] = tokens / (time.perf_counter() - t0)
    ids, mask = left_pad([r.prompt for r in reqs])
    for label, model, kw in (
        ("peft", pm, {"adapter_names": [names[r.adapter] for r in reqs]}),
        ("base", bm, {}),
    ):
        if model is not None:
            g = hf_generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)
            out[label] = len(reqs) * (new_tokens - 1) / (g.latency - g.step_times[0])
    return out


def summarize(reqs: list[Request], served: list[Served], extra: dict[str, Any]) -> dict[str, Any]:
    ttft = [s.first - r.arrival for r, s in zip(reqs, served, strict=True)]
    tpot = [
        (s.finish - s.first) / (r.out_len - 1)
        for r, s in zip(reqs, served, strict=True)
        if r.out_len > 1
    ]
    makespan = max(s.finish for s in served) - reqs[0].arrival
    out_tokens = sum(r.out_len for r in reqs)
    return {
        "throughput_tok_s": out_tokens / makespan,
        "throughput_req_s": len(reqs) / makespan,
        "makespan_s": makespan,
        "ttft_mean_s": mean(ttft),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_s": mean(tpot),
        "tpot_p99_s": percentile(tpot, 99),
        "decode_tok_s": extra["decode_tokens"] / extra["decode_s"] if extra["decode_s"] else None,
        **extra,
    }


def main() -> int:
    a = parse()
    torch.set_num_threads(a.threads)
    model, _tok = bench_model(a.model, a.layers)
    vocab = model.config.vocab_size
    nmax = max(a.ns)
    specs = make_adapters(a, nmax)
    t0 = time.perf_counter()
    sds = [random_state_dict(model, s) for s in tqdm(specs, desc="adapters", unit="ad")]
    names = [s.name for s in specs]

    # Every system loads all nmax adapters once; a run with n adapters draws requests from
    # the first n. Unused adapters cost our runtime nothing on device; in PEFT they sit in
    # memory (as a PEFT deployment hosting them would).
    rt = None
    if {"ours", "ours-base"} & set(a.systems):
        max_len = a.prompt_len[1] + a.output_len[1] + 16
        rt = AdapterRuntime(fresh_copy(model), max_num_seqs=a.max_num_seqs, max_model_len=max_len)
        for s, sd in tqdm(list(zip(specs, sds, strict=True)), desc="load ours", unit="ad"):
            rt.load_adapter(s.name, state_dict=sd, config=s.config())
    pm = None
    if "peft" in a.systems:
        pm = build_peft_model(
            model, [(s.name, s.config(), sd) for s, sd in zip(specs, sds, strict=True)]
        )
    bm = fresh_copy(model) if "base" in a.systems else None
    setup_s = time.perf_counter() - t0
    del sds

    # Warm-up on a tiny trace: first-call costs are not the steady state.
    warm = make_trace(argparse.Namespace(**{**vars(a), "requests": 4}), 1, specs, vocab)
    runners = {
        "ours": lambda tr: serve_ours(rt, tr, names),
        "ours-base": lambda tr: serve_ours(rt, tr, None),
        "peft": lambda tr: serve_batched(pm, tr, names, a.batch),
        "base": lambda tr: serve_batched(bm, tr, None, a.batch),
    }
    systems = [s for s in SYSTEMS if s in a.systems]
    for s in systems:
        runners[s](warm)

    rows: list[dict[str, Any]] = []
    for n, s in tqdm([(n, s) for n in a.ns for s in systems], desc="trace", unit="run"):
        trace = make_trace(a, n, specs, vocab)
        served, extra = runners[s](trace)
        rows.append({"system": s, "n": n, **summarize(trace, served, extra)})

    # Decode probe: per n, the first --decode-batch requests of the trace as one batch.
    probe: dict[int, dict[str, float]] = {}
    if a.decode_batch > 0:
        rt_p = rt if "ours" in systems else None
        pm_p = pm if "peft" in systems else None
        bm_p = bm if "base" in systems else None
        for n in tqdm(a.ns, desc="decode probe", unit="n"):
            batch = make_trace(a, n, specs, vocab)[: a.decode_batch]
            reps = [
                decode_probe(rt_p, pm_p, bm_p, batch, names, a.decode_tokens)
                for _ in range(a.decode_repeats)
            ]
            probe[n] = {k: float(np.median([r[k] for r in reps])) for k in reps[0]}
            probe[n]["distinct_adapters"] = len({r.adapter for r in batch})

    print(
        f"\n{'n':>4} {'system':9s} {'tok/s':>7} {'req/s':>6} {'TTFT mean':>9} {'TTFT p99':>9}"
        f" {'TPOT mean':>9} {'TPOT p99':>9} {'dec tok/s':>9} {'swaps':>5} {'preempt':>7}"
    )
    for r in rows:
        print(
            f"{r['n']:4d} {r['system']:9s} {r['throughput_tok_s']:7.1f}"
            f" {r['throughput_req_s']:6.2f}"
            f" {fmt(r['ttft_mean_s']):>9} {fmt(r['ttft_p99_s']):>9} {fmt(r['tpot_mean_s']):>9}"
            f" {fmt(r['tpot_p99_s']):>9} {fmt(r['decode_tok_s'], '.1f'):>9}"
            f" {r['adapter_loads']:5d} {r['preemptions']:7d}"
        )
    if probe:
        print(f"\ndecode probe ({a.decode_batch} requests in one batch, tok/s):")
        for n, p in probe.items():
            cells = "  ".join(f"{k} {v:.1f}" for k, v in p.items() if k != "distinct_adapters")
            print(f"  n={n:4d} ({int(p['distinct_adapters'])} distinct adapters): {cells}")
    targets = _targets(rows, a.ns, probe)
    for t in targets:
        met = t.get("met")
        verdict = "met" if met else "MISSED" if met is not None else "n/a"
        print(
            f"target @n={t['n']}: {t['name']} = {fmt(t['ratio'], '.2f')}x"
            f" (limit {t['limit']}x): {verdict}"
        )
        if "ratio_vs_ours_base" in t:
            print(f"   (vs our runtime without adapters: {fmt(t['ratio_vs_ours_base'], '.2f')}x)")
        if "trace_ratio" in t:
            print(f"   (trace pure-decode steps vs base batches: {fmt(t['trace_ratio'], '.2f')}x)")

    png = Path(os.environ.get("ALORA_RESULTS_DIR", RESULTS)) / f"{a.name}.png"
    _plot(rows, systems, a, png)
    path = write_result(
        a.name,
        {
            "bench": "trace",
            "params": vars(a),
            "model_info": model_info(model, a.model),
            "setup_s": setup_s,
            "notes": [
                "Simulated time: a virtual clock advanced by measured compute (each runtime"
                " step / each batch's generate); the same arrival sequence for every system.",
                f"Adapter targets: {' '.join(a.targets)} only (512 adapters on all 7 modules do"
                " not fit PEFT on this machine).",
                "throughput = output tokens / (last finish - first arrival). TPOT = (finish -"
                " first token) / (out_len - 1). decode tok/s = tokens of pure-decode steps / their"
                " time (ours), useful decode tokens / time after the first token (batched HF).",
                "PEFT/base batches generate max(out_len) tokens for every member (static"
                " batching); only each request's own tokens count as output.",
                "adapter swaps (ours) = adapter page-ins by the engine; PEFT keeps every"
                " adapter resident, so it never swaps.",
                "1 torch thread; the machine is shared with other jobs, so figures are noisy.",
            ],
            "rows": rows,
            "decode_probe": {str(n): p for n, p in probe.items()},
            "targets": targets,
            "plot": png.name,
        },
    )
    print(f"wrote {path} and {png}")
    return 0


def _targets(
    rows: list[dict[str, Any]], ns: list[int], probe: dict[int, dict[str, float]]
) -> list[dict[str, Any]]:
    """Throughput from the trace; decode throughput from the decode probe (same batch in
    every system), with the trace's pure-decode figure kept as a second opinion."""
    n = min(ns, key=lambda x: abs(x - TARGET_N))
    by = {r["system"]: r for r in rows if r["n"] == n}
    out: list[dict[str, Any]] = []
    if "ours" in by and "peft" in by:
        ratio = by["ours"]["throughput_tok_s"] / by["peft"]["throughput_tok_s"]
        out.append(
            {
                "name": "ours / PEFT throughput",
                "n": n,
                "ratio": ratio,
                "limit": TARGET_VS_PEFT,
                "met": ratio >= TARGET_VS_PEFT,
            }
        )
    p = probe.get(n, {})
    if p.get("ours") and p.get("base"):
        ratio = p["ours"] / p["base"]
        t: dict[str, Any] = {
            "name": "ours / base-model decode throughput (same batch)",
            "n": n,
            "ratio": ratio,
            "limit": TARGET_DECODE_VS_BASE,
            "met": ratio >= TARGET_DECODE_VS_BASE,
        }
        if p.get("ours-base"):
            t["ratio_vs_ours_base"] = p["ours"] / p["ours-base"]
        if by.get("ours", {}).get("decode_tok_s") and by.get("base", {}).get("decode_tok_s"):
            t["trace_ratio"] = by["ours"]["decode_tok_s"] / by["base"]["decode_tok_s"]
        out.append(t)
    return out


def _plot(rows: list[dict[str, Any]], systems: list[str], a: Any, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in systems:
        pts = [r for r in rows if r["system"] == s]
        xs = [r["n"] for r in pts]
        axes[0].plot(xs, [r["throughput_tok_s"] for r in pts], marker="o", label=s)
        axes[1].plot(xs, [r["ttft_mean_s"] for r in pts], marker="o", label=s)
    axes[0].set_title("throughput (output tokens / s)")
    axes[1].set_title("mean time to first token (s)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters (n)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"S-LoRA-style trace: {a.requests} requests, Poisson {a.rate}/s, Zipf {a.alpha}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
