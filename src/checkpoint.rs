//! Checkpoint workflows on top of the engine's layout-independent format: resuming a run on
//! any stage layout, exporting weights that the ecosystem loads as they are (Hugging Face
//! `GPT2LMHeadModel`, torchvision ResNet), and importing such weights to fine-tune.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use brigade_engine::checkpoint::{
    expected_weights, plan_shards, write_index, write_safetensors, Checkpoint, CheckpointError, ShardSet, TensorInfo,
    META_FILE,
};
use brigade_engine::PipelineModel;
use brigade_models::hf::{gpt2_config_json, gpt2_name, gpt_config_from_hf, Gpt2Name};
use brigade_models::{ModelConfig, ResNetConfig};
use candle_core::{DType, Tensor};

use crate::Error;

/// A checkpoint opened together with the model it holds, rebuilt from its stored config.
pub fn open(path: &Path) -> Result<(Checkpoint, ModelConfig, Arc<dyn PipelineModel>), Error> {
    let ckpt = Checkpoint::open(path)?;
    let config = ModelConfig::from_json(&ckpt.meta.model.config).map_err(|e| {
        Error::Checkpoint(CheckpointError::invalid(ckpt.dir.join(META_FILE), format!("model config: {e}")))
    })?;
    let model = config.build()?;
    Ok((ckpt, config, model))
}

/// Checks that a checkpoint holds `expected` (same family and config), naming both if not.
pub fn check_model(ckpt: &Checkpoint, expected: &dyn PipelineModel) -> Result<(), Error> {
    if ckpt.meta.model.config != expected.config() {
        return Err(CheckpointError::ModelMismatch {
            path: ckpt.dir.join(META_FILE),
            found: format!("{} {}", ckpt.meta.model.name, ckpt.meta.model.config),
            expected: format!("{} {}", expected.name(), expected.config()),
        }
        .into());
    }
    Ok(())
}

/// Element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    fn dtype(self) -> DType {
        match self {
            ExportDtype::F32 => DType::F32,
            ExportDtype::Bf16 => DType::BF16,
            ExportDtype::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            "f16" | "float16" | "fp16" => Ok(ExportDtype::F16),
            _ => Err(Error::Config(format!("unknown dtype {s:?}: expected f32, bf16 or f16"))),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub bytes: u64,
    /// `gpt2` or `torchvision-resnet`.
    pub format: &'static str,
}

/// Writes the checkpoint's weights as the ecosystem expects them into `out`:
/// - GPT: `config.json` (Hugging Face `GPT2Config`) and `model.safetensors` (or shards with
///   `model.safetensors.index.json`), names as `GPT2LMHeadModel.save_pretrained` writes them
///   (the tied `lm_head.weight` left out, as Hugging Face does);
/// - ResNet: `model.safetensors` holding torchvision's full `state_dict()` (running statistics
///   and `num_batches_tracked` included), loadable with `load_state_dict(strict=True)`.
///
/// Floating-point tensors are converted to `dtype`; integer buffers stay as they are. Shards
/// are converted one at a time, so memory holds at most one shard.
pub fn export(checkpoint: &Path, out: &Path, dtype: ExportDtype, max_shard_bytes: u64) -> Result<ExportSummary, Error> {
    let (ckpt, config, model) = open(checkpoint)?;
    // Validates every tensor (names, shapes, dtypes) before writing anything.
    let expected = expected_weights(model.as_ref(), &[DType::F32]);
    ckpt.weights.check_mapped(&expected, |n| Some(n.to_string()), "parameter or buffer")?;
    // And their checksums, before the output directory is touched.
    ckpt.weights.verify_now()?;
    let listing = ckpt.weights.listing();
    let target = dtype.dtype();
    let out_dtype = |d: DType| if d.is_float() { target } else { d };
    let infos: Vec<TensorInfo> = expected
        .iter()
        .map(|e| TensorInfo { name: e.name.clone(), dtype: out_dtype(listing[&e.name].2), shape: e.shape.clone() })
        .collect();
    prepare_export_dir(out, &ckpt.dir)?;
    let plan = plan_shards("model", &[infos], max_shard_bytes);
    let header: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let mut files = Vec::new();
    let mut bytes = 0;
    for file in &plan {
        let tensors = file
            .names
            .iter()
            .map(|name| {
                let t = ckpt.weights.load(name, listing[name].2)?;
                let converted = t
                    .to_dtype(out_dtype(t.dtype()))
                    .map_err(|e| CheckpointError::invalid(out, format!("{name}: {e}")))?;
                Ok((name.clone(), converted))
            })
            .collect::<Result<Vec<(String, Tensor)>, CheckpointError>>()?;
        let path = out.join(&file.file_name);
        bytes += write_safetensors(&path, &tensors, &header)?;
        files.push(path);
    }
    if plan.len() > 1 {
        let index = out.join("model.safetensors.index.json");
        write_index(&index, &plan)?;
        files.push(index);
    }
    let format = match &config {
        ModelConfig::Gpt(cfg) => {
            files.push(write_hf_config(out, gpt2_config_json(cfg), dtype)?);
            "gpt2"
        }
        ModelConfig::Llama(cfg) => {
            files.push(write_hf_config(out, cfg.hf_config_json(), dtype)?);
            "llama"
        }
        ModelConfig::Resnet(cfg) => {
            // torchvision has no config file; this one says which constructor to call.
            let path = out.join("config.json");
            let text = serde_json::to_string_pretty(&resnet_export_config(cfg, &ckpt.meta.model.name)).expect("json");
            std::fs::write(&path, text).map_err(|e| CheckpointError::Io { path: path.clone(), source: e })?;
            files.push(path);
            "torchvision-resnet"
        }
    };
    Ok(ExportSummary { dir: out.to_path_buf(), files, tensors: expected.len(), bytes, format })
}

