"""Shared fixtures: tiny random models per architecture and PEFT adapters made from them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "alora",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "alora"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def adapter_dir_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    return make


INV1 = [3, 4, 5]  # invocation of "alora_all"
INV2 = [6, 7]  # invocation of "alora_qv"
# A mixed batch over the `arch_setup` adapters: aLoRA on all modules, LoRA on the MLP, aLoRA
# on q/v only, the base model, and a rank/alpha pattern.
MIXED_PROMPTS = [
    [20, 21, 22, *INV1, 23, 24],
    [40, 41, 42, 43, 44, 45, 46],
    [30, *INV2, 31, 32],
    [50, 51, 52, 53],
    [60, 61, *INV1],
]
MIXED_ADAPTERS = ["alora_all", "lora_mlp", "alora_qv", None, "lora_pattern"]
PROMPT_LOW = 10  # random prompt tokens lie in [PROMPT_LOW, vocab): no accidental invocation


class ArchSetup:
    """A tiny model of one architecture, PEFT adapters saved to disk, and the PEFT oracle."""

    def __init__(self, arch: str, root: Path, **overrides: object) -> None:
        from alora.testing import ALL_TARGETS, PeftReference, make_peft_adapter, tiny_model

        self.arch = arch
        self.model = tiny_model(arch, seed=0, **overrides)
        self.dirs: dict[str | None, Path | None] = {None: None}
        specs: dict[str, dict] = {
            "alora_all": dict(
                kind="alora", r=4, targets=ALL_TARGETS, invocation_tokens=INV1, seed=1
            ),
            "alora_qv": dict(
                kind="alora",
                r=8,
                alpha=8,
                targets=("q_proj", "v_proj"),
                invocation_tokens=INV2,
                seed=2,
            ),
            "lora_mlp": dict(
                kind="lora",
                r=6,
                targets=("o_proj", "gate_proj", "up_proj", "down_proj"),
                use_rslora=True,
                seed=3,
            ),
            "lora_pattern": dict(
                kind="lora",
                r=4,
                targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                rank_pattern={"k_proj": 2, "down_proj": 8},
                alpha_pattern={"v_proj": 3.0},
                layers_to_transform=[1],
                seed=4,
            ),
        }
        for name, kw in specs.items():
            self.dirs[name] = make_peft_adapter(self.model, root / name, **kw)
        self.ref = PeftReference(self.model)

    @property
    def adapter_names(self) -> list[str]:
        return [n for n in self.dirs if n is not None]

    def runtime(self, **kwargs: object):  # type: ignore[no-untyped-def]
        from alora import AdapterRuntime

        opts: dict = dict(block_size=4, max_batch_tokens=64)
        if "device_memory" not in kwargs:  # else one pool, no caps unless given
            if "kv_cache_memory" not in kwargs:
                opts["kv_cache_blocks"] = 256
            if "adapter_memory" not in kwargs:
                opts["adapter_rows"] = 64
        opts.update(kwargs)
        rt = AdapterRuntime(self.model, **opts)
        for name in self.adapter_names:
            rt.load_adapter(name, self.dirs[name])
        return rt

    def check(
        self,
        prompts: list[list[int]],
        adapters: list[str | None],
        results: list,
        *,
        atol: float = 1e-4,
    ) -> None:
        """Every result's logits and greedy tokens equal PEFT's from-scratch forward."""
        assert len(results) == len(prompts)
        for prompt, adapter, res in zip(prompts, adapters, results, strict=True):
            assert res.logits is not None and len(res.logits) == len(res.token_ids)
            full = prompt + res.token_ids
            ref = self.ref.logits(full[:-1], self.dirs[adapter], prompt_len=len(prompt))
            expected = ref[len(prompt) - 1 :]
            got = torch.stack(res.logits)
            torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
            assert res.token_ids == expected.argmax(-1).tolist()


_SETUPS: dict[str, ArchSetup] = {}


@pytest.fixture(scope="session")
def emu_executor() -> object:
    """The CPU emulator of the CUDA kernels (`alora.kernels.emulate.EmuExecutor`), built once
    per session. It needs a host C++20 compiler; the test environment (`.ci/run`, the dev
    setup) has g++, so the skip only applies to machines set up without one."""
    from alora.kernels import emulate

    if emulate.compiler() is None:
        pytest.skip("no host C++ compiler for the kernel emulator")
    return emulate.EmuExecutor()


@pytest.fixture(scope="session")
def arch_setup(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ArchSetup]:
    def get(arch: str, **overrides: object) -> ArchSetup:
        key = f"{arch}{sorted(overrides.items())}"
        if key not in _SETUPS:
            root = tmp_path_factory.mktemp(f"adapters_{arch}")
            _SETUPS[key] = ArchSetup(arch, root, **overrides)
        return _SETUPS[key]

    return get
