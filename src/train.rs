//! The training loop users drive: a pipeline, a dataset, and the bookkeeping around them
//! (held-out evaluation, throughput), as a small builder-shaped API the CLI also uses.
//!
//! ```no_run
//! # fn main() -> Result<(), brigade::Error> {
//! use brigade::prelude::*;
//!
//! let model = brigade::models::preset("gpt-tiny")?;
//! let data = Dataset::Tokens(TokenDataset::embedded(0));
//! let pipeline = PipelineConfig::default().stages(2).schedule(ScheduleKind::OneFOneB).microbatches(4);
//! let mut trainer = Trainer::new(model, data, pipeline, TrainOptions { steps: 50, ..Default::default() })?;
//! trainer.run(|event| println!("{event:?}"))?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade_engine::checkpoint::{
    list_checkpoints, prune_checkpoints, remove_dead_partials, same_run, step_dir_name, update_latest, CheckpointMeta,
    ModelMeta, SaveDirLock, SaveOptions, SavedCheckpoint, TrainingMeta, DEFAULT_MAX_SHARD_BYTES,
};
use brigade_engine::layer::{InputKind, PipelineModel};
use brigade_engine::pipeline::{EvalStats, Pipeline, PipelineConfig, StepStats};
use brigade_models::data::{ImageDataset, Split, TokenDataset};
use candle_core::Device;

use crate::Error;

/// What a model trains on.
#[derive(Debug)]
pub enum Dataset {
    Tokens(TokenDataset),
    Images(ImageDataset),
}

impl Dataset {
    pub fn describe(&self) -> String {
        match self {
            Dataset::Tokens(d) => d.describe(),
            Dataset::Images(d) => format!(
                "{}: {} train / {} validation images of {:?}, {} classes",
                d.source(),
                d.train_len(),
                d.val_len(),
                d.image_shape(),
                d.num_classes()
            ),
        }
    }
}

/// Loop settings (the pipeline's own settings live in [`PipelineConfig`]).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Global batch size (split into the pipeline's micro-batches).
    pub batch_size: usize,
    pub steps: u64,
    /// Evaluate on the validation split every this many steps (and after the last); 0: never.
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Seed of the data order (batches are a function of (seed, step)).
    pub data_seed: u64,
    /// Sequence length for token models; default: the model's context.
    pub context: Option<usize>,
    /// Periodic checkpoints; none by default.
    pub checkpoints: Option<CheckpointPolicy>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            steps: 100,
            eval_every: 50,
            eval_batches: 8,
            data_seed: 0,
            context: None,
            checkpoints: None,
        }
    }
}

/// Where and how often a run saves checkpoints: `dir/step-00000100/`, with `dir/latest`
/// naming the newest complete one.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    pub dir: PathBuf,
    /// Save every this many steps (and after the last step); 0: only after the last.
    pub every: u64,
    /// Keep only the newest N checkpoints.
    pub keep_last: Option<usize>,
    pub max_shard_bytes: u64,
    /// Allow saving into a directory holding another run's checkpoints; they are deleted once
    /// this run's first checkpoint is saved. Without it such a directory is refused.
    pub overwrite: bool,
}

impl CheckpointPolicy {
    pub fn new(dir: impl Into<PathBuf>, every: u64) -> Self {
        Self { dir: dir.into(), every, keep_last: None, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, overwrite: false }
    }
}

/// A save directory claimed for a run: locked for as long as the run lives, and the other
/// run's checkpoints it held (with `overwrite`), to delete once this run has saved one.
#[derive(Debug)]
struct ClaimedSaveDir {
    _lock: SaveDirLock,
    replaced: Vec<PathBuf>,
}

