//! The zero-bubble list scheduler: builds a schedule by simulating it, one decision at a time.
//!
//! This is the heuristic of Qi et al. ("Zero Bubble Pipeline Parallelism", 2024), written from
//! the paper: whenever a device is free it runs, in order of preference,
//! 1. a ready backward (`I`, or `B` when backwards are not split): the gradient chain up the
//!    pipeline is the critical path, so it never waits behind anything else;
//! 2. a ready forward, if the device's memory limit has room for it;
//! 3. a deferred weight step (`W`): nobody waits for it, so it fills time that would otherwise
//!    be a bubble, and it frees memory.
//!
//! Memory is counted per device in the cost model's units: a forward stashes `stash`, its `I`
//! trades that for `weight_stash` (what the `W` still needs), the `W` frees the rest. A device
//! admits a new micro-batch (its forward on the device's first chunk) only when the stashes of
//! all its chunks for that micro-batch fit beside what is already committed, so a micro-batch
//! that entered a device can always finish there: the V placement (the loss chunk beside the
//! first chunk on device 0) cannot deadlock on memory.
//!
//! The built-in ZB-H1, ZB-H2 and ZB-V are this scheduler with unit costs (F = I = W = 1) and
//! memory limits of `p`, `2p − 1` and `2p` chunk stashes; the planner runs it with profiled
//! costs and a byte limit. Several tie-breaking variants are tried and the shortest simulated
//! makespan kept (then the lowest peak memory). The result goes through the validator like any
//! other schedule.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::action::{Action, ActionKind};
use super::Schedule;

/// What the greedy scheduler knows about a layout: per chunk (model order) costs and memory,
/// the routing table, and each device's memory limit.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyCosts {
    /// `placement[c]`: the device holding chunk `c`.
    pub placement: Vec<usize>,
    pub forward: Vec<f64>,
    pub backward_input: Vec<f64>,
    pub backward_weight: Vec<f64>,
    /// Delay for chunk `c`'s activation / input gradient to reach another device.
    pub send_forward: Vec<f64>,
    pub send_backward: Vec<f64>,
    /// Memory a forward of chunk `c` keeps until its `I` (or `B`).
    pub stash: Vec<f64>,
    /// Memory an `I` of chunk `c` keeps until its `W`.
    pub weight_stash: Vec<f64>,
    /// Per device: the most memory stashes may take.
    pub limit: Vec<f64>,
}

impl GreedyCosts {
    /// F = I = W = 1, free messages, one memory unit per chunk stash held from `F` to `W`,
    /// and `limit` units on every device.
    pub fn unit(placement: &[usize], limit: f64) -> GreedyCosts {
        let chunks = placement.len();
        let devices = placement.iter().copied().max().map_or(0, |d| d + 1);
        GreedyCosts {
            placement: placement.to_vec(),
            forward: vec![1.0; chunks],
            backward_input: vec![1.0; chunks],
            backward_weight: vec![1.0; chunks],
            send_forward: vec![0.0; chunks],
            send_backward: vec![0.0; chunks],
            stash: vec![1.0; chunks],
            weight_stash: vec![1.0; chunks],
            limit: vec![limit; devices],
        }
    }

    pub fn chunks(&self) -> usize {
        self.placement.len()
    }
}

/// One way of breaking the scheduler's ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreedyOptions {
    /// Split backwards into `I` and deferred `W` (zero bubble), or run whole `B`s (1F1B-like).
    pub split: bool,
    /// Among ready forwards, prefer the deepest chunk (finish micro-batches already in flight)
    /// over the oldest micro-batch.
    pub depth_first: bool,
    /// Run a pending `W` before admitting a new micro-batch (less memory, later forwards).
    pub weight_before_admission: bool,
    /// Prefer a ready forward over a ready backward (keeps the forward chain moving so the
    /// last stage is never starved; the backward chain waits one action).
    pub forward_first: bool,
    /// Admit a micro-batch when its stashes fit beside what is stashed now, not beside what
    /// admitted micro-batches will still stash, and let every forward wait for room (more
    /// overlap; a variant that then deadlocks on memory is discarded).
    pub optimistic_admission: bool,
}

