//! AdamW over many tensors at once: the CPU twin ([`step`], [`step_many_slices`]) and a
//! tensor-level [`step_many`] that updates f32 master weights and both moments in place, on the
//! CPU or (with the `cuda` feature) in one CUDA launch for all the tensors (`adamw_step_*` in
//! `cuda/brigade.cu`, reading f32 or bf16 gradients and optionally writing a bf16 copy of each
//! updated parameter).
//!
//! The update is brigade's optimizer (`engine/src/optim.rs`, PyTorch's `AdamW`) operation for
//! operation, with the same f64 → f32 roundings candle's scalar ops make, so a step here gives
//! the engine's numbers exactly:
//! ```text
//! g = g·scale                (gradient clipping's factor; 1 leaves g as it is)
//! m = m·β1 + g·(1 − β1)
//! v = v·β2 + g²·(1 − β2)
//! denom = √v · (1 / √(1 − β2ᵗ)) + ε
//! p = p·(1 − lr·wd)            (only where weight decay applies)
//! p = p − (m / denom) · (lr / (1 − β1ᵗ))
//! ```
//! The CUDA kernel spells every operation with explicit round-to-nearest intrinsics so nvcc
//! cannot fuse them into FMAs, which would change the last bit.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

/// One AdamW step's hyper-parameters; `step` counts from 1 (bias correction uses it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// Multiplies every gradient before the update (the global-norm clipping factor, applied
    /// in the same pass instead of a separate one over the gradients); 1 for none.
    pub grad_scale: f64,
}

/// The f32 scalars of one step, derived in f64 and rounded once, as candle's affine ops round
/// the engine's f64 scalars.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub inv_sqrt_bias_correction2: f32,
    pub eps: f32,
    pub step_size: f32,
    pub decay_factor: f32,
    pub grad_scale: f32,
}

impl AdamWStep {
    /// Errors unless `step >= 1`, the betas are in `[0, 1)`, and `lr`, `eps`, `weight_decay`
    /// are finite and >= 0.
    pub fn scalars(&self) -> Result<AdamWScalars> {
        let Self { lr, beta1, beta2, eps, weight_decay, step, grad_scale } = *self;
        if step == 0 {
            bail!("adamw: step counts from 1, got 0")
        }
        if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
            bail!("adamw: betas must be in [0, 1), got ({beta1}, {beta2})")
        }
        if ![lr, eps, weight_decay].iter().all(|x| x.is_finite() && *x >= 0.0) {
            bail!("adamw: lr, eps and weight decay must be finite and >= 0, got {lr}, {eps}, {weight_decay}")
        }
        if !(grad_scale.is_finite() && grad_scale >= 0.0) {
            bail!("adamw: the gradient scale must be finite and >= 0, got {grad_scale}")
        }
        // The engine's `powi(step as i32)`; past i32::MAX steps both corrections are 1 anyway.
        let t = step.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        Ok(AdamWScalars {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_sqrt_bias_correction2: (1.0 / bc2.sqrt()) as f32,
            eps: eps as f32,
            step_size: (lr / bc1) as f32,
            decay_factor: (1.0 - lr * weight_decay) as f32,
            grad_scale: grad_scale as f32,
        })
    }
}

/// One element's update (the CUDA kernel's loop body).
#[inline(always)]
fn update(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, s: &AdamWScalars, decay: bool) {
    // `g * 1.0` is `g` exactly; otherwise this is candle's `grad * scale` (an f32 product).
    let g = g * s.grad_scale;
    *m = *m * s.beta1 + g * s.one_minus_beta1;
    *v = *v * s.beta2 + (g * g) * s.one_minus_beta2;
    let denom = v.sqrt() * s.inv_sqrt_bias_correction2 + s.eps;
    let decayed = if decay { *p * s.decay_factor } else { *p };
    *p = decayed - (*m / denom) * s.step_size;
}

/// Elements per rayon task: large enough that the fork/join cost (µs) is noise.
const CHUNK: usize = 1 << 16;

/// One tensor's update in place. `decay` says whether weight decay applies to it.
pub fn step(
    param: &mut [f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    grad: &[f32],
    decay: bool,
    h: &AdamWStep,
) -> Result<()> {
    let n = param.len();
    if exp_avg.len() != n || exp_avg_sq.len() != n || grad.len() != n {
        bail!(
            "adamw: param ({n}), exp_avg ({}), exp_avg_sq ({}) and grad ({}) must have one length",
            exp_avg.len(),
            exp_avg_sq.len(),
            grad.len()
        )
    }
    let s = h.scalars()?;
    let body = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
        for i in 0..p.len() {
            update(&mut p[i], &mut m[i], &mut v[i], g[i], &s, decay);
        }
    };
    if n > CHUNK && rayon::current_num_threads() > 1 {
        param
            .par_chunks_mut(CHUNK)
            .zip(exp_avg.par_chunks_mut(CHUNK))
            .zip(exp_avg_sq.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|((p, m), (v, g))| body(p, m, v, g));
    } else {
        body(param, exp_avg, exp_avg_sq, grad);
    }
    Ok(())
}

/// One parameter's slices for [`step_many_slices`].
pub struct AdamWSlices<'a> {
    pub param: &'a mut [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub grad: &'a [f32],
    pub decay: bool,
}

