"""aLoRA Runtime: serve many LoRA and Activated LoRA adapters on one base model, with the
base model's KV cache reused exactly.

`import alora` is cheap: the runtime (and torch/transformers) load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alora.backend import LoraBackend, LoraBatch, TorchBackend
    from alora.errors import (
        AdapterBusyError,
        AdapterError,
        AdapterFormatError,
        AdapterShapeError,
        AloraError,
        CapacityError,
        ConfigError,
        DuplicateAdapterError,
        InvalidRequestError,
        StepError,
        UnknownAdapterError,
        UnknownRequestError,
        UnsupportedDtypeError,
        UnsupportedModelError,
    )
    from alora.outputs import GenerationResult, StepOutput, StreamDelta
    from alora.runtime import AdapterRuntime
    from alora.sampling import LogitsProcessor, SamplingParams

_EXPORTS: dict[str, str] = {
    "AdapterRuntime": "alora.runtime",
    "GenerationResult": "alora.outputs",
    "StepOutput": "alora.outputs",
    "StreamDelta": "alora.outputs",
    "SamplingParams": "alora.sampling",
    "LogitsProcessor": "alora.sampling",
    "LoraBackend": "alora.backend",
    "LoraBatch": "alora.backend",
    "TorchBackend": "alora.backend",
    **dict.fromkeys(
        (
            "AdapterBusyError",
            "AdapterError",
            "AdapterFormatError",
            "AdapterShapeError",
            "AloraError",
            "CapacityError",
            "ConfigError",
            "DuplicateAdapterError",
            "InvalidRequestError",
            "StepError",
            "UnknownAdapterError",
            "UnknownRequestError",
            "UnsupportedDtypeError",
            "UnsupportedModelError",
        ),
        "alora.errors",
    ),
}

__all__ = [
    "AdapterBusyError",
    "AdapterError",
    "AdapterFormatError",
    "AdapterRuntime",
    "AdapterShapeError",
    "AloraError",
    "CapacityError",
    "ConfigError",
    "DuplicateAdapterError",
    "GenerationResult",
    "InvalidRequestError",
    "LogitsProcessor",
    "LoraBackend",
    "LoraBatch",
    "SamplingParams",
    "StepError",
    "StepOutput",
    "StreamDelta",
    "TorchBackend",
    "UnknownAdapterError",
    "UnknownRequestError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
