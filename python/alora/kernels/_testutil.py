"""Test helpers shared by the CPU (emulated) and GPU kernel tests: random batches with
heterogeneous ranks, scattered pool rows and inactive tokens, and the float64 reference.
Pools are contiguous, or (`Case.granularity`) laid out as the runtime's: overlapping strided
views of a flat buffer, row id c at elements [c*g, c*g + width), NaN outside the rows in use.
By default the modules share one batch (the same row ids in every pool, A and Bt alike);
`Case.distinct_rows` gives every module its own batch, as the runtime builds them: the same
segments, but its own A row ids and its own Bt row ids (`LoraBatch.bt_rows`), and with a
granularity all modules' rows in ONE flat buffer (the KV arena), none overlapping."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from alora.backend import LoraBatch

if TYPE_CHECKING:
    from alora.kernels.launch import CudaBackend

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    segs: tuple[tuple[int, int], ...]  # (tokens, rank) per segment; either may be 0
    inactive: int  # tokens of the step that no segment touches
    in_features: int
    out_features: tuple[int, ...]  # one per module (1 to 3 share x)
    extra_rows: int = 3  # pool rows no segment uses
    misalign: bool = False  # offset every tensor by one element: the scalar (unaligned) paths
    seed: int = 0
    form: str | None = None
    ks: int | None = None
    granularity: int | None = None  # pools as strided views with this row stride (elements)
    distinct_rows: bool = False  # one batch per module: own A and Bt row ids (the runtime's)


@dataclass
class Inputs:
    x: torch.Tensor
    ys: list[torch.Tensor]
    a_pools: list[torch.Tensor]
    bt_pools: list[torch.Tensor]
    batch: LoraBatch  # module 0's (every module's unless `Case.distinct_rows`)
    inactive_idx: torch.Tensor  # token indices outside token_idx
    keep: list[torch.Tensor] = field(default_factory=list)  # storages behind offset views
    batches: list[LoraBatch] = field(default_factory=list)  # one per module


def _tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    g: torch.Generator,
    misalign: bool,
    device: torch.device,
    keep: list[torch.Tensor],
    scale: float = 1.0,
) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    off = 1 if misalign else 0
    buf = (torch.randn(n + off, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    keep.append(buf)
    return buf[off:].view(shape)


def make_inputs(case: Case, device: torch.device | str = "cpu") -> Inputs:
    device = torch.device(device)
    g = torch.Generator().manual_seed(case.seed)
    n_active = sum(n for n, _ in case.segs)
    t = n_active + case.inactive
    ranks = [r for _, r in case.segs]
    r_pool = sum(ranks) + case.extra_rows
    keep: list[torch.Tensor] = []
    x = _tensor((t, case.in_features), case.dtype, g, case.misalign, device, keep)
    a_pools = [
        _tensor((r_pool, case.in_features), case.dtype, g, case.misalign, device, keep, 0.5)
        for _ in case.out_features
    ]
    bt_pools = [
        _tensor((r_pool, o), case.dtype, g, case.misalign, device, keep, 0.5)
        for o in case.out_features
    ]
    row_ids = torch.arange(r_pool, dtype=torch.int32)
    # Per module: pool row p's A row id and Bt row id (shared ids unless distinct_rows).
    a_ids = [row_ids] * len(case.out_features)
    bt_ids = a_ids
    gran = case.granularity
    if case.distinct_rows and gran is None:
        a_ids = [row_ids[torch.randperm(r_pool, generator=g)] for _ in a_pools]
        bt_ids = [row_ids[torch.randperm(r_pool, generator=g)] for _ in a_pools]
    elif case.distinct_rows and gran is not None:
        widths = [case.in_features, *case.out_features]
        step = max(-(-w // gran) for w in widths)  # ids one row spans
        n = 2 * len(a_pools) * r_pool
        slots = (torch.randperm(n + 3, generator=g)[:n] * step).to(torch.int32)
        a_ids = [slots[2 * m * r_pool : (2 * m + 1) * r_pool] for m in range(len(a_pools))]
        bt_ids = [slots[(2 * m + 1) * r_pool : (2 * m + 2) * r_pool] for m in range(len(a_pools))]
        placed = [(a, ids) for a, ids in zip(a_pools, a_ids, strict=True)]
        placed += [(b, ids) for b, ids in zip(bt_pools, bt_ids, strict=True)]
        shared = _shared_arena(placed, gran, case.misalign, keep)
        a_pools, bt_pools = shared[: len(a_pools)], shared[len(a_pools) :]
    elif gran is not None:
        # One row step for every module, since the fused modules share row ids.
        step = max(-(-(case.in_features + o) // gran) for o in case.out_features)
        slots = torch.randperm(r_pool + 3, generator=g)[:r_pool]
        row_ids = (slots * step).to(torch.int32)
        a_ids = bt_ids = [row_ids] * len(a_pools)
        views = [
            _arena(a, b, gran, row_ids, case.misalign, keep)
            for a, b in zip(a_pools, bt_pools, strict=True)
        ]
        a_pools = [v[0] for v in views]
        bt_pools = [v[1] for v in views]
    ys = [_tensor((t, o), case.dtype, g, case.misalign, device, keep) for o in case.out_features]

    perm = torch.randperm(t, generator=g)
    token_idx, inactive_idx = perm[:n_active].clone(), perm[n_active:].clone()
    if case.inactive and case.dtype != torch.float32:
        for y in ys:  # odd bit patterns in rows that must stay bit-identical
            y[inactive_idx[0]] = float("nan")
            y[inactive_idx[-1]] = -0.0
    row_perm = torch.randperm(r_pool, generator=g).to(torch.int32)
    starts, rstarts = [0], [0]
    for n, r in case.segs:
        starts.append(starts[-1] + n)
        rstarts.append(rstarts[-1] + r)
    scales = [0.25 + 1.5 * float(v) for v in torch.rand(len(case.segs), generator=g)]

    def dev(v: torch.Tensor) -> torch.Tensor:
        return v.to(device)

    used = row_perm[: sum(ranks)].long()
    batch = LoraBatch(
        token_idx=dev(token_idx.to(torch.int64)),
        seg_start=dev(torch.tensor(starts, dtype=torch.int32)),
        seg_rank=dev(torch.tensor(ranks, dtype=torch.int32)),
        seg_row_start=dev(torch.tensor(rstarts, dtype=torch.int32)),
        rows=dev(a_ids[0][used].clone()),
        seg_scale=dev(torch.tensor(scales, dtype=torch.float32)),
        seg_start_host=tuple(starts),
        seg_rank_host=tuple(ranks),
        seg_row_start_host=tuple(rstarts),
        seg_scale_host=tuple(scales),
        max_rank=max(ranks, default=0),
        max_seg_tokens=max((n for n, _ in case.segs), default=0),
    )
    batches = [batch] * len(a_pools)
    if case.distinct_rows:
        # The same segment tensors (as the runtime's modules with one segment set share
        # them); each module's own rows, pool row p of the adapter at its A and its Bt id.
        batches = [
            replace(
                batch,
                rows=dev(a[used].clone()),
                rows_host=a[used].numpy(),
                bt_rows=dev(b[used].clone()),
                bt_rows_host=b[used].numpy(),
            )
            for a, b in zip(a_ids, bt_ids, strict=True)
        ]
    return Inputs(x, ys, a_pools, bt_pools, batches[0], dev(inactive_idx), keep, batches)


def _shared_arena(
    placed: list[tuple[torch.Tensor, torch.Tensor]],
    gran: int,
    misalign: bool,
    keep: list[torch.Tensor],
) -> list[torch.Tensor]:
    """One NaN-filled flat buffer holding every (rows [R, w], ids [R]) pair, pool row p at
    elements [ids[p] * gran, ids[p] * gran + w); per pair, the strided view [*, w] (row
    stride `gran`, all views from the buffer's start, as the KV cache's `row_view`)."""
    top = max((int(ids.max()) for _, ids in placed if ids.numel()), default=0)
    wmax = max(t.shape[1] for t, _ in placed)
    size = (top + 1) * gran + wmax + 5 * gran
    off = 1 if misalign else 0
    first = placed[0][0]
    buf = torch.full((size + off,), float("nan"), dtype=first.dtype, device=first.device)
    keep.append(buf)
    flat = buf[off:]
    views = []
    for rows, ids in placed:
        w = rows.shape[1]
        idx = ids.to(device=buf.device, dtype=torch.int64)[:, None] * gran
        idx = idx + torch.arange(w, device=buf.device)[None, :]
        flat[idx.reshape(-1)] = rows.reshape(-1)
        n = (size - w) // gran + 1
        views.append(flat.as_strided((n, w), (gran, 1), flat.storage_offset()))
    return views


def _arena(
    a_rows: torch.Tensor,
    bt_rows: torch.Tensor,
    gran: int,
    row_ids: torch.Tensor,
    misalign: bool,
    keep: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (a [R, in], bt [R, out], row stride `gran`) of a NaN-filled flat buffer where row
    id row_ids[p] holds a_rows[p] then bt_rows[p]."""
    d_in, d_out = a_rows.shape[1], bt_rows.shape[1]
    w = d_in + d_out
    top = int(row_ids.max()) if row_ids.numel() else 0
    size = (top + 1) * gran + w + 5 * gran
    off = 1 if misalign else 0
    buf = torch.full((size + off,), float("nan"), dtype=a_rows.dtype, device=a_rows.device)
    keep.append(buf)
    flat = buf[off:]
    ids = row_ids.to(device=buf.device, dtype=torch.int64)
    idx = ids[:, None] * gran + torch.arange(w, device=buf.device)[None, :]
    flat[idx.reshape(-1)] = torch.cat([a_rows, bt_rows], dim=1).reshape(-1)
    rows = (size - w) // gran + 1
    return (
        flat.as_strided((rows, d_in), (gran, 1), flat.storage_offset()),
        flat.as_strided((rows, d_out), (gran, 1), flat.storage_offset() + d_in),
    )


