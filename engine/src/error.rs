//! The engine's error type: every failure a user can cause or meet names what went wrong.

use thiserror::Error;

use crate::partition::PartitionError;
use crate::schedule::{Action, ScheduleError};

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("invalid partition: {0}")]
    Partition(#[from] PartitionError),
    #[error("invalid schedule: {0}")]
    Schedule(#[from] ScheduleError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("stage {stage} failed{}: {message}", at_action(.action))]
    StageFailed { stage: usize, action: Option<Action>, message: String },
    #[error("the pipeline was stopped by an earlier failure ({0}); build a new one")]
    Stopped(String),
    #[error(transparent)]
    Checkpoint(crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

fn at_action(action: &Option<Action>) -> String {
    match action {
        Some(a) => format!(" at {a} (micro-batch {})", a.microbatch),
        None => String::new(),
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
