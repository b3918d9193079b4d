//! The wider ecosystem's formats for brigade's models: Hugging Face GPT-2 (`config.json`,
//! weight names with or without the `transformer.` prefix) and torchvision ResNet state dicts.
//!
//! brigade's parameter names already are `GPT2LMHeadModel`'s and torchvision's, with the same
//! layouts (GPT-2's `Conv1D` weights stored `(in, out)`), so weights map one to one; what this
//! module adds is the config translation and the few names the ecosystem adds or drops:
//! the original GPT-2 checkpoints omit the `transformer.` prefix and carry `attn.bias` /
//! `attn.masked_bias` causal-mask buffers; `lm_head.weight` is the tied token embedding.

use serde_json::{json, Value};

use crate::{GptConfig, ModelError};

/// `config.json` that `transformers.GPT2Config` reads for this model.
pub fn gpt2_config_json(cfg: &GptConfig) -> Value {
    let special = if cfg.vocab_size == 50257 { json!(50256) } else { Value::Null };
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": true,
        // GPT-2's end-of-text id; a byte-level vocabulary has none.
        "bos_token_id": special,
        "eos_token_id": special,
        "dtype": "float32",
    })
}

/// Reads a Hugging Face GPT-2 `config.json`; architectural options brigade does not implement
/// are errors rather than silently different models.
pub fn gpt_config_from_hf(value: &Value) -> Result<GptConfig, ModelError> {
    let bad = |m: String| ModelError::InvalidConfig(format!("Hugging Face GPT-2 config: {m}"));
    if let Some(t) = value.get("model_type").and_then(Value::as_str) {
        if t != "gpt2" {
            return Err(bad(format!("model_type is {t:?}; only \"gpt2\" is supported")));
        }
    }
    let size = |key: &str, default: Option<usize>| -> Result<usize, ModelError> {
        match value.get(key) {
            Some(v) => {
                v.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("{key} must be a positive integer, got {v}")))
            }
            None => default.ok_or_else(|| bad(format!("{key} is missing"))),
        }
    };
    let mut cfg = GptConfig {
        vocab_size: size("vocab_size", Some(50257))?,
        n_positions: size("n_positions", Some(1024))?,
        n_embd: size("n_embd", Some(768))?,
        n_layer: size("n_layer", Some(12))?,
        n_head: size("n_head", Some(12))?,
        layer_norm_epsilon: 1e-5,
    };
    if let Some(eps) = value.get("layer_norm_epsilon") {
        cfg.layer_norm_epsilon =
            eps.as_f64().ok_or_else(|| bad(format!("layer_norm_epsilon must be a number, got {eps}")))?;
    }
    if let Some(inner) = value.get("n_inner").filter(|v| !v.is_null()) {
        if inner.as_u64() != (cfg.n_embd as u64).checked_mul(4) {
            return Err(bad(format!("n_inner {inner} is not 4 × n_embd; brigade's MLP is 4 × n_embd wide")));
        }
    }
    if let Some(act) = value.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(bad(format!(
                "activation_function {act:?} is not supported (brigade uses GELU-tanh, \"gelu_new\")"
            )));
        }
    }
    for (key, expected) in
        [("scale_attn_by_inverse_layer_idx", false), ("tie_word_embeddings", true), ("scale_attn_weights", true)]
    {
        if let Some(v) = value.get(key).and_then(Value::as_bool) {
            if v != expected {
                return Err(bad(format!("{key} = {v} is not supported")));
            }
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// What a Hugging Face GPT-2 weight name is to brigade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpt2Name {
    /// A brigade parameter (canonical name).
    Param(String),
    /// The LM head: tied to `transformer.wte.weight`, so it must equal it.
    TiedHead,
    /// A causal-mask buffer older checkpoints carry; brigade builds its own mask.
    MaskBuffer,
}

/// Maps a Hugging Face GPT-2 tensor name to brigade's.
pub fn gpt2_name(hf: &str) -> Gpt2Name {
    if hf == "lm_head.weight" {
        return Gpt2Name::TiedHead;
    }
    if hf.ends_with(".attn.bias") || hf.ends_with(".attn.masked_bias") {
        return Gpt2Name::MaskBuffer;
    }
    if hf.starts_with("transformer.") {
        Gpt2Name::Param(hf.to_string())
    } else {
        Gpt2Name::Param(format!("transformer.{hf}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_hf_json() {
        for preset in crate::gpt::PRESET_NAMES {
            let cfg = GptConfig::preset(preset).unwrap();
            assert_eq!(gpt_config_from_hf(&gpt2_config_json(&cfg)).unwrap(), cfg, "{preset}");
        }
    }

    #[test]
    fn unsupported_hf_options_are_errors() {
        let base = gpt2_config_json(&GptConfig::preset("gpt-tiny").unwrap());
        for (key, value) in [
            ("model_type", json!("llama")),
            ("activation_function", json!("relu")),
            ("n_inner", json!(100)),
            ("tie_word_embeddings", json!(false)),
            ("n_head", json!(5)), // does not divide n_embd = 64
        ] {
            let mut v = base.clone();
            v[key] = value;
            let err = gpt_config_from_hf(&v).unwrap_err().to_string();
            assert!(err.contains(key) || err.contains("head"), "{key}: {err}");
        }
    }

    #[test]
    fn hf_names_map_to_canonical_ones() {
        assert_eq!(gpt2_name("h.0.attn.c_attn.weight"), Gpt2Name::Param("transformer.h.0.attn.c_attn.weight".into()));
        assert_eq!(gpt2_name("transformer.wte.weight"), Gpt2Name::Param("transformer.wte.weight".into()));
        assert_eq!(gpt2_name("lm_head.weight"), Gpt2Name::TiedHead);
        assert_eq!(gpt2_name("h.3.attn.masked_bias"), Gpt2Name::MaskBuffer);
        assert_eq!(gpt2_name("transformer.h.3.attn.bias"), Gpt2Name::MaskBuffer);
    }
}
