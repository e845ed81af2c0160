"""LoRA hooks exist only on the modules a step's adapters target: base steps run the model
with no hooks at all, and the results are what the always-hooked model gave."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alora import AdapterRuntime
from alora.testing import make_peft_adapter, tiny_model


def _hooked(model: torch.nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and len(m._forward_hooks)
    }


def test_hooks_follow_the_step_targets(tmp_path: Path) -> None:
    model = tiny_model("llama")
    lora = make_peft_adapter(model, tmp_path / "qv", "lora", targets=("q_proj", "v_proj"))
    mlp = make_peft_adapter(model, tmp_path / "mlp", "lora", targets=("up_proj",), seed=1)
    prompt = list(range(5, 25))
    rt = AdapterRuntime(model)
    try:
        rt.load_adapter("qv", lora)
        rt.load_adapter("mlp", mlp)
        assert _hooked(model) == set()
        base = rt.generate([prompt], max_new_tokens=4, return_logits=True)[0]
        assert _hooked(model) == set()
        with_qv = rt.generate([prompt], "qv", max_new_tokens=4, return_logits=True)[0]
        assert _hooked(model) == {"q_proj", "v_proj"}
        rt.generate([prompt], "mlp", max_new_tokens=1)  # read from disk: the two now batch
        both = rt.generate([prompt, prompt], ["qv", "mlp"], max_new_tokens=4)
        assert _hooked(model) == {"q_proj", "v_proj", "up_proj"}
        # Base again: the hooks leave, and outputs are unchanged by their coming and going.
        base2 = rt.generate([prompt], max_new_tokens=4, return_logits=True)[0]
        assert _hooked(model) == set()
        assert base2.token_ids == base.token_ids
        torch.testing.assert_close(torch.stack(base2.logits), torch.stack(base.logits))
        assert both[0].token_ids == with_qv.token_ids
        # The adapter did change the logits (the hooks ran).
        assert not torch.allclose(torch.stack(with_qv.logits), torch.stack(base.logits))
    finally:
        rt.detach()
    assert _hooked(model) == set()


def test_each_site_binds_once_per_batch_and_declined_calls_take_add_lora(tmp_path: Path) -> None:
    """A steady decode reuses its batches, so each hooked (layer, module) binds the kernel's
    call once (`CpuBackend.bind`), not once per step; a new plan binds again. A bound call
    that declines falls through to `add_lora`. Every form gives the torch reference's
    tokens and logits."""
    from alora.backend import TorchBackend
    from alora.cpu_backend import CpuBackend

    model = tiny_model("llama")
    lora = make_peft_adapter(model, tmp_path / "qv", "lora", targets=("q_proj", "v_proj"))
    prompts = [list(range(5, 25)), list(range(30, 41))]

    class Counting(CpuBackend):
        def __init__(self, decline: bool = False) -> None:
            super().__init__()
            self.decline = decline
            self.binds = self.added = 0

        def bind(self, *args: Any) -> Any:
            self.binds += 1
            call = super().bind(*args)
            return (lambda y, x: False) if self.decline and call is not None else call

        def add_lora(self, *args: Any) -> None:
            self.added += 1
            super().add_lora(*args)

    def run(backend: Any) -> list[Any]:
        rt = AdapterRuntime(model, lora_backend=backend)
        try:
            rt.load_adapter("qv", lora)
            return rt.generate(prompts, "qv", max_new_tokens=6, return_logits=True)
        finally:
            rt.detach()

    want = run(TorchBackend())
    sites = 2 * model.config.num_hidden_layers  # q_proj and v_proj of every layer
    counting, declining = Counting(), Counting(decline=True)
    for backend in (counting, declining):
        got = run(backend)
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            torch.testing.assert_close(torch.stack(g.logits), torch.stack(w.logits))
    # Six steps (both prefills in one, then five decode steps): the prefill's plan binds
    # every site, the first decode step's plan binds them again, and the four steady decode
    # steps after it bind nothing.
    assert counting.binds == 2 * sites
    assert counting.added == 0  # every call went through the bound kernel
    assert declining.added == 6 * sites  # declined: every hook call took add_lora
