//! Llama as a [`PipelineModel`]: its name, layer list, loss and input.

use std::sync::Arc;

use brigade_engine::{InputKind, LayerSpec, LossKind, PipelineModel};

use super::{DecoderBlockSpec, EmbeddingSpec, HeadSpec, LlamaConfig, PRESET_NAMES};
use crate::ModelError;

/// A Llama-family decoder as a [`PipelineModel`].
#[derive(Debug, Clone)]
pub struct Llama {
    name: String,
    cfg: LlamaConfig,
}

impl Llama {
    /// A model from a validated config. Its name is the preset's when the config equals one,
    /// otherwise it spells out the sizes.
    pub fn new(cfg: LlamaConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let name = PRESET_NAMES
            .iter()
            .find(|p| LlamaConfig::preset(p).as_ref() == Ok(&cfg))
            .map(|p| p.to_string())
            .unwrap_or_else(|| {
                format!(
                    "llama(vocab={}, ctx={}, hidden={}, ffn={}, layers={}, heads={}, kv_heads={})",
                    cfg.vocab_size,
                    cfg.max_position_embeddings,
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.num_hidden_layers,
                    cfg.num_attention_heads,
                    cfg.num_key_value_heads
                )
            });
        Ok(Self { name, cfg })
    }

    pub fn from_preset(name: &str) -> Result<Self, ModelError> {
        Self::new(LlamaConfig::preset(name)?)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
}

/// A Llama preset as a shareable model (`llama-tiny`, `smollm2-135m`, ...).
pub fn model_from_preset(name: &str) -> Result<Arc<dyn PipelineModel>, ModelError> {
    Ok(Arc::new(Llama::from_preset(name)?))
}

impl PipelineModel for Llama {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        let mut layers: Vec<Arc<dyn LayerSpec>> = Vec::with_capacity(self.cfg.num_hidden_layers + 2);
        layers.push(Arc::new(EmbeddingSpec { cfg: self.cfg.clone() }));
        for index in 0..self.cfg.num_hidden_layers {
            layers.push(Arc::new(DecoderBlockSpec { cfg: self.cfg.clone(), index }));
        }
        layers.push(Arc::new(HeadSpec { cfg: self.cfg.clone() }));
        layers
    }

    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn config(&self) -> serde_json::Value {
        crate::ModelConfig::Llama(self.cfg.clone()).to_json()
    }

    fn input(&self) -> InputKind {
        InputKind::Tokens { vocab: self.cfg.vocab_size, context: self.cfg.max_position_embeddings }
    }

    fn num_classes(&self) -> usize {
        self.cfg.vocab_size
    }
}
