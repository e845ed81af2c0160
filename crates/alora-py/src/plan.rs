//! `StepPlan`: the core's plan moved into numpy arrays without copying element by element
//! (each `Vec` becomes the array's buffer).

use alora_core::plan::StepPlan;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;

use crate::adapter::PyAdapterWeights;

/// (adapter id, row_start per module, A rows, Bt rows, host weights).
type PageIn = (
    u64,
    Py<PyArray1<i32>>,
    Py<PyArray1<i32>>,
    Py<PyArray1<i32>>,
    Py<PyAdapterWeights>,
);

#[pyclass(module = "alora._core", name = "StepPlan", frozen)]
pub struct PyStepPlan {
    #[pyo3(get)]
    step_id: u64,
    #[pyo3(get)]
    num_tokens: usize,
    #[pyo3(get)]
    num_seqs: usize,
    #[pyo3(get)]
    request_ids: Py<PyArray1<u64>>,
    #[pyo3(get)]
    input_ids: Py<PyArray1<i64>>,
    #[pyo3(get)]
    positions: Py<PyArray1<i64>>,
    #[pyo3(get)]
    slot_mapping: Py<PyArray1<i64>>,
    #[pyo3(get)]
    query_start: Py<PyArray1<i64>>,
    #[pyo3(get)]
    context_lens: Py<PyArray1<i64>>,
    #[pyo3(get)]
    block_tables: Py<PyArray2<i32>>,
    #[pyo3(get)]
    sample_indices: Py<PyArray1<i64>>,
    #[pyo3(get)]
    sample_seqs: Py<PyArray1<i64>>,
    #[pyo3(get)]
    token_adapter_slot: Py<PyArray1<i32>>,
    #[pyo3(get)]
    sorted_token_idx: Py<PyArray1<i64>>,
    #[pyo3(get)]
    segment_start: Py<PyArray1<i32>>,
    #[pyo3(get)]
    segment_adapter: Py<PyArray1<u64>>,
    #[pyo3(get)]
    adapter_rank: Py<PyArray1<i32>>,
    #[pyo3(get)]
    adapter_row_start: Py<PyArray1<i32>>,
    #[pyo3(get)]
    adapter_rows: Py<PyArray1<i32>>,
    #[pyo3(get)]
    adapter_bt_rows: Py<PyArray1<i32>>,
    #[pyo3(get)]
    copy_src: Py<PyArray1<i64>>,
    #[pyo3(get)]
    copy_dst: Py<PyArray1<i64>>,
    #[pyo3(get)]
    copy_len: Py<PyArray1<i64>>,
    /// (adapter id, row_start per module, rows): page-ins to run before the forward.
    #[pyo3(get)]
    adapter_loads: Vec<PageIn>,
}

impl PyStepPlan {
    /// `weights`: the host weights of each of the plan's page-ins, in order.
    pub fn new(py: Python<'_>, p: StepPlan, weights: Vec<PyAdapterWeights>) -> PyResult<Self> {
        fn arr<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> Py<PyArray1<T>> {
            v.into_pyarray(py).unbind()
        }
        let (num_tokens, num_seqs) = (p.num_tokens(), p.num_seqs());
        let block_tables = p
            .block_tables
            .into_pyarray(py)
            .reshape([num_seqs, p.max_blocks])?
            .unbind();
        Ok(Self {
            step_id: p.step_id,
            num_tokens,
            num_seqs,
            request_ids: arr(py, p.request_ids),
            input_ids: arr(py, p.input_ids),
            positions: arr(py, p.positions),
            slot_mapping: arr(py, p.slot_mapping),
            query_start: arr(py, p.query_start),
            context_lens: arr(py, p.context_lens),
            block_tables,
            sample_indices: arr(py, p.sample_indices),
            sample_seqs: arr(py, p.sample_seqs),
            token_adapter_slot: arr(py, p.token_adapter_slot),
            sorted_token_idx: arr(py, p.sorted_token_idx),
            segment_start: arr(py, p.segment_start),
            segment_adapter: arr(py, p.segment_adapter),
            adapter_rank: arr(py, p.adapter_rank),
            adapter_row_start: arr(py, p.adapter_row_start),
            adapter_rows: arr(py, p.adapter_rows),
            adapter_bt_rows: arr(py, p.adapter_bt_rows),
            copy_src: arr(py, p.copy_src),
            copy_dst: arr(py, p.copy_dst),
            copy_len: arr(py, p.copy_len),
            adapter_loads: p
                .adapter_loads
                .into_iter()
                .zip(weights)
                .map(|(l, w)| {
                    let r = l.rows;
                    Ok((
                        l.id,
                        arr(py, r.row_start),
                        arr(py, r.a_rows),
                        arr(py, r.bt_rows),
                        Py::new(py, w)?,
                    ))
                })
                .collect::<PyResult<_>>()?,
        })
    }
}

#[pymethods]
impl PyStepPlan {
    fn __repr__(&self) -> String {
        format!(
            "StepPlan(step_id={}, num_seqs={}, num_tokens={})",
            self.step_id, self.num_seqs, self.num_tokens
        )
    }
}
