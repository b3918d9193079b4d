//! `brigade export`: a checkpoint's weights as Hugging Face GPT-2 / Llama or torchvision ResNet
//! files, with the run's tokenizer for transformers' `AutoTokenizer` (language models).

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
    /// GPT and Llama: the tokenizer.json to write beside the weights (default: the one in or
    /// beside the checkpoint; bytes for a 256-token model without one), with a
    /// tokenizer_config.json, for transformers' AutoTokenizer.
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
    let language_model = match &config {
        ModelConfig::Gpt(g) => Some((g.vocab_size, g.n_positions)),
        ModelConfig::Llama(l) => Some((l.vocab_size, l.max_position_embeddings)),
        ModelConfig::Resnet(_) => None,
    };
    let tokenizer = match (language_model, tokenizer) {
        (Some((vocab, _)), Some(tok)) if tok.vocab_size() > vocab => bail!(
            "the tokenizer {} has {} tokens, more than the model's vocabulary of {vocab}",
            tok.source(),
            tok.vocab_size()
        ),
        // A run without a tokenizer on a 256-token vocabulary trained on bytes (text --data, or
        // the embedded corpus): its tokenizer is the bytes themselves, as for `generate`.
        (Some((vocab, _)), None) if vocab == BYTE_VOCAB => Some(TextTokenizer::bytes()),
        (Some(_), tok) => tok,
        (None, _) => None,
    };
    let started = std::time::Instant::now();
    // Everything goes into a staging directory beside --out, moved into place only when
    // complete: a failed export leaves no half-written model behind.
    let staging = staging_dir(&args.out)?;
    let result = (|| -> Result<_> {
        let summary = brigade::checkpoint::export(&args.checkpoint, &staging, dtype, args.max_shard_size)?;
        let mut files = summary.files.clone();
        if let (Some(tok), Some((_, context))) = (&tokenizer, language_model) {
            files.extend(tok.save_for_transformers(&staging, context)?);
            set_special_token_ids(&staging.join("config.json"), tok)?;
        }
        publish(&staging, &args.out)?;
        Ok((summary, files))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let (mut summary, files) = result?;
    summary.dir = args.out.clone();
    let files: Vec<PathBuf> = files.iter().map(|f| args.out.join(f.file_name().unwrap_or_default())).collect();
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
    let dir = summary.dir.display().to_string();
    let class = match summary.format {
        "gpt2" => Some("GPT2LMHeadModel"),
        "llama" => Some("LlamaForCausalLM"),
        _ => None,
    };
    match class {
        Some(class) => {
            println!("load with: transformers.{class}.from_pretrained({dir:?})");
            if tokenizer.is_some() {
                println!("           transformers.AutoTokenizer.from_pretrained({dir:?})");
            }
        }
        None => println!(
            "load with: model.load_state_dict(safetensors.torch.load_file(\"{dir}/model.safetensors\"), strict=True)"
        ),
    }
    Ok(())
}

/// The vocabulary of byte-level runs (ids are bytes).
const BYTE_VOCAB: usize = 256;

/// Points `config.json`'s `bos_token_id` / `eos_token_id` at the exported tokenizer's
/// `<|endoftext|>` (so transformers' `generate` stops there), or null when it has none: the
/// ids a config carries by default (Llama-2's 1 and 2, GPT-2's 50256) belong to other tokenizers.
fn set_special_token_ids(config_path: &Path, tokenizer: &TextTokenizer) -> Result<()> {
    let text =
        std::fs::read_to_string(config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", config_path.display()))?;
    let id = serde_json::json!(tokenizer.end_of_text());
    config["bos_token_id"] = id.clone();
    config["eos_token_id"] = id;
    std::fs::write(config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
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
