//! `AdapterInfo` (adapter metadata, no weights) and `AdapterWeights` (an adapter's host
//! weights, with zero-copy read-only numpy views), and `read_adapter_weights`.

use std::sync::Arc;

use alora_core::adapters::{Adapter, AdapterKind, HostWeights};
use numpy::ndarray::ArrayView2;
use numpy::PyArray2;
use pyo3::exceptions::{PyIndexError, PyKeyError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;

/// (A [r, in], B [out, r]) views.
type WeightViews<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>);

/// The index of `module` in `modules`, after checking `layer`.
fn module_index(
    modules: &[String],
    num_layers: usize,
    layer: usize,
    module: &str,
) -> PyResult<usize> {
    if layer >= num_layers {
        return Err(PyIndexError::new_err(format!(
            "layer {layer} out of range (model has {num_layers} layers)"
        )));
    }
    modules.iter().position(|m| m == module).ok_or_else(|| {
        PyKeyError::new_err(format!("unknown module `{module}`; known: {modules:?}"))
    })
}

#[pyclass(module = "alora._core", name = "AdapterInfo", frozen)]
pub struct PyAdapterInfo {
    pub adapter: Arc<Adapter>,
    /// Module names of the model spec, in spec order.
    pub modules: Arc<Vec<String>>,
    pub num_layers: usize,
}

impl PyAdapterInfo {
    fn index(&self, layer: usize, module: &str) -> PyResult<usize> {
        module_index(&self.modules, self.num_layers, layer, module)
    }
}

#[pymethods]
impl PyAdapterInfo {
    #[getter]
    fn id(&self) -> u64 {
        self.adapter.id
    }
    #[getter]
    fn name(&self) -> &str {
        &self.adapter.name
    }
    #[getter]
    fn kind(&self) -> &'static str {
        match self.adapter.kind {
            AdapterKind::Lora => "lora",
            AdapterKind::ALora => "alora",
        }
    }
    #[getter]
    fn rank(&self) -> usize {
        self.adapter.max_rank
    }
    #[getter]
    fn use_rslora(&self) -> bool {
        self.adapter.config.use_rslora
    }
    #[getter]
    fn invocation_tokens(&self) -> Option<Vec<u32>> {
        self.adapter.invocation_tokens.clone()
    }
    #[getter]
    fn target_modules(&self) -> Vec<String> {
        self.adapter
            .targeted_modules()
            .into_iter()
            .map(|m| self.modules[m].clone())
            .collect()
    }
    #[getter]
    fn config_json(&self) -> &str {
        &self.adapter.config.raw_json
    }
    /// Per module (spec order): the max rank over layers, 0 where not targeted.
    #[getter]
    fn module_ranks(&self) -> Vec<usize> {
        self.adapter.module_ranks.clone()
    }
    /// The largest |scale| over adapted (layer, module)s; 1.0 if that is 0.
    #[getter]
    fn segment_scale(&self) -> f64 {
        self.adapter.max_abs_scale as f64
    }
    /// Bytes of its f32 weights once read.
    #[getter]
    fn host_bytes(&self) -> usize {
        self.adapter.host_bytes()
    }
    fn module_rank(&self, layer: usize, module: &str) -> PyResult<usize> {
        let m = self.index(layer, module)?;
        Ok(self.adapter.module_rank(layer, m))
    }
    fn scale(&self, layer: usize, module: &str) -> PyResult<f64> {
        let m = self.index(layer, module)?;
        Ok(self.adapter.scale(layer, m).map_or(0.0, f64::from))
    }
    fn __repr__(&self) -> String {
        format!(
            "AdapterInfo(name={:?}, kind={:?}, rank={}, id={})",
            self.adapter.name,
            self.kind(),
            self.adapter.max_rank,
            self.adapter.id
        )
    }
}

/// An adapter's weights on the host (f32), immutable.
#[pyclass(module = "alora._core", name = "AdapterWeights", frozen)]
pub struct PyAdapterWeights {
    pub adapter_id: u64,
    pub weights: Arc<HostWeights>,
    /// Module names of the model spec, in spec order.
    pub modules: Arc<Vec<String>>,
}

impl PyAdapterWeights {
    fn index(&self, layer: usize, module: &str) -> PyResult<usize> {
        module_index(&self.modules, self.weights.num_layers(), layer, module)
    }
}

/// A read-only numpy view of `data` (row-major `rows x cols`) kept alive by `owner`.
fn view<'py>(
    owner: &Bound<'py, PyAdapterWeights>,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let v = ArrayView2::from_shape((rows, cols), data)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    // SAFETY: `data` lives inside the `Arc<HostWeights>` held by `owner`, which is immutable
    // and becomes the array's base object, so the memory outlives the array and never moves.
    let arr = unsafe { PyArray2::borrow_from_array(&v, owner.clone().into_any()) };
    let kw = PyDict::new(owner.py());
    kw.set_item("write", false)?;
    arr.call_method("setflags", (), Some(&kw))?;
    Ok(arr)
}

#[pymethods]
impl PyAdapterWeights {
    #[getter]
    fn adapter_id(&self) -> u64 {
        self.adapter_id
    }
    /// Bytes of the f32 values.
    #[getter]
    fn bytes(&self) -> usize {
        self.weights.bytes()
    }
    /// (A [r, in], B [out, r]): float32 read-only views of Rust memory; None if not adapted.
    fn weights<'py>(
        slf: &Bound<'py, Self>,
        layer: usize,
        module: &str,
    ) -> PyResult<Option<WeightViews<'py>>> {
        let this = slf.get();
        let m = this.index(layer, module)?;
        let Some(w) = this.weights.get(layer, m) else {
            return Ok(None);
        };
        let a = view(slf, &w.a, w.rank, w.a.len() / w.rank)?;
        let b = view(slf, &w.b, w.b.len() / w.rank, w.rank)?;
        Ok(Some((a, b)))
    }
    /// The (layer, module)'s scale; 0.0 if not adapted.
    fn scale(&self, layer: usize, module: &str) -> PyResult<f64> {
        let m = self.index(layer, module)?;
        Ok(self
            .weights
            .get(layer, m)
            .map_or(0.0, |w| f64::from(w.scale)))
    }
    fn __repr__(&self) -> String {
        format!(
            "AdapterWeights(adapter_id={}, bytes={})",
            self.adapter_id,
            self.weights.bytes()
        )
    }
}

/// Reads and validates an adapter's weights (from its file, or the kept ones of an adapter
/// loaded from memory) without the engine and with the GIL released, so a thread can
/// prefetch. Errors as loading used to raise (AdapterFormatError for a file changed since
/// registration or holding non-finite values).
#[pyfunction]
pub fn read_adapter_weights(
    py: Python<'_>,
    info: &Bound<'_, PyAdapterInfo>,
) -> PyResult<PyAdapterWeights> {
    let info = info.get();
    let adapter = Arc::clone(&info.adapter);
    let weights = py.detach(move || adapter.read_weights()).py()?;
    Ok(PyAdapterWeights {
        adapter_id: info.adapter.id,
        weights,
        modules: Arc::clone(&info.modules),
    })
}
