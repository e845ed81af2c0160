"""`CudaBackend`: the LoRA op on the CUDA kernels of `cuda/lora.cu`.

Launch planning (form, K split, grid, block, shared memory, argument marshalling) is pure
Python and produces `Launch` records; an executor runs them. The CUDA executor loads the cubin
through cuda-python and launches on torch's current stream; the CPU emulator
(`alora.kernels.emulate`) runs the very same records, which is how the planning and the kernels'
indexing are tested on machines without a GPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alora.backend import LoraBatch, TorchBackend
from alora.kernels import MAX_RANK

# Kernel name suffix per supported dtype; anything else goes to the torch reference.
DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
MAX_FUSED = 3  # modules one fused launch takes (q/k/v)
_GRID_YZ_MAX = 65535  # gridDim.y/z limit; the kernels grid-stride beyond it
_INT32_MAX = 2**31 - 1

# Per form: shrink token tile (TM in lora.cu), expand token tile (TT), rank rows per warp (RPW),
# largest K split (TM * ks * 4 bytes of staged x stays at 32 KiB).
_FORM = {
    "dec": {"shrink_tm": 4, "expand_tt": 4, "rpw": 2, "max_ks": 2048},
    "seg": {"shrink_tm": 8, "expand_tt": 16, "rpw": 4, "max_ks": 1024},
}
_DEC_MAX_SEG_TOKENS = 4  # the decode form while no segment has more tokens than its tile
_MIN_KS = 256  # K splits are powers of two >= 256, so split starts stay 16-byte aligned


class KernelLaunchError(RuntimeError):
    """A CUDA call for a LoRA kernel failed (load, launch or, with `sync_check`, execution)."""


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: int
    shmem: int
    # numpy scalars with the C types of the kernel's parameters (np.uint64 for pointers)
    args: tuple[np.generic, ...]

    def named(self) -> dict[str, int]:
        """The arguments by kernel parameter name (`SHRINK_PARAMS` / `EXPAND_PARAMS`)."""
        names = SHRINK_PARAMS if "_shrink_" in self.kernel else EXPAND_PARAMS
        return {n: int(v) for n, v in zip(names, self.args, strict=True)}


Executor = Callable[[Launch], None]
# The kernels' parameter lists (cuda/lora.cu), in order: what `Launch.args` carries.
SHRINK_PARAMS = (
    "x", "a0", "a1", "a2", "nmod", "token_idx", "seg_start", "seg_rank", "seg_row_start",
    "rows0", "rows1", "rows2", "vp", "in_f", "lda0", "lda1", "lda2", "ldv", "ks", "t_active",
    "vec_ok",
)  # fmt: skip
EXPAND_PARAMS = (
    "y0", "y1", "y2", "bt0", "bt1", "bt2", "out0", "out1", "out2", "ldb0", "ldb1", "ldb2",
    "ct1", "ct2", "ct_total", "vp", "nsplit", "t_active", "ldv", "token_idx", "seg_start",
    "seg_rank", "seg_row_start", "rows0", "rows1", "rows2", "seg_scale", "vec_mask",
)  # fmt: skip
# One LoraBatch for every module, or one per module (fused modules: same segments).
Batches = LoraBatch | Sequence[LoraBatch]


@dataclass(frozen=True)
class ShrinkPlan:
    form: str  # "dec" or "seg"
    ks: int  # K range of one split
    nsplit: int
    ldv: int  # row stride of V (the batch's largest rank)
    num_modules: int
    t_active: int

    @property
    def vp_shape(self) -> tuple[int, int, int, int]:
        """Partial V, fp32 [modules, splits, T_active, ldv]; V = vp.sum(1)."""
        return (self.num_modules, self.nsplit, self.t_active, self.ldv)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v: int) -> np.int32:
    if not -(2**31) <= v <= _INT32_MAX:
        raise ValueError(f"{v} does not fit the kernels' 32-bit size arguments")
    return np.int32(v)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _seg_sizes(batch: LoraBatch) -> list[tuple[int, int]]:
    """(tokens, rank) per segment, from the host copies (no device sync)."""
    st = batch.seg_start_host
    return [(st[a + 1] - st[a], batch.seg_rank_host[a]) for a in range(batch.num_segments)]


def max_rank(batch: LoraBatch) -> int:
    return max(batch.seg_rank_host, default=0)


def choose_form(batch: LoraBatch) -> str:
    longest = max((n for n, _ in _seg_sizes(batch)), default=0)
    return "dec" if longest <= _DEC_MAX_SEG_TOKENS else "seg"


def _tiles(batch: LoraBatch, tile: int) -> tuple[int, int]:
    """(blocks that get work, grid extent) along the token-tile axis for a tile size."""
    sizes = [n for n, r in _seg_sizes(batch) if n > 0 and r > 0]
    longest = max(sizes, default=0)
    extent = max(1, min(math.ceil(longest / tile), _GRID_YZ_MAX))
    return sum(min(math.ceil(n / tile), extent) for n in sizes), extent


def plan_shrink(
    batch: LoraBatch,
    in_features: int,
    num_modules: int,
    num_sms: int,
    *,
    form: str | None = None,
    ks: int | None = None,
) -> ShrinkPlan:
    """Pick the form and the K split: split K until the grid has about two blocks per SM,
    never below 256 elements a split (each split re-reads nothing; it only adds partial sums
    that expand folds in)."""
    form = form or choose_form(batch)
    if form not in _FORM:
        raise ValueError(f"form must be one of {sorted(_FORM)}, got {form!r}")
    cfg = _FORM[form]
    if ks is None:
        busy, _ = _tiles(batch, cfg["shrink_tm"])
        ks = max(_MIN_KS, min(cfg["max_ks"], _next_pow2(in_features)))
        while ks > _MIN_KS and busy * math.ceil(in_features / ks) < 2 * num_sms:
            ks //= 2
    elif ks < _MIN_KS or ks > cfg["max_ks"] or ks & (ks - 1):
        raise ValueError(f"ks must be a power of two in [{_MIN_KS}, {cfg['max_ks']}], got {ks}")
    return ShrinkPlan(
        form=form,
        ks=ks,
        nsplit=max(1, math.ceil(in_features / ks)),
        ldv=max(1, max_rank(batch)),
        num_modules=num_modules,
        t_active=batch.num_active,
    )


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _rows_aligned(*pools: torch.Tensor) -> bool:
    """Every row of every pool starts 16-byte aligned: base and row stride both aligned."""
    return all(p.data_ptr() % 16 == 0 and p.stride(0) * p.element_size() % 16 == 0 for p in pools)


def row_stride(pool: torch.Tensor) -> int:
    """A pool's row stride in elements (the kernels' lda / ldb): `pool.stride(0)`. The
    runtime's pools are overlapping views of the KV cache, so this may be smaller than a row."""
    return int(pool.stride(0))


