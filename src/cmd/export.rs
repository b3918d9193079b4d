//! `brigade export`: a checkpoint's weights as Hugging Face GPT-2 / torchvision ResNet files.

use std::path::PathBuf;

use anyhow::Result;
use brigade::checkpoint::ExportDtype;
use clap::Args;

use super::parse_size;

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory (or a --save-dir; its latest checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// f32, bf16 or f16 (integer buffers stay integers).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "2GB", value_parser = parse_size)]
    max_shard_size: u64,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dtype: ExportDtype = args.dtype.parse()?;
    let started = std::time::Instant::now();
    let summary = brigade::checkpoint::export(&args.checkpoint, &args.out, dtype, args.max_shard_size)?;
    println!(
        "exported {} tensors ({:.1} MB, {}) to {} in {:.2}s as {}",
        summary.tensors,
        summary.bytes as f64 / 1e6,
        args.dtype,
        summary.dir.display(),
        started.elapsed().as_secs_f64(),
        summary.format
    );
    for f in &summary.files {
        println!("  {}", f.display());
    }
    match summary.format {
        "gpt2" => println!("load with: transformers.GPT2LMHeadModel.from_pretrained({:?})", summary.dir.display().to_string()),
        _ => println!("load with: model.load_state_dict(safetensors.torch.load_file(\"{}/model.safetensors\"), strict=True)", summary.dir.display()),
    }
    Ok(())
}
