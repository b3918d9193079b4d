//! A linear layer's product in one gemm call: `y = x · w (+ bias) (+ residual)`.
//!
//! candle's `matmul` zero-fills a fresh output, multiplies into it, and a `broadcast_add` then
//! reads it again to write a second tensor with the bias; a residual connection is a third
//! pass and a third tensor. Here the output is written once with the bias row (plus the
//! residual) and gemm accumulates the product into it; without bias or residual the output is
//! never initialised at all (gemm overwrites every element). Operands are read through their
//! strides, so `w.t()` (the input gradient's `dy · wᵀ`) costs no copy.
//!
//! [`linear_gelu_cpu`] is the MLP's first projection and its GELU: gemm overwrites the
//! pre-activation (no bias pass before it), then one parallel pass per row adds the bias and
//! writes the activation while the row is in cache. Separately they cost a bias pass, the
//! product reading it back, and the GELU op reading the result again into a zero-filled buffer.
//! [`linear_gelu_backward_cpu`] is its backward's counterpart: gemm writes `dy · wᵀ` and one
//! pass turns it into the pre-activation's gradient in place, instead of a second fresh buffer
//! (page faults and all) for the GELU backward's output.

use std::mem::MaybeUninit;

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::Real;
use crate::gemm::{gemm_into, stage_threads, Mat, MatMut};

/// A 2-D operand read in place: its storage, element offset and (row, column) strides.
struct Operand<'a, T> {
    data: &'a [T],
    offset: usize,
    rs: isize,
    cs: isize,
}

fn operand<'a, T: Real>(s: &'a Storage, t: &Tensor) -> Result<Operand<'a, T>> {
    let l = t.layout();
    match s {
        Storage::Cpu(cpu) => Ok(Operand {
            data: T::cpu_storage_as_slice(cpu)?,
            offset: l.start_offset(),
            rs: l.stride()[0] as isize,
            cs: l.stride()[1] as isize,
        }),
        _ => candle_core::bail!("linear: expected CPU tensors"),
    }
}

/// `(M, N)` output rows initialised to `bias (+ residual)` (at least one of them is given),
/// written once (no zero-fill first).
fn initial<T: Real>(m: usize, n: usize, bias: Option<&[T]>, residual: Option<&[T]>) -> Vec<T> {
    use std::mem::MaybeUninit;
    let fill = |(r, row): (usize, &mut [MaybeUninit<T>])| match (bias, residual) {
        (Some(b), Some(res)) => {
            for ((o, &u), &v) in row.iter_mut().zip(&res[r * n..(r + 1) * n]).zip(b) {
                o.write(u + v);
            }
        }
        (None, Some(res)) => row.iter_mut().zip(&res[r * n..(r + 1) * n]).for_each(|(o, &v)| {
            o.write(v);
        }),
        (Some(b), None) => row.iter_mut().zip(b).for_each(|(o, &v)| {
            o.write(v);
        }),
        (None, None) => row.iter_mut().for_each(|o| {
            o.write(T::ZERO);
        }),
    };
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let rows = &mut out.spare_capacity_mut()[..m * n];
    if n > 0 {
        if rayon::current_num_threads() > 1 && m * n >= crate::cpu::PAR_MIN_ELEMS {
            rows.par_chunks_mut(n).enumerate().for_each(fill);
        } else {
            rows.chunks_mut(n).enumerate().for_each(fill);
        }
    }
    // SAFETY: every one of the m·n elements was written above.
    unsafe { out.set_len(m * n) };
    out
}