def per_module(batches: Batches, n: int) -> list[LoraBatch]:
    """One batch per module: a single LoraBatch serves all `n` (rows shared by every pool)."""
    if isinstance(batches, LoraBatch):
        return [batches] * n
    out = list(batches)
    if len(out) != n:
        raise ValueError(f"{len(out)} batches for {n} modules")
    return out


def _segment_mismatch(a: LoraBatch, b: LoraBatch) -> str | None:
    """What keeps `b` from sharing `a`'s segments in one launch (None: nothing). Fused modules
    share token_idx, seg_start, seg_rank, seg_row_start and seg_scale; only their row ids
    (`rows`, `bt_rows`) may differ. Host facts only, except token_idx tensors that are neither
    the same object nor come with host copies (compared on the device: a sync)."""
    if a is b:
        return None
    for what in ("seg_start_host", "seg_rank_host", "seg_row_start_host", "seg_scale_host"):
        if getattr(a, what) != getattr(b, what):
            return what.removesuffix("_host")
    ta, tb = a.token_idx, b.token_idx
    if ta is tb:
        return None
    if ta.shape != tb.shape or ta.device != tb.device or ta.dtype != tb.dtype:
        return "token_idx"
    if a.token_idx_host is not None and b.token_idx_host is not None:
        same = bool(np.array_equal(a.token_idx_host, b.token_idx_host))
    else:
        same = bool(torch.equal(ta, tb))
    return None if same else "token_idx"


def same_segments(a: LoraBatch, b: LoraBatch) -> bool:
    """Whether two modules' batches can share one fused launch (they differ at most in rows)."""
    return _segment_mismatch(a, b) is None


def check_shared_segments(batches: Sequence[LoraBatch]) -> None:
    for m, b in enumerate(batches[1:], 1):
        what = _segment_mismatch(batches[0], b)
        if what is not None:
            raise ValueError(
                f"batches[{m}] differs from batches[0] in {what}: fused modules must share "
                "their segments (tokens, ranks, row offsets, scales); only rows may differ"
            )


