//! User-defined models (autograd layers over candle-nn, the `Sequential` builder) train through
//! the pipeline exactly like their own single-device training with plain candle autograd.
//!
//! The reference is [`ReferenceTrainer`]: one parameter store of real variables, the layers'
//! plain forward (candle records the graph), `loss.backward()`. The pipeline runs the same
//! layers as F / I / W steps on stage threads. Every schedule (GPipe, 1F1B, 1F1B with I and W
//! apart, interleaved, zero-bubble), p in 1..=4, recomputation on and off: losses, every
//! gradient at every step and the weights agree to 1e-5 (max |a - b| / max |b|, per tensor).

use std::collections::BTreeMap;
use std::sync::Arc;

use brigade::candle_nn::{self, Module, ModuleT, VarBuilder};
use brigade::engine::compute::Recompute;
use brigade::engine::custom::{layer_norm, Sequential, SequentialModel};
use brigade::engine::optim::{LrSchedule, OptimizerConfig};
use brigade::engine::pipeline::{Pipeline, PipelineConfig};
use brigade::engine::reference::ReferenceTrainer;
use brigade::engine::schedule::{Action, ActionKind, Schedule, ScheduleKind};
use brigade::engine::{CustomLoss, InputKind, LossKind, PipelineModel};
use brigade::models::{Gpt, GptConfig};
use candle_core::{DType, Device, Result, Tensor};

const STEPS: u64 = 2;
const TOLERANCE: f32 = 1e-5;
const WIDTH: usize = 8;

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
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

/// A residual block: `x + fc2(gelu(fc1(norm(x))))`, the skip connection inside one layer.
fn residual_block(vb: VarBuilder) -> Result<impl Module> {
    let norm = layer_norm(WIDTH, 1e-5, vb.pp("norm"))?;
    let fc1 = candle_nn::linear(WIDTH, 2 * WIDTH, vb.pp("fc1"))?;
    let fc2 = candle_nn::linear(2 * WIDTH, WIDTH, vb.pp("fc2"))?;
    Ok(move |x: &Tensor| x + fc2.forward(&fc1.forward(&norm.forward(x)?)?.gelu_erf()?)?)
}

/// Four layers (enough for 4 stages): a projection in, two residual blocks with a softmax
/// gate, a projection out; mean squared error.
fn regression_mlp(loss: LossKind) -> SequentialModel {
    Sequential::new("mlp")
        .layer("proj_in", |vb| candle_nn::linear(4, WIDTH, vb))
        .layer("block0", residual_block)
        .layer("block1", |vb| {
            let block = residual_block(vb.pp("inner"))?;
            let gate = candle_nn::linear_no_bias(WIDTH, WIDTH, vb.pp("gate"))?;
            Ok(move |x: &Tensor| {
                let h = block.forward(x)?;
                h.mul(&candle_nn::ops::softmax(&gate.forward(&h)?, candle_core::D::Minus1)?)
            })
        })
        .layer("proj_out", |vb| candle_nn::linear(WIDTH, 3, vb))
        .loss(loss)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap()
}