/// Takes `policy.dir` for a run: locks it, checks it is writable, removes dead partial saves,
/// and refuses it if it holds checkpoints of another run (anything but the run `resumed`
/// continues) unless the policy allows overwriting them.
fn claim_save_dir(policy: &CheckpointPolicy, resumed: Option<&CheckpointMeta>) -> Result<ClaimedSaveDir, Error> {
    let lock = SaveDirLock::acquire(&policy.dir)?;
    remove_dead_partials(&policy.dir);
    let mut others = Vec::new();
    let mut why = None;
    for dir in list_checkpoints(&policy.dir)? {
        let verdict = match (CheckpointMeta::read(&dir), resumed) {
            (Ok(meta), Some(resumed)) => same_run(resumed, &meta),
            (Ok(meta), None) => Err(format!("{}, seed {}, step {}", meta.model.name, meta.seed, meta.step)),
            (Err(e), _) => Err(format!("unreadable: {e}")),
        };
        if let Err(difference) = verdict {
            why.get_or_insert(format!("{} ({difference})", dir.file_name().unwrap_or_default().to_string_lossy()));
            others.push(dir);
        }
    }
    if let (Some(why), false) = (why, policy.overwrite) {
        let d = policy.dir.display();
        let hint = if resumed.is_some() {
            "choose another --save-dir, or pass --overwrite to replace them".to_string()
        } else {
            format!(
                "continue that run with --resume {d}, choose another --save-dir, or pass --overwrite to replace them"
            )
        };
        return Err(Error::Config(format!(
            "--save-dir {d} already holds {} checkpoint(s) of another run, e.g. {why}; {hint}",
            others.len()
        )));
    }
    Ok(ClaimedSaveDir { _lock: lock, replaced: others })
}

/// Progress reported while training.
#[derive(Debug, Clone)]
pub enum Event {
    /// A training step; `data_seconds` is the time spent getting its batch, before the step
    /// (a pipeline waiting on data shows here, not in `stats.elapsed`).
    Step {
        stats: StepStats,
        items_per_sec: f64,
        data_seconds: f64,
    },
    Eval {
        step: u64,
        stats: EvalStats,
    },
    Saved {
        step: u64,
        checkpoint: SavedCheckpoint,
        seconds: f64,
    },
}

/// Final numbers of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The step the run ended at (counted from the start of training, resumes included).
    pub steps: u64,
    /// Steps this call actually ran (fewer than `steps` after a resume).
    pub ran: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub final_eval: Option<EvalStats>,
    pub wall: Duration,
    /// Fraction of training-step time each stage spent computing (1 − its bubble).
    pub stage_utilization: Vec<f64>,
    /// Median wall time of one training step.
    pub median_step: Duration,
    /// Median time a step spent getting its batch (before the pipeline runs it).
    pub median_data: Duration,
}

/// A model, its data and a running pipeline.
pub struct Trainer {
    pipeline: Pipeline,
    model: Arc<dyn PipelineModel>,
    data: Dataset,
    options: TrainOptions,
    context: usize,
    device: Device,
    /// The save directory's lock and bookkeeping, when the options ask for checkpoints.
    save_dir: Option<ClaimedSaveDir>,
}

impl Trainer {
    /// Checks that the data fits the model, then starts the pipeline. With a checkpoint
    /// policy, its directory is locked for the trainer's life, checked to be writable, and
    /// refused if it holds another run's checkpoints (unless the policy says `overwrite`).
    pub fn new(
        model: Arc<dyn PipelineModel>,
        data: Dataset,
        pipeline: PipelineConfig,
        options: TrainOptions,
    ) -> Result<Self, Error> {
        Self::start(model, data, pipeline, options, None)
    }

