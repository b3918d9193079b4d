//! Fused causal self-attention for the CPU: forward and backward straight from the fused
//! `qkv` projection, with no head split/merge copies, no mask tensor and no work above the
//! diagonal.
//!
//! The composition (`reference::causal_attention`) splits `qkv` into three contiguous head
//! tensors, builds `(B, H, T, T)` scores, scales them, replaces the masked half with `-inf`
//! through a broadcast mask, runs the softmax, multiplies by `v` and copies the heads back into
//! `(B, T, C)`: eight full passes over memory besides the two products. Here each `(batch,
//! head)` pair is one task: the products read `q`, `k`, `v` in place out of `qkv` through their
//! strides (the gemm crate takes any strides) and write the output straight into its `(B, T, C)`
//! slot, the scale rides on the product, and the softmax runs over each row's causal prefix
//! only. Rows are cut into blocks of [`BLOCK`]; a row block only multiplies against the keys
//! up to its end, so about 40% of the products' work (the upper triangle) is never done.
//!
//! The backward reads the saved probabilities (nothing is recomputed) and writes `dq`, `dk`,
//! `dv` into one `(B, T, 3C)` gradient, the layout the `c_attn` projection's backward takes:
//! - `dP = dY Vᵀ`, `dV = Pᵀ dY`,
//! - `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))` (softmax backward; masked entries are 0),
//! - `dQ = dS K`, `dK = dSᵀ Q`.
//!
//! Probabilities above the diagonal are stored as exact zeros, so a block that straddles the
//! diagonal multiplies zeros there and the causal sums stay exact.

use candle_core::{bail, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::{view, Real};
use crate::gemm::{gemm_into, Mat, MatMut};

/// Rows per causal block. Small enough that the skipped triangle is most of the masked work,
/// large enough that each product stays an efficient gemm.
pub(crate) const BLOCK: usize = 32;

/// Checks `qkv` is `(B, T, 3C)` with `C` divisible by `n_head`; returns `(B, T, C)`.
pub(crate) fn check_qkv(qkv: &Tensor, n_head: usize) -> Result<(usize, usize, usize)> {
    let (b, t, c3) = match qkv.dims() {
        &[b, t, c3] => (b, t, c3),
        d => bail!("causal_attention: qkv must have shape (B, T, 3C), got {d:?}"),
    };
    if n_head == 0 {
        bail!("causal_attention: n_head must be at least 1")
    }
    if c3 % 3 != 0 || (c3 / 3) % n_head != 0 {
        bail!("causal_attention: qkv's last dimension {c3} must be 3·C with C divisible by n_head {n_head}")
    }
    if !qkv.dtype().is_float() {
        bail!("causal_attention: qkv must be a float dtype, got {:?}", qkv.dtype())
    }
    Ok((b, t, c3 / 3))
}

/// The problem's geometry: batch, sequence, width, heads, head width, softmax scale.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) d: usize,
    pub(crate) scale: f64,
}

/// Raw pointers crossing into rayon tasks. Every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Runs `task(batch, head)` for every pair, on the current rayon pool when there is more
/// than one thread (the caller's stage pool sets the budget).
pub(crate) fn for_each_head(g: Geometry, task: impl Fn(usize, usize) + Sync + Send) {
    let pairs = g.b * g.h;
    if rayon::current_num_threads() > 1 && pairs > 1 {
        (0..pairs).into_par_iter().for_each(|p| task(p / g.h, p % g.h));
    } else {
        (0..pairs).for_each(|p| task(p / g.h, p % g.h));
    }
}

/// The end (exclusive) of the causal block holding row `r`.
pub(crate) fn block_end(r: usize, t: usize) -> usize {
    ((r / BLOCK + 1) * BLOCK).min(t)
}

/// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place for causal rows `r0..r1` of a `t`-wide
/// block: `ds` holds dP on entry (row stride `t`), `p` the probabilities (row stride `t`);
/// each row's masked tail (columns past the diagonal, up to `r1`) is zeroed.
///
/// # Safety
/// `ds` and `p` address `r1` rows of `t` elements each, and `ds` is not aliased.
pub(crate) unsafe fn softmax_backward_rows<T: Real>(ds: *mut T, p: *const T, t: usize, r0: usize, r1: usize, scale: T) {
    for i in r0..r1 {
        let pr = std::slice::from_raw_parts(p.add(i * t), i + 1);
        let row = std::slice::from_raw_parts_mut(ds.add(i * t), r1);
        let (live, masked) = row.split_at_mut(i + 1);
        let s = T::dot(live, pr);
        for (x, &pv) in live.iter_mut().zip(pr) {
            *x = scale * pv * (*x - s);
        }
        masked.iter_mut().for_each(|x| *x = T::ZERO);
    }
}

