//! The executor against the single-device reference on a toy model with a tied embedding, and
//! its behaviour when a stage fails. (GPT and ResNet get the same treatment in the workspace's
//! top-level tests.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade_engine::layer::{
    Gradients, Init, InputKind, Layer, LayerSpec, LossKind, Mode, ParamSpec, ParamStore, Pass, PipelineModel, Saved,
};
use brigade_engine::optim::{LrSchedule, OptimizerConfig};
use brigade_engine::pipeline::testing::{inject_fault, Fault, FaultKind};
use brigade_engine::pipeline::{Pipeline, PipelineConfig};
use brigade_engine::reference::ReferenceTrainer;
use brigade_engine::schedule::{Action, Schedule, ScheduleKind};
use brigade_engine::EngineError;
use candle_core::{DType, Device, Result, Tensor};

const VOCAB: usize = 11;
const WIDTH: usize = 6;

#[derive(Debug)]
struct Embed;
#[derive(Debug)]
struct Dense(usize);
#[derive(Debug)]
struct TiedHead;

struct EmbedLayer(Tensor);
struct DenseLayer(Tensor, Tensor, usize);
struct HeadLayer(Tensor);

fn emb_spec() -> ParamSpec {
    ParamSpec::new("emb.weight", &[VOCAB, WIDTH], Init::Normal { std: 0.5 })
}

impl LayerSpec for Embed {
    fn name(&self) -> String {
        "emb".into()
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![emb_spec()]
    }
    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        Ok(Box::new(EmbedLayer(store.get(&emb_spec())?)))
    }
}

impl Layer for EmbedLayer {
    fn forward(&mut self, x: &Tensor, _: Mode) -> Result<Tensor> {
        let (b, t) = x.dims2()?;
        self.0.embedding(&x.flatten_all()?)?.reshape((b, t, WIDTH))
    }
    fn forward_train(&mut self, x: &Tensor, _: Pass) -> Result<(Tensor, Saved)> {
        let ids = x.flatten_all()?;
        Ok((self.forward(x, Mode::Train)?, Saved::new(ids.clone(), &[&ids])))
    }
    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _: bool) -> Result<(Option<Tensor>, Saved)> {
        let ids: Tensor = saved.take("emb")?;
        Ok((None, Saved::new((ids, dy.clone()), &[dy])))
    }
    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (ids, dy): (Tensor, Tensor) = saved.take("emb")?;
        let dy = dy.reshape((ids.elem_count(), WIDTH))?;
        grads.add("emb.weight", &self.0.zeros_like()?.index_add(&ids, &dy, 0)?)
    }
}

impl Dense {
    fn specs(&self) -> [ParamSpec; 2] {
        [
            ParamSpec::new(format!("dense{}.weight", self.0), &[WIDTH, WIDTH], Init::Normal { std: 0.4 }),
            ParamSpec::new(format!("dense{}.bias", self.0), &[WIDTH], Init::Normal { std: 0.1 }),
        ]
    }
}

impl LayerSpec for Dense {
    fn name(&self) -> String {
        format!("dense{}", self.0)
    }
    fn params(&self) -> Vec<ParamSpec> {
        self.specs().to_vec()
    }
    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [w, b] = self.specs();
        Ok(Box::new(DenseLayer(store.get(&w)?, store.get(&b)?, self.0)))
    }
}

impl Layer for DenseLayer {
    fn forward(&mut self, x: &Tensor, _: Mode) -> Result<Tensor> {
        let h = x.broadcast_matmul(&self.0)?.broadcast_add(&self.1)?.tanh()?;
        x + h
    }
    fn forward_train(&mut self, x: &Tensor, _: Pass) -> Result<(Tensor, Saved)> {
        let h = x.broadcast_matmul(&self.0)?.broadcast_add(&self.1)?.tanh()?;
        Ok(((x + &h)?, Saved::new((x.clone(), h.clone()), &[x, &h])))
    }
    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _: bool) -> Result<(Option<Tensor>, Saved)> {
        let (x, h): (Tensor, Tensor) = saved.take("dense")?;
        // y = x + tanh(z): dz = dy (1 - h²), dx = dy + dz Wᵀ.
        let dz = (dy * (1.0 - h.sqr()?)?)?;
        let dx = (dy + dz.broadcast_matmul(&self.0.t()?)?)?;
        Ok((Some(dx), Saved::new((x.clone(), dz.clone()), &[&x, &dz])))
    }
    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (x, dz): (Tensor, Tensor) = saved.take("dense")?;
        let (x, dz) = (x.reshape(((), WIDTH))?, dz.reshape(((), WIDTH))?);
        grads.add(&format!("dense{}.weight", self.2), &x.t()?.matmul(&dz)?)?;
        grads.add(&format!("dense{}.bias", self.2), &dz.sum(0)?)
    }
}

