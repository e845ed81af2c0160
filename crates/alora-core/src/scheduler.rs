//! Continuous batching with chunked prefill under a token budget. Running requests go
//! first (oldest first); when blocks run out the youngest running request is preempted by
//! recompute (its blocks stay cached, so resuming is mostly prefix hits). Waiting requests
//! are admitted FIFO only when their adapter is or can be made resident and their blocks
//! fit. Every request fits the pool on its own (checked at submission) and the oldest
//! running request is never a victim, so the scheduler always makes progress.
//!
//! KV blocks and adapters share one unit pool (see [`crate::kv::BlockPool`]): admitting a
//! request makes its adapter resident first (so the evictions that may cause cannot take
//! the request's own prefix hits), then takes its blocks. A waiting request whose adapter
//! is neither on the device nor in host memory is skipped, not waited on: it waits only for
//! its own read while later requests run, and keeps its place in the queue (FIFO among the
//! requests that can run bounds every wait).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::adapters::AdapterId;
use crate::error::{Error, Result};
use crate::kv::BlockPool;
use crate::kv::{BlockId, KvManager, PrefixMatch};
use crate::pages::{AdapterRows, Residency, UnitGeometry};
use crate::plan::{AdapterLoad, StepPlan};
use crate::request::{FinishReason, Request, RequestId, RequestOutput, Status};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_batch_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub enable_prefix_cache: bool,
    /// Most units KV may hold (referenced or cached); `None`: the whole pool.
    pub kv_block_cap: Option<usize>,
    /// Most units adapters may hold; `None`: the whole pool.
    pub adapter_block_cap: Option<usize>,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("max_model_len", self.max_model_len),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::Config {
                    field: field.into(),
                    detail: "must be at least 1".into(),
                });
            }
        }
        if self.num_blocks >= u32::MAX as usize
            || self.num_blocks * self.block_size > i32::MAX as usize
        {
            return Err(Error::Config {
                field: "num_blocks".into(),
                detail: format!(
                    "{} blocks of {} slots exceed the 32-bit slot space",
                    self.num_blocks, self.block_size
                ),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub steps: u64,
    pub preemptions: u64,
    pub adapter_loads: u64,
    pub adapter_evictions: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

#[derive(Debug)]
struct InFlight {
    step_id: u64,
    /// (request, tokens computed this step, of which with LoRA)
    scheduled: Vec<(RequestId, usize, usize)>,
    samples: Vec<RequestId>,
    /// Copy-on-write sources held until the copy has run.
    pinned: Vec<BlockId>,
    /// Requests admitted by this step, in admission order: what undoes the admission.
    admitted: Vec<Admission>,
    /// Adapters made resident by this step: their rows are written only by its page-in.
    loaded: Vec<AdapterId>,
}

/// Device shape of a registered adapter: its rank per module and the units that takes.
#[derive(Debug, Clone)]
struct Shape {
    module_ranks: Box<[usize]>,
    units: usize,
}

/// An admission that `cancel_step` can undo. `safe_computed` is what the request's KV holds
/// before the step runs: the full blocks it took from the cache (written by earlier steps),
/// not the copied slots of a partial block, which only this step's copy writes.
#[derive(Debug, Clone, Copy)]
struct Admission {
    id: RequestId,
    safe_computed: usize,
    first: bool,
    cached: usize,
}

struct Undo {
    admitted: Vec<Admission>,
    loaded: Vec<AdapterId>,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pub kv: KvManager,
    geo: UnitGeometry,
    shapes: FxHashMap<AdapterId, Shape>,
    /// Row ids of resident adapters.
    rows_of: FxHashMap<AdapterId, AdapterRows>,
    requests: FxHashMap<RequestId, Request>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    in_flight: Option<InFlight>,
    next_step: u64,
    pub stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, geo: UnitGeometry) -> Result<Self> {
        cfg.validate()?;
        if geo.num_units != cfg.num_blocks {
            return Err(Error::Config {
                field: "num_blocks".into(),
                detail: format!(
                    "unit geometry has {} units, the pool {}",
                    geo.num_units, cfg.num_blocks
                ),
            });
        }
        let pool = BlockPool::with_caps(cfg.num_blocks, cfg.kv_block_cap, cfg.adapter_block_cap);
        Ok(Self {
            kv: KvManager::with_pool(pool, cfg.block_size, cfg.enable_prefix_cache),
            geo,
            shapes: FxHashMap::default(),
            rows_of: FxHashMap::default(),
            cfg,
            requests: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: None,
            next_step: 0,
            stats: SchedulerStats::default(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn geometry(&self) -> &UnitGeometry {
        &self.geo
    }
    pub fn pool(&self) -> &BlockPool {
        &self.kv.pool
    }

    /// Record a registered adapter's per-module ranks; returns the units it occupies.
    pub fn register_adapter(&mut self, id: AdapterId, module_ranks: &[usize]) -> usize {
        let units = self.geo.units_for(module_ranks);
        self.shapes.insert(
            id,
            Shape {
                module_ranks: module_ranks.into(),
                units,
            },
        );
        units
    }

    /// Units a registered adapter occupies when resident.
    pub fn adapter_units(&self, id: AdapterId) -> Option<usize> {
        self.shapes.get(&id).map(|s| s.units)
    }

    /// Forget an unloaded adapter, freeing its units. `AdapterBusy` while pinned.
    pub fn unregister_adapter(&mut self, id: AdapterId) -> Result<()> {
        self.kv.pool.evict_adapter(id)?;
        self.rows_of.remove(&id);
        self.shapes.remove(&id);
        Ok(())
    }

    /// Whether `id` is on the device.
    pub fn is_resident(&self, id: AdapterId) -> bool {
        self.kv.pool.adapters().is_resident(id)
    }

    /// Adapters that waiting requests need read into host memory, in queue order, looking at
    /// most `window` requests ahead.
    pub fn wanted_adapters(&self, window: usize) -> Vec<AdapterId> {
        let mut out: Vec<AdapterId> = Vec::new();
        for id in self.waiting.iter().take(window) {
            if let Some(a) = self.requests[id].active {
                if !self.is_resident(a.id) && !out.contains(&a.id) {
                    out.push(a.id);
                }
            }
        }
        out
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }
    pub fn requests(&self) -> impl Iterator<Item = &Request> {
        self.requests.values()
    }

    /// Queue a validated request (the engine checks adapters, lengths and capacity).
    pub fn add(&mut self, req: Request) {
        let id = req.id;
        self.requests.insert(id, req);
        self.waiting.push_back(id);
    }

    /// Plan the next step. `host_ready(adapter)`: whether an adapter that is not on the
    /// device has its weights in host memory (a page-in needs them). `Ok(None)` when nothing
    /// can run now: no requests, or every runnable one waits for an adapter read.
    pub fn schedule(&mut self, host_ready: &dyn Fn(AdapterId) -> bool) -> Result<Option<StepPlan>> {
        if let Some(f) = &self.in_flight {
            return Err(Error::Step(format!(
                "step {} was scheduled but not committed; call commit before the next schedule",
                f.step_id
            )));
        }
        if self.requests.is_empty() {
            return Ok(None);
        }
        let mut budget = self.cfg.max_batch_tokens;
        let mut sched: Vec<(RequestId, usize)> = Vec::new();
        let mut copies = Vec::new();
        let mut loads = Vec::new();
        let mut loaded = Vec::new();
        let mut admitted = Vec::new();
        let mut preempted = false;

        // Running requests, oldest first; make room by preempting the youngest.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let r = &self.requests[&id];
            let n = (r.tokens.len() - r.num_computed).min(budget);
            let total = r.num_computed + n;
            let mut fits = true;
            while !self.kv.can_allocate(&self.requests[&id].kv, None, total) {
                let victim = *self.running.last().expect("running is non-empty");
                self.preempt_last()?;
                preempted = true;
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let r = self.requests.get_mut(&id).expect("running request exists");
            self.kv.allocate(&mut r.kv, total);
            sched.push((id, n));
            budget -= n;
            i += 1;
        }

        // Waiting requests, FIFO; no admissions in a step that had to preempt.
        let bs = self.cfg.block_size;
        let mut wi = 0;
        let mut io_blocked = false;
        while !preempted
            && budget > 0
            && self.running.len() < self.cfg.max_num_seqs
            && wi < self.waiting.len()
        {
            let id = self.waiting[wi];
            let r = &self.requests[&id];
            let active = r.active;
            let mut new_units = 0;
            if let Some(a) = active {
                if !self.is_resident(a.id) {
                    if !host_ready(a.id) {
                        // Waits for its own read; later requests may run meanwhile.
                        io_blocked = true;
                        wi += 1;
                        continue;
                    }
                    new_units = a.units;
                }
                if !self.kv.pool.can_make_resident(a.id, a.units) {
                    break;
                }
            }
            // Without side effects first: its new blocks and units must fit in what is free
            // or evictable (the adapter's own units, if resident, stay out of that).
            let matched = self.kv.match_prefix(&r.tokens, r.kv_adapter());
            let need = {
                let needed = |m: &PrefixMatch| {
                    let cached = m.cached_tokens(bs);
                    let n = (r.tokens.len() - cached).min(budget);
                    self.kv.blocks_needed(&r.kv, Some(m), cached + n)
                };
                let without_copy = PrefixMatch {
                    copy: None,
                    ..matched.clone()
                };
                needed(&matched).min(needed(&without_copy))
            };
            let pool = &self.kv.pool;
            let own_evictable = match active {
                Some(a) if pool.adapters().pin_count(a.id) == 0 => {
                    pool.adapters().units(a.id).map_or(0, <[_]>::len)
                }
                _ => 0,
            };
            let room = pool.num_free() + pool.adapters().evictable_units() - own_evictable;
            let kv_room = pool.kv_cap().saturating_sub(pool.kv_held());
            if need + new_units > room || need > pool.num_free() - pool.num_empty() + kv_room {
                break;
            }
            // The adapter first, so the evictions it causes cannot take this request's hits.
            let mut fresh: Option<Vec<u32>> = None;
            if let Some(a) = active {
                if let Residency::Loaded { units, .. } =
                    self.kv.pool.ensure_adapter(a.id, a.units)?
                {
                    fresh = Some(units);
                }
                self.kv.pool.pin_adapter(a.id)?;
                self.forget_evicted();
            }
            let r = &self.requests[&id];
            // A page-in may have evicted cached blocks this match counted on: match again.
            let mut m = if fresh.is_some() {
                self.kv.match_prefix(&r.tokens, r.kv_adapter())
            } else {
                matched
            };
            let mut cached = m.cached_tokens(bs);
            let mut n = (r.tokens.len() - cached).min(budget);
            let mut total = cached + n;
            if !self.kv.can_allocate(&r.kv, Some(&m), total) && m.copy.is_some() {
                // The copy source occupies a block of its own until the copy has run: a
                // request that fits the pool only without it recomputes those slots instead.
                m.copy = None;
                cached = m.cached_tokens(bs);
                n = (r.tokens.len() - cached).min(budget);
                total = cached + n;
            }
            if !self.kv.can_allocate(&r.kv, Some(&m), total) {
                if let Some(a) = active {
                    self.kv.pool.unpin_adapter(a.id)?;
                    if fresh.is_some() {
                        self.kv.pool.evict_adapter(a.id)?;
                    }
                }
                break;
            }
            if let (Some(a), Some(units)) = (active, fresh) {
                let rows = self.geo.rows(&self.shapes[&a.id].module_ranks, &units);
                self.stats.adapter_loads += 1;
                loads.push(AdapterLoad {
                    id: a.id,
                    rows: rows.clone(),
                });
                self.rows_of.insert(a.id, rows);
                loaded.push(a.id);
            }
            self.waiting.remove(wi);
            let r = self.requests.get_mut(&id).expect("waiting request exists");
            if let Some(c) = self.kv.adopt_prefix(&mut r.kv, &m) {
                copies.push(c);
            }
            self.kv.allocate(&mut r.kv, total);
            r.num_computed = cached;
            admitted.push(Admission {
                id,
                safe_computed: m.hit_blocks.len() * bs,
                first: !r.admitted_once,
                cached,
            });
            if !r.admitted_once {
                r.admitted_once = true;
                r.counters.cached_tokens = cached;
            }
            r.status = Status::Running;
            self.stats.prefix_query_tokens += r.tokens.len() as u64;
            self.stats.prefix_hit_tokens += cached as u64;
            self.running.push(id);
            sched.push((id, n));
            budget -= n;
        }
        self.forget_evicted();

        if sched.is_empty() {
            if io_blocked {
                return Ok(None);
            }
            return Err(Error::Step(
                "no request could be scheduled although some are unfinished (scheduler invariant broken)".into(),
            ));
        }
        let undo = Undo { admitted, loaded };
        Ok(Some(self.build_plan(sched, copies, loads, undo)))
    }

    /// Drop the row maps of adapters the pool evicted.
    fn forget_evicted(&mut self) {
        let evicted = self.kv.pool.take_evicted();
        self.stats.adapter_evictions += evicted.len() as u64;
        for a in evicted {
            self.rows_of.remove(&a);
        }
    }

    fn build_plan(
        &mut self,
        sched: Vec<(RequestId, usize)>,
        copies: Vec<crate::kv::BlockCopy>,
        loads: Vec<AdapterLoad>,
        undo: Undo,
    ) -> StepPlan {
        let bs = self.cfg.block_size;
        let num_tokens: usize = sched.iter().map(|&(_, n)| n).sum();
        let mut p = StepPlan {
            step_id: self.next_step,
            max_blocks: sched
                .iter()
                .map(|(id, _)| self.requests[id].kv.blocks.len())
                .max()
                .unwrap_or(0),
            ..StepPlan::default()
        };
        self.next_step += 1;
        p.input_ids.reserve(num_tokens);
        p.positions.reserve(num_tokens);
        p.slot_mapping.reserve(num_tokens);
        p.token_adapter_slot.reserve(num_tokens);
        p.block_tables = vec![-1; sched.len() * p.max_blocks];

        // Segments: distinct adapters with at least one active token, ascending id.
        let mut seg_ids: Vec<AdapterId> = sched
            .iter()
            .filter_map(|(id, n)| {
                let r = &self.requests[id];
                r.active
                    .filter(|a| a.start < r.num_computed + n)
                    .map(|a| a.id)
            })
            .collect();
        seg_ids.sort_unstable();
        seg_ids.dedup();
        let mut seg_count = vec![0i32; seg_ids.len()];

        let mut scheduled = Vec::with_capacity(sched.len());
        let mut samples = Vec::new();
        for (si, &(id, n)) in sched.iter().enumerate() {
            let r = &self.requests[&id];
            let start = r.num_computed;
            let slot = r
                .active
                .and_then(|a| seg_ids.binary_search(&a.id).ok().map(|s| (s, a.start)));
            p.request_ids.push(id);
            p.query_start.push(p.input_ids.len() as i64);
            let mut lora = 0;
            for pos in start..start + n {
                p.input_ids.push(r.tokens[pos] as i64);
                p.positions.push(pos as i64);
                p.slot_mapping
                    .push((r.kv.blocks[pos / bs] as usize * bs + pos % bs) as i64);
                match slot {
                    Some((s, act)) if pos >= act => {
                        p.token_adapter_slot.push(s as i32);
                        seg_count[s] += 1;
                        lora += 1;
                    }
                    _ => p.token_adapter_slot.push(-1),
                }
            }
            p.context_lens.push((start + n) as i64);
            let row = &mut p.block_tables[si * p.max_blocks..];
            for (dst, &b) in row.iter_mut().zip(&r.kv.blocks) {
                *dst = b as i32;
            }
            if start + n == r.tokens.len() {
                p.sample_indices.push(p.input_ids.len() as i64 - 1);
                p.sample_seqs.push(si as i64);
                samples.push(id);
            }
            scheduled.push((id, n, lora));
        }
        p.query_start.push(p.input_ids.len() as i64);

        // Group active tokens by segment (counting sort keeps token order inside a segment).
        p.segment_start.push(0);
        for c in &seg_count {
            p.segment_start.push(p.segment_start.last().unwrap() + c);
        }
        let mut fill: Vec<i32> = p.segment_start[..seg_ids.len()].to_vec();
        p.sorted_token_idx = vec![0; *p.segment_start.last().unwrap() as usize];
        for (t, &s) in p.token_adapter_slot.iter().enumerate() {
            if s >= 0 {
                let f = &mut fill[s as usize];
                p.sorted_token_idx[*f as usize] = t as i64;
                *f += 1;
            }
        }
        p.adapter_row_start.push(0);
        for &a in &seg_ids {
            self.kv.pool.touch_adapter(a);
            let rows = self
                .rows_of
                .get(&a)
                .expect("active adapters are resident and pinned");
            p.segment_adapter.push(a);
            let rs = &rows.row_start;
            for m in 0..rs.len() - 1 {
                let (r0, r1) = (rs[m] as usize, rs[m + 1] as usize);
                p.adapter_rank.push((r1 - r0) as i32);
                p.adapter_rows.extend_from_slice(&rows.a_rows[r0..r1]);
                p.adapter_bt_rows.extend_from_slice(&rows.bt_rows[r0..r1]);
                p.adapter_row_start.push(p.adapter_rows.len() as i32);
            }
        }

        let mut pinned = Vec::with_capacity(copies.len());
        for c in copies {
            p.copy_src.push(c.src as i64);
            p.copy_dst.push(c.dst as i64);
            p.copy_len.push(c.len as i64);
            pinned.push(c.src);
        }
        p.adapter_loads = loads;
        self.in_flight = Some(InFlight {
            step_id: p.step_id,
            scheduled,
            samples,
            pinned,
            admitted: undo.admitted,
            loaded: undo.loaded,
        });
        p
    }

    /// Apply the forward pass of `step_id`: `sampled[i]` is the token sampled for the i-th
    /// entry of the plan's `sample_seqs`. Validates before changing anything.
    pub fn commit(&mut self, step_id: u64, sampled: &[i64]) -> Result<Vec<RequestOutput>> {
        let f = self.in_flight_step("commit", step_id)?;
        if sampled.len() != f.samples.len() {
            return Err(Error::Step(format!(
                "step {step_id} samples {} sequences, got {} tokens",
                f.samples.len(),
                sampled.len()
            )));
        }
        if let Some(t) = sampled.iter().find(|&&t| t < 0 || t > u32::MAX as i64) {
            return Err(Error::Step(format!("sampled token id {t} is out of range")));
        }
        let f = self.in_flight.take().expect("checked above");

        for &(id, n, lora) in &f.scheduled {
            // Requests aborted while the step was in flight are gone.
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            r.num_computed += n;
            r.counters.computed_tokens += n;
            r.counters.lora_tokens += lora;
            let adapter = r.kv_adapter();
            self.kv
                .on_computed(&mut r.kv, &r.tokens, r.num_computed, adapter);
        }

        let mut outputs = Vec::with_capacity(f.samples.len());
        let mut finished = Vec::new();
        for (&id, &tok) in f.samples.iter().zip(sampled) {
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            let tok = tok as u32;
            r.tokens.push(tok);
            let reason = if r.stop_token_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else if r.num_output() >= r.max_new_tokens || r.tokens.len() >= self.cfg.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if reason.is_some() {
                finished.push(id);
            }
            outputs.push(RequestOutput {
                request_id: id,
                new_token: Some(tok),
                finish_reason: reason,
                output_tokens: if reason.is_some() {
                    r.output_tokens().to_vec()
                } else {
                    Vec::new()
                },
                counters: r.counters.clone(),
            });
        }
        for id in &finished {
            self.remove(*id)?;
        }
        for src in f.pinned {
            self.kv.release_block(src);
        }
        self.stats.steps += 1;
        Ok(outputs)
    }

    fn in_flight_step(&self, what: &str, step_id: u64) -> Result<&InFlight> {
        match &self.in_flight {
            None => Err(Error::Step(format!(
                "{what} of step {step_id}, but no step is in flight"
            ))),
            Some(f) if f.step_id != step_id => Err(Error::Step(format!(
                "{what} of step {step_id}, but step {} is in flight",
                f.step_id
            ))),
            Some(f) => Ok(f),
        }
    }

    /// Roll back the step in flight: nothing it planned is published. Requests it admitted
    /// go back to the head of the queue intact (blocks and adapter pins returned, their
    /// copy-on-write slots never registered), adapters it paged in are not resident (their
    /// rows were never written), copy sources are unpinned, running requests keep exactly
    /// the KV they had computed. Requests it preempted stay queued (their KV is cached).
    pub fn cancel_step(&mut self, step_id: u64) -> Result<()> {
        self.in_flight_step("cancel", step_id)?;
        let f = self.in_flight.take().expect("checked above");
        let admitted: FxHashMap<RequestId, Admission> =
            f.admitted.iter().map(|a| (a.id, *a)).collect();
        for &(id, _, _) in &f.scheduled {
            if admitted.contains_key(&id) {
                continue;
            }
            // Running before this step: drop the blocks allocated for its tokens.
            if let Some(r) = self.requests.get_mut(&id) {
                self.kv.truncate(&mut r.kv, r.num_computed);
            }
        }
        for a in f.admitted.iter().rev() {
            let Some(r) = self.requests.get_mut(&a.id) else {
                continue; // aborted while in flight: already released safely
            };
            let adapter = r.kv_adapter();
            self.kv.free(&mut r.kv, &r.tokens, a.safe_computed, adapter);
            r.num_computed = 0;
            r.status = Status::Waiting;
            if a.first {
                r.admitted_once = false;
                r.counters.cached_tokens = 0;
            }
            if let Some(ad) = r.active {
                self.kv.pool.unpin_adapter(ad.id)?;
            }
            self.running.retain(|&w| w != a.id);
            self.waiting.push_front(a.id);
            self.stats.prefix_query_tokens -= r.tokens.len() as u64;
            self.stats.prefix_hit_tokens -= a.cached as u64;
        }
        for id in f.loaded {
            if self.kv.pool.adapters().pin_count(id) == 0 && self.kv.pool.evict_adapter(id)? {
                self.rows_of.remove(&id);
            }
        }
        for src in f.pinned {
            self.kv.release_block(src);
        }
        Ok(())
    }

    /// Abort a waiting or running request; its blocks are released at once (a step in flight
    /// that still writes to them is harmless: nothing reallocates them before its commit).
    pub fn abort(&mut self, id: RequestId) -> Result<RequestOutput> {
        let r = self.requests.get(&id).ok_or(Error::UnknownRequest(id))?;
        let out = RequestOutput {
            request_id: id,
            new_token: None,
            finish_reason: Some(FinishReason::Abort),
            output_tokens: r.output_tokens().to_vec(),
            counters: r.counters.clone(),
        };
        self.remove(id)?;
        Ok(out)
    }

    /// Drop a request, releasing its blocks and adapter pin.
    fn remove(&mut self, id: RequestId) -> Result<()> {
        let mut r = self.requests.remove(&id).ok_or(Error::UnknownRequest(id))?;
        match r.status {
            Status::Waiting => self.waiting.retain(|&w| w != id),
            Status::Running => {
                self.running.retain(|&w| w != id);
                let adapter = r.kv_adapter();
                // Admitted by the step in flight: its copied slots are not written yet.
                let computed = self
                    .in_flight
                    .as_ref()
                    .and_then(|f| f.admitted.iter().find(|a| a.id == id))
                    .map_or(r.num_computed, |a| a.safe_computed);
                self.kv.free(&mut r.kv, &r.tokens, computed, adapter);
                if let Some(a) = r.active {
                    self.kv.pool.unpin_adapter(a.id)?;
                    self.kv.pool.touch_adapter(a.id);
                }
            }
        }
        Ok(())
    }

    fn preempt_last(&mut self) -> Result<()> {
        let id = self.running.pop().expect("running is non-empty");
        let r = self.requests.get_mut(&id).expect("running request exists");
        let adapter = r.kv_adapter();
        self.kv.free(&mut r.kv, &r.tokens, r.num_computed, adapter);
        r.num_computed = 0;
        r.status = Status::Waiting;
        r.counters.preemptions += 1;
        if let Some(a) = r.active {
            self.kv.pool.unpin_adapter(a.id)?;
        }
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
        Ok(())
    }

    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    /// Bookkeeping invariants (tests): refcounts equal table references plus copy pins, the
    /// free list is consistent, adapter pins equal running requests per adapter.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.kv.pool.check_consistency()?;
        let mut refs = vec![0u32; self.cfg.num_blocks];
        for r in self.requests.values() {
            if r.status == Status::Waiting && !r.kv.blocks.is_empty() {
                return Err(format!("waiting request {} holds blocks", r.id));
            }
            for &b in &r.kv.blocks {
                refs[b as usize] += 1;
            }
        }
        if let Some(f) = &self.in_flight {
            for &b in &f.pinned {
                refs[b as usize] += 1;
            }
        }
        for (b, &n) in refs.iter().enumerate() {
            if self.kv.pool.ref_cnt(b as u32) != n {
                return Err(format!(
                    "block {b}: refcount {} but {n} references",
                    self.kv.pool.ref_cnt(b as u32)
                ));
            }
        }
        let mut pins: FxHashMap<AdapterId, usize> = FxHashMap::default();
        for id in &self.running {
            if let Some(a) = self.requests[id].active {
                *pins.entry(a.id).or_default() += 1;
            }
        }
        let adapters = self.kv.pool.adapters();
        for a in adapters.resident() {
            if adapters.pin_count(a) != pins.get(&a).copied().unwrap_or(0) {
                return Err(format!(
                    "adapter {a}: {} pins, {:?} running",
                    adapters.pin_count(a),
                    pins.get(&a)
                ));
            }
            if !self.rows_of.contains_key(&a) {
                return Err(format!("resident adapter {a} has no rows"));
            }
        }
        if self.rows_of.len() != adapters.num_resident() {
            return Err("row maps of evicted adapters kept".into());
        }
        if self.running.len() > self.cfg.max_num_seqs {
            return Err("too many running sequences".into());
        }
        if self.running.len() + self.waiting.len() != self.requests.len() {
            return Err("queues and request map disagree".into());
        }
        Ok(())
    }
}
