"""`alora serve` under an intrinsics workload, against the same workload in-process.

Many concurrent multi-turn conversations, as an intrinsics client (granite-common, mellea)
sends them: each turn a base-model chat completion (the assistant's answer), then an
intrinsic call on the conversation so far (an aLoRA adapter as `model`, logprobs with
top_logprobs). Greedy decoding with fixed output lengths, so both runs do the same work
and produce the same text (checked). Reports throughput (generated tokens/s over the
whole workload), p50/p99 time to first token of base and intrinsic calls, and the share of
prompt tokens whose KV came from the prefix cache; then the server's overhead over
in-process (`rt.stream_async`), with the targets < 5% throughput and < 3 ms p50 TTFT.

The server runs as its own process (`python -m alora.serving`) with the same model, adapter
and engine settings; the load generator is a lean asyncio httpx client in this process.

python benches/bench_serve.py                 # SmolLM2-135M-Instruct, 8 conversations x 4 turns
python benches/bench_serve.py --quick         # tiny random model, < 1 min smoke run
python benches/bench_serve.py --model PATH    # a local transformers model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import write_result

INTRINSIC = "certainty"
INTRINSIC_MESSAGE = "How certain is the answer above?"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec for alora.models.load_model")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--base-tokens", type=int, default=24, help="tokens per base answer")
    ap.add_argument("--intrinsic-tokens", type=int, default=4, help="tokens per intrinsic")
    ap.add_argument("--top-logprobs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both runs)")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--alone", type=int, default=2, help="conversations run one at a time")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each mode")
    ap.add_argument("--quick", action="store_true", help="tiny model, small workload")
    ap.add_argument("--out", default="serve", help="result name in benches/results")
    args = ap.parse_args()
    if args.quick:
        args.tiny = True
        args.conversations, args.turns, args.base_tokens, args.repeats = 4, 2, 8, 1
        args.alone = 1
        args.out = "serve_quick"
    return args


@dataclass
class Call:
    kind: str  # "base" | "intrinsic"
    ttft: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    text: str


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    wall: float = 0.0
    transcripts: list[list[str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

        out: dict[str, Any] = {"wall_s": self.wall}
        toks = sum(c.tokens for c in self.calls)
        out["generated_tokens"] = toks
        out["throughput_tok_s"] = toks / self.wall
        for kind in ("base", "intrinsic"):
            t = [c.ttft for c in self.calls if c.kind == kind]
            out[f"{kind}_calls"] = len(t)
            out[f"{kind}_ttft_p50_ms"] = 1000 * statistics.median(t)
            out[f"{kind}_ttft_p99_ms"] = 1000 * pct(t, 0.99)
        prompt = sum(c.prompt_tokens for c in self.calls)
        out["prompt_tokens"] = prompt
        out["cached_share"] = sum(c.cached_tokens for c in self.calls) / max(1, prompt)
        return out


def user_message(conv: int, turn: int) -> str:
    return (
        f"Conversation {conv}, question {turn}: what is the boiling point of water at "
        f"an altitude of {turn * 1000 + conv} metres, and why?"
    )


def invocation_tokens(tokenizer: Any) -> list[int]:
    """The last tokens of the rendered intrinsic turn: the same at the end of any
    conversation, so the adapter activates exactly there (like Granite intrinsics, whose
    invocation is the turn that asks for them)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": INTRINSIC_MESSAGE}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    return list(ids[-6:])


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------- in-process


