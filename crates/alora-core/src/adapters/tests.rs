use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use safetensors::tensor::TensorView;
use serde_json::json;

use super::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "alora-adapters-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn module(name: &str, path: &str, in_features: usize, out_features: usize) -> ModuleSpec {
    ModuleSpec {
        name: name.into(),
        path: path.into(),
        in_features,
        out_features,
    }
}

/// 2 layers; q: 8 -> 8, v: 8 -> 4, down: 12 -> 8.
fn spec() -> ModelSpec {
    ModelSpec::new(
        2,
        vec![
            module("q_proj", "self_attn.q_proj", 8, 8),
            module("v_proj", "self_attn.v_proj", 8, 4),
            module("down_proj", "mlp.down_proj", 12, 8),
        ],
    )
    .unwrap()
}

fn tname(layer: usize, path: &str, side: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{path}.lora_{side}.weight")
}

/// Values exactly representable in f16 and bf16, distinct per tensor via `seed`.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 3) % 33) as f32 * 0.125 - 2.0)
        .collect()
}

#[derive(Clone)]
struct T {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn t(name: String, shape: Vec<usize>, seed: usize) -> T {
    let data = values(shape.iter().product(), seed);
    T { name, shape, data }
}

/// A and B for every layer of the given modules, with rank `r(layer, module)`.
fn lora_tensors(spec: &ModelSpec, modules: &[usize], r: impl Fn(usize, usize) -> usize) -> Vec<T> {
    let mut out = Vec::new();
    for layer in 0..spec.num_layers {
        for &m in modules {
            let ms = &spec.modules[m];
            let rank = r(layer, m);
            out.push(t(
                tname(layer, &ms.path, "A"),
                vec![rank, ms.in_features],
                out.len(),
            ));
            out.push(t(
                tname(layer, &ms.path, "B"),
                vec![ms.out_features, rank],
                out.len(),
            ));
        }
    }
    out
}

fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F64 => data
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect(),
        Dtype::I64 => data
            .iter()
            .flat_map(|v| (*v as i64).to_le_bytes())
            .collect(),
        other => panic!("test cannot encode {other}"),
    }
}

fn write_safetensors(path: &Path, tensors: &[T], dtype: impl Fn(&str) -> Dtype) {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let d = dtype(&t.name);
            (t.name.clone(), d, t.shape.clone(), encode(&t.data, d))
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn write_dir(dir: &Path, config: &str, tensors: &[T], dtype: Dtype) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors, |_| dtype);
}

fn inputs(tensors: Vec<T>) -> Vec<TensorInput> {
    tensors
        .into_iter()
        .map(|t| TensorInput {
            name: t.name,
            shape: t.shape,
            data: t.data,
        })
        .collect()
}

fn config(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json_str(&v.to_string(), MEMORY_ORIGIN).unwrap()
}

fn load_mem(cfg: serde_json::Value, tensors: Vec<T>) -> Result<Arc<Adapter>> {
    AdapterRegistry::new(spec()).load_tensors("a", config(cfg), inputs(tensors), None)
}

/// The `detail` of an AdapterFormat error (panics on any other result).
fn format_detail(r: Result<impl fmt::Debug>) -> String {
    match r.unwrap_err() {
        Error::AdapterFormat { detail, .. } => detail,
        e => panic!("expected AdapterFormat, got {e:?}"),
    }
}

fn config_field(r: Result<impl fmt::Debug>) -> (String, String) {
    match r.unwrap_err() {
        Error::Config { field, detail } => (field, detail),
        e => panic!("expected Config, got {e:?}"),
    }
}

const QV: &str =
    r#"{"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}"#;

// ---------------------------------------------------------------- round trips

#[test]
fn dtypes_round_trip_through_files() {
    let spec = spec();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = TempDir::new();
        let tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
        write_dir(dir.path(), QV, &tensors, dtype);
        let mut reg = AdapterRegistry::new(spec.clone());
        let a = reg.load_dir("qv", dir.path(), None).unwrap();
        assert_eq!(a.kind, AdapterKind::Lora);
        assert_eq!(a.invocation_tokens, None);
        assert_eq!(a.max_rank, 4);
        assert_eq!(a.targeted_modules(), vec![0, 1]);
        assert_eq!(a.config.raw_json, QV);
        assert_eq!(a.module_ranks, vec![4, 4, 0]);
        assert_eq!(a.max_abs_scale, 4.0);
        assert!(a.path().unwrap().ends_with("adapter_model.safetensors"));
        assert!(a.weights_in_memory().is_none());
        let hw = a.read_weights().unwrap();
        for layer in 0..2 {
            for m in 0..2 {
                assert_eq!((a.module_rank(layer, m), a.scale(layer, m)), (4, Some(4.0)));
                let w = hw.get(layer, m).unwrap();
                assert_eq!((w.rank, w.scale), (4, 4.0));
                let path = &spec.modules[m].path;
                let find = |side| {
                    &tensors
                        .iter()
                        .find(|t| t.name == tname(layer, path, side))
                        .unwrap()
                        .data
                };
                assert_eq!(&w.a, find("A"), "{dtype} layer {layer} module {m}");
                assert_eq!(&w.b, find("B"), "{dtype} layer {layer} module {m}");
            }
            assert!(hw.get(layer, 2).is_none());
            assert_eq!((a.module_rank(layer, 2), a.scale(layer, 2)), (0, None));
        }
        assert!(hw.get(2, 0).is_none() && hw.get(0, 3).is_none());
        assert!(hw.get(usize::MAX, 0).is_none() && hw.get(usize::MAX, 2).is_none());
        assert!(a.scale(2, 0).is_none() && a.scale(usize::MAX, 1).is_none());
        assert_eq!((a.num_layers(), a.num_modules()), (2, 3));
        assert_eq!((hw.num_layers(), hw.num_modules()), (2, 3));
        assert_eq!(a.host_bytes(), 2 * (4 * 8 + 8 * 4 + 4 * 8 + 4 * 4) * 4);
        assert_eq!(hw.bytes(), a.host_bytes());
    }
}

#[test]
fn mixed_dtypes_in_one_file() {
    let spec = spec();
    let dir = TempDir::new();
    let tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    std::fs::write(dir.path().join("adapter_config.json"), QV).unwrap();
    write_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &tensors,
        |n| {
            if n.contains("lora_A") {
                Dtype::BF16
            } else {
                Dtype::F16
            }
        },
    );
    let a = AdapterRegistry::new(spec)
        .load_dir("x", dir.path(), None)
        .unwrap();
    assert_eq!(
        a.read_weights().unwrap().get(1, 1).unwrap().b,
        tensors[7].data
    );
}

