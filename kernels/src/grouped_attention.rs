//! Causal grouped-query attention for the CPU (Llama's materialised core): forward and
//! backward with the heads read and written in place, in the projections' `(B, T, heads, D)`
//! layout, with no permute copies, no concatenation and no work above the diagonal.
//!
//! The composition stacks each k/v head's `G` query heads as `(B, KV, G·T, D)` (a permute
//! copy of `q`), transposes `k` and `v` to `(B, KV, T, D)` (two more copies), multiplies, and
//! permutes the output back to `(B, T, H·D)`; its backward permutes `dy` in, `dq`, `dk`, `dv`
//! out, rotates `dq` and `dk` back (RoPE's backward, two fresh tensors) and concatenates them
//! into the projections' gradient. Those copies run on one thread: about 5% of a 2-thread
//! training step at the `llama-tiny` shape. Here, as in GPT's fused attention
//! (`attention.rs`), the gemm crate reads every operand through its strides:
//! - forward: one task per `(batch, query head)`; the scores of a block of rows against the
//!   keys up to the block's end, scaled on the product, softmax over each row's causal prefix,
//!   the output written straight into its `(B, T, H·D)` slot;
//! - backward: one task per `(batch, k/v head)`, so the group's key and value gradients are
//!   summed by the task that owns them: for each of its query heads `dP = dY Vᵀ`,
//!   `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS K`, then `dV += Pᵀ dY`, `dK += dSᵀ Q`;
//!   `dq`, `dk`, `dv` go straight into one `(B, T, (H + 2KV)·D)` gradient, the layout the
//!   fused q/k/v projection's backward takes, with RoPE's backward (the transposed rotation)
//!   applied to `dq` and `dk` in place.
//!
//! Probabilities above the diagonal are stored as exact zeros, so a block that straddles the
//! diagonal multiplies zeros there and the causal sums stay exact. The probabilities are
//! `(B, H, T, T)`, which is the composition's `(B, KV, G·T, T)` in the same memory order.

use candle_core::{bail, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::attention::{block_end, exp_in_place, softmax_backward_rows, Shared, BLOCK};
use crate::cpu::{view, Real};
use crate::gemm::{gemm_into, Mat, MatMut};

/// Batch, sequence, query heads, k/v heads, head width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grouped {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) h: usize,
    pub(crate) kv: usize,
    pub(crate) d: usize,
}

impl Grouped {
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// A `(B, T, N, D)` operand read in place: its elements, the offset of element 0 and the
/// strides of its batch, position and head axes (the last axis is unit-stride).
#[derive(Clone, Copy)]
struct Heads<'a, T> {
    data: &'a [T],
    offset: usize,
    sb: usize,
    st: usize,
    sn: usize,
}

impl<T> Heads<'_, T> {
    /// Head `n` of batch `b` as a `(T, D)` matrix.
    ///
    /// # Safety
    /// `b` and `n` are inside the operand's shape (its layout then keeps every element inside
    /// `data`).
    unsafe fn mat(&self, b: usize, n: usize) -> Mat<T> {
        Mat { ptr: self.data.as_ptr().add(self.offset + b * self.sb + n * self.sn), rs: self.st as isize, cs: 1 }
    }
}

