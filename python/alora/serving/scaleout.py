"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible ingress, routed so
that an intrinsic (aLoRA) call lands on the replica that holds its conversation's base KV.

Three parts (docs/scaleout.md has the reasoning and the multi-node picture):

- `EngineReplica`: one `AdapterRuntime` and the `alora serve` app (`create_app`) in a Ray
  Serve replica. `handle()` runs one HTTP request through the ASGI app in-process and
  streams the response back (start message, then body chunks). Adapters are loaded on first
  use from a catalog (name -> path), with an LRU cap on how many stay loaded.
  `record_routing_stats()` is Ray Serve's hook for the replica's prefix summary: the chained
  hashes of its cached base-model KV blocks, its loaded adapters and its load.
- `PrefixAffinityRouter`: a Ray Serve `RequestRouter` run inside every handle to the engine
  deployment (here: in the ingress). It ranks replicas by the longest cached prefix of the
  request (summaries, plus its own decisions since the last summary), then adapter loaded,
  then load, skipping replicas more than `max_imbalance` requests above the least loaded.
- `Ingress`: FastAPI under `@serve.ingress`. It tokenizes the request as the server does
  (the app's own helpers), passes the tokens to the router as a routing hint, forwards the
  raw request and retries on another replica when one dies before anything reached the
  client; a stream cut after its first byte ends with an error event (status 503).

Run: `python -m alora.serving.scaleout --replicas 2 [alora serve arguments]`.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from alora import _core

log = logging.getLogger("alora.scaleout")

ENGINE_DEPLOYMENT = "AloraEngine"
INGRESS_DEPLOYMENT = "AloraIngress"
REPLICA_HEADER = "x-alora-replica"
ATTEMPTS_HEADER = "x-alora-attempts"
# Errors that mean "the replica (or the path to it) is gone", not "the request is bad".
_REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


# --------------------------------------------------------------------------- the spec


@dataclass
class EngineSpec:
    """What every replica builds. `argv` are `alora serve` arguments (model, dtype, KV size,
    served name, API key, ...); `runtime_kwargs` go to `AdapterRuntime` on top of them
    (e.g. `block_size`, `kv_cache_blocks`). `catalog` maps adapter names to paths, loaded
    lazily; `max_loaded_adapters` caps the loaded set per replica (LRU; None: no cap)."""

    argv: list[str] = field(default_factory=list)
    runtime_kwargs: dict[str, Any] = field(default_factory=dict)
    catalog: dict[str, str] = field(default_factory=dict)
    max_loaded_adapters: int | None = None
    threads: int = 1

    def args(self) -> argparse.Namespace:
        from alora.serving import cli

        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return parser.parse_args(self.argv)

    def base_name(self) -> str:
        args = self.args()
        if args.served_model_name:
            return str(args.served_model_name)
        from alora.models import model_label

        return model_label(args.model, args.tiny)

    def tokenizer(self) -> Any:
        """The serving tokenizer without loading the model (the ingress needs only it)."""
        args = self.args()
        if args.tiny:
            from alora.testing import tiny_tokenizer

            return tiny_tokenizer(128)  # what alora.models.load_model(tiny=True) serves
        from transformers import AutoTokenizer

        from alora.models import DEFAULT_MODEL, smollm2_dir

        path = smollm2_dir() if args.model in (None, DEFAULT_MODEL) else Path(args.model)
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            return None


@dataclass
class ScaleoutConfig:
    replicas: int = 2
    router: str = "affinity"  # "affinity" (PrefixAffinityRouter) or "default" (Ray's pow-2)
    summary_period_s: float = 0.5
    max_imbalance: int = 8  # in-flight requests above the least loaded replica
    min_match_fraction: float = 0.5  # of a prompt's blocks, for prefix affinity to count
    recent_ttl_s: float = 30.0
    max_ongoing_requests: int = 256  # per replica; the app's own admission bound is below it
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_attempts: int = 3  # replicas tried for one request that has sent nothing yet
    retry_after_s: int = 1
    health_check_period_s: float = 2.0


# --------------------------------------------------------------------------- the replica


def build_runtime(spec: EngineSpec) -> tuple[Any, Any]:
    """(runtime, app) for one replica, from the `alora serve` arguments of the spec. The
    catalog's adapters are not loaded here: they load on first use."""
    import torch

    from alora import AdapterRuntime
    from alora.serving import cli
    from alora.serving.app import ServerConfig, create_app

    torch.set_grad_enabled(False)
    torch.set_num_threads(spec.threads)
    args = spec.args()
    model, tokenizer, default_name = cli.load(args)
    kwargs = cli.runtime_kwargs(args)
    kwargs.update(spec.runtime_kwargs)
    rt = AdapterRuntime(model, tokenizer, **kwargs)
    for name, path in args.adapter:  # --adapter in argv: loaded eagerly on every replica
        rt.load_adapter(name, path)
    name = args.served_model_name or default_name
    config = ServerConfig(
        model_name=name,
        aliases=tuple(a for a in {args.model, "base"} if a and a != name),
        api_key=args.api_key or None,
        max_pending=args.max_pending or 4 * args.max_num_seqs,
        max_body_bytes=args.max_body_bytes,
    )
    return rt, create_app(rt, config, own_runtime=False)


def resolve_adapter_uri(uri: str) -> str:
    """A catalog entry to a local directory. Plain paths and file:// URIs only; an object
    store (s3://, gs://) would be fetched here into a per-node cache keyed by URI and
    content hash (docs/scaleout.md)."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"adapter URI scheme not supported here: {uri!r}")
    return uri


async def asgi_call(
    app: Any, request: dict[str, Any], disconnected: asyncio.Event
) -> AsyncIterator[dict[str, Any]]:
    """Run one HTTP request through an ASGI app in-process; yields its `http.response.*`
    messages. Setting `disconnected` (or closing this generator) tells the app the client
    left, which aborts the request in the engine."""
    path = request["path"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": request.get("query", "").encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request["headers"]],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def run() -> None:
        try:
            await app(scope, receive, queue.put)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            msg = await queue.get()
            if msg is None:
                break
            yield msg
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                break
        await task  # re-raises what the app raised
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5)


class EngineReplica:
    """One engine: an `AdapterRuntime` and the `alora serve` app, in one Ray Serve replica."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.rt, self.app = build_runtime(spec)
        self.base_names = {self.app.state.alora.config.model_name, "base"}
        self.adapter_lock = asyncio.Lock()
        self.adapter_use: OrderedDict[str, None] = OrderedDict()
        self.loads = 0  # adapters loaded from the catalog by this replica
        try:
            ctx = serve.get_replica_context()
            self.replica_id = ctx.replica_id.unique_id
        except Exception:  # built outside Serve (unit tests)
            self.replica_id = "local"
        try:
            import ray

            self.actor_name = ray.get_runtime_context().get_actor_name() or ""
        except Exception:
            self.actor_name = ""

    async def ensure_adapter(self, model: str) -> None:
        """Load `model` from the catalog if it names an adapter this replica lacks; keep at
        most `max_loaded_adapters` loaded, unloading the least recently used idle one."""
        if model in self.base_names:
            return
        if model in self.rt.adapters:
            self.adapter_use[model] = None
            self.adapter_use.move_to_end(model)
            return
        if model not in self.spec.catalog:
            return  # the app answers 404 in the OpenAI shape
        async with self.adapter_lock:
            if model not in self.rt.adapters:
                path = resolve_adapter_uri(self.spec.catalog[model])
                await self._make_room()
                await asyncio.to_thread(self.rt.load_adapter, model, path)
                self.loads += 1
            self.adapter_use[model] = None
            self.adapter_use.move_to_end(model)

    async def _make_room(self) -> None:
        cap = self.spec.max_loaded_adapters
        if cap is None:
            return
        from alora import AdapterBusyError

        for name in list(self.adapter_use):
            if len(self.rt.adapters) < cap:
                return
            with contextlib.suppress(AdapterBusyError, KeyError):
                await asyncio.to_thread(self.rt.unload_adapter, name)
                self.adapter_use.pop(name, None)

    async def handle(
        self, request: dict[str, Any], hint: dict[str, Any] | None = None
    ) -> AsyncIterator[Any]:
        """Stream one HTTP request's response: first `{"status", "headers", "replica"}`,
        then body chunks (bytes). `hint` is the router's and is not used here."""
        del hint
        model = _body_model(request["body"])
        if model is not None:
            try:
                await self.ensure_adapter(model)
            except Exception as e:  # an unreadable catalog entry: this request's error
                body = json.dumps(
                    {
                        "error": {
                            "message": f"loading adapter `{model}`: {e}",
                            "type": "InternalServerError",
                            "param": "model",
                            "code": 500,
                        }
                    }
                ).encode()
                yield {
                    "status": 500,
                    "headers": [("content-type", "application/json")],
                    "replica": self.actor_name,
                }
                yield body
                return
        disconnected = asyncio.Event()
        async for msg in asgi_call(self.app, request, disconnected):
            if msg["type"] == "http.response.start":
                headers = [(k.decode(), v.decode()) for k, v in msg.get("headers", [])]
                yield {"status": msg["status"], "headers": headers, "replica": self.actor_name}
            elif msg["type"] == "http.response.body" and msg.get("body"):
                yield bytes(msg["body"])

    def summary(self) -> dict[str, Any]:
        """The prefix summary and load this replica reports to routers."""
        stats = self.rt.stats()
        return {
            "replica": self.actor_name,
            "block_size": int(self.rt.block_size),
            "prefix": self.rt.cached_prefix_hashes(),
            "adapters": {name: info.kind for name, info in self.rt.adapters.items()},
            "running": int(stats.get("running", 0)),
            "waiting": int(stats.get("waiting", 0)),
            "used_blocks": int(stats.get("used_blocks", 0)),
            "steps": int(stats.get("steps", 0)),
            "adapter_loads": self.loads,
            "time": time.time(),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        # Ray Serve's hook: the controller pulls it every `request_routing_stats_period_s`
        # and broadcasts it to every handle's router as `replica.routing_stats`.
        return await asyncio.to_thread(self.summary)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.rt.detach()


def _body_model(body: bytes) -> str | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


# --------------------------------------------------------------------------- the router


class PrefixAffinityRouter(RequestRouter):
    """Ranks replicas for a request carrying a routing hint (`hint=` keyword: `tokens`,
    `model`): (1) among replicas within `max_imbalance` in-flight requests of the least
    loaded, the one(s) holding the most leading blocks of the request's tokens in their
    base KV cache, if that is at least `min_match_fraction` of the request's blocks;
    (2) within the bound, replicas with the adapter loaded; (3) everything, least loaded
    first. Ray then takes the least-queued replica of the first rank that
    accepts the request (under `max_ongoing_requests`), so a full replica falls through.

    "Holding" is the replica's last summary (`record_routing_stats`) or this router's own
    routing decisions of the last `recent_ttl_s` seconds, so a conversation's next turn
    sticks to its replica before the next summary shows its blocks."""

    def initialize_state(
        self,
        max_imbalance: int = 8,
        min_match_fraction: float = 0.5,
        recent_ttl_s: float = 30.0,
        max_recent: int = 1 << 16,
    ) -> None:
        self.max_imbalance = max_imbalance
        self.min_match_fraction = min_match_fraction
        self.recent_ttl_s = recent_ttl_s
        self.max_recent = max_recent
        # replica -> (summary time, frozenset of its cached block hashes)
        self._sets: dict[ReplicaID, tuple[float, frozenset[int]]] = {}
        # replica -> block hash -> when this router last sent it a request with that block
        self._recent: dict[ReplicaID, OrderedDict[int, float]] = {}
        self._sent = 0
        self._last_sent: dict[ReplicaID, int] = {}

    # -- state

    def _cached(self, r: RunningReplica) -> frozenset[int]:
        stats = r.routing_stats or {}
        stamp = float(stats.get("time", 0.0))
        have = self._sets.get(r.replica_id)
        if have is None or have[0] != stamp:
            have = (stamp, frozenset(stats.get("prefix", ())))
            self._sets[r.replica_id] = have
        return have[1]

    def _load(self, r: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(r.replica_id)
        if q is not None:
            return int(q)
        stats = r.routing_stats or {}
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0))

    @staticmethod
    def _hashes(hint: dict[str, Any], block_size: int) -> list[int]:
        memo = hint.setdefault("_hashes", {})
        if block_size not in memo:
            memo[block_size] = _core.base_prefix_hashes(hint["tokens"], block_size)
        return memo[block_size]

    @staticmethod
    def _block_size(r: RunningReplica | None, hint: dict[str, Any]) -> int:
        stats = (r.routing_stats if r is not None else None) or {}
        return int(stats.get("block_size", hint.get("block_size", 16)))

    def _matched(self, r: RunningReplica, hint: dict[str, Any], now: float) -> int:
        block_size = self._block_size(r, hint)
        cached = self._cached(r)
        recent = self._recent.get(r.replica_id, {})
        n = 0
        for h in self._hashes(hint, block_size):
            if h in cached:
                n += 1
                continue
            t = recent.get(h)
            if t is None or now - t > self.recent_ttl_s:
                break
            n += 1
        return n

    # -- Ray Serve hooks

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hint = _hint_of(pending_request)
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        # Ties in load go to the replica this router sent a request to least recently (Ray
        # takes the first least-queued replica of a rank), so new conversations spread
        # over idle replicas instead of piling onto one.
        by_load = sorted(
            candidate_replicas,
            key=lambda r: (loads[r.replica_id], self._last_sent.get(r.replica_id, -1)),
        )
        if hint is None:
            return [by_load]
        bound = loads[by_load[0].replica_id] + self.max_imbalance
        within = [r for r in by_load if loads[r.replica_id] <= bound]
        ranks: list[list[RunningReplica]] = []
        model = hint.get("model")
        kinds = [(r.routing_stats or {}).get("adapters", {}) for r in within]
        is_lora = any(k.get(model) == "lora" for k in kinds)  # no base KV to reuse
        if hint.get("tokens") and not is_lora:
            now = time.monotonic()
            matched = {r.replica_id: self._matched(r, hint, now) for r in within}
            best = max(matched.values())
            # A match must cover a real share of the prompt: a system prompt every
            # conversation shares would otherwise herd all new conversations onto the
            # first replica that cached it (measured with SmolLM2's default one).
            blocks = len(self._hashes(hint, self._block_size(within[0], hint)))
            if best > 0 and best >= self.min_match_fraction * blocks:
                ranks.append([r for r in within if matched[r.replica_id] == best])
        with_adapter = [
            r for r, k in zip(within, kinds, strict=True) if model is not None and model in k
        ]
        if with_adapter:
            ranks.append(with_adapter)
        ranks.append(by_load)
        return ranks

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self._sent += 1
        self._last_sent[replica_id] = self._sent
        hint = _hint_of(pending_request)
        if hint is None or not hint.get("tokens"):
            return
        block_size = self._block_size(self._replicas.get(replica_id), hint)
        recent = self._recent.setdefault(replica_id, OrderedDict())
        now = time.monotonic()
        for h in self._hashes(hint, block_size):
            recent[h] = now
            recent.move_to_end(h)
        while len(recent) > self.max_recent:
            recent.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for d in (self._recent, self._sets, self._last_sent):
            d.pop(replica_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        for d in (self._recent, self._sets, self._last_sent):
            for rid in [rid for rid in d if rid not in alive]:
                d.pop(rid)


def _hint_of(pending_request: PendingRequest | None) -> dict[str, Any] | None:
    if pending_request is None:
        return None
    hint = pending_request.kwargs.get("hint")
    return hint if isinstance(hint, dict) else None


# --------------------------------------------------------------------------- the ingress

api = FastAPI(title="aLoRA Runtime (scale-out)", docs_url=None, redoc_url=None)


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": "ServiceUnavailableError" if status == 503 else "InternalServerError",
            "param": None,
            "code": status,
        }
    }
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def _is_stream(start: dict[str, Any]) -> bool:
    return any(k == "content-type" and "event-stream" in v for k, v in start["headers"])