#[test]
fn memory_and_file_agree_and_adapter_name_segment_is_accepted() {
    let spec = spec();
    let dir = TempDir::new();
    let tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    write_dir(dir.path(), QV, &tensors, Dtype::F32);
    let mut reg = AdapterRegistry::new(spec.clone());
    let from_file = reg.load_dir("file", dir.path(), None).unwrap();
    // A live state_dict keeps the adapter name; any prefix before `layers.N.` is fine.
    let renamed: Vec<T> = tensors
        .into_iter()
        .map(|t| T {
            name: t
                .name
                .replace("base_model.model.model.", "model.")
                .replace(".weight", ".default.weight"),
            ..t
        })
        .collect();
    let cfg = AdapterConfig::from_json_str(QV, MEMORY_ORIGIN).unwrap();
    let from_mem = reg.load_tensors("mem", cfg, inputs(renamed), None).unwrap();
    assert!(from_mem.path().is_none());
    let kept = from_mem.weights_in_memory().unwrap();
    assert!(Arc::ptr_eq(&kept, &from_mem.read_weights().unwrap()));
    assert_eq!(kept.bytes(), from_mem.host_bytes());
    assert_eq!(from_file.module_ranks, from_mem.module_ranks);
    assert_eq!(from_file.max_abs_scale, from_mem.max_abs_scale);
    let (fw, gw) = (
        from_file.read_weights().unwrap(),
        from_mem.read_weights().unwrap(),
    );
    for layer in 0..2 {
        for m in 0..3 {
            let (f, g) = (fw.get(layer, m), gw.get(layer, m));
            assert_eq!(
                f.map(|w| (&w.a, &w.b, w.rank)),
                g.map(|w| (&w.a, &w.b, w.rank))
            );
        }
    }
}

// ---------------------------------------------------------------- target modules

#[test]
fn list_targets_match_names_and_dotted_suffixes() {
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": ["q_proj"], "r": 2}),
        lora_tensors(&spec, &[0], |_, _| 2),
    )
    .unwrap();
    assert_eq!(a.targeted_modules(), vec![0]);
    assert_eq!((a.module_rank(1, 0), a.module_rank(1, 1)), (2, 0));

    let a = load_mem(
        json!({"target_modules": ["self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], "r": 2}),
        lora_tensors(&spec, &[1, 2], |_, _| 2),
    )
    .unwrap();
    assert_eq!(a.targeted_modules(), vec![1, 2]);

    // "proj" is not a dotted suffix of "...q_proj": nothing is targeted.
    let d = format_detail(load_mem(
        json!({"target_modules": ["proj"], "r": 2}),
        lora_tensors(&spec, &[0], |_, _| 2),
    ));
    assert!(d.contains("target_modules does not select"), "{d}");
}

#[test]
fn regex_targets_full_match_the_module_key() {
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": r".*\.(q_proj|down_proj)", "r": 2}),
        lora_tensors(&spec, &[0, 2], |_, _| 2),
    )
    .unwrap();
    assert_eq!(a.targeted_modules(), vec![0, 2]);

    // Only layer 1 q_proj.
    let only = lora_tensors(&spec, &[0], |_, _| 2).split_off(2);
    let a = load_mem(
        json!({"target_modules": r"model\.layers\.1\.self_attn\.q_proj", "r": 2}),
        only,
    )
    .unwrap();
    assert!(a.scale(0, 0).is_none() && a.scale(1, 0).is_some());

    // A regex must match the whole key, so `q_proj` alone selects nothing.
    let d = format_detail(load_mem(
        json!({"target_modules": "q_proj", "r": 2}),
        lora_tensors(&spec, &[0], |_, _| 2),
    ));
    assert!(
        d.contains(
            "adapts `model.layers.0.self_attn.q_proj`, which target_modules does not select"
        ),
        "{d}"
    );
}

#[test]
fn all_linear_requires_every_module() {
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": "all-linear", "r": 2}),
        lora_tensors(&spec, &[0, 1, 2], |_, _| 2),
    )
    .unwrap();
    assert_eq!(a.targeted_modules(), vec![0, 1, 2]);

    let d = format_detail(load_mem(
        json!({"target_modules": "ALL-LINEAR", "r": 2}),
        lora_tensors(&spec, &[0, 1], |_, _| 2),
    ));
    assert!(
        d.contains("missing tensors for `model.layers.0.mlp.down_proj`"),
        "{d}"
    );
}

#[test]
fn exclude_modules_and_layers_to_transform() {
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": "all-linear", "exclude_modules": ["down_proj"], "r": 2}),
        lora_tensors(&spec, &[0, 1], |_, _| 2),
    )
    .unwrap();
    assert_eq!(a.targeted_modules(), vec![0, 1]);

    // Only layer 1 is targeted, so layer 0 needs no tensors...
    let layer1 = lora_tensors(&spec, &[0], |_, _| 2).split_off(2);
    for ltt in [json!([1]), json!(1)] {
        let a = load_mem(
            json!({"target_modules": ["q_proj"], "layers_to_transform": ltt, "r": 2}),
            layer1.clone(),
        )
        .unwrap();
        assert!(a.scale(0, 0).is_none() && a.scale(1, 0).is_some());
    }
    // ...and must have none.
    let d = format_detail(load_mem(
        json!({"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers", "r": 2}),
        lora_tensors(&spec, &[0], |_, _| 2),
    ));
    assert!(d.contains("model.layers.0.self_attn.q_proj"), "{d}");
}

// ---------------------------------------------------------------- rank and scale

#[test]
fn rank_and_alpha_patterns_set_rank_and_scale() {
    let spec = spec();
    let cfg = json!({
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "r": 4, "lora_alpha": 8,
        "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 6, "_proj": 99},
        "alpha_pattern": {"down_proj": 3, ".*layers\\.1\\.self_attn\\.v_proj": 1.5},
    });
    let r = |layer, m| match (layer, m) {
        (_, 1) => 2,
        (1, 0) => 6,
        _ => 4,
    };
    let a = load_mem(cfg, lora_tensors(&spec, &[0, 1, 2], r)).unwrap();
    let hw = a.read_weights().unwrap();
    let got = |layer, m| {
        let w = hw.get(layer, m).unwrap();
        assert_eq!(
            (a.module_rank(layer, m), a.scale(layer, m)),
            (w.rank, Some(w.scale))
        );
        (w.rank, w.scale)
    };
    assert_eq!(got(0, 0), (4, 2.0));
    assert_eq!(got(1, 0), (6, 8.0 / 6.0));
    assert_eq!(got(0, 1), (2, 4.0));
    assert_eq!(got(1, 1), (2, 0.75));
    assert_eq!(got(0, 2), (4, 0.75));
    assert_eq!(a.max_rank, 6);
    assert_eq!(a.module_ranks, vec![6, 2, 4]);
    assert_eq!(a.max_abs_scale, 4.0);
}

