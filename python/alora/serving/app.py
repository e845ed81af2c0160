"""The OpenAI/vLLM-compatible HTTP API over an `AdapterRuntime`, as a FastAPI app.

Generation goes through `rt.stream_async` only: the runtime's engine thread steps the model
and each handler reads its own deltas. The handlers own everything HTTP-shaped: tokenizing
(so they can check lengths and report usage), incremental detokenization, stop strings
(matched on text, then `rt.abort`), logprob formatting, structured-output processors,
admission, errors and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alora.serving import protocol as P
from alora.serving.detokenize import IncrementalDetokenizer, StopStrings
from alora.serving.metrics import Metrics
from alora.serving.security import PathNotAllowedError, bearer_token, confine, key_matches
from alora.serving.structured import GrammarCompiler, GrammarError, LogitBias

log = logging.getLogger("alora.serve")


@dataclass
class ServerConfig:
    model_name: str = "base"  # the `model` that selects the base model
    aliases: tuple[str, ...] = ()  # other names accepted for the base model (e.g. its path)
    api_key: str | None = None
    max_pending: int = 256  # sequences admitted at once; more get 503 + Retry-After
    retry_after_s: int = 1
    allow_adapter_loading: bool = False
    adapter_root: str | None = None
    max_body_bytes: int = 4 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = P.ErrorResponse(
        error=P.ErrorInfo(
            message=message, type=_ERROR_TYPES.get(status, "Error"), param=param, code=status
        )
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _map_exception(exc: BaseException) -> ApiError:
    """Runtime and validation exceptions to HTTP errors (see the README's error table)."""
    import alora

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GrammarError):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, PathNotAllowedError):
        return ApiError(400, str(exc), "lora_path")
    if isinstance(exc, alora.UnknownAdapterError):
        return ApiError(404, str(exc), "model")
    if isinstance(exc, alora.AdapterBusyError):
        return ApiError(409, str(exc), "lora_name")
    if isinstance(exc, alora.CapacityError):
        return ApiError(400, str(exc), None)
    if isinstance(exc, (alora.AloraError, ValueError, TypeError)):
        return ApiError(400, str(exc), None)
    log.exception("internal error", exc_info=exc)
    return ApiError(500, "internal server error")


class _BodyLimit:
    """Refuse bodies over the limit with 413, by Content-Length and while streaming in
    (a chunked upload has no Content-Length)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await _send_error(send, scope, 413, "request body too large")
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # FastAPI passes an HTTPException from body reading through as is.
                    raise HTTPException(413, "request body too large")
            return msg

        await self.app(scope, limited, send)


class _ApiKey:
    """Every path but /health needs `Authorization: Bearer <key>` (constant-time check)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            auth = None
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    auth = v.decode("latin-1")
            if not key_matches(bearer_token(auth), self.key):
                await _send_error(send, scope, 401, "invalid or missing API key")
                return
        await self.app(scope, receive, send)


async def _send_error(send: Send, scope: Scope, status: int, message: str) -> None:
    resp = error_response(status, message)
    await resp(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# --------------------------------------------------------------------------- generation


@dataclass
class _Choice:
    """One sequence's text state: detokenizer, stop strings, logprobs, usage."""

    index: int
    detok: IncrementalDetokenizer
    stops: StopStrings
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    done: bool = False  # finished for the client (a stop string may precede the engine)
    last_t: float | None = None
    request_id: int | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class _Event:
    """What the handlers turn into a response chunk: new text of one choice."""

    choice: _Choice
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    finished: bool


@dataclass
class _Job:
    """One HTTP request's generation: its sequences, sampling arguments and results."""

    model: str
    adapter: str | None
    prompts: list[list[int]]  # one per sequence (a prompt repeated n times for n > 1)
    prompt_of: list[int]  # prompt index of each sequence (usage counts a prompt once)
    kwargs: dict[str, Any]
    processors: list[list[Any]] | None  # per sequence, or None
    stop_ids: set[int]
    choices: list[_Choice]
    as_ids: bool = False  # logprob tokens as "token_id:<id>"
    t0: float = field(default_factory=time.perf_counter)
    results: dict[int, Any] = field(default_factory=dict)
    first_token: bool = False

    def usage(self) -> P.Usage:
        prompt = cached = 0
        counted: set[int] = set()
        for seq, p in enumerate(self.prompt_of):
            if p in counted:
                continue
            counted.add(p)
            prompt += len(self.prompts[seq])
            res = self.results.get(seq)
            cached += int(getattr(res, "cached_tokens", 0) or 0)
        completion = sum(c.tokens for c in self.choices)
        return P.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached),
        )