/// Weights tied across stages: the first and last layers use the same `shared` matrix (the
/// last one transposed), reached outside their prefixes with `vb.root()`.
fn tied_model() -> SequentialModel {
    Sequential::new("tied")
        .layer("enc", |vb| {
            let w = vb.root().get_with_hints((WIDTH, 4), "shared.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
            Ok(move |x: &Tensor| x.matmul(&w.t()?)?.tanh())
        })
        .layer("mid0", residual_block)
        .layer("mid1", residual_block)
        .layer("dec", |vb| {
            let w = vb.root().get_with_hints((WIDTH, 4), "shared.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
            let bias = vb.get_with_hints(4, "bias", candle_nn::Init::Const(0.0))?;
            Ok(move |x: &Tensor| x.matmul(&w)?.broadcast_add(&bias))
        })
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap()
}

/// GPT's explicit embedding, block and tied head around an autograd residual block.
fn mixed_gpt() -> SequentialModel {
    let gpt = Gpt::new(GptConfig::custom(48, 16, 16, 1, 2).unwrap()).unwrap();
    let layers = gpt.layers();
    assert_eq!(layers.len(), 3);
    Sequential::new("mixed-gpt")
        .explicit(layers[0].clone())
        .layer("custom", |vb| {
            let norm = layer_norm(16, 1e-5, vb.pp("ln"))?;
            let fc = candle_nn::linear(16, 16, vb.pp("fc"))?;
            Ok(move |x: &Tensor| x + fc.forward(&norm.forward(x)?)?.tanh()?)
        })
        .explicit(layers[1].clone())
        .explicit(layers[2].clone())
        .loss(LossKind::CrossEntropy)
        .input(gpt.input())
        .classes(gpt.num_classes())
        .build()
        .unwrap()
}

fn features(step: u64, batch: usize, outputs: usize) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let n = (batch * 4) as f32;
    let x: Vec<f32> = (0..batch * 4).map(|i| ((i as f32 * 0.37 + step as f32).sin() * 1.5) + i as f32 / n).collect();
    let x = Tensor::from_vec(x, (batch, 4), &dev).unwrap();
    let y: Vec<f32> = (0..batch * outputs).map(|i| (i as f32 * 0.11 - step as f32).cos()).collect();
    (x, Tensor::from_vec(y, (batch, outputs), &dev).unwrap())
}

fn tokens(step: u64, batch: usize) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..batch * 9).map(|i| ((i as u64 * 7 + step * 5 + i as u64 / 3) % 48) as u32).collect();
    let all = Tensor::from_vec(ids, (batch, 9), &Device::Cpu).unwrap();
    (all.narrow(1, 0, 8).unwrap(), all.narrow(1, 1, 8).unwrap())
}

fn config(p: usize, m: usize, schedule: Schedule, recompute: Recompute) -> PipelineConfig {
    PipelineConfig::default()
        .stages(p)
        .schedule(ScheduleKind::OneFOneB)
        .schedule(schedule)
        .microbatches(m)
        .recompute(recompute)
        .optimizer(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 1e-3, nesterov: false })
        .lr(LrSchedule::warmup_cosine(5e-2, 1, 3, 1e-3))
        .grad_clip(Some(1.0))
        .threads_per_stage(1)
        .seed(7)
}

