//! `alora._core`: thin PyO3 bindings over `alora-core` (and `alora-cpu`'s kernel). Types and errors are converted
//! here; every decision lives in the core crate.

mod adapter;
mod cpu;
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

/// The `invocation_string` of an aLoRA config without `alora_invocation_tokens` (to be
/// tokenized by the caller), from a directory's `adapter_config.json` or a JSON text. The
/// config is parsed and validated completely, so errors name the file and field.
#[pyfunction]
#[pyo3(signature = (*, path = None, config_json = None))]
fn untokenized_invocation(
    path: Option<std::path::PathBuf>,
    config_json: Option<&str>,
) -> PyResult<Option<String>> {
    use alora_core::adapters::AdapterConfig;
    use errors::IntoPyResult;
    let config = match (path, config_json) {
        (Some(dir), None) => {
            let file = dir.join("adapter_config.json");
            if !file.is_file() {
                return Ok(None); // the loader reports the missing file with its context
            }
            AdapterConfig::from_file(&file).py()?
        }
        (None, Some(text)) => AdapterConfig::from_json_str(text, "<config>").py()?,
        _ => {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "give exactly one of path and config_json",
            ))
        }
    };
    Ok(config.untokenized_invocation().map(str::to_owned))
}

/// Chained base-key hashes (64-bit) of the full blocks of `tokens`: compare with
/// `Engine.cached_base_hashes()` to count a request's leading blocks a replica has cached.
#[pyfunction]
fn base_prefix_hashes(tokens: Vec<u32>, block_size: usize) -> PyResult<Vec<u64>> {
    if block_size == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "block_size must be at least 1",
        ));
    }
    Ok(alora_core::kv::base_prefix_hashes(&tokens, block_size))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(kernel_sources, m)?)?;
    m.add_function(wrap_pyfunction!(activation_start, m)?)?;
    m.add_function(wrap_pyfunction!(untokenized_invocation, m)?)?;
    m.add_function(wrap_pyfunction!(base_prefix_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(adapter::read_adapter_weights, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_add_lora, m)?)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<adapter::PyAdapterInfo>()?;
    m.add_class::<adapter::PyAdapterWeights>()?;
    m.add_class::<plan::PyStepPlan>()?;
    m.add_class::<output::PyRequestOutput>()?;
    Ok(())
}
