"""Group fusion in the LoRA hooks: with a backend that has `fuse_groups` (the CUDA kernels, run
here by the CPU emulator), q/k/v and gate/up of a layer share one shrink launch and each module
expands its own slice of V in its own hook. Checked at the hook level (any hook order, a member
that sees another x, x changed in place, a module called twice, inference tensors) and through
`AdapterRuntime` against the same runtime on `TorchBackend`."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from alora.backend import LoraBatch, TorchBackend
from alora.kernels._testutil import Case, make_inputs, rel_err
from alora.lora import LoraHooks, LoraStep, fusion_groups, lora_step
from alora.model import ModuleSpec

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'alora[cuda]')")
from alora.kernels import launch as kl

QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture
def executor(emu_executor: Any) -> Any:
    return emu_executor


@pytest.fixture
def emu(executor: Any) -> Iterator[kl.CudaBackend]:
    executor.launches.clear()
    yield kl.CudaBackend("cpu", executor=executor, num_sms=16)


def _geometry(specs: list[ModuleSpec]) -> Any:
    return SimpleNamespace(modules=tuple(specs))  # all LoraHooks and fusion_groups read


def test_fusion_groups_from_the_geometry() -> None:
    def spec(name: str, path: str, i: int = 64) -> ModuleSpec:
        return ModuleSpec(name, path, i, 32)

    llama = [
        spec("q_proj", "self_attn.q_proj"),
        spec("k_proj", "self_attn.k_proj"),
        spec("v_proj", "self_attn.v_proj"),
        spec("o_proj", "self_attn.o_proj"),  # q's in_features, another input: no group
        spec("gate_proj", "mlp.gate_proj"),
        spec("up_proj", "mlp.up_proj"),
        spec("down_proj", "mlp.down_proj", 128),
    ]
    groups = fusion_groups(_geometry(llama))
    assert groups == {
        **dict.fromkeys(QKV, QKV),
        **dict.fromkeys(("gate_proj", "up_proj"), ("gate_proj", "up_proj")),
    }
    # only q and v present; an "up_proj" under another parent or width finds no partner
    odd = [spec("q_proj", "attn.q_proj"), spec("v_proj", "attn.v_proj")]
    odd += [spec("gate_proj", "mlp.gate_proj"), spec("up_proj", "mlp2.up_proj")]
    odd += [spec("k_proj", "attn.k_proj", 48)]
    assert fusion_groups(_geometry(odd)) == dict.fromkeys(
        ("q_proj", "v_proj"), ("q_proj", "v_proj")
    )


def test_fusion_groups_of_the_tiny_architectures() -> None:
    from alora.model import introspect
    from alora.testing import ARCHS, tiny_model

    for arch in ARCHS:
        groups = fusion_groups(introspect(tiny_model(arch)))
        assert groups["k_proj"] == QKV and groups["up_proj"] == ("gate_proj", "up_proj"), arch
        assert "o_proj" not in groups and "down_proj" not in groups, arch


# ------------------------------------------------------------------------- hook level


class _Attn(nn.Module):
    """q/k/v linears called in a chosen order; `per_call(name, x)` may hand one of them
    another tensor (or change x in place) before its call."""

    def __init__(self, in_f: int, outs: tuple[int, ...]) -> None:
        super().__init__()
        for name, o in zip(QKV, outs, strict=True):
            self.add_module(name, nn.Linear(in_f, o, bias=False))
        self.order: tuple[str, ...] = QKV
        self.per_call: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, x: x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n)(self.per_call(n, x)) for n in self.order}


class _Layer(nn.Module):
    def __init__(self, attn: _Attn) -> None:
        super().__init__()
        self.self_attn = attn


class _Harness:
    """One decoder layer of three fusable modules, with a per-module batch each (own A and Bt
    rows in one arena, as the runtime's), hooked by LoraHooks."""

    def __init__(self, case: Case) -> None:
        self.inp = make_inputs(case)
        in_f, outs = case.in_features, case.out_features
        torch.manual_seed(0)
        self.attn = _Attn(in_f, outs).to(case.dtype)
        specs = [ModuleSpec(n, f"self_attn.{n}", in_f, o) for n, o in zip(QKV, outs, strict=True)]
        self.owner = object()
        self.hooks = LoraHooks(self.owner, nn.ModuleList([_Layer(self.attn)]), _geometry(specs))
        self.hooks.activate(QKV)
        self.pools = SimpleNamespace(  # the per-layer views the hooks read
            a_layers={n: (a,) for n, a in zip(QKV, self.inp.a_pools, strict=True)},
            bt_layers={n: (b,) for n, b in zip(QKV, self.inp.bt_pools, strict=True)},
        )
        self.batches: dict[str, LoraBatch | None] = dict(zip(QKV, self.inp.batches, strict=True))

    def step(self, backend: Any) -> LoraStep:
        return LoraStep(self.owner, self.batches, self.pools, backend)  # type: ignore[arg-type]

    def run(self, backend: Any, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.inp.x[None] if x is None else x
        with lora_step(self.step(backend)) as st:
            out = self.attn(x)
        assert not st.fused, "every stashed shrink was consumed"
        return {n: y.reshape(-1, y.shape[-1]) for n, y in out.items()}

    def expected(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each module on its own (the torch reference), from the input it really got."""
        want = {}
        for m, n in enumerate(QKV):
            if self.batches[n] is None:
                continue
            x2d = inputs[n].reshape(-1, inputs[n].shape[-1])
            y = getattr(self.attn, n)(x2d).detach().clone()
            a, b = self.inp.a_pools[m], self.inp.bt_pools[m]
            TorchBackend().add_lora(y, x2d, a, b, self.batches[n])  # type: ignore[arg-type]
            want[n] = y
        return want


def _shrinks(executor: Any) -> list[int]:
    """nmod of every shrink launch recorded so far."""
    return [ln.named()["nmod"] for ln in executor.launches if "_shrink_" in ln.kernel]


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert set(got) >= set(want)
    for n, w in want.items():
        assert rel_err(got[n], w) <= tol, n


CASE = Case(
    torch.float32,
    ((3, 8), (1, 4), (5, 16)),
    2,
    96,
    (96, 48, 48),
    granularity=40,
    distinct_rows=True,
)


@pytest.mark.parametrize("order", list(itertools.permutations(QKV)), ids="-".join)
def test_any_hook_order_runs_one_shrink(
    emu: kl.CudaBackend, executor: Any, order: tuple[str, ...]
) -> None:
    h = _Harness(CASE)
    h.attn.order = order
    got = h.run(emu)
    assert _shrinks(executor) == [3], "q/k/v: one shrink for all three"
    expands = [ln.named() for ln in executor.launches if "_expand_" in ln.kernel]
    assert len(expands) == 3 and all(e["y1"] == 0 for e in expands), "one expand per module"
    _close(got, h.expected(dict.fromkeys(QKV, h.inp.x)), 1e-5)


def test_a_member_with_another_input_goes_alone(emu: kl.CudaBackend, executor: Any) -> None:
    h = _Harness(CASE)
    other = h.inp.x[None] * 0.5
    h.attn.per_call = lambda name, x: other if name == "k_proj" else x
    got = h.run(emu)
    assert sorted(_shrinks(executor)) == [1, 3], "the fused shrink's k slice goes unused"
    _close(got, h.expected({"q_proj": h.inp.x, "k_proj": other, "v_proj": h.inp.x}), 1e-5)


def test_x_changed_in_place_between_members(emu: kl.CudaBackend, executor: Any) -> None:
    # Outside inference mode x has a version counter: k and v see x after the change (an
    # equal-looking tensor object, new values) and must not use the shrink q's hook ran.
    h = _Harness(CASE)
    x = h.inp.x[None].clone()
    seen: dict[str, torch.Tensor] = {}

    def per_call(name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "k_proj":
            t.mul_(2.0)
        seen[name] = t.clone()
        return t

    h.attn.per_call = per_call
    with torch.no_grad():
        got = h.run(emu, x)
    assert sorted(_shrinks(executor)) == [1, 1, 3]
    _close(got, h.expected(seen), 1e-5)


def test_inference_mode_and_a_module_called_twice(emu: kl.CudaBackend, executor: Any) -> None:
    h = _Harness(CASE)
    h.attn.order = ("q_proj", "k_proj", "q_proj", "v_proj")  # q again: adds its delta again
    with torch.inference_mode():
        x = h.inp.x[None].clone()
        got = h.run(emu, x)
    assert sorted(_shrinks(executor)) == [1, 3]  # the second q call goes alone
    _close(got, h.expected(dict.fromkeys(QKV, h.inp.x)), 1e-5)


def _lower_rank(batch: LoraBatch, seg: int, rank: int) -> LoraBatch:
    """The batch with segment `seg` at a lower rank (its first `rank` rows), as a module of
    an adapter with a rank pattern gets: the same tokens, other ranks and row offsets."""
    from dataclasses import replace

    ranks = list(batch.seg_rank_host)
    starts = batch.seg_row_start_host
    keep = [j for a in range(len(ranks)) for j in range(starts[a], starts[a] + ranks[a])]
    keep = [j for j in keep if not (starts[seg] + rank <= j < starts[seg + 1])]
    ranks[seg] = rank
    rstarts = [0]
    for r in ranks:
        rstarts.append(rstarts[-1] + r)
    idx = torch.tensor(keep)
    assert batch.bt_rows is not None
    return replace(
        batch,
        seg_rank=torch.tensor(ranks, dtype=torch.int32),
        seg_row_start=torch.tensor(rstarts, dtype=torch.int32),
        rows=batch.rows[idx].clone(),
        bt_rows=batch.bt_rows[idx].clone(),
        rows_host=None,
        bt_rows_host=None,
        seg_rank_host=tuple(ranks),
        seg_row_start_host=tuple(rstarts),
        max_rank=max(ranks),
    )


def test_only_members_with_shared_segments_fuse(emu: kl.CudaBackend, executor: Any) -> None:
    h = _Harness(CASE)
    k = h.batches["k_proj"]
    assert k is not None
    # k's adapter has a lower rank for the middle segment (a rank pattern): q and v fuse
    h.batches["k_proj"] = _lower_rank(k, 1, 2)
    got = h.run(emu)
    assert sorted(_shrinks(executor)) == [1, 2]
    _close(got, h.expected(dict.fromkeys(QKV, h.inp.x)), 1e-5)
    # k inactive this step (its adapters do not target it): q and v fuse all the same
    executor.launches.clear()
    h.batches["k_proj"] = None
    got = h.run(emu)
    assert _shrinks(executor) == [2]
    _close(got, h.expected(dict.fromkeys(QKV, h.inp.x)), 1e-5)


def test_backends_without_fuse_groups_run_each_module() -> None:
    h = _Harness(CASE)
    calls: list[int] = []

    class Recording(TorchBackend):
        def add_lora(self, *args: Any) -> None:
            calls.append(1)
            super().add_lora(*args)

    got = h.run(Recording())
    assert len(calls) == 3 and not hasattr(TorchBackend(), "fuse_groups")
    _close(got, h.expected(dict.fromkeys(QKV, h.inp.x)), 1e-5)
    # another runtime's hooks, or none active: nothing happens
    with lora_step(LoraStep(object(), h.batches, h.pools, Recording())):  # type: ignore[arg-type]
        h.attn(h.inp.x[None])
    assert len(calls) == 3


# ------------------------------------------------------------------------- runtime level


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, LoraBatch | None]]:
    """Every step's batches (kept alive, so their row tensors' addresses stay unique; a step
    whose plan repeats the last one's gets the same batches again)."""
    import alora.lora

    steps: list[dict[str, LoraBatch | None]] = []
    real = alora.lora.LoraBatchCache.get

    def spy(self: Any, *args: Any, **kwargs: Any) -> dict[str, LoraBatch | None]:
        steps.append(real(self, *args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(alora.lora.LoraBatchCache, "get", spy)
    return steps


def _shrink_modules(
    launches: list[kl.Launch], steps: list[dict[str, LoraBatch | None]]
) -> Counter[tuple[str, ...]]:
    """Per shrink launch, the modules whose A rows it read (from the rows0-2 pointers)."""
    name_of = {
        b.rows.data_ptr(): n for st in steps for n, b in st.items() if b is not None
    }  # fmt: skip
    out: Counter[tuple[str, ...]] = Counter()
    for ln in launches:
        if "_shrink_" in ln.kernel:
            a = ln.named()
            out[tuple(name_of[a[f"rows{m}"]] for m in range(a["nmod"]))] += 1
    return out


def _generate(rt: Any, prompts: list[list[int]], adapters: list[str | None]) -> list[Any]:
    try:
        return rt.generate(  # type: ignore[no-any-return]
            prompts, adapters, max_new_tokens=4, stop_token_ids=(), return_logits=True
        )
    finally:
        rt.detach()


def _same(got: list[Any], want: list[Any]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.lora_tokens == w.lora_tokens
        torch.testing.assert_close(
            torch.stack(g.logits), torch.stack(w.logits), atol=1e-4, rtol=1e-4
        )


def test_runtime_with_fused_groups_matches_torch_backend(
    arch_setup: Callable[..., Any],
    emu: kl.CudaBackend,
    executor: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conftest import INV1, MIXED_ADAPTERS, MIXED_PROMPTS

    setup = arch_setup("llama")
    layers = setup.model.config.num_hidden_layers
    # 1. Adapters on q/k/v alike (alora_all, rank 4) next to an MLP-only LoRA (rank 6) and a
    #    base request: q/k/v share one shrink per layer, gate/up another.
    prompts = [[20, 21, 22, *INV1, 23, 24], [40, 41, 42, 43, 44, 45, 46], [50, 51, 52, 53]]
    adapters = ["alora_all", "lora_mlp", None]
    want = _generate(setup.runtime(), prompts, adapters)
    steps = _record_batches(monkeypatch)
    got = _generate(setup.runtime(lora_backend=emu), prompts, adapters)
    _same(got, want)

    def steps_of(name: str) -> int:
        return sum(st[name] is not None for st in steps)

    assert steps_of("q_proj") >= 2  # the prefill and decode steps of the aLoRA request
    assert _shrink_modules(executor.launches, steps) == {
        QKV: layers * steps_of("q_proj"),  # one shrink launch for q, k and v of a layer
        ("o_proj",): layers * steps_of("o_proj"),
        ("gate_proj", "up_proj"): layers * steps_of("up_proj"),
        ("down_proj",): layers * steps_of("down_proj"),
    }
    # 2. Every kind at once: base, LoRA, aLoRA, an adapter on q/v only (rank 8) and one with
    #    k at rank 2 (rank pattern). k's segments then differ from q's and v's: q and v fuse,
    #    k goes alone (gate/up still fuse).
    prompts, adapters = MIXED_PROMPTS, MIXED_ADAPTERS
    want = _generate(setup.runtime(), prompts, adapters)
    executor.launches.clear()
    steps.clear()
    got = _generate(setup.runtime(lora_backend=emu), prompts, adapters)
    _same(got, want)
    shrinks = _shrink_modules(executor.launches, steps)
    assert shrinks[("q_proj", "v_proj")] > 0 and shrinks[("k_proj",)] > 0
    assert ("q_proj",) not in shrinks and ("v_proj",) not in shrinks
    assert shrinks[("gate_proj", "up_proj")] == layers * steps_of("up_proj")