class _State:
    def __init__(self, rt: Any, config: ServerConfig) -> None:
        self.rt = rt
        self.config = config
        self.tokenizer = rt.tokenizer
        self.in_flight = 0
        self.metrics = Metrics(rt.stats, lambda: self.in_flight)
        self.compiler = GrammarCompiler(self.tokenizer) if self.tokenizer is not None else None
        self.max_model_len = int(getattr(rt, "max_model_len", 0) or 1 << 20)
        self.eos_ids = _eos_ids(rt)
        self.vocab = _vocab_size(rt)
        self.adapter_lock = asyncio.Lock()

    def adapters(self) -> dict[str, Any]:
        a = self.rt.adapters
        return dict(a() if callable(a) else a)

    def resolve_model(self, name: str) -> str | None:
        if name == self.config.model_name or name in self.config.aliases:
            return None
        if name in self.adapters():
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", "model")

    @functools.lru_cache(maxsize=1 << 18)  # noqa: B019 - one State per app, vocab-bounded
    def token_str(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def token_name(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.token_str(token_id)

    def admit(self, seqs: int) -> None:
        """Bounded admission: more sequences than `max_pending` in flight get a 503."""
        if self.in_flight + seqs > self.config.max_pending:
            self.metrics.rejected.inc()
            raise ApiError(503, "server is at capacity; retry shortly")
        self.in_flight += seqs

    def release(self, seqs: int) -> None:
        self.in_flight -= seqs


def _eos_ids(rt: Any) -> list[int]:
    ids: list[int] = []
    model = getattr(rt, "model", None)
    for source in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(rt.tokenizer, "eos_token_id", None) if rt.tokenizer is not None else None,
    ):
        for t in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids


def _vocab_size(rt: Any) -> int | None:
    geo = getattr(rt, "geometry", None)
    if geo is not None and getattr(geo, "vocab_size", None):
        return int(geo.vocab_size)
    return len(rt.tokenizer) if rt.tokenizer is not None else None


_DONE = object()


class _Merge:
    """Interleaves `stream_async` iterators, which may be added while it runs. Leaving
    early (or being cancelled) closes all of them, which aborts their requests."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Future[None]] = []
        self._live = 0

    def add(self, k: int, it: AsyncIterator[Any]) -> None:
        self._live += 1
        self._tasks.append(asyncio.ensure_future(self._pump(k, it)))

    async def _pump(self, k: int, it: AsyncIterator[Any]) -> None:
        try:
            async for d in it:
                self._queue.put_nowait((k, d))
        except Exception as e:
            self._queue.put_nowait((k, e))
        finally:
            await _aclose(it)
            self._queue.put_nowait((k, _DONE))

    async def items(self) -> AsyncIterator[tuple[int, Any]]:
        try:
            while self._live:
                k, item = await self._queue.get()
                if item is _DONE:
                    self._live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield k, item
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _aclose(it: AsyncIterator[Any]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


class Generator:
    """Runs one job through `stream_async` and yields text events per choice.

    With n > 1 the first sequence of each prompt goes first and the other n - 1 follow
    once it has its first token: by then the prompt's blocks are in the prefix cache, so
    the followers compute only the prompt's last partial block (sequences submitted
    together would each prefill the whole prompt). A grammar matcher is per request, so
    constrained sequences are submitted one per `stream_async` call."""

    def __init__(self, state: _State, job: _Job) -> None:
        self.state = state
        self.job = job

    def _submit(self, seqs: list[int]) -> list[tuple[AsyncIterator[Any], list[int]]]:
        """Start `stream_async` for these sequences. Sequence s always samples with seed
        `seed + s`, as if all had been submitted in one call."""
        job, rt = self.job, self.state.rt
        seed = job.kwargs.get("seed")
        if job.processors is None and (seed is None or seqs == list(range(len(seqs)))):
            prompts = [job.prompts[s] for s in seqs]
            return [(rt.stream_async(prompts, job.adapter, **job.kwargs), seqs)]
        out = []
        for s in seqs:
            kw = dict(job.kwargs)
            if seed is not None:
                kw["seed"] = seed + s
            if job.processors is not None:
                kw["logits_processors"] = job.processors[s]
            out.append((rt.stream_async([job.prompts[s]], job.adapter, **kw), [s]))
        return out

    async def _deltas(self) -> AsyncIterator[tuple[int, Any]]:
        """(sequence index, delta) for every sequence of the job."""
        job = self.job
        leaders = sorted({job.prompt_of.index(p) for p in set(job.prompt_of)})
        followers = [s for s in range(len(job.prompts)) if s not in set(leaders)]
        first = self._submit(leaders)
        if not followers and len(first) == 1:
            it, seqs = first[0]
            try:
                async for d in it:
                    yield seqs[d.index], d
            finally:
                await _aclose(it)
            return
        merge = _Merge()
        streams: list[list[int]] = []
        for it, seqs in first:
            merge.add(len(streams), it)
            streams.append(seqs)
        waiting = set(leaders)
        async for k, d in merge.items():
            seq = streams[k][d.index]
            if waiting and (d.token_id is not None or d.finished):
                waiting.discard(seq)
                if not waiting and followers:
                    for it, seqs in self._submit(followers):
                        merge.add(len(streams), it)
                        streams.append(seqs)
            yield seq, d

    async def events(self) -> AsyncIterator[_Event]:
        job, st = self.job, self.state
        model = job.model
        async for seq, delta in self._deltas():
            c = job.choices[seq]
            c.request_id = delta.request_id
            if delta.finished and delta.result is not None:
                job.results[seq] = delta.result
            if c.done:
                continue
            now = time.perf_counter()
            text = ""
            lps: list[tuple[int, float, list[tuple[int, float]]]] = []
            tid = delta.token_id
            is_stop_token = delta.finished and delta.finish_reason == "stop" and tid in job.stop_ids
            if tid is not None:
                c.tokens += 1
                if not job.first_token:
                    job.first_token = True
                    st.metrics.ttft.labels(model).observe(now - job.t0)
                if c.last_t is not None:
                    st.metrics.itl.observe(now - c.last_t)
                c.last_t = now
                if is_stop_token:
                    c.stop_reason = tid if tid not in st.eos_ids else None
                else:
                    text = c.stops.push(c.detok.push(tid))
                    if delta.logprob is not None:
                        top = list(delta.top_logprobs or [])
                        lps.append((tid, float(delta.logprob), top))
            if c.stops.hit is not None:
                c.done = True
                c.finish_reason = "stop"
                c.stop_reason = c.stops.hit
                with contextlib.suppress(Exception):  # it may have finished meanwhile
                    st.rt.abort(delta.request_id)
            elif delta.finished:
                c.done = True
                text += c.stops.push(c.detok.flush())
                if c.stops.hit is not None:
                    c.stop_reason = c.stops.hit
                    c.finish_reason = "stop"
                else:
                    text += c.stops.flush()
                    c.finish_reason = delta.finish_reason
                err = getattr(delta.result, "error", None)
                if err is not None:
                    raise ApiError(500, f"generation failed: {err}")
            c.text += text
            c.logprobs.extend(lps)
            if text or lps or c.done:
                yield _Event(c, text, lps, c.done)


# --------------------------------------------------------------------------- the app


def create_app(rt: Any, config: ServerConfig | None = None, *, own_runtime: bool = True) -> FastAPI:
    """The server's ASGI app over a started `AdapterRuntime`, closed when the app stops if
    `own_runtime`."""
    config = config or ServerConfig()
    state = _State(rt, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Uvicorn has stopped accepting and waited for (or cancelled, which aborts) the
        # in-flight requests; now stop the engine.
        close = getattr(rt, "close", None) or getattr(rt, "detach", None)
        if own_runtime and close is not None:
            with contextlib.suppress(Exception):
                close()

    app = FastAPI(title="aLoRA Runtime", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.alora = state
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(_ApiKey, key=config.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(config.retry_after_s)} if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        state.metrics.requests.labels("_invalid", "400").inc()
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON")
        msg = str(first.get("msg", "invalid request"))
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        # In a thread: the engine's counters are read under the runtime's lock.
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        cards = [
            P.ModelCard(
                id=config.model_name, root=config.model_name, max_model_len=state.max_model_len
            )
        ]
        for name in sorted(state.adapters()):
            cards.append(P.ModelCard(id=name, root=name, parent=config.model_name))
        return P.ModelList(data=cards)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        return await _handle(state, req, request, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await _handle(state, req, request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(req: P.LoadAdapterRequest) -> Response:
        if not config.allow_adapter_loading or not config.adapter_root:
            raise ApiError(
                403,
                "adapter loading is disabled (start the server with "
                "--allow-adapter-loading --adapter-root DIR)",
            )
        if req.lora_name == config.model_name or req.lora_name in config.aliases:
            raise ApiError(400, "lora_name is the base model's name", "lora_name")
        try:
            path = confine(config.adapter_root, req.lora_path)
        except PathNotAllowedError as e:
            raise _map_exception(e) from e
        async with state.adapter_lock:
            if req.lora_name in state.adapters():
                raise ApiError(400, f"adapter `{req.lora_name}` is already loaded", "lora_name")
            try:
                await asyncio.to_thread(rt.load_adapter, req.lora_name, str(path))
            except Exception as e:
                raise _map_exception(e) from e
        return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(req: P.UnloadAdapterRequest) -> Response:
        if not config.allow_adapter_loading:
            raise ApiError(403, "adapter loading is disabled (--allow-adapter-loading)")
        async with state.adapter_lock:
            if req.lora_name not in state.adapters():
                raise ApiError(404, f"adapter `{req.lora_name}` is not loaded", "lora_name")
            try:
                await asyncio.to_thread(rt.unload_adapter, req.lora_name)
            except Exception as e:
                raise _map_exception(e) from e
        return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return app


# --------------------------------------------------------------------------- handlers


def _text_of(content: Any) -> Any:
    """OpenAI content parts to the plain string chat templates expect."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ApiError(400, "only text content parts are supported", "messages")
        return "".join(parts)
    return content


