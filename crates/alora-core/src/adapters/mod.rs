//! The adapter registry (the disk tier) and reading an adapter's weights.
//!
//! Reads PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`)
//! or in-memory tensors and validates every tensor against the caller's [`ModelSpec`]
//! following PEFT's own rules (target matching, `rank_pattern` / `alpha_pattern`,
//! rsLoRA scaling). Registering a directory reads the config and only the safetensors
//! *header* (names, shapes, dtypes, data extent): an [`Adapter`] is metadata, a few KB
//! whatever its size. [`Adapter::read_weights`] reads the values on first use, checks that
//! the file is still the one registered, and returns them as f32 [`HostWeights`] (which the
//! caller keeps in a [`crate::host::HostCache`]). Adapters loaded from memory keep their
//! weights. Nothing is stored until the whole adapter has been validated, so a failed load
//! leaves the registry as it was.

mod config;
mod names;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use xxhash_rust::xxh3::xxh3_64;

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

/// An adapter's weights on the host, f32, per (layer, module). Immutable once built; share
/// it as `Arc<HostWeights>`.
pub struct HostWeights {
    /// Indexed `layer * num_modules + module`.
    slots: Vec<Option<LoraWeights>>,
    num_modules: usize,
    bytes: usize,
}

impl HostWeights {
    /// Weights of `num_layers = slots.len() / num_modules` layers, indexed
    /// `layer * num_modules + module`. Not validated against a spec: the registry builds
    /// validated ones; this is for callers that make their own (tests, fakes).
    ///
    /// # Panics
    /// If `num_modules` is 0 or does not divide `slots.len()`.
    pub fn new(num_modules: usize, slots: Vec<Option<LoraWeights>>) -> Self {
        assert!(
            slots.len().checked_rem(num_modules) == Some(0),
            "{} slots do not make whole layers of {num_modules} modules",
            slots.len()
        );
        let bytes = slots
            .iter()
            .flatten()
            .map(|w| (w.a.len() + w.b.len()) * std::mem::size_of::<f32>())
            .sum();
        HostWeights {
            slots,
            num_modules,
            bytes,
        }
    }

    /// None if (layer, module) is not adapted or out of range.
    pub fn get(&self, layer: usize, module: usize) -> Option<&LoraWeights> {
        if module >= self.num_modules {
            return None;
        }
        let idx = layer.checked_mul(self.num_modules)?.checked_add(module)?;
        self.slots.get(idx)?.as_ref()
    }

    /// Bytes of the f32 values (A and B of every adapted (layer, module)).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn num_layers(&self) -> usize {
        self.slots.len() / self.num_modules
    }

    pub fn num_modules(&self) -> usize {
        self.num_modules
    }
}

// Hand-written so that printing weights does not dump megabytes of values.
impl fmt::Debug for HostWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostWeights")
            .field("num_layers", &self.num_layers())
            .field("num_modules", &self.num_modules)
            .field("adapted", &self.slots.iter().flatten().count())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Rank (0 = not adapted) and scale of one (layer, module), 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    rank: u32,
    scale: f32,
}

/// What identifies the registered version of a weights file: a read refuses a file that
/// differs in any of these. A replacement with the same header, the same length and the
/// same modification time (e.g. within one timestamp tick) is not detected.
#[derive(Debug)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    /// xxh3 of the JSON header bytes: names, shapes, dtypes and offsets.
    header_hash: u64,
}

#[derive(Debug)]
enum Source {
    File(FileStamp),
    Memory(Arc<HostWeights>),
}

/// A registered adapter: metadata only (the weights of a directory adapter stay on disk
/// until [`read_weights`](Self::read_weights)).
pub struct Adapter {
    pub id: AdapterId,
    pub name: String,
    pub kind: AdapterKind,
    pub config: AdapterConfig,
    /// Some for ALora, None for Lora.
    pub invocation_tokens: Option<Vec<u32>>,
    /// The max rank over its (layer, module)s.
    pub max_rank: usize,
    /// Per module of the spec: the max rank over layers, 0 where the adapter does not
    /// target the module.
    pub module_ranks: Vec<usize>,
    /// The largest |scale| over adapted (layer, module)s (the segment scale); 1.0 if that
    /// is 0.
    pub max_abs_scale: f32,
    /// Indexed `layer * num_modules + module`.
    slots: Box<[Slot]>,
    num_modules: usize,
    host_bytes: usize,
    spec: Arc<ModelSpec>,
    source: Source,
}

