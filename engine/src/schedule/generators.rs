//! The built-in schedules. Each generator only lists actions; whether the list is runnable is the
//! validator's call, so a bug in a generator surfaces as a validation error, not a hang.

use std::fmt;
use std::str::FromStr;

use super::action::{Action, ActionKind};
use super::error::ScheduleError;
use super::validate::validate_parts;
use super::zero_bubble::{GreedyCosts, GreedyOptions};
use super::Schedule;

impl Schedule {
    /// GPipe: every stage runs all forwards, then all backwards, micro-batch 0 first (as
    /// PyTorch's `ScheduleGPipe`). Simple, but every stage holds all `m` activations at once.
    pub fn gpipe(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        let actions = (0..stages)
            .map(|s| {
                let forwards = (0..microbatches).map(|mb| Action::forward(s, mb));
                let backwards = (0..microbatches).map(|mb| Action::backward(s, mb));
                forwards.chain(backwards).collect()
            })
            .collect();
        Schedule::from_actions(ScheduleKind::GPipe.to_string(), stages, microbatches, actions)
    }

    /// Non-interleaved 1F1B (PipeDream-flush / Megatron / PyTorch's `Schedule1F1B`).
    ///
    /// Stage `s` runs `min(stages - s - 1, m)` warm-up forwards, then alternates one forward and
    /// one backward, then drains the remaining backwards. Starting backwards as early as possible
    /// caps stage `s` at `stages - s` micro-batches of live activations instead of GPipe's `m`,
    /// for the same bubble.
    pub fn one_f_one_b(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        let actions = (0..stages)
            .map(|s| {
                let warmup = stages.saturating_sub(s + 1).min(microbatches);
                let mut list: Vec<Action> = (0..warmup).map(|mb| Action::forward(s, mb)).collect();
                for i in 0..microbatches - warmup {
                    list.push(Action::forward(s, warmup + i));
                    list.push(Action::backward(s, i));
                }
                list.extend((microbatches - warmup..microbatches).map(|mb| Action::backward(s, mb)));
                list
            })
            .collect();
        Schedule::from_actions(ScheduleKind::OneFOneB.to_string(), stages, microbatches, actions)
    }

    /// Inference / evaluation: each stage forwards every micro-batch in order, nothing else.
    pub fn forward_only(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        Schedule::forward_only_on(&(0..stages).collect::<Vec<_>>(), stages, microbatches)
    }

    /// Forward-only over a routing table (`placement[c]`: chunk `c`'s device): each device
    /// forwards micro-batch 0 through its chunks in model order, then micro-batch 1, and so on.
    /// Every dependency points to a smaller (micro-batch, chunk) pair, so this never deadlocks.
    pub fn forward_only_on(placement: &[usize], stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        let actions = (0..stages)
            .map(|s| {
                (0..microbatches)
                    .flat_map(|mb| {
                        (0..placement.len())
                            .filter(move |&c| placement[c] == s)
                            .map(move |c| Action::on_chunk(s, c, ActionKind::Forward, mb))
                    })
                    .collect()
            })
            .collect();
        Schedule::from_actions("forward-only", stages, microbatches, actions)
    }

    /// Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM; PyTorch's
    /// `ScheduleInterleaved1F1B`): the model is cut into `stages × v` chunks, chunk `k` on device
    /// `k mod p`. Micro-batches go through in groups of `p`: a device forwards a group through
    /// its first chunk, then through its second, and so on (backwards in reverse chunk order).
    /// Device `d` warms up with `2(p - d - 1) + (v - 1)p` forwards, then alternates one forward
    /// and one backward. Each hop is 1/v of a stage, so the bubble shrinks by v, for v times the
    /// messages. Needs `m` a multiple of `p` (the groups).
    pub fn interleaved_one_f_one_b(stages: usize, microbatches: usize, v: usize) -> Result<Schedule, ScheduleError> {
        let unsupported = |reason: String| ScheduleError::Unsupported {
            schedule: ScheduleKind::Interleaved.to_string(),
            stages,
            microbatches,
            virtual_stages: v,
            reason,
        };
        if stages == 0 || microbatches == 0 {
            return Err(ScheduleError::Empty { stages, microbatches });
        }
        ScheduleKind::Interleaved.check_virtual_stages(v).map_err(unsupported)?;
        if !microbatches.is_multiple_of(stages) {
            return Err(unsupported(format!(
                "the micro-batches must be a multiple of the stages (micro-batches go through in groups of {stages}); try m = {} or {}",
                (microbatches / stages).max(1) * stages,
                (microbatches / stages + 1) * stages
            )));
        }
        let (p, total) = (stages, microbatches * v);
        let actions = (0..p)
            .map(|d| {
                let at = |k: usize, kind: ActionKind| {
                    let (group, within) = (k / (p * v), k % (p * v));
                    let local = if kind == ActionKind::Forward { within / p } else { v - 1 - within / p };
                    Action::on_chunk(d, local * p + d, kind, group * p + within % p)
                };
                let warmup = (2 * (p - d - 1) + (v - 1) * p).min(total);
                let mut list: Vec<Action> = (0..warmup).map(|k| at(k, ActionKind::Forward)).collect();
                for i in 0..total - warmup {
                    list.push(at(warmup + i, ActionKind::Forward));
                    list.push(at(i, ActionKind::Backward));
                }
                list.extend((total - warmup..total).map(|k| at(k, ActionKind::Backward)));
                list
            })
            .collect();
        Schedule::from_actions(ScheduleKind::Interleaved.to_string(), stages, microbatches, actions)
    }