#[test]
fn first_matching_pattern_in_json_order_wins() {
    let spec = spec();
    for (text, layer0) in [
        (
            r#"{"target_modules": ["q_proj"], "rank_pattern": {"layers.0.self_attn.q_proj": 2, "q_proj": 6}}"#,
            2,
        ),
        (
            r#"{"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 6, "layers.0.self_attn.q_proj": 2}}"#,
            6,
        ),
    ] {
        let cfg = AdapterConfig::from_json_str(text, MEMORY_ORIGIN).unwrap();
        let tensors = lora_tensors(&spec, &[0], |l, _| if l == 0 { layer0 } else { 6 });
        let a = AdapterRegistry::new(spec.clone())
            .load_tensors("a", cfg, inputs(tensors), None)
            .unwrap();
        assert_eq!((a.module_rank(0, 0), a.module_rank(1, 0)), (layer0, 6));
    }
}

#[test]
fn rslora_scales_by_sqrt_rank() {
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": ["q_proj"], "r": 16, "lora_alpha": 32, "use_rslora": true}),
        lora_tensors(&spec, &[0], |_, _| 16),
    )
    .unwrap();
    assert_eq!(a.scale(0, 0), Some(8.0));
    assert_eq!(a.read_weights().unwrap().get(0, 0).unwrap().scale, 8.0);
}