fn check(model: &dyn PipelineModel, cfg: PipelineConfig, batch: &dyn Fn(u64, usize) -> (Tensor, Tensor), what: &str) {
    let m = cfg.microbatches;
    let mut reference = ReferenceTrainer::new(model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
    let mut pipe = Pipeline::new(model, cfg).unwrap();
    for step in 0..STEPS {
        let (x, y) = batch(step, 2 * m);
        let want = reference.train_step(&x, &y, m).unwrap();
        let got = pipe.train_step(&x, &y).unwrap();
        assert!(
            ((got.loss - want) / want).abs() <= TOLERANCE as f64,
            "{what} step {step}: loss {} vs {want}",
            got.loss
        );
        assert_close(&format!("{what} step {step} gradients"), &pipe.gradients().unwrap(), reference.gradients());
    }
    assert_close(&format!("{what} weights"), &pipe.parameters().unwrap(), &reference.parameters());
}

/// 1F1B with every backward split into I then W, each W one action later.
fn split_one_f_one_b(p: usize, m: usize) -> Schedule {
    let base = Schedule::one_f_one_b(p, m).unwrap();
    let actions = (0..p)
        .map(|s| {
            let mut out = Vec::new();
            let mut deferred: Option<Action> = None;
            for &a in base.stage_actions(s) {
                if a.kind == ActionKind::Backward {
                    out.push(Action::backward_input(s, a.microbatch));
                    out.extend(deferred.replace(Action::backward_weight(s, a.microbatch)));
                } else {
                    out.push(a);
                }
            }
            out.extend(deferred);
            out
        })
        .collect();
    Schedule::from_actions("1f1b-split", p, m, actions).unwrap()
}

/// Every schedule x p in 1..=4 x recomputation off/full.
fn check_every_layout(model: &dyn PipelineModel, batch: &dyn Fn(u64, usize) -> (Tensor, Tensor)) {
    let mut kinds = std::collections::BTreeSet::new();
    for p in 1..=4 {
        for m in [p, 2 * p + 1] {
            for recompute in [Recompute::Off, Recompute::Full] {
                let mut schedules =
                    vec![Schedule::gpipe(p, m).unwrap(), Schedule::one_f_one_b(p, m).unwrap(), split_one_f_one_b(p, m)];
                if p >= 2 {
                    for kind in [ScheduleKind::ZbH1, ScheduleKind::ZbH2] {
                        schedules.extend(kind.build(p, m).ok());
                    }
                }
                // Two chunks per device: as many chunks as the four layers allow.
                if 2 * p <= 4 {
                    for kind in [ScheduleKind::Interleaved, ScheduleKind::ZbV] {
                        schedules.extend(kind.build(p, m).ok());
                    }
                }
                for schedule in schedules {
                    let what = format!("{} {} p={p} m={m} recompute={recompute}", model.name(), schedule.name());
                    kinds.insert(schedule.name().to_string());
                    check(model, config(p, m, schedule, recompute), batch, &what);
                }
            }
        }
    }
    // GPipe, 1F1B, 1F1B with I and W apart, ZB-H1, ZB-H2, interleaved and ZB-V all ran.
    assert!(kinds.len() >= 7, "schedules covered: {kinds:?}");
}

#[test]
fn regression_mlp_with_skip_connections_matches_single_device_autograd() {
    check_every_layout(&regression_mlp(LossKind::MeanSquaredError), &|s, b| features(s, b, 3));
}

#[test]
fn custom_loss_matches_single_device_autograd() {
    // A user's loss: summed Huber-like smooth L1, written with candle ops.
    fn smooth_l1(output: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let d = (output - targets)?.abs()?;
        let quadratic = (d.sqr()? * 0.5)?;
        let linear = (&d - 0.5)?;
        d.lt(1.0)?.where_cond(&quadratic, &linear)?.sum_all()
    }
    let model = regression_mlp(LossKind::Custom(CustomLoss::new("smooth-l1", smooth_l1)));
    for p in [1, 2, 4] {
        let what = format!("custom loss p={p}");
        check(
            &model,
            config(p, p, Schedule::one_f_one_b(p, p).unwrap(), Recompute::Off),
            &|s, b| features(s, b, 3),
            &what,
        );
    }
}

#[test]
fn weights_tied_across_stages_match_single_device_autograd() {
    let model = tied_model();
    let names: Vec<String> =
        brigade::engine::layer::unique_params(&model.layers()).into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"shared.weight".to_string()), "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "shared.weight").count(), 1);
    check_every_layout(&model, &|s, b| features(s, b, 4));
}

#[test]
fn explicit_and_autograd_layers_mix_in_one_model() {
    let model = mixed_gpt();
    for (p, recompute) in [(1, Recompute::Off), (2, Recompute::Full), (3, Recompute::Off), (4, Recompute::Full)] {
        for schedule in [Schedule::gpipe(p, 2 * p).unwrap(), split_one_f_one_b(p, p)] {
            let m = schedule.microbatches();
            let what = format!("mixed {} p={p} recompute={recompute}", schedule.name());
            check(&model, config(p, m, schedule, recompute), &tokens, &what);
        }
    }
}

#[test]
fn parameter_names_follow_layer_names() {
    let names: Vec<String> =
        brigade::engine::layer::unique_params(&regression_mlp(LossKind::MeanSquaredError).layers())
            .into_iter()
            .map(|p| p.name)
            .collect();
    for want in ["proj_in.weight", "proj_in.bias", "block0.norm.weight", "block0.fc1.weight", "block1.inner.fc2.bias"] {
        assert!(names.contains(&want.to_string()), "{want} not in {names:?}");
    }
    assert!(names.contains(&"block1.gate.weight".to_string()));
    assert!(!names.contains(&"block1.gate.bias".to_string()));
}

