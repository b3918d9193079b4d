//! Every schedule and every stage layout trains exactly like plain single-device training.
//!
//! For GPT, Llama and ResNet, GPipe and 1F1B, p in {1, 2, 3, 4} stages and m in {1, p, 2p+1}
//! micro-batches: k optimizer steps on the pipeline give the same losses, gradients, weights
//! (and BatchNorm running statistics) as the single-device reference, to 1e-5 relative in f32.
//!
//! Two references are used:
//! - *Full batch*: one forward/backward over the whole batch. This proves results do not depend
//!   on m at all. It is used with SGD: AdamW divides each gradient by its own running RMS, so a
//!   parameter whose true gradient is exactly zero (GPT's key bias: softmax ignores a constant
//!   shift) gets a full-size step from ~1e-10 float noise, and the noise of a different
//!   summation order then shows up as a 1e-4 weight difference that says nothing about the
//!   pipeline.
//! - *Accumulating*: the same m micro-batches, one after the other on one device, gradients
//!   summed. This is what BatchNorm requires (it normalises with each micro-batch's statistics)
//!   and what AdamW is checked against.
//!
//! Losses, every gradient at every step, BatchNorm buffers and SGD weights are compared tensor
//! by tensor (max |a − b| / max |b| ≤ 1e-5). AdamW weights are compared as one vector
//! (‖Δ‖₂ / ‖W‖₂ ≤ 1e-5): per tensor, parameters whose gradient is (near) zero would measure
//! Adam's noise amplification, not the pipeline. For the same reason AdamW runs here with
//! `eps` 1e-5 (see [`adamw`]): the pipeline's fused attention sums in another order than the
//! reference's composition, so their float noise differs.

use std::collections::BTreeMap;

use brigade::engine::compute::Recompute;
use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::reference::ReferenceTrainer;
use brigade::engine::schedule::{v_shape, Action, ActionKind, GreedyCosts, Schedule, ScheduleKind};
use brigade::engine::PipelineModel;
use brigade::models::data::{ImageDataset, Split, TokenDataset};
use brigade::models::resnet::BlockKind;
use brigade::models::{Gpt, GptConfig, Llama, LlamaConfig, ResNet, ResNetConfig};
use candle_core::{Device, Tensor};

const STEPS: u64 = 2;
const TOLERANCE: f32 = 1e-5;

/// max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries don't blow up.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

fn assert_close(what: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: names differ");
    for (name, w) in want {
        let e = rel_err(&got[name], w);
        assert!(e <= TOLERANCE, "{what}: {name} off by {e:e}");
    }
}

/// ‖a − b‖₂ / ‖b‖₂ over every tensor of a model together.
fn global_rel_err(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (name, w) in want {
        let w = w.to_dtype(candle_core::DType::F64).unwrap();
        let g = got[name].to_dtype(candle_core::DType::F64).unwrap();
        diff += (&g - &w).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        norm += w.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    }
    (diff / norm.max(1e-30)).sqrt()
}

fn config(stages: usize, kind: ScheduleKind, m: usize, optimizer: OptimizerConfig) -> PipelineConfig {
    PipelineConfig::default()
        .stages(stages)
        .schedule(kind)
        .microbatches(m)
        .optimizer(optimizer)
        .lr(LrSchedule::warmup_cosine(2e-2, 1, 3, 1e-3))
        .grad_clip(Some(1.0))
        .threads_per_stage(1)
        .seed(3)
}

/// Runs every schedule × stages × micro-batch combination for `model` and compares with the
/// reference. `batch(step, size)` gives the global batch; `accumulate` says whether the
/// reference must process the micro-batches one by one (BatchNorm).
fn check_all_layouts(
    model: &dyn PipelineModel,
    optimizer: OptimizerConfig,
    per_microbatch: usize,
    accumulate: bool,
    batch: impl Fn(u64, usize) -> (Tensor, Tensor),
) {
    let variants = [ScheduleKind::GPipe, ScheduleKind::OneFOneB].map(|kind| Variant {
        name: kind.to_string(),
        schedule: Box::new(move |p, m| kind.build(p, m).unwrap()),
        recompute: Recompute::Off,
    });
    check_layouts(model, optimizer, per_microbatch, accumulate, &batch, &variants, &[1, 2, 3, 4]);
}

