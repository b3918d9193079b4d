//! The message protocol between the driver and the stage threads: what the driver (and
//! neighbouring stages) send into a stage's inbox, and what stages report back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::Sender;

use super::save;
use super::stage::StageResult;
use super::testing::Fault;
use crate::schedule::{Action, Schedule};

/// Which per-stage tensors a snapshot gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SnapshotKind {
    Params,
    /// Last step's gradients: tied copies summed, before clipping.
    Grads,
    Buffers,
    OptimizerState,
}

/// What arrives in a stage's inbox. Step messages (`Train`, `Eval`, `Predict`) come from the
/// driver; `Activation` and `Gradient` from the neighbouring stages, tagged by micro-batch and
/// buffered until the stage's schedule needs them; `Reduced` is the driver's answer to the
/// end-of-step collective.
pub(super) enum Msg {
    /// One training step: stage 0 gets the inputs, the last stage the targets.
    Train {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
        global_terms: usize,
        lr: f64,
    },
    /// Forward-only evaluation (loss and accuracy on the last stage).
    Eval {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
    },
    /// Chunk `chunk`'s input for `microbatch` (sent by the device holding chunk `chunk - 1`).
    Activation {
        chunk: usize,
        microbatch: usize,
        tensor: Tensor,
    },
    /// Chunk `chunk`'s output gradient for `microbatch` (from the holder of chunk `chunk + 1`).
    Gradient {
        chunk: usize,
        microbatch: usize,
        tensor: Tensor,
    },
    /// The summed gradients of this stage's tied parameters and the global clipping factor.
    Reduced {
        tied_grads: Vec<(String, Tensor)>,
        clip_scale: f64,
    },
    /// Forward-only over a batch; the last stage returns the outputs (logits).
    Predict {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
    },
    /// Incremental decoding of positions `offset..` (KV cache): stage 0 gets the new token
    /// ids, later stages the activation of micro-batch 0; the last stage returns the logits.
    Decode {
        input: Option<Tensor>,
        offset: usize,
    },
    Snapshot {
        kind: SnapshotKind,
        reply: Sender<Vec<(String, Tensor)>>,
    },
    /// What this stage would save: (weights and buffers, optimizer state).
    Manifest {
        reply: Sender<StageResult<save::Manifest>>,
    },
    /// Write these files (into a staging directory) from this stage's own tensors.
    Save {
        job: Arc<save::SaveJob>,
        reply: Sender<std::result::Result<u64, String>>,
    },
    /// Answered as soon as the stage is built and idle.
    Ping {
        reply: Sender<()>,
    },
    /// Tests only ([`super::testing::inject_fault`]): fail as `Fault` says.
    InjectFault(Fault),
    /// Another stage failed: stop at once, mid-step if need be.
    Abort,
    /// The pipeline is dropped: end the thread.
    Shutdown,
}

/// What stages send the driver, on one channel shared by all stages.
pub(super) enum Report {
    /// End of backward: what the global collective needs from this stage.
    Partial {
        stage: usize,
        tied_grads: Vec<(String, Tensor)>,
        sq_norm: f64,
    },
    Done {
        stage: usize,
        outcome: Outcome,
        busy: Duration,
    },
    Failed {
        stage: usize,
        action: Option<Action>,
        message: String,
    },
    Aborted {
        stage: usize,
    },
}

/// What a stage measured or produced during one step message.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) loss: f64,
    pub(super) correct: usize,
    pub(super) terms: usize,
    /// Model outputs by micro-batch (prediction only, last stage).
    pub(super) outputs: Vec<(usize, Tensor)>,
    /// Training only: (action, start, end) in execution order, and the stash's high-water mark.
    pub(super) timings: Vec<(Action, Instant, Instant)>,
    pub(super) peak_stash_bytes: u64,
}