#[test]
fn config_defaults_and_unknown_fields() {
    let c = config(
        json!({"target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "lora_dropout": 0.05, "something_new": {"x": 1}}),
    );
    assert_eq!((c.r, c.lora_alpha, c.use_rslora), (8, 8.0, false));
    assert_eq!(c.target_modules, TargetModules::List(vec!["q_proj".into()]));
    assert!(
        c.rank_pattern.is_empty() && c.alora_invocation_tokens.is_none() && c.peft_type.is_none()
    );
    let c = config(
        json!({"target_modules": ["q_proj"], "r": 16.0, "rank_pattern": null, "layers_to_transform": [], "layers_pattern": ""}),
    );
    assert_eq!(c.r, 16);
    assert_eq!(
        (c.layers_to_transform, c.layers_pattern),
        (Some(vec![]), None)
    );
    // An empty layer list selects every layer.
    let spec = spec();
    let a = load_mem(
        json!({"target_modules": ["q_proj"], "r": 2, "layers_to_transform": []}),
        lora_tensors(&spec, &[0], |_, _| 2),
    )
    .unwrap();
    assert_eq!((a.module_rank(0, 0), a.module_rank(1, 0)), (2, 2));
}

// ---------------------------------------------------------------- aLoRA

#[test]
fn alora_detection_and_invocation_tokens() {
    let spec = spec();
    let tensors = || inputs(lora_tensors(&spec, &[0], |_, _| 8));
    let mut reg = AdapterRegistry::new(spec.clone());
    let base = json!({"target_modules": ["q_proj"]});

    let plain = reg
        .load_tensors("plain", config(base.clone()), tensors(), None)
        .unwrap();
    assert_eq!(
        (plain.kind, plain.invocation_tokens.clone()),
        (AdapterKind::Lora, None)
    );
    assert!(!plain.is_alora());

    let mut with_tokens = base.clone();
    with_tokens["alora_invocation_tokens"] = json!([10, 20, 30]);
    let al = reg
        .load_tensors("al", config(with_tokens.clone()), tensors(), None)
        .unwrap();
    assert_eq!(
        (al.kind, al.invocation_tokens.clone()),
        (AdapterKind::ALora, Some(vec![10, 20, 30]))
    );

    // The override makes a plain config aLoRA, and wins over the config's tokens.
    let ov = reg
        .load_tensors("ov", config(base.clone()), tensors(), Some(vec![7]))
        .unwrap();
    assert_eq!(
        (ov.kind, ov.invocation_tokens.clone()),
        (AdapterKind::ALora, Some(vec![7]))
    );
    let ov2 = reg
        .load_tensors("ov2", config(with_tokens), tensors(), Some(vec![8, 9]))
        .unwrap();
    assert_eq!(ov2.invocation_tokens, Some(vec![8, 9]));

    let mut string_only = base.clone();
    string_only["invocation_string"] = json!("<|start_of_role|>certainty");
    let (field, detail) =
        config_field(reg.load_tensors("s", config(string_only.clone()), tensors(), None));
    assert_eq!(field, "alora_invocation_tokens");
    assert!(
        detail.contains("only `invocation_string` is set")
            && detail.contains("pass invocation_tokens"),
        "{detail}"
    );
    let s = reg
        .load_tensors("s", config(string_only), tensors(), Some(vec![1, 2]))
        .unwrap();
    assert_eq!(s.kind, AdapterKind::ALora);

    let (field, _) = config_field(reg.load_tensors("e", config(base), tensors(), Some(vec![])));
    assert_eq!(field, "invocation_tokens");
    let mut empty =
        json!({"target_modules": ["q_proj"], "alora_invocation_tokens": []}).to_string();
    let (field, _) = config_field(AdapterConfig::from_json_str(&empty, MEMORY_ORIGIN));
    assert_eq!(field, "alora_invocation_tokens");
    empty = json!({"target_modules": ["q_proj"], "alora_invocation_tokens": [1, -2]}).to_string();
    assert_eq!(
        config_field(AdapterConfig::from_json_str(&empty, MEMORY_ORIGIN)).0,
        "alora_invocation_tokens"
    );
    // An in-memory config is checked too.
    let mut cfg = config(json!({"target_modules": ["q_proj"]}));
    cfg.alora_invocation_tokens = Some(vec![]);
    assert_eq!(
        config_field(reg.load_tensors("e", cfg, tensors(), None)).0,
        "alora_invocation_tokens"
    );
    assert_eq!(reg.len(), 5);
}

// ---------------------------------------------------------------- config errors

#[test]
fn config_field_errors_name_the_field() {
    let cases = [
        (json!({"r": 8}), "target_modules"),
        (json!({"target_modules": 5}), "target_modules"),
        (json!({"target_modules": ["q_proj", 3]}), "target_modules"),
        (json!({"target_modules": ["q_proj"], "r": "8"}), "r"),
        (json!({"target_modules": ["q_proj"], "r": 0}), "r"),
        (json!({"target_modules": ["q_proj"], "r": -4}), "r"),
        (json!({"target_modules": ["q_proj"], "r": 2.5}), "r"),
        (
            json!({"target_modules": ["q_proj"], "lora_alpha": "16"}),
            "lora_alpha",
        ),
        (
            json!({"target_modules": ["q_proj"], "use_rslora": "yes"}),
            "use_rslora",
        ),
        (
            json!({"target_modules": ["q_proj"], "rank_pattern": {"v_proj": 0}}),
            "rank_pattern.v_proj",
        ),
        (
            json!({"target_modules": ["q_proj"], "rank_pattern": [1]}),
            "rank_pattern",
        ),
        (
            json!({"target_modules": ["q_proj"], "alpha_pattern": {"v_proj": "x"}}),
            "alpha_pattern.v_proj",
        ),
        (
            json!({"target_modules": "q_proj", "layers_to_transform": [0]}),
            "layers_to_transform",
        ),
        (
            json!({"target_modules": ["q_proj"], "layers_pattern": "layers"}),
            "layers_pattern",
        ),
        (
            json!({"target_modules": ["q_proj"], "invocation_string": 5}),
            "invocation_string",
        ),
        (json!({"target_modules": "(unclosed"}), "target_modules"),
        (
            json!({"target_modules": ["q_proj"], "rank_pattern": {"(?<=x)q": 2}}),
            "rank_pattern",
        ),
    ];
    for (cfg, want) in cases {
        let text = cfg.to_string();
        let (field, detail) = config_field(AdapterConfig::from_json_str(
            &text,
            "/x/adapter_config.json",
        ));
        assert_eq!(field, want, "{text}");
        assert!(detail.contains("/x/adapter_config.json"), "{detail}");
    }
}

#[test]
fn unsupported_configs_are_format_errors() {
    for (cfg, want) in [
        (
            json!({"target_modules": ["q_proj"], "use_dora": true}),
            "DoRA is not supported",
        ),
        (
            json!({"target_modules": ["q_proj"], "lora_bias": true}),
            "lora_bias",
        ),
        (
            json!({"target_modules": ["q_proj"], "peft_type": "IA3"}),
            "only LORA",
        ),
    ] {
        let d = format_detail(AdapterConfig::from_json_str(
            &cfg.to_string(),
            MEMORY_ORIGIN,
        ));
        assert!(d.contains(want), "{d}");
    }
    let d = format_detail(AdapterConfig::from_json_str("{\"r\": 8,", MEMORY_ORIGIN));
    assert!(d.contains("not valid JSON"), "{d}");
    assert!(
        format_detail(AdapterConfig::from_json_str("[1]", MEMORY_ORIGIN)).contains("JSON object")
    );
    // `false` and empty lists mean "not used".
    config(
        json!({"target_modules": ["q_proj"], "use_dora": false, "target_parameters": [], "layer_replication": null}),
    );
}

// ---------------------------------------------------------------- file errors

fn valid_dir() -> TempDir {
    let dir = TempDir::new();
    write_dir(
        dir.path(),
        QV,
        &lora_tensors(&spec(), &[0, 1], |_, _| 4),
        Dtype::F32,
    );
    dir
}

fn load(dir: &Path) -> Result<Arc<Adapter>> {
    AdapterRegistry::new(spec()).load_dir("a", dir, None)
}

#[test]
fn truncated_and_corrupt_files_name_the_file() {
    let dir = valid_dir();
    let file = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let corruptions: Vec<Vec<u8>> = vec![
        bytes[..bytes.len() - 5].to_vec(),    // truncated data
        bytes[..8 + header_len / 2].to_vec(), // truncated header
        bytes[..3].to_vec(),                  // shorter than the length prefix
        Vec::new(),                           // empty
        {
            let mut b = bytes.clone(); // header is not JSON
            b[8] = b'#';
            b
        },
        {
            let mut b = bytes.clone(); // absurd header length
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        },
    ];
    for (i, bad) in corruptions.into_iter().enumerate() {
        std::fs::write(&file, bad).unwrap();
        match load(dir.path()).unwrap_err() {
            Error::AdapterFormat { path, detail } => {
                assert!(
                    path.ends_with("adapter_model.safetensors"),
                    "case {i}: {path}"
                );
                assert!(detail.contains("safetensors"), "case {i}: {detail}");
            }
            e => panic!("case {i}: {e:?}"),
        }
    }
}

#[test]
fn unsupported_dtypes() {
    for bad in [Dtype::I64, Dtype::F64] {
        let dir = TempDir::new();
        let tensors = lora_tensors(&spec(), &[0, 1], |_, _| 4);
        std::fs::write(dir.path().join("adapter_config.json"), QV).unwrap();
        let victim = tname(1, "self_attn.v_proj", "B");
        write_safetensors(
            &dir.path().join("adapter_model.safetensors"),
            &tensors,
            |n| {
                if n == victim {
                    bad
                } else {
                    Dtype::F32
                }
            },
        );
        match load(dir.path()).unwrap_err() {
            Error::UnsupportedDtype { tensor, dtype } => {
                assert_eq!((tensor, dtype), (victim.clone(), bad.to_string()));
            }
            e => panic!("{e:?}"),
        }
    }
}

#[test]
fn missing_directory_config_and_weights() {
    let dir = TempDir::new();
    let gone = dir.path().join("nope");
    assert!(matches!(load(&gone).unwrap_err(), Error::Io { path, .. } if path == gone));

    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    assert!(format_detail(load(&file)).contains("not a directory"));

    assert!(format_detail(load(dir.path())).contains("no adapter_config.json"));

    std::fs::write(dir.path().join("adapter_config.json"), QV).unwrap();
    assert!(format_detail(load(dir.path())).contains("no adapter_model.safetensors"));

    std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
    let d = format_detail(load(dir.path()));
    assert!(
        d.contains("adapter_model.bin") && d.contains("safe_serialization=True"),
        "{d}"
    );

    std::fs::write(dir.path().join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    let (field, detail) = config_field(load(dir.path()));
    assert_eq!(field, "target_modules");
    assert!(detail.contains("adapter_config.json"), "{detail}");

    let missing = AdapterConfig::from_file(&gone);
    assert!(matches!(missing.unwrap_err(), Error::Io { .. }));
}

// ---------------------------------------------------------------- tensor errors

#[test]
fn missing_tensors() {
    let spec = spec();
    let mut tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    let b = tname(1, "self_attn.q_proj", "B");
    tensors.retain(|t| t.name != b);
    let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), tensors));
    assert_eq!(d, format!("missing tensor `{b}`"));

    let mut tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    tensors.retain(|t| !t.name.contains("layers.1.self_attn.v_proj"));
    let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), tensors));
    assert!(
        d.starts_with("missing tensors for `model.layers.1.self_attn.v_proj`"),
        "{d}"
    );

    let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), Vec::new()));
    assert!(d.starts_with("missing tensors for"), "{d}");
    let d = format_detail(load_mem(json!({"target_modules": []}), Vec::new()));
    assert!(d.contains("no LoRA tensors"), "{d}");
}