    fn start(
        model: Arc<dyn PipelineModel>,
        data: Dataset,
        pipeline: PipelineConfig,
        options: TrainOptions,
        resumed: Option<&CheckpointMeta>,
    ) -> Result<Self, Error> {
        if options.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        if !options.batch_size.is_multiple_of(pipeline.microbatches.max(1)) {
            return Err(Error::Config(format!(
                "batch size {} is not divisible by {} micro-batches",
                options.batch_size, pipeline.microbatches
            )));
        }
        let context = match (&data, model.input()) {
            (Dataset::Tokens(tokens), InputKind::Tokens { vocab, context }) => {
                let ctx = options.context.unwrap_or(context);
                if ctx > context {
                    return Err(Error::Config(format!("context {ctx} exceeds the model's context of {context}")));
                }
                tokens.check_vocab(vocab)?;
                tokens.check_context(ctx)?;
                // More held-out sequences than the split has would only repeat them (and a huge
                // count would run for hours with nothing to show).
                let distinct = tokens.val_len().saturating_sub(ctx);
                let asked = options.eval_batches.saturating_mul(options.batch_size);
                if asked > distinct.max(options.batch_size) {
                    return Err(Error::Config(format!(
                        "--eval-batches {} asks for {asked} held-out sequences of {ctx} tokens, but the held-out split has only \
                         {distinct} distinct ones; use --eval-batches {} or fewer",
                        options.eval_batches,
                        (distinct / options.batch_size).max(1)
                    )));
                }
                ctx
            }
            (Dataset::Images(images), InputKind::Images { channels }) => {
                images.check_model(channels, model.num_classes())?;
                if options.eval_batches > 0 {
                    images.check_eval_batch(options.batch_size)?;
                }
                0
            }
            (Dataset::Tokens(_), InputKind::Images { .. }) => {
                return Err(Error::Config(format!("{} is an image model but the data is text/tokens", model.name())))
            }
            (Dataset::Images(_), InputKind::Tokens { .. }) => {
                return Err(Error::Config(format!("{} is a language model but the data is images", model.name())))
            }
            (_, InputKind::Features { .. }) => {
                return Err(Error::Config(format!(
                    "{} takes feature tensors, which this trainer's datasets (tokens, images) are not: train it with \
                     Pipeline::train_step (see the custom_mlp example)",
                    model.name()
                )))
            }
        };
        // Before the pipeline starts (which may load a large checkpoint): a save directory that
        // cannot be used should fail in milliseconds, not after loading or training.
        // Across MPI ranks rank 0 alone claims the directory, commits checkpoints and keeps `latest`.
        let save_dir = match &options.checkpoints {
            Some(policy) if pipeline.world.is_lead() => Some(claim_save_dir(policy, resumed)?),
            _ => None,
        };
        let pipeline = Pipeline::new(model.as_ref(), pipeline)?;
        Ok(Self { pipeline, model, data, options, context, device: Device::Cpu, save_dir })
    }

    /// Continues the run saved in `checkpoint` (a checkpoint directory, or a save directory's
    /// `latest`) on the layout `pipeline` describes (any stages, split, schedule and threads;
    /// any micro-batch count for models without BatchNorm). The model, parameters, buffers,
    /// optimizer state and step come from the checkpoint, and so do the optimizer settings,
    /// learning-rate schedule, gradient clipping, batch size, context and data order, so the
    /// continued run takes exactly the steps the uninterrupted one would have. `data` must be
    /// the data the checkpoint was trained on (checked by its description). `options` gives the
    /// step to stop at and the checkpoint policy.
    pub fn resume(
        checkpoint: &Path,
        data: Dataset,
        pipeline: PipelineConfig,
        mut options: TrainOptions,
    ) -> Result<Self, Error> {
        let (ckpt, _config, model) = crate::checkpoint::open(checkpoint)?;
        let meta = ckpt.meta.clone();
        let meta = &meta;
        // Validated here from the headers; each stage then loads its own part.
        let loader = ckpt.into_stage_loader(model.as_ref())?;
        let pipeline = pipeline
            .optimizer(meta.optimizer)
            .lr(meta.lr_schedule)
            .grad_clip(meta.grad_clip)
            .seed(meta.seed)
            .resume_from_checkpoint(loader);
        // Every data-parallel replica runs `microbatches` of the global batch.
        let parts = pipeline.microbatches.max(1) * pipeline.data_parallel.max(1);
        if !meta.training.batch_size.is_multiple_of(parts) {
            return Err(Error::Config(format!(
                "the checkpoint's batch size {} is not divisible by {parts} micro-batches; resume with a micro-batch count that divides it",
                meta.training.batch_size
            )));
        }
        // BatchNorm normalises each micro-batch with its own statistics: another micro-batch
        // size is another computation, not the same run continued.
        let has_buffers = model.layers().iter().any(|l| !l.buffer_specs().is_empty());
        let saved_mb = meta.training.batch_size / meta.microbatches.max(1);
        let mb = meta.training.batch_size / parts;
        if has_buffers && mb != saved_mb {
            return Err(Error::Config(format!(
                "{} normalises each micro-batch with BatchNorm: the checkpoint used micro-batches of {saved_mb} ({} of batch {}), \
                 so resume with --microbatches {} to continue the same run",
                meta.model.name, meta.microbatches, meta.training.batch_size, meta.microbatches
            )));
        }
        check_same_data(meta, &data)?;
        options.batch_size = meta.training.batch_size;
        options.data_seed = meta.training.data_seed;
        options.context = (meta.training.context > 0).then_some(meta.training.context);
        let step = meta.step;
        let mut trainer = Self::start(model, data, pipeline, options, Some(meta))?;
        trainer.pipeline.set_step(step);
        Ok(trainer)
    }

