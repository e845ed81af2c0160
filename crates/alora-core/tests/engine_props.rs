//! Property tests of the whole bookkeeping stack, through the engine's public API.
//!
//! A simulated device holds one fingerprint per KV slot. Executing a plan copies slots for
//! copy-on-write, then writes, for each token, the fingerprint a from-scratch forward would
//! produce there: a hash of the tokens up to it and, from the activation start on, the
//! adapter and that start. After every step each scheduled sequence's context, read through
//! its block table, must equal the from-scratch fingerprints: reuse is exact or it fails.

use std::collections::HashMap;

use alora_core::adapters::{AdapterConfig, ModelSpec, ModuleSpec, TensorInput};
use alora_core::engine::{Engine, RequestParams};
use alora_core::plan::{AdapterLoad, StepPlan};
use alora_core::scheduler::SchedulerConfig;
use proptest::prelude::*;

const BS: usize = 4;
const KV_DIM: usize = 2;
const INVOCATION: [u32; 2] = [1, 2];
/// (name, in, out) of the simulated model's modules.
const MODULES: [(&str, usize, usize); 2] = [("q_proj", 4, 4), ("v_proj", 4, 2)];

fn engine(
    num_blocks: usize,
    max_batch_tokens: usize,
    max_num_seqs: usize,
    adapter_cap: usize,
    cache: bool,
) -> Engine {
    engine_with(
        num_blocks,
        max_batch_tokens,
        max_num_seqs,
        Some(adapter_cap),
        None,
        cache,
    )
}

/// Adapters: `lora` (q, rank 2: 1 unit), `alora` (q and v, rank 4: 4 units), `alora2`
/// (v, rank 2: 1 unit).
fn engine_with(
    num_blocks: usize,
    max_batch_tokens: usize,
    max_num_seqs: usize,
    adapter_cap: Option<usize>,
    kv_cap: Option<usize>,
    cache: bool,
) -> Engine {
    let spec = ModelSpec::new(
        1,
        MODULES
            .iter()
            .map(|&(name, i, o)| ModuleSpec {
                name: name.into(),
                path: format!("self_attn.{name}"),
                in_features: i,
                out_features: o,
            })
            .collect(),
    )
    .unwrap();
    let mut e = Engine::new(
        spec,
        SchedulerConfig {
            block_size: BS,
            num_blocks,
            max_batch_tokens,
            max_num_seqs,
            max_model_len: 64,
            enable_prefix_cache: cache,
            kv_block_cap: kv_cap,
            adapter_block_cap: adapter_cap,
        },
        KV_DIM,
    )
    .unwrap();
    for (name, r, targets, inv) in [
        ("lora", 2, &["q_proj"][..], None),
        (
            "alora",
            4,
            &["q_proj", "v_proj"][..],
            Some(INVOCATION.to_vec()),
        ),
        ("alora2", 2, &["v_proj"][..], Some(vec![3])),
    ] {
        let cfg = format!(
            r#"{{"r": {r}, "lora_alpha": {r}, "target_modules": {}}}"#,
            serde_json_list(targets)
        );
        let mut tensors = Vec::new();
        for &m in targets {
            let (_, i, o) = MODULES.iter().find(|x| x.0 == m).copied().unwrap();
            let t = |s: &str, shape: Vec<usize>| TensorInput {
                name: format!("base_model.model.model.layers.0.self_attn.{m}.{s}.weight"),
                data: vec![0.5; shape.iter().product()],
                shape,
            };
            tensors.push(t("lora_A", vec![r, i]));
            tensors.push(t("lora_B", vec![o, r]));
        }
        if let Err(err) = e.load_adapter_tensors(
            name,
            AdapterConfig::from_json_str(&cfg, "test").unwrap(),
            tensors,
            inv,
        ) {
            // Only an adapter larger than a tiny cap is refused.
            assert!(matches!(err, alora_core::Error::Capacity(_)), "{err}");
        }
    }
    e
}

