//! The Llama family's hyper-parameters (Hugging Face `LlamaConfig` names): presets, overrides,
//! validation and size limits.

use serde::{Deserialize, Serialize};

use crate::blocks::Llama3RopeScaling;
use crate::ModelError;

/// Llama preset names, smallest first. All but `llama-tiny` are the shapes of published
/// models (no weights are downloaded).
pub const PRESET_NAMES: &[&str] =
    &["llama-tiny", "smollm2-135m", "smollm2-360m", "tinyllama-1.1b", "llama3.2-1b", "llama3-8b"];

/// Standard deviation of the weight init (HF `initializer_range`).
pub(super) const INIT_STD: f64 = 0.02;

/// The largest value any Llama size may take (the same bound as GPT's).
pub const LLAMA_MAX_SIZE: usize = crate::gpt::GPT_MAX_SIZE;

/// Llama hyper-parameters, named as in Hugging Face's `LlamaConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The SwiGLU MLP's width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: each k/v head serves `num_attention_heads / num_key_value_heads`
    /// query heads.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Llama 3's RoPE frequency scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Context length: the longest sequence the RoPE tables cover.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding's table.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2-style).
    #[serde(default)]
    pub attention_bias: bool,
}

impl LlamaConfig {
    /// A named preset (see [`PRESET_NAMES`]).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let llama3_2 = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // (vocab, hidden, ffn, layers, heads, kv heads, context, theta, tied, scaling)
        let (v, c, f, l, h, kv, t, theta, tied, scaling) = match name {
            "llama-tiny" => (256, 64, 128, 2, 4, 2, 64, 10000.0, false, None),
            "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, 8192, 100000.0, true, None),
            "smollm2-360m" => (49152, 960, 2560, 32, 15, 5, 8192, 100000.0, true, None),
            "tinyllama-1.1b" => (32000, 2048, 5632, 22, 32, 4, 2048, 10000.0, false, None),
            "llama3.2-1b" => (128256, 2048, 8192, 16, 32, 8, 131072, 500000.0, true, Some(llama3_2)),
            "llama3-8b" => (128256, 4096, 14336, 32, 32, 8, 8192, 500000.0, false, None),
            _ => return Err(ModelError::UnknownPreset { name: name.to_string(), valid: PRESET_NAMES.to_vec() }),
        };
        let cfg = Self {
            vocab_size: v,
            hidden_size: c,
            intermediate_size: f,
            num_hidden_layers: l,
            num_attention_heads: h,
            num_key_value_heads: kv,
            head_dim: c / h,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: scaling,
            max_position_embeddings: t,
            tie_word_embeddings: tied,
            attention_bias: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    // Overrides for the CLI (`--layers 6` on top of a preset); call `validate` (or
    // `Llama::new`, which does) afterwards. Changing the width or the heads keeps
    // `head_dim = hidden_size / num_attention_heads`.
    pub fn with_vocab_size(mut self, v: usize) -> Self {
        self.vocab_size = v;
        self
    }
    pub fn with_max_position_embeddings(mut self, t: usize) -> Self {
        self.max_position_embeddings = t;
        self
    }
    pub fn with_hidden_size(mut self, c: usize) -> Self {
        self.hidden_size = c;
        self.head_dim = c / self.num_attention_heads.max(1);
        self
    }
    pub fn with_num_hidden_layers(mut self, l: usize) -> Self {
        self.num_hidden_layers = l;
        self
    }
    pub fn with_num_attention_heads(mut self, h: usize) -> Self {
        self.num_attention_heads = h;
        self.head_dim = self.hidden_size / h.max(1);
        self
    }
    pub fn with_num_key_value_heads(mut self, kv: usize) -> Self {
        self.num_key_value_heads = kv;
        self
    }
    pub fn with_intermediate_size(mut self, f: usize) -> Self {
        self.intermediate_size = f;
        self
    }
    pub fn with_tie_word_embeddings(mut self, tied: bool) -> Self {
        self.tie_word_embeddings = tied;
        self
    }
    pub fn with_attention_bias(mut self, bias: bool) -> Self {
        self.attention_bias = bias;
        self
    }
    pub fn with_rope_theta(mut self, theta: f64) -> Self {
        self.rope_theta = theta;
        self
    }

    /// Checks the config is usable, naming the field at fault.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(format!("Llama {msg}")));
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return bad(format!("{field} must be positive"));
            }
            if value > LLAMA_MAX_SIZE {
                return bad(format!("{field} = {value} is larger than brigade supports ({LLAMA_MAX_SIZE})"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even: RoPE rotates pairs of dimensions", self.head_dim));
        }
        let params = self.num_params_u128();
        if params > crate::gpt::MAX_PARAMS {
            return bad(format!(
                "config has ~{params} parameters, more than brigade supports ({})",
                crate::gpt::MAX_PARAMS
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!("rms_norm_eps must be positive and finite, got {}", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta must be positive and finite, got {}", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            let positive = [("factor", s.factor), ("low_freq_factor", s.low_freq_factor)];
            for (field, value) in positive {
                if !(value > 0.0 && value.is_finite()) {
                    return bad(format!("rope_scaling.{field} must be positive and finite, got {value}"));
                }
            }
            if !(s.high_freq_factor > s.low_freq_factor && s.high_freq_factor.is_finite()) {
                return bad(format!(
                    "rope_scaling.high_freq_factor ({}) must be larger than low_freq_factor ({})",
                    s.high_freq_factor, s.low_freq_factor
                ));
            }
            if s.original_max_position_embeddings == 0 {
                return bad("rope_scaling.original_max_position_embeddings must be positive".to_string());
            }
        }
        Ok(())
    }

    /// The parameter count (in u128: the validated sizes cannot overflow it).
    fn num_params_u128(&self) -> u128 {
        let [v, c, f, l, h, kv, d] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        ]
        .map(|x| x as u128);
        let bias = if self.attention_bias { (h + 2 * kv) * d } else { 0 };
        let block = 2 * c + c * (h + 2 * kv) * d + bias + h * d * c + 3 * c * f;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + l * block + c + head
    }

    /// Query heads per k/v head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

impl LlamaConfig {
    /// The config as Hugging Face's `config.json` for `LlamaForCausalLM`, with the RoPE keys
    /// both older transformers (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) read.
    pub fn hf_config_json(&self) -> serde_json::Value {
        let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        let scaling = self.rope_scaling.map(|s| {
            serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })
        });
        if let Some(s) = &scaling {
            rope = s.clone();
            rope["rope_theta"] = self.rope_theta.into();
        }
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": INIT_STD,
            "pretraining_tp": 1,
            "use_cache": true,
            // Which ids are special is the tokenizer's business (`brigade export` fills them in
            // from the one it writes); null rather than absent, or transformers would assume
            // Llama-2's 1 and 2 and stop `generate` at whatever token has id 2.
            "bos_token_id": null,
            "eos_token_id": null,
        })
    }
}

