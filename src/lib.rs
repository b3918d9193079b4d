//! brigade: pipeline-parallel training of GPT and ResNet models in Rust.
//!
//! A model is an ordered list of layers; brigade cuts it into stages, runs each stage on its own
//! thread (its own device, parameters, gradients and optimizer state), streams micro-batches
//! forward and gradients backward over channels, and follows a schedule (GPipe, 1F1B, or any
//! validated list of actions). Every schedule and layout trains exactly like single-device
//! training.
//!
//! - [`engine`]: schedules, the executor, optimizers, partitions.
//! - [`models`]: GPT-2 and ResNet presets, datasets.
//! - [`kernels`]: differentiable fused ops.
//! - [`train`]: the training loop the CLI uses.
//! - [`generate`]: text generation (KV-cache decoding, samplers).
//! - [`metrics`], [`plot`]: the JSON-lines record of a run, and charts of runs.
//! - [`tokenizer`]: Hugging Face tokenizers: load `tokenizer.json`, train byte-level BPE.
//! - [`bench`]: runs layouts and schedules, measures them against the simulator, draws timelines.

pub use brigade_engine as engine;
pub use brigade_kernels as kernels;
pub use brigade_models as models;
/// candle-nn, whose modules and `VarBuilder` user-defined layers are built from.
pub use candle_nn;

pub mod bench;
pub mod checkpoint;
pub mod generate;
pub mod metrics;
pub mod plot;
pub mod tokenizer;
pub mod train;

/// Everything a training script usually needs.
pub mod prelude {
    pub use crate::engine::compute::Recompute;
    pub use crate::engine::custom::{Sequential, SequentialModel};
    pub use crate::engine::optim::{LrSchedule, OptimizerConfig};
    pub use crate::engine::partition::{Partition, PartitionStrategy};
    pub use crate::engine::pipeline::{EvalStats, Pipeline, PipelineConfig, StepStats, ThreadPools};
    pub use crate::engine::schedule::{Action, ActionKind, Schedule, ScheduleKind};
    pub use crate::engine::{CustomLoss, InputKind, LossKind, Mode, PipelineModel, StageDevice};
    pub use crate::models::data::{ImageDataset, Split, TokenDataset};
    pub use crate::train::{Dataset, Event, TrainOptions, Trainer};
    pub use candle_core::{DType, Device, Module, Tensor};
    pub use candle_nn::VarBuilder;
}

/// Errors from any part of brigade, each naming what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] brigade_engine::error::EngineError),
    #[error(transparent)]
    Data(#[from] brigade_models::data::DataError),
    #[error(transparent)]
    Model(#[from] brigade_models::ModelError),
    #[error(transparent)]
    Schedule(#[from] brigade_engine::schedule::ScheduleError),
    #[error(transparent)]
    Checkpoint(#[from] brigade_engine::checkpoint::CheckpointError),
    #[error("{0}")]
    Config(String),
    /// A training step produced a non-finite loss or gradient norm.
    #[error("{0}")]
    Diverged(String),
}

/// The README's code blocks, compiled and run as doc-tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
