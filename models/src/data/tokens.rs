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

/// Token ids as stored: `u16` when every id fits (bytes, GPT-2 BPE: half the memory of `u32`
/// for large `.bin` files), `u32` for larger vocabularies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIds {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl From<Vec<u16>> for TokenIds {
    fn from(ids: Vec<u16>) -> Self {
        TokenIds::U16(ids)
    }
}

impl From<Vec<u32>> for TokenIds {
    /// Narrowed to `u16` when every id fits (no id is ever truncated).
    fn from(ids: Vec<u32>) -> Self {
        if ids.iter().all(|&id| id <= u32::from(u16::MAX)) {
            TokenIds::U16(ids.into_iter().map(|id| id as u16).collect())
        } else {
            TokenIds::U32(ids)
        }
    }
}

impl TokenIds {
    pub fn len(&self) -> usize {
        match self {
            TokenIds::U16(v) => v.len(),
            TokenIds::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids in `range`, widened to `u32`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TokenSlice<'_> {
        match self {
            TokenIds::U16(v) => TokenSlice::U16(&v[range]),
            TokenIds::U32(v) => TokenSlice::U32(&v[range]),
        }
    }

    fn max(&self) -> u32 {
        self.slice(0..self.len()).iter().max().unwrap_or(0)
    }
}

/// A borrowed run of token ids, whatever their stored width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSlice<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl<'a> TokenSlice<'a> {
    pub fn len(&self) -> usize {
        match self {
            TokenSlice::U16(v) => v.len(),
            TokenSlice::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids, as `u32`.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let (narrow, wide): (&'a [u16], &'a [u32]) = match *self {
            TokenSlice::U16(v) => (v, &[]),
            TokenSlice::U32(v) => (&[], v),
        };
        narrow.iter().map(|&t| u32::from(t)).chain(wide.iter().copied())
    }

    /// The id at `i`.
    pub fn get(&self, i: usize) -> Option<u32> {
        match self {
            TokenSlice::U16(v) => v.get(i).map(|&t| u32::from(t)),
            TokenSlice::U32(v) => v.get(i).copied(),
        }
    }

    /// The ids, copied out as `u32`.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    fn sub(&self, range: std::ops::Range<usize>) -> TokenSlice<'a> {
        match *self {
            TokenSlice::U16(v) => TokenSlice::U16(&v[range]),
            TokenSlice::U32(v) => TokenSlice::U32(&v[range]),
        }
    }
}

/// A stream of token ids with a train/validation split (the last 10% is validation).
#[derive(Debug, Clone)]
pub struct TokenDataset {
    tokens: TokenIds,
    /// `tokens[..split_at]` is train, `tokens[split_at..]` validation.
    split_at: usize,
    vocab: usize,
    max_id: u32,
    source: String,
}

