//! `alora._core`: thin PyO3 bindings over `alora-core`. Types and errors are converted
//! here; every decision lives in the core crate.

mod adapter;
mod engine;
mod errors;
mod output;
mod plan;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// CUDA sources from `cuda/`, embedded at build time: file name -> text.
#[pyfunction]
fn kernel_sources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, text) in alora_core::kernels::SOURCES {
        d.set_item(name, text)?;
    }
    Ok(d)
}

/// First index of the last occurrence of `invocation` in `tokens`, or None.
#[pyfunction]
fn activation_start(tokens: Vec<u32>, invocation: Vec<u32>) -> Option<usize> {
    alora_core::invocation::activation_start(&tokens, &invocation)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(kernel_sources, m)?)?;
    m.add_function(wrap_pyfunction!(activation_start, m)?)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<adapter::PyAdapterInfo>()?;
    m.add_class::<plan::PyStepPlan>()?;
    m.add_class::<output::PyRequestOutput>()?;
    Ok(())
}
