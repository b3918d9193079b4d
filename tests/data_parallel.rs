//! Data parallel × pipeline parallel in one process (`PipelineConfig::data_parallel`): D
//! replicas of the pipeline, each on its slice of the global batch, train exactly like the
//! single-device reference on the whole batch, and stay bit-identical to each other.
//!
//! The reference accumulates the same D × m micro-batches one after the other (replica r's
//! slice is micro-batches r·m .. (r+1)·m), which is what BatchNorm's per-micro-batch statistics
//! need. Losses and every gradient are compared tensor by tensor at every step, and the final
//! weights (AdamW's as one vector; see tests/exactness.rs for why) at 1e-5. BatchNorm running
//! statistics are not compared: each replica keeps its own (replica 0's are the run's, as with
//! DDP), which the reference, seeing every micro-batch in turn, cannot reproduce.

use std::collections::BTreeMap;

use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::testing::{inject_fault, Fault, FaultKind};
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::reference::ReferenceTrainer;
use brigade::engine::schedule::{Action, ScheduleKind};
use brigade::engine::{EngineError, PipelineModel};
use brigade::models::data::{ImageDataset, Split, TokenDataset};
use brigade::models::resnet::BlockKind;
use brigade::models::{Gpt, GptConfig, ResNet, ResNetConfig};
use brigade::train::{Dataset, TrainOptions, Trainer};
use candle_core::{DType, Device, Tensor};

const STEPS: u64 = 2;
const TOLERANCE: f64 = 1e-5;

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap().max(1e-6);
    diff / scale
}

fn assert_close(what: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: names differ");
    for (name, w) in want {
        let e = rel_err(&got[name], w);
        assert!(e <= TOLERANCE, "{what}: {name} off by {e:e}");
    }
}