/// Makes `out` ready for an export: never a checkpoint (exporting into one would overwrite the
/// weights it is reading), and without weight files of an earlier export (a stale
/// `model.safetensors` beside new shards would be loaded first by Hugging Face).
fn prepare_export_dir(out: &Path, checkpoint: &Path) -> Result<(), Error> {
    let same = match (out.canonicalize(), checkpoint.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same || out.join(META_FILE).exists() || out.join(brigade_engine::checkpoint::LATEST_FILE).exists() {
        return Err(CheckpointError::invalid(
            out,
            "is a checkpoint or save directory; export into a directory of its own",
        )
        .into());
    }
    brigade_engine::checkpoint::refuse_inside_checkpoint(out, "the export directory")?;
    std::fs::create_dir_all(out).map_err(|e| CheckpointError::Io { path: out.to_path_buf(), source: e })?;
    let entries = std::fs::read_dir(out).map_err(|e| CheckpointError::Io { path: out.to_path_buf(), source: e })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if weights {
            std::fs::remove_file(entry.path()).map_err(|e| CheckpointError::Io { path: entry.path(), source: e })?;
        }
    }
    Ok(())
}

fn resnet_export_config(cfg: &ResNetConfig, name: &str) -> serde_json::Value {
    serde_json::json!({
        "library": "torchvision",
        "model": name,
        "block": cfg.block,
        "layers": cfg.layers,
        "widths": cfg.widths,
        "num_classes": cfg.num_classes,
        "in_channels": cfg.in_channels,
        "usage": "m = torchvision.models.<model>(num_classes=...); m.load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=True)",
    })
}

/// Weights (and buffers) imported from outside brigade, to start training from.
#[derive(Debug)]
pub struct Imported {
    pub config: ModelConfig,
    pub params: HashMap<String, Tensor>,
    pub buffers: HashMap<String, Tensor>,
    /// What was read, for messages.
    pub source: String,
}

/// Writes a transformers `config.json` into `out`, with the `dtype` the weights were written
/// in; returns its path.
fn write_hf_config(out: &Path, mut hf: serde_json::Value, dtype: ExportDtype) -> Result<PathBuf, CheckpointError> {
    let path = out.join("config.json");
    hf["dtype"] = match dtype {
        ExportDtype::F32 => "float32",
        ExportDtype::Bf16 => "bfloat16",
        ExportDtype::F16 => "float16",
    }
    .into();
    let text = serde_json::to_string_pretty(&hf).expect("json");
    std::fs::write(&path, text).map_err(|e| CheckpointError::Io { path: path.clone(), source: e })?;
    Ok(path)
}

/// Reads pretrained weights for fine-tuning:
/// - a Hugging Face GPT-2 directory (`config.json` + `model.safetensors` or a sharded index;
///   names with or without `transformer.`, f32/f16/bf16);
/// - a brigade checkpoint directory (weights only; the optimizer starts fresh);
/// - a safetensors file of torchvision-named ResNet weights, for the ResNet `model` given.
pub fn import(path: &Path, model: Option<&ModelConfig>) -> Result<Imported, Error> {
    import_with(path, model, &[])
}

