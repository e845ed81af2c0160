//! alora-cpu: the CPU form of the batched LoRA op for decode-shaped steps (few tokens per
//! adapter), the BGMV of DESIGN.md section 6:
//!
//! ```text
//! shrink: v[i, j]  = x[tok[i]] . A[rows(a)[j]]                  j < rank(a)
//! expand: y[tok[i]] += scale(a) * sum_j v[i, j] * Bt[bt_rows(a)[j]]
//! ```
//!
//! Rows are read in place from the runtime's arena (the KV cache's memory, where adapter rows
//! live between KV blocks): row `c` of a pool starts at element `offset + c * stride` of its
//! arena (A and Bt rows may sit in different arenas, or in the same one), so rows may be scattered or strided and nothing is gathered or copied. Torch's
//! batched mat-vec over such rows reaches about a third of this machine's read bandwidth
//! (dispatch and per-matrix setup dominate at rank 16); these loops stream each row once per
//! segment at close to the bandwidth limit. Accumulation is in f32, as the torch CPU path.
//!
//! Everything is validated before the first write, so an error leaves `y` untouched.

use multiversion::multiversion;

/// Why a call was refused (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("LoRA kernel argument error: {0}")]
pub struct KernelError(pub String);

/// Where a pool's rows live in its arena: row `c` is `arena[offset + c * stride ..][..width]`.
/// `stride` may be smaller than `width` (overlapping row views: only the rows in use are
/// disjoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPool {
    pub offset: usize,
    pub stride: usize,
    pub width: usize,
}

/// The step's active tokens grouped by adapter, as the Python `LoraBatch` holds them.
#[derive(Debug, Clone, Copy)]
pub struct Segments<'a> {
    /// Indices into the step's token axis, segment after segment.
    pub token_idx: &'a [i64],
    /// `[num_segments + 1]` offsets into `token_idx`.
    pub seg_start: &'a [i64],
    /// `[num_segments + 1]` offsets into `rows` / `bt_rows` (the segment's rank is the span).
    pub seg_row_start: &'a [i64],
    /// A row ids of each segment's adapter.
    pub rows: &'a [i64],
    /// Bt row ids, parallel to `rows`.
    pub bt_rows: &'a [i64],
    /// `[num_segments]` scale applied to the segment's delta.
    pub seg_scale: &'a [f32],
}

fn err<T>(msg: impl Into<String>) -> Result<T, KernelError> {
    Err(KernelError(msg.into()))
}

fn offsets(name: &str, v: &[i64], segments: usize, end: usize) -> Result<(), KernelError> {
    if v.len() != segments + 1 {
        return err(format!(
            "{name} has {} entries, expected {}",
            v.len(),
            segments + 1
        ));
    }
    if v[0] != 0 || v[segments] as u64 != end as u64 || v.windows(2).any(|w| w[1] < w[0]) {
        return err(format!("{name} must rise from 0 to {end}"));
    }
    Ok(())
}

fn check_rows(what: &str, rows: &[i64], pool: RowPool, arena: usize) -> Result<(), KernelError> {
    let Some(&max) = rows.iter().max() else {
        return Ok(());
    };
    if rows.iter().any(|&r| r < 0) {
        return err(format!("negative {what} row id"));
    }
    let end = (max as u64)
        .checked_mul(pool.stride as u64)
        .and_then(|e| e.checked_add((pool.offset + pool.width) as u64));
    match end {
        Some(e) if e <= arena as u64 => Ok(()),
        _ => err(format!(
            "{what} row {max} (offset {} + row * {} + width {}) lies outside the arena of {arena} elements",
            pool.offset, pool.stride, pool.width
        )),
    }
}

