"""`alora serve` over the real `AdapterRuntime` on a tiny random Llama, with the official
`openai` client against uvicorn on 127.0.0.1: greedy tokens of concurrent mixed
base/LoRA/aLoRA streams equal the same request run alone, logprobs equal log_softmax of the
runtime's logits, disconnects free KV blocks, adapters load and unload under traffic,
structured output holds on a real model, and SIGTERM shuts the server down cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from alora import AdapterRuntime
from alora.serving.app import ServerConfig, create_app
from alora.serving.testing import byte_tokenizer, serve_in_thread
from alora.testing import make_peft_adapter, tiny_model, tiny_tokenizer

torch.set_num_threads(1)

CONVERSATIONS = [[10 + (7 * i + j) % 100 for j in range(13 + 3 * i)] for i in range(4)]


class Setup:
    def __init__(self, root: Path) -> None:
        self.tok = tiny_tokenizer()
        self.model = tiny_model("llama", seed=0)
        self.inv = self.tok("certain ?", add_special_tokens=False)["input_ids"]
        self.dirs = {
            "certainty": make_peft_adapter(
                self.model, root / "certainty", "alora", r=4, invocation_tokens=self.inv, seed=1
            ),
            "rewrite": make_peft_adapter(self.model, root / "rewrite", "lora", r=8, seed=2),
        }
        self.extra = make_peft_adapter(self.model, root / "loadable" / "extra", "lora", seed=3)
        self.root = root
        self.rt = AdapterRuntime(
            self.model, self.tok, block_size=4, kv_cache_blocks=512, max_num_seqs=32
        )
        for name, path in self.dirs.items():
            self.rt.load_adapter(name, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("serve_adapters"))
    yield s
    s.rt.detach()


@pytest.fixture(scope="module")
def url(setup: Setup) -> Iterator[str]:
    config = ServerConfig(
        model_name="base",
        allow_adapter_loading=True,
        adapter_root=str(setup.root / "loadable"),
    )
    with serve_in_thread(create_app(setup.rt, config, own_runtime=False)) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url + "/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 10
    while metric(url, "alora_kv_blocks_used") or metric(url, "alora_requests_running"):
        assert time.monotonic() < deadline, "blocks still in use"
        time.sleep(0.02)


def test_32_concurrent_streams_equal_generate_alone(setup: Setup, url: str) -> None:
    jobs: list[tuple[list[int], str | None]] = []
    for i in range(32):
        conv = CONVERSATIONS[i % 4] + [50 + i]
        model = ("base", "rewrite", "certainty")[i % 3]
        prompt = conv + setup.inv if model == "certainty" else conv
        jobs.append((prompt, None if model == "base" else model))
    expected = [setup.rt.generate([p], a, max_new_tokens=6, temperature=0.0)[0] for p, a in jobs]
    got: dict[int, tuple[list[int], str, Any]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            prompt, adapter = jobs[i]
            s = client(url).completions.create(
                model=adapter or "base",
                prompt=prompt,
                max_tokens=6,
                temperature=0,
                stream=True,
                logprobs=0,
                stream_options={"include_usage": True},
                extra_body={"return_tokens_as_token_ids": True},
            )
            ids: list[int] = []
            text, usage = "", None
            for ch in s:
                if ch.usage is not None:
                    usage = ch.usage
                for c in ch.choices:
                    text += c.text
                    ids += [int(t.removeprefix("token_id:")) for t in c.logprobs.tokens]
            got[i] = (ids, text, usage)
        except BaseException as e:  # reported below, with the request
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    eos = setup.tok.eos_token_id
    for i, res in enumerate(expected):
        ids, text, usage = got[i]
        want = [t for t in res.token_ids if t != eos]  # the stop token is not text
        assert ids == want, (i, jobs[i])
        assert text == setup.tok.decode(res.token_ids, skip_special_tokens=True)
        assert usage.prompt_tokens == len(jobs[i][0])
        assert usage.completion_tokens == len(res.token_ids)
    # The requests ran after `expected`: every conversation's blocks were cached.
    assert all(got[i][2].prompt_tokens_details.cached_tokens > 0 for i in range(32))
    wait_idle(url)


def test_logprobs_are_log_softmax_of_the_adapters_logits(setup: Setup, url: str) -> None:
    prompt = CONVERSATIONS[1] + setup.inv
    r = client(url).completions.create(
        model="certainty",
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    ref = setup.rt.generate(
        [prompt], "certainty", max_new_tokens=5, stop_token_ids=(), return_logits=True
    )[0]
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 5
    assert [int(t.removeprefix("token_id:")) for t in lp.tokens] == ref.token_ids
    assert ref.logits is not None
    for k, logits in enumerate(ref.logits):
        ls = torch.log_softmax(logits.float(), -1)
        assert lp.token_logprobs[k] == pytest.approx(float(ls[ref.token_ids[k]]), abs=1e-4)
        vals, idx = ls.topk(5)
        top = lp.top_logprobs[k]
        for t, v in zip(idx.tolist(), vals.tolist(), strict=True):
            assert top[f"token_id:{t}"] == pytest.approx(v, abs=1e-4)


def test_n_choices_equal_seeded_generate(setup: Setup, url: str) -> None:
    prompt = [*CONVERSATIONS[2], 77, 78, 79]  # not seen before: nothing cached
    hits = setup.rt.stats()["prefix_hit_tokens"]
    r = client(url).completions.create(
        model="rewrite",
        prompt=prompt,
        max_tokens=6,
        temperature=0.8,
        seed=11,
        n=3,
        extra_body={"ignore_eos": True},
    )
    shared = setup.rt.stats()["prefix_hit_tokens"] - hits
    # Choice s samples with seed + s, so the n choices differ and each is reproducible.
    ref = [
        setup.rt.generate(
            [prompt], "rewrite", max_new_tokens=6, temperature=0.8, seed=11 + s, stop_token_ids=()
        )[0]
        for s in range(3)
    ]
    assert [c.text for c in r.choices] == [
        setup.tok.decode(x.token_ids, skip_special_tokens=True) for x in ref
    ]
    assert len({c.text for c in r.choices}) > 1
    assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
    # The two followers reused the leader's full prompt blocks (block size 4).
    assert shared >= 2 * ((len(prompt) - 1) // 4 * 4)


def test_chat_with_stop_string(setup: Setup, url: str) -> None:
    c = client(url)
    msgs = [{"role": "user", "content": "is the answer certain ?"}]
    kw: dict[str, Any] = dict(model="rewrite", messages=msgs, max_tokens=10, temperature=0)
    free = c.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    text = free.choices[0].message.content or ""
    words = text.split(" ")
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = c.chat.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    wait_idle(url)


def test_disconnect_mid_stream_frees_blocks(url: str) -> None:
    body = {
        "model": "base",
        "prompt": CONVERSATIONS[3],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(url, "alora_kv_blocks_used") > 0
    wait_idle(url)
    assert metric(url, "alora_server_requests_in_flight") == 0


def test_load_and_unload_while_traffic_flows(setup: Setup, url: str) -> None:
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    failures: list[str] = []

    def traffic(model: str) -> None:
        c = client(url)
        while not stop.is_set():
            try:
                r = c.completions.create(
                    model=model, prompt=CONVERSATIONS[0], max_tokens=3, temperature=0
                )
                seen.append((model, r.choices[0].text))
            except Exception as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("base", "rewrite")]
    for t in threads:
        t.start()
    try:
        r = httpx.post(
            url + "/v1/load_lora_adapter",
            json={"lora_name": "extra", "lora_path": "extra"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        out = client(url).completions.create(
            model="extra", prompt=CONVERSATIONS[0], max_tokens=3, temperature=0
        )
        ref = setup.rt.generate([CONVERSATIONS[0]], "extra", max_new_tokens=3)[0]
        assert out.choices[0].text == setup.tok.decode(ref.token_ids, skip_special_tokens=True)
        body = {
            "model": "extra",
            "prompt": CONVERSATIONS[1],
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            next(lines)
            busy = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
            assert busy.status_code == 409, busy.text
        deadline = time.monotonic() + 10
        while (
            r := httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
        ).status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError):
            client(url).completions.create(model="extra", prompt=[20], max_tokens=1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    for model in ("base", "rewrite"):
        texts = {t for m, t in seen if m == model}
        assert len(texts) == 1, (model, texts)  # same greedy answer throughout
    wait_idle(url)


def test_json_schema_on_a_real_model() -> None:
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=5, vocab_size=len(tok), max_position_embeddings=512)
    rt = AdapterRuntime(model, tok, block_size=8, kv_cache_blocks=256)
    schema = {
        "type": "object",
        "properties": {
            "answerable": {"type": "boolean"},
            "certainty": {"enum": ["low", "medium", "high"]},
        },
        "required": ["answerable", "certainty"],
        "additionalProperties": False,
    }
    try:
        with serve_in_thread(create_app(rt, ServerConfig(model_name="base"))) as url:
            c = client(url)
            msgs = [{"role": "user", "content": "Is the answer certain?"}]
            out: list[Any] = []

            def free() -> None:  # an unconstrained request in the same batches
                out.append(
                    c.chat.completions.create(
                        model="base", messages=msgs, max_tokens=30, temperature=1.0, seed=1
                    )
                )

            t = threading.Thread(target=free)
            t.start()
            r = c.chat.completions.create(
                model="base",
                messages=msgs,
                max_tokens=40,
                temperature=1.0,
                seed=3,
                n=3,
                logprobs=True,
                top_logprobs=2,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "verdict", "schema": schema},
                },
            )
            t.join(120)
            for choice in r.choices:
                value = json.loads(choice.message.content or "")
                assert set(value) == {"answerable", "certainty"}
                assert isinstance(value["answerable"], bool)
                assert value["certainty"] in ("low", "medium", "high")
                assert choice.finish_reason == "stop"
                assert choice.logprobs is not None and choice.logprobs.content
            assert out and out[0].choices[0].message.content is not None
    finally:
        if rt.attached:
            rt.detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_shuts_down_cleanly() -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alora.serving",
            "--tiny",
            "--port",
            str(port),
            "--shutdown-timeout",
            "1",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        (card,) = httpx.get(url + "/v1/models").json()["data"]
        body = {
            "model": card["id"],
            "prompt": "hello",
            "max_tokens": 240,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            for _ in lines:  # the stream ends (finished or cut at the timeout)
                pass
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_token_ids(setup: Setup, url: str) -> None:
    prompt = CONVERSATIONS[0]
    free = setup.rt.generate([prompt], None, max_new_tokens=8, stop_token_ids=())[0]
    stop = free.token_ids[3]
    cut = free.token_ids.index(stop)  # its first occurrence ends the request
    r = client(url).completions.create(
        model="base", prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"stop_token_ids": [stop]},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.text == setup.tok.decode(free.token_ids[:cut], skip_special_tokens=True)
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", stop)
    assert r.usage is not None and r.usage.completion_tokens == cut + 1  # the stop token counts
