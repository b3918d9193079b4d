//! Model and data selection shared by every command that needs a model (`train`, `profile`,
//! `plan`, `bench`): a preset plus GPT or Llama size overrides, and the data it trains on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use brigade::engine::{PipelineModel, StageDevice};
use brigade::models::data::{Augment, DataError, ImageDataset, TokenDataset};
use brigade::models::ModelConfig;
use brigade::tokenizer::TextTokenizer;
use brigade::train::Dataset;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset (see `brigade presets`); default gpt-tiny (with --resume: the checkpoint's).
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: a text file (byte-level, or --tokenizer), a nanoGPT .bin token file, or
    /// (ResNet) an image folder (DIR/<class>/*.png|jpg), CIFAR-10 binary (a .bin file or the
    /// cifar-10-batches-bin directory), or a safetensors file with `images` and `labels`.
    /// Default: an embedded generated set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// GPT: tokenize a text --data file with this tokenizer (a tokenizer.json, or a directory
    /// holding one) on the fly; the model's vocabulary defaults to the tokenizer's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
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
    /// Llama: key/value heads (grouped-query attention; must divide --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Llama: the SwiGLU MLP's width (intermediate_size).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// ResNet: image side for the embedded shapes set, and the side image-folder images are
    /// resized to.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// ResNet on an image folder or CIFAR-10: train without the random crop (padding 4) and
    /// horizontal flip augmentation.
    #[arg(long)]
    pub no_augment: bool,
}

impl ModelArgs {
    pub fn name(&self) -> &str {
        self.model.as_deref().unwrap_or("gpt-tiny")
    }

