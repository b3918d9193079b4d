//! Checkpoints: one on-disk format for every stage layout.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! step-00000100/
//!   brigade.json                        metadata: model config, partition, schedule, step, version
//!   model.safetensors.index.json        Hugging Face's index: {"metadata": {"total_size"}, "weight_map"}
//!   model-00001-of-00002.safetensors    weights + buffers under canonical names (stage 0's)
//!   model-00002-of-00002.safetensors    (stage 1's; a stage's tensors never share a file with another's)
//!   optimizer.safetensors.index.json    the same for optimizer state: <param>.exp_avg, .exp_avg_sq, .step
//!   optimizer-0000k-of-0000n.safetensors
//!   training_state.safetensors          global step, LR-schedule position, data position, RNG seed
//!   checksums.json                      every other file's size and xxh3 checksum (see `seal`)
//! ```
//!
//! Names are the model's canonical ones (the whole model's, tied weights once), so a checkpoint
//! written from `p` stages loads on any other layout: the loader reads the index, memory-maps the
//! shards, validates every tensor against what the model expects, and hands each stage its part.
//! Each stage writes its own shards from its own thread (see `Pipeline::save_checkpoint`); the
//! directory is assembled under a temporary name and renamed into place only when complete, so
//! a crash mid-save leaves the previous checkpoint as it was. Before that rename the directory
//! is sealed: refused if any tensor is not finite, else its checksums recorded, which every
//! later read verifies. A save directory is locked by the run saving into it (`savedir`).

mod atomic;
mod files;
mod resume;
mod savedir;
mod seal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use atomic::{
    list_checkpoints, prune_checkpoints, remove_dead_partials, resolve_checkpoint, resolve_checkpoint_noting,
    step_dir_name, update_latest, StagingDir, LATEST_FILE,
};
pub(crate) use files::write_file_durably;
pub use files::{
    dtype_name, plan_shards, read_index, write_index, write_safetensors, ExpectedTensor, ShardFile, ShardIndex,
    ShardSet, TensorInfo,
};

pub use resume::{expected_weights, ResumeState, StageLoader};
pub use savedir::{checkpoint_containing, refuse_inside_checkpoint, same_run, SaveDirLock, LOCK_FILE};
pub use seal::{
    first_non_finite, seal, verify_all, verify_bytes, verify_file, Checksums, FileSum, CHECKSUMS_FILE,
    CHECKSUM_ALGORITHM,
};

use crate::optim::{LrSchedule, OptimizerConfig};

/// Metadata file of a checkpoint directory.
pub const META_FILE: &str = "brigade.json";
/// Prefix of the weight shards (`model.safetensors.index.json`, `model-00001-of-00002.safetensors`).
pub const WEIGHTS_PREFIX: &str = "model";
/// Prefix of the optimizer-state shards.
pub const OPTIMIZER_PREFIX: &str = "optimizer";
/// Small file with the training position, beside the shards.
pub const TRAINING_STATE_FILE: &str = "training_state.safetensors";
/// Hugging Face's default shard size limit.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;
/// Version of the on-disk layout; bumped when a reader of an older version could misread it.
pub const FORMAT_VERSION: u32 = 1;

/// Everything that can go wrong saving or loading a checkpoint. Every message names the file
/// (and the tensor, where one is at fault).
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a readable safetensors file ({reason}); it may be truncated or corrupted", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: tensor {name} is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: unexpected tensor {name}: the model has no such {what}", path.display())]
    UnexpectedTensor { path: PathBuf, name: String, what: &'static str },
    #[error("{}: tensor {name} has shape {found:?}, but the model expects {expected:?}", path.display())]
    Shape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{}: tensor {name} has dtype {found}, but {expected} is expected", path.display())]
    Dtype { path: PathBuf, name: String, found: String, expected: String },
    #[error("{}: checkpoint is for {found}, but this run is for {expected}", path.display())]
    ModelMismatch { path: PathBuf, found: String, expected: String },
    #[error("{}: no checkpoint here (expected {META_FILE}, or a `{LATEST_FILE}` file naming one)", path.display())]
    NotACheckpoint { path: PathBuf },
    #[error("saving stage {stage}'s tensors failed: {message}")]
    StageWrite { stage: usize, message: String },
    #[error("{}: {reason}", path.display())]
    Checksum { path: PathBuf, reason: String },
    #[error("{}: tensor {name} holds NaN or infinity (element {index}); a checkpoint never does, so the file is damaged", path.display())]
    NonFinite { path: PathBuf, name: String, index: usize },
    #[error(
        "not saving {}: tensor {name} ({file}) holds NaN or infinity (element {index}), so training has diverged; \
         the checkpoints saved before are untouched (try a lower --lr, or --grad-clip)",
        dir.display()
    )]
    Diverged { dir: PathBuf, file: String, name: String, index: usize },
}

