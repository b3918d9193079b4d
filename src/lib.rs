//! brigade: pipeline-parallel training of GPT and ResNet models in Rust, and of models you
//! define yourself.
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
//! - [`bench`](mod@bench): runs layouts and schedules, measures them against the simulator, draws timelines.
//!
//! # Defining a model
//!
//! A [`Sequential`](engine::custom::Sequential) lists named layers in order; each layer is a
//! closure that builds a module from a candle-nn [`VarBuilder`](candle_nn::VarBuilder) (so
//! `candle_nn::linear`, `embedding`, `conv2d` and `vb.get(shape, name)` work unchanged) and
//! returns anything that implements [`Module`](candle_core::Module), a closure included, or
//! [`ModuleT`](candle_nn::ModuleT) for modules that differ between training and evaluation. Add the
//! loss and the input the model takes, and the result is a
//! [`PipelineModel`](engine::PipelineModel) that [`Pipeline`](engine::pipeline::Pipeline) trains
//! under any schedule:
//!
//! ```
//! use brigade::candle_nn;
//! use brigade::prelude::*;
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = Sequential::new("regressor")
//!     .layer("hidden", |vb| {
//!         let fc = candle_nn::linear(4, 32, vb)?; // parameters hidden.weight, hidden.bias
//!         Ok(move |x: &Tensor| fc.forward(x)?.relu())
//!     })
//!     .layer("block", |vb| {
//!         // A skip connection inside one layer: any candle code is fine.
//!         let fc = candle_nn::linear(32, 32, vb.pp("fc"))?;
//!         Ok(move |x: &Tensor| x + fc.forward(x)?.tanh()?)
//!     })
//!     .layer("out", |vb| candle_nn::linear(32, 1, vb))
//!     .loss(LossKind::MeanSquaredError)
//!     .input(InputKind::Features { shape: vec![4] })
//!     .build()?;
//!
//! let config = PipelineConfig::default().stages(2).schedule(ScheduleKind::OneFOneB).microbatches(2);
//! let mut pipeline = Pipeline::new(&model, config)?;
//! let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
//! let y = Tensor::zeros((8, 1), DType::F32, &Device::Cpu)?;
//! let stats = pipeline.train_step(&x, &y)?;
//! assert!(stats.loss.is_finite());
//! assert!(pipeline.parameters()?.contains_key("block.fc.weight"));
//! # Ok(())
//! # }
//! ```
//!
//! ## Shapes
//!
//! Every tensor between layers has the batch first: a layer takes `(B, ...)` and returns
//! `(B, ...)`, and the pipeline splits the batch into micro-batches along that dimension (so a
//! layer must not mix examples, except through what it computes per micro-batch). Inputs are
//! `(B, T)` integer ids for [`InputKind::Tokens`](engine::InputKind), `(B, C, H, W)` f32 for
//! `Images`, `(B, ..shape)` f32 for `Features`. The loss takes the last layer's output and the
//! targets: cross-entropy takes `(..., K)` logits and `(...)` integer ids (token cross-entropy
//! for `(B, T, V)`, class cross-entropy for `(B, K)`); mean squared error takes targets of the
//! output's shape; a [`CustomLoss`](engine::CustomLoss) is a function of both that returns the
//! summed loss as a scalar. Every loss is divided by the number of target elements in the whole
//! global batch. Input checks beyond the shape go in
//! [`Sequential::check`](engine::custom::Sequential::check); they run before a batch reaches a
//! stage.
//!
//! ## What F, I and W mean
//!
//! A schedule is a list of actions per stage: `F` (forward one micro-batch), `I` (its input
//! gradient, sent to the previous stage), `W` (its weight gradients, added into the step's
//! sums), and `B` (`I` then `W`). Zero-bubble schedules run `W` late, to fill the pipeline's
//! idle time. For a layer built from a closure (an *autograd layer*) brigade derives all three
//! from candle's autograd: `F` records the graph (or, with recomputation, only the stage's
//! input), `I` backpropagates through it and keeps the weight gradients, `W` adds them. Such
//! layers therefore gain nothing from the `I`/`W` split (candle computes both at once, during
//! `I`), but they run under every schedule and train exactly like plain single-device candle
//! training (`tests/custom_model.rs`).
//!
//! ## Parameter names and tying
//!
//! A layer's parameters are named after it (`block.fc.weight`), so checkpoints and exports
//! work unchanged. Two layers asking for the same full name share one parameter, also across
//! stages (brigade sums the copies' gradients): reach a name outside the layer's prefix with
//! `vb.root()`. candle-nn's fused `layer_norm`, `rms_norm` and `softmax_last_dim` record no
//! backward; use [`engine::custom::layer_norm`] and `candle_nn::ops::softmax` (a layer whose
//! parameter or input gets no gradient is refused with an error naming it).
//!
//! ## Training and evaluation
//!
//! Layers run as [`ModuleT`](candle_nn::ModuleT) with `train = true` in every training forward
//! (and its recomputation) and `train = false` in `evaluate`, `predict` and decoding, so
//! `.layer("drop", |_| Ok(candle_nn::Dropout::new(0.1)))` drops only while training. A random
//! op draws afresh when recomputation reruns the forward, so the gradient is that of the
//! redrawn mask. candle-nn's `BatchNorm` is refused when the model is built: its running
//! statistics are buffers that autograd layers cannot keep yet (ResNet's explicit layers can).
//!
//! ## Memory
//!
//! The activation memory the pipeline reports (`StepStats::peak_stash_bytes`, and
//! [`engine::profile`]) counts, for an autograd layer, everything its recorded graph holds
//! until the backward: its input's copy, every intermediate and its output, each storage once.
//! Constants built inside the forward that depend on no parameter or input (a causal mask) are
//! not counted.
//!
//! ## The command line trains presets
//!
//! `brigade train` trains the built-in presets (`brigade presets`) on their data: text or
//! token files for GPT and Llama, image sets for ResNet. A model you define lives in your own
//! program, which the CLI cannot load, so it trains through this API on whatever tensors you
//! hand [`Pipeline::train_step`](engine::pipeline::Pipeline::train_step): f32 features and
//! targets for a regression (`examples/custom_mlp.rs` reads them from a safetensors file or
//! generates them), token ids, images. Given a safetensors file of features and targets,
//! `brigade train` refuses it with a pointer here instead of misreading it.
//!
//! ## When to write explicit layers
//!
//! The built-in models implement [`Layer`](engine::Layer) by hand: forward, input gradient and
//! weight gradient, with fused kernels, saving only what the backward needs. That is the fast
//! path: the `custom_transformer` example's hand-written transformer takes about 6 times the
//! CPU time per run and 3.4 times the activation memory of the built-in GPT of the same shape
//! (measured in the README's "Your own model"). Autograd layers
//! also copy their parameters into variables before each forward and keep the whole graph.
//! Start with autograd layers; write a [`LayerSpec`](engine::LayerSpec) and
//! [`Layer`](engine::Layer) for the layers that dominate the step, or need zero-bubble's
//! `I`/`W` split, and mix them in with [`Sequential::explicit`](engine::custom::Sequential::explicit).
//!
//! Examples in `examples/`: `custom_mlp` (regression, a loss chart), `custom_transformer`
//! (a transformer from candle-nn modules, 1F1B vs GPipe), `gpt_from_rust` (a preset, with
//! checkpoint save and resume). Run one with `cargo run --release --example custom_mlp --
//! --steps 100`.

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
