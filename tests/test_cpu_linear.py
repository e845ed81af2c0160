"""Packed oneDNN linears on the CPU: used inside the runtime's steps only, numerically the
linear they replace, and gone after detach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from alora import AdapterRuntime, cpu_linear
from alora.cpu_linear import _ACTIVE, MIN_PACKED_ELEMENTS, PackedLinears
from alora.testing import make_peft_adapter, tiny_model

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _ops(fn: object) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    return {e.key for e in prof.key_averages()}


def test_steps_use_packed_weights_and_match_the_unpacked_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model("llama")
    adapter = make_peft_adapter(model, tmp_path / "a", "lora")
    prompt = list(range(10, 40))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        before = model(ids).logits
    unpacked = AdapterRuntime(model, prepack_weights=False)
    try:
        unpacked.load_adapter("a", adapter)
        want = [unpacked.generate([prompt], a, max_new_tokens=5, return_logits=True)[0]
                for a in (None, "a")]  # fmt: skip
    finally:
        unpacked.detach()

    rt = AdapterRuntime(model)
    try:
        assert rt.prepacked_bytes == sum(m.weight.numel() * 4 for m in _linears(model))
        rt.load_adapter("a", adapter)
        rt.add_request(prompt, adapter="a", max_new_tokens=2)

        def steps() -> None:  # in this thread, where the profiler sees them
            while rt.has_unfinished():
                rt.step()

        ops = _ops(steps)
        assert "mkldnn::_linear_pointwise" in ops
        for a, ref in zip((None, "a"), want, strict=True):
            got = rt.generate([prompt], a, max_new_tokens=5, return_logits=True)[0]
            assert got.token_ids == ref.token_ids
            for g, r in zip(got.logits or [], ref.logits or [], strict=True):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        # Outside a step the model is the model it was, bit for bit, on F.linear.
        with torch.inference_mode():
            assert "mkldnn::_linear_pointwise" not in _ops(lambda: model(ids))
            assert torch.equal(model(ids).logits, before)
    finally:
        rt.detach()
    assert all("forward" not in m.__dict__ for m in _linears(model))


def test_opt_out_and_refusal_leave_the_model_alone() -> None:
    model = tiny_model("llama")
    rt = AdapterRuntime(model, prepack_weights=False)
    assert rt.prepacked_bytes == 0
    assert all("forward" not in m.__dict__ for m in _linears(model))
    rt.detach()
    double = tiny_model("llama").double()
    with pytest.raises(ValueError, match="prepack_weights=True needs float32"):
        AdapterRuntime(double, prepack_weights=True)
    assert all("forward" not in m.__dict__ for m in _linears(double))
    assert all(not m._forward_hooks for m in double.modules())
    assert AdapterRuntime(double).prepacked_bytes == 0  # auto: float64 is not packed


def test_auto_does_not_pack_into_scarce_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    need = cpu_linear.packed_bytes(model)
    monkeypatch.setattr(cpu_linear, "host_bytes_available", lambda: 2 * need - 1)
    rt = AdapterRuntime(model)
    assert rt.prepacked_bytes == 0
    rt.detach()
    rt = AdapterRuntime(model, prepack_weights=True)  # asked for: packs anyway
    assert rt.prepacked_bytes == need
    rt.detach()
    monkeypatch.setattr(cpu_linear, "host_bytes_available", lambda: 2 * need)
    rt = AdapterRuntime(model)
    assert rt.prepacked_bytes == need
    rt.detach()


def test_a_forward_set_by_someone_else_is_chained_and_restored() -> None:
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    calls: list[int] = []
    original = head.forward

    def theirs(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(x)

    head.forward = theirs
    packed = PackedLinears(object(), model)
    with torch.inference_mode():
        model(torch.tensor([[11, 12, 13]]))
    assert calls == [1]  # not active: their forward ran
    packed.remove()
    assert head.forward is theirs
    assert all("forward" not in m.__dict__ for m in _linears(model) if m is not head)


def test_an_exception_in_a_step_leaves_no_active_packing() -> None:
    model = tiny_model("llama")
    packed = PackedLinears("owner", model)
    try:
        with pytest.raises(KeyboardInterrupt), packed.active():
            assert _ACTIVE.get() == "owner"
            raise KeyboardInterrupt
        assert _ACTIVE.get() is None
    finally:
        packed.remove()


class _Two(nn.Module):
    """The smallest model `PackedLinears` accepts: decoder layers and an LM head."""

    def __init__(self, n: int, k: int, bias: bool) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Linear(k, k, bias=bias)])
        self.head = nn.Linear(k, n, bias=bias)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(0, 40),
    n=st.integers(1, 1600),
    k=st.integers(1, 700),
    bias=st.booleans(),
    lead=st.sampled_from([(), (1,), (2, 1)]),
    seed=st.integers(0, 2**16),
)
def test_packed_forward_is_the_linear(
    tokens: int, n: int, k: int, bias: bool, lead: tuple[int, ...], seed: int
) -> None:
    torch.manual_seed(seed)
    model = _Two(n, k, bias)
    x = torch.randn(*lead, tokens, k)
    want = model.head(x).detach()
    owner = object()
    packed = PackedLinears(owner, model)
    try:
        with torch.inference_mode(), packed.active():
            uses = model.head.weight.numel() >= MIN_PACKED_ELEMENTS or x.numel() != k
            ops = _ops(lambda: model.head(x))
            got = model.head(x)
        assert ("mkldnn::_linear_pointwise" in ops) == uses
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, k**0.5))
    finally:
        packed.remove()