def _tokenize_chat(state: _State, req: P.ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ApiError(400, "the model's tokenizer has no chat template", "messages")
    messages = [{**m, "content": _text_of(m.get("content"))} for m in req.messages]
    try:
        text = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja errors: a template that refuses these messages
        raise ApiError(400, f"chat template failed: {e}", "messages") from e
    return list(tok(text, add_special_tokens=req.add_special_tokens)["input_ids"])


def _tokenize_prompts(state: _State, req: P.CompletionRequest) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be empty", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if state.tokenizer is None:
                raise ApiError(400, "string prompts need a tokenizer; send token ids", "prompt")
            ids = list(state.tokenizer(p, add_special_tokens=req.add_special_tokens)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ApiError(400, "prompt must not be empty", "prompt")
        if state.vocab is not None and any(t < 0 or t >= state.vocab for t in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {state.vocab})", "prompt")
        out.append(ids)
    return out


def _max_new(state: _State, prompts: list[list[int]], requested: int | None, param: str) -> int:
    longest = max(len(p) for p in prompts)
    room = state.max_model_len - longest
    if room <= 0:
        raise ApiError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens; the prompt "
            f"has {longest}.",
            "messages" if param == "max_completion_tokens" else "prompt",
        )
    if requested is None:
        return room
    if requested > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens. However, "
            f"you requested {longest + requested} tokens ({longest} in the prompt, "
            f"{requested} for the completion). Reduce the prompt or {param}.",
            param,
        )
    return requested