#[test]
fn unexpected_tensors_are_named_with_a_reason() {
    let spec = spec();
    let cases = [
        (
            "base_model.model.lm_head.weight",
            vec![16, 8],
            "not a LoRA A/B weight",
        ),
        (
            "base_model.model.lm_head.lora_A.weight",
            vec![4, 8],
            "not inside a decoder layer",
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            vec![4, 16],
            "embedding",
        ),
        (
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
            vec![4, 8],
            "layer 2 does not exist",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            vec![8],
            "DoRA",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            vec![8],
            "lora_bias",
        ),
        (
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            vec![4, 8],
            "`mlp.up_proj` is not a module",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            vec![8, 8],
            "not a LoRA A/B weight",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.x.y.weight",
            vec![4, 8],
            "expected `lora_A.weight`",
        ),
    ];
    for (name, shape, why) in cases {
        let mut tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
        tensors.push(t(name.to_string(), shape, 0));
        let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), tensors));
        assert!(
            d.starts_with(&format!("unexpected tensor `{name}`: ")),
            "{d}"
        );
        assert!(d.contains(why), "{d}");
    }
}

#[test]
fn untargeted_and_duplicate_tensors() {
    let spec = spec();
    let d = format_detail(load_mem(
        json!({"target_modules": ["q_proj"], "r": 4}),
        lora_tensors(&spec, &[0, 1], |_, _| 4),
    ));
    assert!(
        d.contains(
            "adapts `model.layers.0.self_attn.v_proj`, which target_modules does not select"
        ),
        "{d}"
    );

    let mut tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    let extra = t(
        tname(0, "self_attn.q_proj", "A").replace(".weight", ".other.weight"),
        vec![4, 8],
        0,
    );
    tensors.push(extra);
    let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), tensors));
    assert!(
        d.contains("are both lora_A of `model.layers.0.self_attn.q_proj`"),
        "{d}"
    );
}

#[test]
fn shape_mismatches_show_both_shapes() {
    let spec = spec();
    // Trained for a model with hidden size 16.
    let mut tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    let victim = tname(0, "self_attn.v_proj", "A");
    tensors.iter_mut().find(|t| t.name == victim).unwrap().shape = vec![4, 16];
    tensors.iter_mut().find(|t| t.name == victim).unwrap().data = values(64, 1);
    let err = load_mem(serde_json::from_str(QV).unwrap(), tensors).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::AdapterShape {
            tensor,
            expected,
            actual,
            hint,
        } => {
            assert_eq!(
                (tensor, expected, actual),
                (victim, vec![4, 8], vec![4, 16])
            );
            assert!(hint.contains("different base model"), "{hint}");
        }
        e => panic!("{e:?}"),
    }
    assert!(msg.contains("[4, 16]") && msg.contains("[4, 8]"), "{msg}");

    // The tensors are rank 4 but the config says 8.
    let err = load_mem(
        json!({"target_modules": ["q_proj"], "r": 8}),
        lora_tensors(&spec, &[0], |_, _| 4),
    )
    .unwrap_err();
    match err {
        Error::AdapterShape {
            tensor,
            expected,
            actual,
            hint,
        } => {
            assert_eq!(
                (tensor, expected, actual),
                (tname(0, "self_attn.q_proj", "A"), vec![8, 8], vec![4, 8])
            );
            assert!(
                hint.contains("gives rank 8") && hint.contains("via `r`"),
                "{hint}"
            );
        }
        e => panic!("{e:?}"),
    }
    // A 1-D B.
    let mut tensors = lora_tensors(&spec, &[0], |_, _| 4);
    tensors[1].shape = vec![32];
    assert!(matches!(
        load_mem(json!({"target_modules": ["q_proj"], "r": 4}), tensors).unwrap_err(),
        Error::AdapterShape { actual, .. } if actual == vec![32]
    ));
}

#[test]
fn in_memory_data_length_must_match_shape() {
    let mut tensors = lora_tensors(&spec(), &[0, 1], |_, _| 4);
    tensors[3].data.pop();
    let d = format_detail(load_mem(serde_json::from_str(QV).unwrap(), tensors));
    assert!(d.contains("has 15 values but its shape is [4, 4]"), "{d}");
}

// ---------------------------------------------------------------- registry

