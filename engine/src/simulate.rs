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
use crate::profile::Profile;
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
            params: Vec::new(),
            optimizer_state_ratio: 0,
            recompute_bytes: vec![0; stages],
            step_overhead: 0.0,
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
            params: vec![Default::default(); stages],
            optimizer_state_ratio: profile.layers.first().map_or(0, |l| l.optimizer_state_ratio),
            recompute_bytes: vec![0; stages],
            step_overhead: profile.overhead.step_s,
        };
        for (s, range) in partition.ranges().into_iter().enumerate() {
            let layers = &profile.layers[range.clone()];
            c.forward[s] = layers.iter().map(|l| l.forward_s).sum();
            c.backward_input[s] = layers.iter().map(|l| l.backward_input_s).sum();
            c.backward_weight[s] = layers.iter().map(|l| l.backward_weight_s).sum();
            c.optimizer[s] = layers.iter().map(|l| l.optimizer_s).sum();
            (c.static_bytes[s], c.stash_bytes[s]) = range_memory(profile, range.clone());
            c.weight_stash_bytes[s] = layers.iter().map(|l| l.weight_stash_bytes).sum();
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
        }
        Ok(c)
    }

    /// Chunks (stages without virtual stages) the costs are for.
    pub fn stages(&self) -> usize {
        self.forward.len()
    }

    /// Parameters + gradients + optimizer state each device holds under `placement` (chunk →
    /// device): a parameter two of its chunks share counts once.
    pub fn device_static_bytes(&self, placement: &[usize], devices: usize) -> Vec<u64> {
        (0..devices)
            .map(|d| {
                let chunks = (0..placement.len()).filter(|&c| placement[c] == d);
                if self.params.len() == self.stages() {
                    let mut held = std::collections::BTreeMap::new();
                    for c in chunks {
                        held.extend(self.params[c].iter().map(|(n, b)| (n.as_str(), *b)));
                    }
                    held.values().sum::<u64>() * (2 + self.optimizer_state_ratio)
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
            stash: self.stash_bytes.iter().map(|&b| b as f64).collect(),
            weight_stash: self.weight_stash_bytes.iter().map(|&b| b as f64).collect(),
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
    (param_bytes * (2 + ratio), held.iter().map(|l| l.activation_bytes).sum::<u64>() + inner_inputs + input)
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
    /// Per stage: `step_time - busy` (the stage's bubble, in seconds).
    pub idle: Vec<f64>,
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
    let step_time = makespan + optimizer.iter().copied().fold(0.0, f64::max) + costs.step_overhead;
    let busy: Vec<f64> = (0..p).map(|s| timeline.busy_time(s) + optimizer[s]).collect();
    let idle: Vec<f64> = busy.iter().map(|b| (step_time - b).max(0.0)).collect();
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
        idle,
        bubble_fraction,
        peak_in_flight,
        static_bytes,
        peak_stash_bytes,
        peak_memory,
        timeline,
    })
}

/// A device's most stashed bytes, following its actions as the executor counts them (at the
/// end of each action, and while a recomputed forward's activations are alive).
fn stash_high_water(actions: &[Action], costs: &StageCosts) -> u64 {
    let (mut live, mut peak) = (0u64, 0u64);
    for a in actions {
        let c = a.chunk;
        match a.kind {
            ActionKind::Forward => live += costs.stash_bytes[c],
            ActionKind::Backward | ActionKind::BackwardInput => {
                live = live.saturating_sub(costs.stash_bytes[c]);
                // Recomputing holds the micro-batch's full activations for a moment.
                peak = peak.max(live + costs.recompute_bytes[c]);
                if a.kind == ActionKind::BackwardInput {
                    live += costs.weight_stash_bytes[c];
                }
            }
            ActionKind::BackwardWeight => live = live.saturating_sub(costs.weight_stash_bytes[c]),
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
}
