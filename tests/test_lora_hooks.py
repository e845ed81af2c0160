"""LoRA hooks exist only on the modules a step's adapters target: base steps run the model
with no hooks at all, and the results are what the always-hooked model gave."""

from __future__ import annotations

from pathlib import Path

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
