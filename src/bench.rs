//! The bench harness: runs stage layouts × schedules × micro-batch counts for real, measures
//! them, and sets each measurement beside the simulator's prediction from a profile.
//!
//! A run is a [`Trainer`] (so data checks and batches are exactly `train`'s) stepped `warmup`
//! times unmeasured, then `steps` times. Per run: step time (median, min, max), throughput,
//! the measured bubble (`1 − Σ busy / (stages × step time)`, from each stage's own busy clock),
//! the theoretical bubble `(p−1)/(m+p−1)`, the simulated step time and bubble and the
//! simulator's error, and per stage the peak memory (parameters + gradients + optimizer state
//! from the shapes, plus the measured high-water mark of stashed activations), measured and
//! simulated. The median step's per-action timings become the run's timeline
//! ([`chrome_trace`], [`timeline_svg`]).

use std::fmt::Write;
use std::sync::Arc;

use brigade_engine::layer::{InputKind, PipelineModel};
use brigade_engine::optim::OptimizerConfig;
use brigade_engine::partition::{Partition, PartitionStrategy};
use brigade_engine::pipeline::{ActionTiming, PipelineConfig, StepStats};
use brigade_engine::plan::human_bytes;
use brigade_engine::profile::{median, profile_model, Profile, ProfileOptions};
use brigade_engine::schedule::{ActionKind, ScheduleKind, Timeline};
use brigade_engine::simulate::{predict, schedule_from_costs, Contention, Prediction, StageCosts};
use brigade_models::data::Split;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::train::{Dataset, TrainOptions, Trainer};
use crate::Error;

/// A copy of `data` for another run (the trainer takes its data by value).
pub fn clone_dataset(data: &Dataset) -> Dataset {
    match data {
        Dataset::Tokens(t) => Dataset::Tokens(t.clone()),
        Dataset::Images(i) => Dataset::Images(i.clone()),
    }
}

/// Sequence length a token model trains on: `context`, or the model's own.
pub fn sequence_length(model: &dyn PipelineModel, context: Option<usize>) -> usize {
    match model.input() {
        InputKind::Tokens { context: c, .. } => context.unwrap_or(c),
        InputKind::Images { .. } | InputKind::Features { .. } => 0,
    }
}

/// Training batch `index` of `batch_size` examples, as `train` would draw it.
pub fn batch(
    data: &Dataset,
    model: &dyn PipelineModel,
    index: u64,
    batch_size: usize,
    context: Option<usize>,
    seed: u64,
) -> Result<(Tensor, Tensor), Error> {
    Ok(match data {
        Dataset::Tokens(d) => {
            d.batch(Split::Train, index, batch_size, sequence_length(model, context), seed, &Device::Cpu)?
        }
        Dataset::Images(d) => d.batch(Split::Train, index, batch_size, seed, &Device::Cpu)?,
    })
}

/// Profiles `model` on one micro-batch of `microbatch_size` examples from `data`.
pub fn profile_on_data(
    model: &dyn PipelineModel,
    data: &Dataset,
    microbatch_size: usize,
    context: Option<usize>,
    options: &ProfileOptions,
) -> Result<Profile, Error> {
    let (x, y) = batch(data, model, 0, microbatch_size, context, options.seed)?;
    Ok(profile_model(model, &x, &y, options)?)
}

