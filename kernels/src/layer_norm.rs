//! Fused LayerNorm over the last dimension, forward and backward (after llm.c's
//! `layernorm_forward` / `layernorm_backward`).
//!
//! Forward, per row of length `C`: mean, then variance of the centred row (two passes over a
//! row that sits in L1, more accurate than `E[x²] - E[x]²`), `rstd = 1/sqrt(var + eps)`, then
//! `y = (x - mean) * rstd * w + b` in a third pass. The composition makes ~8 full-size
//! temporaries; this writes only `y`.
//!
//! Backward: candle's custom-op API returns a single tensor from the forward, so `mean`/`rstd`
//! are not kept; the backward op recomputes them (one cheap pass per row) rather than
//! widening the forward output. It computes, per row, with `xhat = (x - mean) * rstd`,
//! `g = dy * w`:
//!   `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`
//! and accumulates `dw += dy * xhat`, `db += dy` over rows. All three come out of one custom op
//! as one packed buffer `[dx | dw | db]` that is then split with zero-copy `narrow`s. Rows are
//! processed in rayon chunks, each with private `dw`/`db` accumulators reduced at the end, so
//! no atomics or locks are needed.
//!
//! Assumes `x: (..., C)`, `w, b: (C,)`, same float dtype (checked by the public wrapper).
//! Second-order gradients are not supported (the backward op is applied without autograd).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::{storage, view, with_float, Real, PAR_MIN_ELEMS};

pub(crate) struct LayerNorm {
    pub(crate) eps: f64,
}

/// Mean and 1/std of one row (the sums are `Real` row kernels: vectorised for f32).
#[inline]
fn row_stats<T: Real>(xr: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(xr.len() as f64);
    let mean = T::sum(xr) / n;
    let var = T::sum_sq_dev(xr, mean) / n;
    (mean, T::ONE / (var + eps).sqrt())
}

