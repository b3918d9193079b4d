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

pub(super) enum Msg {
    Train {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
        global_terms: usize,
        lr: f64,
    },
    Eval {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
    },
    Activation { microbatch: usize, tensor: Tensor },
    Gradient { microbatch: usize, tensor: Tensor },
    Reduced { tied_grads: Vec<(String, Tensor)>, clip_scale: f64 },
    /// Forward-only over a batch; the last stage returns the outputs (logits).
    Predict { schedule: Arc<Schedule>, inputs: Vec<Tensor> },
    Snapshot { kind: SnapshotKind, reply: Sender<Vec<(String, Tensor)>> },
    /// What this stage would save: (weights and buffers, optimizer state).
    Manifest { reply: Sender<StageResult<save::Manifest>> },
    /// Write these files (into a staging directory) from this stage's own tensors.
    Save { job: Arc<save::SaveJob>, reply: Sender<std::result::Result<u64, String>> },
    /// Answered as soon as the stage is built and idle.
    Ping { reply: Sender<()> },
    /// Tests only ([`super::testing::inject_fault`]): fail as `Fault` says.
    InjectFault(Fault),
    Abort,
    Shutdown,
}

pub(super) enum Report {
    /// End of backward: what the global collective needs from this stage.
    Partial { stage: usize, tied_grads: Vec<(String, Tensor)>, sq_norm: f64 },
    Done { stage: usize, outcome: Outcome, busy: Duration },
    Failed { stage: usize, action: Option<Action>, message: String },
    Aborted { stage: usize },
}

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
