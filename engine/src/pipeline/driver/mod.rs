//! The driver: the caller-side [`Pipeline`]. It partitions the model, starts the stage
//! threads, splits batches into micro-batches, runs the end-of-step collective (tied gradients,
//! global norm, clipping factor), gathers snapshots, and stops every stage when one fails.
//!
//! With data parallelism (`PipelineConfig::data_parallel` = D) it starts D replicas of every
//! stage; stage `s` of replica `r` is slot `r × stages + s` in its lists, so replica 0's slots
//! are the stage indices. Training reaches every replica; the collective reads replica 0 (its
//! stages' gradients are already summed over the replicas, identical in all of them) and
//! answers all; evaluation, prediction, decoding, snapshots and checkpoints use replica 0.
//!
//! Across processes (MPI ranks, [`World::Ranks`]) every rank runs this same driver on the same
//! batches, but starts and feeds only the slots it owns (a contiguous block, within one
//! replica); the slots other ranks own are proxy inboxes the rank's MPI thread sends on, and
//! replicas sum their gradients through the MPI `ReplicaReduce`. The collective sums the local
//! stages' partials (replica 0's; other replicas' ranks add zeros), then all-reduces them over
//! the ranks, so every rank computes the numbers one process would.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

mod save;

use super::config::{PipelineConfig, ScheduleChoice};
use super::handoff::HandOff;
use super::norm::squared_norm;
use super::protocol::{ChunkLayers, Msg, Outcome, Report, SnapshotKind, StageSetup};
use super::replicas::{InProcessReduce, ReplicaReduce};
use super::stage::run_stage;
use super::threads::{self, start_elementwise_pool, ThreadPools};
use super::transport::World;
use crate::error::{EngineError, Result};
use crate::input::{is_integer, BatchCheck};
use crate::layer::{LayerSpec, PipelineModel};
use crate::loss::loss_terms;
use crate::optim::{LrSchedule, OptimizerConfig};
use crate::partition::Partition;
use crate::schedule::{Action, Schedule};

/// What one training step measured. With data parallelism the loss and gradient norm are the
/// global batch's, and the per-stage lists (`stage_busy`, `stage_actions`, `peak_stash_bytes`)
/// replica 0's.
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

