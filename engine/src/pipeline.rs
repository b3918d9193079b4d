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
//! ends, and the step returns [`EngineError::StageFailed`] naming the stage and action. The
//! pipeline is then stopped for good (its stages' states are mid-step).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use crate::error::{EngineError, Result};
use crate::compute::{LossTarget, Recompute, StageCompute};
use crate::layer::{InputKind, LayerSpec, LossKind, ParamStore, PipelineModel};
use crate::loss::{correct_predictions, loss_terms, microbatch_loss};
use crate::optim::{LrSchedule, Optimizer, OptimizerConfig, ParamState};
use crate::partition::{Partition, PartitionStrategy};
use crate::schedule::{Action, ActionKind, Schedule, ScheduleKind};

mod save;

/// Which schedule a pipeline runs.
#[derive(Debug, Clone)]
pub enum ScheduleChoice {
    /// A built-in generator, instantiated for the pipeline's stages and micro-batches.
    Kind(ScheduleKind),
    /// A user-provided schedule (e.g. loaded from a file); it must match stages and
    /// micro-batches.
    Custom(Schedule),
}

impl From<ScheduleKind> for ScheduleChoice {
    fn from(kind: ScheduleKind) -> Self {
        Self::Kind(kind)
    }
}

impl From<Schedule> for ScheduleChoice {
    fn from(schedule: Schedule) -> Self {
        Self::Custom(schedule)
    }
}

/// Where to inject a failure, for testing that a failing stage stops the pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub stage: usize,
    /// `Some(action)`: just before that action; `None`: at the optimizer step.
    pub at: Option<Action>,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The stage returns an error.
    Error,
    /// The stage thread panics.
    Panic,
    /// The loss becomes NaN (only meaningful for a forward on the last stage).
    NonFiniteLoss,
}

/// Everything that shapes a pipeline, with a builder-style API.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub stages: usize,
    pub partition: PartitionStrategy,
    pub schedule: ScheduleChoice,
    pub microbatches: usize,
    pub optimizer: OptimizerConfig,
    pub lr: LrSchedule,
    /// Clip the global gradient norm (over all stages) to this value.
    pub grad_clip: Option<f64>,
    /// CPU threads each stage may use for its math; default: cores / stages (at least 1).
    pub threads_per_stage: Option<usize>,
    /// Seed of the deterministic parameter initialisation.
    pub seed: u64,
    /// Initial values by parameter name (resume, import); others come from the initialiser.
    pub initial_params: HashMap<String, Tensor>,
    /// Initial buffers (BatchNorm running statistics) by name, when resuming.
    pub initial_buffers: HashMap<String, Tensor>,
    /// Optimizer state by parameter name, when resuming.
    pub initial_optimizer_state: HashMap<String, ParamState>,
    /// A validated checkpoint each stage loads its own parameters, buffers and optimizer state
    /// from (instead of the three maps above).
    pub checkpoint: Option<Arc<crate::checkpoint::StageLoader>>,
    /// What stages keep between a micro-batch's forward and its backward.
    pub recompute: Recompute,
    pub fault: Option<Fault>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stages: 2,
            partition: PartitionStrategy::Uniform,
            schedule: ScheduleChoice::Kind(ScheduleKind::OneFOneB),
            microbatches: 4,
            optimizer: OptimizerConfig::adamw(),
            lr: LrSchedule::constant(1e-3),
            grad_clip: Some(1.0),
            threads_per_stage: None,
            seed: 0,
            initial_params: HashMap::new(),
            initial_buffers: HashMap::new(),
            initial_optimizer_state: HashMap::new(),
            checkpoint: None,
            recompute: Recompute::Off,
            fault: None,
        }
    }
}

impl PipelineConfig {
    pub fn stages(mut self, stages: usize) -> Self {
        self.stages = stages;
        self
    }
    pub fn partition(mut self, partition: PartitionStrategy) -> Self {
        self.partition = partition;
        self
    }
    pub fn schedule(mut self, schedule: impl Into<ScheduleChoice>) -> Self {
        self.schedule = schedule.into();
        self
    }
    pub fn microbatches(mut self, microbatches: usize) -> Self {
        self.microbatches = microbatches;
        self
    }
    pub fn optimizer(mut self, optimizer: OptimizerConfig) -> Self {
        self.optimizer = optimizer;
        self
    }
    pub fn lr(mut self, lr: LrSchedule) -> Self {
        self.lr = lr;
        self
    }
    pub fn grad_clip(mut self, max_norm: Option<f64>) -> Self {
        self.grad_clip = max_norm;
        self
    }
    pub fn threads_per_stage(mut self, threads: usize) -> Self {
        self.threads_per_stage = Some(threads);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn initial_params(mut self, params: HashMap<String, Tensor>) -> Self {
        self.initial_params = params;
        self
    }
    /// Resumes from a checkpoint that each stage reads its own part of, on its own thread.
    pub fn resume_from_checkpoint(mut self, loader: crate::checkpoint::StageLoader) -> Self {
        self.checkpoint = Some(Arc::new(loader));
        self
    }

    /// Activation recomputation for every stage.
    pub fn recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }
}

/// What one training step measured.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// 0-based index of the optimizer step just taken.
    pub step: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub elapsed: Duration,
    /// Time each stage spent computing (not waiting) during the step.
    pub stage_busy: Vec<Duration>,
    /// Each stage's actions in execution order, timed from the step's start (for timelines).
    pub stage_actions: Vec<Vec<ActionTiming>>,
    /// Each stage's largest total of activation bytes kept for backward steps during the
    /// step: measured at action boundaries from what the layers saved (each storage once),
    /// and while a recomputed forward's activations are alive.
    pub peak_stash_bytes: Vec<u64>,
}

/// When one action ran, relative to the start of its step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionTiming {
    pub action: Action,
    pub start: Duration,
    pub end: Duration,
}

