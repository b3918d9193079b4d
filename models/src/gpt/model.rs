//! GPT-2 as a [`PipelineModel`]: its name, layer list, loss and input.

use std::sync::Arc;

use brigade_engine::{InputKind, LayerSpec, LossKind, PipelineModel};

use super::{BlockSpec, EmbeddingSpec, GptConfig, HeadSpec, PRESET_NAMES};
use crate::ModelError;

/// GPT-2 as a [`PipelineModel`].
#[derive(Debug, Clone)]
pub struct Gpt {
    name: String,
    cfg: GptConfig,
}

impl Gpt {
    /// A model from a validated config. Its name is the preset's when the config equals one,
    /// otherwise it spells out the sizes.
    pub fn new(cfg: GptConfig) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let name = PRESET_NAMES
            .iter()
            .find(|p| GptConfig::preset(p).as_ref() == Ok(&cfg))
            .map(|p| p.to_string())
            .unwrap_or_else(|| {
                format!(
                    "gpt(vocab={}, ctx={}, embd={}, layers={}, heads={})",
                    cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head
                )
            });
        Ok(Self { name, cfg })
    }

    pub fn from_preset(name: &str) -> std::result::Result<Self, ModelError> {
        Self::new(GptConfig::preset(name)?)
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
}

/// A GPT preset as a shareable model (`gpt-tiny`, `gpt2`, ...).
pub fn model_from_preset(name: &str) -> std::result::Result<Arc<dyn PipelineModel>, ModelError> {
    Ok(Arc::new(Gpt::from_preset(name)?))
}

impl PipelineModel for Gpt {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        let mut layers: Vec<Arc<dyn LayerSpec>> = Vec::with_capacity(self.cfg.n_layer + 2);
        layers.push(Arc::new(EmbeddingSpec { cfg: self.cfg.clone() }));
        for index in 0..self.cfg.n_layer {
            layers.push(Arc::new(BlockSpec { cfg: self.cfg.clone(), index }));
        }
        layers.push(Arc::new(HeadSpec { cfg: self.cfg.clone() }));
        layers
    }

    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn config(&self) -> serde_json::Value {
        crate::ModelConfig::Gpt(self.cfg.clone()).to_json()
    }

    fn input(&self) -> InputKind {
        InputKind::Tokens { vocab: self.cfg.vocab_size, context: self.cfg.n_positions }
    }

    fn num_classes(&self) -> usize {
        self.cfg.vocab_size
    }
}
