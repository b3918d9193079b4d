//! `brigade export`: a checkpoint's weights as Hugging Face GPT-2 / torchvision ResNet files.

use std::path::PathBuf;

use anyhow::{bail, Result};
use brigade::checkpoint::ExportDtype;
use brigade::tokenizer::TextTokenizer;
use clap::Args;

use super::output::OutputPath;
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
    /// GPT: the tokenizer.json to write beside the weights (default: the one in or beside the
    /// checkpoint, if any), with a tokenizer_config.json, for transformers' AutoTokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    OutputPath::new(&args.out, "--out").input(&args.checkpoint).inputs(&args.tokenizer).check()?;
    let dtype: ExportDtype = args.dtype.parse()?;
    // Loaded first: a bad --tokenizer is refused before anything is written.
    let tokenizer_path = args.tokenizer.clone().or_else(|| TextTokenizer::find_near(&args.checkpoint));
    let tokenizer = tokenizer_path.as_deref().map(TextTokenizer::load).transpose()?;
    let started = std::time::Instant::now();
    let summary = brigade::checkpoint::export(&args.checkpoint, &args.out, dtype, args.max_shard_size)?;
    let mut files = summary.files.clone();
    let mut auto_tokenizer = false;
    if let (Some(tok), "gpt2") = (&tokenizer, summary.format) {
        let config: serde_json::Value = std::fs::read_to_string(summary.dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let vocab = config["vocab_size"].as_u64().unwrap_or(0) as usize;
        if tok.vocab_size() > vocab {
            bail!(
                "the tokenizer {} has {} tokens, more than the model's vocabulary of {vocab}",
                tok.source(),
                tok.vocab_size()
            );
        }
        let context = config["n_positions"].as_u64().unwrap_or(1024) as usize;
        files.extend(tok.save_for_transformers(&summary.dir, context)?);
        auto_tokenizer = true;
    }
    println!(
        "exported {} tensors ({:.1} MB, {}) to {} in {:.2}s as {}",
        summary.tensors,
        summary.bytes as f64 / 1e6,
        args.dtype,
        summary.dir.display(),
        started.elapsed().as_secs_f64(),
        summary.format
    );
    for f in &files {
        println!("  {}", f.display());
    }
    match summary.format {
        "gpt2" => {
            println!(
                "load with: transformers.GPT2LMHeadModel.from_pretrained({:?})",
                summary.dir.display().to_string()
            );
            if auto_tokenizer {
                println!(
                    "           transformers.AutoTokenizer.from_pretrained({:?})",
                    summary.dir.display().to_string()
                );
            }
        }
        _ => println!(
            "load with: model.load_state_dict(safetensors.torch.load_file(\"{}/model.safetensors\"), strict=True)",
            summary.dir.display()
        ),
    }
    Ok(())
}
