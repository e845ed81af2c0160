//! The request-level API: adapters + scheduler behind one object, with every input
//! validated before any state changes.

use std::path::Path;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::adapters::{
    Adapter, AdapterConfig, AdapterId, AdapterKind, AdapterRegistry, HostWeights, ModelSpec,
    TensorInput,
};
use crate::error::{Error, Result};
use crate::host::HostCache;
use crate::invocation::activation_start;
use crate::pages::UnitGeometry;
use crate::plan::StepPlan;
use crate::request::{ActiveAdapter, Counters, Request, RequestId, RequestOutput, Status};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// Host memory for adapter weights read from disk, unless the caller sets another budget.
pub const DEFAULT_HOST_CACHE_BYTES: usize = 1 << 30;

#[derive(Debug)]
pub struct Engine {
    registry: AdapterRegistry,
    /// Registered adapters by id (the registry is by name).
    by_id: FxHashMap<AdapterId, Arc<Adapter>>,
    /// The host tier: weights read from disk, LRU under a byte budget.
    host: HostCache,
    host_loads: u64,
    host_evictions: u64,
    scheduler: Scheduler,
    next_request: RequestId,
    /// Token ids must lie in `[0, vocab_size)` (prompts, stop ids, invocation tokens).
    vocab_size: Option<usize>,
}

/// Parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct RequestParams {
    pub adapter: Option<String>,
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<u32>,
}

/// Whether an adapter's weights are in host memory (read, or loaded from memory). A free
/// function so that `schedule` can use it while the scheduler is borrowed mutably.
fn host_ready(host: &HostCache, by_id: &FxHashMap<AdapterId, Arc<Adapter>>, id: AdapterId) -> bool {
    host.contains(id)
        || by_id
            .get(&id)
            .is_some_and(|a| a.weights_in_memory().is_some())
}

impl Engine {
    /// `kv_dim` = kv_heads × head_dim: with `block_size` it sets the unit geometry that
    /// adapter rows are packed into.
    pub fn new(spec: ModelSpec, cfg: SchedulerConfig, kv_dim: usize) -> Result<Self> {
        let modules: Vec<(String, usize, usize)> = spec
            .modules
            .iter()
            .map(|m| (m.name.clone(), m.in_features, m.out_features))
            .collect();
        let geo = UnitGeometry::new(cfg.block_size, kv_dim, &modules, cfg.num_blocks)?;
        Ok(Self {
            registry: AdapterRegistry::new(spec),
            by_id: FxHashMap::default(),
            host: HostCache::new(DEFAULT_HOST_CACHE_BYTES),
            host_loads: 0,
            host_evictions: 0,
            scheduler: Scheduler::new(cfg, geo)?,
            next_request: 0,
            vocab_size: None,
        })
    }

    /// Keep at most `bytes` of adapter weights read from disk in host memory (least recently
    /// used evicted first; weights that queued requests wait for are kept regardless).
    pub fn with_host_cache_bytes(mut self, bytes: usize) -> Self {
        self.host = HostCache::new(bytes);
        self
    }

