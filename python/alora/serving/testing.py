"""Helpers for testing the server: a real uvicorn server in a thread on a free 127.0.0.1
port, a byte-level BPE tokenizer built offline, and a fake runtime with the serving
surface of `AdapterRuntime` (deterministic pseudo-logits, no model) for fast tests of the
HTTP layer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` under uvicorn on a free port of `host`; yields the base URL. The socket is
    bound here and handed to uvicorn, so no other process can take the port in between."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def byte_tokenizer(vocab_size: int = 320, corpus: Sequence[str] | None = None) -> Any:
    """A GPT-2-style byte-level BPE fast tokenizer trained here on a small corpus (nothing
    is downloaded): every byte is a token, so it can spell JSON and any UTF-8 text, and
    characters outside the corpus split into several byte tokens. Ids 0/1/2 are
    pad/bos/eos like `alora.testing.tiny_config`; it has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus or [
        '{"answer": "yes", "confidence": 0.9, "items": [1, 2, 3]}',
        "The quick brown fox jumps over the lazy dog. Is the answer certain? Yes, no.",
        "<|user|> hello <|assistant|> world",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(text) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


@dataclass
class FakeDelta:
    index: int
    request_id: int
    token_id: int | None
    finished: bool
    finish_reason: str | None
    text: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    result: Any = None


@dataclass
class _FakeRequest:
    rid: int
    prompt: list[int]
    adapter: str | None
    max_new: int
    stops: set[int]
    processors: Sequence[Any]
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    cached: int = 0


class FakeRuntime:
    """The serving surface of `AdapterRuntime` over a pseudo-model: the logits of a context
    are a fixed function of its tokens and adapter. `delay` seconds pass per step."""

    block_size = 4

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        vocab_size: int | None = None,
        max_model_len: int = 256,
        delay: float = 0.0,
        adapters: Sequence[str] = ("fake_lora",),
    ) -> None:
        if tokenizer is None:
            from alora.testing import tiny_tokenizer

            tokenizer = tiny_tokenizer()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.max_model_len = max_model_len
        self.delay = delay
        self._adapters = {a: SimpleNamespace(kind="lora", rank=4) for a in adapters}
        self._aborted: set[int] = set()
        self._running: dict[int, _FakeRequest] = {}
        self._seen: set[tuple[int, ...]] = set()
        self._next = 0
        self.closed = False

    @property
    def adapters(self) -> dict[str, Any]:
        return dict(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        self._adapters[name] = SimpleNamespace(kind="lora", rank=4, path=path)

    def unload_adapter(self, name: str) -> None:
        import alora

        if name not in self._adapters:
            raise alora.UnknownAdapterError(f"unknown adapter {name!r}")
        if any(r.adapter == name for r in self._running.values()):
            raise alora.AdapterBusyError(f"adapter {name!r} is used by running requests")
        del self._adapters[name]

    def stats(self) -> dict[str, int]:
        used = sum(
            -(-(len(r.prompt) + len(r.tokens)) // self.block_size) for r in self._running.values()
        )
        return {
            "used_blocks": used,
            "running": len(self._running),
            "waiting": 0,
            "cached_blocks": len(self._seen),
            "free_blocks": 1000 - used,
            "total_blocks": 1000,
            "resident_adapters": len(self._adapters),
            "preemptions": 0,
            "adapter_loads": 0,
            "adapter_evictions": 0,
        }

    def abort(self, request_id: int) -> None:
        self._aborted.add(request_id)

    def close(self) -> None:
        self.closed = True

    def logits(self, context: Sequence[int], adapter: str | None) -> torch.Tensor:
        key = hashlib.blake2b(repr((adapter, list(context[-8:]))).encode(), digest_size=8)
        g = torch.Generator().manual_seed(int.from_bytes(key.digest(), "little") >> 1)
        return torch.randn(self.vocab_size, generator=g) * 3

    def _validate(
        self,
        prompts: Sequence[Any],
        adapter: Any,
        max_new_tokens: int,
        temperature: float,
        logprobs: int | None,
    ) -> list[str | None]:
        import alora

        if max_new_tokens < 1:
            raise alora.InvalidRequestError("max_new_tokens must be >= 1")
        if temperature < 0:
            raise alora.InvalidRequestError("temperature must be >= 0")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise alora.InvalidRequestError("logprobs must lie in [0, 20]")
        adapters = list(adapter) if isinstance(adapter, list) else [adapter] * len(prompts)
        for a in adapters:
            if a is not None and a not in self._adapters:
                raise alora.UnknownAdapterError(f"unknown adapter {a!r}")
        for p in prompts:
            if len(p) + max_new_tokens > self.max_model_len:
                raise alora.InvalidRequestError("prompt + max_new_tokens exceed max_model_len")
        return adapters

    async def stream_async(
        self,
        prompts: Sequence[Sequence[int]],
        adapter: str | list[str | None] | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        logprobs: int | None = None,
        logits_processors: Sequence[Any] | None = None,
        add_special_tokens: bool | None = None,
    ) -> AsyncIterator[FakeDelta]:
        adapters = self._validate(prompts, adapter, max_new_tokens, temperature, logprobs)
        stops = {self.tokenizer.eos_token_id} if stop_token_ids is None else set(stop_token_ids)
        reqs = []
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
            self._next += 1
            gen = None
            if temperature > 0:
                gen = torch.Generator().manual_seed(seed + i if seed is not None else self._next)
            r = _FakeRequest(
                self._next, list(p), a, max_new_tokens, stops, list(logits_processors or ()), gen
            )
            r.cached = max(
                (k for k in range(0, len(p), self.block_size) if tuple(p[:k]) in self._seen),
                default=0,
            )
            reqs.append((i, r))
            self._running[r.rid] = r
        pending = dict(reqs)
        try:
            while pending:
                await asyncio.sleep(self.delay)
                for i, r in list(pending.items()):
                    if r.rid in self._aborted:
                        del pending[i]
                        yield self._finish(i, r, None, "abort")
                        continue
                    logits = self.logits(r.prompt + r.tokens, r.adapter)
                    for proc in r.processors:
                        logits = proc(list(r.tokens), logits)
                    if r.generator is None:
                        tok = int(logits.argmax())
                    else:
                        probs = torch.softmax(logits / temperature, -1)
                        tok = int(torch.multinomial(probs, 1, generator=r.generator))
                    r.tokens.append(tok)
                    lp = top = None
                    if logprobs is not None:
                        ls = torch.log_softmax(logits, -1)
                        lp = float(ls[tok])
                        vals, idx = ls.topk(logprobs)
                        top = list(zip(idx.tolist(), vals.tolist(), strict=True))
                    reason = (
                        "stop"
                        if tok in r.stops
                        else ("length" if len(r.tokens) >= r.max_new else None)
                    )
                    if reason is not None:
                        del pending[i]
                        yield self._finish(i, r, tok, reason, lp, top)
                    else:
                        yield FakeDelta(i, r.rid, tok, False, None, None, lp, top)
        finally:
            for _, r in reqs:
                self._running.pop(r.rid, None)

    def _finish(
        self,
        i: int,
        r: _FakeRequest,
        tok: int | None,
        reason: str,
        lp: float | None = None,
        top: Any = None,
    ) -> FakeDelta:
        self._running.pop(r.rid, None)
        for k in range(0, len(r.prompt) + 1, self.block_size):
            self._seen.add(tuple(r.prompt[:k]))
        result = SimpleNamespace(
            token_ids=list(r.tokens),
            prompt_tokens=len(r.prompt),
            cached_tokens=r.cached,
            computed_tokens=len(r.prompt) - r.cached + len(r.tokens),
            finish_reason=reason,
            prompt_token_ids=list(r.prompt),
            time_to_first_token=0.0,
            error=None,
        )
        return FakeDelta(i, r.rid, tok, True, reason, None, lp, top, result)
