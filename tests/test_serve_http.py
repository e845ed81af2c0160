"""The HTTP layer against a real uvicorn server and the official `openai` client, over the
fake runtime of `alora.serving.testing` (deterministic pseudo-logits, no model): protocol
shapes, streaming, logprobs, stop strings, n, structured output, errors, auth, admission,
disconnects, adapter endpoints and metrics. The real runtime is in test_serve_runtime.py."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from alora.serving.app import ServerConfig, create_app
from alora.serving.testing import FakeRuntime, byte_tokenizer, serve_in_thread

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fake() -> FakeRuntime:
    return FakeRuntime(adapters=("lora_a", "lora_b"))


@pytest.fixture(scope="module")
def url(fake: FakeRuntime) -> Iterator[str]:
    app = create_app(fake, ServerConfig(model_name="base"), own_runtime=False)
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy(fake: FakeRuntime, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    """What the fake generates greedily for `prompt` (stopping at EOS)."""
    out: list[int] = []
    for _ in range(n):
        t = int(fake.logits(prompt + out, adapter).argmax())
        out.append(t)
        if t == fake.tokenizer.eos_token_id:
            break
    return out


def chat_ids(fake: FakeRuntime, messages: list[dict[str, str]]) -> list[int]:
    text = fake.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return fake.tokenizer(text, add_special_tokens=False)["input_ids"]


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=30, **kw)


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "lora_a", "lora_b"}
    assert cards["lora_a"].model_extra["parent"] == "base"
    assert cards["base"].model_extra["parent"] is None


@pytest.mark.parametrize("model", ["base", "lora_a"])
def test_completion_text_and_usage(fake: FakeRuntime, client: openai.OpenAI, model: str) -> None:
    prompt = "hello world how are you"
    ids = fake.tokenizer(prompt)["input_ids"]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    expected = greedy(fake, ids, None if model == "base" else model, 6)
    assert r.choices[0].text == fake.tokenizer.decode(expected, skip_special_tokens=True)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(expected)
    assert r.object == "text_completion" and r.model == model


def test_token_id_prompts_and_batches(fake: FakeRuntime, client: openai.OpenAI) -> None:
    prompts = [[20, 21, 22, 23], [30, 31]]
    r = client.completions.create(model="base", prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices, strict=True):
        assert c.text == fake.tokenizer.decode(greedy(fake, p, None, 3), skip_special_tokens=True)
    assert r.usage is not None and r.usage.prompt_tokens == 6


def test_chat_stream_equals_non_stream(fake: FakeRuntime, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "is the answer certain ?"}]
    kw: dict[str, Any] = dict(model="lora_b", messages=messages, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [full.choices[0].finish_reason]
    usage, full_usage = chunks[-1].usage, full.usage
    assert chunks[-1].choices == [] and usage is not None and full_usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full_usage.prompt_tokens,
        full_usage.completion_tokens,
    )
    expected = greedy(fake, chat_ids(fake, messages), "lora_b", 8)
    assert full.choices[0].message.content == fake.tokenizer.decode(
        expected, skip_special_tokens=True
    )


def test_cached_tokens_show_prefix_reuse(client: openai.OpenAI) -> None:
    prompt = [40 + i % 50 for i in range(40)]
    first = client.completions.create(model="base", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="base", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 36  # whole blocks before the last


def test_chat_logprobs_are_log_softmax(fake: FakeRuntime, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(
        model="lora_a",
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ids = chat_ids(fake, messages)
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) >= 1
    out: list[int] = []
    for entry in content:
        ls = torch.log_softmax(fake.logits(ids + out, "lora_a"), -1)
        tid = int(entry.token.removeprefix("token_id:"))
        assert tid == int(ls.argmax())
        assert entry.logprob == pytest.approx(float(ls[tid]), abs=1e-5)
        vals, idx = ls.topk(5)
        assert [t.token for t in entry.top_logprobs] == [f"token_id:{i}" for i in idx.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-5)
        out.append(tid)


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="base", prompt="hello", max_tokens=3, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[tok] == val and len(top) <= 3 and max(top.values()) == val


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client: openai.OpenAI, stream: bool) -> None:
    kw: dict[str, Any] = dict(model="base", prompt=[50, 51, 52], max_tokens=12, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    words = free.split(" ")
    assert len(words) >= 4
    stop = f"{words[1][1:]} {words[2][:1]}"  # spans a token boundary, starts mid-token
    cut = free.index(stop)
    if stream:
        chunks = list(client.completions.create(**kw, stop=[stop, "zzz"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw, stop=[stop, "zzz"])
        text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.choices[0].model_extra["stop_reason"] == stop
    assert (text, reason) == (free[:cut], "stop")


def test_n_choices_with_seed(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="base",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=1.0,
        seed=7,
        n=3,
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # distinct seeds per choice
    assert a.usage is not None and a.usage.prompt_tokens == len(
        chat_ids(FakeRuntime(), kw["messages"])
    )


def test_errors_are_openai_shaped_and_the_server_stays_healthy(
    url: str, client: openai.OpenAI
) -> None:
    cases: list[tuple[Any, int, str | None]] = [
        (b"{not json", 400, None),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "base", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "base", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "base", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": "base", "prompt": [[1, 2], [999999]]}, 400, "prompt"),
        ({"model": "base", "prompt": "x", "stop": [""]}, 400, "stop"),
        ({"model": "base", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ({"model": "base", "prompt": ""}, 400, "prompt"),
        ({"prompt": "x"}, 400, "model"),
        (
            {
                "model": "base",
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "nonsense"}},
                },
            },
            400,
            "structured_outputs.json",
        ),
        ({"model": "base", "prompt": "hello " * 300}, 400, "prompt"),
    ]
    for body, status, param in cases:
        r = post(url, "/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == status and err["message"] and err["type"]
        assert err["param"] == param, (body, err)
    r = post(url, "/v1/chat/completions", {"model": "base", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(url, "/v1/completions", b"x" * (5 << 20))
    assert r.status_code == 413
    assert httpx.get(url + "/nope").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=10**9)
    assert httpx.get(url + "/health").status_code == 200
    ok = client.completions.create(model="base", prompt="hello", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_metrics(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model="lora_a", prompt="hello", max_tokens=2)
    text = httpx.get(url + "/metrics").text
    assert re.search(r'alora_requests_total\{model="lora_a",status="ok"\} [1-9]', text)
    assert re.search(r'alora_requests_total\{model="_unknown",status="404"\} [1-9]', text)
    for name in (
        "alora_prompt_tokens_total",
        "alora_cached_prompt_tokens_total",
        "alora_generation_tokens_total",
        "alora_time_to_first_token_seconds_bucket",
        "alora_inter_token_latency_seconds_bucket",
        "alora_kv_blocks_used",
        "alora_kv_blocks_cached",
        "alora_adapters_resident",
        "alora_adapter_swaps_in_total",
        "alora_preemptions_total",
        "alora_requests_waiting",
        "alora_server_requests_in_flight",
    ):
        assert name in text, name


# ----------------------------------------------------------------- with their own servers


@pytest.fixture
def slow() -> Iterator[tuple[FakeRuntime, str]]:
    rt = FakeRuntime(delay=0.01, adapters=("lora_a",))
    app = create_app(rt, ServerConfig(model_name="base", max_pending=2), own_runtime=False)
    with serve_in_thread(app) as base:
        yield rt, base


def _wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts(slow: tuple[FakeRuntime, str]) -> None:
    rt, url = slow
    body = {
        "model": "base",
        "prompt": "hello",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert rt.stats()["running"] == 1
        assert next(lines) == ""
    _wait(lambda: rt.stats()["running"] == 0 and rt.stats()["used_blocks"] == 0)


@pytest.mark.parametrize(
    "extra",
    [{"n": 3}, {"n": 2, "structured_outputs": {"regex": "[a-z ]+"}}],
    ids=["n", "n+grammar"],
)
def test_disconnect_aborts_every_sequence(extra: dict) -> None:
    rt = FakeRuntime(delay=0.01)
    app = create_app(rt, ServerConfig(model_name="base"), own_runtime=False)
    body = {
        "model": "base",
        "prompt": "hello",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
        **extra,
    }
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            _wait(lambda: rt.stats()["running"] == extra["n"])  # the followers started
        _wait(lambda: rt.stats()["running"] == 0 and rt.stats()["used_blocks"] == 0)


def test_disconnect_during_non_streaming_request_aborts(slow: tuple[FakeRuntime, str]) -> None:
    rt, url = slow
    body = {"model": "base", "prompt": "hello", "max_tokens": 200, "ignore_eos": True}

    async def go() -> None:
        async with httpx.AsyncClient() as c:
            task = asyncio.ensure_future(c.post(url + "/v1/completions", json=body, timeout=30))
            while rt.stats()["running"] == 0:
                await asyncio.sleep(0.01)
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    _wait(lambda: rt.stats()["running"] == 0)


def test_admission_is_bounded(slow: tuple[FakeRuntime, str]) -> None:
    rt, url = slow
    body = {
        "model": "base",
        "prompt": "hello",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as a,
        httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as b,
    ):
        # Keep the line iterators alive: a collected one closes its connection.
        la, lb = a.iter_lines(), b.iter_lines()
        next(la), next(lb)
        r = post(url, "/v1/completions", {**body, "stream": False})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 503
    _wait(lambda: rt.stats()["running"] == 0)
    assert post(url, "/v1/completions", {**body, "stream": False}).status_code == 200


def test_api_key() -> None:
    rt = FakeRuntime()
    app = create_app(rt, ServerConfig(model_name="base", api_key="s3cret"), own_runtime=False)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
            assert httpx.get(url + "/metrics", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="base", prompt="hello", max_tokens=2).choices


def test_adapter_endpoints(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "new").mkdir(parents=True)
    (root / "new" / "adapter_config.json").write_text("{}")
    rt = FakeRuntime(delay=0.005, adapters=("lora_a",))
    off = create_app(rt, ServerConfig(model_name="base"), own_runtime=False)
    with serve_in_thread(off) as url:
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "new"})
        assert r.status_code == 403
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "lora_a"}).status_code == 403
    on = create_app(
        rt,
        ServerConfig(model_name="base", allow_adapter_loading=True, adapter_root=str(root)),
        own_runtime=False,
    )
    with serve_in_thread(on) as url:
        for path in ("../x", str(tmp_path), "/etc", "missing"):
            r = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", path
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "new"})
        assert r.status_code == 200, r.text
        assert (
            post(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "new"}).status_code
            == 400
        )
        assert "new" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        body = {
            "model": "new",
            "prompt": "hello",
            "max_tokens": 100,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()
            next(lines)
            r = post(url, "/v1/unload_lora_adapter", {"lora_name": "new"})
            assert r.status_code == 409 and r.json()["error"]["code"] == 409
        _wait(lambda: rt.stats()["running"] == 0)
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "new"}).status_code == 200
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "new"}).status_code == 404
        assert post(url, "/v1/completions", {"model": "new", "prompt": "x"}).status_code == 404


def test_structured_outputs() -> None:
    tok = byte_tokenizer()
    rt = FakeRuntime(tok, max_model_len=512)
    app = create_app(rt, ServerConfig(model_name="base"), own_runtime=False)
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "unsure"]},
            "certain": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "certain", "score"],
        "additionalProperties": False,
    }
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Is the answer certain?"}]
        seen = set()
        for seed in range(3):
            r = c.chat.completions.create(
                model="base",
                messages=msgs,
                max_tokens=60,
                temperature=1.0,
                seed=seed,
                n=2,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "verdict", "schema": schema},
                },
            )
            for choice in r.choices:
                value = json.loads(choice.message.content or "")
                assert set(value) == {"answer", "certain", "score"}
                assert value["answer"] in ("yes", "no", "unsure") and 0 <= value["score"] <= 9
                assert isinstance(value["certain"], bool)
                seen.add(choice.message.content)
        assert len(seen) > 1
        r = c.completions.create(
            model="base",
            prompt="pick",
            max_tokens=20,
            temperature=0,
            extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}},
        )
        assert r.choices[0].text in ("alpha", "beta gamma")
        r = c.completions.create(
            model="base",
            prompt="digits",
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
        )
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", "".join(ch.choices[0].text for ch in r))
        r = c.chat.completions.create(
            model="base",
            messages=msgs,
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_object"},
        )
        # Free-form keys from pseudo-random logits need not close within max_tokens.
        text = r.choices[0].message.content or ""
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_concurrent_clients_on_the_fake(fake: FakeRuntime, url: str) -> None:
    """Many concurrent streams interleave without crosstalk (the real runtime's version is
    in test_serve_runtime.py)."""
    results: dict[int, str] = {}

    def run(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        s = c.completions.create(
            model=["base", "lora_a", "lora_b"][i % 3],
            prompt=[20 + i, 21],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        results[i] = "".join(ch.choices[0].text for ch in s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(16):
        adapter = [None, "lora_a", "lora_b"][i % 3]
        expected = greedy(fake, [20 + i, 21], adapter, 5)
        assert results[i] == fake.tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_template_options(fake: FakeRuntime, client: openai.OpenAI) -> None:
    tok = fake.tokenizer
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the answer is"},
    ]
    r = client.chat.completions.create(
        model="base",
        messages=msgs,
        max_tokens=3,
        temperature=0,
        extra_body={
            "add_generation_prompt": False,
            "continue_final_message": True,
            "chat_template_kwargs": {"unused_by_this_template": 1},
        },
    )
    text = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tok.decode(
        greedy(fake, ids, None, 3), skip_special_tokens=True
    )
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": parts}], max_tokens=1
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(
        chat_ids(fake, [{"role": "user", "content": "hello world"}])
    )


def test_streamed_bytes_never_split_a_character() -> None:
    """Byte-level tokens: with the two byte tokens of "é" pushed up by logit_bias, the
    output is full of two-byte characters split across tokens (and stray bytes), and the
    stream must still concatenate to the decoded text, never cutting a character."""
    tok = byte_tokenizer()
    e_bytes = tok("é", add_special_tokens=False)["input_ids"]
    assert len(e_bytes) == 2
    rt = FakeRuntime(tok, max_model_len=512)
    app = create_app(rt, ServerConfig(model_name="base"), own_runtime=False)
    bias = {str(t): 30.0 for t in e_bytes}
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i in range(3):
            kw: dict[str, Any] = dict(
                model="base", prompt=[40 + i], max_tokens=24, temperature=0, logit_bias=bias
            )
            full = c.completions.create(**kw).choices[0].text
            pieces = [ch.choices[0].text for ch in c.completions.create(**kw, stream=True)]
            ids: list[int] = []
            for _ in range(24):
                logits = rt.logits([40 + i, *ids], None)
                logits[e_bytes] += 30.0
                ids.append(int(logits.argmax()))
            assert "".join(pieces) == full == tok.decode(ids, skip_special_tokens=True)
            assert "é" in full
