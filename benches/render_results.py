"""Render the README's results section from the committed JSON in benches/results.

python benches/render_results.py          # rewrites README between the results markers
python benches/render_results.py --stdout # print the section only

Every number comes from the JSON files; nothing here is typed by hand. Smoke runs
(`*_quick.json`) are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import RESULTS, ROOT

START = "<!-- results:start -->"
END = "<!-- results:end -->"
README = ROOT / "README.md"


def _f(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


def _prov(d: dict[str, Any]) -> str:
    m = d.get("machine", {})
    cores = m.get("cores")
    mi = d.get("model_info")
    model = (
        ""
        if mi is None  # benches of one op on synthetic data
        else f"; model: {mi.get('model', '?')} ({mi.get('layers', '?')} layers,"
        f" hidden {mi.get('hidden', '?')})"
    )
    return (
        f"_{d.get('date', '?')}, commit `{d.get('commit', '?')}`, {m.get('cpu', '?')}"
        f" ({cores} cores), torch {m.get('torch', '?')}{model}._"
    )


def _link(d: dict[str, Any]) -> str:
    plot = d.get("plot")
    return f"![{plot}](benches/results/{plot})" if plot else ""


def chain(d: dict[str, Any]) -> list[str]:
    p = d["params"]
    rows = d["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    by = {(r["system"], r["length"]): r for r in rows}
    name = p.get("name", "chain")
    out = [
        "### Agentic chain" + ("" if name == "chain" else f" (`--name {name}`)"),
        "",
        _prov(d),
        "",
        f"After each base turn ({p['base_tokens']} tokens), k={p['k']} intrinsics"
        f" ({p['intrinsic_tokens']} tokens each, invocation of {p['inv_len']} tokens, rank"
        f" {p['rank']} on {' '.join(p['targets'])}). Median time to first token per intrinsic"
        " (seconds):",
        "",
        "| N | " + " | ".join(systems) + " |",
        "|---:|" + "---:|" * len(systems),
    ]
    for n in lengths:
        cells = [_f(by[(s, n)]["ttft_inv_median_s"], ".4f") for s in systems]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    cpu = all("chain_cpu_s" in r for r in rows)
    out += [
        "",
        "End-to-end chain time (s"
        + (", wall / process CPU" if cpu else "")
        + f"; {p.get('turns', 1)} base turn(s), {p.get('repeats', 1)} repeat(s))"
        " / tokens computed:",
        "",
        "| N | " + " | ".join(systems) + " |",
        "|---:|" + "---:|" * len(systems),
    ]
    for n in lengths:
        cells = [
            f"{_f(by[(s, n)]['chain_s'], '.2f')}"
            + (f" / {_f(by[(s, n)]['chain_cpu_s'], '.2f')}" if cpu else "")
            + f" / {by[(s, n)]['computed_tokens']}"
            for s in systems
        ]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for t in d.get("targets", []):
        if "limit" in t:
            detail = ""
            if t.get("ours_s") is not None:
                detail = (
                    f" ({_f(t['ours_s'], '.4f')} s vs {_f(t['ref_s'], '.4f')} s, {t['source']})"
                )
            out.append(
                f"| {t['name']} @N={t['length']} | {_f(t['ratio'], '.2f')}x{detail}"
                f" | {t['limit']}x | {_verdict(t.get('met'))} |"
            )
        else:
            out.append(f"| {t['name']} TTFT @N={t['length']} | {_f(t['ratio'], '.2f')}x | | |")
    out += ["", _link(d), ""]
    return out


def forward(d: dict[str, Any]) -> list[str]:
    """Issue #12: our forward against Hugging Face's on the same model (bench_forward.py)."""
    t = d["targets"]
    pre_limit, dec_limit = t["prefill_ours_over_hf_max"], t["decode_ours_over_hf_min"]
    c = d.get("target_clock", "cpu")
    name = d.get("name", "forward")
    out = [
        "### Our forward vs Hugging Face's (`bench_forward.py`"
        + ("" if name == "forward" else f" `--name {name}`")
        + ")",
        "",
        _prov(d),
        "",
        "Prefill of N tokens (ours: one request through the step loop; HF: one forward with"
        " its cache) in seconds, and batch-1 decode in tokens/s (ours vs HF `generate`);"
        f" {d['repeats']} interleaved repeats, 1 thread. Ratio: median of per-repeat ratios,"
        f" by process {c.upper()} time (the verdict's clock) and by wall time.",
        "",
        f"| measurement | ours ({c}) | HF ({c}) | ours / HF ({c}) | ours / HF (wall)"
        " | limit | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in d["prefill"]:
        m = r[c]
        out.append(
            f"| prefill N={r['n']} (s) | {_f(m['ours'])} | {_f(m['hf'])} | {_f(m['ratio'])}x"
            f" | {_f(r['wall']['ratio'])}x | <= {pre_limit}x"
            f" | {_verdict(m['ratio'] <= pre_limit)} |"
        )
    dec = d["decode"]
    m = dec[c]
    out.append(
        f"| decode, batch 1, prompt {dec['prompt']}, {dec['new_tokens']} tokens (tok/s)"
        f" | {_f(m['ours'], '.1f')} | {_f(m['hf'], '.1f')} | {_f(m['ratio'])}x"
        f" | {_f(dec['wall']['ratio'])}x | >= {dec_limit}x | {_verdict(m['ratio'] >= dec_limit)} |"
    )
    return [*out, ""]


def fanout(d: dict[str, Any]) -> list[str]:
    p = d["params"]
    rows = d["rows"]
    kmax = max(r["k"] for r in rows)
    out = [
        "### Fan-out",
        "",
        _prov(d),
        "",
        f"k intrinsics at once on a {p['length']}-token conversation, one batch (`/batch`) or"
        f" one by one (`/seq`); k={kmax} shown (all k in the JSON and plot).",
        "",
        "| system | wall (s) | mean TTFT (s) | max TTFT (s) | tokens computed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["k"] == kmax:
            out.append(
                f"| {r['system']} | {_f(r['wall_s'])} | {_f(r['ttft_mean_s'])}"
                f" | {_f(r['ttft_max_s'])} | {r['computed_tokens']} |"
            )
    out += ["", f"| ratio (k={kmax}) | value |", "|---|---:|"]
    for k, v in d.get("ratios", {}).items():
        out.append(f"| {k} | {_f(v, '.2f')}x |")
    out += ["", _link(d), ""]
    return out


def trace(d: dict[str, Any]) -> list[str]:
    p = d["params"]
    out = [
        "### Multi-adapter trace (S-LoRA style)",
        "",
        _prov(d),
        "",
        f"{p['requests']} requests, Poisson {p['rate']}/s, Zipf popularity (alpha {p['alpha']}),"
        f" {int(p['alora_frac'] * 100)}% aLoRA adapters, ranks {p['ranks']}, prompts"
        f" {p['prompt_len'][0]}-{p['prompt_len'][1]} tokens, outputs"
        f" {p['output_len'][0]}-{p['output_len'][1]}, targets {' '.join(p['targets'])}; PEFT"
        f" and base in fixed batches of {p['batch']}; simulated clock advanced by measured"
        " compute.",
        "",
        "| n | system | tok/s | TTFT mean / p99 (s) | TPOT mean / p99 (s) | decode tok/s"
        " | swaps | preemptions |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        out.append(
            f"| {r['n']} | {r['system']} | {_f(r['throughput_tok_s'], '.1f')}"
            f" | {_f(r['ttft_mean_s'])} / {_f(r['ttft_p99_s'])}"
            f" | {_f(r['tpot_mean_s'])} / {_f(r['tpot_p99_s'])}"
            f" | {_f(r['decode_tok_s'], '.1f')} | {r['adapter_loads']} | {r['preemptions']} |"
        )
    probe = d.get("decode_probe") or {}
    if probe:
        systems = [k for k in next(iter(probe.values())) if k != "distinct_adapters"]
        out += [
            "",
            f"Decode probe: the first {p['decode_batch']} requests of each trace as one batch,"
            " prefilled, then decode tokens/s:",
            "",
            "| n | distinct adapters | " + " | ".join(systems) + " |",
            "|---:|---:|" + "---:|" * len(systems),
        ]
        for n, row in probe.items():
            cells = " | ".join(_f(row.get(k), ".1f") for k in systems)
            out.append(f"| {n} | {int(row['distinct_adapters'])} | {cells} |")
    out += ["", "| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for t in d.get("targets", []):
        extra = ""
        if "ratio_vs_ours_base" in t:
            extra = f" (vs our runtime without adapters: {_f(t['ratio_vs_ours_base'], '.2f')}x)"
        if "trace_ratio" in t:
            extra += f" (trace pure-decode steps: {_f(t['trace_ratio'], '.2f')}x)"
        out.append(
            f"| {t['name']} @n={t['n']} | {_f(t['ratio'], '.2f')}x{extra} | {t['limit']}x"
            f" | {_verdict(t.get('met'))} |"
        )
    out += ["", _link(d), ""]
    return out


def core(d: dict[str, Any]) -> list[str]:
    b = d.get("benches", {}).get("schedule_commit/256", {})
    us = b.get("median_ns")
    return [
        "### Rust core",
        "",
        f"_{d.get('date', '?')}, commit `{d.get('commit', '?')}`._ schedule + commit at 256"
        f" sequences: {_f(None if us is None else us / 1000, '.1f')} us (target <"
        f" {d.get('target_schedule_commit_256_us')} us): {_verdict(d.get('target_met'))}.",
        "",
    ]


def runtime(results: Path) -> list[str]:
    """Issue #3's figures (bench_runtime.py): demo model, plus a wider model and SmolLM2
    when present."""
    out = ["### aLoRA invocation TTFT and multi-adapter decode (`bench_runtime.py`)", ""]
    rows = []
    for folder in (results, results / "wide_model", results / "smollm2"):
        ttft_path = folder / "runtime_alora_ttft.json"
        dec_path = folder / "runtime_decode_16_adapters.json"
        if not (ttft_path.is_file() and dec_path.is_file()):
            continue
        t, dec = json.loads(ttft_path.read_text()), json.loads(dec_path.read_text())
        out.append(_prov(t))
        out.append("")
        ms = {k: v * 1000 for k, v in t["median_ttft_s"].items()}
        tok = dec["median_tokens_per_s"]
        rows.append(
            f"| {t['model_info'].get('hidden', '?')} x {t['model_info'].get('layers', '?')}"
            f" | {t['conv_len']} | {_f(ms['limit'], '.1f')} | {_f(ms['alora'], '.1f')}"
            f" | {_f(ms['lora'], '.0f')} | {_f(t['alora_over_limit'], '.3f')}x"
            f" ({_verdict(t['met'])}) | {_f(tok['base'], '.0f')} | {_f(tok['adapters'], '.0f')}"
            f" | {_f(dec['adapters_over_base'], '.3f')}x"
            f" (>= {dec.get('target_adapters_over_base', '?')}: {_verdict(dec['met'])})"
            f" | {_f(dec.get('adapters_over_base_cpu_paired'), '.3f')}x"
            f" | {_f(dec.get('ceiling_adapters_over_base'), '.3f')}x"
            f" | {_f(dec.get('kernel_ms_per_step'), '.2f')}"
            f" | {_f(dec.get('kernel_gb_s'), '.1f')} / {_f(dec.get('read_rate_gb_s'), '.1f')} |"
        )
    if not rows:
        return []
    out += [
        "Median TTFT (ms) of an invocation on a cached conversation: the base model prefilling",
        "only the suffix on its cache (the limit), the aLoRA call, the same weights as LoRA;",
        "decode tokens/s of 16 requests with 16 distinct rank-16 adapters vs without adapters",
        "(target: aLoRA <= 1.1x the limit); the decode ratio of the medians, and the median of",
        "the CPU-time ratios of base and adapter runs made back to back (less exposed to load",
        "drift). Ceiling: the ratio one core allows with no host cost at all, the base step",
        "plus every adapter row read once at `torch.sum`'s rate from memory (measured in the",
        "same run); then the LoRA kernel's ms per step (one extra untimed run) and its read",
        "rate against `torch.sum`'s (GB/s).",
        "",
        "| hidden x layers | conversation | limit | aLoRA | LoRA | aLoRA / limit"
        " | decode base | decode 16 adapters | ratio | paired | ceiling | kernel ms/step"
        " | kernel / sum GB/s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
        "![runtime_ttft.png](benches/results/runtime_ttft.png)",
        "",
    ]
    return out


def cpu_kernel(d: dict[str, Any]) -> list[str]:
    """The CPU LoRA kernel's read rate and its crossover with torch (bench_cpu_kernel.py)."""
    bw = d["bandwidth"]
    mem, hot = bw["from_memory_gb_s"], bw["from_cache_gb_s"]
    out = [
        "### CPU LoRA kernel (`bench_cpu_kernel.py`)",
        "",
        _prov(d),
        "",
        f"One decode step's rows ({bw['step_mb']:.1f} MB: 16 adapters, rank {d['rank']},"
        f" q/k/v/o of {bw['layers']} layers) from memory: kernel {mem['kernel']:.1f} GB/s,"
        f" `torch.sum` over the same bytes {mem['torch_sum']:.1f} GB/s; one module's rows"
        f" ({bw['module_mb']:.2f} MB) from cache: {hot['kernel']:.1f} vs"
        f" {hot['torch_sum']:.1f} GB/s. Kernel time / torch reference time by segment shape"
        f" (`CpuBackend.max_seg_tokens` = {d['current_max_seg_tokens']}):",
        "",
        "| in | segments x tokens | kernel (us) | torch (us) | kernel / torch |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in d["crossover"]:
        out.append(
            f"| {r['in']} | {r['segments']} x {r['tokens_per_segment']}"
            f" | {r['kernel_us']:.1f} | {r['torch_us']:.1f} | {r['kernel_over_torch']:.2f}x |"
        )
    return [*out, ""]


def decode_profile(d: dict[str, Any]) -> list[str]:
    """Where a 16-adapter decode step's time goes (profile_decode.py)."""
    rows = [
        f"| {q} | {_f(r['base_ms'], '.2f')} | {_f(r['adapters_ms'], '.2f')}"
        f" | {_f(r['adapters_over_base'], '.3f')}x | {_f(r['host_ms'], '.2f')}"
        f" | {_f(r['kernel_inside_ms'], '.2f')} ({_f(r['kernel_gb_s'], '.1f')} GB/s)"
        f" | {_f(r['after_kernel_ms'], '.2f')} | {_f(r.get('read_floor_ms'), '.2f')}"
        f" | {_f(r.get('read_only_over_base'), '.3f')}x |"
        for q, r in d["percentiles"].items()
    ]
    steps = d["steps_per_form"]
    return [
        f"### Where a {d['adapters']}-adapter decode step goes: {d['model']} (`profile_decode.py`)",
        "",
        _prov(d),
        "",
        f"Per-step CPU ms, {steps['base']} base steps and {steps['adapters']} per adapter form"
        " (the adapter forms take turns step by step in the same runs): base; adapters; host"
        " = adapters with the kernel call a no-op, minus base (in runs whose other steps read"
        " rows, so it carries what those reads leave in the caches); the kernel's time inside its"
        f" calls ({_f(d['lora_mb_per_step'], '.1f')} MB of rows per step) and after them (the"
        " base ops that follow, slower on the evicted caches); read floor = each kernel call"
        " replaced by a plain `torch.sum` over as many contiguous bytes, minus the no-op form:"
        " what the rows' bytes alone cost at a stream's rate; read only = base over that form"
        " (host time included), the ratio a kernel as fast as a plain read would reach.",
        "",
        "| percentile | base | adapters | ratio | host | kernel inside | after kernel"
        " | read floor | read only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def hook(d: dict[str, Any]) -> list[str]:
    """Host time of one LoRA hook call, bound vs generic path (bench_hook.py)."""
    sh = d["shape"]
    rows = [f"| {k} | {_f(v, '.2f')} |" for k, v in d["us_per_call"].items()]
    ratio = d["bound_over_add_lora"]
    return [
        "### One LoRA hook call on the CPU (`bench_hook.py`)",
        "",
        _prov(d),
        "",
        f"Warm, 1 thread, {sh['adapters']} one-token segments of rank {sh['rank']},"
        f" {sh['features']} -> {sh['features']} (rows in cache); best of {d['repeats']}"
        f" repeats of {d['calls']} calls. The hook with the backend's bound call (the"
        " runtime's path) vs a backend without `bind` (reshape, view, `add_lora`): bound /"
        f" generic {_f(ratio['no-op'], '.2f')}x of the host time,"
        f" {_f(ratio['running'], '.2f')}x with the kernel running.",
        "",
        "| form | us per call |",
        "|---|---:|",
        *rows,
        "",
    ]


def memory(d: dict[str, Any]) -> list[str]:
    from bench_memory import markdown  # the bench owns its section's layout

    return markdown(d)


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "forward": forward,
    "chain": chain,
    "chain_smollm2": chain,
    "fanout": fanout,
    "trace": trace,
    "memory": memory,
    "cpu_kernel": cpu_kernel,
    "decode_profile": decode_profile,
    "decode_profile_smollm2": decode_profile,
    "hook": hook,
    "core_scheduler": core,
}


def render(results: Path = RESULTS) -> str:
    lines = [
        "## Results",
        "",
        "Generated by `python benches/render_results.py` from `benches/results/*.json`;"
        " CPU runs on a shared 2-core machine (noisy: compare ratios within one run).",
        "",
    ]
    lines += runtime(results)
    for name, fn in RENDERERS.items():
        path = results / f"{name}.json"
        if path.is_file():
            d = json.loads(path.read_text())
            d.setdefault("name", name)  # which file, for renderers that title by it
            lines += fn(d)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdout", action="store_true", help="print instead of rewriting README")
    ap.add_argument("--readme", type=Path, default=README)
    a = ap.parse_args()
    section = render()
    text = a.readme.read_text() if a.readme.is_file() else ""
    if a.stdout or START not in text or END not in text:
        if not a.stdout:
            print(f"note: no {START} ... {END} markers in {a.readme}; printing instead")
        print(section)
        return 0
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    a.readme.write_text(f"{head}{START}\n{section}{END}{tail}")
    print(f"rewrote the results section of {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
