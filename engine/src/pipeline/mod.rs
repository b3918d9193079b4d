//! The pipeline executor: one OS thread per stage, crossbeam channels between them, and one
//! driver (the caller's thread) that hands out work and runs the end-of-step collective.
//!
//! Data flow of a training step:
//! 1. The driver splits the global batch into `m` micro-batches and sends the inputs to the
//!    device holding the first model chunk and the targets to the one holding the last (stage 0
//!    and the last stage, unless the schedule places chunks otherwise, e.g. V-shaped), together
//!    with the (validated) schedule.
//! 2. Every stage runs its own action list in order. `F` runs the stage's layers and sends the
//!    activation downstream; `B`/`I` backpropagate (the last stage from its loss, the others
//!    from the output gradient `dy` received from downstream, through each layer's own
//!    explicit input-gradient and weight-gradient code) and send the input gradient upstream;
//!    `W` accumulates the weight gradients that `I` set aside.
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
//! and the stages; a leaf the others build on), `driver` (the caller-side [`Pipeline`], with
//! `driver::save`, the plan and the final files of a checkpoint), `stage` (a stage thread's
//! runtime around its [`crate::compute::StageCompute`], with `stage::save`, the shards each
//! stage writes from its own thread), `clock` (action timings), `norm` (gradient norms),
//! `threads` (the thread budget), `replicas` (data parallelism: the sum of each stage's
//! gradients over the pipeline's replicas), `transport` (how stages' hand-offs and the end-of-step
//! collective travel: the seam between the stage runtime and crossbeam or MPI), `handoff` (how a
//! tensor crosses from one stream to another: the ownership rule every message carrying a
//! tensor follows) and, with the `testing` feature only, `testing` (fault
//! injection).

mod clock;
mod config;
mod driver;
mod handoff;
mod norm;
mod protocol;
mod replicas;
mod stage;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
mod threads;
mod transport;

pub use config::{PipelineConfig, ScheduleChoice};
pub use driver::{ActionTiming, EvalStats, Pipeline, StepStats};
#[cfg(feature = "nccl")]
pub use transport::nccl_one_rank_check;
pub use transport::World;
#[cfg(feature = "mpi")]
pub use transport::{Ranks, DEFAULT_RANK_TIMEOUT};

pub use threads::{available_cores, candle_elementwise_threads, max_threads, ThreadPools, MAX_THREADS_PER_CORE};
pub(crate) use threads::{check_thread_budget, start_elementwise_pool};

pub(crate) use norm::squared_norm;
