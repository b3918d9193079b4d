//! brigade-models: GPT-2, the Llama family and ResNet as ordered layer lists the engine can partition, and the
//! datasets they train on (including embedded defaults that need no download).
//!
//! Each family is a folder (`gpt/`, `llama/`, `resnet/`): its config and presets, the [`PipelineModel`]
//! glue, one file per layer kind (spec, forward, input and weight gradient together), and its
//! tests. The building blocks the families share (linear/`Conv1D`, `nn.Linear`, LayerNorm,
//! RMSNorm, RoPE, conv, BatchNorm, conv+BN) are in `blocks/`. Every layer has one forward, used by the autograd reference,
//! evaluation and the explicit training path alike.

mod blocks;
pub mod data;
pub mod gpt;
pub mod hf;
pub mod llama;
pub mod resnet;

use std::sync::Arc;

use brigade_engine::PipelineModel;

pub use gpt::{Gpt, GptConfig};
pub use llama::{Llama, LlamaConfig};
pub use resnet::{BlockKind, ResNet, ResNetConfig};

/// Errors from building a model description (before any tensor exists).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model preset `{name}`; valid presets: {}", .valid.join(", "))]
    UnknownPreset { name: String, valid: Vec<&'static str> },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
}

impl From<ModelError> for candle_core::Error {
    fn from(e: ModelError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// A model's whole configuration, tagged by family: what checkpoints store to rebuild it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum ModelConfig {
    Gpt(GptConfig),
    Llama(LlamaConfig),
    Resnet(ResNetConfig),
}

impl ModelConfig {
    /// The config of any preset (`gpt2`, `resnet18`, `gpt-tiny`, ...).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        if gpt::PRESET_NAMES.contains(&name) {
            Ok(Self::Gpt(GptConfig::preset(name)?))
        } else if llama::PRESET_NAMES.contains(&name) {
            Ok(Self::Llama(LlamaConfig::preset(name)?))
        } else if resnet::PRESET_NAMES.contains(&name) {
            Ok(Self::Resnet(ResNetConfig::preset(name)?))
        } else {
            Err(ModelError::UnknownPreset { name: name.to_string(), valid: preset_names() })
        }
    }

    /// Builds the model (validating the config).
    pub fn build(&self) -> Result<Arc<dyn PipelineModel>, ModelError> {
        Ok(match self {
            Self::Gpt(cfg) => Arc::new(Gpt::new(cfg.clone())?),
            Self::Llama(cfg) => Arc::new(Llama::new(cfg.clone())?),
            Self::Resnet(cfg) => Arc::new(ResNet::new(cfg.clone())?),
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("model configs always serialise")
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self, ModelError> {
        serde_json::from_value(value.clone())
            .map_err(|e| ModelError::InvalidConfig(format!("not a brigade model config ({e}): {value}")))
    }
}

/// Every model preset name: GPT, then Llama, then ResNet.
pub fn preset_names() -> Vec<&'static str> {
    gpt::PRESET_NAMES.iter().chain(llama::PRESET_NAMES).chain(resnet::PRESET_NAMES).copied().collect()
}

/// The model for any preset name (`gpt2`, `resnet18`, `gpt-tiny`, ...), with its default
/// config; unknown names are an error listing the valid ones.
pub fn preset(name: &str) -> Result<Arc<dyn PipelineModel>, ModelError> {
    if gpt::PRESET_NAMES.contains(&name) {
        gpt::model_from_preset(name)
    } else if llama::PRESET_NAMES.contains(&name) {
        llama::model_from_preset(name)
    } else if resnet::PRESET_NAMES.contains(&name) {
        resnet::model_from_preset(name)
    } else {
        Err(ModelError::UnknownPreset { name: name.to_string(), valid: preset_names() })
    }
}