    /// The loop settings in effect (after a resume: the checkpoint's batch size and data order).
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    pub fn model(&self) -> &Arc<dyn PipelineModel> {
        &self.model
    }

    /// Saves a checkpoint of the current state into `dir` (atomically; each stage writes its
    /// own shards).
    pub fn save_checkpoint(&mut self, dir: &Path, max_shard_bytes: u64) -> Result<SavedCheckpoint, Error> {
        let model = ModelMeta { name: self.model.name(), config: self.model.config() };
        let step = self.pipeline.steps_taken();
        let training = TrainingMeta {
            batch_size: self.options.batch_size,
            context: self.context,
            data_seed: self.options.data_seed,
            data_position: step,
            data: match &self.data {
                Dataset::Tokens(d) => d.source().to_string(),
                Dataset::Images(d) => d.source().to_string(),
            },
            data_hash: data_hash(&self.data),
            total_steps: self.options.steps,
        };
        let options = SaveOptions::with_max_shard_bytes(max_shard_bytes);
        #[cfg(feature = "testing")]
        let options = SaveOptions { fault: save_fault_from_env(), ..options };
        Ok(self.pipeline.save_checkpoint(dir, model, training, &options)?)
    }

    /// Saves into the policy's directory as `step-N`, points `latest` at it, prunes old ones.
    fn save_periodic(&mut self, policy: &CheckpointPolicy) -> Result<SavedCheckpoint, Error> {
        let dir = policy.dir.join(step_dir_name(self.pipeline.steps_taken()));
        let saved = self.save_checkpoint(&dir, policy.max_shard_bytes)?;
        if !self.pipeline.is_lead_process() {
            return Ok(saved);
        }
        update_latest(&policy.dir, &saved.dir)?;
        // With `overwrite`: the other run's checkpoints go once this run has one to replace them.
        if let Some(claimed) = &mut self.save_dir {
            for old in claimed.replaced.drain(..) {
                if old != saved.dir {
                    std::fs::remove_dir_all(&old)
                        .map_err(|e| brigade_engine::checkpoint::CheckpointError::io(&old, e))?;
                }
            }
        }
        remove_dead_partials(&policy.dir);
        if let Some(keep) = policy.keep_last {
            prune_checkpoints(&policy.dir, keep)?;
        }
        Ok(saved)
    }

    pub fn pipeline(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }

    /// Items (tokens or images) per global batch.
    pub fn items_per_batch(&self) -> usize {
        match self.data {
            Dataset::Tokens(_) => self.options.batch_size * self.context,
            Dataset::Images(_) => self.options.batch_size,
        }
    }

    /// One optimizer step on the next training batch.
    pub fn step(&mut self) -> Result<StepStats, Error> {
        Ok(self.step_timed()?.0)
    }