/// A schedule to check (built for stages and micro-batches) and the recomputation setting.
struct Variant {
    name: String,
    schedule: Box<dyn Fn(usize, usize) -> Schedule>,
    recompute: Recompute,
}

/// 1F1B with each backward split into `I` then `W`, every `W` deferred by `lag` actions of its
/// stage (to the stage's end for `usize::MAX`): weight steps run apart from, and after, the
/// input-gradient steps, as zero-bubble schedules run them.
fn split_one_f_one_b(stages: usize, m: usize, lag: usize) -> Schedule {
    let base = Schedule::one_f_one_b(stages, m).unwrap();
    let actions = (0..stages)
        .map(|s| {
            let mut out: Vec<Action> = Vec::new();
            let mut waiting: Vec<(usize, Action)> = Vec::new();
            for &a in base.stage_actions(s) {
                if a.kind == ActionKind::Backward {
                    out.push(Action::backward_input(s, a.microbatch));
                    waiting.push((out.len() + lag.min(1 << 20), Action::backward_weight(s, a.microbatch)));
                } else {
                    out.push(a);
                }
                while let Some(&(due, w)) = waiting.first() {
                    if out.len() < due {
                        break;
                    }
                    out.push(w);
                    waiting.remove(0);
                }
            }
            out.extend(waiting.into_iter().map(|(_, w)| w));
            out
        })
        .collect();
    Schedule::from_actions(format!("1f1b-split-lag{lag}"), stages, m, actions).unwrap()
}

fn split_and_recompute_variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "1f1b I/W lag 1".into(),
            schedule: Box::new(|p, m| split_one_f_one_b(p, m, 1)),
            recompute: Recompute::Off,
        },
        Variant {
            name: "1f1b I/W all W last".into(),
            schedule: Box::new(|p, m| split_one_f_one_b(p, m, usize::MAX)),
            recompute: Recompute::Off,
        },
        Variant {
            name: "1f1b recompute".into(),
            schedule: Box::new(|p, m| Schedule::one_f_one_b(p, m).unwrap()),
            recompute: Recompute::Full,
        },
        Variant {
            name: "1f1b I/W lag 2 recompute".into(),
            schedule: Box::new(|p, m| split_one_f_one_b(p, m, 2)),
            recompute: Recompute::Full,
        },
    ]
}

fn check_layouts(
    model: &dyn PipelineModel,
    optimizer: OptimizerConfig,
    per_microbatch: usize,
    accumulate: bool,
    batch: &dyn Fn(u64, usize) -> (Tensor, Tensor),
    variants: &[Variant],
    stage_counts: &[usize],
) {
    for variant in variants {
        for &stages in stage_counts {
            let mut ms = vec![1, stages, 2 * stages + 1];
            ms.dedup();
            for m in ms {
                let what = format!("{} {} p={stages} m={m}", model.name(), variant.name);
                let cfg = config(stages, ScheduleKind::OneFOneB, m, optimizer)
                    .schedule((variant.schedule)(stages, m))
                    .recompute(variant.recompute);
                check_against_reference(model, cfg, per_microbatch, accumulate, batch, &what);
            }
        }
    }
}