fn forward<T: Real>(g: Geometry, qkv: &[T]) -> (Vec<T>, Vec<T>) {
    let Geometry { b: _, t, c, h, d, scale } = g;
    // Every element of both outputs is written below (gemm overwrites, the softmax loop
    // writes each row in full), so they start uninitialised: no zero-fill pass.
    let (n_merged, n_probs) = (g.b * t * c, g.b * h * t * t);
    let mut merged: Vec<T> = Vec::with_capacity(n_merged);
    let mut probs: Vec<T> = Vec::with_capacity(n_probs);
    let (out, p_all) = (Shared(merged.as_mut_ptr()), Shared(probs.as_mut_ptr()));
    let scale = T::from_f64(scale);
    for_each_head(g, |bi, hi| {
        let (out, p_all) = (out, p_all);
        // SAFETY: q/k/v of (bi, hi) are T rows of d columns inside `qkv` (row stride 3C); this
        // task alone writes probs[bi, hi] (a dense T×T block) and columns hi·d.. of batch bi's
        // rows of `merged`.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let p = MatMut { ptr: p_all.0.add((bi * h + hi) * t * t), rs: t as isize };
            let y = MatMut { ptr: out.0.add(bi * t * c + hi * d), rs: c as isize };
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = block_end(r0, t);
                let rows = r1 - r0;
                // Scores of the block's rows against keys 0..r1, already scaled.
                gemm_into(rows, r1, d, p.row(r0), q.row(r0), k.t(), scale, false, 1);
                for i in r0..r1 {
                    // Columns past the block's end are masked and not written by the product.
                    std::ptr::write_bytes(p.ptr.add(i * t + r1), 0, t - r1);
                    let row = std::slice::from_raw_parts_mut(p.ptr.add(i * t), t);
                    let (live, masked) = row.split_at_mut(i + 1);
                    let max = T::row_max(live);
                    let sum = exp_in_place(live, max);
                    let inv = T::ONE / sum;
                    live.iter_mut().for_each(|x| *x *= inv);
                    masked.iter_mut().for_each(|x| *x = T::ZERO);
                }
                gemm_into(rows, d, r1, y.row(r0), p.row(r0).into_mat(), v, T::ONE, false, 1);
            }
        }
    });
    // SAFETY: every task has run to completion and together they wrote every element.
    unsafe {
        merged.set_len(n_merged);
        probs.set_len(n_probs);
    }
    (merged, probs)
}

/// `x = exp(x - shift)` in place, returning the sum.
pub(crate) fn exp_in_place<T: Real>(x: &mut [T], shift: T) -> T {
    // The vectorised row kernel writes to a separate slice; a small stack buffer per chunk
    // keeps it in cache.
    let mut buf = [T::ZERO; 64];
    let mut sum = T::ZERO;
    for chunk in x.chunks_mut(64) {
        let out = &mut buf[..chunk.len()];
        sum += T::exp_shift_sum(chunk, shift, out);
        chunk.copy_from_slice(out);
    }
    sum
}

