"""Our forward against Hugging Face's own, on the same model, interleaved in one run (issue
#12). Prefill of N tokens: ours runs one request with max_new_tokens=1 through the manual
step loop (prefix cache reset), HF one forward with use_cache=True and the last token's
logits. Batch-1 decode: ours through the step loop, HF `model.generate` with its KV cache;
decode time = time for 1 + M tokens minus time for 1 token (each pays its prefill once).

    python benches/bench_forward.py --model smollm2            # N = 512, 1k, 2k, 4k
    python benches/bench_forward.py --model smollm2 --quick    # N = 512, fewer repeats
    python benches/bench_forward.py --model smollm2 --profile prefill:1024   # profiler tables

HF runs on its own copy of the model (no hooks on it). Writes benches/results/<--name>.json
(default forward.json; the README's results section renders forward.json)."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import write_result

import alora

PREFILL_TARGET = 1.0  # ours / HF forward time
DECODE_TARGET = 1.0  # ours / HF generate tokens/s


Times = tuple[float, float]  # (wall s, process CPU s)
# Process CPU time is the figure the targets use: this machine's cores are shared, and a
# neighbour's burst stretches wall time 2-5x within one run (measured), CPU time far less.
CLOCKS = ("wall", "cpu")


def _now() -> Times:
    return time.perf_counter(), time.process_time()


def _since(t: Times) -> Times:
    w, c = _now()
    return w - t[0], c - t[1]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(model_arg: str | None) -> tuple[torch.nn.Module, str]:
    from alora.demo_model import load_model

    if model_arg in (None, "demo"):
        return load_model(None)[0], "demo-granite"
    from alora.models import model_label

    return load_model(model_arg)[0], model_label(model_arg)


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 20000), (n,), generator=g).tolist()


class Systems:
    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        self.hf = copy.deepcopy(model).eval()
        self.model = model.eval()
        self.rt = alora.AdapterRuntime(
            model, max_batch_tokens=4096, max_num_seqs=16, max_model_len=max_len
        )

    def _run(self, ids: list[int], new: int) -> int:
        """The manual loop on this thread (what the profiler sees); tokens generated."""
        rid = self.rt.add_request(ids, max_new_tokens=new, stop_token_ids=())
        got = 0
        while self.rt.has_unfinished():
            for out in self.rt.step():
                if out.request_id == rid and out.new_token is not None:
                    got += 1
        return got

    def ours_prefill(self, ids: list[int]) -> Times:
        self.rt.reset_prefix_cache()
        t = _now()
        self._run(ids, 1)
        return _since(t)

    @torch.inference_mode()
    def hf_prefill(self, ids: list[int]) -> Times:
        x = torch.tensor([ids])
        t = _now()
        self.hf(input_ids=x, use_cache=True, logits_to_keep=1)
        return _since(t)

    def ours_generate(self, ids: list[int], new: int) -> Times:
        self.rt.reset_prefix_cache()
        t = _now()
        got = self._run(ids, new)
        dt = _since(t)
        assert got == new, got
        return dt

    @torch.inference_mode()
    def hf_generate(self, ids: list[int], new: int) -> Times:
        x = torch.tensor([ids])
        t = _now()
        out = self.hf.generate(
            x,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        dt = _since(t)
        assert out.shape[1] == len(ids) + new
        return dt


def interleaved(fns: dict[str, Callable[[], Times]], repeats: int) -> dict[str, list[Times]]:
    """Each repeat runs every system once, in rotating order, so load spikes hit all."""
    names = list(fns)
    times: dict[str, list[Times]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            times[k].append(fns[k]())
    return times


def _paired(ours: list[float], hf: list[float]) -> dict[str, float]:
    """Medians, and the median of per-repeat ratios (neighbouring runs share the load)."""
    return {
        "ours": statistics.median(ours),
        "hf": statistics.median(hf),
        "ratio": statistics.median([a / b for a, b in zip(ours, hf, strict=True)]),
    }


def bench_prefill(s: Systems, n: int, repeats: int, vocab: int) -> dict[str, Any]:
    ids = prompt(n, vocab, seed=n)
    s.ours_prefill(ids)
    s.hf_prefill(ids)
    t = interleaved({"ours": lambda: s.ours_prefill(ids), "hf": lambda: s.hf_prefill(ids)}, repeats)
    row: dict[str, Any] = {"n": n}
    for ci, clock in enumerate(CLOCKS):
        ours, hf = [x[ci] for x in t["ours"]], [x[ci] for x in t["hf"]]
        row[clock] = {**_paired(ours, hf), "ours_all": ours, "hf_all": hf}
    _log(
        f"prefill N={n}: "
        + "; ".join(
            f"{c}: ours {row[c]['ours']:.3f}s hf {row[c]['hf']:.3f}s ratio {row[c]['ratio']:.3f}"
            for c in CLOCKS
        )
    )
    return row


def bench_decode(s: Systems, p: int, new: int, repeats: int, vocab: int) -> dict[str, Any]:
    ids = prompt(p, vocab, seed=7)
    s.ours_generate(ids, 2)
    s.hf_generate(ids, 2)
    fns = {
        "ours1": lambda: s.ours_generate(ids, 1),
        "oursM": lambda: s.ours_generate(ids, new + 1),
        "hf1": lambda: s.hf_generate(ids, 1),
        "hfM": lambda: s.hf_generate(ids, new + 1),
    }
    t = interleaved(fns, repeats)
    row: dict[str, Any] = {"prompt": p, "new_tokens": new}
    for ci, clock in enumerate(CLOCKS):
        ours = [new / (b[ci] - a[ci]) for a, b in zip(t["ours1"], t["oursM"], strict=True)]
        hf = [new / (b[ci] - a[ci]) for a, b in zip(t["hf1"], t["hfM"], strict=True)]
        row[clock] = {**_paired(ours, hf), "ours_all": ours, "hf_all": hf}
    _log(
        f"decode P={p}: "
        + "; ".join(
            f"{c}: ours {row[c]['ours']:.1f} tok/s hf {row[c]['hf']:.1f} tok/s "
            f"ratio {row[c]['ratio']:.3f}"
            for c in CLOCKS
        )
    )
    return row


def profile(s: Systems, what: str, vocab: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    kind, _, arg = what.partition(":")
    n = int(arg or 1024)
    ids = prompt(n, vocab, seed=n)
    if kind == "prefill":
        runs = {"ours": lambda: s.ours_prefill(ids), "hf": lambda: s.hf_prefill(ids)}
    else:
        runs = {"ours": lambda: s.ours_generate(ids, 33), "hf": lambda: s.hf_generate(ids, 33)}
    for name, fn in runs.items():
        fn()
        with tprof(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"==== {name} {what}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="'smollm2', 'demo' or a directory")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", default=None, help="prefill:N or decode:P: profiler tables")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--name", default="forward", help="results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, label = load(args.model)
    vocab = int(model.config.vocab_size)
    sizes = args.sizes or ([512] if args.quick else [512, 1024, 2048, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    new = args.decode_tokens or (16 if args.quick else 64)
    s = Systems(model, max_len=max(max(sizes), args.decode_prompt + new) + 8)
    if args.profile:
        profile(s, args.profile, vocab)
        return
    prefill = [bench_prefill(s, n, repeats, vocab) for n in sizes]
    decode = bench_decode(s, args.decode_prompt, new, repeats, vocab)
    payload = {
        "bench": "forward",
        "name": args.name,
        "model": label,
        "model_info": {
            "model": label,
            "layers": int(model.config.num_hidden_layers),
            "hidden": int(model.config.hidden_size),
        },
        "threads": args.threads,
        "target_clock": "cpu",
        "repeats": repeats,
        "prefill": prefill,
        "decode": decode,
        "targets": {
            "prefill_ours_over_hf_max": PREFILL_TARGET,
            "decode_ours_over_hf_min": DECODE_TARGET,
        },
    }
    if not args.no_write and not args.quick:
        _log(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