fn serde_json_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn fingerprint(tokens: &[u32], key: Option<(u64, usize)>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tokens.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// Deterministic "sampler": the next token is a function of the sequence so far.
fn sample(tokens: &[u32]) -> u32 {
    (fingerprint(tokens, None) % 5) as u32
}

#[derive(Clone, Debug)]
struct Req {
    prompt: Vec<u32>,
    adapter: Option<&'static str>,
    max_new: usize,
}

/// (adapter id, activation start) of a sequence, `None` when it runs as the base model.
type Activation = Option<(u64, usize)>;

/// The simulated device: one layer's flat arena (K side, then V side) with a fingerprint per
/// element. KV slot `s` is elements `[s*KV_DIM, (s+1)*KV_DIM)` of each side; adapter row
/// `c` of module m is `[c*g, c*g + in_m + out_m)`, tagged with (adapter, module, row). KV and
/// adapter rows share this memory, so any overlap the pool allowed shows up as a mismatch.
struct Sim {
    mem: Vec<u64>,
    side: usize,
    /// Per request: full token list as the engine should see it, activation key.
    seqs: HashMap<u64, (Vec<u32>, Activation)>,
    outputs: HashMap<u64, Vec<u32>>,
}

fn row_tag(adapter: u64, module: usize, j: usize) -> u64 {
    fingerprint(&[module as u32, j as u32], Some((adapter, 0))) | 1 << 63
}

impl Sim {
    fn new(num_blocks: usize) -> Self {
        let side = num_blocks * BS * KV_DIM;
        Self {
            mem: vec![u64::MAX; 2 * side],
            side,
            seqs: HashMap::new(),
            outputs: HashMap::new(),
        }
    }

    fn write_slot(&mut self, slot: usize, fp: u64) {
        for side in [0, self.side] {
            let at = side + slot * KV_DIM;
            self.mem[at..at + KV_DIM].fill(fp);
        }
    }

    /// The slot's fingerprint if both sides agree on every element, else a marker.
    fn read_slot(&self, slot: usize) -> u64 {
        let at = slot * KV_DIM;
        let fp = self.mem[at];
        let same =
            (0..KV_DIM).all(|k| self.mem[at + k] == fp && self.mem[self.side + at + k] == fp);
        if same {
            fp
        } else {
            0x0bad
        }
    }

    fn copy_slots(&mut self, src: usize, dst: usize, n: usize) {
        for side in [0, self.side] {
            let (s, d) = (side + src * KV_DIM, side + dst * KV_DIM);
            let data = self.mem[s..s + n * KV_DIM].to_vec();
            self.mem[d..d + n * KV_DIM].copy_from_slice(&data);
        }
    }

    /// Write the rows of a page-in; `fraction` of each module's rows (an interrupted one).
    fn page_in(&mut self, g: usize, load: &AdapterLoad, fraction: f64) {
        let rows = &load.rows;
        for (m, &(_, i, o)) in MODULES.iter().enumerate() {
            let (r0, r1) = (rows.row_start[m] as usize, rows.row_start[m + 1] as usize);
            let keep = ((r1 - r0) as f64 * fraction) as usize;
            for j in 0..keep {
                let (a, b) = (
                    rows.a_rows[r0 + j] as usize * g,
                    rows.bt_rows[r0 + j] as usize * g,
                );
                self.mem[a..a + i].fill(row_tag(load.id, m, j));
                self.mem[b..b + o].fill(!row_tag(load.id, m, j));
            }
        }
    }

    fn expected(&self, id: u64, pos: usize) -> u64 {
        let (tokens, act) = &self.seqs[&id];
        let key = act.filter(|&(_, s)| pos >= s);
        fingerprint(&tokens[..=pos], key)
    }

    /// Run the plan on the simulated device; check budgets and context contents.
    fn execute(&mut self, e: &Engine, p: &StepPlan) -> Result<Vec<i64>, TestCaseError> {
        let cfg = e.config();
        let g = e.scheduler().geometry().granularity;
        let nm = MODULES.len();
        prop_assert!(p.num_tokens() <= cfg.max_batch_tokens);
        prop_assert!(p.num_seqs() <= cfg.max_num_seqs);
        for load in &p.adapter_loads {
            self.page_in(g, load, 1.0);
        }
        for a in 0..p.segment_adapter.len() {
            let adapter = p.segment_adapter[a];
            let info = e
                .registry()
                .iter()
                .find(|x| x.id == adapter)
                .expect("segment adapters are loaded");
            for (m, &(_, i, o)) in MODULES.iter().enumerate() {
                let k = a * nm + m;
                let (r0, r1) = (
                    p.adapter_row_start[k] as usize,
                    p.adapter_row_start[k + 1] as usize,
                );
                prop_assert_eq!(r1 - r0, p.adapter_rank[k] as usize);
                prop_assert_eq!(r1 - r0, info.module_rank(0, m), "no padding");
                for j in 0..r1 - r0 {
                    let a = p.adapter_rows[r0 + j] as usize * g;
                    let b = p.adapter_bt_rows[r0 + j] as usize * g;
                    let tag = row_tag(adapter, m, j);
                    prop_assert!(
                        self.mem[a..a + i].iter().all(|&x| x == tag)
                            && self.mem[b..b + o].iter().all(|&x| x == !tag),
                        "row {} of module {} of adapter {} is not intact",
                        j,
                        m,
                        adapter
                    );
                }
            }
        }
        for ((&s, &d), &n) in p.copy_src.iter().zip(&p.copy_dst).zip(&p.copy_len) {
            prop_assert!(n >= 1 && (n as usize) < BS + 1);
            self.copy_slots(s as usize * BS, d as usize * BS, n as usize);
        }
        for s in 0..p.num_seqs() {
            let id = p.request_ids[s];
            let (q0, q1) = (p.query_start[s] as usize, p.query_start[s + 1] as usize);
            for t in q0..q1 {
                let pos = p.positions[t] as usize;
                prop_assert_eq!(p.input_ids[t] as u32, self.seqs[&id].0[pos]);
                let act = self.seqs[&id].1;
                let lora = act.is_some_and(|(_, st)| pos >= st);
                prop_assert_eq!(
                    p.token_adapter_slot[t] >= 0,
                    lora,
                    "LoRA only from the activation start"
                );
                let fp = self.expected(id, pos);
                self.write_slot(p.slot_mapping[t] as usize, fp);
            }
            // The whole context, read through the block table, must be exact.
            let ctx = p.context_lens[s] as usize;
            prop_assert_eq!(ctx, p.positions[q1 - 1] as usize + 1);
            let table = &p.block_tables[s * p.max_blocks..(s + 1) * p.max_blocks];
            for pos in 0..ctx {
                let slot = table[pos / BS] as usize * BS + pos % BS;
                prop_assert_eq!(
                    self.read_slot(slot),
                    self.expected(id, pos),
                    "request {} position {}",
                    id,
                    pos
                );
            }
        }
        // Segments group exactly the LoRA tokens, each under its own adapter.
        let mut seen = 0;
        for a in 0..p.segment_adapter.len() {
            let (s0, s1) = (p.segment_start[a] as usize, p.segment_start[a + 1] as usize);
            for &t in &p.sorted_token_idx[s0..s1] {
                prop_assert_eq!(p.token_adapter_slot[t as usize], a as i32);
            }
            seen += s1 - s0;
        }
        prop_assert_eq!(
            seen,
            p.token_adapter_slot.iter().filter(|&&s| s >= 0).count()
        );
        Ok(p.sample_seqs
            .iter()
            .map(|&s| sample(&self.seqs[&p.request_ids[s as usize]].0) as i64)
            .collect())
    }
}

fn add(e: &mut Engine, sim: &mut Sim, r: &Req) -> u64 {
    try_add(e, sim, r).expect("the request fits")
}

/// `None` when the request cannot fit the pool's caps (refused before anything is queued).
fn try_add(e: &mut Engine, sim: &mut Sim, r: &Req) -> Option<u64> {
    let id = match e.add_request(
        r.prompt.clone(),
        RequestParams {
            adapter: r.adapter.map(String::from),
            max_new_tokens: r.max_new,
            stop_token_ids: vec![4],
        },
    ) {
        Ok(id) => id,
        Err(alora_core::Error::Capacity(_)) => return None,
        Err(alora_core::Error::UnknownAdapter(_)) if r.adapter.is_some() => return None,
        Err(err) => panic!("{err}"),
    };
    let act = r.adapter.and_then(|name| {
        let a = e.registry().get(name).unwrap();
        match &a.invocation_tokens {
            None => Some((a.id, 0)),
            Some(inv) => {
                alora_core::invocation::activation_start(&r.prompt, inv).map(|s| (a.id, s))
            }
        }
    });
    sim.seqs.insert(id, (r.prompt.clone(), act));
    Some(id)
}

fn step(e: &mut Engine, sim: &mut Sim) -> Result<bool, TestCaseError> {
    let Some(p) = e.schedule().unwrap() else {
        return Ok(false);
    };
    let sampled = sim.execute(e, &p)?;
    let outs = e.commit(p.step_id, &sampled).unwrap();
    for o in outs {
        let id = o.request_id;
        sim.seqs.get_mut(&id).unwrap().0.push(o.new_token.unwrap());
        if o.finish_reason.is_some() {
            let (tokens, _) = &sim.seqs[&id];
            prop_assert_eq!(
                &tokens[tokens.len() - o.output_tokens.len()..],
                &o.output_tokens[..]
            );
            sim.outputs.insert(id, o.output_tokens);
        }
    }
    if let Err(msg) = e.scheduler().check_invariants() {
        return Err(TestCaseError::fail(msg));
    }
    Ok(true)
}

/// A step that fails after `stage` of its work (0: before anything ran, 1: after the prefix
/// copies, 2: after the copies and a partial, corrupt write of its tokens' KV), optionally
/// with one of its requests aborted while it was in flight; then rolled back.
fn failed_step(
    e: &mut Engine,
    sim: &mut Sim,
    stage: u8,
    abort: Option<usize>,
) -> Result<(), TestCaseError> {
    let Some(p) = e.schedule().unwrap() else {
        return Ok(());
    };
    if stage >= 1 {
        // A page-in interrupted half way: some rows written, the rest stale.
        let g = e.scheduler().geometry().granularity;
        for load in &p.adapter_loads {
            sim.page_in(g, load, 0.5);
        }
        for ((&s, &d), &n) in p.copy_src.iter().zip(&p.copy_dst).zip(&p.copy_len) {
            sim.copy_slots(s as usize * BS, d as usize * BS, n as usize);
        }
    }
    if stage >= 2 {
        for (t, &slot) in p.slot_mapping.iter().enumerate() {
            if t % 2 == 0 {
                sim.write_slot(slot as usize, 0xdead_beef);
            }
        }
    }
    if let Some(i) = abort {
        let id = p.request_ids[i % p.num_seqs()];
        e.abort(id).unwrap();
        sim.seqs.remove(&id);
    }
    e.cancel_step(p.step_id).unwrap();
    if let Err(msg) = e.scheduler().check_invariants() {
        return Err(TestCaseError::fail(msg));
    }
    // The plan's slots may hold anything now; nothing computed before the step may change.
    for (t, &slot) in p.slot_mapping.iter().enumerate() {
        if t % 2 == 0 && stage >= 2 {
            prop_assert_eq!(sim.read_slot(slot as usize), 0xdead_beef);
        }
    }
    Ok(())
}

fn req_strategy() -> impl Strategy<Value = Req> {
    // A few shared stems make prefix hits (and partial-block copies) common.
    let stems = prop_oneof![
        Just(vec![0u32, 3, 0, 3, 0, 3]),
        Just(vec![0u32, 0, 3, 3, 0]),
        Just(vec![])
    ];
    (
        stems,
        prop::collection::vec(0u32..5, 1..14),
        prop_oneof![
            Just(None),
            Just(Some("lora")),
            Just(Some("alora")),
            Just(Some("alora2"))
        ],
        1usize..6,
    )
        .prop_map(|(mut stem, tail, adapter, max_new)| {
            stem.extend(tail);
            Req {
                prompt: stem,
                adapter,
                max_new,
            }
        })
}

#[derive(Clone, Debug)]
enum Op {
    Add(Req),
    Step,
    Abort(usize),
    FailStep(u8, Option<usize>),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => req_strategy().prop_map(Op::Add),
        5 => Just(Op::Step),
        1 => (0usize..64).prop_map(Op::Abort),
        2 => (0u8..3, prop::option::weighted(0.3, 0usize..8)).prop_map(|(s, a)| Op::FailStep(s, a)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random add/step/abort under tiny pools: contents exact, invariants hold after every
    /// step, and once everything drains no block, pin or request is left behind.
    #[test]
    fn bookkeeping_is_exact_and_leak_free(
        ops in prop::collection::vec(op_strategy(), 1..60),
        num_blocks in 10usize..28,
        max_batch_tokens in 1usize..24,
        max_num_seqs in 1usize..6,
        caps in prop::option::of((2usize..8, 0usize..4)),
        cache in any::<bool>(),
    ) {
        // Unified, or two fixed budgets (adapter cap + KV cap, possibly leaving units idle).
        let (adapter_cap, kv_cap) = match caps {
            None => (None, None),
            Some((a, idle)) => (Some(a), Some(num_blocks.saturating_sub(a + idle).max(1))),
        };
        let mut e = engine_with(num_blocks, max_batch_tokens, max_num_seqs, adapter_cap, kv_cap, cache);
        let mut sim = Sim::new(num_blocks);
        let mut ids = Vec::new();
        for op in ops {
            match op {
                Op::Add(r) => ids.extend(try_add(&mut e, &mut sim, &r)),
                Op::Step => { step(&mut e, &mut sim)?; }
                Op::Abort(i) => {
                    if let Some(&id) = ids.get(i) {
                        let _ = e.abort(id);
                        prop_assert!(e.scheduler().check_invariants().is_ok());
                    }
                }
                Op::FailStep(stage, abort) => failed_step(&mut e, &mut sim, stage, abort)?,
            }
        }
        let mut guard = 0;
        while step(&mut e, &mut sim)? {
            guard += 1;
            prop_assert!(guard < 10_000, "no progress");
        }
        prop_assert!(!e.has_unfinished());
        let pool = &e.scheduler().kv.pool;
        prop_assert_eq!(
            pool.num_free() + pool.adapters().num_units(),
            pool.num_blocks(),
            "leaked blocks"
        );
        pool.check_consistency().map_err(TestCaseError::fail)?;
        for a in pool.adapters().resident() {
            prop_assert_eq!(pool.adapters().pin_count(a), 0);
        }
    }

    /// Preemption, eviction, chunking and the prefix cache change nothing observable: the
    /// same requests with the same sampler produce the same tokens as with a roomy engine.
    #[test]
    fn outputs_independent_of_pool_budget_and_cache(
        reqs in prop::collection::vec(req_strategy(), 1..10),
        num_blocks in 11usize..18,
        max_batch_tokens in 1usize..10,
        max_num_seqs in 1usize..5,
        cache in any::<bool>(),
        fail_every in 1u32..4,
    ) {
        // KV blocks and adapters compete for one tiny pool (no caps).
        let run = |num_blocks, max_batch_tokens, max_num_seqs, adapter_cap: Option<usize>, cache| -> Result<Vec<Vec<u32>>, TestCaseError> {
            let mut e = engine_with(num_blocks, max_batch_tokens, max_num_seqs, adapter_cap, None, cache);
            let mut sim = Sim::new(num_blocks);
            let ids: Vec<u64> = reqs.iter().map(|r| add(&mut e, &mut sim, r)).collect();
            while step(&mut e, &mut sim)? {}
            Ok(ids.iter().map(|id| sim.outputs[id].clone()).collect())
        };
        let reference = run(256, 1024, 64, None, false)?;
        let tight = run(num_blocks, max_batch_tokens, max_num_seqs, None, cache)?;
        prop_assert_eq!(&reference, &tight);
        // Two fixed budgets: adapters capped at the largest adapter's 4 units.
        let split = run(num_blocks, max_batch_tokens, max_num_seqs, Some(4), cache)?;
        prop_assert_eq!(&reference, &split);

        // Steps that fail at any stage and are rolled back change nothing either.
        let mut e = engine_with(num_blocks, max_batch_tokens, max_num_seqs, None, None, cache);
        let mut sim = Sim::new(num_blocks);
        let ids: Vec<u64> = reqs.iter().map(|r| add(&mut e, &mut sim, r)).collect();
        let mut n = 0u32;
        loop {
            n += 1;
            if n.is_multiple_of(fail_every) {
                failed_step(&mut e, &mut sim, (n % 3) as u8, None)?;
            }
            if !step(&mut e, &mut sim)? {
                break;
            }
        }
        let faulty: Vec<Vec<u32>> = ids.iter().map(|id| sim.outputs[id].clone()).collect();
        prop_assert_eq!(reference, faulty);
    }
}

/// DESIGN.md section 5 in three requests: base blocks are shared by base and aLoRA requests
/// on the same prefix (the straddling block too, by copy), never by plain LoRA.
#[test]
fn base_blocks_shared_with_alora_never_with_lora() {
    let mut e = engine(64, 256, 8, 64, true);
    let mut sim = Sim::new(64);
    let conv: Vec<u32> = (0..13).map(|i| (i % 3) + 5).collect(); // 13 tokens: 3 full blocks + 1
    let base = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: conv.clone(),
            adapter: None,
            max_new: 1,
        },
    );
    while step(&mut e, &mut sim).unwrap() {}
    let _ = base;
    // aLoRA call: conversation + invocation at position 13 (inside block 3).
    let mut call = conv.clone();
    call.extend(INVOCATION);
    call.push(9);
    let a = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: call.clone(),
            adapter: Some("alora"),
            max_new: 1,
        },
    );
    let p = e.schedule().unwrap().unwrap();
    let s = p.request_ids.iter().position(|&r| r == a).unwrap();
    // Everything before the activation start is reused: 12 tokens in full blocks + 1 copied.
    assert_eq!(p.positions[p.query_start[s] as usize], 13);
    assert_eq!(p.copy_len.to_vec(), vec![1]);
    let sampled = sim.execute(&e, &p).unwrap();
    let out = e.commit(p.step_id, &sampled).unwrap();
    assert_eq!(out[0].counters.cached_tokens, 13);
    assert_eq!(out[0].counters.computed_tokens, call.len() - 13);
    assert_eq!(out[0].counters.lora_tokens, call.len() - 13);
    // Plain LoRA on the same prefix reuses nothing.
    let l = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: call,
            adapter: Some("lora"),
            max_new: 1,
        },
    );
    let p = e.schedule().unwrap().unwrap();
    let s = p.request_ids.iter().position(|&r| r == l).unwrap();
    assert_eq!(p.positions[p.query_start[s] as usize], 0);
    assert!(p.copy_len.is_empty());
}

