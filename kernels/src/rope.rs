//! Fused rotary position embeddings on the CPU (CUDA twin: `rope` in `cuda/brigade.cu`),
//! forward and backward, in Hugging Face's `rotate_half` convention: the head's first half
//! pairs with its second half, `rope(x) = x · cos + rotate_half(x) · sin`,
//! `rotate_half([a, b]) = [−b, a]`.
//!
//! The backward is the transposed rotation, `dx = dy · cos − rotate_half(dy · sin)`: per pair
//! `(i, i + D/2)`, `dx_i = dy_i cos_i + dy_{i+D/2} sin_{i+D/2}` and
//! `dx_{i+D/2} = dy_{i+D/2} cos_{i+D/2} − dy_i sin_i`. The tables are read as given (Llama 3's
//! frequency scaling lives in them), so nothing assumes both halves hold the same angle.
//!
//! One pass over `x` with the tables read in place, where the composition makes five
//! temporaries (two of them a concatenation) on one thread. Rows of `H · D` (one position of
//! every head) run on the caller's rayon pool.
//!
//! Assumes `x: (B, T, H, D)` with `D` even, tables `(T, D)`, one float dtype (checked by the
//! public wrappers).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

use crate::cpu::{for_each_row, storage, view, with_float, Real};

/// `(x, cos, sin) -> rope(x)`, or with `transpose` the backward `(dy, cos, sin) -> dx`.
pub(crate) struct Rope {
    pub(crate) transpose: bool,
}

/// One head's rotation: `out = x · cos ± rotate_half(x) · sin` (sign by direction).
#[inline]
fn rotate_head<T: Real>(x: &[T], cos: &[T], sin: &[T], out: &mut [T], transpose: bool) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    if transpose {
        for i in 0..half {
            o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
            o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
        }
    } else {
        for i in 0..half {
            o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
            o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.transpose {
            "rope-bwd"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, h, d) = match xl.dims() {
            &[_, t, h, d] => (t, h, d),
            dims => candle_core::bail!("{}: x must be (B, T, H, D), got {dims:?}", self.name()),
        };
        if cl.dims() != [t, d] || sl.dims() != [t, d] {
            candle_core::bail!("{}: tables must be ({t}, {d}), got {:?} and {:?}", self.name(), cl.dims(), sl.dims())
        }
        let row = h * d;
        // Where each position's `H·D` elements are dense and positions sit at one stride (a
        // head slice of a fused projection, `(B, T, H + 2KV, D)` narrowed), rows are read in
        // place; other layouts are gathered first.
        let stride = xl.stride();
        let row_stride = (stride[3] == 1 && stride[2] == d && (xl.dims()[0] <= 1 || stride[0] == t * stride[1]))
            .then_some(stride[1]);
        with_float!(self.name(), xs, |T| {
            let (x, start, rs) = match row_stride {
                Some(rs) => (std::borrow::Cow::Borrowed(T::cpu_storage_as_slice(xs)?), xl.start_offset(), rs),
                None => (view::<T>(xs, xl)?, 0, row),
            };
            let cos = view::<T>(cs, cl)?;
            let sin = view::<T>(ss, sl)?;
            let mut y = vec![T::ZERO; xl.shape().elem_count()];
            for_each_row(&mut y, row, |r, yr| {
                let p = r % t;
                let (cos, sin) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                let xr = &x[start + r * rs..start + r * rs + row];
                for (xh, yh) in xr.chunks(d).zip(yr.chunks_mut(d)) {
                    rotate_head(xh, cos, sin, yh, self.transpose);
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope(s1, l1, s2, l2, s3, l3, self.transpose)
    }
}
