//! Cost of the Rust side of one step (schedule + commit) at 1, 64 and 256 running
//! sequences in steady-state decode with a mix of base, LoRA and aLoRA requests; prefix
//! lookup per block; adapter admit/evict. Target (DESIGN.md): schedule + commit < 50 us at
//! 256 sequences.

use alora_benches::{engine, load_adapter};
use alora_core::engine::{Engine, RequestParams};
use alora_core::kv::BlockPool;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;

const PROMPT: usize = 128;
const INVOCATION: [u32; 3] = [7, 8, 9];

fn prompt(i: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..PROMPT as u32)
        .map(|t| (t * 31 + i as u32) % 1000 + 10)
        .collect();
    p[PROMPT - 20..PROMPT - 17].copy_from_slice(&INVOCATION);
    p
}

fn params(i: usize) -> RequestParams {
    RequestParams {
        adapter: match i % 3 {
            0 => None,
            1 => Some(format!("lora{}", i % 8)),
            _ => Some(format!("alora{}", i % 8)),
        },
        max_new_tokens: 256,
        stop_token_ids: vec![],
    }
}

/// An engine with `n` requests all in decode.
fn steady_engine(n: usize) -> Engine {
    let mut e = engine(n * 32 + 64, n);
    for a in 0..8 {
        load_adapter(&mut e, &format!("lora{a}"), 16, None);
        load_adapter(&mut e, &format!("alora{a}"), 16, Some(INVOCATION.to_vec()));
    }
    for i in 0..n {
        e.add_request(prompt(i), params(i)).unwrap();
    }
    // Run the prefills.
    while let Some(p) = e.schedule().unwrap() {
        let sampled = vec![1; p.sample_indices.len()];
        e.commit(p.step_id, &sampled).unwrap();
        if p.num_tokens() == n {
            break;
        }
    }
    e
}

fn step(e: &mut Engine, next: &mut usize) {
    let p = e.schedule().unwrap().expect("work to do");
    let sampled = vec![1; p.sample_indices.len()];
    let out = e.commit(p.step_id, black_box(&sampled)).unwrap();
    // Keep the batch full: replace finished requests (prefix-cache hits on resubmission).
    for o in out.iter().filter(|o| o.finish_reason.is_some()) {
        let _ = o;
        e.add_request(prompt(*next), params(*next)).unwrap();
        *next += 1;
    }
}

fn bench_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("schedule_commit");
    for n in [1usize, 64, 256] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut e = steady_engine(n);
            let mut next = n;
            b.iter(|| step(&mut e, &mut next));
        });
    }
    g.finish();
}

fn bench_prefix_lookup(c: &mut Criterion) {
    let mut e = engine(512, 4);
    let tokens: Vec<u32> = (0..2048u32).map(|t| t % 997).collect();
    e.add_request(
        tokens.clone(),
        RequestParams {
            max_new_tokens: 1,
            ..Default::default()
        },
    )
    .unwrap();
    while let Some(p) = e.schedule().unwrap() {
        e.commit(p.step_id, &vec![1; p.sample_indices.len()])
            .unwrap();
    }
    let blocks = 2048 / 16;
    let kv = &e.scheduler().kv;
    c.bench_function(&format!("prefix_lookup_{blocks}_blocks"), |b| {
        b.iter(|| {
            let m = kv.match_prefix(black_box(&tokens), None);
            assert_eq!(m.hit_blocks.len(), blocks - 1);
            m
        })
    });
}

fn bench_adapter_paging(c: &mut Criterion) {
    // 64 adapters of 2 units each cycling through a unit pool that holds 16 of them: every
    // admit evicts one (the pool is the one KV blocks share).
    let mut pool = BlockPool::new(32);
    let mut i = 0u64;
    c.bench_function("adapter_admit_evict_2_units", |b| {
        b.iter(|| {
            let r = pool.ensure_adapter(black_box(i % 64), 2).unwrap();
            i += 1;
            r
        })
    });
}

criterion_group!(
    benches,
    bench_step,
    bench_prefix_lookup,
    bench_adapter_paging
);
criterion_main!(benches);
