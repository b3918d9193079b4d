//! `brigade train`: train a model on pipeline stages, from scratch, from imported weights, or
//! continuing a checkpoint, with a progress bar (or plain lines) and checkpoints.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::{PipelineConfig, ScheduleChoice, World};
use brigade::engine::plan::human_bytes;
use brigade::engine::PipelineModel;
use brigade::metrics::{MetricsLog, RunInfo, METRICS_FILE};
use brigade::train::{CheckpointPolicy, Dataset, Event, Summary, TrainOptions, Trainer};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::model::ModelArgs;
use super::output::OutputPath;
use super::{plural, OptimizerArg};

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    devices: super::model::DeviceArgs,
    /// What the layers compute in: f32 (exact), or bf16/f16 mixed precision (f32 master
    /// weights, optimizer state and gradient sums; checkpoints keep the f32 masters).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: super::ComputeDtype,
    /// Number of pipeline stages, one thread each (default: 2, or the --schedule file's).
    #[arg(long)]
    stages: Option<usize>,
    /// Layers per stage, e.g. 3,3,2 (overrides --partition).
    #[arg(long)]
    split: Option<String>,
    /// How to cut the layers: uniform (by count), balanced (by parameters), or balanced-time
    /// (by profiled time per layer: profiles the model first).
    #[arg(long, default_value = "uniform")]
    partition: String,
    /// gpipe, 1f1b, or a schedule file in the format `brigade schedule` prints.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Micro-batches per global batch (default: 4, or the --schedule file's); with
    /// --data-parallel, per replica.
    #[arg(long)]
    microbatches: Option<usize>,
    /// Data parallel x pipeline parallel: replicate the pipeline D times (threads of this
    /// process); each replica trains on its contiguous slice of the global batch, and each
    /// stage's gradients are summed over the replicas every step. The batch must divide by
    /// D x micro-batches. Results equal one pipeline's on the same global batch.
    #[arg(long, default_value_t = 1)]
    data_parallel: usize,
    /// Under mpirun/srun: a rank waiting on a peer that has sent it nothing for this many
    /// seconds (stopped, deadlocked or cut off) ends the job with an error naming it. Must
    /// exceed the longest silence of a healthy peer: a training step, an evaluation, a
    /// checkpoint save or a model load (README, "Multi-process (MPI)").
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    rank_timeout: f64,
    /// Global batch size (examples, or sequences for GPT) [default: 16; with --resume, the
    /// checkpoint's].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Step to stop at (default 1000; with --resume, the checkpoint's planned total).
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate [default: 3e-3; with --resume, the checkpoint's].
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps (default: 5% of steps).
    #[arg(long)]
    warmup: Option<u64>,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// [default: adamw; with --resume, the checkpoint's]
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    /// Weight decay (default: 0.1 for AdamW, 5e-4 for SGD).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value (0 disables) [default: 1; with --resume, the
    /// checkpoint's].
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Seed of the initial weights and the data order [default: 0; with --resume, the
    /// checkpoint's].
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate on held-out data every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// CPU threads per stage (default: cores / stages).
    #[arg(long)]
    threads_per_stage: Option<usize>,
    /// One thread pool per stage, or one for all stages (idle stages lend their cores, and
    /// every action pays a thread hand-over: faster only for long actions and large bubbles).
    #[arg(long, value_enum, default_value = "per-stage")]
    thread_pools: super::ThreadPoolsArg,
    /// Activation recomputation: off, or full (each stage stashes only its input and reruns
    /// its forward before the backward: less activation memory for one more forward).
    #[arg(long, default_value = "off")]
    recompute: brigade::engine::compute::Recompute,
    /// Print one line per step instead of a progress bar.
    #[arg(long)]
    plain: bool,
    /// Save checkpoints into this directory (`step-N/` subdirectories and a `latest` file).
    #[arg(long)]
    save_dir: Option<PathBuf>,
    /// Save every N steps (0: only after the last step).
    #[arg(long, default_value_t = 0, requires = "save_dir")]
    save_every: u64,
    /// Keep only the newest N checkpoints in --save-dir.
    #[arg(long, requires = "save_dir")]
    keep_last: Option<usize>,
    /// Allow --save-dir to hold another run's checkpoints: they are deleted once this run
    /// has saved its first checkpoint (without it, such a directory is refused).
    #[arg(long, requires = "save_dir")]
    overwrite: bool,
    /// Write the metrics log (JSON lines: every step, evaluation and save) to this file
    /// instead of `<save-dir>/metrics.jsonl`. Plot it with `brigade plot`.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Largest checkpoint shard file, e.g. 2GB, 500MB.
    #[arg(long, default_value = "2GB", value_parser = super::parse_size)]
    max_shard_size: u64,
    /// Continue a run from a checkpoint (a checkpoint directory or a --save-dir) on this
    /// run's layout; model, optimizer, LR schedule, batch size and data order come from it.
    #[arg(long, conflicts_with = "init_from")]
    resume: Option<PathBuf>,
    /// Start from pretrained weights: a Hugging Face GPT-2 directory, a brigade checkpoint,
    /// or a torchvision-named ResNet safetensors file.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// With --init-from: tensor name prefixes to leave out and initialise fresh, e.g. `fc.` to
    /// fine-tune a ResNet on this data's classes (comma-separated).
    #[arg(long, requires = "init_from", value_delimiter = ',')]
    init_skip: Vec<String>,
}

/// Flag values that are well-formed but mean nothing sensible: refused before anything runs
/// (each would otherwise train silently wrong, or fail late).
/// The defaults of the flags a resumed run takes from its checkpoint instead (each is an
/// `Option` so that one given explicitly can be compared with the checkpoint).
impl TrainArgs {
    fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(16)
    }
    fn lr(&self) -> f64 {
        self.lr.unwrap_or(3e-3)
    }
    fn optimizer(&self) -> OptimizerArg {
        self.optimizer.unwrap_or(OptimizerArg::Adamw)
    }
    fn grad_clip(&self) -> f64 {
        self.grad_clip.unwrap_or(1.0)
    }
    fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
}