impl TokenDataset {
    /// Every byte of the file is one token (vocab 256): no tokenizer needed.
    pub fn from_text_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let n = bytes.len();
        let tokens: Vec<u16> = bytes.into_iter().map(u16::from).collect();
        Self::build(tokens.into(), 256, format!("bytes of {} ({n} bytes)", path.display()))
    }

    /// A token file: little-endian ids back to back, `uint16` (nanoGPT's `.bin`) unless the
    /// sidecar `FILE.json` that `brigade tokenize` writes says `uint32` (see [`TokenFileInfo`]):
    /// the width is read, never guessed. The vocabulary is GPT-2's 50257 unless an id in the
    /// file is larger, in which case it is `max id + 1`.
    pub fn from_bin_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let info = TokenFileInfo::read_for(path)?;
        let bytes = read_file(path)?;
        let width = info.as_ref().map_or(2, TokenFileInfo::width);
        if bytes.len() % width != 0 {
            return Err(DataError::OddLength { path: path.to_path_buf(), len: bytes.len() });
        }
        let tokens = if width == 4 {
            let ids: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            TokenIds::U32(ids)
        } else {
            let ids: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            // uint32 ids read as uint16 alternate a low half and a tiny high half (0 below 65536):
            // refuse that pattern rather than train on garbage.
            if info.is_none() && ids.len() >= 32 && ids.iter().skip(1).step_by(2).all(|&high| high < 64) {
                return Err(DataError::InvalidArgument(format!(
                    "{}: every other uint16 id is below 64, as in a uint32 token file; without a sidecar {} \
                     the width is not known: write the file with `brigade tokenize`, which records it \
                     (or write the sidecar: {{\"dtype\":\"uint16\",\"tokens\":N,\"vocab_size\":V}})",
                    path.display(),
                    TokenFileInfo::sidecar(path).display()
                )));
            }
            TokenIds::U16(ids)
        };
        if let Some(info) = &info {
            if info.tokens != tokens.len() as u64 {
                return Err(DataError::InvalidArgument(format!(
                    "{}: holds {} {} ids but its sidecar {} records {}; the two files do not belong together",
                    path.display(),
                    tokens.len(),
                    info.dtype,
                    TokenFileInfo::sidecar(path).display(),
                    info.tokens
                )));
            }
        }
        let max = tokens.max() as usize;
        let vocab = GPT2_VOCAB.max(max + 1);
        let n = tokens.len();
        let dtype = if width == 4 { "uint32" } else { "uint16" };
        Self::build(tokens, vocab, format!("{dtype} tokens of {} ({n} tokens)", path.display()))
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
        let tokens = TokenIds::U16(text.into_iter().map(u16::from).collect());
        let max_id = tokens.max();
        let split_at = default_split(tokens.len());
        Self {
            tokens,
            split_at,
            vocab: 256,
            max_id,
            source: format!("embedded English-like corpus (seed {seed}, {n} bytes)"),
        }
    }

    /// Tokens from memory (e.g. already tokenised elsewhere), `u16` or `u32`. `description` is
    /// used in errors.
    pub fn from_tokens(
        description: impl Into<String>,
        tokens: impl Into<TokenIds>,
        vocab: usize,
    ) -> Result<Self, DataError> {
        let description = description.into();
        let tokens = tokens.into();
        if tokens.is_empty() {
            return Err(DataError::NoData { data: description });
        }
        let ds = Self::build(tokens, vocab, description)?;
        ds.check_vocab(vocab)?;
        Ok(ds)
    }

    fn build(tokens: TokenIds, vocab: usize, source: String) -> Result<Self, DataError> {
        // Callers reading files have already rejected empty files with the file's name.
        if tokens.is_empty() {
            return Err(DataError::NoData { data: source });
        }
        let max_id = tokens.max();
        let split_at = default_split(tokens.len());
        Ok(Self { tokens, split_at, vocab, max_id, source })
    }

    /// Vocabulary size the data implies (256 for bytes; ≥ 50257 for `.bin`).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Largest token id present.
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// A hash of the ids, train then validation (xxh3-128 of the ids as `u32` little-endian,
    /// whatever their stored width; and the split point): the same tokens from any path hash
    /// alike, other tokens of the same count do not.
    pub fn content_hash(&self) -> String {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(b"brigade-tokens-v1");
        hasher.update(&(self.split_at as u64).to_le_bytes());
        let mut buffer = Vec::with_capacity(4 << 16);
        let all = self.tokens.slice(0..self.tokens.len());
        let mut ids = all.iter().peekable();
        while ids.peek().is_some() {
            buffer.clear();
            buffer.extend(ids.by_ref().take(1 << 16).flat_map(u32::to_le_bytes));
            hasher.update(&buffer);
        }
        format!("xxh3-128:{:032x}", hasher.digest128())
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
    pub fn split_tokens(&self, split: Split) -> TokenSlice<'_> {
        match split {
            Split::Train => self.tokens.slice(0..self.split_at),
            Split::Validation => self.tokens.slice(self.split_at..self.tokens.len()),
        }
    }

    /// Errors if some id is `>= vocab` (a model with that vocabulary would index out of its
    /// embedding table).
    pub fn check_vocab(&self, vocab: usize) -> Result<(), DataError> {
        if self.max_id as usize >= vocab {
            return Err(DataError::TokenBeyondVocab { data: self.source.clone(), max_id: self.max_id, vocab });
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

    fn checked_split(&self, split: Split, batch_size: usize, context: usize) -> Result<TokenSlice<'_>, DataError> {
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
    tokens: TokenSlice<'_>,
    starts: &[usize],
    context: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), DataError> {
    let b = starts.len();
    let mut inputs = Vec::with_capacity(b * context);
    let mut targets = Vec::with_capacity(b * context);
    for &s in starts {
        inputs.extend(tokens.sub(s..s + context).iter());
        targets.extend(tokens.sub(s + 1..s + context + 1).iter());
    }
    let x = Tensor::from_vec(inputs, (b, context), device)?;
    let y = Tensor::from_vec(targets, (b, context), device)?;
    Ok((x, y))
}

/// The sidecar `FILE.json` beside a token file `FILE` (`train.bin` → `train.bin.json`): the id
/// width, so a reader never guesses it, and what the ids are.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenFileInfo {
    /// `uint16` or `uint32`, little-endian.
    pub dtype: String,
    /// Ids in the file.
    pub tokens: u64,
    /// The tokenizer's id bound (every id is below it).
    pub vocab_size: u64,
}

impl TokenFileInfo {
    /// The narrowest width holding every id below `vocab_size`.
    pub fn for_vocab(vocab_size: u64, tokens: u64) -> Self {
        let dtype = if vocab_size > 1 << 16 { "uint32" } else { "uint16" };
        Self { dtype: dtype.into(), tokens, vocab_size }
    }

    /// Bytes per id.
    pub fn width(&self) -> usize {
        if self.dtype == "uint32" {
            4
        } else {
            2
        }
    }

    /// Where the sidecar of `token_file` is.
    pub fn sidecar(token_file: &Path) -> std::path::PathBuf {
        let mut name = token_file.as_os_str().to_owned();
        name.push(".json");
        name.into()
    }

    /// The sidecar of `token_file`, if it has one.
    pub fn read_for(token_file: &Path) -> Result<Option<Self>, DataError> {
        let path = Self::sidecar(token_file);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::Io { path, source: e }),
        };
        let info: Self = serde_json::from_str(&text)
            .map_err(|e| DataError::InvalidArgument(format!("{}: not a token file sidecar ({e})", path.display())))?;
        if info.dtype != "uint16" && info.dtype != "uint32" {
            return Err(DataError::InvalidArgument(format!(
                "{}: dtype {:?} is not uint16 or uint32",
                path.display(),
                info.dtype
            )));
        }
        Ok(Some(info))
    }
}