/// A running pipeline: stage threads that own their layers, parameters, gradients and
/// optimizer state.
pub struct Pipeline {
    model_name: String,
    /// The model's checks of every batch, run before the batch reaches a stage.
    batch_check: Arc<dyn BatchCheck>,
    /// Whether the loss takes integer class or token ids (regression losses take floats).
    integer_targets: bool,
    partition: Partition,
    schedule: Arc<Schedule>,
    microbatches: usize,
    lr: LrSchedule,
    grad_clip: Option<f64>,
    optimizer: OptimizerConfig,
    seed: u64,
    /// Every distinct parameter name of the model.
    param_names: Vec<String>,
    /// Stages per replica.
    stages: usize,
    /// Data-parallel replicas (1: one pipeline), and the reduction their stages sum through.
    replicas: usize,
    reduce: Option<Arc<dyn ReplicaReduce>>,
    /// Every stage thread's inbox, by slot (`replica × stages + stage`).
    inboxes: Vec<Sender<Msg>>,
    reports: Receiver<Report>,
    handles: Vec<Option<JoinHandle<()>>>,
    /// Parameter name → stages that hold a copy (only names held by two or more stages).
    tied: BTreeMap<String, Vec<usize>>,
    /// The shape of each tied parameter (ranks holding no copy add zeros to the sum).
    tied_shapes: BTreeMap<String, Vec<usize>>,
    /// The processes the stages run in, and which stages this one runs.
    world: World,
    local: Vec<bool>,
    /// How hand-offs between ranks travel, for a start-up line (`Pipeline::hand_offs`).
    hand_offs: String,
    /// The NCCL thread, when GPU stages span ranks (kept alive as long as the stages).
    #[cfg(feature = "nccl")]
    _nccl: Option<Arc<super::transport::NcclLink>>,
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
        let replicas = config.data_parallel;
        if replicas == 0 {
            return Err(EngineError::Config("data-parallel replicas must be at least 1".into()));
        }
        // Every chunk needs a layer: refuse impossible counts before building anything sized
        // by them (devices, schedule lists).
        let (schedule_name, chunks_per_stage) = match &config.schedule {
            ScheduleChoice::Kind(kind) => (kind.to_string(), kind.default_virtual_stages()),
            ScheduleChoice::Virtual(kind, v) => (kind.to_string(), *v),
            ScheduleChoice::Custom(s) => (s.name().to_string(), 1), // checked once built
        };
        let chunks = config.stages.saturating_mul(chunks_per_stage);
        if chunks > layers.len() {
            let e = crate::partition::PartitionError::MoreStagesThanLayers { stages: chunks, layers: layers.len() };
            return Err(if chunks_per_stage == 1 {
                e.into()
            } else {
                EngineError::Config(format!(
                    "schedule {schedule_name} cuts the model into {chunks} chunks ({} stages x {chunks_per_stage}): {e}",
                    config.stages
                ))
            });
        }
        // One device per stage (every replica's copy of it there), or one per stage of each replica.
        let per_slot_devices = replicas > 1 && config.devices.len() == replicas * config.stages;
        crate::device::check_devices(&config.devices, if per_slot_devices { replicas } else { 1 } * config.stages)?;
        let world = config.world.clone();
        world.check_fits(config.stages, replicas).map_err(EngineError::Config)?;
        // Which slots (stage `s` of replica `r`: `r × stages + s`) this process runs.
        let slots = config.stages * replicas;
        let local: Vec<bool> = (0..slots).map(|slot| world.owns(slot, slots)).collect();
        if !matches!(config.compute_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(EngineError::Config(format!(
                "compute dtype {:?} is not supported: use f32 (exact) or bf16/f16 (mixed precision, f32 master weights)",
                config.compute_dtype
            )));
        }
        if config.compute_dtype != DType::F32 {
            model.mixed_precision().map_err(|why| {
                EngineError::Config(format!(
                    "{} cannot train in {:?} mixed precision: {why}",
                    model.name(),
                    config.compute_dtype
                ))
            })?;
        }
        // Every stage on this process's cores counts against one budget: its own slots (every
        // replica's, in one process), times the processes on this host that share those cores.
        let sharing = threads::processes_sharing_cores(
            world.processes_on_host(),
            threads::available_cores(),
            threads::online_cores(),
        );
        let local_slots = local.iter().filter(|&&here| here).count().max(1);
        let threads = threads::per_stage(config.threads_per_stage, local_slots.saturating_mul(sharing))?;
        let layer_params: Vec<usize> = layers.iter().map(|l| l.param_count()).collect();
        let schedule = match &config.schedule {
            ScheduleChoice::Kind(kind) => kind.build(config.stages, config.microbatches)?,
            ScheduleChoice::Virtual(kind, v) => kind.build_with(config.stages, config.microbatches, *v)?,
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
        // The model is cut into one piece per chunk (p x v with virtual stages), in model order;
        // the schedule's routing table says which device holds each.
        let placement = Arc::new(schedule.placement().to_vec());
        let partition = config.partition.resolve(&layer_params, placement.len()).map_err(|e| {
            if placement.len() == config.stages {
                EngineError::from(e)
            } else {
                EngineError::Config(format!(
                    "schedule {} cuts the model into {} chunks ({} stages x {}): {e}",
                    schedule.name(),
                    placement.len(),
                    config.stages,
                    placement.len() / config.stages.max(1)
                ))
            }
        })?;
        let chunk_layers: Vec<Vec<Arc<dyn LayerSpec>>> =
            partition.ranges().into_iter().map(|r| layers[r].to_vec()).collect();
        let device_chunks: Vec<Vec<ChunkLayers>> = (0..config.stages)
            .map(|d| {
                (0..placement.len()).filter(|&c| placement[c] == d).map(|c| (c, chunk_layers[c].clone())).collect()
            })
            .collect();

        // Which parameter names live on more than one stage (weight tying across stages).
        let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (s, chunks) in device_chunks.iter().enumerate() {
            let names: HashSet<String> =
                chunks.iter().flat_map(|(_, specs)| specs.iter().flat_map(|l| l.params())).map(|p| p.name).collect();
            for name in names {
                holders.entry(name).or_default().push(s);
            }
        }
        let mut tied: BTreeMap<String, Vec<usize>> = holders.into_iter().filter(|(_, s)| s.len() > 1).collect();
        for stages in tied.values_mut() {
            stages.sort_unstable();
        }
        let tied_shapes: BTreeMap<String, Vec<usize>> = crate::layer::unique_params(&layers)
            .into_iter()
            .filter(|p| tied.contains_key(&p.name))
            .map(|p| (p.name, p.shape))
            .collect();

        // One pool for all stages, or one per stage (`threads.rs`); candle's process-wide knobs
        // follow the per-stage budget.
        // Sharing needs two CPU stages: one alone gains nothing from it, and a GPU stage's math
        // is not on these cores (it keeps its own pool for what it does on the host).
        let device_of = |slot: usize| {
            let at = if per_slot_devices { slot } else { slot % config.stages };
            config.devices.get(at).copied().unwrap_or_default()
        };
        let cpu_stages: Vec<usize> =
            (0..slots).filter(|&i| local[i] && device_of(i) == crate::device::StageDevice::Cpu).collect();
        let shared_pool = match config.thread_pools {
            ThreadPools::Shared if cpu_stages.len() >= 2 => {
                Some(threads::shared_pool(threads * cpu_stages.len()).map_err(EngineError::Config)?)
            }
            _ => None,
        };
        start_elementwise_pool();
        // GPU stages across ranks: their hand-offs and replica sums over NCCL (`transport/nccl.rs`).
        #[cfg(feature = "mpi")]
        let link_choice = match &world {
            World::Ranks(ranks) if world.is_distributed() => {
                let devices: Vec<_> = (0..slots).map(device_of).collect();
                let owners: Vec<_> = (0..slots).map(|s| world.owner(s, slots)).collect();
                let lanes = super::transport::one_peer_per_lane(super::transport::hand_off_pairs(
                    &placement,
                    config.stages,
                    replicas,
                    |slot| owners[slot],
                ));
                Some(super::transport::choose_link(cfg!(feature = "nccl"), &devices, &owners, ranks.rank(), lanes))
            }
            _ => None,
        };
        #[cfg(feature = "mpi")]
        let hand_offs = match &link_choice {
            None => "in process".to_string(),
            Some(super::transport::LinkChoice::Nccl { gpu }) => format!("NCCL from cuda:{gpu}"),
            Some(super::transport::LinkChoice::MpiBytes(why)) => format!("MPI byte messages ({why})"),
        };
        #[cfg(not(feature = "mpi"))]
        let hand_offs = "in process".to_string();
        // The replica sums over NCCL too where each stage's copies are one peer apart (2 replicas).
        #[cfg(feature = "nccl")]
        let nccl_replicas = replicas > 1
            && super::transport::one_peer_per_lane(
                super::replicas::exchange::ReplicaLayout::new(config.stages, replicas, world.rank_and_size().1).pairs(),
            )
            .is_ok();
        #[cfg(feature = "nccl")]
        let nccl = match (&world, &link_choice) {
            (World::Ranks(ranks), Some(super::transport::LinkChoice::Nccl { gpu })) => Some(
                super::transport::NcclLink::start(ranks.clone(), *gpu, slots, nccl_replicas)
                    .map_err(EngineError::Config)?,
            ),
            _ => None,
        };
        let reduce: Option<Arc<dyn ReplicaReduce>> = match &world {
            _ if replicas == 1 => None,
            #[cfg(feature = "nccl")]
            World::Ranks(ranks) if nccl.is_some() && nccl_replicas => nccl
                .clone()
                .map(|link| super::transport::NcclReduce::start(link, ranks.size(), replicas, config.stages))
                .transpose()
                .map_err(EngineError::Config)?,
            #[cfg(feature = "mpi")]
            World::Ranks(ranks) if world.is_distributed() => Some(
                super::transport::MpiReduce::start(ranks.clone(), replicas, config.stages)
                    .map_err(EngineError::Config)?,
            ),
            _ => Some(Arc::new(InProcessReduce::new(replicas, config.stages))),
        };
        let (report_tx, reports) = unbounded();
        let channels: Vec<(Sender<Msg>, Receiver<Msg>)> = (0..slots).map(|_| unbounded()).collect();
        let inboxes: Vec<Sender<Msg>> = channels.iter().map(|(tx, _)| tx.clone()).collect();
        let mut handles = Vec::with_capacity(slots);
        // Slots other ranks own: their inboxes here are proxies the MPI thread sends on.
        let mut proxies = Vec::new();
        let slot_chunks = (0..replicas).flat_map(|_| device_chunks.iter().cloned());
        for (slot, ((_, inbox), chunks)) in channels.into_iter().zip(slot_chunks).enumerate() {
            let (replica, index) = (slot / config.stages, slot % config.stages);
            if !local[slot] {
                proxies.push((slot, world.owner(slot, slots), inbox));
                handles.push(None);
                continue;
            }
            let stage_tied: Vec<String> =
                tied.iter().filter(|(_, s)| s.contains(&index)).map(|(n, _)| n.clone()).collect();
            // A replica's stages hand off among themselves only.
            let peers = inboxes[replica * config.stages..(replica + 1) * config.stages].to_vec();
            let setup = StageSetup {
                index,
                slot,
                replica,
                replicas: reduce.clone(),
                placement: placement.clone(),
                chunks,
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
                peers,
                reports: report_tx.clone(),
                threads,
                shared_pool: shared_pool.clone().filter(|_| cpu_stages.contains(&slot)),
                device: device_of(slot),
                compute_dtype: config.compute_dtype,
                sync_each_action: config.sync_each_action,
                peer_watch: world.peer_watch(replica, config.stages, slots),
            };
            let handle = std::thread::Builder::new()
                .name(if replicas > 1 {
                    format!("brigade-r{replica}-stage-{index}")
                } else {
                    format!("brigade-stage-{index}")
                })
                .spawn(move || run_stage(setup))
                .map_err(|e| EngineError::Config(format!("cannot start stage thread {slot}: {e}")))?;
            handles.push(Some(handle));
        }
        #[cfg(feature = "mpi")]
        if let World::Ranks(ranks) = &world {
            let incoming = (0..slots).filter(|&s| local[s]).map(|s| (s, inboxes[s].clone())).collect();
            // With NCCL its thread drains the proxies and feeds the stages' inboxes; the MPI
            // thread then carries only the headers (attached by `NcclLink::start`).
            #[cfg(feature = "nccl")]
            let to_mpi = match &nccl {
                Some(link) => link.attach(proxies, incoming).map(|_| None).map_err(EngineError::Config)?,
                None => Some((proxies, incoming)),
            };
            #[cfg(not(feature = "nccl"))]
            let to_mpi = Some((proxies, incoming));
            if let Some((outgoing, incoming)) = to_mpi {
                ranks.attach(super::transport::Attachment { outgoing, incoming }).map_err(EngineError::Config)?;
            }
        }
        #[cfg(not(feature = "mpi"))]
        drop(proxies);
        let mut pipeline = Self {
            model_name: model.name(),
            batch_check: model.batch_check(),
            integer_targets: model.loss().needs_integer_targets(),
            partition,
            schedule: Arc::new(schedule),
            microbatches: config.microbatches,
            lr: config.lr,
            grad_clip: config.grad_clip,
            optimizer: config.optimizer,
            seed: config.seed,
            param_names: crate::layer::unique_params(&layers).into_iter().map(|p| p.name).collect(),
            stages: config.stages,
            replicas,
            reduce,
            inboxes,
            reports,
            handles,
            tied,
            tied_shapes,
            world,
            local,
            hand_offs,
            #[cfg(feature = "nccl")]
            _nccl: nccl,
            step: 0,
            stopped: None,
        };
        // Building layers can fail (e.g. a wrong shape in `initial_params`); surface it now.
        let local_slots: Vec<usize> = (0..slots).filter(|&s| pipeline.local[s]).collect();
        for s in local_slots {
            let (tx, rx) = unbounded();
            pipeline.send(s, Msg::Ping { reply: tx })?;
            if rx.recv().is_err() {
                return Err(pipeline.stage_gone(s));
            }
        }
        // Every rank's stages are built before any rank trains.
        pipeline.world.barrier().map_err(EngineError::Config)?;
        Ok(pipeline)
    }