def _headers(start: dict[str, Any], attempts: int) -> dict[str, str]:
    skip = {"content-length", "transfer-encoding", "connection"}
    out = {k: v for k, v in start["headers"] if k.lower() not in skip}
    out[REPLICA_HEADER] = start["replica"]
    out[ATTEMPTS_HEADER] = str(attempts)
    return out


async def _relay(gen: Any, ingress: Any, retry_after_s: int) -> AsyncIterator[bytes]:
    try:
        async for chunk in gen:
            yield chunk
    except _REPLICA_LOST:
        ingress.failed += 1
        err = {
            "error": {
                "message": "the replica serving this stream was lost; retry the request",
                "type": "ServiceUnavailableError",
                "param": None,
                "code": 503,
            }
        }
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        gen.cancel()


@serve.ingress(api)
class Ingress:
    """The OpenAI API in front of the engine replicas: tokenizes for the routing hint,
    forwards the request unchanged, retries where the client has seen nothing yet."""

    def __init__(self, engine: DeploymentHandle, spec: EngineSpec, config: ScaleoutConfig) -> None:
        self.engine = engine
        self.spec = spec
        self.config = config
        self.base_name = spec.base_name()
        tok = spec.tokenizer()
        self.tok_state = SimpleNamespace(tokenizer=tok, vocab=len(tok) if tok else None)
        self.block_size = int(spec.runtime_kwargs.get("block_size", 16))
        self.api_key = spec.args().api_key or None
        self.retried = 0
        self.failed = 0

    def _hint(self, path: str, body: bytes) -> dict[str, Any] | None:
        """Routing hint: the prompt's token ids as the replica's app will see them. A body
        the app would refuse gets no hint (the replica answers with the app's error)."""
        from alora.serving import protocol as P
        from alora.serving.app import _tokenize_chat, _tokenize_prompts

        try:
            data = json.loads(body)
            if path.endswith("/chat/completions"):
                req = P.ChatCompletionRequest.model_validate(data)
                tokens = _tokenize_chat(self.tok_state, req)  # type: ignore[arg-type]
            else:
                creq = P.CompletionRequest.model_validate(data)
                tokens = _tokenize_prompts(self.tok_state, creq)[0]  # type: ignore[arg-type]
            return {"model": data.get("model"), "tokens": tokens, "block_size": self.block_size}
        except Exception:
            return None

    def _refused(self, request: Request) -> JSONResponse | None:
        """The replicas check the key too; checking here keeps the ingress's own endpoints
        closed and spares routing work for requests that would be refused anyway."""
        from alora.serving.security import bearer_token, key_matches

        if self.api_key is None:
            return None
        if key_matches(bearer_token(request.headers.get("authorization")), self.api_key):
            return None
        body = {"error": {"message": "invalid or missing API key", "param": None,
                          "type": "AuthenticationError", "code": 401}}  # fmt: skip
        return JSONResponse(body, status_code=401)

    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        if refused := self._refused(request):
            return refused
        cards = [
            {
                "id": self.base_name,
                "object": "model",
                "owned_by": "alora",
                "root": self.base_name,
                "parent": None,
            }
        ]
        for name in sorted(self.spec.catalog):
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "alora",
                    "root": name,
                    "parent": self.base_name,
                }
            )
        return JSONResponse({"object": "list", "data": cards})

    @api.get("/v1/scaleout/stats")
    async def stats(self, request: Request) -> JSONResponse:
        if refused := self._refused(request):
            return refused
        return JSONResponse({"retried": self.retried, "failed": self.failed})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._forward(request)

    async def _forward(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        body = await request.body()
        path = request.url.path
        forwarded = {
            "method": request.method,
            "path": path,
            "query": request.url.query,
            "headers": [(k, v) for k, v in request.headers.items() if k != "host"],
            "body": body,
        }
        hint = self._hint(path, body)
        lost: BaseException | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            gen = self.engine.options(stream=True).handle.remote(forwarded, hint=hint)
            try:
                start = await gen.__anext__()
                if _is_stream(start):
                    # Headers go out now: from here on a lost replica cuts the stream.
                    return StreamingResponse(
                        _relay(gen, self, self.config.retry_after_s),
                        status_code=start["status"],
                        headers=_headers(start, attempt),
                    )
                chunks = [chunk async for chunk in gen]
            except _REPLICA_LOST as e:
                # Nothing has reached the client: the request can run again elsewhere
                # (the dead replica's copy died with it).
                lost = e
                gen.cancel()
                self.retried += 1
                log.warning("replica lost (attempt %d): %s", attempt, type(e).__name__)
                continue
            except BaseException:
                gen.cancel()  # the client left (cancellation): abort on the replica
                raise
            return Response(
                b"".join(chunks), status_code=start["status"], headers=_headers(start, attempt)
            )
        self.failed += 1
        return _error(
            503,
            f"no replica could serve the request ({type(lost).__name__}); retry",
            self.config.retry_after_s,
        )


# --------------------------------------------------------------------------- building


def build_app(spec: EngineSpec, config: ScaleoutConfig | None = None) -> Any:
    """The Ray Serve application: the engine deployment (N replicas) and the ingress."""
    config = config or ScaleoutConfig()
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "num_replicas": config.replicas,
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "ray_actor_options": {
            "num_cpus": config.cpus_per_replica,
            "num_gpus": config.gpus_per_replica,
        },
    }
    if config.router == "affinity":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={
                "max_imbalance": config.max_imbalance,
                "min_match_fraction": config.min_match_fraction,
                "recent_ttl_s": config.recent_ttl_s,
            },
            request_routing_stats_period_s=config.summary_period_s,
        )
    elif config.router != "default":
        raise ValueError(f"router must be 'affinity' or 'default', not {config.router!r}")
    else:
        # Ray's router ignores the summaries; pull them rarely so the comparison is fair.
        options["request_router_config"] = RequestRouterConfig(
            request_routing_stats_period_s=max(config.summary_period_s, 10.0)
        )
    engine = serve.deployment(EngineReplica, **options).bind(spec)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engine, spec, config)


