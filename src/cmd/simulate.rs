//! `brigade simulate`: predicts one training step of any schedule (built-in or a schedule
//! file, the executor's own IR) from a saved profile, before anything runs; or, for a GPT or
//! Llama preset, from a FLOP model of a GPU (`--model`), for hardware this machine does not
//! have. Either way on a cluster: data-parallel replicas of the pipeline laid out on nodes,
//! each hand-off and gradient all-reduce priced on the link it crosses.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::bench::balanced_time_strategy;
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::ScheduleChoice;
use brigade::engine::plan::human_bytes;
use brigade::engine::profile::{HopProfile, LayerProfile, Profile};
use brigade::engine::schedule::ScheduleKind;
use brigade::engine::simulate::{predict, schedule_from_costs, Cluster, LinkSpec, Placement, StageCosts};
use brigade::models::ModelConfig;
use clap::Args;

#[derive(Args)]
pub struct SimulateArgs {
    /// A profile written by `brigade profile --out FILE`.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub profile: Option<PathBuf>,
    /// Instead of a profile: a GPT or Llama preset (`gpt2-xl`, `llama3-8b`, ...) priced by a
    /// FLOP model of a GPU (--gpu-tflops x --utilisation), no GPU needed.
    #[arg(long)]
    pub model: Option<String>,
    /// A built-in schedule (`NAME` or `NAME:V`, as `brigade schedule`; zb-auto is generated
    /// from this profile) or a schedule file in the format `brigade schedule` prints.
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Stages (default: 2, or the schedule file's).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Micro-batches per step and replica, each of the profile's micro-batch size (default: 4,
    /// or the schedule file's).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Layers per stage, e.g. 3,1 (overrides --partition).
    #[arg(long)]
    pub split: Option<String>,
    /// uniform, balanced (by parameters) or balanced-time (by the profile's times).
    #[arg(long, default_value = "uniform")]
    pub partition: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
}

/// Where the devices are and what joins them (shared with `brigade plan`).
#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// The link between devices of one node: KIND[:GBPS[:LATENCY_US]], KIND one of
    /// in-process (stage threads, the profile's measured hop), shm, nvlink (450 GB/s, 2 µs),
    /// pcie (64 GB/s, 5 µs), infiniband (50 GB/s, 5 µs), ethernet (12.5 GB/s, 25 µs).
    #[arg(long, default_value = "in-process")]
    pub link: LinkSpec,
    /// The link between nodes, in --link's form.
    #[arg(long, default_value = "infiniband")]
    pub node_link: LinkSpec,
    /// Devices per node (default: the whole job in one node).
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// Nodes available (default: as many as the job needs; needs --gpus-per-node).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Replicas of the pipeline; each stage's gradients are all-reduced (ring) across them
    /// once per step.
    #[arg(long, default_value_t = 1)]
    pub data_parallel: usize,
    /// Which dimension fills a node first: pipeline-in-node (a replica's stages side by side,
    /// the all-reduce across nodes) or data-parallel-in-node (a stage's replicas side by side,
    /// the hand-offs across nodes).
    #[arg(long, default_value = "pipeline-in-node")]
    pub placement: Placement,
}

impl ClusterArgs {
    pub fn cluster(&self) -> Cluster {
        Cluster {
            data_parallel: self.data_parallel,
            devices_per_node: self.gpus_per_node,
            nodes: self.nodes,
            placement: self.placement,
            intra_node: self.link,
            inter_node: self.node_link,
        }
    }