    /// The layers of each model chunk (one chunk per stage without virtual stages; which
    /// device holds which chunk is [`Schedule::placement`]).
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// How many stages (devices, threads) one replica of the pipeline runs.
    pub(super) fn stage_count(&self) -> usize {
        self.stages
    }

    /// How many data-parallel replicas of the pipeline run (1 without data parallelism).
    pub fn data_parallel(&self) -> usize {
        self.replicas
    }

    /// The stages of replica 0 this process runs (all of them but under MPI; none on the ranks
    /// of other replicas): the ones that evaluate and write checkpoints.
    pub(super) fn local_stages(&self) -> Vec<usize> {
        (0..self.stage_count()).filter(|&s| self.local[s]).collect()
    }

    /// A `gather` list over the slots of the first `replicas` replicas (stage `s` of replica `r`
    /// is slot `r × stages + s`), waiting for this process's stages (the others are accounted
    /// for). A step waits for every replica; evaluation runs on replica 0 alone.
    fn pending_local(&self, replicas: usize) -> Vec<bool> {
        (0..self.stages * replicas).map(|slot| !self.local[slot]).collect()
    }

    /// How hand-offs between ranks travel: "in process", "NCCL from cuda:N", or "MPI byte
    /// messages (why not NCCL)".
    pub fn hand_offs(&self) -> &str {
        &self.hand_offs
    }

