//! Event-driven simulation of a schedule under the executor's rules, with per-action costs.
//!
//! The same simulation is the validator's deadlock check (a stage that can never start its next
//! action is stuck) and the source of the bubble numbers and the printed grid, so what the
//! printer shows is exactly what the validator accepted.
//!
//! Executor rules: each stage runs its list strictly in order; messages between stages are tagged
//! by micro-batch and buffered, so only completion matters, never arrival order.
//! Dependencies follow model chunks, wherever the routing table puts them: `F(c,m)` needs
//! `F(c-1,m)`; `B(c,m)`/`I(c,m)` need `F(c,m)` and, below the last chunk, the input gradient
//! from `B(c+1,m)` or `I(c+1,m)`; `W(c,m)` needs `I(c,m)`. A message between two chunks on the
//! same device costs no transfer.

use super::action::{Action, ActionKind};
use super::error::Stuck;
use super::Schedule;

/// How long each kind of action takes, in arbitrary units. A full backward costs
/// `backward_input + backward_weight`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionCosts {
    pub forward: f64,
    pub backward_input: f64,
    pub backward_weight: f64,
}

impl Default for ActionCosts {
    /// The textbook unit costs: F = I = W = 1, so B = 2.
    fn default() -> ActionCosts {
        ActionCosts { forward: 1.0, backward_input: 1.0, backward_weight: 1.0 }
    }
}

/// What the simulator needs to know about a run: how long each action computes, and how long
/// the message it sends (an activation after `F`, an input gradient after `B`/`I`) takes to
/// reach the neighbouring stage. [`ActionCosts`] is the uniform model (same cost on every
/// stage, free messages); [`crate::simulate::StageCosts`] is the measured one.
pub trait CostModel {
    fn duration(&self, action: Action) -> f64;

    /// Delay between the end of `action` and its message being usable by the receiver.
    fn transfer(&self, action: Action) -> f64 {
        let _ = action;
        0.0
    }

    /// How many times slower each action runs while `running` stages compute at once (1 when
    /// alone): stages that share cores, caches and memory bandwidth slow each other. The
    /// default, 1 whatever the count, is the textbook model of independent devices.
    fn slowdown(&self, running: usize) -> f64 {
        let _ = running;
        1.0
    }

    /// Whether any number of `stages` computing at once slows them ([`CostModel::slowdown`]);
    /// a model that never does runs the plain simulation.
    fn contended(&self, stages: usize) -> bool {
        (1..=stages).any(|k| self.slowdown(k) != 1.0)
    }
}

impl CostModel for ActionCosts {
    fn duration(&self, action: Action) -> f64 {
        self.of(action.kind)
    }
}

