"""What the runtime hands back: finished results, per-step outputs and stream deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FinishReason = str  # "stop" | "length" | "abort" | "error"


@dataclass
class GenerationResult:
    """A finished request.

    Counters (all per request): `prompt_tokens` is the prompt's length; `cached_tokens` the
    prompt tokens whose KV came from the prefix cache (never computed for this request);
    `computed_tokens` every token run through the model for it, prompt and generated, a
    recomputation after preemption included; `lora_tokens` the computed tokens that got
    LoRA compute (0 for the base model, only those from the activation start for aLoRA).
    """

    request_id: int
    token_ids: list[int]  # generated tokens (a stop token that ended the request included)
    finish_reason: FinishReason | None  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    lora_tokens: int
    preemptions: int
    time_to_first_token: float | None  # seconds from submission to the first token
    latency: float  # seconds from submission to the end
    adapter: str | None = None
    text: str | None = None  # with a tokenizer
    # float32 [V] per generated token, with return_logits
    logits: list[torch.Tensor] | None = field(default=None, repr=False)
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    # With logprobs=k: per generated token, its log-probability and the top-k (token, logprob)
    # of the distribution it was sampled from.
    logprobs: list[float] | None = field(default=None, repr=False)
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)
    error: BaseException | None = None  # the cause, when finish_reason is "error"


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one step (what `step()` returns)."""

    request_id: int
    new_token: int | None
    finished: bool
    finish_reason: FinishReason | None
    result: GenerationResult | None = None  # set when finished
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class StreamDelta:
    """One new token of one of the prompts passed to `stream()`/`stream_async()`."""

    index: int  # position of the prompt in the `prompts` argument
    request_id: int
    token_id: int | None  # None only for a request that finished without a new token
    finished: bool
    finish_reason: FinishReason | None
    text: str | None = None  # decoded text of the token alone, with a tokenizer
    result: GenerationResult | None = None  # set when finished
    logprob: float | None = None  # with logprobs: the token's log-probability
    top_logprobs: list[tuple[int, float]] | None = None  # with logprobs=k > 0