#[test]
fn registry_names_ids_and_failures() {
    let dir = valid_dir();
    let mut reg = AdapterRegistry::new(spec());
    assert!(reg.is_empty());
    let b = reg.load_dir("b", dir.path(), None).unwrap();
    let a = reg.load_dir("a", dir.path(), Some(vec![5])).unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(
        reg.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(Arc::ptr_eq(reg.get("a").unwrap(), &a));
    assert!(reg.contains("a") && !reg.contains("c"));

    // Duplicate name: error, registry unchanged.
    assert!(
        matches!(reg.load_dir("a", dir.path(), None).unwrap_err(), Error::DuplicateAdapter(n) if n == "a")
    );
    assert_eq!(reg.len(), 2);
    assert!(Arc::ptr_eq(reg.get("a").unwrap(), &a));
    assert_eq!(reg.get("a").unwrap().kind, AdapterKind::ALora);

    // A failed load stores nothing.
    let bad = TempDir::new();
    assert!(reg.load_dir("c", bad.path(), None).is_err());
    assert_eq!(reg.len(), 2);
    assert!(matches!(reg.get("c").unwrap_err(), Error::UnknownAdapter(n) if n == "c"));
    assert!(matches!(
        reg.unload("c").unwrap_err(),
        Error::UnknownAdapter(_)
    ));
    assert_eq!(config_field(reg.load_dir("", dir.path(), None)).0, "name");

    // Unload and reload: a fresh id, the old one is gone.
    let old = reg.unload("a").unwrap();
    assert!(Arc::ptr_eq(&old, &a));
    assert!(reg.get("a").is_err());
    let again = reg.load_dir("a", dir.path(), None).unwrap();
    assert!(again.id > b.id && again.id != a.id);
    assert_eq!(again.kind, AdapterKind::Lora);
    assert_eq!(reg.len(), 2);
    assert!(reg.iter().all(|x| x.id != 0));
    assert_eq!(reg.spec().num_layers, 2);
    let shown = format!("{reg:?}");
    assert!(shown.contains(&format!("\"a\": {}", again.id)), "{shown}");
}

#[test]
fn ids_are_never_reused_after_failures_or_unloads() {
    let spec = spec();
    let mut reg = AdapterRegistry::new(spec.clone());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let cfg = config(serde_json::from_str(QV).unwrap());
        let a = reg
            .load_tensors(
                "x",
                cfg.clone(),
                inputs(lora_tensors(&spec, &[0, 1], |_, _| 4)),
                None,
            )
            .unwrap();
        assert!(seen.insert(a.id));
        assert!(reg.load_tensors("y", cfg, Vec::new(), None).is_err());
        reg.unload("x").unwrap();
    }
}

#[test]
fn model_spec_validation() {
    let q = || module("q_proj", "self_attn.q_proj", 8, 8);
    assert_eq!(config_field(ModelSpec::new(0, vec![q()])).0, "num_layers");
    assert_eq!(config_field(ModelSpec::new(2, vec![])).0, "modules");
    let (_, d) = config_field(ModelSpec::new(
        2,
        vec![q(), module("q_proj", "self_attn.q2", 8, 8)],
    ));
    assert!(d.contains("share a name"), "{d}");
    assert!(ModelSpec::new(2, vec![q(), module("q2", "self_attn.q_proj", 8, 8)]).is_err());
    assert!(ModelSpec::new(2, vec![module("q_proj", "self_attn.q_proj", 0, 8)]).is_err());
    assert!(ModelSpec::new(2, vec![module("q_proj", "self_attn.q_proj", 8, 0)]).is_err());
    assert!(ModelSpec::new(2, vec![module("q_proj", "self_attn..q_proj", 8, 8)]).is_err());
    let s = spec();
    assert_eq!(
        (s.module_index("v_proj"), s.module_index("k_proj")),
        (Some(1), None)
    );
    assert_eq!(s.module_key(1, 2), "model.layers.1.mlp.down_proj");
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any shapes and ranks survive the file and the memory paths bit for bit.
    #[test]
    fn random_shapes_round_trip(
        layers in 1usize..4,
        dims in proptest::collection::vec((1usize..20, 1usize..20), 1..4),
        ranks in proptest::collection::vec(1usize..9, 12),
        seed in 0usize..1000,
    ) {
        let modules = dims
            .iter()
            .enumerate()
            .map(|(i, &(i_f, o_f))| module(&format!("m{i}"), &format!("block.m{i}"), i_f, o_f))
            .collect();
        let spec = ModelSpec::new(layers, modules).unwrap();
        let rank = |l: usize, m: usize| ranks[(l * 4 + m) % ranks.len()];
        let names: Vec<String> = (0..dims.len()).map(|m| format!("m{m}")).collect();
        let mut rank_pattern = serde_json::Map::new();
        for l in 0..layers {
            for m in 0..dims.len() {
                rank_pattern.insert(spec.module_key(l, m), json!(rank(l, m)));
            }
        }
        let cfg = config(json!({"target_modules": names, "r": 3, "lora_alpha": 6, "rank_pattern": rank_pattern}));
        let mut tensors = lora_tensors(&spec, &(0..dims.len()).collect::<Vec<_>>(), rank);
        for (i, t) in tensors.iter_mut().enumerate() {
            t.data = t.data.iter().map(|v| v * (1.0 + ((seed + i) % 7) as f32 / 3.0)).collect();
        }
        let dir = TempDir::new();
        write_dir(dir.path(), &cfg.raw_json, &tensors, Dtype::F32);
        let mut reg = AdapterRegistry::new(spec.clone());
        let file = reg.load_dir("file", dir.path(), None).unwrap();
        let mem = reg.load_tensors("mem", cfg, inputs(tensors), None).unwrap();
        let max = (0..layers).flat_map(|l| (0..dims.len()).map(move |m| (l, m))).map(|(l, m)| rank(l, m)).max();
        prop_assert_eq!(Some(file.max_rank), max);
        let (fw, gw) = (file.read_weights().unwrap(), mem.read_weights().unwrap());
        prop_assert_eq!(fw.bytes(), file.host_bytes());
        prop_assert_eq!(gw.bytes(), mem.host_bytes());
        for l in 0..layers {
            for (m, &(i_f, o_f)) in dims.iter().enumerate() {
                let (f, g) = (fw.get(l, m).unwrap(), gw.get(l, m).unwrap());
                prop_assert_eq!(f.rank, rank(l, m));
                prop_assert_eq!(f.scale, (6.0 / rank(l, m) as f64) as f32);
                prop_assert_eq!(f.a.len(), rank(l, m) * i_f);
                prop_assert_eq!(f.b.len(), o_f * rank(l, m));
                prop_assert_eq!(&f.a, &g.a);
                prop_assert_eq!(&f.b, &g.b);
            }
        }
    }

    /// Any prefix before `layers.N.` and any adapter-name segment map to the same slot.
    #[test]
    fn tensor_names_parse_with_any_prefix(
        prefix in "([a-z_]{1,8}\\.){0,3}",
        adapter in proptest::option::of("[a-z][a-z0-9_]{0,8}"),
        layer in 0usize..2,
        m in 0usize..3,
        b in any::<bool>(),
    ) {
        prop_assume!(!prefix.split('.').any(|s| s == "layers" || s.starts_with("lora_")));
        prop_assume!(!adapter.as_deref().is_some_and(|a| a.starts_with("lora_")));
        let spec = spec();
        let side = if b { "lora_B" } else { "lora_A" };
        let adapter = adapter.map(|a| format!("{a}.")).unwrap_or_default();
        let name = format!("{prefix}layers.{layer}.{}.{side}.{adapter}weight", spec.modules[m].path);
        let key = names::parse(&name, &spec).unwrap();
        prop_assert_eq!((key.layer, key.module, key.side), (layer, m, if b { Side::B } else { Side::A }));
        let back = names::partner(&names::partner(&name));
        prop_assert_eq!(back, name);
    }
}

