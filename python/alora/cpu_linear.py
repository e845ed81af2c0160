"""The base model's linears on the CPU: oneDNN's prepacked float32 GEMM during runtime steps.

`F.linear` on the CPU calls MKL with the weight in its row-major layout and repacks it on
every call. Measured on the 2-core CPU of this project (1 thread, weights cold in memory):
oneDNN with the weight reordered once into its blocked layout takes 0.46-0.79x the time at 16
tokens (batched decode), 0.72-0.90x at 512 (prefill) and 0.83x for SmolLM2's 49152 x 576
LM head at 1 token. It loses only on small single-token products (0.19 MB k/v projections:
1.27x), which `MIN_PACKED_ELEMENTS` leaves to `F.linear`. Inductor's CPU freezing and vLLM's
CPU backend use the same primitive for the same reason.

The packed copies are taken at attach (a snapshot of the weights, as the KV prefix cache
already is) and cost the weights' bytes again in host memory. Outside a step of the owning
runtime, and for any input that is not float32 on the CPU without autograd, each linear runs
its own forward, so the model behaves exactly as before for other callers; `remove()`
restores the modules.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from alora.model import decoder_layers

# A single-token product below this many weight elements stays on F.linear (dispatch
# overhead dominates: 1.05x at 576 x 576 and 1.27x at 192 x 576; 0.83x from 1536 x 576 up).
MIN_PACKED_ELEMENTS = 576 * 1536

_ACTIVE: ContextVar[object | None] = ContextVar("alora_packed_linears", default=None)


def available(model: nn.Module) -> bool:
    """Whether `model` can use packed linears: float32 weights on the CPU, oneDNN built in."""
    param = next(model.parameters(), None)
    return (
        param is not None
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def host_bytes_available() -> int | None:
    """Host memory free now (physical pages not in use), or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def packed_bytes(model: nn.Module) -> int:
    """Host bytes the packed copies of `model`'s linears would take."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _linears(model))


def fits_by_default(model: nn.Module) -> bool:
    """Whether the automatic choice packs: the copies take at most half the host memory free
    now, so turning a runtime on never pushes a large model's host into swap unasked."""
    free = host_bytes_available()
    return free is None or 2 * packed_bytes(model) <= free


def _linears(model: nn.Module) -> list[nn.Linear]:
    mods: list[nn.Linear] = [
        m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        mods.append(head)
    return mods


class PackedLinears:
    """oneDNN-packed copies of `model`'s decoder and LM-head linears, used while `owner`'s
    step runs (`active`)."""

    def __init__(self, owner: object, model: nn.Module) -> None:
        self._owner = owner
        self._patched: list[tuple[nn.Module, Any]] = []
        self.nbytes = 0
        try:
            for mod in _linears(model):
                self._patch(mod)
        except BaseException:
            self.remove()
            raise

    def _patch(self, mod: nn.Linear) -> None:
        weight = mod.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        bias = None if mod.bias is None else mod.bias.detach()
        # An instance attribute set by someone else (accelerate's hooks) is chained, not lost.
        previous = mod.__dict__.get("forward")
        inner = mod.forward
        owner = self._owner
        small = weight.numel() < MIN_PACKED_ELEMENTS

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (
                _ACTIVE.get() is owner
                and x.dtype == torch.float32
                and x.device.type == "cpu"
                and not (small and x.numel() == x.shape[-1])
                and not (torch.is_grad_enabled() and x.requires_grad)
            ):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            return inner(x)

        mod.forward = forward  # type: ignore[method-assign]
        self._patched.append((mod, previous))
        self.nbytes += weight.numel() * weight.element_size()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        token = _ACTIVE.set(self._owner)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def remove(self) -> None:
        """Give every module its own forward back and drop the packed copies."""
        for mod, previous in reversed(self._patched):
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous  # type: ignore[method-assign]
        self._patched.clear()
        self.nbytes = 0