/// Where one micro-batch's time goes, by layer, from a profile: `name: share%` for forward +
/// backward of each layer, then the per-step optimizer share, then one hop.
pub fn time_breakdown(profile: &Profile) -> String {
    let per_mb: f64 = profile.layers.iter().map(|l| l.microbatch_s()).sum();
    let mut parts: Vec<String> = profile
        .layers
        .iter()
        .map(|l| {
            format!(
                "{} {:.2} ms (F {:.2} + B {:.2}, {:.0}%)",
                l.name,
                1e3 * l.microbatch_s(),
                1e3 * l.forward_s,
                1e3 * l.backward_s,
                100.0 * l.microbatch_s() / per_mb.max(1e-12)
            )
        })
        .collect();
    let optimizer: f64 = profile.layers.iter().map(|l| l.optimizer_s).sum();
    parts.push(format!("optimizer step {:.2} ms per step", 1e3 * optimizer));
    parts.push(format!("hop {:.1} µs", 1e6 * profile.hop.latency_s));
    parts.push(format!(
        "fixed overhead {:.2} ms per step + {:.2} ms per micro-batch",
        1e3 * profile.overhead.step_s,
        1e3 * profile.overhead.microbatch_s
    ));
    if let Some(c) = &profile.contention {
        parts.push(format!(
            "contention x{:.2} ({} copies at once on {} cores: {:.2} ms a pass alone, {:.2} ms together)",
            c.factor(),
            c.copies,
            c.cores,
            1e3 * c.alone_s,
            1e3 * c.concurrent_s
        ));
    }
    format!(
        "micro-batch of {} on {} thread(s): {:.2} ms per F+B; {}",
        profile.microbatch_size,
        profile.threads,
        1e3 * per_mb,
        parts.join(", ")
    )
}

/// `BalancedTime` filled with each layer's profiled forward + backward time.
pub fn balanced_time_strategy(profile: &Profile) -> PartitionStrategy {
    PartitionStrategy::BalancedTime(profile.layers.iter().map(|l| (l.microbatch_s() * 1e9).round() as u64).collect())
}

/// One bench run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub stages: usize,
    pub partition: PartitionStrategy,
    pub schedule: ScheduleKind,
    /// Chunks per device (interleaved 1F1B: any v ≥ 2; zb-auto: 1 or 2; others their own).
    pub virtual_stages: usize,
    pub microbatches: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub steps: usize,
    pub threads_per_stage: usize,
    /// One thread pool for all stages, or one per stage.
    pub thread_pools: brigade_engine::pipeline::ThreadPools,
    /// The device of each stage.
    pub devices: Vec<brigade_engine::StageDevice>,
    /// What the layers compute in (f32, or bf16/f16 mixed precision).
    pub compute_dtype: candle_core::DType,
    pub context: Option<usize>,
    pub seed: u64,
    pub optimizer: OptimizerConfig,
}

/// Minimum, median and maximum of a set of seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        Spread {
            median: median(&mut v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(0.0, f64::max),
        }
    }
}

/// One row of the bench table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRow {
    pub model: String,
    pub stages: usize,
    pub partition: String,
    pub schedule: String,
    /// Chunks per device.
    #[serde(default = "one")]
    pub virtual_stages: usize,
    pub microbatches: usize,
    pub batch_size: usize,
    pub threads_per_stage: usize,
    pub steps: usize,
    /// Seconds per step.
    pub step_s: Spread,
    /// Items (tokens or images) per second at the median step time.
    pub throughput: f64,
    pub throughput_unit: String,
    pub measured_bubble: f64,
    pub theoretical_bubble: f64,
    pub simulated_step_s: f64,
    /// `(simulated − measured median) / measured median`.
    pub simulation_error: f64,
    /// `(simulated − measured min) / measured min`: the profile is of uncontended layers, and
    /// the fastest step is the least disturbed by other processes.
    pub simulation_error_vs_min: f64,
    /// The simulator's step without its contention term (stages that never slow each other,
    /// as it predicted before it had one), and its error against the measured median: what
    /// the term changes, on the same measurement.
    #[serde(default)]
    pub simulated_step_s_uncontended: f64,
    #[serde(default)]
    pub simulation_error_uncontended: f64,
    pub simulated_bubble: f64,
    /// Per stage: mean seconds busy per step, measured and simulated.
    pub stage_busy_s: Vec<f64>,
    pub simulated_stage_busy_s: Vec<f64>,
    /// Per stage: the measured high-water mark of stashed bytes, and the simulator's.
    #[serde(default)]
    pub peak_stash_bytes: Vec<u64>,
    #[serde(default)]
    pub simulated_peak_stash_bytes: Vec<u64>,
    /// Per stage: static bytes + measured peak stashed activation bytes.
    pub peak_memory_bytes: Vec<u64>,
    pub simulated_peak_memory_bytes: Vec<u64>,
    /// Context switches per measured step, all of the process's threads (voluntary: a thread
    /// blocked, waiting for a message, a latch or a lock; involuntary: preempted). A count,
    /// not a time: it shows what the runtime adds per hand-off and per action even on a
    /// loaded machine. 0 where not measured.
    #[serde(default)]
    pub voluntary_switches_per_step: f64,
    #[serde(default)]
    pub involuntary_switches_per_step: f64,
    /// Name shared by this run's trace and SVG files.
    pub run_name: String,
}

