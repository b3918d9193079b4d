//! Everything that can be wrong with a schedule, before a single stage thread is started.
//!
//! Validation errors carry `grid`: the per-stage action lists with the offending cells in
//! brackets and `<-- ERROR HERE` on their rows, because "1B3 runs before 1F3" is much easier to
//! fix when you can see the row it is on.

use super::action::Action;

/// One stage that cannot make progress in a deadlocked schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub stage: usize,
    /// The first action on the stage's list that has not run.
    pub blocked: Action,
    /// The actions `blocked` needs that never ran.
    pub waits_for: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "a schedule needs at least one stage and one micro-batch (got stages={stages}, microbatches={microbatches})"
    )]
    Empty { stages: usize, microbatches: usize },

    #[error("schedule has {got} stage lists but stages={expected}")]
    StageCount { expected: usize, got: usize },

    #[error("unknown schedule `{0}` (expected gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v or zb-auto)")]
    UnknownKind(String),

    #[error(
        "chunk {chunk} is listed on stage {first} and on stage {second}: a model chunk lives on one device\n{grid}"
    )]
    ChunkOnTwoStages { chunk: usize, first: usize, second: usize, grid: String },

    #[error("bad routing table: {0}")]
    Routing(String),

    #[error("{schedule} cannot be built for stages={stages}, microbatches={microbatches}, virtual stages={virtual_stages}: {reason}")]
    Unsupported { schedule: String, stages: usize, microbatches: usize, virtual_stages: usize, reason: String },

    #[error("bad action `{token}`: {reason}")]
    BadAction { token: String, reason: String },

    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },

    #[error("no `stage {0}` row (stage rows must be numbered 0, 1, 2, ... without gaps)")]
    MissingStageRow(usize),

    #[error("cannot read schedule file {path}: {reason}")]
    Io { path: String, reason: String },

    #[error("in schedule file {path}: {source}")]
    InFile { path: String, source: Box<ScheduleError> },

    #[error("{action} is out of range (stages={stages}, microbatches={microbatches})\n{grid}")]
    OutOfRange { action: Action, stages: usize, microbatches: usize, grid: String },

    #[error("{action} is listed on stage {listed_on}, but it is stage {}'s work\n{grid}", .action.stage)]
    WrongStage { action: Action, listed_on: usize, grid: String },

    #[error("{action} is listed twice\n{grid}")]
    Duplicate { action: Action, grid: String },

    #[error("stage {stage} micro-batch {microbatch} is missing {missing}{}\n{grid}", more_suffix(*.more))]
    MissingWork { stage: usize, microbatch: usize, missing: String, more: usize, grid: String },

    #[error(
        "{full} and {split} are both listed: a micro-batch's backward is either one B or one I plus one W\n{grid}"
    )]
    ConflictingBackward { full: Action, split: Action, grid: String },

    #[error("some stages run backwards but stage(s) {} run only forwards: every stage must train, or none\n{grid}", list(.stages))]
    MixedTraining { stages: Vec<usize>, grid: String },

    #[error("{action} runs before {needs} on stage {}, but needs its result\n{grid}", .action.stage)]
    OutOfOrder { action: Action, needs: Action, grid: String },

    #[error("deadlock: {}\n{grid}", describe_stuck(.stuck))]
    Deadlock { stuck: Vec<Stuck>, grid: String },
}

fn more_suffix(more: usize) -> String {
    match more {
        0 => String::new(),
        n => format!(" (and {n} more (stage, micro-batch) pairs are incomplete)"),
    }
}

fn list(items: &[usize]) -> String {
    items.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
}

fn describe_stuck(stuck: &[Stuck]) -> String {
    stuck
        .iter()
        .map(|s| {
            let waits: Vec<String> = s.waits_for.iter().map(|a| a.to_string()).collect();
            format!("stage {} is blocked at {} waiting for {}", s.stage, s.blocked, waits.join(" and "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
