"""Request normalisation on the Python side: prompts (token ids, strings, chat messages) to
token ids, and adapter configs/state dicts to what the core reads. Token-id rules (range,
vocabulary, lengths) are the core's; this module only turns Python values into ids."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from alora import _core

ChatMessages = Sequence[Mapping[str, Any]]
Prompt = str | Sequence[int] | ChatMessages


def prompt_ids(prompt: Prompt, tokenizer: Any | None, add_special_tokens: bool | None) -> Any:
    """Token ids of one prompt, as a list or a 1-D integer array (checked by the core).

    Strings are tokenized with special tokens unless `add_special_tokens` is False; with None
    (the default) a string that already starts with the tokenizer's BOS text (e.g. a rendered
    chat template) gets none added, so it never carries two BOS tokens.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise _core.InvalidRequestError(
                "string prompts need a tokenizer; pass token ids instead"
            )
        if add_special_tokens is None:
            bos = getattr(tokenizer, "bos_token", None)
            add_special_tokens = not (isinstance(bos, str) and bos and prompt.startswith(bos))
        return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if is_chat(prompt):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise _core.InvalidRequestError("chat prompts need a tokenizer with a chat template")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return ids
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise _core.InvalidRequestError("a tensor prompt must be 1-D integer token ids")
        return prompt.tolist()
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
            raise _core.InvalidRequestError("an array prompt must be 1-D integer token ids")
        return prompt
    if isinstance(prompt, Sequence):
        return prompt
    raise _core.InvalidRequestError(
        f"a prompt must be a string, token ids or chat messages, got {type(prompt).__name__}"
    )


def is_chat(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def _is_token_list(prompt: Any) -> bool:
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 and prompt.size > 0 and prompt.dtype.kind in "iu"
    if isinstance(prompt, torch.Tensor):
        return prompt.ndim == 1 and prompt.numel() > 0
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(issubclass(t, (int, np.integer)) for t in set(map(type, prompt)))
    )


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """A single prompt (string, token ids, chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, torch.Tensor) and prompts.ndim == 2:
        return list(prompts)
    if isinstance(prompts, str) or _is_token_list(prompts) or is_chat(prompts):
        return [prompts]
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise _core.InvalidRequestError(
        f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}"
    )


def as_adapter_list(adapter: Any, n: int) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    if not isinstance(adapter, Sequence):
        raise _core.InvalidRequestError(
            f"adapter must be a name, None or a list of them, got {adapter!r}"
        )
    adapters = list(adapter)
    if len(adapters) != n:
        raise _core.InvalidRequestError(f"{len(adapters)} adapters for {n} prompts")
    for a in adapters:
        if a is not None and not isinstance(a, str):
            raise _core.InvalidRequestError(f"adapter names must be strings or None, got {a!r}")
    return adapters


def config_json(config: Any) -> str:
    """A PEFT LoraConfig, a dict or a JSON text -> JSON text for the core (which validates
    it and names the field at fault)."""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        raise _core.ConfigError(
            f"config must be a LoraConfig, a dict or a JSON string, not {type(config).__name__}"
        )
    # allow_nan=False: a NaN alpha is refused here by name rather than written as a literal.
    try:
        return json.dumps(data, default=_json_default, allow_nan=False)
    except ValueError as e:
        bad = [k for k, v in data.items() if isinstance(v, float) and not np.isfinite(v)]
        field = bad[0] if bad else "?"
        raise _core.ConfigError(f"invalid config field `{field}`: not a finite number") from e


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise _core.ConfigError(f"cannot serialize {type(obj).__name__} in an adapter config")


def state_dict_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """float32 host arrays of a PEFT state dict (tensors or array-likes)."""
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().to("cpu", torch.float32).contiguous().numpy()
        else:
            try:
                out[k] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise _core.AdapterFormatError(f"tensor `{k}` is not numeric: {e}") from None
    return out


def invocation_tokens(
    tokenizer: Any | None,
    *,
    path: str | None = None,
    config_json_text: str | None = None,
) -> list[int] | None:
    """Tokens of an older aLoRA config's `invocation_string` (the core parses the config and
    says whether it has one), or None when the config needs no tokenization."""
    text = _core.untokenized_invocation(path=path, config_json=config_json_text)
    if text is None:
        return None
    if tokenizer is None:
        raise _core.ConfigError(
            "the adapter's config gives only `invocation_string`: pass a tokenizer to "
            "AdapterRuntime or invocation_tokens= to load_adapter"
        )
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
