//! alora-core: every decision about memory and batching for aLoRA Runtime, and no tensors.
//!
//! Layers, top to bottom: [`engine`] (request API) → [`scheduler`] (what runs next) →
//! [`kv`] (block tables, prefix cache, block pool) and [`pages`] (adapter rank rows) →
//! [`adapters`] (registry and host weights) and [`invocation`] (activation start).
//! See `DESIGN.md` in the shared docs for the invariants.

pub mod adapters;
pub mod engine;
pub mod error;
pub mod host;
pub mod invocation;
pub mod kernels;
pub mod kv;
pub mod pages;
pub mod plan;
pub mod request;
pub mod scheduler;

pub use error::{Error, Result};