fn check_train_args(args: &TrainArgs) -> Result<()> {
    if !args.lr().is_finite() || args.lr() < 0.0 {
        bail!("--lr must be a finite, non-negative learning rate, got {}", args.lr());
    }
    if let Some(min) = args.min_lr {
        if !min.is_finite() || min < 0.0 {
            bail!("--min-lr must be a finite, non-negative learning rate, got {min}");
        }
        if min > args.lr() {
            bail!("--min-lr {min} is above --lr {}: the cosine decays from --lr down to --min-lr", args.lr());
        }
    }
    if let Some(wd) = args.weight_decay {
        if !wd.is_finite() || wd < 0.0 {
            bail!("--weight-decay must be a finite, non-negative number, got {wd}");
        }
    }
    if !args.grad_clip().is_finite() || args.grad_clip() < 0.0 {
        bail!("--grad-clip must be a finite, non-negative norm (0 disables clipping), got {}", args.grad_clip());
    }
    if args.keep_last == Some(0) {
        bail!("--keep-last 0 would keep no checkpoint; keep at least 1 (the newest is never deleted)");
    }
    if args.threads_per_stage == Some(0) {
        bail!("--threads-per-stage must be at least 1");
    }
    if args.data_parallel == 0 {
        bail!("--data-parallel must be at least 1 (1: one pipeline, no replicas)");
    }
    if let Some(init) = &args.init_from {
        if !init.exists() {
            bail!("--init-from {} does not exist", init.display());
        }
    }
    // --save-dir may be the --resume directory (a run continues in its own save directory).
    let inputs = [&args.model.data, &args.model.tokenizer, &args.init_from].into_iter().flatten();
    if let Some(save) = &args.save_dir {
        OutputPath::new(save, "--save-dir").save_dir().inputs(inputs.clone()).check()?;
    }
    if let Some(log) = &args.log {
        OutputPath::new(log, "--log")
            .inputs(inputs)
            .inputs(&args.resume)
            .own_save_dir(args.save_dir.as_deref())
            .check()?;
        if log.is_dir() {
            bail!("--log {} is a directory; give a file name such as run.jsonl", log.display());
        }
    }
    Ok(())
}

/// `--partition`: a strategy name, listing the valid ones when it is not.
fn partition_strategy(args: &TrainArgs) -> Result<PartitionStrategy> {
    match &args.split {
        Some(split) => Ok(split.parse::<PartitionStrategy>()?),
        None => match args.partition.trim().to_ascii_lowercase().as_str() {
            "uniform" | "balanced" | "balanced-params" | "balanced-time" => {
                Ok(args.partition.parse::<PartitionStrategy>()?)
            }
            other => bail!(
                "unknown --partition {other:?}: expected uniform (equal layer counts), balanced (by parameters) or \
                 balanced-time (by profiled time); give layer counts with --split 3,3,2"
            ),
        },
    }
}

/// With `--init-from`, model flags that disagree with the imported weights are an error naming
/// both (otherwise the weights' own shape would silently win).
fn check_init_matches(args: &TrainArgs, imported: &brigade::models::ModelConfig) -> Result<()> {
    use brigade::models::ModelConfig;
    let m = &args.model;
    let shape_flags = m.layers.is_some() || m.width.is_some() || m.heads.is_some() || m.vocab.is_some();
    if m.model.is_none() && !shape_flags && m.context.is_none() {
        return Ok(());
    }
    let asked = m.config()?;
    let describe = |c: &ModelConfig| match c {
        ModelConfig::Gpt(g) => format!(
            "GPT with {} layers, width {}, {} heads, vocabulary {}, context {}",
            g.n_layer, g.n_embd, g.n_head, g.vocab_size, g.n_positions
        ),
        ModelConfig::Llama(l) => format!(
            "Llama with {} layers, width {}, {} heads ({} kv), MLP {}, vocabulary {}, context {}",
            l.num_hidden_layers,
            l.hidden_size,
            l.num_attention_heads,
            l.num_key_value_heads,
            l.intermediate_size,
            l.vocab_size,
            l.max_position_embeddings
        ),
        ModelConfig::Resnet(r) => {
            format!("ResNet with blocks {:?}, widths {:?}, {} classes", r.layers, r.widths, r.num_classes)
        }
    };
    let agree = match (&asked, imported) {
        // A shorter --context trains on shorter sequences of the same model.
        (ModelConfig::Gpt(a), ModelConfig::Gpt(b)) => {
            let (mut a, b) = (a.clone(), b.clone());
            if m.context.is_some_and(|c| c <= b.n_positions) {
                a.n_positions = b.n_positions;
            }
            if m.model.is_none() {
                // Only the shape flags were given: compare those.
                (m.layers.is_none() || a.n_layer == b.n_layer)
                    && (m.width.is_none() || a.n_embd == b.n_embd)
                    && (m.heads.is_none() || a.n_head == b.n_head)
                    && (m.vocab.is_none() || a.vocab_size == b.vocab_size)
                    && (m.context.is_none() || a.n_positions == b.n_positions)
            } else {
                a == b
            }
        }
        (ModelConfig::Resnet(a), ModelConfig::Resnet(b)) => {
            // Classes and channels follow the data (and --init-skip), not the preset.
            a.block == b.block && a.layers == b.layers && a.widths == b.widths
        }
        _ => false,
    };
    if !agree {
        bail!(
            "--init-from {} holds a {}, but the model flags ask for {} ({}); drop the flags to use the imported model's shape",
            args.init_from.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            describe(imported),
            m.name(),
            describe(&asked)
        );
    }
    Ok(())
}

