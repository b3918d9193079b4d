//! `brigade tokenizer train`: a byte-level BPE tokenizer trained on your text; and
//! `brigade tokenize`: text files to nanoGPT-style `.bin` token files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use brigade::models::data::TokenFileInfo;
use brigade::tokenizer::{read_text, TextTokenizer};
use clap::{Args, Subcommand};

use super::output::OutputPath;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    command: TokenizerCommand,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-2's recipe) on text files.
    Train(TrainTokenizerArgs),
}

#[derive(Args)]
struct TrainTokenizerArgs {
    /// UTF-8 text files to learn the merges from.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Tokens in the vocabulary: 256 bytes, <|endoftext|> and the merges (at least 257).
    #[arg(long)]
    vocab_size: usize,
    /// Merge only pairs seen at least this often.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Output tokenizer.json.
    #[arg(long, default_value = "tokenizer.json")]
    out: PathBuf,
}

pub fn run(args: TokenizerArgs) -> Result<()> {
    match args.command {
        TokenizerCommand::Train(args) => train(args),
    }
}

fn train(args: TrainTokenizerArgs) -> Result<()> {
    OutputPath::new(&args.out, "--out").inputs(&args.files).check()?;
    if args.out.is_dir() {
        bail!("--out {} is a directory; give a file name such as tokenizer.json", args.out.display());
    }
    let bytes: u64 = args.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let started = std::time::Instant::now();
    let tokenizer = TextTokenizer::train_bpe(&args.files, args.vocab_size, args.min_frequency)?;
    let seconds = started.elapsed().as_secs_f64();
    let file = tokenizer.save(&args.out)?;
    println!(
        "trained a byte-level BPE tokenizer of {} tokens on {:.1} MB in {seconds:.1}s ({:.2} MB/s)",
        tokenizer.vocab_size(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / seconds.max(1e-9)
    );
    if tokenizer.vocab_size() < args.vocab_size {
        println!(
            "note: the text has fewer merges than asked (pairs seen at least {} times); the vocabulary is smaller",
            args.min_frequency
        );
    }
    println!("wrote {}", file.display());
    Ok(())
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// UTF-8 text files, concatenated in order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// A tokenizer.json (or a directory holding one, e.g. a Hugging Face model).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output token file: uint16 little-endian ids (nanoGPT's .bin), or uint32 when an id can
    /// be 65536 or more; the width is recorded in the sidecar OUT.json, which `train` reads.
    #[arg(long)]
    out: PathBuf,
    /// Put <|endoftext|> between files (when the tokenizer has it).
    #[arg(long)]
    separate: bool,
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let sidecar = TokenFileInfo::sidecar(&args.out);
    for out in [&args.out, &sidecar] {
        OutputPath::new(out, "--out").inputs(&args.files).input(&args.tokenizer).check()?;
    }
    if args.out.is_dir() {
        bail!("--out {} is a directory; give a file name such as train.bin", args.out.display());
    }
    let tokenizer = TextTokenizer::load(&args.tokenizer)?;
    let total: u64 = args.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut ids: Vec<u32> = Vec::new();
    let mut encode_seconds = 0.0;
    for (i, file) in args.files.iter().enumerate() {
        let text = read_text(file)?;
        let t = std::time::Instant::now();
        ids.extend(tokenizer.encode_large(&text, |done| bar.inc(done as u64))?);
        encode_seconds += t.elapsed().as_secs_f64();
        if args.separate && i + 1 < args.files.len() {
            if let Some(eot) = tokenizer.end_of_text() {
                ids.push(eot);
            }
        }
    }
    bar.finish_and_clear();
    if ids.is_empty() {
        bail!(
            "the tokenizer {} encodes {} to no tokens at all; nothing to write",
            tokenizer.source(),
            args.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    // The width comes from the largest id the tokenizer can give (or, belt and braces, gave),
    // and is recorded in the sidecar so that no reader has to guess it.
    let largest = ids.iter().copied().max().unwrap_or(0);
    let bound = (tokenizer.vocab_size() as u64).max(u64::from(largest) + 1);
    let info = TokenFileInfo::for_vocab(bound, ids.len() as u64);
    let wide = info.width() == 4;
    let out =
        std::fs::File::create(&args.out).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(out);
    for &id in &ids {
        if wide {
            out.write_all(&id.to_le_bytes())?;
        } else {
            out.write_all(&(id as u16).to_le_bytes())?;
        }
    }
    out.flush()?;
    let json = serde_json::to_string_pretty(&info)? + "\n";
    std::fs::write(&sidecar, json).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", sidecar.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{} tokens ({}) from {:.1} MB in {seconds:.2}s: {:.2} MB/s overall, {:.2} MB/s encoding; {:.2} bytes per token",
        ids.len(),
        if wide { "uint32" } else { "uint16" },
        total as f64 / 1e6,
        total as f64 / 1e6 / seconds.max(1e-9),
        total as f64 / 1e6 / encode_seconds.max(1e-9),
        total as f64 / ids.len().max(1) as f64
    );
    println!("wrote {} (width recorded in {})", args.out.display(), sidecar.display());
    Ok(())
}
