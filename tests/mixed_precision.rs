//! bf16 mixed precision trains like f32: same start, a loss curve that stays within a stated
//! tolerance of f32's over 100 steps, while the master weights, gradient sums and optimizer
//! step stay f32. Runs on the CPU (candle's CPU backend computes bf16), so it holds the
//! mechanism in CI; the GPU check runs the same comparison on a GPU.
//!
//! Tolerances, measured on this model (2 stages, 1F1B, AdamW at 1e-3): the step-1 losses differ
//! by 1.0e-5 relative (the bf16 rounding of weights and activations); over 100 steps the
//! largest per-step gap was 0.98%. The limits below (1e-3, 3%, and 2% on the mean of the last
//! 10 losses) leave headroom over those numbers; a run that is silently f32 (gap 0) fails too.

mod common;

use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::schedule::ScheduleKind;
use brigade::engine::PipelineModel;
use brigade::models::data::{Split, TokenDataset};
use brigade::models::resnet::BlockKind;
use brigade::models::{Gpt, GptConfig, Llama, LlamaConfig, ResNet, ResNetConfig};
use candle_core::{DType, Device};

const STEPS: u64 = 100;

fn losses(dtype: DType) -> (Vec<f64>, Pipeline) {
    let model = Gpt::new(GptConfig::custom(256, 32, 64, 2, 4).unwrap()).unwrap();
    losses_of(&model, dtype)
}

/// `STEPS` training losses of `model` (2 stages, 1F1B, AdamW at 1e-3) on the embedded corpus.
fn losses_of(model: &dyn PipelineModel, dtype: DType) -> (Vec<f64>, Pipeline) {
    let data = TokenDataset::embedded_with_len(3, 100_000);
    let config = PipelineConfig::default()
        .stages(2)
        .schedule(ScheduleKind::OneFOneB)
        .microbatches(4)
        .optimizer(OptimizerConfig::adamw())
        .lr(LrSchedule::constant(1e-3))
        .threads_per_stage(1)
        .compute_dtype(dtype);
    let mut pipe = Pipeline::new(model, config).unwrap();
    let mut out = Vec::new();
    for step in 0..STEPS {
        let (x, y) = data.batch(Split::Train, step, 8, 32, 0, &Device::Cpu).unwrap();
        out.push(pipe.train_step(&x, &y).unwrap().loss);
    }
    (out, pipe)
}

#[test]
fn bf16_mixed_precision_follows_the_f32_loss_curve() {
    let (f32_losses, _) = losses(DType::F32);
    let (bf16_losses, mut pipe) = losses(DType::BF16);
    common::assert_bf16_follows_f32("bf16 on the CPU", &f32_losses, &bf16_losses);
    let tail_bf16 = bf16_losses[bf16_losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(tail_bf16 < bf16_losses[0] * 0.7, "bf16 did not learn: {} -> {tail_bf16}", bf16_losses[0]);
    // Masters, gradient sums and what checkpoints save stay f32.
    for (name, t) in pipe.parameters().unwrap() {
        assert_eq!(t.dtype(), DType::F32, "parameter {name}");
    }
    for (name, t) in pipe.gradients().unwrap() {
        assert_eq!(t.dtype(), DType::F32, "gradient {name}");
    }
}

/// The Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU) in bf16: `llama-tiny`
/// (2 blocks, width 64, 4 heads over 2 kv heads) follows its f32 curve within 1% at every one of
/// the 100 steps, the bound the Llama issue sets, on top of the shared checks. Measured: step-1
/// gap 2.6e-5 relative, largest gap over the 100 steps 5.6e-4 (0.06%).
#[test]
fn bf16_llama_follows_the_f32_loss_curve_within_one_percent() {
    let model = || Llama::new(LlamaConfig::preset("llama-tiny").unwrap()).unwrap();
    let (f32_losses, _) = losses_of(&model(), DType::F32);
    let (bf16_losses, mut pipe) = losses_of(&model(), DType::BF16);
    let gaps = common::assert_bf16_follows_f32("llama-tiny bf16 on the CPU", &f32_losses, &bf16_losses);
    let (step, worst) = gaps.iter().enumerate().fold((0, 0.0), |a, (i, &g)| if g > a.1 { (i, g) } else { a });
    assert!(worst < 0.01, "step {}: f32 {} vs bf16 {} ({worst:.4})", step + 1, f32_losses[step], bf16_losses[step]);
    let tail_bf16 = bf16_losses[bf16_losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(tail_bf16 < bf16_losses[0] * 0.7, "bf16 did not learn: {} -> {tail_bf16}", bf16_losses[0]);
    for (name, t) in pipe.parameters().unwrap() {
        assert_eq!(t.dtype(), DType::F32, "parameter {name}");
    }
}

#[test]
fn an_unsupported_compute_dtype_is_a_clear_error() {
    let model = Gpt::new(GptConfig::custom(48, 16, 16, 2, 2).unwrap()).unwrap();
    let err = Pipeline::new(&model, PipelineConfig::default().compute_dtype(DType::U8)).unwrap_err().to_string();
    assert!(err.contains("compute dtype U8") && err.contains("bf16"), "{err}");
    // A model whose layers cannot compute in bf16 yet says so when the pipeline is built.
    let resnet = ResNet::new(ResNetConfig::custom(BlockKind::BasicBlock, [1, 1, 1, 1], 4, 10).unwrap()).unwrap();
    let err = Pipeline::new(&resnet, PipelineConfig::default().compute_dtype(DType::BF16)).unwrap_err().to_string();
    assert!(err.contains("cannot train in BF16 mixed precision") && err.contains("BatchNorm"), "{err}");
}