/// What an evaluation pass measured.
#[derive(Debug, Clone, Copy)]
pub struct EvalStats {
    /// Mean loss over all evaluated terms.
    pub loss: f64,
    /// Terms (tokens or examples) whose arg-max prediction was right.
    pub correct: usize,
    pub terms: usize,
}

impl EvalStats {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.terms.max(1) as f64
    }
}

/// Which per-stage tensors a snapshot gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotKind {
    Params,
    /// Last step's gradients: tied copies summed, before clipping.
    Grads,
    Buffers,
    OptimizerState,
}

enum Msg {
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
    Abort,
    Shutdown,
}

enum Report {
    /// End of backward: what the global collective needs from this stage.
    Partial { stage: usize, tied_grads: Vec<(String, Tensor)>, sq_norm: f64 },
    Done { stage: usize, outcome: Outcome, busy: Duration },
    Failed { stage: usize, action: Option<Action>, message: String },
    Aborted { stage: usize },
}

#[derive(Default)]
struct Outcome {
    loss: f64,
    correct: usize,
    terms: usize,
    /// Model outputs by micro-batch (prediction only, last stage).
    outputs: Vec<(usize, Tensor)>,
    /// Training only: (action, start, end) in execution order, and the stash's high-water mark.
    timings: Vec<(Action, Instant, Instant)>,
    peak_stash_bytes: u64,
}

/// A running pipeline: stage threads that own their layers, parameters, gradients and
/// optimizer state.
pub struct Pipeline {
    model_name: String,
    input: InputKind,
    num_classes: usize,
    partition: Partition,
    schedule: Arc<Schedule>,
    microbatches: usize,
    lr: LrSchedule,
    grad_clip: Option<f64>,
    optimizer: OptimizerConfig,
    seed: u64,
    /// Every distinct parameter name of the model.
    param_names: Vec<String>,
    inboxes: Vec<Sender<Msg>>,
    reports: Receiver<Report>,
    handles: Vec<Option<JoinHandle<()>>>,
    /// Parameter name → stages that hold a copy (only names held by two or more stages).
    tied: BTreeMap<String, Vec<usize>>,
    step: u64,
    stopped: Option<String>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("model", &self.model_name)
            .field("partition", &self.partition.to_string())
            .field("schedule", &self.schedule.name())
            .field("microbatches", &self.microbatches)
            .field("step", &self.step)
            .finish()
    }
}

