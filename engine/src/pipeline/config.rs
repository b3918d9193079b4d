//! What shapes a pipeline: stage count, data-parallel replicas, partition, schedule,
//! micro-batches, optimizer, learning rate, thread budget, initial state and recomputation, with
//! a builder-style API.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::threads::ThreadPools;
use super::transport::World;
use crate::compute::Recompute;
use crate::device::StageDevice;
use crate::optim::{LrSchedule, OptimizerConfig, ParamState};
use crate::partition::PartitionStrategy;
use crate::schedule::{Schedule, ScheduleKind};

/// Which schedule a pipeline runs.
#[derive(Debug, Clone)]
pub enum ScheduleChoice {
    /// A built-in generator, instantiated for the pipeline's stages and micro-batches, with
    /// its default chunks per device.
    Kind(ScheduleKind),
    /// A built-in generator with `v` chunks per device (interleaved 1F1B's v, zb-auto's 1 or 2).
    Virtual(ScheduleKind, usize),
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

/// Everything that shapes a pipeline, with a builder-style API.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub stages: usize,
    /// Data parallelism: the pipeline is replicated this many times (threads of this process),
    /// each replica training on its contiguous slice of the global batch with the same
    /// schedule; each stage's gradients are summed over its replicas once per step (see
    /// `pipeline::replicas`). The global batch must divide by `data_parallel × microbatches`.
    /// Default 1 (one pipeline).
    pub data_parallel: usize,
    pub partition: PartitionStrategy,
    pub schedule: ScheduleChoice,
    pub microbatches: usize,
    pub optimizer: OptimizerConfig,
    pub lr: LrSchedule,
    /// Clip the global gradient norm (over all stages) to this value.
    pub grad_clip: Option<f64>,
    /// CPU threads each stage may use for its math; default: cores / stages (at least 1).
    pub threads_per_stage: Option<usize>,
    /// One pool of threads per stage (the default) or one for all stages (idle stages lend
    /// their cores; [`ThreadPools`] says when that pays).
    pub thread_pools: ThreadPools,
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
    /// The device of each stage (one per stage); empty: every stage on the CPU. With data
    /// parallelism, either one per stage (every replica's copy of a stage on it) or one per
    /// stage of every replica, replica by replica (`data_parallel × stages`).
    pub devices: Vec<StageDevice>,
    /// The dtype layers compute in. F32 (the default) is the exactness mode. BF16 or F16 is
    /// mixed precision: the forward and backward run in it, while the master weights, the
    /// optimizer state and the gradient sums stay f32 (checkpoints hold the f32 masters).
    pub compute_dtype: DType,
    /// Debug: every stage synchronises its device after every action, so no hand-off between
    /// streams can race (see `pipeline::handoff`). Slower; to bisect a numerical surprise on a
    /// GPU. No effect on the CPU. The CLI sets it from `BRIGADE_SYNC_EACH_ACTION=1`.
    pub sync_each_action: bool,
    /// The processes the stages run in: this one (the default) or MPI ranks (`mpi` feature),
    /// each rank running the stages it owns.
    pub world: World,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stages: 2,
            data_parallel: 1,
            partition: PartitionStrategy::Uniform,
            schedule: ScheduleChoice::Kind(ScheduleKind::OneFOneB),
            microbatches: 4,
            optimizer: OptimizerConfig::adamw(),
            lr: LrSchedule::constant(1e-3),
            grad_clip: Some(1.0),
            threads_per_stage: None,
            thread_pools: ThreadPools::PerStage,
            seed: 0,
            initial_params: HashMap::new(),
            initial_buffers: HashMap::new(),
            initial_optimizer_state: HashMap::new(),
            checkpoint: None,
            recompute: Recompute::Off,
            devices: Vec::new(),
            compute_dtype: DType::F32,
            sync_each_action: false,
            world: World::Local,
        }
    }
}

impl PipelineConfig {
    /// Runs this process's share of the stages of a multi-process job.
    pub fn world(mut self, world: World) -> Self {
        self.world = world;
        self
    }

    pub fn stages(mut self, stages: usize) -> Self {
        self.stages = stages;
        self
    }
    /// Replicate the pipeline `replicas` times (see [`PipelineConfig::data_parallel`]).
    pub fn data_parallel(mut self, replicas: usize) -> Self {
        self.data_parallel = replicas;
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
    pub fn thread_pools(mut self, pools: ThreadPools) -> Self {
        self.thread_pools = pools;
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

    /// One device per stage (see [`StageDevice`]).
    pub fn devices(mut self, devices: Vec<StageDevice>) -> Self {
        self.devices = devices;
        self
    }

    /// The dtype layers compute in (see [`PipelineConfig::compute_dtype`]).
    pub fn compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Synchronise every stage's device after every action (see [`PipelineConfig::sync_each_action`]).
    pub fn sync_each_action(mut self, on: bool) -> Self {
        self.sync_each_action = on;
        self
    }

    /// Activation recomputation for every stage.
    pub fn recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }
}