def _processors(
    state: _State, req: P._SamplingRequest, seqs: int, grammar: str | None
) -> list[list[Any]] | None:
    bias: LogitBias | None = None
    if req.logit_bias:
        parsed: dict[int, float] = {}
        for k, v in req.logit_bias.items():
            try:
                t = int(k)
            except ValueError:
                raise ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None
            if state.vocab is not None and not 0 <= t < state.vocab:
                raise ApiError(400, f"logit_bias token {t} is outside the vocabulary", "logit_bias")
            if not -100 <= v <= 100:
                raise ApiError(400, "logit_bias values must lie in [-100, 100]", "logit_bias")
            parsed[t] = float(v)
        bias = LogitBias(parsed)
    if grammar is None and bias is None:
        return None
    out: list[list[Any]] = []
    for _ in range(seqs):
        procs: list[Any] = [bias] if bias is not None else []
        if grammar is not None:
            assert state.compiler is not None
            procs.append(state.compiler.processor(grammar))
        out.append(procs)
    if grammar is None:
        return None if bias is None else out
    return out


async def _build_job(
    state: _State, req: P.CompletionRequest | P.ChatCompletionRequest, chat: bool
) -> _Job:
    adapter = state.resolve_model(req.model)
    if chat:
        assert isinstance(req, P.ChatCompletionRequest)
        prompts = [_tokenize_chat(state, req)]
        requested, param = req.max_new, "max_completion_tokens"
        k = (req.top_logprobs or 0) if req.logprobs else None
    else:
        assert isinstance(req, P.CompletionRequest)
        prompts = _tokenize_prompts(state, req)
        requested, param = req.max_tokens, "max_tokens"
        if requested is None:
            requested = 16  # the OpenAI completions default
        k = req.logprobs
    max_new = _max_new(state, prompts, requested, param)
    seq_prompts = [p for p in prompts for _ in range(req.n)]
    prompt_of = [i for i in range(len(prompts)) for _ in range(req.n)]
    spec = req.structured()
    grammar = None
    if spec is not None:
        if state.compiler is None:
            raise ApiError(400, "structured output needs a tokenizer", "structured_outputs")
        grammar = await asyncio.to_thread(state.compiler.grammar, spec)
    processors = _processors(state, req, len(seq_prompts), grammar)
    stop_ids = set(req.stop_token_ids or [])
    if req.ignore_eos and grammar is None:
        stop_token_ids: list[int] | None = sorted(stop_ids)
    elif stop_ids:
        stop_token_ids = sorted(stop_ids | set(state.eos_ids))
    else:
        stop_token_ids = None  # the runtime's EOS ids
    stop_ids |= set(state.eos_ids) if not req.ignore_eos or grammar is not None else set()
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=req.seed,
        stop_token_ids=stop_token_ids,
    )
    if k is not None:
        kwargs["logprobs"] = k
    if processors is not None and grammar is None:
        # Stateless (logit_bias only): one processor list serves every sequence.
        kwargs["logits_processors"] = processors[0]
        processors = None
    choices = [
        _Choice(
            index=i,
            detok=IncrementalDetokenizer(
                state.tokenizer, skip_special_tokens=req.skip_special_tokens
            ),
            stops=StopStrings(req.stop_list, include=req.include_stop_str_in_output),
        )
        for i in range(len(seq_prompts))
    ]
    return _Job(
        model=req.model,
        adapter=adapter,
        prompts=seq_prompts,
        prompt_of=prompt_of,
        kwargs=kwargs,
        processors=processors,
        stop_ids=stop_ids,
        choices=choices,
        as_ids=req.return_tokens_as_token_ids,
    )