#[test]
fn pattern_orders_keep_json_order() {
    let c = AdapterConfig::from_json_str(
        r#"{"target_modules": ["q_proj"], "rank_pattern": {"z": 1, "a": 2}, "alpha_pattern": {"y": 1, "b": 2, "y": 3}}"#,
        MEMORY_ORIGIN,
    )
    .unwrap();
    assert_eq!(c.rank_pattern_order, ["z", "a"]);
    assert_eq!(c.alpha_pattern[&"y".to_string()], 3.0);
}

// ---------------------------------------------------------------- hostile configs and values

#[test]
fn config_files_that_are_not_objects_name_the_file() {
    let dir = TempDir::new();
    let cfg_path = dir.path().join("adapter_config.json");
    for (bytes, needle) in [
        (&b""[..], "empty"),
        (&b"   \n"[..], "empty"),
        (&b"[]"[..], "JSON object"),
        (&b"\"x\""[..], "JSON object"),
        (&b"null"[..], "JSON object"),
        (&b"{\"r\": 4, \xff}"[..], "UTF-8"),
    ] {
        std::fs::write(&cfg_path, bytes).unwrap();
        match AdapterConfig::from_file(&cfg_path).unwrap_err() {
            Error::AdapterFormat { path, detail } => {
                assert!(path.ends_with("adapter_config.json"), "{path}");
                assert!(detail.contains(needle), "{detail}");
            }
            e => panic!("expected AdapterFormat, got {e:?}"),
        }
    }
}

#[test]
fn non_finite_literals_name_the_field() {
    for text in [
        r#"{"r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}"#,
        r#"{"r": 4, "lora_alpha": Infinity, "target_modules": ["q_proj"]}"#,
        r#"{"r": 4, "lora_alpha": -Infinity, "target_modules": ["q_proj"]}"#,
    ] {
        let (field, detail) = config_field(AdapterConfig::from_json_str(text, "cfg.json"));
        assert_eq!(field, "lora_alpha", "{detail}");
        assert!(detail.contains("NaN or Infinity"), "{detail}");
    }
}

#[test]
fn non_finite_scales_and_weights_are_refused() {
    let tensors = lora_tensors(&spec(), &[0], |_, _| 4);
    let (field, _) = config_field(load_mem(
        json!({"r": 4, "lora_alpha": 1e39, "target_modules": ["q_proj"]}),
        tensors.clone(),
    ));
    assert_eq!(field, "lora_alpha");
    let (field, _) = config_field(load_mem(
        json!({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"],
               "alpha_pattern": {"q_proj": 1e300}}),
        tensors.clone(),
    ));
    assert_eq!(field, "alpha_pattern.q_proj");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut t = tensors.clone();
        t[1].data[3] = bad;
        let name = t[1].name.clone();
        let detail = format_detail(load_mem(
            json!({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}),
            t,
        ));
        assert!(
            detail.contains(&name) && detail.contains("non-finite"),
            "{detail}"
        );
    }
}

#[test]
fn truncated_weights_file_is_a_format_error() {
    let dir = TempDir::new();
    let tensors = lora_tensors(&spec(), &[0], |_, _| 4);
    write_dir(
        dir.path(),
        QV.replace("\"v_proj\"", "\"q_proj\"").as_str(),
        &tensors,
        Dtype::F32,
    );
    let file = dir.path().join("adapter_model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    for keep in [0, 7, len / 2, len - 1] {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(keep).unwrap();
        let r = AdapterRegistry::new(spec()).load_dir("a", dir.path(), None);
        assert!(
            matches!(r, Err(Error::AdapterFormat { .. })),
            "keep {keep}: {r:?}"
        );
    }
}

// ---------------------------------------------------------------- lazy registration

/// The detail of an AdapterFormat error that names the weights file.
fn file_detail(r: Result<impl fmt::Debug>) -> String {
    match r.unwrap_err() {
        Error::AdapterFormat { path, detail } => {
            assert!(path.ends_with("adapter_model.safetensors"), "{path}");
            detail
        }
        e => panic!("expected AdapterFormat, got {e:?}"),
    }
}

#[test]
fn registration_reads_no_weight_values() {
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = TempDir::new();
        let mut tensors = lora_tensors(&spec(), &[0, 1], |_, _| 4);
        let victim = tensors[5].name.clone();
        for v in tensors[5].data.iter_mut() {
            *v = f32::NAN;
        }
        write_dir(dir.path(), QV, &tensors, dtype);
        let a = load(dir.path()).unwrap();
        assert_eq!((a.max_rank, a.host_bytes()), (4, 2 * (64 + 48) * 4));
        for _ in 0..2 {
            let d = file_detail(a.read_weights());
            assert!(
                d.contains(&format!(
                    "tensor `{victim}` holds a non-finite value (NaN) at flat index 0"
                )),
                "{dtype}: {d}"
            );
        }
    }
}

#[test]
fn a_file_that_does_not_match_its_header_is_refused_at_registration() {
    let dir = valid_dir();
    let file = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for (bad, needle) in [
        (bytes[..bytes.len() - 1].to_vec(), "declares"),
        ([&bytes[..], &[0u8][..]].concat(), "declares"),
        (bytes[..20].to_vec(), "does not fit"),
    ] {
        std::fs::write(&file, bad).unwrap();
        let d = file_detail(load(dir.path()));
        assert!(
            d.contains("not a valid safetensors file") && d.contains(needle),
            "{d}"
        );
    }
}