fn backward<T: Real>(g: Geometry, qkv: &[T], probs: &[T], dmerged: &[T]) -> Vec<T> {
    let Geometry { b: _, t, c, h, d, scale } = g;
    // dq is written by every row block, dk and dv by every column block: all of it, so no
    // zero-fill.
    let n = g.b * t * 3 * c;
    let mut dqkv: Vec<T> = Vec::with_capacity(n);
    let dst = Shared(dqkv.as_mut_ptr());
    let scale = T::from_f64(scale);
    for_each_head(g, |bi, hi| {
        // Rebinding captures the whole `Shared` (Send) rather than its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let mut ds = vec![T::ZERO; t * t];
        // SAFETY: reads stay inside (bi, hi)'s slices of qkv/probs/dmerged; this task alone
        // writes columns hi·d.. of each third of batch bi's rows of `dqkv`, and its own `ds`.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let p = Mat { ptr: probs.as_ptr().add((bi * h + hi) * t * t), rs: t as isize, cs: 1 };
            let dy = Mat { ptr: dmerged.as_ptr().add(bi * t * c + hi * d), rs: c as isize, cs: 1 };
            let dbase = dst.0.add(bi * t * 3 * c + hi * d);
            let dq = MatMut { ptr: dbase, rs: 3 * c as isize };
            let dk = MatMut { ptr: dbase.add(c), ..dq };
            let dv = MatMut { ptr: dbase.add(2 * c), ..dq };
            let dsm = MatMut { ptr: ds.as_mut_ptr(), rs: t as isize };
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = block_end(r0, t);
                let rows = r1 - r0;
                // dP for the block's rows against keys 0..r1, then dS in place.
                gemm_into(rows, r1, d, dsm.row(r0), dy.row(r0), v.t(), T::ONE, false, 1);
                softmax_backward_rows(dsm.ptr, p.ptr, t, r0, r1, scale);
                // dQ rows r0..r1 = dS[r0..r1, 0..r1] · K[0..r1].
                gemm_into(rows, d, r1, dq.row(r0), dsm.row(r0).into_mat(), k, T::ONE, false, 1);
            }
            // Column blocks: dV[c0..c1] = P[c0.., c0..c1]ᵀ · dY[c0..], dK likewise with dS, Q.
            for c0 in (0..t).step_by(BLOCK) {
                let c1 = block_end(c0, t);
                let (cols, rest) = (c1 - c0, t - c0);
                gemm_into(cols, d, rest, dv.row(c0), p.row(c0).col(c0).t(), dy.row(c0), T::ONE, false, 1);
                gemm_into(cols, d, rest, dk.row(c0), dsm.into_mat().row(c0).col(c0).t(), q.row(c0), T::ONE, false, 1);
            }
        }
    });
    // SAFETY: the tasks have completed and wrote all n elements.
    unsafe { dqkv.set_len(n) };
    dqkv
}

/// Reads a CPU tensor's elements (row-major, gathered if strided).
pub(crate) fn with_cpu_slice<T: Real, R>(x: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = x.storage_and_layout();
    match &*s {
        Storage::Cpu(cpu) => f(&view::<T>(cpu, l)?),
        _ => bail!("causal_attention: expected a CPU tensor"),
    }
}

pub(crate) fn geometry(qkv: &Tensor, n_head: usize) -> Result<Geometry> {
    let (b, t, c) = check_qkv(qkv, n_head)?;
    let d = c / n_head;
    Ok(Geometry { b, t, c, h: n_head, d, scale: 1.0 / (d as f64).sqrt() })
}

/// The fused forward: `(merged (B, T, C), probs (B, H, T, T))`. Caller checked `fused(qkv)`.
pub(crate) fn causal_attention_cpu(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    let g = geometry(qkv, n_head)?;
    let dev = qkv.device();
    macro_rules! run {
        ($t:ty) => {{
            let (merged, probs) = with_cpu_slice::<$t, _>(qkv, |x| Ok(forward(g, x)))?;
            let merged = Tensor::from_vec(merged, (g.b, g.t, g.c), dev)?;
            let probs = Tensor::from_vec(probs, (g.b, g.h, g.t, g.t), dev)?;
            Ok((merged, probs))
        }};
    }
    match qkv.dtype() {
        candle_core::DType::F32 => run!(f32),
        candle_core::DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("causal_attention", dt)),
    }
}

/// The fused backward: `dqkv (B, T, 3C)`. Caller checked shapes and `fused(qkv)`.
pub(crate) fn causal_attention_backward_cpu(
    qkv: &Tensor,
    probs: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    let g = geometry(qkv, n_head)?;
    macro_rules! run {
        ($t:ty) => {{
            let dqkv = with_cpu_slice::<$t, _>(qkv, |x| {
                with_cpu_slice::<$t, _>(probs, |p| with_cpu_slice::<$t, _>(dmerged, |dy| Ok(backward(g, x, p, dy))))
            })?;
            Tensor::from_vec(dqkv, (g.b, g.t, 3 * g.c), qkv.device())
        }};
    }
    match qkv.dtype() {
        candle_core::DType::F32 => run!(f32),
        candle_core::DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("causal_attention_backward", dt)),
    }
}