/// Runs `f` over `x`'s elements in place when its last axis is unit-stride (a view of the
/// projection's output is), over a dense copy otherwise.
fn with_heads<T: Real + WithDType, R>(x: &Tensor, f: impl FnOnce(Heads<'_, T>) -> Result<R>) -> Result<R> {
    if x.layout().stride()[3] != 1 {
        return with_heads(&x.contiguous()?, f);
    }
    let (s, l) = x.storage_and_layout();
    let stride = l.stride();
    match &*s {
        Storage::Cpu(cpu) => f(Heads {
            data: T::cpu_storage_as_slice(cpu)?,
            offset: l.start_offset(),
            sb: stride[0],
            st: stride[1],
            sn: stride[2],
        }),
        _ => bail!("grouped_causal_attention: expected CPU tensors"),
    }
}

/// Runs `task(i)` for `i` in `0..n`, on the current rayon pool when it has more than one thread.
fn for_each_task(n: usize, task: impl Fn(usize) + Sync + Send) {
    if rayon::current_num_threads() > 1 && n > 1 {
        (0..n).into_par_iter().for_each(task);
    } else {
        (0..n).for_each(task);
    }
}

fn forward<T: Real>(g: Grouped, q: Heads<'_, T>, k: Heads<'_, T>, v: Heads<'_, T>) -> (Vec<T>, Vec<T>) {
    let Grouped { b, t, h, d, .. } = g;
    let group = g.group();
    // Every element of both outputs is written below (gemm overwrites, the softmax loop writes
    // each row in full), so they start uninitialised.
    let (n_merged, n_probs) = (b * t * h * d, b * h * t * t);
    let mut merged: Vec<T> = Vec::with_capacity(n_merged);
    let mut probs: Vec<T> = Vec::with_capacity(n_probs);
    let (out, p_all) = (Shared(merged.as_mut_ptr()), Shared(probs.as_mut_ptr()));
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    for_each_task(b * h, |pair| {
        let (out, p_all) = (out, p_all);
        let (bi, hi) = (pair / h, pair % h);
        // SAFETY: the operands' (bi, head) matrices are inside their layouts; this task alone
        // writes probs[bi, hi] (a dense T×T block) and columns hi·d.. of batch bi's rows of
        // `merged`.
        unsafe {
            let (qm, km, vm) = (q.mat(bi, hi), k.mat(bi, hi / group), v.mat(bi, hi / group));
            let p = MatMut { ptr: p_all.0.add((bi * h + hi) * t * t), rs: t as isize };
            let y = MatMut { ptr: out.0.add((bi * t * h + hi) * d), rs: (h * d) as isize };
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = block_end(r0, t);
                let rows = r1 - r0;
                gemm_into(rows, r1, d, p.row(r0), qm.row(r0), km.t(), scale, false, 1);
                for i in r0..r1 {
                    // Columns past the block's end are masked and not written by the product.
                    std::ptr::write_bytes(p.ptr.add(i * t + r1), 0, t - r1);
                    let row = std::slice::from_raw_parts_mut(p.ptr.add(i * t), t);
                    let (live, masked) = row.split_at_mut(i + 1);
                    let max = T::row_max(live);
                    let inv = T::ONE / exp_in_place(live, max);
                    live.iter_mut().for_each(|x| *x *= inv);
                    masked.iter_mut().for_each(|x| *x = T::ZERO);
                }
                gemm_into(rows, d, r1, y.row(r0), p.row(r0).into_mat(), vm, T::ONE, false, 1);
            }
        }
    });
    // SAFETY: every task has completed and together they wrote every element.
    unsafe {
        merged.set_len(n_merged);
        probs.set_len(n_probs);
    }
    (merged, probs)
}

/// RoPE's backward in place on `T` rows of `D` (row stride `rs`), row `p` at position `p`:
/// `dx_i = dy_i cos_i + dy_{i+D/2} sin_{i+D/2}`, `dx_{i+D/2} = dy_{i+D/2} cos_{i+D/2} − dy_i sin_i`.
///
/// # Safety
/// `ptr` covers `T` rows of `D` elements at stride `rs`, written by this caller alone.
unsafe fn rotate_back<T: Real>(ptr: *mut T, rs: usize, t: usize, d: usize, cos: &[T], sin: &[T]) {
    let half = d / 2;
    for p in 0..t {
        let row = std::slice::from_raw_parts_mut(ptr.add(p * rs), d);
        let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
        let (x1, x2) = row.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * c[i] + b * s[half + i];
            x2[i] = b * c[half + i] - a * s[i];
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    g: Grouped,
    q: Heads<'_, T>,
    k: Heads<'_, T>,
    v: Heads<'_, T>,
    probs: &[T],
    dmerged: &[T],
    cos: &[T],
    sin: &[T],
) -> Vec<T> {
    let Grouped { b, t, h, kv, d } = g;
    let group = g.group();
    let width = (h + 2 * kv) * d;
    // dq is written by every row block of its head, dk and dv by every column block of the
    // group's first head (later heads add): all of it, so no zero-fill.
    let n = b * t * width;
    let mut dqkv: Vec<T> = Vec::with_capacity(n);
    let dst = Shared(dqkv.as_mut_ptr());
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    for_each_task(b * kv, |pair| {
        // Rebinding captures the whole `Shared` (Send) rather than its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let (bi, ki) = (pair / kv, pair % kv);
        let mut ds = vec![T::ZERO; t * t];
        // SAFETY: reads stay inside the (bi, head) matrices of q/k/v, probs and dmerged; this
        // task alone writes batch bi's columns of its k/v head and of its group's query heads
        // in `dqkv`, and its own `ds`.
        unsafe {
            let (km, vm) = (k.mat(bi, ki), v.mat(bi, ki));
            let base = dst.0.add(bi * t * width);
            let dk = MatMut { ptr: base.add((h + ki) * d), rs: width as isize };
            let dv = MatMut { ptr: base.add((h + kv + ki) * d), ..dk };
            let dsm = MatMut { ptr: ds.as_mut_ptr(), rs: t as isize };
            for j in 0..group {
                let hi = ki * group + j;
                let qm = q.mat(bi, hi);
                let p = Mat { ptr: probs.as_ptr().add((bi * h + hi) * t * t), rs: t as isize, cs: 1 };
                let dy = Mat { ptr: dmerged.as_ptr().add((bi * t * h + hi) * d), rs: (h * d) as isize, cs: 1 };
                let dq = MatMut { ptr: base.add(hi * d), ..dk };
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = block_end(r0, t);
                    let rows = r1 - r0;
                    // dP for the block's rows against keys 0..r1, then dS in place.
                    gemm_into(rows, r1, d, dsm.row(r0), dy.row(r0), vm.t(), T::ONE, false, 1);
                    softmax_backward_rows(dsm.ptr, p.ptr, t, r0, r1, scale);
                    gemm_into(rows, d, r1, dq.row(r0), dsm.row(r0).into_mat(), km, T::ONE, false, 1);
                }
                rotate_back(dq.ptr, width, t, d, cos, sin);
                // Column blocks: dV[c0..c1] (+)= P[c0.., c0..c1]ᵀ · dY[c0..], dK likewise with dS, Q.
                let add = j > 0;
                for c0 in (0..t).step_by(BLOCK) {
                    let c1 = block_end(c0, t);
                    let (cols, rest) = (c1 - c0, t - c0);
                    gemm_into(cols, d, rest, dv.row(c0), p.row(c0).col(c0).t(), dy.row(c0), T::ONE, add, 1);
                    let dst_t = dsm.into_mat().row(c0).col(c0).t();
                    gemm_into(cols, d, rest, dk.row(c0), dst_t, qm.row(c0), T::ONE, add, 1);
                }
            }
            rotate_back(dk.ptr, width, t, d, cos, sin);
        }
    });
    // SAFETY: the tasks have completed and wrote all n elements.
    unsafe { dqkv.set_len(n) };
    dqkv
}

