"""Structured output as a token mask: grammars from JSON schemas, regexes, choices and Lark,
enforced per request by a `LogitsProcessor` in the engine's sampling step.

The engine is llguidance. It computes each step's mask lazily from the grammar's lexer
state (tens of microseconds for a 128k vocabulary), so a new schema costs no up-front
compilation: a server whose clients each send their own schema never waits on a compile
cache. It has the broadest JSON Schema coverage of the maintained engines, a Rust core
with no torch dependency, and is the engine behind structured output in vLLM ("guidance"),
SGLang and llama.cpp. (xgrammar precompiles a per-grammar mask cache, which pays off for
a few fixed grammars over a large batch, not for per-request schemas.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alora.serving.protocol import StructuredOutputs

# Compact separators like `json.dumps(..., separators=(", ", ": "))` and no free
# whitespace: a small model given free whitespace can emit newlines until max_tokens.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ValueError):
    """A structured-output specification that cannot be compiled (HTTP 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _token_bytes_fallback(tokenizer: Any, vocab: int) -> Any:
    """An llguidance tokenizer for HF tokenizers it cannot read itself (word-level ones):
    each token's bytes are its decoded text; special tokens are marked as such."""
    import llguidance
    from llguidance import TokenizerWrapper

    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens: list[bytes] = []
    for i in range(vocab):
        if i in specials:
            name = tokenizer.convert_ids_to_tokens(i) or f"<special_{i}>"
            tokens.append(b"\xff" + str(name).encode())
        else:
            tokens.append(str(tokenizer.decode([i])).encode())

    class _Gen:
        def __init__(self) -> None:
            self.eos_token_id = tokenizer.eos_token_id
            self.bos_token_id = tokenizer.bos_token_id
            self.tokens = tokens
            self.special_token_ids = sorted(specials)

        def __call__(self, s: bytes | str) -> list[int]:
            text = s.decode("utf-8", "ignore") if isinstance(s, bytes) else s
            return list(tokenizer.encode(text, add_special_tokens=False))

    return llguidance.LLTokenizer(TokenizerWrapper(_Gen()))


class GrammarCompiler:
    """Turns a request's constraint into a grammar and a per-request logits processor."""

    def __init__(self, tokenizer: Any, *, max_grammar_tokens: int = 4096) -> None:
        self._hf = tokenizer
        self._ll: Any = None
        self._lock = threading.Lock()
        self.max_grammar_tokens = max_grammar_tokens

    @property
    def ll_tokenizer(self) -> Any:
        """Built once (about a second for a 100k vocabulary), on first use."""
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                try:
                    self._ll = llguidance.hf.from_tokenizer(self._hf)
                except Exception:
                    self._ll = _token_bytes_fallback(self._hf, len(self._hf))
            return self._ll

    def grammar(self, spec: StructuredOutputs) -> str:
        from llguidance import LLMatcher

        if spec.json_object:
            grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
            param = "response_format"
        elif spec.json_ is not None:
            param = "structured_outputs.json"
            schema: Any = spec.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"the JSON schema is not valid JSON: {e}", param) from e
            if schema is True:
                schema = {}
            if not isinstance(schema, dict):
                raise GrammarError("the JSON schema must be an object", param)
            try:
                grammar = LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: {e}", param) from e
        elif spec.regex is not None:
            param = "structured_outputs.regex"
            grammar = LLMatcher.grammar_from_regex(spec.regex)
        elif spec.choice is not None:
            param = "structured_outputs.choice"
            # Lark string literals take JSON escapes, so any choice text is quoted exactly.
            alts = " | ".join(json.dumps(c) for c in spec.choice)
            grammar = LLMatcher.grammar_from_lark(f"start: {alts}")
        elif spec.grammar is not None:
            param = "structured_outputs.grammar"
            grammar = LLMatcher.grammar_from_lark(spec.grammar)
        else:
            raise GrammarError("empty structured_outputs", "structured_outputs")
        err = LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if err:
            raise GrammarError(f"invalid {param.split('.')[-1]}: {err}", param)
        return grammar

    def processor(self, grammar: str) -> GrammarProcessor:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error(), "structured_outputs")
        return GrammarProcessor(matcher)


class GrammarProcessor:
    """A `LogitsProcessor`: masks every token the grammar does not allow next.

    Idempotent for the same `output_ids`: the matcher advances by the tokens it has not
    consumed yet and rolls back when called with fewer (a step the engine retried)."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher
        self._seen = 0

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_ids)
        if n < self._seen:
            self._m.rollback(self._seen - n)
        elif n > self._seen:
            self._m.consume_tokens([int(t) for t in output_ids[self._seen :]])
        self._seen = n
        if self._m.is_error():
            raise GrammarError(f"grammar matcher: {self._m.get_error()}", "structured_outputs")
        bits = np.unpackbits(
            np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8), bitorder="little"
        )
        v = logits.shape[-1]
        allowed = np.zeros(v, dtype=bool)
        k = min(v, bits.shape[0])
        allowed[:k] = bits[:k].astype(bool)
        logits[torch.from_numpy(~allowed).to(logits.device)] = float("-inf")
        return logits

    @property
    def accepting(self) -> bool:
        return bool(self._m.is_accepting())


class LogitBias:
    """OpenAI's `logit_bias`: a fixed additive bias per token id (-100 bans, +100 forces)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = torch.tensor(list(bias), dtype=torch.long)
        self._vals = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self._ids.to(logits.device)] += self._vals.to(logits.device)
        return logits
