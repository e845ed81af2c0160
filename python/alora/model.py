"""Introspection of a Hugging Face causal LM: decoder layers, LoRA-targetable linears, and
the attention geometry the paged KV cache needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleSpec:
    """A linear layer present in every decoder layer (what the engine calls a module)."""

    name: str  # leaf name, the name PEFT's target_modules use, e.g. "q_proj"
    path: str  # path within a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int

    def as_engine_tuple(self) -> tuple[str, str, int, int]:
        return (self.name, self.path, self.in_features, self.out_features)


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    modules: tuple[ModuleSpec, ...]

    def module(self, name: str) -> ModuleSpec:
        for spec in self.modules:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def kv_bytes_per_block(self, block_size: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem

    def adapter_bytes_per_row(self) -> int:
        """Device bytes of one pool row across every (layer, module): A row + Bt row."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_layer = sum(m.in_features + m.out_features for m in self.modules)
        return self.num_layers * per_layer * elem


class UnsupportedModelError(ValueError):
    """The model's structure is not one this runtime knows how to attach to."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (`model.model.layers` for Llama and alike)."""
    candidates: list[nn.Module] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(AttributeError, NotImplementedError):
            candidates.append(get_decoder())
    candidates += [getattr(model, "model", None), model]
    for cand in candidates:
        layers = getattr(cand, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder layers found (expected `model.model.layers`)"
    )


def attention_module(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if not isinstance(attn, nn.Module):
        raise UnsupportedModelError(f"{type(layer).__name__} has no `self_attn` submodule")
    return attn


def linear_modules(layer: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """leaf name -> (path, module) for the nn.Linear layers of a decoder layer whose leaf name
    is unique within the layer (PEFT targets modules by leaf name)."""
    found: dict[str, list[tuple[str, nn.Linear]]] = {}
    for path, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and path:
            found.setdefault(path.rsplit(".", 1)[-1], []).append((path, mod))
    return {name: hits[0] for name, hits in found.items() if len(hits) == 1}


def introspect(model: nn.Module) -> ModelGeometry:
    """Geometry of `model`; raises UnsupportedModelError when it is not a decoder-only LM with
    the same linear layers in every decoder layer."""
    config = model.config
    layers = decoder_layers(model)
    first = linear_modules(layers[0])
    specs: list[ModuleSpec] = []
    for name, (path, lin) in first.items():
        same_everywhere = True
        for layer in layers:
            sub = linear_modules(layer).get(name)
            if (
                sub is None
                or sub[0] != path
                or (sub[1].in_features, sub[1].out_features) != (lin.in_features, lin.out_features)
            ):
                same_everywhere = False
                break
        if same_everywhere:
            specs.append(ModuleSpec(name, path, lin.in_features, lin.out_features))
    if not any(s.name == "q_proj" for s in specs):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected separate q/k/v/o projections (`self_attn.q_proj`)"
        )
    for layer in layers:
        attention_module(layer)

    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    param = next(model.parameters())
    return ModelGeometry(
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        max_model_len=int(getattr(config, "max_position_embeddings", 0) or 1 << 20),
        dtype=param.dtype,
        device=param.device,
        modules=tuple(specs),
    )
