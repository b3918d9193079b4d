//! The built-in schedules. Each generator only lists actions; whether the list is runnable is the
//! validator's call, so a bug in a generator surfaces as a validation error, not a hang.

use std::fmt;
use std::str::FromStr;

use super::action::Action;
use super::error::ScheduleError;
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
        let actions =
            (0..stages).map(|s| (0..microbatches).map(|mb| Action::forward(s, mb)).collect()).collect();
        Schedule::from_actions("forward-only", stages, microbatches, actions)
    }

    /// A hand-written (or generated elsewhere) schedule; `actions[s]` is stage `s`'s list in
    /// execution order. Rejected unless it passes [`Schedule::validate`].
    pub fn from_actions(
        name: impl Into<String>,
        stages: usize,
        microbatches: usize,
        actions: Vec<Vec<Action>>,
    ) -> Result<Schedule, ScheduleError> {
        let schedule = Schedule { stages, microbatches, actions, name: name.into() };
        schedule.validate()?;
        Ok(schedule)
    }
}

/// The built-in training schedules, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    GPipe,
    OneFOneB,
}

impl ScheduleKind {
    pub fn build(self, stages: usize, microbatches: usize) -> Result<Schedule, ScheduleError> {
        match self {
            ScheduleKind::GPipe => Schedule::gpipe(stages, microbatches),
            ScheduleKind::OneFOneB => Schedule::one_f_one_b(stages, microbatches),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
        })
    }
}

impl FromStr for ScheduleKind {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<ScheduleKind, ScheduleError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gpipe" => Ok(ScheduleKind::GPipe),
            "1f1b" | "one-f-one-b" => Ok(ScheduleKind::OneFOneB),
            _ => Err(ScheduleError::UnknownKind(s.to_string())),
        }
    }
}
