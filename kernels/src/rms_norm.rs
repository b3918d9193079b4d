//! Fused RMSNorm over the last dimension (Llama's norm), forward and backward, on the CPU (the
//! CUDA twins are `rms_norm_*` in `cuda/brigade.cu`, launched from `cuda.rs`).
//!
//! Forward, per row of length `C`: `r = 1 / sqrt(mean(x²) + eps)`, `y = x · r · w`: one
//! reduction and one pass, where the composition makes six full-size temporaries on one thread.
//!
//! Backward, per row, recomputing `r` from `x` (one cheap reduction) rather than keeping it:
//! with `n = x · r` and `g = dy · w`,
//!   `dx = r · (g − n · mean(g · n))`, and `dw += dy · n` over rows.
//! `dx` and `dw` come out of one op as one packed buffer `[dx | dw]`, split with zero-copy
//! `narrow`s. Rows run in fixed blocks on the caller's rayon pool (the stage's threads), each
//! block with its own `dw` partial sum, added in block order: `dw`'s bits do not depend on the
//! thread count.
//!
//! Assumes `x: (..., C)`, `w: (C,)`, same float dtype (checked by the public wrappers).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use crate::cpu::{for_each_row, storage, view, with_float, Real, PAR_MIN_ELEMS};

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline]
fn inv_rms<T: Real>(xr: &[T], eps: T) -> T {
    let mean_sq = T::dot(xr, xr) / T::from_f64(xr.len() as f64);
    T::ONE / (mean_sq + eps).sqrt()
}

/// `(x, w) -> x / rms(x) · w`.
pub(crate) struct RmsNorm {
    pub(crate) eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        with_float!(self.name(), xs, |T| {
            let x = view::<T>(xs, xl)?;
            let w = view::<T>(ws, wl)?;
            let c = w.len();
            let eps = T::from_f64(self.eps);
            let mut y = vec![T::ZERO; x.len()];
            for_each_row(&mut y, c, |r, yr| {
                let xr = &x[r * c..(r + 1) * c];
                let inv = inv_rms(xr, eps);
                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w.iter()) {
                    *o = v * inv * wv;
                }
            });
            Ok((storage(y), xl.shape().clone()))
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
        crate::cuda::rms_norm_fwd(s1, l1, s2, l2, self.eps)
    }
}

/// Rows per block of the backward's gain-gradient partial sums (fixed, so the blocking and
/// hence the rounding do not depend on the thread count).
const RMS_BWD_ROWS_PER_BLOCK: usize = 64;

/// `(x, w, dy) -> [dx | dw]` flattened into one 1-D buffer of `numel(x) + C` values.
pub(crate) struct RmsNormBwd {
    pub(crate) eps: f64,
}

impl RmsNormBwd {
    fn run<T: Real>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let (c, n) = (w.len(), x.len());
        let eps = T::from_f64(self.eps);
        let inv_c = T::ONE / T::from_f64(c as f64);
        if c == 0 || n == 0 {
            return vec![T::ZERO; n + c];
        }
        // `dx` is written in full by the blocks below, so it starts uninitialised: no memset of
        // the whole buffer on the calling thread before the parallel pass (as `LayerNormBwd`).
        let mut out: Vec<T> = Vec::with_capacity(n + c);
        let block = |row0: usize, dxb: &mut [MaybeUninit<T>]| -> Vec<T> {
            let mut dw = vec![T::ZERO; c];
            let mut g = vec![T::ZERO; c];
            for (k, dxr) in dxb.chunks_mut(c).enumerate() {
                let r = row0 + k;
                let (xr, dyr) = (&x[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
                let inv = inv_rms(xr, eps);
                for i in 0..c {
                    g[i] = dyr[i] * w[i];
                    dw[i] += dyr[i] * (xr[i] * inv);
                }
                // mean(g · n) = r · mean(g · x).
                let mean_gn = T::dot(&g, xr) * inv * inv_c;
                for (i, o) in dxr.iter_mut().enumerate() {
                    o.write((g[i] - xr[i] * inv * mean_gn) * inv);
                }
            }
            dw
        };
        let block_len = RMS_BWD_ROWS_PER_BLOCK * c;
        let dx = &mut out.spare_capacity_mut()[..n];
        let partials: Vec<Vec<T>> = if n >= PAR_MIN_ELEMS {
            dx.par_chunks_mut(block_len).enumerate().map(|(bi, dxb)| block(bi * RMS_BWD_ROWS_PER_BLOCK, dxb)).collect()
        } else {
            dx.chunks_mut(block_len).enumerate().map(|(bi, dxb)| block(bi * RMS_BWD_ROWS_PER_BLOCK, dxb)).collect()
        };
        let mut dw = vec![T::ZERO; c];
        for partial in &partials {
            dw.iter_mut().zip(partial).for_each(|(a, &b)| *a += b);
        }
        // SAFETY: dx is whole rows (`cpu_fwd` checks x's row length against w's), every row lies
        // in one block, and each row writes all of its elements above.
        unsafe { out.set_len(n) };
        out.extend_from_slice(&dw);
        out
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
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
            candle_core::bail!("rms-norm-bwd: x {:?} and dy {:?} differ in shape", xl.shape(), gl.shape())
        }
        if xl.dims().last() != Some(&wl.shape().elem_count()) {
            candle_core::bail!("rms-norm-bwd: x {:?}'s rows and w {:?} differ in length", xl.shape(), wl.shape())
        }
        with_float!(self.name(), xs, |T| {
            let x = view::<T>(xs, xl)?;
            let w = view::<T>(ws, wl)?;
            let dy = view::<T>(gs, gl)?;
            let out = self.run::<T>(&x, &w, &dy);
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
        crate::cuda::rms_norm_bwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}
