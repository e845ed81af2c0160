"""GPU benchmarks of the CUDA LoRA backend from Python (what the runtime sees, launch overhead
included): `python -m alora.kernels.bench [--out results.json]`.

1. segmented form: 512 tokens over 8 adapters (rank 16, hidden 4096, fp16), CUDA backend vs
   the torch reference (target: >= 3x faster);
2. decode form: 64 sequences on 64 adapters at rank 16 (adapter-row bandwidth);
3. a Llama-8B-shaped layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336, bf16): the base
   layer (7 linears + causal SDPA) against the LoRA work on it (fused q/k/v, o, fused
   gate/up, down at rank 16), target: LoRA <= 10% of the base layer.

Each number: CUDA events around the call on the current stream, after a warm-up, median of
the samples. Flops and bytes are counted before timing and reported next to the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from alora.backend import TorchBackend
from alora.kernels._testutil import Case, make_inputs


def time_ms(
    fn: Callable[[], None], *, warmup: int = 10, samples: int = 30, batch: int = 5
) -> float:
    """Median per-call time in ms of `fn` on the current stream (events around `batch` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)


def _lora_case(tokens_per: int, adapters: int, rank: int, hidden: int, dtype: torch.dtype) -> Case:
    return Case(dtype, tuple((tokens_per, rank) for _ in range(adapters)), 0, hidden, (hidden,))


def bench_backends(backend: object, tokens_per: int, adapters: int, rank: int) -> dict[str, object]:
    hidden, dtype = 4096, torch.float16
    inp = make_inputs(_lora_case(tokens_per, adapters, rank, hidden, dtype), "cuda")
    y, x, a, b, batch = inp.ys[0], inp.x, inp.a_pools[0], inp.bt_pools[0], inp.batch
    t = tokens_per * adapters
    row_bytes = adapters * rank * 2 * hidden * 2
    flops = 2 * t * rank * 2 * hidden
    cuda_ms = time_ms(lambda: backend.add_lora(y, x, a, b, batch))  # type: ignore[attr-defined]
    ref = TorchBackend()
    torch_ms = time_ms(lambda: ref.add_lora(y, x, a, b, batch))
    return {
        "tokens": t,
        "adapters": adapters,
        "rank": rank,
        "hidden": hidden,
        "dtype": "fp16",
        "flops": flops,
        "row_bytes": row_bytes,
        "cuda_ms": cuda_ms,
        "torch_ms": torch_ms,
        "speedup": torch_ms / cuda_ms,
        "cuda_rows_gbps": row_bytes / cuda_ms / 1e6,
    }


def bench_llama_layer(backend: object, tokens: int, adapters: int, rank: int) -> dict[str, object]:
    hidden, inter, heads, kv_heads, head_dim = 4096, 14336, 32, 8, 128
    dt, dev = torch.bfloat16, torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * 0.02).to(dev, dt)

    wq, wk, wv, wo = (
        w(hidden, hidden),
        w(kv_heads * head_dim, hidden),
        w(kv_heads * head_dim, hidden),
        w(hidden, hidden),
    )
    wg, wu, wd = w(inter, hidden), w(inter, hidden), w(hidden, inter)
    x = torch.randn(tokens, hidden, generator=g).to(dev, dt)

    def base() -> None:
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        q = q.view(1, tokens, heads, head_dim).transpose(1, 2)
        k = k.view(1, tokens, kv_heads, head_dim).transpose(1, 2)
        v = v.view(1, tokens, kv_heads, head_dim).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + F.linear(att.transpose(1, 2).reshape(tokens, hidden), wo)
        F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)

    per = max(1, tokens // adapters)
    case = Case(dt, tuple((per, rank) for _ in range(adapters)), 0, hidden, (hidden,))
    batch = make_inputs(case, dev).batch
    t_act = per * adapters
    xs = x[:t_act].contiguous()
    mid = torch.randn(t_act, inter, generator=g).to(dev, dt)
    r_pool = adapters * rank

    def pool(n: int) -> torch.Tensor:
        return (torch.randn(r_pool, n, generator=g) * 0.02).to(dev, dt)

    qkv = (
        [torch.empty(t_act, n, device=dev, dtype=dt) for n in (hidden, 1024, 1024)],
        [pool(hidden)] * 3,
        [pool(n) for n in (hidden, 1024, 1024)],
    )
    gu = (
        [torch.empty(t_act, inter, device=dev, dtype=dt) for _ in range(2)],
        [pool(hidden)] * 2,
        [pool(inter)] * 2,
    )
    o_y, o_a, o_b = torch.empty(t_act, hidden, device=dev, dtype=dt), pool(hidden), pool(hidden)
    d_y, d_a, d_b = torch.empty(t_act, hidden, device=dev, dtype=dt), pool(inter), pool(hidden)

    def lora() -> None:
        backend.add_lora_fused(qkv[0], xs, qkv[1], qkv[2], batch)  # type: ignore[attr-defined]
        backend.add_lora(o_y, xs, o_a, o_b, batch)  # type: ignore[attr-defined]
        backend.add_lora_fused(gu[0], xs, gu[1], gu[2], batch)  # type: ignore[attr-defined]
        backend.add_lora(d_y, mid, d_a, d_b, batch)  # type: ignore[attr-defined]

    base_ms, lora_ms = time_ms(base), time_ms(lora)
    return {
        "tokens": t_act,
        "adapters": adapters,
        "rank": rank,
        "base_ms": base_ms,
        "lora_ms": lora_ms,
        "overhead": lora_ms / base_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alora.kernels.bench")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("alora.kernels.bench: no CUDA GPU, nothing to measure")
        return 0
    from alora.kernels.launch import CudaBackend

    backend = CudaBackend("cuda")
    res: dict[str, object] = {"device": torch.cuda.get_device_name()}
    res["segmented_512x8_r16"] = bench_backends(backend, 64, 8, 16)
    res["decode_64x64_r16"] = bench_backends(backend, 1, 64, 16)
    res["decode_32x32_r16"] = bench_backends(backend, 1, 32, 16)
    res["llama8b_layer"] = [
        bench_llama_layer(backend, t, a, 16) for t, a in ((32, 32), (256, 64), (512, 8), (2048, 8))
    ]
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