impl LlamaConfig {
    /// The config of a Hugging Face `LlamaForCausalLM` `config.json` as any transformers
    /// version writes it: RoPE from `rope_parameters` (5.x) or `rope_theta` / `rope_scaling`
    /// (older), HF's defaults for absent keys. Features brigade's Llama lacks are refused by
    /// name rather than ignored.
    pub fn from_hf_config_json(v: &serde_json::Value) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::InvalidConfig(format!("Llama config.json: {msg}"));
        let size = |key: &str| -> Result<Option<usize>, ModelError> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                x => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| bad(format!("{key} must be a count, got {x}"))),
            }
        };
        let float = |x: &serde_json::Value, key: &str| -> Result<Option<f64>, ModelError> {
            match &x[key] {
                serde_json::Value::Null => Ok(None),
                y => y.as_f64().map(Some).ok_or_else(|| bad(format!("{key} must be a number, got {y}"))),
            }
        };
        let required = |key: &str| size(key)?.ok_or_else(|| bad(format!("{key} is missing")));
        if let Some(t) = v["model_type"].as_str() {
            if t != "llama" {
                return Err(bad(format!("model_type `{t}` is not `llama`")));
            }
        }
        if let Some(act) = v["hidden_act"].as_str() {
            if act != "silu" {
                return Err(bad(format!("hidden_act `{act}`: brigade's Llama uses silu (SwiGLU)")));
            }
        }
        if v["mlp_bias"].as_bool() == Some(true) {
            return Err(bad("mlp_bias: brigade's Llama has no MLP biases".to_string()));
        }
        let heads = required("num_attention_heads")?;
        let hidden = required("hidden_size")?;
        // 5.x keeps RoPE in `rope_parameters`; older versions in `rope_theta` + `rope_scaling`.
        let rope = if v["rope_parameters"].is_object() { &v["rope_parameters"] } else { &v["rope_scaling"] };
        let rope_theta = float(&v["rope_parameters"], "rope_theta")?.or(float(v, "rope_theta")?).unwrap_or(10000.0);
        let rope_type = rope["rope_type"].as_str().or(rope["type"].as_str()).unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => None,
            "llama3" => {
                let f = |key: &str| float(rope, key)?.ok_or_else(|| bad(format!("rope scaling's {key} is missing")));
                let original = rope["original_max_position_embeddings"]
                    .as_u64()
                    .ok_or_else(|| bad("rope scaling's original_max_position_embeddings is missing".to_string()))?;
                Some(Llama3RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: original as usize,
                })
            }
            other => return Err(bad(format!("rope_type `{other}` is not supported (default or llama3)"))),
        };
        let cfg = Self {
            vocab_size: required("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: size("num_key_value_heads")?.unwrap_or(heads),
            head_dim: size("head_dim")?.unwrap_or(hidden / heads.max(1)),
            rms_norm_eps: float(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: size("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"].as_bool().unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
