//! Optimizers with visible state (so checkpoints can save and restore it) and the
//! learning-rate schedule.
//!
//! candle-nn's `AdamW` keeps its moments private; brigade's optimizers keep per-parameter state
//! in a public map keyed by the parameter's canonical name, so the state of a stage can be
//! saved from that stage and restored on any other layout. Update rules follow PyTorch's
//! `torch.optim.AdamW` and `torch.optim.SGD` exactly.

use std::collections::BTreeMap;
use std::f64::consts::PI;

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
    Sgd { momentum_buffer: Option<Tensor> },
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
            ParamState::Sgd { momentum_buffer } => ParamState::Sgd {
                momentum_buffer: momentum_buffer.as_ref().map(|b| b.to_device(device)).transpose()?,
            },
        })
    }
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

    /// Replaces the state of one parameter (used when resuming).
    pub fn set_state(&mut self, name: impl Into<String>, state: ParamState) {
        self.state.insert(name.into(), state);
    }

    /// Applies one update to `var` given its gradient. `decay` says whether weight decay
    /// applies to this parameter.
    pub fn update(&mut self, name: &str, var: &Var, grad: &Tensor, lr: f64, decay: bool) -> Result<()> {
        let param = var.as_tensor();
        match self.config {
            OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
                let state = self.state.entry(name.to_string()).or_insert_with(|| ParamState::AdamW {
                    exp_avg: param.zeros_like().expect("zeros_like of an existing tensor"),
                    exp_avg_sq: param.zeros_like().expect("zeros_like of an existing tensor"),
                    step: 0,
                });
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
                let decayed = if decay && weight_decay != 0.0 {
                    (param * (1.0 - lr * weight_decay))?
                } else {
                    param.clone()
                };
                let update = (exp_avg.div(&denom)? * (lr / bias_correction1))?;
                var.set(&(decayed - update)?)?;
            }
            OptimizerConfig::Sgd { momentum, weight_decay, nesterov } => {
                let mut g = if decay && weight_decay != 0.0 {
                    (grad + (param * weight_decay)?)?
                } else {
                    grad.clone()
                };
                if momentum != 0.0 {
                    let state = self
                        .state
                        .entry(name.to_string())
                        .or_insert(ParamState::Sgd { momentum_buffer: None });
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
    use candle_core::Device;

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
                let b = match buf { None => d, Some(b) => mom * b + d };
                buf = Some(b);
                x -= lr * if nesterov { d + mom * b } else { b };
            }
            assert!((values(&p)[0] as f64 - x).abs() < 1e-6, "nesterov={nesterov}");
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
