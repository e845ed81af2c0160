"""The embedded default model of `alora demo` and the benchmarks: a Granite-architecture
causal LM with random weights, sized so the demo's agentic chain runs in about a minute on
2 CPU cores. Nothing is downloaded; `--model PATH` swaps in a real local model."""

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
    """(model, tokenizer): the demo model, or a local transformers directory when `path` is set."""
    if path is None:
        return demo_model(dtype=dtype, device=device), demo_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model.to(device).eval(), tok
