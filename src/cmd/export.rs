//! `brigade export`: a checkpoint's weights as Hugging Face GPT-2 / torchvision ResNet files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use brigade::checkpoint::ExportDtype;
use brigade::models::ModelConfig;
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
    // The tokenizer against the model, before anything is written.
    let (_, config, _) = brigade::checkpoint::open(&args.checkpoint)?;
    let gpt_context = match (&config, &tokenizer) {
        (ModelConfig::Gpt(g), Some(tok)) => {
            if tok.vocab_size() > g.vocab_size {
                bail!(
                    "the tokenizer {} has {} tokens, more than the model's vocabulary of {}",
                    tok.source(),
                    tok.vocab_size(),
                    g.vocab_size
                );
            }
            Some(g.n_positions)
        }
        _ => None,
    };
    let started = std::time::Instant::now();
    // Everything goes into a staging directory beside --out, moved into place only when
    // complete: a failed export leaves no half-written model behind.
    let staging = staging_dir(&args.out)?;
    let result = (|| -> Result<_> {
        let summary = brigade::checkpoint::export(&args.checkpoint, &staging, dtype, args.max_shard_size)?;
        let mut files = summary.files.clone();
        if let (Some(tok), Some(context), "gpt2") = (&tokenizer, gpt_context, summary.format) {
            files.extend(tok.save_for_transformers(&staging, context)?);
        }
        publish(&staging, &args.out)?;
        Ok((summary, files))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let (mut summary, files) = result?;
    summary.dir = args.out.clone();
    let files: Vec<PathBuf> = files.iter().map(|f| args.out.join(f.file_name().unwrap_or_default())).collect();
    let auto_tokenizer = gpt_context.is_some() && summary.format == "gpt2";
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

/// A fresh directory beside `out` (same file system, so the files can be renamed into `out`).
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(out)?;
    let parent = absolute.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = absolute.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    Ok(staging)
}

/// Moves a complete export from `staging` to `out`: a rename of the directory when `out` does
/// not exist; otherwise `out`'s weight files of an earlier export are removed (a stale
/// `model.safetensors` beside new shards would be loaded first) and each new file renamed in.
fn publish(staging: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(staging, out).with_context(|| format!("cannot move the export to {}", out.display()));
    }
    for entry in std::fs::read_dir(out)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if weights {
            std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    for entry in std::fs::read_dir(staging)?.flatten() {
        let dest = out.join(entry.file_name());
        std::fs::rename(entry.path(), &dest).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    Ok(())
}
