"""The `alora._core` bindings: adapter loading (against PEFT's own files), zero-copy views,
the exception tree, plan arrays, and bad input that must leave the engine unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from alora import _core

HIDDEN, INTER, LAYERS = 32, 48, 2
KV_DIM = HIDDEN // 2  # 2 KV heads of 8
MODULES = [
    ("q_proj", "self_attn.q_proj", HIDDEN, HIDDEN),
    ("k_proj", "self_attn.k_proj", HIDDEN, HIDDEN // 2),
    ("v_proj", "self_attn.v_proj", HIDDEN, HIDDEN // 2),
    ("o_proj", "self_attn.o_proj", HIDDEN, HIDDEN),
    ("gate_proj", "mlp.gate_proj", HIDDEN, INTER),
    ("up_proj", "mlp.up_proj", HIDDEN, INTER),
    ("down_proj", "mlp.down_proj", INTER, HIDDEN),
]
PREFIX = "base_model.model.model.layers"


def engine(**kw: int) -> _core.Engine:
    args = dict(
        num_layers=LAYERS,
        modules=MODULES,
        block_size=4,
        num_blocks=32,
        kv_dim=KV_DIM,
        max_batch_tokens=64,
        max_num_seqs=8,
        max_model_len=128,
    )
    args.update(kw)
    return _core.Engine(**args)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An aLoRA adapter saved by PEFT itself, with a rank pattern."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alora_invocation_tokens=[5, 6],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lcfg)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_exception_tree() -> None:
    assert issubclass(_core.AdapterFormatError, _core.AdapterError)
    assert issubclass(_core.UnsupportedDtypeError, _core.AdapterFormatError)
    assert issubclass(_core.AdapterShapeError, _core.AloraError)
    assert issubclass(_core.ConfigError, ValueError)
    assert issubclass(_core.InvalidRequestError, ValueError)
    assert issubclass(_core.UnknownAdapterError, KeyError)
    for name in ("CapacityError", "DuplicateAdapterError", "AdapterBusyError", "StepError"):
        assert issubclass(getattr(_core, name), _core.AloraError)


def test_loads_peft_directory_with_zero_copy_views(peft_dir: Path) -> None:
    e = engine()
    info = e.load_adapter("judge", str(peft_dir))
    assert info.kind == "alora"
    assert info.invocation_tokens == [5, 6]
    assert info.rank == 4
    assert info.target_modules == ["q_proj", "v_proj", "down_proj"]
    assert info.module_rank(0, "down_proj") == 2
    assert info.module_rank(1, "k_proj") == 0
    assert info.module_ranks == [4, 0, 4, 0, 0, 0, 2]
    assert info.segment_scale == pytest.approx(8 / 2)
    assert info.scale(0, "q_proj") == pytest.approx(8 / 4)
    assert info.scale(0, "down_proj") == pytest.approx(8 / 2)
    # Registration read only the header: the weights come from read_adapter_weights.
    assert e.stats()["host_bytes"] == 0
    weights = _core.read_adapter_weights(info)
    assert weights.bytes == info.host_bytes > 0
    assert weights.weights(0, "k_proj") is None
    saved = tensors_of(peft_dir)
    for layer in range(LAYERS):
        a, b = weights.weights(layer, "q_proj")
        np.testing.assert_array_equal(a, saved[f"{PREFIX}.{layer}.self_attn.q_proj.lora_A.weight"])
        np.testing.assert_array_equal(b, saved[f"{PREFIX}.{layer}.self_attn.q_proj.lora_B.weight"])
    # Views of Rust memory: read-only, same buffer on every call, alive beyond the object.
    a1, _ = weights.weights(0, "q_proj")
    a2, _ = weights.weights(0, "q_proj")
    assert not a1.flags.writeable and not a1.flags.owndata
    assert np.shares_memory(a1, a2)
    del weights
    assert a1.sum() == pytest.approx(saved[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"].sum())
    with pytest.raises(ValueError):
        a1[0, 0] = 1.0


def test_half_precision_storage(peft_dir: Path, tmp_path: Path) -> None:
    for dt in (np.float16,):
        d = tmp_path / str(np.dtype(dt))
        d.mkdir()
        (d / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
        save_file(
            {k: v.astype(dt) for k, v in tensors_of(peft_dir).items()},
            str(d / "adapter_model.safetensors"),
        )
        info = engine().load_adapter("h", str(d))
        a, _ = _core.read_adapter_weights(info).weights(1, "v_proj")
        ref = tensors_of(peft_dir)[f"{PREFIX}.1.self_attn.v_proj.lora_A.weight"]
        np.testing.assert_array_equal(a, ref.astype(dt).astype(np.float32))


def test_load_from_tensors_matches_directory(peft_dir: Path) -> None:
    e = engine()
    cfg = (peft_dir / "adapter_config.json").read_text()
    info = e.load_adapter_from_tensors("mem", cfg, tensors_of(peft_dir))
    ref = engine().load_adapter("dir", str(peft_dir))
    mem_w = _core.read_adapter_weights(info).weights(1, "down_proj")
    dir_w = _core.read_adapter_weights(ref).weights(1, "down_proj")
    assert mem_w is not None and dir_w is not None
    np.testing.assert_array_equal(mem_w[1], dir_w[1])
    assert [a.name for a in e.adapters()] == ["mem"]


def copy_adapter(
    src: Path, dst: Path, *, tensors: dict | None = None, config: dict | None = None
) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(
        tensors if tensors is not None else tensors_of(src), str(dst / "adapter_model.safetensors")
    )
    return dst


def bad_adapters(src: Path, tmp: Path) -> list[tuple[str, Path, type[Exception], str]]:
    t = tensors_of(src)
    q_a = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    cases = []
    missing = dict(t)
    del missing[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"]
    cases.append(
        (
            "missing",
            copy_adapter(src, tmp / "missing", tensors=missing),
            _core.AdapterFormatError,
            "lora_B",
        )
    )
    extra = dict(t)
    extra["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, HIDDEN), np.float32)
    cases.append(
        (
            "extra",
            copy_adapter(src, tmp / "extra", tensors=extra),
            _core.AdapterFormatError,
            "lm_head",
        )
    )
    shape = dict(t)
    shape[q_a] = np.zeros((4, HIDDEN + 1), np.float32)
    cases.append(
        ("shape", copy_adapter(src, tmp / "shape", tensors=shape), _core.AdapterShapeError, "33")
    )
    dtype = dict(t)
    dtype[q_a] = t[q_a].astype(np.float64)
    cases.append(
        (
            "dtype",
            copy_adapter(src, tmp / "dtype", tensors=dtype),
            _core.UnsupportedDtypeError,
            "F64",
        )
    )
    cases.append(
        ("rank0", copy_adapter(src, tmp / "rank0", config={"r": 0}), _core.ConfigError, "r")
    )
    cases.append(
        (
            "emptyinv",
            copy_adapter(src, tmp / "emptyinv", config={"alora_invocation_tokens": []}),
            _core.ConfigError,
            "invocation",
        )
    )
    nofield = copy_adapter(src, tmp / "nofield")
    cfg = json.loads((nofield / "adapter_config.json").read_text())
    del cfg["target_modules"]
    (nofield / "adapter_config.json").write_text(json.dumps(cfg))
    cases.append(("nofield", nofield, _core.ConfigError, "target_modules"))
    trunc = copy_adapter(src, tmp / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("trunc", trunc, _core.AdapterFormatError, "adapter_model.safetensors"))
    corrupt = copy_adapter(src, tmp / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    cases.append(("corrupt", corrupt, _core.AdapterFormatError, "adapter_model.safetensors"))
    onlystring = copy_adapter(
        src,
        tmp / "onlystring",
        config={"alora_invocation_tokens": None, "invocation_string": "<judge>"},
    )
    cases.append(("onlystring", onlystring, _core.ConfigError, "invocation_string"))
    cases.append(("nodir", tmp / "does-not-exist", _core.AdapterFormatError, "does-not-exist"))
    return cases


def test_bad_adapters_raise_typed_errors_and_change_nothing(peft_dir: Path, tmp_path: Path) -> None:
    e = engine()
    e.load_adapter("good", str(peft_dir))
    before = (e.stats(), [a.name for a in e.adapters()])
    for label, path, exc, needle in bad_adapters(peft_dir, tmp_path):
        with pytest.raises(exc, match=needle):
            e.load_adapter(label, str(path))
        assert (e.stats(), [a.name for a in e.adapters()]) == before, label
    with pytest.raises(_core.DuplicateAdapterError):
        e.load_adapter("good", str(peft_dir))
    # The invocation_string-only adapter loads once the caller supplies tokens.
    onlystring = tmp_path / "onlystring"
    assert e.load_adapter(
        "tokenized", str(onlystring), invocation_tokens=[9]
    ).invocation_tokens == [9]


def test_shape_error_names_tensor_and_both_shapes(peft_dir: Path) -> None:
    wrong = [(n, p, i * 2, o) for n, p, i, o in MODULES]  # a model with another hidden size
    with pytest.raises(_core.AdapterShapeError) as err:
        engine(modules=wrong, block_size=8).load_adapter("x", str(peft_dir))
    msg = str(err.value)
    assert "lora_A.weight" in msg and "[4, 32]" in msg and "[4, 64]" in msg


def test_plan_and_commit_roundtrip(peft_dir: Path) -> None:
    e = engine()
    e.load_adapter("judge", str(peft_dir))
    base = e.add_request([1, 2, 3, 4, 9], max_new_tokens=2)
    judged = e.add_request(
        [1, 2, 3, 4, 5, 6, 7], adapter="judge", max_new_tokens=1, stop_token_ids=[0]
    )
    # The adapter's weights are on disk: the engine asks for them before it plans the call.
    info = e.adapter("judge")
    assert e.pending_fetches() == [info.id]
    e.install_weights(info.id, _core.read_adapter_weights(info))
    assert e.pending_fetches() == [] and e.stats()["host_adapters"] == 1
    p = e.schedule()
    assert p.num_seqs == 2 and p.num_tokens == 12
    assert p.input_ids.dtype == np.int64 and p.block_tables.dtype == np.int32
    assert p.block_tables.shape == (2, 2)
    assert list(p.request_ids) == [base, judged]
    assert list(p.query_start) == [0, 5, 12]
    # aLoRA: only tokens from the invocation (position 4) on get LoRA.
    assert list(p.token_adapter_slot) == [-1] * 5 + [-1] * 4 + [0] * 3
    assert list(p.sorted_token_idx) == [9, 10, 11]
    ((aid, row_start, rows, bt_rows, weights),) = p.adapter_loads
    assert aid == weights.adapter_id == info.id
    assert list(np.diff(row_start)) == info.module_ranks and len(rows) == len(bt_rows)
    assert list(p.adapter_rank) == info.module_ranks  # one segment, per module
    assert list(p.sample_seqs) == [0, 1]
    with pytest.raises(_core.StepError):
        e.commit(p.step_id, [1])
    with pytest.raises(_core.AdapterBusyError):
        e.unload_adapter("judge")
    outs = e.commit(p.step_id, [3, 0])
    assert [o.finished for o in outs] == [False, True]
    assert outs[1].finish_reason == "stop" and outs[1].output_tokens == [0]
    assert outs[1].lora_tokens == 3 and outs[1].computed_tokens == 7
    aborted = e.abort(base)
    assert aborted.finish_reason == "abort" and aborted.output_tokens == [3]
    assert e.stats()["used_blocks"] == 0
    e.unload_adapter("judge")
    assert e.adapters() == []


def test_bad_requests_change_nothing() -> None:
    e = engine(num_blocks=4)
    before = e.stats()
    with pytest.raises(_core.InvalidRequestError):
        e.add_request([])
    with pytest.raises(_core.InvalidRequestError):
        e.add_request([-1, 2])
    with pytest.raises(_core.InvalidRequestError):
        e.add_request([1], max_new_tokens=0)
    with pytest.raises(_core.CapacityError, match="KV blocks"):
        e.add_request(list(range(20)), max_new_tokens=4)
    with pytest.raises(_core.UnknownAdapterError):
        e.add_request([1], adapter="missing")
    with pytest.raises(_core.UnknownRequestError):
        e.abort(12345)
    with pytest.raises(_core.ConfigError):
        engine(block_size=0)
    assert e.stats() == before
    assert e.schedule() is None


def test_adapter_larger_than_pool_is_refused(peft_dir: Path) -> None:
    e = engine(adapter_block_cap=1)
    with pytest.raises(_core.CapacityError, match="raise device_memory"):
        e.load_adapter("big", str(peft_dir))
    assert e.adapters() == []


def test_activation_start_and_kernel_sources() -> None:
    assert _core.activation_start([1, 2, 1, 2, 3], [1, 2]) == 2
    assert _core.activation_start([1, 2], [3]) is None
    src = _core.kernel_sources()
    assert src and all(name.endswith((".cu", ".cuh")) for name in src)
    root = Path(__file__).resolve().parents[1] / "cuda"
    for name, text in src.items():
        assert (root / name).read_text() == text
