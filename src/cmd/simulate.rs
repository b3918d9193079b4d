//! `brigade simulate`: predicts one training step of any schedule (built-in or a schedule
//! file, the executor's own IR) from a saved profile, before anything runs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::bench::balanced_time_strategy;
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::ScheduleChoice;
use brigade::engine::plan::human_bytes;
use brigade::engine::profile::Profile;
use brigade::engine::schedule::ScheduleKind;
use brigade::engine::simulate::{predict, schedule_from_costs, StageCosts};
use clap::Args;

#[derive(Args)]
pub struct SimulateArgs {
    /// A profile written by `brigade profile --out FILE`.
    #[arg(long)]
    pub profile: PathBuf,
    /// A built-in schedule (`NAME` or `NAME:V`, as `brigade schedule`; zb-auto is generated
    /// from this profile) or a schedule file in the format `brigade schedule` prints.
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Stages (default: 2, or the schedule file's).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Micro-batches per step, each of the profile's micro-batch size (default: 4, or the
    /// schedule file's).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Layers per stage, e.g. 3,1 (overrides --partition).
    #[arg(long)]
    pub split: Option<String>,
    /// uniform, balanced (by parameters) or balanced-time (by the profile's times).
    #[arg(long, default_value = "uniform")]
    pub partition: String,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.profile)
        .with_context(|| format!("cannot read profile {}", args.profile.display()))?;
    let profile: Profile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a profile written by `brigade profile`", args.profile.display()))?;
    let choice = super::schedule::schedule_choice(&args.schedule)?;
    let (stages, microbatches) = super::schedule::layout_counts(&choice, args.stages, args.microbatches, (2, 4))?;
    let auto = match &choice {
        ScheduleChoice::Kind(ScheduleKind::ZbAuto) => Some(1),
        ScheduleChoice::Virtual(ScheduleKind::ZbAuto, v) => Some(*v),
        _ => None,
    };
    // Before building: a schedule for absurd stage counts would take long to validate.
    if stages > profile.layers.len() {
        bail!(
            "--stages {stages}: the profile has {} layers, so at most {} stages",
            profile.layers.len(),
            profile.layers.len()
        );
    }
    let schedule = super::schedule::build_schedule(choice, stages, microbatches, "brigade simulate")?;
    let chunks = schedule.chunks();
    if chunks > profile.layers.len() {
        bail!(
            "{stages} stages x {} chunks each: the profile has {} layers, so at most {} chunks",
            chunks / stages.max(1),
            profile.layers.len(),
            profile.layers.len()
        );
    }
    let strategy = match &args.split {
        Some(split) => split.parse::<PartitionStrategy>()?,
        None => match args.partition.parse::<PartitionStrategy>()? {
            PartitionStrategy::BalancedTime(_) => balanced_time_strategy(&profile),
            other => other,
        },
    };
    let layer_params: Vec<usize> = profile.layers.iter().map(|l| l.param_bytes() as usize).collect();
    let partition = strategy.resolve(&layer_params, chunks)?;
    let costs = StageCosts::from_profile(&profile, &partition)?;
    let schedule = match auto {
        Some(v) => schedule_from_costs(ScheduleKind::ZbAuto, stages, microbatches, v, &costs, None)?,
        None => schedule,
    };
    let p = predict(&schedule, &costs)?;

    println!(
        "{}: schedule {}, {} stages (layers {partition}), {} micro-batches of {}, profiled on {} thread(s)",
        profile.model,
        schedule.name(),
        stages,
        microbatches,
        profile.microbatch_size,
        profile.threads
    );
    println!(
        "predicted step {:.2} ms (actions {:.2} ms + optimizer {:.2} ms), bubble {:.1}% (theory {:.1}%)",
        1e3 * p.step_time,
        1e3 * p.makespan,
        1e3 * (p.step_time - p.makespan),
        100.0 * p.bubble_fraction,
        100.0 * schedule.theoretical_bubble()
    );
    println!("| stage | chunks: layers | busy ms | idle ms | stashed chunk micro-batches | peak stash | peak memory |");
    println!("|---|---|---|---|---|---|---|");
    let ranges = partition.ranges();
    for s in 0..stages {
        let held: Vec<String> =
            schedule.chunks_on(s).into_iter().map(|c| format!("{c}: {}..{}", ranges[c].start, ranges[c].end)).collect();
        println!(
            "| {s} | {} | {:.2} | {:.2} | {} | {} | {} |",
            held.join(", "),
            1e3 * p.busy[s],
            1e3 * p.idle[s],
            p.peak_in_flight[s],
            human_bytes(p.peak_stash_bytes[s]),
            human_bytes(p.peak_memory[s])
        );
    }
    Ok(())
}
