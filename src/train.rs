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

use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { batch_size: 16, steps: 100, eval_every: 50, eval_batches: 8, data_seed: 0, context: None }
    }
}

/// Progress reported while training.
#[derive(Debug, Clone)]
pub enum Event {
    Step { stats: StepStats, items_per_sec: f64 },
    Eval { step: u64, stats: EvalStats },
}

/// Final numbers of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub final_eval: Option<EvalStats>,
    pub wall: Duration,
    /// Fraction of training-step time each stage spent computing (1 − its bubble).
    pub stage_utilization: Vec<f64>,
    /// Median wall time of one training step.
    pub median_step: Duration,
}

/// A model, its data and a running pipeline.
pub struct Trainer {
    pipeline: Pipeline,
    data: Dataset,
    options: TrainOptions,
    context: usize,
    device: Device,
}

impl Trainer {
    /// Checks that the data fits the model, then starts the pipeline.
    pub fn new(
        model: Arc<dyn PipelineModel>,
        data: Dataset,
        pipeline: PipelineConfig,
        options: TrainOptions,
    ) -> Result<Self, Error> {
        if options.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        if options.batch_size % pipeline.microbatches.max(1) != 0 {
            return Err(Error::Config(format!(
                "batch size {} is not divisible by {} micro-batches",
                options.batch_size, pipeline.microbatches
            )));
        }
        let context = match (&data, model.input()) {
            (Dataset::Tokens(tokens), InputKind::Tokens { vocab, context }) => {
                let ctx = options.context.unwrap_or(context);
                if ctx > context {
                    return Err(Error::Config(format!(
                        "context {ctx} exceeds the model's context of {context}"
                    )));
                }
                tokens.check_vocab(vocab)?;
                tokens.check_context(ctx)?;
                ctx
            }
            (Dataset::Images(images), InputKind::Images { channels }) => {
                images.check_model(channels, model.num_classes())?;
                0
            }
            (Dataset::Tokens(_), InputKind::Images { .. }) => {
                return Err(Error::Config(format!("{} is an image model but the data is text/tokens", model.name())))
            }
            (Dataset::Images(_), InputKind::Tokens { .. }) => {
                return Err(Error::Config(format!("{} is a language model but the data is images", model.name())))
            }
        };
        let pipeline = Pipeline::new(model.as_ref(), pipeline)?;
        Ok(Self { pipeline, data, options, context, device: Device::Cpu })
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
        Ok(self.pipeline.train_step(&x, &y)?)
    }

    /// Loss (and accuracy) on the validation split.
    pub fn evaluate(&mut self) -> Result<EvalStats, Error> {
        let batches: Vec<_> = match &self.data {
            Dataset::Tokens(d) => d
                .eval_batches(
                    Split::Validation,
                    self.options.eval_batches,
                    self.options.batch_size,
                    self.context,
                    &self.device,
                )?
                .collect::<Result<_, _>>()?,
            Dataset::Images(d) => d
                .eval_batches(Split::Validation, self.options.batch_size, &self.device)?
                .take(self.options.eval_batches.max(1))
                .collect::<Result<_, _>>()?,
        };
        let (mut loss_sum, mut correct, mut terms) = (0.0, 0, 0);
        for (x, y) in batches {
            let s = self.pipeline.evaluate(&x, &y)?;
            loss_sum += s.loss * s.terms as f64;
            correct += s.correct;
            terms += s.terms;
        }
        Ok(EvalStats { loss: loss_sum / terms.max(1) as f64, correct, terms })
    }

    /// Trains for `options.steps` steps, reporting progress to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<Summary, Error> {
        let started = Instant::now();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let mut final_eval = None;
        let start = self.pipeline.steps_taken();
        let mut busy = vec![Duration::ZERO; self.pipeline.partition().stages()];
        let mut step_time = Duration::ZERO;
        let mut step_times = Vec::new();
        for _ in start..self.options.steps {
            let stats = self.step()?;
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
            on_event(&Event::Step { stats, items_per_sec });
            let every = self.options.eval_every;
            if every > 0 && (step % every == 0 || step == self.options.steps) {
                let stats = self.evaluate()?;
                final_eval = Some(stats);
                on_event(&Event::Eval { step, stats });
            }
        }
        Ok(Summary {
            steps: self.pipeline.steps_taken(),
            first_loss,
            last_loss,
            final_eval,
            wall: started.elapsed(),
            stage_utilization: busy.iter().map(|b| b.as_secs_f64() / step_time.as_secs_f64().max(1e-9)).collect(),
            median_step: {
                step_times.sort();
                step_times.get(step_times.len() / 2).copied().unwrap_or_default()
            },
        })
    }
}
