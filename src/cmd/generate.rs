//! `brigade generate`: text (or token ids) from a GPT checkpoint, pipelined over stages and
//! printed as it is produced.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::engine::InputKind;
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::inference::inference_pipeline;

#[derive(Args)]
pub struct GenerateArgs {
    /// A brigade GPT checkpoint or a Hugging Face GPT-2 directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Prompt text (byte-level models: vocabulary 256).
    #[arg(long, default_value = "", conflicts_with = "prompt_ids")]
    prompt: String,
    /// Prompt as comma-separated token ids (for other vocabularies).
    #[arg(long, allow_hyphen_values = true)]
    prompt_ids: Option<String>,
    /// Tokens to generate (printed as they come; at most 100000).
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// 0: greedy; otherwise sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    stages: Option<usize>,
}

/// Most tokens one `generate` produces: each token is a full forward pass over the context, so
/// more would run for hours; a larger request is refused rather than left to look hung.
const MAX_GENERATE_TOKENS: usize = 100_000;

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.tokens > MAX_GENERATE_TOKENS {
        bail!("--tokens {} is more than the {MAX_GENERATE_TOKENS} one run generates; ask for fewer", args.tokens);
    }
    let (mut pipeline, model) = inference_pipeline(&args.checkpoint, None, args.stages, None, 1)?;
    let InputKind::Tokens { vocab, context } = model.input() else {
        bail!("{} is not a language model; `generate` needs a GPT checkpoint", model.name());
    };
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("temperature must be a non-negative number, got {}", args.temperature);
    }
    let byte_level = vocab <= 256;
    let mut ids: Vec<u32> = match &args.prompt_ids {
        Some(list) => list
            .split(',')
            .map(|t| match t.trim().parse::<i64>() {
                Ok(id) if id < 0 => bail!("token id {id} in --prompt-ids is negative; ids count from 0"),
                Ok(id) => u32::try_from(id).with_context(|| format!("token id {id} in --prompt-ids is beyond the vocabulary of {vocab}")),
                Err(_) => bail!("invalid token id {t:?} in --prompt-ids: expected comma-separated integers such as 1,2,3"),
            })
            .collect::<Result<_>>()?,
        None if byte_level => args.prompt.bytes().map(u32::from).collect(),
        None if args.prompt.is_empty() => Vec::new(),
        None => bail!("{} has a {vocab}-token vocabulary, not bytes: give the prompt as --prompt-ids", model.name()),
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is beyond the vocabulary of {vocab}");
    }
    if ids.is_empty() {
        ids.push(if byte_level { b'\n' as u32 } else { 0 });
    }
    let prompt_len = ids.len();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let started = std::time::Instant::now();
    // Streamed: the prompt, then each token as soon as it exists, so a long generation shows
    // progress (and can be stopped) instead of printing everything at the end.
    let mut out = Utf8Stream::new(byte_level);
    out.push(&ids)?;
    for _ in 0..args.tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let x = Tensor::new(window, &Device::Cpu)?.unsqueeze(0)?;
        let logits = pipeline.predict(&x)?; // (1, T, V)
        let last: Vec<f32> = logits.get(0)?.get(window.len() - 1)?.to_vec1()?;
        let next = if args.temperature == 0.0 {
            last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
        } else {
            let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let weights: Vec<f64> = last.iter().map(|&l| ((l as f64 - max) / args.temperature).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut pick = rng.random::<f64>() * total;
            let mut chosen = weights.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if pick < *w {
                    chosen = i;
                    break;
                }
                pick -= w;
            }
            chosen
        };
        ids.push(next as u32);
        out.push(&[next as u32])?;
    }
    out.finish()?;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens in {elapsed:.2}s ({:.1} tok/s) on {} stages, prompt {prompt_len} tokens",
        args.tokens,
        args.tokens as f64 / elapsed.max(1e-9),
        pipeline.schedule().stages()
    );
    Ok(())
}

/// Prints generated tokens as they come: bytes as UTF-8 text (a character split over several
/// tokens is held back until complete; an invalid sequence prints as U+FFFD), other
/// vocabularies as comma-separated ids.
struct Utf8Stream {
    byte_level: bool,
    pending: Vec<u8>,
    first: bool,
}

impl Utf8Stream {
    fn new(byte_level: bool) -> Self {
        Self { byte_level, pending: Vec::new(), first: true }
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if !self.byte_level {
            for id in ids {
                let sep = if self.first { "" } else { "," };
                self.first = false;
                write!(stdout, "{sep}{id}")?;
            }
            return Ok(stdout.flush()?);
        }
        self.pending.extend(ids.iter().map(|&i| i as u8));
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    write!(stdout, "{text}")?;
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    write!(stdout, "{}", std::str::from_utf8(&self.pending[..valid]).expect("checked valid"))?;
                    match e.error_len() {
                        // Invalid bytes: replace them, as from_utf8_lossy would, and go on.
                        Some(bad) => {
                            write!(stdout, "\u{FFFD}")?;
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for its next bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok(stdout.flush()?)
    }

    fn finish(&mut self) -> Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if !self.pending.is_empty() {
            write!(stdout, "{}", String::from_utf8_lossy(&self.pending))?;
            self.pending.clear();
        }
        writeln!(stdout)?;
        Ok(stdout.flush()?)
    }
}