/// A second conversation turn computes only what is new: the previous turn's full blocks
/// hit, its partial last block is copied, and only the last sampled token (never computed)
/// plus the new tokens run.
#[test]
fn next_turn_computes_only_new_tokens() {
    let mut e = engine(64, 256, 8, 64, true);
    let mut sim = Sim::new(64);
    let p1: Vec<u32> = vec![0, 3, 0, 0, 3, 3, 0]; // 7 tokens
    let id = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: p1,
            adapter: None,
            max_new: 4,
        },
    );
    while step(&mut e, &mut sim).unwrap() {}
    let mut turn2 = sim.seqs[&id].0.clone(); // prompt + 4 generated = 11 tokens
    let prev = turn2.len();
    turn2.extend([3, 3, 3, 0, 0]);
    let id2 = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: turn2.clone(),
            adapter: None,
            max_new: 1,
        },
    );
    let p = e.schedule().unwrap().unwrap();
    let sampled = sim.execute(&e, &p).unwrap();
    let out = e.commit(p.step_id, &sampled).unwrap();
    let o = out.iter().find(|o| o.request_id == id2).unwrap();
    assert_eq!(o.counters.cached_tokens, prev - 1);
    assert_eq!(o.counters.computed_tokens, turn2.len() - (prev - 1));
}