def _segment_args(batch: LoraBatch) -> tuple[np.uint64, ...]:
    return (
        _ptr(batch.token_idx),
        _ptr(batch.seg_start),
        _ptr(batch.seg_rank),
        _ptr(batch.seg_row_start),
    )


def _rows_args(rows: Sequence[torch.Tensor]) -> tuple[np.uint64, ...]:
    """rows0-2: one row list per module, null for the unused slots."""
    return tuple(_ptr(r) for r in [*rows, *[None] * (MAX_FUSED - len(rows))])


def shrink_launch(
    plan: ShrinkPlan,
    x: torch.Tensor,
    a_pools: Sequence[torch.Tensor],
    batches: Batches,
    vp: torch.Tensor,
    *,
    threads: int | None = None,
) -> Launch:
    """Module m reads its A rows through `batches[m].rows`; the segments are batches[0]'s."""
    bl = per_module(batches, len(a_pools))
    batch = bl[0]
    cfg = _FORM[plan.form]
    tm, rpw = cfg["shrink_tm"], cfg["rpw"]
    in_f = x.shape[1]
    esz = x.element_size()
    vec_ok = in_f * esz % 16 == 0 and _aligned(x) and _rows_aligned(*a_pools)
    if threads is None:  # one warp per RPW rank rows, up to 8 warps
        threads = 32 * max(1, min(8, math.ceil(plan.ldv / rpw)))
    _, extent = _tiles(batch, tm)
    pools = list(a_pools) + [None] * (MAX_FUSED - len(a_pools))
    return Launch(
        kernel=f"alora_shrink_{plan.form}_{DTYPE_SUFFIX[x.dtype]}",
        grid=(batch.num_segments, extent, plan.nsplit),
        block=threads,
        shmem=tm * plan.ks * 4,
        args=(
            _ptr(x),
            *(_ptr(p) for p in pools),
            _i32(len(a_pools)),
            *_segment_args(batch),
            *_rows_args([b.rows for b in bl]),
            _ptr(vp),
            _i32(in_f),
            *(_i32(row_stride(p) if p is not None else 0) for p in pools),
            _i32(plan.ldv),
            _i32(plan.ks),
            _i32(plan.t_active),
            _i32(int(vec_ok)),
        ),
    )


def expand_launch(
    plan: ShrinkPlan,
    ys: Sequence[torch.Tensor],
    bt_pools: Sequence[torch.Tensor],
    vp: torch.Tensor,
    batches: Batches,
    num_sms: int,
    *,
    threads: int | None = None,
) -> Launch:
    """Column tiles of all modules' outputs on grid.y; block width shrinks (128 -> 32 threads)
    while the grid has fewer than two blocks per SM, so decode steps spread over the GPU.
    Module m reads V from vp[m] (`vp` holds len(ys) modules' partial V: a whole shrink output
    or a slice of one) and its Bt rows through `batches[m].bt.rows`."""
    bl = per_module(batches, len(ys))
    batch = bl[0]
    cfg = _FORM[plan.form]
    tt = cfg["expand_tt"]
    esz = ys[0].element_size()
    vec = 16 // esz
    busy, extent = _tiles(batch, tt)

    def col_tiles(t: int) -> list[int]:
        return [math.ceil(y.shape[1] / (t * vec)) for y in ys]

    if threads is None:
        threads = 128
        while threads > 32 and busy * sum(col_tiles(threads)) < 2 * num_sms:
            threads //= 2
    tiles = col_tiles(threads)
    ct_total = sum(tiles)
    ct1 = tiles[0] if len(ys) > 1 else ct_total
    ct2 = tiles[0] + tiles[1] if len(ys) > 2 else ct_total
    vec_mask = 0
    for m, (y, bt) in enumerate(zip(ys, bt_pools, strict=True)):
        if y.shape[1] * esz % 16 == 0 and _aligned(y) and _rows_aligned(bt):
            vec_mask |= 1 << m
    pad: list[torch.Tensor | None] = [None] * (MAX_FUSED - len(ys))
    return Launch(
        kernel=f"alora_expand_{plan.form}_{DTYPE_SUFFIX[ys[0].dtype]}",
        grid=(batch.num_segments, min(ct_total, _GRID_YZ_MAX), extent),
        block=threads,
        shmem=4 * (MAX_RANK + tt * plan.ldv),
        args=(
            *(_ptr(y) for y in [*ys, *pad]),
            *(_ptr(b) for b in [*bt_pools, *pad]),
            *(_i32(y.shape[1] if y is not None else 0) for y in [*ys, *pad]),
            *(_i32(row_stride(b) if b is not None else 0) for b in [*bt_pools, *pad]),
            _i32(ct1),
            _i32(ct2),
            _i32(ct_total),
            _ptr(vp),
            _i32(plan.nsplit),
            _i32(plan.t_active),
            _i32(plan.ldv),
            *_segment_args(batch),
            *_rows_args([b.bt.rows for b in bl]),  # expand reads the Bt rows
            _ptr(batch.seg_scale),
            _i32(vec_mask),
        ),
    )


