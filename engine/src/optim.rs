//! Optimizers with visible state (so checkpoints can save and restore it) and the
//! learning-rate schedule.
//!
//! candle-nn's `AdamW` keeps its moments private; brigade's optimizers keep per-parameter state
//! in a public map keyed by the parameter's canonical name, so the state of a stage can be
//! saved from that stage and restored on any other layout. Update rules follow PyTorch's
//! `torch.optim.AdamW` and `torch.optim.SGD` exactly.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use brigade_kernels::adamw::{self, AdamWSlot, AdamWStep};
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which optimizer to run, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum OptimizerConfig {
    /// Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's `AdamW`.
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    /// SGD with (optionally Nesterov) momentum and L2 weight decay, PyTorch's `SGD`.
    Sgd { momentum: f64, weight_decay: f64, nesterov: bool },
}

impl OptimizerConfig {
    /// nanoGPT's AdamW defaults: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    pub fn adamw() -> Self {
        Self::AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }

    /// SGD with momentum 0.9 and weight decay 5e-4, the usual ResNet recipe.
    pub fn sgd() -> Self {
        Self::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false }
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::adamw()
    }
}

/// One parameter's optimizer state.
#[derive(Debug, Clone)]
pub enum ParamState {
    AdamW {
        /// First moment (PyTorch's `exp_avg`).
        exp_avg: Tensor,
        /// Second moment (PyTorch's `exp_avg_sq`).
        exp_avg_sq: Tensor,
        /// Steps taken for this parameter (bias correction uses it).
        step: u64,
    },
    Sgd {
        momentum_buffer: Option<Tensor>,
    },
}

impl ParamState {
    /// The same state with its tensors on `device` (resuming onto a stage's device).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(match self {
            ParamState::AdamW { exp_avg, exp_avg_sq, step } => ParamState::AdamW {
                exp_avg: exp_avg.to_device(device)?,
                exp_avg_sq: exp_avg_sq.to_device(device)?,
                step: *step,
            },
            ParamState::Sgd { momentum_buffer } => {
                ParamState::Sgd { momentum_buffer: momentum_buffer.as_ref().map(|b| b.to_device(device)).transpose()? }
            }
        })
    }
}

/// One parameter's part in [`Optimizer::step_many`].
pub struct ParamUpdate<'a> {
    /// Canonical name (the state's key).
    pub name: &'a str,
    /// The f32 master weight, updated in place.
    pub var: &'a Var,
    pub grad: &'a Tensor,
    /// Whether weight decay applies to this parameter.
    pub decay: bool,
    /// A bf16 copy of the parameter the layers compute with, refreshed by the step.
    pub bf16_copy: Option<&'a Tensor>,
}

