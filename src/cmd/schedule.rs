//! `brigade schedule`: draw a schedule (built-in or a file) as a time x stage grid or as
//! action lists, with its bubble; and the `--schedule` choice `train` shares.

use std::path::PathBuf;

use anyhow::{bail, Result};
use brigade::engine::pipeline::ScheduleChoice;
use brigade::engine::schedule::{ActionCosts, Schedule, ScheduleKind};
use clap::{Args, ValueEnum};

use super::plural;

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleFormat {
    /// Time x stage grid (F=1, B=2 time units).
    Grid,
    /// One line of actions per stage.
    Text,
}

#[derive(Args)]
pub struct ScheduleArgs {
    /// Either output loads back with `--schedule FILE`.
    #[arg(long, value_enum, default_value = "grid")]
    format: ScheduleFormat,
    /// gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, zb-auto (unit costs), `NAME:V` for V
    /// chunks per device (interleaved-1f1b:3), or a schedule file to validate and draw.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Stages of a built-in schedule (default 4); a file has its own.
    #[arg(long)]
    stages: Option<usize>,
    /// Micro-batches of a built-in schedule (default 8); a file has its own.
    #[arg(long)]
    microbatches: Option<usize>,
}

/// A built-in schedule's name (`NAME` or `NAME:V`), or else a path to a schedule file.
pub fn schedule_choice(spec: &str) -> Result<ScheduleChoice> {
    if let Ok(kind) = spec.parse::<ScheduleKind>() {
        return Ok(ScheduleChoice::Kind(kind));
    }
    let path = PathBuf::from(spec);
    if let (Some((name, _)), false) = (spec.split_once(':'), path.exists()) {
        if name.parse::<ScheduleKind>().is_ok() {
            let (kind, v) = super::schedule_specs(&[spec.to_string()])?[0];
            return Ok(ScheduleChoice::Virtual(kind, v));
        }
    }
    if !path.exists() {
        bail!(
            "unknown schedule {spec:?}: expected gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, zb-auto (NAME:V for V chunks per device), or the path of a schedule file"
        );
    }
    let schedule = Schedule::load(&path)?;
    // A file printed by `brigade schedule` keeps the built-in's name in its header; once its
    // actions are edited it is not that schedule any more, and must not be reported as it.
    if let Ok(kind) = schedule.name().parse::<ScheduleKind>() {
        let builtin = kind.build(schedule.stages(), schedule.microbatches()).ok();
        if builtin.as_ref().map(|b| b.actions()) != Some(schedule.actions()) {
            let name = format!("custom (edited {} from {})", schedule.name(), path.display());
            let edited =
                Schedule::from_actions(name, schedule.stages(), schedule.microbatches(), schedule.actions().to_vec())?;
            return Ok(ScheduleChoice::Custom(edited));
        }
    }
    Ok(ScheduleChoice::Custom(schedule))
}

/// The stage and micro-batch counts: the flags, else a schedule file's own, else the defaults.
/// Flags that disagree with a file are an error naming both.
pub fn layout_counts(
    choice: &ScheduleChoice,
    stages: Option<usize>,
    microbatches: Option<usize>,
    defaults: (usize, usize),
) -> Result<(usize, usize)> {
    let (p, m) = match choice {
        ScheduleChoice::Custom(s) => {
            for (flag, given, own) in
                [("--stages", stages, s.stages()), ("--microbatches", microbatches, s.microbatches())]
            {
                if given.is_some_and(|g| g != own) {
                    bail!(
                        "{flag} {} disagrees with the schedule file, which is for {} and {}; drop the flag or edit the file",
                        given.unwrap_or_default(),
                        plural(s.stages(), "stage", "stages"),
                        plural(s.microbatches(), "micro-batch", "micro-batches")
                    );
                }
            }
            (s.stages(), s.microbatches())
        }
        _ => (stages.unwrap_or(defaults.0), microbatches.unwrap_or(defaults.1)),
    };
    if p == 0 {
        bail!("a pipeline needs at least one stage (--stages 0)");
    }
    // Each stage is a device and a thread: refuse a typo before anything is sized by it.
    if p > MAX_STAGES {
        bail!("--stages {p} is more than brigade runs ({MAX_STAGES})");
    }
    if m == 0 {
        bail!("--microbatches must be at least 1");
    }
    Ok((p, m))
}

