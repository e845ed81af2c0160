//! `_core.cpu_add_lora`: the CPU LoRA kernel of `alora-cpu` over numpy views of torch tensors.

use alora_cpu::{RowPool, Segments};
use numpy::ndarray::Dimension;
use numpy::{
    PyReadonlyArray, PyReadonlyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn not_c_order(what: &str) -> PyErr {
    PyValueError::new_err(format!("{what} must be a C-contiguous array"))
}

/// The array's elements in C order. C order only: a Fortran-ordered 2-D array is contiguous
/// too, but not row-major (for 1-D arrays the two coincide).
fn contiguous<'a, T: numpy::Element, D: Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_order(what));
    }
    a.as_slice().map_err(|_| not_c_order(what))
}

/// `y[tok] += scale * (x[tok] . A rows) @ Bt rows` for every segment's tokens; `y` / `x` are
/// the `[tokens, out]` / `[tokens, in]` arrays (C-contiguous, any shape: read flat), `a` /
/// `bt` are `(offset, stride, width)` of the pools inside `a_arena` / `bt_arena` (may be the
/// same array). `segments` packs `[n_tokens, n_rows, token_idx.., seg_start..,
/// seg_row_start.., rows.., bt_rows..]` (int64; the segment count is `len(seg_scale)`; see
/// `LoraBatch.cpu_segments`).
/// Raises ValueError (nothing written) on bad arguments.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn cpu_add_lora(
    py: Python<'_>,
    mut y: PyReadwriteArrayDyn<'_, f32>,
    x: PyReadonlyArrayDyn<'_, f32>,
    a_arena: PyReadonlyArray1<'_, f32>,
    a: (usize, usize, usize),
    bt_arena: PyReadonlyArray1<'_, f32>,
    bt: (usize, usize, usize),
    segments: PyReadonlyArray1<'_, i64>,
    seg_scale: PyReadonlyArray1<'_, f32>,
) -> PyResult<()> {
    let scale = contiguous(&seg_scale, "seg_scale")?;
    let seg = unpack(contiguous(&segments, "segments")?, scale)?;
    let pool = |(offset, stride, width)| RowPool {
        offset,
        stride,
        width,
    };
    let x = contiguous(&x, "x")?;
    let a_arena = contiguous(&a_arena, "a_arena")?;
    let bt_arena = contiguous(&bt_arena, "bt_arena")?;
    if !y.is_c_contiguous() {
        return Err(not_c_order("y"));
    }
    let y = y.as_slice_mut().map_err(|_| not_c_order("y"))?;
    py.detach(|| alora_cpu::add_lora(y, x, a_arena, pool(a), bt_arena, pool(bt), &seg))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `[n_tokens, n_rows, token_idx.., seg_start.., seg_row_start.., rows.., bt_rows..]` with
/// `n_segments = seg_scale.len()`.
fn unpack<'a>(packed: &'a [i64], seg_scale: &'a [f32]) -> PyResult<Segments<'a>> {
    let bad = || PyValueError::new_err("segments array does not match its header");
    let (&nt, &nr) = (
        packed.first().ok_or_else(bad)?,
        packed.get(1).ok_or_else(bad)?,
    );
    let (nt, nr) = (
        usize::try_from(nt).map_err(|_| bad())?,
        usize::try_from(nr).map_err(|_| bad())?,
    );
    let ns = seg_scale.len() + 1;
    let mut rest = &packed[2..];
    let mut take = |n: usize| -> PyResult<&'a [i64]> {
        if rest.len() < n {
            return Err(bad());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let seg = Segments {
        token_idx: take(nt)?,
        seg_start: take(ns)?,
        seg_row_start: take(ns)?,
        rows: take(nr)?,
        bt_rows: take(nr)?,
        seg_scale,
    };
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(seg)
}
