//! `brigade generate`: text (or token ids) from a GPT checkpoint, pipelined over stages and
//! printed as it is produced.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::engine::InputKind;
use brigade::generate::{Decoding, Sampling};
use brigade::tokenizer::TextTokenizer;
use clap::Args;

use super::inference::inference_pipeline;

#[derive(Args)]
pub struct GenerateArgs {
    /// A brigade GPT or Llama checkpoint, or a Hugging Face GPT-2 or Llama directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Prompt text: encoded with the tokenizer (--tokenizer, or the tokenizer.json in or beside
    /// the checkpoint), or as bytes for byte-level models (vocabulary 256).
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
    /// Sample only among the K most likely tokens (with --temperature above 0).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Recompute the whole window for every token instead of using the KV cache (slow; for
    /// comparison).
    #[arg(long)]
    no_cache: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    stages: Option<usize>,
    /// A tokenizer.json to encode the prompt and decode the output with (default: the one in
    /// or beside the checkpoint, if any).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Most tokens one `generate` produces; a larger request is refused rather than left to look
/// hung.
const MAX_GENERATE_TOKENS: usize = 100_000;

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.tokens > MAX_GENERATE_TOKENS {
        bail!("--tokens {} is more than the {MAX_GENERATE_TOKENS} one run generates; ask for fewer", args.tokens);
    }
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p };
    sampling.validate()?;
    let (mut pipeline, model) = inference_pipeline(&args.checkpoint, None, args.stages, None, 1)?;
    let InputKind::Tokens { vocab, context } = model.input() else {
        bail!("{} is not a language model; `generate` needs a GPT checkpoint", model.name());
    };
    let tokenizer_path = args.tokenizer.clone().or_else(|| TextTokenizer::find_near(&args.checkpoint));
    let tokenizer = tokenizer_path.as_deref().map(TextTokenizer::load).transpose()?;
    if let Some(tok) = &tokenizer {
        if tok.vocab_size() > vocab {
            bail!(
                "the tokenizer {} has {} tokens, more than the model's vocabulary of {vocab}",
                tok.source(),
                tok.vocab_size()
            );
        }
    }
    let byte_level = vocab <= 256 && tokenizer.is_none();
    let mut ids: Vec<u32> = match &args.prompt_ids {
        Some(list) => list
            .split(',')
            .map(|t| match t.trim().parse::<i64>() {
                Ok(id) if id < 0 => bail!("token id {id} in --prompt-ids is negative; ids count from 0"),
                Ok(id) => u32::try_from(id).with_context(|| format!("token id {id} in --prompt-ids is beyond the vocabulary of {vocab}")),
                Err(_) => bail!("invalid token id {t:?} in --prompt-ids: expected comma-separated integers such as 1,2,3"),
            })
            .collect::<Result<_>>()?,
        None if tokenizer.is_some() => tokenizer.as_ref().expect("checked").encode(&args.prompt)?,
        None if byte_level => args.prompt.bytes().map(u32::from).collect(),
        None if args.prompt.is_empty() => Vec::new(),
        None => bail!(
            "{} has a {vocab}-token vocabulary, not bytes, and no tokenizer.json is in or beside {}: give --tokenizer, or the prompt as --prompt-ids",
            model.name(),
            args.checkpoint.display()
        ),
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is beyond the vocabulary of {vocab}");
    }
    if ids.is_empty() && !args.prompt.is_empty() {
        // Generating from an empty start instead would silently ignore the prompt.
        bail!("the tokenizer encodes the prompt {:?} to no tokens at all", args.prompt);
    }
    if ids.is_empty() {
        let start = match &tokenizer {
            Some(tok) => {
                tok.end_of_text().map_or_else(|| tok.encode("\n").map(|t| t.first().copied().unwrap_or(0)), Ok)?
            }
            None if byte_level => b'\n' as u32,
            None => 0,
        };
        ids.push(start);
    }
    let prompt_len = ids.len();
    let decoding = if args.no_cache { Decoding::FullWindow } else { Decoding::Cached };
    let started = std::time::Instant::now();
    // Streamed: the prompt, then each token as soon as it exists, so a long generation shows
    // progress (and can be stopped) instead of printing everything at the end.
    // The tokenizer's end-of-sequence token ends the generation (it is not printed).
    let eos = tokenizer.as_ref().and_then(TextTokenizer::eos);
    let mut out = Utf8Stream::new(byte_level, tokenizer);
    out.push(&ids)?;
    let request = brigade::generate::Generation { tokens: args.tokens, sampling, decoding, seed: args.seed, eos };
    let generated = brigade::generate::generate(&mut pipeline, context, &ids, request, |next| {
        if eos == Some(next) {
            return Ok(());
        }
        out.push(&[next]).map_err(|e| brigade::Error::Config(format!("writing the output: {e}")))
    })?;
    out.finish()?;
    let elapsed = started.elapsed().as_secs_f64();
    let stopped = if generated.len() < args.tokens { ", stopped at the tokenizer's eos token" } else { "" };
    eprintln!(
        "{} tokens in {elapsed:.2}s ({:.1} tok/s, {}) on {} stages, prompt {prompt_len} tokens{stopped}",
        generated.len(),
        generated.len() as f64 / elapsed.max(1e-9),
        if args.no_cache { "full window" } else { "KV cache" },
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
    tokenizer: Option<TokenizerStream>,
}

/// Incremental detokenisation: a token's text can depend on its neighbours (a character split
/// over byte-level tokens), so each step decodes the last few tokens and prints what they add
/// beyond what was printed, holding back an incomplete character (U+FFFD at the end).
struct TokenizerStream {
    tokenizer: TextTokenizer,
    ids: Vec<u32>,
    /// `ids[prefix..read]` was decoded and printed last time; `ids[prefix..]` is decoded now.
    prefix: usize,
    read: usize,
}

impl TokenizerStream {
    fn next_text(&mut self, new: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(new);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(text)
        } else {
            Ok(String::new())
        }
    }

    fn rest(&mut self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

impl Utf8Stream {
    fn new(byte_level: bool, tokenizer: Option<TextTokenizer>) -> Self {
        let tokenizer = tokenizer.map(|tokenizer| TokenizerStream { tokenizer, ids: Vec::new(), prefix: 0, read: 0 });
        Self { byte_level, pending: Vec::new(), first: true, tokenizer }
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if let Some(stream) = &mut self.tokenizer {
            write!(stdout, "{}", stream.next_text(ids)?)?;
            return Ok(stdout.flush()?);
        }
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
        if let Some(stream) = &mut self.tokenizer {
            write!(stdout, "{}", stream.rest()?)?;
        }
        if !self.pending.is_empty() {
            write!(stdout, "{}", String::from_utf8_lossy(&self.pending))?;
            self.pending.clear();
        }
        writeln!(stdout)?;
        Ok(stdout.flush()?)
    }
}
