//! The simulator: predicts a schedule's step time, each stage's busy and idle time, and each
//! stage's peak memory from a [`Profile`] and a [`Partition`], before anything runs.
//!
//! Timing is the schedule module's event-driven simulation (the validator's own), run with
//! per-stage costs: an action starts when its stage is free and its inputs have arrived, where
//! a message arrives one hop after the action that sent it. After the last action, every stage
//! takes its optimizer step (in parallel, after the gradient-norm collective), so
//! `step = makespan + max(optimizer time)`.
//!
//! Memory follows the schedule's order: parameters, gradients and optimizer state are always
//! held; a forward stashes one micro-batch's activations until its `B` (or `I`), so a stage's
//! peak is `static + peak in-flight × stash per micro-batch`. With activation recomputation a
//! micro-batch stashes only the stage's input, each `I` reruns the forward first (its time is
//! added to `I`), and the rerun briefly holds one micro-batch's full activations. (Weight
//! gradients an `I` sets aside until its `W` are not counted: the built-in schedules use full
//! `B`s.)

use crate::compute::Recompute;
use crate::error::{EngineError, Result};
use crate::partition::Partition;
use crate::profile::Profile;
use crate::schedule::{Action, ActionCosts, ActionKind, CostModel, Schedule, Timeline};

/// Per-stage costs of one layout: what the simulator runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct StageCosts {
    /// Seconds per micro-batch, per stage.
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
    /// With activation recomputation: the full activations of the one micro-batch whose
    /// forward is being rerun for its backward (held briefly on top of the others' stashes);
    /// 0 without.
    pub recompute_bytes: Vec<u64>,
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
            recompute_bytes: vec![0; stages],
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
            recompute_bytes: vec![0; stages],
        };
        for (s, range) in partition.ranges().into_iter().enumerate() {
            let layers = &profile.layers[range.clone()];
            c.forward[s] = layers.iter().map(|l| l.forward_s).sum();
            c.backward_input[s] = layers.iter().map(|l| l.backward_input_s).sum();
            c.backward_weight[s] = layers.iter().map(|l| l.backward_weight_s).sum();
            c.optimizer[s] = layers.iter().map(|l| l.optimizer_s).sum();
            (c.static_bytes[s], c.stash_bytes[s]) = range_memory(profile, range.clone());
            let input = if range.start > 0 { profile.layers[range.start - 1].output_bytes } else { 0 };
            if recompute == Recompute::Full {
                c.backward_input[s] += c.forward[s];
                c.recompute_bytes[s] = c.stash_bytes[s];
                c.stash_bytes[s] = input;
            }
            let out_bytes = layers.last().map_or(0, |l| l.output_bytes);
            c.send_forward[s] = profile.hop.cost(out_bytes);
            c.send_backward[s] = profile.hop.cost(input);
        }
        Ok(c)
    }

    pub fn stages(&self) -> usize {
        self.forward.len()
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
        let s = a.stage;
        match a.kind {
            ActionKind::Forward => self.forward[s],
            ActionKind::Backward => self.backward_input[s] + self.backward_weight[s],
            ActionKind::BackwardInput => self.backward_input[s],
            ActionKind::BackwardWeight => self.backward_weight[s],
        }
    }

    fn transfer(&self, a: Action) -> f64 {
        match a.kind {
            ActionKind::Forward => self.send_forward[a.stage],
            _ => self.send_backward[a.stage],
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
    /// Per stage: the most micro-batches stashed at once.
    pub peak_in_flight: Vec<usize>,
    /// Per stage: bytes at the high-water mark (static + stashed activations).
    pub peak_memory: Vec<u64>,
    pub timeline: Timeline,
}

impl Prediction {
    pub fn max_peak_memory(&self) -> u64 {
        self.peak_memory.iter().copied().max().unwrap_or(0)
    }
}

/// Simulates one training step of `schedule` under `costs`.
pub fn predict(schedule: &Schedule, costs: &StageCosts) -> Result<Prediction> {
    let p = schedule.stages();
    if costs.stages() != p {
        return Err(EngineError::Config(format!(
            "costs are for {} stages but schedule {} has {p}",
            costs.stages(),
            schedule.name()
        )));
    }
    let timeline = schedule.timeline_with(costs);
    let makespan = timeline.makespan();
    let step_time = makespan + costs.optimizer.iter().copied().fold(0.0, f64::max);
    let busy: Vec<f64> = (0..p).map(|s| timeline.busy_time(s) + costs.optimizer[s]).collect();
    let idle: Vec<f64> = busy.iter().map(|b| (step_time - b).max(0.0)).collect();
    let capacity = p as f64 * step_time;
    let bubble_fraction = if capacity > 0.0 { idle.iter().sum::<f64>() / capacity } else { 0.0 };
    let peak_in_flight: Vec<usize> = (0..p).map(|s| schedule.peak_in_flight(s)).collect();
    let peak_memory = (0..p)
        .map(|s| {
            let stashed = peak_in_flight[s] as u64 * costs.stash_bytes[s];
            // Recomputing one micro-batch's forward briefly holds its full activations instead
            // of its stashed input.
            let recomputing = match peak_in_flight[s] {
                0 => 0,
                n => (n as u64 - 1) * costs.stash_bytes[s] + costs.recompute_bytes[s],
            };
            costs.static_bytes[s] + stashed.max(recomputing)
        })
        .collect();
    Ok(Prediction { step_time, makespan, busy, idle, bubble_fraction, peak_in_flight, peak_memory, timeline })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;

    const KINDS: [ScheduleKind; 2] = [ScheduleKind::GPipe, ScheduleKind::OneFOneB];

    #[test]
    fn equal_stage_costs_give_the_closed_form_bubble() {
        for kind in KINDS {
            for p in 1..=5 {
                for m in [1, 2, 3, 4, 8, 13] {
                    let schedule = kind.build(p, m).unwrap();
                    let costs = StageCosts::uniform(p, ActionCosts { forward: 1.0, backward_input: 1.5, backward_weight: 0.5 });
                    let pred = predict(&schedule, &costs).unwrap();
                    let expected = (p as f64 - 1.0) / (m as f64 + p as f64 - 1.0);
                    assert!((pred.bubble_fraction - expected).abs() < 1e-12, "{kind} p={p} m={m}: {} vs {expected}", pred.bubble_fraction);
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
