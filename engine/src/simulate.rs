//! The simulator: predicts a schedule's step time, each stage's busy and idle time, and each
//! stage's peak memory from a [`Profile`] and a [`Partition`], before anything runs.
//!
//! Timing is the schedule module's event-driven simulation (the validator's own), run with
//! per-stage costs: an action starts when its stage is free and its inputs have arrived, where
//! a message arrives one hop after the action that sent it. After the last action, every stage
//! takes its optimizer step (in parallel, after the gradient-norm collective), so
//! `step = makespan + max(optimizer time) + the profile's per-step overhead`. The profile's
//! per-micro-batch overhead (a stage's messages and bookkeeping around its layers) is split
//! evenly between each chunk's forward and its backward.
//!
//! Costs are per model chunk (one per stage without virtual stages); times and memory are
//! summed per device following the schedule's routing table.
//!
//! Stages on one machine slow each other ([`Contention`]): an action timed alone in the
//! profile runs slower while other stages compute, because they share the machine's memory
//! bandwidth and caches, and, when there are more stage threads than cores, the cores
//! themselves. The profile measures the first (its layers run alone, then with copies of the
//! same work on the other cores); the second follows from the core count. The simulation then
//! runs each action at the rate the number of stages computing at that moment allows, so a
//! bubble, where a stage runs alone, is fast and the steady state is slow, as on the machine.
//!
//! Messages cross links ([`Link`]: `latency + bytes / bandwidth`, per [`LinkKind`]: in-process,
//! shared memory, NVLink, PCIe, InfiniBand, Ethernet). A [`Cluster`] lays `data_parallel`
//! replicas of the pipeline on nodes, so which link each hand-off crosses follows from the
//! layout ([`StageCosts::place_on`]); with data parallelism each device all-reduces its
//! gradients in a ring across its replicas once its last action is done, before the optimizer
//! steps. By default (one replica, stage threads of one process) a hand-off costs the
//! profile's measured hop, as it always has. Links are not shared: two messages on one link at
//! once each get its full bandwidth.
//!
//! Memory follows each device's action order, exactly as the executor counts it: parameters,
//! gradients and optimizer state are always held (a parameter two chunks of one device share,
//! such as GPT's tied embedding under ZB-V, once); a forward stashes one micro-batch's
//! activations of its chunk until its `B` or `I`; an `I` keeps what its `W` needs (the
//! weight-gradient inputs) until the `W`. With activation recomputation a micro-batch stashes
//! only the chunk's input, each `I` reruns the forward first (its time is added to `I`), and
//! the rerun briefly holds one micro-batch's full activations.

use crate::compute::Recompute;
use crate::error::{EngineError, Result};
use crate::partition::Partition;
use crate::profile::{HopProfile, Profile};
use crate::schedule::{Action, ActionCosts, ActionKind, CostModel, GreedyCosts, Schedule, ScheduleKind, Timeline};

/// Per-chunk costs of one layout (chunk = stage without virtual stages): what the simulator
/// runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct StageCosts {
    /// Seconds per micro-batch, per chunk.
    pub forward: Vec<f64>,
    pub backward_input: Vec<f64>,
    pub backward_weight: Vec<f64>,
    /// Seconds per step (gradient norm and optimizer update), per stage.
    pub optimizer: Vec<f64>,
    /// Seconds for stage `s`'s activation to reach stage `s + 1` (unused on the last stage).
    pub send_forward: Vec<f64>,
    /// Seconds for stage `s`'s input gradient to reach stage `s - 1` (unused on the first).
    pub send_backward: Vec<f64>,
    /// Parameters + gradients + optimizer state, bytes, per stage.
    pub static_bytes: Vec<u64>,
    /// Activation bytes one micro-batch keeps stashed between its forward and backward.
    pub stash_bytes: Vec<u64>,
    /// Bytes an `I` keeps for its `W` (weight-gradient inputs), per micro-batch.
    pub weight_stash_bytes: Vec<u64>,
    /// What a micro-batch's stash and its `I`'s keep grow by when the chunk's backward is
    /// split into `I` and `W` (a fused loss's deferred weight gradient), per chunk.
    pub split_extra_bytes: Vec<u64>,
    pub split_weight_stash_extra_bytes: Vec<u64>,
    /// What a chunk's layers keep all step beyond their parameters (a transposed weight), per
    /// chunk: in `static_bytes`, and added to a device's parameters by
    /// [`StageCosts::device_static_bytes`].
    pub kept_bytes: Vec<u64>,
    /// Parameter bytes by name, per chunk (empty for the uniform model), so that a device
    /// holding two chunks that share a parameter counts it once.
    pub params: Vec<std::collections::BTreeMap<String, u64>>,
    /// Optimizer-state bytes per parameter byte.
    pub optimizer_state_ratio: u64,
    /// With activation recomputation: the full activations of the one micro-batch whose
    /// forward is being rerun for its backward (held briefly on top of the others' stashes);
    /// 0 without.
    pub recompute_bytes: Vec<u64>,
    /// Seconds a step costs beyond its actions and optimizer steps (the driver's batch split
    /// and messages, the gradient-norm collective): the profile's `overhead.step_s`.
    pub step_overhead: f64,
    /// Bytes each hand-off carries, the links they cross and the data-parallel all-reduce:
    /// what [`StageCosts::place_on`] sets from a [`Cluster`].
    pub comm: Communication,
    /// How stages computing at once slow each other ([`Contention::NONE`]: not at all).
    pub contention: Contention,
}

/// How much slower each stage's actions run while other stages compute at the same time on
/// one machine: [`Contention::slowdown`] of the number computing. Two parts multiply:
/// - sharing memory bandwidth and caches: `factor`, measured by the profile with `copies`
///   stages' worth of the same work running at once on their own threads
///   ([`crate::profile::ContentionProfile`]); between one stage (1) and `copies` it grows
///   linearly, and stays at `factor` beyond (the cores are then all busy);
/// - time-sharing the cores: `running × threads_per_stage / cores` when that exceeds 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Contention {
    /// Cores the stages' threads run on; 0 when unknown (no time-sharing is modelled).
    pub cores: usize,
    /// Threads each stage computes with.
    pub threads_per_stage: usize,
    /// How many times slower an action ran with `copies` stages computing at once, beyond
    /// what time-sharing the cores explains (at least 1).
    pub factor: f64,
    /// Stages computing at once when `factor` was measured (at least 2).
    pub copies: usize,
}

impl Contention {
    /// Stages that never slow each other: the textbook model of independent devices.
    pub const NONE: Contention = Contention { cores: 0, threads_per_stage: 1, factor: 1.0, copies: 2 };

    /// From a profile: its measured factor (1 when it has none, e.g. a GPU's or an old
    /// profile's) and its machine's cores.
    pub fn from_profile(profile: &Profile) -> Contention {
        match &profile.contention {
            Some(c) => Contention {
                cores: profile.cores,
                threads_per_stage: profile.threads.max(1),
                factor: c.factor(),
                copies: c.copies.max(2),
            },
            None => Contention { cores: profile.cores, threads_per_stage: profile.threads.max(1), ..Contention::NONE },
        }
    }

    /// How many times slower each action runs while `running` stages compute at once.
    pub fn slowdown(&self, running: usize) -> f64 {
        if running <= 1 {
            return 1.0;
        }
        let reach = (running.min(self.copies) - 1) as f64 / (self.copies.max(2) - 1) as f64;
        let shared = 1.0 + (self.factor.max(1.0) - 1.0) * reach;
        let demand = (running * self.threads_per_stage) as f64;
        let time_shared = if self.cores > 0 { (demand / self.cores as f64).max(1.0) } else { 1.0 };
        shared * time_shared
    }
}

impl StageCosts {
    /// The same `costs` on every one of `stages` stages, free messages, and one memory unit
    /// per stashed micro-batch: the textbook model the closed forms are stated in.
    pub fn uniform(stages: usize, costs: ActionCosts) -> StageCosts {
        StageCosts {
            forward: vec![costs.forward; stages],
            backward_input: vec![costs.backward_input; stages],
            backward_weight: vec![costs.backward_weight; stages],
            optimizer: vec![0.0; stages],
            send_forward: vec![0.0; stages],
            send_backward: vec![0.0; stages],
            static_bytes: vec![0; stages],
            stash_bytes: vec![1; stages],
            weight_stash_bytes: vec![0; stages],
            split_extra_bytes: vec![0; stages],
            split_weight_stash_extra_bytes: vec![0; stages],
            kept_bytes: vec![0; stages],
            params: Vec::new(),
            optimizer_state_ratio: 0,
            recompute_bytes: vec![0; stages],
            step_overhead: 0.0,
            comm: Communication::new(stages, HopProfile { latency_s: 0.0, copy_bytes_per_s: f64::INFINITY }),
            contention: Contention::NONE,
        }
    }

