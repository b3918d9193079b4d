//! A user-defined regression model trained on 2 pipeline stages, with a chart of its loss.
//!
//! Four autograd layers built from candle-nn modules (a residual block with a skip connection
//! inside it), mean squared error on synthetic data (`y = sin(x · w)` for a fixed random `w`),
//! 1F1B over 2 stages and 4 micro-batches. The loss chart goes to `target/custom_mlp.{svg,png}`.
//!
//! ```text
//! cargo run --release --example custom_mlp -- --steps 200
//! # your own data: a safetensors file with f32 `inputs` (N, 8) and `targets` (N, 2); the last
//! # 64 rows are held out
//! cargo run --release --example custom_mlp -- --steps 200 --data regression.safetensors
//! ```
//!
//! (`brigade train` trains the built-in presets only; a model of your own trains through the
//! Rust API, as here.)

use brigade::candle_nn;
use brigade::engine::custom::layer_norm;
use brigade::metrics::{Run, RunInfo, StepRecord};
use brigade::prelude::*;

const FEATURES: usize = 8;
const WIDTH: usize = 32;

const BATCH: usize = 64;

/// The value of `--name`, if given.
fn arg(name: &str) -> anyhow::Result<Option<String>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(Some(args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?.clone())),
        None => Ok(None),
    }
}

/// Features and targets from a safetensors file: f32 `inputs` `(N, FEATURES)` and `targets`
/// `(N, 2)`, at least two batches of rows.
fn load_features(path: &str) -> anyhow::Result<(Tensor, Tensor)> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut take = |name: &str, width: usize| -> anyhow::Result<Tensor> {
        let t = tensors.remove(name).ok_or_else(|| anyhow::anyhow!("{path} has no tensor `{name}`"))?;
        if t.dtype() != DType::F32 || t.rank() != 2 || t.dim(1)? != width {
            anyhow::bail!("{path}: `{name}` must be f32 of shape (N, {width}), not {:?} {:?}", t.dtype(), t.dims());
        }
        Ok(t)
    };
    let (inputs, targets) = (take("inputs", FEATURES)?, take("targets", 2)?);
    if inputs.dim(0)? != targets.dim(0)? || inputs.dim(0)? < 2 * BATCH {
        anyhow::bail!("{path}: `inputs` and `targets` need the same number of rows, at least {}", 2 * BATCH);
    }
    Ok((inputs, targets))
}

/// Batch `step` of the file's training rows (all but the last `BATCH`), cycling through them.
fn file_batch(data: &(Tensor, Tensor), step: u64) -> anyhow::Result<(Tensor, Tensor)> {
    let batches = (data.0.dim(0)? - BATCH) / BATCH;
    let start = (step as usize % batches) * BATCH;
    Ok((data.0.narrow(0, start, BATCH)?, data.1.narrow(0, start, BATCH)?))
}

/// A batch of the synthetic task: `x` uniform-ish in [-1, 1], `y = sin(3 · x · w)`.
fn batch(step: u64, size: usize, w: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
    // A small integer hash of (step, index), mapped to [-1, 1).
    let x: Vec<f32> = (0..size * FEATURES)
        .map(|i| {
            let k = (step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (k >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let x = Tensor::from_vec(x, (size, FEATURES), &Device::Cpu)?;
    let y = (x.matmul(w)? * 3.0)?.sin()?;
    Ok((x, y))
}

fn main() -> anyhow::Result<()> {
    let steps: u64 = arg("--steps")?.map(|s| s.parse()).transpose()?.unwrap_or(100);
    let file = arg("--data")?.map(|path| load_features(&path)).transpose()?;
    let model = Sequential::new("custom-mlp")
        .layer("input", |vb| {
            let fc = candle_nn::linear(FEATURES, WIDTH, vb)?;
            Ok(move |x: &Tensor| fc.forward(x)?.gelu_erf())
        })
        .layer("block0", residual_block)
        .layer("block1", residual_block)
        .layer("output", |vb| candle_nn::linear(WIDTH, 2, vb))
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![FEATURES] })
        .build()?;
    let config = PipelineConfig::default()
        .stages(2)
        .schedule(ScheduleKind::OneFOneB)
        .microbatches(4)
        .optimizer(OptimizerConfig::adamw())
        .lr(LrSchedule::warmup_cosine(3e-3, 5, steps.max(6), 3e-4));
    let mut pipeline = Pipeline::new(&model, config)?;
    let w = Tensor::from_vec(
        (0..FEATURES * 2).map(|i| ((i * 7 % 5) as f32 - 2.0) / 4.0).collect(),
        (FEATURES, 2),
        &Device::Cpu,
    )?;

    let mut records = Vec::new();
    for step in 0..steps {
        let (x, y) = match &file {
            Some(data) => file_batch(data, step)?,
            None => batch(step, BATCH, &w)?,
        };
        let stats = pipeline.train_step(&x, &y)?;
        if step % 10 == 0 || step + 1 == steps {
            println!("step {step}: loss {:.4}", stats.loss);
        }
        records.push(StepRecord {
            step,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            items_per_sec: BATCH as f64 / stats.elapsed.as_secs_f64(),
            step_seconds: stats.elapsed.as_secs_f64(),
            data_seconds: 0.0,
            stage_utilization: Vec::new(),
        });
    }
    let (x, y) = match &file {
        Some((inputs, targets)) => {
            let rows = inputs.dim(0)?;
            (inputs.narrow(0, rows - BATCH, BATCH)?, targets.narrow(0, rows - BATCH, BATCH)?)
        }
        None => batch(1 << 20, BATCH, &w)?,
    };
    println!("held-out loss {:.4}", pipeline.evaluate(&x, &y)?.loss);

    let run = Run {
        path: "custom_mlp".into(),
        info: RunInfo {
            label: "custom-mlp, 2 stages, 1F1B".into(),
            model: model.name(),
            stages: 2,
            schedule: "1f1b".into(),
            microbatches: 4,
            batch_size: BATCH,
            unit: "ex/s".into(),
            ..RunInfo::default()
        },
        steps: records,
        evals: Vec::new(),
    };
    let plotted = brigade::plot::plot(&[run], std::path::Path::new("target/custom_mlp"), 5)?;
    println!("loss chart: {} and {}", plotted.svg.display(), plotted.png.display());
    Ok(())
}

/// `x + fc2(gelu(fc1(norm(x))))`: the skip connection lives inside the layer.
fn residual_block(vb: VarBuilder) -> candle_core::Result<impl Module> {
    let norm = layer_norm(WIDTH, 1e-5, vb.pp("norm"))?;
    let fc1 = candle_nn::linear(WIDTH, 2 * WIDTH, vb.pp("fc1"))?;
    let fc2 = candle_nn::linear(2 * WIDTH, WIDTH, vb.pp("fc2"))?;
    Ok(move |x: &Tensor| x + fc2.forward(&fc1.forward(&norm.forward(x)?)?.gelu_erf()?)?)
}
