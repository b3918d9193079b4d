//! The `brigade` command line: train a model on pipeline stages, or print a schedule.

mod cli_checkpoint;
mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::partition::PartitionStrategy;
use brigade::engine::pipeline::{PipelineConfig, ScheduleChoice};
use brigade::engine::schedule::{ActionCosts, Schedule, ScheduleKind};
use brigade::train::{CheckpointPolicy, Event, TrainOptions, Trainer};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cmd::model::ModelArgs;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "brigade", version, about = "Pipeline-parallel training of GPT and ResNet models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model split into pipeline stages.
    Train(TrainArgs),
    /// Print a schedule's time x stage grid, its action lists and its bubble.
    Schedule(ScheduleArgs),
    /// List the model presets with their parameter and layer counts.
    Presets,
    /// Write a checkpoint's weights as Hugging Face GPT-2 / torchvision ResNet files.
    Export(cli_checkpoint::ExportArgs),
    /// Show a checkpoint: metadata, tensors, and parameters per stage for a layout.
    Inspect(cli_checkpoint::InspectArgs),
    /// Run a checkpoint forward-only over pipeline stages: inputs in, logits out.
    Predict(cli_checkpoint::PredictArgs),
    /// Generate text from a GPT checkpoint, pipelined over stages.
    Generate(cli_checkpoint::GenerateArgs),
    /// Measure each layer's time, memory and transfer size, and a stage hop; JSON out.
    Profile(cmd::profile::ProfileArgs),
    /// Rank stage counts, partitions, schedules and micro-batch counts by simulated step time.
    Plan(cmd::plan::PlanArgs),
    /// Run layouts x schedules x micro-batch counts, measure, and compare with the simulator.
    Bench(cmd::bench::BenchArgs),
    /// Predict a step of any schedule (built-in or a file) from a saved profile.
    Simulate(cmd::simulate::SimulateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerArg {
    Adamw,
    Sgd,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
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
    /// Micro-batches per global batch (default: 4, or the --schedule file's).
    #[arg(long)]
    microbatches: Option<usize>,
    /// Global batch size (examples, or sequences for GPT).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Step to stop at (default 1000; with --resume, the checkpoint's planned total).
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Linear warm-up steps (default: 5% of steps).
    #[arg(long)]
    warmup: Option<u64>,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Weight decay (default: 0.1 for AdamW, 5e-4 for SGD).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on held-out data every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// CPU threads per stage (default: cores / stages).
    #[arg(long)]
    threads_per_stage: Option<usize>,
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
    /// Largest checkpoint shard file, e.g. 2GB, 500MB.
    #[arg(long, default_value = "2GB", value_parser = cli_checkpoint::parse_size)]
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

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleFormat {
    /// Time x stage grid (F=1, B=2 time units).
    Grid,
    /// One line of actions per stage.
    Text,
}

#[derive(Args)]
struct ScheduleArgs {
    /// Either output loads back with `--schedule FILE`.
    #[arg(long, value_enum, default_value = "grid")]
    format: ScheduleFormat,
    /// gpipe, 1f1b, or a schedule file to validate and draw.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Stages of a built-in schedule (default 4); a file has its own.
    #[arg(long)]
    stages: Option<usize>,
    /// Micro-batches of a built-in schedule (default 8); a file has its own.
    #[arg(long)]
    microbatches: Option<usize>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Schedule(args) => schedule(args),
        Command::Presets => presets(),
        Command::Export(args) => cli_checkpoint::export(args),
        Command::Inspect(args) => cli_checkpoint::inspect(args),
        Command::Predict(args) => cli_checkpoint::predict(args),
        Command::Generate(args) => cli_checkpoint::generate(args),
        Command::Profile(args) => cmd::profile::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Simulate(args) => cmd::simulate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Command-line syntax errors: exit code 2 (1 is every other error), and like every other
/// error one `error:` line naming the problem (clap spreads some over several lines), then
/// clap's hint. `--help` and `--version` print as usual and exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let rendered = e.render().to_string();
    let mut paragraphs = rendered.split("\n\n");
    let first = paragraphs.next().unwrap_or_default();
    let line = first.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    eprintln!("{line}");
    if let Some(hint) = rendered.lines().rev().find(|l| l.contains("--help")) {
        eprintln!("{}", hint.trim());
    }
    ExitCode::from(2)
}

/// The error and its causes on one line, skipping causes a message already spells out.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// `gpipe`/`1f1b`, or else a path to a schedule file.
fn schedule_choice(spec: &str) -> Result<ScheduleChoice> {
    if let Ok(kind) = spec.parse::<ScheduleKind>() {
        return Ok(ScheduleChoice::Kind(kind));
    }
    let path = PathBuf::from(spec);
    if !path.exists() {
        bail!("unknown schedule {spec:?}: expected gpipe, 1f1b, or the path of a schedule file");
    }
    let schedule = Schedule::load(&path)?;
    // A file printed by `brigade schedule` keeps the built-in's name in its header; once its
    // actions are edited it is not that schedule any more, and must not be reported as it.
    if let Ok(kind) = schedule.name().parse::<ScheduleKind>() {
        let builtin = kind.build(schedule.stages(), schedule.microbatches()).ok();
        if builtin.as_ref().map(|b| b.actions()) != Some(schedule.actions()) {
            let name = format!("custom (edited {} from {})", schedule.name(), path.display());
            let edited = Schedule::from_actions(name, schedule.stages(), schedule.microbatches(), schedule.actions().to_vec())?;
            return Ok(ScheduleChoice::Custom(edited));
        }
    }
    Ok(ScheduleChoice::Custom(schedule))
}

/// The stage and micro-batch counts: the flags, else a schedule file's own, else the defaults.
/// Flags that disagree with a file are an error naming both.
fn layout_counts(choice: &ScheduleChoice, stages: Option<usize>, microbatches: Option<usize>, defaults: (usize, usize)) -> Result<(usize, usize)> {
    let (p, m) = match choice {
        ScheduleChoice::Custom(s) => {
            for (flag, given, own) in [("--stages", stages, s.stages()), ("--microbatches", microbatches, s.microbatches())] {
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
    if m == 0 {
        bail!("--microbatches must be at least 1");
    }
    Ok((p, m))
}

/// The most actions `brigade schedule` draws: a grid wider than this is unreadable, and a far
/// larger one (a typo of a few zeros) would exhaust memory instead of printing.
const MAX_DRAWN_ACTIONS: usize = 1_000_000;

fn schedule(args: ScheduleArgs) -> Result<()> {
    let choice = schedule_choice(&args.schedule)?;
    let (stages, microbatches) = layout_counts(&choice, args.stages, args.microbatches, (4, 8))?;
    let schedule = match choice {
        ScheduleChoice::Kind(kind) => {
            let actions = stages.saturating_mul(microbatches).saturating_mul(2);
            if actions > MAX_DRAWN_ACTIONS {
                bail!(
                    "{stages} stages x {microbatches} micro-batches is {actions} actions, more than the {MAX_DRAWN_ACTIONS} \
                     `brigade schedule` draws; use fewer"
                );
            }
            kind.build(stages, microbatches)?
        }
        ScheduleChoice::Custom(s) => s,
    };
    let timeline = schedule.timeline(ActionCosts::default());
    match args.format {
        ScheduleFormat::Grid => println!("{}", schedule.grid().trim_end()),
        ScheduleFormat::Text => println!("{}", schedule.to_text().trim_end()),
    }
    // A comment, so the whole output stays a loadable schedule file.
    println!(
        "# stages {}, micro-batches {}: theoretical bubble (p-1)/(m+p-1) = {:.1}%, simulated with F=1, B=2: {:.1}%",
        schedule.stages(),
        schedule.microbatches(),
        100.0 * schedule.theoretical_bubble(),
        100.0 * timeline.bubble_fraction()
    );
    Ok(())
}

fn presets() -> Result<()> {
    println!("{:<14} {:>15} {:>7}", "preset", "parameters", "layers");
    for name in brigade::models::preset_names() {
        let model = brigade::models::preset(name)?;
        println!("{name:<14} {:>15} {:>7}", model.num_params(), model.layers().len());
    }
    Ok(())
}

/// Flag values that are well-formed but mean nothing sensible: refused before anything runs
/// (each would otherwise train silently wrong, or fail late).
fn check_train_args(args: &TrainArgs) -> Result<()> {
    if !args.lr.is_finite() || args.lr < 0.0 {
        bail!("--lr must be a finite, non-negative learning rate, got {}", args.lr);
    }
    if let Some(min) = args.min_lr {
        if !min.is_finite() || min < 0.0 {
            bail!("--min-lr must be a finite, non-negative learning rate, got {min}");
        }
        if min > args.lr {
            bail!("--min-lr {min} is above --lr {}: the cosine decays from --lr down to --min-lr", args.lr);
        }
    }
    if let Some(wd) = args.weight_decay {
        if !wd.is_finite() || wd < 0.0 {
            bail!("--weight-decay must be a finite, non-negative number, got {wd}");
        }
    }
    if !args.grad_clip.is_finite() || args.grad_clip < 0.0 {
        bail!("--grad-clip must be a finite, non-negative norm (0 disables clipping), got {}", args.grad_clip);
    }
    if args.threads_per_stage == Some(0) {
        bail!("--threads-per-stage must be at least 1");
    }
    if let Some(init) = &args.init_from {
        if !init.exists() {
            bail!("--init-from {} does not exist", init.display());
        }
    }
    if let Some(save) = &args.save_dir {
        brigade::engine::checkpoint::refuse_inside_checkpoint(save, "--save-dir")?;
    }
    Ok(())
}

/// `--partition`: a strategy name, listing the valid ones when it is not.
fn partition_strategy(args: &TrainArgs) -> Result<PartitionStrategy> {
    match &args.split {
        Some(split) => Ok(split.parse::<PartitionStrategy>()?),
        None => match args.partition.trim().to_ascii_lowercase().as_str() {
            "uniform" | "balanced" | "balanced-params" | "balanced-time" => Ok(args.partition.parse::<PartitionStrategy>()?),
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
        ModelConfig::Resnet(r) => format!("ResNet with blocks {:?}, widths {:?}, {} classes", r.layers, r.widths, r.num_classes),
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

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn train(args: TrainArgs) -> Result<()> {
    check_train_args(&args)?;
    let schedule = schedule_choice(&args.schedule)?;
    let (stages, microbatches) = layout_counts(&schedule, args.stages, args.microbatches, (2, 4))?;
    // The model and data: from the checkpoint when resuming, else the preset (with overrides),
    // possibly starting from imported weights.
    let resumed = args.resume.as_ref().map(|r| brigade::checkpoint::open(r)).transpose()?;
    if let Some((ckpt, _, _)) = &resumed {
        if let Some(note) = &ckpt.note {
            println!("note     {note}");
        }
    }
    let mut imported = None;
    let (model, data) = match &resumed {
        Some((ckpt, config, model)) => {
            if args.model.model.is_some() {
                // An explicit model must be the checkpoint's (with the same overrides).
                let (asked, _) = args.model.model_and_data(args.seed)?;
                if asked.config() != ckpt.meta.model.config {
                    bail!(
                        "--resume {} holds a {} checkpoint, but this run asks for {}",
                        ckpt.dir.display(),
                        ckpt.meta.model.name,
                        asked.name()
                    );
                }
            }
            println!("resume   {} (step {})", ckpt.dir.display(), ckpt.meta.step);
            // The embedded data is generated from the run's seed, which the checkpoint keeps.
            (model.clone(), args.model.data_for(config, ckpt.meta.seed)?)
        }
        None => match &args.init_from {
            Some(init) => {
                let mut config = args.model.config()?;
                if !args.init_skip.is_empty() {
                    // The skipped layers are fresh, so they may take this data's shape.
                    let data = args.model.data_for(&config, args.seed)?;
                    config = cmd::model::fit_to_data(config, &data);
                }
                let weights = brigade::checkpoint::import_with(init, Some(&config), &args.init_skip)?;
                check_init_matches(&args, &weights.config)?;
                println!("init     {} weights from {}", weights.params.len() + weights.buffers.len(), weights.source);
                let data = args.model.data_for(&weights.config, args.seed)?;
                let model = weights.config.build()?;
                imported = Some(weights);
                (model, data)
            }
            None => args.model.model_and_data(args.seed)?,
        },
    };
    let mut partition = partition_strategy(&args)?;
    if partition == PartitionStrategy::BalancedTime(Vec::new()) {
        let threads = args.threads_per_stage.unwrap_or_else(|| cmd::default_threads(stages));
        let mb = (args.batch_size / microbatches).max(1);
        partition = cmd::profile::balanced_time(model.as_ref(), &data, mb, args.model.context, threads, args.seed)?;
    }
    let steps = args.steps.unwrap_or_else(|| resumed.as_ref().map_or(1000, |(c, _, _)| c.meta.training.total_steps));
    if let Some((ckpt, _, _)) = &resumed {
        let horizon = ckpt.meta.lr_schedule.total_steps;
        if steps > horizon {
            println!("note     the checkpoint's learning-rate schedule ends at step {horizon}; later steps use its final rate");
        }
    }
    {
        // Refused before any of it is allocated (a resumed run: its checkpoint's config and batch).
        let config = brigade::models::ModelConfig::from_json(&model.config())?;
        let batch = resumed.as_ref().map_or(args.batch_size, |(c, _, _)| c.meta.training.batch_size);
        let states = match args.optimizer {
            OptimizerArg::Adamw => 2,
            OptimizerArg::Sgd => 1,
        };
        let (needed, detail) = cmd::model::training_memory(&config, (batch / microbatches).max(1), args.model.context, states);
        cmd::model::check_fits(&format!("training {}", model.name()), needed, &detail)?;
    }
    let start = resumed.as_ref().map_or(0, |(c, _, _)| c.meta.step);
    if steps <= start {
        bail!(
            "nothing to train: --steps {steps} is not beyond {}; ask for more steps",
            if start == 0 { "step 0".to_string() } else { format!("the checkpoint's step {start}") }
        );
    }
    let warmup = args.warmup.unwrap_or(steps / 20);
    let lr = LrSchedule::warmup_cosine(args.lr, warmup, steps, args.min_lr.unwrap_or(args.lr / 10.0));
    let optimizer = match (args.optimizer, OptimizerConfig::adamw(), OptimizerConfig::sgd()) {
        (OptimizerArg::Adamw, OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay }, _) => {
            OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay: args.weight_decay.unwrap_or(weight_decay) }
        }
        (OptimizerArg::Sgd, _, OptimizerConfig::Sgd { momentum, weight_decay, nesterov }) => {
            OptimizerConfig::Sgd { momentum, weight_decay: args.weight_decay.unwrap_or(weight_decay), nesterov }
        }
        _ => unreachable!("default optimizer configs have their own variants"),
    };
    let mut pipeline = PipelineConfig::default()
        .stages(stages)
        .partition(partition)
        .schedule(schedule)
        .microbatches(microbatches)
        .optimizer(optimizer)
        .lr(lr)
        .grad_clip((args.grad_clip > 0.0).then_some(args.grad_clip))
        .seed(args.seed);
    if let Some(t) = args.threads_per_stage {
        pipeline = pipeline.threads_per_stage(t);
    }
    let options = TrainOptions {
        batch_size: args.batch_size,
        steps,
        eval_every: if args.eval_every == 0 { steps } else { args.eval_every },
        eval_batches: args.eval_batches,
        data_seed: args.seed,
        context: args.model.context,
        checkpoints: args.save_dir.as_ref().map(|dir| CheckpointPolicy {
            dir: dir.clone(),
            every: args.save_every,
            keep_last: args.keep_last,
            max_shard_bytes: args.max_shard_size,
            overwrite: args.overwrite,
        }),
    };
    println!("model    {}", model.name());
    println!("data     {}", data.describe());
    let mut trainer = match (&args.resume, resumed) {
        (Some(path), Some(_)) => {
            let started = std::time::Instant::now();
            let trainer = Trainer::resume(path, data, pipeline, options)?;
            println!("loaded   checkpoint into {} in {:.2}s", plural(stages, "stage", "stages"), started.elapsed().as_secs_f64());
            trainer
        }
        _ => {
            if let Some(weights) = imported {
                pipeline.initial_params = weights.params;
                pipeline.initial_buffers = weights.buffers;
            }
            Trainer::new(model, data, pipeline, options)?
        }
    };
    let images = matches!(trainer.model().input(), brigade::engine::InputKind::Images { .. });
    {
        let batch = trainer.options().batch_size;
        let p = trainer.pipeline();
        println!(
            "pipeline {} (layers {}), schedule {}, {} of {}",
            plural(p.partition().stages(), "stage", "stages"),
            p.partition(),
            p.schedule().name(),
            plural(p.microbatches(), "micro-batch", "micro-batches"),
            batch / p.microbatches().max(1)
        );
    }
    // A bar only on a terminal; piped output (a log file, CI) gets plain lines. Either way the
    // eval and save lines are printed (a hidden bar would swallow its `println`s).
    let interactive = !args.plain && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = if interactive { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        // At most 80 columns: "step 1000/1000 [20] loss 5.5500 | 123456 tok/s ETA 12m" fits.
        ProgressStyle::with_template("step {pos}/{len} [{bar:20}] {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let say = |line: String| if interactive { bar.println(line) } else { println!("{line}") };
    let unit = if images { "img/s" } else { "tok/s" };
    let summary = trainer.run(|event| match event {
        Event::Step { stats, items_per_sec } => {
            bar.set_position(stats.step + 1);
            let line = format!("loss {:.4} | lr {:.2e} | {:.0} {unit}", stats.loss, stats.lr, items_per_sec);
            if args.plain {
                println!("step {:>5}: {line}", stats.step + 1);
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
    })?;
    bar.finish_and_clear();
    let eval = summary.final_eval.map(|e| format!("{:.4}", e.loss)).unwrap_or_else(|| "not evaluated".into());
    let ran = if summary.ran == summary.steps {
        plural(summary.ran as usize, "step", "steps")
    } else {
        format!("{} (step {} to {})", plural(summary.ran as usize, "step", "steps"), summary.steps - summary.ran, summary.steps)
    };
    println!(
        "done: {ran} in {:.1}s, train loss {:.4} -> {:.4}, held-out loss {eval}",
        summary.wall.as_secs_f64(),
        summary.first_loss,
        summary.last_loss
    );
    let utilization: Vec<String> = summary.stage_utilization.iter().map(|u| format!("{:.0}%", 100.0 * u)).collect();
    println!(
        "median step {:.3}s; stage utilization (busy / step time): {}",
        summary.median_step.as_secs_f64(),
        utilization.join(", ")
    );
    Ok(())
}
