"""Scale-out on Ray Serve (`alora.serving.scaleout`): a local Ray instance, 2 engine replicas
of the tiny model behind the ingress, the official `openai` client. The API works through
the ingress; an intrinsic aLoRA call after a base turn lands on the replica of its
conversation and reports the conversation as cached; adapters load on demand per replica;
killing a replica mid-traffic leaves every request either served or answered with a
retryable status, and the deployment recovers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from alora.serving.scaleout import (  # noqa: E402
    ATTEMPTS_HEADER,
    REPLICA_HEADER,
    EngineSpec,
    ScaleoutConfig,
    build_app,
)

torch.set_num_threads(1)
BLOCK = 4
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        from alora.models import load_model
        from alora.testing import make_peft_adapter

        model, tok = load_model(tiny=True)  # what `--tiny` replicas serve
        self.tok = tok
        self.inv = tok("certain ?", add_special_tokens=False)["input_ids"]
        self.catalog = {
            "certainty": str(
                make_peft_adapter(
                    model, root / "certainty", "alora", r=4, invocation_tokens=self.inv, seed=1
                )
            ),
            "rewrite": str(make_peft_adapter(model, root / "rewrite", "lora", r=4, seed=2)),
        }
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("scaleout"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": c.port})
        spec = EngineSpec(
            argv=[
                "--tiny",
                "--served-model-name",
                "base",
                "--max-num-seqs",
                "16",
                "--api-key",
                KEY,
            ],
            runtime_kwargs={"block_size": BLOCK, "kv_cache_blocks": 1024},
            catalog=c.catalog,
            max_loaded_adapters=1,  # so the per-replica LRU has to make room
        )
        config = ScaleoutConfig(replicas=2, cpus_per_replica=0.5, summary_period_s=0.5)
        serve.run(build_app(spec, config), name="alora", route_prefix="/")
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def conversation(i: int) -> list[dict[str, str]]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "is", "answer"]
    rng = random.Random(i)  # distinct from the first block on: no shared prefixes
    text = " ".join(rng.choice(words) for _ in range(20 + i % 7))
    # Every conversation starts with the same system prompt (3 blocks): a shared prefix
    # must not herd new conversations onto the replica that cached it first.
    system = "you are a lazy dog over the answer is the quick brown fox"
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def chat(c: Cluster, model: str, messages: list[dict[str, str]], max_tokens: int = 6) -> Any:
    raw = client(c).chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return raw.headers, raw.parse()


def summaries() -> dict[str, dict[str, Any]]:
    """Each live engine replica's own summary, by actor name (Serve's replica actors expose
    the deployment's `record_routing_stats`)."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and "AloraEngine" in a["name"]:
            actor = ray.get_actor(a["name"], namespace="serve")
            # A replica still starting (or just killed) has no summary yet: not listed.
            with contextlib.suppress(ray.exceptions.RayError):
                out[a["name"]] = ray.get(actor.record_routing_stats.remote(), timeout=30)
    return out


def replica_names(c: Cluster) -> set[str]:
    return set(summaries())