/// An optimizer over named parameters. Each stage owns one for its own parameters.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: BTreeMap<String, ParamState>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, state: BTreeMap::new() }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Per-parameter state, by canonical parameter name.
    pub fn state(&self) -> &BTreeMap<String, ParamState> {
        &self.state
    }

    /// Replaces the state of one parameter (used when resuming). The state's tensors are
    /// copied: [`Optimizer::step_many`] updates them in place, and the caller's stay as given.
    pub fn set_state(&mut self, name: impl Into<String>, state: ParamState) -> Result<()> {
        let owned = match state {
            ParamState::AdamW { exp_avg, exp_avg_sq, step } => {
                ParamState::AdamW { exp_avg: exp_avg.copy()?, exp_avg_sq: exp_avg_sq.copy()?, step }
            }
            ParamState::Sgd { momentum_buffer } => {
                ParamState::Sgd { momentum_buffer: momentum_buffer.map(|b| b.copy()).transpose()? }
            }
        };
        self.state.insert(name.into(), owned);
        Ok(())
    }

    /// One step for many parameters at once: the pipeline's optimizer step. Every gradient is
    /// first multiplied by `grad_scale` (the clipping factor; 1 for none). Each parameter's
    /// `bf16_copy`, when given, is overwritten with the updated parameter rounded to bf16 (the
    /// layers' mixed-precision view).
    ///
    /// AdamW runs the fused multi-tensor kernel ([`brigade_kernels::adamw::step_many`]: one pass
    /// over each tensor on the CPU, one launch for all of them on a GPU), updating the f32
    /// parameters and moments in place; it gives [`Optimizer::update`]'s numbers bit for bit
    /// (the single-device reference keeps `update`, candle's composition, as the yardstick).
    /// SGD runs [`Optimizer::update`] per parameter.
    pub fn step_many(&mut self, params: &[ParamUpdate<'_>], lr: f64, grad_scale: f64) -> Result<()> {
        let OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } = self.config else {
            for p in params {
                let grad = if grad_scale < 1.0 { (p.grad * grad_scale)? } else { p.grad.clone() };
                self.update(p.name, p.var, &grad, lr, p.decay)?;
                if let Some(copy) = p.bf16_copy {
                    copy.slice_set(&p.var.as_tensor().to_dtype(copy.dtype())?, 0, 0)?;
                }
            }
            return Ok(());
        };
        // Parameters that resumed from different steps (a partial checkpoint) step in groups.
        let mut by_step: BTreeMap<u64, Vec<(usize, Tensor)>> = BTreeMap::new();
        for (i, p) in params.iter().enumerate() {
            let state = match self.state.entry(p.name.to_string()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let param = p.var.as_tensor();
                    e.insert(ParamState::AdamW {
                        exp_avg: param.zeros_like()?,
                        exp_avg_sq: param.zeros_like()?,
                        step: 0,
                    })
                }
            };
            let ParamState::AdamW { exp_avg, exp_avg_sq, step } = state else {
                candle_core::bail!("optimizer state of {} is not AdamW state", p.name);
            };
            if !exp_avg.is_contiguous() {
                *exp_avg = exp_avg.copy()?;
            }
            if !exp_avg_sq.is_contiguous() {
                *exp_avg_sq = exp_avg_sq.copy()?;
            }
            *step += 1;
            by_step.entry(*step).or_default().push((i, p.grad.contiguous()?));
        }
        for (step, group) in by_step {
            let slots: Vec<AdamWSlot<'_>> = group
                .iter()
                .map(|(i, grad)| {
                    let p = &params[*i];
                    let Some(ParamState::AdamW { exp_avg, exp_avg_sq, .. }) = self.state.get(p.name) else {
                        unreachable!("state created above")
                    };
                    AdamWSlot {
                        param: p.var.as_tensor(),
                        exp_avg,
                        exp_avg_sq,
                        grad,
                        decay: p.decay && weight_decay != 0.0,
                        param_bf16: p.bf16_copy,
                    }
                })
                .collect();
            let hyper = AdamWStep { lr, beta1, beta2, eps, weight_decay, step, grad_scale: grad_scale.min(1.0) };
            adamw::step_many(&slots, &hyper)?;
        }
        Ok(())
    }

    /// Applies one update to `var` given its gradient. `decay` says whether weight decay
    /// applies to this parameter.
    pub fn update(&mut self, name: &str, var: &Var, grad: &Tensor, lr: f64, decay: bool) -> Result<()> {
        let param = var.as_tensor();
        match self.config {
            OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
                let state = match self.state.entry(name.to_string()) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(ParamState::AdamW {
                        exp_avg: param.zeros_like()?,
                        exp_avg_sq: param.zeros_like()?,
                        step: 0,
                    }),
                };
                let ParamState::AdamW { exp_avg, exp_avg_sq, step } = state else {
                    candle_core::bail!("optimizer state of {name} is not AdamW state");
                };
                *step += 1;
                let t = *step as i32;
                *exp_avg = ((&*exp_avg * beta1)? + (grad * (1.0 - beta1))?)?;
                *exp_avg_sq = ((&*exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                let bias_correction1 = 1.0 - beta1.powi(t);
                let bias_correction2 = 1.0 - beta2.powi(t);
                let denom = ((exp_avg_sq.sqrt()? / bias_correction2.sqrt())? + eps)?;
                let decayed =
                    if decay && weight_decay != 0.0 { (param * (1.0 - lr * weight_decay))? } else { param.clone() };
                let update = (exp_avg.div(&denom)? * (lr / bias_correction1))?;
                var.set(&(decayed - update)?)?;
            }
            OptimizerConfig::Sgd { momentum, weight_decay, nesterov } => {
                let mut g = if decay && weight_decay != 0.0 { (grad + (param * weight_decay)?)? } else { grad.clone() };
                if momentum != 0.0 {
                    let state = self.state.entry(name.to_string()).or_insert(ParamState::Sgd { momentum_buffer: None });
                    let ParamState::Sgd { momentum_buffer } = state else {
                        candle_core::bail!("optimizer state of {name} is not SGD state");
                    };
                    let buf = match momentum_buffer.take() {
                        None => g.clone(),
                        Some(b) => ((b * momentum)? + &g)?,
                    };
                    g = if nesterov { (&g + (&buf * momentum)?)? } else { buf.clone() };
                    *momentum_buffer = Some(buf);
                }
                var.set(&(param - (g * lr)?)?)?;
            }
        }
        Ok(())
    }
}