fn run<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    let ((m, k), (_, n)) = (x.dims2()?, w.dims2()?);
    // Dense views of the small or rarely strided operands; x and w are read in place.
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let bias_v = bias.as_ref().map(|b| b.flatten_all()?.to_vec1::<T>()).transpose()?;
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = w.storage_and_layout();
    let (a, b) = (operand::<T>(&xs, x)?, operand::<T>(&ws, w)?);
    let accumulate = bias.is_some() || residual.is_some();
    let mut out = match &residual {
        Some(r) => {
            let (rs, rl) = r.storage_and_layout();
            let (start, end) = rl
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("linear: residual must be contiguous".into()))?;
            let res = match &*rs {
                Storage::Cpu(cpu) => &T::cpu_storage_as_slice(cpu)?[start..end],
                _ => candle_core::bail!("linear: expected CPU tensors"),
            };
            initial(m, n, bias_v.as_deref(), Some(res))
        }
        None if accumulate => initial(m, n, bias_v.as_deref(), None),
        // gemm overwrites every element when it does not read the destination.
        None => Vec::with_capacity(m * n),
    };
    if m > 0 && n > 0 {
        let dst = MatMut { ptr: out.as_mut_ptr(), rs: n as isize };
        // SAFETY: `out` has room for m·n elements (initialised when gemm reads them); `a` and
        // `b` are read through layouts candle guarantees stay inside their storages for shapes
        // (m, k) and (k, n); `out` is a fresh buffer aliasing neither.
        unsafe {
            let a = Mat { ptr: a.data.as_ptr().add(a.offset), rs: a.rs, cs: a.cs };
            let b = Mat { ptr: b.data.as_ptr().add(b.offset), rs: b.rs, cs: b.cs };
            gemm_into(m, n, k, dst, a, b, T::ONE, accumulate, stage_threads());
            if !accumulate {
                out.set_len(m * n);
            }
        }
    } else if !accumulate {
        out.resize(m * n, T::ZERO);
    }
    Tensor::from_vec(out, (m, n), x.device())
}

/// Broadcast (stride 0) operands are made dense: gemm's packing expects real strides.
fn dense(t: &Tensor) -> Result<Tensor> {
    if t.stride().contains(&0) && t.elem_count() > 1 {
        t.contiguous()
    } else {
        Ok(t.clone())
    }
}

/// The fused CPU path; the caller checked shapes, dtypes and devices.
pub(crate) fn linear_cpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (dense(x)?, dense(w)?);
    match x.dtype() {
        candle_core::DType::F32 => run::<f32>(&x, &w, bias, residual),
        candle_core::DType::F64 => run::<f64>(&x, &w, bias, residual),
        dt => Err(crate::cpu::unsupported("linear", dt)),
    }
}

fn run_gelu<T: Real>(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
    let ((m, k), (_, n)) = (x.dims2()?, w.dims2()?);
    let bias = bias.flatten_all()?.to_vec1::<T>()?;
    let mut pre: Vec<T> = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        let (xs, _) = x.storage_and_layout();
        let (ws, _) = w.storage_and_layout();
        let (a, b) = (operand::<T>(&xs, x)?, operand::<T>(&ws, w)?);
        let dst = MatMut { ptr: pre.as_mut_ptr(), rs: n as isize };
        // SAFETY: `pre` has room for m·n elements, all written by gemm (it does not read the
        // destination); `a` and `b` are read through layouts candle guarantees stay inside
        // their storages for shapes (m, k) and (k, n); `pre` is a fresh buffer aliasing neither.
        unsafe {
            let a = Mat { ptr: a.data.as_ptr().add(a.offset), rs: a.rs, cs: a.cs };
            let b = Mat { ptr: b.data.as_ptr().add(b.offset), rs: b.rs, cs: b.cs };
            gemm_into(m, n, k, dst, a, b, T::ONE, false, stage_threads());
            pre.set_len(m * n);
        }
    } else {
        pre.resize(m * n, T::ZERO);
    }
    let mut act: Vec<T> = Vec::with_capacity(m * n);
    if n > 0 {
        let spare = &mut act.spare_capacity_mut()[..m * n];
        let row = |(p, a): (&mut [T], &mut [MaybeUninit<T>])| {
            for (v, &bv) in p.iter_mut().zip(&bias) {
                *v += bv;
            }
            T::gelu_tanh_fwd(p, crate::cpu::zeroed(a));
        };
        if rayon::current_num_threads() > 1 && m * n >= crate::cpu::PAR_MIN_ELEMS {
            pre.par_chunks_mut(n).zip(spare.par_chunks_mut(n)).for_each(row);
        } else {
            pre.chunks_mut(n).zip(spare.chunks_mut(n)).for_each(row);
        }
    }
    // SAFETY: with n > 0 every row of `act` was written above; with n = 0 it is empty.
    unsafe { act.set_len(m * n) };
    Ok((Tensor::from_vec(pre, (m, n), x.device())?, Tensor::from_vec(act, (m, n), x.device())?))
}