impl LayerNorm {
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Real>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = view::<T>(xs, xl)?;
        let w = view::<T>(ws, wl)?;
        let b = view::<T>(bs, bl)?;
        let c = w.len();
        let eps = T::from_f64(self.eps);
        let y = crate::cpu::new_rows(x.len(), c, |r, yr: &mut [T]| {
            let xr = &x[r * c..(r + 1) * c];
            let (mean, rstd) = row_stats(xr, eps);
            for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w.iter()).zip(b.iter()) {
                *o = (v - mean) * rstd * wv + bv;
            }
        });
        Ok((storage(y), xl.shape().clone()))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float!(self.name(), xs, |T| self.fwd::<T>(xs, xl, ws, wl, bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = crate::dense_on_gpu(x)?.apply_op3_no_bwd(
            &crate::dense_on_gpu(w)?,
            &crate::dense_on_gpu(dy)?,
            &LayerNormBwd { eps: self.eps },
        )?;
        let n = x.elem_count();
        let c = w.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c)?;
        let db = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

/// Rows per block of the backward's weight-gradient partial sums (fixed, so the blocking and
/// hence the rounding do not depend on the thread count).
const LN_BWD_ROWS_PER_BLOCK: usize = 64;

/// `(x, w, dy) -> [dx | dw | db]` flattened into one 1-D buffer of `numel(x) + 2C` values.
pub(crate) struct LayerNormBwd {
    pub(crate) eps: f64,
}

impl LayerNormBwd {
    /// `[dx | dw | db]` for the output gradient `dy`; with `residual`, `dx` is
    /// `residual + dx_ln`: the block's residual branch's gradient added in the pass that
    /// writes `dx`, instead of a separate add reading both back into a third buffer. The sum is
    /// the same single rounding as that add, so the bits are the composition's.
    pub(crate) fn run<T: Real>(&self, x: &[T], w: &[T], dy: &[T], residual: Option<&[T]>) -> Vec<T> {
        let c = w.len();
        let n = x.len();
        let eps = T::from_f64(self.eps);
        let inv_c = T::ONE / T::from_f64(c as f64);
        if c == 0 || n == 0 {
            return residual.map_or_else(|| vec![T::ZERO; n + 2 * c], |r| [r, &vec![T::ZERO; 2 * c]].concat());
        }
        // `dx` is written in full by the blocks below, so it starts uninitialised: no memset of
        // the whole buffer on the calling thread before the parallel pass.
        let mut out: Vec<T> = Vec::with_capacity(n + 2 * c);
        // Processes a block of rows, returning that block's [dw | db] contribution.
        let block = |row0: usize, dxb: &mut [MaybeUninit<T>]| -> Vec<T> {
            let mut acc = vec![T::ZERO; 2 * c];
            let (dw, db) = acc.split_at_mut(c);
            for (k, dxr) in dxb.chunks_mut(c).enumerate() {
                let r = row0 + k;
                let xr = &x[r * c..(r + 1) * c];
                let gr = &dy[r * c..(r + 1) * c];
                let (mean, rstd) = row_stats(xr, eps);
                // Pass 1: the two row reductions of the dx formula, plus dw/db.
                let (g_sum, gx_sum) = T::layer_norm_bwd_sums(xr, gr, w, mean, rstd, dw, db);
                let (g_mean, gx_mean) = (g_sum * inv_c, gx_sum * inv_c);
                // Pass 2: dx (plus the residual gradient).
                let ln_dx = |i: usize| {
                    let xhat = (xr[i] - mean) * rstd;
                    (gr[i] * w[i] - g_mean - xhat * gx_mean) * rstd
                };
                match residual {
                    Some(res) => {
                        let rr = &res[r * c..(r + 1) * c];
                        for (i, o) in dxr.iter_mut().enumerate() {
                            o.write(rr[i] + ln_dx(i));
                        }
                    }
                    None => {
                        for (i, o) in dxr.iter_mut().enumerate() {
                            o.write(ln_dx(i));
                        }
                    }
                }
            }
            acc
        };
        // Fixed blocks of rows whatever the thread count, their partial sums added in block
        // order: dw and db come out bit for bit the same on one thread or many, run to run.
        let block_len = LN_BWD_ROWS_PER_BLOCK * c;
        let dx = &mut out.spare_capacity_mut()[..n];
        let partials: Vec<Vec<T>> = if n >= PAR_MIN_ELEMS {
            dx.par_chunks_mut(block_len).enumerate().map(|(bi, dxb)| block(bi * LN_BWD_ROWS_PER_BLOCK, dxb)).collect()
        } else {
            dx.chunks_mut(block_len).enumerate().map(|(bi, dxb)| block(bi * LN_BWD_ROWS_PER_BLOCK, dxb)).collect()
        };
        let mut acc = vec![T::ZERO; 2 * c];
        for partial in &partials {
            acc.iter_mut().zip(partial).for_each(|(a, &b)| *a += b);
        }
        // SAFETY: the blocks above wrote all n elements of dx.
        unsafe { out.set_len(n) };
        out.extend_from_slice(&acc);
        out
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != gl.shape() {
            candle_core::bail!("layer-norm-bwd: x {:?} and dy {:?} differ in shape", xl.shape(), gl.shape())
        }
        with_float!(self.name(), xs, |T| {
            let x = view::<T>(xs, xl)?;
            let w = view::<T>(ws, wl)?;
            let dy = view::<T>(gs, gl)?;
            let out = self.run::<T>(&x, &w, &dy, None);
            let len = out.len();
            Ok((storage(out), Shape::from(len)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::layer_norm_bwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

/// [`crate::layer_norm_backward_residual`] on the CPU: `(dx, dw, db)` with `dx = residual +
/// dx_ln` written in one pass. The caller checked shapes, dtypes and devices.
pub(crate) fn layer_norm_backward_residual_cpu(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (rs, rl) = residual.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs), Storage::Cpu(rs)) = (&*xs, &*ws, &*gs, &*rs) else {
        candle_core::bail!("layer_norm_backward_residual: expected CPU tensors")
    };
    let op = LayerNormBwd { eps };
    let packed = with_float!("layer-norm-bwd-residual", xs, |T| {
        let out = op.run::<T>(&view(xs, xl)?, &view(ws, wl)?, &view(gs, gl)?, Some(&view(rs, rl)?));
        Tensor::from_vec(out, x.elem_count() + 2 * w.elem_count(), x.device())
    })?;
    let (n, c) = (x.elem_count(), w.elem_count());
    Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, packed.narrow(0, n, c)?, packed.narrow(0, n + c, c)?))
}
