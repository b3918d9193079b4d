//! Model and data selection shared by every command that needs a model (`train`, `profile`,
//! `plan`, `bench`): a preset plus GPT size overrides, and the data it trains on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use brigade::engine::PipelineModel;
use brigade::models::data::{ImageDataset, TokenDataset};
use brigade::models::ModelConfig;
use brigade::train::Dataset;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset (see `brigade presets`); default gpt-tiny (with --resume: the checkpoint's).
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: a text file (byte-level), a nanoGPT .bin token file, or (ResNet) a
    /// safetensors file with `images` and `labels`. Default: an embedded generated set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// GPT: sequence length (and context) override.
    #[arg(long)]
    pub context: Option<usize>,
    /// GPT: number of transformer blocks.
    #[arg(long)]
    pub layers: Option<usize>,
    /// GPT: embedding width.
    #[arg(long)]
    pub width: Option<usize>,
    /// GPT: attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// GPT: vocabulary size (default: the preset's, or 256 for byte-level text).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// ResNet: image side for the embedded shapes set.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
}

impl ModelArgs {
    pub fn name(&self) -> &str {
        self.model.as_deref().unwrap_or("gpt-tiny")
    }

    /// The preset's config with the GPT size overrides applied (validated).
    pub fn config(&self) -> Result<ModelConfig> {
        Ok(match ModelConfig::preset(self.name())? {
            ModelConfig::Gpt(mut cfg) => {
                if let Some(v) = self.vocab {
                    cfg = cfg.with_vocab_size(v);
                }
                if let Some(t) = self.context {
                    cfg = cfg.with_n_positions(t);
                }
                if let Some(l) = self.layers {
                    cfg = cfg.with_n_layer(l);
                }
                if let Some(c) = self.width {
                    cfg = cfg.with_n_embd(c);
                }
                if let Some(h) = self.heads {
                    cfg = cfg.with_n_head(h);
                }
                cfg.validate()?;
                ModelConfig::Gpt(cfg)
            }
            other => other,
        })
    }

    /// The data a model of `config`'s family trains on: `--data`, or the embedded default
    /// (`seed` picks it).
    pub fn data_for(&self, config: &ModelConfig, seed: u64) -> Result<Dataset> {
        Ok(match config {
            ModelConfig::Gpt(_) => Dataset::Tokens(match &self.data {
                Some(path) => TokenDataset::from_path(path)?,
                None => TokenDataset::embedded(seed),
            }),
            ModelConfig::Resnet(_) => Dataset::Images(match &self.data {
                Some(path) => ImageDataset::from_safetensors(path)?,
                None => ImageDataset::embedded_shapes(5000, 1000, self.image_size, seed)?,
            }),
        })
    }

    /// The model (with overrides) and the data it trains on; a ResNet's class and channel
    /// counts follow its data.
    pub fn model_and_data(&self, seed: u64) -> Result<(Arc<dyn PipelineModel>, Dataset)> {
        let config = self.config()?;
        let data = self.data_for(&config, seed)?;
        Ok((fit_to_data(config, &data).build()?, data))
    }
}

/// A ResNet's class and channel counts follow its data.
pub fn fit_to_data(config: ModelConfig, data: &Dataset) -> ModelConfig {
    match (config, data) {
        (ModelConfig::Resnet(cfg), Dataset::Images(d)) => {
            ModelConfig::Resnet(cfg.with_num_classes(d.num_classes()).with_in_channels(d.channels()))
        }
        (config, _) => config,
    }
}

/// `--device`: only the CPU exists in this build; anything else is a clear error.
pub fn check_device(device: &str) -> Result<()> {
    match device.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(()),
        other => bail!("device {other:?} is not available: this build runs stages on the CPU only (--device cpu)"),
    }
}
