//! Model and data selection shared by every command that needs a model (`train`, `profile`,
//! `plan`, `bench`): a preset plus GPT size overrides, and the data it trains on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use brigade::engine::PipelineModel;
use brigade::models::data::{ImageDataset, TokenDataset};
use brigade::models::{gpt, resnet, Gpt, GptConfig, ResNet, ResNetConfig};
use brigade::train::Dataset;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset (see `brigade presets`).
    #[arg(long, default_value = "gpt-tiny")]
    pub model: String,
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
    pub fn is_image_model(&self) -> bool {
        resnet::PRESET_NAMES.contains(&self.model.as_str())
    }

    /// The model (with overrides) and the data it trains on; `seed` picks the embedded data.
    pub fn model_and_data(&self, seed: u64) -> Result<(Arc<dyn PipelineModel>, Dataset)> {
        if gpt::PRESET_NAMES.contains(&self.model.as_str()) {
            let data = match &self.data {
                Some(path) => TokenDataset::from_path(path)?,
                None => TokenDataset::embedded(seed),
            };
            let mut cfg = GptConfig::preset(&self.model)?;
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
            Ok((Arc::new(Gpt::new(cfg)?), Dataset::Tokens(data)))
        } else if self.is_image_model() {
            let data = match &self.data {
                Some(path) => ImageDataset::from_safetensors(path)?,
                None => ImageDataset::embedded_shapes(5000, 1000, self.image_size, seed)?,
            };
            let cfg = ResNetConfig::preset(&self.model)?
                .with_num_classes(data.num_classes())
                .with_in_channels(data.channels());
            Ok((Arc::new(ResNet::new(cfg)?), Dataset::Images(data)))
        } else {
            // Let the model registry produce the error that lists valid presets.
            brigade::models::preset(&self.model)?;
            bail!("model {} has no training setup", self.model)
        }
    }
}

/// `--device`: only the CPU exists in this build; anything else is a clear error.
pub fn check_device(device: &str) -> Result<()> {
    match device.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(()),
        other => bail!("device {other:?} is not available: this build runs stages on the CPU only (--device cpu)"),
    }
}
