//! Stages on a CUDA GPU train like single-device training on the same GPU, like the CPU, and
//! in bf16 like f32. Needs a build with `--features cuda` and a GPU: elsewhere every test here
//! prints why it did not run (`SKIPPED: ...`) and checks nothing else, never a silent pass
//! (`benches/gpu-check.sh` runs them on the lent GPU machine and fails on a skip).
//!
//! Tolerances: pipeline vs one stage on the same GPU, f32: 1e-5 relative, as on the CPU (the
//! same kernels in the same order, so only the micro-batch summation order differs). GPU vs
//! CPU, f32: 1e-3 relative on losses and weights after 3 AdamW steps (cuBLAS and brigade's
//! CUDA kernels sum in another order than the CPU's kernels). bf16 vs f32 on the GPU: as the
//! CPU test (tests/mixed_precision.rs): step 1 within 1e-3, every step within 3%, the mean of
//! the last 10 of 100 within 2%.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::{Pipeline, PipelineConfig, ScheduleChoice};
use brigade::engine::schedule::ScheduleKind;
use brigade::engine::StageDevice;
use brigade::models::data::{Split, TokenDataset};
use brigade::models::{Gpt, GptConfig};
use candle_core::{DType, Device, Tensor};

/// The GPU, or `None` after printing why there is none. The reason goes straight to the
/// process's stderr, past the test harness's capture, so a skip shows in every run's output.
fn gpu(test: &str) -> Option<StageDevice> {
    let why = match brigade::engine::device::cuda_device_count() {
        Ok(_) => match StageDevice::Cuda(0).open() {
            Ok(_) => return Some(StageDevice::Cuda(0)),
            Err(e) => format!("cuda:0 cannot be opened: {e}"),
        },
        Err(e) => e.to_string(),
    };
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

fn model() -> Gpt {
    Gpt::new(GptConfig::custom(256, 32, 64, 4, 4).unwrap()).unwrap()
}

/// AdamW with eps 1e-5: see tests/exactness.rs (`adamw`) for why exactness checks use it.
fn adamw() -> OptimizerConfig {
    match OptimizerConfig::adamw() {
        OptimizerConfig::AdamW { beta1, beta2, weight_decay, .. } => {
            OptimizerConfig::AdamW { beta1, beta2, eps: 1e-5, weight_decay }
        }
        other => other,
    }
}

struct Run {
    losses: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn train(devices: Vec<StageDevice>, schedule: ScheduleChoice, m: usize, dtype: DType, steps: u64, lr: f64) -> Run {
    let data = TokenDataset::embedded_with_len(3, 100_000);
    let config = PipelineConfig::default()
        .stages(devices.len())
        .schedule(schedule)
        .microbatches(m)
        .optimizer(adamw())
        .lr(LrSchedule::constant(lr))
        .devices(devices)
        .compute_dtype(dtype);
    let mut pipe = Pipeline::new(&model(), config).unwrap();
    let mut losses = Vec::new();
    for step in 0..steps {
        let (x, y) = data.batch(Split::Train, step, 8, 32, 0, &Device::Cpu).unwrap();
        losses.push(pipe.train_step(&x, &y).unwrap().loss);
    }
    Run { losses, params: pipe.parameters().unwrap() }
}

/// `train` with 1F1B, 4 micro-batches and lr 1e-3.
fn train_1f1b(devices: Vec<StageDevice>, dtype: DType, steps: u64) -> Run {
    train(devices, ScheduleKind::OneFOneB.into(), 4, dtype, steps, 1e-3)
}

/// ‖a − b‖ / ‖b‖ over all parameters together.
fn weights_gap(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, want) in b {
        let got = a[name].to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        let want = want.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        diff += (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        norm += want.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    }
    (diff / norm.max(1e-30)).sqrt()
}

fn losses_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) / y).abs()).fold(0.0, f64::max)
}

#[test]
fn every_schedule_on_one_gpu_trains_like_one_stage_on_it() {
    let Some(gpu) = gpu("every_schedule_on_one_gpu_trains_like_one_stage_on_it") else {
        return;
    };
    let single = train_1f1b(vec![gpu], DType::F32, 3);
    for (name, schedule) in [
        ("gpipe", ScheduleChoice::Kind(ScheduleKind::GPipe)),
        ("1f1b", ScheduleChoice::Kind(ScheduleKind::OneFOneB)),
        ("zb-h1", ScheduleChoice::Kind(ScheduleKind::ZbH1)),
        ("interleaved-1f1b:2", ScheduleChoice::Virtual(ScheduleKind::Interleaved, 2)),
    ] {
        let piped = train(vec![gpu; 2], schedule, 4, DType::F32, 3, 1e-3);
        let (l, w) = (losses_gap(&piped.losses, &single.losses), weights_gap(&piped.params, &single.params));
        eprintln!("{name}: losses {l:.1e}, weights {w:.1e}");
        assert!(l < 1e-5 && w < 1e-5, "{name} on 2 stages of one GPU: losses {l:.2e}, weights {w:.2e}");
    }
}

#[test]
fn the_gpu_trains_like_the_cpu_in_f32() {
    let Some(gpu) = gpu("the_gpu_trains_like_the_cpu_in_f32") else {
        return;
    };
    let on_gpu = train_1f1b(vec![gpu; 2], DType::F32, 3);
    let on_cpu = train_1f1b(vec![StageDevice::Cpu; 2], DType::F32, 3);
    let (l, w) = (losses_gap(&on_gpu.losses, &on_cpu.losses), weights_gap(&on_gpu.params, &on_cpu.params));
    eprintln!("GPU vs CPU: losses {l:.1e}, weights {w:.1e}");
    assert!(l < 1e-3 && w < 1e-3, "GPU vs CPU f32: losses {l:.2e}, weights {w:.2e}");
    // A mixed layout (one stage on each) hands tensors across devices and agrees too.
    let mixed = train_1f1b(vec![StageDevice::Cpu, gpu], DType::F32, 3);
    let (l, w) = (losses_gap(&mixed.losses, &on_cpu.losses), weights_gap(&mixed.params, &on_cpu.params));
    assert!(l < 1e-3 && w < 1e-3, "CPU+GPU stages vs CPU: losses {l:.2e}, weights {w:.2e}");
}

