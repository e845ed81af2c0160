"""GPU tests of the CUDA kernels: each kernel (both forms, every dtype, fused and single) against
the float64 torch reference over hypothesis-drawn shapes, V poisoned before the launch, inactive
tokens bit-identical; fused launches with per-module row lists (the runtime's layout), expanded
together or module by module from slices of V; grid limits at large token counts; the runtime
end to end on CUDA with the CUDA backend against the CPU reference, and with q/k/v and gate/up
fused in the hooks. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alora.kernels._testutil import Case, check_case, make_inputs, reference_y, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available())"
    ),
]
pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'alora[cuda]')")

from alora.kernels import default_backend  # noqa: E402
from alora.kernels import launch as kl  # noqa: E402
from alora.kernels.launch import CudaBackend  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def backend() -> CudaBackend:
    # sync_check: an execution error is reported at the launch that caused it
    return CudaBackend("cuda", sync_check=True)


@st.composite
def cases(draw: st.DrawFn, distinct_rows: bool = False) -> Case:
    nseg = draw(st.integers(1, 12))
    segs = tuple(
        (
            draw(st.one_of(st.integers(0, 4), st.integers(0, 300))),
            draw(st.one_of(st.integers(0, 128), st.sampled_from([1, 8, 16, 64, 128]))),
        )
        for _ in range(nseg)
    )
    form = draw(st.sampled_from([None, None, "dec", "seg"]))
    max_ks = 2048 if form == "dec" else 1024
    return Case(
        dtype=draw(st.sampled_from(DTYPES)),
        segs=segs,
        inactive=draw(st.integers(0, 64)),
        in_features=draw(st.one_of(st.integers(1, 5000), st.sampled_from([3424, 4096, 4097]))),
        out_features=tuple(
            draw(st.one_of(st.integers(1, 5000), st.sampled_from([1024, 3424, 4096])))
            for _ in range(draw(st.integers(1, 3)))
        ),
        extra_rows=draw(st.integers(0, 16)),
        misalign=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        form=form,
        ks=draw(st.one_of(st.none(), st.sampled_from([k for k in (256, 1024) if k <= max_ks]))),
        granularity=draw(st.one_of(st.none(), st.integers(1, 300), st.sampled_from([64, 192]))),
        distinct_rows=distinct_rows,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_kernels_match_float64_reference(backend: CudaBackend, case: Case) -> None:
    check_case(backend, case, "cuda")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(distinct_rows=True), expand_each=st.booleans())
def test_fused_per_module_rows_match_float64_reference(
    backend: CudaBackend, case: Case, expand_each: bool
) -> None:
    # One batch per module (own A and Bt row ids, one arena for all modules with a
    # granularity); one fused shrink, expand fused or each module from its slice of V.
    check_case(backend, case, "cuda", expand_each=expand_each)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["dec", "seg"])
@pytest.mark.parametrize("expand_each", [False, True], ids=["fused-expand", "expand-each"])
@pytest.mark.parametrize(
    "case",
    [
        # Llama-8B q/k/v at decode, rows in one arena (g = 192), every module its own rows
        Case(torch.float16, tuple((1, 16) for _ in range(32)), 8, 4096, (4096, 1024, 1024)),
        # gate/up of a prefill chunk, unaligned arena rows (scalar loads)
        Case(torch.float16, ((40, 64), (7, 8), (3, 128)), 3, 1000, (2816, 2816), granularity=5),
    ],
    ids=["qkv-decode", "gate-up-prefill"],
)
def test_fused_per_module_rows_shapes(
    backend: CudaBackend, case: Case, form: str, dtype: torch.dtype, expand_each: bool
) -> None:
    gran = case.granularity or 192
    fields = {**case.__dict__, "dtype": dtype, "form": form, "granularity": gran}
    check_case(backend, Case(**{**fields, "distinct_rows": True}), "cuda", expand_each=expand_each)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["dec", "seg"])
@pytest.mark.parametrize(
    "case",
    [
        Case(torch.float16, tuple((1, 16) for _ in range(64)), 32, 4096, (4096,)),
        Case(torch.float16, tuple((64, 8 * (i + 1)) for i in range(8)), 16, 4096, (4096,)),
        Case(torch.float16, ((5, 128), (3, 1), (9, 37)), 7, 3424, (3424, 1024, 1024)),
        Case(torch.float16, ((2, 128),), 1, 1, (1,)),
        # the runtime's layout: pools are strided views of the KV cache (SmolLM2's g = 192)
        Case(torch.float16, tuple((1, 16) for _ in range(32)), 8, 576, (576, 192), granularity=192),
        Case(torch.float16, ((40, 64), (7, 8)), 3, 4096, (4096, 1024), granularity=5),
    ],
    ids=[
        "decode-64-adapters",
        "prefill-8-adapters",
        "odd-hidden-fused-qkv",
        "size-one",
        "arena-decode",
        "arena-unaligned",
    ],
)
def test_kernel_shapes(backend: CudaBackend, case: Case, form: str, dtype: torch.dtype) -> None:
    check_case(backend, Case(**{**case.__dict__, "dtype": dtype, "form": form}), "cuda")


def test_large_token_counts_respect_grid_limits(backend: CudaBackend) -> None:
    # More token tiles than gridDim.y/z allow (65535) in both kernels: the grid-stride loops.
    case = Case(torch.float16, ((1_100_000, 4), (3, 2)), 1000, 24, (40,), form="seg")
    check_case(backend, case, "cuda")


def test_runs_on_torch_current_stream(backend: CudaBackend) -> None:
    inp = make_inputs(Case(torch.bfloat16, ((300, 16), (2, 8)), 5, 2048, (2048,)), "cuda")
    y0 = inp.ys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.add_lora(inp.ys[0], inp.x, inp.a_pools[0], inp.bt_pools[0], inp.batch)
        got = inp.ys[0].clone()  # ordered after the kernels only if they ran on `side`
    torch.cuda.current_stream().wait_stream(side)
    ref = reference_y(y0, inp.x, inp.a_pools[0], inp.bt_pools[0], inp.batch)
    act = inp.batch.token_idx
    assert rel_err(got[act], ref[act.cpu()]) <= 1e-2


def test_rank_above_128_raises_before_launch(backend: CudaBackend) -> None:
    inp = make_inputs(Case(torch.float16, ((2, 129),), 1, 64, (64,)), "cuda")
    y0 = inp.ys[0].clone()
    with pytest.raises(ValueError, match="maximum rank of 128"):
        backend.add_lora(inp.ys[0], inp.x, inp.a_pools[0], inp.bt_pools[0], inp.batch)
    assert torch.equal(inp.ys[0], y0)


def test_default_backend_is_cuda_on_a_gpu() -> None:
    b = default_backend(torch.device("cuda"))
    assert isinstance(b, CudaBackend) and b.name == "cuda"


def _cpu_and_cuda(
    setup: object,
    prompts: list[list[int]],
    adapters: list[str | None],
    backend: CudaBackend | None = None,
) -> tuple[list, list, object]:
    """(expected, got, cuda model): the same greedy generation with logits on the CPU runtime
    and on a CUDA copy of the model (`backend`: its LoRA backend, else the default)."""
    from alora import AdapterRuntime

    kw = dict(max_new_tokens=6, stop_token_ids=(), return_logits=True)
    cpu_rt = setup.runtime()  # type: ignore[attr-defined]
    try:
        expected = cpu_rt.generate(prompts, adapters, **kw)
    finally:
        cpu_rt.detach()
    model = copy.deepcopy(setup.model).to("cuda")  # type: ignore[attr-defined]
    rt = AdapterRuntime(
        model,
        block_size=4,
        kv_cache_blocks=256,
        adapter_rows=64,
        max_batch_tokens=64,
        lora_backend=backend,
    )
    try:
        assert isinstance(rt.backend, CudaBackend), "CUDA models get the CUDA backend"
        for name in setup.adapter_names:  # type: ignore[attr-defined]
            rt.load_adapter(name, setup.dirs[name])  # type: ignore[attr-defined]
        got = rt.generate(prompts, adapters, **kw)
    finally:
        rt.detach()
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close(
            torch.stack(g.logits).cpu(), torch.stack(e.logits), atol=1e-3, rtol=1e-3
        )
    return expected, got, model


def test_runtime_end_to_end_cuda_matches_cpu(arch_setup: Callable[..., object]) -> None:
    from conftest import MIXED_ADAPTERS, MIXED_PROMPTS

    expected, got, _ = _cpu_and_cuda(arch_setup("llama"), MIXED_PROMPTS, MIXED_ADAPTERS)
    for e, g in zip(expected, got, strict=True):
        assert g.lora_tokens == e.lora_tokens


def test_runtime_fuses_qkv_and_gate_up_on_cuda(arch_setup: Callable[..., object]) -> None:
    # Adapters on q/k/v alike next to an MLP-only LoRA and a base request: every layer's
    # q/k/v share one shrink launch (nmod 3), gate/up another (nmod 2); results as on the CPU.
    from conftest import INV1

    prompts = [[20, 21, 22, *INV1, 23, 24], [40, 41, 42, 43, 44, 45, 46], [50, 51, 52, 53]]
    dev = torch.device("cuda", torch.cuda.current_device())
    inner = kl._CudaExecutor(dev, sync_check=True)
    launches: list[kl.Launch] = []

    def record(launch: kl.Launch) -> None:
        launches.append(launch)
        inner(launch)

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    backend = CudaBackend(dev, executor=record, num_sms=sms)
    _, _, model = _cpu_and_cuda(
        arch_setup("llama"), prompts, ["alora_all", "lora_mlp", None], backend
    )
    nmods = [ln.named()["nmod"] for ln in launches if "_shrink_" in ln.kernel]
    layers = model.config.num_hidden_layers  # type: ignore[attr-defined]
    assert nmods.count(3) > 0 and nmods.count(3) % layers == 0
    assert nmods.count(2) > 0 and nmods.count(2) % layers == 0
