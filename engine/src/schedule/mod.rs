//! The schedule IR: which stage does what to which micro-batch, in which order.
//!
//! A [`Schedule`] is one list of [`Action`]s per stage (`1F3`: stage 1, forward, micro-batch 3);
//! the executor runs stage `s`'s list on its own thread, strictly in order. Following PyTorch's
//! `torch.distributed.pipelining`, there is one IR with many generators ([`Schedule::gpipe`],
//! [`Schedule::one_f_one_b`], [`Schedule::forward_only`], hand-written lists via
//! [`Schedule::from_actions`] or [`Schedule::parse`]), one validator that every schedule passes
//! before it can exist (so the executor never meets a deadlock or a missing backward), and one
//! printer ([`Schedule::grid`], [`Schedule::to_text`]).
//!
//! Virtual stages: the model is cut into `chunks` pieces in model order, and each device
//! (`stage`) holds one or more of them. The routing table ([`Schedule::placement`], chunk →
//! device) is read off the actions themselves (`0.3F1` puts chunk 3 on device 0), so schedule
//! files need nothing new; chunk `c`'s activations go to chunk `c + 1`'s device and its input
//! gradients to chunk `c - 1`'s. Without virtual stages chunk `s` is device `s`.

mod action;
mod error;
mod generators;
mod print;
mod timeline;
mod validate;
mod zero_bubble;

#[cfg(test)]
mod tests;

pub use action::{Action, ActionKind};
pub use error::{ScheduleError, Stuck};
pub use generators::{round_robin, v_shape};
pub use generators::{ScheduleKind, MAX_SCHEDULE_ACTIONS};
pub use timeline::{ActionCosts, CostModel, TimedAction, Timeline};
pub use zero_bubble::{GreedyCosts, GreedyOptions};

/// A validated pipeline schedule. Only constructors that validate can build one, so holding a
/// `Schedule` means it runs to completion under the executor's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    stages: usize,
    microbatches: usize,
    /// `placement[c]`: the device (stage) holding model chunk `c`; its length is the chunk count.
    placement: Vec<usize>,
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

    /// How many model chunks (virtual stages) the model is cut into: `stages × v`.
    pub fn chunks(&self) -> usize {
        self.placement.len()
    }

    /// The routing table: `placement()[c]` is the device holding model chunk `c`. Chunk `c`'s
    /// activation goes to `placement()[c + 1]`, its input gradient to `placement()[c - 1]`.
    pub fn placement(&self) -> &[usize] {
        &self.placement
    }

    /// The chunks device `stage` holds, in model order.
    pub fn chunks_on(&self, stage: usize) -> Vec<usize> {
        (0..self.chunks()).filter(|&c| self.placement[c] == stage).collect()
    }

    /// Chunks per device when every device holds the same number (`v`), else `None`.
    pub fn virtual_stages(&self) -> Option<usize> {
        let v = self.chunks() / self.stages.max(1);
        (v * self.stages == self.chunks() && (0..self.stages).all(|s| self.chunks_on(s).len() == v)).then_some(v)
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
