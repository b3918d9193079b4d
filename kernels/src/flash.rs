//! Flash attention (FlashAttention-2) for causal self-attention: the forward walks the keys in
//! tiles with an online softmax and keeps only each row's log-sum-exp, never a `T×T` matrix;
//! the backward recomputes the probabilities tile by tile from `(q, k, v, o, lse, dO)`.
//!
//! This file is the CPU twin of the CUDA kernels `flash_attention_*` in `cuda/brigade.cu`:
//! the same tiles ([`TILE`] query rows × [`TILE`] keys), the same order of every reduction, so
//! the two round alike:
//! - forward, per query tile: for each key tile up to the diagonal, `S = scale·Q Kᵀ`, a new
//!   running max `m`, `P = exp(S − m)`, `l = l·exp(m_old − m) + rowsum(P)`,
//!   `O = O·exp(m_old − m) + P V`; at the end `O /= l` and `lse = m + ln l`;
//! - backward: `D = rowsum(dO ∘ O)` per row first; then per key tile, over the query tiles at
//!   or below the diagonal in order, `P = exp(S − lse)`, `dP = dO Vᵀ`, `dS = scale·P∘(dP − D)`,
//!   `dV += Pᵀ dO`, `dK += dSᵀ Q` and `dQ += dS K`. `dQ` of a query tile therefore sums its key
//!   tiles in increasing order, which is what the GPU's separate, atomic-free `dQ` kernel does.
//!
//! Grouped-query attention (Llama's) runs the same per-head tiles on separate `q (B, T, H, D)`
//! and `k`, `v (B, T, KV, D)` ([`grouped_flash_attention`]): query head `h` reads k/v head
//! `h / (H / KV)` in place, never a `repeat_kv` copy, and each backward task owns one k/v head,
//! running its group's query heads in order so that dk/dv sum over the group without atomics.
//! It is CPU-only; the CUDA kernels take the fused `qkv` of equal head counts.
//!
//! Memory is `O(T)` per head besides the inputs: two `TILE×TILE` buffers per task instead of
//! the `(B, H, T, T)` probabilities the materialised path (`attention`) keeps for its
//! backward. The log-sum-exp is f32 for f32/bf16 inputs (bf16 would cost the probabilities
//! three significant digits) and f64 for f64.

use candle_core::{bail, DType, Result, Tensor};

use crate::attention::{exp_in_place, for_each_head, geometry, with_cpu_slice, Geometry, Shared};
use crate::cpu::Real;
use crate::gemm::{gemm_into, Mat, MatMut};

/// Query rows and keys per tile. 64 keeps a tile's scores (16 KiB in f32) in L1 next to the
/// operands' rows, and matches the GPU kernels' tile.
pub const TILE: usize = 64;

