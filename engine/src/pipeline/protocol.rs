//! The message protocol between the driver and the stage threads: what the driver (and
//! neighbouring stages) send into a stage's inbox, what stages report back, why a stage stops,
//! and what a checkpoint save asks of a stage.
//!
//! A leaf: it imports nothing else of the pipeline but `handoff` (itself a leaf: how a tensor
//! crosses streams) and the `replicas` trait (a leaf too), so the driver, the stage runtime and the
//! test hooks all depend on it and never on each other's internals. Its types are plain
//! messages, so their fields are open to the pipeline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

#[cfg(feature = "testing")]
use crate::checkpoint::SaveFault;
use crate::checkpoint::{ShardFile, StageLoader, TensorInfo};
use crate::compute::Recompute;
use crate::device::StageDevice;
use crate::layer::{LayerSpec, LossKind};
use crate::optim::{OptimizerConfig, ParamState};
use crate::schedule::{Action, Schedule};

use super::handoff::HandOff;
use super::replicas::ReplicaReduce;

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
        tensor: HandOff,
    },
    /// Chunk `chunk`'s output gradient for `microbatch` (from the holder of chunk `chunk + 1`).
    Gradient {
        chunk: usize,
        microbatch: usize,
        tensor: HandOff,
    },
    /// The summed gradients of this stage's tied parameters and the global clipping factor.
    Reduced {
        tied_grads: Vec<(String, HandOff)>,
        clip_scale: f64,
    },
    /// Forward-only over a batch; the last stage returns the outputs (logits).
    Predict {
        schedule: Arc<Schedule>,
        inputs: Vec<Tensor>,
    },
    /// Incremental decoding of positions `offset..` (KV cache): the holder of chunk 0 gets the
    /// new token ids, the other chunks the activation of micro-batch 0; the holder of the last
    /// chunk returns the logits.
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
        reply: Sender<StageResult<Manifest>>,
    },
    /// Write these files (into a staging directory) from this stage's own tensors.
    Save {
        job: Arc<SaveJob>,
        reply: Sender<std::result::Result<u64, String>>,
    },
    /// Answered as soon as the stage is built and idle.
    Ping {
        reply: Sender<()>,
    },
    /// Tests only (`testing::inject_fault`): fail as `Fault` says.
    #[cfg(feature = "testing")]
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
        tied_grads: Vec<(String, HandOff)>,
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
    pub loss: f64,
    pub correct: usize,
    pub terms: usize,
    /// Model outputs by micro-batch (prediction only, last stage).
    pub outputs: Vec<(usize, Tensor)>,
    /// Training only: (action, start, end) in execution order, and the stash's high-water mark.
    pub timings: Vec<(Action, Instant, Instant)>,
    pub peak_stash_bytes: u64,
}

/// A model chunk as the driver hands it to a stage: (its index in model order, its layers).
pub(super) type ChunkLayers = (usize, Vec<Arc<dyn LayerSpec>>);

/// Everything a stage thread starts from (the driver builds one per stage).
pub(super) struct StageSetup {
    pub index: usize,
    /// The id the stage reports under: `replica × stages + index` (its index with one replica).
    pub slot: usize,
    /// Data parallelism: the stage's replica (0 with one), and the reduction of its gradients
    /// over the replicas (`None` with one).
    pub replica: usize,
    pub replicas: Option<Arc<dyn ReplicaReduce>>,
    /// The routing table: `placement[c]` is the device holding chunk `c`.
    pub placement: Arc<Vec<usize>>,
    /// This device's chunks, in model order.
    pub chunks: Vec<ChunkLayers>,
    pub seed: u64,
    pub initial: HashMap<String, Tensor>,
    pub initial_buffers: HashMap<String, Tensor>,
    pub initial_optimizer_state: HashMap<String, ParamState>,
    pub checkpoint: Option<Arc<StageLoader>>,
    pub recompute: Recompute,
    pub optimizer: OptimizerConfig,
    pub loss: LossKind,
    pub tied: Vec<String>,
    pub inbox: Receiver<Msg>,
    /// Every device's inbox, by device index (this one's included).
    pub peers: Vec<Sender<Msg>>,
    pub reports: Sender<Report>,
    pub threads: usize,
    /// One pool every stage computes in (the stages lend each other their idle cores); `None`:
    /// the stage builds its own pool of `threads` workers.
    pub shared_pool: Option<Arc<rayon::ThreadPool>>,
    pub device: StageDevice,
    pub compute_dtype: DType,
    /// Debug: synchronise the stage's device after every action (`PipelineConfig::sync_each_action`).
    pub sync_each_action: bool,
    /// The hook into exchanges with stages in other processes (waking the MPI thread, the
    /// stuck-rank watchdog); none in one process.
    pub peer_watch: Option<super::transport::PeerWatch>,
}

/// Why a stage stopped working on a step.
pub(super) enum StageStop {
    Aborted,
    Failed(Option<Action>, String),
}

impl From<candle_core::Error> for StageStop {
    fn from(e: candle_core::Error) -> Self {
        StageStop::Failed(None, e.to_string())
    }
}

pub(super) type StageResult<T> = std::result::Result<T, StageStop>;

/// What one stage holds that a checkpoint keeps (its answer to `Msg::Manifest`).
pub(super) struct Manifest {
    /// Parameters, then buffers.
    pub weights: Vec<TensorInfo>,
    pub optimizer: Vec<TensorInfo>,
}

/// The files every stage writes (`Msg::Save`), shared by all of them.
pub(super) struct SaveJob {
    /// The staging directory the files go into.
    pub dir: PathBuf,
    /// Every file of the checkpoint; each stage writes those marked with its index.
    pub files: Vec<ShardFile>,
    /// The safetensors metadata every file carries.
    pub header: HashMap<String, String>,
    #[cfg(feature = "testing")]
    pub fault: Option<SaveFault>,
}

/// Where to inject a failure, for testing that a failing stage stops the pipeline
/// (`testing::inject_fault`).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub stage: usize,
    /// `Some(action)`: just before that action; `None`: at the optimizer step.
    pub at: Option<Action>,
    pub kind: FaultKind,
}

#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The stage returns an error.
    Error,
    /// The stage thread panics.
    Panic,
    /// The loss becomes NaN (only meaningful for a forward on the last stage).
    NonFiniteLoss,
}
