//! The README's Rust API example (GPT on 2 stages, 1F1B), extended with a checkpoint: train,
//! save, resume on another layout (GPipe, 4 micro-batches), and check that the resumed run
//! continues exactly where the first left off.
//!
//! ```text
//! cargo run --release --example gpt_from_rust -- --steps 20
//! ```

use brigade::prelude::*;

fn steps_from_args() -> anyhow::Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--steps") {
        Some(i) => Ok(args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--steps needs a number"))?.parse()?),
        None => Ok(10),
    }
}

fn main() -> anyhow::Result<()> {
    let steps = steps_from_args()?.max(2);
    // A model is an ordered list of layers; presets use Hugging Face / torchvision names.
    let model = brigade::models::preset("gpt-tiny")?;
    let data = TokenDataset::embedded(0);

    // 2 stages (one thread each), 1F1B, 4 micro-batches per global batch.
    let config = PipelineConfig::default()
        .stages(2)
        .schedule(ScheduleKind::OneFOneB)
        .microbatches(4)
        .optimizer(OptimizerConfig::adamw())
        .lr(LrSchedule::warmup_cosine(3e-3, 2, steps, 3e-4));
    let options = TrainOptions {
        batch_size: 8,
        steps,
        eval_every: 0,
        eval_batches: 1,
        data_seed: 0,
        context: Some(64),
        checkpoints: None,
    };

    // The whole run, uninterrupted, for comparison.
    let mut whole = Trainer::new(model.clone(), Dataset::Tokens(data.clone()), config.clone(), options.clone())?;
    let uninterrupted: Vec<f64> = (0..steps).map(|_| whole.step().map(|s| s.loss)).collect::<Result<_, _>>()?;
    drop(whole);

    // The first half, then a checkpoint.
    let half = steps / 2;
    let mut first =
        Trainer::new(model, Dataset::Tokens(data.clone()), config, TrainOptions { steps: half, ..options.clone() })?;
    for step in 0..half {
        let stats = first.step()?;
        println!("step {step}: loss {:.3}, grad norm {:.3}", stats.loss, stats.grad_norm);
    }
    // Weights come back under their canonical names, e.g. "transformer.h.0.attn.c_attn.weight".
    assert!(first.pipeline().parameters()?.contains_key("transformer.wte.weight"));
    let dir = std::env::temp_dir().join(format!("brigade-gpt-from-rust-{}", std::process::id()));
    let saved = first.save_checkpoint(&dir, 2_000_000_000)?;
    println!("saved a checkpoint of step {half} to {}", dir.display());
    let _ = saved;
    drop(first);

    // Resume on another layout: GPipe this time, same micro-batches. The model, weights,
    // optimizer state, learning-rate schedule and data order come from the checkpoint.
    let layout = PipelineConfig::default().stages(2).schedule(ScheduleKind::GPipe).microbatches(4);
    let mut resumed = Trainer::resume(&dir, Dataset::Tokens(data.clone()), layout, options)?;
    for step in half..steps {
        let stats = resumed.step()?;
        println!("step {step} (resumed): loss {:.3}", stats.loss);
        let want = uninterrupted[step as usize];
        if ((stats.loss - want) / want).abs() > 1e-4 {
            anyhow::bail!("resumed step {step} has loss {} but the uninterrupted run had {want}", stats.loss);
        }
    }
    let (x, y) = data.batch(Split::Validation, 0, 8, 64, 0, &Device::Cpu)?;
    println!("held-out loss {:.3}", resumed.pipeline().evaluate(&x, &y)?.loss);
    std::fs::remove_dir_all(&dir)?;
    println!("the resumed run matches the uninterrupted one");
    Ok(())
}
