//! brigade-engine: everything that is not a model.
//!
//! - [`schedule`]: the schedule IR (actions like `1F3`), generators (GPipe, 1F1B), the validator
//!   that rejects deadlocking or out-of-order schedules, the printer and the text format.
//! - [`layer`]: the contract models implement (ordered layer lists, parameter stores).
//! - [`custom`]: bring your own model: autograd layers over candle-nn, and the [`custom::Sequential`]
//!   builder.
//! - [`input`]: the checks a batch passes before it reaches the stages (the model supplies them).
//! - [`partition`]: how a layer list is cut into stages.
//! - [`optim`]: AdamW and SGD with visible state, and the learning-rate schedule.
//! - [`pipeline`]: the threaded executor: one OS thread per stage, crossbeam channels between.
//! - [`reference`](mod@reference): plain single-device training, the yardstick every schedule must match.
//! - [`checkpoint`]: the layout-independent checkpoint format (safetensors shards, atomic writes,
//!   validated loads).
//! - [`device`]: where a stage runs (CPU, or a CUDA GPU on a stream of its own).
//! - [`loss`]: the loss the last stage computes, normalised by the global batch.

pub mod checkpoint;
pub mod compute;
pub mod custom;
pub mod device;
pub mod error;
pub mod gradcheck;
pub mod input;
pub mod layer;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod partition;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod reference;
pub mod schedule;
pub mod simulate;

pub use device::StageDevice;
pub use error::EngineError;
pub use input::BatchCheck;
pub use layer::{
    BufferSpec, CustomLoss, Gradients, Init, InputKind, Layer, LayerSpec, LossBackward, LossInput, LossKind, Mode,
    ParamSpec, ParamStore, Pass, PipelineModel, Saved,
};