#[test]
fn candle_nn_fused_layer_norm_cuts_the_graph_and_is_refused() {
    // candle-nn's fused layer norm records no backward: plain candle training silently leaves
    // its weights (and everything before it) untrained. The pipeline must fail loudly instead.
    let model = Sequential::new("fused")
        .layer("a", |vb| candle_nn::linear(4, WIDTH, vb))
        .layer("b", |vb| candle_nn::layer_norm(WIDTH, 1e-5, vb))
        .layer("c", |vb| candle_nn::linear(WIDTH, 3, vb))
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap();
    let (x, y) = features(0, 4, 3);
    let mut pipe = Pipeline::new(&model, config(2, 2, Schedule::one_f_one_b(2, 2).unwrap(), Recompute::Off)).unwrap();
    let e = pipe.train_step(&x, &y).unwrap_err().to_string();
    assert!(e.contains("b: the output has no gradient with respect to") && e.contains("custom::layer_norm"), "{e}");
    // The single-device reference shows the silent cut: no gradient for b's or a's weights.
    let mut reference =
        ReferenceTrainer::new(&model, OptimizerConfig::sgd(), LrSchedule::constant(0.1), None, 0).unwrap();
    reference.train_step(&x, &y, 1).unwrap();
    assert!(!reference.gradients().contains_key("b.weight") && !reference.gradients().contains_key("a.weight"));
    assert!(reference.gradients().contains_key("c.weight"));
}