impl GreedyOptions {
    /// Every split variant: what the built-in zero-bubble schedules choose from.
    pub fn variants() -> Vec<GreedyOptions> {
        let mut out = Vec::new();
        for depth_first in [true, false] {
            for weight_before_admission in [false, true] {
                for forward_first in [false, true] {
                    for optimistic_admission in [false, true] {
                        out.push(GreedyOptions {
                            split: true,
                            depth_first,
                            weight_before_admission,
                            forward_first,
                            optimistic_admission,
                        });
                    }
                }
            }
        }
        out
    }

    /// The split variants and the unsplit ones: what the cost-based generator chooses from.
    pub fn all_variants() -> Vec<GreedyOptions> {
        let mut out = GreedyOptions::variants();
        for depth_first in [true, false] {
            for forward_first in [false, true] {
                out.push(GreedyOptions {
                    split: false,
                    depth_first,
                    weight_before_admission: false,
                    forward_first,
                    optimistic_admission: false,
                });
            }
        }
        out
    }
}

/// A schedule the greedy scheduler produced, with what its own simulation predicted.
#[derive(Debug, Clone)]
pub(crate) struct GreedyResult {
    pub(crate) actions: Vec<Vec<Action>>,
    pub(crate) makespan: f64,
    pub(crate) peak: f64,
}

impl Schedule {
    /// The zero-bubble heuristic over `costs` (see the module docs), trying each of `variants`
    /// and keeping the best simulated; validated. `Err` says why no variant could finish (a
    /// memory limit too small for even one micro-batch, or a bad routing table).
    pub fn zero_bubble_from_costs(
        name: impl Into<String>,
        costs: &GreedyCosts,
        stages: usize,
        microbatches: usize,
    ) -> Result<Schedule, super::ScheduleError> {
        let name = name.into();
        let best =
            Schedule::best_greedy(costs, stages, microbatches, &GreedyOptions::all_variants()).map_err(|reason| {
                super::ScheduleError::Unsupported {
                    schedule: name.clone(),
                    stages,
                    microbatches,
                    virtual_stages: costs.chunks() / stages.max(1),
                    reason,
                }
            })?;
        Schedule::from_actions(name, stages, microbatches, best.actions)
    }