impl CheckpointError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.into(), source }
    }
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CheckpointError::Invalid { path: path.into(), reason: reason.into() }
    }
}

/// Which model a checkpoint holds: enough to rebuild it without any other input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Human-readable name (a preset such as `gpt-tiny`, or a description of a custom config).
    pub name: String,
    /// The model's own config, serialised by the model crate (family-tagged).
    pub config: serde_json::Value,
}

/// The training loop's position and settings that resuming needs to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingMeta {
    pub batch_size: usize,
    /// Sequence length used for token models (0 for images).
    pub context: usize,
    /// Seed of the data order: batch `i` is a pure function of `(data_seed, i)`.
    pub data_seed: u64,
    /// Index of the next training batch to draw.
    pub data_position: u64,
    /// Where the data came from (`embedded`, or a path), for humans and for a resume check.
    pub data: String,
    /// A hash of the data's content: a resume recognises the same data under another path,
    /// and refuses other data of the same name or size. Empty in older checkpoints.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_hash: String,
    /// Steps the run was asked for (the LR schedule's horizon).
    pub total_steps: u64,
}

/// The contents of `brigade.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Always `brigade-checkpoint`: recognises the file.
    pub format: String,
    pub format_version: u32,
    pub brigade_version: String,
    pub model: ModelMeta,
    /// Optimizer steps taken when the checkpoint was written.
    pub step: u64,
    /// Layers per stage of the run that wrote it (any layout can load it).
    pub partition: Vec<usize>,
    pub schedule: String,
    pub microbatches: usize,
    pub optimizer: OptimizerConfig,
    pub lr_schedule: LrSchedule,
    pub seed: u64,
    pub grad_clip: Option<f64>,
    pub training: TrainingMeta,
    pub num_params: usize,
    /// Tensors in the weight shards (parameters and buffers).
    pub num_tensors: usize,
}

impl CheckpointMeta {
    pub const FORMAT: &'static str = "brigade-checkpoint";

    /// Reads and checks `dir/brigade.json`.
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let meta: CheckpointMeta = serde_json::from_str(&text)
            .map_err(|e| CheckpointError::invalid(&path, format!("not valid checkpoint metadata: {e}")))?;
        if meta.format != Self::FORMAT {
            return Err(CheckpointError::invalid(
                &path,
                format!("format is {:?}, not {:?}", meta.format, Self::FORMAT),
            ));
        }
        if meta.format_version > FORMAT_VERSION {
            return Err(CheckpointError::invalid(
                &path,
                format!(
                    "format version {} is newer than this brigade understands ({FORMAT_VERSION}); upgrade brigade",
                    meta.format_version
                ),
            ));
        }
        Ok(meta)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("checkpoint metadata always serialises")
    }
}

/// What a save wrote.
#[derive(Debug, Clone)]
pub struct SavedCheckpoint {
    pub dir: PathBuf,
    /// Bytes of tensor data written (all files).
    pub bytes: u64,
    pub files: Vec<PathBuf>,
}

/// A fault injected into a save, to prove saves are atomic. Tests only: it exists with the
/// `testing` cargo feature, which only the tests (and the CLI binary they start) enable.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFault {
    /// The given stage fails with an I/O error after writing this many of its files.
    IoError { stage: usize, after_files: usize },
    /// The process aborts (as if killed) once it has written this many shard files, counted
    /// over all saves of the process.
    Abort { after_files: usize },
}