    /// A training step and the time spent getting its batch.
    fn step_timed(&mut self) -> Result<(StepStats, Duration), Error> {
        let started = Instant::now();
        let index = self.pipeline.steps_taken();
        let (x, y) = match &self.data {
            Dataset::Tokens(d) => d.batch(
                Split::Train,
                index,
                self.options.batch_size,
                self.context,
                self.options.data_seed,
                &self.device,
            )?,
            Dataset::Images(d) => {
                d.batch(Split::Train, index, self.options.batch_size, self.options.data_seed, &self.device)?
            }
        };
        let data_time = started.elapsed();
        Ok((self.pipeline.train_step(&x, &y)?, data_time))
    }

    /// Loss (and accuracy) on `options.eval_batches` batches of the validation split, one
    /// batch in memory at a time.
    pub fn evaluate(&mut self) -> Result<EvalStats, Error> {
        let count = self.options.eval_batches;
        if count == 0 {
            return Err(Error::Config("nothing to evaluate: eval_batches is 0".into()));
        }
        let (mut loss_sum, mut correct, mut terms) = (0.0, 0, 0);
        let mut add = |s: EvalStats| {
            loss_sum += s.loss * s.terms as f64;
            correct += s.correct;
            terms += s.terms;
        };
        match &self.data {
            Dataset::Tokens(d) => {
                for batch in
                    d.eval_batches(Split::Validation, count, self.options.batch_size, self.context, &self.device)?
                {
                    let (x, y) = batch?;
                    add(self.pipeline.evaluate(&x, &y)?);
                }
            }
            Dataset::Images(d) => {
                for batch in d.eval_batches(Split::Validation, self.options.batch_size, &self.device)?.take(count) {
                    let (x, y) = batch?;
                    add(self.pipeline.evaluate(&x, &y)?);
                }
            }
        }
        if terms == 0 {
            return Err(Error::Config("the held-out split gave no examples to evaluate".into()));
        }
        Ok(EvalStats { loss: loss_sum / terms as f64, correct, terms })
    }

    /// Trains for `options.steps` steps, reporting progress to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Summary, Error> {
        let started = Instant::now();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let mut final_eval = None;
        let start = self.pipeline.steps_taken();
        let mut busy = vec![Duration::ZERO; self.pipeline.schedule().stages()];
        let mut step_time = Duration::ZERO;
        let mut step_times = Vec::new();
        let mut data_times = Vec::new();
        // The last held-out loss: a finite step can still leave weights that predict only NaN
        // (a huge --lr). Such weights are not saved over a checkpoint already there.
        let mut held_out_finite = true;
        let mut warned_non_finite = false;
        for _ in start..self.options.steps {
            let (stats, data_time) = self.step_timed()?;
            data_times.push(data_time);
            // A diverged step must never reach a checkpoint (the save's own scan would refuse
            // NaN weights too; this names the cause, one step earlier).
            if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
                return Err(Error::Diverged(format!(
                    "step {}: loss {}, gradient norm {}: training has diverged; nothing of this step is saved \
                     (try a lower --lr, or --grad-clip)",
                    stats.step + 1,
                    stats.loss,
                    stats.grad_norm
                )));
            }
            step_time += stats.elapsed;
            step_times.push(stats.elapsed);
            for (total, b) in busy.iter_mut().zip(&stats.stage_busy) {
                *total += *b;
            }
            if first_loss.is_nan() {
                first_loss = stats.loss;
            }
            last_loss = stats.loss;
            let items_per_sec = self.items_per_batch() as f64 / stats.elapsed.as_secs_f64().max(1e-9);
            let step = stats.step + 1;
            on_event(&Event::Step { stats, items_per_sec, data_seconds: data_time.as_secs_f64() });
            let every = self.options.eval_every;
            if every > 0 && self.options.eval_batches > 0 && (step % every == 0 || step == self.options.steps) {
                let stats = self.evaluate()?;
                final_eval = Some(stats);
                held_out_finite = stats.loss.is_finite();
                on_event(&Event::Eval { step, stats });
                if !held_out_finite && !warned_non_finite {
                    // Once per run, on stderr: a warning is no event of the run the caller
                    // could be matching on.
                    let keeping = match &self.options.checkpoints {
                        Some(policy) => format!(
                            "; while it is not finite, no checkpoint is saved over those in {}",
                            policy.dir.display()
                        ),
                        None => String::new(),
                    };
                    eprintln!(
                        "warning: step {step}: the held-out loss is {}: the model predicts nothing useful \
                         (try a lower --lr, or --grad-clip){keeping}",
                        stats.loss
                    );
                    warned_non_finite = true;
                }
            }
            if let Some(policy) = self.options.checkpoints.clone() {
                let due = (policy.every > 0 && step % policy.every == 0) || step == self.options.steps;
                // Weights with a non-finite held-out loss go only into an empty directory (a
                // first checkpoint is all there is to inspect), never over checkpoints there.
                if due && (held_out_finite || list_checkpoints(&policy.dir)?.is_empty()) {
                    let started = Instant::now();
                    let checkpoint = self.save_periodic(&policy)?;
                    on_event(&Event::Saved { step, checkpoint, seconds: started.elapsed().as_secs_f64() });
                }
            }
        }
        Ok(Summary {
            steps: self.pipeline.steps_taken(),
            ran: self.pipeline.steps_taken() - start,
            first_loss,
            last_loss,
            final_eval,
            wall: started.elapsed(),
            stage_utilization: busy.iter().map(|b| b.as_secs_f64() / step_time.as_secs_f64().max(1e-9)).collect(),
            median_step: {
                step_times.sort();
                step_times.get(step_times.len() / 2).copied().unwrap_or_default()
            },
            median_data: {
                data_times.sort();
                data_times.get(data_times.len() / 2).copied().unwrap_or_default()
            },
        })
    }
}