/// Validates every argument against the shapes; returns the number of tokens of the step.
fn validate(
    y: &[f32],
    x: &[f32],
    a_arena: &[f32],
    a: RowPool,
    bt_arena: &[f32],
    bt: RowPool,
    seg: &Segments<'_>,
) -> Result<usize, KernelError> {
    if a.width == 0 || bt.width == 0 {
        return err("row widths must be positive");
    }
    if !y.len().is_multiple_of(bt.width) {
        return err(format!(
            "y has {} elements, not a multiple of out = {}",
            y.len(),
            bt.width
        ));
    }
    let tokens = y.len() / bt.width;
    if x.len() != tokens * a.width {
        return err(format!(
            "x has {} elements, expected {tokens} tokens x in = {}",
            x.len(),
            a.width
        ));
    }
    let n = seg.seg_scale.len();
    offsets("seg_start", seg.seg_start, n, seg.token_idx.len())?;
    offsets("seg_row_start", seg.seg_row_start, n, seg.rows.len())?;
    if seg.bt_rows.len() != seg.rows.len() {
        return err(format!(
            "{} Bt row ids for {} A row ids",
            seg.bt_rows.len(),
            seg.rows.len()
        ));
    }
    if let Some(&t) = seg
        .token_idx
        .iter()
        .find(|&&t| t < 0 || t as u64 >= tokens as u64)
    {
        return err(format!(
            "token index {t} outside the step's {tokens} tokens"
        ));
    }
    check_rows("A", seg.rows, a, a_arena.len())?;
    check_rows("Bt", seg.bt_rows, bt, bt_arena.len())?;
    Ok(tokens)
}

/// `y += delta` for the segments' tokens (`y` is `[tokens, bt.width]`, `x` is
/// `[tokens, a.width]`, both row-major). Refuses bad arguments before writing anything.
pub fn add_lora(
    y: &mut [f32],
    x: &[f32],
    a_arena: &[f32],
    a: RowPool,
    bt_arena: &[f32],
    bt: RowPool,
    seg: &Segments<'_>,
) -> Result<(), KernelError> {
    validate(y, x, a_arena, a, bt_arena, bt, seg)?;
    let max_work = (0..seg.seg_scale.len())
        .map(|s| {
            let ntok = (seg.seg_start[s + 1] - seg.seg_start[s]) as usize;
            let rank = (seg.seg_row_start[s + 1] - seg.seg_row_start[s]) as usize;
            ntok * rank
        })
        .max()
        .unwrap_or(0);
    let mut v = vec![0f32; max_work];
    run(y, x, a_arena, a, bt_arena, bt, seg, &mut v);
    Ok(())
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
#[allow(clippy::too_many_arguments)]
fn run<'s>(
    y: &mut [f32],
    x: &[f32],
    a_arena: &[f32],
    a: RowPool,
    bt_arena: &[f32],
    bt: RowPool,
    seg: &Segments<'s>,
    v: &mut [f32],
) {
    let (din, dout) = (a.width, bt.width);
    for s in 0..seg.seg_scale.len() {
        let toks = &seg.token_idx[seg.seg_start[s] as usize..seg.seg_start[s + 1] as usize];
        let r0 = seg.seg_row_start[s] as usize;
        let r1 = seg.seg_row_start[s + 1] as usize;
        let rank = r1 - r0;
        if toks.is_empty() || rank == 0 {
            continue;
        }
        let scale = seg.seg_scale[s];
        let v = &mut v[..toks.len() * rank];
        // Shrink: A rows in groups of GROUP share each load of x (per token); every A row is
        // read from memory once per segment.
        let ids = &seg.rows[r0..r1];
        let mut j = 0;
        while j + GROUP <= rank {
            let arows: [&[f32]; GROUP] = std::array::from_fn(|g| row(a_arena, a, ids[j + g]));
            for (i, &t) in toks.iter().enumerate() {
                let d = dot_group(&arows, &x[t as usize * din..][..din]);
                for (g, dg) in d.iter().enumerate() {
                    v[i * rank + j + g] = scale * dg;
                }
            }
            j += GROUP;
        }
        for (jj, &rid) in ids.iter().enumerate().skip(j) {
            let arow = row(a_arena, a, rid);
            for (i, &t) in toks.iter().enumerate() {
                v[i * rank + jj] = scale * dot(arow, &x[t as usize * din..][..din]);
            }
        }
        // Expand: Bt rows in groups of GROUP per pass over the token's y row (one store of y
        // per GROUP rows read), then the rest one at a time; the sum's order is row by row
        // either way.
        let bt_ids = &seg.bt_rows[r0..r1];
        for (i, &t) in toks.iter().enumerate() {
            let yrow = &mut y[t as usize * dout..][..dout];
            let c = &v[i * rank..][..rank];
            let mut j = 0;
            while j + GROUP <= rank {
                let brows: [&[f32]; GROUP] =
                    std::array::from_fn(|g| row(bt_arena, bt, bt_ids[j + g]));
                axpy_group(yrow, c[j..j + GROUP].try_into().unwrap(), &brows);
                j += GROUP;
            }
            for (&cj, &bid) in c[j..].iter().zip(&bt_ids[j..]) {
                axpy(yrow, cj, row(bt_arena, bt, bid));
            }
        }
    }
}