/// What a run starts from: the checkpoint it resumes, or the weights it imports, or nothing.
enum Start {
    Fresh,
    Resume { step: u64, planned_steps: u64, lr_horizon: u64, batch_size: usize },
    Import(Box<brigade::checkpoint::Imported>),
}

/// The model and data: from the checkpoint when resuming, else the preset (with overrides),
/// possibly starting from imported weights.
fn model_and_data(args: &TrainArgs) -> Result<(Arc<dyn PipelineModel>, Dataset, Start)> {
    if let Some(path) = &args.resume {
        let (ckpt, config, model) = brigade::checkpoint::open(path)?;
        if let Some(note) = &ckpt.note {
            println!("note     {note}");
        }
        if args.model.model.is_some() {
            // An explicit model must be the checkpoint's (with the same overrides).
            let (asked, _) = args.model.model_and_data(args.seed())?;
            if asked.config() != ckpt.meta.model.config {
                bail!(
                    "--resume {} holds a {} checkpoint, but this run asks for {}",
                    ckpt.dir.display(),
                    ckpt.meta.model.name,
                    asked.name()
                );
            }
        }
        check_resume_flags(args, &ckpt, &config)?;
        println!("resume   {} (step {})", ckpt.dir.display(), ckpt.meta.step);
        // The embedded data is generated from the run's seed, which the checkpoint keeps.
        let data = args.model.data_for(&config, ckpt.meta.seed)?;
        let m = &ckpt.meta;
        let start = Start::Resume {
            step: m.step,
            planned_steps: m.training.total_steps,
            lr_horizon: m.lr_schedule.total_steps,
            batch_size: m.training.batch_size,
        };
        return Ok((model, data, start));
    }
    let Some(init) = &args.init_from else {
        let (model, data) = args.model.model_and_data(args.seed())?;
        return Ok((model, data, Start::Fresh));
    };
    let mut config = args.model.config()?;
    if !args.init_skip.is_empty() {
        // The skipped layers are fresh, so they may take this data's shape.
        let data = args.model.data_for(&config, args.seed())?;
        config = super::model::fit_to_data(config, &data);
    }
    let weights = brigade::checkpoint::import_with(init, Some(&config), &args.init_skip)?;
    check_init_matches(args, &weights.config)?;
    println!("init     {} weights from {}", weights.params.len() + weights.buffers.len(), weights.source);
    let data = args.model.data_for(&weights.config, args.seed())?;
    let model = weights.config.build()?;
    Ok((model, data, Start::Import(Box::new(weights))))
}

