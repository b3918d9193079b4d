//! Fused SwiGLU activation on the CPU (CUDA twins: `swiglu_*` in `cuda/brigade.cu`), forward
//! and backward: `silu(gate) · up` from the gate and up projections' joint output
//! `[gate | up]` `(..., 2F)`, as Llama's MLP computes it.
//!
//! With `σ = 1 / (1 + e^−g)`:
//! - forward: `a = g σ · u`, `(..., 2F) → (..., F)`;
//! - backward: `du = da · g σ`, `dg = da · u · σ (1 + g (1 − σ))`, written side by side as
//!   `[dg | du]` `(..., 2F)`, the layout of the joint projection's output gradient.
//!
//! One pass each, where the composition makes about a dozen temporaries on one thread (candle's
//! elementwise ops do not split over threads). `e^−g` is the vectorised [`crate::vmath::exp`]
//! for f32 (libm for f64, the precision reference); rows run on the caller's rayon pool.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};

use crate::cpu::{for_each_row, storage, view, with_float, Real};

/// Elementwise rows longer than this are processed in pieces (the `e^−g` scratch stays in L1).
const PIECE: usize = 1024;

/// `e^−x` over a slice: vectorised for f32.
trait NegExp: Real {
    fn neg_exp(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (Self::ZERO - v).exp();
        }
    }
}

impl NegExp for f32 {
    fn neg_exp(x: &[f32], out: &mut [f32]) {
        let mut neg = [0f32; PIECE];
        for (xp, op) in x.chunks(PIECE).zip(out.chunks_mut(PIECE)) {
            let neg = &mut neg[..xp.len()];
            neg.iter_mut().zip(xp).for_each(|(n, &v)| *n = -v);
            crate::vmath::exp(neg, op);
        }
    }
}

impl NegExp for f64 {}

/// `σ(g)` over a slice, into `out`.
#[inline]
fn sigmoid<T: NegExp>(g: &[T], out: &mut [T]) {
    T::neg_exp(g, out);
    for o in out.iter_mut() {
        *o = T::ONE / (T::ONE + *o);
    }
}

/// The half widths `F` of `[gate | up]` rows, checked even.
fn half_width(op: &str, l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&w) if w.is_multiple_of(2) => Ok(w / 2),
        _ => candle_core::bail!("{op}: the last dimension must hold [gate | up] (even width), got {:?}", l.dims()),
    }
}

/// `[gate | up] (..., 2F) -> silu(gate) · up (..., F)`.
pub(crate) struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let f = half_width(self.name(), l)?;
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        with_float!(self.name(), s, |T| {
            let gu = view::<T>(s, l)?;
            let mut a = vec![T::ZERO; gu.len() / 2];
            for_each_row(&mut a, f, |r, ar| {
                let (g, u) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
                let mut sig = [T::ZERO; PIECE];
                for ((ap, gp), up) in ar.chunks_mut(PIECE).zip(g.chunks(PIECE)).zip(u.chunks(PIECE)) {
                    let sig = &mut sig[..ap.len()];
                    sigmoid(gp, sig);
                    for i in 0..ap.len() {
                        ap[i] = gp[i] * sig[i] * up[i];
                    }
                }
            });
            Ok((storage(a), Shape::from(dims)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu_fwd(s, l)
    }
}

/// `([gate | up] (..., 2F), da (..., F)) -> [dgate | dup] (..., 2F)`.
pub(crate) struct SwiGluBwd;

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let f = half_width(self.name(), l)?;
        let (dims, ddims) = (l.dims(), gl.dims());
        if dims.len() != ddims.len() || dims[..dims.len() - 1] != ddims[..ddims.len() - 1] || ddims.last() != Some(&f) {
            candle_core::bail!(
                "{}: da {ddims:?} must be [gate | up] {dims:?} with the last dimension halved",
                self.name()
            )
        }
        with_float!(self.name(), s, |T| {
            let gu = view::<T>(s, l)?;
            let da = view::<T>(gs, gl)?;
            let mut out = vec![T::ZERO; gu.len()];
            for_each_row(&mut out, 2 * f, |r, row| {
                let (g, u) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
                let da = &da[r * f..(r + 1) * f];
                let (dg, du) = row.split_at_mut(f);
                let mut sig = [T::ZERO; PIECE];
                for start in (0..f).step_by(PIECE) {
                    let end = (start + PIECE).min(f);
                    let sig = &mut sig[..end - start];
                    sigmoid(&g[start..end], sig);
                    for (k, &s) in sig.iter().enumerate() {
                        let i = start + k;
                        let silu = g[i] * s;
                        du[i] = da[i] * silu;
                        dg[i] = da[i] * u[i] * (s * (T::ONE + g[i] * (T::ONE - s)));
                    }
                }
            });
            Ok((storage(out), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu_bwd(s1, l1, s2, l2)
    }
}