fn one() -> usize {
    1
}

/// What one run produced: its row, the median step's timeline and the simulated one.
pub struct RunResult {
    pub row: BenchRow,
    pub median_step: StepStats,
    pub prediction: Prediction,
}

/// Runs one configuration; `profile` must be for this micro-batch size and thread budget.
/// `on_step` is called after every step (warm-up included), for progress.
pub fn run(
    model: Arc<dyn PipelineModel>,
    data: &Dataset,
    config: &RunConfig,
    profile: &Profile,
    mut on_step: impl FnMut(),
) -> Result<RunResult, Error> {
    if config.steps == 0 {
        return Err(Error::Config("a bench run needs at least one measured step".into()));
    }
    // The schedule is built here, not by the pipeline, so that zb-auto gets this profile's
    // costs: cut the model into p x v chunks, cost them, schedule them.
    let chunks = config.stages * config.virtual_stages;
    let layer_params: Vec<usize> = model.layers().iter().map(|l| l.param_count()).collect();
    let partition =
        config.partition.resolve(&layer_params, chunks).map_err(brigade_engine::error::EngineError::from)?;
    let costs = StageCosts::from_profile(profile, &partition)?;
    let schedule =
        schedule_from_costs(config.schedule, config.stages, config.microbatches, config.virtual_stages, &costs, None)?;
    let pipeline = PipelineConfig::default()
        .stages(config.stages)
        .partition(PartitionStrategy::Manual(partition.counts().to_vec()))
        .schedule(schedule)
        .microbatches(config.microbatches)
        .optimizer(config.optimizer)
        .threads_per_stage(config.threads_per_stage)
        .thread_pools(config.thread_pools)
        .devices(config.devices.clone())
        .compute_dtype(config.compute_dtype)
        .seed(config.seed);
    let options = TrainOptions {
        batch_size: config.batch_size,
        steps: (config.warmup + config.steps) as u64,
        eval_every: 0,
        eval_batches: 1,
        data_seed: config.seed,
        context: config.context,
        checkpoints: None,
    };
    let model_name = model.name();
    let mut trainer = Trainer::new(model.clone(), clone_dataset(data), pipeline, options)?;
    let items = trainer.items_per_batch();
    let mut measured = Vec::with_capacity(config.steps);
    let mut switches_before = context_switches();
    for i in 0..config.warmup + config.steps {
        if i == config.warmup {
            switches_before = context_switches();
        }
        let stats = trainer.step()?;
        if i >= config.warmup {
            measured.push(stats);
        }
        on_step();
    }
    let switches_after = context_switches();
    let per_step = |after: u64, before: u64| after.saturating_sub(before) as f64 / config.steps as f64;
    let partition: Partition = trainer.pipeline().partition().clone();
    let schedule = trainer.pipeline().schedule().clone();
    let p = config.stages;

    let times: Vec<f64> = measured.iter().map(|s| s.elapsed.as_secs_f64()).collect();
    let step_s = Spread::of(&times);
    let total_time: f64 = times.iter().sum();
    let mut busy = vec![0.0; p];
    for s in &measured {
        for (b, d) in busy.iter_mut().zip(&s.stage_busy) {
            *b += d.as_secs_f64();
        }
    }
    let measured_bubble = 1.0 - busy.iter().sum::<f64>() / (p as f64 * total_time).max(1e-12);
    let stage_busy_s: Vec<f64> = busy.iter().map(|b| b / measured.len() as f64).collect();

    let prediction = predict(&schedule, &costs)?;
    let uncontended = predict(&schedule, &StageCosts { contention: Contention::NONE, ..costs.clone() })?.step_time;
    let peak_memory_bytes = (0..p)
        .map(|s| prediction.static_bytes[s] + measured.iter().map(|st| st.peak_stash_bytes[s]).max().unwrap_or(0))
        .collect();
    let median_index = {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by(|&a, &b| times[a].total_cmp(&times[b]));
        order[order.len() / 2]
    };
    let partition_name = match &config.partition {
        PartitionStrategy::Uniform => "uniform".to_string(),
        PartitionStrategy::BalancedParams => "balanced-params".to_string(),
        PartitionStrategy::BalancedTime(_) => "balanced-time".to_string(),
        PartitionStrategy::Manual(_) => "manual".to_string(),
    };
    let run_name = format!(
        "{}-p{}-{}{}-m{}",
        slug(&model_name),
        p,
        config.schedule,
        if config.virtual_stages > 1 { format!("-v{}", config.virtual_stages) } else { String::new() },
        config.microbatches
    );
    let row = BenchRow {
        model: model_name,
        stages: p,
        partition: format!("{partition} ({partition_name})"),
        schedule: config.schedule.to_string(),
        virtual_stages: config.virtual_stages,
        microbatches: config.microbatches,
        batch_size: config.batch_size,
        threads_per_stage: config.threads_per_stage,
        steps: config.steps,
        step_s,
        throughput: items as f64 / step_s.median.max(1e-12),
        throughput_unit: match data {
            Dataset::Tokens(_) => "tok/s".into(),
            Dataset::Images(_) => "img/s".into(),
        },
        measured_bubble,
        theoretical_bubble: schedule.theoretical_bubble(),
        simulated_step_s: prediction.step_time,
        simulation_error: (prediction.step_time - step_s.median) / step_s.median.max(1e-12),
        simulation_error_vs_min: (prediction.step_time - step_s.min) / step_s.min.max(1e-12),
        simulated_step_s_uncontended: uncontended,
        simulation_error_uncontended: (uncontended - step_s.median) / step_s.median.max(1e-12),
        simulated_bubble: prediction.bubble_fraction,
        stage_busy_s,
        simulated_stage_busy_s: prediction.busy.clone(),
        peak_stash_bytes: (0..p).map(|s| measured.iter().map(|st| st.peak_stash_bytes[s]).max().unwrap_or(0)).collect(),
        simulated_peak_stash_bytes: prediction.peak_stash_bytes.clone(),
        peak_memory_bytes,
        simulated_peak_memory_bytes: prediction.peak_memory.clone(),
        voluntary_switches_per_step: per_step(switches_after.0, switches_before.0),
        involuntary_switches_per_step: per_step(switches_after.1, switches_before.1),
        run_name,
    };
    let median_step = measured.swap_remove(median_index);
    Ok(RunResult { row, median_step, prediction })
}

