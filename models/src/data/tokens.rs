//! Token streams for GPT training: byte-level text files, nanoGPT `.bin` files, or the embedded
//! corpus, split into train/validation and cut into deterministic (input, target) windows.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::rng::DetRng;
use super::{corpus, read_file, DataError, Split};

/// GPT-2's BPE vocabulary size, the vocabulary nanoGPT `.bin` files are written in.
pub const GPT2_VOCAB: usize = 50257;
/// Bytes of text the embedded corpus holds (about 1.5 MB).
pub const EMBEDDED_TEXT_BYTES: usize = 1_500_000;
/// Fraction of the stream (taken from the end) held out for validation.
pub const VAL_FRACTION: f64 = 0.1;

/// A stream of token ids with a train/validation split (the last 10% is validation).
///
/// Ids are stored as `u16`: enough for bytes (256) and for GPT-2 BPE (50257), and half the
/// memory of `u32` for large `.bin` files.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    tokens: Vec<u16>,
    /// `tokens[..split_at]` is train, `tokens[split_at..]` validation.
    split_at: usize,
    vocab: usize,
    max_id: u16,
    source: String,
}

impl TokenDataset {
    /// Every byte of the file is one token (vocab 256): no tokenizer needed.
    pub fn from_text_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let n = bytes.len();
        let tokens = bytes.into_iter().map(u16::from).collect();
        Self::build(tokens, 256, format!("bytes of {} ({n} bytes)", path.display()))
    }

    /// A nanoGPT-style token file: little-endian `uint16` ids back to back. The vocabulary is
    /// GPT-2's 50257 unless an id in the file is larger, in which case it is `max id + 1`.
    pub fn from_bin_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        if bytes.len() % 2 != 0 {
            return Err(DataError::OddLength { path: path.to_path_buf(), len: bytes.len() });
        }
        let tokens: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let max = tokens.iter().copied().max().unwrap_or(0) as usize;
        let vocab = GPT2_VOCAB.max(max + 1);
        let n = tokens.len();
        Self::build(tokens, vocab, format!("uint16 tokens of {} ({n} tokens)", path.display()))
    }

    /// `.bin` → [`Self::from_bin_file`], anything else → [`Self::from_text_file`].
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let is_bin = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("bin"));
        if is_bin {
            Self::from_bin_file(path)
        } else {
            Self::from_text_file(path)
        }
    }

    /// The embedded English-like corpus (about [`EMBEDDED_TEXT_BYTES`] bytes, byte-level,
    /// vocab 256), generated from `seed` in well under a second. See the `corpus` module docs
    /// for a sample.
    pub fn embedded(seed: u64) -> Self {
        Self::embedded_with_len(seed, EMBEDDED_TEXT_BYTES)
    }

    /// Like [`Self::embedded`] with roughly `bytes` bytes (it ends at a paragraph end), for quick
    /// experiments and tests. At least one paragraph (a few dozen bytes) is always produced.
    pub fn embedded_with_len(seed: u64, bytes: usize) -> Self {
        let text = corpus::generate(seed, bytes.max(1));
        let n = text.len();
        let tokens: Vec<u16> = text.into_iter().map(u16::from).collect();
        let max_id = tokens.iter().copied().max().unwrap_or(0);
        let split_at = default_split(tokens.len());
        Self {
            tokens,
            split_at,
            vocab: 256,
            max_id,
            source: format!("embedded English-like corpus (seed {seed}, {n} bytes)"),
        }
    }

    /// Tokens from memory (e.g. already tokenised elsewhere). `description` is used in errors.
    pub fn from_tokens(description: impl Into<String>, tokens: Vec<u16>, vocab: usize) -> Result<Self, DataError> {
        let description = description.into();
        if tokens.is_empty() {
            return Err(DataError::NoData { data: description });
        }
        let ds = Self::build(tokens, vocab, description)?;
        ds.check_vocab(vocab)?;
        Ok(ds)
    }

    fn build(tokens: Vec<u16>, vocab: usize, source: String) -> Result<Self, DataError> {
        // Callers reading files have already rejected empty files with the file's name.
        if tokens.is_empty() {
            return Err(DataError::NoData { data: source });
        }
        let max_id = tokens.iter().copied().max().unwrap_or(0);
        let split_at = default_split(tokens.len());
        Ok(Self { tokens, split_at, vocab, max_id, source })
    }

    /// Vocabulary size the data implies (256 for bytes; ≥ 50257 for `.bin`).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Largest token id present.
    pub fn max_id(&self) -> u32 {
        u32::from(self.max_id)
    }

    /// Human-readable origin, e.g. `bytes of data/shakespeare.txt (1115394 bytes)`.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn train_len(&self) -> usize {
        self.split_at
    }

    pub fn val_len(&self) -> usize {
        self.tokens.len() - self.split_at
    }

    /// The raw ids of one split (train first, then validation, contiguous and disjoint).
    pub fn split_tokens(&self, split: Split) -> &[u16] {
        match split {
            Split::Train => &self.tokens[..self.split_at],
            Split::Validation => &self.tokens[self.split_at..],
        }
    }

    /// Errors if some id is `>= vocab` (a model with that vocabulary would index out of its
    /// embedding table).
    pub fn check_vocab(&self, vocab: usize) -> Result<(), DataError> {
        if usize::from(self.max_id) >= vocab {
            return Err(DataError::TokenBeyondVocab {
                data: self.source.clone(),
                max_id: u32::from(self.max_id),
                vocab,
            });
        }
        Ok(())
    }

    /// Errors unless both splits hold at least `context + 1` tokens (one window plus its
    /// shifted target).
    pub fn check_context(&self, context: usize) -> Result<(), DataError> {
        if context == 0 {
            return Err(DataError::InvalidArgument("context length must be at least 1".into()));
        }
        for split in [Split::Train, Split::Validation] {
            let len = self.split_tokens(split).len();
            if len < context + 1 {
                return Err(DataError::TooShort {
                    data: self.source.clone(),
                    split,
                    len,
                    total: self.tokens.len(),
                    context,
                    need: context + 1,
                });
            }
        }
        Ok(())
    }

    /// Moves the train/validation boundary, if needed and possible, so each split has at least
    /// `context + 1` tokens (small files whose 10% tail is shorter than one window), then runs
    /// [`Self::check_context`]. The validation split only ever grows, so it stays the file's
    /// tail and never overlaps training data.
    pub fn fit_context(&mut self, context: usize) -> Result<(), DataError> {
        let need = context.saturating_add(1);
        let n = self.tokens.len();
        if context > 0 && n >= 2 * need && self.val_len() < need {
            self.split_at = n - need;
        }
        self.check_context(context)
    }

    /// One training or evaluation batch: `batch_size` windows of `context + 1` tokens at
    /// random offsets of `split`, returned as inputs `(B, T)` and targets `(B, T)` (`u32`,
    /// targets = inputs shifted left by one). The offsets depend only on
    /// `(seed, split, index)`, so a run resumed at step `index` sees the same data.
    pub fn batch(
        &self,
        split: Split,
        index: u64,
        batch_size: usize,
        context: usize,
        seed: u64,
        device: &Device,
    ) -> Result<(Tensor, Tensor), DataError> {
        let tokens = self.checked_split(split, batch_size, context)?;
        let starts_available = (tokens.len() - context) as u64;
        let mut rng = DetRng::for_stream(seed, split.stream_id(), index);
        let starts: Vec<usize> = (0..batch_size).map(|_| rng.below(starts_available) as usize).collect();
        windows_to_tensors(tokens, &starts, context, device)
    }

    /// `count` evaluation batches of `batch_size` windows each, with the `count * batch_size`
    /// window starts spread evenly over the split (first window at its start, last at its
    /// end). No seed: every call, every run, sees the same windows, so validation losses are
    /// comparable across runs and checkpoints.
    pub fn eval_batches<'a>(
        &'a self,
        split: Split,
        count: usize,
        batch_size: usize,
        context: usize,
        device: &'a Device,
    ) -> Result<impl Iterator<Item = Result<(Tensor, Tensor), DataError>> + 'a, DataError> {
        let tokens = self.checked_split(split, batch_size, context)?;
        let last_start = (tokens.len() - context - 1) as u128;
        let windows = (count as u128 * batch_size as u128).max(2);
        Ok((0..count).map(move |b| {
            let starts: Vec<usize> = (0..batch_size)
                .map(|i| {
                    let k = (b * batch_size + i) as u128;
                    (k * last_start / (windows - 1)) as usize
                })
                .collect();
            windows_to_tensors(tokens, &starts, context, device)
        }))
    }

    fn checked_split(&self, split: Split, batch_size: usize, context: usize) -> Result<&[u16], DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidArgument("batch size must be at least 1".into()));
        }
        if context == 0 {
            return Err(DataError::InvalidArgument("context length must be at least 1".into()));
        }
        let tokens = self.split_tokens(split);
        if tokens.len() < context + 1 {
            return Err(DataError::TooShort {
                data: self.source.clone(),
                split,
                len: tokens.len(),
                total: self.tokens.len(),
                context,
                need: context + 1,
            });
        }
        Ok(tokens)
    }

    /// One-line summary for logs: source, split sizes and vocabulary.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} train + {} validation tokens, vocab {}",
            self.source,
            self.train_len(),
            self.val_len(),
            self.vocab
        )
    }
}

/// Last 10% (rounded up) is validation; with a single token everything is train (and
/// `check_context` reports the empty validation split).
fn default_split(n: usize) -> usize {
    let val = ((n as f64 * VAL_FRACTION).ceil() as usize).min(n.saturating_sub(1));
    n - val
}

fn windows_to_tensors(
    tokens: &[u16],
    starts: &[usize],
    context: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), DataError> {
    let b = starts.len();
    let mut inputs = Vec::with_capacity(b * context);
    let mut targets = Vec::with_capacity(b * context);
    for &s in starts {
        let w = &tokens[s..s + context + 1];
        inputs.extend(w[..context].iter().map(|&t| u32::from(t)));
        targets.extend(w[1..].iter().map(|&t| u32::from(t)));
    }
    let x = Tensor::from_vec(inputs, (b, context), device)?;
    let y = Tensor::from_vec(targets, (b, context), device)?;
    Ok((x, y))
}
