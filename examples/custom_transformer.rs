//! A small GPT-style transformer written by hand from candle-nn modules (autograd layers),
//! trained on 2 pipeline stages with 1F1B and with GPipe, and optionally timed next to the
//! built-in GPT of the same shape (explicit layers).
//!
//! ```text
//! cargo run --release --example custom_transformer -- --steps 20
//! # step time and peak memory, autograd layers vs the built-in GPT's explicit ones (run each
//! # in its own process so the peak resident memory is its own):
//! cargo run --release --example custom_transformer -- --steps 20 --only custom
//! cargo run --release --example custom_transformer -- --steps 20 --only gpt
//! ```
//!
//! Layers: `embed` (token and position embeddings), `h.0` .. `h.{L-1}` (pre-norm attention and
//! MLP blocks with residual connections inside the layer), `head` (final norm and the output
//! projection, tied to the token embedding by name across stages).

use std::time::{Duration, Instant};

use brigade::candle_nn::{self, ops::softmax};
use brigade::engine::custom::layer_norm;
use brigade::models::{Gpt, GptConfig};
use brigade::prelude::*;
use candle_core::D;

const VOCAB: usize = 256;
const CONTEXT: usize = 64;
const EMBD: usize = 64;
const HEADS: usize = 4;
const LAYERS: usize = 4;
const BATCH: usize = 8;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn transformer() -> candle_core::Result<SequentialModel> {
    let mut model = Sequential::new("custom-transformer").layer("embed", |vb| {
        let wte = candle_nn::Embedding::new(token_embedding(&vb)?, EMBD);
        let wpe = candle_nn::Embedding::new(vb.get_with_hints((CONTEXT, EMBD), "wpe.weight", GPT_INIT)?, EMBD);
        Ok(move |ids: &Tensor| {
            let positions = Tensor::arange(0u32, ids.dim(1)? as u32, ids.device())?;
            wte.forward(ids)?.broadcast_add(&wpe.forward(&positions)?)
        })
    });
    for i in 0..LAYERS {
        model = model.layer(format!("h.{i}"), block);
    }
    model
        .layer("head", |vb| {
            let norm = layer_norm(EMBD, 1e-5, vb.pp("ln_f"))?;
            // The token embedding, tied by its full name (held by both end stages).
            let wte = token_embedding(&vb)?;
            Ok(move |h: &Tensor| norm.forward(h)?.broadcast_matmul(&wte.t()?))
        })
        .loss(LossKind::CrossEntropy)
        .input(InputKind::Tokens { vocab: VOCAB, context: CONTEXT })
        .build()
}

/// GPT-2's initialisation (candle-nn's embedding default, a unit normal, would start a tied
/// head with huge logits).
const GPT_INIT: candle_nn::Init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };

/// The token embedding `wte.weight`, outside the layer's prefix so the head can share it.
fn token_embedding(vb: &VarBuilder) -> candle_core::Result<Tensor> {
    vb.root().get_with_hints((VOCAB, EMBD), "wte.weight", GPT_INIT)
}

/// A pre-norm transformer block: `x + attn(ln1(x))`, then `+ mlp(ln2(.))`.
///
/// # Shapes
/// `(B, T, C)` in and out.
fn block(vb: VarBuilder) -> candle_core::Result<impl Module> {
    let ln1 = layer_norm(EMBD, 1e-5, vb.pp("ln_1"))?;
    let qkv = candle_nn::linear(EMBD, 3 * EMBD, vb.pp("attn.c_attn"))?;
    let proj = candle_nn::linear(EMBD, EMBD, vb.pp("attn.c_proj"))?;
    let ln2 = layer_norm(EMBD, 1e-5, vb.pp("ln_2"))?;
    let fc = candle_nn::linear(EMBD, 4 * EMBD, vb.pp("mlp.c_fc"))?;
    let out = candle_nn::linear(4 * EMBD, EMBD, vb.pp("mlp.c_proj"))?;
    Ok(move |x: &Tensor| {
        let (b, t, c) = x.dims3()?;
        let hd = c / HEADS;
        let heads = |z: Tensor| z.reshape((b, t, HEADS, hd))?.transpose(1, 2)?.contiguous();
        let qkv = qkv.forward(&ln1.forward(x)?)?;
        let q = heads(qkv.narrow(2, 0, c)?)?;
        let k = heads(qkv.narrow(2, c, c)?)?;
        let v = heads(qkv.narrow(2, 2 * c, c)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        // Causal mask: -inf above the diagonal. softmax (not softmax_last_dim, which has no
        // backward) keeps the graph whole.
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device())?;
        let att = softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let x = (x + proj.forward(&y)?)?;
        let m = out.forward(&fc.forward(&ln2.forward(&x)?)?.gelu()?)?;
        x + m
    })
}