/// Rows per group, in the shrink (four A rows share each load of x, their 4 x LANES partial
/// sums keep the vector units busy) and in the expand (four Bt rows per load and store of
/// y). Measured on one core, one decode step's rows from memory (`bench_cpu_kernel.py`):
/// the expand at one row per pass ran at half the read rate of the same loop without its
/// stores of y; four rows per pass took the whole kernel from ~0.65x to ~0.8x of a plain
/// sum over the same bytes. Eight rows gained ~2% more with AVX-512 and would spill AVX2's
/// sixteen registers.
const GROUP: usize = 4;

#[inline(always)]
fn row(arena: &[f32], pool: RowPool, id: i64) -> &[f32] {
    &arena[pool.offset + id as usize * pool.stride..][..pool.width]
}

const LANES: usize = 32;

/// Dot product with 32 independent partial sums (vectorised by the compiler without
/// reassociating a single sum; fixed-size chunks so no bounds check is left in the loop).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let ((ca, ta), (cb, tb)) = (a[..n].as_chunks::<LANES>(), b[..n].as_chunks::<LANES>());
    let mut acc = [0f32; LANES];
    for (p, q) in ca.iter().zip(cb) {
        for k in 0..LANES {
            acc[k] += p[k] * q[k];
        }
    }
    reduce(acc, ta.iter().zip(tb).map(|(p, q)| p * q).sum())
}

/// Pairwise reduction of the partial sums, then the tail: the one order `dot` and
/// `dot_group` share, so a row's result does not depend on which of them computed it.
#[inline(always)]
fn reduce(mut acc: [f32; LANES], tail: f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            acc[k] += acc[k + w];
        }
    }
    acc[0] + tail
}

/// `GROUP` (4) dot products of `x` with `rows`, sharing each load of `x`; each row's sum has
/// the same LANES partial sums and reduction as `dot`, so grouping does not change a result.
#[inline(always)]
fn dot_group(rows: &[&[f32]; GROUP], x: &[f32]) -> [f32; GROUP] {
    let n = x.len();
    let (cx, tx) = x.as_chunks::<LANES>();
    let c: [(&[[f32; LANES]], &[f32]); GROUP] =
        std::array::from_fn(|g| rows[g][..n].as_chunks::<LANES>());
    let mut acc = [[0f32; LANES]; GROUP];
    for (i, xc) in cx.iter().enumerate() {
        let r: [&[f32; LANES]; GROUP] = std::array::from_fn(|g| &c[g].0[i]);
        for l in 0..LANES {
            acc[0][l] += r[0][l] * xc[l];
            acc[1][l] += r[1][l] * xc[l];
            acc[2][l] += r[2][l] * xc[l];
            acc[3][l] += r[3][l] * xc[l];
        }
    }
    std::array::from_fn(|g| reduce(acc[g], c[g].1.iter().zip(tx).map(|(p, q)| p * q).sum()))
}

/// `y += c[0] * rows[0]`, then `+= c[1] * rows[1]`, ... in one pass over `y`: per element the
/// same operations in the same order as `GROUP` calls of `axpy`, so the same bits.
#[inline(always)]
fn axpy_group(y: &mut [f32], c: [f32; GROUP], rows: &[&[f32]; GROUP]) {
    let n = y.len();
    let (r0, r1, r2, r3) = (&rows[0][..n], &rows[1][..n], &rows[2][..n], &rows[3][..n]);
    for k in 0..n {
        y[k] = (((y[k] + c[0] * r0[k]) + c[1] * r1[k]) + c[2] * r2[k]) + c[3] * r3[k];
    }
}

#[inline(always)]
fn axpy(y: &mut [f32], c: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += c * xi;
    }
}

#[cfg(test)]
mod tests;
