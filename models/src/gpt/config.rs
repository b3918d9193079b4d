//! GPT-2's hyper-parameters: presets, overrides, validation and size limits.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// GPT preset names, smallest first.
pub const PRESET_NAMES: &[&str] = &["gpt-tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// Standard deviation of GPT-2's weight init.
pub(super) const INIT_STD: f64 = 0.02;

pub(super) fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

/// The largest value any GPT size (vocabulary, context, width, layers, heads) may take; far
/// above any trained GPT (GPT-3: 96 layers, width 12288).
pub const GPT_MAX_SIZE: usize = 1 << 24;
/// The most parameters a model config may describe (2^40, about 1.1 trillion).
pub const MAX_PARAMS: u128 = 1 << 40;

/// GPT-2 hyper-parameters, named as in Hugging Face's `GPT2Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length: the longest sequence the position embedding covers.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
}

impl GptConfig {
    /// A named preset: `gpt-tiny` (CI-sized), `gpt2` (124M), `gpt2-medium` (355M),
    /// `gpt2-large` (774M), `gpt2-xl` (1.5B).
    pub fn preset(name: &str) -> std::result::Result<Self, ModelError> {
        // (vocab, context, n_embd, n_layer, n_head)
        let (v, t, c, l, h) = match name {
            "gpt-tiny" => (256, 64, 64, 2, 4),
            "gpt2" => (50257, 1024, 768, 12, 12),
            "gpt2-medium" => (50257, 1024, 1024, 24, 16),
            "gpt2-large" => (50257, 1024, 1280, 36, 20),
            "gpt2-xl" => (50257, 1024, 1600, 48, 25),
            _ => return Err(ModelError::UnknownPreset { name: name.to_string(), valid: PRESET_NAMES.to_vec() }),
        };
        Self::custom(v, t, c, l, h)
    }

    /// A config from explicit sizes (LayerNorm epsilon 1e-5), validated.
    pub fn custom(
        vocab_size: usize,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
    ) -> std::result::Result<Self, ModelError> {
        let cfg =
            Self { vocab_size, n_positions, n_embd, n_layer, n_head, layer_norm_epsilon: default_layer_norm_epsilon() };
        cfg.validate()?;
        Ok(cfg)
    }

    // Overrides for the CLI (`--n-layer 6` on top of a preset); call `validate` (or `Gpt::new`,
    // which does) afterwards.
    pub fn with_vocab_size(mut self, v: usize) -> Self {
        self.vocab_size = v;
        self
    }
    pub fn with_n_positions(mut self, t: usize) -> Self {
        self.n_positions = t;
        self
    }
    pub fn with_n_embd(mut self, c: usize) -> Self {
        self.n_embd = c;
        self
    }
    pub fn with_n_layer(mut self, l: usize) -> Self {
        self.n_layer = l;
        self
    }
    pub fn with_n_head(mut self, h: usize) -> Self {
        self.n_head = h;
        self
    }
    pub fn with_layer_norm_epsilon(mut self, eps: f64) -> Self {
        self.layer_norm_epsilon = eps;
        self
    }

    /// Checks the sizes are usable: all positive and at most [`GPT_MAX_SIZE`], heads divide
    /// the width, epsilon positive.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ModelError::InvalidConfig(format!("GPT {field} must be positive")));
            }
            if value > GPT_MAX_SIZE {
                return Err(ModelError::InvalidConfig(format!(
                    "GPT {field} = {value} is larger than brigade supports ({GPT_MAX_SIZE})"
                )));
            }
        }
        // An upper bound on the parameters (in u128: the sizes above cannot overflow it), so
        // that counts and allocations derived from the config stay meaningful.
        let (v, p, c, l) = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer].map(|x| x as u128).into();
        let params = v * c + p * c + l * (12 * c * c + 13 * c) + 2 * c;
        if params > MAX_PARAMS {
            return Err(ModelError::InvalidConfig(format!(
                "GPT with vocab {}, context {}, width {} and {} layers has ~{params} parameters, more than brigade supports ({MAX_PARAMS})",
                self.vocab_size, self.n_positions, self.n_embd, self.n_layer
            )));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::InvalidConfig(format!(
                "GPT n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(ModelError::InvalidConfig(format!(
                "GPT layer_norm_epsilon must be positive and finite, got {}",
                self.layer_norm_epsilon
            )));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}