/// Trains `model` for `steps` steps on 2 stages; returns the mean step time after the first
/// and each stage's most bytes of activations kept for backward steps at once.
fn train(
    model: &dyn PipelineModel,
    kind: ScheduleKind,
    steps: u64,
    data: &TokenDataset,
) -> anyhow::Result<(Duration, Vec<u64>)> {
    let config = PipelineConfig::default()
        .stages(2)
        .schedule(kind)
        .microbatches(4)
        .optimizer(OptimizerConfig::adamw())
        .lr(LrSchedule::warmup_cosine(3e-3, 2, steps.max(3), 3e-4))
        .seed(0);
    let mut pipeline = Pipeline::new(model, config)?;
    let mut timed = Duration::ZERO;
    let mut peak_stash = vec![0u64; 2];
    for step in 0..steps {
        let (x, y) = data.batch(Split::Train, step, BATCH, CONTEXT, 0, &Device::Cpu)?;
        let started = Instant::now();
        let stats = pipeline.train_step(&x, &y)?;
        if step > 0 {
            timed += started.elapsed();
        }
        for (peak, &bytes) in peak_stash.iter_mut().zip(&stats.peak_stash_bytes) {
            *peak = (*peak).max(bytes);
        }
        if step % 5 == 0 || step + 1 == steps {
            println!("  {} {kind} step {step}: loss {:.3}", model.name(), stats.loss);
        }
    }
    let (x, y) = data.batch(Split::Validation, 0, BATCH, CONTEXT, 0, &Device::Cpu)?;
    println!("  {} {kind}: held-out loss {:.3}", model.name(), pipeline.evaluate(&x, &y)?.loss);
    Ok((timed / (steps.saturating_sub(1).max(1) as u32), peak_stash))
}

/// Peak resident memory of this process (Linux), for the comparison.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let steps: u64 = arg("--steps").map(|s| s.parse()).transpose()?.unwrap_or(20);
    let only = arg("--only");
    let data = TokenDataset::embedded(0);
    let custom = transformer()?;
    let gpt = Gpt::new(GptConfig::custom(VOCAB, CONTEXT, EMBD, LAYERS, HEADS)?)?;
    let models: Vec<&dyn PipelineModel> = match only.as_deref() {
        None => vec![&custom],
        Some("custom") => vec![&custom],
        Some("gpt") => vec![&gpt],
        Some(other) => anyhow::bail!("--only takes custom or gpt, not {other}"),
    };
    for model in models {
        println!(
            "{}: {} parameters, 2 stages, 4 micro-batches of {} sequences",
            model.name(),
            model.num_params(),
            BATCH / 4
        );
        let kinds: &[ScheduleKind] =
            if only.is_some() { &[ScheduleKind::OneFOneB] } else { &[ScheduleKind::OneFOneB, ScheduleKind::GPipe] };
        for &kind in kinds {
            let (step, peak_stash) = train(model, kind, steps, &data)?;
            let stash: Vec<String> =
                peak_stash.iter().map(|b| format!("{:.2}", *b as f64 / (1 << 20) as f64)).collect();
            println!(
                "  {} {kind}: {:.1} ms per step, peak stash per stage {} MiB",
                model.name(),
                step.as_secs_f64() * 1e3,
                stash.join(" / ")
            );
        }
    }
    if let Some(rss) = peak_rss_mib() {
        println!("peak resident memory: {rss:.0} MiB");
    }
    Ok(())
}
