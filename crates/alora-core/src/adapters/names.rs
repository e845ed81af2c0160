//! Tensor names as PEFT writes them, e.g.
//! `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, mapped to
//! (layer, module, A | B).

use super::ModelSpec;

/// Where the decoder layers live in the Hugging Face causal LMs we serve; module keys
/// (what `target_modules` and the pattern maps match) are `model.layers.{N}.{path}`.
pub const LAYERS_PREFIX: &str = "model.layers";

pub(crate) fn module_key(layer: usize, path: &str) -> String {
    format!("{LAYERS_PREFIX}.{layer}.{path}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

impl Side {
    pub(crate) fn segment(self) -> &'static str {
        match self {
            Side::A => "lora_A",
            Side::B => "lora_B",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    pub(crate) fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorKey {
    pub layer: usize,
    pub module: usize,
    pub side: Side,
}

fn side_at(seg: &str) -> Option<Side> {
    match seg {
        "lora_A" => Some(Side::A),
        "lora_B" => Some(Side::B),
        _ => None,
    }
}

/// Maps a tensor name to its slot, or says why it cannot be served. Any prefix before
/// `layers.{N}.` is accepted, and an adapter-name segment (`lora_A.default.weight`, as
/// in a live `state_dict`).
pub(crate) fn parse(name: &str, spec: &ModelSpec) -> Result<TensorKey, String> {
    let segs: Vec<&str> = name.split('.').collect();
    let Some(k) = segs.iter().rposition(|s| side_at(s).is_some()) else {
        return Err(if segs.contains(&"lora_magnitude_vector") {
            "DoRA magnitude vectors are not supported".to_string()
        } else if segs.iter().any(|s| s.starts_with("lora_embedding")) {
            "LoRA on embedding layers is not supported".to_string()
        } else {
            "not a LoRA A/B weight; only `lora_A` / `lora_B` weights of decoder-layer \
             modules can be served (full module copies from `modules_to_save` and \
             trained biases cannot)"
                .to_string()
        });
    };
    match &segs[k + 1..] {
        ["weight"] => {}
        [adapter, "weight"] if !adapter.is_empty() => {}
        [.., "bias"] => return Err("a bias on lora_B (`lora_bias`) is not supported".to_string()),
        _ => {
            return Err(format!(
                "expected `{0}.weight` or `{0}.<adapter name>.weight` at the end",
                segs[k]
            ))
        }
    }
    let Some(i) = segs[..k].windows(2).position(|w| {
        w[0] == "layers" && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit())
    }) else {
        return Err(
            "not inside a decoder layer (`layers.N.`); only the decoder layers' modules \
             can be adapted (not e.g. lm_head or embed_tokens)"
                .to_string(),
        );
    };
    let layer: usize = segs[i + 1]
        .parse()
        .map_err(|_| format!("layer index `{}` is out of range", segs[i + 1]))?;
    if layer >= spec.num_layers {
        return Err(format!(
            "layer {layer} does not exist: the base model has {} layers (the adapter was \
             probably trained for a different base model)",
            spec.num_layers
        ));
    }
    let path = segs[i + 2..k].join(".");
    let module = spec
        .modules
        .iter()
        .position(|m| m.path == path)
        .ok_or_else(|| {
            let known: Vec<&str> = spec.modules.iter().map(|m| m.path.as_str()).collect();
            format!(
                "`{path}` is not a module this runtime serves for the model (known: {})",
                known.join(", ")
            )
        })?;
    Ok(TensorKey {
        layer,
        module,
        side: side_at(segs[k]).expect("found by rposition"),
    })
}

/// The name the partner tensor would have: `...lora_A...` ↔ `...lora_B...`.
pub(crate) fn partner(name: &str) -> String {
    let mut segs: Vec<&str> = name.split('.').collect();
    if let Some(k) = segs.iter().rposition(|s| side_at(s).is_some()) {
        segs[k] = side_at(segs[k])
            .expect("found by rposition")
            .other()
            .segment();
    }
    segs.join(".")
}
