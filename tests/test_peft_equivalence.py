"""Differential tests against PEFT: for every architecture, mixed batches of base, LoRA and
aLoRA requests give the logits of a from-scratch PEFT forward, and the same greedy tokens."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import INV1, INV2, PROMPT_LOW, ArchSetup
from hypothesis import given
from hypothesis import strategies as st

from alora.testing import ARCHS, activation_start, random_prompt


def _mixed_workload(seed: int) -> tuple[list[list[int]], list[str | None]]:
    """Requests with the invocation at block boundaries (block_size 4), straddling them,
    repeated, at the very start, at the very end, and absent."""
    rng = np.random.default_rng(seed)
    cases: list[tuple[int, str | None, list[int]]] = [
        (13, None, []),
        (17, "alora_all", [4]),  # starts exactly on a block boundary
        (17, "alora_all", [6]),  # straddles a block
        (20, "alora_all", [1, 9]),  # repeated: the last occurrence counts
        (9, "alora_all", [0]),  # activation at token 0
        (12, "alora_all", [9]),  # invocation ends the prompt
        (15, "alora_all", []),  # absent: runs as the base model
        (11, "alora_qv", [8]),
        (23, "lora_mlp", []),
        (6, "lora_pattern", []),
        (1, None, []),  # a one-token prompt
    ]
    prompts, adapters = [], []
    for length, adapter, at in cases:
        inv = INV2 if adapter == "alora_qv" else INV1
        prompts.append(random_prompt(rng, length, low=PROMPT_LOW, invocation=inv, at=at))
        adapters.append(adapter)
    return prompts, adapters


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft(arch: str, arch_setup: Callable[[str], ArchSetup]) -> None:
    setup = arch_setup(arch)
    prompts, adapters = _mixed_workload(seed=ARCHS.index(arch))
    rt = setup.runtime()
    try:
        results = rt.generate(
            prompts, adapters, max_new_tokens=5, stop_token_ids=(), return_logits=True
        )
        setup.check(prompts, adapters, results)
        for prompt, adapter, res in zip(prompts, adapters, results, strict=True):
            assert res.prompt_tokens == len(prompt)
            assert res.finish_reason == "length"
            # The last sampled token is never run through the model.
            assert res.computed_tokens + res.cached_tokens == len(prompt) + 4
            inv = {"alora_all": INV1, "alora_qv": INV2}.get(adapter or "")
            if adapter is None:
                assert res.lora_tokens == 0
            elif inv is None:
                assert res.lora_tokens == res.computed_tokens
            else:
                s = activation_start(prompt, inv)
                expected = 0 if s is None else len(prompt) + 4 - max(s, res.cached_tokens)
                assert res.lora_tokens == expected
        assert rt.stats()["used_blocks"] == 0
    finally:
        rt.detach()


@st.composite
def _random_batch(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 5))
    requests = []
    for _ in range(n):
        adapter = draw(st.sampled_from([None, "alora_all", "alora_qv", "lora_mlp", "lora_pattern"]))
        length = draw(st.integers(1, 30))
        inv = INV2 if adapter == "alora_qv" else INV1
        at: list[int] = []
        if adapter and adapter.startswith("alora") and length >= len(inv):
            k = draw(st.integers(0, 2))
            at = sorted(draw(st.lists(st.integers(0, length - len(inv)), min_size=k, max_size=k)))
        requests.append((adapter, length, at, draw(st.integers(1, 4))))
    return dict(
        requests=requests,
        # Every module's rank row must fit one block's share of a layer: 4 is the least here.
        block_size=draw(st.sampled_from([4, 8, 16])),
        max_batch_tokens=draw(st.sampled_from([8, 16, 64])),
        seed=draw(st.integers(0, 10_000)),
        arch=draw(st.sampled_from(["llama", "granite", "qwen3"])),
    )


@given(case=_random_batch())
def test_random_batches_match_peft(case: dict, arch_setup: Callable[[str], ArchSetup]) -> None:
    setup = arch_setup(case["arch"])
    rng = np.random.default_rng(case["seed"])
    prompts, adapters, max_new = [], [], []
    for adapter, length, at, new in case["requests"]:
        inv = INV2 if adapter == "alora_qv" else INV1
        # Overlapping occurrences overwrite each other; the oracle searches the final prompt.
        prompts.append(random_prompt(rng, length, low=PROMPT_LOW, invocation=inv, at=at))
        adapters.append(adapter)
        max_new.append(new)
    rt = setup.runtime(block_size=case["block_size"], max_batch_tokens=case["max_batch_tokens"])
    try:
        ids = [
            rt.add_request(p, adapter=a, max_new_tokens=m, stop_token_ids=(), return_logits=True)
            for p, a, m in zip(prompts, adapters, max_new, strict=True)
        ]
        done = {}
        while len(done) < len(ids):
            for out in rt.step():
                if out.finished:
                    done[out.request_id] = out.result
        results = [done[i] for i in ids]
        setup.check(prompts, adapters, results)
        assert [len(r.token_ids) for r in results] == max_new
        assert rt.stats()["used_blocks"] == 0
    finally:
        rt.detach()


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": 6}),
        # Qwen2 slides only in layers >= max_window_layers: one full, one sliding layer.
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    ],
)
def test_sliding_window_matches_peft(
    arch: str, overrides: dict, arch_setup: Callable[..., ArchSetup]
) -> None:
    setup = arch_setup(arch, **overrides)
    prompts, adapters = _mixed_workload(seed=11)
    with setup.runtime(max_batch_tokens=16) as rt:
        results = rt.generate(
            prompts, adapters, max_new_tokens=5, stop_token_ids=(), return_logits=True
        )
    setup.check(prompts, adapters, results)


def test_bfloat16_model_runs_close_to_its_own_forward() -> None:
    """Pools, cache and attention follow the model's dtype; bf16 rounding differs from the
    model's own SDPA path, so only closeness is asserted here."""
    from alora import AdapterRuntime
    from alora.testing import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    prompt = list(range(20, 45))
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    with AdapterRuntime(model, kv_cache_blocks=16, adapter_rows=8, max_batch_tokens=8) as rt:
        assert rt.kv_cache.kv.dtype == torch.bfloat16
        res = rt.generate([prompt], max_new_tokens=1, return_logits=True)[0]
    torch.testing.assert_close(res.logits[0], ref, atol=0.1, rtol=0.05)
    assert res.token_ids[0] == int(ref.argmax())