    /// Sums the profile's layers per stage of `partition`. Tied parameters held twice on one
    /// stage count once; a stage other than the first also stashes its received input.
    pub fn from_profile(profile: &Profile, partition: &Partition) -> Result<StageCosts> {
        Self::from_profile_with(profile, partition, Recompute::Off)
    }

    /// As [`StageCosts::from_profile`], with activation recomputation: a stage then stashes
    /// only its input, and each `I` (or `B`) first reruns the stage's forward.
    pub fn from_profile_with(profile: &Profile, partition: &Partition, recompute: Recompute) -> Result<StageCosts> {
        if partition.num_layers() != profile.layers.len() {
            return Err(EngineError::Config(format!(
                "partition {partition} covers {} layers but the profile of {} has {}",
                partition.num_layers(),
                profile.model,
                profile.layers.len()
            )));
        }
        let stages = partition.stages();
        let mut c = StageCosts {
            forward: vec![0.0; stages],
            backward_input: vec![0.0; stages],
            backward_weight: vec![0.0; stages],
            optimizer: vec![0.0; stages],
            send_forward: vec![0.0; stages],
            send_backward: vec![0.0; stages],
            static_bytes: vec![0; stages],
            stash_bytes: vec![0; stages],
            weight_stash_bytes: vec![0; stages],
            split_extra_bytes: vec![0; stages],
            split_weight_stash_extra_bytes: vec![0; stages],
            kept_bytes: vec![0; stages],
            params: vec![Default::default(); stages],
            optimizer_state_ratio: profile.layers.first().map_or(0, |l| l.optimizer_state_ratio),
            recompute_bytes: vec![0; stages],
            step_overhead: profile.overhead.step_s,
            comm: Communication::new(stages, profile.hop.clone()),
            contention: Contention::from_profile(profile),
        };
        for (s, range) in partition.ranges().into_iter().enumerate() {
            let layers = &profile.layers[range.clone()];
            c.forward[s] = layers.iter().map(|l| l.forward_s).sum();
            c.backward_input[s] = layers.iter().map(|l| l.backward_input_s).sum();
            c.backward_weight[s] = layers.iter().map(|l| l.backward_weight_s).sum();
            c.optimizer[s] = layers.iter().map(|l| l.optimizer_s).sum();
            (c.static_bytes[s], c.stash_bytes[s]) = range_memory(profile, range.clone());
            c.weight_stash_bytes[s] = layers.iter().map(|l| l.weight_stash_bytes).sum();
            c.split_extra_bytes[s] = layers.iter().map(|l| l.split_extra_bytes).sum();
            c.split_weight_stash_extra_bytes[s] = layers.iter().map(|l| l.split_weight_stash_extra_bytes).sum();
            c.kept_bytes[s] = layers.iter().map(|l| l.kept_bytes).sum();
            for l in layers {
                c.params[s].extend(l.params.iter().map(|(n, b)| (n.clone(), *b)));
            }
            let input = if range.start > 0 { profile.layers[range.start - 1].output_bytes } else { 0 };
            if recompute == Recompute::Full {
                c.backward_input[s] += c.forward[s];
                c.recompute_bytes[s] = c.stash_bytes[s];
                c.stash_bytes[s] = input;
            }
            // A stage's fixed cost per micro-batch, half with the forward, half with the backward.
            c.forward[s] += profile.overhead.microbatch_s / 2.0;
            c.backward_input[s] += profile.overhead.microbatch_s / 2.0;
            let out_bytes = layers.last().map_or(0, |l| l.output_bytes);
            c.send_forward[s] = profile.hop.cost(out_bytes);
            c.send_backward[s] = profile.hop.cost(input);
            c.comm.forward_bytes[s] = out_bytes;
            c.comm.backward_bytes[s] = input;
        }
        Ok(c)
    }

    /// Prices every hand-off and the gradient all-reduce on `cluster`, the chunks placed on
    /// stages by `placement` (the schedule's routing table) and the stages on devices by the
    /// cluster: a hand-off between two chunks on different stages costs the link between their
    /// devices (`latency + bytes / bandwidth`); with data parallelism each device all-reduces
    /// its gradients (as many bytes as its parameters) in a ring across its replicas.
    /// [`Cluster::default`] (one in-process replica) leaves the costs as the profile gave them.
    pub fn place_on(&mut self, placement: &[usize], cluster: &Cluster) -> Result<()> {
        let chunks = self.stages();
        if placement.len() != chunks {
            return Err(EngineError::Config(format!(
                "a routing table of {} chunks for costs of {chunks}",
                placement.len()
            )));
        }
        let stages = placement.iter().max().map_or(0, |&s| s + 1);
        cluster.check(stages)?;
        let hop = self.comm.hop.clone();
        for c in 0..chunks {
            if c + 1 < chunks && placement[c] != placement[c + 1] {
                let bytes = self.comm.forward_bytes[c];
                let link = cluster.handoff_link(placement[c], placement[c + 1], stages, bytes, &hop);
                self.send_forward[c] = link.transfer(bytes);
                self.comm.forward_link[c] = Some(link.kind);
            }
            if c > 0 && placement[c] != placement[c - 1] {
                let bytes = self.comm.backward_bytes[c];
                let link = cluster.handoff_link(placement[c], placement[c - 1], stages, bytes, &hop);
                self.send_backward[c] = link.transfer(bytes);
                self.comm.backward_link[c] = Some(link.kind);
            }
        }
        let replicas = cluster.data_parallel;
        self.comm.data_parallel = replicas;
        self.comm.all_reduce_bytes = self.device_param_bytes(placement, stages);
        self.comm.all_reduce_link = Vec::with_capacity(stages);
        self.comm.all_reduce_s = Vec::with_capacity(stages);
        for d in 0..stages {
            let link = cluster.all_reduce_link(d, stages, &hop);
            self.comm.all_reduce_link.push((replicas > 1).then_some(link.kind));
            self.comm.all_reduce_s.push(link.ring_all_reduce(self.comm.all_reduce_bytes[d], replicas));
        }
        Ok(())
    }

    /// Parameter bytes each device holds (a parameter two of its chunks share, once): the
    /// size of its gradients.
    pub fn device_param_bytes(&self, placement: &[usize], devices: usize) -> Vec<u64> {
        let per_param = 2 + self.optimizer_state_ratio;
        (0..devices)
            .map(|d| {
                let chunks = (0..placement.len()).filter(|&c| placement[c] == d);
                if self.params.len() == self.stages() {
                    let mut held = std::collections::BTreeMap::new();
                    for c in chunks {
                        held.extend(self.params[c].iter().map(|(n, b)| (n.as_str(), *b)));
                    }
                    held.values().sum::<u64>()
                } else {
                    chunks
                        .map(|c| self.static_bytes[c].saturating_sub(self.kept_bytes.get(c).copied().unwrap_or(0)))
                        .sum::<u64>()
                        / per_param
                }
            })
            .collect()
    }

    /// Chunks (stages without virtual stages) the costs are for.
    pub fn stages(&self) -> usize {
        self.forward.len()
    }

    /// Parameters + gradients + optimizer state each device holds under `placement` (chunk →
    /// device), with what its layers keep all step: a parameter two of its chunks share
    /// counts once.
    pub fn device_static_bytes(&self, placement: &[usize], devices: usize) -> Vec<u64> {
        let params = self.device_param_bytes(placement, devices);
        (0..devices)
            .map(|d| {
                let chunks = (0..placement.len()).filter(|&c| placement[c] == d);
                if self.params.len() == self.stages() {
                    let kept: u64 = chunks.filter_map(|c| self.kept_bytes.get(c)).sum();
                    params[d] * (2 + self.optimizer_state_ratio) + kept
                } else {
                    chunks.map(|c| self.static_bytes[c]).sum()
                }
            })
            .collect()
    }