/// [`import`], leaving out every tensor whose name starts with one of `skip` (they are then
/// initialised fresh): e.g. `fc.` to fine-tune a ResNet on a different number of classes.
/// With a skip list, a brigade checkpoint loads into `model` (when given) instead of its own
/// config, so the skipped layers may change shape.
pub fn import_with(path: &Path, model: Option<&ModelConfig>, skip: &[String]) -> Result<Imported, Error> {
    let float = [DType::F32, DType::BF16, DType::F16];
    let skipped = |name: &str| skip.iter().any(|p| !p.is_empty() && name.starts_with(p.as_str()));
    let keep = |name: &str| (!skipped(name)).then(|| name.to_string());
    let wanted = |built: &dyn PipelineModel, dtypes: &[DType]| -> Vec<_> {
        expected_weights(built, dtypes).into_iter().filter(|e| !skipped(&e.name)).collect()
    };
    if path.is_dir() && (path.join(META_FILE).exists() || path.join(brigade_engine::checkpoint::LATEST_FILE).exists()) {
        let (ckpt, own, _) = open(path)?;
        let config = match model {
            Some(m) if !skip.is_empty() => m.clone(),
            _ => own,
        };
        let built = config.build()?;
        let tensors = ckpt.weights.load_mapped(&wanted(built.as_ref(), &[DType::F32]), keep, "parameter or buffer")?;
        let (params, buffers) = split_buffers(built.as_ref(), tensors);
        return Ok(Imported { config, params, buffers, source: ckpt.dir.display().to_string() });
    }
    if path.is_dir() {
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| CheckpointError::Io { path: config_path.clone(), source: e })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CheckpointError::invalid(&config_path, format!("not valid JSON: {e}")))?;
        if value["model_type"].as_str() == Some("llama") {
            return import_llama(path, &config_path, &value, &wanted, keep);
        }
        let cfg = gpt_config_from_hf(&value).map_err(|e| CheckpointError::invalid(&config_path, e.to_string()))?;
        let config = ModelConfig::Gpt(cfg);
        let built = config.build()?;
        let set = ShardSet::open(path, "model")?;
        let params = set.load_mapped(
            &wanted(built.as_ref(), &float),
            |name| match gpt2_name(name) {
                Gpt2Name::Param(c) => keep(&c),
                Gpt2Name::TiedHead | Gpt2Name::MaskBuffer => None,
            },
            "GPT-2 parameter",
        )?;
        // A separate LM head must be the tied embedding, or brigade's model is not this one.
        if let (true, Some(wte)) = (set.contains("lm_head.weight"), params.get("transformer.wte.weight")) {
            let head = set.load("lm_head.weight", DType::F32)?;
            let same = head.dims() == wte.dims()
                && (&head - wte)
                    .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                    .map_err(|e| Error::Config(e.to_string()))?
                    == 0.0;
            if !same {
                return Err(CheckpointError::invalid(
                    &set.source,
                    "lm_head.weight differs from transformer.wte.weight; brigade's GPT ties them",
                )
                .into());
            }
        }
        return Ok(Imported { config, params, buffers: HashMap::new(), source: path.display().to_string() });
    }
    let Some(config @ ModelConfig::Resnet(_)) = model else {
        return Err(Error::Config(format!(
            "{}: a weights file needs a ResNet model to load into (--model resnet18, ...); \
             GPT-2 weights are imported from a Hugging Face directory",
            path.display()
        )));
    };
    let built = config.build()?;
    let set = ShardSet::open_file(path)?;
    let tensors = set.load_mapped(&wanted(built.as_ref(), &float), keep, "torchvision ResNet tensor")?;
    let (params, buffers) = split_buffers(built.as_ref(), tensors);
    Ok(Imported { config: config.clone(), params, buffers, source: path.display().to_string() })
}

/// The tensors an import wants of a model, in the dtypes it accepts.
type WantedTensors<'a> = &'a dyn Fn(&dyn PipelineModel, &[DType]) -> Vec<brigade_engine::checkpoint::ExpectedTensor>;

/// A Hugging Face `LlamaForCausalLM` directory: brigade's names are HF's, so tensors load as
/// they are named; old versions' `rotary_emb.inv_freq` buffers (recomputed from the config)
/// and a tied model's stored `lm_head.weight` are left out.
fn import_llama(
    path: &Path,
    config_path: &Path,
    value: &serde_json::Value,
    wanted: WantedTensors<'_>,
    keep: impl Fn(&str) -> Option<String>,
) -> Result<Imported, Error> {
    let cfg = brigade_models::LlamaConfig::from_hf_config_json(value)
        .map_err(|e| CheckpointError::invalid(config_path, e.to_string()))?;
    let tied = cfg.tie_word_embeddings;
    let config = ModelConfig::Llama(cfg);
    let built = config.build()?;
    let set = ShardSet::open(path, "model")?;
    let params = set.load_mapped(
        &wanted(built.as_ref(), &[DType::F32, DType::BF16, DType::F16]),
        |name| {
            let derived = name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight");
            if derived {
                None
            } else {
                keep(name)
            }
        },
        "Llama parameter",
    )?;
    Ok(Imported { config, params, buffers: HashMap::new(), source: path.display().to_string() })
}

/// Separates a model's buffers (BatchNorm statistics) from its parameters.
fn split_buffers(
    model: &dyn PipelineModel,
    mut all: HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let buffers =
        model.layers().iter().flat_map(|l| l.buffer_specs()).filter_map(|b| all.remove_entry(&b.name)).collect();
    (all, buffers)
}