/// Trains `cfg` for [`STEPS`] steps beside the reference and compares losses, gradients,
/// weights and buffers.
fn check_against_reference(
    model: &dyn PipelineModel,
    cfg: PipelineConfig,
    per_microbatch: usize,
    accumulate: bool,
    batch: &dyn Fn(u64, usize) -> (Tensor, Tensor),
    what: &str,
) {
    let (m, optimizer) = (cfg.microbatches, cfg.optimizer);
    let mut reference = ReferenceTrainer::new(model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
    let mut pipe = Pipeline::new(model, cfg).unwrap();
    for step in 0..STEPS {
        let (x, y) = batch(step, m * per_microbatch);
        let want = reference.train_step(&x, &y, if accumulate { m } else { 1 }).unwrap();
        let got = pipe.train_step(&x, &y).unwrap();
        let rel = ((got.loss - want) / want).abs();
        assert!(rel <= TOLERANCE as f64, "{what} step {step}: loss {} vs {want}", got.loss);
        assert_close(&format!("{what} step {step} gradients"), &pipe.gradients().unwrap(), reference.gradients());
    }
    let weights = pipe.parameters().unwrap();
    if matches!(optimizer, OptimizerConfig::AdamW { .. }) {
        // See the module docs: AdamW turns float noise on zero-gradient parameters
        // into full steps, so its weights are compared as one vector.
        let e = global_rel_err(&weights, &reference.parameters());
        assert!(e <= TOLERANCE as f64, "{what} weights: relative error {e:e}");
    } else {
        assert_close(&format!("{what} weights"), &weights, &reference.parameters());
    }
    assert_close(&format!("{what} buffers"), &pipe.buffers().unwrap(), &reference.buffers());
}

/// A schedule generator for `(stages, micro-batches)`; `None` where it has no such schedule.
type ScheduleFor = Box<dyn Fn(usize, usize) -> Option<Schedule>>;

/// The virtual-stage and zero-bubble schedules: interleaved 1F1B (v = 2), ZB-H1, ZB-H2, ZB-V,
/// and the cost-based generator (uneven F/I/W costs, 1F1B's memory) with one chunk per device
/// and with two in a V.
fn zero_bubble_variants() -> Vec<(String, ScheduleFor)> {
    let mut out: Vec<(String, ScheduleFor)> = Vec::new();
    for kind in [ScheduleKind::Interleaved, ScheduleKind::ZbH1, ScheduleKind::ZbH2, ScheduleKind::ZbV] {
        // Interleaving needs m a multiple of p: build() refuses the others (tested elsewhere).
        out.push((kind.to_string(), Box::new(move |p, m| kind.build(p, m).ok())));
    }
    for v in [1, 2] {
        out.push((
            format!("zb-auto v={v}"),
            Box::new(move |p, m| {
                let placement = if v == 1 { (0..p).collect() } else { v_shape(p) };
                let mut costs = GreedyCosts::unit(&placement, (p * v) as f64);
                costs.backward_input = vec![1.5; p * v];
                costs.backward_weight = vec![0.7; p * v];
                Some(Schedule::zero_bubble_from_costs("zb-auto", &costs, p, m).unwrap())
            }),
        ));
    }
    out
}

/// Every zero-bubble variant x p in {2, 3, 4} x m in {p, 2p + 1} (2p for interleaving, which
/// needs a multiple of p), against the reference.
fn check_zero_bubble_layouts(
    model: &dyn PipelineModel,
    optimizer: OptimizerConfig,
    per_microbatch: usize,
    batch: &dyn Fn(u64, usize) -> (Tensor, Tensor),
) {
    for (name, build) in zero_bubble_variants() {
        for p in [2, 3, 4] {
            for m in [p, 2 * p + 1, 2 * p] {
                let Some(schedule) = build(p, m) else { continue };
                if m == 2 * p && name != "interleaved-1f1b" {
                    continue;
                }
                let what = format!("{} {name} p={p} m={m} chunks={}", model.name(), schedule.chunks());
                let cfg = config(p, ScheduleKind::OneFOneB, m, optimizer).schedule(schedule);
                check_against_reference(model, cfg, per_microbatch, true, batch, &what);
            }
        }
    }
}

fn tiny_gpt() -> Gpt {
    // 4 layers in the list: embedding, 2 blocks, head; enough for 4 stages.
    Gpt::new(GptConfig::custom(48, 16, 16, 2, 2).unwrap()).unwrap()
}

/// Eight layers (embedding, 6 blocks, head): enough for 4 devices x 2 chunks.
fn eight_layer_gpt() -> Gpt {
    Gpt::new(GptConfig::custom(48, 16, 16, 6, 2).unwrap()).unwrap()
}

/// Eight layers (stem, 1 + 1 + 2 + 2 blocks, head).
fn eight_layer_resnet() -> ResNet {
    ResNet::new(ResNetConfig::custom(BlockKind::BasicBlock, [1, 1, 2, 2], 4, 10).unwrap()).unwrap()
}

fn tiny_resnet() -> ResNet {
    ResNet::new(ResNetConfig::custom(BlockKind::BasicBlock, [1, 1, 1, 1], 4, 10).unwrap()).unwrap()
}

fn gpt_batches() -> impl Fn(u64, usize) -> (Tensor, Tensor) {
    let data = TokenDataset::embedded_with_len(1, 20_000);
    let vocab = 48u32;
    move |step, size| {
        let (x, y) = data.batch(Split::Train, step, size, 12, 9, &Device::Cpu).unwrap();
        // Fold bytes into the small test vocabulary.
        let fold = |t: Tensor| (t.to_dtype(candle_core::DType::F32).unwrap() / vocab as f64).unwrap().floor().unwrap();
        let fx = (x.to_dtype(candle_core::DType::F32).unwrap() - (fold(x.clone()) * vocab as f64).unwrap()).unwrap();
        let fy = (y.to_dtype(candle_core::DType::F32).unwrap() - (fold(y.clone()) * vocab as f64).unwrap()).unwrap();
        (fx.to_dtype(candle_core::DType::U32).unwrap(), fy.to_dtype(candle_core::DType::U32).unwrap())
    }
}

#[test]
fn gpt_with_adamw_trains_identically_on_every_layout() {
    check_all_layouts(&tiny_gpt(), adamw(), 2, true, gpt_batches());
}

#[test]
fn gpt_matches_full_batch_training_on_every_layout() {
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: true };
    check_all_layouts(&tiny_gpt(), sgd, 2, false, gpt_batches());
}