    /// What the zero-bubble scheduler needs: these costs under the routing table `placement`,
    /// and each device's room for stashes within `memory_limit` bytes (unlimited without).
    pub fn greedy_costs(&self, placement: &[usize], devices: usize, memory_limit: Option<u64>) -> GreedyCosts {
        let statics = self.device_static_bytes(placement, devices);
        GreedyCosts {
            placement: placement.to_vec(),
            forward: self.forward.clone(),
            backward_input: self.backward_input.clone(),
            backward_weight: self.backward_weight.clone(),
            send_forward: self.send_forward.clone(),
            send_backward: self.send_backward.clone(),
            // As a split backward keeps them (a fused loss's deferred weight gradient): the
            // scheduler's schedules split, and for one that does not this errs on the safe side.
            stash: with_extra(&self.stash_bytes, &self.split_extra_bytes),
            weight_stash: with_extra(&self.weight_stash_bytes, &self.split_weight_stash_extra_bytes),
            limit: statics
                .iter()
                .map(|&s| memory_limit.map_or(f64::INFINITY, |l| l.saturating_sub(s) as f64))
                .collect(),
        }
    }

    /// Compute time of one micro-batch (forward + full backward) on stage `s`.
    pub fn microbatch_time(&self, s: usize) -> f64 {
        self.forward[s] + self.backward_input[s] + self.backward_weight[s]
    }
}

/// Memory of a stage holding `layers` of the profile: (parameters + gradients + optimizer
/// state, stash per micro-batch). Tied parameters used twice on the stage count once; a stage
/// that does not start at layer 0 also stashes the input it received.
pub fn range_memory(profile: &Profile, layers: std::ops::Range<usize>) -> (u64, u64) {
    let Some(held) = profile.layers.get(layers.clone()) else { return (u64::MAX, u64::MAX) };
    let mut params = std::collections::BTreeMap::new();
    for l in held {
        params.extend(l.params.iter().map(|(n, b)| (n.as_str(), *b)));
    }
    let param_bytes: u64 = params.values().sum();
    let ratio = held.first().map_or(0, |l| l.optimizer_state_ratio);
    let input = match layers.start {
        0 => 0,
        start => profile.layers[start - 1].output_bytes,
    };
    // Inside the stage, a layer that keeps its input (which the layer before did not keep as
    // its own) holds that tensor too; at the stage's start, `input` already counts it.
    let inner_inputs: u64 = held.iter().skip(1).map(|l| l.input_bytes_kept).sum();
    // What layers keep all step beyond their parameters (a transposed weight) is held like them.
    let kept: u64 = held.iter().map(|l| l.kept_bytes).sum();
    (param_bytes * (2 + ratio) + kept, held.iter().map(|l| l.activation_bytes).sum::<u64>() + inner_inputs + input)
}

impl CostModel for StageCosts {
    fn duration(&self, a: Action) -> f64 {
        let s = a.chunk;
        match a.kind {
            ActionKind::Forward => self.forward[s],
            ActionKind::Backward => self.backward_input[s] + self.backward_weight[s],
            ActionKind::BackwardInput => self.backward_input[s],
            ActionKind::BackwardWeight => self.backward_weight[s],
        }
    }

    fn transfer(&self, a: Action) -> f64 {
        match a.kind {
            ActionKind::Forward => self.send_forward[a.chunk],
            _ => self.send_backward[a.chunk],
        }
    }

    fn slowdown(&self, running: usize) -> f64 {
        self.contention.slowdown(running)
    }
}

/// What carries a message between two devices: a hand-off between stages, or a data-parallel
/// gradient all-reduce. Each kind has a default cost ([`LinkKind::default_cost`]) that a
/// [`LinkSpec`] can override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkKind {
    /// Stage threads of one process (today's executor): the profile's measured crossbeam hop.
    InProcess,
    /// Processes on one host through shared memory (MPI's shared-memory transport).
    SharedMemory,
    /// GPUs of one node through NVLink / NVSwitch.
    NvLink,
    /// GPUs (or a GPU and its host) through PCIe.
    Pcie,
    /// Nodes through InfiniBand (one NIC per GPU, as on a DGX H100).
    InfiniBand,
    /// Nodes through Ethernet (TCP).
    Ethernet,
}

impl LinkKind {
    pub const ALL: [LinkKind; 6] = [
        LinkKind::InProcess,
        LinkKind::SharedMemory,
        LinkKind::NvLink,
        LinkKind::Pcie,
        LinkKind::InfiniBand,
        LinkKind::Ethernet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LinkKind::InProcess => "in-process",
            LinkKind::SharedMemory => "shm",
            LinkKind::NvLink => "nvlink",
            LinkKind::Pcie => "pcie",
            LinkKind::InfiniBand => "infiniband",
            LinkKind::Ethernet => "ethernet",
        }
    }

    /// Default `(latency seconds, bytes per second one way)`; `None` for in-process, whose
    /// cost is the profile's measured hop. Peak figures from the vendors' data sheets, so the
    /// simulator is optimistic about bandwidth; latencies are what a library (NCCL, MPI) adds
    /// per message, a few microseconds:
    /// - shared memory: ~10 GB/s, 1 µs (one memory copy per message through a shared segment,
    ///   Open MPI's `sm` transport; an order of magnitude, not a data-sheet figure);
    /// - NVLink 4 on H100 SXM: 18 links, 900 GB/s both ways, so 450 GB/s per direction; 2 µs;
    /// - PCIe 5.0 x16: 32 GT/s × 16 lanes ≈ 64 GB/s per direction; 5 µs;
    /// - InfiniBand NDR: 400 Gb/s = 50 GB/s per port (one ConnectX-7 per GPU); 5 µs;
    /// - Ethernet: 100 GbE = 12.5 GB/s; 25 µs through the kernel's TCP stack.
    pub fn default_cost(self) -> Option<(f64, f64)> {
        match self {
            LinkKind::InProcess => None,
            LinkKind::SharedMemory => Some((1e-6, 10e9)),
            LinkKind::NvLink => Some((2e-6, 450e9)),
            LinkKind::Pcie => Some((5e-6, 64e9)),
            LinkKind::InfiniBand => Some((5e-6, 50e9)),
            LinkKind::Ethernet => Some((25e-6, 12.5e9)),
        }
    }
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LinkKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<LinkKind> {
        let kind = match s.trim().to_ascii_lowercase().as_str() {
            "in-process" | "inprocess" | "threads" => LinkKind::InProcess,
            "shm" | "shared-memory" => LinkKind::SharedMemory,
            "nvlink" => LinkKind::NvLink,
            "pcie" => LinkKind::Pcie,
            "infiniband" | "ib" => LinkKind::InfiniBand,
            "ethernet" | "eth" | "tcp" => LinkKind::Ethernet,
            other => {
                let names: Vec<&str> = LinkKind::ALL.iter().map(|k| k.name()).collect();
                return Err(EngineError::Config(format!(
                    "unknown link kind `{other}`; expected one of {}",
                    names.join(", ")
                )));
            }
        };
        Ok(kind)
    }
}

/// A link kind with optional overrides of its default cost, as the CLI takes it:
/// `KIND[:GBPS[:LATENCY_US]]`, e.g. `nvlink`, `infiniband:25` (HDR), `pcie:32:8`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    pub kind: LinkKind,
    /// Bytes per second one way (default: the kind's).
    pub bytes_per_s: Option<f64>,
    /// Seconds per message (default: the kind's).
    pub latency_s: Option<f64>,
}

impl LinkSpec {
    pub fn new(kind: LinkKind) -> LinkSpec {
        LinkSpec { kind, bytes_per_s: None, latency_s: None }
    }