#[test]
fn bad_requests_leave_engine_unchanged() {
    let mut e = engine(4, 16, 4, 8, true);
    let before = e.stats();
    let p = |adapter: Option<&str>, n| RequestParams {
        adapter: adapter.map(String::from),
        max_new_tokens: n,
        stop_token_ids: vec![],
    };
    assert!(matches!(
        e.add_request(vec![], p(None, 1)),
        Err(alora_core::Error::InvalidRequest(_))
    ));
    assert!(matches!(
        e.add_request(vec![1], p(None, 0)),
        Err(alora_core::Error::InvalidRequest(_))
    ));
    assert!(matches!(
        e.add_request(vec![1; 64], p(None, 1)),
        Err(alora_core::Error::InvalidRequest(_))
    ));
    assert!(matches!(
        e.add_request(vec![1; 20], p(None, 1)),
        Err(alora_core::Error::Capacity(_))
    ));
    assert!(matches!(
        e.add_request(vec![1], p(Some("nope"), 1)),
        Err(alora_core::Error::UnknownAdapter(_))
    ));
    assert_eq!(e.stats(), before);
    assert!(e.schedule().unwrap().is_none());
    // commit without a step, and a wrong sample count, are refused.
    assert!(matches!(e.commit(0, &[]), Err(alora_core::Error::Step(_))));
    let id = e.add_request(vec![1, 2], p(None, 2)).unwrap();
    let plan = e.schedule().unwrap().unwrap();
    assert!(matches!(e.schedule(), Err(alora_core::Error::Step(_))));
    assert!(matches!(
        e.commit(plan.step_id, &[1, 2]),
        Err(alora_core::Error::Step(_))
    ));
    assert!(matches!(
        e.commit(plan.step_id, &[-1]),
        Err(alora_core::Error::Step(_))
    ));
    e.commit(plan.step_id, &[1]).unwrap();
    // An adapter with unfinished requests cannot be unloaded.
    assert!(matches!(
        e.unload_adapter("missing"),
        Err(alora_core::Error::UnknownAdapter(_))
    ));
    e.abort(id).unwrap();
    assert!(matches!(
        e.abort(id),
        Err(alora_core::Error::UnknownRequest(_))
    ));
    assert_eq!(e.scheduler().kv.pool.num_free(), 4);
}

