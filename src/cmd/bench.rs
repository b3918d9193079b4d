//! `brigade bench`: runs every layout × schedule × micro-batch count, prints the Markdown
//! table, writes the JSON and, per run, a Chrome/Perfetto trace and an SVG timeline.
//!
//! Built to be trusted on a shared machine: the configurations run in rounds, one block of
//! `--steps` steps each per round, alternating (round-robin), so a burst of load from other
//! processes lands on several configurations instead of spoiling one. Each row's step time is
//! the median of its round medians, with their spread; the first configuration runs twice per
//! round (at the start and at the end of the rotation), and how far apart its two copies came
//! out is the bench's own noise, reported next to the simulator's error.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;

use brigade::bench::{
    balanced_time_strategy, chrome_trace, markdown_table, profile_on_data, run as run_one, time_breakdown,
    timeline_svg, BenchRow, RunConfig, Spread,
};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::profile::{median, Profile, ProfileOptions};
use brigade::engine::PipelineModel;
use brigade::train::Dataset;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::model::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub devices: super::model::DeviceArgs,
    /// What the layers compute in: f32, or bf16/f16 mixed precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::ComputeDtype,
    /// Stage layouts: a stage count (cut by --partition) or layer counts joined by `+` (3+1).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub layouts: Vec<String>,
    /// Schedules to run: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, zb-auto (built from
    /// the run's profile within 1F1B's memory); `NAME:V` sets the chunks per device
    /// (interleaved-1f1b:3, zb-auto:2).
    #[arg(long, value_delimiter = ',', default_value = "gpipe,1f1b")]
    pub schedules: Vec<String>,
    /// Micro-batch counts (each must divide the batch size).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub microbatches: Vec<usize>,
    /// How stage counts are cut: uniform, balanced (by parameters) or balanced-time.
    #[arg(long, default_value = "uniform")]
    pub partition: String,
    /// Global batch size.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Measured steps per configuration in each round.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Rounds: every configuration runs once per round, the configurations alternating, so
    /// that a burst of load from other processes does not spoil one configuration's block.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Unmeasured steps before them (in each round).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// CPU threads per stage (default: cores / stages, as `train`).
    #[arg(long)]
    pub threads_per_stage: Option<usize>,
    /// One thread pool per stage (what the simulator models), or one for all stages (idle
    /// stages lend their cores; every action pays a thread hand-over).
    #[arg(long, value_enum, default_value = "per-stage")]
    pub thread_pools: super::ThreadPoolsArg,
    /// Timed runs per profile measurement (for the simulator's prediction).
    #[arg(long, default_value_t = 10)]
    pub profile_repeats: usize,
    /// adamw or sgd.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: super::OptimizerArg,
    /// Directory for bench.json and each run's .trace.json and .svg.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub plain: bool,
    /// Run each configuration in a fresh `brigade` process instead of this one (same results
    /// and, since no thread setting is process-wide, the same timings within noise; what
    /// `brigade train` runs in).
    #[arg(long)]
    pub process_per_run: bool,
    /// Run every configuration in this one process: the default (kept for old command lines).
    #[arg(long, hide = true, conflicts_with = "process_per_run")]
    pub in_process: bool,
    /// Seed of the weights and of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Internal: run only configuration N and report it on stdout (what each child does).
    #[arg(long, hide = true)]
    pub run_index: Option<usize>,
}

