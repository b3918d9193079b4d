//! One unit of pipeline work, `1F3` = stage 1 runs the forward of micro-batch 3.
//!
//! The letters are PyTorch's (`torch.distributed.pipelining`), so a schedule written for one can
//! be read by people who know the other.
//!
//! With virtual stages (interleaved 1F1B, ZB-V) a device holds several model chunks, and a token
//! names both: `0.3F1` = device (stage) 0 runs model chunk 3's forward of micro-batch 1. When the
//! chunk index equals the device index (always so without virtual stages) the short form `1F3`
//! is used, so every schedule written before chunks existed still reads the same.

use std::fmt;
use std::str::FromStr;

use super::error::ScheduleError;

/// What a stage does to one micro-batch.
///
/// A full backward (`B`) may be split into its input-gradient half (`I`, which is what the
/// previous stage waits for) and its weight-gradient half (`W`, which nobody waits for). The split
/// is what lets zero-bubble schedules fill idle time with deferred `W`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionKind {
    Forward,
    /// Input gradient and weight gradient together.
    Backward,
    BackwardInput,
    BackwardWeight,
}

impl ActionKind {
    pub const ALL: [ActionKind; 4] =
        [ActionKind::Forward, ActionKind::Backward, ActionKind::BackwardInput, ActionKind::BackwardWeight];

    pub fn letter(self) -> char {
        match self {
            ActionKind::Forward => 'F',
            ActionKind::Backward => 'B',
            ActionKind::BackwardInput => 'I',
            ActionKind::BackwardWeight => 'W',
        }
    }

    pub fn from_letter(letter: char) -> Option<ActionKind> {
        ActionKind::ALL.into_iter().find(|k| k.letter() == letter)
    }

    /// Whether this action produces the gradient the previous stage is waiting for.
    pub fn sends_input_grad(self) -> bool {
        matches!(self, ActionKind::Backward | ActionKind::BackwardInput)
    }

    pub fn is_backward(self) -> bool {
        !matches!(self, ActionKind::Forward)
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// `stage` (the device whose thread runs it), `chunk` (the model chunk, i.e. virtual stage,
/// in model order) and `microbatch` are 0-indexed. Without virtual stages `chunk == stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    pub stage: usize,
    pub chunk: usize,
    pub kind: ActionKind,
    pub microbatch: usize,
}

impl Action {
    /// An action of stage `stage`'s own (only) chunk.
    pub fn new(stage: usize, kind: ActionKind, microbatch: usize) -> Action {
        Action { stage, chunk: stage, kind, microbatch }
    }

    /// An action of model chunk `chunk`, which device `stage` holds.
    pub fn on_chunk(stage: usize, chunk: usize, kind: ActionKind, microbatch: usize) -> Action {
        Action { stage, chunk, kind, microbatch }
    }

    /// The same work of the same chunk and micro-batch, another kind.
    pub fn with_kind(self, kind: ActionKind) -> Action {
        Action { kind, ..self }
    }

    pub fn forward(stage: usize, microbatch: usize) -> Action {
        Action::new(stage, ActionKind::Forward, microbatch)
    }

    pub fn backward(stage: usize, microbatch: usize) -> Action {
        Action::new(stage, ActionKind::Backward, microbatch)
    }

    pub fn backward_input(stage: usize, microbatch: usize) -> Action {
        Action::new(stage, ActionKind::BackwardInput, microbatch)
    }

    pub fn backward_weight(stage: usize, microbatch: usize) -> Action {
        Action::new(stage, ActionKind::BackwardWeight, microbatch)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Pad as a whole token, so grids can right-align cells with `{:>4}`.
        if self.chunk == self.stage {
            f.pad(&format!("{}{}{}", self.stage, self.kind.letter(), self.microbatch))
        } else {
            f.pad(&format!("{}.{}{}{}", self.stage, self.chunk, self.kind.letter(), self.microbatch))
        }
    }
}

impl FromStr for Action {
    type Err = ScheduleError;

    fn from_str(token: &str) -> Result<Action, ScheduleError> {
        let bad = |reason: String| ScheduleError::BadAction { token: token.to_string(), reason };
        let letter_at = token
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| bad("expected <stage>[.<chunk>]<F|B|I|W><micro-batch>, e.g. 1F3 or 0.3F1".into()))?;
        let (stage_digits, mut rest) = token.split_at(letter_at);
        let mut chunk_digits = None;
        if let Some(after_dot) = rest.strip_prefix('.') {
            let end = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
            if end == 0 {
                return Err(bad("missing chunk number after the `.`".into()));
            }
            chunk_digits = Some(&after_dot[..end]);
            rest = &after_dot[end..];
            if rest.is_empty() {
                return Err(bad("missing action letter after the chunk number".into()));
            }
        }
        let mut rest_chars = rest.chars();
        // `find` returned a char boundary of a non-empty remainder, so there is a letter.
        let letter = rest_chars.next().unwrap_or('?');
        let mb_digits = rest_chars.as_str();
        if stage_digits.is_empty() {
            return Err(bad("missing stage number before the letter".into()));
        }
        let kind = ActionKind::from_letter(letter)
            .ok_or_else(|| bad(format!("unknown action letter `{letter}` (expected F, B, I or W)")))?;
        if mb_digits.is_empty() {
            return Err(bad("missing micro-batch number after the letter".into()));
        }
        if !mb_digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("micro-batch `{mb_digits}` is not a number")));
        }
        let number = |digits: &str, what: &str| {
            // No schedule holds more actions than this, so no id can reach it either.
            digits
                .parse::<usize>()
                .ok()
                .filter(|&n| n < super::MAX_SCHEDULE_ACTIONS)
                .ok_or_else(|| bad(format!("{what} number `{digits}` is too large")))
        };
        let stage = number(stage_digits, "stage")?;
        let chunk = match chunk_digits {
            Some(digits) => number(digits, "chunk")?,
            None => stage,
        };
        Ok(Action { stage, chunk, kind, microbatch: number(mb_digits, "micro-batch")? })
    }
}
