//! The adapter registry and host store.
//!
//! Reads PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`)
//! or in-memory tensors, validates every tensor against the caller's [`ModelSpec`]
//! following PEFT's own rules (target matching, `rank_pattern` / `alpha_pattern`,
//! rsLoRA scaling), and keeps the weights on the host as f32. Nothing is stored until
//! the whole adapter has been validated, so a failed load leaves the registry as it was.

mod config;
mod names;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

pub use config::{AdapterConfig, TargetModules, ALL_LINEAR};
pub use names::LAYERS_PREFIX;

use config::{Matcher, Resolved};
use names::Side;

pub type AdapterId = u64;

/// The `origin` named in errors for adapters loaded from memory.
pub const MEMORY_ORIGIN: &str = "<memory>";

/// One adaptable linear module of a decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// Short name, e.g. `q_proj`.
    pub name: String,
    /// Path within a decoder layer, e.g. `self_attn.q_proj`.
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// The base model's shape as far as adapters are concerned.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub num_layers: usize,
    pub modules: Vec<ModuleSpec>,
}

impl ModelSpec {
    pub fn new(num_layers: usize, modules: Vec<ModuleSpec>) -> Result<Self> {
        let err = |field: &str, detail: String| Error::Config {
            field: field.to_string(),
            detail,
        };
        if num_layers == 0 {
            return Err(err(
                "num_layers",
                "the model needs at least one layer".into(),
            ));
        }
        if modules.is_empty() {
            return Err(err("modules", "the model spec lists no modules".into()));
        }
        for (i, m) in modules.iter().enumerate() {
            if m.name.is_empty() || m.path.is_empty() || m.path.split('.').any(str::is_empty) {
                return Err(err(
                    "modules",
                    format!(
                        "module {i} needs a name and a dotted path, got name `{}` path `{}`",
                        m.name, m.path
                    ),
                ));
            }
            if m.in_features == 0 || m.out_features == 0 {
                return Err(err(
                    "modules",
                    format!(
                        "module `{}` has in_features {} and out_features {}; both must be positive",
                        m.name, m.in_features, m.out_features
                    ),
                ));
            }
            if let Some(prev) = modules[..i]
                .iter()
                .find(|p| p.name == m.name || p.path == m.path)
            {
                return Err(err(
                    "modules",
                    format!(
                        "modules `{}` ({}) and `{}` ({}) share a name or a path",
                        prev.name, prev.path, m.name, m.path
                    ),
                ));
            }
        }
        Ok(ModelSpec {
            num_layers,
            modules,
        })
    }

    pub fn module_index(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }

    /// The key PEFT matches `target_modules` and the pattern maps against,
    /// e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_key(&self, layer: usize, module: usize) -> String {
        names::module_key(layer, &self.modules[module].path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    Lora,
    ALora,
}

/// One adapted (layer, module): A is [rank, in_features] row-major, B is [out_features, rank] row-major, f32.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub rank: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A named tensor handed in from memory (the Python `state_dict` path); data is row-major f32.
#[derive(Debug, Clone)]
pub struct TensorInput {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub struct Adapter {
    pub id: AdapterId,
    pub name: String,
    pub kind: AdapterKind,
    pub config: AdapterConfig,
    /// Some for ALora, None for Lora.
    pub invocation_tokens: Option<Vec<u32>>,
    /// Rows it occupies in a pool: the max rank over its modules.
    pub max_rank: usize,
    /// Indexed `layer * num_modules + module`.
    weights: Vec<Option<LoraWeights>>,
    num_modules: usize,
}

impl Adapter {
    pub fn weights(&self, layer: usize, module: usize) -> Option<&LoraWeights> {
        if module >= self.num_modules || layer >= self.num_layers() {
            return None;
        }
        self.weights[layer * self.num_modules + module].as_ref()
    }

    /// 0 if not adapted.
    pub fn module_rank(&self, layer: usize, module: usize) -> usize {
        self.weights(layer, module).map_or(0, |w| w.rank)
    }

    /// Module indices adapted in at least one layer, ascending.
    pub fn targeted_modules(&self) -> Vec<usize> {
        (0..self.num_modules)
            .filter(|&m| {
                self.weights
                    .iter()
                    .skip(m)
                    .step_by(self.num_modules)
                    .any(Option::is_some)
            })
            .collect()
    }

    pub fn is_alora(&self) -> bool {
        self.kind == AdapterKind::ALora
    }