/// How to save.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Largest shard file in bytes (a single tensor larger than this gets a shard of its own).
    pub max_shard_bytes: u64,
    /// Tests only (the `testing` feature): make the save fail or kill the process mid-way.
    #[cfg(feature = "testing")]
    pub fault: Option<SaveFault>,
}

impl SaveOptions {
    /// Shards of at most `max_shard_bytes` (a larger single tensor gets one of its own).
    pub fn with_max_shard_bytes(max_shard_bytes: u64) -> Self {
        Self {
            max_shard_bytes,
            #[cfg(feature = "testing")]
            fault: None,
        }
    }
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self::with_max_shard_bytes(DEFAULT_MAX_SHARD_BYTES)
    }
}

/// `training_state.safetensors` must be readable and agree with the metadata on the step and
/// the data position (a checkpoint assembled from two saves would not).
fn check_training_state(dir: &Path, meta: &CheckpointMeta) -> Result<(), CheckpointError> {
    let path = dir.join(TRAINING_STATE_FILE);
    let set = ShardSet::open_file(&path)?;
    for (name, want) in [("global_step", meta.step), ("data_position", meta.training.data_position)] {
        let t = set.load(name, DType::I64)?;
        let found = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(|e| CheckpointError::invalid(&path, format!("{name}: {e}")))?;
        if found != [want as i64] {
            return Err(CheckpointError::invalid(
                &path,
                format!("{name} is {found:?}, but {META_FILE} says {want}: the files are from different saves"),
            ));
        }
    }
    Ok(())
}

/// An opened checkpoint directory: metadata read, indexes parsed, shards memory-mapped.
/// Opening validates structure (files exist and parse) and the small files' checksums;
/// [`ShardSet::load_validated`] validates contents against what the model expects, and each
/// shard is verified against its checksum the first time a tensor is read from it.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub weights: ShardSet,
    /// Absent before the first optimizer step.
    pub optimizer: Option<ShardSet>,
    /// The recorded checksums (absent in checkpoints saved before brigade recorded them).
    pub checksums: Option<Checksums>,
    /// Something the user should know about how `dir` was found (a `latest` naming a missing
    /// checkpoint, so the newest complete one is used).
    pub note: Option<String>,
}

impl Checkpoint {
    /// Opens `path`: a checkpoint directory, or a save directory whose `latest` file names one.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let (dir, note) = resolve_checkpoint_noting(path)?;
        let meta = CheckpointMeta::read(&dir)?;
        let checksums = Checksums::read(&dir)?;
        // Parsed first (so a damaged file gets the parser's precise message), verified next
        // (so a damaged value that still parses is caught before anything uses it).
        verify_file(&dir.join(META_FILE), checksums.as_ref())?;
        check_training_state(&dir, &meta)?;
        verify_file(&dir.join(TRAINING_STATE_FILE), checksums.as_ref())?;
        let mut weights = ShardSet::open(&dir, WEIGHTS_PREFIX)?;
        let mut optimizer = if dir.join(format!("{OPTIMIZER_PREFIX}.safetensors.index.json")).exists() {
            Some(ShardSet::open(&dir, OPTIMIZER_PREFIX)?)
        } else {
            None
        };
        if let Some(sums) = &checksums {
            weights.expect_checksums(sums)?;
            if let Some(set) = &mut optimizer {
                set.expect_checksums(sums)?;
            }
        }
        Ok(Self { dir, meta, weights, optimizer, checksums, note })
    }

    /// Verifies every file of the checkpoint against its recorded checksum now (reading all
    /// of it); returns the files and bytes checked, or `None` for a checkpoint without
    /// checksums.
    pub fn verify_all(&self) -> Result<Option<(usize, u64)>, CheckpointError> {
        self.checksums.as_ref().map(|sums| verify_all(&self.dir, sums)).transpose()
    }

    /// Tensor names → (file, shape, dtype) of the weight shards, sorted by name.
    pub fn weight_listing(&self) -> BTreeMap<String, (PathBuf, Vec<usize>, DType)> {
        self.weights.listing()
    }
}
