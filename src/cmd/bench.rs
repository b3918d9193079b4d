//! `brigade bench`: runs every layout × schedule × micro-batch count, prints the Markdown
//! table, writes the JSON and, per run, a Chrome/Perfetto trace and an SVG timeline.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;

use brigade::bench::{
    balanced_time_strategy, chrome_trace, markdown_table, profile_on_data, run as run_one, time_breakdown,
    timeline_svg, BenchRow, RunConfig,
};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::profile::{Profile, ProfileOptions};
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
    /// Measured steps per run.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Unmeasured steps before them.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// CPU threads per stage (default: cores / stages, as `train`).
    #[arg(long)]
    pub threads_per_stage: Option<usize>,
    /// One thread pool for all stages (idle stages lend their cores), or one per stage (what
    /// the simulator models).
    #[arg(long, value_enum, default_value = "shared")]
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
    let bar = if args.plain || args.run_index.is_some() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((runs.len() * (args.warmup + args.steps)) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps {msg} (ETA {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    if let Some(index) = args.run_index {
        // A child of the bench below: one run, results on stdout, progress on stderr.
        let config = runs.get_mut(index).with_context(|| format!("no bench run {index}"))?;
        let (row, profile) = execute(&args, model, &data, config, || eprintln!("{STEP_MARK}"))?;
        println!("{ROW_MARK}{}", serde_json::to_string(&row)?);
        println!("{PROFILE_MARK}{}", serde_json::to_string(&profile)?);
        return Ok(());
    }
    let total = runs.len();
    let mut rows = Vec::new();
    let mut profiles: Vec<Profile> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for (i, config) in runs.iter_mut().enumerate() {
        let label = format!(
            "run {}/{total}: {} stage(s), {}, m={}",
            i + 1,
            config.stages,
            config.schedule,
            config.microbatches
        );
        bar.set_message(label.clone());
        if args.plain {
            eprintln!("{label}");
        }
        let outcome = if !args.process_per_run {
            execute(&args, model.clone(), &data, config, || bar.inc(1))
        } else {
            run_in_child(i, || bar.inc(1))
        };
        // One configuration that cannot run (BatchNorm on a micro-batch of one, say) is
        // reported, and the others still run.
        let (row, profile) = match outcome {
            Ok(done) => done,
            Err(e) => {
                let why = format!("{e:#}");
                bar.println(format!("{label}: failed: {}", why.lines().next().unwrap_or_default()));
                failed.push((label, why));
                bar.inc((config.warmup + config.steps) as u64);
                continue;
            }
        };
        rows.push(row);
        if !profiles.iter().any(|p| (p.threads, p.microbatch_size) == (profile.threads, profile.microbatch_size)) {
            profiles.push(profile);
        }
    }
    bar.finish_and_clear();
    if rows.is_empty() {
        let (label, why) = failed.first().context("no bench runs were configured")?;
        bail!("every bench run failed; {label}: {why}");
    }

    print!("{}", markdown_table(&rows));
    for (label, why) in &failed {
        println!("failed: {label}: {}", why.lines().next().unwrap_or_default());
    }
    let worst = rows.iter().max_by(|a, b| a.simulation_error.abs().total_cmp(&b.simulation_error.abs()));
    if let Some(w) = worst {
        println!(
            "\nsimulator's worst error vs the median step: {:+.1}% ({} stage(s), {}, m={}); mean |error| {:.1}% vs median, {:.1}% vs min (worst {:+.1}%)",
            100.0 * w.simulation_error,
            w.stages,
            w.schedule,
            w.microbatches,
            100.0 * rows.iter().map(|r| r.simulation_error.abs()).sum::<f64>() / rows.len() as f64,
            100.0 * rows.iter().map(|r| r.simulation_error_vs_min.abs()).sum::<f64>() / rows.len() as f64,
            100.0 * rows.iter().map(|r| r.simulation_error_vs_min).max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap_or(0.0)
        );
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
        "rows": rows,
        "profiles": profiles,
    });
    let path = args.out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {} and a .trace.json + .svg per run in {}", path.display(), args.out.display());
    Ok(())
}

const STEP_MARK: &str = "BRIGADE-BENCH-STEP";
const ROW_MARK: &str = "BRIGADE-BENCH-ROW ";
const PROFILE_MARK: &str = "BRIGADE-BENCH-PROFILE ";

/// Profiles, runs one configuration, and writes its trace and SVG.
fn execute(
    args: &BenchArgs,
    model: Arc<dyn PipelineModel>,
    data: &Dataset,
    config: &mut RunConfig,
    on_step: impl FnMut(),
) -> Result<(BenchRow, Profile)> {
    let options = ProfileOptions {
        repeats: args.profile_repeats,
        rounds: 3,
        warmup: 2,
        threads: config.threads_per_stage,
        optimizer: config.optimizer,
        seed: args.seed,
        device: config.devices.first().copied().unwrap_or_default(),
    };
    let profile =
        profile_on_data(model.as_ref(), data, args.batch_size / config.microbatches, args.model.context, &options)?;
    if config.partition == PartitionStrategy::BalancedTime(Vec::new()) {
        config.partition = balanced_time_strategy(&profile);
    }
    let result = run_one(model, data, config, &profile, on_step)?;
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
    Ok((result.row, profile))
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