    pub(crate) fn best_greedy(
        costs: &GreedyCosts,
        stages: usize,
        microbatches: usize,
        variants: &[GreedyOptions],
    ) -> Result<GreedyResult, String> {
        check_costs(costs, stages)?;
        let mut best: Option<GreedyResult> = None;
        let mut first_error = None;
        for &options in variants {
            match greedy(costs, stages, microbatches, options) {
                Ok(r) => {
                    let better = best.as_ref().is_none_or(|b| {
                        r.makespan < b.makespan - 1e-9 || (r.makespan < b.makespan + 1e-9 && r.peak < b.peak)
                    });
                    if better {
                        best = Some(r);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        best.ok_or_else(|| first_error.unwrap_or_else(|| "no scheduling variant to try".into()))
    }
}

fn check_costs(costs: &GreedyCosts, stages: usize) -> Result<(), String> {
    let chunks = costs.chunks();
    if chunks == 0 {
        return Err("no model chunks".into());
    }
    for (what, len) in [
        ("forward", costs.forward.len()),
        ("backward_input", costs.backward_input.len()),
        ("backward_weight", costs.backward_weight.len()),
        ("send_forward", costs.send_forward.len()),
        ("send_backward", costs.send_backward.len()),
        ("stash", costs.stash.len()),
        ("weight_stash", costs.weight_stash.len()),
    ] {
        if len != chunks {
            return Err(format!("{what} has {len} entries for {chunks} chunks"));
        }
    }
    if costs.limit.len() != stages {
        return Err(format!("{} memory limits for {stages} devices", costs.limit.len()));
    }
    if let Some(d) = (0..stages).find(|d| !costs.placement.contains(d)) {
        return Err(format!("device {d} holds no chunk"));
    }
    if let Some(c) = costs.placement.iter().position(|&d| d >= stages) {
        return Err(format!("chunk {c} is placed on device {}, but there are {stages}", costs.placement[c]));
    }
    Ok(())
}

/// Non-negative times as heap keys: their bit patterns sort like the numbers.
fn key(t: f64) -> Reverse<u64> {
    Reverse(t.max(0.0).to_bits())
}

fn greedy(costs: &GreedyCosts, stages: usize, m: usize, options: GreedyOptions) -> Result<GreedyResult, String> {
    let chunks = costs.chunks();
    let place = &costs.placement;
    let idx = |c: usize, mb: usize| c * m + mb;
    let on_device: Vec<Vec<usize>> = (0..stages).map(|d| (0..chunks).filter(|&c| place[c] == d).collect()).collect();
    // Memory a micro-batch reserves when it enters a device: all its chunks' stashes there.
    let reserve: Vec<f64> = on_device.iter().map(|cs| cs.iter().map(|&c| costs.stash[c]).sum()).collect();
    for (d, (&need, &limit)) in reserve.iter().zip(&costs.limit).enumerate() {
        if need > limit + 1e-9 {
            return Err(format!("device {d}'s memory limit ({limit}) is below one micro-batch's stash there ({need})"));
        }
    }

    let mut forward_end: Vec<Option<f64>> = vec![None; chunks * m];
    let mut grad_end: Vec<Option<f64>> = vec![None; chunks * m];
    let mut next_forward = vec![0usize; chunks];
    let mut next_backward = vec![0usize; chunks];
    let mut pending_weights: Vec<VecDeque<(usize, usize)>> = vec![VecDeque::new(); stages];
    let mut free_at = vec![0.0f64; stages];
    let mut live = vec![0.0f64; stages];
    let mut committed = vec![0.0f64; stages];
    let mut peak = vec![0.0f64; stages];
    let mut actions: Vec<Vec<Action>> = vec![Vec::new(); stages];
    let mut events: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
    let per_pair = if options.split { 3 } else { 2 };
    let total = chunks * m * per_pair;
    let mut scheduled = 0usize;
    let mut t = 0.0f64;

    // When (chunk, mb)'s inputs are usable on its device; `None` while not yet produced.
    let forward_ready = |c: usize, mb: usize, forward_end: &[Option<f64>]| -> Option<f64> {
        if c == 0 {
            return Some(0.0);
        }
        let end = forward_end[idx(c - 1, mb)]?;
        Some(if place[c - 1] != place[c] { end + costs.send_forward[c - 1] } else { end })
    };
    let backward_ready = |c: usize, mb: usize, forward_end: &[Option<f64>], grad_end: &[Option<f64>]| -> Option<f64> {
        let own = forward_end[idx(c, mb)]?;
        if c + 1 == chunks {
            return Some(own);
        }
        let end = grad_end[idx(c + 1, mb)]?;
        let arrival = if place[c + 1] != place[c] { end + costs.send_backward[c + 1] } else { end };
        Some(own.max(arrival))
    };

    loop {
        let mut progressed = true;
        while progressed {
            progressed = false;
            for d in 0..stages {
                if free_at[d] > t {
                    continue;
                }
                // 1. The oldest ready backward (deeper chunk first among equals).
                let backward = on_device[d]
                    .iter()
                    .filter(|&&c| next_backward[c] < m)
                    .filter(|&&c| backward_ready(c, next_backward[c], &forward_end, &grad_end).is_some_and(|r| r <= t))
                    .min_by_key(|&&c| (next_backward[c], Reverse(c)))
                    .copied();
                // 2. A ready forward that memory allows.
                let forward = on_device[d]
                    .iter()
                    .filter(|&&c| next_forward[c] < m)
                    .filter(|&&c| forward_ready(c, next_forward[c], &forward_end).is_some_and(|r| r <= t))
                    .filter(|&&c| {
                        if options.optimistic_admission {
                            // Every forward must fit beside what is stashed now (an admitted
                            // micro-batch's later chunks may wait for room).
                            let need = if c == on_device[d][0] { reserve[d] } else { costs.stash[c] };
                            live[d] + need <= costs.limit[d] + 1e-9
                        } else {
                            c != on_device[d][0] || committed[d] + reserve[d] <= costs.limit[d] + 1e-9
                        }
                    })
                    .min_by_key(|&&c| {
                        if options.depth_first {
                            (Reverse(c), next_forward[c])
                        } else {
                            (Reverse(0), next_forward[c] * chunks + chunks - c)
                        }
                    })
                    .copied();
                let admits = forward.is_some_and(|c| c == on_device[d][0]);
                let weight_first = options.weight_before_admission && admits && !pending_weights[d].is_empty();

                let backward =
                    if options.forward_first && forward.is_some() && !weight_first { None } else { backward };
                let (action, duration) = if let Some(c) = backward {
                    let mb = next_backward[c];
                    next_backward[c] += 1;
                    let kind = if options.split { ActionKind::BackwardInput } else { ActionKind::Backward };
                    let freed = costs.stash[c] - if options.split { costs.weight_stash[c] } else { 0.0 };
                    live[d] -= freed;
                    committed[d] -= freed;
                    let duration = costs.backward_input[c] + if options.split { 0.0 } else { costs.backward_weight[c] };
                    grad_end[idx(c, mb)] = Some(t + duration);
                    if options.split {
                        pending_weights[d].push_back((c, mb));
                    }
                    (Action::on_chunk(d, c, kind, mb), duration)
                } else if let (Some(c), false) = (forward, weight_first) {
                    let mb = next_forward[c];
                    next_forward[c] += 1;
                    if c == on_device[d][0] {
                        committed[d] += reserve[d];
                    }
                    live[d] += costs.stash[c];
                    forward_end[idx(c, mb)] = Some(t + costs.forward[c]);
                    (Action::on_chunk(d, c, ActionKind::Forward, mb), costs.forward[c])
                } else if let Some((c, mb)) = pending_weights[d].pop_front() {
                    live[d] -= costs.weight_stash[c];
                    committed[d] -= costs.weight_stash[c];
                    (Action::on_chunk(d, c, ActionKind::BackwardWeight, mb), costs.backward_weight[c])
                } else {
                    continue;
                };
                peak[d] = peak[d].max(live[d]);
                if peak[d] > costs.limit[d] + 1e-9 {
                    return Err(format!("device {d} would exceed its memory limit"));
                }
                let end = t + duration.max(0.0);
                free_at[d] = end;
                events.push(key(end));
                // Arrivals on other devices are events too.
                let c = action.chunk;
                match action.kind {
                    ActionKind::Forward => events.push(key(end + costs.send_forward[c])),
                    _ => events.push(key(end + costs.send_backward[c])),
                }
                actions[d].push(action);
                scheduled += 1;
                progressed = true;
            }
        }
        if scheduled == total {
            break;
        }
        // Advance to the next moment something changes.
        let mut next = None;
        while let Some(Reverse(bits)) = events.pop() {
            let at = f64::from_bits(bits);
            if at > t {
                next = Some(at);
                break;
            }
        }
        match next {
            Some(at) => t = at,
            None => {
                return Err(format!(
                    "the memory limits leave no schedule that finishes ({scheduled} of {total} actions placed)"
                ))
            }
        }
    }
    let makespan = free_at.iter().copied().fold(0.0, f64::max);
    let peak = peak.iter().copied().fold(0.0, f64::max);
    Ok(GreedyResult { actions, makespan, peak })
}