    /// The link's cost; an in-process link without overrides costs what `hop` measured.
    pub fn resolve(&self, hop: &HopProfile) -> Link {
        let (latency, bandwidth) = self.kind.default_cost().unwrap_or((hop.latency_s, hop.copy_bytes_per_s));
        Link {
            kind: self.kind,
            latency_s: self.latency_s.unwrap_or(latency),
            bytes_per_s: self.bytes_per_s.unwrap_or(bandwidth),
        }
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if self.bytes_per_s.is_some() || self.latency_s.is_some() {
            let (latency, bandwidth) = self.kind.default_cost().unwrap_or((f64::NAN, f64::NAN));
            write!(f, ":{}", self.bytes_per_s.unwrap_or(bandwidth) / 1e9)?;
            if let Some(latency_s) = self.latency_s.or((!latency.is_nan()).then_some(latency)) {
                write!(f, ":{}", latency_s * 1e6)?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for LinkSpec {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<LinkSpec> {
        let mut parts = s.split(':');
        let kind: LinkKind = parts.next().unwrap_or_default().parse()?;
        let number = |what: &str, text: Option<&str>| -> Result<Option<f64>> {
            let Some(text) = text else { return Ok(None) };
            match text.trim().parse::<f64>() {
                Ok(x) if x.is_finite() && (x > 0.0 || (what == "latency" && x == 0.0)) => Ok(Some(x)),
                _ => Err(EngineError::Config(format!(
                    "link `{s}`: the {what} must be a {} number ({}), got `{text}`",
                    if what == "latency" { "non-negative" } else { "positive" },
                    if what == "latency" { "microseconds" } else { "GB/s" }
                ))),
            }
        };
        let bandwidth = number("bandwidth", parts.next())?;
        let latency = number("latency", parts.next())?;
        if parts.next().is_some() {
            return Err(EngineError::Config(format!(
                "link `{s}`: expected KIND[:GBPS[:LATENCY_US]], e.g. nvlink, infiniband:25, pcie:32:8"
            )));
        }
        Ok(LinkSpec { kind, bytes_per_s: bandwidth.map(|gb| gb * 1e9), latency_s: latency.map(|us| us * 1e-6) })
    }
}

/// A link's cost: a message of `b` bytes takes `latency_s + b / bytes_per_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub kind: LinkKind,
    pub latency_s: f64,
    pub bytes_per_s: f64,
}

impl Link {
    /// Seconds for one message of `bytes` (the same formula as [`HopProfile::cost`], so an
    /// in-process link reproduces the profile's hop exactly).
    pub fn transfer(&self, bytes: u64) -> f64 {
        self.latency_s + bytes as f64 / self.bytes_per_s.max(1.0)
    }

    /// Seconds for a ring all-reduce of `bytes` over `ranks`: a reduce-scatter and an
    /// all-gather, each `ranks - 1` steps of `bytes / ranks` per rank (Patarasuk and Yuan,
    /// "Bandwidth optimal all-reduce algorithms", 2009; NCCL's ring), so
    /// `2 (n-1) latency + 2 (n-1)/n × bytes / bandwidth`. Zero for one rank.
    pub fn ring_all_reduce(&self, bytes: u64, ranks: usize) -> f64 {
        if ranks <= 1 {
            return 0.0;
        }
        let n = ranks as f64;
        2.0 * (n - 1.0) * self.latency_s + 2.0 * (n - 1.0) / n * bytes as f64 / self.bytes_per_s.max(1.0)
    }
}

/// Which parallel dimension fills a node first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A replica's stages on consecutive devices (`device = replica × stages + stage`): hand-offs
    /// stay inside a node, the gradient all-reduce crosses nodes.
    PipelineInNode,
    /// A stage's replicas on consecutive devices (`device = stage × replicas + replica`): the
    /// all-reduce stays inside a node, hand-offs cross nodes (Megatron-LM's default order,
    /// data parallel inside pipeline parallel).
    DataParallelInNode,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::PipelineInNode => "pipeline-in-node",
            Placement::DataParallelInNode => "data-parallel-in-node",
        })
    }
}

impl std::str::FromStr for Placement {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Placement> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pipeline-in-node" | "pp-in-node" | "pp" => Ok(Placement::PipelineInNode),
            "data-parallel-in-node" | "dp-in-node" | "dp" => Ok(Placement::DataParallelInNode),
            other => Err(EngineError::Config(format!(
                "unknown placement `{other}`; expected pipeline-in-node (pp) or data-parallel-in-node (dp)"
            ))),
        }
    }
}

/// Where a job's devices are and what joins them: `data_parallel` replicas of a pipeline,
/// laid out on nodes of `devices_per_node` devices by `placement`; two devices of one node talk
/// over `intra_node`, of two nodes over `inter_node`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub data_parallel: usize,
    /// Devices per node; `None`: every device of the job is in one node.
    pub devices_per_node: Option<usize>,
    /// Nodes available; `None`: as many as the job needs.
    pub nodes: Option<usize>,
    pub placement: Placement,
    pub intra_node: LinkSpec,
    pub inter_node: LinkSpec,
}

impl Default for Cluster {
    /// Today's executor: one replica, every stage a thread of one process.
    fn default() -> Cluster {
        Cluster {
            data_parallel: 1,
            devices_per_node: None,
            nodes: None,
            placement: Placement::PipelineInNode,
            intra_node: LinkSpec::new(LinkKind::InProcess),
            inter_node: LinkSpec::new(LinkKind::InfiniBand),
        }
    }
}

impl Cluster {
    /// Checks that `stages × data_parallel` devices fit the nodes and that every link can join
    /// what it joins.
    pub fn check(&self, stages: usize) -> Result<()> {
        if self.data_parallel == 0 {
            return Err(EngineError::Config("data parallel needs at least one replica".into()));
        }
        if self.devices_per_node == Some(0) || self.nodes == Some(0) {
            return Err(EngineError::Config("a cluster needs at least one node of at least one device".into()));
        }
        let needed = stages * self.data_parallel;
        match (self.devices_per_node, self.nodes) {
            (Some(per_node), Some(nodes)) if needed > per_node * nodes => Err(EngineError::Config(format!(
                "{stages} stages x {} replicas need {needed} devices, but {nodes} nodes x {per_node} devices hold {}",
                self.data_parallel,
                per_node * nodes
            ))),
            (None, Some(nodes)) if nodes > 1 => {
                Err(EngineError::Config(format!("{nodes} nodes: say how many devices each holds (--gpus-per-node)")))
            }
            _ if self.inter_node.kind == LinkKind::InProcess && self.spans_nodes(stages) => Err(EngineError::Config(
                "nodes cannot be joined in-process: give the link between nodes (infiniband, ethernet, ...)".into(),
            )),
            _ => Ok(()),
        }
    }

    fn spans_nodes(&self, stages: usize) -> bool {
        self.devices_per_node.is_some_and(|g| stages * self.data_parallel > g)
    }

    /// The device replica `replica`'s stage `stage` runs on.
    pub fn device(&self, replica: usize, stage: usize, stages: usize) -> usize {
        match self.placement {
            Placement::PipelineInNode => replica * stages + stage,
            Placement::DataParallelInNode => stage * self.data_parallel + replica,
        }
    }

    pub fn node(&self, device: usize) -> usize {
        self.devices_per_node.map_or(0, |g| device / g.max(1))
    }

    fn link_between(&self, a: usize, b: usize, hop: &HopProfile) -> Link {
        if self.node(a) == self.node(b) {
            self.intra_node.resolve(hop)
        } else {
            self.inter_node.resolve(hop)
        }
    }

    /// The link a message of `bytes` from stage `from` to stage `to` crosses: the slowest over
    /// the replicas (a step waits for its slowest replica).
    pub fn handoff_link(&self, from: usize, to: usize, stages: usize, bytes: u64, hop: &HopProfile) -> Link {
        (0..self.data_parallel)
            .map(|r| self.link_between(self.device(r, from, stages), self.device(r, to, stages), hop))
            .max_by(|a, b| a.transfer(bytes).total_cmp(&b.transfer(bytes)))
            .unwrap_or_else(|| self.intra_node.resolve(hop))
    }

    /// The link stage `stage`'s gradient all-reduce runs on: between nodes when its replicas
    /// span more than one (a ring is as fast as its slowest hop).
    pub fn all_reduce_link(&self, stage: usize, stages: usize, hop: &HopProfile) -> Link {
        let first = self.node(self.device(0, stage, stages));
        let spans = (1..self.data_parallel).any(|r| self.node(self.device(r, stage, stages)) != first);
        if spans {
            self.inter_node.resolve(hop)
        } else {
            self.intra_node.resolve(hop)
        }
    }
}

/// What a layout sends, and over what, as [`StageCosts::place_on`] worked it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Communication {
    /// Bytes of chunk `c`'s activation sent to chunk `c + 1`, per micro-batch.
    pub forward_bytes: Vec<u64>,
    /// Bytes of chunk `c`'s input gradient sent to chunk `c - 1`, per micro-batch.
    pub backward_bytes: Vec<u64>,
    /// The link chunk `c`'s activation crosses (`None`: the next chunk is on the same device,
    /// or there is none).
    pub forward_link: Vec<Option<LinkKind>>,
    /// The link chunk `c`'s input gradient crosses.
    pub backward_link: Vec<Option<LinkKind>>,
    pub data_parallel: usize,
    /// Per device: gradient bytes all-reduced across the replicas once per step.
    pub all_reduce_bytes: Vec<u64>,
    /// Per device: the link its all-reduce runs on (`None` without data parallelism).
    pub all_reduce_link: Vec<Option<LinkKind>>,
    /// Per device: seconds of its all-reduce.
    pub all_reduce_s: Vec<f64>,
    /// The hop an in-process link costs (the profile's).
    pub hop: HopProfile,
}

