//! One unit of pipeline work, `1F3` = stage 1 runs the forward of micro-batch 3.
//!
//! The letters are PyTorch's (`torch.distributed.pipelining`), so a schedule written for one can
//! be read by people who know the other.

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
    pub const ALL: [ActionKind; 4] = [
        ActionKind::Forward,
        ActionKind::Backward,
        ActionKind::BackwardInput,
        ActionKind::BackwardWeight,
    ];

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

/// `stage` and `microbatch` are 0-indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    pub stage: usize,
    pub kind: ActionKind,
    pub microbatch: usize,
}

impl Action {
    pub fn new(stage: usize, kind: ActionKind, microbatch: usize) -> Action {
        Action { stage, kind, microbatch }
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
        f.pad(&format!("{}{}{}", self.stage, self.kind.letter(), self.microbatch))
    }
}

impl FromStr for Action {
    type Err = ScheduleError;

    fn from_str(token: &str) -> Result<Action, ScheduleError> {
        let bad = |reason: String| ScheduleError::BadAction { token: token.to_string(), reason };
        let letter_at = token
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| bad("expected <stage><F|B|I|W><micro-batch>, e.g. 1F3".into()))?;
        let (stage_digits, rest) = token.split_at(letter_at);
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
            digits.parse::<usize>().map_err(|_| bad(format!("{what} number `{digits}` is too large")))
        };
        Ok(Action { stage: number(stage_digits, "stage")?, kind, microbatch: number(mb_digits, "micro-batch")? })
    }
}
