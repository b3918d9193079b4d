//! GELU, tanh approximation (GPT-2's `gelu_new`): `0.5 x (1 + tanh(a (x + b x³)))`,
//! `a = sqrt(2/π)`, `b = 0.044715`.
//!
//! candle's own `gelu` forward is already a fused elementwise kernel, and its backward is
//! *correct* (the finite-difference test in this crate confirms it, to the ~1e-6 relative
//! precision of the six-digit constants it hard-codes), but it is a composition of ~12 tensor
//! ops (`powf`, `tanh`, affine, ...), each a full-size temporary. Here the forward is the same
//! function as candle's and the backward is one elementwise op over `(x, dy)`:
//!   `dx = dy * (0.5 (1 + t) + 0.5 x (1 - t²) a (1 + 3 b x²))`, `t = tanh(a (x + b x³))`.
//! It recomputes `t` from `x` instead of storing it: one tanh per element is cheaper than
//! another tensor's worth of memory traffic.
//!
//! The elementwise loops are `Real::gelu_tanh_fwd` / `Real::gelu_tanh_bwd` (`cpu.rs`): for f64 the
//! formulas above with libm's `tanh`; for f32 the vectorised [`crate::vmath`] versions, which
//! compute the same function as `x σ(2u)` (within ~1e-6 relative; no longer bit-identical to
//! candle's `gelu`), several times faster than scalar `tanhf`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{new_rows, storage, view, with_float};

/// Elementwise work is split into rows of this many elements for the parallel driver.
const CHUNK: usize = 4096;

pub(crate) struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        with_float!(self.name(), s, |T| {
            let x = view::<T>(s, l)?;
            let y = new_rows(x.len(), CHUNK, |r, yr: &mut [T]| {
                let n = yr.len();
                T::gelu_tanh_fwd(&x[r * CHUNK..r * CHUNK + n], yr);
            });
            Ok((storage(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(crate::dense_on_gpu(x)?.apply_op2_no_bwd(&crate::dense_on_gpu(dy)?, &GeluTanhBwd)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::gelu_tanh_fwd(s, l)
    }
}

/// `(x, dy) -> dx`.
pub(crate) struct GeluTanhBwd;

impl CustomOp2 for GeluTanhBwd {
    fn name(&self) -> &'static str {
        "gelu-tanh-bwd"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != gl.shape() {
            candle_core::bail!("gelu-tanh-bwd: x {:?} and dy {:?} differ in shape", xl.shape(), gl.shape())
        }
        with_float!(self.name(), xs, |T| {
            let x = view::<T>(xs, xl)?;
            let dy = view::<T>(gs, gl)?;
            let dx = new_rows(x.len(), CHUNK, |r, dxr: &mut [T]| {
                let (lo, hi) = (r * CHUNK, r * CHUNK + dxr.len());
                T::gelu_tanh_bwd(&x[lo..hi], &dy[lo..hi], dxr);
            });
            Ok((storage(dx), xl.shape().clone()))
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
        crate::cuda::gelu_tanh_bwd(s1, l1, s2, l2)
    }
}