    /// One line on the job's layout and links.
    pub fn describe(&self, stages: usize) -> String {
        let devices = stages * self.data_parallel;
        let nodes = match self.gpus_per_node {
            Some(g) => format!("{} node(s) of {g}", devices.div_ceil(g.max(1))),
            None => "one node".into(),
        };
        format!(
            "{} replica(s) x {stages} stage(s) = {devices} device(s) on {nodes} ({}), in a node {}, between nodes {}",
            self.data_parallel, self.placement, self.link, self.node_link
        )
    }
}

/// The FLOP model of `--model`: what a GPU does per second.
#[derive(Args, Clone)]
pub struct GpuArgs {
    /// With --model: the GPU's peak dense 16-bit TFLOP/s (default: H100 SXM's BF16, 989).
    #[arg(long, default_value_t = 989.0)]
    pub gpu_tflops: f64,
    /// With --model: the share of the peak the layers reach (model FLOPs utilisation).
    #[arg(long, default_value_t = 0.4)]
    pub utilisation: f64,
    /// With --model: memory bandwidth in GB/s, for the optimizer step (H100 SXM HBM3: 3350).
    #[arg(long, default_value_t = 3350.0)]
    pub hbm_gbps: f64,
    /// With --model: sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub microbatch_size: usize,
    /// With --model: tokens per sequence (default: the preset's context).
    #[arg(long)]
    pub context: Option<usize>,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let profile = match (&args.profile, &args.model) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read profile {}", path.display()))?;
            serde_json::from_str::<Profile>(&text)
                .with_context(|| format!("{} is not a profile written by `brigade profile`", path.display()))?
        }
        (None, Some(model)) => modelled_profile(model, &args.gpu)?,
        (None, None) => bail!("give --profile FILE or --model PRESET"),
    };
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
    let cluster = args.cluster.cluster();
    cluster.check(stages)?;
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
    let mut costs = StageCosts::from_profile(&profile, &partition)?;
    // zb-auto is generated for the priced links, on its own routing table.
    let placement = match auto {
        Some(v) => ScheduleKind::ZbAuto.placement(stages, v),
        None => schedule.placement().to_vec(),
    };
    costs.place_on(&placement, &cluster)?;
    let schedule = match auto {
        Some(v) => schedule_from_costs(ScheduleKind::ZbAuto, stages, microbatches, v, &costs, None)?,
        None => schedule,
    };
    let p = predict(&schedule, &costs)?;

    println!(
        "{}: schedule {}, {} stages (layers {partition}), {} micro-batches of {}, profiled on {}",
        profile.model,
        schedule.name(),
        stages,
        microbatches,
        profile.microbatch_size,
        if args.model.is_some() { profile.device.clone() } else { format!("{} thread(s)", profile.threads) }
    );
    if cluster != Cluster::default() {
        println!(
            "{}; global batch {} x {microbatches} x {} = {}",
            args.cluster.describe(stages),
            cluster.data_parallel,
            profile.microbatch_size,
            cluster.data_parallel * microbatches * profile.microbatch_size
        );
    }
    let all_reduce_end = p.gradients_reduced;
    println!(
        "predicted step {:.2} ms (actions {:.2} ms + all-reduce {:.2} ms + optimizer {:.2} ms), bubble {:.1}% (theory {:.1}%)",
        1e3 * p.step_time,
        1e3 * p.makespan,
        1e3 * (all_reduce_end - p.makespan),
        1e3 * (p.step_time - all_reduce_end),
        100.0 * p.bubble_fraction,
        100.0 * schedule.theoretical_bubble()
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let per_link: Vec<String> =
        p.link_bytes.iter().map(|(kind, bytes)| format!("{kind} {}", human_bytes(*bytes))).collect();
    println!(
        "per device on average: compute {:.2} ms, all-reduce {:.2} ms, idle {:.2} ms; communication costs the step {:.2} ms; bytes per step: {}",
        1e3 * mean(&p.busy),
        1e3 * mean(&p.all_reduce),
        1e3 * mean(&p.idle),
        1e3 * p.exposed_communication,
        if per_link.is_empty() { "none".to_string() } else { per_link.join(", ") }
    );
    println!("| stage | chunks: layers | busy ms | idle ms | stashed chunk micro-batches | peak stash | peak memory | all-reduce ms |");
    println!("|---|---|---|---|---|---|---|---|");
    let ranges = partition.ranges();
    for s in 0..stages {
        let held: Vec<String> =
            schedule.chunks_on(s).into_iter().map(|c| format!("{c}: {}..{}", ranges[c].start, ranges[c].end)).collect();
        println!(
            "| {s} | {} | {:.2} | {:.2} | {} | {} | {} | {:.2} |",
            held.join(", "),
            1e3 * p.busy[s],
            1e3 * p.idle[s],
            p.peak_in_flight[s],
            human_bytes(p.peak_stash_bytes[s]),
            human_bytes(p.peak_memory[s]),
            1e3 * p.all_reduce[s]
        );
    }
    Ok(())
}