def test_api_through_ingress(cluster: Cluster) -> None:
    cards = {m.id: m for m in client(cluster).models.list().data}
    assert set(cards) == {"base", "certainty", "rewrite"}
    headers, r = chat(cluster, "base", conversation(0))
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 1
    assert headers[REPLICA_HEADER]
    # Streaming: server-sent events relayed chunk by chunk, usage at the end.
    stream = client(cluster).chat.completions.create(
        model="base",
        messages=conversation(1),
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # The key is checked at the ingress (its own endpoints included) and on the replicas.
    for path in ("/v1/models", "/v1/scaleout/stats"):
        assert httpx.get(cluster.url + path, timeout=30).status_code == 401
    r = httpx.post(cluster.url + "/v1/chat/completions", json={"model": "base"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    # The app's own errors pass through unchanged (OpenAI-shaped 404 for an unknown model).
    with pytest.raises(openai.NotFoundError):
        client(cluster).chat.completions.create(
            model="nope", messages=conversation(0), max_tokens=2
        )


def test_a_client_that_leaves_aborts_its_request_on_the_replica(cluster: Cluster) -> None:
    body = {"model": "base", "messages": conversation(50), "max_tokens": 900,
            "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    url = cluster.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")
        replica = r.headers[REPLICA_HEADER]
        steps = summaries()[replica]["steps"]
    # Closed after the first chunk: the cancellation crosses the ingress and the replica's
    # generator into the app, which aborts the sequence and frees its blocks long before
    # its 900 tokens (one engine step each).
    deadline = time.monotonic() + 60
    while True:
        s = summaries()[replica]
        if s["running"] == 0 and s["waiting"] == 0 and s["used_blocks"] == 0:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s["steps"] - steps < 300, (steps, s["steps"])


def test_adapters_load_on_demand_and_intrinsics_follow_their_conversation(
    cluster: Cluster,
) -> None:
    before = summaries()
    assert len(before) == 2
    assert all("certainty" not in s["adapters"] for s in before.values())
    served: dict[int, str] = {}
    convs = {}
    for i in range(6):
        messages = conversation(10 + i)
        headers, r = chat(cluster, "base", messages, max_tokens=8)
        served[i] = headers[REPLICA_HEADER]
        convs[i] = (messages, r.choices[0].message.content, r.usage.prompt_tokens)
    assert len(set(served.values())) == 2, "new conversations spread over both replicas"
    for i, (messages, answer, base_prompt) in convs.items():
        judge = [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "certain ?"},
        ]
        headers, r = chat(cluster, "certainty", judge, max_tokens=2)
        assert headers[REPLICA_HEADER] == served[i], f"conversation {i} changed replica"
        cached = r.usage.prompt_tokens_details.cached_tokens
        # At least every full block of the base turn's prompt came from the cache.
        assert cached >= base_prompt // BLOCK * BLOCK, (i, cached, base_prompt)
    after = summaries()
    # Each replica loaded the intrinsic on its first call, and only then; the LoRA adapter
    # nobody asked for is loaded nowhere.
    for name, s in after.items():
        assert "certainty" in s["adapters"], name
        assert s["adapter_loads"] == 1, name
        assert "rewrite" not in s["adapters"]
    headers, _ = chat(cluster, "rewrite", conversation(3), max_tokens=2)
    now = summaries()
    home = headers[REPLICA_HEADER]
    assert [n for n, s in now.items() if "rewrite" in s["adapters"]] == [home]
    # One adapter loaded per replica at most: the idle intrinsic made room for it there.
    assert set(now[home]["adapters"]) == {"rewrite"} and now[home]["adapter_loads"] == 2
    (other,) = set(now) - {home}
    assert set(now[other]["adapters"]) == {"certainty"}


def _post(c: Cluster, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    try:
        with httpx.stream(
            "POST", c.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120
        ) as r:
            data = r.read()
            return r.status_code, dict(r.headers), data
    except httpx.HTTPError as e:  # a connection the ingress dropped: not retryable-signalled
        return -1, {}, repr(e).encode()


def _retryable(status: int, headers: dict[str, str], data: bytes, stream: bool) -> bool:
    if status == 503:
        return "retry-after" in headers
    if status != 200:
        return False
    if not stream:
        return bool(json.loads(data)["choices"])
    events = [e[len("data: ") :] for e in data.decode().split("\n\n") if e.startswith("data: ")]
    if events and events[-1] == "[DONE]":
        return True
    # Cut mid-stream: the last event is an OpenAI-shaped error with code 503.
    return json.loads(events[-1])["error"]["code"] == 503


def _wait_replaced(c: Cluster, victim: str) -> set[str]:
    deadline = time.monotonic() + 120
    while True:
        names = replica_names(c)
        if len(names) == 2 and victim not in names:
            return names
        assert time.monotonic() < deadline, names
        time.sleep(0.5)


def _kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_killing_a_replica_mid_traffic_loses_nothing_and_recovers(cluster: Cluster) -> None:
    original = replica_names(cluster)
    assert len(original) == 2
    results: list[tuple[bool, int, bool]] = []
    stop = threading.Event()

    def traffic(k: int) -> None:
        i = 0
        while not stop.is_set():
            stream = (k + i) % 2 == 1
            body = {
                "model": "certainty" if i % 3 == 2 else "base",
                "messages": conversation(100 + 10 * k + i % 10),
                "max_tokens": 16,
                "ignore_eos": True,
                "temperature": 0,
                "stream": stream,
            }
            status, headers, data = _post(cluster, body)
            results.append((stream, status, _retryable(status, headers, data, stream)))
            i += 1

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        # A long non-streamed request on a known replica (its conversation's, by affinity):
        # the replica dies under it, and the ingress runs it again on the other one.
        messages = conversation(300)
        headers, _ = chat(cluster, "base", messages, max_tokens=2)
        victim = headers[REPLICA_HEADER]
        long = {
            "model": "base",
            "messages": messages,
            "max_tokens": 400,
            "ignore_eos": True,
            "temperature": 0,
        }
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(_post(cluster, long)))
        t.start()
        time.sleep(1.0)
        _kill(victim)
        t.join(180)
        status, headers, data = out[0]
        assert status == 200, data
        assert headers[ATTEMPTS_HEADER] == "2" and headers[REPLICA_HEADER] != victim
        assert len(json.loads(data)["choices"][0]["message"]["content"].split()) > 0
        names = _wait_replaced(cluster, victim)

        # A stream whose replica dies after its first chunk ends with a retryable error.
        messages = conversation(301)
        headers, _ = chat(cluster, "base", messages, max_tokens=2)
        victim = headers[REPLICA_HEADER]
        body = {**long, "messages": messages, "stream": True}
        with httpx.stream(
            "POST", cluster.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120
        ) as r:
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == victim
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            _kill(victim)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-1][len("data: ") :])["error"]["code"] == 503
        names = _wait_replaced(cluster, victim)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    # Background traffic all along: every request served or told to retry.
    assert len(results) >= 8
    bad = [r for r in results if not r[2]]
    assert not bad, bad

    # The replacements load adapters on their first use of them.
    fresh = names - original
    seen = set()
    for i in range(6):
        messages = conversation(200 + i)
        headers, r = chat(cluster, "base", messages, max_tokens=4)
        seen.add(headers[REPLICA_HEADER])
        judge = [
            *messages,
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "certain ?"},
        ]
        h2, _ = chat(cluster, "certainty", judge, max_tokens=2)
        assert h2[REPLICA_HEADER] == headers[REPLICA_HEADER]
        assert h2[ATTEMPTS_HEADER] == "1"
    assert seen == names
    after = summaries()
    assert all("certainty" in after[n]["adapters"] for n in fresh)


def test_command_line_splits_serve_arguments_from_scale_out_ones() -> None:
    from alora.serving.scaleout import _parser, spec_from_args

    argv = ["--tiny", "--replicas", "3", "--adapter", "a=/x/a", "--port=9000",
            "--adapter=b=/x/b", "--max-loaded-adapters", "1", "--threads", "2",
            "--router", "default", "--api-key", "k"]  # fmt: skip
    args = _parser().parse_args(argv)
    spec = spec_from_args(args, argv)
    assert args.replicas == 3 and args.router == "default" and args.port == 9000
    # --adapter entries form the lazy catalog instead of loading on every replica.
    assert spec.catalog == {"a": "/x/a", "b": "/x/b"}
    assert spec.argv == ["--tiny", "--threads", "2", "--api-key", "k"]
    assert spec.max_loaded_adapters == 1 and spec.threads == 2
    assert spec.args().api_key == "k" and spec.base_name() == "tiny-granite"