    /// The preset's config with the GPT or Llama size overrides applied (validated).
    pub fn config(&self) -> Result<ModelConfig> {
        let preset = ModelConfig::preset(self.name())?;
        if !matches!(preset, ModelConfig::Llama(_)) && (self.kv_heads.is_some() || self.ffn.is_some()) {
            bail!("--kv-heads and --ffn shape a Llama-family model (--model llama-tiny, ...), not {}", self.name());
        }
        Ok(match preset {
            ModelConfig::Llama(mut cfg) => {
                if let Some(v) = self.vocab {
                    cfg = cfg.with_vocab_size(v);
                } else if let Some(tok) = self.text_tokenizer()? {
                    cfg = cfg.with_vocab_size(tok.vocab_size());
                }
                if let Some(t) = self.context {
                    cfg = cfg.with_max_position_embeddings(t);
                }
                if let Some(l) = self.layers {
                    cfg = cfg.with_num_hidden_layers(l);
                }
                if let Some(h) = self.heads {
                    cfg = cfg.with_num_attention_heads(h);
                }
                if let Some(c) = self.width {
                    cfg = cfg.with_hidden_size(c);
                }
                if let Some(kv) = self.kv_heads {
                    cfg = cfg.with_num_key_value_heads(kv);
                }
                if let Some(f) = self.ffn {
                    cfg = cfg.with_intermediate_size(f);
                }
                cfg.validate()?;
                ModelConfig::Llama(cfg)
            }
            ModelConfig::Gpt(mut cfg) => {
                if let Some(v) = self.vocab {
                    cfg = cfg.with_vocab_size(v);
                } else if let Some(tok) = self.text_tokenizer()? {
                    cfg = cfg.with_vocab_size(tok.vocab_size());
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

    /// The training augmentation for image files.
    fn augment(&self) -> Augment {
        if self.no_augment {
            Augment::default()
        } else {
            Augment::standard()
        }
    }

    /// `--tokenizer`, loaded.
    pub fn text_tokenizer(&self) -> Result<Option<TextTokenizer>> {
        Ok(self.tokenizer.as_deref().map(TextTokenizer::load).transpose()?)
    }

    /// The data a model of `config`'s family trains on: `--data`, or the embedded default
    /// (`seed` picks it).
    pub fn data_for(&self, config: &ModelConfig, seed: u64) -> Result<Dataset> {
        let token_vocab = match config {
            ModelConfig::Gpt(cfg) => Some(cfg.vocab_size),
            ModelConfig::Llama(cfg) => Some(cfg.vocab_size),
            ModelConfig::Resnet(_) => None,
        };
        if let (Some(path), Some(_)) = (&self.data, token_vocab) {
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
                bail!("{}", not_preset_data(path));
            }
        }
        Ok(match (config, token_vocab) {
            (_, Some(vocab)) => Dataset::Tokens(match (&self.data, self.text_tokenizer()?) {
                (Some(path), Some(tok)) if !is_token_file(path) => tokenized_text(path, &tok, vocab)?,
                (Some(path), Some(tok)) => {
                    check_tokenizer_fits(&tok, vocab)?;
                    TokenDataset::from_path(path)?
                }
                (Some(path), None) => TokenDataset::from_path(path)?,
                (None, Some(_)) => {
                    bail!("--tokenizer needs a text file to tokenize: give it with --data")
                }
                (None, None) => TokenDataset::embedded(seed),
            }),
            (_, None) => Dataset::Images(match &self.data {
                Some(path) if is_cifar(path) => {
                    self.check_image_size_applies(path, 32)?;
                    ImageDataset::from_cifar10(path)?.with_augment(self.augment())
                }
                Some(path) if path.is_dir() => {
                    ImageDataset::from_image_folder(path, self.image_size)?.with_augment(self.augment())
                }
                Some(path) => {
                    let images = ImageDataset::from_safetensors(path).map_err(|e| match &e {
                        DataError::MissingTensor { present, .. }
                            if present.split(", ").any(|n| ["inputs", "features", "targets"].contains(&n)) =>
                        {
                            anyhow::anyhow!("{}", not_preset_data(path))
                        }
                        _ => e.into(),
                    })?;
                    let (_, height, width) = images.image_shape();
                    if height == width {
                        self.check_image_size_applies(path, height)?;
                    }
                    images
                }
                None => {
                    // 6000 RGB images of f32 pixels, drawn up front.
                    let side = self.image_size as f64;
                    let bytes = 6000.0 * 3.0 * side * side * 4.0;
                    check_fits(
                        &format!("the embedded image set at --image-size {}", self.image_size),
                        bytes,
                        "6000 images of 3 channels",
                    )?;
                    ImageDataset::embedded_shapes(5000, 1000, self.image_size, seed)?
                }
            }),
        })
    }

    /// Data whose images have a fixed size (CIFAR-10, a safetensors set) is not resized: a
    /// `--image-size` other than the default and that size is an error, not silently ignored.
    fn check_image_size_applies(&self, path: &std::path::Path, size: usize) -> Result<()> {
        const DEFAULT_IMAGE_SIZE: usize = 32;
        if self.image_size != DEFAULT_IMAGE_SIZE && self.image_size != size {
            bail!(
                "--image-size {} does not apply to {}: its images are {size}x{size} and are used as they are; \
                 leave --image-size out",
                self.image_size,
                path.display()
            );
        }
        Ok(())
    }

    /// The model (with overrides) and the data it trains on; a ResNet's class and channel
    /// counts follow its data.
    pub fn model_and_data(&self, seed: u64) -> Result<(Arc<dyn PipelineModel>, Dataset)> {
        let config = self.config()?;
        let data = self.data_for(&config, seed)?;
        let config = fit_to_data(config, &data);
        // Every command that builds a model trains or profiles at least one example through
        // it: refuse what cannot fit before any of it is allocated (building the layer list
        // allocates nothing).
        let model = config.build()?;
        let (needed, detail) = training_memory(&config, 1, self.context, 2);
        check_fits(&format!("{} with AdamW", model.name()), needed, &detail)?;
        Ok((model, data))
    }
}

/// CIFAR-10 binary data: a `.bin` file or a directory of them.
fn is_cifar(path: &std::path::Path) -> bool {
    is_token_file(path) || ["data_batch_1.bin", "test_batch.bin"].iter().any(|f| path.join(f).is_file())
}

/// A nanoGPT-style token file (`.bin`), as opposed to text.
/// The refusal of data for a model `brigade train` has no preset for (f32 features and
/// targets): such models are defined in Rust, and the CLI trains the built-in presets only.
fn not_preset_data(path: &std::path::Path) -> String {
    format!(
        "{} is not data for a preset: `brigade train` reads a safetensors file only as a ResNet image set \
         (`images`, `labels`) and trains the built-in presets only (`brigade presets`); a model of your own, such as \
         one on f32 features and targets, trains through the Rust API (see examples/custom_mlp.rs and the \
         \"Defining a model\" guide)",
        path.display()
    )
}

fn is_token_file(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("bin"))
}

/// A tokenizer whose ids the model cannot embed is refused, naming both sizes.
fn check_tokenizer_fits(tok: &TextTokenizer, model_vocab: usize) -> Result<()> {
    if tok.vocab_size() > model_vocab {
        bail!(
            "the tokenizer {} has {} tokens, more than the model's vocabulary of {model_vocab}; use --vocab {} or more (or drop --vocab)",
            tok.source(),
            tok.vocab_size(),
            tok.vocab_size()
        );
    }
    Ok(())
}

/// A text file tokenized on the fly (in parallel), as a token dataset.
fn tokenized_text(path: &std::path::Path, tok: &TextTokenizer, model_vocab: usize) -> Result<TokenDataset> {
    check_tokenizer_fits(tok, model_vocab)?;
    if !path.exists() {
        bail!("--data {} does not exist", path.display());
    }
    let text = brigade::tokenizer::read_text(path)?;
    let started = std::time::Instant::now();
    let ids = tok.encode_large(&text, |_| {})?;
    if ids.is_empty() {
        bail!("the tokenizer {} encodes {} to no tokens at all; nothing to train on", tok.source(), path.display());
    }
    let n = ids.len();
    eprintln!(
        "tokenized {} ({:.1} MB) into {n} tokens in {:.2}s",
        path.display(),
        text.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let source = format!("{} tokenized with {} ({n} tokens)", path.display(), tok.source());
    Ok(TokenDataset::from_tokens(source, ids, model_vocab)?)
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
pub fn check_device(device: &str) -> Result<StageDevice> {
    Ok(device.trim().to_ascii_lowercase().parse::<StageDevice>()?)
}

/// `--device` / `--devices`: where the stages run.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the stages run: cpu, cuda (stages round-robin over the visible GPUs; several
    /// stages may share one) or cuda:N (every stage on GPU N). GPUs need a build with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// One device per stage, e.g. cuda:0,cuda:0,cuda:1 (instead of --device).
    #[arg(long, conflicts_with = "device")]
    pub devices: Option<String>,
}

impl DeviceArgs {
    /// The device of each of `stages` stages.
    pub fn stage_devices(&self, stages: usize) -> Result<Vec<StageDevice>> {
        let devices = match &self.devices {
            Some(list) => StageDevice::parse_list(&list.to_ascii_lowercase())?,
            None => StageDevice::spread(&self.device.to_ascii_lowercase(), stages)?,
        };
        if devices.len() != stages {
            bail!("--devices names {} devices for {stages} stages: give one per stage", devices.len());
        }
        if devices.iter().any(|d| d.is_cuda()) {
            // Fails now, with the reason, rather than in every stage thread.
            brigade::engine::device::cuda_device_count()?;
        }
        Ok(devices)
    }

    /// The device a single-device job (profiling, the reference) uses: the first stage's.
    pub fn first(&self) -> Result<StageDevice> {
        match &self.devices {
            Some(list) => Ok(StageDevice::parse_list(&list.to_ascii_lowercase())?[0]),
            None => check_device(&self.device),
        }
    }
}

/// Memory this machine can still give a process, from `/proc/meminfo` (Linux); `None`
/// elsewhere, where nothing is refused.
pub fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A lower bound on the memory a training run of `config` needs: parameters, gradients and
/// optimizer state (`optimizer_states` tensors per parameter), plus the activations of one
/// micro-batch through the whole model (every schedule keeps at least that). Computed in f64 so
/// absurd sizes cannot overflow. Returns the bytes and how they divide.
pub fn training_memory(
    config: &ModelConfig,
    microbatch: usize,
    context: Option<usize>,
    optimizer_states: usize,
) -> (f64, String) {
    let b = microbatch as f64;
    let (params, activations) = match config {
        ModelConfig::Gpt(g) => {
            let (v, t, c, l, h) =
                (g.vocab_size as f64, g.n_positions as f64, g.n_embd as f64, g.n_layer as f64, g.n_head as f64);
            let s = context.map_or(t, |c| c as f64);
            let params = v * c + t * c + l * (12.0 * c * c + 13.0 * c) + 2.0 * c;
            // Per block about 17·s·c values plus 2.5·h·s² for attention (Korthikanti et al.),
            // and the logits with their gradient.
            let activations = 4.0 * b * s * (l * (17.0 * c + 2.5 * h * s) + 2.0 * v);
            (params, activations)
        }
        ModelConfig::Llama(m) => {
            let (v, t, c, l) = (
                m.vocab_size as f64,
                m.max_position_embeddings as f64,
                m.hidden_size as f64,
                m.num_hidden_layers as f64,
            );
            let (h, kv, d, f) = (
                m.num_attention_heads as f64,
                m.num_key_value_heads as f64,
                m.head_dim as f64,
                m.intermediate_size as f64,
            );
            let s = context.map_or(t, |c| c as f64);
            let head = if m.tie_word_embeddings { 0.0 } else { v * c };
            let params = v * c + l * (2.0 * c + c * (h + 2.0 * kv) * d + h * d * c + 3.0 * c * f) + c + head;
            // Per block: the residual stream, norms, q/k/v, heads, the MLP's gate/up and
            // product, and the h·s² probabilities; then the logits with their gradient.
            let activations = 4.0 * b * s * (l * (6.0 * c + 2.0 * (h + 2.0 * kv) * d + 5.0 * f + h * s) + 2.0 * v);
            (params, activations)
        }
        ModelConfig::Resnet(_) => match config.build() {
            Ok(model) => (model.num_params() as f64, 0.0),
            Err(_) => (0.0, 0.0),
        },
    };
    let state = 4.0 * params * (2.0 + optimizer_states as f64);
    let detail = format!(
        "{:.1}M parameters: {:.1} GB of weights, gradients and optimizer state; {:.1} GB of activations for one micro-batch of {microbatch}",
        params / 1e6,
        state / 1e9,
        activations / 1e9
    );
    (state + activations, detail)
}

/// Refuses a run that cannot fit in the memory available, before allocating any of it (the
/// allocator would otherwise abort the process with no useful message).
pub fn check_fits(what: &str, needed: f64, detail: &str) -> Result<()> {
    if let Some(available) = memory_available() {
        if needed > available as f64 {
            bail!(
                "{what} needs at least {:.1} GB ({detail}), but this machine has {:.1} GB available; \
                 choose a smaller model, batch, context or image size",
                needed / 1e9,
                available as f64 / 1e9
            );
        }
    }
    Ok(())
}
