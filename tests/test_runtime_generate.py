"""The generation API: prompts as ids, strings and chats; streaming; sampling; stop tokens;
the low-level add_request/step/abort loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import INV1, ArchSetup

from alora import AdapterRuntime, GenerationResult, StreamDelta
from alora.cpu_backend import CpuBackend
from alora.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def rt(arch_setup: Callable[[str], ArchSetup]) -> Iterator[AdapterRuntime]:
    runtime = arch_setup("mistral").runtime()
    yield runtime
    runtime.detach()


def test_default_backend_on_cpu(rt: AdapterRuntime) -> None:
    assert isinstance(rt.backend, CpuBackend)


def test_greedy_is_deterministic_and_batch_independent(rt: AdapterRuntime) -> None:
    prompts = [[20, 21, 22, *INV1, 23], [40, 41, 42, 43, 44], [50] * 9]
    adapters = ["alora_all", "lora_mlp", None]
    together = rt.generate(prompts, adapters, max_new_tokens=6, stop_token_ids=())
    alone = [
        rt.generate([p], a, max_new_tokens=6, stop_token_ids=())[0]
        for p, a in zip(prompts, adapters, strict=True)
    ]
    again = rt.generate(prompts, adapters, max_new_tokens=6, stop_token_ids=())
    for a, b, c in zip(together, alone, again, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert isinstance(a, GenerationResult)
        assert a.time_to_first_token is not None and 0 < a.time_to_first_token <= a.latency
    assert [r.adapter for r in together] == adapters
    assert [r.prompt_token_ids for r in together] == prompts


def test_single_prompt_forms(rt: AdapterRuntime) -> None:
    one = rt.generate([20, 21, 22], max_new_tokens=2, stop_token_ids=())
    assert len(one) == 1
    as_tensor = rt.generate(torch.tensor([20, 21, 22]), max_new_tokens=2, stop_token_ids=())
    assert as_tensor[0].token_ids == one[0].token_ids
    assert rt.generate([], max_new_tokens=2) == []


def test_stream_matches_generate(rt: AdapterRuntime) -> None:
    prompts = [[20, 21, 22, *INV1], [30, 31]]
    expected = rt.generate(prompts, ["alora_all", None], max_new_tokens=4, stop_token_ids=())
    tokens: dict[int, list[int]] = {0: [], 1: []}
    finished: dict[int, StreamDelta] = {}
    for delta in rt.stream(prompts, ["alora_all", None], max_new_tokens=4, stop_token_ids=()):
        assert delta.index not in finished
        tokens[delta.index].append(delta.token_id)
        if delta.finished:
            finished[delta.index] = delta
    for i in (0, 1):
        assert tokens[i] == expected[i].token_ids
        assert finished[i].result is not None
        assert finished[i].result.token_ids == expected[i].token_ids


def test_closing_a_stream_aborts_its_requests(rt: AdapterRuntime) -> None:
    stream = rt.stream([[20, 21, 22]] * 3, max_new_tokens=50, stop_token_ids=())
    next(stream)
    assert rt.stats()["used_blocks"] > 0
    stream.close()
    s = rt.stats()
    assert (s["used_blocks"], s["running"], s["waiting"]) == (0, 0, 0)


def test_stop_tokens(rt: AdapterRuntime) -> None:
    free = rt.generate([[20, 21, 22]], max_new_tokens=8, stop_token_ids=())[0]
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    res = rt.generate([[20, 21, 22]], max_new_tokens=8, stop_token_ids=[stop])[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[: first + 1]


def test_sampling_is_seeded(rt: AdapterRuntime) -> None:
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, stop_token_ids=())
    a = rt.generate([[20, 21, 22]], seed=7, **kw)[0]
    b = rt.generate([[20, 21, 22]], seed=7, **kw)[0]
    c = rt.generate([[20, 21, 22]], seed=8, **kw)[0]
    greedy = rt.generate([[20, 21, 22]], max_new_tokens=12, stop_token_ids=())[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids
    # A seeded request samples the same tokens whatever it is batched with.
    batched = rt.generate([[20, 21, 22], [60, 61]], seed=7, **kw)[0]
    assert batched.token_ids == a.token_ids


def test_low_level_loop(rt: AdapterRuntime) -> None:
    ids = [
        rt.add_request([20, 21, 22, *INV1], adapter="alora_all", max_new_tokens=3),
        rt.add_request([30, 31, 32], max_new_tokens=5, stop_token_ids=()),
    ]
    victim = rt.add_request([40, 41], max_new_tokens=100, stop_token_ids=())
    seen: dict[int, list[int]] = {i: [] for i in [*ids, victim]}
    results = {}
    steps = 0
    while rt.has_unfinished():
        for out in rt.step():
            if out.new_token is not None:
                seen[out.request_id].append(out.new_token)
            if out.finished:
                results[out.request_id] = out.result
        steps += 1
        if steps == 2:
            aborted = rt.abort(victim)
            assert aborted.finish_reason == "abort"
            assert aborted.token_ids == seen[victim]
    assert rt.step() == []
    for i in ids:
        assert results[i].token_ids == seen[i]
    assert victim not in results


def test_strings_and_chat_with_tokenizer(arch_setup: Callable[[str], ArchSetup]) -> None:
    setup = arch_setup("llama")
    tok = tiny_tokenizer()
    with AdapterRuntime(setup.model, tok, kv_cache_blocks=64, adapter_rows=16) as rt:
        rt.load_adapter("alora_all", setup.dirs["alora_all"])
        text = "is the answer certain ?"
        ids = tok(text)["input_ids"]
        by_text = rt.generate(text, max_new_tokens=3, stop_token_ids=())[0]
        by_ids = rt.generate([ids], max_new_tokens=3, stop_token_ids=())[0]
        assert by_text.token_ids == by_ids.token_ids
        assert by_text.text == tok.decode(by_ids.token_ids, skip_special_tokens=True)
        chat = [{"role": "user", "content": "hello model"}]
        chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        chat_ids = chat_ids["input_ids"]
        by_chat = rt.generate([chat, text], max_new_tokens=3, stop_token_ids=())
        assert by_chat[0].prompt_tokens == len(chat_ids)
        assert (
            by_chat[0].token_ids
            == rt.generate([chat_ids], max_new_tokens=3, stop_token_ids=())[0].token_ids
        )
        assert by_chat[1].token_ids == by_text.token_ids
        deltas = list(rt.stream(text, max_new_tokens=3, stop_token_ids=()))
        assert [d.text for d in deltas] == [tok.decode([t]) for t in by_text.token_ids]


def test_default_stop_is_eos() -> None:
    model = tiny_model("llama")
    with AdapterRuntime(model, kv_cache_blocks=64, adapter_rows=8) as rt:
        free = rt.generate([[20, 21, 22]], max_new_tokens=10, stop_token_ids=())[0]
    model.generation_config.eos_token_id = free.token_ids[1]
    with AdapterRuntime(model, kv_cache_blocks=64, adapter_rows=8) as rt:
        res = rt.generate([[20, 21, 22]], max_new_tokens=10)[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[1]) + 1]
