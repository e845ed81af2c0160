//! `adapter_config.json`: PEFT's `LoraConfig`, and PEFT's rules for which module keys it
//! targets and which rank / alpha each one gets.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

use regex::Regex;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// PEFT's shorthand for "every linear layer except the output layer".
pub const ALL_LINEAR: &str = "all-linear";

#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names: a key is targeted when it equals one or ends with `.name`.
    List(Vec<String>),
    /// A regex full-matched against the module key, or the string `"all-linear"`.
    Regex(String),
}

impl TargetModules {
    fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case(ALL_LINEAR))
    }
}

/// The fields of PEFT's `LoraConfig` that change what is served. Unknown fields are ignored.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
    /// Older aLoRA configs carry only the text; the caller must tokenize it.
    pub invocation_string: Option<String>,
    pub peft_type: Option<String>,
    /// The config text as given.
    pub raw_json: String,
    /// Modules never targeted, same forms as `target_modules`.
    pub exclude_modules: Option<TargetModules>,
    /// Only these layer indices are targeted (list `target_modules` only; empty = all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Names of the layer list used to find the layer index (default: any).
    pub layers_pattern: Option<Vec<String>>,
    /// Modules trained in full; PEFT never puts LoRA on them.
    pub modules_to_save: Vec<String>,
    /// Keys of `rank_pattern` / `alpha_pattern` in JSON order: PEFT takes the *first*
    /// matching pattern, and the maps above are sorted. Keys missing here are tried
    /// after these, in sorted order.
    pub rank_pattern_order: Vec<String>,
    pub alpha_pattern_order: Vec<String>,
}

impl Default for AdapterConfig {
    /// PEFT's defaults, with no target modules.
    fn default() -> Self {
        AdapterConfig {
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            target_modules: TargetModules::List(Vec::new()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            alora_invocation_tokens: None,
            invocation_string: None,
            peft_type: None,
            raw_json: String::new(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: Vec::new(),
            rank_pattern_order: Vec::new(),
            alpha_pattern_order: Vec::new(),
        }
    }
}

/// Config fields naming LoRA variants whose forward pass or weights are not plain `B A x`.
const UNSUPPORTED_FEATURES: &[(&str, &str)] = &[
    ("use_dora", "DoRA is not supported"),
    (
        "lora_bias",
        "`lora_bias` (a bias on lora_B) is not supported",
    ),
    ("use_qalora", "QA-LoRA is not supported"),
    (
        "layer_replication",
        "`layer_replication` (layers shared between positions) is not supported",
    ),
    (
        "target_parameters",
        "LoRA on parameters (`target_parameters`) is not supported",
    ),
    ("use_bdlora", "BD-LoRA is not supported"),
    ("arrow_config", "Arrow routing is not supported"),
    ("velora_config", "VeLoRA is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("kasa_config", "KaSA is not supported"),
];

/// A config file's text: unreadable, non-UTF-8 files are errors that name the file.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| Error::AdapterFormat {
        path: path.display().to_string(),
        detail: format!(
            "adapter config is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// A JSON syntax error, naming the field whose value failed when there is one: JSON has no
/// NaN or Infinity, which Python's `json.dumps` writes for non-finite floats.
fn json_error(text: &str, e: &serde_json::Error, origin: &str) -> Error {
    let offset: usize = text
        .split_inclusive('\n')
        .take(e.line().saturating_sub(1))
        .map(str::len)
        .sum::<usize>()
        + e.column().saturating_sub(1);
    let mut cut = offset.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = &text[..cut];
    let rest = &text[head.len()..];
    let field = head
        .rfind(':')
        .filter(|&c| head[c + 1..].trim().is_empty() || !head[c + 1..].contains([',', '{', '[']))
        .and_then(|c| {
            let key = head[..c].trim_end().strip_suffix('"')?;
            key.rfind('"').map(|q| key[q + 1..].to_string())
        });
    let non_finite = ["NaN", "Infinity", "-Infinity"]
        .iter()
        .any(|lit| rest.trim_start().starts_with(lit) || head.trim_end().ends_with(lit));
    let detail = match (field, non_finite) {
        (Some(f), true) => {
            return config_err(
                &f,
                origin,
                "is NaN or Infinity, which JSON does not allow; give a finite number",
            )
        }
        (Some(f), false) => format!("adapter config is not valid JSON (at field `{f}`): {e}"),
        (None, _) => format!("adapter config is not valid JSON: {e}"),
    };
    Error::AdapterFormat {
        path: origin.to_string(),
        detail,
    }
}

fn config_err(field: &str, origin: &str, detail: impl Display) -> Error {
    Error::Config {
        field: field.to_string(),
        detail: format!("{detail} (in {origin})"),
    }
}

/// JSON `null` is PEFT's "not set", same as an absent field.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// A non-negative integer; PEFT writes ints, but `8.0` from hand-edited configs is accepted.
fn as_count(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
            .map(|f| f as u64)
    })
}

fn positive_int(v: &Value, name: &str, origin: &str) -> Result<usize> {
    match as_count(v) {
        Some(0) => Err(config_err(name, origin, "must be at least 1, got 0")),
        Some(n) => usize::try_from(n).map_err(|_| config_err(name, origin, "is too large")),
        None => Err(config_err(
            name,
            origin,
            format!("expected a positive integer, got {v}"),
        )),
    }
}

fn number(v: &Value, name: &str, origin: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| config_err(name, origin, format!("expected a number, got {v}")))
}

fn boolean(obj: &Map<String, Value>, name: &str, origin: &str) -> Result<bool> {
    match field(obj, name) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| config_err(name, origin, format!("expected true or false, got {v}"))),
    }
}