/// `(x · w + bias, gelu_tanh(x · w + bias))` on the CPU; the caller checked shapes, dtypes and
/// devices.
pub(crate) fn linear_gelu_cpu(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
    let (x, w) = (dense(x)?, dense(w)?);
    match x.dtype() {
        candle_core::DType::F32 => run_gelu::<f32>(&x, &w, bias),
        candle_core::DType::F64 => run_gelu::<f64>(&x, &w, bias),
        dt => Err(crate::cpu::unsupported("linear_gelu", dt)),
    }
}

/// Elements of a row the in-place GELU backward copies to the stack at a time.
const GELU_BWD_CHUNK: usize = 256;

fn run_gelu_backward<T: Real>(dy: &Tensor, w: &Tensor, pre: &Tensor) -> Result<Tensor> {
    let ((m, k), (_, n)) = (dy.dims2()?, w.dims2()?);
    let pre = pre.contiguous()?;
    let (ps, pl) = pre.storage_and_layout();
    let (start, end) = pl
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("linear_gelu_backward: pre must be contiguous".into()))?;
    let pre_v = match &*ps {
        Storage::Cpu(cpu) => &T::cpu_storage_as_slice(cpu)?[start..end],
        _ => candle_core::bail!("linear_gelu_backward: expected CPU tensors"),
    };
    let mut d: Vec<T> = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        let (gs, _) = dy.storage_and_layout();
        let (ws, _) = w.storage_and_layout();
        let (a, b) = (operand::<T>(&gs, dy)?, operand::<T>(&ws, w)?);
        let dst = MatMut { ptr: d.as_mut_ptr(), rs: n as isize };
        // SAFETY: as in `run_gelu`: room for m·n elements, all written by gemm; operands read
        // through their candle layouts; `d` is fresh.
        unsafe {
            let a = Mat { ptr: a.data.as_ptr().add(a.offset), rs: a.rs, cs: a.cs };
            let b = Mat { ptr: b.data.as_ptr().add(b.offset), rs: b.rs, cs: b.cs };
            gemm_into(m, n, k, dst, a, b, T::ONE, false, stage_threads());
            d.set_len(m * n);
        }
        let row = |(r, dr): (usize, &mut [T])| {
            let xr = &pre_v[r * n..(r + 1) * n];
            let mut g = [T::ZERO; GELU_BWD_CHUNK];
            for (xc, dc) in xr.chunks(GELU_BWD_CHUNK).zip(dr.chunks_mut(GELU_BWD_CHUNK)) {
                let g = &mut g[..dc.len()];
                g.copy_from_slice(dc);
                T::gelu_tanh_bwd(xc, g, dc);
            }
        };
        if rayon::current_num_threads() > 1 && m * n >= crate::cpu::PAR_MIN_ELEMS {
            d.par_chunks_mut(n).enumerate().for_each(row);
        } else {
            d.chunks_mut(n).enumerate().for_each(row);
        }
    } else {
        d.resize(m * n, T::ZERO);
    }
    Tensor::from_vec(d, (m, n), dy.device())
}

/// `gelu_tanh_backward(pre, dy · w)` on the CPU; the caller checked shapes, dtypes and devices.
pub(crate) fn linear_gelu_backward_cpu(dy: &Tensor, w: &Tensor, pre: &Tensor) -> Result<Tensor> {
    let (dy, w) = (dense(dy)?, dense(w)?);
    match dy.dtype() {
        candle_core::DType::F32 => run_gelu_backward::<f32>(&dy, &w, pre),
        candle_core::DType::F64 => run_gelu_backward::<f64>(&dy, &w, pre),
        dt => Err(crate::cpu::unsupported("linear_gelu_backward", dt)),
    }
}