/// With `--resume`, the model and data come from the checkpoint: a flag that says otherwise
/// (`--vocab`, `--layers`, `--width`, `--heads`, `--context`, a `--tokenizer` other than the
/// run's) is an error naming both values, never silently ignored. Tokenizers are compared by
/// content, so the run's tokenizer copied elsewhere is accepted.
fn check_resume_flags(
    args: &TrainArgs,
    ckpt: &brigade::engine::checkpoint::Checkpoint,
    config: &brigade::models::ModelConfig,
) -> Result<()> {
    let m = &args.model;
    // The shape flags the checkpoint's family has, with the values it was trained with.
    let shape: Vec<(&str, Option<usize>, usize)> = match config {
        brigade::models::ModelConfig::Gpt(g) => vec![
            ("--vocab", m.vocab, g.vocab_size),
            ("--layers", m.layers, g.n_layer),
            ("--width", m.width, g.n_embd),
            ("--heads", m.heads, g.n_head),
        ],
        brigade::models::ModelConfig::Llama(l) => vec![
            ("--vocab", m.vocab, l.vocab_size),
            ("--layers", m.layers, l.num_hidden_layers),
            ("--width", m.width, l.hidden_size),
            ("--heads", m.heads, l.num_attention_heads),
            ("--kv-heads", m.kv_heads, l.num_key_value_heads),
            ("--ffn", m.ffn, l.intermediate_size),
        ],
        _ => Vec::new(),
    };
    if !shape.is_empty() {
        for (flag, asked, has) in shape {
            if let Some(asked) = asked.filter(|a| *a != has) {
                bail!(
                    "{flag} {asked} conflicts with the checkpoint {} ({flag} {has}); a resumed run keeps its model: \
                     drop {flag}",
                    ckpt.dir.display()
                );
            }
        }
        let trained = ckpt.meta.training.context;
        if let Some(asked) = m.context.filter(|c| trained > 0 && *c != trained) {
            bail!(
                "--context {asked} conflicts with the checkpoint {} (trained at context {trained}); a resumed run keeps \
                 its context: drop --context",
                ckpt.dir.display()
            );
        }
    }
    // The training settings a resumed run takes from its checkpoint: a flag that asks for
    // another value would be ignored, so it is refused instead.
    let meta = &ckpt.meta;
    let (kind, decay) = match meta.optimizer {
        OptimizerConfig::AdamW { weight_decay, .. } => ("adamw", weight_decay),
        OptimizerConfig::Sgd { weight_decay, .. } => ("sgd", weight_decay),
    };
    let schedule = &meta.lr_schedule;
    let number = |v: f64| format!("{v}");
    let settings: [(&str, Option<String>, String); 8] = [
        ("--batch-size", args.batch_size.map(|b| b.to_string()), meta.training.batch_size.to_string()),
        ("--seed", args.seed.map(|v| v.to_string()), meta.seed.to_string()),
        (
            "--optimizer",
            args.optimizer.map(|o| if matches!(o, OptimizerArg::Adamw) { "adamw" } else { "sgd" }.to_string()),
            kind.to_string(),
        ),
        ("--weight-decay", args.weight_decay.map(number), number(decay)),
        ("--lr", args.lr.map(number), number(schedule.base_lr)),
        ("--min-lr", args.min_lr.map(number), number(schedule.min_lr)),
        ("--warmup", args.warmup.map(|w| w.to_string()), schedule.warmup_steps.to_string()),
        ("--grad-clip", args.grad_clip.map(number), number(meta.grad_clip.unwrap_or(0.0))),
    ];
    for (flag, asked, has) in settings {
        if let Some(asked) = asked.filter(|a| *a != has) {
            bail!(
                "{flag} {asked} conflicts with the checkpoint {} ({flag} {has}); a resumed run keeps its training \
                 settings: drop {flag}",
                ckpt.dir.display()
            );
        }
    }
    let runs = brigade::tokenizer::TextTokenizer::find_near(&ckpt.dir);
    if let (Some(asked), Some(runs)) = (&m.tokenizer, runs) {
        let content = |p: &std::path::Path| -> Option<serde_json::Value> {
            let file = if p.is_dir() { p.join(brigade::tokenizer::TOKENIZER_FILE) } else { p.to_path_buf() };
            serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()
        };
        if let (Some(a), Some(b)) = (content(asked), content(&runs)) {
            if a != b {
                bail!(
                    "--tokenizer {} differs in content from the run's tokenizer {}; resume with the run's tokenizer \
                     (or leave --tokenizer out to use it)",
                    asked.display(),
                    runs.display()
                );
            }
        }
    }
    Ok(())
}

/// A save directory whose file system cannot hold even one checkpoint is refused now, not when
/// the first save fails hours later. The estimate: the weights and the optimizer state, f32.
fn check_disk_space(dir: &std::path::Path, params: usize, optimizer_states: usize) -> Result<()> {
    let needed = params as f64 * 4.0 * (1.0 + optimizer_states as f64);
    // The directory may not exist yet: its nearest existing ancestor is on the same file system.
    let Some(existing) =
        std::path::absolute(dir).ok().and_then(|d| d.ancestors().find(|a| a.exists()).map(|a| a.to_path_buf()))
    else {
        return Ok(());
    };
    // A pseudo file system (/proc) reports no size at all: nothing to judge by there.
    let total = fs4::total_space(&existing).unwrap_or(0);
    if let (Ok(free), true) = (fs4::available_space(&existing), total > 0) {
        if needed > free as f64 {
            bail!(
                "--save-dir {} has {} free, but one checkpoint of this model takes about {} (weights and optimizer state); \
                 free some space or save elsewhere",
                dir.display(),
                human_bytes(free),
                human_bytes(needed as u64)
            );
        }
    }
    Ok(())
}

/// The pipeline's settings from the flags (a resume then takes the optimizer, LR schedule,
/// clipping and seed from its checkpoint).
fn pipeline_config(
    args: &TrainArgs,
    schedule: ScheduleChoice,
    layout: (usize, usize),
    partition: PartitionStrategy,
    steps: u64,
) -> Result<PipelineConfig> {
    let warmup = args.warmup.unwrap_or(steps / 20);
    let lr = LrSchedule::warmup_cosine(args.lr(), warmup, steps, args.min_lr.unwrap_or(args.lr() / 10.0));
    let mut pipeline = PipelineConfig::default()
        .stages(layout.0)
        .partition(partition)
        .schedule(schedule)
        .microbatches(layout.1)
        .data_parallel(args.data_parallel)
        .optimizer(args.optimizer().config(args.weight_decay))
        .lr(lr)
        .grad_clip((args.grad_clip() > 0.0).then_some(args.grad_clip()))
        .recompute(args.recompute)
        .devices(args.devices.stage_devices(layout.0)?)
        .compute_dtype(args.dtype.dtype())
        // Debug switch (pipeline::handoff): synchronise every stage after every action.
        .sync_each_action(std::env::var_os("BRIGADE_SYNC_EACH_ACTION").is_some_and(|v| v == "1"))
        .thread_pools(args.thread_pools.pools())
        .seed(args.seed());
    if let Some(t) = args.threads_per_stage {
        pipeline = pipeline.threads_per_stage(t);
    }
    Ok(pipeline)
}