/// A prompt that needs every block of the pool and extends a cached partial block fits by
/// recomputing the partial block's slots (the copy source would need one block more).
#[test]
fn full_pool_prompt_drops_the_copy_instead_of_failing() {
    let num_blocks = 4;
    let mut e = engine(num_blocks, 64, 4, 8, true);
    let mut sim = Sim::new(num_blocks);
    let first: Vec<u32> = vec![0, 3, 0, 3, 0, 3]; // 1 full block + 2 slots, kept as partial
    add(
        &mut e,
        &mut sim,
        &Req {
            prompt: first.clone(),
            adapter: None,
            max_new: 1,
        },
    );
    while step(&mut e, &mut sim).unwrap() {}
    // 16 slots: the whole pool; shares the first block and part of the second.
    let mut long = first.clone();
    long.extend([0, 0, 3, 3, 0, 0, 3, 3, 0, 0]);
    let id = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: long,
            adapter: None,
            max_new: 1,
        },
    );
    while step(&mut e, &mut sim).unwrap() {}
    assert!(sim.outputs.contains_key(&id));
    assert!(!e.has_unfinished());
}

#[test]
fn token_ids_checked_against_the_vocabulary() {
    let e = engine(8, 16, 4, 8, true);
    let mut e = e.with_vocab_size(5).unwrap();
    let bad = |_: Vec<u32>, stop: Vec<u32>| RequestParams {
        adapter: None,
        max_new_tokens: 2,
        stop_token_ids: stop,
    };
    let err = e.add_request(vec![0, 5], bad(vec![], vec![])).unwrap_err();
    assert!(err.to_string().contains("prompt[1]"), "{err}");
    let err = e.add_request(vec![0, 1], bad(vec![], vec![9])).unwrap_err();
    assert!(err.to_string().contains("stop_token_ids[0]"), "{err}");
    assert!(!e.has_unfinished());
    // An invocation the model can never produce is refused at load, naming the field.
    let cfg = r#"{"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}"#;
    let t = |s: &str, shape: Vec<usize>| TensorInput {
        name: format!("base_model.model.model.layers.0.self_attn.q_proj.{s}.weight"),
        data: vec![0.5; shape.iter().product()],
        shape,
    };
    let err = e
        .load_adapter_tensors(
            "oov",
            AdapterConfig::from_json_str(cfg, "test").unwrap(),
            vec![t("lora_A", vec![2, 4]), t("lora_B", vec![4, 2])],
            Some(vec![1, 7]),
        )
        .unwrap_err();
    assert!(
        matches!(&err, alora_core::Error::Config { field, .. } if field == "alora_invocation_tokens"),
        "{err}"
    );
    assert!(e.registry().get("oov").is_err());
}