impl Communication {
    fn new(chunks: usize, hop: HopProfile) -> Communication {
        Communication {
            forward_bytes: vec![0; chunks],
            backward_bytes: vec![0; chunks],
            forward_link: vec![None; chunks],
            backward_link: vec![None; chunks],
            data_parallel: 1,
            all_reduce_bytes: Vec::new(),
            all_reduce_link: Vec::new(),
            all_reduce_s: Vec::new(),
            hop,
        }
    }
}

/// The same costs with every message free: what a step would take on infinitely fast links.
struct WithoutMessages<'a>(&'a StageCosts);

impl CostModel for WithoutMessages<'_> {
    fn duration(&self, a: Action) -> f64 {
        self.0.duration(a)
    }

    fn slowdown(&self, running: usize) -> f64 {
        self.0.slowdown(running)
    }
}

/// What the simulator predicts for one step of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Seconds from the step's start to the last optimizer update.
    pub step_time: f64,
    /// Seconds from the first action's start to the last action's end.
    pub makespan: f64,
    /// Per stage: seconds computing (actions and optimizer step).
    pub busy: Vec<f64>,
    /// Per stage: seconds of its gradient all-reduce across the data-parallel replicas (after
    /// its last action, before the optimizer step; 0 without data parallelism).
    pub all_reduce: Vec<f64>,
    /// Per stage: `step_time - busy - all_reduce` (the stage's bubble, in seconds: waiting
    /// for other stages and for messages).
    pub idle: Vec<f64>,
    /// Seconds from the step's start until every device's gradients are all-reduced (the
    /// makespan without data parallelism); the optimizer steps follow.
    pub gradients_reduced: f64,
    /// Seconds the step loses to communication: its time minus the same step's with every
    /// hand-off free and no all-reduce.
    pub exposed_communication: f64,
    /// Bytes per step over each kind of link, all replicas together: hand-offs (activations
    /// forward, input gradients back) and the ring all-reduce (each of `D` ranks sends
    /// `2 (D-1)/D` of its gradients). Hand-offs between chunks of one device are not counted.
    pub link_bytes: std::collections::BTreeMap<LinkKind, u64>,
    /// Idle over `stages × step_time`.
    pub bubble_fraction: f64,
    /// Per stage: the most (chunk, micro-batch) forward stashes held at once.
    pub peak_in_flight: Vec<usize>,
    /// Per stage: parameters, gradients and optimizer state.
    pub static_bytes: Vec<u64>,
    /// Per stage: the high-water mark of stashed bytes (activations, weight-gradient inputs
    /// waiting for their `W`, a recomputation's transient activations).
    pub peak_stash_bytes: Vec<u64>,
    /// Per stage: bytes at the high-water mark (static + stashed).
    pub peak_memory: Vec<u64>,
    pub timeline: Timeline,
}

impl Prediction {
    pub fn max_peak_memory(&self) -> u64 {
        self.peak_memory.iter().copied().max().unwrap_or(0)
    }
}

/// The schedule `kind` builds for `stages` devices, `microbatches` and `v` chunks per device;
/// `zb-auto` is built from `costs` (one entry per chunk) within `memory_limit` bytes per
/// device, or, without a limit, within 1F1B's activation memory (`stages` micro-batches'
/// stashes per device).
pub fn schedule_from_costs(
    kind: ScheduleKind,
    stages: usize,
    microbatches: usize,
    v: usize,
    costs: &StageCosts,
    memory_limit: Option<u64>,
) -> Result<Schedule> {
    if kind != ScheduleKind::ZbAuto {
        return Ok(kind.build_with(stages, microbatches, v)?);
    }
    // Validates v (1 or 2) and the counts before the costs are looked at.
    kind.build_with(stages, 1, v)?;
    let placement = kind.placement(stages, v);
    if costs.stages() != placement.len() {
        return Err(EngineError::Config(format!(
            "zb-auto needs costs for {} chunks ({stages} stages x {v}), got {}",
            placement.len(),
            costs.stages()
        )));
    }
    let mut greedy = costs.greedy_costs(&placement, stages, memory_limit);
    if memory_limit.is_none() {
        for (d, limit) in greedy.limit.iter_mut().enumerate() {
            let per_microbatch: f64 =
                (0..placement.len()).filter(|&c| placement[c] == d).map(|c| greedy.stash[c]).sum();
            *limit = stages as f64 * per_microbatch;
        }
    }
    Ok(Schedule::zero_bubble_from_costs(kind.to_string(), &greedy, stages, microbatches)?)
}

/// Simulates one training step of `schedule` under `costs` (one entry per model chunk).
pub fn predict(schedule: &Schedule, costs: &StageCosts) -> Result<Prediction> {
    let p = schedule.stages();
    if costs.stages() != schedule.chunks() {
        return Err(EngineError::Config(format!(
            "costs are for {} chunks but schedule {} has {} ({p} stages)",
            costs.stages(),
            schedule.name(),
            schedule.chunks()
        )));
    }
    let placement = schedule.placement();
    let timeline = schedule.timeline_with(costs);
    let makespan = timeline.makespan();
    let optimizer: Vec<f64> =
        (0..p).map(|d| (0..placement.len()).filter(|&c| placement[c] == d).map(|c| costs.optimizer[c]).sum()).collect();
    // Every stage steps its optimizer at once, after the collective: as slow as that many
    // stages computing together make it.
    let stepping = optimizer.iter().filter(|&&t| t > 0.0).count();
    let slowest_optimizer = optimizer.iter().copied().fold(0.0, f64::max) * costs.contention.slowdown(stepping);
    let all_reduce: Vec<f64> =
        if costs.comm.all_reduce_s.len() == p { costs.comm.all_reduce_s.clone() } else { vec![0.0; p] };
    // A device all-reduces its gradients once its own last action is done (earlier stages may
    // still be computing); the gradient norm and the optimizer steps wait for every device.
    let reduced = if all_reduce.iter().any(|&t| t > 0.0) {
        (0..p).map(|d| timeline.stage_entries(d).last().map_or(0.0, |t| t.end) + all_reduce[d]).fold(makespan, f64::max)
    } else {
        makespan
    };
    let step_time = reduced + slowest_optimizer + costs.step_overhead;
    let free_step =
        schedule.timeline_with(&WithoutMessages(costs)).makespan() + slowest_optimizer + costs.step_overhead;
    let busy: Vec<f64> =
        (0..p).map(|s| timeline.busy_time(s) + optimizer[s] * costs.contention.slowdown(stepping)).collect();
    let idle: Vec<f64> = busy.iter().zip(&all_reduce).map(|(b, r)| (step_time - b - r).max(0.0)).collect();
    let capacity = p as f64 * step_time;
    let bubble_fraction = if capacity > 0.0 { idle.iter().sum::<f64>() / capacity } else { 0.0 };
    let peak_in_flight: Vec<usize> = (0..p).map(|s| schedule.peak_in_flight(s)).collect();
    let static_bytes = costs.device_static_bytes(placement, p);
    let peak_stash_bytes: Vec<u64> = (0..p).map(|d| stash_high_water(schedule.stage_actions(d), costs)).collect();
    let peak_memory = static_bytes.iter().zip(&peak_stash_bytes).map(|(a, b)| a + b).collect();
    Ok(Prediction {
        step_time,
        makespan,
        busy,
        all_reduce,
        idle,
        gradients_reduced: reduced,
        exposed_communication: (step_time - free_step).max(0.0),
        link_bytes: link_bytes(schedule.microbatches(), costs),
        bubble_fraction,
        peak_in_flight,
        static_bytes,
        peak_stash_bytes,
        peak_memory,
        timeline,
    })
}

/// Bytes per step over each link kind (see [`Prediction::link_bytes`]).
fn link_bytes(microbatches: usize, costs: &StageCosts) -> std::collections::BTreeMap<LinkKind, u64> {
    let comm = &costs.comm;
    let replicas = comm.data_parallel.max(1) as u64;
    let mut out = std::collections::BTreeMap::new();
    let handoffs =
        comm.forward_link.iter().zip(&comm.forward_bytes).chain(comm.backward_link.iter().zip(&comm.backward_bytes));
    for (link, &bytes) in handoffs {
        if let Some(kind) = link {
            *out.entry(*kind).or_insert(0) += replicas * microbatches as u64 * bytes;
        }
    }
    for (link, &bytes) in comm.all_reduce_link.iter().zip(&comm.all_reduce_bytes) {
        if let Some(kind) = link {
            *out.entry(*kind).or_insert(0) += 2 * (replicas - 1) * bytes;
        }
    }
    out
}