/// A layout: how many stages, and how to cut them.
fn layouts(specs: &[String], partition: &str) -> Result<Vec<(usize, PartitionStrategy)>> {
    let strategy: PartitionStrategy = partition.parse()?;
    specs
        .iter()
        .map(|spec| {
            let spec = spec.trim();
            if spec.contains('+') {
                let counts =
                    spec.split('+').map(|c| c.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>().map_err(
                        |_| anyhow::anyhow!("bad layout {spec:?}: expected a stage count or layer counts like 3+1"),
                    )?;
                Ok((counts.len(), PartitionStrategy::Manual(counts)))
            } else {
                let stages = spec.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("bad layout {spec:?}: expected a stage count or layer counts like 3+1")
                })?;
                if stages == 0 {
                    bail!("bad layout {spec:?}: a pipeline needs at least one stage");
                }
                Ok((stages, strategy.clone()))
            }
        })
        .collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    super::output::OutputPath::new(&args.out, "--out").check()?;
    let layouts = layouts(&args.layouts, &args.partition)?;
    let schedules = super::schedule_specs(&args.schedules)?;
    let optimizer = args.optimizer.config(None);
    for &m in &args.microbatches {
        if m == 0 || !args.batch_size.is_multiple_of(m) {
            bail!("batch size {} is not divisible by {m} micro-batches", args.batch_size);
        }
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let (model, data) = args.model.model_and_data(args.seed)?;
    let load_start = load_average();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;

    let mut runs = Vec::new();
    for (stages, partition) in &layouts {
        for &(schedule, virtual_stages) in &schedules {
            for &m in &args.microbatches {
                runs.push(RunConfig {
                    stages: *stages,
                    partition: partition.clone(),
                    schedule,
                    virtual_stages,
                    microbatches: m,
                    batch_size: args.batch_size,
                    warmup: args.warmup,
                    steps: args.steps,
                    threads_per_stage: args.threads_per_stage.unwrap_or_else(|| super::default_threads(*stages)),
                    thread_pools: args.thread_pools.pools(),
                    devices: args.devices.stage_devices(*stages)?,
                    compute_dtype: args.dtype.dtype(),
                    context: args.model.context,
                    seed: args.seed,
                    optimizer,
                });
            }
        }
    }
    if let Some(index) = args.run_index {
        // A child of the bench below: one run, results on stdout, progress on stderr.
        let config = runs.get_mut(index).with_context(|| format!("no bench run {index}"))?;
        let profile = profile_for(&args, model.as_ref(), &data, config)?;
        let row = execute(&args, model, &data, config, &profile, || eprintln!("{STEP_MARK}"))?;
        println!("{ROW_MARK}{}", serde_json::to_string(&row)?);
        println!("{PROFILE_MARK}{}", serde_json::to_string(&profile)?);
        return Ok(());
    }
    // Each round runs every configuration once, then the first one again: the noise twin.
    let total = runs.len();
    let rotation: Vec<usize> = (0..total).chain(std::iter::once(0)).collect();
    let bar = if args.plain {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((args.rounds * rotation.len() * (args.warmup + args.steps)) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps {msg} (ETA {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    // Per slot of the rotation (the twin is the last slot), its rows, one per round.
    let mut measured: Vec<Vec<BenchRow>> = vec![Vec::new(); rotation.len()];
    let mut profiles: Vec<Profile> = Vec::new();
    let mut failed: Vec<Option<(String, String)>> = vec![None; total];
    for round in 0..args.rounds {
        for (slot, &i) in rotation.iter().enumerate() {
            let config = &mut runs[i];
            let label = format!(
                "round {}/{}, run {}/{total}{}: {} stage(s), {}, m={}",
                round + 1,
                args.rounds,
                i + 1,
                if slot == total { " again (noise check)" } else { "" },
                config.stages,
                config.schedule,
                config.microbatches
            );
            if failed[i].is_some() {
                continue;
            }
            bar.set_message(label.clone());
            if args.plain {
                eprintln!("{label}");
            }
            let outcome = if !args.process_per_run {
                cached_profile(&args, model.as_ref(), &data, config, &mut profiles).and_then(|profile| {
                    execute(&args, model.clone(), &data, config, &profile, || bar.inc(1)).map(|row| (row, profile))
                })
            } else {
                run_in_child(i, || bar.inc(1))
            };
            // One configuration that cannot run (BatchNorm on a micro-batch of one, say) is
            // reported, and the others still run.
            match outcome {
                Ok((row, profile)) => {
                    measured[slot].push(row);
                    if !profiles.iter().any(|p| same_profile_key(p, &profile)) {
                        profiles.push(profile);
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    bar.println(format!("{label}: failed: {}", why.lines().next().unwrap_or_default()));
                    bar.inc((config.warmup + config.steps) as u64);
                    failed[i] = Some((label, why));
                }
            }
        }
    }
    bar.finish_and_clear();
    let combined: Vec<Combined> =
        measured[..total].iter().filter(|r| !r.is_empty()).map(|rounds| combine_rounds(rounds)).collect();
    let failed: Vec<(String, String)> = failed.into_iter().flatten().collect();
    if combined.is_empty() {
        let (label, why) = failed.first().context("no bench runs were configured")?;
        bail!("every bench run failed; {label}: {why}");
    }
    let rows: Vec<BenchRow> = combined.iter().map(|c| c.row.clone()).collect();

    print!("{}", markdown_table(&rows));
    for (label, why) in &failed {
        println!("failed: {label}: {}", why.lines().next().unwrap_or_default());
    }
    println!(
        "\n{} round(s) of {} measured step(s) per configuration, configurations alternating; step times above are over all rounds",
        args.rounds, args.steps
    );
    print!("{}", rounds_table(&combined));
    let noise = measured_noise(&measured[0], &measured[total]);
    match &noise {
        Some(n) => println!("\n{}", n.describe()),
        None => println!("\nnoise: not measured (the first configuration did not run twice)"),
    }
    let summary = SimulatorSummary::of(&rows);
    if let Some(s) = &summary {
        println!("{}", s.describe(noise.as_ref()));
    }
    let load_end = load_average();
    println!("load average (1 min) at start {load_start}, at end {load_end}: other processes share these cores");
    profiles.sort_by_key(|p| (p.threads, p.microbatch_size));
    println!("\nwhere the time goes (profile):");
    for p in &profiles {
        println!("- {}", time_breakdown(p));
    }
    let json = serde_json::json!({
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
        "rounds_by_run": combined.iter().map(|c| serde_json::json!({
            "run_name": c.row.run_name,
            "round_medians_s": c.round_medians_s,
            "spread": c.spread(),
        })).collect::<Vec<_>>(),
        "noise": noise,
        "simulator": summary,
        "profiles": profiles,
    });
    let path = args.out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {} and a .trace.json + .svg per run (its last round) in {}", path.display(), args.out.display());
    Ok(())
}

const STEP_MARK: &str = "BRIGADE-BENCH-STEP";
const ROW_MARK: &str = "BRIGADE-BENCH-ROW ";
const PROFILE_MARK: &str = "BRIGADE-BENCH-PROFILE ";

/// Whether two profiles are of the same thread budget, micro-batch size and device.
fn same_profile_key(a: &Profile, b: &Profile) -> bool {
    (a.threads, a.microbatch_size, &a.device) == (b.threads, b.microbatch_size, &b.device)
}

/// The profile `config` is simulated from, measured once per thread budget, micro-batch size
/// and device and reused by every round (one fixed prediction per configuration, and the
/// profiling is not repeated round after round).
fn cached_profile(
    args: &BenchArgs,
    model: &dyn PipelineModel,
    data: &Dataset,
    config: &mut RunConfig,
    profiles: &mut Vec<Profile>,
) -> Result<Profile> {
    let device = config.devices.first().copied().unwrap_or_default().to_string();
    let microbatch_size = args.batch_size / config.microbatches;
    let found = profiles
        .iter()
        .find(|p| (p.threads, p.microbatch_size, &p.device) == (config.threads_per_stage, microbatch_size, &device));
    let profile = match found {
        Some(p) => p.clone(),
        None => {
            let p = profile_for(args, model, data, config)?;
            profiles.push(p.clone());
            p
        }
    };
    if config.partition == PartitionStrategy::BalancedTime(Vec::new()) {
        config.partition = balanced_time_strategy(&profile);
    }
    Ok(profile)
}

/// Profiles the model at `config`'s micro-batch size, thread budget and device (and fills a
/// balanced-time partition from it).
fn profile_for(args: &BenchArgs, model: &dyn PipelineModel, data: &Dataset, config: &mut RunConfig) -> Result<Profile> {
    let options = ProfileOptions {
        repeats: args.profile_repeats,
        rounds: 3,
        warmup: 2,
        threads: config.threads_per_stage,
        optimizer: config.optimizer,
        seed: args.seed,
        device: config.devices.first().copied().unwrap_or_default(),
    };
    let profile = profile_on_data(model, data, args.batch_size / config.microbatches, args.model.context, &options)?;
    if config.partition == PartitionStrategy::BalancedTime(Vec::new()) {
        config.partition = balanced_time_strategy(&profile);
    }
    Ok(profile)
}

/// Runs one configuration (one round of it) against `profile`, and writes its trace and SVG.
fn execute(
    args: &BenchArgs,
    model: Arc<dyn PipelineModel>,
    data: &Dataset,
    config: &RunConfig,
    profile: &Profile,
    on_step: impl FnMut(),
) -> Result<BenchRow> {
    let result = run_one(model, data, config, profile, on_step)?;
    let name = &result.row.run_name;
    let trace = chrome_trace(&result.median_step, Some(&result.prediction.timeline));
    let trace_path = args.out.join(format!("{name}.trace.json"));
    std::fs::write(&trace_path, serde_json::to_string(&trace)?)
        .with_context(|| format!("cannot write {}", trace_path.display()))?;
    let title = format!(
        "{}: {} stage(s) [{}], {} (v={}), m={}, batch {} — median step",
        result.row.model,
        config.stages,
        result.row.partition,
        config.schedule,
        config.virtual_stages,
        config.microbatches,
        config.batch_size
    );
    let svg_path = args.out.join(format!("{name}.svg"));
    std::fs::write(&svg_path, timeline_svg(&title, &result.median_step, Some(&result.prediction)))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    Ok(result.row)
}

/// One configuration over all its rounds: the combined row and each round's median.
#[derive(Debug, Clone)]
struct Combined {
    row: BenchRow,
    round_medians_s: Vec<f64>,
}

impl Combined {
    /// How far the round medians spread: `(max − min) / median`.
    fn spread(&self) -> f64 {
        let lowest = self.round_medians_s.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = self.round_medians_s.iter().copied().fold(0.0, f64::max);
        (highest - lowest) / self.row.step_s.median.max(1e-12)
    }
}

/// One configuration's rounds as one row: the step time's median is the median of the round
/// medians (a round spoiled by load moves it less than it moves a mean), its min and max over
/// every step; bubble and busy times are averaged over rounds, memory high-water marks are the
/// highest; the simulator's error is against the combined median. `rounds` must not be empty.
fn combine_rounds(rounds: &[BenchRow]) -> Combined {
    let mut row = rounds[rounds.len() - 1].clone();
    let round_medians_s: Vec<f64> = rounds.iter().map(|r| r.step_s.median).collect();
    let n = rounds.len() as f64;
    row.step_s = Spread {
        median: median(&mut round_medians_s.clone()),
        min: rounds.iter().map(|r| r.step_s.min).fold(f64::INFINITY, f64::min),
        max: rounds.iter().map(|r| r.step_s.max).fold(0.0, f64::max),
    };
    row.steps = rounds.iter().map(|r| r.steps).sum();
    // Throughput is items per median step: rescale the last round's to the combined median.
    let last = &rounds[rounds.len() - 1];
    row.throughput = last.throughput * last.step_s.median / row.step_s.median.max(1e-12);
    row.simulation_error = (row.simulated_step_s - row.step_s.median) / row.step_s.median.max(1e-12);
    row.simulation_error_vs_min = (row.simulated_step_s - row.step_s.min) / row.step_s.min.max(1e-12);
    row.simulation_error_uncontended =
        (row.simulated_step_s_uncontended - row.step_s.median) / row.step_s.median.max(1e-12);
    row.measured_bubble = rounds.iter().map(|r| r.measured_bubble).sum::<f64>() / n;
    row.voluntary_switches_per_step = rounds.iter().map(|r| r.voluntary_switches_per_step).sum::<f64>() / n;
    row.involuntary_switches_per_step = rounds.iter().map(|r| r.involuntary_switches_per_step).sum::<f64>() / n;
    for (s, busy) in row.stage_busy_s.iter_mut().enumerate() {
        *busy = rounds.iter().map(|r| r.stage_busy_s.get(s).copied().unwrap_or(0.0)).sum::<f64>() / n;
    }
    let highest = |field: fn(&BenchRow) -> &Vec<u64>, s: usize| {
        rounds.iter().filter_map(|r| field(r).get(s).copied()).max().unwrap_or(0)
    };
    for s in 0..row.peak_stash_bytes.len() {
        row.peak_stash_bytes[s] = highest(|r| &r.peak_stash_bytes, s);
    }
    for s in 0..row.peak_memory_bytes.len() {
        row.peak_memory_bytes[s] = highest(|r| &r.peak_memory_bytes, s);
    }
    Combined { row, round_medians_s }
}

/// Per configuration: each round's median, their spread, and the simulator's error against
/// the combined median.
fn rounds_table(combined: &[Combined]) -> String {
    let mut t = String::new();
    t.push_str(
        "| stages | schedule | v | m | round medians ms | spread (max−min)/median | simulated ms | sim error | context switches per step (voluntary / involuntary) |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for c in combined {
        let r = &c.row;
        let medians: Vec<String> = c.round_medians_s.iter().map(|m| format!("{:.1}", 1e3 * m)).collect();
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1}% | {:.1} | {:+.1}% | {:.0} / {:.0} |\n",
            r.stages,
            r.schedule,
            r.virtual_stages,
            r.microbatches,
            medians.join(", "),
            100.0 * c.spread(),
            1e3 * r.simulated_step_s,
            100.0 * r.simulation_error,
            r.voluntary_switches_per_step,
            r.involuntary_switches_per_step
        ));
    }
    t
}

/// The bench's own noise: one configuration run twice per round, and how far apart the two
/// copies' medians came out.
#[derive(Debug, Clone, serde::Serialize)]
struct Noise {
    /// The configuration, as `N stage(s), schedule, m=M`.
    configuration: String,
    /// Median step of each copy (the median of its round medians), seconds.
    first_s: f64,
    second_s: f64,
    /// `|first − second| / mean of the two`.
    apart: f64,
    /// The same within each round, the largest.
    worst_round_apart: f64,
}

impl Noise {
    fn describe(&self) -> String {
        format!(
            "noise: {} ran twice per round (first and last in the rotation): medians {:.1} and {:.1} ms, {:.1}% apart (worst single round {:.1}%)",
            self.configuration,
            1e3 * self.first_s,
            1e3 * self.second_s,
            100.0 * self.apart,
            100.0 * self.worst_round_apart
        )
    }
}

/// `|a − b|` relative to their mean.
fn relative_gap(a: f64, b: f64) -> f64 {
    (a - b).abs() / ((a + b) / 2.0).max(1e-12)
}

/// The noise from the two copies' rows (one per round each); `None` unless both ran.
fn measured_noise(first: &[BenchRow], second: &[BenchRow]) -> Option<Noise> {
    let (a, _) = (first.first()?, second.first()?);
    let (first_c, second_c) = (combine_rounds(first), combine_rounds(second));
    let worst_round_apart =
        first.iter().zip(second).map(|(x, y)| relative_gap(x.step_s.median, y.step_s.median)).fold(0.0, f64::max);
    Some(Noise {
        configuration: format!("{} stage(s), {}, m={}", a.stages, a.schedule, a.microbatches),
        first_s: first_c.row.step_s.median,
        second_s: second_c.row.step_s.median,
        apart: relative_gap(first_c.row.step_s.median, second_c.row.step_s.median),
        worst_round_apart,
    })
}

/// The simulator's error over all rows, against each row's combined median (and min).
#[derive(Debug, Clone, serde::Serialize)]
struct SimulatorSummary {
    mean_abs_error: f64,
    /// The signed error of the row furthest off, and that row.
    worst_error: f64,
    worst_row: String,
    mean_abs_error_vs_min: f64,
    worst_error_vs_min: f64,
    /// The same two without the contention term (stages that never slow each other).
    mean_abs_error_uncontended: f64,
    worst_error_uncontended: f64,
}

impl SimulatorSummary {
    fn of(rows: &[BenchRow]) -> Option<SimulatorSummary> {
        let worst = rows.iter().max_by(|a, b| a.simulation_error.abs().total_cmp(&b.simulation_error.abs()))?;
        let n = rows.len() as f64;
        Some(SimulatorSummary {
            mean_abs_error: rows.iter().map(|r| r.simulation_error.abs()).sum::<f64>() / n,
            worst_error: worst.simulation_error,
            worst_row: format!("{} stage(s), {}, m={}", worst.stages, worst.schedule, worst.microbatches),
            mean_abs_error_vs_min: rows.iter().map(|r| r.simulation_error_vs_min.abs()).sum::<f64>() / n,
            worst_error_vs_min: rows
                .iter()
                .map(|r| r.simulation_error_vs_min)
                .max_by(|a, b| a.abs().total_cmp(&b.abs()))
                .unwrap_or(0.0),
            mean_abs_error_uncontended: rows.iter().map(|r| r.simulation_error_uncontended.abs()).sum::<f64>() / n,
            worst_error_uncontended: rows
                .iter()
                .map(|r| r.simulation_error_uncontended)
                .max_by(|a, b| a.abs().total_cmp(&b.abs()))
                .unwrap_or(0.0),
        })
    }

    /// The summary line, set against the noise: the target is a mean within 10% and no row
    /// further off than the noise plus 10%.
    fn describe(&self, noise: Option<&Noise>) -> String {
        let mut line = format!(
            "simulator's worst error vs the median step: {:+.1}% ({}); mean |error| {:.1}% vs median, {:.1}% vs min (worst {:+.1}%)",
            100.0 * self.worst_error,
            self.worst_row,
            100.0 * self.mean_abs_error,
            100.0 * self.mean_abs_error_vs_min,
            100.0 * self.worst_error_vs_min
        );
        line.push_str(&format!(
            "\nwithout the contention term (stages never slowing each other): mean |error| {:.1}% vs median, worst {:+.1}%",
            100.0 * self.mean_abs_error_uncontended,
            100.0 * self.worst_error_uncontended
        ));
        if let Some(n) = noise {
            let allowed = n.apart + 0.10;
            let met = self.mean_abs_error <= 0.10 && self.worst_error.abs() <= allowed;
            line.push_str(&format!(
                "\nsimulator against the noise: mean |error| {:.1}% (target ≤ 10%), worst {:.1}% (target ≤ noise {:.1}% + 10% = {:.1}%): {}",
                100.0 * self.mean_abs_error,
                100.0 * self.worst_error.abs(),
                100.0 * n.apart,
                100.0 * allowed,
                if met { "within target" } else { "off target" }
            ));
        }
        line
    }
}

/// Runs configuration `index` in a fresh `brigade` process with this process's arguments
/// (`--process-per-run`). Not needed for faithful timings any more: no thread setting is
/// process-wide (see `brigade_engine::pipeline`'s `threads` module), so a run times the same
/// in one process as in a fresh one; kept to check that, and for a run that must start clean
/// (a fresh allocator, what `brigade train` runs in).
fn run_in_child(index: usize, mut on_step: impl FnMut()) -> Result<(BenchRow, Profile)> {
    let exe = std::env::current_exe().context("cannot find the brigade executable")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .args(["--run-index", &index.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a bench run")?;
    let mut errors = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line == STEP_MARK {
                on_step();
            } else if !line.trim().is_empty() {
                errors.push(line);
            }
        }
    }
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).context("reading a bench run's results")?;
    }
    let status = child.wait().context("waiting for a bench run")?;
    if !status.success() {
        let why = errors.iter().rev().find(|l| l.starts_with("error: ")).cloned().unwrap_or_else(|| errors.join("; "));
        bail!("{}", why.trim_start_matches("error: "));
    }
    let field = |mark: &str| stdout.lines().find_map(|l| l.strip_prefix(mark)).map(str::to_string);
    let row = field(ROW_MARK).context("a bench run reported no results")?;
    let profile = field(PROFILE_MARK).context("a bench run reported no profile")?;
    Ok((serde_json::from_str(&row)?, serde_json::from_str(&profile)?))
}