def _check_placement(t: torch.Tensor, what: str, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{what} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")


def _check_tensor(t: torch.Tensor, what: str, dtype: torch.dtype, device: torch.device) -> None:
    _check_placement(t, what, dtype, device)
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def _check_pool(t: torch.Tensor, what: str, dtype: torch.dtype, device: torch.device) -> None:
    """A pool is any 2-D view with unit column stride and a positive row stride (the
    runtime's are overlapping strided views of the KV cache)."""
    _check_placement(t, what, dtype, device)
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] > 1 and t.shape[1] > 1 and (t.stride(1) != 1 or t.stride(0) < 1):
        raise ValueError(f"{what} must have unit column stride and a positive row stride")
    if t.shape[0] <= 1 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{what} must have unit column stride")
    if t.stride(0) > _INT32_MAX:
        raise ValueError(f"{what} row stride {t.stride(0)} exceeds the kernels' 32-bit strides")


def _validate_batches(batches: Sequence[LoraBatch], device: torch.device, rows: str) -> None:
    """Segment tensors of batches[0] (the launch reads those), every module's `rows` ("rows":
    A rows, "bt_rows": Bt rows) and the shared segments. Host-side only."""
    batch = batches[0]
    for name, want in (
        ("token_idx", torch.int64),
        ("seg_start", torch.int32),
        ("seg_rank", torch.int32),
        ("seg_row_start", torch.int32),
        ("seg_scale", torch.float32),
    ):
        _check_tensor(getattr(batch, name), f"batch.{name}", want, device)
    for m, b in enumerate(batches):
        r = b.rows if rows == "rows" else b.bt.rows
        _check_tensor(r, f"batches[{m}].{rows}", torch.int32, device)
    top = max_rank(batch)
    if top > MAX_RANK:
        raise ValueError(
            f"adapter rank {top} exceeds the CUDA kernels' maximum rank of {MAX_RANK}; "
            "use alora.backend.TorchBackend for such adapters"
        )
    if min(batch.seg_rank_host, default=0) < 0:
        raise ValueError("negative rank in batch.seg_rank_host")
    if len(batch.seg_start_host) != batch.num_segments + 1 and batch.num_segments:
        raise ValueError("batch.seg_start_host must have num_segments + 1 entries")
    check_shared_segments(batches)


def validate_shrink(
    x: torch.Tensor, a_pools: Sequence[torch.Tensor], batches: Sequence[LoraBatch]
) -> None:
    """Host-side checks of the shrink half (shapes, dtypes, devices, ranks, shared segments):
    no device sync. Token indices and pool rows are trusted to be in range, as the Rust
    planner guarantees."""
    if not 1 <= len(a_pools) <= MAX_FUSED or len(batches) != len(a_pools):
        raise ValueError(f"1 to {MAX_FUSED} A pools, one batch each, expected")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, in], got shape {tuple(x.shape)}")
    dev, dt = x.device, x.dtype
    _check_tensor(x, "x", dt, dev)
    for m, a in enumerate(a_pools):
        _check_pool(a, f"a_pools[{m}]", dt, dev)
        if a.shape[1] != x.shape[1]:
            raise ValueError(f"a_pools[{m}] is [R, {a.shape[1]}], x has {x.shape[1]} features")
    _validate_batches(batches, dev, "rows")


