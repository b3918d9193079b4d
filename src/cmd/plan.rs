//! `brigade plan`: ranks layouts, schedules and micro-batch counts by simulated step time
//! within a memory limit, from profiles measured on this machine.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::bench::profile_on_data;
use brigade::engine::compute::Recompute;
use brigade::engine::plan::{explain, human_bytes, plan, PlanRequest};
use brigade::engine::profile::ProfileOptions;
use clap::Args;
use indicatif::ProgressBar;

use super::model::ModelArgs;

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Devices available: the planner tries 1 to N stages, one device each (in this CPU build
    /// a device is --threads-per-stage threads, default cores / devices).
    #[arg(long, default_value_t = 2)]
    pub devices: usize,
    /// The kind of device to profile on: cpu, or cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Memory per device in GB (decimal); configurations that need more are ranked last.
    #[arg(long)]
    pub memory_limit: Option<f64>,
    /// Global batch size.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batch counts to try (those dividing the batch size).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub microbatches: Vec<usize>,
    /// Schedules to consider, `NAME` or `NAME:V` (V chunks per device): gpipe, 1f1b,
    /// interleaved-1f1b (v >= 2), zb-h1, zb-h2, zb-v, zb-auto (generated from the profile
    /// within --memory-limit, or 1F1B's memory without one; v 1 or 2).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gpipe,1f1b,interleaved-1f1b,zb-h1,zb-h2,zb-v,zb-auto,zb-auto:2"
    )]
    pub schedules: Vec<String>,
    /// Activation recomputation settings to consider: off, full (full stashes only each
    /// stage's input and reruns its forward before the backward: less memory, more time).
    #[arg(long, value_delimiter = ',', default_value = "off,full")]
    pub recompute: Vec<Recompute>,
    /// CPU threads per device (default: cores / devices).
    #[arg(long)]
    pub threads_per_stage: Option<usize>,
    /// Timed runs per profile measurement.
    #[arg(long, default_value_t = 5)]
    pub profile_repeats: usize,
    /// adamw or sgd (sizes the optimizer state).
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: super::OptimizerArg,
    /// Rows to print.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Also write every ranked configuration as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the weights and of the profiled batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data-parallel replicas, nodes and links; --devices counts the stages of one replica.
    #[command(flatten)]
    pub cluster: super::simulate::ClusterArgs,
}

pub fn run(args: PlanArgs) -> Result<()> {
    if let Some(path) = &args.json {
        super::output::OutputPath::new(path, "--json")
            .inputs(args.model.data.iter().chain(&args.model.tokenizer))
            .check()?;
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let memory_limit = match args.memory_limit {
        Some(gb) if !(gb > 0.0 && gb.is_finite()) => {
            bail!("--memory-limit must be a positive number of GB, got {gb}")
        }
        Some(gb) => Some((gb * 1e9) as u64),
        None => None,
    };
    let (model, data) = args.model.model_and_data(args.seed)?;
    let threads = args.threads_per_stage.unwrap_or_else(|| super::default_threads(args.devices));
    let request = PlanRequest {
        devices: args.devices,
        batch_size: args.batch_size,
        microbatches: args.microbatches.clone(),
        schedules: super::schedule_specs(&args.schedules)?,
        memory_limit,
        recompute: args.recompute.clone(),
        cluster: args.cluster.cluster(),
    };
    let options = ProfileOptions {
        repeats: args.profile_repeats,
        rounds: 3,
        warmup: 1,
        threads,
        optimizer: args.optimizer.config(None),
        seed: args.seed,
        device: super::model::check_device(&args.device)?,
    };
    let spinner = ProgressBar::new_spinner();
    let mut profiled = HashMap::new();
    let mut unusable = Vec::new();
    let ranked = plan(&request, |b| {
        spinner.set_message(format!("profiling {} at micro-batch size {b} on {threads} thread(s)", model.name()));
        spinner.tick();
        let p = profile_on_data(model.as_ref(), &data, b, args.model.context, &options).map_err(|e| {
            unusable.push((b, e.to_string()));
            brigade::engine::EngineError::Config(e.to_string())
        })?;
        profiled.insert(b, p.clone());
        Ok(p)
    })?;
    spinner.finish_and_clear();
    for (b, why) in &unusable {
        let why = why.lines().next().unwrap_or_default();
        println!("skipped micro-batch size {b} (m = {}): {why}", args.batch_size / b);
    }

    println!(
        "{}: {} layers, batch {}, {} device(s) x {} thread(s){}",
        model.name(),
        model.layers().len(),
        args.batch_size,
        args.devices,
        threads,
        memory_limit.map(|l| format!(", memory limit {} per device", human_bytes(l))).unwrap_or_default()
    );
    if request.cluster != brigade::engine::simulate::Cluster::default() {
        println!("{} (with the most stages)", args.cluster.describe(args.devices));
    }
    println!();
    println!("| rank | stages | layers (partition) | schedule | m | simulated ms/step | examples/s | bubble | peak memory per stage | fits | communication ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, c) in ranked.iter().take(args.top).enumerate() {
        let memory: Vec<String> = c.prediction.peak_memory.iter().map(|b| human_bytes(*b)).collect();
        println!(
            "| {} | {} | {} ({}) | {} | {} | {:.2} | {:.0} | {:.1}% | {} | {} | {:.2} |",
            i + 1,
            c.stages,
            c.partition,
            c.partition_name,
            {
                let name = if c.virtual_stages > 1 {
                    format!("{} v={}", c.schedule, c.virtual_stages)
                } else {
                    c.schedule.to_string()
                };
                if c.recompute == Recompute::Full {
                    format!("{name} + recompute")
                } else {
                    name
                }
            },
            c.microbatches,
            1e3 * c.prediction.step_time,
            c.throughput(args.batch_size),
            100.0 * c.prediction.bubble_fraction,
            memory.join(", "),
            if c.fits { "yes" } else { "no" },
            1e3 * c.prediction.exposed_communication
        );
    }
    if ranked.len() > args.top {
        println!("({} more; --top N shows them)", ranked.len() - args.top);
    }
    println!();
    println!("{}", explain(&ranked, &request));
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = ranked
            .iter()
            .map(|c| {
                serde_json::json!({
                    "stages": c.stages, "partition": c.partition.counts(), "partition_strategy": c.partition_name,
                    "schedule": c.schedule.to_string(), "virtual_stages": c.virtual_stages, "microbatches": c.microbatches, "recompute": c.recompute.to_string(),
                    "simulated_step_s": c.prediction.step_time, "bubble": c.prediction.bubble_fraction,
                    "busy_s": c.prediction.busy, "idle_s": c.prediction.idle, "all_reduce_s": c.prediction.all_reduce,
                    "exposed_communication_s": c.prediction.exposed_communication,
                    "link_bytes": c.prediction.link_bytes.iter().map(|(k, b)| (k.to_string(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
                    "peak_memory_bytes": c.prediction.peak_memory, "fits": c.fits,
                })
            })
            .collect();
        let json = serde_json::json!({ "model": model.name(), "batch_size": args.batch_size, "ranked": rows,
            "profiles": profiled.values().collect::<Vec<_>>() });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