#[test]
fn huge_max_new_tokens_does_not_wrap_the_capacity_check() {
    let mut e = engine(8, 16, 4, 8, true);
    let id = e
        .add_request(
            vec![0, 1, 2],
            RequestParams {
                adapter: None,
                max_new_tokens: usize::MAX,
                stop_token_ids: vec![],
            },
        )
        .unwrap_err();
    // 64 tokens of max_model_len need 16 blocks of 4; the pool has 8.
    assert!(matches!(id, alora_core::Error::Capacity(_)), "{id}");
}

/// The prefix summary: after a base request, the engine's cached base hashes contain exactly
/// the leading full blocks that `base_prefix_hashes` computes for its tokens, and an aLoRA
/// call on that conversation shares them.
#[test]
fn prefix_summary_matches_request_hashes() {
    let mut e = engine(32, 64, 4, 8, true);
    let mut sim = Sim::new(32);
    let conv: Vec<u32> = (0..11).map(|i| i % 4).collect(); // 2 full blocks + 3
    add(
        &mut e,
        &mut sim,
        &Req {
            prompt: conv.clone(),
            adapter: None,
            max_new: 1,
        },
    );
    while step(&mut e, &mut sim).unwrap() {}
    let cached: std::collections::HashSet<u64> = e.cached_base_hashes().into_iter().collect();
    let mut call = conv.clone();
    call.extend(INVOCATION);
    let want = alora_core::kv::base_prefix_hashes(&call, BS);
    assert_eq!(want.len(), 3);
    assert!(cached.contains(&want[0]) && cached.contains(&want[1]));
    assert!(!cached.contains(&want[2])); // the third block was never full
    assert_eq!(cached.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Fairness: however popular an adapter, requests are admitted in submission order when
    /// KV blocks and adapters compete for a tiny pool, so a request on a rare adapter waits
    /// at most for the requests submitted before it (bounded wait, no starvation).
    #[test]
    fn admission_is_fifo_under_memory_pressure(
        popular in prop::collection::vec(1usize..6, 4..24),
        rare_at in 0usize..24,
        num_blocks in 11usize..16,
    ) {
        let mut e = engine_with(num_blocks, 64, 4, None, None, true);
        let mut sim = Sim::new(num_blocks);
        let mut ids = Vec::new();
        for (i, &max_new) in popular.iter().enumerate() {
            let adapter = if i == rare_at.min(popular.len() - 1) { "alora2" } else { "lora" };
            let mut prompt = vec![3, 1, 2, (i % 5) as u32];
            prompt.extend([0, 1, 2, 3].iter().take(max_new));
            ids.push(add(&mut e, &mut sim, &Req { prompt, adapter: Some(adapter), max_new }));
        }
        let mut admitted: Vec<u64> = Vec::new();
        let mut guard = 0;
        while let Some(p) = e.schedule().unwrap() {
            for &id in &p.request_ids {
                if !admitted.contains(&id) {
                    admitted.push(id);
                }
            }
            let sampled = sim.execute(&e, &p)?;
            let outs = e.commit(p.step_id, &sampled).unwrap();
            for o in outs {
                sim.seqs.get_mut(&o.request_id).unwrap().0.push(o.new_token.unwrap());
            }
            guard += 1;
            prop_assert!(guard < 10_000, "no progress");
        }
        prop_assert_eq!(admitted, ids);
    }
}

/// A PEFT directory for `q_proj` at rank 2 on the simulated model, written to a fresh
/// temporary directory.
fn disk_adapter(tag: &str) -> std::path::PathBuf {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = std::env::temp_dir().join(format!("alora-props-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let bytes: Vec<u8> = [0.25f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    let name = |s: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.{s}.weight");
    let views = vec![
        (
            name("lora_A"),
            TensorView::new(Dtype::F32, vec![2, 4], &bytes).unwrap(),
        ),
        (
            name("lora_B"),
            TensorView::new(Dtype::F32, vec![4, 2], &bytes).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    dir
}

/// The disk tier: a request for an adapter whose weights are not in host memory is passed
/// over (others run meanwhile) and runs once they are installed; the engine says which
/// adapters to read.
#[test]
fn disk_adapter_waits_only_for_its_own_read() {
    let dir = disk_adapter("wait");
    let mut e = engine(32, 64, 4, 32, true);
    let id = e.load_adapter_dir("disk", &dir, None).unwrap().id;
    let mut sim = Sim::new(32);
    let on_disk = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: vec![0, 1, 2],
            adapter: Some("disk"),
            max_new: 2,
        },
    );
    assert_eq!(e.pending_fetches(), vec![id]);
    let base = add(
        &mut e,
        &mut sim,
        &Req {
            prompt: vec![3, 2, 1],
            adapter: None,
            max_new: 2,
        },
    );
    // The base request runs to completion while the adapter is not read.
    while step(&mut e, &mut sim).unwrap() {}
    assert!(sim.outputs.contains_key(&base) && !sim.outputs.contains_key(&on_disk));
    assert!(e.has_unfinished() && e.schedule().unwrap().is_none());
    let weights = e.registry().get("disk").unwrap().read_weights().unwrap();
    e.install_weights(id, weights).unwrap();
    assert!(e.pending_fetches().is_empty());
    while step(&mut e, &mut sim).unwrap() {}
    assert!(sim.outputs.contains_key(&on_disk) && !e.has_unfinished());
    let stats: HashMap<_, _> = e.stats().into_iter().collect();
    assert_eq!(stats["host_loads"], 1);
    assert_eq!(stats["host_adapters"], 1);
    // Unloading drops the host copy too.
    e.unload_adapter("disk").unwrap();
    let stats: HashMap<_, _> = e.stats().into_iter().collect();
    assert_eq!((stats["host_adapters"], stats["host_bytes"]), (0, 0));
    assert!(matches!(
        e.install_weights(id, e_weights_dummy()),
        Err(alora_core::Error::UnknownAdapter(_))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

fn e_weights_dummy() -> std::sync::Arc<alora_core::adapters::HostWeights> {
    std::sync::Arc::new(alora_core::adapters::HostWeights::new(2, vec![None, None]))
}
