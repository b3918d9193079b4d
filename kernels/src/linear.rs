//! A linear layer's product in one gemm call: `y = x · w (+ bias) (+ residual)`.
//!
//! candle's `matmul` zero-fills a fresh output, multiplies into it, and a `broadcast_add` then
//! reads it again to write a second tensor with the bias; a residual connection is a third
//! pass and a third tensor. Here the output is written once with the bias row (plus the
//! residual) and gemm accumulates the product into it; without bias or residual the output is
//! never initialised at all (gemm overwrites every element). Operands are read through their
//! strides, so `w.t()` (the input gradient's `dy · wᵀ`) costs no copy.

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

/// The fused CPU path; the caller checked shapes, dtypes and devices.
pub(crate) fn linear_cpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    // Broadcast (stride 0) operands are made dense: gemm's packing expects real strides.
    let dense = |t: &Tensor| -> Result<Tensor> {
        if t.stride().contains(&0) && t.elem_count() > 1 {
            t.contiguous()
        } else {
            Ok(t.clone())
        }
    };
    let (x, w) = (dense(x)?, dense(w)?);
    match x.dtype() {
        candle_core::DType::F32 => run::<f32>(&x, &w, bias, residual),
        candle_core::DType::F64 => run::<f64>(&x, &w, bias, residual),
        dt => Err(crate::cpu::unsupported("linear", dt)),
    }
}