/// The most stages a command accepts.
const MAX_STAGES: usize = 1 << 12;

/// The most actions `brigade schedule` draws (and `simulate` times): a grid wider than this is
/// unreadable, and a far larger one (a typo of a few zeros) would exhaust memory instead.
const MAX_DRAWN_ACTIONS: usize = 1_000_000;

/// The schedule a choice means at these counts; a built-in one too large to build (a typo of a
/// few zeros) is refused instead of exhausting memory. `what` names the command, for the message.
pub fn build_schedule(choice: ScheduleChoice, stages: usize, microbatches: usize, what: &str) -> Result<Schedule> {
    let (kind, v) = match choice {
        ScheduleChoice::Custom(s) => return Ok(s),
        ScheduleChoice::Kind(kind) => (kind, kind.default_virtual_stages()),
        ScheduleChoice::Virtual(kind, v) => (kind, v),
    };
    {
        {
            let actions = stages.saturating_mul(microbatches).saturating_mul(2).saturating_mul(v);
            if actions > MAX_DRAWN_ACTIONS {
                bail!(
                    "{stages} stages x {microbatches} micro-batches is {actions} actions, more than the {MAX_DRAWN_ACTIONS} \
                     `{what}` handles; use fewer"
                );
            }
            Ok(kind.build_with(stages, microbatches, v)?)
        }
    }
}

/// The formula behind [`Schedule::theoretical_bubble`] for the schedule's kind, and a note.
fn bubble_formula(name: &str) -> (&'static str, &'static str) {
    match name.parse::<ScheduleKind>() {
        Ok(ScheduleKind::Interleaved) => ("(p-1)/(vm+p-1)", " (Narayanan et al.)"),
        Ok(ScheduleKind::ZbH1) => ("(p-1)(F+I-W) idle per stage", " (Qi et al.)"),
        Ok(ScheduleKind::ZbAuto) => ("as ZB-H1 (v=1) or ZB-V (v=2)", ""),
        Ok(ScheduleKind::ZbH2) | Ok(ScheduleKind::ZbV) => {
            ("(p-1)(F+I-2W)", " (Qi et al.; the paper's zero leaves out the (p-1)F ramp the simulation counts)")
        }
        _ => ("(p-1)/(m+p-1)", ""),
    }
}

pub fn run(args: ScheduleArgs) -> Result<()> {
    let choice = schedule_choice(&args.schedule)?;
    let (stages, microbatches) = layout_counts(&choice, args.stages, args.microbatches, (4, 8))?;
    let schedule = build_schedule(choice, stages, microbatches, "brigade schedule")?;
    let timeline = schedule.timeline(ActionCosts::default());
    match args.format {
        ScheduleFormat::Grid => println!("{}", schedule.grid().trim_end()),
        ScheduleFormat::Text => println!("{}", schedule.to_text().trim_end()),
    }
    // A comment, so the whole output stays a loadable schedule file.
    let chunks = match schedule.virtual_stages() {
        Some(1) => String::new(),
        Some(v) => format!(", {v} chunks per stage"),
        None => format!(", {} chunks", schedule.chunks()),
    };
    let (formula, note) = bubble_formula(schedule.name());
    println!(
        "# stages {}, micro-batches {}{chunks}: theoretical bubble {formula} = {:.1}%{note}, simulated with F=I=W=1 per chunk, B=2: {:.1}%",
        schedule.stages(),
        schedule.microbatches(),
        100.0 * schedule.theoretical_bubble(),
        100.0 * timeline.bubble_fraction()
    );
    Ok(())
}