    /// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2024): backwards split into `I`
    /// and `W`; every stage may hold as many micro-batches as 1F1B's first stage (`p`, counted
    /// from `F` until `W`), so later stages defer their `W`s into the time 1F1B leaves idle.
    /// Bubble `(p-1)(F+I-W)` instead of 1F1B's `(p-1)(F+B)`, at 1F1B's peak memory.
    ///
    /// Two constructions are simulated and the shorter kept: the paper's pattern (1F1B's order
    /// with each `B` split, stage `s` holding back its last `s` weight steps, which fit in the
    /// memory 1F1B leaves unused on later stages and let the gradient chain of the cool-down
    /// run at `I`'s pace), and the greedy scheduler with a limit of `p` micro-batches.
    pub fn zb_h1(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        let greedy = Schedule::greedy_zero_bubble(ScheduleKind::ZbH1, stages, microbatches, 1, stages as f64)?;
        let pattern = Schedule::from_actions(
            ScheduleKind::ZbH1.to_string(),
            stages,
            microbatches,
            deferred_weight_one_f_one_b(stages, microbatches, |s| s),
        )?;
        let unit = super::ActionCosts::default();
        Ok(if pattern.timeline(unit).makespan() <= greedy.timeline(unit).makespan() { pattern } else { greedy })
    }

    /// ZB-H2: as ZB-H1 with room for `2p - 1` micro-batches per stage: the extra warm-up
    /// forwards fill the start, deferred `W`s the end, for a near-zero bubble.
    pub fn zb_h2(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        Schedule::greedy_zero_bubble(ScheduleKind::ZbH2, stages, microbatches, 1, (2 * stages - 1) as f64)
    }

    /// ZB-V: two chunks per device in a V (device `d` holds chunks `d` and `2p - 1 - d`, so the
    /// last chunk, which computes the loss, sits on device 0 beside the first), split backwards,
    /// and 1F1B's peak memory (`p` full micro-batches = `2p` half-size chunk stashes).
    pub fn zb_v(stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        Schedule::greedy_zero_bubble(ScheduleKind::ZbV, stages, microbatches, 2, (2 * stages) as f64)
    }

    fn greedy_zero_bubble(
        kind: ScheduleKind,
        stages: usize,
        microbatches: usize,
        v: usize,
        limit: f64,
    ) -> Result<Schedule, ScheduleError> {
        if stages == 0 || microbatches == 0 {
            return Err(ScheduleError::Empty { stages, microbatches });
        }
        let placement = if v == 2 { v_shape(stages) } else { (0..stages).collect() };
        let costs = GreedyCosts::unit(&placement, limit);
        let best =
            Schedule::best_greedy(&costs, stages, microbatches, &GreedyOptions::variants()).map_err(|reason| {
                ScheduleError::Unsupported {
                    schedule: kind.to_string(),
                    stages,
                    microbatches,
                    virtual_stages: v,
                    reason,
                }
            })?;
        Schedule::from_actions(kind.to_string(), stages, microbatches, best.actions)
    }

    /// A hand-written (or generated elsewhere) schedule; `actions[s]` is stage `s`'s list in
    /// execution order. Rejected unless it passes [`Schedule::validate`].
    pub fn from_actions(
        name: impl Into<String>,
        stages: usize,
        microbatches: usize,
        actions: Vec<Vec<Action>>,
    ) -> Result<Schedule, ScheduleError> {
        let placement = validate_parts(stages, microbatches, &actions)?;
        Ok(Schedule { stages, microbatches, placement, actions, name: name.into() })
    }
}