# --------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    from alora.serving import cli

    p = argparse.ArgumentParser(
        prog="python -m alora.serving.scaleout",
        description="Serve N engine replicas on Ray Serve behind one OpenAI-compatible "
        "ingress (all `alora serve` arguments apply to every replica; --adapter entries "
        "form the catalog and load on demand per replica).",
    )
    cli.add_arguments(p)
    r = p.add_argument_group("scale-out")
    r.add_argument("--replicas", type=int, default=2)
    r.add_argument("--router", choices=("affinity", "default"), default="affinity")
    r.add_argument("--cpus-per-replica", type=float, default=1.0)
    r.add_argument("--gpus-per-replica", type=float, default=0.0)
    r.add_argument("--max-loaded-adapters", type=int, default=None)
    r.add_argument("--summary-period", type=float, default=0.5, help="seconds")
    r.add_argument("--max-imbalance", type=int, default=8)
    r.add_argument("--ray-address", default=None, help="join a running cluster (default: local)")
    return p


def spec_from_args(args: argparse.Namespace, argv: Sequence[str]) -> EngineSpec:
    """The spec of the `alora serve` part of `argv`: --adapter moves into the catalog."""
    own = {
        "--replicas",
        "--router",
        "--cpus-per-replica",
        "--gpus-per-replica",
        "--max-loaded-adapters",
        "--summary-period",
        "--max-imbalance",
        "--ray-address",
        "--adapter",
        "--host",
        "--port",
    }
    serve_argv: list[str] = []
    it = iter(argv)
    for a in it:
        key = a.split("=", 1)[0]
        if key in own:
            if "=" not in a:
                next(it, None)
            continue
        serve_argv.append(a)
    return EngineSpec(
        argv=serve_argv,
        catalog=dict(args.adapter),
        max_loaded_adapters=args.max_loaded_adapters,
        threads=args.threads or 1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    spec = spec_from_args(args, argv)
    config = ScaleoutConfig(
        replicas=args.replicas,
        router=args.router,
        summary_period_s=args.summary_period,
        max_imbalance=args.max_imbalance,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(spec, config), name="alora", route_prefix="/")
    log.info("serving %d replicas on http://%s:%d/v1", args.replicas, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    # Through the importable module, so Ray pickles the deployments by reference, not as
    # `__main__` classes.
    from alora.serving.scaleout import main as _main

    sys.exit(_main())
