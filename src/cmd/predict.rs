//! `brigade predict`: run a checkpoint forward-only over pipeline stages: inputs in, logits out.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::engine::InputKind;
use candle_core::{DType, Device};
use clap::Args;

use super::inference::inference_pipeline;
use super::output::OutputPath;

#[derive(Args)]
pub struct PredictArgs {
    /// A brigade checkpoint, a Hugging Face GPT-2 directory, or torchvision ResNet weights
    /// (with --model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// ResNet preset whose torchvision weights --checkpoint is (resnet18, ...).
    #[arg(long)]
    model: Option<String>,
    /// safetensors file with one tensor (or one named input_ids / images): token ids
    /// (batch, time) for GPT, images (batch, channels, height, width) for ResNet.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits`.
    #[arg(long)]
    output: PathBuf,
    /// Stages to run on (default: the checkpoint's count).
    #[arg(long)]
    stages: Option<usize>,
    #[arg(long)]
    split: Option<String>,
    #[arg(long, default_value_t = 1)]
    microbatches: usize,
}

pub fn run(args: PredictArgs) -> Result<()> {
    // Before any work: where the output goes must be a place that can take it.
    brigade::engine::checkpoint::refuse_inside_checkpoint(&args.output, "--output")?;
    if args.output.is_dir() {
        bail!("--output {} is a directory; give a file name such as logits.safetensors", args.output.display());
    }
    if !args.input.exists() {
        bail!("input file {} does not exist", args.input.display());
    }
    if args.input.canonicalize().ok() == args.output.canonicalize().ok() {
        bail!("--output {} is the --input file; write the logits to another file", args.output.display());
    }
    OutputPath::new(&args.output, "--output").input(&args.input).input(&args.checkpoint).check()?;
    let (mut pipeline, model) = inference_pipeline(
        &args.checkpoint,
        args.model.as_deref(),
        args.stages,
        args.split.as_deref(),
        args.microbatches,
    )?;
    let tensors = candle_core::safetensors::load(&args.input, &Device::Cpu)
        .with_context(|| format!("cannot read {} as safetensors", args.input.display()))?;
    let input = ["input_ids", "tokens", "images", "input"]
        .iter()
        .find_map(|k| tensors.get(*k).cloned())
        .or_else(|| (tensors.len() == 1).then(|| tensors.values().next().cloned()).flatten())
        .with_context(|| {
            format!(
                "{} holds {} tensors ({}); expected one, or one named input_ids or images",
                args.input.display(),
                tensors.len(),
                tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
    let input = match model.input() {
        InputKind::Tokens { vocab, .. } => {
            if input.dtype().is_float() {
                // Converting would saturate a negative or fractional id silently.
                let values: Vec<f64> = input.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                if let Some(bad) = values.iter().find(|v| v.fract() != 0.0 || **v < 0.0) {
                    bail!("{}: token ids must be non-negative integers, found {bad}", args.input.display());
                }
                if let Some(bad) = values.iter().find(|v| **v >= vocab as f64) {
                    bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}", args.input.display());
                }
            } else {
                // Checked at full width: a cast would wrap a negative id around, or cut an id
                // of 2^32 or more to 32 bits.
                let values: Vec<i64> = input.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
                if let Some(bad) = values.iter().find(|v| **v < 0) {
                    bail!("{}: token ids must be non-negative, found {bad}", args.input.display());
                }
                if let Some(bad) = values.iter().find(|v| **v as u64 >= vocab as u64) {
                    bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}", args.input.display());
                }
            }
            input.to_dtype(DType::U32)?
        }
        kind @ (InputKind::Images { .. } | InputKind::Features { .. }) => {
            let values_tensor = input.to_dtype(DType::F32)?;
            let values: Vec<f32> = values_tensor.flatten_all()?.to_vec1()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                let what = if matches!(kind, InputKind::Images { .. }) { "images" } else { "features" };
                bail!("{}: value {i} is {}; {what} must be finite numbers", args.input.display(), values[i]);
            }
            values_tensor
        }
    };
    let started = std::time::Instant::now();
    let logits = pipeline.predict(&input)?;
    let path = &args.output;
    // Written like checkpoint files: flushed, and readable by others (0644).
    brigade::engine::checkpoint::write_safetensors(
        path,
        &[("logits".to_string(), logits.clone())],
        &Default::default(),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "{}: logits {:?} for input {:?} in {:.3}s on {} stages -> {}",
        model.name(),
        logits.dims(),
        input.dims(),
        started.elapsed().as_secs_f64(),
        pipeline.schedule().stages(),
        path.display()
    );
    Ok(())
}