def reference_v(x: torch.Tensor, a_pool: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
    """float64 V [T_active, max_rank]; NaN where j >= rank of the token's segment."""
    v = torch.full((batch.num_active, max(1, batch.max_rank)), float("nan"), dtype=torch.float64)
    x64 = x.double().cpu()
    tok, rows = batch.token_idx.cpu(), batch.rows.cpu().long()
    for s in range(batch.num_segments):
        t0, t1 = batch.seg_start_host[s], batch.seg_start_host[s + 1]
        r0, r1 = batch.seg_row_start_host[s], batch.seg_row_start_host[s + 1]
        if t1 > t0 and r1 > r0:
            v[t0:t1, : r1 - r0] = x64[tok[t0:t1]] @ _rows64(a_pool, rows[r0:r1]).t()
    return v


def _rows64(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a pool in float64 on the CPU, gathered first: a strided pool view would
    be materialised whole by `.double()`."""
    return pool.index_select(0, idx.to(pool.device)).double().cpu()


def reference_y(
    y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, bt_pool: torch.Tensor, batch: LoraBatch
) -> torch.Tensor:
    """float64 y + the LoRA delta, computed on the CPU (A rows `batch.rows`, Bt rows
    `batch.bt.rows`)."""
    out = y.double().cpu().clone()
    x64 = x.double().cpu()
    tok, rows = batch.token_idx.cpu(), batch.rows.cpu().long()
    bt_rows = batch.bt.rows.cpu().long()
    for s in range(batch.num_segments):
        t0, t1 = batch.seg_start_host[s], batch.seg_start_host[s + 1]
        r0, r1 = batch.seg_row_start_host[s], batch.seg_row_start_host[s + 1]
        if t1 > t0 and r1 > r0:
            a64, b64 = _rows64(a_pool, rows[r0:r1]), _rows64(bt_pool, bt_rows[r0:r1])
            delta = (x64[tok[t0:t1]] @ a64.t()) @ b64 * batch.seg_scale_host[s]
            out.index_add_(0, tok[t0:t1], delta)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over finite reference entries (0 when there are none)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    mask = torch.isfinite(ref)
    if not bool(mask.any()):
        return 0.0
    diff = (got[mask] - ref[mask]).abs().max().item()
    return diff / max(ref[mask].abs().max().item(), 1e-30)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, for bit-identity checks that treat NaN and -0.0 exactly."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check_case(
    backend: CudaBackend,
    case: Case,
    device: torch.device | str = "cpu",
    *,
    expand_each: bool = False,
) -> None:
    """Run shrink then expand for `case` and check them against the float64 reference: V
    (poisoned before the launch, so unwritten elements show), y of active tokens within the
    dtype's tolerance, y of inactive tokens bit-identical. `expand_each`: one fused shrink,
    then each module expanded on its own from its slice of V (what the LoRA hooks do),
    alternately by index into the whole V and from the slice itself."""
    inp = make_inputs(case, device)
    y0 = [y.clone() for y in inp.ys]
    batches = inp.batches
    plan = backend.plan(batches, case.in_features, form=case.form, ks=case.ks)
    vp = torch.full(plan.vp_shape, float("nan"), device=inp.x.device)
    backend.shrink(inp.x, inp.a_pools, batches, plan=plan, out=vp)
    v_all = vp.sum(1).cpu()  # [modules, T_active, ldv]: the splits folded, as expand does
    for m, a in enumerate(inp.a_pools):
        ref = reference_v(inp.x, a, batches[m])
        got = v_all[m, :, : ref.shape[1]]
        written = torch.isfinite(ref)
        assert bool(torch.isfinite(got[written]).all()), f"shrink left V[{m}] elements unwritten"
        assert bool(torch.isnan(got[~written]).all()), f"shrink wrote V[{m}] past a rank"
        assert rel_err(got, ref) <= TOLERANCE[torch.float32], f"V of module {m}"
    if expand_each:
        for m in reversed(range(len(inp.ys))):  # any order
            one = ([inp.ys[m]], [inp.bt_pools[m]])
            if m % 2:
                backend.expand(*one, vp, [batches[m]], plan, module=m)
            else:
                backend.expand(*one, vp[m : m + 1], [batches[m]], plan)
    else:
        backend.expand(inp.ys, inp.bt_pools, vp, batches, plan)
    act, inactive = inp.batch.token_idx, inp.inactive_idx
    for m, y in enumerate(inp.ys):
        ref = reference_y(y0[m], inp.x, inp.a_pools[m], inp.bt_pools[m], batches[m])
        assert rel_err(y[act], ref[act.cpu()]) <= TOLERANCE[case.dtype], f"y of module {m}"
        assert torch.equal(bits(y[inactive]), bits(y0[m][inactive])), "inactive token touched"
