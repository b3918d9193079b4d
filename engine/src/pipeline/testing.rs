//! Fault injection, for tests only: makes a chosen stage fail (error, panic, non-finite loss) at
//! a chosen action, to check that one failing stage stops the whole pipeline cleanly.

use crate::schedule::Action;

/// Where to inject a failure, for testing that a failing stage stops the pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub stage: usize,
    /// `Some(action)`: just before that action; `None`: at the optimizer step.
    pub at: Option<Action>,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The stage returns an error.
    Error,
    /// The stage thread panics.
    Panic,
    /// The loss becomes NaN (only meaningful for a forward on the last stage).
    NonFiniteLoss,
}
