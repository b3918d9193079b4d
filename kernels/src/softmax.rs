//! Fused softmax and log-softmax over the last dimension, with fused backward passes.
//!
//! Forward, per row of length `C`: one pass for the max (numerical safety), one pass writing
//! `exp(x - max)` while summing it, one pass scaling (softmax) or subtracting `log(sum)`
//! (log-softmax). The composition version makes five full-size temporaries; this makes one.
//! The row loops are [`Real`]'s row kernels: vectorised (`crate::vmath`) for f32, libm for f64.
//!
//! Backward only needs the forward *output* `y`, which candle hands to `bwd` as `res`, so
//! nothing is recomputed:
//! - softmax:     `dx = y * (dy - sum(dy * y))`
//! - log-softmax: `dx = dy - exp(y) * sum(dy)`
//!
//! Each backward is itself a custom op over `(y, dy)` applied without autograd (second-order
//! gradients are not supported). Assumes rank >= 1 (checked by the public wrapper); rows are
//! independent, so rayon parallelises over rows for large inputs.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{new_rows, storage, view, with_float, Real};

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

pub(crate) struct Softmax {
    pub(crate) log: bool,
}

impl Softmax {
    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = view::<T>(s, l)?;
        let c = last_dim(l);
        let log = self.log;
        let y = new_rows(x.len(), c, |r, yr: &mut [T]| {
            let xr = &x[r * c..(r + 1) * c];
            let max = T::row_max(xr);
            let sum = T::exp_shift_sum(xr, max, yr);
            if log {
                // `(v - max) - lse`, not `v - (max + lse)`: the first subtraction is exact
                // near the max, so large logits do not cost the small outputs their precision.
                let lse = sum.ln();
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = v - max - lse;
                }
            } else {
                let inv = T::ONE / sum;
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((storage(y), l.shape().clone()))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.log {
            "log-softmax-last-dim"
        } else {
            "softmax-last-dim"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        with_float!(self.name(), s, |T| self.fwd::<T>(s, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(crate::dense_on_gpu(y)?.apply_op2_no_bwd(&crate::dense_on_gpu(dy)?, &SoftmaxBwd { log: self.log })?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_fwd(s, l, self.log)
    }
}

/// `(y, dy) -> dx` for softmax / log-softmax, `y` being the forward output.
pub(crate) struct SoftmaxBwd {
    pub(crate) log: bool,
}

impl SoftmaxBwd {
    fn run<T: Real>(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = view::<T>(ys, yl)?;
        let dy = view::<T>(gs, gl)?;
        let c = last_dim(yl);
        let log = self.log;
        let dx = new_rows(y.len(), c, |r, dxr: &mut [T]| {
            let yr = &y[r * c..(r + 1) * c];
            let gr = &dy[r * c..(r + 1) * c];
            if log {
                T::log_softmax_bwd(yr, gr, T::sum(gr), dxr);
            } else {
                let dot = T::dot(yr, gr);
                for ((o, &yv), &g) in dxr.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (g - dot);
                }
            }
        });
        Ok((storage(dx), yl.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        if self.log {
            "log-softmax-last-dim-bwd"
        } else {
            "softmax-last-dim-bwd"
        }
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if yl.shape() != gl.shape() {
            candle_core::bail!("{}: y {:?} and dy {:?} differ in shape", self.name(), yl.shape(), gl.shape())
        }
        with_float!(self.name(), ys, |T| self.run::<T>(ys, yl, gs, gl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_bwd(s1, l1, s2, l2, self.log)
    }
}