_Logprobs = Sequence[tuple[int, float, list[tuple[int, float]]]]


def _finite(v: float) -> float:
    """-inf (a token masked by a grammar) as vLLM reports it: JSON has no infinities."""
    return v if v > -9999.0 else -9999.0


def _chat_logprobs(state: _State, lps: _Logprobs, as_ids: bool) -> P.ChatLogprobs:
    def top(t: int, v: float) -> P.TopLogprob:
        s = state.token_name(t, as_ids)
        return P.TopLogprob(token=s, logprob=_finite(v), bytes=list(s.encode()))

    content = []
    for tid, lp, tops in lps:
        s = state.token_name(tid, as_ids)
        content.append(
            P.TokenLogprob(
                token=s,
                logprob=_finite(lp),
                bytes=list(s.encode()),
                top_logprobs=[top(t, v) for t, v in tops],
            )
        )
    return P.ChatLogprobs(content=content)


def _completion_logprobs(
    state: _State, lps: _Logprobs, offset: int, as_ids: bool
) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for tid, lp, top in lps:
        s = state.token_name(tid, as_ids)
        out.tokens.append(s)
        out.token_logprobs.append(_finite(lp))
        tops = {state.token_name(t, as_ids): _finite(v) for t, v in top}
        tops.setdefault(s, _finite(lp))  # like OpenAI: the sampled token is always listed
        out.top_logprobs.append(tops)
        out.text_offset.append(offset)
        offset += len(s)
    return out


