//! Plain single-device training: the yardstick every schedule and stage layout must match.
//!
//! Deliberately simple and independent of the executor: one parameter store (so GPT's tied
//! embedding is one `Var` and autograd sums its two uses itself), no threads, no channels.
//! `accumulation` splits the batch into that many chunks processed one after the other with
//! gradients summed, which is what a pipeline with as many micro-batches computes; models with
//! cross-example statistics (BatchNorm) need it to be compared fairly, the rest can use 1.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Result, Tensor};

use crate::layer::{Layer, LossKind, Mode, ParamStore, PipelineModel};
use crate::loss::{loss_terms, microbatch_loss};
use crate::optim::{LrSchedule, Optimizer, OptimizerConfig};
use crate::pipeline::squared_norm;

pub struct ReferenceTrainer {
    layers: Vec<Box<dyn Layer>>,
    store: ParamStore,
    optimizer: Optimizer,
    lr: LrSchedule,
    grad_clip: Option<f64>,
    loss: LossKind,
    step: u64,
    last_grads: BTreeMap<String, Tensor>,
}

impl ReferenceTrainer {
    pub fn new(
        model: &dyn PipelineModel,
        optimizer: OptimizerConfig,
        lr: LrSchedule,
        grad_clip: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        Self::build(model, optimizer, lr, grad_clip, ParamStore::new(Device::Cpu, seed), &HashMap::new())
    }

    /// Like [`ReferenceTrainer::new`], but parameters start from `params` and BatchNorm
    /// buffers from `buffers` (canonical names, e.g. weights imported from PyTorch), as
    /// `PipelineConfig::initial_params` / `initial_buffers` do for the pipeline. Parameters
    /// not in `params` come from the initialiser with seed 0.
    pub fn with_initial(
        model: &dyn PipelineModel,
        optimizer: OptimizerConfig,
        lr: LrSchedule,
        grad_clip: Option<f64>,
        params: HashMap<String, Tensor>,
        buffers: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        Self::build(model, optimizer, lr, grad_clip, ParamStore::new(Device::Cpu, 0).with_overrides(params), buffers)
    }

    fn build(
        model: &dyn PipelineModel,
        optimizer: OptimizerConfig,
        lr: LrSchedule,
        grad_clip: Option<f64>,
        mut store: ParamStore,
        buffers: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        let specs = model.layers();
        let mut layers = specs.iter().map(|spec| spec.build(&mut store)).collect::<Result<Vec<_>>>()?;
        for (spec, layer) in specs.iter().zip(layers.iter_mut()) {
            let mine: HashMap<String, Tensor> = spec
                .buffer_specs()
                .into_iter()
                .filter_map(|b| buffers.get(&b.name).map(|t| (b.name, t.clone())))
                .collect();
            if !mine.is_empty() {
                layer.load_buffers(&mine)?;
            }
        }
        Ok(Self {
            layers,
            store,
            optimizer: Optimizer::new(optimizer),
            lr,
            grad_clip,
            loss: model.loss(),
            step: 0,
            last_grads: BTreeMap::new(),
        })
    }

    /// Forward through every layer.
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in self.layers.iter_mut() {
            h = layer.forward(&h, mode)?;
        }
        Ok(h)
    }

    /// One optimizer step on the batch; returns the mean loss.
    pub fn train_step(&mut self, inputs: &Tensor, targets: &Tensor, accumulation: usize) -> Result<f64> {
        let batch = inputs.dim(0)?;
        if accumulation == 0 || batch % accumulation != 0 {
            candle_core::bail!("batch {batch} is not divisible into {accumulation} chunks");
        }
        let chunk = batch / accumulation;
        let terms = loss_terms(targets);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut total = 0.0;
        for i in 0..accumulation {
            let x = inputs.narrow(0, i * chunk, chunk)?;
            let t = targets.narrow(0, i * chunk, chunk)?;
            let y = self.forward(&x, Mode::Train)?;
            let loss = microbatch_loss(self.loss, &y, &t, terms)?;
            total += loss.to_scalar::<f32>()? as f64;
            let store = loss.backward()?;
            for (name, _, var) in self.store.vars() {
                if let Some(g) = store.get(var.as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.to_string(), sum);
                }
            }
        }
        let mut sq = 0.0;
        for g in grads.values() {
            sq += squared_norm(g)?;
        }
        let norm = sq.sqrt();
        let scale = match self.grad_clip {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let lr = self.lr.lr(self.step);
        for (name, spec, var) in self.store.vars() {
            let Some(g) = grads.get(name) else { continue };
            let g = if scale < 1.0 { (g * scale)? } else { g.clone() };
            self.optimizer.update(name, var, &g, lr, spec.weight_decay)?;
        }
        self.last_grads = grads;
        self.step += 1;
        Ok(total)
    }

    pub fn parameters(&self) -> BTreeMap<String, Tensor> {
        self.store.vars().map(|(n, _, v)| (n.to_string(), v.as_tensor().clone())).collect()
    }

    /// Gradients of the last step, before clipping.
    pub fn gradients(&self) -> &BTreeMap<String, Tensor> {
        &self.last_grads
    }

    pub fn buffers(&self) -> BTreeMap<String, Tensor> {
        self.layers.iter().flat_map(|l| l.buffers()).collect()
    }
}
