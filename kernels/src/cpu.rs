//! Plumbing shared by the fused CPU kernels.
//!
//! - [`Real`]: the handful of float operations the kernels need, implemented for `f32` and
//!   `f64`. Every kernel is written once, generically, so the f64 instantiation can be checked
//!   against finite differences with tight tolerances while models run the f32 one.
//! - [`view`]: reads a `CpuStorage` through its `Layout`. Contiguous inputs (the common case)
//!   are borrowed with no copy; strided ones (a transposed tensor, a broadcast gradient with
//!   stride 0) are gathered once into a row-major buffer, so the kernels only ever see dense
//!   rows and can stay simple.
//! - [`for_each_row`]: runs a per-row closure over an output buffer, on rayon when the tensor
//!   is large enough for the fork/join cost (a few µs) to pay off, sequentially otherwise.
//!   [`new_rows`] does the same over a fresh buffer, zeroing each row just before its closure
//!   runs (in cache, on the thread that fills it) instead of a whole-buffer memset first.
//! - The row kernels on [`Real`] (`gelu_tanh_fwd`, `exp_shift_sum`, ...): the elementwise inner
//!   loops of the fused ops. The trait's default bodies are plain scalar libm loops, which f64
//!   keeps (it is the precision reference); f32 overrides them with the vectorised versions in
//!   [`crate::vmath`].

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use rayon::prelude::*;

use crate::vmath;

/// Below this many output elements a kernel runs on the calling thread.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 14;

/// `sqrt(2 / π)` and the cubic coefficient of GELU-tanh (GPT-2's `gelu_new`).
pub(crate) const GELU_A: f64 = 0.797_884_560_802_865_4;
pub(crate) const GELU_B: f64 = 0.044715;

pub(crate) trait Real: WithDType {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn is_nan(self) -> bool;

    // ---- row kernels. Slices passed together have equal lengths (callers guarantee it). ----

    /// `y = 0.5 x (1 + tanh(a (x + b x³)))`.
    fn gelu_tanh_fwd(x: &[Self], y: &mut [Self]) {
        let (a, b, half) = (Self::from_f64(GELU_A), Self::from_f64(GELU_B), Self::from_f64(0.5));
        for (o, &v) in y.iter_mut().zip(x) {
            *o = half * v * (Self::ONE + (a * v * (Self::ONE + b * v * v)).tanh());
        }
    }

    /// `dx = dy * (0.5 (1 + t) + 0.5 x (1 - t²) a (1 + 3 b x²))`, `t = tanh(a (x + b x³))`.
    fn gelu_tanh_bwd(x: &[Self], dy: &[Self], dx: &mut [Self]) {
        let (a, b, half) = (Self::from_f64(GELU_A), Self::from_f64(GELU_B), Self::from_f64(0.5));
        let three_b = Self::from_f64(3.0 * GELU_B);
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let t = (a * v * (Self::ONE + b * v * v)).tanh();
            let du = a * (Self::ONE + three_b * v * v);
            *o = g * (half * (Self::ONE + t) + half * v * (Self::ONE - t * t) * du);
        }
    }

    /// The largest element, `-inf` if empty; NaNs are skipped (a row's NaN still reaches the
    /// output through the exp-sum that follows).
    fn row_max(x: &[Self]) -> Self {
        x.iter().fold(Self::NEG_INF, |m, &v| if v > m { v } else { m })
    }

    /// `out = exp(x - shift)`, returning `sum(out)`.
    fn exp_shift_sum(x: &[Self], shift: Self, out: &mut [Self]) -> Self {
        let mut sum = Self::ZERO;
        for (o, &v) in out.iter_mut().zip(x) {
            let e = (v - shift).exp();
            *o = e;
            sum += e;
        }
        sum
    }

    /// `sum(exp(x - shift))`.
    fn sum_exp_shift(x: &[Self], shift: Self) -> Self {
        x.iter().fold(Self::ZERO, |a, &v| a + (v - shift).exp())
    }

    fn sum(x: &[Self]) -> Self {
        x.iter().fold(Self::ZERO, |a, &v| a + v)
    }

    fn dot(x: &[Self], y: &[Self]) -> Self {
        x.iter().zip(y).fold(Self::ZERO, |a, (&u, &v)| a + u * v)
    }

    /// `sum((x - mean)²)`.
    fn sum_sq_dev(x: &[Self], mean: Self) -> Self {
        x.iter().fold(Self::ZERO, |a, &v| {
            let d = v - mean;
            a + d * d
        })
    }

    /// LayerNorm backward's reduction pass over a row, `xhat = (x - mean) rstd`, `g = dy w`:
    /// returns `(sum(g), sum(g xhat))`, accumulating `dw += dy xhat` and `db += dy`.
    fn layer_norm_bwd_sums(
        x: &[Self],
        dy: &[Self],
        w: &[Self],
        mean: Self,
        rstd: Self,
        dw: &mut [Self],
        db: &mut [Self],
    ) -> (Self, Self) {
        let (mut g_sum, mut gx_sum) = (Self::ZERO, Self::ZERO);
        for i in 0..x.len() {
            let xhat = (x[i] - mean) * rstd;
            let g = dy[i] * w[i];
            g_sum += g;
            gx_sum += g * xhat;
            dw[i] += dy[i] * xhat;
            db[i] += dy[i];
        }
        (g_sum, gx_sum)
    }

    /// Log-softmax backward: `dx = dy - exp(y) * dy_sum`.
    fn log_softmax_bwd(y: &[Self], dy: &[Self], dy_sum: Self, dx: &mut [Self]) {
        for ((o, &v), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = g - v.exp() * dy_sum;
        }
    }
}

