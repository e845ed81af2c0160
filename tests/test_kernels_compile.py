"""CPU tests of the CUDA kernels (no GPU needed).

1. NVRTC compiles every kernel, every dtype instantiation, for sm_80, sm_89 and sm_90 with no
   spills and no stack frame, read from ptxas's verbose log (registers > 0 must be reported, so
   a log that stopped matching cannot pass as "no spills").
2. The disk cache, the source provider, `alora check-kernels`, lazy imports.
3. The kernels themselves, run by the CPU emulator (`alora.kernels.emulate`) through the same
   launch planning as on a GPU, against a float64 reference over hypothesis-drawn shapes, on
   contiguous pools and on the runtime's layout (overlapping strided views, NaN between rows).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alora.kernels as K
from alora.backend import TorchBackend
from alora.kernels._testutil import Case, check_case, make_inputs, rel_err

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'alora[cuda]')")

from alora.kernels import compile as kc
from alora.kernels import launch as kl

ARCHS = ("sm_80", "sm_89", "sm_90")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "kcache"
    monkeypatch.setenv("ALORA_KERNEL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def compiled() -> dict[str, kc.CompiledModule]:
    return {arch: kc.compile_cubin(arch, use_cache=False) for arch in ARCHS}


# ---------------------------------------------------------------------------- compilation


def test_sources_come_from_the_extension() -> None:
    from alora import _core

    srcs = K.sources()
    assert srcs == dict(_core.kernel_sources())
    assert K.KERNEL_FILE in srcs and "lora_common.cuh" in srcs
    tu = kc.translation_unit()
    assert '#include "lora_common.cuh"' not in tu and "warp_reduce_scatter" in tu
    for name in K.KERNEL_NAMES:
        assert name.rsplit("_", 2)[0] in tu  # every entry point's macro family is present


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills(
    compiled: dict[str, kc.CompiledModule], arch: str
) -> None:
    mod = compiled[arch]
    assert mod.cubin[:4] == b"\x7fELF"
    res = mod.resources()
    assert set(K.KERNEL_NAMES) <= set(res), f"missing: {set(K.KERNEL_NAMES) - set(res)}"
    for name in K.KERNEL_NAMES:
        r = res[name]
        assert r.registers > 0, f"{name}/{arch}: no register count parsed"
        assert r.registers <= 255
        assert (r.spill_stores, r.spill_loads) == (0, 0), f"{name}/{arch} spills: {r}"
        assert r.stack_bytes == 0, f"{name}/{arch} uses local memory: {r}"


def test_parse_ptxas_log_reads_the_numbers() -> None:
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'k_a' for 'sm_90'\n"
        "ptxas info    : Function properties for k_a\n"
        "ptxas         .     24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k_b' for 'sm_90'\n"
        "ptxas info    : Function properties for k_b\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 6 registers, used 0 barriers, 356 bytes cmem[0]\n\0"
    )
    res = kc.parse_ptxas_log(log)
    assert res["k_a"] == kc.KernelResources("k_a", 40, 24, 16, 8, 2048)
    assert res["k_b"] == kc.KernelResources("k_b", 6, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="incomplete"):
        kc.parse_ptxas_log(log.split("ptxas info    : Used 6")[0])


def test_cache_hit_miss_and_key(_private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = kc.compile_cubin("sm_80")
    entries = sorted(p.name for p in _private_cache.iterdir())
    assert len(entries) == 2 and all(".tmp" not in e for e in entries)  # cubin + log, no temps

    import cuda.core

    def no_compile(*a: object, **k: object) -> None:
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(cuda.core, "Program", no_compile)
    again = kc.compile_cubin("sm_80")
    assert again.cubin == first.cubin and again.resources() == first.resources()
    # The key covers the source text, the arch and the NVRTC version.
    tu = kc.translation_unit()
    ver = kc.nvrtc_version()
    key = kc.cache_key(tu, "sm_80", ver)
    assert key != kc.cache_key(tu + "\n", "sm_80", ver)
    assert key != kc.cache_key(tu, "sm_90", ver)
    assert key != kc.cache_key(tu, "sm_80", (ver[0], ver[1] + 1))


def test_half_written_cache_entry_is_recompiled(_private_cache: Path) -> None:
    kc.compile_cubin("sm_80")
    (log,) = _private_cache.glob("*.log")
    log.unlink()  # as if the process died between the two writes
    mod = kc.compile_cubin("sm_80")
    assert mod.resources() and log.exists()


def test_compile_errors_carry_the_log() -> None:
    srcs = {**K.sources(), K.KERNEL_FILE: 'extern "C" __global__ void k() { undeclared(); }'}
    with pytest.raises(kc.KernelCompileError, match="undeclared"):
        kc.compile_cubin("sm_90", srcs=srcs, use_cache=False)
    with pytest.raises(ValueError, match="arch"):
        kc.compile_cubin("90")


def test_check_kernels_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from alora.kernels.check import main

    assert main(["--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    for name in K.KERNEL_NAMES:
        assert name in out
    assert "spill st" in out and "sm_90" in out
    assert main(["--arch", "sm_1x"]) == 2


def test_import_alora_kernels_does_not_import_cuda_python() -> None:
    code = "import sys, alora.kernels; assert 'cuda' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_backend_on_cpu_is_the_reference() -> None:
    assert isinstance(K.default_backend(torch.device("cpu")), TorchBackend)


# ---------------------------------------------------------------------------- planning


def _big_batch(tokens: int, segments: int, rank: int) -> object:
    """A batch whose host-side facts describe `tokens` tokens (tensors are placeholders: the
    planner only reads host data)."""
    from alora.backend import LoraBatch

    per = tokens // segments
    starts = tuple(per * i for i in range(segments + 1))
    z = torch.zeros(1, dtype=torch.int32)
    return LoraBatch(
        token_idx=torch.zeros(1, dtype=torch.int64),
        seg_start=z,
        seg_rank=z,
        seg_row_start=z,
        rows=z,
        seg_scale=torch.zeros(1),
        seg_start_host=starts,
        seg_rank_host=(rank,) * segments,
        seg_row_start_host=tuple(rank * i for i in range(segments + 1)),
        seg_scale_host=(1.0,) * segments,
        max_rank=rank,
        max_seg_tokens=per,
    )


@pytest.mark.parametrize("tokens", [1, 4, 512, 3_000_000])
def test_plans_respect_grid_limits(tokens: int) -> None:
    batch = _big_batch(tokens, 1, 16)
    plan = kl.plan_shrink(batch, 4096, 1, 132)  # type: ignore[arg-type]
    assert plan.form == ("dec" if tokens <= 4 else "seg")
    x = torch.zeros(1, 4096, dtype=torch.float16)
    vp = torch.zeros(1)
    s = kl.shrink_launch(plan, x, [x], batch, vp)  # type: ignore[arg-type]
    e = kl.expand_launch(plan, [x], [x], vp, batch, 132)  # type: ignore[arg-type]
    for launch in (s, e):
        assert launch.grid[0] < 2**31 and max(launch.grid[1:]) <= 65535 and min(launch.grid) >= 1
        assert 32 <= launch.block <= 256 and launch.block % 32 == 0
        assert launch.shmem <= 48 * 1024  # no opt-in to large shared memory needed


def test_decode_plan_splits_k_to_fill_the_gpu() -> None:
    batch = _big_batch(32, 32, 16)  # 32 adapters, one token each
    plan = kl.plan_shrink(batch, 4096, 1, 132)  # type: ignore[arg-type]
    assert plan.form == "dec" and plan.nsplit * 32 >= 264 and plan.ks >= 256


def test_rank_above_128_is_rejected_before_launch() -> None:
    case = Case(torch.float16, ((2, 129),), 1, 64, (32,))
    inp = make_inputs(case)
    launches: list[kl.Launch] = []
    backend = kl.CudaBackend("cpu", executor=launches.append, num_sms=4)
    with pytest.raises(ValueError, match=r"rank 129 exceeds .* maximum rank of 128"):
        backend.add_lora(inp.ys[0], inp.x, inp.a_pools[0], inp.bt_pools[0], inp.batch)
    assert launches == []


def test_mismatched_inputs_are_rejected() -> None:
    inp = make_inputs(Case(torch.float16, ((2, 4),), 1, 64, (32,)))
    backend = kl.CudaBackend("cpu", executor=lambda launch: None, num_sms=4)
    y, x, a, b = inp.ys[0], inp.x, inp.a_pools[0], inp.bt_pools[0]
    with pytest.raises(TypeError, match="bfloat16"):
        backend.add_lora(y, x, a.to(torch.bfloat16), b, inp.batch)
    with pytest.raises(ValueError, match="features"):
        backend.add_lora(y, x[:, :32].contiguous(), a, b, inp.batch)
    with pytest.raises(ValueError, match="contiguous"):
        backend.add_lora(y, x.t().contiguous().t(), a, b, inp.batch)


# ---------------------------------------------------------------------------- emulated kernels


@pytest.fixture(scope="module")
def emu(emu_executor: Any) -> kl.CudaBackend:
    return kl.CudaBackend("cpu", executor=emu_executor, num_sms=16)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def cases(draw: st.DrawFn, distinct_rows: bool = False) -> Case:
    nseg = draw(st.integers(1, 4))
    segs = tuple(
        (
            draw(st.integers(0, 24)),
            draw(st.one_of(st.integers(0, 40), st.sampled_from([1, 127, 128]))),
        )
        for _ in range(nseg)
    )
    form = draw(st.sampled_from([None, "dec", "seg"]))
    max_ks = 2048 if form == "dec" else 1024
    return Case(
        dtype=draw(st.sampled_from(DTYPES)),
        segs=segs,
        inactive=draw(st.integers(0, 6)),
        in_features=draw(st.one_of(st.integers(1, 700), st.sampled_from([256, 520, 1100]))),
        out_features=tuple(
            draw(st.one_of(st.integers(1, 300), st.sampled_from([64, 256])))
            for _ in range(draw(st.integers(1, 3)))
        ),
        extra_rows=draw(st.integers(0, 4)),
        misalign=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        form=form,
        ks=draw(
            st.one_of(
                st.none(), st.sampled_from([k for k in (256, 512, 1024, 2048) if k <= max_ks])
            )
        ),
        granularity=draw(st.one_of(st.none(), st.integers(1, 96), st.sampled_from([8, 64]))),
        distinct_rows=distinct_rows,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_emulated_kernels_match_float64_reference(emu: kl.CudaBackend, case: Case) -> None:
    check_case(emu, case)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(distinct_rows=True), expand_each=st.booleans())
def test_emulated_fused_per_module_rows_match_float64_reference(
    emu: kl.CudaBackend, case: Case, expand_each: bool
) -> None:
    # The runtime's fused form: every module its own A and Bt row ids (one arena for all
    # modules with a granularity), one shrink for all, expand fused or module by module.
    check_case(emu, case, expand_each=expand_each)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        # decode: many adapters, one or two tokens each, hidden size 3424 (not a multiple of 256)
        Case(torch.float16, tuple((1 + i % 2, 16) for i in range(9)), 5, 3424, (96,), ks=256),
        # prefill: long segments, ranks 1 and 128, fused q/k/v with odd widths
        Case(torch.float16, ((37, 128), (20, 1), (9, 8)), 3, 515, (130, 33, 33)),
        # every rank zero or every segment empty: nothing changes
        Case(torch.float16, ((3, 0), (0, 8)), 2, 64, (64,)),
        # the runtime's layout: strided views, 16-byte aligned rows (vector loads)...
        Case(
            torch.float16,
            tuple((1 + i % 3, 8 * (1 + i % 2)) for i in range(5)),
            2,
            576,
            (576, 192),
            granularity=64,
        ),
        # ...and rows at odd element offsets (scalar loads), prefill form, fused q/k/v
        Case(torch.float16, ((21, 16), (6, 4)), 2, 300, (100, 37, 37), granularity=7),
    ],
    ids=["decode", "prefill-fused", "empty", "arena-aligned", "arena-unaligned"],
)
def test_emulated_kernels_examples(emu: kl.CudaBackend, case: Case, dtype: torch.dtype) -> None:
    check_case(emu, Case(**{**case.__dict__, "dtype": dtype}))


def test_emulated_kernels_grid_stride(emu: kl.CudaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # A grid capped at 2 along y/z makes every kernel loop over its token and column tiles,
    # the path very large token counts take on a GPU.
    monkeypatch.setattr(kl, "_GRID_YZ_MAX", 2)
    check_case(emu, Case(torch.bfloat16, ((70, 12), (33, 3)), 4, 300, (300, 50), form="seg"))
    check_case(emu, Case(torch.float32, ((13, 5),), 1, 64, (2000,), form="dec"))


def test_launches_pass_each_pools_row_stride() -> None:
    inp = make_inputs(Case(torch.float16, ((2, 4),), 1, 64, (32, 48), granularity=16))
    launches: list[kl.Launch] = []
    backend = kl.CudaBackend("cpu", executor=launches.append, num_sms=4)
    backend.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, inp.batch)
    shrink, expand = (launch.named() for launch in launches)
    assert [shrink[k] for k in ("in_f", "lda0", "lda1", "lda2")] == [64, 16, 16, 0]
    assert [expand[k] for k in ("out0", "out1", "out2", "ldb0", "ldb1", "ldb2")] == [
        32, 48, 0, 16, 16, 0
    ]  # fmt: skip
    assert shrink["vec_ok"] == 1  # 16 elements * 2 bytes: rows stay 16-byte aligned
    contiguous = make_inputs(Case(torch.float16, ((2, 4),), 1, 64, (32,)))
    launches.clear()
    c = contiguous
    backend.add_lora(c.ys[0], c.x, c.a_pools[0], c.bt_pools[0], c.batch)
    assert launches[0].named()["lda0"] == 64 and launches[1].named()["ldb0"] == 32


def test_launch_argument_lists_match_the_kernels() -> None:
    # The parameter names the launchers marshal against are those of lora.cu's entry points.
    tu = kc.translation_unit()
    for macro, params in (("ALORA_SHRINK", kl.SHRINK_PARAMS), ("ALORA_EXPAND", kl.EXPAND_PARAMS)):
        body = tu[tu.index(f"#define {macro}(") :]
        decl = body[body.index("NAME(") + 5 : body.index(")", body.index("NAME("))]
        names = [p.replace("\\", " ").split()[-1].lstrip("*") for p in decl.split(",")]
        assert tuple(names) == params


def test_fused_launch_passes_every_modules_rows() -> None:
    # One batch per module (the runtime's): shrink reads module m's A rows through rows<m>,
    # expand its Bt rows; the segment arrays are shared. A single module passes null for the
    # other two row lists.
    inp = make_inputs(
        Case(
            torch.float16, ((2, 4), (3, 8)), 1, 64, (32, 48, 16), granularity=16, distinct_rows=True
        )
    )
    launches: list[kl.Launch] = []
    backend = kl.CudaBackend("cpu", executor=launches.append, num_sms=4)
    backend.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, inp.batches)
    shrink, expand = (launch.named() for launch in launches)
    b = inp.batches
    assert [shrink[f"rows{m}"] for m in range(3)] == [x.rows.data_ptr() for x in b]
    assert [expand[f"rows{m}"] for m in range(3)] == [x.bt.rows.data_ptr() for x in b]
    assert len({shrink["rows0"], expand["rows0"], shrink["rows1"]}) == 3  # all distinct
    for launch in (shrink, expand):
        assert launch["token_idx"] == b[0].token_idx.data_ptr()
        assert launch["seg_row_start"] == b[0].seg_row_start.data_ptr()
    launches.clear()
    backend.add_lora(inp.ys[1], inp.x, inp.a_pools[1], inp.bt_pools[1], b[1])
    shrink, expand = (launch.named() for launch in launches)
    assert (shrink["nmod"], shrink["rows0"], shrink["rows1"], shrink["rows2"]) == (
        1, b[1].rows.data_ptr(), 0, 0
    )  # fmt: skip
    assert (expand["rows0"], expand["rows1"], expand["rows2"]) == (b[1].bt.rows.data_ptr(), 0, 0)


def test_fused_batches_must_share_segments() -> None:
    from dataclasses import replace

    inp = make_inputs(Case(torch.float16, ((2, 4), (3, 8)), 1, 64, (32, 48), distinct_rows=True))
    launches: list[kl.Launch] = []
    backend = kl.CudaBackend("cpu", executor=launches.append, num_sms=4)
    b0, b1 = inp.batches
    assert backend.fusable(inp.x, inp.batches) and kl.same_segments(b0, b1)
    other_rank = replace(b1, seg_rank_host=(2, 8))
    other_tokens = replace(
        b1, token_idx=b1.token_idx.flip(0).clone(), token_idx_host=None
    )  # same shape, a separate tensor: compared by value
    same_tokens = replace(b1, token_idx=b1.token_idx.clone(), token_idx_host=None)
    assert kl.same_segments(b0, same_tokens) and backend.fusable(inp.x, [b0, same_tokens])
    for bad, what in ((other_rank, "seg_rank"), (other_tokens, "token_idx")):
        assert not kl.same_segments(b0, bad) and not backend.fusable(inp.x, [b0, bad])
        with pytest.raises(ValueError, match=f"batches\\[1\\] differs .* in {what}"):
            backend.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, [b0, bad])
        with pytest.raises(ValueError, match="share their segments"):
            backend.shrink(inp.x, inp.a_pools, [b0, bad])
    with pytest.raises(ValueError, match="3 batches for 2 modules"):
        backend.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, [b0, b1, b1])
    assert launches == []
    assert not backend.fusable(inp.x.double(), inp.batches)  # not a kernel dtype
    assert not backend.fusable(inp.x, [b0] * 4)  # more than one launch takes


def test_expand_takes_a_module_of_a_fused_shrink() -> None:
    inp = make_inputs(Case(torch.float32, ((2, 4),), 1, 64, (32, 48, 16), distinct_rows=True))
    launches: list[kl.Launch] = []
    backend = kl.CudaBackend("cpu", executor=launches.append, num_sms=4)
    plan = backend.plan(inp.batches, 64)
    assert plan.num_modules == 3
    vp = backend.shrink(inp.x, inp.a_pools, inp.batches, plan=plan)
    backend.expand([inp.ys[2]], [inp.bt_pools[2]], vp, inp.batches[2], plan, module=2)
    backend.expand(inp.ys[:2], inp.bt_pools[:2], vp[:2], inp.batches[:2], plan)
    one, two = launches[1].named(), launches[2].named()
    assert one["vp"] == vp[2].data_ptr() and one["rows0"] == inp.batches[2].bt.rows.data_ptr()
    assert two["vp"] == vp.data_ptr() and two["out1"] == 48
    with pytest.raises(ValueError, match="module 2 of a 3-module plan"):
        backend.expand(inp.ys[:2], inp.bt_pools[:2], vp, inp.batches[:2], plan, module=2)
    for bad in (vp.double(), vp[..., :1], torch.empty(plan.vp_shape[::-1]).permute(3, 2, 1, 0)):
        with pytest.raises(ValueError, match="vp must be contiguous float32"):
            backend.expand([inp.ys[0]], [inp.bt_pools[0]], bad, inp.batches[0], plan)


def test_emulated_add_lora_matches_torch_backend(emu: kl.CudaBackend) -> None:
    inp = make_inputs(Case(torch.float32, ((6, 8), (2, 16)), 3, 128, (64, 64, 32, 48)))
    ref = [y.clone() for y in inp.ys]
    for y, a, b in zip(ref, inp.a_pools, inp.bt_pools, strict=True):
        TorchBackend().add_lora(y, inp.x, a, b, inp.batch)
    emu.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, inp.batch)  # 4 modules: 3 + 1
    for got, want in zip(inp.ys, ref, strict=True):
        assert rel_err(got, want) <= 1e-5
    # one batch per module, own A and Bt rows in one arena (the runtime's layout)
    case = Case(torch.float32, ((6, 8), (2, 16)), 3, 128, (64, 32, 32), granularity=40)
    inp = make_inputs(Case(**{**case.__dict__, "distinct_rows": True}))
    ref = [y.clone() for y in inp.ys]
    for y, a, b, batch in zip(ref, inp.a_pools, inp.bt_pools, inp.batches, strict=True):
        TorchBackend().add_lora(y, inp.x, a, b, batch)
    emu.add_lora_fused(inp.ys, inp.x, inp.a_pools, inp.bt_pools, inp.batches)
    for got, want in zip(inp.ys, ref, strict=True):
        assert rel_err(got, want) <= 1e-5
    # float64 is not a kernel dtype: the backend delegates to the reference
    inp64 = make_inputs(Case(torch.float32, ((3, 4),), 1, 16, (8,)))
    x, y, a, b = (t.double() for t in (inp64.x, inp64.ys[0], inp64.a_pools[0], inp64.bt_pools[0]))
    want = y.clone()
    TorchBackend().add_lora(want, x, a, b, inp64.batch)
    emu.add_lora(y, x, a, b, inp64.batch)
    assert torch.equal(y, want)