/// The bench table in Markdown.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut t = String::new();
    t.push_str("| model | stages (layers per chunk) | schedule | v | m | step ms median | min | max | throughput | bubble measured | bubble theory | simulated ms | sim error (vs median / min) | sim bubble | peak stash per stage: measured / simulated | peak memory per stage: measured / simulated |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let memory: Vec<String> = r
            .peak_memory_bytes
            .iter()
            .zip(&r.simulated_peak_memory_bytes)
            .map(|(m, s)| format!("{} / {}", human_bytes(*m), human_bytes(*s)))
            .collect();
        let stash: Vec<String> = r
            .peak_stash_bytes
            .iter()
            .zip(&r.simulated_peak_stash_bytes)
            .map(|(m, s)| if m == s { format!("{m} B (=)") } else { format!("{m} / {s} B") })
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} {} | {:.1}% | {:.1}% | {:.1} | {:+.1}% / {:+.1}% | {:.1}% | {} | {} |",
            r.model,
            r.stages,
            r.partition,
            r.schedule,
            r.virtual_stages,
            r.microbatches,
            1e3 * r.step_s.median,
            1e3 * r.step_s.min,
            1e3 * r.step_s.max,
            r.throughput,
            r.throughput_unit,
            100.0 * r.measured_bubble,
            100.0 * r.theoretical_bubble,
            1e3 * r.simulated_step_s,
            100.0 * r.simulation_error,
            100.0 * r.simulation_error_vs_min,
            100.0 * r.simulated_bubble,
            stash.join("; "),
            memory.join("; ")
        );
    }
    t
}

