//! A request's lifecycle state: tokens, progress, KV table and counters.

use crate::adapters::AdapterId;
use crate::kv::SeqKv;

pub type RequestId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Running,
}

/// The adapter a request computes with: which, the memory units it occupies on the device,
/// and the first token it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveAdapter {
    pub id: AdapterId,
    pub units: usize,
    /// 0 for plain LoRA; the activation start for aLoRA.
    pub start: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Tokens run through the model, recomputation after preemption included.
    pub computed_tokens: usize,
    /// Computed tokens that got LoRA compute.
    pub lora_tokens: usize,
    pub preemptions: usize,
}

#[derive(Debug)]
pub struct Request {
    pub id: RequestId,
    /// The adapter the request was submitted with (kept even when aLoRA never activates,
    /// so unloading it is refused while the request lives).
    pub adapter_name: Option<String>,
    /// `None` when the request runs as the base model (no adapter, or aLoRA invocation absent).
    pub active: Option<ActiveAdapter>,
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Tokens whose KV is in the cache (or will be once the in-flight step runs and commits).
    pub num_computed: usize,
    pub status: Status,
    pub kv: SeqKv,
    pub counters: Counters,
    pub admitted_once: bool,
}

impl Request {
    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn output_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// (adapter, activation start) for block keys, `None` for base computation.
    pub fn kv_adapter(&self) -> Option<(AdapterId, usize)> {
        self.active.map(|a| (a.id, a.start))
    }
}

/// What `commit`/`abort` report for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutput {
    pub request_id: RequestId,
    pub new_token: Option<u32>,
    pub finish_reason: Option<FinishReason>,
    pub output_tokens: Vec<u32>,
    pub counters: Counters,
}
