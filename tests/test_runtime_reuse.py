"""Exact KV reuse on the tensor side: prefix cache across turns, copy-on-write of the block
that straddles an aLoRA activation, and outputs that do not depend on caching, eviction,
preemption or chunk size."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import INV1, INV2, PROMPT_LOW, ArchSetup

from alora.testing import random_prompt


def test_second_base_turn_computes_only_new_tokens(
    arch_setup: Callable[[str], ArchSetup],
) -> None:
    setup = arch_setup("llama")
    rng = np.random.default_rng(1)
    p1 = random_prompt(rng, 21, low=PROMPT_LOW)
    with setup.runtime() as rt:
        r1 = rt.generate([p1], max_new_tokens=6, stop_token_ids=())[0]
        conv = p1 + r1.token_ids
        p2 = conv + random_prompt(rng, 5, low=PROMPT_LOW)
        r2 = rt.generate([p2], max_new_tokens=3, stop_token_ids=(), return_logits=True)[0]
        # Everything the first turn computed is reused, partial last block included; only the
        # first turn's last token (sampled, never run through the model) and the new tokens
        # are computed.
        assert r2.cached_tokens == len(conv) - 1
        assert r2.computed_tokens == len(p2) - len(conv) + 1 + 2
        setup.check([p2], [None], [r2])
        # Same prompt again: all but its last token come from the cache.
        r3 = rt.generate([p2], max_new_tokens=3, stop_token_ids=(), return_logits=True)[0]
        assert r3.cached_tokens == len(p2) - 1
        assert r3.token_ids == r2.token_ids
        torch.testing.assert_close(torch.stack(r3.logits), torch.stack(r2.logits))
        assert rt.stats()["used_blocks"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("extra", [0, 1, 3, 4])  # the activation start at every block offset
def test_alora_after_base_turn_computes_from_activation(
    arch: str, extra: int, arch_setup: Callable[[str], ArchSetup]
) -> None:
    setup = arch_setup(arch)
    rng = np.random.default_rng(extra)
    history = random_prompt(rng, 14 + extra, low=PROMPT_LOW)
    with setup.runtime() as rt:
        # A base turn that has computed the whole history (and some more).
        base = rt.generate([[*history, 50, 51, 52]], max_new_tokens=2, stop_token_ids=())[0]
        assert base.cached_tokens == 0
        prompt = history + INV1 + [60, 61]
        s = len(history)
        res = rt.generate(
            [prompt], "alora_all", max_new_tokens=1, stop_token_ids=(), return_logits=True
        )[0]
        # The base KV before the activation start is reused exactly, across the straddling
        # block by copy-on-write; nothing before s is recomputed.
        assert res.cached_tokens == s
        assert res.computed_tokens == len(prompt) - s
        assert res.lora_tokens == len(prompt) - s
        setup.check([prompt], ["alora_all"], [res])
        # The base cache was not polluted by the aLoRA request: a base request on the same
        # prompt still matches the base model.
        again = rt.generate([prompt], max_new_tokens=2, stop_token_ids=(), return_logits=True)
        setup.check([prompt], [None], again)
        assert rt.stats()["used_blocks"] == 0


def test_intrinsic_right_after_a_generated_turn(arch_setup: Callable[..., ArchSetup]) -> None:
    """The agentic chain: the base model answers, then an intrinsic is invoked on the answer.
    Only the answer's last token (never run through the model) precedes the activation."""
    setup = arch_setup("qwen3")
    prompt = random_prompt(np.random.default_rng(7), 13, low=PROMPT_LOW)
    with setup.runtime() as rt:
        turn = rt.generate([prompt], max_new_tokens=6, stop_token_ids=())[0]
        conv = prompt + turn.token_ids
        call = [*conv, *INV2, 90]
        res = rt.generate(
            [call], "alora_qv", max_new_tokens=3, stop_token_ids=(), return_logits=True
        )[0]
        assert res.cached_tokens == len(conv) - 1
        assert res.computed_tokens == len(call) - len(conv) + 1 + 2
        assert res.lora_tokens == len(call) - len(conv) + 2
        setup.check([call], ["alora_qv"], [res])