#[test]
fn bad_definitions_and_batches_are_clear_errors() {
    let linear = |vb: VarBuilder| candle_nn::linear(4, 4, vb);
    let e = Sequential::new("x").input(InputKind::Features { shape: vec![4] }).layer("a", linear).build().unwrap_err();
    assert!(e.to_string().contains("no loss"), "{e}");
    let e = Sequential::new("x")
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .layer("a", linear)
        .layer("a", linear)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("two layers are named a"), "{e}");
    // A parameter tied by name must have one shape.
    let e = Sequential::new("x")
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .layer("a", |vb| candle_nn::linear(4, 4, vb.root().pp("shared")))
        .layer("b", |vb| candle_nn::linear(4, 8, vb.root().pp("shared")))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("shared.weight") && e.to_string().contains("one shape"), "{e}");
    // An initialiser brigade cannot reproduce from (seed, name).
    let e = Sequential::new("x")
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .layer("a", |vb| {
            let w = vb.get_with_hints(4, "w", candle_nn::Init::Randn { mean: 1.0, stdev: 1.0 })?;
            Ok(move |x: &Tensor| x.broadcast_mul(&w))
        })
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("a.w") && e.to_string().contains("not supported"), "{e}");

    // Declared input checks run before the batch reaches a stage.
    let model = Sequential::new("checked")
        .layer("a", linear)
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .check(|x, _| {
            let max =
                x.abs().and_then(|a| a.max_all()).and_then(|m| m.to_scalar::<f32>()).map_err(|e| e.to_string())?;
            if max > 100.0 {
                return Err(format!("inputs must be normalised, found {max}"));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let mut pipe = Pipeline::new(&model, config(1, 1, Schedule::gpipe(1, 1).unwrap(), Recompute::Off)).unwrap();
    let y = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let e = pipe.train_step(&(Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap() * 1000.0).unwrap(), &y);
    assert!(e.unwrap_err().to_string().contains("must be normalised"));
    let e = pipe.train_step(&Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap(), &y).unwrap_err();
    assert!(e.to_string().contains("expects f32 inputs of shape (batch, 4)"), "{e}");
    assert!(pipe.train_step(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap(), &y).is_ok());
    // Autograd layers compute in f32: mixed precision is refused up front.
    assert!(model.mixed_precision().unwrap_err().contains("f32"));
    let _ = Arc::new(model);
}

/// Records the `train` flag of every forward it runs (an identity otherwise).
struct ModeProbe {
    seen: Arc<std::sync::Mutex<Vec<bool>>>,
}

impl ModuleT for ModeProbe {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.seen.lock().unwrap().push(train);
        x.affine(1.0, 0.0)
    }
}

/// `proj_in`, a mode probe, candle-nn's dropout (unless `dropout` is false), `proj_out`.
fn probed_model(seen: &Arc<std::sync::Mutex<Vec<bool>>>, dropout: bool) -> SequentialModel {
    let seen = seen.clone();
    let mut model = Sequential::new("probed")
        .layer("proj_in", |vb| candle_nn::linear(4, WIDTH, vb))
        .layer("probe", move |_| Ok(ModeProbe { seen: seen.clone() }));
    if dropout {
        model = model.layer("dropout", |_| Ok(candle_nn::Dropout::new(0.5)));
    }
    model
        .layer("proj_out", |vb| candle_nn::linear(WIDTH, 3, vb))
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap()
}

#[test]
fn autograd_layers_see_train_and_eval_modes() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let take = || std::mem::take(&mut *seen.lock().unwrap());
    let (x, y) = features(0, 8, 3);
    for recompute in [Recompute::Off, Recompute::Full] {
        let cfg = config(2, 2, Schedule::one_f_one_b(2, 2).unwrap(), recompute);
        let mut pipe = Pipeline::new(&probed_model(&seen, true), cfg.clone()).unwrap();
        let mut plain = Pipeline::new(&probed_model(&seen, false), cfg.clone()).unwrap();
        // Same weights (names and seed), and dropout is off outside training: identical outputs.
        assert_eq!(
            pipe.predict(&x).unwrap().to_vec2::<f32>().unwrap(),
            plain.predict(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        take();
        pipe.train_step(&x, &y).unwrap();
        let trained = take();
        // Two micro-batches, and under recomputation each forward runs again before its backward.
        let forwards = if recompute == Recompute::Full { 4 } else { 2 };
        assert_eq!(trained, vec![true; forwards], "recompute={recompute}");
        pipe.evaluate(&x, &y).unwrap();
        pipe.predict(&x).unwrap();
        let evaluated = take();
        assert!(!evaluated.is_empty() && evaluated.iter().all(|train| !train), "{evaluated:?}");
    }
    // The single-device reference trains in training mode too.
    let model = probed_model(&seen, false);
    let mut reference =
        ReferenceTrainer::new(&model, OptimizerConfig::sgd(), LrSchedule::constant(0.1), None, 0).unwrap();
    take();
    reference.train_step(&x, &y, 2).unwrap();
    let trained = take();
    assert!(!trained.is_empty() && trained.iter().all(|train| *train), "{trained:?}");
}

#[test]
fn candle_nn_batch_norm_is_refused_when_defined() {
    let e = Sequential::new("bn")
        .layer("bn", |vb| candle_nn::batch_norm(4, candle_nn::BatchNormConfig::default(), vb))
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("bn.running_mean") && e.contains("BatchNorm is not supported"), "{e}");
}

#[test]
fn the_stash_counts_what_an_autograd_layer_keeps() {
    // One layer 4 -> 1024 -> 3 on a batch of 8: the graph keeps three (8, 1024) f32
    // intermediates (the product, the bias sum, the GELU), 32 KiB each, besides the layer's
    // small input copy and output. The weights (and views of them) are not activations.
    const HIDDEN: usize = 1024;
    let intermediate = (8 * HIDDEN * 4) as u64;
    let model = Sequential::new("wide")
        .layer("wide", |vb| {
            let fc1 = candle_nn::linear(4, HIDDEN, vb.pp("fc1"))?;
            let fc2 = candle_nn::linear(HIDDEN, 3, vb.pp("fc2"))?;
            Ok(move |x: &Tensor| fc2.forward(&fc1.forward(x)?.gelu_erf()?))
        })
        .loss(LossKind::MeanSquaredError)
        .input(InputKind::Features { shape: vec![4] })
        .build()
        .unwrap();
    let (x, y) = features(0, 8, 3);
    for recompute in [Recompute::Off, Recompute::Full] {
        let mut pipe = Pipeline::new(&model, config(1, 1, Schedule::gpipe(1, 1).unwrap(), recompute)).unwrap();
        let peak = pipe.train_step(&x, &y).unwrap().peak_stash_bytes[0];
        assert!((3 * intermediate..4 * intermediate).contains(&peak), "recompute={recompute}: {peak} bytes");
    }
}

#[test]
fn brigade_train_refuses_feature_data_and_points_to_the_rust_api() {
    // `brigade train` trains the built-in presets; f32 features and targets belong to a model
    // defined in Rust. Before, a GPT preset read such a file as text and trained on its bytes.
    let dir = std::env::temp_dir().join(format!("brigade-features-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("regression.safetensors");
    let (x, y) = features(0, 16, 3);
    candle_core::safetensors::save(&[("inputs", x), ("targets", y)].into_iter().collect(), &file).unwrap();
    for model in ["gpt-tiny", "llama-tiny", "resnet-tiny"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
            .args(["train", "--model", model, "--steps", "1", "--data"])
            .arg(&file)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{model}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{model}: {stderr}");
        assert!(
            errors[0].contains("presets only") && errors[0].contains("examples/custom_mlp.rs"),
            "{model}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