// ---- the batched-products path (the GPU's algorithm, with its CPU twin) ---------------------
//
// On a GPU the products are cuBLAS batched gemms (candle's `matmul`) and only the
// scale-mask-softmax and its backward are brigade kernels. The same composition runs on the
// CPU through the ops' `cpu_fwd`, which is how it is tested without a GPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};

use crate::cpu::{for_each_row, storage, with_float};
use crate::reference::split_heads;

/// Scale, causal mask and softmax over the last dimension of `(.., T, T)` scores: row `r` is
/// query `r % T` and sees keys `0..=r % T`; masked probabilities are exact zeros.
pub(crate) struct CausalSoftmax {
    pub(crate) scale: f64,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = l.dims().last().copied().unwrap_or(1);
        with_float!(self.name(), s, |T| {
            let x = view::<T>(s, l)?;
            let scale = T::from_f64(self.scale);
            let mut y = vec![T::ZERO; x.len()];
            for_each_row(&mut y, t, |r, yr| {
                let q = r % t;
                let (live, _) = yr.split_at_mut(q + 1);
                live.iter_mut().zip(&x[r * t..r * t + q + 1]).for_each(|(o, &v)| *o = v * scale);
                let max = T::row_max(live);
                let sum = exp_in_place(live, max);
                let inv = T::ONE / sum;
                live.iter_mut().for_each(|o| *o *= inv);
            });
            Ok((storage(y), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::causal_softmax_fwd(s, l, self.scale)
    }
}

/// `(probs, dprobs) → dscores = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, zero where masked.
pub(crate) struct CausalSoftmaxBwd {
    pub(crate) scale: f64,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        if pl.shape() != gl.shape() {
            bail!("causal-softmax-bwd: probs {:?} and dprobs {:?} differ in shape", pl.shape(), gl.shape())
        }
        let t = pl.dims().last().copied().unwrap_or(1);
        with_float!(self.name(), ps, |T| {
            let p = view::<T>(ps, pl)?;
            let dp = view::<T>(gs, gl)?;
            let scale = T::from_f64(self.scale);
            let mut ds = vec![T::ZERO; p.len()];
            for_each_row(&mut ds, t, |r, dr| {
                let q = r % t;
                let (pr, gr) = (&p[r * t..r * t + q + 1], &dp[r * t..r * t + q + 1]);
                let s = T::dot(pr, gr);
                for ((o, &pv), &g) in dr.iter_mut().zip(pr).zip(gr) {
                    *o = scale * pv * (g - s);
                }
            });
            Ok((storage(ds), pl.shape().clone()))
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
        crate::cuda::causal_softmax_bwd(s1, l1, s2, l2, self.scale)
    }
}

/// Forward by batched products around [`CausalSoftmax`]: `(merged, probs)`.
pub(crate) fn batched_forward(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    let g = geometry(qkv, n_head)?;
    let (q, k, v) = split_heads(qkv, n_head)?;
    let scores = q.matmul(&k.t()?.contiguous()?)?; // (B, H, T, T)
    let probs = scores.apply_op1_no_bwd(&CausalSoftmax { scale: g.scale })?;
    let merged = probs.matmul(&v)?.transpose(1, 2)?.reshape((g.b, g.t, g.c))?;
    Ok((merged, probs))
}

/// Backward by batched products around [`CausalSoftmaxBwd`]: `dqkv (B, T, 3C)`.
pub(crate) fn batched_backward(qkv: &Tensor, probs: &Tensor, dmerged: &Tensor, n_head: usize) -> Result<Tensor> {
    let g = geometry(qkv, n_head)?;
    let (q, k, v) = split_heads(qkv, n_head)?;
    let dy = dmerged.reshape((g.b, g.t, g.h, g.d))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
    let probs = probs.contiguous()?;
    let dprobs = dy.matmul(&v.t()?.contiguous()?)?;
    let dv = probs.t()?.contiguous()?.matmul(&dy)?;
    let dscores = probs.apply_op2_no_bwd(&dprobs, &CausalSoftmaxBwd { scale: g.scale })?;
    let dq = dscores.matmul(&k)?;
    let dk = dscores.t()?.contiguous()?.matmul(&q)?;
    let merge = |x: Tensor| x.transpose(1, 2)?.reshape((g.b, g.t, g.c));
    Tensor::cat(&[merge(dq)?, merge(dk)?, merge(dv)?], 2)
}