fn kind_name(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Forward => "forward",
        ActionKind::Backward => "backward",
        ActionKind::BackwardInput => "backward-input",
        ActionKind::BackwardWeight => "backward-weight",
    }
}

fn kind_colour(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Forward => "#4e79a7",
        ActionKind::Backward => "#f28e2b",
        ActionKind::BackwardInput => "#e15759",
        ActionKind::BackwardWeight => "#59a14f",
    }
}

/// A measured step (and optionally the simulated one) as a Chrome / Perfetto trace: one
/// process per source, one thread per stage, one complete event per action; times in µs.
pub fn chrome_trace(step: &StepStats, simulated: Option<&Timeline>) -> serde_json::Value {
    let mut events = Vec::new();
    let meta = |pid: usize, name: &str, stages: usize, events: &mut Vec<serde_json::Value>| {
        events.push(serde_json::json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}));
        for s in 0..stages {
            events.push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": s, "args": {"name": format!("stage {s}")}}));
        }
    };
    meta(1, "measured", step.stage_actions.len(), &mut events);
    for (s, actions) in step.stage_actions.iter().enumerate() {
        for a in actions {
            events.push(serde_json::json!({
                "name": a.action.to_string(), "cat": kind_name(a.action.kind), "ph": "X", "pid": 1, "tid": s,
                "ts": a.start.as_secs_f64() * 1e6, "dur": (a.end - a.start).as_secs_f64() * 1e6,
                "args": {"microbatch": a.action.microbatch},
            }));
        }
        // After its last action a stage reports, waits for the norm collective and steps.
        let last = actions.last().map_or(0.0, |a| a.end.as_secs_f64());
        events.push(serde_json::json!({
            "name": "collective + optimizer", "cat": "step-end", "ph": "X", "pid": 1, "tid": s,
            "ts": last * 1e6, "dur": (step.elapsed.as_secs_f64() - last).max(0.0) * 1e6,
        }));
    }
    if let Some(t) = simulated {
        meta(2, "simulated", t.stages(), &mut events);
        for s in 0..t.stages() {
            for a in t.stage_entries(s) {
                events.push(serde_json::json!({
                    "name": a.action.to_string(), "cat": kind_name(a.action.kind), "ph": "X", "pid": 2, "tid": s,
                    "ts": a.start * 1e6, "dur": (a.end - a.start) * 1e6,
                }));
            }
        }
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// Stages × time as an SVG: the measured step on top, the simulated one below (same scale),
/// actions coloured by kind, idle time as the grey background, the step's end (collective and
/// optimizer) hatched.
pub fn timeline_svg(title: &str, step: &StepStats, simulated: Option<&Prediction>) -> String {
    let stages = step.stage_actions.len();
    let measured_end = step.elapsed.as_secs_f64();
    let horizon = simulated.map_or(measured_end, |p| p.step_time.max(measured_end)).max(1e-9);
    let (left, width, row, gap) = (110.0, 900.0, 26.0, 6.0);
    let panels = if simulated.is_some() { 2 } else { 1 };
    let panel_height = stages as f64 * (row + gap) + 24.0;
    let height = 40.0 + panels as f64 * panel_height + 40.0;
    let x = |t: f64| left + width * t / horizon;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">
<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#ddd"/><line x1="0" y1="0" x2="0" y2="6" stroke="#999" stroke-width="2"/></pattern></defs>
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14" font-weight="bold">{}</text>
"##,
        left + width + 20.0,
        xml_escape(title)
    );
    let mut top = 40.0;
    let mut panel = |label: &str, rows: Vec<Vec<(String, ActionKind, f64, f64)>>, end: f64, svg: &mut String| {
        let _ =
            writeln!(svg, r#"<text x="10" y="{}" font-weight="bold">{label} ({:.1} ms)</text>"#, top + 12.0, end * 1e3);
        top += 18.0;
        for (s, actions) in rows.iter().enumerate() {
            let y = top + s as f64 * (row + gap);
            let _ = writeln!(svg, r#"<text x="10" y="{}">stage {s}</text>"#, y + row * 0.65);
            // The whole step as idle; actions paint over it.
            let _ = writeln!(
                svg,
                r##"<rect x="{left}" y="{y}" width="{:.2}" height="{row}" fill="#eeeeee"/>"##,
                x(end) - left
            );
            let last = actions.iter().map(|a| a.3).fold(0.0, f64::max);
            let _ = writeln!(
                svg,
                r#"<rect x="{:.2}" y="{y}" width="{:.2}" height="{row}" fill="url(#hatch)"><title>collective + optimizer</title></rect>"#,
                x(last),
                (x(end) - x(last)).max(0.0)
            );
            for (name, kind, start, stop) in actions {
                let w = (x(*stop) - x(*start)).max(0.5);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.2}" y="{y}" width="{w:.2}" height="{row}" fill="{}" stroke="white" stroke-width="0.5"><title>{name}: {:.2}-{:.2} ms</title></rect>"#,
                    x(*start),
                    kind_colour(*kind),
                    start * 1e3,
                    stop * 1e3
                );
                if w > 22.0 {
                    let _ = writeln!(
                        svg,
                        r#"<text x="{:.2}" y="{}" fill="white" font-size="10">{name}</text>"#,
                        x(*start) + 2.0,
                        y + row * 0.65
                    );
                }
            }
        }
        top += panel_height - 18.0;
    };
    let measured_rows = step
        .stage_actions
        .iter()
        .map(|actions| {
            actions
                .iter()
                .map(|a: &ActionTiming| {
                    (a.action.to_string(), a.action.kind, a.start.as_secs_f64(), a.end.as_secs_f64())
                })
                .collect()
        })
        .collect();
    panel("measured", measured_rows, measured_end, &mut svg);
    if let Some(p) = simulated {
        let rows = (0..p.timeline.stages())
            .map(|s| {
                p.timeline
                    .stage_entries(s)
                    .iter()
                    .map(|a| (a.action.to_string(), a.action.kind, a.start, a.end))
                    .collect()
            })
            .collect();
        panel("simulated", rows, p.step_time, &mut svg);
    }
    // Legend.
    let mut lx = left;
    for (label, fill) in [
        ("forward", kind_colour(ActionKind::Forward)),
        ("backward", kind_colour(ActionKind::Backward)),
        ("input grad (I)", kind_colour(ActionKind::BackwardInput)),
        ("weight grad (W)", kind_colour(ActionKind::BackwardWeight)),
        ("idle", "#eeeeee"),
        ("collective + optimizer", "url(#hatch)"),
    ] {
        let _ = writeln!(
            svg,
            r##"<rect x="{lx}" y="{}" width="12" height="12" fill="{fill}" stroke="#999" stroke-width="0.5"/><text x="{}" y="{}">{label}</text>"##,
            top + 4.0,
            lx + 16.0,
            top + 14.0
        );
        lx += 30.0 + 7.0 * label.len() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

/// A file-name-safe form of a model name: `gpt(vocab=256, ctx=16)` → `gpt_vocab_256_ctx_16`.
fn slug(name: &str) -> String {
    let mapped: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    mapped.split('_').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("_")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Context switches of this process so far, over all its threads: (voluntary, involuntary).
/// (0, 0) where the system does not say.
pub fn context_switches() -> (u64, u64) {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which lives on this stack.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0, 0);
    }
    (usage.ru_nvcsw.max(0) as u64, usage.ru_nivcsw.max(0) as u64)
}