#[test]
fn a_file_changed_after_registration_is_refused_at_read() {
    let spec = spec();
    let dir = valid_dir();
    let file = dir.path().join("adapter_model.safetensors");
    let registered = std::fs::read(&file).unwrap();
    let mut reg = AdapterRegistry::new(spec.clone());
    let a = reg.load_dir("a", dir.path(), None).unwrap();
    let first = a.read_weights().unwrap();
    // Unchanged: reads again, same values.
    let again = a.read_weights().unwrap();
    assert_eq!(first.get(1, 1).unwrap().a, again.get(1, 1).unwrap().a);

    let changed = |a: &Adapter| {
        let d = file_detail(a.read_weights());
        assert!(
            d.contains(&format!(
                "changed on disk since adapter `{}` was registered",
                a.name
            )) && d.contains("load it again"),
            "{d}"
        );
        d
    };
    let set_mtime = |secs: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    };

    // Another adapter of another rank in its place (a longer file).
    let other = lora_tensors(&spec, &[0, 1], |_, _| 8);
    write_safetensors(&file, &other, |_| Dtype::F32);
    assert!(changed(&a).contains("bytes"));

    // The registered file again, with a known modification time: a fresh registration
    // reads it; the first one sees another modification time.
    std::fs::write(&file, &registered).unwrap();
    set_mtime(1_000_000);
    let a2 = reg.load_dir("a2", dir.path(), None).unwrap();
    assert_eq!(a2.read_weights().unwrap().bytes(), first.bytes());
    assert!(changed(&a).contains("modification time"));

    // Same length and modification time, one tensor renamed in the header.
    let mut renamed = registered.clone();
    let header_len = u64::from_le_bytes(renamed[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(renamed[8..8 + header_len].to_vec()).unwrap();
    let swapped = header.replacen("lora_A", "lora_X", 1);
    renamed[8..8 + header_len].copy_from_slice(swapped.as_bytes());
    std::fs::write(&file, &renamed).unwrap();
    set_mtime(1_000_000);
    assert!(changed(&a2).contains("its header differs"));

    // Same header, other values, another modification time.
    let mut revalued = registered.clone();
    let n = revalued.len();
    revalued[n - 4..].copy_from_slice(&1.5f32.to_le_bytes());
    std::fs::write(&file, &revalued).unwrap();
    set_mtime(2_000_000);
    assert!(changed(&a2).contains("modification time"));

    // Gone.
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(a2.read_weights().unwrap_err(), Error::Io { path, .. } if path == file));
    // The adapters' metadata is untouched.
    assert_eq!((a.max_rank, a2.module_ranks.clone()), (4, vec![4, 4, 0]));
}

#[test]
fn weights_are_read_from_any_thread() {
    let dir = valid_dir();
    let a = load(dir.path()).unwrap();
    let expect = a.read_weights().unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.read_weights().unwrap())
        })
        .collect();
    for h in handles {
        let w = h.join().unwrap();
        assert_eq!(w.get(1, 0).unwrap().b, expect.get(1, 0).unwrap().b);
        assert_eq!(w.bytes(), a.host_bytes());
    }
}

/// The fields PEFT's `save_pretrained` writes for a LoRA adapter.
fn peft_config() -> serde_json::Value {
    json!({
        "alpha_pattern": {}, "auto_mapping": null,
        "base_model_name_or_path": "ibm-granite/granite-3.3-8b-instruct",
        "bias": "none", "corda_config": null, "eva_config": null,
        "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 32,
        "lora_bias": false, "lora_dropout": 0.05, "megatron_config": null,
        "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA",
        "r": 16, "rank_pattern": {}, "revision": null,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_dora": false,
        "use_rslora": false
    })
}

#[test]
fn a_registration_holds_a_few_kilobytes() {
    // 30 layers x 7 modules, the shape of a 7B-class model's adaptable modules (small
    // features: the weights' size does not change the metadata).
    let paths = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let modules = paths
        .iter()
        .map(|p| module(p.split('.').nth(1).unwrap(), p, 4, 4))
        .collect();
    let spec = ModelSpec::new(30, modules).unwrap();
    let dir = TempDir::new();
    // Indented, as PEFT writes it: about 0.9 KB.
    let text = serde_json::to_string_pretty(&peft_config()).unwrap();
    assert!(text.len() > 800, "{}", text.len());
    write_dir(
        dir.path(),
        &text,
        &lora_tensors(&spec, &(0..7).collect::<Vec<_>>(), |_, _| 16),
        Dtype::BF16,
    );
    let mut reg = AdapterRegistry::new(spec);
    let a = reg
        .load_dir("granite-adapter-with-a-longish-name", dir.path(), None)
        .unwrap();
    let bytes = a.metadata_bytes();
    eprintln!("{bytes} metadata bytes for 30 layers x 7 modules");
    assert!(bytes < 5_000, "{bytes} bytes per registered adapter");
    // At least the config text and the 210 (rank, scale) pairs.
    assert!(bytes > text.len() + 210 * 8, "{bytes}");
    assert_eq!(a.module_ranks, vec![16; 7]);
    assert_eq!(a.host_bytes(), 30 * 7 * 16 * 8 * 4);
}

#[test]
fn ten_thousand_adapters_register_quickly() {
    const N: usize = 10_000;
    let spec = ModelSpec::new(
        2,
        vec![
            module("q_proj", "self_attn.q_proj", 8, 8),
            module("v_proj", "self_attn.v_proj", 8, 4),
        ],
    )
    .unwrap();
    let root = TempDir::new();
    let mut cfg = peft_config();
    cfg["r"] = json!(4);
    cfg["target_modules"] = json!(["q_proj", "v_proj"]);
    let text = serde_json::to_string_pretty(&cfg).unwrap();
    let tensors = lora_tensors(&spec, &[0, 1], |_, _| 4);
    // One file's bytes, written N times (serializing is not what is timed).
    let proto = root.path().join("proto");
    std::fs::create_dir(&proto).unwrap();
    write_dir(&proto, &text, &tensors, Dtype::BF16);
    let weights = std::fs::read(proto.join("adapter_model.safetensors")).unwrap();
    let dirs: Vec<PathBuf> = (0..N)
        .map(|i| {
            let d = root.path().join(format!("a{i:05}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("adapter_config.json"), &text).unwrap();
            std::fs::write(d.join("adapter_model.safetensors"), &weights).unwrap();
            d
        })
        .collect();

    let mut reg = AdapterRegistry::new(spec);
    let start = std::time::Instant::now();
    for (i, d) in dirs.iter().enumerate() {
        reg.load_dir(&format!("tenant-{i:05}"), d, None).unwrap();
    }
    let took = start.elapsed();
    assert_eq!(reg.len(), N);
    let meta: usize = reg.iter().map(|a| a.metadata_bytes()).sum();
    assert!(meta / N < 2_000, "{} bytes per adapter", meta / N);
    // The timing target is for optimized builds; a debug build only reports it.
    eprintln!(
        "registered {N} adapters in {took:?}, {} metadata bytes each",
        meta / N
    );
    if !cfg!(debug_assertions) {
        assert!(took.as_secs_f64() < 10.0, "{took:?}");
    }
    let last = reg.get("tenant-09999").unwrap();
    assert_eq!(last.read_weights().unwrap().get(1, 1).unwrap().a.len(), 32);
}