impl Adapter {
    /// 0 if not adapted (or out of range).
    pub fn module_rank(&self, layer: usize, module: usize) -> usize {
        self.slot(layer, module).map_or(0, |s| s.rank as usize)
    }

    /// The scale (alpha / r, or alpha / sqrt(r) with rsLoRA) of an adapted (layer, module).
    pub fn scale(&self, layer: usize, module: usize) -> Option<f32> {
        self.slot(layer, module).map(|s| s.scale)
    }

    fn slot(&self, layer: usize, module: usize) -> Option<Slot> {
        if module >= self.num_modules {
            return None;
        }
        let idx = layer.checked_mul(self.num_modules)?.checked_add(module)?;
        self.slots.get(idx).copied().filter(|s| s.rank > 0)
    }

    /// Module indices adapted in at least one layer, ascending.
    pub fn targeted_modules(&self) -> Vec<usize> {
        (0..self.num_modules)
            .filter(|&m| self.module_ranks[m] > 0)
            .collect()
    }

    pub fn is_alora(&self) -> bool {
        self.kind == AdapterKind::ALora
    }

    pub fn num_layers(&self) -> usize {
        self.slots.len() / self.num_modules
    }

    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    /// Host bytes of its f32 weights once read (= `read_weights()?.bytes()`).
    pub fn host_bytes(&self) -> usize {
        self.host_bytes
    }

    /// The weights file, for adapters registered from a directory.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            Source::File(stamp) => Some(&stamp.path),
            Source::Memory(_) => None,
        }
    }

    /// The weights of an adapter loaded from memory (always available); None for an
    /// adapter registered from a directory.
    pub fn weights_in_memory(&self) -> Option<Arc<HostWeights>> {
        match &self.source {
            Source::Memory(w) => Some(Arc::clone(w)),
            Source::File(_) => None,
        }
    }

    /// The adapter's weights. From memory: the kept ones (no copy). From a directory: reads
    /// the whole weights file (an owned read, no map), checks that it is the file that was
    /// registered (same length, modification time and header; else an `AdapterFormat`
    /// error naming the file), converts to f32 and checks every value is finite (the
    /// errors `load_dir` gave before registration was lazy). Blocking I/O; thread-safe.
    pub fn read_weights(&self) -> Result<Arc<HostWeights>> {
        match &self.source {
            Source::Memory(w) => Ok(Arc::clone(w)),
            Source::File(stamp) => self.read_file(stamp).map(Arc::new),
        }
    }

    fn read_file(&self, stamp: &FileStamp) -> Result<HostWeights> {
        let path = &stamp.path;
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let changed = |what: String| {
            format_err(
                path,
                format!(
                    "the file changed on disk since adapter `{}` was registered ({what}); \
                     unload the adapter and load it again",
                    self.name
                ),
            )
        };
        let mut file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.len() != stamp.len {
            return Err(changed(format!(
                "{} bytes, registered with {}",
                meta.len(),
                stamp.len
            )));
        }
        if meta.modified().ok() != stamp.modified {
            return Err(changed("its modification time differs".into()));
        }
        // Read into owned memory rather than mapping: a map turns a file that shrinks under
        // the reader into SIGBUS, a read into a short buffer that is refused below. Every
        // value is converted into owned f32 anyway, so the map would save one transient copy.
        let mut bytes = Vec::with_capacity(usize::try_from(stamp.len).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() as u64 != stamp.len {
            return Err(changed(format!(
                "read {} bytes, registered with {}",
                bytes.len(),
                stamp.len
            )));
        }
        let header = bytes
            .get(..8)
            .map(|p| u64::from_le_bytes(p.try_into().expect("8 bytes")))
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| bytes.get(8..8usize.checked_add(n)?));
        if header.map(xxh3_64) != Some(stamp.header_hash) {
            return Err(changed("its header differs".into()));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e))?;
        let views = st.tensors();
        for (name, view) in &views {
            check_dtype(name, view.dtype())?;
        }
        let metas: Vec<TensorMeta> = views
            .iter()
            .map(|(name, view)| TensorMeta {
                name,
                shape: view.shape(),
                values: None,
            })
            .collect();
        let origin = path.display().to_string();
        let plan = plan(&self.spec, &self.config, &origin, &metas)?;
        if compact(&plan)? != self.slots {
            return Err(changed("its tensors differ".into()));
        }
        convert(&plan, self.num_modules, &origin, &metas, |i| {
            let view = &views[i].1;
            bytes_to_f32(view.dtype(), view.data())
        })
    }

    /// An estimate of the host bytes this registration holds (the struct, its name, config,
    /// path and per-(layer, module) arrays; not the weights, not the registry's map entry).
    pub fn metadata_bytes(&self) -> usize {
        let path = match &self.source {
            Source::File(stamp) => stamp.path.as_os_str().len(),
            Source::Memory(_) => 0,
        };
        std::mem::size_of::<Adapter>()
            + self.name.capacity()
            + self.config.heap_bytes()
            + self
                .invocation_tokens
                .as_ref()
                .map_or(0, |t| t.capacity() * std::mem::size_of::<u32>())
            + self.module_ranks.capacity() * std::mem::size_of::<usize>()
            + std::mem::size_of_val::<[Slot]>(&self.slots)
            + path
    }
}