fn string_list(v: &Value, name: &str, origin: &str) -> Result<Vec<String>> {
    let items = v
        .as_array()
        .ok_or_else(|| config_err(name, origin, format!("expected a list of strings, got {v}")))?;
    items
        .iter()
        .map(|item| {
            item.as_str().map(str::to_string).ok_or_else(|| {
                config_err(
                    name,
                    origin,
                    format!("expected a list of strings, got {item} in it"),
                )
            })
        })
        .collect()
}

fn modules(v: &Value, name: &str, origin: &str) -> Result<TargetModules> {
    match v {
        Value::String(s) => Ok(TargetModules::Regex(s.clone())),
        _ => string_list(v, name, origin).map(TargetModules::List),
    }
}

fn pattern_map<T>(
    obj: &Map<String, Value>,
    name: &str,
    origin: &str,
    parse: impl Fn(&Value, &str, &str) -> Result<T>,
) -> Result<BTreeMap<String, T>> {
    let Some(v) = field(obj, name) else {
        return Ok(BTreeMap::new());
    };
    let map = v.as_object().ok_or_else(|| {
        config_err(
            name,
            origin,
            format!("expected a map from pattern to value, got {v}"),
        )
    })?;
    map.iter()
        .map(|(k, v)| Ok((k.clone(), parse(v, &format!("{name}.{k}"), origin)?)))
        .collect()
}

/// Keys of one JSON object in document order (`serde_json::Map` sorts them).
struct KeyOrder(Vec<String>);

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct PatternOrders {
    rank_pattern: Option<KeyOrder>,
    alpha_pattern: Option<KeyOrder>,
}

