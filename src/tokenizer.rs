//! Text tokenizers: Hugging Face `tokenizer.json` files (GPT-2's, or any byte-level BPE), and
//! training a byte-level BPE tokenizer on the user's own text, so a GPT of any preset trains
//! on real text without a download.
//!
//! A trained tokenizer is GPT-2's recipe: GPT-2's pre-tokenisation regex over the bytes of the
//! text mapped to printable characters (so every byte sequence encodes, nothing is unknown),
//! the 256 byte symbols as the initial alphabet, BPE merges up to the vocabulary size, and
//! `<|endoftext|>` as the one special token. Saved beside exported weights, it loads with
//! `transformers.AutoTokenizer.from_pretrained(dir)`.
//!
//! A byte-level run (no tokenizer: ids are the text's bytes) exports [`TextTokenizer::bytes`]:
//! the same 256 byte symbols with no merges, so id `b` is byte `b` and transformers'
//! `AutoTokenizer` encodes text exactly as brigade's byte-level data and `generate` do.
//!
//! Large files are encoded in parallel in chunks cut only where GPT-2's pre-tokeniser would
//! cut anyway (after a newline between two non-spaces), so the ids are exactly those of
//! encoding the whole text at once.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::Error;

/// The one special token of GPT-2-style tokenizers (document separator).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The file name Hugging Face uses.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Smallest vocabulary a byte-level BPE tokenizer can have: 256 bytes and `<|endoftext|>`.
pub const MIN_BPE_VOCAB: usize = 257;
/// Largest `--vocab-size` brigade trains: 4M tokens, 40 times GPT-4's 100k. The trainer sizes its
/// tables by the vocabulary asked for, so a typo of a few digits would otherwise end in an
/// allocation failure rather than an error.
pub const MAX_BPE_VOCAB: usize = 1 << 22;

/// A loaded or trained tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
    /// One more than the largest id (ids need not be dense: added tokens may sit far above).
    id_bound: usize,
    /// The end-of-sequence token, where the tokenizer has one (see [`TextTokenizer::eos`]).
    eos: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("source", &self.source).field("vocab", &self.vocab_size()).finish()
    }
}

impl TextTokenizer {
    fn new(inner: Tokenizer, source: String) -> Self {
        let id_bound = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let eos = inner.token_to_id(END_OF_TEXT);
        Self { inner, source, id_bound, eos }
    }