/// The 1-minute load average (Linux), to record how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of one round whose steps took `step_ms` (median, min, max), simulated at `sim_ms`.
    fn row(step_ms: (f64, f64, f64), sim_ms: f64, bubble: f64, stash: u64) -> BenchRow {
        let step_s = Spread { median: step_ms.0 / 1e3, min: step_ms.1 / 1e3, max: step_ms.2 / 1e3 };
        BenchRow {
            model: "m".into(),
            stages: 2,
            partition: "2,2 (uniform)".into(),
            schedule: "1f1b".into(),
            virtual_stages: 1,
            microbatches: 4,
            batch_size: 8,
            threads_per_stage: 1,
            steps: 10,
            step_s,
            throughput: 1000.0 / step_s.median,
            throughput_unit: "tok/s".into(),
            measured_bubble: bubble,
            theoretical_bubble: 0.2,
            simulated_step_s: sim_ms / 1e3,
            simulation_error: (sim_ms / 1e3 - step_s.median) / step_s.median,
            simulation_error_vs_min: (sim_ms / 1e3 - step_s.min) / step_s.min,
            voluntary_switches_per_step: 64.0 * bubble,
            involuntary_switches_per_step: 2.0,
            simulated_step_s_uncontended: 0.8 * sim_ms / 1e3,
            simulation_error_uncontended: (0.8 * sim_ms / 1e3 - step_s.median) / step_s.median,
            simulated_bubble: 0.2,
            stage_busy_s: vec![bubble, 2.0 * bubble],
            simulated_stage_busy_s: vec![0.0, 0.0],
            peak_stash_bytes: vec![stash, 1],
            simulated_peak_stash_bytes: vec![0, 0],
            peak_memory_bytes: vec![stash + 10, 11],
            simulated_peak_memory_bytes: vec![0, 0],
            run_name: "m-p2-1f1b-m4".into(),
        }
    }

    #[test]
    fn rounds_combine_to_the_median_of_round_medians_and_the_extremes_of_all_steps() {
        // A middle round spoiled by load: the median of round medians ignores it.
        let rounds = [
            row((10.0, 9.0, 12.0), 11.0, 0.1, 5),
            row((30.0, 25.0, 40.0), 11.0, 0.3, 7),
            row((12.0, 8.0, 13.0), 11.0, 0.2, 6),
        ];
        let c = combine_rounds(&rounds);
        assert_eq!(c.round_medians_s, vec![0.010, 0.030, 0.012]);
        assert!((c.row.step_s.median - 0.012).abs() < 1e-15, "{:?}", c.row.step_s);
        assert_eq!((c.row.step_s.min, c.row.step_s.max), (0.008, 0.040));
        assert_eq!(c.row.steps, 30);
        assert!((c.row.throughput - 1000.0 / 0.012).abs() < 1e-6, "{}", c.row.throughput);
        assert!((c.row.simulation_error - (0.011 / 0.012 - 1.0)).abs() < 1e-12);
        assert!((c.row.simulation_error_vs_min - (0.011 / 0.008 - 1.0)).abs() < 1e-12);
        assert!((c.row.measured_bubble - 0.2).abs() < 1e-12);
        assert!((c.row.stage_busy_s[1] - 0.4).abs() < 1e-12);
        assert_eq!(c.row.peak_stash_bytes, vec![7, 1]);
        assert_eq!(c.row.peak_memory_bytes, vec![17, 11]);
        assert!((c.spread() - (0.030 - 0.010) / 0.012).abs() < 1e-12);
        // Switches per step averaged over rounds: 64 x (0.1, 0.3, 0.2) voluntary.
        assert!((c.row.voluntary_switches_per_step - 12.8).abs() < 1e-9);
        let table = rounds_table(&[c]);
        assert!(table.contains("| 2 | 1f1b | 1 | 4 | 10.0, 30.0, 12.0 | 166.7% | 11.0 | -8.3% | 13 / 2 |"), "{table}");
    }

    #[test]
    fn noise_is_how_far_apart_the_twins_came_out() {
        let first = [row((10.0, 9.0, 11.0), 10.0, 0.1, 1), row((11.0, 9.0, 11.0), 10.0, 0.1, 1)];
        let second = [row((10.0, 9.0, 11.0), 10.0, 0.1, 1), row((13.0, 9.0, 14.0), 10.0, 0.1, 1)];
        let noise = measured_noise(&first, &second).unwrap();
        // Medians of round medians: 10.5 and 11.5 ms, 1 ms apart around 11 ms.
        assert!((noise.apart - 1.0 / 11.0).abs() < 1e-12, "{noise:?}");
        assert!((noise.worst_round_apart - 2.0 / 12.0).abs() < 1e-12, "{noise:?}");
        assert_eq!(noise.configuration, "2 stage(s), 1f1b, m=4");
        assert!(noise.describe().contains("10.5 and 11.5 ms, 9.1% apart (worst single round 16.7%)"));
        assert!(measured_noise(&first, &[]).is_none());
    }

    #[test]
    fn the_simulator_summary_sets_its_error_against_the_noise() {
        let rows = [row((10.0, 9.0, 11.0), 9.0, 0.1, 1), row((10.0, 9.0, 11.0), 11.5, 0.1, 1)];
        let s = SimulatorSummary::of(&rows).unwrap();
        assert!((s.mean_abs_error - 0.125).abs() < 1e-12 && (s.worst_error - 0.15).abs() < 1e-12, "{s:?}");
        let quiet =
            Noise { configuration: "c".into(), first_s: 0.01, second_s: 0.01, apart: 0.0, worst_round_apart: 0.0 };
        let line = s.describe(Some(&quiet));
        assert!(line.contains("simulator's worst error vs the median step: +15.0%"), "{line}");
        assert!(line.contains("mean |error| 12.5% (target ≤ 10%)") && line.ends_with("off target"), "{line}");
        // Without the contention term the rows simulated 0.8x as long: 7.2 and 9.2 ms.
        assert!((s.mean_abs_error_uncontended - 0.18).abs() < 1e-12, "{s:?}");
        assert!((s.worst_error_uncontended + 0.28).abs() < 1e-12, "{s:?}");
        assert!(line.contains("without the contention term (stages never slowing each other): mean |error| 18.0% vs median, worst -28.0%"), "{line}");
        let good = [row((10.0, 9.0, 11.0), 9.5, 0.1, 1), row((10.0, 9.0, 11.0), 11.0, 0.1, 1)];
        let noisy = Noise { apart: 0.05, ..quiet };
        let line = SimulatorSummary::of(&good).unwrap().describe(Some(&noisy));
        assert!(line.contains("worst 10.0% (target ≤ noise 5.0% + 10% = 15.0%): within target"), "{line}");
        assert!(SimulatorSummary::of(&[]).is_none());
    }
}