/// The causal attention output `(B, T, C)` and per-row log-sum-exp `(B, H, T)` (row-major,
/// same dtype as `qkv`).
pub(crate) fn forward<T: Real>(g: Geometry, qkv: &[T]) -> (Vec<T>, Vec<T>) {
    let Geometry { t, c, h, d, scale, .. } = g;
    let (n_out, n_lse) = (g.b * t * c, g.b * h * t);
    // Both are written in full below (the first key tile overwrites each output row, the end
    // of each query tile writes its lse), so no zero-fill.
    let mut merged: Vec<T> = Vec::with_capacity(n_out);
    let mut lse: Vec<T> = Vec::with_capacity(n_lse);
    let (out, lse_all) = (Shared(merged.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let scale = T::from_f64(scale);
    for_each_head(g, |bi, hi| {
        let (out, lse_all) = (out, lse_all);
        // SAFETY: q/k/v of (bi, hi) are T rows of d columns inside `qkv` (row stride 3C); this
        // task alone writes columns hi·d.. of batch bi's rows of `merged` and lse[bi, hi, ..].
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let y = MatMut { ptr: out.0.add(bi * t * c + hi * d), rs: c as isize };
            forward_head(Head { q, k, v, t, d, scale }, y, lse_all.0.add((bi * h + hi) * t));
        }
    });
    // SAFETY: every task has run to completion and together they wrote every element.
    unsafe {
        merged.set_len(n_out);
        lse.set_len(n_lse);
    }
    (merged, lse)
}

/// One head's operands: queries, keys and values of `t` rows of `d` columns each (any row
/// stride), and the softmax scale. Grouped-query heads point `k` and `v` at their shared head.
#[derive(Clone, Copy)]
struct Head<T> {
    q: Mat<T>,
    k: Mat<T>,
    v: Mat<T>,
    t: usize,
    d: usize,
    scale: T,
}

/// One head's forward: writes its `t` output rows `y` and log-sum-exps `lse_row[..t]`.
///
/// # Safety
/// `h`'s views must be valid for `t` rows of `d` columns, `y` for writing `t` rows of `d`
/// columns and `lse_row` for `t` elements, none of them written by anyone else meanwhile.
unsafe fn forward_head<T: Real>(h: Head<T>, y: MatMut<T>, lse_row: *mut T) {
    let Head { q, k, v, t, d, scale } = h;
    let mut s = vec![T::ZERO; TILE * TILE];
    let (mut m, mut l) = ([T::NEG_INF; TILE], [T::ZERO; TILE]);
    let sm = MatMut { ptr: s.as_mut_ptr(), rs: TILE as isize };
    for r0 in (0..t).step_by(TILE) {
        let rows = (r0 + TILE).min(t) - r0;
        // Tiles are aligned, so key tiles 0..=r0 are exactly those a row here sees, and
        // every row has at least one live key (itself or earlier) in each of them.
        for c0 in (0..=r0).step_by(TILE) {
            let cols = (c0 + TILE).min(t) - c0;
            gemm_into(rows, cols, d, sm, q.row(r0), k.row(c0).t(), scale, false, 1);
            for i in 0..rows {
                let live = (r0 + i + 1).min(c0 + cols) - c0;
                let row = std::slice::from_raw_parts_mut(sm.ptr.add(i * TILE), cols);
                let (keep, masked) = row.split_at_mut(live);
                let tile_max = T::row_max(keep);
                let m_new = if c0 == 0 || tile_max > m[i] { tile_max } else { m[i] };
                let sum = exp_in_place(keep, m_new);
                masked.iter_mut().for_each(|x| *x = T::ZERO);
                if c0 == 0 {
                    l[i] = sum;
                } else {
                    let alpha = (m[i] - m_new).exp();
                    l[i] = l[i] * alpha + sum;
                    if alpha != T::ONE {
                        let yr = std::slice::from_raw_parts_mut(y.ptr.offset((r0 + i) as isize * y.rs), d);
                        yr.iter_mut().for_each(|x| *x *= alpha);
                    }
                }
                m[i] = m_new;
            }
            gemm_into(rows, d, cols, y.row(r0), sm.into_mat(), v.row(c0), T::ONE, c0 != 0, 1);
        }
        for i in 0..rows {
            let inv = T::ONE / l[i];
            let yr = std::slice::from_raw_parts_mut(y.ptr.offset((r0 + i) as isize * y.rs), d);
            yr.iter_mut().for_each(|x| *x *= inv);
            *lse_row.add(r0 + i) = m[i] + l[i].ln();
        }
    }
}

/// One head's backward from its output `o`, output gradient `dy` (`t` rows of `d`) and
/// log-sum-exps: writes `dq`, and writes `dk`/`dv` or, with `accumulate_kv` (a grouped-query
/// head after the first of its group), adds to them.
///
/// # Safety
/// As [`forward_head`]'s, for `o`, `dy` and `lse` (read) and `dq`, `dk`, `dv` (written).
#[allow(clippy::too_many_arguments)]
unsafe fn backward_head<T: Real>(
    h: Head<T>,
    o: Mat<T>,
    dy: Mat<T>,
    lse: &[T],
    dq: MatMut<T>,
    dk: MatMut<T>,
    dv: MatMut<T>,
    accumulate_kv: bool,
) {
    let Head { q, k, v, t, d, scale } = h;
    let (mut p, mut ds) = (vec![T::ZERO; TILE * TILE], vec![T::ZERO; TILE * TILE]);
    let delta: Vec<T> = (0..t)
        .map(|i| {
            T::dot(
                std::slice::from_raw_parts(dy.ptr.offset(i as isize * dy.rs), d),
                std::slice::from_raw_parts(o.ptr.offset(i as isize * o.rs), d),
            )
        })
        .collect();
    let pm = MatMut { ptr: p.as_mut_ptr(), rs: TILE as isize };
    let dsm = MatMut { ptr: ds.as_mut_ptr(), rs: TILE as isize };
    for c0 in (0..t).step_by(TILE) {
        let cols = (c0 + TILE).min(t) - c0;
        for r0 in (c0..t).step_by(TILE) {
            let rows = (r0 + TILE).min(t) - r0;
            gemm_into(rows, cols, d, pm, q.row(r0), k.row(c0).t(), scale, false, 1);
            gemm_into(rows, cols, d, dsm, dy.row(r0), v.row(c0).t(), T::ONE, false, 1);
            for i in 0..rows {
                let qi = r0 + i;
                let live = (qi + 1).min(c0 + cols) - c0;
                let pr = std::slice::from_raw_parts_mut(pm.ptr.add(i * TILE), cols);
                let dr = std::slice::from_raw_parts_mut(dsm.ptr.add(i * TILE), cols);
                let (pk, pmask) = pr.split_at_mut(live);
                exp_in_place(pk, lse[qi]);
                pmask.iter_mut().for_each(|x| *x = T::ZERO);
                let (dk_, dmask) = dr.split_at_mut(live);
                for (x, &pv) in dk_.iter_mut().zip(pk.iter()) {
                    *x = scale * pv * (*x - delta[qi]);
                }
                dmask.iter_mut().for_each(|x| *x = T::ZERO);
            }
            // dk and dv of key tile c0 are first written by its diagonal query tile.
            let add_kv = accumulate_kv || r0 != c0;
            gemm_into(cols, d, rows, dv.row(c0), pm.into_mat().t(), dy.row(r0), T::ONE, add_kv, 1);
            gemm_into(cols, d, rows, dk.row(c0), dsm.into_mat().t(), q.row(r0), T::ONE, add_kv, 1);
            gemm_into(rows, d, cols, dq.row(r0), dsm.into_mat(), k.row(c0), T::ONE, c0 != 0, 1);
        }
    }
}

/// `dqkv (B, T, 3C)` from the inputs, the forward's output and log-sum-exp, and `dO`.
pub(crate) fn backward<T: Real>(g: Geometry, qkv: &[T], merged: &[T], lse: &[T], dmerged: &[T]) -> Vec<T> {
    let Geometry { t, c, h, d, scale, .. } = g;
    // dq is written by key tile 0 for every query tile, dk and dv by each key tile's diagonal
    // query tile: all of it, so no zero-fill.
    let n = g.b * t * 3 * c;
    let mut dqkv: Vec<T> = Vec::with_capacity(n);
    let dst = Shared(dqkv.as_mut_ptr());
    let scale = T::from_f64(scale);
    for_each_head(g, |bi, hi| {
        // Rebinding captures the whole `Shared` (Send) rather than its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: reads stay inside (bi, hi)'s slices of qkv/merged/lse/dmerged; this task alone
        // writes columns hi·d.. of each third of batch bi's rows of `dqkv`.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let o = Mat { ptr: merged.as_ptr().add(bi * t * c + hi * d), rs: c as isize, cs: 1 };
            let dy = Mat { ptr: dmerged.as_ptr().add(bi * t * c + hi * d), ..o };
            let lse = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
            let dbase = dst.0.add(bi * t * 3 * c + hi * d);
            let dq = MatMut { ptr: dbase, rs: 3 * c as isize };
            let dk = MatMut { ptr: dbase.add(c), ..dq };
            let dv = MatMut { ptr: dbase.add(2 * c), ..dq };
            backward_head(Head { q, k, v, t, d, scale }, o, dy, lse, dq, dk, dv, false);
        }
    });
    // SAFETY: the tasks have completed and wrote all n elements.
    unsafe { dqkv.set_len(n) };
    dqkv
}

