//! `Engine`: the request-level API of the core, one-to-one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use alora_core::adapters::{AdapterConfig, ModelSpec, ModuleSpec, TensorInput};
use alora_core::engine::{Engine, RequestParams};
use alora_core::scheduler::SchedulerConfig;
use alora_core::Error;
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::adapter::PyAdapterInfo;
use crate::errors::IntoPyResult;
use crate::output::PyRequestOutput;
use crate::plan::PyStepPlan;

#[pyclass(module = "alora._core", name = "Engine")]
pub struct PyEngine {
    inner: Engine,
    modules: Arc<Vec<String>>,
}

fn token_ids(what: &str, ids: Vec<i64>) -> alora_core::Result<Vec<u32>> {
    ids.into_iter()
        .map(|t| {
            u32::try_from(t).map_err(|_| {
                Error::InvalidRequest(format!("{what} contains token id {t}, not a valid id"))
            })
        })
        .collect()
}

impl PyEngine {
    fn info(&self, a: Arc<alora_core::adapters::Adapter>) -> PyAdapterInfo {
        PyAdapterInfo {
            adapter: a,
            modules: self.modules.clone(),
            num_layers: self.inner.registry().spec().num_layers,
        }
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (*, num_layers, modules, block_size, num_blocks, max_batch_tokens, max_num_seqs,
                        adapter_rows, max_model_len, page_rows = 8, enable_prefix_cache = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_layers: usize,
        modules: Vec<(String, String, usize, usize)>,
        block_size: usize,
        num_blocks: usize,
        max_batch_tokens: usize,
        max_num_seqs: usize,
        adapter_rows: usize,
        max_model_len: usize,
        page_rows: usize,
        enable_prefix_cache: bool,
    ) -> PyResult<Self> {
        let names = Arc::new(modules.iter().map(|m| m.0.clone()).collect());
        let spec = ModelSpec::new(
            num_layers,
            modules
                .into_iter()
                .map(|(name, path, in_features, out_features)| ModuleSpec {
                    name,
                    path,
                    in_features,
                    out_features,
                })
                .collect(),
        )
        .py()?;
        let cfg = SchedulerConfig {
            block_size,
            num_blocks,
            max_batch_tokens,
            max_num_seqs,
            max_model_len,
            adapter_rows,
            page_rows,
            enable_prefix_cache,
        };
        Ok(Self {
            inner: Engine::new(spec, cfg).py()?,
            modules: names,
        })
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.config().block_size
    }
    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.config().num_blocks
    }
    #[getter]
    fn adapter_rows(&self) -> usize {
        self.inner.scheduler().rows.total_rows()
    }

    #[pyo3(signature = (name, path, invocation_tokens = None))]
    fn load_adapter(
        &mut self,
        name: &str,
        path: PathBuf,
        invocation_tokens: Option<Vec<i64>>,
    ) -> PyResult<PyAdapterInfo> {
        let inv = invocation_tokens
            .map(|t| token_ids("invocation_tokens", t))
            .transpose()
            .py()?;
        let a = self.inner.load_adapter_dir(name, &path, inv).py()?;
        Ok(self.info(a))
    }

    #[pyo3(signature = (name, config_json, tensors, invocation_tokens = None))]
    fn load_adapter_from_tensors(
        &mut self,
        name: &str,
        config_json: &str,
        tensors: HashMap<String, PyReadonlyArrayDyn<'_, f32>>,
        invocation_tokens: Option<Vec<i64>>,
    ) -> PyResult<PyAdapterInfo> {
        let inv = invocation_tokens
            .map(|t| token_ids("invocation_tokens", t))
            .transpose()
            .py()?;
        let config = AdapterConfig::from_json_str(config_json, "<config>").py()?;
        let mut inputs: Vec<TensorInput> = tensors
            .into_iter()
            .map(|(name, arr)| TensorInput {
                shape: arr.shape().to_vec(),
                data: arr.as_array().iter().copied().collect(),
                name,
            })
            .collect();
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        let a = self
            .inner
            .load_adapter_tensors(name, config, inputs, inv)
            .py()?;
        Ok(self.info(a))
    }

    fn unload_adapter(&mut self, name: &str) -> PyResult<()> {
        self.inner.unload_adapter(name).py()
    }

    fn adapter(&self, name: &str) -> PyResult<PyAdapterInfo> {
        let a = self.inner.registry().get(name).py()?.clone();
        Ok(self.info(a))
    }

    fn adapters(&self) -> Vec<PyAdapterInfo> {
        self.inner
            .registry()
            .iter()
            .map(|a| self.info(a.clone()))
            .collect()
    }

    #[pyo3(signature = (prompt, *, adapter = None, max_new_tokens = 16, stop_token_ids = Vec::new()))]
    fn add_request(
        &mut self,
        prompt: Vec<i64>,
        adapter: Option<String>,
        max_new_tokens: usize,
        stop_token_ids: Vec<i64>,
    ) -> PyResult<u64> {
        let prompt = token_ids("prompt", prompt).py()?;
        let stop_token_ids = token_ids("stop_token_ids", stop_token_ids).py()?;
        self.inner
            .add_request(
                prompt,
                RequestParams {
                    adapter,
                    max_new_tokens,
                    stop_token_ids,
                },
            )
            .py()
    }

    fn schedule(&mut self, py: Python<'_>) -> PyResult<Option<PyStepPlan>> {
        match self.inner.schedule().py()? {
            Some(p) => Ok(Some(PyStepPlan::new(py, p)?)),
            None => Ok(None),
        }
    }

    fn commit(&mut self, step_id: u64, sampled: Vec<i64>) -> PyResult<Vec<PyRequestOutput>> {
        Ok(self
            .inner
            .commit(step_id, &sampled)
            .py()?
            .into_iter()
            .map(PyRequestOutput)
            .collect())
    }

    fn abort(&mut self, request_id: u64) -> PyResult<PyRequestOutput> {
        self.inner.abort(request_id).py().map(PyRequestOutput)
    }

    fn request_output(&self, request_id: u64) -> PyResult<PyRequestOutput> {
        self.inner
            .request_output(request_id)
            .py()
            .map(PyRequestOutput)
    }

    fn has_unfinished(&self) -> bool {
        self.inner.has_unfinished()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.stats() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn reset_prefix_cache(&mut self) {
        self.inner.reset_prefix_cache();
    }
}
