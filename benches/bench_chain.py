"""Agentic chain (the aLoRA paper's scenario): a conversation grows by base-model turns and
after each base turn k intrinsics are invoked on it. Five systems on the same token streams:

  ours-alora  our runtime, aLoRA adapters (base KV reused through the prefix cache)
  ours-lora   our runtime, the same weights as plain LoRA (whole context recomputed)
  peft-alora  PEFT aLoRA, base cache reused by hand as PEFT documents (deepcopy + generate)
  peft-lora   PEFT plain LoRA (whole context recomputed per intrinsic)
  base        the base model alone: each "intrinsic" prefills only the invocation on the
              base model's own cache (cropped back afterwards): the lower bound for aLoRA

python benches/bench_chain.py            # default sweep (~10 min on 2 CPU cores)
python benches/bench_chain.py --quick    # < 1 min smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
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

SYSTEMS = ("ours-alora", "ours-lora", "peft-alora", "peft-lora", "base")
TARGET_N = 2048
TARGET_VS_BASE = 1.05  # our aLoRA TTFT <= 1.05x the base model prefilling the invocation only
TARGET_VS_PEFT = 1.0  # and no slower than PEFT with hand-managed caches
TARGET_CHAIN_VS_PEFT = 0.9  # our aLoRA chain end to end <= 0.9x PEFT with a hand-kept cache

Chain = dict[str, Any]


def make_chain(rng: np.random.Generator, n: int, turns: int, vocab: int) -> list[list[int]]:
    """User segments whose sum is n tokens; ids >= 16 so they never collide with the
    invocation sequences (ids 3..15)."""
    sizes = [n // turns] * turns
    sizes[-1] += n - sum(sizes)
    return [[int(t) for t in rng.integers(16, vocab, size=s)] for s in sizes]


def _record(
    out: Chain, turn: int, ctx: int, ttft: float, computed: int, kind: str, last: bool
) -> None:
    out.setdefault(f"{kind}_ttft", []).append(ttft)
    out.setdefault(f"{kind}_ctx", []).append(ctx)
    out.setdefault(f"{kind}_turn", []).append(turn)
    out["computed"] = out.get("computed", 0) + computed
    if kind == "inv":
        out["inv_computed"] = out.get("inv_computed", 0) + computed
        if last:
            out.setdefault("last_inv_ttft", []).append(ttft)


def run_ours(
    rt: AdapterRuntime, segments: list[list[int]], names: list[str], invs: list[list[int]], a: Any
) -> Chain:
    rt.reset_prefix_cache()  # each system starts cold; reuse happens within its own chain only
    out: Chain = {}
    history: list[int] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for turn, seg in enumerate(segments):
        last = turn == len(segments) - 1
        history = history + seg
        r = rt.generate([history], None, max_new_tokens=a.base_tokens, stop_token_ids=())[0]
        _record(
            out, turn, len(history), r.time_to_first_token or 0.0, r.computed_tokens, "base", last
        )
        history = history + r.token_ids
        for name, inv in zip(names, invs, strict=True):
            r = rt.generate(
                [history + inv], name, max_new_tokens=a.intrinsic_tokens, stop_token_ids=()
            )[0]
            _record(
                out,
                turn,
                len(history),
                r.time_to_first_token or 0.0,
                r.computed_tokens,
                "inv",
                last,
            )
    out["chain_s"] = time.perf_counter() - t0
    # Process CPU time (every thread of this process, the engine loop's included): on a
    # shared machine a neighbour's burst stretches wall time, this far less.
    out["chain_cpu_s"] = time.process_time() - c0
    out["preemptions"] = int(rt.stats().get("preemptions", 0))
    out["state"] = history
    return out


def run_hf(
    model: Any,
    segments: list[list[int]],
    names: list[str],
    invs: list[list[int]],
    a: Any,
    mode: str,
) -> Chain:
    """mode: "peft-alora" (hand cache, deepcopy), "peft-lora" (no reuse), "base" (crop)."""
    out: Chain = {}
    history: list[int] = []
    cache = None
    peft = mode != "base"
    t0, c0 = time.perf_counter(), time.process_time()
    for turn, seg in enumerate(segments):
        last = turn == len(segments) - 1
        cached = 0 if cache is None else cache.get_seq_length()
        history = history + seg
        ids = torch.tensor([history])
        if peft:
            with model.disable_adapter():
                g = hf_generate(model, ids, max_new_tokens=a.base_tokens, past_key_values=cache)
        else:
            g = hf_generate(model, ids, max_new_tokens=a.base_tokens, past_key_values=cache)
        cache = g.cache
        comp = computed_hf(len(history), cached, a.base_tokens)
        _record(out, turn, len(history), g.ttft, comp, "base", last)
        history = history + g.tokens[0].tolist()
        base_len = cache.get_seq_length()  # = len(history) - 1: the last token is not cached
        for name, inv in zip(names, invs, strict=True):
            ids = torch.tensor([history + inv])
            if mode == "peft-alora":
                model.set_adapter(name)
                g = hf_generate(
                    model,
                    ids,
                    max_new_tokens=a.intrinsic_tokens,
                    past_key_values=cache,
                    copy_cache=True,
                )
                comp = computed_hf(ids.shape[1], base_len, a.intrinsic_tokens)
            elif mode == "peft-lora":
                model.set_adapter(name)
                g = hf_generate(model, ids, max_new_tokens=a.intrinsic_tokens)
                comp = computed_hf(ids.shape[1], 0, a.intrinsic_tokens)
            else:
                g = hf_generate(
                    model, ids, max_new_tokens=a.intrinsic_tokens, past_key_values=cache
                )
                # Back to the base conversation for the next call (transformers 5 takes the
                # number of tokens to drop, negated).
                cache.crop(base_len - cache.get_seq_length())
                comp = computed_hf(ids.shape[1], base_len, a.intrinsic_tokens)
            _record(out, turn, len(history), g.ttft, comp, "inv", last)
    out["chain_s"] = time.perf_counter() - t0
    # Process CPU time (every thread of this process, the engine loop's included): on a
    # shared machine a neighbour's burst stretches wall time, this far less.
    out["chain_cpu_s"] = time.process_time() - c0
    out["preemptions"] = 0
    out["state"] = (history, cache)
    return out


def run_probe(
    rt: AdapterRuntime | None,
    states: dict[str, Any],
    models: dict[str, Any],
    names: list[str],
    invs: list[list[int]],
    a: Any,
) -> dict[str, Any]:
    """The target measurement at N ~ 2048: the same invocations on the same conversation,
    systems interleaved round by round so that load from other processes on this shared
    machine hits all of them alike. Median over rounds x intrinsics."""
    ttft: dict[str, list[float]] = {}
    if rt is not None and "ours-alora" in states:
        hist = states["ours-alora"]
        rt.reset_prefix_cache()
        rt.generate([hist], None, max_new_tokens=1, stop_token_ids=())  # base KV into the cache
    for _ in tqdm(range(a.probe_repeats), desc="probe", unit="round", leave=False):
        for name, inv in zip(names, invs, strict=True):
            if rt is not None and "ours-alora" in states:
                r = rt.generate(
                    [states["ours-alora"] + inv], name, max_new_tokens=1, stop_token_ids=()
                )[0]
                ttft.setdefault("ours-alora", []).append(r.time_to_first_token or 0.0)
                # Our runtime's own base path on the same suffix: isolates the aLoRA overhead.
                r = rt.generate(
                    [states["ours-alora"] + inv], None, max_new_tokens=1, stop_token_ids=()
                )[0]
                ttft.setdefault("ours-base", []).append(r.time_to_first_token or 0.0)
            if models.get("base") is not None and "base" in states:
                hist, cache = states["base"]
                base_len = cache.get_seq_length()
                g = hf_generate(
                    models["base"],
                    torch.tensor([hist + inv]),
                    max_new_tokens=1,
                    past_key_values=cache,
                )
                cache.crop(base_len - cache.get_seq_length())
                ttft.setdefault("base", []).append(g.ttft)
            if models.get("peft-alora") is not None and "peft-alora" in states:
                hist, cache = states["peft-alora"]
                pm = models["peft-alora"]
                pm.set_adapter(name)
                g = hf_generate(
                    pm,
                    torch.tensor([hist + inv]),
                    max_new_tokens=1,
                    past_key_values=cache,
                    copy_cache=True,
                )
                ttft.setdefault("peft-alora", []).append(g.ttft)
    n = len(states.get("ours-alora") or states.get("base", ([], None))[0])
    return {
        "context_tokens": n,
        "rounds": a.probe_repeats,
        "ttft_s": ttft,
        "ttft_median_s": {s: statistics.median(v) for s, v in ttft.items()},
        "ttft_min_s": {s: min(v) for s, v in ttft.items()},
    }


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--k", type=int, default=2, help="intrinsics invoked after each base turn")
    ap.add_argument("--turns", type=int, default=1, help="base turns per conversation")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--base-tokens", type=int, default=16, help="tokens per base turn")
    ap.add_argument("--intrinsic-tokens", type=int, default=4, help="tokens per intrinsic")
    ap.add_argument("--inv-len", type=int, default=6, help="invocation sequence length")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument(
        "--probe-repeats",
        type=int,
        default=5,
        help="interleaved rounds of the target measurement at N~2048 (0: off)",
    )
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument(
        "--model", default=None, help="'smollm2' or a local transformers model directory"
    )
    ap.add_argument("--layers", type=int, default=None, help="demo model with this many layers")
    # One thread by default: this machine is shared, and with 2 threads every op waits for
    # the slower thread whenever another process takes a core (2-30x noisier, measured).
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--name", default="chain", help="results/<name>.json and .png")
    ap.add_argument("--quick", action="store_true", help="smoke run: short lengths, 1 repeat")
    a = ap.parse_args()
    if a.quick:
        a.lengths, a.repeats, a.base_tokens, a.intrinsic_tokens = [128, 256], 1, 4, 2
        a.name = a.name if a.name != "chain" else "chain_quick"
    return a


def main() -> int:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _tok = bench_model(a.model, a.layers)
    vocab = model.config.vocab_size
    invs = [[3 + (j * a.inv_len + i) % 13 for i in range(a.inv_len)] for j in range(a.k)]
    for j, inv in enumerate(invs):  # a distinct first token makes every sequence distinct
        inv[0] = 3 + j
    specs = [
        AdapterSpec(f"int{j}", "alora", a.rank, tuple(a.targets), tuple(invs[j]), seed=100 + j)
        for j in range(a.k)
    ]
    sds = [random_state_dict(model, s) for s in specs]
    names_alora = [s.name for s in specs]
    names_lora = [f"{s.name}_lora" for s in specs]

    # One model copy per system family: the runtime hooks its own copy.
    runners: dict[str, Callable[[list[list[int]]], Chain]] = {}
    pa: Any = None
    bm: Any = None
    if {"ours-alora", "ours-lora"} & set(a.systems):
        rt = AdapterRuntime(fresh_copy(model), max_model_len=max(a.lengths) + 256)
        for s, sd in zip(specs, sds, strict=True):
            rt.load_adapter(s.name, state_dict=sd, config=s.config("alora"))
            rt.load_adapter(f"{s.name}_lora", state_dict=sd, config=s.config("lora"))
        runners["ours-alora"] = lambda seg: run_ours(rt, seg, names_alora, invs, a)
        runners["ours-lora"] = lambda seg: run_ours(rt, seg, names_lora, invs, a)
    if "peft-alora" in a.systems:
        pa = build_peft_model(
            model, [(s.name, s.config("alora"), sd) for s, sd in zip(specs, sds, strict=True)]
        )
        runners["peft-alora"] = lambda seg: run_hf(pa, seg, names_alora, invs, a, "peft-alora")
    if "peft-lora" in a.systems:
        pl = build_peft_model(
            model, [(s.name, s.config("lora"), sd) for s, sd in zip(specs, sds, strict=True)]
        )
        runners["peft-lora"] = lambda seg: run_hf(pl, seg, names_alora, invs, a, "peft-lora")
    if "base" in a.systems:
        bm = fresh_copy(model)
        runners["base"] = lambda seg: run_hf(bm, seg, names_alora, invs, a, "base")
    systems = [s for s in SYSTEMS if s in runners]

    # Warm-up: first calls pay one-off costs (allocator, lazy imports) that are not the
    # steady state being compared.
    warm = make_chain(np.random.default_rng(0), 64, 1, vocab)
    for s in systems:
        runners[s](warm)

    raw: dict[str, dict[int, list[Chain]]] = {s: {} for s in systems}
    target_n = min(a.lengths, key=lambda x: abs(x - TARGET_N))
    probe: dict[str, Any] = {}
    jobs = [(n, r) for n in a.lengths for r in range(a.repeats)]
    for n, r in tqdm(jobs, desc="chain", unit="conv"):
        segments = make_chain(np.random.default_rng(1000 + 7 * n + r), n, a.turns, vocab)
        for s in systems:
            raw[s].setdefault(n, []).append(runners[s](segments))
        if n == target_n and r == 0 and a.probe_repeats > 0:
            probe = run_probe(
                rt if "ours-alora" in runners else None,
                {s: raw[s][n][0]["state"] for s in systems},
                {"peft-alora": pa, "base": bm},
                names_alora,
                invs,
                a,
            )
        for s in systems:
            raw[s][n][-1].pop("state", None)  # caches are large; keep only numbers

    rows: list[dict[str, Any]] = []
    for n in a.lengths:
        for s in systems:
            chains = raw[s][n]
            inv_all = [t for c in chains for t in c["last_inv_ttft"]]
            rows.append(
                {
                    "system": s,
                    "length": n,
                    "ttft_inv_median_s": statistics.median(inv_all),
                    "ttft_inv_all_s": inv_all,
                    "ttft_base_turn_s": statistics.median([c["base_ttft"][-1] for c in chains]),
                    "chain_s": statistics.median([c["chain_s"] for c in chains]),
                    "chain_cpu_s": statistics.median([c["chain_cpu_s"] for c in chains]),
                    "computed_tokens": int(statistics.median([c["computed"] for c in chains])),
                    "inv_computed_tokens": int(
                        statistics.median([c["inv_computed"] for c in chains])
                    ),
                    "preemptions": max(c["preemptions"] for c in chains),
                }
            )

    # Table.
    print(
        f"\n{'N':>5} {'system':11s} {'TTFT/inv s':>10} {'base-turn s':>11} {'chain s':>8}"
        f" {'CPU s':>8} {'computed':>9} {'inv comp':>8}"
    )
    for row in rows:
        print(
            f"{row['length']:5d} {row['system']:11s} {fmt(row['ttft_inv_median_s'], '.4f'):>10}"
            f" {fmt(row['ttft_base_turn_s']):>11} {fmt(row['chain_s'], '.2f'):>8}"
            f" {fmt(row['chain_cpu_s'], '.2f'):>8}"
            f" {row['computed_tokens']:9d} {row['inv_computed_tokens']:8d}"
        )

    verdict = _verdict(rows, a.lengths, probe)
    for line in verdict["lines"]:
        print(line)

    name = a.name
    png = Path(os.environ.get("ALORA_RESULTS_DIR", RESULTS)) / f"{name}.png"
    _plot(rows, systems, a, png)
    payload = {
        "bench": "chain",
        "params": {k: v for k, v in vars(a).items() if k not in ("quick",)} | {"quick": a.quick},
        "model_info": model_info(model, a.model),
        "notes": [
            "TTFT per invocation = median over the k intrinsics (and repeats) of the last turn;"
            " ours: GenerationResult.time_to_first_token (add_request to first token);"
            " HF: generate() call to the streamer's first token.",
            "peft-alora deep-copies the base cache inside the timed call (PEFT's documented"
            " recipe); base crops its cache back instead (the cheapest possible reuse).",
            "computed tokens = prompt tokens run through the model + decode inputs, whole chain.",
            "Every system generates exactly the requested tokens (EOS ignored) from the same"
            " token streams; greedy decoding.",
        ],
        "rows": rows,
        "probe": probe,
        "targets": verdict["targets"],
        "plot": png.name,
    }
    path = write_result(name, payload)
    print(f"wrote {path} and {png}")
    return 0


def _verdict(
    rows: list[dict[str, Any]], lengths: list[int], probe: dict[str, Any]
) -> dict[str, Any]:
    """Target ratios from the interleaved probe when there is one (less exposed to noise),
    else from the sweep's medians."""
    n = min(lengths, key=lambda x: abs(x - TARGET_N))
    by = {r["system"]: r for r in rows if r["length"] == n}
    med = probe.get("ttft_median_s") or {s: r["ttft_inv_median_s"] for s, r in by.items()}
    source = "probe" if probe.get("ttft_median_s") else "sweep"
    targets: list[dict[str, Any]] = []
    lines: list[str] = []
    ours = med.get("ours-alora")
    for other, limit, label in (
        ("base", TARGET_VS_BASE, "ours-alora TTFT / base invocation-only prefill"),
        ("peft-alora", TARGET_VS_PEFT, "ours-alora TTFT / PEFT aLoRA (hand cache)"),
    ):
        ref = med.get(other)
        ratio = ours / ref if ours and ref else None
        met = None if ratio is None else ratio <= limit
        targets.append(
            {
                "name": label,
                "length": n,
                "ratio": ratio,
                "limit": limit,
                "met": met,
                "ours_s": ours,
                "ref_s": ref,
                "source": source,
            }
        )
        lines.append(
            f"target @N={n} ({source}): {label} = {fmt(ratio, '.2f')}x"
            f" ({fmt(ours, '.4f')} s vs {fmt(ref, '.4f')} s; limit {limit}x): "
            f"{'met' if met else 'MISSED' if met is not None else 'n/a'}"
        )
    if med.get("ours-base") and med.get("ours-alora"):
        ratio = med["ours-alora"] / med["ours-base"]
        lines.append(f"diagnostic @N={n}: ours-alora / our runtime's base path = {ratio:.2f}x")
        targets.append(
            {"name": "diagnostic: ours-alora / ours base path", "length": n, "ratio": ratio}
        )
    # End to end, at every length: the whole chain (base turns included), which is what a
    # user of an agentic chain waits for.
    for length in lengths:
        at = {r["system"]: r for r in rows if r["length"] == length}
        ours_s = at.get("ours-alora", {}).get("chain_cpu_s")
        peft_s = at.get("peft-alora", {}).get("chain_cpu_s")
        if ours_s and peft_s:
            ratio = ours_s / peft_s
            met = ratio <= TARGET_CHAIN_VS_PEFT
            label = "ours-alora chain / PEFT aLoRA chain (hand cache), end to end, CPU s"
            targets.append(
                {
                    "name": label,
                    "length": length,
                    "ratio": ratio,
                    "limit": TARGET_CHAIN_VS_PEFT,
                    "met": met,
                    "ours_s": ours_s,
                    "ref_s": peft_s,
                    "source": "sweep",
                }
            )
            lines.append(
                f"target @N={length}: {label} = {ratio:.2f}x ({ours_s:.2f} s vs {peft_s:.2f} s;"
                f" limit {TARGET_CHAIN_VS_PEFT}x): {'met' if met else 'MISSED'}"
            )
    ours_sweep = by.get("ours-alora", {}).get("ttft_inv_median_s")
    for other in ("ours-lora", "peft-lora"):
        ref = by.get(other, {}).get("ttft_inv_median_s")
        ours = ours_sweep
        if ours and ref:
            lines.append(f"speed-up @N={n}: ours-alora vs {other} TTFT = {ref / ours:.1f}x")
            targets.append({"name": f"speed-up vs {other}", "length": n, "ratio": ref / ours})
    return {"targets": targets, "lines": lines}


def _plot(rows: list[dict[str, Any]], systems: list[str], a: Any, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in systems:
        pts = [
            (r["length"], r["ttft_inv_median_s"], r["chain_s"]) for r in rows if r["system"] == s
        ]
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=s)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=s)
    axes[0].set_title(f"time to first token per intrinsic (k={a.k})")
    axes[0].set_ylabel("seconds")
    axes[1].set_title("end-to-end chain time")
    axes[1].set_ylabel("seconds")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("conversation length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
