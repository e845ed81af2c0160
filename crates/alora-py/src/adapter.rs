//! `AdapterInfo`: adapter metadata plus zero-copy, read-only numpy views of host weights.

use std::sync::Arc;

use alora_core::adapters::{Adapter, AdapterKind};
use numpy::ndarray::ArrayView2;
use numpy::PyArray2;
use pyo3::exceptions::{PyIndexError, PyKeyError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// (A [r, in], B [out, r]) views.
type WeightViews<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>);

#[pyclass(module = "alora._core", name = "AdapterInfo", frozen)]
pub struct PyAdapterInfo {
    pub adapter: Arc<Adapter>,
    /// Module names of the model spec, in spec order.
    pub modules: Arc<Vec<String>>,
    pub num_layers: usize,
}

impl PyAdapterInfo {
    fn index(&self, layer: usize, module: &str) -> PyResult<usize> {
        if layer >= self.num_layers {
            return Err(PyIndexError::new_err(format!(
                "layer {layer} out of range (model has {} layers)",
                self.num_layers
            )));
        }
        self.modules
            .iter()
            .position(|m| m == module)
            .ok_or_else(|| {
                PyKeyError::new_err(format!(
                    "unknown module `{module}`; known: {:?}",
                    self.modules
                ))
            })
    }
}

/// A read-only numpy view of `data` (row-major `rows x cols`) kept alive by `owner`.
fn view<'py>(
    owner: &Bound<'py, PyAdapterInfo>,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let v = ArrayView2::from_shape((rows, cols), data)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    // SAFETY: `data` lives inside the `Arc<Adapter>` held by `owner`, which is immutable and
    // becomes the array's base object, so the memory outlives the array and never moves.
    let arr = unsafe { PyArray2::borrow_from_array(&v, owner.clone().into_any()) };
    let kw = PyDict::new(owner.py());
    kw.set_item("write", false)?;
    arr.call_method("setflags", (), Some(&kw))?;
    Ok(arr)
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
    fn module_rank(&self, layer: usize, module: &str) -> PyResult<usize> {
        let m = self.index(layer, module)?;
        Ok(self.adapter.module_rank(layer, m))
    }
    fn scale(&self, layer: usize, module: &str) -> PyResult<f64> {
        let m = self.index(layer, module)?;
        Ok(self
            .adapter
            .weights(layer, m)
            .map_or(0.0, |w| w.scale as f64))
    }
    fn weights<'py>(
        slf: &Bound<'py, Self>,
        layer: usize,
        module: &str,
    ) -> PyResult<Option<WeightViews<'py>>> {
        let this = slf.get();
        let m = this.index(layer, module)?;
        let Some(w) = this.adapter.weights(layer, m) else {
            return Ok(None);
        };
        let a = view(slf, &w.a, w.rank, w.a.len() / w.rank)?;
        let b = view(slf, &w.b, w.b.len() / w.rank, w.rank)?;
        Ok(Some((a, b)))
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