impl ActionCosts {
    pub fn of(&self, kind: ActionKind) -> f64 {
        match kind {
            ActionKind::Forward => self.forward,
            ActionKind::Backward => self.backward_input + self.backward_weight,
            ActionKind::BackwardInput => self.backward_input,
            ActionKind::BackwardWeight => self.backward_weight,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimedAction {
    pub action: Action,
    pub start: f64,
    pub end: f64,
}

/// When every action of a schedule runs, per stage in execution order.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    stages: Vec<Vec<TimedAction>>,
}

impl Timeline {
    pub fn stages(&self) -> usize {
        self.stages.len()
    }

    /// Stage `stage`'s actions with their start and end times (empty for an unknown stage).
    pub fn stage_entries(&self, stage: usize) -> &[TimedAction] {
        self.stages.get(stage).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Time from the first action's start (0) to the last action's end.
    pub fn makespan(&self) -> f64 {
        self.stages.iter().flatten().map(|t| t.end).fold(0.0, f64::max)
    }

    /// Time stage `stage` spends running actions.
    pub fn busy_time(&self, stage: usize) -> f64 {
        self.stage_entries(stage).iter().map(|t| t.end - t.start).sum()
    }

    pub fn busy_times(&self) -> Vec<f64> {
        (0..self.stages()).map(|s| self.busy_time(s)).collect()
    }

    /// Total time stages spend waiting, summed over stages, within the makespan.
    pub fn idle_time(&self) -> f64 {
        self.stages() as f64 * self.makespan() - self.busy_times().iter().sum::<f64>()
    }

    /// Idle time over `stages × makespan`: the share of the pipeline's capacity lost to bubbles.
    pub fn bubble_fraction(&self) -> f64 {
        let capacity = self.stages() as f64 * self.makespan();
        if capacity > 0.0 {
            self.idle_time() / capacity
        } else {
            0.0
        }
    }
}

impl Schedule {
    /// Simulates the schedule with the given costs. Every `Schedule` has passed validation, so
    /// every action gets a time.
    pub fn timeline(&self, costs: ActionCosts) -> Timeline {
        self.timeline_with(&costs)
    }

    /// Simulates the schedule under any cost model (per-stage costs, message latency).
    /// When the cost model slows concurrent actions ([`CostModel::slowdown`]), every running
    /// action progresses at the rate the number of stages then computing allows.
    pub fn timeline_with(&self, costs: &dyn CostModel) -> Timeline {
        let stages = if costs.contended(self.stages) {
            simulate_shared(self.stages, self.microbatches, &self.placement, &self.actions, costs)
        } else {
            simulate(self.stages, self.microbatches, &self.placement, &self.actions, costs).entries
        };
        Timeline { stages }
    }

    /// The most (chunk, micro-batch) forward stashes stage `stage` holds at once, following its
    /// action order: a forward stashes one, a `B` or `I` releases it. This is what sets a
    /// stage's activation memory: `m` for GPipe, `min(p - s, m)` for 1F1B. (With virtual
    /// stages the unit is one chunk's stash; the weight-gradient inputs an `I` keeps until its
    /// `W` are not counted here, see [`crate::simulate::predict`].)
    pub fn peak_in_flight(&self, stage: usize) -> usize {
        let (mut live, mut peak) = (0usize, 0usize);
        for a in self.stage_actions(stage) {
            match a.kind {
                ActionKind::Forward => live += 1,
                ActionKind::Backward | ActionKind::BackwardInput => live = live.saturating_sub(1),
                ActionKind::BackwardWeight => {}
            }
            peak = peak.max(live);
        }
        peak
    }

    /// The papers' bubble for this schedule's kind (by its name; see
    /// [`ScheduleKind::theoretical_bubble`](super::ScheduleKind::theoretical_bubble)); for other schedules the classic GPipe / 1F1B
    /// `(p-1)/(m+p-1)`, as a yardstick.
    pub fn theoretical_bubble(&self) -> f64 {
        let v = self.virtual_stages().unwrap_or(1);
        match self.name.parse::<super::ScheduleKind>() {
            Ok(kind) => kind.theoretical_bubble(self.stages, self.microbatches, v),
            Err(_) => super::ScheduleKind::OneFOneB.theoretical_bubble(self.stages, self.microbatches, 1),
        }
    }
}

/// The executor's ordering rules: what each action waits for.
struct Dependencies<'a> {
    microbatches: usize,
    placement: &'a [usize],
    /// Which action sends (chunk, micro-batch)'s input gradient: `B`, or `I` when the schedule
    /// splits that backward.
    grad_kind: Vec<ActionKind>,
}

impl<'a> Dependencies<'a> {
    fn new(microbatches: usize, placement: &'a [usize], actions: &[Vec<Action>]) -> Self {
        let mut rules = Dependencies {
            microbatches,
            placement,
            grad_kind: vec![ActionKind::Backward; placement.len() * microbatches],
        };
        for a in actions.iter().flatten() {
            if a.kind == ActionKind::BackwardInput {
                let i = rules.index(*a);
                rules.grad_kind[i] = ActionKind::BackwardInput;
            }
        }
        rules
    }

    fn index(&self, a: Action) -> usize {
        a.chunk * self.microbatches + a.microbatch
    }

    /// The actions whose results `a` needs.
    fn of(&self, a: Action) -> Vec<Action> {
        let chunks = self.placement.len();
        let at = |chunk: usize, kind| Action { stage: self.placement[chunk], chunk, kind, microbatch: a.microbatch };
        match a.kind {
            ActionKind::Forward if a.chunk > 0 => vec![at(a.chunk - 1, ActionKind::Forward)],
            ActionKind::Forward => vec![],
            ActionKind::Backward | ActionKind::BackwardInput => {
                let mut deps = vec![at(a.chunk, ActionKind::Forward)];
                if a.chunk + 1 < chunks {
                    let next = at(a.chunk + 1, ActionKind::Forward);
                    deps.push(at(a.chunk + 1, self.grad_kind[self.index(next)]));
                }
                deps
            }
            ActionKind::BackwardWeight => vec![at(a.chunk, ActionKind::BackwardInput)],
        }
    }
}

pub(super) struct Simulation {
    pub entries: Vec<Vec<TimedAction>>,
    /// Stages that still had work when nothing could run any more; empty when all finished.
    pub stuck: Vec<Stuck>,
}

/// Requires actions whose indices are in range and listed on their own stage; the validator
/// checks that before calling.
pub(super) fn simulate(
    stages: usize,
    microbatches: usize,
    placement: &[usize],
    actions: &[Vec<Action>],
    costs: &dyn CostModel,
) -> Simulation {
    let rules = Dependencies::new(microbatches, placement, actions);
    let pairs = placement.len() * microbatches;
    let index = |a: Action| rules.index(a);
    let dependencies = |a: Action| rules.of(a);

    let mut forward_end: Vec<Option<f64>> = vec![None; pairs];
    let mut grad_end: Vec<Option<f64>> = vec![None; pairs];
    // When `dep`'s result can be used: its end, plus the message's trip when it crosses stages.
    let end_of = |dep: Action, forward_end: &[Option<f64>], grad_end: &[Option<f64>]| match dep.kind {
        ActionKind::Forward => forward_end[index(dep)],
        // Nothing depends on W, so only B and I are asked for.
        _ => grad_end[index(dep)],
    };
    let arrival = |dep: Action, at_stage: usize, forward_end: &[Option<f64>], grad_end: &[Option<f64>]| {
        let end = end_of(dep, forward_end, grad_end)?;
        Some(if dep.stage != at_stage { end + costs.transfer(dep) } else { end })
    };

    let mut next = vec![0usize; stages];
    let mut free_at = vec![0.0f64; stages];
    let mut entries: Vec<Vec<TimedAction>> = actions.iter().map(|l| Vec::with_capacity(l.len())).collect();
    loop {
        let mut progressed = false;
        for s in 0..stages {
            while let Some(&action) = actions[s].get(next[s]) {
                let mut ready = Some(free_at[s]);
                for dep in dependencies(action) {
                    ready = match (ready, arrival(dep, s, &forward_end, &grad_end)) {
                        (Some(r), Some(e)) => Some(r.max(e)),
                        _ => None,
                    };
                }
                let Some(start) = ready else { break };
                let end = start + costs.duration(action);
                match action.kind {
                    ActionKind::Forward => forward_end[index(action)] = Some(end),
                    ActionKind::Backward | ActionKind::BackwardInput => grad_end[index(action)] = Some(end),
                    ActionKind::BackwardWeight => {}
                }
                free_at[s] = end;
                next[s] += 1;
                entries[s].push(TimedAction { action, start, end });
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }

    let stuck = (0..stages)
        .filter_map(|s| {
            let blocked = *actions[s].get(next[s])?;
            let waits_for = dependencies(blocked)
                .into_iter()
                .filter(|dep| end_of(*dep, &forward_end, &grad_end).is_none())
                .collect();
            Some(Stuck { stage: s, blocked, waits_for })
        })
        .collect();
    Simulation { entries, stuck }
}

/// The simulation of [`simulate`] with stages that slow each other: time advances from event
/// to event (an action ends, a message arrives), and between two events each running action
/// gets through `1 / slowdown(k)` seconds of its own cost per second, `k` being the number of
/// stages computing then. A stage still starts its next action as soon as it is free and the
/// action's inputs have arrived; with a slowdown of 1 this is exactly [`simulate`]'s timeline.
/// Requires a schedule that passed validation (every action can run).
fn simulate_shared(
    stages: usize,
    microbatches: usize,
    placement: &[usize],
    actions: &[Vec<Action>],
    costs: &dyn CostModel,
) -> Vec<Vec<TimedAction>> {
    let rules = Dependencies::new(microbatches, placement, actions);
    let pairs = placement.len() * microbatches;
    // When each action's result can be used on `at_stage`: its end, plus the message's trip
    // when it crosses stages; `None` until it has run.
    let mut forward_end: Vec<Option<f64>> = vec![None; pairs];
    let mut grad_end: Vec<Option<f64>> = vec![None; pairs];
    let arrival = |dep: Action, at_stage: usize, forward_end: &[Option<f64>], grad_end: &[Option<f64>]| {
        let end = match dep.kind {
            ActionKind::Forward => forward_end[rules.index(dep)],
            _ => grad_end[rules.index(dep)],
        }?;
        Some(if dep.stage != at_stage { end + costs.transfer(dep) } else { end })
    };

    let mut next = vec![0usize; stages];
    // Per stage: the action it runs, when it started, and the seconds of its cost left.
    let mut running: Vec<Option<(Action, f64, f64)>> = vec![None; stages];
    let mut entries: Vec<Vec<TimedAction>> = actions.iter().map(|l| Vec::with_capacity(l.len())).collect();
    let mut now = 0.0f64;
    loop {
        // Start what can start now; finish at once what costs nothing, which may free more.
        let mut waiting_until = f64::INFINITY;
        loop {
            let mut changed = false;
            for s in 0..stages {
                if running[s].is_some() {
                    continue;
                }
                let Some(&action) = actions[s].get(next[s]) else { continue };
                let mut ready = Some(now);
                for dep in rules.of(action) {
                    ready = match (ready, arrival(dep, s, &forward_end, &grad_end)) {
                        (Some(r), Some(e)) => Some(r.max(e)),
                        _ => None,
                    };
                }
                match ready {
                    Some(at) if at <= now => {
                        running[s] = Some((action, now, costs.duration(action)));
                        next[s] += 1;
                        changed = true;
                    }
                    Some(at) => waiting_until = waiting_until.min(at),
                    None => {}
                }
                if let Some((action, start, left)) = running[s] {
                    if left <= 0.0 {
                        finish(action, start, now, &rules, &mut forward_end, &mut grad_end, &mut entries[s]);
                        running[s] = None;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let busy = running.iter().flatten().count();
        if busy == 0 && waiting_until.is_infinite() {
            break;
        }
        let rate = if busy > 0 { 1.0 / costs.slowdown(busy) } else { 1.0 };
        let soonest_end = running.iter().flatten().map(|&(_, _, left)| left / rate).fold(f64::INFINITY, f64::min);
        // The next event: an action's end, or a message arriving (exactly then, not a rounding
        // error before it, or the stage would wait for it forever).
        let (step, at) = if waiting_until - now <= soonest_end {
            (waiting_until - now, waiting_until)
        } else {
            (soonest_end, now + soonest_end)
        };
        now = at;
        for s in 0..stages {
            if let Some((action, start, left)) = running[s] {
                // Actions due within rounding of this event end now, not after a sliver more.
                if left / rate <= step * (1.0 + 1e-12) {
                    finish(action, start, now, &rules, &mut forward_end, &mut grad_end, &mut entries[s]);
                    running[s] = None;
                } else {
                    running[s] = Some((action, start, left - step * rate));
                }
            }
        }
    }
    entries
}

/// Records `action`, which ran from `start` to `end`, and makes its result available.
fn finish(
    action: Action,
    start: f64,
    end: f64,
    rules: &Dependencies,
    forward_end: &mut [Option<f64>],
    grad_end: &mut [Option<f64>],
    entries: &mut Vec<TimedAction>,
) {
    match action.kind {
        ActionKind::Forward => forward_end[rules.index(action)] = Some(end),
        ActionKind::Backward | ActionKind::BackwardInput => grad_end[rules.index(action)] = Some(end),
        ActionKind::BackwardWeight => {}
    }
    entries.push(TimedAction { action, start, end });
}