// Hand-written so that printing an adapter (e.g. in a failed `unwrap_err`) stays short.
impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("invocation_tokens", &self.invocation_tokens)
            .field("max_rank", &self.max_rank)
            .field("module_ranks", &self.module_ranks)
            .field("path", &self.path())
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

/// All registered adapters, by name.
pub struct AdapterRegistry {
    spec: Arc<ModelSpec>,
    by_name: BTreeMap<String, Arc<Adapter>>,
    /// Ids are never reused: KV-cache entries are keyed by id, so a reloaded adapter
    /// must not match its predecessor's cache. Starts at 1, so 0 is never an adapter id.
    next_id: AdapterId,
}

fn format_err(path: &Path, detail: String) -> Error {
    Error::AdapterFormat {
        path: path.display().to_string(),
        detail,
    }
}

fn corrupt(path: &Path, e: impl fmt::Display) -> Error {
    format_err(
        path,
        format!("not a valid safetensors file (truncated or corrupt): {e}"),
    )
}

fn check_dtype(name: &str, dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
        dtype => Err(Error::UnsupportedDtype {
            tensor: name.to_string(),
            dtype: dtype.to_string(),
        }),
    }
}

/// The largest header safetensors itself accepts.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads the 8-byte length and the JSON header of a safetensors file, and no tensor data.
/// The file's length must be exactly what the header declares, so a truncated file is
/// refused here.
fn read_header(path: &Path) -> Result<(FileStamp, Metadata)> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(path, "the file ended inside its header")
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let len = meta.len();
    if len < 8 {
        return Err(corrupt(
            path,
            format!("{len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(io)?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Err(corrupt(
            path,
            format!("header length {n} does not fit the file of {len} bytes"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| corrupt(path, format!("header: {e}")))?;
    let extent = metadata.data_len() as u64;
    if 8 + n + extent != len {
        return Err(corrupt(
            path,
            format!(
                "the header declares {extent} bytes of tensor data but the file holds {}",
                len - 8 - n
            ),
        ));
    }
    let stamp = FileStamp {
        // Absolute, so that a later read does not depend on the working directory.
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        len,
        modified: meta.modified().ok(),
        header_hash: xxh3_64(&header),
    };
    Ok((stamp, metadata))
}

impl AdapterRegistry {
    pub fn new(spec: ModelSpec) -> Self {
        AdapterRegistry {
            spec: Arc::new(spec),
            by_name: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Registers a PEFT adapter directory: reads and validates its config and the tensor
    /// index (names, shapes, dtypes) of its weights file, not the weights.
    /// `invocation_tokens` overrides the config's and makes the adapter aLoRA.
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
        let (stamp, header) = read_header(&weights_path)?;
        let mut infos: Vec<_> = header.tensors().into_iter().collect();
        // Sorted so that the error reported for a bad adapter does not depend on map order.
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in &infos {
            check_dtype(name, info.dtype)?;
        }
        let metas: Vec<TensorMeta> = infos
            .iter()
            .map(|(name, info)| TensorMeta {
                name,
                shape: &info.shape,
                values: None,
            })
            .collect();
        let plan = plan(
            &self.spec,
            &config,
            &weights_path.display().to_string(),
            &metas,
        )?;
        self.insert(name, kind, config, tokens, &plan, Source::File(stamp))
    }

    /// Loads an adapter from in-memory tensors (e.g. a PEFT `state_dict`), with the same
    /// validation as [`load_dir`](Self::load_dir) plus the values' (finite, one per
    /// element); the weights are kept.
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
        let mut data: Vec<Vec<f32>> = Vec::with_capacity(tensors.len());
        let heads: Vec<(String, Vec<usize>)> = tensors
            .into_iter()
            .map(|t| {
                data.push(t.data);
                (t.name, t.shape)
            })
            .collect();
        let metas: Vec<TensorMeta> = heads
            .iter()
            .zip(&data)
            .map(|((name, shape), values)| TensorMeta {
                name,
                shape,
                values: Some(values.len()),
            })
            .collect();
        let plan = plan(&self.spec, &config, MEMORY_ORIGIN, &metas)?;
        let weights = convert(&plan, self.spec.num_modules(), MEMORY_ORIGIN, &metas, |i| {
            std::mem::take(&mut data[i])
        })?;
        let source = Source::Memory(Arc::new(weights));
        self.insert(name, kind, config, tokens, &plan, source)
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
        plan: &Plan,
        source: Source,
    ) -> Result<Arc<Adapter>> {
        let slots = compact(plan)?;
        let num_modules = self.spec.num_modules();
        let mut module_ranks = vec![0usize; num_modules];
        let mut max_abs_scale = 0f32;
        let mut host_bytes = 0usize;
        for (idx, s) in slots.iter().enumerate() {
            if s.rank == 0 {
                continue;
            }
            let m = &self.spec.modules[idx % num_modules];
            let r = s.rank as usize;
            module_ranks[idx % num_modules] = module_ranks[idx % num_modules].max(r);
            max_abs_scale = max_abs_scale.max(s.scale.abs());
            host_bytes += r * (m.in_features + m.out_features) * std::mem::size_of::<f32>();
        }
        let id = self.next_id;
        self.next_id += 1;
        let adapter = Arc::new(Adapter {
            id,
            name: name.to_string(),
            kind,
            config,
            invocation_tokens,
            max_rank: plan.max_rank,
            module_ranks,
            max_abs_scale: if max_abs_scale > 0.0 {
                max_abs_scale
            } else {
                1.0
            },
            slots,
            num_modules,
            host_bytes,
            spec: Arc::clone(&self.spec),
            source,
        });
        self.by_name.insert(name.to_string(), Arc::clone(&adapter));
        Ok(adapter)
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

/// Little-endian values of a supported dtype, converted byte-wise (a file gives no
/// alignment guarantee for 2- and 4-byte values).
fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    match dtype {
        Dtype::F32 => convert(bytes, f32::from_le_bytes),
        Dtype::F16 => convert(bytes, |c| half::f16::from_le_bytes(c).to_f32()),
        Dtype::BF16 => convert(bytes, |c| half::bf16::from_le_bytes(c).to_f32()),
        dtype => unreachable!("dtype {dtype} rejected by check_dtype"),
    }
}

/// What the metadata pass sees of a tensor.
struct TensorMeta<'a> {
    name: &'a str,
    shape: &'a [usize],
    /// The number of values, for tensors handed in from memory (checked against the shape).
    values: Option<usize>,
}

/// One adapted (layer, module) as validated: its rank and scale, and the indices of its A
/// and B tensors in the caller's tensor list.
#[derive(Debug, Clone, Copy)]
struct Planned {
    rank: usize,
    scale: f32,
    a: usize,
    b: usize,
}

/// The result of the metadata pass.
struct Plan {
    /// Indexed `layer * num_modules + module`.
    slots: Vec<Option<Planned>>,
    max_rank: usize,
}

/// The metadata pass: validates the tensors' names and shapes against the spec and config,
/// and the scales. Reads no values.
fn plan(
    spec: &ModelSpec,
    config: &AdapterConfig,
    origin: &str,
    tensors: &[TensorMeta],
) -> Result<Plan> {
    let format_err = |detail: String| Error::AdapterFormat {
        path: origin.to_string(),
        detail,
    };
    let num_modules = spec.modules.len();
    // Sorted so that the error reported for a bad adapter does not depend on map order.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(tensors[b].name));

    let mut slots: Vec<[Option<usize>; 2]> = vec![[None, None]; spec.num_layers * num_modules];
    for i in order {
        let raw = &tensors[i];
        let key = names::parse(raw.name, spec)
            .map_err(|why| format_err(format!("unexpected tensor `{}`: {why}", raw.name)))?;
        if let Some(len) = raw.values {
            let n = raw.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n != Some(len) {
                return Err(format_err(format!(
                    "tensor `{}` has {len} values but its shape is {:?}",
                    raw.name, raw.shape
                )));
            }
        }
        let slot = &mut slots[key.layer * num_modules + key.module][key.side.index()];
        if let Some(prev) = slot {
            return Err(format_err(format!(
                "tensors `{}` and `{}` are both {} of `{}` (two adapters in one state dict?)",
                tensors[*prev].name,
                raw.name,
                key.side.segment(),
                spec.module_key(key.layer, key.module)
            )));
        }
        *slot = Some(i);
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
                    names::partner(tensors[t].name)
                )))
            }
            [Some(_), Some(b)] if !targeted => {
                return Err(format_err(format!(
                    "tensor `{}` adapts `{key}`, which target_modules does not select \
                     (adapter_config.json and the weights disagree)",
                    tensors[b].name
                )))
            }
            [Some(a), Some(b)] => {
                let resolved = matcher.resolve(&key);
                check_shape(
                    &tensors[a],
                    Side::A,
                    [resolved.r, m.in_features],
                    &key,
                    &resolved,
                )?;
                check_shape(
                    &tensors[b],
                    Side::B,
                    [m.out_features, resolved.r],
                    &key,
                    &resolved,
                )?;
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
    let mut planned = Vec::with_capacity(validated.len());
    for pair in validated {
        let Some((res, a, b)) = pair else {
            planned.push(None);
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
        planned.push(Some(Planned {
            rank: res.r,
            scale: scale as f32,
            a,
            b,
        }));
    }
    Ok(Plan {
        slots: planned,
        max_rank,
    })
}

/// The per-(layer, module) ranks and scales an [`Adapter`] keeps.
fn compact(plan: &Plan) -> Result<Box<[Slot]>> {
    plan.slots
        .iter()
        .map(|p| match p {
            None => Ok(Slot {
                rank: 0,
                scale: 0.0,
            }),
            Some(p) => Ok(Slot {
                rank: u32::try_from(p.rank).map_err(|_| Error::Config {
                    field: "r".into(),
                    detail: format!("rank {} is too large", p.rank),
                })?,
                scale: p.scale,
            }),
        })
        .collect()
}

/// The value pass: converts the planned tensors to f32 (`values(i)` gives tensor `i`'s
/// values) and checks that every value is finite.
fn convert(
    plan: &Plan,
    num_modules: usize,
    origin: &str,
    tensors: &[TensorMeta],
    mut values: impl FnMut(usize) -> Vec<f32>,
) -> Result<HostWeights> {
    let mut slots = Vec::with_capacity(plan.slots.len());
    for p in &plan.slots {
        let Some(p) = p else {
            slots.push(None);
            continue;
        };
        let (a, b) = (values(p.a), values(p.b));
        for (i, v) in [(p.a, &a), (p.b, &b)] {
            if let Some(at) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::AdapterFormat {
                    path: origin.to_string(),
                    detail: format!(
                        "tensor `{}` holds a non-finite value ({}) at flat index {at}",
                        tensors[i].name, v[at]
                    ),
                });
            }
        }
        slots.push(Some(LoraWeights {
            rank: p.rank,
            scale: p.scale,
            a,
            b,
        }));
    }
    Ok(HostWeights::new(num_modules, slots))
}

/// A is `[r, in_features]`, B is `[out_features, r]`, with `r` from the config.
fn check_shape(
    t: &TensorMeta,
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
        tensor: t.name.to_string(),
        expected: expected.to_vec(),
        actual: t.shape.to_vec(),
        hint,
    })
}