def test_lora_does_not_reuse_base_cache(arch_setup: Callable[[str], ArchSetup]) -> None:
    setup = arch_setup("llama")
    prompt = random_prompt(np.random.default_rng(3), 18, low=PROMPT_LOW)
    with setup.runtime() as rt:
        rt.generate([prompt], max_new_tokens=1)
        res = rt.generate([prompt], "lora_mlp", max_new_tokens=2, return_logits=True)[0]
        assert res.cached_tokens == 0
        assert res.lora_tokens == res.computed_tokens == len(prompt) + 1
        setup.check([prompt], ["lora_mlp"], [res])
        # A second call with the same LoRA reuses its own cache.
        res2 = rt.generate([prompt], "lora_mlp", max_new_tokens=2, return_logits=True)[0]
        assert res2.cached_tokens == len(prompt) - 1
        assert res2.token_ids == res.token_ids


def _conversation_workload(seed: int) -> list[tuple[list[int], str | None]]:
    """Requests sharing prefixes: a base conversation and intrinsics invoked on it."""
    rng = np.random.default_rng(seed)
    sys_prompt = random_prompt(rng, 11, low=PROMPT_LOW)
    turns = [sys_prompt + random_prompt(rng, n, low=PROMPT_LOW) for n in (5, 9, 14)]
    reqs: list[tuple[list[int], str | None]] = []
    for t in turns:
        reqs.append((t, None))
        reqs.append((t + INV1 + [70], "alora_all"))
        reqs.append((t + INV2, "alora_qv"))
        reqs.append((t, "lora_pattern"))
    reqs.append((turns[1] + INV1 + random_prompt(rng, 7, low=PROMPT_LOW) + INV1, "alora_all"))
    return reqs


def _run_in_waves(rt, reqs: list[tuple[list[int], str | None]]) -> list:  # type: ignore[no-untyped-def]
    """Two calls, so the second wave can hit what the first one cached."""
    half = len(reqs) // 2
    out = []
    for wave in (reqs[:half], reqs[half:]):
        out += rt.generate(
            [p for p, _ in wave],
            [a for _, a in wave],
            max_new_tokens=4,
            stop_token_ids=(),
            return_logits=True,
        )
    return out


def test_outputs_independent_of_cache_eviction_preemption_and_chunking(
    arch_setup: Callable[[str], ArchSetup],
) -> None:
    setup = arch_setup("granite")
    reqs = _conversation_workload(5)
    with setup.runtime() as probe:
        units = [probe.engine.adapter_units(name) for name in probe.adapters]
        unit_bytes = probe.device_memory_bytes // probe.stats()["total_blocks"]
    assert len(units) == 4
    configs = {
        "cached": dict(),
        "uncached": dict(enable_prefix_cache=False),
        # 12 blocks of 4 tokens: requests of up to ~40 tokens must evict cached blocks and
        # preempt each other.
        "tiny_pool": dict(kv_cache_blocks=12, max_num_seqs=8),
        # Room for the largest adapter only: the four cannot all be resident.
        "few_units": dict(adapter_memory=max(units) * unit_bytes),
        # One small pool: KV blocks and adapters evict each other.
        "one_pool": dict(device_memory=(12 + max(units)) * unit_bytes, max_num_seqs=8),
        "chunk8": dict(max_batch_tokens=8),
        "chunk16": dict(max_batch_tokens=16),
        "chunk64_bs16": dict(max_batch_tokens=64, block_size=16),
    }
    runs = {}
    stats = {}
    for name, kw in configs.items():
        with setup.runtime(**kw) as rt:
            runs[name] = _run_in_waves(rt, reqs)
            stats[name] = rt.stats()
            assert stats[name]["used_blocks"] == 0, name
    base = runs["cached"]
    setup.check([p for p, _ in reqs], [a for _, a in reqs], base)
    for name, results in runs.items():
        for a, b in zip(base, results, strict=True):
            assert a.token_ids == b.token_ids, name
            torch.testing.assert_close(
                torch.stack(a.logits), torch.stack(b.logits), atol=2e-5, rtol=1e-5
            )
    assert sum(r.cached_tokens for r in runs["cached"]) > 0
    assert sum(r.cached_tokens for r in runs["uncached"]) == 0
    assert stats["tiny_pool"]["preemptions"] > 0
    assert stats["few_units"]["adapter_evictions"] > 0
    assert stats["one_pool"]["adapter_evictions"] > 0