async def inprocess_conversation(
    rt: Any, tok: Any, args: argparse.Namespace, c: int, run: Run
) -> list[str]:
    messages: list[dict[str, str]] = []
    transcript = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_message(c, turn)})
        for kind in ("base", "intrinsic"):
            msgs = (
                messages
                if kind == "base"
                else [*messages, {"role": "user", "content": INTRINSIC_MESSAGE}]
            )
            t0 = time.perf_counter()
            ids = chat_ids(tok, msgs)
            ttft = None
            result = None
            async for d in rt.stream_async(
                [ids],
                None if kind == "base" else INTRINSIC,
                max_new_tokens=args.base_tokens if kind == "base" else args.intrinsic_tokens,
                temperature=0.0,
                stop_token_ids=(),
                logprobs=None if kind == "base" else args.top_logprobs,
            ):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if d.finished:
                    result = d.result
            assert result is not None and ttft is not None
            text = tok.decode(result.token_ids, skip_special_tokens=True)
            run.calls.append(
                Call(
                    kind,
                    ttft,
                    len(result.token_ids),
                    result.prompt_tokens,
                    result.cached_tokens,
                    text,
                )
            )
            transcript.append(text)
            if kind == "base":
                messages.append({"role": "assistant", "content": text})
    return transcript


async def inprocess(
    rt: Any, tok: Any, args: argparse.Namespace, convs: range, concurrent: bool = True
) -> Run:
    run = Run()
    t0 = time.perf_counter()
    if concurrent:
        run.transcripts = list(
            await asyncio.gather(*(inprocess_conversation(rt, tok, args, c, run) for c in convs))
        )
    else:
        run.transcripts = [await inprocess_conversation(rt, tok, args, c, run) for c in convs]
    run.wall = time.perf_counter() - t0
    return run


# ---------------------------------------------------------------------------- over HTTP


