"""The benchmarks' default model: a Granite-architecture causal LM with random weights,
sized so a bench runs in minutes on 2 CPU cores (speed does not depend on the weights, and
earlier results were measured on it). `alora demo` defaults to the real SmolLM2 instead
(`alora.models`); `--model smollm2` or `--model PATH` gives the benches a real model."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from alora.testing import tiny_model, tiny_tokenizer

DEMO_VOCAB = 2048
DEMO_CONFIG: dict[str, Any] = {
    "vocab_size": DEMO_VOCAB,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
}


def demo_model(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The demo's Granite model (about 25M parameters, random weights)."""
    return tiny_model("granite", seed=seed, dtype=dtype, device=device, **DEMO_CONFIG)


def demo_tokenizer() -> Any:
    """A word-level tokenizer over the demo vocabulary, with a chat template."""
    return tiny_tokenizer(DEMO_VOCAB)


def load_model(
    path: str | None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer): the random demo model when `path` is None; otherwise what
    `alora.models.load_model` gives for it ('smollm2' or a local transformers directory)."""
    if path is None:
        return demo_model(dtype=dtype, device=device), demo_tokenizer()
    from alora.models import load_model as load_real

    return load_real(path, dtype=dtype, device=device)
