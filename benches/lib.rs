//! Shared fixtures for the criterion benches (the benches themselves live in `benches/`).

use alora_core::adapters::{AdapterConfig, ModelSpec, ModuleSpec, TensorInput};
use alora_core::engine::Engine;
use alora_core::scheduler::SchedulerConfig;

pub const HIDDEN: usize = 64;

/// A one-layer spec: the bookkeeping cost does not depend on the model's size.
pub fn spec() -> ModelSpec {
    ModelSpec::new(
        1,
        vec![ModuleSpec {
            name: "q_proj".into(),
            path: "self_attn.q_proj".into(),
            in_features: HIDDEN,
            out_features: HIDDEN,
        }],
    )
    .expect("valid spec")
}

pub fn engine(num_blocks: usize, max_num_seqs: usize) -> Engine {
    Engine::new(
        spec(),
        SchedulerConfig {
            block_size: 16,
            num_blocks,
            max_batch_tokens: 8192,
            max_num_seqs,
            max_model_len: 1 << 16,
            enable_prefix_cache: true,
            kv_block_cap: None,
            adapter_block_cap: None,
        },
        HIDDEN,
    )
    .expect("valid config")
}

/// Load a rank-`r` adapter (aLoRA when `invocation` is given) from in-memory tensors.
pub fn load_adapter(e: &mut Engine, name: &str, r: usize, invocation: Option<Vec<u32>>) {
    let cfg = format!(
        r#"{{"r": {r}, "lora_alpha": {}, "target_modules": ["q_proj"]}}"#,
        2 * r
    );
    let tensors = vec![
        TensorInput {
            name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            shape: vec![r, HIDDEN],
            data: vec![0.01; r * HIDDEN],
        },
        TensorInput {
            name: "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
            shape: vec![HIDDEN, r],
            data: vec![0.01; r * HIDDEN],
        },
    ];
    let config = AdapterConfig::from_json_str(&cfg, "<bench>").expect("valid config");
    e.load_adapter_tensors(name, config, tensors, invocation)
        .expect("adapter loads");
}
