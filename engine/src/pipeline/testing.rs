//! Fault injection, for tests only: makes a chosen stage fail (error, panic, non-finite loss) at
//! a chosen action, to check that one failing stage stops the whole pipeline cleanly.
//!
//! Not part of the pipeline's configuration: a fault is armed on a running pipeline with
//! [`inject_fault`], which sends it to the stage's inbox. The stage keeps it until the pipeline
//! ends, so the next step meets it. Hidden from the documentation; nothing outside tests uses it.

use super::driver::Pipeline;
use super::protocol::Msg;
use crate::error::{EngineError, Result};
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

/// Arms `fault` in its stage of `pipeline`; the next training step meets it.
///
/// Stages are idle between calls on the pipeline and take their inbox in order, so the fault
/// is in place before the next step's work arrives.
pub fn inject_fault(pipeline: &mut Pipeline, fault: Fault) -> Result<()> {
    pipeline.ensure_running()?;
    let stages = pipeline.inboxes.len();
    if fault.stage >= stages {
        return Err(EngineError::Config(format!("no stage {} to inject a fault into ({stages} stages)", fault.stage)));
    }
    pipeline.send(fault.stage, Msg::InjectFault(fault))
}
