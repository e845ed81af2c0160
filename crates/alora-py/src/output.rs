//! `RequestOutput`: what commit and abort report for one request.

use alora_core::request::RequestOutput;
use pyo3::prelude::*;

#[pyclass(module = "alora._core", name = "RequestOutput", frozen)]
pub struct PyRequestOutput(pub RequestOutput);

#[pymethods]
impl PyRequestOutput {
    #[getter]
    fn request_id(&self) -> u64 {
        self.0.request_id
    }
    #[getter]
    fn new_token(&self) -> Option<u32> {
        self.0.new_token
    }
    #[getter]
    fn finished(&self) -> bool {
        self.0.finish_reason.is_some()
    }
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.0.finish_reason.map(|r| r.as_str())
    }
    #[getter]
    fn output_tokens(&self) -> Vec<u32> {
        self.0.output_tokens.clone()
    }
    #[getter]
    fn prompt_tokens(&self) -> usize {
        self.0.counters.prompt_tokens
    }
    #[getter]
    fn cached_tokens(&self) -> usize {
        self.0.counters.cached_tokens
    }
    #[getter]
    fn computed_tokens(&self) -> usize {
        self.0.counters.computed_tokens
    }
    #[getter]
    fn lora_tokens(&self) -> usize {
        self.0.counters.lora_tokens
    }
    #[getter]
    fn preemptions(&self) -> usize {
        self.0.counters.preemptions
    }
    fn __repr__(&self) -> String {
        format!(
            "RequestOutput(request_id={}, new_token={}, finish_reason={}, cached_tokens={}, computed_tokens={})",
            self.0.request_id,
            self.0.new_token.map_or("None".into(), |t| t.to_string()),
            self.finish_reason().map_or("None".into(), |r| format!("{r:?}")),
            self.0.counters.cached_tokens,
            self.0.counters.computed_tokens
        )
    }
}