/// The log-sum-exp's dtype for `qkv`'s: f64 stays f64, everything else is f32.
pub(crate) fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The CPU forward: `(merged (B, T, C), lse (B, H, T))`. Caller checked `fused(qkv)`.
pub(crate) fn flash_attention_cpu(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    let g = geometry(qkv, n_head)?;
    let dev = qkv.device();
    macro_rules! run {
        ($t:ty) => {{
            let (merged, lse) = with_cpu_slice::<$t, _>(qkv, |x| Ok(forward(g, x)))?;
            Ok((Tensor::from_vec(merged, (g.b, g.t, g.c), dev)?, Tensor::from_vec(lse, (g.b, g.h, g.t), dev)?))
        }};
    }
    match qkv.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("flash_attention", dt)),
    }
}

/// The CPU backward: `dqkv (B, T, 3C)`. Caller checked shapes and `fused(qkv)`.
pub(crate) fn flash_attention_backward_cpu(
    qkv: &Tensor,
    merged: &Tensor,
    lse: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    let g = geometry(qkv, n_head)?;
    macro_rules! run {
        ($t:ty) => {{
            let dqkv = with_cpu_slice::<$t, _>(qkv, |x| {
                with_cpu_slice::<$t, _>(merged, |o| {
                    with_cpu_slice::<$t, _>(lse, |l| {
                        with_cpu_slice::<$t, _>(dmerged, |dy| Ok(backward(g, x, o, l, dy)))
                    })
                })
            })?;
            Tensor::from_vec(dqkv, (g.b, g.t, 3 * g.c), qkv.device())
        }};
    }
    match qkv.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("flash_attention_backward", dt)),
    }
}