/// Images of 48×48 leave layer4 a 2×2 map, so BatchNorm there sees 8 values per channel with
/// micro-batches of 2. (At 16×16 its map is 1×1: two values per channel, whose normalised
/// output is ±1 whatever the input, so the true input gradient is exactly zero and both
/// implementations return rounding noise, which two different summation orders do not share.)
const RESNET_IMAGE: usize = 48;

#[test]
fn resnet_trains_identically_on_every_layout() {
    let model = tiny_resnet();
    let data = ImageDataset::embedded_shapes(64, 8, RESNET_IMAGE, 5).unwrap();
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    check_all_layouts(&model, sgd, 2, true, |step, size| {
        data.batch(Split::Train, step, size, 4, &Device::Cpu).unwrap()
    });
}

#[test]
fn split_backward_and_recomputation_train_like_the_reference() {
    // The weight steps run apart from (and after) the input-gradient steps, and recomputation
    // reruns forwards (BatchNorm statistics must not count a micro-batch twice): GPT with
    // AdamW, ResNet with SGD and train-mode BatchNorm, against the accumulating reference.
    let variants = split_and_recompute_variants();
    check_layouts(&tiny_gpt(), adamw(), 2, true, &gpt_batches(), &variants, &[2, 3]);
    let model = tiny_resnet();
    let data = ImageDataset::embedded_shapes(64, 8, RESNET_IMAGE, 5).unwrap();
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    let batch = |step, size| data.batch(Split::Train, step, size, 4, &Device::Cpu).unwrap();
    check_layouts(&model, sgd, 2, true, &batch, &variants, &[2, 3]);
}

#[test]
fn zero_bubble_and_interleaved_gpt_trains_identically() {
    // GPT's tied embedding: on ZB-V both of its users sit on device 0 (one variable, both
    // chunks' gradients summed there); elsewhere on two devices (summed by the collective).
    check_zero_bubble_layouts(&eight_layer_gpt(), adamw(), 2, &gpt_batches());
}

