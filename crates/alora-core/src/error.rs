//! One error type for the whole core. Every variant names what was wrong and where,
//! so the Python exception that carries it is actionable on its own.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The adapter directory or file cannot be read as a PEFT adapter.
    #[error("adapter format error in {path}: {detail}")]
    AdapterFormat { path: String, detail: String },

    /// A tensor's shape disagrees with the model spec or with its partner tensor.
    #[error(
        "adapter shape error: tensor `{tensor}` has shape {actual:?}, expected {expected:?}{hint}"
    )]
    AdapterShape {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
        hint: String,
    },

    /// A tensor is stored in a dtype we do not read.
    #[error("unsupported dtype {dtype} for tensor `{tensor}` (supported: F32, F16, BF16)")]
    UnsupportedDtype { tensor: String, dtype: String },

    /// A configuration field is missing or invalid (adapter config or engine config).
    #[error("invalid config field `{field}`: {detail}")]
    Config { field: String, detail: String },

    /// A request or adapter can never fit the configured capacity.
    #[error("capacity error: {0}")]
    Capacity(String),

    #[error("unknown adapter `{0}`")]
    UnknownAdapter(String),

    #[error("adapter `{0}` is already loaded; unload it first or choose another name")]
    DuplicateAdapter(String),

    #[error("adapter `{name}` is in use by {requests} unfinished request(s); abort or finish them first")]
    AdapterBusy { name: String, requests: usize },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("unknown request id {0}")]
    UnknownRequest(u64),

    /// `commit` does not match the plan returned by the last `schedule`.
    #[error("step error: {0}")]
    Step(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