/// Shapes, dtypes and devices of the backward's inputs; returns the geometry.
pub(crate) fn check_backward(
    qkv: &Tensor,
    merged: &Tensor,
    lse: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Geometry> {
    let g = geometry(qkv, n_head)?;
    if merged.dims() != [g.b, g.t, g.c] || dmerged.dims() != [g.b, g.t, g.c] || lse.dims() != [g.b, g.h, g.t] {
        bail!(
            "flash_attention_backward: merged {:?}, dmerged {:?} and lse {:?} must be ({b}, {t}, {c}), ({b}, {t}, {c}) and ({b}, {h}, {t}) for qkv {:?}",
            merged.dims(),
            dmerged.dims(),
            lse.dims(),
            qkv.dims(),
            b = g.b,
            t = g.t,
            c = g.c,
            h = g.h
        )
    }
    if merged.dtype() != qkv.dtype() || dmerged.dtype() != qkv.dtype() || lse.dtype() != lse_dtype(qkv.dtype()) {
        bail!(
            "flash_attention_backward: qkv, merged and dmerged must share a dtype and lse be {:?}, got {:?}, {:?}, {:?}, {:?}",
            lse_dtype(qkv.dtype()),
            qkv.dtype(),
            merged.dtype(),
            dmerged.dtype(),
            lse.dtype()
        )
    }
    if !(merged.device().same_device(qkv.device())
        && lse.device().same_device(qkv.device())
        && dmerged.device().same_device(qkv.device()))
    {
        bail!("flash_attention_backward: all inputs must be on one device")
    }
    Ok(g)
}

/// Grouped-query attention's shapes: batch, sequence, query heads, k/v heads, head width.
#[derive(Clone, Copy)]
struct Grouped {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
}

impl Grouped {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, t, h, d) = q.dims4()?;
        let (kb, kt, kv, kd) = k.dims4()?;
        if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() {
            bail!(
                "grouped flash attention: k {:?} and v {:?} must be (B, T, KV, D) for q {:?} (B, T, H, D)",
                k.dims(),
                v.dims(),
                q.dims()
            )
        }
        if kv == 0 || h % kv != 0 {
            bail!("grouped flash attention: {h} query heads must be a multiple of {kv} k/v heads")
        }
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            bail!(
                "grouped flash attention: q, k and v must share a dtype, got {:?}, {:?}, {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            )
        }
        if !(k.device().same_device(q.device()) && v.device().same_device(q.device())) {
            bail!("grouped flash attention: q, k and v must be on one device")
        }
        Ok(Self { b, t, h, kv, d })
    }

    /// The query heads per k/v head.
    fn group(self) -> usize {
        self.h / self.kv
    }

    /// `for_each_head`'s geometry over `heads` heads per batch element.
    fn tasks(self, heads: usize) -> Geometry {
        Geometry { b: self.b, t: self.t, c: heads * self.d, h: heads, d: self.d, scale: self.scale() }
    }

    fn scale(self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

/// Whether grouped-query attention of rotated queries `q` `(B, T, H, D)` over a whole
/// sequence runs by [`grouped_flash_attention`]: by the rule [`crate::attention_algorithm`]
/// applies to GPT's on the CPU (f32/f64 and `T >= FLASH_MIN_SEQUENCE`). There is no grouped
/// CUDA kernel, so other devices keep the materialised probabilities.
pub fn grouped_takes_flash(q: &Tensor) -> bool {
    crate::fused(q) && q.rank() == 4 && q.dims()[1] >= crate::FLASH_MIN_SEQUENCE
}

/// Causal grouped-query attention by FlashAttention-2 on the CPU (f32/f64): queries `q`
/// `(B, T, H, D)` over keys and values `k`, `v` `(B, T, KV, D)`, where query head `i` reads k/v
/// head `i / (H / KV)` in place (Hugging Face's `repeat_kv` order, without its copies).
/// Returns the output `(B, T, H, D)` and each query row's log-sum-exp `(B, H, T)` (f32, or
/// f64 for f64 inputs); its backward is [`grouped_flash_attention_backward`].
pub fn grouped_flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = Grouped::of(q, k, v)?;
    if !crate::fused(q) {
        bail!("grouped flash attention: no kernels for {:?} on {:?}", q.dtype(), q.device().location())
    }
    macro_rules! run {
        ($t:ty) => {{
            let (out, lse) = with_cpu_slice::<$t, _>(q, |q| {
                with_cpu_slice::<$t, _>(k, |k| with_cpu_slice::<$t, _>(v, |v| Ok(grouped_forward(g, q, k, v))))
            })?;
            let dev = q.device();
            Ok((Tensor::from_vec(out, (g.b, g.t, g.h, g.d), dev)?, Tensor::from_vec(lse, (g.b, g.h, g.t), dev)?))
        }};
    }
    match q.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("grouped_flash_attention", dt)),
    }
}