    pub fn num_layers(&self) -> usize {
        self.weights.len() / self.num_modules
    }

    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    /// Host bytes held by the f32 weights.
    pub fn host_bytes(&self) -> usize {
        self.weights
            .iter()
            .flatten()
            .map(|w| (w.a.len() + w.b.len()) * std::mem::size_of::<f32>())
            .sum()
    }
}

// Hand-written so that printing an adapter (e.g. in a failed `unwrap_err`) does not dump
// megabytes of weights.
impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("invocation_tokens", &self.invocation_tokens)
            .field("max_rank", &self.max_rank)
            .field("adapted_modules", &self.weights.iter().flatten().count())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adapters: BTreeMap<&str, AdapterId> = self
            .by_name
            .iter()
            .map(|(n, a)| (n.as_str(), a.id))
            .collect();
        f.debug_struct("AdapterRegistry")
            .field("spec", &self.spec)
            .field("adapters", &adapters)
            .field("next_id", &self.next_id)
            .finish()
    }
}

/// All loaded adapters, by name.
pub struct AdapterRegistry {
    spec: ModelSpec,
    by_name: BTreeMap<String, Arc<Adapter>>,
    /// Ids are never reused: KV-cache entries are keyed by id, so a reloaded adapter
    /// must not match its predecessor's cache. Starts at 1, so 0 is never an adapter id.
    next_id: AdapterId,
}