impl LayerSpec for TiedHead {
    fn name(&self) -> String {
        "head".into()
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![emb_spec()]
    }
    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        Ok(Box::new(HeadLayer(store.get(&emb_spec())?)))
    }
}

impl Layer for HeadLayer {
    fn forward(&mut self, x: &Tensor, _: Mode) -> Result<Tensor> {
        x.broadcast_matmul(&self.0.t()?)
    }
    fn forward_train(&mut self, x: &Tensor, _: Pass) -> Result<(Tensor, Saved)> {
        Ok((self.forward(x, Mode::Train)?, Saved::new(x.clone(), &[x])))
    }
    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _: bool) -> Result<(Option<Tensor>, Saved)> {
        let x: Tensor = saved.take("head")?;
        let dx = dy.broadcast_matmul(&self.0)?;
        Ok((Some(dx), Saved::new((x.clone(), dy.clone()), &[&x, dy])))
    }
    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (x, dy): (Tensor, Tensor) = saved.take("head")?;
        let (x, dy) = (x.reshape(((), WIDTH))?, dy.reshape(((), VOCAB))?);
        grads.add("emb.weight", &dy.t()?.matmul(&x)?)
    }
}

#[derive(Debug)]
struct Toy {
    dense: usize,
}

impl PipelineModel for Toy {
    fn name(&self) -> String {
        "toy".into()
    }
    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        let mut layers: Vec<Arc<dyn LayerSpec>> = vec![Arc::new(Embed)];
        layers.extend((0..self.dense).map(|i| Arc::new(Dense(i)) as Arc<dyn LayerSpec>));
        layers.push(Arc::new(TiedHead));
        layers
    }
    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }
    fn input(&self) -> InputKind {
        InputKind::Tokens { vocab: VOCAB, context: 16 }
    }
    fn num_classes(&self) -> usize {
        VOCAB
    }
}

fn batch(step: u64, size: usize) -> (Tensor, Tensor) {
    let ids: Vec<u32> =
        (0..size * 5).map(|i| ((i as u64 * 7 + step * 3 + (i as u64 / 5)) % VOCAB as u64) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (size, 5), &Device::Cpu).unwrap();
    let y: Vec<u32> = ids.iter().map(|v| (v * 5 + 1) % VOCAB as u32).collect();
    (x, Tensor::from_vec(y, (size, 5), &Device::Cpu).unwrap())
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

fn config(stages: usize, kind: ScheduleKind, m: usize) -> PipelineConfig {
    PipelineConfig::default()
        .stages(stages)
        .schedule(kind)
        .microbatches(m)
        .optimizer(OptimizerConfig::adamw())
        .lr(LrSchedule::warmup_cosine(0.05, 1, 4, 0.005))
        .grad_clip(Some(0.5))
        .threads_per_stage(1)
        .seed(7)
}

#[test]
fn every_schedule_and_layout_matches_single_device_training() {
    let model = Toy { dense: 3 }; // 5 layers
    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
        for stages in 1..=4 {
            for m in [1, stages, 2 * stages + 1] {
                let batch_size = m * 2;
                let cfg = config(stages, kind, m);
                let mut reference =
                    ReferenceTrainer::new(&model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
                let mut pipe = Pipeline::new(&model, cfg).unwrap();
                for step in 0..3 {
                    let (x, y) = batch(step, batch_size);
                    let want = reference.train_step(&x, &y, 1).unwrap();
                    let got = pipe.train_step(&x, &y).unwrap();
                    let rel = ((got.loss - want) / want).abs();
                    assert!(rel < 1e-5, "{kind} p={stages} m={m} step {step}: loss {} vs {want}", got.loss);
                    let grads = pipe.gradients().unwrap();
                    for (name, g) in reference.gradients() {
                        let e = max_rel_err(&grads[name], g);
                        assert!(e < 1e-5, "{kind} p={stages} m={m} step {step}: grad {name} off by {e}");
                    }
                }
                let params = pipe.parameters().unwrap();
                for (name, w) in reference.parameters() {
                    let e = max_rel_err(&params[&name], &w);
                    assert!(e < 1e-5, "{kind} p={stages} m={m}: weight {name} off by {e}");
                }
                // The tied embedding's copies on the first and last stage stay identical.
                if stages > 1 {
                    assert_eq!(pipe.tied_parameters()["emb.weight"], vec![0, stages - 1]);
                    let by_stage = pipe.parameters_by_stage().unwrap();
                    let first = &by_stage[0]["emb.weight"];
                    let last = &by_stage[stages - 1]["emb.weight"];
                    assert_eq!(max_rel_err(first, last), 0.0);
                }
            }
        }
    }
}

#[test]
fn split_backward_schedule_matches_full_backward() {
    // A hand-written 2-stage schedule that splits the backward into I and W (zero-bubble style).
    let text = "stage 0: 0F0 0F1 0I0 0F2 0I1 0W0 0I2 0W1 0W2\n\
                stage 1: 1F0 1I0 1F1 1W0 1I1 1F2 1I2 1W1 1W2\n";
    let schedule = Schedule::parse(text).unwrap();
    let model = Toy { dense: 2 };
    let base = config(2, ScheduleKind::OneFOneB, 3);
    let mut split = Pipeline::new(&model, base.clone().schedule(schedule)).unwrap();
    let mut full = Pipeline::new(&model, base).unwrap();
    for step in 0..2 {
        let (x, y) = batch(step, 6);
        let a = split.train_step(&x, &y).unwrap();
        let b = full.train_step(&x, &y).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-6);
    }
    let (a, b) = (split.parameters().unwrap(), full.parameters().unwrap());
    for (name, w) in &b {
        assert!(max_rel_err(&a[name], w) < 1e-6, "{name}");
    }
}