/// The backward of [`grouped_flash_attention`]: `(dq (B, T, H, D), dk, dv (B, T, KV, D))` from
/// its inputs, output `out`, log-sum-exp `lse` and the output's gradient `dout`. Each k/v
/// head's gradients sum over its group of query heads.
pub fn grouped_flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = Grouped::of(q, k, v)?;
    if out.dims() != q.dims() || dout.dims() != q.dims() || lse.dims() != [g.b, g.h, g.t] {
        bail!(
            "grouped flash attention backward: out {:?}, dout {:?} and lse {:?} must be {:?}, {:?} and ({}, {}, {})",
            out.dims(),
            dout.dims(),
            lse.dims(),
            q.dims(),
            q.dims(),
            g.b,
            g.h,
            g.t
        )
    }
    if out.dtype() != q.dtype() || dout.dtype() != q.dtype() || lse.dtype() != lse_dtype(q.dtype()) {
        bail!(
            "grouped flash attention backward: out and dout must be {:?} and lse {:?}, got {:?}, {:?}, {:?}",
            q.dtype(),
            lse_dtype(q.dtype()),
            out.dtype(),
            dout.dtype(),
            lse.dtype()
        )
    }
    if !(out.device().same_device(q.device())
        && lse.device().same_device(q.device())
        && dout.device().same_device(q.device()))
    {
        bail!("grouped flash attention backward: all inputs must be on one device")
    }
    if !crate::fused(q) {
        bail!("grouped flash attention backward: no kernels for {:?} on {:?}", q.dtype(), q.device().location())
    }
    macro_rules! run {
        ($t:ty) => {{
            let (dq, dk, dv) = with_cpu_slice::<$t, _>(q, |q| {
                with_cpu_slice::<$t, _>(k, |k| {
                    with_cpu_slice::<$t, _>(v, |v| {
                        with_cpu_slice::<$t, _>(out, |o| {
                            with_cpu_slice::<$t, _>(lse, |l| {
                                with_cpu_slice::<$t, _>(dout, |dy| Ok(grouped_backward(g, [q, k, v, o, l, dy])))
                            })
                        })
                    })
                })
            })?;
            let dev = q.device();
            Ok((
                Tensor::from_vec(dq, (g.b, g.t, g.h, g.d), dev)?,
                Tensor::from_vec(dk, (g.b, g.t, g.kv, g.d), dev)?,
                Tensor::from_vec(dv, (g.b, g.t, g.kv, g.d), dev)?,
            ))
        }};
    }
    match q.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => Err(crate::cpu::unsupported("grouped_flash_attention_backward", dt)),
    }
}

/// The views of batch element `bi`'s head `head` of a `(B, T, heads, D)` row-major buffer.
///
/// # Safety
/// `base` must hold `B·T·heads·D` elements with `bi < B` and `head < heads`.
unsafe fn head_rows<T>(base: *const T, g: Grouped, heads: usize, bi: usize, head: usize) -> Mat<T> {
    Mat { ptr: base.add((bi * g.t * heads + head) * g.d), rs: (heads * g.d) as isize, cs: 1 }
}