#[test]
fn zero_bubble_and_interleaved_resnet_trains_identically() {
    let model = eight_layer_resnet();
    let data = ImageDataset::embedded_shapes(64, 8, RESNET_IMAGE, 5).unwrap();
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    check_zero_bubble_layouts(&model, sgd, 2, &|step, size| {
        data.batch(Split::Train, step, size, 4, &Device::Cpu).unwrap()
    });
}

#[test]
fn resnet_with_adamw_matches_too() {
    let model = tiny_resnet();
    let data = ImageDataset::embedded_shapes(32, 8, RESNET_IMAGE, 6).unwrap();
    let cfg = config(3, ScheduleKind::OneFOneB, 4, adamw());
    let mut reference = ReferenceTrainer::new(&model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
    let mut pipe = Pipeline::new(&model, cfg).unwrap();
    for step in 0..3 {
        let (x, y) = data.batch(Split::Train, step, 8, 1, &Device::Cpu).unwrap();
        reference.train_step(&x, &y, 4).unwrap();
        pipe.train_step(&x, &y).unwrap();
    }
    let e = global_rel_err(&pipe.parameters().unwrap(), &reference.parameters());
    assert!(e <= TOLERANCE as f64, "resnet adamw weights: relative error {e:e}");
    assert_close("resnet adamw buffers", &pipe.buffers().unwrap(), &reference.buffers());
}

#[test]
fn gpt_tied_embedding_copies_stay_identical() {
    let model = tiny_gpt();
    let mut pipe = Pipeline::new(&model, config(3, ScheduleKind::OneFOneB, 3, adamw())).unwrap();
    assert_eq!(pipe.tied_parameters()["transformer.wte.weight"], vec![0, 2]);
    let ids =
        Tensor::from_vec((0..6 * 8).map(|i| (i * 5 % 48) as u32).collect::<Vec<_>>(), (6, 8), &Device::Cpu).unwrap();
    let targets =
        Tensor::from_vec((0..6 * 8).map(|i| (i * 7 % 48) as u32).collect::<Vec<_>>(), (6, 8), &Device::Cpu).unwrap();
    let before = pipe.parameters().unwrap()["transformer.wte.weight"].clone();
    for _ in 0..3 {
        pipe.train_step(&ids, &targets).unwrap();
    }
    let by_stage = pipe.parameters_by_stage().unwrap();
    let first = &by_stage[0]["transformer.wte.weight"];
    let last = &by_stage[2]["transformer.wte.weight"];
    assert_eq!(rel_err(first, last), 0.0, "tied copies diverged");
    assert!(rel_err(first, &before) > 1e-4, "the tied weight did not train");
    // The middle stage holds no copy.
    assert!(!by_stage[1].contains_key("transformer.wte.weight"));
}

/// nanoGPT's AdamW with `eps` 1e-5 instead of 1e-8. On its first step AdamW moves every
/// parameter by ±lr whatever the gradient's size (m̂/√v̂ = sign g), so with a tiny eps a
/// gradient element that is zero up to float noise (GPT's key bias: softmax ignores a constant
/// shift) takes a full step in a direction the noise picks. The pipeline's fused attention sums
/// in another order than the reference's composition, so the two would then compare different
/// models. A larger eps turns noise into noise-sized steps; the update rule is the same.
fn adamw() -> OptimizerConfig {
    match OptimizerConfig::adamw() {
        OptimizerConfig::AdamW { beta1, beta2, weight_decay, .. } => {
            OptimizerConfig::AdamW { beta1, beta2, eps: 1e-5, weight_decay }
        }
        other => other,
    }
}

#[test]
fn more_chunks_than_layers_is_a_clear_error() {
    // gpt-tiny-sized test model: 4 layers, so ZB-V on 3 devices (6 chunks) cannot be cut.
    let err =
        Pipeline::new(&tiny_gpt(), config(3, ScheduleKind::ZbV, 3, OptimizerConfig::adamw())).unwrap_err().to_string();
    assert!(err.contains("zb-v cuts the model into 6 chunks (3 stages x 2)") && err.contains("4 layers"), "{err}");
    let err = Pipeline::new(&tiny_gpt(), config(2, ScheduleKind::Interleaved, 3, OptimizerConfig::adamw()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of the stages"), "{err}");
    // Absurd counts are refused before anything is sized by them (schedule lists, threads).
    let err = Pipeline::new(&tiny_gpt(), config(1 << 40, ScheduleKind::GPipe, 4, OptimizerConfig::adamw()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot split 4 layers into 1099511627776 stages"), "{err}");
    let err = Pipeline::new(&tiny_gpt(), config(usize::MAX, ScheduleKind::ZbV, 4, OptimizerConfig::adamw()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("zb-v cuts the model into"), "{err}");
    let err = Pipeline::new(&tiny_gpt(), config(2, ScheduleKind::GPipe, 1 << 40, OptimizerConfig::adamw()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("actions a schedule may hold"), "{err}");
    let err = Pipeline::new(
        &tiny_gpt(),
        config(2, ScheduleKind::GPipe, 4, OptimizerConfig::adamw()).threads_per_stage(1 << 20),
    )
    .unwrap_err()
    .to_string();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        err.contains(&format!(
            "1048576 threads per stage over 2 stage(s) is more than brigade starts on {cores} cores"
        )),
        "{err}"
    );
    // The limit is 8 threads per core over all the stages: at it a pipeline starts, one past
    // it is refused.
    let most = brigade::engine::pipeline::max_threads();
    assert_eq!(most, 8 * cores);
    let budget = |threads| config(2, ScheduleKind::GPipe, 4, OptimizerConfig::adamw()).threads_per_stage(threads);
    Pipeline::new(&tiny_gpt(), budget(most / 2)).expect("8 threads per core over 2 stages is allowed");
    let err = Pipeline::new(&tiny_gpt(), budget(most / 2 + 1)).unwrap_err().to_string();
    assert!(err.contains(&format!("at most 8 per core: {most} threads in all")), "{err}");
}

/// The thread setup changes speed only: one shared pool or a pool per stage, one thread per
/// stage or two, the losses and weights after three AdamW steps are the same to the bit. The
/// model is wide enough (width 128, 4 × 64 tokens per micro-batch) that the kernels' parallel
/// paths and gemm's task split run: a reduction blocked by the thread count, or summed in
/// whatever order work-stealing finishes, fails this.
#[test]
fn thread_pools_and_thread_counts_do_not_change_a_bit() {
    use brigade::engine::pipeline::ThreadPools;
    let model = Gpt::new(GptConfig::custom(96, 64, 128, 2, 4).unwrap()).unwrap();
    let data = TokenDataset::embedded_with_len(2, 50_000);
    let batches: Vec<(Tensor, Tensor)> = (0..3)
        .map(|step| {
            let (x, y) = data.batch(Split::Train, step, 16, 64, 5, &Device::Cpu).unwrap();
            let fold = |t: Tensor| {
                (t.to_dtype(candle_core::DType::F32).unwrap() / 3.0)
                    .unwrap()
                    .floor()
                    .unwrap()
                    .to_dtype(candle_core::DType::U32)
                    .unwrap()
            };
            (fold(x), fold(y))
        })
        .collect();
    let run = |pools: ThreadPools, threads: usize| {
        let cfg = PipelineConfig::default()
            .stages(2)
            .schedule(ScheduleKind::OneFOneB)
            .microbatches(4)
            .optimizer(OptimizerConfig::adamw())
            .lr(LrSchedule::constant(1e-3))
            .threads_per_stage(threads)
            .thread_pools(pools)
            .seed(5);
        let mut pipe = Pipeline::new(&model, cfg).unwrap();
        let losses: Vec<u64> = batches.iter().map(|(x, y)| pipe.train_step(x, y).unwrap().loss.to_bits()).collect();
        let weights: BTreeMap<String, Vec<u32>> = pipe
            .parameters()
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect())
            })
            .collect();
        (losses, weights)
    };
    let (losses, weights) = run(ThreadPools::PerStage, 1);
    for (pools, threads) in [(ThreadPools::Shared, 1), (ThreadPools::PerStage, 2), (ThreadPools::Shared, 2)] {
        let (l, w) = run(pools, threads);
        assert_eq!(l, losses, "losses differ with {pools:?} pools of {threads} thread(s) per stage");
        for (name, bits) in &weights {
            assert!(w[name] == *bits, "{name} differs with {pools:?} pools of {threads} thread(s) per stage");
        }
    }
}

/// A Llama small enough for every layout: 4 query heads over 2 k/v heads (grouped-query
/// attention), width 16, SwiGLU width 24, untied head, rope_theta 500; `layers` blocks.
fn small_llama(layers: usize, tied: bool) -> Llama {
    let cfg = LlamaConfig::preset("llama-tiny")
        .unwrap()
        .with_vocab_size(48)
        .with_max_position_embeddings(16)
        .with_num_attention_heads(4)
        .with_hidden_size(16)
        .with_num_key_value_heads(2)
        .with_intermediate_size(24)
        .with_num_hidden_layers(layers)
        .with_rope_theta(500.0)
        .with_tie_word_embeddings(tied);
    Llama::new(cfg).unwrap()
}

/// [`adamw`] with `eps` 1e-3. Llama's embedding rows get gradients of order 1e-5 where a
/// token's positions nearly cancel (its 0.02-std table and RMSNorm leave them smaller than
/// GPT's), the size of eps 1e-5 itself, so their float noise still moved the weights by more
/// than the tolerance (7e-5 at p=2, m=2 on step 0, every gradient within 1e-6). The update
/// rule is the same; a larger eps keeps noise-sized gradients to noise-sized steps.
fn llama_adamw() -> OptimizerConfig {
    match adamw() {
        OptimizerConfig::AdamW { beta1, beta2, weight_decay, .. } => {
            OptimizerConfig::AdamW { beta1, beta2, eps: 1e-3, weight_decay }
        }
        other => other,
    }
}

#[test]
fn llama_with_adamw_trains_identically_on_every_layout() {
    check_all_layouts(&small_llama(2, false), llama_adamw(), 2, true, gpt_batches());
}

#[test]
fn llama_matches_full_batch_training_on_every_layout() {
    let sgd = OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: true };
    check_all_layouts(&small_llama(2, true), sgd, 2, false, gpt_batches());
}

#[test]
fn llama_split_backward_and_recomputation_train_like_the_reference() {
    let variants = split_and_recompute_variants();
    check_layouts(&small_llama(2, false), llama_adamw(), 2, true, &gpt_batches(), &variants, &[2, 3]);
}

#[test]
fn zero_bubble_and_interleaved_llama_trains_identically() {
    // Tied: on ZB-V both users of the table sit on device 0; elsewhere on two devices.
    check_zero_bubble_layouts(&small_llama(6, true), llama_adamw(), 2, &gpt_batches());
}

#[test]
fn llama_tied_embedding_copies_stay_identical() {
    let model = small_llama(2, true);
    let mut pipe = Pipeline::new(&model, config(3, ScheduleKind::OneFOneB, 3, llama_adamw())).unwrap();
    assert_eq!(pipe.tied_parameters()["model.embed_tokens.weight"], vec![0, 2]);
    let ids =
        Tensor::from_vec((0..6 * 8).map(|i| (i * 5 % 48) as u32).collect::<Vec<_>>(), (6, 8), &Device::Cpu).unwrap();
    let targets =
        Tensor::from_vec((0..6 * 8).map(|i| (i * 7 % 48) as u32).collect::<Vec<_>>(), (6, 8), &Device::Cpu).unwrap();
    for _ in 0..3 {
        pipe.train_step(&ids, &targets).unwrap();
    }
    let by_stage = pipe.parameters_by_stage().unwrap();
    let (first, last) = (&by_stage[0]["model.embed_tokens.weight"], &by_stage[2]["model.embed_tokens.weight"]);
    assert_eq!(rel_err(first, last), 0.0, "tied copies diverged");
}