fn train_options(args: &TrainArgs, steps: u64) -> TrainOptions {
    TrainOptions {
        batch_size: args.batch_size(),
        steps,
        eval_every: if args.eval_every == 0 { steps } else { args.eval_every },
        eval_batches: args.eval_batches,
        data_seed: args.seed(),
        context: args.model.context,
        checkpoints: args.save_dir.as_ref().map(|dir| CheckpointPolicy {
            dir: dir.clone(),
            every: args.save_every,
            keep_last: args.keep_last,
            max_shard_bytes: args.max_shard_size,
            overwrite: args.overwrite,
        }),
    }
}

/// The variables a launcher sets in every process it starts, with the world size: Open MPI's
/// `mpirun`, MPICH / Intel MPI (Hydra) and Slurm's PMI, MVAPICH, and Slurm's `srun` (a job step's
/// task count; not `SLURM_NTASKS`, which a batch script itself also sees while it is one process).
const LAUNCHER_WORLD_SIZE_VARS: [&str; 4] =
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"];

/// This build trains in one process: started as one of several ranks, every rank would train
/// the whole model alone and race the others for one save directory. Refuse before anything
/// else happens (`env` reads a variable; the process environment outside tests).
#[cfg_attr(feature = "mpi", allow(dead_code))]
fn refuse_multi_process_launch(env: impl Fn(&str) -> Option<String>) -> Result<()> {
    for name in LAUNCHER_WORLD_SIZE_VARS {
        let Some(value) = env(name) else { continue };
        match value.trim().parse::<u64>() {
            Ok(0 | 1) => {}
            Ok(size) => bail!(
                "started as one of {size} processes ({name}={value}), but this brigade trains in one process: \
                 every process would train alone and race for one save directory; run a single `brigade train` \
                 without mpirun/srun (its stages are threads)"
            ),
            Err(_) => bail!("{name}={value} is not a process count: was this started by mpirun or srun?"),
        }
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<()> {
    if !(args.rank_timeout.is_finite() && args.rank_timeout > 0.0) {
        bail!("--rank-timeout {} must be a positive number of seconds", args.rank_timeout);
    }
    let world = launch_world()?;
    #[cfg(feature = "mpi")]
    if let World::Ranks(ranks) = &world {
        ranks.set_rank_timeout(std::time::Duration::from_secs_f64(args.rank_timeout));
    }
    let result = train(args, world.clone());
    #[cfg(feature = "mpi")]
    if let (Err(e), World::Ranks(ranks)) = (&result, &world) {
        end_every_rank(ranks, e);
    }
    result
}

/// One process: this build has no MPI, so a launch as several ranks is refused.
#[cfg(not(feature = "mpi"))]
fn launch_world() -> Result<World> {
    refuse_multi_process_launch(|name| std::env::var(name).ok())?;
    Ok(World::Local)
}

/// Started by mpirun or srun as several processes: join the MPI job, quiet every rank's
/// standard output but rank 0's, and check that every rank got the same flags. Alone (or a
/// world of one) it is one process, exactly as without the feature.
#[cfg(feature = "mpi")]
fn launch_world() -> Result<World> {
    let launched = LAUNCHER_WORLD_SIZE_VARS
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .any(|size| size.trim().parse::<u64>().map_or(true, |n| n > 1));
    if !launched {
        return Ok(World::Local);
    }
    let ranks = brigade::engine::pipeline::Ranks::start().map_err(|e| anyhow::anyhow!("cannot start MPI: {e}"))?;
    if ranks.size() <= 1 {
        return Ok(World::Local);
    }
    if ranks.rank() != 0 {
        quiet_stdout();
    }
    let world = World::Ranks(ranks.clone());
    if let Err(e) = same_flags_everywhere(&ranks) {
        end_every_rank(&ranks, &e);
    }
    Ok(world)
}

/// Ranks compare a hash of their command line: different flags would train different models
/// (or deadlock on different schedules). Every rank knows every hash; rank 0 reports.
#[cfg(feature = "mpi")]
fn same_flags_everywhere(ranks: &brigade::engine::pipeline::Ranks) -> Result<()> {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same command line hashes alike in every process.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::env::args_os().skip(1).collect::<Vec<_>>().hash(&mut hasher);
    let all = ranks.all_gather(hasher.finish().to_le_bytes().to_vec()).map_err(anyhow::Error::msg)?;
    let differ: Vec<String> =
        all.iter().enumerate().filter(|(_, h)| **h != all[0]).map(|(r, _)| r.to_string()).collect();
    if !differ.is_empty() {
        bail!(
            "rank {} was started with other flags than rank 0 (their configuration hashes differ): every rank must \
             run the same `brigade train` command",
            differ.join(", rank ")
        );
    }
    Ok(())
}

/// Ends the whole job for an error on this rank: one `error:` line naming the rank, then
/// `MPI_Abort`, which ends every rank. An error every rank meets (a bad flag) is reported by
/// rank 0; the others wait a moment first, so the abort usually ends them before they print.
#[cfg(feature = "mpi")]
fn end_every_rank(ranks: &brigade::engine::pipeline::Ranks, e: &anyhow::Error) -> ! {
    use std::io::Write;
    if ranks.rank() != 0 {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let _ = std::io::stdout().flush();
    let _ = writeln!(std::io::stderr(), "error: rank {}: {e:#}", ranks.rank());
    ranks.abort(1)
}

/// Rank 0 prints for the job: the other ranks' standard output goes to /dev/null.
#[cfg(feature = "mpi")]
fn quiet_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto stdout's descriptor; Rust's stdout has written nothing yet.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

fn train(mut args: TrainArgs, world: World) -> Result<()> {
    check_train_args(&args)?;
    // A text --data without --tokenizer uses the tokenizer of the run it resumes, or of the
    // Hugging Face directory it starts from, when there is one; otherwise it is bytes.
    let text_data =
        args.model.data.as_ref().is_some_and(|d| !d.extension().is_some_and(|e| e.eq_ignore_ascii_case("bin")));
    if args.model.tokenizer.is_none() && text_data {
        let from_init =
            args.init_from.as_ref().map(|p| p.join(brigade::tokenizer::TOKENIZER_FILE)).filter(|f| f.is_file());
        let found = args.resume.as_deref().and_then(brigade::tokenizer::TextTokenizer::find_near).or(from_init);
        if let Some(found) = found {
            println!("tokenizer {}", found.display());
            args.model.tokenizer = Some(found);
        }
    }
    let schedule = super::schedule::schedule_choice(&args.schedule)?;
    // Under MPI the stages default to one per rank of each data-parallel replica (the ranks
    // split into `--data-parallel` consecutive groups, one pipeline each).
    let default_stages =
        if world.is_distributed() { (world.rank_and_size().1 / args.data_parallel.max(1)).max(1) } else { 2 };
    let (stages, microbatches) =
        super::schedule::layout_counts(&schedule, args.stages, args.microbatches, (default_stages, 4))?;
    world.check_fits(stages, args.data_parallel).map_err(anyhow::Error::msg)?;
    let (model, data, start) = model_and_data(&args)?;
    let mut partition = partition_strategy(&args)?;
    if partition == PartitionStrategy::BalancedTime(Vec::new()) {
        let threads = args.threads_per_stage.unwrap_or_else(|| super::default_threads(stages));
        let mb = (args.batch_size() / microbatches).max(1);
        let device = args.devices.first()?;
        partition =
            super::profile::balanced_time(model.as_ref(), &data, mb, args.model.context, threads, args.seed(), device)?;
    }
    let (first_step, batch) = match &start {
        Start::Resume { step, batch_size, .. } => (*step, *batch_size),
        _ => (0, args.batch_size()),
    };
    let replicas = args.data_parallel;
    if replicas > 1 && batch % (replicas * microbatches) != 0 {
        bail!(
            "batch size {batch} is not divisible by --data-parallel {replicas} x {} ({}): each replica takes \
             an equal slice of the batch, cut into equal micro-batches",
            plural(microbatches, "micro-batch", "micro-batches"),
            replicas * microbatches
        );
    }
    let steps = match (&start, args.steps) {
        (_, Some(steps)) => steps,
        (Start::Resume { planned_steps, .. }, None) => *planned_steps,
        _ => 1000,
    };
    if let Start::Resume { lr_horizon, .. } = &start {
        if steps > *lr_horizon {
            println!("note     the checkpoint's learning-rate schedule ends at step {lr_horizon}; later steps use its final rate");
        }
    }
    if steps <= first_step {
        bail!(
            "nothing to train: --steps {steps} is not beyond {}; ask for more steps",
            if first_step == 0 { "step 0".to_string() } else { format!("the checkpoint's step {first_step}") }
        );
    }
    // Refused before any of it is allocated (a resumed run: its checkpoint's config and batch).
    let config = brigade::models::ModelConfig::from_json(&model.config())?;
    let (needed, detail) = super::model::training_memory(
        &config,
        (batch / microbatches).max(1),
        args.model.context,
        args.optimizer().states(),
    );
    super::model::check_fits(&format!("training {}", model.name()), needed, &detail)?;

    if let Some(dir) = &args.save_dir {
        check_disk_space(dir, model.num_params(), args.optimizer().states())?;
    }
    let mut pipeline = pipeline_config(&args, schedule, (stages, microbatches), partition, steps)?.world(world.clone());
    let options = train_options(&args, steps);
    println!("model    {}", model.name());
    println!("data     {}", data.describe());
    let mut trainer = match (&args.resume, start) {
        (Some(path), Start::Resume { .. }) => {
            let started = std::time::Instant::now();
            let trainer = Trainer::resume(path, data, pipeline, options)?;
            println!(
                "loaded   checkpoint into {} in {:.2}s",
                plural(stages, "stage", "stages"),
                started.elapsed().as_secs_f64()
            );
            trainer
        }
        (_, start) => {
            if let Start::Import(weights) = start {
                pipeline.initial_params = weights.params;
                pipeline.initial_buffers = weights.buffers;
            }
            Trainer::new(model, data, pipeline, options)?
        }
    };
    {
        let batch = trainer.options().batch_size;
        let p = trainer.pipeline();
        let replicas = p.data_parallel();
        println!(
            "pipeline {}{} (layers {}), schedule {}, {} of {}",
            plural(p.schedule().stages(), "stage", "stages"),
            if replicas > 1 { format!(" x {replicas} data-parallel replicas") } else { String::new() },
            match p.schedule().chunks() {
                c if c == p.schedule().stages() => p.partition().to_string(),
                c => format!("{} in {c} chunks", p.partition()),
            },
            p.schedule().name(),
            plural(p.microbatches(), "micro-batch", "micro-batches"),
            batch / (p.microbatches() * replicas).max(1)
        );
    }
    // The tokenizer goes with the run's checkpoints, for `generate`, `export` and resuming.
    if let (Some(dir), Some(tok), true) = (&args.save_dir, args.model.text_tokenizer()?, world.is_lead()) {
        let dest = dir.join(brigade::tokenizer::TOKENIZER_FILE);
        if args.model.tokenizer.as_deref().and_then(|t| t.canonicalize().ok()) != dest.canonicalize().ok() {
            tok.save(&dest)?;
        }
    }
    let mut log = if world.is_lead() { open_log(&args, &mut trainer, first_step)? } else { None };
    let mut traffic = LinkTraffic::new(&world);
    let summary = train_with_progress(&mut trainer, args.plain, steps, log.as_mut(), &mut traffic)?;
    print_summary(&summary);
    traffic.report(&world, log.as_mut())?;
    if let Some(log) = &log {
        println!("metrics  {} (plot with: brigade plot {})", log.path().display(), log.path().display());
    }
    Ok(())
}

/// Runs the trainer, showing progress: a bar only on a terminal; piped output (a log file, CI)
/// gets plain lines. Either way the eval and save lines are printed (a hidden bar would
/// swallow its `println`s); `plain` adds a line per step.
fn train_with_progress(
    trainer: &mut Trainer,
    plain: bool,
    steps: u64,
    mut log: Option<&mut MetricsLog>,
    traffic: &mut LinkTraffic,
) -> Result<Summary> {
    let images = matches!(trainer.model().input(), brigade::engine::InputKind::Images { .. });
    let interactive = !plain && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = if interactive { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        // At most 80 columns: "step 1000/1000 [20] loss 5.5500 | 123456 tok/s ETA 12m" fits.
        ProgressStyle::with_template("step {pos}/{len} [{bar:20}] {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let say = |line: String| {
        if interactive {
            bar.println(line)
        } else {
            println!("{line}")
        }
    };
    let unit = if images { "img/s" } else { "tok/s" };
    let mut log_failed = false;
    let summary = trainer.run(|event| {
        // A log that cannot be written (a full disk) is reported once; the run goes on.
        if let Some(log) = log.as_deref_mut().filter(|_| !log_failed) {
            if let Err(e) = log.record(event) {
                say(format!("warning: {e}; the rest of this run is not logged"));
                log_failed = true;
            }
        }
        traffic.after(event);
        match event {
            Event::Step { stats, items_per_sec, .. } => {
                bar.set_position(stats.step + 1);
                if plain {
                    println!(
                        "step {:>5}: loss {:.4} | lr {:.2e} | {:.0} {unit}",
                        stats.step + 1,
                        stats.loss,
                        stats.lr,
                        items_per_sec
                    );
                }
                bar.set_message(format!("loss {:.4} | {:.0} {unit}", stats.loss, items_per_sec));
            }
            Event::Eval { step, stats } => {
                let acc = if images { format!(", accuracy {:.1}%", 100.0 * stats.accuracy()) } else { String::new() };
                say(format!("step {step:>5}: held-out loss {:.4}{acc}", stats.loss));
            }
            Event::Saved { step, checkpoint, seconds } => {
                say(format!(
                    "step {step:>5}: saved {} ({:.1} MB in {seconds:.2}s)",
                    checkpoint.dir.display(),
                    checkpoint.bytes as f64 / 1e6
                ));
            }
        }
    })?;
    bar.finish_and_clear();
    Ok(summary)
}

/// Bytes this rank sends to each rank during training steps: what was sent between two events
/// is charged to the later one, so an evaluation's hand-offs are set aside. Inert in one process.
struct LinkTraffic {
    world: World,
    /// Training steps seen.
    steps: u64,
    /// By destination rank: (hand-off bytes, replica-gradient bytes) sent during steps.
    during_steps: Vec<(u64, u64)>,
    /// The counters at the last event.
    last: Vec<(u64, u64)>,
}

impl LinkTraffic {
    fn new(world: &World) -> Self {
        let last = Self::counters(world);
        Self { world: world.clone(), steps: 0, during_steps: vec![(0, 0); last.len()], last }
    }

    /// This process's bytes sent so far, by destination rank (none in one process).
    fn counters(world: &World) -> Vec<(u64, u64)> {
        match world {
            #[cfg(feature = "mpi")]
            World::Ranks(ranks) => ranks.handoff_bytes_sent().into_iter().zip(ranks.replica_bytes_sent()).collect(),
            _ => Vec::new(),
        }
    }

    /// Called after each event. A step's hand-offs are all counted by its end: the MPI thread
    /// counts a message as it sends it, and the step's closing collective completes only after
    /// every peer has received what this rank sent it.
    fn after(&mut self, event: &Event) {
        if self.last.is_empty() {
            return;
        }
        let now = Self::counters(&self.world);
        if matches!(event, Event::Step { .. }) {
            self.steps += 1;
            for ((sum, was), is) in self.during_steps.iter_mut().zip(&self.last).zip(&now) {
                sum.0 += is.0 - was.0;
                sum.1 += is.1 - was.1;
            }
        }
        self.last = now;
    }

    /// Without MPI there are no links between ranks to report.
    #[cfg(not(feature = "mpi"))]
    fn report(&self, _world: &World, _log: Option<&mut MetricsLog>) -> Result<()> {
        Ok(())
    }

    /// Every rank's traffic, gathered; rank 0 prints each link's bytes per step and logs them.
    #[cfg(feature = "mpi")]
    fn report(&self, world: &World, log: Option<&mut MetricsLog>) -> Result<()> {
        let links = match world {
            World::Ranks(ranks) => {
                let mine: Vec<u8> =
                    self.during_steps.iter().flat_map(|(h, r)| [*h, *r]).flat_map(u64::to_le_bytes).collect();
                let all = ranks.all_gather(mine).map_err(anyhow::Error::msg)?;
                let steps = self.steps.max(1) as f64;
                let mut links = Vec::new();
                for (from, bytes) in all.iter().enumerate() {
                    let counts: Vec<u64> =
                        bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())).collect();
                    for (to, pair) in counts.chunks_exact(2).enumerate().filter(|(_, p)| p[0] + p[1] > 0) {
                        links.push(brigade::metrics::LinkBytes {
                            from,
                            to,
                            handoff_per_step: pair[0] as f64 / steps,
                            replica_per_step: pair[1] as f64 / steps,
                        });
                    }
                }
                links
            }
            _ => return Ok(()),
        };
        if !world.is_lead() {
            return Ok(());
        }
        for link in &links {
            println!(
                "link     rank {} -> rank {}: {:.0} bytes per step (hand-offs {:.0}, replica gradients {:.0})",
                link.from,
                link.to,
                link.handoff_per_step + link.replica_per_step,
                link.handoff_per_step,
                link.replica_per_step
            );
        }
        if let Some(log) = log {
            log.record_links(self.steps, &links)?;
        }
        Ok(())
    }
}

/// The run's metrics log: `--log`, else `<save-dir>/metrics.jsonl`, else none. A resumed run
/// appends to it; a new run starts it afresh.
fn open_log(args: &TrainArgs, trainer: &mut Trainer, first_step: u64) -> Result<Option<MetricsLog>> {
    let Some(path) = args.log.clone().or_else(|| args.save_dir.as_ref().map(|d| d.join(METRICS_FILE))) else {
        return Ok(None);
    };
    let name = match (&args.log, &args.save_dir) {
        (Some(log), _) => log.file_stem(),
        (None, Some(dir)) => dir.file_name(),
        (None, None) => None,
    };
    let name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let images = matches!(trainer.model().input(), brigade::engine::InputKind::Images { .. });
    let (model, batch_size) = (trainer.model().name(), trainer.options().batch_size);
    let p = trainer.pipeline();
    let stages = p.partition().stages();
    let layers = p.partition().to_string();
    let info = RunInfo {
        label: format!(
            "{name}: {} ({layers}), {}, m={}",
            plural(stages, "stage", "stages"),
            p.schedule().name(),
            p.microbatches()
        ),
        model,
        data: String::new(),
        stages,
        layers,
        schedule: p.schedule().name().to_string(),
        microbatches: p.microbatches(),
        batch_size,
        unit: if images { "img/s" } else { "tok/s" }.into(),
        start_step: first_step,
    };
    Ok(Some(MetricsLog::create(&path, &info, first_step > 0)?))
}

fn print_summary(summary: &Summary) {
    let eval = summary.final_eval.map(|e| format!("{:.4}", e.loss)).unwrap_or_else(|| "not evaluated".into());
    let ran = if summary.ran == summary.steps {
        plural(summary.ran as usize, "step", "steps")
    } else {
        format!(
            "{} (step {} to {})",
            plural(summary.ran as usize, "step", "steps"),
            summary.steps - summary.ran,
            summary.steps
        )
    };
    println!(
        "done: {ran} in {:.1}s, train loss {:.4} -> {:.4}, held-out loss {eval}",
        summary.wall.as_secs_f64(),
        summary.first_loss,
        summary.last_loss
    );
    let utilization: Vec<String> = summary.stage_utilization.iter().map(|u| format!("{:.0}%", 100.0 * u)).collect();
    println!(
        "median step {:.3}s (+ {:.1} ms getting its batch); stage utilization (busy / step time): {}",
        summary.median_step.as_secs_f64(),
        summary.median_data.as_secs_f64() * 1e3,
        utilization.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::refuse_multi_process_launch;

    #[test]
    fn a_launcher_world_size_above_one_is_refused_and_one_process_is_not() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
        };
        assert!(refuse_multi_process_launch(env(&[])).is_ok());
        assert!(refuse_multi_process_launch(env(&[("OMPI_COMM_WORLD_SIZE", "1"), ("SLURM_NTASKS", "8")])).is_ok());
        let e = refuse_multi_process_launch(env(&[("SLURM_STEP_NUM_TASKS", "4")])).unwrap_err().to_string();
        assert!(e.contains("one of 4 processes (SLURM_STEP_NUM_TASKS=4)"), "{e}");
        let e = refuse_multi_process_launch(env(&[("PMI_SIZE", "two")])).unwrap_err().to_string();
        assert!(e.contains("PMI_SIZE=two is not a process count"), "{e}");
    }
}
