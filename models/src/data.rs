//! Training data for brigade's models: token streams for GPT (byte-level text, nanoGPT `.bin`,
//! or an embedded generated corpus) and labelled images for ResNet (safetensors, or embedded
//! procedurally drawn shapes).
//!
//! Every batch is a pure function of `(seed, split, index)`: no iterator state to checkpoint,
//! so a run resumed at step `k` draws exactly the batches the uninterrupted run would have.
//! The embedded datasets need no download and are generated in well under a second.

mod corpus;
mod image_files;
mod images;
mod rng;
mod shapes;
mod tokens;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

pub use image_files::{CIFAR10_CLASSES, CIFAR_RECORD};
pub use images::{Augment, ImageDataset, EMBEDDED_SHAPES_SIZE, EMBEDDED_SHAPES_TRAIN, EMBEDDED_SHAPES_VAL};
pub use shapes::{MIN_SHAPE_SIZE, SHAPE_CLASSES};
pub use tokens::{TokenDataset, TokenFileInfo, TokenIds, TokenSlice, EMBEDDED_TEXT_BYTES, GPT2_VOCAB, VAL_FRACTION};

/// Which part of a dataset to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    /// Distinct RNG stream per split, so train batch `i` and validation batch `i` are unrelated.
    fn stream_id(self) -> u64 {
        match self {
            Split::Train => 0x0074_7261_696E,      // "train"
            Split::Validation => 0x0076_616C_6964, // "valid"
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Validation => "validation",
        })
    }
}

/// Everything that can go wrong loading or sampling data. Messages name the file (or the
/// embedded set) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data file {} does not exist", path.display())]
    Missing { path: PathBuf },

    #[error("could not read data file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("data file {} is empty", path.display())]
    Empty { path: PathBuf },

    #[error("{data} holds no data")]
    NoData { data: String },

    #[error(
        "token file {} has {len} bytes, an odd number: a .bin token file holds little-endian \
         uint16 ids (2 bytes each); is it really a nanoGPT token file?",
        path.display()
    )]
    OddLength { path: PathBuf, len: usize },

    #[error(
        "{data}: token id {max_id} is beyond the model's vocabulary of {vocab} (ids must be \
         below {vocab}); use a model vocab of at least {}",
        *max_id as u64 + 1
    )]
    TokenBeyondVocab { data: String, max_id: u32, vocab: usize },

    #[error(
        "{data}: the {split} split has {len} tokens (of {total} in all) but context {context} \
         needs at least {need}; use a shorter context or more data"
    )]
    TooShort { data: String, split: Split, len: usize, total: usize, context: usize, need: usize },

    #[error("{}: {problem}", path.display())]
    Format { path: PathBuf, problem: String },

    #[error("{} has no tensor `{name}` (tensors present: {present})", path.display())]
    MissingTensor { path: PathBuf, name: String, present: String },

    #[error("tensor `{name}` in {} has shape {shape:?} but must be {expected}", path.display())]
    WrongRank { path: PathBuf, name: String, shape: Vec<usize>, expected: &'static str },

    #[error(
        "{}: `{images}` holds {n_images} images but `{labels}` holds {n_labels} labels",
        path.display()
    )]
    CountMismatch { path: PathBuf, images: String, n_images: usize, labels: String, n_labels: usize },

    #[error("tensor `{name}` in {} has dtype {dtype}; expected {allowed}", path.display())]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String, allowed: &'static str },

    #[error("{}: `{name}`[{index}] = {value} is not a valid class label (must be >= 0)", path.display())]
    BadLabel { path: PathBuf, name: String, index: usize, value: String },

    #[error("{data}: needs at least 2 images (one train, one validation), has {n}")]
    TooFewImages { data: String, n: usize },

    #[error(
        "{data}: label {max_label} is beyond the {classes} classes of {origin} (labels must be \
         below {classes})"
    )]
    LabelBeyondClasses { data: String, max_label: u32, classes: usize, origin: String },

    #[error("{data}: images have {data_channels} channels but the model expects {model_channels}")]
    ChannelMismatch { data: String, data_channels: usize, model_channels: usize },

    #[error("invalid data request: {0}")]
    InvalidArgument(String),

    #[error("building a data tensor failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Reads a whole data file, turning "not found" and "empty" into their own errors.
fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing { path: path.to_path_buf() },
        _ => DataError::Io { path: path.to_path_buf(), source: e },
    })?;
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(bytes)
}
