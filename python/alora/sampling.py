"""Token sampling: greedy, temperature, top-k and top-p, logits processors (token masks for
structured output) and log-probabilities, with a per-request generator so that a seeded
request samples the same tokens whatever it is batched with.

The sampling parameters are this module's to validate (the core never sees them), completely
and before a request is queued. At sampling time each request is sampled on its own terms: one
request's failure (a raising logits processor) is returned as that request's error, never
raised for the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from alora import _core

_F32_MAX = float(np.finfo(np.float32).max)
_SEED_MIN, _SEED_END = -(1 << 63), 1 << 64  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20


@runtime_checkable
class LogitsProcessor(Protocol):
    """Called once per sampled token of its request, in the engine loop's thread, with the
    tokens the request generated so far and its float32 logits row [V]; returns the row
    (modified in place or new), e.g. with disallowed tokens set to -inf.

    Must be idempotent for the same `output_ids`: a step that is rolled back calls it again
    with the same ids (a grammar matcher should advance by the ids it has not seen yet)."""

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


def _invalid(detail: str) -> _core.InvalidRequestError:
    return _core.InvalidRequestError(detail)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the token's logprob and the top k
    logits_processors: tuple[LogitsProcessor, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(float(t)) or t < 0:
            raise _invalid(f"temperature must be a finite number >= 0, got {t!r}")
        if t > 0 and 1.0 / float(t) > _F32_MAX:
            raise _invalid(
                f"temperature {t!r} is too small: 1/temperature overflows float32 "
                "(use 0 for greedy sampling)"
            )
        p = self.top_p
        if not _is_real(p) or not (0.0 < float(p) <= 1.0):
            raise _invalid(f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if not _is_int(k) or k < 0:
            raise _invalid(f"top_k must be an integer >= 0, got {k!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not (_SEED_MIN <= s < _SEED_END)):
            raise _invalid(f"seed must be an integer in [-2**63, 2**64) or None, got {s!r}")
        n = self.logprobs
        if n is not None and (not _is_int(n) or not (0 <= n <= MAX_LOGPROBS)):
            raise _invalid(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {n!r}")
        for proc in self.logits_processors:
            if not callable(proc):
                raise _invalid(f"logits_processors must be callables, got {proc!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: the batch's argmax is the answer."""
        return self.greedy and self.logprobs is None and not self.logits_processors

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(int(self.seed))
        else:
            gen.seed()
        return gen


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: Sequence[int]


def sample_batch(
    logits: torch.Tensor, requests: Sequence[SampleRequest]
) -> list[Sampled | BaseException]:
    """One token per row of `logits` [N, V] (float32). A row whose sampling raises an
    `Exception` gets that exception in its place; the other rows are unaffected."""
    n = logits.shape[0]
    if n == 0:
        return []
    argmax = logits.argmax(dim=-1).tolist()
    out: list[Sampled | BaseException] = []
    for i, req in enumerate(requests):
        if req.params.plain_greedy:
            out.append(Sampled(int(argmax[i])))
            continue
        try:
            out.append(_sample_row(logits[i], req))
        except Exception as e:  # one request's failure is its own
            out.append(e)
    return out


def _sample_row(row: torch.Tensor, req: SampleRequest) -> Sampled:
    p = req.params
    scores = row.float()
    if p.logits_processors:
        scores = scores.clone()
        for proc in p.logits_processors:
            scores = proc(req.output_ids, scores)
            if not isinstance(scores, torch.Tensor) or scores.shape != row.shape:
                raise _core.StepError(f"logits processor {proc!r} must return a [V] tensor")
        if not bool(torch.isfinite(scores).any()):
            raise _core.StepError("the logits processors allow no token")
    if p.greedy:
        token = int(scores.argmax())
    else:
        scores = _tempered(scores, p)
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=req.generator).item())
    if p.logprobs is None:
        return Sampled(token)
    logp = torch.log_softmax(scores, dim=-1)
    top: list[tuple[int, float]] | None = None
    if p.logprobs > 0:
        values, ids = torch.topk(logp, min(p.logprobs, logp.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return Sampled(token, float(logp[token]), top)


def _tempered(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Scores of the distribution a token is drawn from: temperature, then top-k and top-p.
    The maximum is subtracted first, so a tiny temperature cannot overflow to inf - inf."""
    scores = (scores - scores.max()) / float(p.temperature)
    if p.top_k and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the
        # most likely token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores
