//! The one validator every schedule goes through, generated or hand-written.
//!
//! Checks run from cheapest and most specific to most general (indices, duplicates, missing work,
//! order on a stage, then the deadlock simulation), so each problem is reported by the check
//! that can explain it best: "1B3 runs before 1F3" rather than "deadlock".

use std::collections::HashMap;

use super::action::{Action, ActionKind};
use super::error::ScheduleError;
use super::print::{marked_listing, Mark};
use super::timeline::{simulate, ActionCosts};
use super::Schedule;

impl Schedule {
    /// Checks that every stage can run its list to the end under the executor's rules and that
    /// together they do each micro-batch's work exactly once. Constructors call this; it is public
    /// so callers can re-check after building schedules by other means.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let placement = validate_parts(self.stages, self.microbatches, &self.actions)?;
        if placement != self.placement {
            return Err(ScheduleError::Routing(format!(
                "the routing table {:?} does not match the chunks the actions place ({placement:?})",
                self.placement
            )));
        }
        Ok(())
    }
}

/// Validates the lists and returns the routing table they imply (chunk → device).
pub(super) fn validate_parts(
    stages: usize,
    microbatches: usize,
    actions: &[Vec<Action>],
) -> Result<Vec<usize>, ScheduleError> {
    if stages == 0 || microbatches == 0 {
        return Err(ScheduleError::Empty { stages, microbatches });
    }
    if actions.len() != stages {
        return Err(ScheduleError::StageCount { expected: stages, got: actions.len() });
    }
    let grid = |marks: &[Mark]| marked_listing(actions, marks);

    // Every chunk needs at least one action per micro-batch, so a chunk index at or beyond the
    // number of actions cannot be complete (and must not size the routing table).
    let total: usize = actions.iter().map(Vec::len).sum();
    // Where each action is listed: (stage list, position).
    let mut position: HashMap<Action, (usize, usize)> = HashMap::new();
    let mut placed_at: HashMap<usize, (usize, usize)> = HashMap::new();
    for (listed_on, list) in actions.iter().enumerate() {
        for (pos, &action) in list.iter().enumerate() {
            let here = Mark::cell(listed_on, pos, "");
            if action.stage >= stages || action.microbatch >= microbatches || action.chunk >= total {
                let grid = grid(&[here.note("out of range")]);
                return Err(ScheduleError::OutOfRange { action, stages, microbatches, grid });
            }
            if action.stage != listed_on {
                let grid = grid(&[here.note(&format!("belongs on stage {}", action.stage))]);
                return Err(ScheduleError::WrongStage { action, listed_on, grid });
            }
            match placed_at.get(&action.chunk) {
                Some(&(first_on, first_pos)) if first_on != listed_on => {
                    let marks = [
                        Mark::cell(first_on, first_pos, &format!("chunk {} on stage {first_on}", action.chunk)),
                        here.note("and on this stage"),
                    ];
                    return Err(ScheduleError::ChunkOnTwoStages {
                        chunk: action.chunk,
                        first: first_on,
                        second: listed_on,
                        grid: grid(&marks),
                    });
                }
                Some(_) => {}
                None => {
                    placed_at.insert(action.chunk, (listed_on, pos));
                }
            }
            if let Some(&(first_on, first_pos)) = position.get(&action) {
                let marks = [Mark::cell(first_on, first_pos, "first"), here.note("listed again")];
                return Err(ScheduleError::Duplicate { action, grid: grid(&marks) });
            }
            position.insert(action, (listed_on, pos));
        }
    }
    let chunks = placed_at.keys().map(|c| c + 1).max().unwrap_or(0);
    // A chunk with no action at all is caught as missing work below; give it a device that
    // cannot match any action.
    let placement: Vec<usize> = (0..chunks).map(|c| placed_at.get(&c).map_or(usize::MAX, |p| p.0)).collect();
    let listed = |chunk: usize, kind, microbatch| {
        let stage = *placement.get(chunk)?;
        position.get(&Action { stage, chunk, kind, microbatch }).copied()
    };

    let training = actions.iter().flatten().any(|a| a.kind.is_backward());
    if training {
        let forward_only: Vec<usize> =
            (0..stages).filter(|&s| !actions[s].iter().any(|a| a.kind.is_backward())).collect();
        if !forward_only.is_empty() {
            let marks: Vec<Mark> = forward_only.iter().map(|&s| Mark::row(s, "no backward actions")).collect();
            return Err(ScheduleError::MixedTraining { stages: forward_only, grid: grid(&marks) });
        }
        for (s, pos, full) in in_list_order(actions) {
            if full.kind != ActionKind::Backward {
                continue;
            }
            for kind in [ActionKind::BackwardInput, ActionKind::BackwardWeight] {
                if let Some((split_on, split_pos)) = listed(full.chunk, kind, full.microbatch) {
                    let split = Action { kind, ..full };
                    let marks =
                        [Mark::cell(s, pos, "full backward"), Mark::cell(split_on, split_pos, "split backward")];
                    return Err(ScheduleError::ConflictingBackward { full, split, grid: grid(&marks) });
                }
            }
        }
    }

    check_complete(&placement, microbatches, training, &position, &grid)?;

    // Same-stage order: the simulation would also catch these, but as a vaguer "deadlock".
    for (s, pos, action) in in_list_order(actions) {
        let needs = match action.kind {
            ActionKind::Backward | ActionKind::BackwardInput => Action { kind: ActionKind::Forward, ..action },
            ActionKind::BackwardWeight => Action { kind: ActionKind::BackwardInput, ..action },
            ActionKind::Forward => continue,
        };
        if let Some((_, needs_pos)) = listed(needs.chunk, needs.kind, needs.microbatch) {
            if needs_pos > pos {
                let marks = [Mark::cell(s, pos, &format!("needs {needs} first")), Mark::cell(s, needs_pos, "")];
                return Err(ScheduleError::OutOfOrder { action, needs, grid: grid(&marks) });
            }
        }
    }

    let stuck = simulate(stages, microbatches, &placement, actions, &ActionCosts::default()).stuck;
    if !stuck.is_empty() {
        let marks: Vec<Mark> = stuck
            .iter()
            .map(|st| {
                let waits: Vec<String> = st.waits_for.iter().map(|a| a.to_string()).collect();
                Mark::cell(st.stage, position[&st.blocked].1, &format!("stuck, waits for {}", waits.join(" and ")))
            })
            .collect();
        return Err(ScheduleError::Deadlock { stuck, grid: grid(&marks) });
    }
    Ok(placement)
}

/// (stage list, position, action), so that of several problems the first listed is reported.
fn in_list_order(actions: &[Vec<Action>]) -> impl Iterator<Item = (usize, usize, Action)> + '_ {
    actions.iter().enumerate().flat_map(|(s, list)| list.iter().enumerate().map(move |(pos, &a)| (s, pos, a)))
}

/// Every (chunk, micro-batch) needs one F and, in training, one B or one I plus one W.
fn check_complete(
    placement: &[usize],
    microbatches: usize,
    training: bool,
    position: &HashMap<Action, (usize, usize)>,
    grid: &dyn Fn(&[Mark]) -> String,
) -> Result<(), ScheduleError> {
    let chunks = placement.len();
    // The stage a chunk's missing work belongs on (a chunk listed nowhere: its own index).
    let stage_of = |c: usize| if placement[c] == usize::MAX { c } else { placement[c] };
    let listed =
        |chunk: usize, kind, microbatch| position.get(&Action { stage: placement[chunk], chunk, kind, microbatch });
    let missing_at = |c: usize, mb: usize| -> Option<String> {
        let has = |kind| listed(c, kind, mb).is_some();
        let token = |kind| Action::on_chunk(stage_of(c), c, kind, mb).to_string();
        let (f, b, i, w) = (
            has(ActionKind::Forward),
            has(ActionKind::Backward),
            has(ActionKind::BackwardInput),
            has(ActionKind::BackwardWeight),
        );
        let mut missing = Vec::new();
        if !f {
            missing.push(token(ActionKind::Forward));
        }
        if training {
            let (tb, ti, tw) =
                (token(ActionKind::Backward), token(ActionKind::BackwardInput), token(ActionKind::BackwardWeight));
            match (b, i, w) {
                (false, false, false) => missing.push(format!("{tb} (or {ti} and {tw})")),
                (false, true, false) => missing.push(format!("{tw} (its {ti} is listed)")),
                (false, false, true) => missing.push(format!("{ti} (its {tw} is listed)")),
                _ => {}
            }
        }
        (!missing.is_empty()).then(|| missing.join(" and "))
    };

    // Complete pairs each have a listed F, so the first incomplete pair is found within
    // (number of actions + 1) steps, even for absurd stage or micro-batch counts.
    let first = (0..chunks)
        .flat_map(|c| (0..microbatches).map(move |mb| (c, mb)))
        .find_map(|(c, mb)| missing_at(c, mb).map(|missing| (c, mb, missing)));
    let Some((chunk, microbatch, missing)) = first else { return Ok(()) };
    let complete = position
        .keys()
        .filter(|a| a.kind == ActionKind::Forward && missing_at(a.chunk, a.microbatch).is_none())
        .count();
    let more = chunks.saturating_mul(microbatches).saturating_sub(complete + 1);
    let stage = stage_of(chunk);
    let grid = grid(&[Mark::row(stage, &format!("missing {missing}"))]);
    Err(ScheduleError::MissingWork { stage, microbatch, missing, more, grid })
}