/// Test hook for the crash-safety tests, compiled only with the `testing` feature (which only
/// the tests enable, for the binary they start): `BRIGADE_TEST_SAVE_FAULT=abort:N` kills the
/// process after N files of a save are written; `io:STAGE:N` makes stage STAGE fail after N
/// files. A default build never reads the variable.
#[cfg(feature = "testing")]
fn save_fault_from_env() -> Option<brigade_engine::checkpoint::SaveFault> {
    use brigade_engine::checkpoint::SaveFault;
    let spec = std::env::var("BRIGADE_TEST_SAVE_FAULT").ok()?;
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        ["abort", n] => Some(SaveFault::Abort { after_files: n.parse().ok()? }),
        ["io", stage, n] => Some(SaveFault::IoError { stage: stage.parse().ok()?, after_files: n.parse().ok()? }),
        _ => None,
    }
}

/// The content hash a checkpoint records of its data (see [`TrainingMeta::data_hash`]).
fn data_hash(data: &Dataset) -> String {
    match data {
        Dataset::Tokens(d) => d.content_hash(),
        Dataset::Images(d) => d.content_hash(),
    }
}

/// A resume continues on the checkpoint's data: the same content, wherever it is now (checked
/// by hash; a checkpoint without one falls back to comparing the description: path and size).
fn check_same_data(meta: &CheckpointMeta, data: &Dataset) -> Result<(), Error> {
    let source = match data {
        Dataset::Tokens(d) => d.source(),
        Dataset::Images(d) => d.source(),
    };
    let recorded = &meta.training.data_hash;
    let same = if recorded.is_empty() {
        meta.training.data.is_empty() || source == meta.training.data
    } else {
        *recorded == data_hash(data)
    };
    if !same {
        let what = if recorded.is_empty() { "" } else { " (its content differs)" };
        return Err(Error::Config(format!(
            "the checkpoint was trained on {}, but this run's data is {source}{what}; resume on the same data \
             (the same --data, --tokenizer and --image-size)",
            meta.training.data
        )));
    }
    Ok(())
}