impl AdapterConfig {
    /// Parses PEFT's `adapter_config.json` text. `origin` (a path or `"<memory>"`) is named in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let format_err = |detail: String| Error::AdapterFormat {
            path: origin.to_string(),
            detail,
        };
        if text.trim().is_empty() {
            return Err(format_err("adapter config is empty".to_string()));
        }
        let root: Value = serde_json::from_str(text).map_err(|e| json_error(text, &e, origin))?;
        let obj = root
            .as_object()
            .ok_or_else(|| format_err("adapter config must be a JSON object".to_string()))?;

        let peft_type = match field(obj, "peft_type") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(config_err(
                    "peft_type",
                    origin,
                    format!("expected a string, got {v}"),
                ))
            }
        };
        if let Some(t) = peft_type
            .as_deref()
            .filter(|t| !t.eq_ignore_ascii_case("LORA"))
        {
            return Err(format_err(format!(
                "peft_type is `{t}`; only LORA adapters are supported"
            )));
        }
        for &(name, why) in UNSUPPORTED_FEATURES {
            let used = match field(obj, name) {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if used {
                return Err(format_err(format!("{why} (config field `{name}`)")));
            }
        }

        let r = field(obj, "r").map_or(Ok(8), |v| positive_int(v, "r", origin))?;
        let lora_alpha =
            field(obj, "lora_alpha").map_or(Ok(8.0), |v| number(v, "lora_alpha", origin))?;
        let use_rslora = boolean(obj, "use_rslora", origin)?;
        let target_modules = match field(obj, "target_modules") {
            Some(v) => modules(v, "target_modules", origin)?,
            None => {
                return Err(config_err(
                    "target_modules",
                    origin,
                    "missing; PEFT fills it from the model type when training, so a saved adapter always has it",
                ))
            }
        };
        let exclude_modules = field(obj, "exclude_modules")
            .map(|v| modules(v, "exclude_modules", origin))
            .transpose()?;
        let rank_pattern = pattern_map(obj, "rank_pattern", origin, positive_int)?;
        let alpha_pattern = pattern_map(obj, "alpha_pattern", origin, number)?;
        // Both fields are maps or null by now; should this still fail (a duplicated
        // top-level field), the patterns are simply tried in sorted order.
        let orders: PatternOrders = serde_json::from_str(text).unwrap_or(PatternOrders {
            rank_pattern: None,
            alpha_pattern: None,
        });

        let alora_invocation_tokens = field(obj, "alora_invocation_tokens")
            .map(|v| {
                let bad = || {
                    config_err(
                        "alora_invocation_tokens",
                        origin,
                        format!("expected a list of token ids, got {v}"),
                    )
                };
                let items = v.as_array().ok_or_else(bad)?;
                items
                    .iter()
                    .map(|t| {
                        as_count(t)
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or_else(bad)
                    })
                    .collect::<Result<Vec<u32>>>()
            })
            .transpose()?;
        let invocation_string = match field(obj, "invocation_string") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(config_err(
                    "invocation_string",
                    origin,
                    format!("expected a string, got {v}"),
                ))
            }
        };

        let layers_to_transform = match field(obj, "layers_to_transform") {
            None => None,
            Some(v) => {
                let bad = || {
                    config_err(
                        "layers_to_transform",
                        origin,
                        format!("expected a layer index or a list of them, got {v}"),
                    )
                };
                let idx = |t: &Value| {
                    as_count(t)
                        .and_then(|t| usize::try_from(t).ok())
                        .ok_or_else(bad)
                };
                match v {
                    Value::Array(items) => Some(items.iter().map(idx).collect::<Result<Vec<_>>>()?),
                    _ => Some(vec![idx(v)?]),
                }
            }
        };
        let layers_pattern = match field(obj, "layers_pattern") {
            None => None,
            // PEFT treats "" like no pattern.
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(v) => Some(string_list(v, "layers_pattern", origin)?),
        };
        let modules_to_save = field(obj, "modules_to_save")
            .map(|v| string_list(v, "modules_to_save", origin))
            .transpose()?
            .unwrap_or_default();

        let config = AdapterConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            rank_pattern,
            alpha_pattern,
            alora_invocation_tokens,
            invocation_string,
            peft_type,
            raw_json: text.to_string(),
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            modules_to_save,
            rank_pattern_order: orders.rank_pattern.map(|o| o.0).unwrap_or_default(),
            alpha_pattern_order: orders.alpha_pattern.map(|o| o.0).unwrap_or_default(),
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads and parses an `adapter_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, &path.display().to_string())
    }

    /// The `invocation_string` of an aLoRA config that gives no `alora_invocation_tokens`
    /// (older PEFT configs): the caller tokenizes it with the base model's tokenizer.
    pub fn untokenized_invocation(&self) -> Option<&str> {
        match self.alora_invocation_tokens {
            None => self.invocation_string.as_deref(),
            Some(_) => None,
        }
    }

    /// An estimate of the heap bytes the config holds (strings, lists, pattern maps), for
    /// [`Adapter::metadata_bytes`](super::Adapter::metadata_bytes).
    pub fn heap_bytes(&self) -> usize {
        // A BTreeMap entry costs its key, its value and about a pointer of node overhead.
        const ENTRY: usize = 3 * std::mem::size_of::<usize>();
        let strings = |v: &[String]| -> usize {
            v.iter()
                .map(|s| s.capacity() + std::mem::size_of::<String>())
                .sum::<usize>()
        };
        let targets = |t: &TargetModules| match t {
            TargetModules::List(l) => strings(l),
            TargetModules::Regex(s) => s.capacity(),
        };
        let rank = self
            .rank_pattern
            .keys()
            .map(|k| k.capacity() + ENTRY)
            .sum::<usize>();
        let alpha = self
            .alpha_pattern
            .keys()
            .map(|k| k.capacity() + ENTRY)
            .sum::<usize>();
        self.raw_json.capacity()
            + targets(&self.target_modules)
            + self.exclude_modules.as_ref().map_or(0, targets)
            + rank
            + alpha
            + self
                .alora_invocation_tokens
                .as_ref()
                .map_or(0, |t| t.capacity() * 4)
            + self.invocation_string.as_ref().map_or(0, String::capacity)
            + self.peft_type.as_ref().map_or(0, String::capacity)
            + self
                .layers_to_transform
                .as_ref()
                .map_or(0, |l| l.capacity() * std::mem::size_of::<usize>())
            + self.layers_pattern.as_deref().map_or(0, strings)
            + strings(&self.modules_to_save)
            + strings(&self.rank_pattern_order)
            + strings(&self.alpha_pattern_order)
    }

    /// Checks what `from_json_str` checks, for configs built in memory too.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.r == 0 {
            return Err(config_err("r", origin, "must be at least 1, got 0"));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(config_err(
                &format!("rank_pattern.{k}"),
                origin,
                "must be at least 1, got 0",
            ));
        }
        if self
            .alora_invocation_tokens
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err(config_err(
                "alora_invocation_tokens",
                origin,
                "is empty; an aLoRA adapter needs at least one invocation token",
            ));
        }
        if matches!(self.target_modules, TargetModules::Regex(_)) {
            // PEFT rejects these combinations when it builds the config.
            for (set, name) in [
                (self.layers_to_transform.is_some(), "layers_to_transform"),
                (self.layers_pattern.is_some(), "layers_pattern"),
            ] {
                if set {
                    return Err(config_err(
                        name,
                        origin,
                        "cannot be used when `target_modules` is a string",
                    ));
                }
            }
        }
        if self.layers_pattern.as_ref().is_some_and(|p| !p.is_empty())
            && self.layers_to_transform.is_none()
        {
            return Err(config_err(
                "layers_pattern",
                origin,
                "is set, so `layers_to_transform` must be set too",
            ));
        }
        Matcher::new(self, origin).map(|_| ())
    }
}

/// Rank and alpha PEFT gives one module, and the `rank_pattern` key that set the rank.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub r: usize,
    pub alpha: f64,
    pub rank_key: Option<String>,
    pub alpha_key: Option<String>,
}

enum Target {
    All,
    Regex(Regex),
    List(Vec<String>),
}

impl Target {
    fn new(t: &TargetModules, name: &str, origin: &str) -> Result<Self> {
        Ok(match t {
            // Only `target_modules` knows the shorthand; elsewhere it is a plain regex.
            _ if name == "target_modules" && t.is_all_linear() => Target::All,
            TargetModules::Regex(p) => {
                Target::Regex(compile(&format!("^(?:{p})$"), name, p, origin)?)
            }
            TargetModules::List(l) => Target::List(l.clone()),
        })
    }

    fn exact(&self, key: &str) -> bool {
        matches!(self, Target::List(l) if l.iter().any(|t| t == key))
    }

    /// PEFT's name test: full regex match, or a list entry equal to the key or to a
    /// dotted suffix of it.
    fn matches(&self, key: &str) -> bool {
        match self {
            Target::All => true,
            Target::Regex(re) => re.is_match(key),
            Target::List(l) => l.iter().any(|t| {
                key == t
                    || key
                        .strip_suffix(t.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
        }
    }
}

fn compile(re: &str, field: &str, pattern: &str, origin: &str) -> Result<Regex> {
    Regex::new(re).map_err(|e| {
        config_err(
            field,
            origin,
            format!("`{pattern}` is not a regex this runtime can evaluate: {e}"),
        )
    })
}

/// PEFT's matching rules for one config, with every regex compiled once.
pub(crate) struct Matcher {
    target: Target,
    exclude: Option<Target>,
    modules_to_save: Vec<Regex>,
    layers: Option<(Vec<usize>, Vec<Regex>)>,
    rank: Vec<(String, Regex, usize)>,
    alpha: Vec<(String, Regex, f64)>,
    default_r: usize,
    default_alpha: f64,
}

/// Pattern keys in PEFT's lookup order: JSON order first, then any others sorted.
fn ordered<'a, T>(map: &'a BTreeMap<String, T>, order: &'a [String]) -> Vec<(&'a String, &'a T)> {
    let mut out: Vec<(&String, &T)> = Vec::with_capacity(map.len());
    for k in order.iter().chain(map.keys()) {
        if let Some((k, v)) = map.get_key_value(k) {
            if !out.iter().any(|(seen, _)| *seen == k) {
                out.push((k, v));
            }
        }
    }
    out
}

impl Matcher {
    pub(crate) fn new(config: &AdapterConfig, origin: &str) -> Result<Self> {
        let target = Target::new(&config.target_modules, "target_modules", origin)?;
        let exclude = config
            .exclude_modules
            .as_ref()
            .map(|e| Target::new(e, "exclude_modules", origin))
            .transpose()?;
        let modules_to_save = config
            .modules_to_save
            .iter()
            .map(|m| {
                compile(
                    &format!(r"^(?:^|.*\.){m}(?:$|\..*)"),
                    "modules_to_save",
                    m,
                    origin,
                )
            })
            .collect::<Result<_>>()?;
        // Only list targets are filtered by layer; PEFT reads the index from the key.
        let layers = match (&config.target_modules, &config.layers_to_transform) {
            (TargetModules::List(_), Some(idx)) if !idx.is_empty() => {
                let pats = match config.layers_pattern.as_deref() {
                    None | Some([]) => {
                        vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("valid regex")]
                    }
                    Some(pats) => pats
                        .iter()
                        .map(|p| {
                            compile(
                                &format!(r"^(?:^|.*?\.){p}\.(\d+)\."),
                                "layers_pattern",
                                p,
                                origin,
                            )
                        })
                        .collect::<Result<_>>()?,
                };
                Some((idx.clone(), pats))
            }
            _ => None,
        };
        // `re.match(rf"(.*\.)?({key})$", module_key)`, as PEFT's `get_pattern_key`.
        let pattern =
            |k: &str, field: &str| compile(&format!(r"^(?:.*\.)?(?:{k})$"), field, k, origin);
        let rank = ordered(&config.rank_pattern, &config.rank_pattern_order)
            .into_iter()
            .map(|(k, &r)| Ok((k.clone(), pattern(k, "rank_pattern")?, r)))
            .collect::<Result<_>>()?;
        let alpha = ordered(&config.alpha_pattern, &config.alpha_pattern_order)
            .into_iter()
            .map(|(k, &a)| Ok((k.clone(), pattern(k, "alpha_pattern")?, a)))
            .collect::<Result<_>>()?;
        Ok(Matcher {
            target,
            exclude,
            modules_to_save,
            layers,
            rank,
            alpha,
            default_r: config.r,
            default_alpha: config.lora_alpha,
        })
    }

    /// Whether PEFT puts a LoRA layer on the module with this key
    /// (`check_target_module_exists`).
    pub(crate) fn is_target(&self, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(key))
            || self.modules_to_save.iter().any(|re| re.is_match(key))
            || !self.target.matches(key)
        {
            return false;
        }
        // As in PEFT, a key listed verbatim skips the layer filter.
        match &self.layers {
            Some((indices, pats)) if !self.target.exact(key) => pats
                .iter()
                .find_map(|p| p.captures(key))
                .and_then(|c| c[1].parse::<usize>().ok())
                .is_some_and(|i| indices.contains(&i)),
            _ => true,
        }
    }

    /// Rank and alpha of the module with this key (`LoraModel._create_and_replace`).
    pub(crate) fn resolve(&self, key: &str) -> Resolved {
        let rank = self.rank.iter().find(|(_, re, _)| re.is_match(key));
        let alpha = self.alpha.iter().find(|(_, re, _)| re.is_match(key));
        Resolved {
            r: rank.map_or(self.default_r, |(_, _, r)| *r),
            alpha: alpha.map_or(self.default_alpha, |(_, _, a)| *a),
            rank_key: rank.map(|(k, _, _)| k.clone()),
            alpha_key: alpha.map(|(k, _, _)| k.clone()),
        }
    }
}