/// A profile of a GPT or Llama preset on a GPU that is not here, from a FLOP model. Per layer
/// and micro-batch of `b` sequences of `t` tokens (`T = b·t`):
/// - matrix products: `2·P·T` FLOPs forward for the layer's `P` matrix weights (the first
///   layer's tables are looked up, not multiplied; the head's, tied or not, are multiplied),
///   the same again for the input gradient and for the weight gradient;
/// - attention scores in a block: `4·b·t²·d` forward (QKᵀ and AV over the full square, the
///   count Megatron-LM's MFU formula uses), twice that backward, no weight gradient;
/// - time = FLOPs / (peak × utilisation); the optimizer (AdamW, fp32) moves 28 bytes per
///   parameter (read weight, gradient and two moments, write three) at the memory bandwidth;
/// - parameters, gradients and AdamW state in fp32: 16 bytes per parameter;
/// - activations in 16-bit: `34·T·h` bytes kept per block (Korthikanti et al., "Reducing
///   Activation Recomputation in Large Transformer Models", 2022, with flash attention's
///   `5·a·t/h` term left out), `14·T·h` of them the weight gradients' inputs; the head keeps
///   fp32 logits (`4·T·V`); a hand-off is `T·h` 16-bit values.
///
/// Messages inside one process are free; `--link` prices them.
pub fn modelled_profile(preset: &str, gpu: &GpuArgs) -> Result<Profile> {
    for (name, value) in
        [("--gpu-tflops", gpu.gpu_tflops), ("--utilisation", gpu.utilisation), ("--hbm-gbps", gpu.hbm_gbps)]
    {
        if !(value > 0.0 && value.is_finite()) {
            bail!("{name} must be a positive number, got {value}");
        }
    }
    if gpu.utilisation > 1.0 {
        bail!("--utilisation is a share of the peak, at most 1, got {}", gpu.utilisation);
    }
    let config = ModelConfig::preset(preset)?;
    // (longest context, hidden width, attention width)
    let (max_context, hidden, attention) = match &config {
        ModelConfig::Gpt(c) => (c.n_positions, c.n_embd, c.n_embd),
        ModelConfig::Llama(c) => (c.max_position_embeddings, c.hidden_size, c.num_attention_heads * c.head_dim),
        _ => bail!("the FLOP model covers the GPT and Llama presets, not {preset}"),
    };
    let t = gpu.context.unwrap_or(max_context);
    if t == 0 || t > max_context {
        bail!("--context {t}: {preset} takes 1 to {max_context} tokens");
    }
    let b = gpu.microbatch_size;
    if b == 0 {
        bail!("--microbatch-size must be at least 1");
    }
    let model = config.build()?;
    let specs = model.layers();
    let last = specs.len().saturating_sub(1);
    let (bf, tf, hf) = (b as f64, t as f64, hidden as f64);
    let tokens = bf * tf;
    let flops_per_s = gpu.gpu_tflops * 1e12 * gpu.utilisation;
    let hand_off = (2 * b * t * hidden) as u64;
    let layers = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let params = spec.params();
            let matrix: usize =
                if i == 0 { 0 } else { params.iter().filter(|p| p.shape.len() == 2).map(|p| p.numel()).sum() };
            let products = 2.0 * matrix as f64 * tokens;
            let scores = if i > 0 && i < last { 4.0 * bf * tf * tf * attention as f64 } else { 0.0 };
            let (activation_bytes, weight_stash_bytes) = if i == last {
                (4 * (b * t) as u64 * model.num_classes() as u64, hand_off)
            } else if i > 0 {
                ((34.0 * tokens * hf) as u64, (14.0 * tokens * hf) as u64)
            } else {
                (0, 0)
            };
            let param_count: usize = params.iter().map(|p| p.numel()).sum();
            LayerProfile {
                name: spec.name(),
                forward_s: (products + scores) / flops_per_s,
                backward_s: (2.0 * products + 2.0 * scores) / flops_per_s,
                backward_input_s: (products + 2.0 * scores) / flops_per_s,
                backward_weight_s: products / flops_per_s,
                // The FLOP model has no split overhead: a fused B costs I + W.
                backward_fused_s: (2.0 * products + 2.0 * scores) / flops_per_s,
                optimizer_s: 28.0 * param_count as f64 / (gpu.hbm_gbps * 1e9),
                activation_bytes,
                input_bytes_kept: 0,
                weight_stash_bytes,
                // The paper model does not follow the fused loss's deferred weight gradient.
                split_extra_bytes: 0,
                split_weight_stash_extra_bytes: 0,
                kept_bytes: 0,
                output_bytes: if i == last { 4 } else { hand_off },
                params: params.iter().map(|p| (p.name.clone(), 4 * p.numel() as u64)).collect(),
                optimizer_state_ratio: 2,
            }
        })
        .collect();
    Ok(Profile {
        model: preset.to_string(),
        device: format!("a modelled GPU ({} TFLOP/s x {} utilisation)", gpu.gpu_tflops, gpu.utilisation),
        threads: 1,
        microbatch_size: b,
        input_shape: vec![b, t],
        optimizer: "adamw".into(),
        repeats: 0,
        layers,
        hop: HopProfile { latency_s: 0.0, copy_bytes_per_s: f64::INFINITY },
        overhead: Default::default(),
        cores: 0,
        contention: None,
    })
}
