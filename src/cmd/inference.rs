//! The forward-only pipeline `predict` and `generate` run a checkpoint (or imported weights) on.

use anyhow::{bail, Result};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::PipelineModel;

/// A pipeline holding a checkpoint's weights, for inference. `checkpoint` may also be a
/// Hugging Face GPT-2 directory, or (with `model`) a torchvision-named ResNet safetensors file.
pub fn inference_pipeline(
    checkpoint: &std::path::Path,
    model: Option<&str>,
    stages: Option<usize>,
    split: Option<&str>,
    microbatches: usize,
) -> Result<(Pipeline, std::sync::Arc<dyn PipelineModel>)> {
    if !checkpoint.exists() {
        bail!("--checkpoint {} does not exist", checkpoint.display());
    }
    let hint = model.map(brigade::models::ModelConfig::preset).transpose()?;
    let imported = brigade::checkpoint::import(checkpoint, hint.as_ref())?;
    let opened = brigade::checkpoint::open(checkpoint).ok();
    if let Some(note) = opened.as_ref().and_then(|(c, _, _)| c.note.as_ref()) {
        eprintln!("note: {note}");
    }
    let saved_stages = opened.map(|(c, _, _)| c.meta.partition.len()).unwrap_or(1);
    if stages == Some(0) {
        bail!("--stages must be at least 1");
    }
    if microbatches == 0 {
        bail!("--microbatches must be at least 1");
    }
    let model = imported.config.build()?;
    let layers = model.layers().len();
    if let Some(asked) = stages.filter(|&s| s > layers) {
        bail!("--stages {asked}: {} has only {layers} layers, so at most {layers} stages", model.name());
    }
    let stages = stages.unwrap_or(saved_stages).clamp(1, layers);
    let partition = match split {
        Some(s) => s.parse::<PartitionStrategy>()?,
        None => PartitionStrategy::Uniform,
    };
    let mut config = PipelineConfig::default().stages(stages).partition(partition).microbatches(microbatches.max(1));
    config.initial_params = imported.params;
    config.initial_buffers = imported.buffers;
    let pipeline = Pipeline::new(model.as_ref(), config)?;
    Ok((pipeline, model))
}
