"""Scale-out routing: many concurrent conversations with intrinsic calls through the Ray
Serve ingress (`alora.serving.scaleout`), on 1 replica and on 2 replicas with Ray's default
router (power of two choices) and with ours (prefix affinity).

Each conversation runs `--turns` turns; a turn is a base-model chat completion (the
assistant's answer, `--base-tokens` tokens, streamed) and then an aLoRA intrinsic call on the
conversation so far (`--intrinsic-tokens` tokens, streamed). Reports generated tokens/s over
the workload, p50/p99 time to first token of the intrinsic calls, the share of prompt tokens
served from the prefix cache (intrinsic calls and all calls), and how often an intrinsic
call landed on the replica of its conversation's base turn. Target: our cached share on 2
replicas at least 95% of the 1-replica share.

python benches/bench_scaleout.py            # tiny random model, 16 conversations x 3 turns
python benches/bench_scaleout.py --quick    # smoke run
python benches/bench_scaleout.py --model smollm2 --conversations 8

Every replica runs one torch thread; on a 2-core machine 2 replicas cannot show throughput
scaling (the ingress, Ray's controller and the client share the same cores), so the
figures to read here are the routing ones.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import write_result

INTRINSIC = "certainty"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "is", "answer"]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="smollm2 or a local model directory")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--user-words", type=int, default=48, help="words per user turn")
    ap.add_argument("--base-tokens", type=int, default=16)
    ap.add_argument("--intrinsic-tokens", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--summary-period", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="scaleout")
    args = ap.parse_args()
    if args.quick:
        args.conversations, args.turns, args.out = 4, 2, "scaleout_quick"
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_text(conv: int, turn: int, n: int) -> str:
    rng = random.Random(conv * 1000 + turn)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def call(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]], n: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": n,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    text, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-alora-replica", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
    assert usage is not None
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - t0,
        "text": "".join(text),
        "prompt": usage["prompt_tokens"],
        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        "completion": usage["completion_tokens"],
        "replica": replica,
    }


async def conversation(
    client: httpx.AsyncClient, url: str, base: str, c: int, args: argparse.Namespace
) -> list[tuple[str, dict[str, Any], str]]:
    out = []
    messages: list[dict[str, str]] = []
    for t in range(args.turns):
        messages.append({"role": "user", "content": user_text(c, t, args.user_words)})
        b = await call(client, url, base, messages, args.base_tokens)
        out.append(("base", b, b["replica"]))
        messages.append({"role": "assistant", "content": b["text"]})
        judge = [*messages, {"role": "user", "content": "certain ?"}]
        i = await call(client, url, INTRINSIC, judge, args.intrinsic_tokens)
        out.append(("intrinsic", i, b["replica"]))
    return out


async def workload(url: str, base: str, args: argparse.Namespace, first: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        per_conv = await asyncio.gather(
            *(conversation(client, url, base, first + c, args) for c in range(args.conversations))
        )
        wall = time.perf_counter() - t0
    calls = [x for conv in per_conv for x in conv]
    intr = [r for kind, r, _ in calls if kind == "intrinsic"]
    same = [r["replica"] == home for kind, r, home in calls if kind == "intrinsic"]
    tokens = sum(r["completion"] for _, r, _ in calls)
    replicas: dict[str, int] = {}
    for _, r, _ in calls:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    return {
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "intrinsic_ttft_p50_ms": 1000 * pct([r["ttft"] for r in intr], 0.5),
        "intrinsic_ttft_p99_ms": 1000 * pct([r["ttft"] for r in intr], 0.99),
        "intrinsic_cached_share": sum(r["cached"] for r in intr) / sum(r["prompt"] for r in intr),
        "all_cached_share": sum(r["cached"] for _, r, _ in calls)
        / sum(r["prompt"] for _, r, _ in calls),
        "intrinsic_on_conversation_replica": sum(same) / len(same),
        "calls_per_replica": sorted(replicas.values(), reverse=True),
    }


def main() -> None:
    args = parse()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import torch
    from ray import serve

    from alora.models import load_model, model_label
    from alora.serving.scaleout import EngineSpec, ScaleoutConfig, build_app
    from alora.testing import make_peft_adapter

    torch.set_num_threads(1)
    tiny = args.model is None
    model, tok = load_model(args.model, tiny=tiny)
    inv = tok("certain ?", add_special_tokens=False)["input_ids"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaleout_"))
    adapter = make_peft_adapter(model, tmp / INTRINSIC, "alora", r=8, invocation_tokens=inv)
    del model
    argv = ["--served-model-name", "base", "--max-num-seqs", "32", "--threads", "1"]
    argv += ["--tiny"] if tiny else ["--model", args.model]
    spec = EngineSpec(
        argv=argv,
        runtime_kwargs={"block_size": args.block_size, "kv_cache_memory": 256 << 20},
        catalog={INTRINSIC: str(adapter)},
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    setups = [("1 replica", 1, "affinity"), ("2 replicas, Ray's default router", 2, "default"),
              ("2 replicas, prefix-affinity router", 2, "affinity")]  # fmt: skip
    rows = []
    try:
        for k, (label, n, router) in enumerate(setups):
            config = ScaleoutConfig(
                replicas=n,
                router=router,
                cpus_per_replica=0.5,
                summary_period_s=args.summary_period,
            )
            serve.run(build_app(spec, config), name="alora", route_prefix="/")
            # Warm-up on conversations outside the measured range (loads the adapter too).
            warm = argparse.Namespace(**{**vars(args), "conversations": 2 * n, "turns": 1})
            asyncio.run(workload(url, "base", warm, first=10_000 + 100 * k))
            res = asyncio.run(workload(url, "base", args, first=1000 * k))
            res.update(setup=label, replicas=n, router=router)
            rows.append(res)
            print(
                f"{label:36s} {res['throughput_tok_s']:7.1f} tok/s  intrinsic TTFT p50 "
                f"{res['intrinsic_ttft_p50_ms']:7.1f} ms p99 {res['intrinsic_ttft_p99_ms']:7.1f}"
                f" ms  cached {100 * res['intrinsic_cached_share']:5.1f}% (intrinsic) "
                f"{100 * res['all_cached_share']:5.1f}% (all)  on its conversation's replica "
                f"{100 * res['intrinsic_on_conversation_replica']:5.1f}%",
                flush=True,
            )
            serve.delete("alora")
    finally:
        serve.shutdown()
        ray.shutdown()
    one = rows[0]["intrinsic_cached_share"]
    ours, default = rows[2]["intrinsic_cached_share"], rows[1]["intrinsic_cached_share"]
    payload = {
        "model": model_label(args.model, tiny),
        "workload": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "rows": rows,
        "ours_vs_1_replica_cached_share": ours / one,
        "default_vs_1_replica_cached_share": default / one,
        "target_ours_at_least_95pct": ours / one >= 0.95,
    }
    print(
        f"cached share on 2 replicas vs 1: ours {100 * ours / one:.1f}%, default router "
        f"{100 * default / one:.1f}% (target >= 95%: "
        f"{'met' if ours / one >= 0.95 else 'missed'})"
    )
    path = write_result(args.out, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