/// 1F1B's order with every `B` split into `I` and `W`, stage `s` keeping its last `lag(s)`
/// weight steps deferred (the rest run right after the `I` that makes room), all remaining
/// ones at the end.
fn deferred_weight_one_f_one_b(stages: usize, microbatches: usize, lag: impl Fn(usize) -> usize) -> Vec<Vec<Action>> {
    (0..stages)
        .map(|s| {
            let warmup = stages.saturating_sub(s + 1).min(microbatches);
            let mut list: Vec<Action> = (0..warmup).map(|mb| Action::forward(s, mb)).collect();
            let mut deferred = std::collections::VecDeque::new();
            let mut backward = |mb: usize, list: &mut Vec<Action>| {
                list.push(Action::backward_input(s, mb));
                deferred.push_back(Action::backward_weight(s, mb));
                while deferred.len() > lag(s) {
                    list.extend(deferred.pop_front());
                }
            };
            for i in 0..microbatches - warmup {
                list.push(Action::forward(s, warmup + i));
                backward(i, &mut list);
            }
            for mb in microbatches - warmup..microbatches {
                backward(mb, &mut list);
            }
            list.extend(deferred);
            list
        })
        .collect()
}

/// ZB-V's routing table: device `d` holds chunks `d` and `2p - 1 - d`.
pub fn v_shape(stages: usize) -> Vec<usize> {
    (0..2 * stages).map(|c| if c < stages { c } else { 2 * stages - 1 - c }).collect()
}

/// Megatron's interleaved routing table: chunk `k` on device `k mod p`.
pub fn round_robin(stages: usize, v: usize) -> Vec<usize> {
    (0..stages * v).map(|c| c % stages).collect()
}

/// The built-in training schedules, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    GPipe,
    OneFOneB,
    /// Interleaved 1F1B, `v ≥ 2` chunks per device, round-robin.
    Interleaved,
    ZbH1,
    ZbH2,
    /// Two chunks per device in a V.
    ZbV,
    /// The zero-bubble scheduler over measured costs and a memory limit (`v` = 1 or 2, in a V);
    /// without costs (`build`), over unit costs and 1F1B's memory, like ZB-H1 / ZB-V.
    ZbAuto,
}