/// Checks the operands' shapes and dtypes; returns the geometry.
pub(crate) fn check(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Grouped> {
    let (b, t, h, d) = match q.dims() {
        &[b, t, h, d] => (b, t, h, d),
        dims => bail!("grouped_causal_attention: q must be (B, T, H, D), got {dims:?}"),
    };
    let kv = match k.dims() {
        &[kb, kt, kv, kd] if (kb, kt, kd) == (b, t, d) => kv,
        dims => bail!("grouped_causal_attention: k must be ({b}, {t}, KV, {d}) for q {:?}, got {dims:?}", q.dims()),
    };
    if v.dims() != k.dims() {
        bail!("grouped_causal_attention: v {:?} must have k's shape {:?}", v.dims(), k.dims())
    }
    if kv == 0 || h % kv != 0 {
        bail!("grouped_causal_attention: {h} query heads must be a multiple of the {kv} k/v heads")
    }
    if d % 2 != 0 {
        bail!("grouped_causal_attention: the head width {d} must be even (RoPE rotates halves)")
    }
    for (name, x) in [("k", k), ("v", v)] {
        if x.dtype() != q.dtype() {
            bail!("grouped_causal_attention: {name} is {:?}, q is {:?}", x.dtype(), q.dtype())
        }
    }
    if !crate::fused(q) || !crate::fused(k) || !crate::fused(v) {
        bail!("grouped_causal_attention: f32 or f64 CPU tensors expected, got q {:?} on {:?}", q.dtype(), q.device())
    }
    Ok(Grouped { b, t, h, kv, d })
}

/// The forward: `(merged (B, T, H·D), probs (B, H, T, T))`. Caller checked with [`check`].
pub(crate) fn forward_cpu(g: Grouped, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = q.device();
    macro_rules! run {
        ($t:ty) => {{
            let (merged, probs) = with_heads::<$t, _>(q, |qh| {
                with_heads::<$t, _>(k, |kh| with_heads::<$t, _>(v, |vh| Ok(forward(g, qh, kh, vh))))
            })?;
            let merged = Tensor::from_vec(merged, (g.b, g.t, g.h * g.d), dev)?;
            let probs = Tensor::from_vec(probs, (g.b, g.h, g.t, g.t), dev)?;
            Ok((merged, probs))
        }};
    }
    match q.dtype() {
        candle_core::DType::F32 => run!(f32),
        candle_core::DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("grouped_causal_attention", dt)),
    }
}

/// Reads a CPU tensor's elements (row-major, gathered if strided).
fn with_slice<T: Real, R>(x: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = x.storage_and_layout();
    match &*s {
        Storage::Cpu(cpu) => f(&view::<T>(cpu, l)?),
        _ => bail!("grouped_causal_attention_backward: expected CPU tensors"),
    }
}

/// The backward: `dqkv (B, T, (H + 2KV)·D)`, RoPE's backward applied to its q and k parts.
/// Caller checked the shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_cpu(
    g: Grouped,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dmerged: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    macro_rules! run {
        ($t:ty) => {{
            let dqkv = with_heads::<$t, _>(q, |qh| {
                with_heads::<$t, _>(k, |kh| {
                    with_heads::<$t, _>(v, |vh| {
                        with_slice::<$t, _>(probs, |p| {
                            with_slice::<$t, _>(dmerged, |dy| {
                                with_slice::<$t, _>(cos, |c| {
                                    with_slice::<$t, _>(sin, |s| Ok(backward(g, qh, kh, vh, p, dy, c, s)))
                                })
                            })
                        })
                    })
                })
            })?;
            Tensor::from_vec(dqkv, (g.b, g.t, (g.h + 2 * g.kv) * g.d), q.device())
        }};
    }
    match q.dtype() {
        candle_core::DType::F32 => run!(f32),
        candle_core::DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("grouped_causal_attention_backward", dt)),
    }
}
