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
        let mut s = vec![T::ZERO; TILE * TILE];
        let (mut m, mut l) = ([T::NEG_INF; TILE], [T::ZERO; TILE]);
        // SAFETY: q/k/v of (bi, hi) are T rows of d columns inside `qkv` (row stride 3C); this
        // task alone writes columns hi·d.. of batch bi's rows of `merged`, lse[bi, hi, ..] and
        // its own `s`.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let y = MatMut { ptr: out.0.add(bi * t * c + hi * d), rs: c as isize };
            let lse_row = lse_all.0.add((bi * h + hi) * t);
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
    });
    // SAFETY: every task has run to completion and together they wrote every element.
    unsafe {
        merged.set_len(n_out);
        lse.set_len(n_lse);
    }
    (merged, lse)
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
        let (mut p, mut ds) = (vec![T::ZERO; TILE * TILE], vec![T::ZERO; TILE * TILE]);
        // SAFETY: reads stay inside (bi, hi)'s slices of qkv/merged/lse/dmerged; this task alone
        // writes columns hi·d.. of each third of batch bi's rows of `dqkv`, and its buffers.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + hi * d);
            let q = Mat { ptr: base, rs: 3 * c as isize, cs: 1 };
            let k = Mat { ptr: base.add(c), ..q };
            let v = Mat { ptr: base.add(2 * c), ..q };
            let o = merged.as_ptr().add(bi * t * c + hi * d);
            let dy_ptr = dmerged.as_ptr().add(bi * t * c + hi * d);
            let dy = Mat { ptr: dy_ptr, rs: c as isize, cs: 1 };
            let lse = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
            let delta: Vec<T> = (0..t)
                .map(|i| {
                    T::dot(
                        std::slice::from_raw_parts(dy_ptr.add(i * c), d),
                        std::slice::from_raw_parts(o.add(i * c), d),
                    )
                })
                .collect();
            let dbase = dst.0.add(bi * t * 3 * c + hi * d);
            let dq = MatMut { ptr: dbase, rs: 3 * c as isize };
            let dk = MatMut { ptr: dbase.add(c), ..dq };
            let dv = MatMut { ptr: dbase.add(2 * c), ..dq };
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
                    let first = r0 == c0;
                    gemm_into(cols, d, rows, dv.row(c0), pm.into_mat().t(), dy.row(r0), T::ONE, !first, 1);
                    gemm_into(cols, d, rows, dk.row(c0), dsm.into_mat().t(), q.row(r0), T::ONE, !first, 1);
                    gemm_into(rows, d, cols, dq.row(r0), dsm.into_mat(), k.row(c0), T::ONE, c0 != 0, 1);
                }
            }
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
