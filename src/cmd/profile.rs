//! `brigade profile`: each layer's measured costs on one micro-batch, as JSON, and (on
//! stderr) each layer's fused backward `B` next to its `I + W`: what splitting the backward
//! costs zero-bubble schedules.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::bench::{balanced_time_strategy, profile_on_data};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::profile::{stage_order_split, Profile, ProfileOptions};
use brigade::engine::PipelineModel;
use brigade::train::Dataset;
use clap::Args;

use super::model::{check_device, ModelArgs};
use super::output::OutputPath;

#[derive(Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Device to profile on: cpu or cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub microbatch_size: usize,
    /// CPU threads for the math (a stage's --threads-per-stage).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Timed back-to-back runs per measurement, after 2 warm-up runs.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Passes over the whole model; each time is the lowest over rounds of a median of repeats.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// adamw or sgd: sizes the optimizer state and times its step.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: super::OptimizerArg,
    /// Seed of the weights and of the profiled batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the JSON here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ProfileArgs) -> Result<()> {
    let device = check_device(&args.device)?;
    if let Some(out) = &args.out {
        OutputPath::new(out, "--out").inputs(args.model.data.iter().chain(&args.model.tokenizer)).check()?;
    }
    if args.microbatch_size == 0 {
        bail!("--microbatch-size must be at least 1");
    }
    let (model, data) = args.model.model_and_data(args.seed)?;
    let options = ProfileOptions {
        repeats: args.repeats,
        rounds: args.rounds,
        warmup: 2,
        threads: args.threads,
        optimizer: args.optimizer.config(None),
        seed: args.seed,
        device,
    };
    let profile = profile_on_data(model.as_ref(), &data, args.microbatch_size, args.model.context, &options)?;
    eprint!("{}", split_table(&profile));
    // The same in stage order: each W deferred behind another micro-batch's I, as zero-bubble
    // schedules run it (its data no longer warm from its I).
    let (x, y) = brigade::bench::batch(&data, model.as_ref(), 0, args.microbatch_size, args.model.context, args.seed)?;
    let order = stage_order_split(model.as_ref(), &x, &y, &options)?;
    eprintln!(
        "whole model in stage order, 2 micro-batches: F0 F1 B0 B1 backward {:.3} ms, F0 F1 I0 I1 W0 W1 backward {:.3} ms: {:+.1}%",
        1e3 * order.fused_s,
        1e3 * order.split_s,
        100.0 * order.overhead()
    );
    match &profile.contention {
        Some(c) => eprintln!(
            "contention on {} cores: {} copies at once x{:.2} ({:.3} ms a pass alone, {:.3} ms together)",
            profile.cores,
            c.copies,
            c.factor(),
            1e3 * c.alone_s,
            1e3 * c.concurrent_s
        ),
        None => eprintln!("contention: not measured (a GPU, or a model beyond the probe's time budget)"),
    }
    let json = serde_json::to_string_pretty(&profile)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}

/// `train --partition balanced-time`: profiles the model at the run's micro-batch size and
/// thread budget, and returns the strategy filled with per-layer times.
pub fn balanced_time(
    model: &dyn PipelineModel,
    data: &Dataset,
    microbatch_size: usize,
    context: Option<usize>,
    threads: usize,
    seed: u64,
    device: brigade::engine::StageDevice,
) -> Result<PartitionStrategy> {
    let options =
        ProfileOptions { repeats: 5, rounds: 3, warmup: 1, threads, seed, device, ..ProfileOptions::default() };
    let profile = profile_on_data(model, data, microbatch_size, context, &options)
        .context("profiling for --partition balanced-time")?;
    Ok(balanced_time_strategy(&profile))
}

/// Per layer, and for all layers: the fused backward `B` next to `I + W` timed apart, and how
/// much more the split costs (zero-bubble's target: at most 3%). A layer of a few microseconds
/// (an embedding's) is timer noise; the total is the number that matters.
fn split_table(profile: &Profile) -> String {
    let ms = |s: f64| format!("{:.3}", 1e3 * s);
    let overhead = |split: f64, fused: f64| {
        if fused > 0.0 {
            format!("{:+.1}%", 100.0 * (split - fused) / fused)
        } else {
            "not measured".to_string()
        }
    };
    let mut t = format!(
        "backward fused (B) vs split (I + W), micro-batch of {} on {} thread(s):\n",
        profile.microbatch_size, profile.threads
    );
    t.push_str("| layer | F ms | B ms | I ms | W ms | I + W ms | I + W vs B |\n|---|---|---|---|---|---|---|\n");
    for l in &profile.layers {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            l.name,
            ms(l.forward_s),
            ms(l.backward_fused_s),
            ms(l.backward_input_s),
            ms(l.backward_weight_s),
            ms(l.backward_s),
            overhead(l.backward_s, l.backward_fused_s)
        ));
    }
    let sum = |f: fn(&brigade::engine::profile::LayerProfile) -> f64| profile.layers.iter().map(f).sum::<f64>();
    let (fused, split) = (sum(|l| l.backward_fused_s), sum(|l| l.backward_s));
    t.push_str(&format!(
        "| all layers | {} | {} | {} | {} | {} | {} |\n",
        ms(sum(|l| l.forward_s)),
        ms(fused),
        ms(sum(|l| l.backward_input_s)),
        ms(sum(|l| l.backward_weight_s)),
        ms(split),
        overhead(split, fused)
    ));
    t
}