macro_rules! impl_real {
    ($t:ty $(, $row_kernels:item)*) => {
        impl Real for $t {
            $($row_kernels)*
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
// f32 runs the vectorised row kernels (see `crate::vmath` for their accuracy).
impl_real!(
    f32,
    fn gelu_tanh_fwd(x: &[f32], y: &mut [f32]) {
        vmath::gelu_tanh_fwd(x, y)
    },
    fn gelu_tanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        vmath::gelu_tanh_bwd(x, dy, dx)
    },
    fn row_max(x: &[f32]) -> f32 {
        vmath::max(x)
    },
    fn exp_shift_sum(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        vmath::exp_shift_sum(x, shift, out)
    },
    fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
        vmath::sum_exp_shift(x, shift)
    },
    fn sum(x: &[f32]) -> f32 {
        vmath::sum(x)
    },
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        vmath::dot(x, y)
    },
    fn log_softmax_bwd(y: &[f32], dy: &[f32], dy_sum: f32, dx: &mut [f32]) {
        vmath::log_softmax_bwd(y, dy, dy_sum, dx)
    },
    fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
        vmath::sum_sq_dev(x, mean)
    },
    fn layer_norm_bwd_sums(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        mean: f32,
        rstd: f32,
        dw: &mut [f32],
        db: &mut [f32],
    ) -> (f32, f32) {
        vmath::layer_norm_bwd_sums(x, dy, w, (mean, rstd), dw, db)
    }
);
// f64 keeps the scalar libm loops: it is the precision reference.
impl_real!(f64);

/// Runs `$body` with `$T` bound to the Rust float type matching `$storage`'s dtype.
macro_rules! with_float {
    ($op:expr, $storage:expr, |$T:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        #[allow(unused_imports)]
        use candle_core::WithDType as _;
        #[allow(unused_imports)]
        use $crate::cpu::Real as _;
        match $storage.dtype() {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            dt => Err($crate::cpu::unsupported($op, dt)),
        }
    }};
}
pub(crate) use with_float;

pub(crate) fn unsupported(op: &str, dt: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: the fused CPU kernel supports f32 and f64, got {dt:?}")).bt()
}

/// The elements of `s` in the logical (row-major) order of `l`, borrowed when already dense.
pub(crate) fn view<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(Cow::Borrowed(&data[start..end])),
        None => Ok(Cow::Owned(gather_strided(data, l.dims(), l.stride(), l.start_offset()))),
    }
}

/// Copies a strided view into a dense buffer: an odometer over all but the last dim, with the
/// innermost dim as a tight loop.
fn gather_strided<T: Copy>(data: &[T], dims: &[usize], stride: &[usize], offset: usize) -> Vec<T> {
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let rank = dims.len();
    if rank == 0 {
        out.push(data[offset]);
        return out;
    }
    let (inner, inner_stride) = (dims[rank - 1], stride[rank - 1]);
    let mut idx = vec![0usize; rank - 1];
    let mut base = offset;
    loop {
        out.extend((0..inner).map(|k| data[base + k * inner_stride]));
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            base += stride[d];
            if idx[d] < dims[d] {
                break;
            }
            base -= stride[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// Calls `f(row_index, row)` for each `row_len`-sized row of `out`.
pub(crate) fn for_each_row<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Wraps a result buffer as storage (keeps the `WithDType` import out of every kernel file).
pub(crate) fn storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// A fresh `len`-element buffer whose `row_len`-sized rows are filled by `f(row_index, row)`,
/// like [`for_each_row`] over `vec![0; len]`: each row is zeroed first, so a closure that
/// writes only part of its row (the causal softmax) still leaves zeros in the rest.
///
/// Why not `vec![0; len]`: for a reused heap block that is a memset over the whole buffer on
/// the calling thread, a full pass through memory (the buffers here are megabytes) before the
/// kernel writes every element again. Here each row is zeroed while it is in cache, by the
/// thread about to fill it.
pub(crate) fn new_rows<T: WithDType>(len: usize, row_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
    if row_len == 0 || len == 0 {
        return vec![T::zero(); len];
    }
    let fill = |(i, row): (usize, &mut [MaybeUninit<T>])| f(i, zeroed(row));
    let mut out: Vec<T> = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    if len >= PAR_MIN_ELEMS {
        spare.par_chunks_mut(row_len).enumerate().for_each(fill);
    } else {
        spare.chunks_mut(row_len).enumerate().for_each(fill);
    }
    // SAFETY: the chunks above cover all `len` elements and each was initialised.
    unsafe { out.set_len(len) };
    out
}

/// Zeroes a row of uninitialised elements and returns it as initialised.
pub(crate) fn zeroed<T: WithDType>(row: &mut [MaybeUninit<T>]) -> &mut [T] {
    row.iter_mut().for_each(|o| {
        o.write(T::zero());
    });
    // SAFETY: every element of `row` was initialised just above, and `MaybeUninit<T>` has the
    // layout of `T`.
    unsafe { &mut *(row as *mut [MaybeUninit<T>] as *mut [T]) }
}
