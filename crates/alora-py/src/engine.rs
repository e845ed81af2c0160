//! `Engine`: the request-level API of the core, one-to-one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use alora_core::adapters::{AdapterConfig, ModelSpec, ModuleSpec, TensorInput};
use alora_core::engine::{Engine, RequestParams};
use alora_core::scheduler::SchedulerConfig;
use alora_core::Error;
use numpy::{PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString};

use crate::adapter::{PyAdapterInfo, PyAdapterWeights};
use crate::errors::{to_py, IntoPyResult};
use crate::output::PyRequestOutput;
use crate::plan::PyStepPlan;

#[pyclass(module = "alora._core", name = "Engine")]
pub struct PyEngine {
    inner: Engine,
    modules: Arc<Vec<String>>,
}

fn invalid(detail: String) -> PyErr {
    to_py(Error::InvalidRequest(detail))
}

/// Token ids from any Python sequence of integers (or a 1-D integer numpy array); anything
/// else is an `InvalidRequestError` naming the argument and the first bad element. Bools are
/// refused although Python counts them as integers.
fn token_ids(what: &str, ids: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(arr) = ids.extract::<PyReadonlyArray1<'_, i64>>() {
        return arr
            .as_array()
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                u32::try_from(t)
                    .map_err(|_| invalid(format!("{what}[{i}] is {t}, not a valid token id")))
            })
            .collect();
    }
    if ids.is_instance_of::<PyString>() || ids.is_instance_of::<PyBytes>() {
        return Err(invalid(format!(
            "{what} must be a sequence of token ids, not a string"
        )));
    }
    let items = ids
        .try_iter()
        .map_err(|_| invalid(format!("{what} must be a sequence of token ids")))?;
    let mut out = Vec::with_capacity(ids.len().unwrap_or(0));
    for (i, item) in items.enumerate() {
        let item = item?;
        // Exact ints take the fast path; numpy integers and other int subclasses are checked.
        let int_like = item.is_exact_instance_of::<PyInt>()
            || (!item.is_instance_of::<PyBool>()
                && !item.is_instance_of::<PyFloat>()
                && item.hasattr("__index__")?);
        if !int_like {
            return Err(invalid(format!(
                "{what}[{i}] must be an integer token id, got {} {}",
                item.get_type().name()?,
                item.repr()?
            )));
        }
        let t = item.extract::<u32>().map_err(|_| {
            invalid(format!(
                "{what}[{i}] is {}, not a valid token id",
                item.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        })?;
        out.push(t);
    }
    Ok(out)
}

/// A count argument: an integer >= 1 (bools refused); values beyond the platform's range
/// saturate, as they mean "no limit" and the engine clamps them to `max_model_len`.
fn count(what: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    let bad = || {
        invalid(format!(
            "{what} must be an integer >= 1, got {}",
            v.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    };
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(bad());
    }
    if v.lt(1)? {
        return Err(bad());
    }
    Ok(v.extract::<usize>().unwrap_or(usize::MAX))
}

fn request_id_arg(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(invalid(format!(
            "request_id must be an integer, got {}",
            v.repr()?
        )));
    }
    v.extract::<u64>().map_err(|_| {
        to_py(Error::InvalidRequest(format!(
            "request_id {} is not a request id (ids are integers >= 0)",
            v.repr().map(|r| r.to_string()).unwrap_or_default()
        )))
    })
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
    #[pyo3(signature = (*, num_layers, modules, block_size, num_blocks, kv_dim, max_batch_tokens,
                        max_num_seqs, max_model_len, enable_prefix_cache = true, vocab_size = None,
                        kv_block_cap = None, adapter_block_cap = None,
                        host_cache_bytes = alora_core::engine::DEFAULT_HOST_CACHE_BYTES))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_layers: usize,
        modules: Vec<(String, String, usize, usize)>,
        block_size: usize,
        num_blocks: usize,
        kv_dim: usize,
        max_batch_tokens: usize,
        max_num_seqs: usize,
        max_model_len: usize,
        enable_prefix_cache: bool,
        vocab_size: Option<usize>,
        kv_block_cap: Option<usize>,
        adapter_block_cap: Option<usize>,
        host_cache_bytes: usize,
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
            enable_prefix_cache,
            kv_block_cap,
            adapter_block_cap,
        };
        let mut inner = Engine::new(spec, cfg, kv_dim)
            .py()?
            .with_host_cache_bytes(host_cache_bytes);
        if let Some(v) = vocab_size {
            inner = inner.with_vocab_size(v).py()?;
        }
        Ok(Self {
            inner,
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
    /// Row-id granularity in elements (see the architecture doc: adapter rows in units).
    #[getter]
    fn row_granularity(&self) -> usize {
        self.inner.scheduler().geometry().granularity
    }
    /// Elements of one unit's share of one layer's K (or V) side: block_size × kv_dim.
    #[getter]
    fn unit_elems(&self) -> usize {
        self.inner.scheduler().geometry().piece_elems
    }

    #[pyo3(signature = (name, path, invocation_tokens = None))]
    fn load_adapter(
        &mut self,
        py: Python<'_>,
        name: &str,
        path: PathBuf,
        invocation_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyAdapterInfo> {
        let inv = invocation_tokens
            .map(|t| token_ids("invocation_tokens", t))
            .transpose()?;
        // File I/O and conversion without the GIL: other Python threads keep running.
        let inner = &mut self.inner;
        let a = py
            .detach(|| inner.load_adapter_dir(name, &path, inv))
            .py()?;
        Ok(self.info(a))
    }

    #[pyo3(signature = (name, config_json, tensors, invocation_tokens = None))]
    fn load_adapter_from_tensors(
        &mut self,
        name: &str,
        config_json: &str,
        tensors: HashMap<String, PyReadonlyArrayDyn<'_, f32>>,
        invocation_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyAdapterInfo> {
        let inv = invocation_tokens
            .map(|t| token_ids("invocation_tokens", t))
            .transpose()?;
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

    #[pyo3(signature = (prompt, *, adapter = None, max_new_tokens = None, stop_token_ids = None))]
    fn add_request(
        &mut self,
        prompt: &Bound<'_, PyAny>,
        adapter: Option<String>,
        max_new_tokens: Option<&Bound<'_, PyAny>>,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let prompt = token_ids("prompt", prompt)?;
        let max_new_tokens = max_new_tokens.map_or(Ok(16), |v| count("max_new_tokens", v))?;
        let stop_token_ids = stop_token_ids
            .map(|v| token_ids("stop_token_ids", v))
            .transpose()?
            .unwrap_or_default();
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

    /// The next step, or None when nothing can run now (no requests, or every runnable one
    /// waits for an adapter read: see `pending_fetches`).
    fn schedule(&mut self, py: Python<'_>) -> PyResult<Option<PyStepPlan>> {
        let Some(p) = self.inner.schedule().py()? else {
            return Ok(None);
        };
        let weights = match self.inner.page_in_weights(&p) {
            Ok(w) => w,
            Err(e) => {
                self.inner.cancel_step(p.step_id).py()?;
                return Err(to_py(e));
            }
        };
        let weights = p
            .adapter_loads
            .iter()
            .zip(weights)
            .map(|(l, w)| PyAdapterWeights {
                adapter_id: l.id,
                weights: w,
                modules: Arc::clone(&self.modules),
            })
            .collect();
        Ok(Some(PyStepPlan::new(py, p, weights)?))
    }

    /// Memory units a registered adapter occupies when resident on the device.
    fn adapter_units(&self, name: &str) -> PyResult<usize> {
        let id = self.inner.registry().get(name).py()?.id;
        Ok(self
            .inner
            .scheduler()
            .adapter_units(id)
            .expect("registered adapters have a shape"))
    }

    /// Adapter ids that queued requests need read from disk, in queue order.
    fn pending_fetches(&self) -> Vec<u64> {
        self.inner.pending_fetches()
    }

    /// Install weights read by `read_adapter_weights` into the host tier.
    fn install_weights(
        &mut self,
        adapter_id: u64,
        weights: PyRef<'_, PyAdapterWeights>,
    ) -> PyResult<()> {
        if weights.adapter_id != adapter_id {
            return Err(invalid(format!(
                "weights of adapter {} installed as adapter {adapter_id}",
                weights.adapter_id
            )));
        }
        self.inner
            .install_weights(adapter_id, Arc::clone(&weights.weights))
            .py()
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

    fn cancel_step(&mut self, step_id: u64) -> PyResult<()> {
        self.inner.cancel_step(step_id).py()
    }

    fn abort(&mut self, request_id: &Bound<'_, PyAny>) -> PyResult<PyRequestOutput> {
        let id = request_id_arg(request_id)?;
        self.inner.abort(id).py().map(PyRequestOutput)
    }

    fn request_output(&self, request_id: &Bound<'_, PyAny>) -> PyResult<PyRequestOutput> {
        let id = request_id_arg(request_id)?;
        self.inner.request_output(id).py().map(PyRequestOutput)
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

    fn cached_base_hashes(&self) -> Vec<u64> {
        self.inner.cached_base_hashes()
    }

    fn reset_prefix_cache(&mut self) {
        self.inner.reset_prefix_cache();
    }
}