/// `bytes[c] + extra[c]` per chunk, as the zero-bubble scheduler's f64 sizes.
fn with_extra(bytes: &[u64], extra: &[u64]) -> Vec<f64> {
    bytes.iter().enumerate().map(|(c, &b)| (b + extra.get(c).copied().unwrap_or(0)) as f64).collect()
}

/// A device's most stashed bytes, following its actions as the executor counts them (at the
/// end of each action, and while a recomputed forward's activations are alive).
fn stash_high_water(actions: &[Action], costs: &StageCosts) -> u64 {
    // A chunk whose backward the schedule splits keeps a fused loss's deferred weight
    // gradient from its F (or, recomputing, its I) to its W.
    let split = |c: usize| actions.iter().any(|a| a.chunk == c && a.kind == ActionKind::BackwardWeight);
    let extra = |bytes: &[u64], c: usize| if split(c) { bytes.get(c).copied().unwrap_or(0) } else { 0 };
    let (mut live, mut peak) = (0u64, 0u64);
    for a in actions {
        let c = a.chunk;
        let recomputing = costs.recompute_bytes[c] > 0;
        let stash = costs.stash_bytes[c] + if recomputing { 0 } else { extra(&costs.split_extra_bytes, c) };
        match a.kind {
            ActionKind::Forward => live += stash,
            ActionKind::Backward | ActionKind::BackwardInput => {
                live = live.saturating_sub(stash);
                // Recomputing holds the micro-batch's full activations for a moment.
                let recompute =
                    if recomputing { costs.recompute_bytes[c] + extra(&costs.split_extra_bytes, c) } else { 0 };
                peak = peak.max(live + recompute);
                if a.kind == ActionKind::BackwardInput {
                    live += costs.weight_stash_bytes[c] + extra(&costs.split_weight_stash_extra_bytes, c);
                }
            }
            ActionKind::BackwardWeight => {
                live =
                    live.saturating_sub(costs.weight_stash_bytes[c] + extra(&costs.split_weight_stash_extra_bytes, c))
            }
        }
        peak = peak.max(live);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ScheduleKind; 2] = [ScheduleKind::GPipe, ScheduleKind::OneFOneB];

    #[test]
    fn equal_stage_costs_give_the_closed_form_bubble() {
        for kind in KINDS {
            for p in 1..=5 {
                for m in [1, 2, 3, 4, 8, 13] {
                    let schedule = kind.build(p, m).unwrap();
                    let costs =
                        StageCosts::uniform(p, ActionCosts { forward: 1.0, backward_input: 1.5, backward_weight: 0.5 });
                    let pred = predict(&schedule, &costs).unwrap();
                    let expected = (p as f64 - 1.0) / (m as f64 + p as f64 - 1.0);
                    assert!(
                        (pred.bubble_fraction - expected).abs() < 1e-12,
                        "{kind} p={p} m={m}: {} vs {expected}",
                        pred.bubble_fraction
                    );
                    // (m + p - 1) slots of F + B each.
                    assert!((pred.step_time - 3.0 * (m + p - 1) as f64).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_holds_at_most_p_minus_s_microbatches_gpipe_holds_m() {
        for p in 1..=5 {
            for m in 1..=9 {
                let costs = StageCosts::uniform(p, ActionCosts::default());
                let gpipe = predict(&Schedule::gpipe(p, m).unwrap(), &costs).unwrap();
                let ofob = predict(&Schedule::one_f_one_b(p, m).unwrap(), &costs).unwrap();
                for s in 0..p {
                    assert_eq!(gpipe.peak_memory[s], m as u64, "gpipe p={p} m={m} s={s}");
                    assert_eq!(ofob.peak_memory[s], (p - s).min(m) as u64, "1f1b p={p} m={m} s={s}");
                }
            }
        }
    }

    #[test]
    fn message_latency_and_per_stage_costs_are_on_the_critical_path() {
        // One micro-batch through p stages is a chain: F down, B up, one hop per boundary each way.
        let p = 4;
        let mut costs = StageCosts::uniform(p, ActionCosts::default());
        costs.forward = vec![1.0, 2.0, 3.0, 4.0];
        costs.send_forward = vec![0.25; p];
        costs.send_backward = vec![0.5; p];
        costs.optimizer = vec![0.1, 0.7, 0.2, 0.0];
        let pred = predict(&Schedule::one_f_one_b(p, 1).unwrap(), &costs).unwrap();
        let expected_makespan = 10.0 + 4.0 * 2.0 + 3.0 * 0.25 + 3.0 * 0.5;
        assert!((pred.makespan - expected_makespan).abs() < 1e-12, "{}", pred.makespan);
        assert!((pred.step_time - (expected_makespan + 0.7)).abs() < 1e-12);
        // Stage 3 computes F=4 and B=2, plus no optimizer work.
        assert!((pred.busy[3] - 6.0).abs() < 1e-12);
        assert!((pred.idle[3] - (pred.step_time - 6.0)).abs() < 1e-12);
    }

    /// The profile's fixed costs reach the prediction: the per-step one once, the per-micro-batch
    /// one on each stage's forward and backward of every micro-batch (so on the critical path
    /// of a one-stage step m times, and of a chain through p stages p times).
    #[test]
    fn profiled_fixed_overheads_are_in_the_step_time() {
        use crate::profile::{HopProfile, LayerProfile, OverheadProfile};
        let layer = |i: usize| LayerProfile {
            name: format!("layer{i}"),
            forward_s: 1.0,
            backward_s: 2.0,
            backward_input_s: 2.0,
            backward_weight_s: 0.0,
            backward_fused_s: 2.0,
            optimizer_s: 0.25,
            activation_bytes: 0,
            input_bytes_kept: 0,
            weight_stash_bytes: 0,
            split_extra_bytes: 0,
            split_weight_stash_extra_bytes: 0,
            kept_bytes: 0,
            output_bytes: 0,
            params: Default::default(),
            optimizer_state_ratio: 2,
        };
        let mut profile = Profile {
            model: "synthetic".into(),
            device: "cpu".into(),
            threads: 1,
            microbatch_size: 1,
            input_shape: vec![1],
            optimizer: "adamw".into(),
            repeats: 1,
            layers: (0..2).map(layer).collect(),
            hop: HopProfile { latency_s: 0.0, copy_bytes_per_s: f64::INFINITY },
            overhead: OverheadProfile::default(),
            cores: 0,
            contention: None,
        };
        let step = |profile: &Profile, p: usize, m: usize| {
            let partition = Partition::uniform(2, p).unwrap();
            let costs = StageCosts::from_profile(profile, &partition).unwrap();
            predict(&Schedule::one_f_one_b(p, m).unwrap(), &costs).unwrap().step_time
        };
        let (one_stage, chain) = (step(&profile, 1, 3), step(&profile, 2, 1));
        assert!((one_stage - (3.0 * 6.0 + 0.5)).abs() < 1e-12, "{one_stage}");
        assert!((chain - (6.0 + 0.25)).abs() < 1e-12, "{chain}");
        profile.overhead = OverheadProfile { step_s: 0.125, microbatch_s: 0.5 };
        assert!((step(&profile, 1, 3) - (one_stage + 0.125 + 3.0 * 0.5)).abs() < 1e-12);
        assert!((step(&profile, 2, 1) - (chain + 0.125 + 2.0 * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn a_slow_stage_sets_the_steady_state_pace() {
        // With many micro-batches, the step approaches m x the slowest stage's F + B.
        let mut costs = StageCosts::uniform(2, ActionCosts::default());
        costs.forward = vec![1.0, 3.0];
        let m = 64;
        let pred = predict(&Schedule::one_f_one_b(2, m).unwrap(), &costs).unwrap();
        let slowest = costs.microbatch_time(1);
        assert!(pred.step_time >= m as f64 * slowest);
        assert!(pred.step_time <= m as f64 * slowest + costs.microbatch_time(0) + 1e-9);
        assert!(predict(&Schedule::gpipe(3, 2).unwrap(), &costs).is_err());
    }

    /// Two layers with `forward` and `backward` seconds each, `output` bytes handed off and
    /// `params` parameter bytes each; the in-process hop is `hop_latency` seconds, copies free.
    fn two_layer_profile(forward: f64, backward: f64, output: u64, params: u64, hop_latency: f64) -> Profile {
        use crate::profile::LayerProfile;
        let layer = |i: usize| LayerProfile {
            name: format!("layer{i}"),
            forward_s: forward,
            backward_s: backward,
            backward_input_s: backward,
            backward_weight_s: 0.0,
            backward_fused_s: backward,
            optimizer_s: 0.0,
            activation_bytes: 0,
            input_bytes_kept: 0,
            weight_stash_bytes: 0,
            split_extra_bytes: 0,
            split_weight_stash_extra_bytes: 0,
            kept_bytes: 0,
            output_bytes: output,
            params: [(format!("layer{i}.weight"), params)].into_iter().collect(),
            optimizer_state_ratio: 2,
        };
        Profile {
            model: "synthetic".into(),
            device: "cpu".into(),
            threads: 1,
            microbatch_size: 1,
            input_shape: vec![1],
            optimizer: "adamw".into(),
            repeats: 1,
            layers: (0..2).map(layer).collect(),
            hop: HopProfile { latency_s: hop_latency, copy_bytes_per_s: 3e9 },
            overhead: Default::default(),
            cores: 0,
            contention: None,
        }
    }

    fn placed(profile: &Profile, schedule: &Schedule, cluster: &Cluster) -> StageCosts {
        let partition = Partition::uniform(profile.layers.len(), schedule.chunks()).unwrap();
        let mut costs = StageCosts::from_profile(profile, &partition).unwrap();
        costs.place_on(schedule.placement(), cluster).unwrap();
        costs
    }

    #[test]
    fn contention_multiplies_sharing_and_time_sharing() {
        let c = Contention { cores: 1, threads_per_stage: 1, factor: 1.5, copies: 2 };
        assert_eq!((c.slowdown(0), c.slowdown(1), c.slowdown(2)), (1.0, 1.0, 3.0));
        // Measured with 4 copies on 4 cores: linear up to them, then the cores time-share.
        let c = Contention { cores: 4, threads_per_stage: 1, factor: 1.3, copies: 4 };
        assert!((c.slowdown(3) - 1.2).abs() < 1e-12, "{}", c.slowdown(3));
        assert!((c.slowdown(8) - 2.6).abs() < 1e-12, "{}", c.slowdown(8));
        // Two stages of 2 threads on 2 cores time-share them whatever the factor.
        assert_eq!(Contention { cores: 2, threads_per_stage: 2, ..Contention::NONE }.slowdown(2), 2.0);
        assert_eq!(Contention::NONE.slowdown(16), 1.0);
    }

    /// A profile whose calibration found two stages at once 1.5x slower predicts the
    /// hand-computed contended 1F1B step; without the calibration, the plain one.
    #[test]
    fn a_measured_contention_factor_slows_the_overlapping_actions() {
        use crate::profile::ContentionProfile;
        let mut profile = two_layer_profile(1.0, 2.0, 0, 1000, 0.0);
        for l in &mut profile.layers {
            l.optimizer_s = 0.25;
        }
        let schedule = Schedule::one_f_one_b(2, 2).unwrap();
        let partition = Partition::uniform(2, 2).unwrap();
        let plain = predict(&schedule, &StageCosts::from_profile(&profile, &partition).unwrap()).unwrap();
        // Stage 0: F0 0-1, F1 1-2, B0 4-6, B1 7-9; stage 1: F0 1-2, B0 2-4, F1 4-5, B1 5-7.
        assert!((plain.makespan - 9.0).abs() < 1e-12, "{}", plain.makespan);
        assert!((plain.step_time - 9.25).abs() < 1e-12);

        profile.cores = 2;
        profile.contention =
            Some(ContentionProfile { copies: 2, alone_s: 0.02, concurrent_s: 0.03, cores: 2, threads: 1 });
        let costs = StageCosts::from_profile(&profile, &partition).unwrap();
        assert_eq!(costs.contention, Contention { cores: 2, threads_per_stage: 1, factor: 1.5, copies: 2 });
        let pred = predict(&schedule, &costs).unwrap();
        // Stage 0's F0 alone 0-1; its F1 with stage 1's F0, 1-2.5; stage 1's B0 alone 2.5-4.5;
        // stage 0's B0 with stage 1's F1 from 4.5: F1 ends at 6 (B0 has 1 s left), then with
        // stage 1's B1 until 7.5 (B1 has 1 s left), which ends alone at 8.5; stage 0's B1 alone
        // 8.5-10.5. Both optimizers step at once: 0.25 x 1.5.
        let spans = |s: usize| {
            pred.timeline.stage_entries(s).iter().map(|t| (t.action.to_string(), t.start, t.end)).collect::<Vec<_>>()
        };
        let expected0 = [("0F0", 0.0, 1.0), ("0F1", 1.0, 2.5), ("0B0", 4.5, 7.5), ("0B1", 8.5, 10.5)];
        let expected1 = [("1F0", 1.0, 2.5), ("1B0", 2.5, 4.5), ("1F1", 4.5, 6.0), ("1B1", 6.0, 8.5)];
        for (s, expected) in [(0, expected0), (1, expected1)] {
            for ((name, start, end), (want, a, b)) in spans(s).into_iter().zip(expected) {
                assert_eq!(name, want);
                assert!((start - a).abs() < 1e-9 && (end - b).abs() < 1e-9, "{name}: {start}-{end}, expected {a}-{b}");
            }
        }
        assert!((pred.makespan - 10.5).abs() < 1e-9, "{}", pred.makespan);
        assert!((pred.step_time - (10.5 + 0.375)).abs() < 1e-9, "{}", pred.step_time);
        // Busy time is what the stages' clocks would read: slowed actions take longer.
        assert!((pred.busy[0] - (1.0 + 1.5 + 3.0 + 2.0 + 0.375)).abs() < 1e-9, "{:?}", pred.busy);

        // One stage never runs beside another: the calibration changes nothing.
        let single = Partition::uniform(2, 1).unwrap();
        let alone = Schedule::one_f_one_b(1, 2).unwrap();
        let with = predict(&alone, &StageCosts::from_profile(&profile, &single).unwrap()).unwrap();
        profile.contention = None;
        let without = predict(&alone, &StageCosts::from_profile(&profile, &single).unwrap()).unwrap();
        assert_eq!(with.step_time, without.step_time);
    }

    #[test]
    fn what_layers_keep_all_step_is_held_like_their_parameters() {
        // Two layers of 1000 parameter bytes, AdamW (x4 with gradients and moments); layer 1
        // keeps a 300-byte transposed weight.
        let mut profile = two_layer_profile(1.0, 2.0, 8, 1000, 0.0);
        profile.layers[1].kept_bytes = 300;
        let one_stage = StageCosts::from_profile(&profile, &Partition::uniform(2, 1).unwrap()).unwrap();
        assert_eq!(one_stage.static_bytes, vec![8000 + 300]);
        assert_eq!(one_stage.device_static_bytes(&[0], 1), vec![8300]);
        // It is not a parameter: gradients and the all-reduce do not grow with it.
        assert_eq!(one_stage.device_param_bytes(&[0], 1), vec![2000]);
        let two = StageCosts::from_profile(&profile, &Partition::uniform(2, 2).unwrap()).unwrap();
        assert_eq!(two.device_static_bytes(&[0, 1], 2), vec![4000, 4300]);
        let schedule = ScheduleKind::OneFOneB.build(2, 2).unwrap();
        let prediction = predict(&schedule, &two).unwrap();
        assert_eq!(prediction.peak_memory[1], 4300 + prediction.peak_stash_bytes[1]);
    }

    #[test]
    fn in_process_links_leave_todays_prediction_unchanged() {
        let profile = two_layer_profile(1e-3, 2e-3, 4096, 1000, 7e-6);
        for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::ZbH1] {
            for m in [1, 2, 5] {
                let schedule = kind.build(2, m).unwrap();
                let partition = Partition::uniform(2, 2).unwrap();
                let today = StageCosts::from_profile(&profile, &partition).unwrap();
                let mut costs = today.clone();
                costs.place_on(schedule.placement(), &Cluster::default()).unwrap();
                assert_eq!(costs.send_forward, today.send_forward);
                assert_eq!(costs.send_backward, today.send_backward);
                let (before, after) = (predict(&schedule, &today).unwrap(), predict(&schedule, &costs).unwrap());
                assert_eq!(after.step_time, before.step_time, "{kind} m={m}");
                assert_eq!(after.makespan, before.makespan);
                assert_eq!(after.busy, before.busy);
                assert_eq!(after.idle, before.idle);
                assert_eq!(after.bubble_fraction, before.bubble_fraction);
                assert_eq!(after.all_reduce, vec![0.0, 0.0]);
                // One activation and one gradient per micro-batch, in-process.
                assert_eq!(after.link_bytes.get(&LinkKind::InProcess), Some(&(2 * m as u64 * 4096)));
            }
        }
    }

    #[test]
    fn a_slow_link_adds_exactly_its_transfers_to_a_two_stage_chain() {
        // One micro-batch through 2 stages: F0, hand-off, F1, B1, hand-off back, B0. The stages
        // sit on two nodes of one device joined by 2 GB/s with 500 µs per message, so each
        // hand-off of 1 GB costs 0.5 s + 0.5 ms.
        let profile = two_layer_profile(1.0, 2.0, 1_000_000_000, 1000, 0.0);
        let schedule = Schedule::one_f_one_b(2, 1).unwrap();
        let free = predict(&schedule, &placed(&profile, &schedule, &Cluster::default())).unwrap();
        // In one process, each hand-off is the profile's hop: 1 GB at 3 GB/s.
        assert!((free.step_time - (6.0 + 2.0 / 3.0)).abs() < 1e-12, "{}", free.step_time);
        let cluster = Cluster {
            devices_per_node: Some(1),
            nodes: Some(2),
            inter_node: "ethernet:2:500".parse().unwrap(),
            ..Cluster::default()
        };
        let costs = placed(&profile, &schedule, &cluster);
        assert_eq!(costs.comm.forward_link, vec![Some(LinkKind::Ethernet), None]);
        assert_eq!(costs.comm.backward_link, vec![None, Some(LinkKind::Ethernet)]);
        let slow = predict(&schedule, &costs).unwrap();
        let handoff = 0.5 + 500e-6;
        assert!((slow.step_time - (6.0 + 2.0 * handoff)).abs() < 1e-12, "{}", slow.step_time);
        assert!((slow.exposed_communication - 2.0 * handoff).abs() < 1e-12);
        // Waiting for a message is idle time: each stage computes 3 s of the step.
        assert_eq!(slow.busy, vec![3.0, 3.0]);
        assert!((slow.idle[0] - (slow.step_time - 3.0)).abs() < 1e-12);
        assert_eq!(slow.link_bytes.get(&LinkKind::Ethernet), Some(&2_000_000_000));
    }

    #[test]
    fn data_parallel_adds_a_ring_all_reduce_on_the_link_it_crosses() {
        // 2 stages x 2 replicas on 2 nodes of 2 devices, 1 s forward and 2 s backward per
        // layer, 4e8 parameter bytes per stage, free hand-offs inside a node.
        let profile = two_layer_profile(1.0, 2.0, 0, 400_000_000, 0.0);
        let schedule = Schedule::one_f_one_b(2, 1).unwrap();
        let base = Cluster {
            data_parallel: 2,
            devices_per_node: Some(2),
            nodes: Some(2),
            intra_node: "nvlink:100:0".parse().unwrap(),
            inter_node: "infiniband:10:5".parse().unwrap(),
            ..Cluster::default()
        };
        // Pipeline inside a node: the all-reduce crosses nodes, 2 x 5 µs + 4e8 / 10 GB/s.
        let costs = placed(&profile, &schedule, &base);
        assert_eq!(costs.comm.forward_link[0], Some(LinkKind::NvLink));
        assert_eq!(costs.comm.all_reduce_link, vec![Some(LinkKind::InfiniBand); 2]);
        let pred = predict(&schedule, &costs).unwrap();
        let reduce = 2.0 * 5e-6 + 4e8 / 10e9;
        assert!((pred.all_reduce[0] - reduce).abs() < 1e-15);
        // Stage 0 ends last (its backward closes the chain) and then all-reduces.
        assert!((pred.step_time - (6.0 + reduce)).abs() < 1e-12, "{}", pred.step_time);
        assert!((pred.exposed_communication - reduce).abs() < 1e-12);
        for s in 0..2 {
            assert!((pred.busy[s] + pred.all_reduce[s] + pred.idle[s] - pred.step_time).abs() < 1e-12);
        }
        // Each of 2 ranks sends half its gradients per device: 2 x (2 - 1) x 4e8 per stage.
        assert_eq!(pred.link_bytes.get(&LinkKind::InfiniBand), Some(&1_600_000_000));
        // Data parallel inside a node: the all-reduce is on NVLink, the hand-offs cross nodes.
        let dp = Cluster { placement: Placement::DataParallelInNode, ..base };
        let costs = placed(&profile, &schedule, &dp);
        assert_eq!(costs.comm.forward_link[0], Some(LinkKind::InfiniBand));
        assert_eq!(costs.comm.all_reduce_link, vec![Some(LinkKind::NvLink); 2]);
        let pred = predict(&schedule, &costs).unwrap();
        let (handoff, reduce) = (5e-6, 4e8 / 100e9);
        assert!((pred.step_time - (6.0 + 2.0 * handoff + reduce)).abs() < 1e-12, "{}", pred.step_time);
    }

    #[test]
    fn ring_all_reduce_follows_the_textbook_formula() {
        let link: Link =
            LinkSpec::new(LinkKind::InfiniBand).resolve(&HopProfile { latency_s: 0.0, copy_bytes_per_s: 1.0 });
        assert_eq!((link.latency_s, link.bytes_per_s), (5e-6, 50e9));
        assert_eq!(link.ring_all_reduce(8_000_000_000, 1), 0.0);
        let expected = 14.0 * 5e-6 + 2.0 * 7.0 / 8.0 * 8e9 / 50e9;
        assert!((link.ring_all_reduce(8_000_000_000, 8) - expected).abs() < 1e-15);
        // An in-process link costs the profile's hop, unless overridden.
        let hop = HopProfile { latency_s: 3e-6, copy_bytes_per_s: 2e9 };
        let threads = LinkSpec::new(LinkKind::InProcess).resolve(&hop);
        assert_eq!(threads.transfer(1000), hop.cost(1000));
        let spec: LinkSpec = "in-process:4:1".parse().unwrap();
        assert_eq!((spec.resolve(&hop).bytes_per_s, spec.resolve(&hop).latency_s), (4e9, 1e-6));
    }

    #[test]
    fn bad_link_specs_and_layouts_are_clear_errors() {
        let message = |s: &str| s.parse::<LinkSpec>().unwrap_err().to_string();
        assert!(message("warp").contains("unknown link kind `warp`"), "{}", message("warp"));
        assert!(message("warp").contains("nvlink, pcie, infiniband"));
        assert!(message("nvlink:0").contains("bandwidth must be a positive number (GB/s)"), "{}", message("nvlink:0"));
        assert!(message("nvlink:fast").contains("got `fast`"));
        assert!(message("ib:50:-1").contains("latency must be a non-negative number"));
        assert!(message("ib:50:1:2").contains("KIND[:GBPS[:LATENCY_US]]"));
        assert_eq!("IB:25:0".parse::<LinkSpec>().unwrap().latency_s, Some(0.0));
        assert!("diagonal".parse::<Placement>().unwrap_err().to_string().contains("pipeline-in-node"));
        let cluster = Cluster { data_parallel: 8, devices_per_node: Some(8), nodes: Some(4), ..Cluster::default() };
        let err = cluster.check(8).unwrap_err().to_string();
        assert!(err.contains("need 64 devices, but 4 nodes x 8 devices hold 32"), "{err}");
        assert!(cluster.check(4).is_ok());
        let err = Cluster { nodes: Some(2), ..Cluster::default() }.check(2).unwrap_err().to_string();
        assert!(err.contains("--gpus-per-node"), "{err}");
        let in_process =
            Cluster { devices_per_node: Some(1), inter_node: LinkSpec::new(LinkKind::InProcess), ..Cluster::default() };
        assert!(in_process.check(2).unwrap_err().to_string().contains("cannot be joined in-process"));
        assert!(Cluster { data_parallel: 0, ..Cluster::default() }.check(2).is_err());
        // A routing table that does not match the costs.
        let mut costs = StageCosts::uniform(2, ActionCosts::default());
        assert!(costs.place_on(&[0], &Cluster::default()).is_err());
    }
}