#[test]
fn loss_and_gradients_do_not_depend_on_microbatch_count() {
    let model = Toy { dense: 2 };
    let (x, y) = batch(0, 12);
    let mut results = Vec::new();
    for m in [1, 2, 3, 6, 12] {
        let mut pipe = Pipeline::new(&model, config(2, ScheduleKind::OneFOneB, m)).unwrap();
        let loss = pipe.train_step(&x, &y).unwrap().loss;
        results.push((m, loss, pipe.gradients().unwrap()));
    }
    let (_, loss0, grads0) = &results[0];
    for (m, loss, grads) in &results[1..] {
        assert!(((loss - loss0) / loss0).abs() < 1e-6, "m={m}");
        for (name, g) in grads0 {
            assert!(max_rel_err(&grads[name], g) < 1e-5, "m={m} {name}");
        }
    }
}

fn expect_failure(stages: usize, fault: Fault, expect_stage: usize, expect_text: &str) {
    let model = Toy { dense: 3 };
    let mut pipe = Pipeline::new(&model, config(stages, ScheduleKind::OneFOneB, 4)).unwrap();
    inject_fault(&mut pipe, fault).unwrap();
    let (x, y) = batch(0, 8);
    let started = Instant::now();
    let err = pipe.train_step(&x, &y).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "failure took {:?}", started.elapsed());
    match &err {
        EngineError::StageFailed { stage, message, .. } => {
            assert_eq!(*stage, expect_stage, "{err}");
            assert!(message.contains(expect_text), "{err}");
        }
        other => panic!("expected a stage failure, got {other}"),
    }
    // The pipeline is stopped for good and says why.
    let again = pipe.train_step(&x, &y).unwrap_err();
    assert!(matches!(again, EngineError::Stopped(_)), "{again}");
    drop(pipe); // joins: must not hang
}

#[test]
fn a_failing_stage_stops_the_whole_pipeline() {
    let at = |s: &str| Some(s.parse::<Action>().unwrap());
    // Errors at the first stage's first forward, mid-pipeline backward, and last stage.
    expect_failure(3, Fault { stage: 0, at: at("0F0"), kind: FaultKind::Error }, 0, "injected fault");
    expect_failure(3, Fault { stage: 1, at: at("1B2"), kind: FaultKind::Error }, 1, "injected fault");
    expect_failure(4, Fault { stage: 3, at: at("3F1"), kind: FaultKind::Error }, 3, "injected fault");
    // A panic is caught and reported, not propagated as a hang or an abort.
    expect_failure(3, Fault { stage: 2, at: at("2B0"), kind: FaultKind::Panic }, 2, "injected panic");
    // A NaN loss on the last stage.
    expect_failure(2, Fault { stage: 1, at: at("1F3"), kind: FaultKind::NonFiniteLoss }, 1, "non-finite loss");
    // A failure at the optimizer step, after the collective.
    expect_failure(3, Fault { stage: 1, at: None, kind: FaultKind::Error }, 1, "optimizer step");
}

#[test]
fn failure_message_names_stage_and_action() {
    let model = Toy { dense: 3 };
    let fault = Fault { stage: 1, at: Some("1F2".parse().unwrap()), kind: FaultKind::Error };
    let mut pipe = Pipeline::new(&model, config(2, ScheduleKind::GPipe, 4)).unwrap();
    let nowhere = inject_fault(&mut pipe, Fault { stage: 2, ..fault }).unwrap_err().to_string();
    assert!(nowhere.contains("no stage 2"), "{nowhere}");
    inject_fault(&mut pipe, fault).unwrap();
    let (x, y) = batch(0, 8);
    let msg = pipe.train_step(&x, &y).unwrap_err().to_string();
    assert!(msg.contains("stage 1 failed at 1F2 (micro-batch 2)"), "{msg}");
}