impl AdapterRegistry {
    pub fn new(spec: ModelSpec) -> Self {
        AdapterRegistry {
            spec,
            by_name: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Loads a PEFT adapter directory. `invocation_tokens` overrides the config's and makes
    /// the adapter aLoRA.
    pub fn load_dir(
        &mut self,
        name: &str,
        dir: &Path,
        invocation_tokens: Option<Vec<u32>>,
    ) -> Result<Arc<Adapter>> {
        self.check_name(name)?;
        let meta = std::fs::metadata(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let format_err = |path: &Path, detail: String| Error::AdapterFormat {
            path: path.display().to_string(),
            detail,
        };
        if !meta.is_dir() {
            return Err(format_err(
                dir,
                "not a directory; expected a PEFT adapter directory with adapter_config.json \
                 and adapter_model.safetensors"
                    .into(),
            ));
        }
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            return Err(format_err(
                dir,
                "no adapter_config.json; is this a PEFT adapter directory?".into(),
            ));
        }
        let config = AdapterConfig::from_file(&config_path)?;
        let (kind, tokens) = resolve_invocation(&config, invocation_tokens)?;

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            let detail = if dir.join("adapter_model.bin").exists() {
                "found adapter_model.bin but no adapter_model.safetensors; pickle `.bin` \
                 adapters are not read. Convert it to safetensors, e.g. load it with PEFT and \
                 call `save_pretrained(dir, safe_serialization=True)`"
            } else {
                "no adapter_model.safetensors"
            };
            return Err(format_err(dir, detail.into()));
        }
        let weights_origin = weights_path.display().to_string();
        // Read into owned memory rather than mapping: a map turns a file that shrinks under
        // the reader into SIGBUS, a read into a short buffer that the parser rejects. Every
        // value is converted into owned f32 anyway, so the map would save one transient copy.
        let bytes = std::fs::read(&weights_path).map_err(|source| Error::Io {
            path: weights_path.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            format_err(
                &weights_path,
                format!("not a valid safetensors file (truncated or corrupt): {e}"),
            )
        })?;
        let raws = st
            .tensors()
            .into_iter()
            .map(|(name, view)| match view.dtype() {
                dtype @ (Dtype::F32 | Dtype::F16 | Dtype::BF16) => Ok(RawTensor {
                    name,
                    shape: view.shape().to_vec(),
                    data: Data::Bytes(dtype, view.data()),
                }),
                dtype => Err(Error::UnsupportedDtype {
                    tensor: name,
                    dtype: dtype.to_string(),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let built = build(&self.spec, &config, &weights_origin, raws)?;
        Ok(self.insert(name, kind, config, tokens, built))
    }

    /// Loads an adapter from in-memory tensors (e.g. a PEFT `state_dict`), with the same
    /// validation as [`load_dir`](Self::load_dir).
    pub fn load_tensors(
        &mut self,
        name: &str,
        config: AdapterConfig,
        tensors: Vec<TensorInput>,
        invocation_tokens: Option<Vec<u32>>,
    ) -> Result<Arc<Adapter>> {
        self.check_name(name)?;
        config.validate(MEMORY_ORIGIN)?;
        let (kind, tokens) = resolve_invocation(&config, invocation_tokens)?;
        let raws = tensors
            .into_iter()
            .map(|t| RawTensor {
                name: t.name,
                shape: t.shape,
                data: Data::F32(t.data),
            })
            .collect();
        let built = build(&self.spec, &config, MEMORY_ORIGIN, raws)?;
        Ok(self.insert(name, kind, config, tokens, built))
    }

    pub fn unload(&mut self, name: &str) -> Result<Arc<Adapter>> {
        let adapter = self
            .by_name
            .remove(name)
            .ok_or_else(|| Error::UnknownAdapter(name.to_string()))?;
        Ok(adapter)
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Adapter>> {
        self.by_name
            .get(name)
            .ok_or_else(|| Error::UnknownAdapter(name.to_string()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Adapter>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Config {
                field: "name".into(),
                detail: "an adapter needs a non-empty name".into(),
            });
        }
        if self.by_name.contains_key(name) {
            return Err(Error::DuplicateAdapter(name.to_string()));
        }
        Ok(())
    }

    fn insert(
        &mut self,
        name: &str,
        kind: AdapterKind,
        config: AdapterConfig,
        invocation_tokens: Option<Vec<u32>>,
        built: Built,
    ) -> Arc<Adapter> {
        let id = self.next_id;
        self.next_id += 1;
        let adapter = Arc::new(Adapter {
            id,
            name: name.to_string(),
            kind,
            config,
            invocation_tokens,
            max_rank: built.max_rank,
            weights: built.weights,
            num_modules: self.spec.modules.len(),
        });
        self.by_name.insert(name.to_string(), Arc::clone(&adapter));
        adapter
    }
}

/// Kind and invocation tokens: the caller's override, else the config's tokens. An
/// `invocation_string` alone marks an aLoRA adapter we cannot tokenize here.
fn resolve_invocation(
    config: &AdapterConfig,
    override_tokens: Option<Vec<u32>>,
) -> Result<(AdapterKind, Option<Vec<u32>>)> {
    let empty = |field: &str| Error::Config {
        field: field.into(),
        detail: "is empty; an aLoRA adapter needs at least one invocation token".into(),
    };
    match (override_tokens, &config.alora_invocation_tokens) {
        (Some(t), _) if t.is_empty() => Err(empty("invocation_tokens")),
        (Some(t), _) => Ok((AdapterKind::ALora, Some(t))),
        (None, Some(t)) if t.is_empty() => Err(empty("alora_invocation_tokens")),
        (None, Some(t)) => Ok((AdapterKind::ALora, Some(t.clone()))),
        (None, None) if config.invocation_string.is_some() => Err(Error::Config {
            field: "alora_invocation_tokens".into(),
            detail: "the adapter is aLoRA but only `invocation_string` is set; tokenize it with \
                     the base model's tokenizer and pass invocation_tokens"
                .into(),
        }),
        (None, None) => Ok((AdapterKind::Lora, None)),
    }
}

enum Data<'a> {
    F32(Vec<f32>),
    /// Little-endian values straight from the file; dtype already checked supported.
    Bytes(Dtype, &'a [u8]),
}

struct RawTensor<'a> {
    name: String,
    shape: Vec<usize>,
    data: Data<'a>,
}

impl RawTensor<'_> {
    fn into_f32(self) -> Vec<f32> {
        // Byte-wise: the map gives no alignment guarantee for 2- and 4-byte values.
        fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunk of N bytes")))
                .collect()
        }
        match self.data {
            Data::F32(v) => v,
            Data::Bytes(Dtype::F32, b) => convert(b, f32::from_le_bytes),
            Data::Bytes(Dtype::F16, b) => convert(b, |c| half::f16::from_le_bytes(c).to_f32()),
            Data::Bytes(Dtype::BF16, b) => convert(b, |c| half::bf16::from_le_bytes(c).to_f32()),
            Data::Bytes(dtype, _) => unreachable!("dtype {dtype} rejected when read"),
        }
    }
}

struct Built {
    weights: Vec<Option<LoraWeights>>,
    max_rank: usize,
}

/// Validates the tensors against the spec and config, then converts them.
fn build(
    spec: &ModelSpec,
    config: &AdapterConfig,
    origin: &str,
    mut raws: Vec<RawTensor>,
) -> Result<Built> {
    let format_err = |detail: String| Error::AdapterFormat {
        path: origin.to_string(),
        detail,
    };
    let num_modules = spec.modules.len();
    // Sorted so that the error reported for a bad adapter does not depend on map order.
    raws.sort_by(|a, b| a.name.cmp(&b.name));

    let mut slots: Vec<[Option<RawTensor>; 2]> = (0..spec.num_layers * num_modules)
        .map(|_| [None, None])
        .collect();
    for raw in raws {
        let key = names::parse(&raw.name, spec)
            .map_err(|why| format_err(format!("unexpected tensor `{}`: {why}", raw.name)))?;
        if let Data::F32(v) = &raw.data {
            let n = raw.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n != Some(v.len()) {
                return Err(format_err(format!(
                    "tensor `{}` has {} values but its shape is {:?}",
                    raw.name,
                    v.len(),
                    raw.shape
                )));
            }
        }
        let slot = &mut slots[key.layer * num_modules + key.module][key.side.index()];
        if let Some(prev) = slot {
            return Err(format_err(format!(
                "tensors `{}` and `{}` are both {} of `{}` (two adapters in one state dict?)",
                prev.name,
                raw.name,
                key.side.segment(),
                spec.module_key(key.layer, key.module)
            )));
        }
        *slot = Some(raw);
    }

    let matcher = Matcher::new(config, origin)?;
    let mut validated = Vec::with_capacity(slots.len());
    for (idx, slot) in slots.into_iter().enumerate() {
        let (layer, module) = (idx / num_modules, idx % num_modules);
        let m = &spec.modules[module];
        let key = spec.module_key(layer, module);
        let targeted = matcher.is_target(&key);
        let pair = match slot {
            [None, None] if targeted => {
                return Err(format_err(format!(
                    "missing tensors for `{key}`: target_modules selects it, but there is no \
                     `...{key}.lora_A.weight` / `lora_B.weight`"
                )))
            }
            [None, None] => None,
            [Some(t), None] | [None, Some(t)] => {
                return Err(format_err(format!(
                    "missing tensor `{}`",
                    names::partner(&t.name)
                )))
            }
            [Some(_), Some(b)] if !targeted => {
                return Err(format_err(format!(
                    "tensor `{}` adapts `{key}`, which target_modules does not select \
                     (adapter_config.json and the weights disagree)",
                    b.name
                )))
            }
            [Some(a), Some(b)] => {
                let resolved = matcher.resolve(&key);
                check_shape(&a, Side::A, [resolved.r, m.in_features], &key, &resolved)?;
                check_shape(&b, Side::B, [m.out_features, resolved.r], &key, &resolved)?;
                Some((resolved, a, b))
            }
        };
        validated.push(pair);
    }
    if validated.iter().all(Option::is_none) {
        return Err(format_err(
            "the adapter has no LoRA tensors for any module of the model".into(),
        ));
    }

    let mut max_rank = 0;
    let mut weights = Vec::with_capacity(validated.len());
    for pair in validated {
        let Some((res, a, b)) = pair else {
            weights.push(None);
            continue;
        };
        max_rank = max_rank.max(res.r);
        let r = res.r as f64;
        let scale = if config.use_rslora {
            res.alpha / r.sqrt()
        } else {
            res.alpha / r
        };
        // float32 is what the scale is applied in (and what PEFT casts it to).
        if !(scale as f32).is_finite() || !(res.alpha as f32).is_finite() {
            let field = match &res.alpha_key {
                Some(k) => format!("alpha_pattern.{k}"),
                None => "lora_alpha".into(),
            };
            return Err(Error::Config {
                field,
                detail: format!(
                    "alpha {:e} (rank {}, scale {scale:e}) is not a finite float32",
                    res.alpha, res.r
                ),
            });
        }
        let (a_name, b_name) = (a.name.clone(), b.name.clone());
        let (a, b) = (a.into_f32(), b.into_f32());
        for (name, values) in [(&a_name, &a), (&b_name, &b)] {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(format_err(format!(
                    "tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                    values[i]
                )));
            }
        }
        weights.push(Some(LoraWeights {
            rank: res.r,
            scale: scale as f32,
            a,
            b,
        }));
    }
    Ok(Built { weights, max_rank })
}

/// A is `[r, in_features]`, B is `[out_features, r]`, with `r` from the config.
fn check_shape(
    t: &RawTensor,
    side: Side,
    expected: [usize; 2],
    key: &str,
    res: &Resolved,
) -> Result<()> {
    if t.shape == expected {
        return Ok(());
    }
    // The rank axis is 0 for A and 1 for B; if only it disagrees, blame the config.
    let (rank_axis, feature_axis) = match side {
        Side::A => (0, 1),
        Side::B => (1, 0),
    };
    let rank_only = t.shape.len() == 2
        && t.shape[feature_axis] == expected[feature_axis]
        && t.shape[rank_axis] != res.r;
    let hint = if rank_only {
        let via = res
            .rank_key
            .as_ref()
            .map_or(String::from("`r`"), |k| format!("rank_pattern `{k}`"));
        format!(
            " (adapter_config.json gives rank {} for `{key}` via {via}, but the tensor has rank {})",
            res.r, t.shape[rank_axis]
        )
    } else {
        " (the adapter was probably trained for a different base model)".to_string()
    };
    Err(Error::AdapterShape {
        tensor: t.name.clone(),
        expected: expected.to_vec(),
        actual: t.shape.clone(),
        hint,
    })
}