def _record(state: _State, job: _Job, status: str) -> None:
    m = state.metrics
    m.requests.labels(job.model, status).inc()
    if status != "ok":
        return
    usage = job.usage()
    m.prompt_tokens.labels(job.model).inc(usage.prompt_tokens)
    m.cached_tokens.labels(job.model).inc(
        usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    )
    m.generation_tokens.labels(job.model).inc(usage.completion_tokens)
    m.e2e.labels(job.model).observe(time.perf_counter() - job.t0)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _handle(
    state: _State,
    req: P.CompletionRequest | P.ChatCompletionRequest,
    request: Request,
    *,
    chat: bool,
) -> Response:
    model = req.model
    t0 = time.perf_counter()
    try:
        job = await _build_job(state, req, chat)
        job.t0 = t0  # latency metrics count tokenization too
    except ValueError as e:  # a pydantic-level check raised after parsing (structured())
        state.metrics.requests.labels("_invalid", "400").inc()
        raise _map_exception(e) from e
    except ApiError as e:
        label = model if e.status != 404 else "_unknown"
        state.metrics.requests.labels(label, str(e.status)).inc()
        raise
    seqs = len(job.prompts)
    try:
        state.admit(seqs)
    except ApiError:
        state.metrics.requests.labels(model, "503").inc()
        raise
    gen = Generator(state, job).events()
    try:
        # The first event is awaited before answering, so a request the runtime refuses
        # is an HTTP error, not a broken stream; a client leaving meanwhile cancels it.
        first = await _race_disconnect(request, anext(gen, None))
    except BaseException as e:
        state.release(seqs)
        await gen.aclose()
        if isinstance(e, _Disconnected):
            state.metrics.requests.labels(model, "499").inc()
            return Response(status_code=499)
        err = _map_exception(e) if isinstance(e, Exception) else None
        if err is None:
            raise
        state.metrics.requests.labels(model, str(err.status)).inc()
        raise err from e
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _sse(state, job, gen, first, chat, include_usage)
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:

        async def rest() -> None:
            async for _ in gen:
                pass

        await _race_disconnect(request, rest())
    except _Disconnected:
        state.metrics.requests.labels(model, "499").inc()
        return Response(status_code=499)
    except Exception as e:
        err = _map_exception(e)
        state.metrics.requests.labels(model, str(err.status)).inc()
        raise err from e
    finally:
        await gen.aclose()
        state.release(seqs)
    _record(state, job, "ok")
    return JSONResponse(_final_body(state, job, chat).model_dump())