/// The CPU twin of the multi-tensor kernel: [`step`] for every parameter.
pub fn step_many_slices(params: &mut [AdamWSlices<'_>], h: &AdamWStep) -> Result<()> {
    for p in params.iter_mut() {
        step(p.param, p.exp_avg, p.exp_avg_sq, p.grad, p.decay, h)?;
    }
    Ok(())
}

/// One parameter's tensors for [`step_many`]: `param`, `exp_avg`, `exp_avg_sq` are f32,
/// contiguous, of one shape, and updated in place; `grad` has that shape, f32 or bf16;
/// `param_bf16`, when given, is a bf16 tensor of that shape overwritten with the updated
/// parameter. No two of them may share storage.
pub struct AdamWSlot<'a> {
    pub param: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub grad: &'a Tensor,
    pub decay: bool,
    pub param_bf16: Option<&'a Tensor>,
}

fn check_slot(i: usize, s: &AdamWSlot<'_>, dev: &candle_core::Device, grad_dtype: DType) -> Result<()> {
    let shape = s.param.shape();
    let state = [s.param, s.exp_avg, s.exp_avg_sq];
    if state.iter().any(|t| t.dtype() != DType::F32) {
        bail!("adamw: parameter {i}: param, exp_avg and exp_avg_sq must be f32")
    }
    if s.grad.dtype() != grad_dtype || !matches!(grad_dtype, DType::F32 | DType::BF16) {
        bail!(
            "adamw: parameter {i}: gradients must all be f32 or all bf16, got {:?} after {grad_dtype:?}",
            s.grad.dtype()
        )
    }
    let all: Vec<&Tensor> = state.iter().copied().chain([s.grad]).chain(s.param_bf16).collect();
    if all.iter().any(|t| t.shape() != shape) {
        bail!("adamw: parameter {i}: param {shape:?}, its moments, grad and bf16 copy must share a shape")
    }
    if all.iter().any(|t| !t.is_contiguous()) {
        bail!("adamw: parameter {i}: every tensor must be contiguous")
    }
    if all.iter().any(|t| !t.device().same_device(dev)) {
        bail!("adamw: parameter {i}: every tensor must be on the first parameter's device")
    }
    if s.param_bf16.is_some_and(|t| t.dtype() != DType::BF16) {
        bail!("adamw: parameter {i}: the parameter copy must be bf16")
    }
    let ids: Vec<_> = all.iter().map(|t| t.id()).collect();
    if (1..ids.len()).any(|a| ids[..a].contains(&ids[a])) {
        bail!("adamw: parameter {i}: the same tensor is passed twice")
    }
    Ok(())
}

/// AdamW on every parameter in `slots`, in place (see [`AdamWSlot`] for the contract). On a
/// CUDA device it is one kernel launch for all of them; on the CPU it is [`step`] per tensor.
pub fn step_many(slots: &[AdamWSlot<'_>], h: &AdamWStep) -> Result<()> {
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let scalars = h.scalars()?;
    let dev = first.param.device();
    for (i, s) in slots.iter().enumerate() {
        check_slot(i, s, dev, first.grad.dtype())?;
    }
    if dev.is_cpu() {
        return slots.iter().try_for_each(|s| step_cpu(s, h));
    }
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return crate::cuda::adamw_step_many(slots, &scalars);
    }
    let _ = scalars;
    bail!("adamw: no kernel for {:?}", dev.location())
}

/// Runs a closure on a CPU tensor's storage, mutably, through candle's in-place op hook.
struct OnCpu<F: Fn(&mut CpuStorage, &Layout) -> Result<()>>(F);

impl<F: Fn(&mut CpuStorage, &Layout) -> Result<()>> InplaceOp1 for OnCpu<F> {
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        (self.0)(s, l)
    }
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// One slot on the CPU: the three f32 tensors are opened for writing one inside the other
/// (candle lends one storage per in-place op), then [`step`] runs on the three slices.
fn step_cpu(s: &AdamWSlot<'_>, h: &AdamWStep) -> Result<()> {
    let grad: Vec<f32> = s.grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    s.exp_avg.inplace_op1(&OnCpu(|ms, ml| {
        let m = RefCell::new(f32_mut(ms, ml)?);
        s.exp_avg_sq.inplace_op1(&OnCpu(|vs, vl| {
            let v = RefCell::new(f32_mut(vs, vl)?);
            s.param.inplace_op1(&OnCpu(|ps, pl| {
                step(f32_mut(ps, pl)?, &mut m.borrow_mut(), &mut v.borrow_mut(), &grad, s.decay, h)
            }))
        }))
    }))?;
    if let Some(copy) = s.param_bf16 {
        let p: Vec<f32> = s.param.flatten_all()?.to_vec1()?;
        copy.inplace_op1(&OnCpu(|cs, cl| match (cs, cl.contiguous_offsets()) {
            (CpuStorage::BF16(dst), Some((a, b))) => {
                dst[a..b].iter_mut().zip(&p).for_each(|(d, &x)| *d = bf16::from_f32(x));
                Ok(())
            }
            _ => bail!("adamw: the parameter copy must be a contiguous bf16 tensor"),
        }))?;
    }
    Ok(())
}
