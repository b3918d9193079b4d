//! The schedule IR: which stage does what to which micro-batch, in which order.
//!
//! A [`Schedule`] is one list of [`Action`]s per stage (`1F3`: stage 1, forward, micro-batch 3);
//! the executor runs stage `s`'s list on its own thread, strictly in order. Following PyTorch's
//! `torch.distributed.pipelining`, there is one IR with many generators ([`Schedule::gpipe`],
//! [`Schedule::one_f_one_b`], [`Schedule::forward_only`], hand-written lists via
//! [`Schedule::from_actions`] or [`Schedule::parse`]), one validator that every schedule passes
//! before it can exist (so the executor never meets a deadlock or a missing backward), and one
//! printer ([`Schedule::grid`], [`Schedule::to_text`]).

mod action;
mod error;
mod generators;
mod print;
mod timeline;
mod validate;

#[cfg(test)]
mod tests;

pub use action::{Action, ActionKind};
pub use error::{ScheduleError, Stuck};
pub use generators::ScheduleKind;
pub use timeline::{ActionCosts, CostModel, TimedAction, Timeline};

/// A validated pipeline schedule. Only constructors that validate can build one, so holding a
/// `Schedule` means it runs to completion under the executor's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    stages: usize,
    microbatches: usize,
    /// `actions[s]`: stage `s`'s actions in execution order.
    actions: Vec<Vec<Action>>,
    name: String,
}

impl Schedule {
    pub fn stages(&self) -> usize {
        self.stages
    }

    pub fn microbatches(&self) -> usize {
        self.microbatches
    }

    /// Stage `stage`'s actions in execution order (empty for a stage that does not exist).
    pub fn stage_actions(&self, stage: usize) -> &[Action] {
        self.actions.get(stage).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every stage's list; `actions()[s] == stage_actions(s)`.
    pub fn actions(&self) -> &[Vec<Action>] {
        &self.actions
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the schedule runs backwards (training) or only forwards (evaluation).
    pub fn is_training(&self) -> bool {
        self.actions.iter().flatten().any(|a| a.kind.is_backward())
    }
}