class _Disconnected(Exception):
    pass


async def _race_disconnect(request: Request, aw: Any) -> Any:
    """Await `aw` unless the client disconnects first (then cancel it: that aborts)."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _Disconnected
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


def _final_body(
    state: _State, job: _Job, chat: bool
) -> P.ChatCompletionResponse | P.CompletionResponse:
    usage = job.usage()
    if chat:
        return P.ChatCompletionResponse(
            id=P.random_id("chatcmpl"),
            model=job.model,
            choices=[
                P.ChatChoice(
                    index=c.index,
                    message=P.ChatMessage(content=c.text),
                    logprobs=_chat_logprobs(state, c.logprobs, job.as_ids)
                    if "logprobs" in job.kwargs
                    else None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in job.choices
            ],
            usage=usage,
        )
    return P.CompletionResponse(
        id=P.random_id("cmpl"),
        model=job.model,
        choices=[
            P.CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=_completion_logprobs(state, c.logprobs, 0, job.as_ids)
                if "logprobs" in job.kwargs
                else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in job.choices
        ],
        usage=usage,
    )


async def _sse(
    state: _State,
    job: _Job,
    gen: AsyncIterator[_Event],
    first: _Event | None,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    rid = P.random_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    exclude = None if include_usage else {"usage"}
    want_lp = "logprobs" in job.kwargs
    offsets = [0] * len(job.choices)

    def chunk(ev: _Event) -> str:
        c = ev.choice
        if chat:
            body: Any = P.ChatCompletionChunk(
                id=rid,
                created=created,
                model=job.model,
                choices=[
                    P.ChatChunkChoice(
                        index=c.index,
                        delta=P.DeltaMessage(content=ev.text) if ev.text else P.DeltaMessage(),
                        logprobs=_chat_logprobs(state, ev.logprobs, job.as_ids)
                        if want_lp
                        else None,
                        finish_reason=c.finish_reason if ev.finished else None,
                        stop_reason=c.stop_reason if ev.finished else None,
                    )
                ],
            )
        else:
            lp = None
            if want_lp:
                lp = _completion_logprobs(state, ev.logprobs, offsets[c.index], job.as_ids)
                offsets[c.index] += sum(len(t) for t in lp.tokens)
            body = P.CompletionResponse(
                id=rid,
                created=created,
                model=job.model,
                choices=[
                    P.CompletionChoice(
                        index=c.index,
                        text=ev.text,
                        logprobs=lp,
                        finish_reason=c.finish_reason if ev.finished else None,
                        stop_reason=c.stop_reason if ev.finished else None,
                    )
                ],
            )
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

    status = "ok"
    try:
        if chat:
            for c in job.choices:
                role = P.ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=job.model,
                    choices=[
                        P.ChatChunkChoice(
                            index=c.index, delta=P.DeltaMessage(role="assistant", content="")
                        )
                    ],
                )
                yield f"data: {role.model_dump_json(exclude=exclude)}\n\n"
        if first is not None:
            yield chunk(first)
        async for ev in gen:
            yield chunk(ev)
        if include_usage:
            usage_chunk: Any = (
                P.ChatCompletionChunk(
                    id=rid, created=created, model=job.model, choices=[], usage=job.usage()
                )
                if chat
                else P.CompletionResponse(
                    id=rid, created=created, model=job.model, choices=[], usage=job.usage()
                )
            )
            yield f"data: {usage_chunk.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        status = "499"  # the client went away; closing `gen` aborts the requests
        raise
    except Exception as e:
        err = _map_exception(e)
        status = str(err.status)
        body = P.ErrorResponse(
            error=P.ErrorInfo(
                message=err.message,
                type=_ERROR_TYPES.get(err.status, "Error"),
                param=err.param,
                code=err.status,
            )
        )
        yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
        state.release(len(job.prompts))
        _record(state, job, status)