/// The most actions a generated schedule may hold (3 per chunk and micro-batch with a split
/// backward): far beyond any real pipeline, small enough to build without exhausting memory.
pub const MAX_SCHEDULE_ACTIONS: usize = 1 << 26;

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 7] = [
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
        ScheduleKind::ZbH2,
        ScheduleKind::ZbV,
        ScheduleKind::ZbAuto,
    ];

    /// The schedule at its default virtual-stage count ([`ScheduleKind::default_virtual_stages`]).
    pub fn build(self, stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        self.build_with(stages, microbatches, self.default_virtual_stages())
    }

    /// The schedule with `v` chunks per device; kinds with a fixed `v` refuse any other.
    pub fn build_with(self, stages: usize, microbatches: usize, v: usize) -> Result<Schedule, ScheduleError> {
        let unsupported = |reason| ScheduleError::Unsupported {
            schedule: self.to_string(),
            stages,
            microbatches,
            virtual_stages: v,
            reason,
        };
        self.check_virtual_stages(v).map_err(unsupported)?;
        // Counts from a command line can be typos of a few zeros: refuse them here rather than
        // overflow or exhaust memory building the lists.
        let actions = [stages, v, microbatches].iter().try_fold(3usize, |a, &n| a.checked_mul(n));
        if actions.is_none_or(|a| a > MAX_SCHEDULE_ACTIONS) {
            return Err(unsupported(format!(
                "{stages} stages x {v} chunks x {microbatches} micro-batches is more than the {MAX_SCHEDULE_ACTIONS} actions a schedule may hold"
            )));
        }
        match self {
            ScheduleKind::GPipe => Schedule::gpipe(stages, microbatches),
            ScheduleKind::OneFOneB => Schedule::one_f_one_b(stages, microbatches),
            ScheduleKind::Interleaved => Schedule::interleaved_one_f_one_b(stages, microbatches, v),
            ScheduleKind::ZbH1 => Schedule::zb_h1(stages, microbatches),
            ScheduleKind::ZbH2 => Schedule::zb_h2(stages, microbatches),
            ScheduleKind::ZbV => Schedule::zb_v(stages, microbatches),
            ScheduleKind::ZbAuto => {
                if stages == 0 || microbatches == 0 {
                    return Err(ScheduleError::Empty { stages, microbatches });
                }
                let placement = ScheduleKind::ZbAuto.placement(stages, v);
                let costs = GreedyCosts::unit(&placement, (stages * v) as f64);
                Schedule::zero_bubble_from_costs(self.to_string(), &costs, stages, microbatches)
            }
        }
    }

    /// Whether this kind can run `v` chunks per device; `Err` says what it needs.
    pub fn check_virtual_stages(self, v: usize) -> Result<(), String> {
        match self {
            ScheduleKind::Interleaved if v < 2 => {
                Err("interleaving needs at least 2 virtual stages per device (v = 1 is plain 1f1b)".into())
            }
            ScheduleKind::Interleaved => Ok(()),
            ScheduleKind::ZbAuto if v == 1 || v == 2 => Ok(()),
            ScheduleKind::ZbAuto => Err("zb-auto places 1 chunk per device, or 2 in a V".into()),
            _ if v == self.default_virtual_stages() => Ok(()),
            _ => Err(format!("{self} has {} chunk(s) per device", self.default_virtual_stages())),
        }
    }

    /// The routing table this kind uses for `stages` devices and `v` chunks per device.
    pub fn placement(self, stages: usize, v: usize) -> Vec<usize> {
        match (self, v) {
            (ScheduleKind::ZbV, _) | (ScheduleKind::ZbAuto, 2) => v_shape(stages),
            _ => round_robin(stages, v.max(1)),
        }
    }

    /// Chunks per device: 2 for interleaved 1F1B (any `v ≥ 2` can be asked for) and ZB-V, else 1.
    pub fn default_virtual_stages(self) -> usize {
        match self {
            ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
            _ => 1,
        }
    }

    /// The bubble the papers state, as a share of the step, with F = I = W (so B = 2F): a
    /// stage idles `b` out of `3m + b`, where `b` is `(p-1)(F+B)` for GPipe and 1F1B,
    /// `(p-1)(F+B)/v` for interleaved 1F1B, `(p-1)(F+I-W)` for ZB-H1 and `(p-1)(F+I-2W)` = 0
    /// for ZB-H2 and ZB-V.
    ///
    /// The zero-bubble paper's zeros leave out the ramp: the last stage cannot start before the
    /// first micro-batch's forward has crossed the `p - 1` stages before it, so with equal costs
    /// no schedule idles less than `(p-1)F` per stage (ZB-H1's figure; `(p-1)F/2` for ZB-V,
    /// whose chunks are half a stage). The simulator counts the ramp; this formula does not.
    pub fn theoretical_bubble(self, stages: usize, microbatches: usize, v: usize) -> f64 {
        let (p, m, v) = (stages as f64, microbatches as f64, v.max(1) as f64);
        let idle = match self {
            ScheduleKind::GPipe | ScheduleKind::OneFOneB => 3.0 * (p - 1.0),
            ScheduleKind::Interleaved => 3.0 * (p - 1.0) / v,
            ScheduleKind::ZbH1 => p - 1.0,
            ScheduleKind::ZbAuto if v < 2.0 => p - 1.0,
            ScheduleKind::ZbH2 | ScheduleKind::ZbV | ScheduleKind::ZbAuto => 0.0,
        };
        idle / (3.0 * m + idle)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved-1f1b",
            ScheduleKind::ZbH1 => "zb-h1",
            ScheduleKind::ZbH2 => "zb-h2",
            ScheduleKind::ZbV => "zb-v",
            ScheduleKind::ZbAuto => "zb-auto",
        })
    }
}

impl FromStr for ScheduleKind {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<ScheduleKind, ScheduleError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gpipe" => Ok(ScheduleKind::GPipe),
            "1f1b" | "one-f-one-b" => Ok(ScheduleKind::OneFOneB),
            "interleaved-1f1b" | "interleaved" | "i1f1b" => Ok(ScheduleKind::Interleaved),
            "zb-h1" | "zbh1" => Ok(ScheduleKind::ZbH1),
            "zb-h2" | "zbh2" => Ok(ScheduleKind::ZbH2),
            "zb-v" | "zbv" => Ok(ScheduleKind::ZbV),
            "zb-auto" | "zbauto" => Ok(ScheduleKind::ZbAuto),
            _ => Err(ScheduleError::UnknownKind(s.to_string())),
        }
    }
}