/// Learning rate per optimizer step: linear warm-up, then cosine decay to `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base_lr: f64,
    /// Steps of linear warm-up from `base_lr / warmup_steps` to `base_lr`.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr` (it stays there afterwards).
    pub total_steps: u64,
    pub min_lr: f64,
}

impl LrSchedule {
    pub fn constant(lr: f64) -> Self {
        Self { base_lr: lr, warmup_steps: 0, total_steps: 0, min_lr: lr }
    }

    pub fn warmup_cosine(base_lr: f64, warmup_steps: u64, total_steps: u64, min_lr: f64) -> Self {
        Self { base_lr, warmup_steps, total_steps, min_lr }
    }

    /// The learning rate for (0-based) optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.total_steps <= self.warmup_steps {
            return if self.total_steps == 0 { self.base_lr } else { self.min_lr };
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn adamw_matches_closed_form() {
        // Two AdamW steps computed by hand with PyTorch's update rule.
        let (b1, b2, eps, wd, lr) = (0.9, 0.999, 1e-8, 0.1, 0.01);
        let mut opt = Optimizer::new(OptimizerConfig::AdamW { beta1: b1, beta2: b2, eps, weight_decay: wd });
        let p = var(&[1.0, -2.0]);
        let grads = [[0.5f64, -1.0], [0.25, 2.0]];
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            opt.update("p", &p, &gt, lr, true).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
                expect[i] = expect[i] * (1.0 - lr * wd) - lr * (m[i] / (1.0 - b1.powi(t))) / denom;
            }
        }
        for (got, want) in values(&p).iter().zip(expect) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        match &opt.state()["p"] {
            ParamState::AdamW { step, .. } => assert_eq!(*step, 2),
            other => panic!("unexpected state {other:?}"),
        }
    }

    #[test]
    fn adamw_skips_decay_when_told() {
        let mut opt = Optimizer::new(OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5 });
        let p = var(&[2.0]);
        let zero = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        opt.update("p", &p, &zero, 0.1, false).unwrap();
        assert_eq!(values(&p), vec![2.0]);
        opt.update("p", &p, &zero, 0.1, true).unwrap();
        assert!((values(&p)[0] - 2.0 * 0.95).abs() < 1e-6);
    }

    #[test]
    fn sgd_momentum_and_nesterov_match_pytorch() {
        for nesterov in [false, true] {
            let (mom, wd, lr) = (0.9, 0.01, 0.1);
            let mut opt = Optimizer::new(OptimizerConfig::Sgd { momentum: mom, weight_decay: wd, nesterov });
            let p = var(&[1.0]);
            let mut x = 1.0f64;
            let mut buf: Option<f64> = None;
            for g in [0.5f64, -0.25, 1.0] {
                opt.update("p", &p, &Tensor::new(&[g as f32], &Device::Cpu).unwrap(), lr, true).unwrap();
                let d = g + wd * x;
                let b = match buf {
                    None => d,
                    Some(b) => mom * b + d,
                };
                buf = Some(b);
                x -= lr * if nesterov { d + mom * b } else { b };
            }
            assert!((values(&p)[0] as f64 - x).abs() < 1e-6, "nesterov={nesterov}");
        }
    }

    /// The pipeline's fused step gives `update`'s numbers bit for bit (AdamW through the
    /// multi-tensor kernel, SGD through `update` itself), clipped or not, with and without
    /// decay, and writes the bf16 copies; resumed state is copied, not updated in the caller's
    /// tensors.
    #[test]
    fn step_many_equals_update_per_parameter() {
        let dev = Device::Cpu;
        for config in [OptimizerConfig::adamw(), OptimizerConfig::sgd()] {
            let init = [vec![0.5f32, -1.5, 2.0, 0.25], vec![3.0f32, -0.125]];
            let (a, b): (Vec<Var>, Vec<Var>) = init.iter().map(|v| (var(v), var(v))).unzip();
            let (mut fused, mut each) = (Optimizer::new(config), Optimizer::new(config));
            let resumed = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
            if let OptimizerConfig::AdamW { .. } = config {
                let state = ParamState::AdamW { exp_avg: resumed.clone(), exp_avg_sq: resumed.clone(), step: 3 };
                fused.set_state("p1", state.clone()).unwrap();
                each.set_state("p1", state).unwrap();
            }
            let copies: Vec<Tensor> = a.iter().map(|v| v.as_tensor().to_dtype(DType::BF16).unwrap()).collect();
            for (step, scale) in [(0, 1.0), (1, 0.37), (2, 2.5), (3, 0.9)] {
                let grads: Vec<Tensor> = init
                    .iter()
                    .map(|v| {
                        let g: Vec<f32> = v.iter().map(|x| (x * 1.7 + step as f32).sin()).collect();
                        Tensor::new(g.as_slice(), &dev).unwrap()
                    })
                    .collect();
                let names = ["p0", "p1"];
                let updates: Vec<ParamUpdate> = (0..2)
                    .map(|i| ParamUpdate {
                        name: names[i],
                        var: &a[i],
                        grad: &grads[i],
                        decay: i == 0,
                        bf16_copy: Some(&copies[i]),
                    })
                    .collect();
                fused.step_many(&updates, 0.01, scale).unwrap();
                for i in 0..2 {
                    let g = if scale < 1.0 { (&grads[i] * scale).unwrap() } else { grads[i].clone() };
                    each.update(names[i], &b[i], &g, 0.01, i == 0).unwrap();
                    assert_eq!(values(&a[i]), values(&b[i]), "{config:?} parameter {i} step {step}");
                    let rounded: Vec<f32> = b[i]
                        .as_tensor()
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(copies[i].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), rounded);
                }
            }
            assert_eq!(resumed.to_vec1::<f32>().unwrap(), vec![0.1, 0.2], "the resumed state was updated in place");
            if let ParamState::AdamW { step, .. } = &fused.state()["p1"] {
                assert_eq!(*step, 7, "p1 resumed at step 3 and took 4 more");
            }
        }
    }

    #[test]
    fn lr_schedule_warms_up_then_decays() {
        let s = LrSchedule::warmup_cosine(1.0, 4, 14, 0.1);
        assert!((s.lr(0) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 1.0).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.55).abs() < 1e-12, "midpoint of the cosine");
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
        assert!(s.lr(5) > s.lr(6));
        assert_eq!(LrSchedule::constant(0.3).lr(1000), 0.3);
    }
}