def validate_expand(
    ys: Sequence[torch.Tensor], bt_pools: Sequence[torch.Tensor], batches: Sequence[LoraBatch]
) -> None:
    """Host-side checks of the expand half; ys[0] sets the dtype and device."""
    if not 1 <= len(ys) <= MAX_FUSED or not len(ys) == len(bt_pools) == len(batches):
        raise ValueError(f"1 to {MAX_FUSED} outputs, one Bt pool and one batch each, expected")
    dev, dt = ys[0].device, ys[0].dtype
    for m, (y, b) in enumerate(zip(ys, bt_pools, strict=True)):
        if y.dim() != 2:
            raise ValueError(f"ys[{m}] must be 2-D, got shape {tuple(y.shape)}")
        _check_tensor(y, f"ys[{m}]", dt, dev)
        _check_pool(b, f"bt_pools[{m}]", dt, dev)
        if b.shape[1] != y.shape[1]:
            raise ValueError(f"bt_pools[{m}] is [R, {b.shape[1]}], ys[{m}] has {y.shape[1]}")
    _validate_batches(batches, dev, "bt_rows")


def validate(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    a_pools: Sequence[torch.Tensor],
    bt_pools: Sequence[torch.Tensor],
    batches: Batches,
) -> None:
    """Both halves' host-side checks (no device sync), for any number of modules."""
    if not (len(ys) == len(a_pools) == len(bt_pools) >= 1):
        raise ValueError("ys, a_pools and bt_pools must be non-empty and of equal length")
    bl = per_module(batches, len(ys))
    if x.dim() != 2:
        raise ValueError(f"x must be [T, in], got shape {tuple(x.shape)}")
    # A and Bt pools may have different row counts: their row ids are independent (the
    # runtime's are views of the KV arena per row width).
    for m, y in enumerate(ys):
        if y.dim() == 2 and y.shape[0] != x.shape[0]:
            raise ValueError(f"ys[{m}] has {y.shape[0]} rows, x has {x.shape[0]}")
    for g in range(0, len(ys), MAX_FUSED):
        sl = slice(g, g + MAX_FUSED)
        validate_shrink(x, a_pools[sl], bl[sl])
        _check_tensor(ys[g], f"ys[{g}]", x.dtype, x.device)
        validate_expand(ys[sl], bt_pools[sl], bl[sl])


class _CudaExecutor:
    """Loads the cubin for one device (compiled for its exact compute capability) and launches
    on torch's current stream. Every cuda-python failure becomes a KernelLaunchError."""

    def __init__(self, device: torch.device, *, sync_check: bool = False) -> None:
        self.device = device
        self.sync_check = sync_check
        self._kernels: dict[str, object] | None = None
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._streams: dict[int, object] = {}

    def _load(self) -> dict[str, object]:
        with self._lock:
            if self._kernels is not None:
                return self._kernels
            from alora.kernels import KERNEL_NAMES
            from alora.kernels.compile import compile_cubin

            major, minor = torch.cuda.get_device_capability(self.device)
            module = compile_cubin(f"sm_{major}{minor}")
            try:
                from cuda.core import ObjectCode

                self._make_current()
                code = ObjectCode.from_cubin(module.cubin, name="alora_lora")
                self._kernels = {n: code.get_kernel(n) for n in KERNEL_NAMES}
            except Exception as e:
                raise KernelLaunchError(f"loading the LoRA kernels on {self.device}: {e}") from e
            return self._kernels

    def _make_current(self) -> None:
        # cuda.core needs a current context per host thread; torch uses the same primary one.
        if getattr(self._tls, "ready", False):
            return
        from cuda.core import Device

        torch.cuda.init()
        Device(self.device.index).set_current()
        self._tls.ready = True

    def _stream(self) -> object:
        from cuda.core import LEGACY_DEFAULT_STREAM, Stream

        handle = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            # 0 is torch's (legacy) default stream: cuda.core has a shared object for it.
            stream = LEGACY_DEFAULT_STREAM if handle == 0 else Stream.from_handle(handle)
            self._streams[handle] = stream
        return stream

    def __call__(self, launch: Launch) -> None:
        kernels = self._kernels or self._load()
        from cuda.core import LaunchConfig
        from cuda.core import launch as cu_launch

        try:
            self._make_current()
            stream = self._stream()
            config = LaunchConfig(grid=launch.grid, block=launch.block, shmem_size=launch.shmem)
            cu_launch(stream, config, kernels[launch.kernel], *launch.args)
            if self.sync_check:
                stream.sync()  # type: ignore[attr-defined]
        except Exception as e:
            raise KernelLaunchError(
                f"{launch.kernel} grid={launch.grid} block={launch.block} "
                f"shmem={launch.shmem} on {self.device}: {e}"
            ) from e


