"""Attaching to a model: introspection, transparency outside runtime steps, exact detach."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import ArchSetup

from alora import AdapterRuntime
from alora.model import introspect
from alora.testing import ARCHS, tiny_model


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "attn": model.config._attn_implementation,
        "config": model.config.to_dict(),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def _outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: exercises the original mask path
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        padded = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    return {"plain": plain, "padded": padded, "generate": gen}


def test_introspection_of_llama() -> None:
    geo = introspect(tiny_model("llama"))
    assert [m.as_engine_tuple() for m in geo.modules] == [
        ("q_proj", "self_attn.q_proj", 64, 64),
        ("k_proj", "self_attn.k_proj", 64, 32),
        ("v_proj", "self_attn.v_proj", 64, 32),
        ("o_proj", "self_attn.o_proj", 64, 64),
        ("gate_proj", "mlp.gate_proj", 64, 128),
        ("up_proj", "mlp.up_proj", 64, 128),
        ("down_proj", "mlp.down_proj", 128, 64),
    ]
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim) == (2, 4, 2, 16)
    assert geo.max_model_len == 256
    assert geo.kv_bytes_per_block(16) == 2 * 2 * 16 * 2 * 16 * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_transparent_while_attached_and_exact_detach(
    arch: str, arch_setup: Callable[[str], ArchSetup]
) -> None:
    setup = arch_setup(arch)
    model = setup.model
    before = _snapshot(model)
    reference = _outputs(model)
    rt = setup.runtime()
    assert model.config._attn_implementation == "alora_paged"
    # Serve something, so that pools, cache and hooks have all been exercised.
    rt.generate([[20, 21, 22, 3, 4, 5, 30]], "alora_all", max_new_tokens=3)
    during = _outputs(model)
    for key, value in reference.items():
        assert torch.equal(during[key], value), key
    rt.detach()
    assert not rt.attached
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["attn"] == before["attn"]
    assert after["config"] == before["config"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key, value in _outputs(model).items():
        assert torch.equal(value, reference[key]), key
    rt.detach()  # idempotent
    with pytest.raises(RuntimeError, match="detached"):
        rt.generate([[5, 6]])


def test_one_runtime_per_model() -> None:
    model = tiny_model("llama")
    rt = AdapterRuntime(model, kv_cache_blocks=8, adapter_rows=8)
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            AdapterRuntime(model, kv_cache_blocks=8, adapter_rows=8)
    finally:
        rt.detach()
    # Once detached, a new runtime may attach.
    with AdapterRuntime(model, kv_cache_blocks=8, adapter_rows=8) as rt2:
        assert rt2.generate([[5, 6, 7]], max_new_tokens=2)[0].token_ids
    assert model.config._attn_implementation == "sdpa"


def test_eager_model_is_supported_and_restored() -> None:
    model = tiny_model("llama", attn_implementation="eager")
    ids = torch.randint(3, 128, (1, 9))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    with AdapterRuntime(model, kv_cache_blocks=16, adapter_rows=8) as rt:
        res = rt.generate([ids[0].tolist()], max_new_tokens=1, return_logits=True)[0]
        torch.testing.assert_close(res.logits[0], ref[0, -1], atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            assert torch.equal(model(input_ids=ids).logits, ref)
    assert model.config._attn_implementation == "eager"


def test_sizing_defaults_and_memory_options() -> None:
    model = tiny_model("llama")
    geo = introspect(model)
    per_unit = geo.kv_bytes_per_block(16)
    per_row = geo.adapter_bytes_per_row()
    with AdapterRuntime(model, max_num_seqs=4) as rt:
        stats = rt.stats()
        # KV for max_num_seqs full-length sequences (256 positions, 16-token blocks), plus
        # the old default adapter budget of 1024 rows; one pool, no caps.
        kv_units = 4 * 256 // 16
        adapter_units = -(-1024 * per_row // per_unit)
        assert stats["total_blocks"] == kv_units + adapter_units
        assert stats["kv_block_cap"] == stats["adapter_block_cap"] == stats["total_blocks"]
        assert rt.device_memory_bytes == stats["total_blocks"] * per_unit
    per_block = geo.kv_bytes_per_block(8)
    # Two explicit budgets: two fixed caps adding up to the pool (the classic design).
    with AdapterRuntime(
        model, block_size=8, kv_cache_memory=10 * per_block + 5, adapter_memory=6 * per_block
    ) as rt:
        stats = rt.stats()
        assert (stats["total_blocks"], stats["kv_block_cap"], stats["adapter_block_cap"]) == (
            16,
            10,
            6,
        )
        assert rt.device_memory_bytes == 16 * per_block
    # One budget for both.
    with AdapterRuntime(model, block_size=8, device_memory=32 * per_block) as rt:
        stats = rt.stats()
        assert (stats["total_blocks"], stats["kv_block_cap"], stats["adapter_block_cap"]) == (
            32,
            32,
            32,
        )
    with pytest.raises(ValueError, match="not both"):
        AdapterRuntime(model, kv_cache_blocks=4, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match="holds no KV block"):
        AdapterRuntime(model, kv_cache_memory=10)
    assert model.config._attn_implementation == "sdpa"  # failed constructions attach nothing
