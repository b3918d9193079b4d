//! The pipeline executor: one OS thread per stage, crossbeam channels between them, and one
//! driver (the caller's thread) that hands out work and runs the end-of-step collective.
//!
//! Data flow of a training step:
//! 1. The driver splits the global batch into `m` micro-batches and sends stage 0 the inputs
//!    and the last stage the targets, together with the (validated) schedule.
//! 2. Every stage runs its own action list in order. `F` runs the stage's layers and sends the
//!    activation downstream; `B`/`I` backpropagate (the last stage from its loss, the others
//!    from `sum(y * dy)` with `dy` received from downstream) and send the input gradient
//!    upstream; `W` accumulates the weight gradients that `I` set aside.
//! 3. Each stage reports its squared gradient norm and the gradients of weights it shares with
//!    other stages (GPT's tied embedding). The driver sums the tied copies, computes the global
//!    norm once, and answers with the summed tied gradients and the clipping factor.
//! 4. Each stage clips and steps its own optimizer. The step is over when all stages report.
//!
//! Messages between stages are tagged by micro-batch and buffered by the receiver, so a stage
//! waits only for what its next action needs; the schedule validator proves that no valid
//! schedule can deadlock under exactly these rules.
//!
//! Failure: an error, a panic or a non-finite loss in any stage is reported to the driver,
//! which broadcasts `Abort` to every stage inbox. Blocked stages wake on it, every thread
//! ends, and the step returns [`EngineError::StageFailed`](crate::EngineError::StageFailed) naming the stage and action. The
//! pipeline is then stopped for good (its stages' states are mid-step).
//!
//! Modules: `config` (what shapes a pipeline), `protocol` (the messages between the driver
//! and the stages), `driver` (the caller-side [`Pipeline`]), `stage` (a stage thread's
//! runtime around its [`crate::compute::StageCompute`]), `threads` (the thread budget),
//! `save` (checkpoints written by every stage at once) and `testing` (fault injection, for
//! tests only).

mod clock;
mod config;
mod driver;
mod protocol;
mod save;
mod stage;
#[doc(hidden)]
pub mod testing;
mod threads;

pub use config::{PipelineConfig, ScheduleChoice};
pub use driver::{ActionTiming, EvalStats, Pipeline, StepStats};

pub(crate) use threads::{apply_thread_budget, check_thread_budget};
pub use threads::{candle_elementwise_threads, ThreadPools, MAX_THREADS_PER_STAGE};

use candle_core::{DType, Tensor};

/// The squared L2 norm of `t`, summed in f64 (gradient clipping, here and in the reference).
pub(crate) fn squared_norm(t: &Tensor) -> candle_core::Result<f64> {
    squared_norm_sum(std::slice::from_ref(t))
}

/// The squared L2 norm of all of `tensors` together, each summed in f64 and the sums added in
/// order on the tensors' device, then read once (one host synchronisation on a GPU).
pub(crate) fn squared_norm_sum(tensors: &[Tensor]) -> candle_core::Result<f64> {
    let mut total: Option<Tensor> = None;
    for t in tensors {
        let sq = t.to_dtype(DType::F64)?.sqr()?.sum_all()?;
        total = Some(match total {
            Some(acc) => (acc + sq)?,
            None => sq,
        });
    }
    total.map_or(Ok(0.0), |t| t.to_scalar::<f64>())
}