    /// The processes this pipeline runs in.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Whether this process prints and writes the run's shared files (rank 0; always in one process).
    pub fn is_lead_process(&self) -> bool {
        self.world.is_lead()
    }

    /// Refuses what only one process can do (its stages' outputs stay on their ranks).
    fn single_process(&self, what: &str) -> Result<()> {
        if self.world.is_distributed() {
            return Err(EngineError::Config(format!(
                "{what} runs in one process; across MPI ranks brigade trains, evaluates and saves checkpoints"
            )));
        }
        Ok(())
    }

    fn collective_error(why: String) -> EngineError {
        EngineError::Config(format!("MPI collective failed: {why}"))
    }

    /// Sends every stage of replica 0 its message of a step, `msg(stage)` (see
    /// [`Pipeline::fan_out_replicas`]).
    fn fan_out(&mut self, mut msg: impl FnMut(usize) -> Msg) -> Result<()> {
        self.fan_out_replicas(1, |_, s| msg(s))
    }

    /// Sends every stage of the first `replicas` replicas its message of a step,
    /// `msg(replica, stage)`, the device holding the first chunk (the one with the inputs)
    /// last, so no stage receives data before its own step message (stages buffer early data
    /// anyway).
    fn fan_out_replicas(&mut self, replicas: usize, mut msg: impl FnMut(usize, usize) -> Msg) -> Result<()> {
        let (first, _) = self.entry_and_exit();
        for r in 0..replicas {
            let mine: Vec<usize> = (0..self.stages).filter(|&s| self.local[r * self.stages + s]).collect();
            for s in mine.iter().copied().filter(|&s| s != first).chain(Some(first).filter(|f| mine.contains(f))) {
                let message = msg(r, s);
                self.send(r * self.stages + s, message)?;
            }
        }
        Ok(())
    }