#[test]
fn bad_inputs_are_rejected_with_clear_errors() {
    let model = Toy { dense: 1 };
    let mut pipe = Pipeline::new(&model, config(2, ScheduleKind::OneFOneB, 4)).unwrap();
    let (x, y) = batch(0, 6);
    let msg = pipe.train_step(&x, &y).unwrap_err().to_string();
    assert!(msg.contains("batch size 6 is not divisible into 4 micro-batches"), "{msg}");
    let long = Tensor::zeros((4, 17), DType::U32, &Device::Cpu).unwrap();
    let msg = pipe.train_step(&long, &long).unwrap_err().to_string();
    assert!(msg.contains("exceeds the context"), "{msg}");
    let floats = Tensor::zeros((4, 5, 3), DType::F32, &Device::Cpu).unwrap();
    let msg = pipe.train_step(&floats, &y.narrow(0, 0, 4).unwrap()).unwrap_err().to_string();
    assert!(msg.contains("expects token ids"), "{msg}");
    let (x8, y8) = batch(0, 8);
    let msg = pipe.train_step(&x8, &y8.narrow(1, 0, 4).unwrap()).unwrap_err().to_string();
    assert!(msg.contains("targets of shape [8, 4] do not match token ids of shape [8, 5]"), "{msg}");
    let too_big = (x8.to_dtype(DType::F32).unwrap() + VOCAB as f64).unwrap().to_dtype(DType::U32).unwrap();
    let msg = pipe.train_step(&too_big, &y8).unwrap_err().to_string();
    assert!(msg.contains("token id 21 is beyond the model's 11 vocabulary"), "{msg}");
    let msg = pipe.train_step(&x8, &too_big).unwrap_err().to_string();
    assert!(msg.contains("target token id"), "{msg}");
    // i64 ids can be negative: refused here, not as an out-of-range index in a stage.
    let negative = (x8.to_dtype(DType::F32).unwrap() - 3.0).unwrap().to_dtype(DType::I64).unwrap();
    let msg = pipe.train_step(&negative, &y8).unwrap_err().to_string();
    assert!(msg.contains("token id -3 is negative"), "{msg}");
    // Bad input is not a stage failure: the pipeline keeps working.
    let (x, y) = batch(0, 8);
    pipe.train_step(&x, &y).unwrap();

    let err = Pipeline::new(&model, config(0, ScheduleKind::OneFOneB, 4)).unwrap_err();
    assert!(err.to_string().contains("at least one stage"), "{err}");
    let err = Pipeline::new(&model, config(4, ScheduleKind::OneFOneB, 4)).unwrap_err();
    assert!(err.to_string().contains("cannot split 3 layers into 4 stages"), "{err}");
    let wrong = Schedule::one_f_one_b(3, 4).unwrap();
    let err = Pipeline::new(&model, config(2, ScheduleKind::OneFOneB, 4).schedule(wrong)).unwrap_err();
    assert!(err.to_string().contains("is for 3 stages"), "{err}");
    let err = Pipeline::new(&model, config(2, ScheduleKind::OneFOneB, 4).threads_per_stage(0)).unwrap_err();
    assert!(err.to_string().contains("threads per stage must be at least 1"), "{err}");
    // A pipeline has applied a budget: candle's process-wide elementwise pool is built and sized.
    assert!(brigade_engine::pipeline::candle_elementwise_threads().is_some_and(|n| n >= 1));
}

#[test]
fn evaluation_runs_forward_only_and_matches_the_reference() {
    let model = Toy { dense: 2 };
    let cfg = config(3, ScheduleKind::OneFOneB, 2);
    let mut reference = ReferenceTrainer::new(&model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.seed).unwrap();
    let mut pipe = Pipeline::new(&model, cfg).unwrap();
    let (x, y) = batch(5, 4);
    let eval = pipe.evaluate(&x, &y).unwrap();
    let logits = reference.forward(&x, Mode::Eval).unwrap();
    let want = brigade_engine::loss::microbatch_loss(LossKind::CrossEntropy, &logits, &y, y.elem_count())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(((eval.loss - want) / want).abs() < 1e-5, "{} vs {want}", eval.loss);
    assert_eq!(eval.terms, 20);
    assert_eq!(eval.correct, brigade_engine::loss::correct_predictions(&logits, &y).unwrap());
    // Evaluation does not change the weights.
    let before = pipe.parameters().unwrap();
    pipe.evaluate(&x, &y).unwrap();
    let after = pipe.parameters().unwrap();
    for (name, w) in &before {
        assert_eq!(max_rel_err(&after[name], w), 0.0);
    }
}