/// Output `(B, T, H, D)` and log-sum-exp `(B, H, T)`: one task per (batch, query head).
fn grouped_forward<T: Real>(g: Grouped, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
    let (n_out, n_lse) = (g.b * g.t * g.h * g.d, g.b * g.h * g.t);
    // Written in full by the tasks (see `forward`), so no zero-fill.
    let mut out: Vec<T> = Vec::with_capacity(n_out);
    let mut lse: Vec<T> = Vec::with_capacity(n_lse);
    let (out_ptr, lse_ptr) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let scale = T::from_f64(g.scale());
    for_each_head(g.tasks(g.h), |bi, hi| {
        let (out_ptr, lse_ptr) = (out_ptr, lse_ptr);
        let kvh = hi / g.group();
        // SAFETY: the reads are (bi, hi)'s query rows and (bi, kvh)'s key and value rows; this
        // task alone writes (bi, hi)'s output rows and lse[bi, hi, ..].
        unsafe {
            let head = Head {
                q: head_rows(q.as_ptr(), g, g.h, bi, hi),
                k: head_rows(k.as_ptr(), g, g.kv, bi, kvh),
                v: head_rows(v.as_ptr(), g, g.kv, bi, kvh),
                t: g.t,
                d: g.d,
                scale,
            };
            let y = head_rows(out_ptr.0, g, g.h, bi, hi);
            let y = MatMut { ptr: y.ptr.cast_mut(), rs: y.rs };
            forward_head(head, y, lse_ptr.0.add((bi * g.h + hi) * g.t));
        }
    });
    // SAFETY: every task has run to completion and together they wrote every element.
    unsafe {
        out.set_len(n_out);
        lse.set_len(n_lse);
    }
    (out, lse)
}

/// `(dq, dk, dv)` from `[q, k, v, out, lse, dout]`: one task per (batch, k/v head), which runs
/// its group's query heads in order, the first writing dk/dv and the rest adding to them.
fn grouped_backward<T: Real>(g: Grouped, [q, k, v, o, lse, dy]: [&[T]; 6]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (nq, nkv) = (g.b * g.t * g.h * g.d, g.b * g.t * g.kv * g.d);
    // Written in full by the tasks (see `backward`), so no zero-fill.
    let mut dq: Vec<T> = Vec::with_capacity(nq);
    let mut dk: Vec<T> = Vec::with_capacity(nkv);
    let mut dv: Vec<T> = Vec::with_capacity(nkv);
    let dst = [Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr())];
    let scale = T::from_f64(g.scale());
    for_each_head(g.tasks(g.kv), |bi, kvh| {
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let writable = |m: Mat<T>| MatMut { ptr: m.ptr.cast_mut(), rs: m.rs };
        // SAFETY: the reads are batch bi's rows of k/v head kvh and of its group's query heads;
        // this task alone writes those query heads' dq rows and (bi, kvh)'s dk and dv rows.
        unsafe {
            let (kh, vh) = (head_rows(k.as_ptr(), g, g.kv, bi, kvh), head_rows(v.as_ptr(), g, g.kv, bi, kvh));
            let dk = writable(head_rows(dst[1].0, g, g.kv, bi, kvh));
            let dv = writable(head_rows(dst[2].0, g, g.kv, bi, kvh));
            for j in 0..g.group() {
                let hi = kvh * g.group() + j;
                let head = Head { q: head_rows(q.as_ptr(), g, g.h, bi, hi), k: kh, v: vh, t: g.t, d: g.d, scale };
                let (oh, dyh) = (head_rows(o.as_ptr(), g, g.h, bi, hi), head_rows(dy.as_ptr(), g, g.h, bi, hi));
                let lse = &lse[(bi * g.h + hi) * g.t..(bi * g.h + hi + 1) * g.t];
                let dq = writable(head_rows(dst[0].0, g, g.h, bi, hi));
                backward_head(head, oh, dyh, lse, dq, dk, dv, j > 0);
            }
        }
    });
    // SAFETY: the tasks have completed and together wrote every element of the three.
    unsafe {
        dq.set_len(nq);
        dk.set_len(nkv);
        dv.set_len(nkv);
    }
    (dq, dk, dv)
}