    /// The devices holding the first chunk (which gets the inputs) and the last (the targets).
    fn entry_and_exit(&self) -> (usize, usize) {
        let placement = self.schedule.placement();
        (placement.first().copied().unwrap_or(0), placement.last().copied().unwrap_or(0))
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
        let (m, replicas) = (self.microbatches, self.replicas);
        self.check_labelled_batch(inputs, targets, replicas * m)?;
        // Replica r trains on micro-batches r·m .. (r+1)·m: its contiguous slice of the batch.
        // Every micro-batch's loss is weighted by the global batch's terms, so the replicas'
        // summed gradients are the global batch's.
        let input_chunks = split_batch(inputs, replicas * m)?;
        let target_chunks = split_batch(targets, replicas * m)?;
        let global_terms = loss_terms(targets);
        let lr = self.lr.lr(self.step);
        let stages = self.stage_count();
        let slots = self.inboxes.len();
        let (first, last) = self.entry_and_exit();
        let schedule = self.schedule.clone();
        self.fan_out_replicas(replicas, |r, s| Msg::Train {
            schedule: schedule.clone(),
            inputs: if s == first { input_chunks[r * m..(r + 1) * m].to_vec() } else { Vec::new() },
            targets: if s == last { target_chunks[r * m..(r + 1) * m].to_vec() } else { Vec::new() },
            global_terms,
            lr,
        })?;

        // The collective: sum tied gradients, compute the global norm once. Every replica's
        // stages report, but their gradients are already summed over the replicas (the same in
        // each), so replica 0's make the norm and the tied sums, and every replica gets them.
        let mut sq_norm = 0.0;
        let mut tied_sums: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut partial_from = self.pending_local(self.replicas);
        self.gather(&mut partial_from, |report| match report {
            Report::Partial { stage, .. } if stage >= stages => Ok(Some(stage)),
            Report::Partial { stage, tied_grads, sq_norm: s } => {
                sq_norm += s;
                // Summed on the device of the first copy to arrive (device to device on GPUs,
                // a peer copy between GPUs); each holder copies the sum back to its own device.
                // Each copy arrives as a hand-off: the summing stream waits for its sender first.
                for (name, grad) in tied_grads {
                    let sum = match tied_sums.remove(&name) {
                        Some(acc) => {
                            let grad = grad.receive(acc.device())?;
                            (acc + grad)?
                        }
                        None => grad.into_local(),
                    };
                    tied_sums.insert(name, sum);
                }
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        if self.world.is_distributed() {
            (sq_norm, tied_sums) = self.sum_over_ranks(sq_norm, tied_sums)?;
        }
        for grad in tied_sums.values() {
            sq_norm += squared_norm(grad)?;
        }
        let grad_norm = sq_norm.sqrt();
        let clip_scale = match self.grad_clip {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        let local_slots: Vec<usize> = (0..slots).filter(|&slot| self.local[slot]).collect();
        for slot in local_slots {
            let s = slot % stages;
            let tied_grads =
                self.tied
                    .iter()
                    .filter(|(_, holders)| holders.contains(&s))
                    .map(|(name, _)| {
                        let sum = tied_sums.get(name).cloned().ok_or_else(|| {
                            EngineError::Config(format!("no gradient arrived for tied parameter {name}"))
                        })?;
                        Ok((name.clone(), HandOff::send(sum)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
            self.send(slot, Msg::Reduced { tied_grads, clip_scale })?;
        }

        let mut done = self.pending_local(self.replicas);
        let mut loss = 0.0;
        let mut stage_busy = vec![Duration::ZERO; stages];
        let mut stage_actions = vec![Vec::new(); stages];
        let mut peak_stash_bytes = vec![0; stages];
        self.gather(&mut done, |report| match report {
            Report::Done { stage, outcome, .. } if stage >= stages => {
                // Another replica's share of the (global-batch weighted) loss.
                loss += outcome.loss;
                Ok(Some(stage))
            }
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
        if self.world.is_distributed() {
            // The loss lives on the last stage's rank; busy times and stash peaks on each stage's.
            let mut values = vec![loss];
            values.extend(stage_busy.iter().map(|b| b.as_secs_f64()));
            values.extend(peak_stash_bytes.iter().map(|&b| b as f64));
            let sums = self.world.sum_f64(values).map_err(Self::collective_error)?;
            loss = sums[0];
            for s in (0..stages).filter(|&s| !self.local[s]) {
                stage_busy[s] = Duration::from_secs_f64(sums[1 + s].max(0.0));
                peak_stash_bytes[s] = sums[1 + stages + s] as u64;
            }
        }
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
        self.check_labelled_batch(inputs, targets, self.microbatches)?;
        let batch = inputs.dim(0)?;
        let m = if batch % self.microbatches == 0 { self.microbatches } else { 1 };
        let stages = self.stage_count();
        let schedule = Arc::new(Schedule::forward_only_on(self.schedule.placement(), stages, m)?);
        let input_chunks = split_batch(inputs, m)?;
        let target_chunks = split_batch(targets, m)?;
        let (first, last) = self.entry_and_exit();
        self.fan_out(|s| Msg::Eval {
            schedule: schedule.clone(),
            inputs: if s == first { input_chunks.clone() } else { Vec::new() },
            targets: if s == last { target_chunks.clone() } else { Vec::new() },
        })?;
        let mut done = self.pending_local(1);
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
        if self.world.is_distributed() {
            let sums = self
                .world
                .sum_f64(vec![totals.loss, totals.correct as f64, totals.terms as f64])
                .map_err(Self::collective_error)?;
            (totals.loss, totals.correct, totals.terms) = (sums[0], sums[1] as usize, sums[2] as usize);
        }
        Ok(EvalStats { loss: totals.loss / totals.terms.max(1) as f64, correct: totals.correct, terms: totals.terms })
    }

    /// The model's outputs (logits) for `inputs`, computed forward-only in evaluation mode and
    /// pipelined over the same stages; micro-batched like training when the batch divides.
    pub fn predict(&mut self, inputs: &Tensor) -> Result<Tensor> {
        self.ensure_running()?;
        self.single_process("prediction")?;
        self.batch_check.check_batch(inputs, None).map_err(EngineError::Input)?;
        let batch = inputs.dim(0)?;
        if batch == 0 {
            return Err(EngineError::Input("cannot predict on an empty batch".into()));
        }
        let m = if batch % self.microbatches == 0 { self.microbatches } else { 1 };
        let stages = self.stage_count();
        let schedule = Arc::new(Schedule::forward_only_on(self.schedule.placement(), stages, m)?);
        let input_chunks = split_batch(inputs, m)?;
        let (first, _) = self.entry_and_exit();
        self.fan_out(|s| Msg::Predict {
            schedule: schedule.clone(),
            inputs: if s == first { input_chunks.clone() } else { Vec::new() },
        })?;
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

    /// Incremental decoding with the layers' KV caches: `inputs` holds only the new positions
    /// `offset..offset + T_new` of the sequences (`(B, T_new)` token ids), whose earlier
    /// positions went through earlier calls; `offset` 0 starts new sequences. Returns the new
    /// positions' outputs (logits `(B, T_new, V)`). Each stage keeps the cache of its own
    /// layers, so a split model decodes across its stages like any forward. The batch is one
    /// micro-batch; the model must support [`crate::Layer::forward_incremental`].
    pub fn decode(&mut self, inputs: &Tensor, offset: usize) -> Result<Tensor> {
        self.ensure_running()?;
        self.single_process("decoding")?;
        self.batch_check.check_batch(inputs, None).map_err(EngineError::Input)?;
        if inputs.dim(0)? == 0 {
            return Err(EngineError::Input("cannot decode an empty batch".into()));
        }
        let stages = self.stage_count();
        // The ids go to the device holding chunk 0, which is not device 0 under every placement.
        let (first, _) = self.entry_and_exit();
        self.fan_out(|s| Msg::Decode { input: (s == first).then(|| inputs.clone()), offset })?;
        let mut done = vec![false; stages];
        let mut output = None;
        self.gather(&mut done, |report| match report {
            Report::Done { stage, outcome, .. } => {
                if let Some((_, t)) = outcome.outputs.into_iter().next() {
                    output = Some(t);
                }
                Ok(Some(stage))
            }
            _ => Ok(None),
        })?;
        output.ok_or_else(|| EngineError::Config("the last stage returned no decoding output".into()))
    }

    /// Every parameter, copied to the CPU, by canonical name (tied copies once).
    pub fn parameters(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.snapshot(SnapshotKind::Params)
    }

    /// Each stage's own copy of every parameter, for checking that tied copies agree.
    pub fn parameters_by_stage(&mut self) -> Result<Vec<BTreeMap<String, Tensor>>> {
        self.snapshot_by_stage(SnapshotKind::Params)
    }

    /// Gradients of the last step (tied copies summed, before clipping), by name; a step that
    /// starts drops them.
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
        self.single_process("gathering parameters, gradients or optimizer state")?;
        self.snapshot_slots(kind, 0..self.stage_count())
    }

    /// Each replica's parameters (every stage's, tied copies once), replica by replica: data
    /// parallelism keeps them bit-identical.
    pub fn replica_parameters(&mut self) -> Result<Vec<BTreeMap<String, Tensor>>> {
        let stages = self.stage_count();
        (0..self.replicas)
            .map(|r| {
                let mut merged = BTreeMap::new();
                for stage in self.snapshot_slots(SnapshotKind::Params, r * stages..(r + 1) * stages)? {
                    for (name, t) in stage {
                        merged.entry(name).or_insert(t);
                    }
                }
                Ok(merged)
            })
            .collect()
    }

    fn snapshot_slots(
        &mut self,
        kind: SnapshotKind,
        slots: std::ops::Range<usize>,
    ) -> Result<Vec<BTreeMap<String, Tensor>>> {
        self.ensure_running()?;
        let mut out = Vec::with_capacity(slots.len());
        for s in slots {
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

    pub(super) fn ensure_running(&self) -> Result<()> {
        match &self.stopped {
            Some(why) => Err(EngineError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    /// The driver's own checks of a training or evaluation batch (a batch dimension shared by
    /// inputs and targets, divisible into `parts` micro-batches; integer targets for the loss),
    /// then the model's.
    fn check_labelled_batch(&self, inputs: &Tensor, targets: &Tensor, parts: usize) -> Result<()> {
        let batch = inputs.dim(0).map_err(|_| EngineError::Input("inputs must have a batch dimension".into()))?;
        if targets.dims().first() != Some(&batch) {
            return Err(EngineError::Input(format!(
                "inputs have batch size {batch} but targets have shape {:?}",
                targets.dims()
            )));
        }
        if batch % parts != 0 {
            return Err(EngineError::Input(if self.replicas > 1 && parts != self.microbatches {
                format!(
                    "batch size {batch} is not divisible into {} data-parallel replicas x {} micro-batches ({parts})",
                    self.replicas, self.microbatches
                )
            } else {
                format!("batch size {batch} is not divisible into {parts} micro-batches")
            }));
        }
        if self.integer_targets && !is_integer(targets.dtype()) {
            return Err(EngineError::Input(format!(
                "targets must be integer class or token ids, got {:?}",
                targets.dtype()
            )));
        }
        self.batch_check.check_batch(inputs, Some(targets)).map_err(EngineError::Input)
    }

    pub(super) fn send(&mut self, stage: usize, msg: Msg) -> Result<()> {
        if self.inboxes[stage].send(msg).is_err() {
            return Err(self.stop(Some((stage, None, "stage thread is gone".to_string()))));
        }
        Ok(())
    }

    /// Receives reports until every stage marked `false` in `pending` has been accounted for
    /// by `accept` (which returns the stage it accounts for). A failure report aborts all.
    fn gather(&mut self, pending: &mut [bool], mut accept: impl FnMut(Report) -> Result<Option<usize>>) -> Result<()> {
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

    /// The end-of-step collective across ranks: this rank's partial (its stages' squared norms,
    /// its tied gradient sums) summed with every other rank's. Tied gradients travel as one
    /// f32 vector in name order, zeros where this rank holds no copy; with two holders the sum
    /// is the one a single process computes, bit for bit (a + b = b + a).
    fn sum_over_ranks(
        &self,
        sq_norm: f64,
        mut tied_sums: BTreeMap<String, Tensor>,
    ) -> Result<(f64, BTreeMap<String, Tensor>)> {
        let sq_norm = self.world.sum_f64(vec![sq_norm]).map_err(Self::collective_error)?[0];
        if self.tied_shapes.is_empty() {
            return Ok((sq_norm, tied_sums));
        }
        let mut flat: Vec<f32> = Vec::new();
        for (name, shape) in &self.tied_shapes {
            match tied_sums.remove(name) {
                Some(sum) if sum.dtype() == DType::F32 => {
                    flat.extend(sum.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
                }
                Some(sum) => {
                    return Err(EngineError::Config(format!(
                        "tied gradient {name} is {:?}; across ranks tied gradients are summed in f32",
                        sum.dtype()
                    )))
                }
                None => flat.extend(std::iter::repeat_n(0f32, shape.iter().product())),
            }
        }
        let flat = self.world.sum_f32(flat).map_err(Self::collective_error)?;
        let mut offset = 0;
        let mut sums = BTreeMap::new();
        for (name, shape) in &self.tied_shapes {
            let len: usize = shape.iter().product();
            let values = flat.get(offset..offset + len).ok_or_else(|| Self::collective_error("short sum".into()))?;
            sums.insert(name.clone(), Tensor::from_slice(values, shape.as_slice(), &candle_core::Device::Cpu)?);
            offset += len;
        }
        Ok((sq_norm, sums))
    }

    /// Aborts every stage, joins the threads, and returns the error naming the first failure.
    fn stop(&mut self, failure: Option<(usize, Option<Action>, String)>) -> EngineError {
        for inbox in &self.inboxes {
            let _ = inbox.send(Msg::Abort);
        }
        // Stages waiting for their other replicas' gradients wake too.
        if let Some(reduce) = &self.reduce {
            reduce.abort();
        }
        // Failures the driver inferred (a thread gone, an abort) give way to a stage's own report.
        let synthetic = |m: &str| {
            m == "aborted"
                || m == "stage thread is gone"
                || m == "stage thread ended unexpectedly"
                || m == "all stage threads are gone"
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
        let (slot, action, message) = first.unwrap_or((0, None, "unknown failure".into()));
        // Reports name slots; the error names the stage, and its replica when there are several.
        let stage = slot % self.stages.max(1);
        let message = if self.replicas > 1 {
            format!("data-parallel replica {}: {message}", slot / self.stages.max(1))
        } else {
            message
        };
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
        // No step is in flight between calls; should one be (a caller unwinding mid-step),
        // stages waiting for their other replicas must not keep the join waiting.
        if let Some(reduce) = &self.reduce {
            reduce.abort();
        }
        for handle in self.handles.iter_mut() {
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn split_batch(t: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
    let batch = t.dim(0)?;
    let size = batch / parts;
    (0..parts).map(|i| Ok(t.narrow(0, i * size, size)?)).collect()
}
