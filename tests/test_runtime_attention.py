"""Unit tests of the torch glue with hand-built plans: paged attention over block tables,
prefix copy-on-write, LoRA batches and pools, sampling. No engine involved."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from alora.attention import build_attention_metadata, paged_attention
from alora.kv_cache import PagedKVCache
from alora.lora import build_lora_batches
from alora.plan import AttentionPlan, LoraPlan
from alora.sampling import SampleRequest, SamplingParams, sample_batch


def _dense_reference(
    q: torch.Tensor,  # [Q, H, d] queries at the last Q positions
    k: torch.Tensor,  # [L, KVH, d]
    v: torch.Tensor,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    qn, h, _ = q.shape
    length, kvh, _ = k.shape
    rep = h // kvh
    kk = k.repeat_interleave(rep, dim=1).transpose(0, 1).double()  # [H, L, d]
    vv = v.repeat_interleave(rep, dim=1).transpose(0, 1).double()
    qq = q.transpose(0, 1).double()
    scores = qq @ kk.transpose(1, 2) * scaling  # [H, Q, L]
    qpos = torch.arange(length - qn, length)[:, None]
    kpos = torch.arange(length)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ vv).transpose(0, 1).float()  # [Q, H, d]


@st.composite
def _paged_case(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n_seqs = draw(st.integers(1, 4))
    ctx = [draw(st.integers(1, 40)) for _ in range(n_seqs)]
    qlens = [draw(st.integers(1, c)) for c in ctx]
    kvh = draw(st.sampled_from([1, 2]))
    heads = kvh * draw(st.sampled_from([1, 2]))
    window = draw(st.sampled_from([None, 3, 8]))
    seed = draw(st.integers(0, 1000))
    return dict(
        block_size=block_size, ctx=ctx, qlens=qlens, kvh=kvh, heads=heads, window=window, seed=seed
    )


@given(_paged_case())
def test_paged_attention_matches_dense(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    bs, ctx, qlens = case["block_size"], case["ctx"], case["qlens"]
    kvh, heads, d = case["kvh"], case["heads"], 8
    blocks_per_seq = [math.ceil(c / bs) for c in ctx]
    num_blocks = sum(blocks_per_seq) + 3
    # Scattered, non-contiguous blocks, and a table wider than any sequence needs.
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq) + 2
    tables = np.full((len(ctx), width), -1, dtype=np.int32)
    cursor = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = perm[cursor : cursor + nb]
        cursor += nb
    cache = PagedKVCache(
        num_layers=2,
        num_blocks=num_blocks,
        block_size=bs,
        num_kv_heads=kvh,
        head_dim=d,
        dtype=torch.float32,
        device="cpu",
    )
    layer = 1
    full_k = [torch.randn(c, kvh, d, generator=g) for c in ctx]
    full_v = [torch.randn(c, kvh, d, generator=g) for c in ctx]
    # History (everything before this step's tokens) is already in the cache.
    for s, c in enumerate(ctx):
        hist = c - qlens[s]
        if hist:
            pos = torch.arange(hist)
            slots = torch.as_tensor(tables[s])[pos // bs].long() * bs + pos % bs
            cache.write(layer, slots, full_k[s][:hist], full_v[s][:hist])
    # This step's tokens, flattened in sequence order.
    query_start = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64)
    positions = np.concatenate([np.arange(c - q, c) for c, q in zip(ctx, qlens, strict=True)])
    slot_mapping = np.concatenate(
        [
            tables[s][np.arange(c - q, c) // bs].astype(np.int64) * bs + np.arange(c - q, c) % bs
            for s, (c, q) in enumerate(zip(ctx, qlens, strict=True))
        ]
    )
    q_all = torch.randn(int(query_start[-1]), heads, d, generator=g)
    k_new = torch.cat([full_k[s][c - q :] for s, (c, q) in enumerate(zip(ctx, qlens, strict=True))])
    v_new = torch.cat([full_v[s][c - q :] for s, (c, q) in enumerate(zip(ctx, qlens, strict=True))])
    meta = build_attention_metadata(
        AttentionPlan(
            positions=positions,
            query_start=query_start,
            context_lens=np.asarray(ctx),
            block_tables=tables,
            slot_mapping=slot_mapping,
        ),
        block_size=bs,
        device="cpu",
    )
    scaling = 0.37
    out = paged_attention(
        q_all, k_new, v_new, cache, layer, meta, scaling=scaling, sliding_window=case["window"]
    )
    for s in range(len(ctx)):
        q0, q1 = int(query_start[s]), int(query_start[s + 1])
        ref = _dense_reference(q_all[q0:q1], full_k[s], full_v[s], scaling, case["window"])
        torch.testing.assert_close(out[q0:q1], ref, atol=1e-5, rtol=1e-5)
    # The other layer was never touched.
    assert not cache.kv[0].any()


def test_attention_metadata_rejects_missing_block() -> None:
    with pytest.raises(ValueError, match="no block"):
        build_attention_metadata(
            AttentionPlan(
                positions=np.arange(5),
                query_start=np.array([0, 5]),
                context_lens=np.array([5]),
                block_tables=np.array([[0, -1]], dtype=np.int32),
                slot_mapping=np.arange(5),
            ),
            block_size=4,
            device="cpu",
        )


def test_copy_prefixes_gathers_before_scattering() -> None:
    cache = PagedKVCache(
        num_layers=2,
        num_blocks=4,
        block_size=4,
        num_kv_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )
    cache.kv.copy_(torch.arange(cache.kv.numel(), dtype=torch.float32).view_as(cache.kv))
    before = cache.kv.clone()
    # Block 1 is both a destination (from 0) and a source (to 2): the copy must read it first.
    cache.copy_prefixes(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3, 2]))
    expected = before.clone()
    expected[:, :, 4:7] = before[:, :, 0:3]
    expected[:, :, 8:10] = before[:, :, 4:6]
    torch.testing.assert_close(cache.kv, expected)
    with pytest.raises(ValueError):
        cache.copy_prefixes(torch.tensor([0]), torch.tensor([1]), torch.tensor([5]))


def test_no_segments_means_no_batches() -> None:
    batches = build_lora_batches(
        LoraPlan(
            sorted_token_idx=np.zeros(0, dtype=np.int64),
            segment_start=np.zeros(1, dtype=np.int32),
            segment_adapter=np.zeros(0, dtype=np.uint64),
            adapter_rank=np.zeros(0, dtype=np.int32),
            adapter_row_start=np.zeros(1, dtype=np.int32),
            adapter_rows=np.zeros(0, dtype=np.int32),
            adapter_bt_rows=np.zeros(0, dtype=np.int32),
        ),
        entries={},
        module_names=["q_proj"],
        device=torch.device("cpu"),
    )
    assert batches == {"q_proj": None}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 1.5},
        {"seed": "x"},
    ],
)
def test_sampling_params_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[int]:
    out = sample_batch(logits, [SampleRequest(p, g, ()) for p, g in zip(params, gens, strict=True)])
    return [s.token for s in out]  # type: ignore[union-attr]


def test_sampling_greedy_topk_topp_and_seed() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams()
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]
    # top_k=1 and a tiny top_p both reduce sampling to the argmax.
    for p in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-3),
    ):
        gens = [p.make_generator(torch.device("cpu")) for _ in range(2)]
        for _ in range(5):
            assert sample(logits, [p, p], gens) == [1, 0]
    # top_k=2 never yields a token outside the top two.
    p = SamplingParams(temperature=10.0, top_k=2, seed=3)
    gen = p.make_generator(torch.device("cpu"))
    seen = {sample(logits[:1], [p], [gen])[0] for _ in range(50)}
    assert seen == {1, 3}
    # The same seed gives the same stream.
    p = SamplingParams(temperature=1.0, seed=11)
    runs = []
    for _ in range(2):
        gen = p.make_generator(torch.device("cpu"))
        runs.append([sample(logits, [p, greedy], [gen, None])[0] for _ in range(20)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1
    assert F.softmax(logits[0], -1).shape == (4,)