async def http_conversation(
    client: Any, url: str, model: str, args: argparse.Namespace, c: int, run: Run
) -> list[str]:
    messages: list[dict[str, str]] = []
    transcript = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_message(c, turn)})
        for kind in ("base", "intrinsic"):
            body: dict[str, Any] = {
                "model": model if kind == "base" else INTRINSIC,
                "messages": messages
                if kind == "base"
                else [*messages, {"role": "user", "content": INTRINSIC_MESSAGE}],
                "max_tokens": args.base_tokens if kind == "base" else args.intrinsic_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if kind == "intrinsic":
                body |= {"logprobs": True, "top_logprobs": args.top_logprobs}
            t0 = time.perf_counter()
            ttft = None
            text, usage = "", None
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for ch in chunk["choices"]:
                        delta = ch["delta"]
                        if ttft is None and (delta.get("content") or ch.get("logprobs")):
                            ttft = time.perf_counter() - t0
                        text += delta.get("content") or ""
            assert usage is not None and ttft is not None
            run.calls.append(
                Call(
                    kind,
                    ttft,
                    usage["completion_tokens"],
                    usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"],
                    text,
                )
            )
            transcript.append(text)
            if kind == "base":
                messages.append({"role": "assistant", "content": text})
    return transcript


async def over_http(
    url: str, model: str, args: argparse.Namespace, convs: range, concurrent: bool = True
) -> Run:
    import httpx

    run = Run()
    n = len(convs)
    limits = httpx.Limits(max_connections=4 * n, max_keepalive_connections=4 * n)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrent:
            run.transcripts = list(
                await asyncio.gather(
                    *(http_conversation(client, url, model, args, c, run) for c in convs)
                )
            )
        else:
            run.transcripts = [
                await http_conversation(client, url, model, args, c, run) for c in convs
            ]
        run.wall = time.perf_counter() - t0
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, adapter: Path) -> tuple[subprocess.Popen, str, str]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "alora.serving",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--adapter",
        f"{INTRINSIC}={adapter}",
        "--threads",
        str(args.threads),
        "--kv-cache-memory",
        args.kv_cache_memory,
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    cmd += ["--tiny"] if args.tiny else (["--model", args.model] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.25)
    models = httpx.get(url + "/v1/models").json()["data"]
    base = next(m["id"] for m in models if m.get("parent") is None)
    return proc, url, base


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from alora import AdapterRuntime
    from alora.models import load_model, model_label
    from alora.serving.cli import parse_bytes
    from alora.testing import make_peft_adapter

    model, tok = load_model(args.model, tiny=args.tiny)
    label = model_label(args.model, args.tiny)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    inv = invocation_tokens(tok)
    adapter = make_peft_adapter(
        model, tmp / INTRINSIC, "alora", r=16, invocation_tokens=inv, seed=1
    )
    n = args.conversations

    def fresh_runtime() -> Any:
        rt = AdapterRuntime(
            model,
            tok,
            kv_cache_memory=parse_bytes(args.kv_cache_memory),
            max_num_seqs=args.max_num_seqs,
        )
        rt.load_adapter(INTRINSIC, adapter)
        return rt

    modes = ("in-process", "server")
    phases = ("load", "alone")
    runs: dict[str, dict[str, list[Run]]] = {m: {p: [] for p in phases} for m in modes}
    # Both modes warm up on a conversation that the measured workload never repeats, so
    # both start with the same cache: the chat template's shared prefix only. "load": n
    # concurrent conversations (throughput); "alone": conversations one at a time, where
    # time to first token is the request's own cost and not where it lands among the
    # steps of others.
    warm = range(10**6, 10**6 + 1)
    convs = {"load": range(n), "alone": range(n, n + args.alone)}
    warm_args = argparse.Namespace(**{**vars(args), "turns": 1})
    for rep in range(args.repeats):
        rt = fresh_runtime()
        asyncio.run(inprocess(rt, tok, warm_args, warm))
        for phase in phases:
            run = inprocess(rt, tok, args, convs[phase], concurrent=phase == "load")
            runs["in-process"][phase].append(asyncio.run(run))
        rt.detach()
        proc, url, base = start_server(args, adapter)
        try:
            asyncio.run(over_http(url, base, warm_args, warm))
            for phase in phases:
                run = over_http(url, base, args, convs[phase], concurrent=phase == "load")
                runs["server"][phase].append(asyncio.run(run))
        finally:
            proc.terminate()
            proc.wait(60)
        ip, sv = runs["in-process"]["load"][-1].summary(), runs["server"]["load"][-1].summary()
        print(
            f"repeat {rep}: in-process {ip['throughput_tok_s']:.1f} tok/s, "
            f"server {sv['throughput_tok_s']:.1f} tok/s"
        )

    same = all(
        a.transcripts == b.transcripts
        for p in phases
        for a, b in zip(runs["in-process"][p], runs["server"][p], strict=True)
    )
    summary = {m: {p: [r.summary() for r in runs[m][p]] for p in phases} for m in modes}
    med = {
        m: {p: {k: statistics.median(x[k] for x in s) for k in s[0]} for p, s in ph.items()}
        for m, ph in summary.items()
    }
    ip, sv = med["in-process"], med["server"]
    overhead = {
        "throughput_cost": 1 - sv["load"]["throughput_tok_s"] / ip["load"]["throughput_tok_s"],
        **{
            f"{kind}_ttft_p50_delta_ms_{phase}": sv[phase][f"{kind}_ttft_p50_ms"]
            - ip[phase][f"{kind}_ttft_p50_ms"]
            for kind in ("base", "intrinsic")
            for phase in phases
        },
    }
    targets = {
        "throughput cost < 5%": overhead["throughput_cost"] < 0.05,
        "p50 TTFT delta < 3 ms (base, alone)": overhead["base_ttft_p50_delta_ms_alone"] < 3,
        "p50 TTFT delta < 3 ms (intrinsic, alone)": overhead["intrinsic_ttft_p50_delta_ms_alone"]
        < 3,
    }
    payload = {
        "model": label,
        "workload": {
            k: vars(args)[k]
            for k in (
                "conversations",
                "turns",
                "base_tokens",
                "intrinsic_tokens",
                "top_logprobs",
                "threads",
                "kv_cache_memory",
                "max_num_seqs",
                "repeats",
                "alone",
            )
        },
        "runs": summary,
        "median": med,
        "overhead": overhead,
        "targets_met": targets,
        "identical_text": same,
    }
    path = write_result(args.out, payload)
    print(
        json.dumps(
            {"median": med, "overhead": overhead, "targets_met": targets, "identical_text": same},
            indent=1,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