class CudaBackend:
    """The LoRA op on the CUDA kernels (`LoraBackend` protocol), plus `add_lora_fused` for
    modules that read the same input (q/k/v, gate/up): one shrink and one expand launch for up
    to three modules, each with its own rows. `shrink` / `expand` are the two halves, public
    so that the LoRA hooks run one fused shrink for a group and expand each module from its
    slice of V when its own hook fires (`fuse_groups`). Dtypes other than fp16/bf16/fp32 go
    to the torch reference."""

    name = "cuda"
    # Capability for the LoRA hooks: modules that read the same x may share one shrink.
    fuse_groups = True

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        *,
        executor: Executor | None = None,
        num_sms: int | None = None,
        sync_check: bool = False,
    ) -> None:
        """`executor` and `num_sms` replace the CUDA launcher (the CPU emulator uses them);
        `sync_check` synchronises after every launch so an execution error names its kernel."""
        dev = torch.device("cuda" if device is None else device)
        if executor is None:
            if dev.type != "cuda":
                raise ValueError(f"CudaBackend needs a CUDA device, got {dev}")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            executor = _CudaExecutor(dev, sync_check=sync_check)
            if num_sms is None:
                num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.device = dev
        self.num_sms = num_sms or 1
        self._run = executor
        self._fallback = TorchBackend()

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a_pool: torch.Tensor,
        bt_pool: torch.Tensor,
        batch: LoraBatch,
    ) -> None:
        self.add_lora_fused([y], x, [a_pool], [bt_pool], batch)

    def add_lora_fused(
        self,
        ys: Sequence[torch.Tensor],
        x: torch.Tensor,
        a_pools: Sequence[torch.Tensor],
        bt_pools: Sequence[torch.Tensor],
        batches: Batches,
    ) -> None:
        """For each module m and active token t of segment a:
        ys[m][t] += scale(a) * (x[t] @ a_pools[m][rows_m(a)]^T) @ bt_pools[m][bt_rows_m(a)].

        `batches`: one LoraBatch per module (the runtime's: each module has its own A and Bt
        row ids), or one for all. The modules' batches must share their segments (token_idx,
        seg_start, seg_rank, seg_row_start, seg_scale; `same_segments`), else ValueError: a
        module whose ranks differ from the others' goes through its own `add_lora`. Pools are
        2-D with unit column stride and any row stride (each pool's `stride(0)` goes to the
        kernels as its own lda / ldb), so the runtime's overlapping views of the KV cache run
        in place. More than three modules take one launch pair per three."""
        bl = per_module(batches, len(ys))
        if x.dtype not in DTYPE_SUFFIX:
            for y, a, b, batch in zip(ys, a_pools, bt_pools, bl, strict=True):
                self._fallback.add_lora(y, x, a, b, batch)
            return
        validate(ys, x, a_pools, bt_pools, bl)
        if bl[0].num_active == 0 or max_rank(bl[0]) == 0:
            return
        for g in range(0, len(ys), MAX_FUSED):
            sl = slice(g, g + MAX_FUSED)
            plan = self.plan(bl[sl], x.shape[1])
            vp = torch.empty(plan.vp_shape, dtype=torch.float32, device=x.device)
            self._run(shrink_launch(plan, x, a_pools[sl], bl[sl], vp))
            self._run(expand_launch(plan, ys[sl], bt_pools[sl], vp, bl[sl], self.num_sms))

    def fusable(self, x: torch.Tensor, batches: Sequence[LoraBatch]) -> bool:
        """Whether `shrink` can take these modules in one launch: a kernel dtype, 1 to 3
        modules, shared segments, ranks within the kernels' limit and something to compute.
        Host facts only (token_idx: same object or host copies, as the runtime's are)."""
        if x.dtype not in DTYPE_SUFFIX or not 1 <= len(batches) <= MAX_FUSED:
            return False
        b0 = batches[0]
        if b0.num_active == 0 or not 0 < max_rank(b0) <= MAX_RANK:
            return False
        return all(same_segments(b0, b) for b in batches[1:])

    # ---- the two halves: tests, benches and the hooks' fused q/k/v and gate/up ----------

    def plan(
        self,
        batches: Batches,
        in_features: int,
        *,
        num_modules: int | None = None,
        form: str | None = None,
        ks: int | None = None,
    ) -> ShrinkPlan:
        """The shrink plan (form, K split, V layout) for the modules of `batches` (a single
        batch: `num_modules`, default 1); expand takes the same plan."""
        if num_modules is None:
            num_modules = 1 if isinstance(batches, LoraBatch) else len(batches)
        if not 1 <= num_modules <= MAX_FUSED:
            raise ValueError(f"num_modules must be in [1, {MAX_FUSED}], got {num_modules}")
        batch = per_module(batches, num_modules)[0]
        return plan_shrink(batch, in_features, num_modules, self.num_sms, form=form, ks=ks)

    def shrink(
        self,
        x: torch.Tensor,
        a_pools: Sequence[torch.Tensor],
        batches: Batches,
        *,
        plan: ShrinkPlan | None = None,
        out: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> torch.Tensor:
        """Partial V (fp32, `plan.vp_shape` = [modules, splits, T_active, ldv]) of every
        module, each through its own A rows (`batches[m].rows`); only entries
        [m, :, i, j < rank] are written. vp[m] (or vp[m:m + k]) is contiguous: what `expand`
        takes for module m alone (or k modules)."""
        bl = per_module(batches, len(a_pools))
        plan = plan or self.plan(bl, x.shape[1])
        if len(a_pools) != plan.num_modules:
            raise ValueError(f"plan is for {plan.num_modules} modules, got {len(a_pools)} pools")
        if x.dtype not in DTYPE_SUFFIX:
            raise TypeError(
                f"the CUDA kernels take {sorted(map(str, DTYPE_SUFFIX))}, not {x.dtype}"
            )
        validate_shrink(x, a_pools, bl)
        if out is None:
            out = torch.empty(plan.vp_shape, dtype=torch.float32, device=x.device)
        elif tuple(out.shape) != plan.vp_shape or out.dtype != torch.float32:
            raise ValueError(
                f"out must be float32 {plan.vp_shape}, got {out.dtype} {tuple(out.shape)}"
            )
        elif not out.is_contiguous() or out.device != x.device:
            raise ValueError("out must be contiguous and on x's device")
        if bl[0].num_active and bl[0].num_segments and max_rank(bl[0]) > 0:
            self._run(shrink_launch(plan, x, a_pools, bl, out, threads=threads))
        return out

    def expand(
        self,
        ys: Sequence[torch.Tensor],
        bt_pools: Sequence[torch.Tensor],
        vp: torch.Tensor,
        batches: Batches,
        plan: ShrinkPlan,
        *,
        module: int = 0,
        threads: int | None = None,
    ) -> None:
        """ys[k] += scale * V[module + k] @ Bt rows of `batches[k]`, for k < len(ys).

        `vp` is a whole `shrink` output (`plan.vp_shape`; modules module .. module +
        len(ys) - 1 of the plan are expanded) or a slice of one (`vp[m:m + len(ys)]`,
        with module=0). So a fused shrink's modules may be expanded together or one at a
        time, each with its own batch (its Bt rows)."""
        tail = plan.vp_shape[1:]
        if vp.dtype != torch.float32 or not vp.is_contiguous() or tuple(vp.shape[1:]) != tail:
            raise ValueError(
                f"vp must be contiguous float32 [modules, {', '.join(map(str, tail))}]"
            )
        n = len(ys)
        if vp.shape[0] == plan.num_modules and module >= 0 and module + n <= plan.num_modules:
            vp = vp[module : module + n]
        elif not (vp.shape[0] == n and module == 0):
            raise ValueError(
                f"{n} outputs from module {module} of a {plan.num_modules}-module plan, "
                f"with vp for {vp.shape[0]} modules"
            )
        bl = per_module(batches, n)
        if ys and ys[0].dtype not in DTYPE_SUFFIX:
            raise TypeError(
                f"the CUDA kernels take {sorted(map(str, DTYPE_SUFFIX))}, not {ys[0].dtype}"
            )
        validate_expand(ys, bt_pools, bl)
        if bl[0].num_active != plan.t_active or max_rank(bl[0]) > plan.ldv:
            raise ValueError("the batches do not match the plan (active tokens or ranks)")
        if bl[0].num_active and bl[0].num_segments and max_rank(bl[0]) > 0:
            self._run(expand_launch(plan, ys, bt_pools, vp, bl, self.num_sms, threads=threads))