    /// Check every token id against the model's vocabulary from now on.
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 {
            return Err(Error::Config {
                field: "vocab_size".into(),
                detail: "must be at least 1".into(),
            });
        }
        self.vocab_size = Some(vocab_size);
        Ok(self)
    }

    fn check_tokens(&self, what: &str, ids: &[u32]) -> Result<()> {
        let Some(v) = self.vocab_size else {
            return Ok(());
        };
        match ids.iter().position(|&t| t as usize >= v) {
            Some(i) => Err(Error::InvalidRequest(format!(
                "{what}[{i}] is token id {}, outside the vocabulary [0, {v})",
                ids[i]
            ))),
            None => Ok(()),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        self.scheduler.config()
    }
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    pub fn load_adapter_dir(
        &mut self,
        name: &str,
        dir: &Path,
        invocation: Option<Vec<u32>>,
    ) -> Result<Arc<Adapter>> {
        let a = self.registry.load_dir(name, dir, invocation)?;
        self.check_fits(&a)
    }

    pub fn load_adapter_tensors(
        &mut self,
        name: &str,
        config: AdapterConfig,
        tensors: Vec<TensorInput>,
        invocation: Option<Vec<u32>>,
    ) -> Result<Arc<Adapter>> {
        let a = self
            .registry
            .load_tensors(name, config, tensors, invocation)?;
        self.check_fits(&a)
    }

    /// An adapter that could never be paged in, or never activate, is refused at load time,
    /// not at first use.
    fn check_fits(&mut self, a: &Arc<Adapter>) -> Result<Arc<Adapter>> {
        if let Some(inv) = &a.invocation_tokens {
            if let Err(e) = self.check_tokens("invocation_tokens", inv) {
                self.registry.unload(&a.name)?;
                return Err(match e {
                    Error::InvalidRequest(d) => Error::Config {
                        field: "alora_invocation_tokens".into(),
                        detail: format!("{d}: the adapter could never activate"),
                    },
                    e => e,
                });
            }
        }
        let units = self.scheduler.register_adapter(a.id, &a.module_ranks);
        let pool = self.scheduler.pool();
        let limit = pool.num_blocks().min(pool.adapter_cap());
        if units > limit {
            let name = a.name.clone();
            self.scheduler.unregister_adapter(a.id)?;
            self.registry.unload(&name)?;
            return Err(Error::Capacity(format!(
                "adapter `{name}` (rank {}) needs {units} memory units but adapters may hold {limit}; \
                 raise device_memory (or adapter_memory)",
                a.max_rank
            )));
        }
        self.by_id.insert(a.id, Arc::clone(a));
        Ok(a.clone())
    }

    pub fn unload_adapter(&mut self, name: &str) -> Result<()> {
        let id = self.registry.get(name)?.id;
        let busy = self
            .scheduler
            .requests()
            .filter(|r| r.adapter_name.as_deref() == Some(name))
            .count();
        if busy > 0 {
            return Err(Error::AdapterBusy {
                name: name.into(),
                requests: busy,
            });
        }
        self.scheduler.unregister_adapter(id)?;
        self.registry.unload(name)?;
        self.by_id.remove(&id);
        self.host.remove(id);
        Ok(())
    }

    pub fn add_request(&mut self, prompt: Vec<u32>, params: RequestParams) -> Result<RequestId> {
        let cfg = self.scheduler.config();
        if prompt.is_empty() {
            return Err(Error::InvalidRequest(
                "empty prompt: a request needs at least one token".into(),
            ));
        }
        if params.max_new_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        self.check_tokens("prompt", &prompt)?;
        self.check_tokens("stop_token_ids", &params.stop_token_ids)?;
        if prompt.len() >= cfg.max_model_len {
            return Err(Error::InvalidRequest(format!(
                "prompt of {} tokens leaves no room to generate within max_model_len {}",
                prompt.len(),
                cfg.max_model_len
            )));
        }
        // KV slots the request may need: everything but its last sampled token.
        let max_len = prompt
            .len()
            .saturating_add(params.max_new_tokens)
            .min(cfg.max_model_len);
        let blocks = (max_len - 1).div_ceil(cfg.block_size);
        let active = match &params.adapter {
            None => None,
            Some(name) => {
                let a = self.registry.get(name)?;
                let start = match a.kind {
                    AdapterKind::Lora => Some(0),
                    AdapterKind::ALora => {
                        activation_start(&prompt, a.invocation_tokens.as_deref().unwrap_or(&[]))
                    }
                };
                let units = self
                    .scheduler
                    .adapter_units(a.id)
                    .expect("registered adapters have a shape");
                start.map(|start| ActiveAdapter {
                    id: a.id,
                    units,
                    start,
                })
            }
        };
        let pool = self.scheduler.pool();
        let units = active.map_or(0, |a| a.units);
        if blocks > pool.kv_cap() || blocks + units > pool.num_blocks() {
            let adapter = if units > 0 {
                format!(" plus {units} for its adapter")
            } else {
                String::new()
            };
            return Err(Error::Capacity(format!(
                "request of up to {max_len} tokens needs {blocks} KV blocks{adapter} but the pool \
                 has {} (KV may hold {}); shorten the prompt or max_new_tokens, or raise \
                 device_memory",
                pool.num_blocks(),
                pool.kv_cap()
            )));
        }
        let id = self.next_request;
        self.next_request += 1;
        let prompt_len = prompt.len();
        self.scheduler.add(Request {
            id,
            adapter_name: params.adapter,
            active,
            prompt_len,
            tokens: prompt,
            max_new_tokens: params.max_new_tokens,
            stop_token_ids: params.stop_token_ids,
            num_computed: 0,
            status: Status::Waiting,
            kv: Default::default(),
            counters: Counters {
                prompt_tokens: prompt_len,
                ..Counters::default()
            },
            admitted_once: false,
        });
        Ok(id)
    }

    fn host_ready(&self, id: AdapterId) -> bool {
        host_ready(&self.host, &self.by_id, id)
    }

    /// The next step, or `None` when nothing can run now: no requests, or every runnable
    /// one waits for an adapter read (then [`pending_fetches`](Self::pending_fetches) says
    /// which).
    pub fn schedule(&mut self) -> Result<Option<StepPlan>> {
        let (host, by_id) = (&self.host, &self.by_id);
        self.scheduler.schedule(&|id| host_ready(host, by_id, id))
    }

    /// The host weights of each page-in of `plan`, in order. They were in host memory when
    /// the plan was made and nothing evicts them before the next `schedule`/`install_weights`.
    pub fn page_in_weights(&mut self, plan: &StepPlan) -> Result<Vec<Arc<HostWeights>>> {
        plan.adapter_loads
            .iter()
            .map(|l| {
                let a = self
                    .by_id
                    .get(&l.id)
                    .ok_or_else(|| Error::UnknownAdapter(format!("{}", l.id)))?;
                match a.weights_in_memory() {
                    Some(w) => Ok(w),
                    None => self.host.get(l.id).ok_or_else(|| {
                        Error::Step(format!(
                            "weights of adapter `{}` left host memory before their page-in",
                            a.name
                        ))
                    }),
                }
            })
            .collect()
    }

    /// How many queued requests ahead adapter reads are started for.
    fn fetch_window(&self) -> usize {
        2 * self.scheduler.config().max_num_seqs + 8
    }

    /// Adapters that queued requests need read from disk, in queue order (the disk tier's
    /// work list; see `install_weights`).
    pub fn pending_fetches(&self) -> Vec<AdapterId> {
        self.scheduler
            .wanted_adapters(self.fetch_window())
            .into_iter()
            .filter(|&id| !self.host_ready(id))
            .collect()
    }

    /// Put weights read by `Adapter::read_weights` into the host tier. `UnknownAdapter` if
    /// the adapter was unloaded meanwhile.
    pub fn install_weights(&mut self, id: AdapterId, weights: Arc<HostWeights>) -> Result<()> {
        if !self.by_id.contains_key(&id) {
            return Err(Error::UnknownAdapter(format!("{id}")));
        }
        let wanted: FxHashSet<AdapterId> = self
            .scheduler
            .wanted_adapters(self.fetch_window())
            .into_iter()
            .collect();
        let evicted = self.host.insert(id, weights, |a| wanted.contains(&a));
        self.host_loads += 1;
        self.host_evictions += evicted.len() as u64;
        Ok(())
    }

    pub fn commit(&mut self, step_id: u64, sampled: &[i64]) -> Result<Vec<RequestOutput>> {
        self.scheduler.commit(step_id, sampled)
    }

    /// Roll back the step in flight (see [`Scheduler::cancel_step`]).
    pub fn cancel_step(&mut self, step_id: u64) -> Result<()> {
        self.scheduler.cancel_step(step_id)
    }

    pub fn abort(&mut self, id: RequestId) -> Result<RequestOutput> {
        self.scheduler.abort(id)
    }

    /// Current state of an unfinished request (finished ones are reported once, by commit).
    pub fn request_output(&self, id: RequestId) -> Result<RequestOutput> {
        let r = self
            .scheduler
            .request(id)
            .ok_or(Error::UnknownRequest(id))?;
        Ok(RequestOutput {
            request_id: id,
            new_token: None,
            finish_reason: None,
            output_tokens: r.output_tokens().to_vec(),
            counters: r.counters.clone(),
        })
    }

    pub fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    /// The prefix summary of this engine's cache (see [`crate::kv::base_prefix_hashes`]).
    pub fn cached_base_hashes(&self) -> Vec<u64> {
        self.scheduler.kv.pool.base_hashes()
    }

    pub fn reset_prefix_cache(&mut self) {
        self.scheduler.reset_prefix_cache();
    }

    /// Counters for monitoring and leak checks.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.scheduler;
        let pool = s.pool();
        let ad = pool.adapters();
        let st = &s.stats;
        vec![
            ("free_blocks", pool.num_free() as u64),
            ("total_blocks", pool.num_blocks() as u64),
            (
                "used_blocks",
                (pool.kv_held() + pool.num_empty() - pool.num_free()) as u64,
            ),
            ("cached_blocks", pool.num_cached() as u64),
            ("adapter_blocks", ad.num_units() as u64),
            ("kv_block_cap", pool.kv_cap() as u64),
            ("adapter_block_cap", pool.adapter_cap() as u64),
            ("running", s.num_running() as u64),
            ("waiting", s.num_waiting() as u64),
            ("loaded_adapters", self.registry.len() as u64),
            ("resident_adapters", ad.num_resident() as u64),
            (
                "pinned_adapters",
                ad.resident()
                    .into_iter()
                    .filter(|&a| ad.pin_count(a) > 0)
                    .count() as u64,
            ),
            ("host_adapters", self.host.len() as u64),
            ("host_bytes", self.host.bytes() as u64),
            ("host_loads", self.host_loads),
            ("host_evictions", self.host_evictions),
            ("prefix_query_tokens", st.prefix_query_tokens),
            ("prefix_hit_tokens", st.prefix_hit_tokens),
            ("preemptions", st.preemptions),
            ("adapter_loads", st.adapter_loads),
            ("adapter_evictions", st.adapter_evictions),
            ("steps", st.steps),
        ]
    }
}