    /// Loads a `tokenizer.json`, or the one inside a directory (a Hugging Face model directory).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file = if path.is_dir() { path.join(TOKENIZER_FILE) } else { path.to_path_buf() };
        if !file.exists() {
            return Err(Error::Config(if path.is_dir() {
                format!("{} has no {TOKENIZER_FILE}; give the tokenizer file with --tokenizer", path.display())
            } else {
                format!("tokenizer file {} does not exist", file.display())
            }));
        }
        let inner = Tokenizer::from_file(&file).map_err(|e| {
            Error::Config(format!("{} is not a valid Hugging Face tokenizer.json: {e}", file.display()))
        })?;
        let mut tok = Self::new(inner, file.display().to_string());
        if tok.vocab_size() == 0 {
            return Err(Error::Config(format!("tokenizer {} has an empty vocabulary", file.display())));
        }
        if let Some(eos) = configured_eos(&file)? {
            tok.eos = Some(tok.inner.token_to_id(&eos).ok_or_else(|| {
                Error::Config(format!(
                    "the eos_token {eos:?} of the tokenizer_config.json beside {} is not in its vocabulary",
                    file.display()
                ))
            })?);
        }
        Ok(tok)
    }

    /// The tokenizer that goes with a checkpoint or model directory, if there is one:
    /// `tokenizer.json` in it, or beside it (a `--save-dir` holds the tokenizer of its run's
    /// `step-N/` checkpoints).
    pub fn find_near(path: &Path) -> Option<PathBuf> {
        let dir = if path.is_dir() { path.to_path_buf() } else { path.parent()?.to_path_buf() };
        let found = [Some(dir.as_path()), dir.parent()]
            .into_iter()
            .flatten()
            .map(|d| d.join(TOKENIZER_FILE))
            .find(|f| f.is_file());
        found
    }

    /// Trains a byte-level BPE tokenizer of `vocab_size` tokens (special token included) on
    /// the text of `files`. Pairs seen fewer than `min_frequency` times are not merged, so a
    /// small corpus can end up with fewer tokens than asked.
    pub fn train_bpe(files: &[PathBuf], vocab_size: usize, min_frequency: u64) -> Result<Self, Error> {
        if files.is_empty() {
            return Err(Error::Config("no text files to train the tokenizer on".into()));
        }
        if vocab_size < MIN_BPE_VOCAB {
            return Err(Error::Config(format!(
                "--vocab-size {vocab_size} is too small: a byte-level BPE tokenizer needs at least {MIN_BPE_VOCAB} tokens \
                 (256 bytes and {END_OF_TEXT})"
            )));
        }
        if vocab_size > MAX_BPE_VOCAB {
            // About 100 bytes per token in the trainer's tables (merges, strings, pair counts).
            return Err(Error::Config(format!(
                "--vocab-size {vocab_size} is more than brigade trains ({MAX_BPE_VOCAB} tokens); its tables alone \
                 would need at least {:.1} GB",
                vocab_size as f64 * 100.0 / 1e9
            )));
        }
        for f in files {
            check_text_file(f)?;
        }
        // No text of n bytes yields more than n merges: the tables need not be larger.
        let text_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
        let vocab_size =
            vocab_size.min(MIN_BPE_VOCAB.saturating_add(usize::try_from(text_bytes).unwrap_or(usize::MAX)));
        let mut tokenizer = Tokenizer::new(BPE::default());
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
        let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build()
            .into();
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        tokenizer
            .train_from_files(&mut trainer, names.clone())
            .map_err(|e| Error::Config(format!("training the tokenizer on {}: {e}", names.join(", "))))?;
        Ok(Self::new(tokenizer, format!("byte-level BPE trained on {}", names.join(", "))))
    }

    /// The byte-level tokenizer of runs without one: id `b` is byte `b` (256 tokens, no merges,
    /// no special tokens), written in byte-level BPE form (GPT-2's printable stand-ins for the
    /// bytes) so that Hugging Face's fast tokenizer loads it and encodes bytes to the same ids.
    pub fn bytes() -> Self {
        let vocab: tokenizers::models::bpe::Vocab =
            byte_symbols().iter().enumerate().map(|(byte, symbol)| (symbol.to_string(), byte as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("256 distinct symbols, no merges");
        let mut tokenizer = Tokenizer::new(bpe);
        // No regex split: with no merges the pieces do not matter, and every byte is its own token.
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        Self::new(tokenizer, "bytes (id = byte)".into())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Tokens in the vocabulary, special tokens included: the smallest model vocabulary that
    /// can embed every id this tokenizer produces.
    pub fn vocab_size(&self) -> usize {
        self.id_bound.max(self.inner.get_vocab_size(true))
    }

    /// The id of `<|endoftext|>`, if the vocabulary has it.
    pub fn end_of_text(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    /// The end-of-sequence token, which ends a generation: the `eos_token` of the
    /// `tokenizer_config.json` beside a loaded `tokenizer.json` (as transformers reads it), else
    /// `<|endoftext|>` when the vocabulary has it.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Config(format!("tokenizing with {}: {e}", self.source)))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a large text, encoded in parallel chunks (identical to [`Self::encode`] on
    /// the whole text for GPT-2-style byte-level tokenizers). `progress` gets the bytes done.
    pub fn encode_large(&self, text: &str, progress: impl FnMut(usize)) -> Result<Vec<u32>, Error> {
        self.encode_in_chunks(text, 1 << 20, progress)
    }

    /// [`Self::encode_large`] with pieces of about `chunk_bytes` bytes.
    pub fn encode_in_chunks(
        &self,
        text: &str,
        chunk_bytes: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<u32>, Error> {
        let chunks = split_for_encoding(text, chunk_bytes);
        let mut ids = Vec::with_capacity(text.len() / 3);
        // Groups of chunks per parallel batch, so progress moves while a big file encodes.
        for group in chunks.chunks(32) {
            let encodings = self
                .inner
                .encode_batch_fast(group.to_vec(), false)
                .map_err(|e| Error::Config(format!("tokenizing with {}: {e}", self.source)))?;
            for e in encodings {
                ids.extend_from_slice(e.get_ids());
            }
            progress(group.iter().map(|c| c.len()).sum());
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.inner.decode(ids, false).map_err(|e| Error::Config(format!("decoding with {}: {e}", self.source)))
    }

    /// Writes `tokenizer.json` to `path` (a file, or a directory to write it into).
    pub fn save(&self, path: &Path) -> Result<PathBuf, Error> {
        let file = if path.is_dir() { path.join(TOKENIZER_FILE) } else { path.to_path_buf() };
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        self.inner.save(&file, false).map_err(|e| Error::Config(format!("cannot write {}: {e}", file.display())))?;
        Ok(file)
    }

    /// Writes what `transformers.AutoTokenizer.from_pretrained(dir)` needs: `tokenizer.json` and
    /// a `tokenizer_config.json` naming the fast tokenizer class, its special tokens and the
    /// model's context. Returns the files written.
    pub fn save_for_transformers(&self, dir: &Path, context: usize) -> Result<Vec<PathBuf>, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        let json = self.save(&dir.join(TOKENIZER_FILE))?;
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": context,
            "clean_up_tokenization_spaces": false,
        });
        if self.end_of_text().is_some() {
            for key in ["bos_token", "eos_token", "unk_token"] {
                config[key] = serde_json::json!(END_OF_TEXT);
            }
        }
        let config_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(&config_path, text + "\n")
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", config_path.display())))?;
        Ok(vec![json, config_path])
    }
}

/// The `eos_token` named by the `tokenizer_config.json` beside `tokenizer_file`, if that file
/// exists and names one (a string, or an added token's `{"content": ...}`).
fn configured_eos(tokenizer_file: &Path) -> Result<Option<String>, Error> {
    let Some(path) = tokenizer_file.parent().map(|dir| dir.join("tokenizer_config.json")) else {
        return Ok(None);
    };
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
    Ok(match &config["eos_token"] {
        serde_json::Value::String(token) => Some(token.clone()),
        serde_json::Value::Object(added) => added.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    })
}

/// GPT-2's printable stand-in for each byte (`bytes_to_unicode`): printable Latin-1 bytes stand
/// for themselves, the other 68 for the code points from 256 up, in byte order.
fn byte_symbols() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut symbols = ['\0'; 256];
    let mut next_extra = 256;
    for (b, symbol) in (0u32..).zip(symbols.iter_mut()) {
        let code = if printable(b) {
            b
        } else {
            next_extra += 1;
            next_extra - 1
        };
        *symbol = char::from_u32(code).expect("below the surrogates");
    }
    symbols
}

/// Reads a text file for tokenisation: it must exist, be non-empty UTF-8.
pub fn read_text(path: &Path) -> Result<String, Error> {
    check_text_file(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Config(format!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

fn check_text_file(path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Err(_) => Err(Error::Config(format!("text file {} does not exist", path.display()))),
        Ok(m) if m.is_dir() => Err(Error::Config(format!("{} is a directory, not a text file", path.display()))),
        Ok(m) if m.len() == 0 => Err(Error::Config(format!("text file {} is empty", path.display()))),
        Ok(_) => Ok(()),
    }
}

/// Cuts `text` into pieces of about `target` bytes, each cut right after a lone newline (no
/// whitespace before or after it): GPT-2's pre-tokeniser makes such a newline a piece of its
/// own whether or not the text goes on, so encoding the pieces gives the whole text's ids.
pub fn split_for_encoding(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let mut i = start + target;
        while i + 1 < bytes.len() {
            let lone = i > 0 && !bytes[i - 1].is_ascii_whitespace() && !bytes[i + 1].is_ascii_whitespace();
            if bytes[i] == b'\n' && lone && text.is_char_boundary(i + 1) {
                cut = Some(i + 1);
                break;
            }
            i += 1;
        }
        match cut {
            Some(c) => {
                pieces.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    pieces.push(&text[start..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_size_covers_sparse_ids() {
        // A word-level vocabulary whose ids are not dense (a pruned or hand-edited
        // tokenizer.json): three entries, the largest id 70000. A model must embed id 70000.
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0,"b":1,"[UNK]":70000},"unk_token":"[UNK]"}}"#;
        let inner: Tokenizer = json.parse().expect("test tokenizer");
        assert_eq!(inner.get_vocab_size(true), 3, "the count alone would miss the sparse id");
        assert_eq!(TextTokenizer::new(inner, "test".into()).vocab_size(), 70001);
    }

    /// The eos comes from the tokenizer_config.json beside the tokenizer.json (a plain string
    /// or an added token's content), else `<|endoftext|>`; a name outside the vocabulary is
    /// an error naming the file.
    #[test]
    fn eos_is_read_from_the_tokenizer_config_beside_the_tokenizer() {
        let dir = std::env::temp_dir().join(format!("brigade-eos-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = TextTokenizer::bytes().save(&dir.join(TOKENIZER_FILE)).unwrap();
        assert_eq!(TextTokenizer::load(&file).unwrap().eos(), None, "bytes have no special token");
        let config = dir.join("tokenizer_config.json");
        std::fs::write(&config, r#"{"eos_token": "e"}"#).unwrap();
        assert_eq!(TextTokenizer::load(&dir).unwrap().eos(), Some(u32::from(b'e')));
        // GPT-2's stand-in for the space byte, as an added token's content.
        std::fs::write(&config, r#"{"eos_token": {"content": "Ġ", "special": true}}"#).unwrap();
        assert_eq!(TextTokenizer::load(&file).unwrap().eos(), Some(u32::from(b' ')));
        std::fs::write(&config, r#"{"eos_token": "<|im_end|>"}"#).unwrap();
        let err = TextTokenizer::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("\"<|im_end|>\" of the tokenizer_config.json") && err.contains("not in its vocabulary"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let mut inner = TextTokenizer::bytes().inner;
        inner.add_special_tokens(vec![AddedToken::from(END_OF_TEXT, true)]).unwrap();
        assert_eq!(TextTokenizer::new(inner, "test".into()).eos(), Some(256), "<|endoftext|> without a config");
    }

    #[test]
    fn the_byte_tokenizer_maps_every_byte_to_its_own_id() {
        let tok = TextTokenizer::bytes();
        assert_eq!(tok.vocab_size(), 256);
        assert_eq!(tok.end_of_text(), None);
        let symbols = byte_symbols();
        assert_eq!(ByteLevel::alphabet(), symbols.iter().copied().collect(), "GPT-2's byte symbols");
        for text in ["hello, world\n  two  spaces\tand a tab", "é ü 日本 🦀 \u{0}\u{7f}", " leading space"] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>(), "{text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn pieces_cover_the_text_and_cut_only_after_a_newline() {
        let text = "one line\n\nanother line\n  indented\nlast";
        let pieces = split_for_encoding(text, 4);
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces, ["one line\n\nanother line\n  indented\n", "last"]);
        let text = "a b\nc d\n\ne f\ng";
        let pieces = split_for_encoding(text, 2);
        assert_eq!(pieces, ["a b\n", "c d\n\ne f\n", "g"]);
        assert_eq!(split_for_encoding("no newline at all", 3), ["no newline at all"]);
        assert_eq!(split_for_encoding("", 3), [""]);
    }
}
