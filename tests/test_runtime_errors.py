"""Bad input gets a clear exception, and the runtime stays usable with no leaked blocks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import INV1, ArchSetup

import alora
from alora import AdapterRuntime
from alora.model import introspect
from alora.testing import (
    make_peft_adapter,
    make_peft_state_dict,
    set_invocation_string,
    tiny_model,
    tiny_tokenizer,
)


@pytest.fixture
def rt(arch_setup: Callable[[str], ArchSetup]) -> Iterator[AdapterRuntime]:
    runtime = arch_setup("llama").runtime(kv_cache_blocks=32)
    yield runtime
    runtime.detach()


def _idle(rt: AdapterRuntime) -> None:
    s = rt.stats()
    assert (s["used_blocks"], s["running"], s["waiting"]) == (0, 0, 0)


def _still_works(rt: AdapterRuntime) -> None:
    res = rt.generate([[20, 21, 22, 3, 4, 5, 23]], "alora_all", max_new_tokens=2, stop_token_ids=())
    assert len(res[0].token_ids) == 2
    _idle(rt)


def test_unknown_adapter_queues_nothing(rt: AdapterRuntime) -> None:
    with pytest.raises(alora.UnknownAdapterError, match="nope"):
        rt.generate([[20, 21], [22, 23]], [None, "nope"])
    with pytest.raises(KeyError):
        rt.add_request([20, 21], adapter="nope")
    _idle(rt)
    _still_works(rt)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=2.0),
        dict(top_k=-3),
        dict(max_new_tokens=0),
        dict(max_new_tokens=2.5),
    ],
)
def test_invalid_sampling_parameters(rt: AdapterRuntime, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        rt.generate([[20, 21, 22]], **kwargs)
    _idle(rt)
    assert rt.stats()["steps"] == 0


def test_bad_prompts(rt: AdapterRuntime) -> None:
    with pytest.raises(alora.InvalidRequestError, match="empty"):
        rt.generate([[]])
    with pytest.raises(ValueError, match="tokenizer"):
        rt.generate("a string without a tokenizer")
    with pytest.raises(alora.InvalidRequestError, match="vocabulary"):
        rt.generate([[20, 500]])
    with pytest.raises(alora.InvalidRequestError, match="max_model_len"):
        rt.generate([[20] * 256])  # the model has 256 positions
    with pytest.raises(alora.CapacityError, match="KV blocks"):
        rt.generate([[20] * 140], max_new_tokens=1)  # 32 blocks of 4 tokens
    with pytest.raises(ValueError, match="2 adapters for 1 prompts"):
        rt.generate([[20, 21]], [None, None])
    _idle(rt)
    _still_works(rt)


def test_adapter_for_another_base_model(
    rt: AdapterRuntime, tmp_path: Path, arch_setup: Callable[[str], ArchSetup]
) -> None:
    other = tiny_model("llama", hidden_size=96, head_dim=24)
    path = make_peft_adapter(other, tmp_path / "other", "lora", r=4, targets=("q_proj",))
    with pytest.raises(alora.AdapterShapeError) as err:
        rt.load_adapter("other", path)
    msg = str(err.value)
    # Names the tensor and both shapes.
    assert "q_proj" in msg and "lora_A" in msg
    assert "96" in msg and "64" in msg
    assert "other" not in rt.adapters
    _still_works(rt)


def test_adapter_loading_errors(
    rt: AdapterRuntime, tmp_path: Path, arch_setup: Callable[[str], ArchSetup]
) -> None:
    with pytest.raises(alora.DuplicateAdapterError):
        rt.load_adapter("lora_mlp", arch_setup("llama").dirs["lora_mlp"])  # name taken
    with pytest.raises(alora.AdapterError):
        rt.load_adapter("missing", tmp_path / "does_not_exist")
    # A format the engine does not read: pickled weights only.
    bin_dir = tmp_path / "bin"
    make_peft_adapter(tiny_model("llama"), bin_dir, "lora", r=2, targets=("q_proj",))
    (bin_dir / "adapter_model.safetensors").rename(bin_dir / "adapter_model.bin")
    with pytest.raises(alora.AdapterFormatError):
        rt.load_adapter("bin", bin_dir)
    with pytest.raises(ValueError, match="path or a state_dict"):
        rt.load_adapter("x")
    with pytest.raises(ValueError, match="config"):
        rt.load_adapter("x", state_dict={})
    _still_works(rt)


def test_invocation_string_needs_a_tokenizer(
    tmp_path: Path, arch_setup: Callable[[str], ArchSetup]
) -> None:
    setup = arch_setup("llama")
    tok = tiny_tokenizer()
    words = ["is", "it", "safe"]
    inv = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    path = make_peft_adapter(setup.model, tmp_path / "old", "alora", r=4, invocation_tokens=inv)
    set_invocation_string(path, " ".join(words))
    assert "alora_invocation_tokens" not in json.loads((path / "adapter_config.json").read_text())
    with AdapterRuntime(setup.model, kv_cache_blocks=32, adapter_rows=16) as rt:
        with pytest.raises(alora.ConfigError, match="tokenizer"):
            rt.load_adapter("old", path)
        assert rt.load_adapter("old", path, invocation_tokens=inv).invocation_tokens == inv
    with AdapterRuntime(setup.model, tok, kv_cache_blocks=32, adapter_rows=16) as rt:
        info = rt.load_adapter("old", path)
        assert info.kind == "alora" and info.invocation_tokens == inv


def test_unload_busy_adapter_and_abort(rt: AdapterRuntime) -> None:
    rid = rt.add_request([20, 21, 22, 3, 4, 5, 30], adapter="alora_all", max_new_tokens=50)
    rt.step()
    assert rt.stats()["used_blocks"] > 0
    with pytest.raises(alora.AdapterBusyError):
        rt.unload_adapter("alora_all")
    res = rt.abort(rid)
    assert res.finish_reason == "abort"
    _idle(rt)
    rt.unload_adapter("alora_all")
    assert "alora_all" not in rt.adapters
    with pytest.raises(alora.UnknownAdapterError):
        rt.unload_adapter("alora_all")
    with pytest.raises(alora.UnknownRequestError):
        rt.abort(rid)


def test_adapter_larger_than_pool(tmp_path: Path) -> None:
    model = tiny_model("llama")
    path = make_peft_adapter(model, tmp_path / "big", "lora", r=32, targets=("q_proj",))
    unit = introspect(model).kv_bytes_per_block(16)
    # 32 rank rows of q (A and Bt, 64 elements each) take 4 units of 2 x 16 x 32 elements.
    with AdapterRuntime(model, kv_cache_blocks=16, adapter_memory=3 * unit) as rt:
        with pytest.raises(alora.CapacityError, match="needs 4 memory units"):
            rt.load_adapter("big", path)
        assert rt.adapters == {}
    with AdapterRuntime(model, kv_cache_blocks=16, adapter_memory=4 * unit) as rt:
        rt.load_adapter("big", path)
        assert rt.generate([[5, 6, 7]], "big", max_new_tokens=1)[0].finish_reason == "length"
        assert rt.stats()["adapter_blocks"] == 4


def test_failed_forward_releases_everything(rt: AdapterRuntime) -> None:
    class Boom(Exception):
        pass

    class FailingBackend:
        name = "failing"

        def add_lora(self, *args: object) -> None:
            raise Boom

    good = rt.backend
    rt.backend = FailingBackend()  # type: ignore[assignment]
    # The engine loop retries a failing step, then fails its requests with the cause.
    results = rt.generate(
        [[20, 21, 22, 3, 4, 5, 30], [40, 41]], ["alora_all", None], max_new_tokens=3
    )
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all(isinstance(r.error, Boom) for r in results)
    _idle(rt)
    # The manual loop rolls the step back and raises; the requests stay queued, intact.
    rid = rt.add_request([20, 21, 22, 3, 4, 5, 30], adapter="alora_all", max_new_tokens=3)
    with pytest.raises(Boom):
        rt.step()
    assert rt.stats()["waiting"] == 1 and rt.stats()["used_blocks"] == 0
    rt.backend = good
    while rt.has_unfinished():
        rt.step()
    _still_works(rt)
    del rid


def test_state_dict_loading_matches_directory(
    arch_setup: Callable[[str], ArchSetup], tmp_path: Path
) -> None:
    setup = arch_setup("qwen2")
    config, state = make_peft_state_dict(
        setup.model, "alora", seed=1, r=4, targets=("q_proj", "down_proj"), invocation_tokens=INV1
    )
    path = make_peft_adapter(
        setup.model,
        tmp_path / "same",
        "alora",
        seed=1,
        r=4,
        targets=("q_proj", "down_proj"),
        invocation_tokens=INV1,
    )
    prompt = [30, 31, 32, 33, 34, *INV1, 40]
    with AdapterRuntime(setup.model, kv_cache_blocks=32, adapter_rows=16) as rt:
        rt.load_adapter("from_dict", state_dict=state, config=config)
        rt.load_adapter(
            "from_json", state_dict=state, config=json.dumps(config.to_dict(), default=list)
        )
        rt.load_adapter("from_dir", path)
        out = rt.generate(
            [prompt] * 3,
            ["from_dict", "from_json", "from_dir"],
            max_new_tokens=3,
            return_logits=True,
        )
    for res in out[1:]:
        assert res.token_ids == out[0].token_ids
        torch.testing.assert_close(torch.stack(res.logits), torch.stack(out[0].logits))
    ref = setup.ref.logits(prompt + out[2].token_ids[:-1], path, prompt_len=len(prompt))
    torch.testing.assert_close(
        torch.stack(out[2].logits), ref[len(prompt) - 1 :], atol=1e-4, rtol=1e-4
    )