/// ‖a − b‖₂ / ‖b‖₂ over every tensor together.
fn global_rel_err(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (name, w) in want {
        let w = w.to_dtype(DType::F64).unwrap();
        let g = got[name].to_dtype(DType::F64).unwrap();
        diff += (&g - &w).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        norm += w.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// Every replica's weights equal replica 0's, bit for bit.
fn assert_replicas_identical(what: &str, pipe: &mut Pipeline) {
    let replicas = pipe.replica_parameters().unwrap();
    assert_eq!(replicas.len(), pipe.data_parallel(), "{what}: one parameter set per replica");
    for (r, params) in replicas.iter().enumerate().skip(1) {
        assert_eq!(params.keys().collect::<Vec<_>>(), replicas[0].keys().collect::<Vec<_>>(), "{what}");
        for (name, w) in &replicas[0] {
            let a = params[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}: replica {r}'s {name} differs from replica 0's");
        }
    }
}

/// nanoGPT's AdamW with `eps` 1e-5 (tests/exactness.rs explains why).
fn adamw() -> OptimizerConfig {
    match OptimizerConfig::adamw() {
        OptimizerConfig::AdamW { beta1, beta2, weight_decay, .. } => {
            OptimizerConfig::AdamW { beta1, beta2, eps: 1e-5, weight_decay }
        }
        other => other,
    }
}

fn config(replicas: usize, stages: usize, kind: ScheduleKind, m: usize, optimizer: OptimizerConfig) -> PipelineConfig {
    PipelineConfig::default()
        .data_parallel(replicas)
        .stages(stages)
        .schedule(kind)
        .microbatches(m)
        .optimizer(optimizer)
        .lr(LrSchedule::warmup_cosine(2e-2, 1, 3, 1e-3))
        .grad_clip(Some(1.0))
        .threads_per_stage(1)
        .seed(3)
}

/// embedding, 2 blocks, head: 4 layers, enough for 2 devices x 2 chunks.
fn tiny_gpt() -> Gpt {
    Gpt::new(GptConfig::custom(48, 16, 16, 2, 2).unwrap()).unwrap()
}

fn tiny_resnet() -> ResNet {
    ResNet::new(ResNetConfig::custom(BlockKind::BasicBlock, [1, 1, 1, 1], 4, 10).unwrap()).unwrap()
}

/// Token batches folded into the test vocabulary (48).
fn gpt_batch(step: u64, size: usize) -> (Tensor, Tensor) {
    let data = TokenDataset::embedded_with_len(1, 20_000);
    let (x, y) = data.batch(Split::Train, step, size, 12, 9, &Device::Cpu).unwrap();
    let fold = |t: Tensor| (t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap(), t.dims().to_vec());
    let fold = |t: Tensor| {
        let (rows, dims) = fold(t);
        let flat: Vec<u32> = rows.into_iter().flatten().map(|v| v % 48).collect();
        Tensor::from_vec(flat, dims, &Device::Cpu).unwrap()
    };
    (fold(x), fold(y))
}

/// 48×48 images, as in tests/exactness.rs: layer4's BatchNorm then sees more than two values
/// per channel in a micro-batch of 2 (with two, its true input gradient is zero and only
/// rounding noise is compared).
fn resnet_batch(step: u64, size: usize) -> (Tensor, Tensor) {
    let data = ImageDataset::embedded_shapes(64, 8, 48, 5).unwrap();
    data.batch(Split::Train, step, size, 4, &Device::Cpu).unwrap()
}

/// Trains `cfg` for [`STEPS`] steps beside the reference on the same global batches
/// (`per_microbatch` examples per micro-batch) and compares losses, gradients and weights;
/// checks that the replicas stay bit-identical.
fn check_against_reference(
    model: &dyn PipelineModel,
    cfg: PipelineConfig,
    per_microbatch: usize,
    batch: fn(u64, usize) -> (Tensor, Tensor),
) {
    let what =
        format!("{} D={} p={} {:?} m={}", model.name(), cfg.data_parallel, cfg.stages, cfg.schedule, cfg.microbatches);
    let parts = cfg.data_parallel * cfg.microbatches;
    let optimizer = cfg.optimizer;
    let mut reference = ReferenceTrainer::new(model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
    let mut pipe = Pipeline::new(model, cfg).unwrap();
    for step in 0..STEPS {
        let (x, y) = batch(step, parts * per_microbatch);
        let want = reference.train_step(&x, &y, parts).unwrap();
        let got = pipe.train_step(&x, &y).unwrap();
        let rel = ((got.loss - want) / want).abs();
        assert!(rel <= TOLERANCE, "{what} step {step}: loss {} vs {want}", got.loss);
        assert_close(&format!("{what} step {step} gradients"), &pipe.gradients().unwrap(), reference.gradients());
    }
    let weights = pipe.parameters().unwrap();
    if matches!(optimizer, OptimizerConfig::AdamW { .. }) {
        let e = global_rel_err(&weights, &reference.parameters());
        assert!(e <= TOLERANCE, "{what} weights: relative error {e:e}");
    } else {
        assert_close(&format!("{what} weights"), &weights, &reference.parameters());
    }
    assert_replicas_identical(&what, &mut pipe);
}

#[test]
fn gpt_with_adamw_data_parallel_matches_the_reference() {
    let model = tiny_gpt();
    for (replicas, stages, m) in [(2, 2, 2), (2, 1, 2), (4, 1, 1)] {
        check_against_reference(&model, config(replicas, stages, ScheduleKind::OneFOneB, m, adamw()), 2, gpt_batch);
    }
}

#[test]
fn resnet_with_sgd_and_batchnorm_data_parallel_matches_the_reference() {
    let model = tiny_resnet();
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    for (replicas, stages, m) in [(2, 2, 2), (2, 1, 2), (4, 1, 1)] {
        check_against_reference(&model, config(replicas, stages, ScheduleKind::GPipe, m, sgd), 2, resnet_batch);
    }
}

#[test]
fn every_schedule_kind_runs_data_parallel() {
    let model = tiny_gpt();
    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::Interleaved, ScheduleKind::ZbV] {
        check_against_reference(&model, config(2, 2, kind, 2, adamw()), 1, gpt_batch);
    }
    check_against_reference(&model, config(2, 2, ScheduleKind::ZbH1, 3, OptimizerConfig::sgd()), 1, gpt_batch);
}

#[test]
fn a_bad_replica_count_or_batch_is_a_clear_error() {
    let model = tiny_gpt();
    let err = Pipeline::new(&model, config(0, 2, ScheduleKind::OneFOneB, 2, adamw())).unwrap_err();
    assert!(matches!(err, EngineError::Config(_)), "{err}");
    assert!(err.to_string().contains("data-parallel replicas must be at least 1"), "{err}");

    let mut pipe = Pipeline::new(&model, config(2, 2, ScheduleKind::OneFOneB, 2, adamw())).unwrap();
    // 6 sequences: divisible into 2 micro-batches, not into 2 replicas x 2.
    let (x, y) = gpt_batch(0, 6);
    let err = pipe.train_step(&x, &y).unwrap_err();
    assert!(matches!(err, EngineError::Input(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("batch size 6 is not divisible into 2 data-parallel replicas x 2 micro-batches"), "{text}");
    // The refusal stops nothing: a good batch still trains.
    let (x, y) = gpt_batch(0, 8);
    pipe.train_step(&x, &y).unwrap();
}

#[test]
fn a_failing_replica_stops_every_replica_without_hanging() {
    let model = tiny_gpt();
    let mut pipe = Pipeline::new(&model, config(2, 2, ScheduleKind::OneFOneB, 2, adamw())).unwrap();
    // Replica 0's last stage fails at its last backward; replica 1's stages are then waiting
    // for replica 0's gradients and must be woken.
    let fault = Fault { stage: 1, at: Some(Action::backward(1, 1)), kind: FaultKind::Error };
    inject_fault(&mut pipe, fault).unwrap();
    let (x, y) = gpt_batch(0, 8);
    let err = pipe.train_step(&x, &y).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::StageFailed { stage: 1, .. }), "{text}");
    assert!(text.contains("replica 0") && text.contains("injected fault"), "{text}");
    assert!(matches!(pipe.train_step(&x, &y).unwrap_err(), EngineError::Stopped(_)));
}

/// Saved at D = 2, resumed at D = 1: the losses continue like an uninterrupted D = 1 run (a
/// data-parallel checkpoint is the same files as a one-pipeline one).
#[test]
fn a_data_parallel_checkpoint_resumes_on_one_pipeline() {
    let model = || brigade::models::preset("gpt-tiny").unwrap();
    let data = || Dataset::Tokens(TokenDataset::embedded(0));
    let options = |steps| TrainOptions {
        batch_size: 8,
        steps,
        eval_every: 0,
        eval_batches: 1,
        data_seed: 5,
        context: Some(32),
        checkpoints: None,
    };
    let pipeline = |replicas, stages, m| {
        PipelineConfig::default()
            .data_parallel(replicas)
            .stages(stages)
            .schedule(ScheduleKind::OneFOneB)
            .microbatches(m)
            .optimizer(OptimizerConfig::adamw())
            .lr(LrSchedule::warmup_cosine(1e-2, 2, 6, 1e-3))
            .grad_clip(Some(1.0))
            .threads_per_stage(1)
            .seed(7)
    };
    let dir = std::env::temp_dir().join(format!("brigade-data-parallel-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mut first = Trainer::new(model(), data(), pipeline(2, 2, 2), options(3)).unwrap();
    let mut losses: Vec<f64> = (0..3).map(|_| first.step().unwrap().loss).collect();
    first.save_checkpoint(&dir, 2_000_000_000).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, data(), pipeline(1, 2, 4), options(6)).unwrap();
    assert_eq!(resumed.pipeline().steps_taken(), 3);
    losses.extend((0..3).map(|_| resumed.step().unwrap().loss));

    let mut whole = Trainer::new(model(), data(), pipeline(1, 2, 4), options(6)).unwrap();
    for (i, got) in losses.iter().enumerate() {
        let want = whole.step().unwrap().loss;
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "loss of step {i}: {got} vs {want}");
    }
    let e = global_rel_err(&resumed.pipeline().parameters().unwrap(), &whole.pipeline().parameters().unwrap());
    assert!(e <= 1e-5, "weights after resume off by {e:e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn brigade(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

#[test]
fn train_takes_data_parallel_and_refuses_bad_counts_in_one_line() {
    for (args, needle) in [
        (vec!["--data-parallel", "0"], "--data-parallel must be at least 1"),
        (
            vec!["--data-parallel", "3", "--microbatches", "2", "--batch-size", "8"],
            "batch size 8 is not divisible by --data-parallel 3 x 2 micro-batches (6)",
        ),
    ] {
        let out = brigade(&[&["train", "--model", "gpt-tiny", "--steps", "1"], args.as_slice()].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.lines().filter(|l| l.starts_with("error:")).count() == 1 && stderr.contains(needle), "{stderr}");
    }
    let out = brigade(&[
        "train",
        "--model",
        "gpt-tiny",
        "--data-parallel",
        "2",
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--batch-size",
        "8",
        "--context",
        "32",
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--plain",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 stages x 2 data-parallel replicas"), "{stdout}");
}