#[test]
fn bf16_on_the_gpu_follows_f32() {
    let Some(gpu) = gpu("bf16_on_the_gpu_follows_f32") else {
        return;
    };
    let f32_run = train_1f1b(vec![gpu; 2], DType::F32, 100);
    let bf16_run = train_1f1b(vec![gpu; 2], DType::BF16, 100);
    common::assert_bf16_follows_f32("bf16 on the GPU", &f32_run.losses, &bf16_run.losses);
    for (name, t) in &bf16_run.params {
        assert_eq!(t.dtype(), DType::F32, "master weight {name}");
    }
}

/// The hand-off race (pipeline::handoff): stage 0 runs long kernels (a wide model, a long
/// sequence) and hands its activation over at once, while stage 1's stream is idle and would
/// copy it at once if nothing made it wait. Without the sender's event the copy reads a
/// half-written buffer; the synchronised run (every stage synchronises after every action, so
/// no hand-off can race) is the reference. The same kernels in the same order, so the two agree
/// to rounding; repeated, because a race shows only sometimes.
#[test]
fn hand_offs_between_gpu_stages_do_not_race() {
    let Some(gpu) = gpu("hand_offs_between_gpu_stages_do_not_race") else {
        return;
    };
    let model = Gpt::new(GptConfig::custom(512, 512, 512, 8, 4).unwrap()).unwrap();
    let data = TokenDataset::embedded_with_len(3, 100_000);
    let run = |sync: bool| {
        let config = PipelineConfig::default()
            .stages(2)
            .schedule(ScheduleKind::OneFOneB)
            .microbatches(4)
            .optimizer(adamw())
            .lr(LrSchedule::constant(1e-3))
            .devices(vec![gpu; 2])
            .sync_each_action(sync);
        let mut pipe = Pipeline::new(&model, config).unwrap();
        let mut losses = Vec::new();
        for step in 0..2 {
            let (x, y) = data.batch(Split::Train, step, 16, 512, 0, &Device::Cpu).unwrap();
            losses.push(pipe.train_step(&x, &y).unwrap().loss);
        }
        Run { losses, params: pipe.parameters().unwrap() }
    };
    let reference = run(true);
    for attempt in 0..5 {
        let raced = run(false);
        let (l, w) = (losses_gap(&raced.losses, &reference.losses), weights_gap(&raced.params, &reference.params));
        eprintln!("attempt {attempt}: losses {l:.1e}, weights {w:.1e}");
        assert!(
            l < 1e-5 && w < 1e-5,
            "attempt {attempt}: unsynchronised vs synchronised: losses {l:.2e}, weights {w:.2e}"
        );
    }
}

/// GPU training takes flash attention by the CPU's rule (`attention_algorithm`): from
/// `FLASH_MIN_SEQUENCE` positions, in f32 and bf16, for head widths the CUDA kernels take; a
/// short sequence or a wider head keeps the materialised probabilities. The flash path's
/// output and input gradient match the materialised path's on the same GPU.
#[test]
fn gpu_attention_takes_flash_from_the_cpu_threshold() {
    use brigade::kernels::{self as k, AttentionSaved};
    let Some(_) = gpu("gpu_attention_takes_flash_from_the_cpu_threshold") else {
        return;
    };
    let dev = Device::new_cuda(0).unwrap();
    let (b, h, d) = (2, 4, 64);
    for dtype in [DType::F32, DType::BF16] {
        let qkv =
            |t: usize, d: usize| Tensor::randn(0f32, 1.0, (b, t, 3 * h * d), &dev).unwrap().to_dtype(dtype).unwrap();
        let long = qkv(k::FLASH_MIN_SEQUENCE, d);
        let (merged, saved) = k::causal_attention_saving(&long, h).unwrap();
        assert!(matches!(saved, AttentionSaved::LogSumExp(_)), "{dtype:?}: T = FLASH_MIN_SEQUENCE takes flash");
        let dy = Tensor::randn(0f32, 1.0, merged.dims(), &dev).unwrap().to_dtype(dtype).unwrap();
        let dqkv = k::causal_attention_saved_backward(&long, &merged, &saved, &dy, h).unwrap();
        let (want, probs) = k::causal_attention(&long, h).unwrap();
        let want_d = k::causal_attention_backward(&long, &probs, &dy, h).unwrap();
        let gap = |a: &Tensor, b: &Tensor| {
            let a = a.to_dtype(DType::F64).unwrap();
            let b = b.to_dtype(DType::F64).unwrap();
            let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        assert!(gap(&merged, &want) < tol, "{dtype:?}: flash vs materialised output {:.2e}", gap(&merged, &want));
        assert!(gap(&dqkv, &want_d) < tol, "{dtype:?}: flash vs materialised dqkv {:.2e}", gap(&dqkv, &want_d));
        let short = qkv(k::FLASH_MIN_SEQUENCE - 1, d);
        assert!(matches!(k::causal_attention_saving(&short, h).unwrap().1, AttentionSaved::Probs(_)));
        let wide = qkv(k::FLASH_MIN_SEQUENCE, 128);
        assert!(matches!(k::causal_attention_saving(&wide, h).unwrap().1, AttentionSaved::Probs(_)));
    }
}