impl Pipeline {
    /// Partitions `model`, validates the schedule and starts one thread per stage.
    pub fn new(model: &dyn PipelineModel, config: PipelineConfig) -> Result<Self> {
        let layers = model.layers();
        if config.stages == 0 {
            return Err(crate::partition::PartitionError::ZeroStages.into());
        }
        if config.microbatches == 0 {
            return Err(EngineError::Config("micro-batches must be at least 1".into()));
        }
        let layer_params: Vec<usize> = layers.iter().map(|l| l.param_count()).collect();
        let partition = config.partition.resolve(&layer_params, config.stages)?;
        let schedule = match &config.schedule {
            ScheduleChoice::Kind(kind) => kind.build(config.stages, config.microbatches)?,
            ScheduleChoice::Custom(s) => {
                if s.stages() != config.stages || s.microbatches() != config.microbatches {
                    return Err(EngineError::Config(format!(
                        "schedule {} is for {} stages and {} micro-batches, but the pipeline has {} stages and {} micro-batches",
                        s.name(),
                        s.stages(),
                        s.microbatches(),
                        config.stages,
                        config.microbatches
                    )));
                }
                if !s.is_training() {
                    return Err(EngineError::Config(format!(
                        "schedule {} has no backward actions and cannot train",
                        s.name()
                    )));
                }
                s.clone()
            }
        };
        let stage_layers: Vec<Vec<Arc<dyn LayerSpec>>> =
            partition.ranges().into_iter().map(|r| layers[r].to_vec()).collect();

        // Which parameter names live on more than one stage (weight tying across stages).
        let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (s, specs) in stage_layers.iter().enumerate() {
            let names: HashSet<String> = specs.iter().flat_map(|l| l.params()).map(|p| p.name).collect();
            for name in names {
                holders.entry(name).or_default().push(s);
            }
        }
        let mut tied: BTreeMap<String, Vec<usize>> = holders.into_iter().filter(|(_, s)| s.len() > 1).collect();
        for stages in tied.values_mut() {
            stages.sort_unstable();
        }

        let threads = config.threads_per_stage.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            (cores / config.stages).max(1)
        });
        apply_thread_budget(threads);
        let (report_tx, reports) = unbounded();
        let channels: Vec<(Sender<Msg>, Receiver<Msg>)> = (0..config.stages).map(|_| unbounded()).collect();
        let inboxes: Vec<Sender<Msg>> = channels.iter().map(|(tx, _)| tx.clone()).collect();
        let mut handles = Vec::with_capacity(config.stages);
        for (index, ((_, inbox), specs)) in channels.into_iter().zip(stage_layers).enumerate() {
            let stage_tied: Vec<String> =
                tied.iter().filter(|(_, s)| s.contains(&index)).map(|(n, _)| n.clone()).collect();
            let setup = StageSetup {
                index,
                stages: config.stages,
                specs,
                seed: config.seed,
                initial: config.initial_params.clone(),
                initial_buffers: config.initial_buffers.clone(),
                initial_optimizer_state: config.initial_optimizer_state.clone(),
                checkpoint: config.checkpoint.clone(),
                recompute: config.recompute,
                optimizer: config.optimizer,
                loss: model.loss(),
                tied: stage_tied,
                inbox,
                prev: (index > 0).then(|| inboxes[index - 1].clone()),
                next: (index + 1 < config.stages).then(|| inboxes[index + 1].clone()),
                reports: report_tx.clone(),
                threads,
                fault: config.fault.filter(|f| f.stage == index),
            };
            let handle = std::thread::Builder::new()
                .name(format!("brigade-stage-{index}"))
                .spawn(move || run_stage(setup))
                .map_err(|e| EngineError::Config(format!("cannot start stage thread {index}: {e}")))?;
            handles.push(Some(handle));
        }
        let mut pipeline = Self {
            model_name: model.name(),
            input: model.input(),
            num_classes: model.num_classes(),
            partition,
            schedule: Arc::new(schedule),
            microbatches: config.microbatches,
            lr: config.lr,
            grad_clip: config.grad_clip,
            optimizer: config.optimizer,
            seed: config.seed,
            param_names: crate::layer::unique_params(&layers).into_iter().map(|p| p.name).collect(),
            inboxes,
            reports,
            handles,
            tied,
            step: 0,
            stopped: None,
        };
        // Building layers can fail (e.g. a wrong shape in `initial_params`); surface it now.
        for s in 0..pipeline.inboxes.len() {
            let (tx, rx) = unbounded();
            pipeline.send(s, Msg::Ping { reply: tx })?;
            if rx.recv().is_err() {
                return Err(pipeline.stage_gone(s));
            }
        }
        Ok(pipeline)
    }

    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn microbatches(&self) -> usize {
        self.microbatches
    }

    /// Number of optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Continues the learning-rate schedule from `step` (after resuming).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Parameter names held by more than one stage, with the stages holding them.
    pub fn tied_parameters(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.tied
    }

    /// One optimizer step on a global batch: `inputs` `(B, ...)` and `targets` `(B, ...)`.
    pub fn train_step(&mut self, inputs: &Tensor, targets: &Tensor) -> Result<StepStats> {
        self.ensure_running()?;
        let started = Instant::now();
        self.check_input(inputs, targets)?;
        let m = self.microbatches;
        let input_chunks = split_batch(inputs, m)?;
        let target_chunks = split_batch(targets, m)?;
        let global_terms = loss_terms(targets);
        let lr = self.lr.lr(self.step);
        let stages = self.inboxes.len();
        // Later stages first, so no stage can receive data before it knows the step began.
        for s in (0..stages).rev() {
            let msg = Msg::Train {
                schedule: self.schedule.clone(),
                inputs: if s == 0 { input_chunks.clone() } else { Vec::new() },
                targets: if s + 1 == stages { target_chunks.clone() } else { Vec::new() },
                global_terms,
                lr,
            };
            self.send(s, msg)?;
        }

        // The collective: sum tied gradients, compute the global norm once.
        let mut sq_norm = 0.0;
        let mut tied_sums: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut partial_from = vec![false; stages];
        self.gather(&mut partial_from, |report| match report {
            Report::Partial { stage, tied_grads, sq_norm: s } => {
                sq_norm += s;
                for (name, grad) in tied_grads {
                    let grad = grad.to_device(&Device::Cpu)?;
                    let sum = match tied_sums.remove(&name) {
                        Some(acc) => (acc + grad)?,
                        None => grad,
                    };
                    tied_sums.insert(name, sum);
                }
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        for grad in tied_sums.values() {
            sq_norm += squared_norm(grad)?;
        }
        let grad_norm = sq_norm.sqrt();
        let clip_scale = match self.grad_clip {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        for s in 0..stages {
            let tied_grads = self
                .tied
                .iter()
                .filter(|(_, holders)| holders.contains(&s))
                .map(|(name, _)| {
                    let sum = tied_sums.get(name).cloned().ok_or_else(|| {
                        EngineError::Config(format!("no gradient arrived for tied parameter {name}"))
                    })?;
                    Ok((name.clone(), sum))
                })
                .collect::<Result<Vec<_>>>()?;
            self.send(s, Msg::Reduced { tied_grads, clip_scale })?;
        }

        let mut done = vec![false; stages];
        let mut loss = 0.0;
        let mut stage_busy = vec![Duration::ZERO; stages];
        let mut stage_actions = vec![Vec::new(); stages];
        let mut peak_stash_bytes = vec![0; stages];
        self.gather(&mut done, |report| match report {
            Report::Done { stage, outcome, busy } => {
                loss += outcome.loss;
                stage_busy[stage] = busy;
                let since = |t: Instant| t.saturating_duration_since(started);
                stage_actions[stage] = outcome
                    .timings
                    .iter()
                    .map(|&(action, start, end)| ActionTiming { action, start: since(start), end: since(end) })
                    .collect();
                peak_stash_bytes[stage] = outcome.peak_stash_bytes;
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        let elapsed = started.elapsed();
        let stats =
            StepStats { step: self.step, loss, grad_norm, lr, elapsed, stage_busy, stage_actions, peak_stash_bytes };
        self.step += 1;
        Ok(stats)
    }

    /// Forward-only pass over a batch (evaluation mode: BatchNorm uses running statistics),
    /// pipelined over the same stages. Returns the summed statistics of the batch.
    pub fn evaluate(&mut self, inputs: &Tensor, targets: &Tensor) -> Result<EvalStats> {
        self.ensure_running()?;
        self.check_input(inputs, targets)?;
        let batch = inputs.dim(0)?;
        let m = if batch % self.microbatches == 0 { self.microbatches } else { 1 };
        let schedule = Arc::new(Schedule::forward_only(self.inboxes.len(), m)?);
        let input_chunks = split_batch(inputs, m)?;
        let target_chunks = split_batch(targets, m)?;
        let stages = self.inboxes.len();
        for s in (0..stages).rev() {
            let msg = Msg::Eval {
                schedule: schedule.clone(),
                inputs: if s == 0 { input_chunks.clone() } else { Vec::new() },
                targets: if s + 1 == stages { target_chunks.clone() } else { Vec::new() },
            };
            self.send(s, msg)?;
        }
        let mut done = vec![false; stages];
        let mut totals = Outcome::default();
        self.gather(&mut done, |report| match report {
            Report::Done { stage, outcome, .. } => {
                totals.loss += outcome.loss;
                totals.correct += outcome.correct;
                totals.terms += outcome.terms;
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        Ok(EvalStats { loss: totals.loss / totals.terms.max(1) as f64, correct: totals.correct, terms: totals.terms })
    }

    /// The model's outputs (logits) for `inputs`, computed forward-only in evaluation mode and
    /// pipelined over the same stages; micro-batched like training when the batch divides.
    pub fn predict(&mut self, inputs: &Tensor) -> Result<Tensor> {
        self.ensure_running()?;
        self.check_inputs(inputs)?;
        let batch = inputs.dim(0)?;
        if batch == 0 {
            return Err(EngineError::Input("cannot predict on an empty batch".into()));
        }
        let m = if batch % self.microbatches == 0 { self.microbatches } else { 1 };
        let schedule = Arc::new(Schedule::forward_only(self.inboxes.len(), m)?);
        let input_chunks = split_batch(inputs, m)?;
        let stages = self.inboxes.len();
        for s in (0..stages).rev() {
            let msg = Msg::Predict { schedule: schedule.clone(), inputs: if s == 0 { input_chunks.clone() } else { Vec::new() } };
            self.send(s, msg)?;
        }
        let mut done = vec![false; stages];
        let mut outputs = Vec::new();
        self.gather(&mut done, |report| match report {
            Report::Done { stage, outcome, .. } => {
                outputs.extend(outcome.outputs);
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        outputs.sort_by_key(|(mb, _)| *mb);
        let outputs: Vec<Tensor> = outputs.into_iter().map(|(_, t)| t).collect();
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Every parameter, copied to the CPU, by canonical name (tied copies once).
    pub fn parameters(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.snapshot(SnapshotKind::Params)
    }

    /// Each stage's own copy of every parameter, for checking that tied copies agree.
    pub fn parameters_by_stage(&mut self) -> Result<Vec<BTreeMap<String, Tensor>>> {
        self.snapshot_by_stage(SnapshotKind::Params)
    }

    /// Gradients of the last step (tied copies summed, before clipping), by name.
    pub fn gradients(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.snapshot(SnapshotKind::Grads)
    }

    /// Non-trainable state (BatchNorm running statistics), by name.
    pub fn buffers(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.snapshot(SnapshotKind::Buffers)
    }

    /// Optimizer state flattened to named tensors: `<param>.exp_avg`, `<param>.exp_avg_sq`,
    /// `<param>.step` (AdamW) or `<param>.momentum_buffer` (SGD).
    pub fn optimizer_state(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.snapshot(SnapshotKind::OptimizerState)
    }

    fn snapshot(&mut self, kind: SnapshotKind) -> Result<BTreeMap<String, Tensor>> {
        let mut merged = BTreeMap::new();
        for stage in self.snapshot_by_stage(kind)? {
            for (name, t) in stage {
                merged.entry(name).or_insert(t);
            }
        }
        Ok(merged)
    }

    fn snapshot_by_stage(&mut self, kind: SnapshotKind) -> Result<Vec<BTreeMap<String, Tensor>>> {
        self.ensure_running()?;
        let mut out = Vec::with_capacity(self.inboxes.len());
        for s in 0..self.inboxes.len() {
            let (tx, rx) = unbounded();
            self.send(s, Msg::Snapshot { kind, reply: tx })?;
            match rx.recv() {
                Ok(tensors) => out.push(tensors.into_iter().collect()),
                Err(_) => return Err(self.stage_gone(s)),
            }
        }
        Ok(out)
    }

    /// Stage `s` ended instead of answering; it has reported why (or `gather` notices it died).
    fn stage_gone(&mut self, s: usize) -> EngineError {
        let mut pending: Vec<bool> = (0..self.inboxes.len()).map(|i| i != s).collect();
        match self.gather(&mut pending, |_| Ok(None)) {
            Err(e) => e,
            Ok(()) => self.stop(Some((s, None, "stage thread is gone".into()))),
        }
    }

    fn ensure_running(&self) -> Result<()> {
        match &self.stopped {
            Some(why) => Err(EngineError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    fn check_input(&self, inputs: &Tensor, targets: &Tensor) -> Result<()> {
        let batch = inputs.dim(0).map_err(|_| EngineError::Input("inputs must have a batch dimension".into()))?;
        if targets.dims().first() != Some(&batch) {
            return Err(EngineError::Input(format!(
                "inputs have batch size {batch} but targets have shape {:?}",
                targets.dims()
            )));
        }
        if batch % self.microbatches != 0 {
            return Err(EngineError::Input(format!(
                "batch size {batch} is not divisible into {} micro-batches",
                self.microbatches
            )));
        }
        if !matches!(targets.dtype(), DType::U32 | DType::I64 | DType::U8) {
            return Err(EngineError::Input(format!(
                "targets must be integer class or token ids, got {:?}",
                targets.dtype()
            )));
        }
        self.check_inputs(inputs)?;
        match &self.input {
            InputKind::Tokens { vocab, .. } => {
                if targets.dims() != inputs.dims() {
                    return Err(EngineError::Input(format!(
                        "targets of shape {:?} do not match token ids of shape {:?}",
                        targets.dims(),
                        inputs.dims()
                    )));
                }
                check_ids_below(targets, *vocab, "target token id", "vocabulary")?;
            }
            InputKind::Images { .. } => {
                if targets.rank() != 1 {
                    return Err(EngineError::Input(format!(
                        "image labels must have shape (batch,), got {:?}",
                        targets.dims()
                    )));
                }
                check_ids_below(targets, self.num_classes, "label", "classes")?;
            }
        }
        Ok(())
    }

    /// Checks model inputs alone: token ids within vocabulary and context, or image shape.
    fn check_inputs(&self, inputs: &Tensor) -> Result<()> {
        match &self.input {
            InputKind::Tokens { context, vocab } => {
                if inputs.rank() != 2 || !matches!(inputs.dtype(), DType::U32 | DType::I64 | DType::U8) {
                    return Err(EngineError::Input(format!(
                        "{} expects token ids of shape (batch, time) and an integer dtype, got {:?} {:?}",
                        self.model_name,
                        inputs.dims(),
                        inputs.dtype()
                    )));
                }
                if inputs.dim(1)? > *context {
                    return Err(EngineError::Input(format!(
                        "sequence length {} exceeds the context of {} ({context})",
                        inputs.dim(1)?,
                        self.model_name
                    )));
                }
                if inputs.dim(1)? == 0 {
                    return Err(EngineError::Input(format!("{} got empty sequences (shape {:?})", self.model_name, inputs.dims())));
                }
                check_ids_below(inputs, *vocab, "token id", "vocabulary")?;
            }
            InputKind::Images { channels } => {
                if inputs.rank() != 4 || inputs.dim(1)? != *channels {
                    return Err(EngineError::Input(format!(
                        "{} expects images of shape (batch, {channels}, height, width), got {:?}",
                        self.model_name,
                        inputs.dims()
                    )));
                }
                if inputs.dtype() != DType::F32 {
                    return Err(EngineError::Input(format!("{} expects f32 images, got {:?}", self.model_name, inputs.dtype())));
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, stage: usize, msg: Msg) -> Result<()> {
        if self.inboxes[stage].send(msg).is_err() {
            return Err(self.stop(Some((stage, None, "stage thread is gone".to_string()))));
        }
        Ok(())
    }

    /// Receives reports until every stage marked `false` in `pending` has been accounted for
    /// by `accept` (which returns the stage it accounts for). A failure report aborts all.
    fn gather(
        &mut self,
        pending: &mut [bool],
        mut accept: impl FnMut(Report) -> Result<Option<usize>>,
    ) -> Result<()> {
        while pending.iter().any(|done| !done) {
            match self.reports.recv_timeout(Duration::from_millis(100)) {
                Ok(Report::Failed { stage, action, message }) => {
                    return Err(self.stop(Some((stage, action, message))));
                }
                Ok(Report::Aborted { stage }) => {
                    return Err(self.stop(Some((stage, None, "aborted".into()))));
                }
                Ok(report) => {
                    if let Some(stage) = accept(report)? {
                        pending[stage] = true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    // A thread that ended without reporting would otherwise hang the step.
                    if let Some(stage) = (0..pending.len())
                        .find(|&s| !pending[s] && self.handles[s].as_ref().is_none_or(|h| h.is_finished()))
                    {
                        return Err(self.stop(Some((stage, None, "stage thread ended unexpectedly".into()))));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.stop(Some((0, None, "all stage threads are gone".into()))));
                }
            }
        }
        Ok(())
    }

    /// Aborts every stage, joins the threads, and returns the error naming the first failure.
    fn stop(&mut self, failure: Option<(usize, Option<Action>, String)>) -> EngineError {
        for inbox in &self.inboxes {
            let _ = inbox.send(Msg::Abort);
        }
        // Failures the driver inferred (a thread gone, an abort) give way to a stage's own report.
        let synthetic = |m: &str| {
            m == "aborted" || m == "stage thread is gone" || m == "stage thread ended unexpectedly" || m == "all stage threads are gone"
        };
        let mut first = failure;
        for handle in self.handles.iter_mut() {
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
        // A stage that failed while others were being aborted may have the real cause.
        while let Ok(report) = self.reports.try_recv() {
            if let Report::Failed { stage, action, message } = report {
                let replace = match &first {
                    None => true,
                    Some((_, _, m)) => synthetic(m),
                };
                if replace {
                    first = Some((stage, action, message));
                }
            }
        }
        let (stage, action, message) = first.unwrap_or((0, None, "unknown failure".into()));
        let err = EngineError::StageFailed { stage, action, message };
        self.stopped = Some(err.to_string());
        err
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for inbox in &self.inboxes {
            let _ = inbox.send(Msg::Shutdown);
        }
        for handle in self.handles.iter_mut() {
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Rejects ids at or beyond `limit` before they reach a stage (where they would stop the
/// pipeline instead of just this call).
fn check_ids_below(ids: &Tensor, limit: usize, what: &str, of: &str) -> Result<()> {
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids.to_dtype(DType::F64)?.max_all()?.to_scalar::<f64>()?;
    if max >= limit as f64 {
        return Err(EngineError::Input(format!("{what} {max} is beyond the model's {limit} {of}")));
    }
    Ok(())
}

fn split_batch(t: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
    let batch = t.dim(0)?;
    let size = batch / parts;
    (0..parts).map(|i| Ok(t.narrow(0, i * size, size)?)).collect()
}

pub(crate) fn squared_norm(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

struct StageSetup {
    index: usize,
    stages: usize,
    specs: Vec<Arc<dyn LayerSpec>>,
    seed: u64,
    initial: HashMap<String, Tensor>,
    initial_buffers: HashMap<String, Tensor>,
    initial_optimizer_state: HashMap<String, ParamState>,
    checkpoint: Option<Arc<crate::checkpoint::StageLoader>>,
    recompute: Recompute,
    optimizer: OptimizerConfig,
    loss: LossKind,
    tied: Vec<String>,
    inbox: Receiver<Msg>,
    prev: Option<Sender<Msg>>,
    next: Option<Sender<Msg>>,
    reports: Sender<Report>,
    threads: usize,
    fault: Option<Fault>,
}

/// Why a stage stopped working on a step.
enum StageStop {
    Aborted,
    Failed(Option<Action>, String),
}

impl From<candle_core::Error> for StageStop {
    fn from(e: candle_core::Error) -> Self {
        StageStop::Failed(None, e.to_string())
    }
}

type StageResult<T> = std::result::Result<T, StageStop>;

/// A stage's world: its layers, parameters, gradients, optimizer state, and channels.
struct StageWorker {
    index: usize,
    is_first: bool,
    is_last: bool,
    /// The stage's math: its layers (built over detached views of `store`'s variables) and
    /// everything in flight between forward and backward steps.
    compute: StageCompute,
    store: ParamStore,
    optimizer: Optimizer,
    loss: LossKind,
    tied: Vec<String>,
    inbox: Receiver<Msg>,
    prev: Option<Sender<Msg>>,
    next: Option<Sender<Msg>>,
    reports: Sender<Report>,
    fault: Option<Fault>,
    /// The previous step's gradients (tied copies summed, unclipped), for inspection.
    last_grads: BTreeMap<String, Tensor>,
    activations_in: HashMap<usize, Tensor>,
    gradients_in: HashMap<usize, Tensor>,
    reduced_in: Option<(Vec<(String, Tensor)>, f64)>,
    waiting: Duration,
}

fn run_stage(setup: StageSetup) {
    let index = setup.index;
    let reports = setup.reports.clone();
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(setup.threads)
        .thread_name(move |i| format!("brigade-stage-{index}-worker-{i}"))
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            let _ = reports.send(Report::Failed { stage: index, action: None, message: format!("thread pool: {e}") });
            return;
        }
    };
    pool.install(move || {
        let outcome = catch_unwind(AssertUnwindSafe(|| -> StageResult<()> {
            let mut worker = StageWorker::build(setup)?;
            worker.serve()
        }));
        let report = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(StageStop::Aborted)) => Report::Aborted { stage: index },
            Ok(Err(StageStop::Failed(action, message))) => Report::Failed { stage: index, action, message },
            Err(panic) => Report::Failed { stage: index, action: None, message: panic_message(&panic) },
        };
        let _ = reports.send(report);
    });
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {text}")
}

impl StageWorker {
    fn build(mut setup: StageSetup) -> StageResult<Self> {
        if let Some(loader) = setup.checkpoint.take() {
            // This stage reads exactly its own tensors from the (memory-mapped) checkpoint.
            let params = crate::layer::unique_params(&setup.specs);
            let buffers: Vec<_> = setup.specs.iter().flat_map(|s| s.buffer_specs()).collect();
            let state = loader
                .load_stage(&params, &buffers)
                .map_err(|e| StageStop::Failed(None, format!("loading its part of the checkpoint: {e}")))?;
            setup.initial = state.params;
            setup.initial_buffers = state.buffers;
            setup.initial_optimizer_state = state.optimizer;
        }
        let mut store = ParamStore::new(Device::Cpu, setup.seed).with_overrides(setup.initial);
        // The variables the optimizer updates in place; the layers compute on detached views of
        // them, so no autograd graph is ever recorded (the layers own their backward).
        for spec in crate::layer::unique_params(&setup.specs) {
            store.get(&spec).map_err(|e| StageStop::Failed(None, format!("building layers: {e}")))?;
        }
        let mut view = store.shared_view();
        let mut layers = setup
            .specs
            .iter()
            .map(|spec| spec.build(&mut view))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| StageStop::Failed(None, format!("building layers: {e}")))?;
        if !setup.initial_buffers.is_empty() {
            for (spec, layer) in setup.specs.iter().zip(layers.iter_mut()) {
                let mine: HashMap<String, Tensor> = spec
                    .buffer_specs()
                    .into_iter()
                    .filter_map(|b| setup.initial_buffers.get(&b.name).map(|t| (b.name, t.clone())))
                    .collect();
                if !mine.is_empty() {
                    layer
                        .load_buffers(&mine)
                        .map_err(|e| StageStop::Failed(None, format!("restoring buffers of {}: {e}", spec.name())))?;
                }
            }
        }
        let mut optimizer = Optimizer::new(setup.optimizer);
        for (name, _, _) in store.vars() {
            if let Some(state) = setup.initial_optimizer_state.get(name) {
                optimizer.set_state(name, state.to_device(store.device())?);
            }
        }
        Ok(Self {
            index: setup.index,
            is_first: setup.index == 0,
            is_last: setup.index + 1 == setup.stages,
            compute: StageCompute::new(
                layers,
                setup.index > 0,
                (setup.index + 1 == setup.stages).then_some(setup.loss),
                setup.recompute,
            ),
            store,
            optimizer,
            loss: setup.loss,
            tied: setup.tied,
            inbox: setup.inbox,
            prev: setup.prev,
            next: setup.next,
            reports: setup.reports,
            fault: setup.fault,
            last_grads: BTreeMap::new(),
            activations_in: HashMap::new(),
            gradients_in: HashMap::new(),
            reduced_in: None,
            waiting: Duration::ZERO,
        })
    }

    /// The stage's main loop: waits for work between steps.
    fn serve(&mut self) -> StageResult<()> {
        loop {
            let msg = self.inbox.recv().map_err(|_| StageStop::Aborted)?;
            match msg {
                Msg::Train { schedule, inputs, targets, global_terms, lr } => {
                    let started = Instant::now();
                    self.waiting = Duration::ZERO;
                    let outcome = self.train(&schedule, inputs, targets, global_terms, lr)?;
                    let busy = started.elapsed().saturating_sub(self.waiting);
                    self.report(Report::Done { stage: self.index, outcome, busy })?;
                }
                Msg::Eval { schedule, inputs, targets } => {
                    let started = Instant::now();
                    self.waiting = Duration::ZERO;
                    let outcome = self.eval(&schedule, inputs, Some(targets))?;
                    let busy = started.elapsed().saturating_sub(self.waiting);
                    self.report(Report::Done { stage: self.index, outcome, busy })?;
                }
                Msg::Predict { schedule, inputs } => {
                    let started = Instant::now();
                    self.waiting = Duration::ZERO;
                    let outcome = self.eval(&schedule, inputs, None)?;
                    let busy = started.elapsed().saturating_sub(self.waiting);
                    self.report(Report::Done { stage: self.index, outcome, busy })?;
                }
                Msg::Snapshot { kind, reply } => {
                    let _ = reply.send(self.snapshot(kind)?);
                }
                Msg::Manifest { reply } => {
                    let _ = reply.send(self.manifest());
                }
                Msg::Save { job, reply } => {
                    let _ = reply.send(self.write_shards(&job));
                }
                Msg::Ping { reply } => {
                    let _ = reply.send(());
                }
                Msg::Activation { .. } | Msg::Gradient { .. } | Msg::Reduced { .. } => {
                    // Data can arrive before this stage has seen its own step message.
                    self.buffer(msg);
                }
                Msg::Abort | Msg::Shutdown => return Ok(()),
            }
        }
    }

    fn report(&self, report: Report) -> StageResult<()> {
        self.reports.send(report).map_err(|_| StageStop::Aborted)
    }

    fn buffer(&mut self, msg: Msg) {
        match msg {
            Msg::Activation { microbatch, tensor } => {
                self.activations_in.insert(microbatch, tensor);
            }
            Msg::Gradient { microbatch, tensor } => {
                self.gradients_in.insert(microbatch, tensor);
            }
            Msg::Reduced { tied_grads, clip_scale } => self.reduced_in = Some((tied_grads, clip_scale)),
            _ => {}
        }
    }

    /// Blocks until `ready` finds what it needs in the buffers; an abort ends the wait.
    fn wait_for<T>(&mut self, mut ready: impl FnMut(&mut Self) -> Option<T>) -> StageResult<T> {
        loop {
            if let Some(found) = ready(self) {
                return Ok(found);
            }
            let started = Instant::now();
            let msg = self.inbox.recv().map_err(|_| StageStop::Aborted)?;
            self.waiting += started.elapsed();
            match msg {
                Msg::Abort | Msg::Shutdown => return Err(StageStop::Aborted),
                Msg::Snapshot { reply, .. } => drop(reply),
                Msg::Manifest { reply } => drop(reply),
                Msg::Save { reply, .. } => drop(reply),
                Msg::Ping { reply } => drop(reply),
                other => self.buffer(other),
            }
        }
    }

    /// Takes in anything already delivered, so an abort is noticed between actions even when
    /// the next action needs no message.
    fn poll_abort(&mut self) -> StageResult<()> {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                Msg::Abort | Msg::Shutdown => return Err(StageStop::Aborted),
                other => self.buffer(other),
            }
        }
        Ok(())
    }

    fn inject_fault(&self, at: Option<Action>) -> StageResult<bool> {
        match self.fault {
            Some(f) if f.at == at => match f.kind {
                FaultKind::Error => Err(StageStop::Failed(at, "injected fault".into())),
                FaultKind::Panic => panic!("injected panic in stage {}", self.index),
                FaultKind::NonFiniteLoss => Ok(true),
            },
            _ => Ok(false),
        }
    }

    fn train(
        &mut self,
        schedule: &Schedule,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
        global_terms: usize,
        lr: f64,
    ) -> StageResult<Outcome> {
        let mut outcome = Outcome::default();
        for &action in schedule.stage_actions(self.index) {
            self.poll_abort()?;
            let poison_loss = self.inject_fault(Some(action))?;
            let (action_start, waited_before) = (Instant::now(), self.waiting);
            let mb = action.microbatch;
            let result: StageResult<()> = match action.kind {
                ActionKind::Forward => {
                    let loss = self.forward_train(mb, &inputs, &targets, global_terms, poison_loss)?;
                    outcome.loss += loss;
                    Ok(())
                }
                ActionKind::Backward => self.backward(mb, true),
                ActionKind::BackwardInput => self.backward(mb, false),
                ActionKind::BackwardWeight => Ok(self.compute.backward_weight(mb)?),
            };
            result.map_err(|e| with_action(e, action))?;
            // F and B wait for their input first: the action starts when it arrives.
            outcome.timings.push((action, action_start + (self.waiting - waited_before), Instant::now()));
        }
        outcome.peak_stash_bytes = self.compute.take_peak_bytes();
        self.finish_step(lr)?;
        Ok(outcome)
    }

    fn input_for(&mut self, mb: usize, inputs: &[Tensor]) -> StageResult<Tensor> {
        if self.is_first {
            inputs
                .get(mb)
                .cloned()
                .ok_or_else(|| StageStop::Failed(None, format!("no input for micro-batch {mb}")))
        } else {
            self.wait_for(|w| w.activations_in.remove(&mb))
        }
    }

    /// Runs a training forward; on the last stage also the loss. Returns the loss value.
    fn forward_train(
        &mut self,
        mb: usize,
        inputs: &[Tensor],
        targets: &[Tensor],
        global_terms: usize,
        poison_loss: bool,
    ) -> StageResult<f64> {
        let x = self.input_for(mb, inputs)?;
        let target = if self.is_last {
            let targets = targets
                .get(mb)
                .ok_or_else(|| StageStop::Failed(None, format!("no targets for micro-batch {mb}")))?;
            Some(LossTarget { targets: targets.clone(), global_terms })
        } else {
            None
        };
        let (y, loss) = self.compute.forward(mb, &x, target)?;
        match loss {
            Some(mut value) => {
                if poison_loss {
                    value = f64::NAN;
                }
                if !value.is_finite() {
                    return Err(StageStop::Failed(None, format!("non-finite loss ({value}) at micro-batch {mb}")));
                }
                Ok(value)
            }
            None => {
                self.send_next(Msg::Activation { microbatch: mb, tensor: y })?;
                Ok(0.0)
            }
        }
    }

    /// The backward of micro-batch `mb`, input gradient only (`I`) or with the weight step
    /// (`B`): the last stage starts from its loss, the others from the gradient received from
    /// downstream; the input gradient goes upstream.
    fn backward(&mut self, mb: usize, with_weights: bool) -> StageResult<()> {
        let dy = if self.is_last { None } else { Some(self.wait_for(|w| w.gradients_in.remove(&mb))?) };
        let dx = if with_weights {
            self.compute.backward(mb, dy.as_ref())?
        } else {
            self.compute.backward_input(mb, dy.as_ref())?
        };
        if let Some(dx) = dx {
            self.send_prev(Msg::Gradient { microbatch: mb, tensor: dx })?;
        }
        Ok(())
    }

    fn send_next(&self, msg: Msg) -> StageResult<()> {
        match &self.next {
            Some(tx) => tx.send(msg).map_err(|_| StageStop::Aborted),
            None => Err(StageStop::Failed(None, "the last stage has no next stage".into())),
        }
    }

    fn send_prev(&self, msg: Msg) -> StageResult<()> {
        match &self.prev {
            Some(tx) => tx.send(msg).map_err(|_| StageStop::Aborted),
            None => Err(StageStop::Failed(None, "the first stage has no previous stage".into())),
        }
    }

    /// The end-of-step collective and the optimizer step.
    fn finish_step(&mut self, lr: f64) -> StageResult<()> {
        if self.compute.has_pending_work() {
            return Err(StageStop::Failed(None, "step ended with unfinished backward work".into()));
        }
        let mut grads = self.compute.take_gradients();
        let tied: HashSet<&String> = self.tied.iter().collect();
        let mut sq_norm = 0.0;
        let mut tied_grads = Vec::new();
        for (name, _, var) in self.store.vars() {
            let grad = match grads.get(name) {
                Some(g) => g.clone(),
                None => {
                    let zeros = var.as_tensor().zeros_like()?;
                    grads.insert(name.to_string(), zeros.clone());
                    zeros
                }
            };
            if tied.contains(&name.to_string()) {
                tied_grads.push((name.to_string(), grad));
            } else {
                sq_norm += squared_norm(&grad)?;
            }
        }
        self.report(Report::Partial { stage: self.index, tied_grads, sq_norm })?;
        let (reduced, clip_scale) = self.wait_for(|w| w.reduced_in.take())?;
        for (name, grad) in reduced {
            grads.insert(name, grad.to_device(self.store.device())?);
        }
        self.inject_fault(None).map_err(|e| match e {
            StageStop::Failed(a, m) => StageStop::Failed(a, format!("{m} at the optimizer step")),
            other => other,
        })?;
        self.last_grads = grads.clone();
        for (name, spec, var) in self.store.vars() {
            let Some(grad) = grads.get(name) else { continue };
            let grad = if clip_scale < 1.0 { (grad * clip_scale)? } else { grad.clone() };
            self.optimizer.update(name, var, &grad, lr, spec.weight_decay)?;
        }
        Ok(())
    }

    /// Forward-only in evaluation mode. With targets, the last stage sums loss and accuracy;
    /// without, it keeps the outputs (prediction).
    fn eval(&mut self, schedule: &Schedule, inputs: Vec<Tensor>, targets: Option<Vec<Tensor>>) -> StageResult<Outcome> {
        let mut outcome = Outcome::default();
        for &action in schedule.stage_actions(self.index) {
            self.poll_abort()?;
            let mb = action.microbatch;
            let step = |w: &mut Self, outcome: &mut Outcome| -> StageResult<()> {
                let x = w.input_for(mb, &inputs)?;
                let y = w.compute.forward_eval(&x)?;
                if w.is_last {
                    let Some(targets) = &targets else {
                        outcome.outputs.push((mb, y));
                        return Ok(());
                    };
                    let target = targets
                        .get(mb)
                        .ok_or_else(|| StageStop::Failed(None, format!("no targets for micro-batch {mb}")))?;
                    let terms = loss_terms(target);
                    let loss = microbatch_loss(w.loss, &y, target, 1)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    outcome.loss += loss;
                    outcome.terms += terms;
                    outcome.correct += correct_predictions(&y, target)?;
                } else {
                    w.send_next(Msg::Activation { microbatch: mb, tensor: y })?;
                }
                Ok(())
            };
            step(self, &mut outcome).map_err(|e| with_action(e, action))?;
        }
        Ok(outcome)
    }

    fn snapshot(&self, kind: SnapshotKind) -> StageResult<Vec<(String, Tensor)>> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).and_then(|t| t.copy());
        let mut out = Vec::new();
        match kind {
            SnapshotKind::Params => {
                for (name, _, var) in self.store.vars() {
                    out.push((name.to_string(), cpu(var.as_tensor())?));
                }
            }
            SnapshotKind::Grads => {
                for (name, g) in &self.last_grads {
                    out.push((name.clone(), cpu(g)?));
                }
            }
            SnapshotKind::Buffers => {
                for layer in self.compute.layers() {
                    for (name, t) in layer.buffers() {
                        out.push((name, cpu(&t)?));
                    }
                }
            }
            SnapshotKind::OptimizerState => {
                for (name, state) in self.optimizer.state() {
                    match state {
                        ParamState::AdamW { exp_avg, exp_avg_sq, step } => {
                            out.push((format!("{name}.exp_avg"), cpu(exp_avg)?));
                            out.push((format!("{name}.exp_avg_sq"), cpu(exp_avg_sq)?));
                            out.push((format!("{name}.step"), Tensor::new(&[*step as f64], &Device::Cpu)?));
                        }
                        ParamState::Sgd { momentum_buffer: Some(buf) } => {
                            out.push((format!("{name}.momentum_buffer"), cpu(buf)?));
                        }
                        ParamState::Sgd { momentum_buffer: None } => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

fn with_action(e: StageStop, action: Action) -> StageStop {
    match e {
        StageStop::Failed(None, message) => StageStop::Failed(Some(action), message),
        other => other,
    }
}

/// Makes candle's CPU matmuls use at most `threads` threads.
///
/// candle sizes gemm's parallelism from the process-wide `RAYON_NUM_THREADS` (default: every
/// core), whatever rayon pool the call runs in. With one stage thread per core that asks each
/// matmul to split across all cores, and the stages then fight over them: measured 4x slower
/// on 2 cores for gpt-tiny. Every stage of a pipeline gets the same budget, so one
/// process-wide value is coherent; it is set before any stage thread starts.
///
/// Elementwise ops on 64K+ elements go to a second, process-wide pool of candle's, sized once
/// (at its first use) from `CANDLE_NUM_THREADS`, and shared by every thread behind one lock.
/// Sized above 1 while several stages run, its spinning worker takes a core and the stages
/// queue on its lock: measured 2x slower steps for gpt-tiny on 2 stages. Setting the variable
/// here sizes it right when this is the process's first pipeline; it cannot be resized later.
pub(crate) fn apply_thread_budget(threads: usize) {
    let wanted = threads.to_string();
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var(var).ok().as_deref() != Some(wanted.as_str()) {
            std::env::set_var(var, &wanted);
        }
    }
}
