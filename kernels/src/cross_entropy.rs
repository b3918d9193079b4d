//! Fused summed cross-entropy `sum_n (logsumexp(logits[n]) - logits[n, t_n])`, forward and
//! backward.
//!
//! The composition materialises the full `(N, V)` log-softmax, gathers one column and sums;
//! the fused forward reads each row once for the max and once for `sum(exp(x - max))`, and
//! writes nothing but the scalar. Per-row losses are summed in f64 so a large batch does not
//! lose low-order bits of the loss (the pipeline divides by the *global* batch later).
//!
//! Backward: `dlogits[n, v] = g * (softmax(logits[n])[v] - [v == t_n])`, `g` the incoming
//! scalar gradient. The softmax is recomputed from the logits (the forward only returns the
//! scalar), in one op over `(logits, targets, g)`; targets get no gradient.
//!
//! Assumes `logits: (N, V)` float and `targets: (N,)` u32 (the wrapper converts other integer
//! dtypes). A target id >= V is an error naming the id and the row, never an out-of-bounds read.
//!
//! Loss and gradient in one pass, in place ([`CrossEntropySumGradInPlace`]): for a language
//! model's head, which computes its logits chunk by chunk and never needs them after the loss,
//! each row's loss is taken and the row is overwritten by its gradient while it is in cache.
//! No second `(N, V)` buffer, and one read of the logits instead of two. Each row's gradient
//! is the same operations, in the same order, as the backward above (bit-equal to it); its loss
//! takes the exp-sum from that pass, so it matches the forward's to rounding.
//!
//! The row loops (max, exp-sum) are [`Real`]'s row kernels: vectorised (`crate::vmath`) for
//! f32, libm for f64.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, InplaceOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{new_rows, storage, view, with_float, Real, PAR_MIN_ELEMS};

fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    if let Some((row, &id)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        candle_core::bail!("cross_entropy_sum: target id {id} at row {row} is out of range for {v} classes")
    }
    Ok(())
}

pub(crate) struct CrossEntropySum;

impl CrossEntropySum {
    fn fwd<T: Real>(&self, logits: &[T], targets: &[u32]) -> Result<CpuStorage> {
        let n = targets.len();
        let v = logits.len().checked_div(n).unwrap_or(0);
        check_targets(targets, v)?;
        let row_loss = |r: usize| -> f64 {
            let xr = &logits[r * v..(r + 1) * v];
            let max = T::row_max(xr);
            let sum = T::sum_exp_shift(xr, max);
            (max + sum.ln() - xr[targets[r] as usize]).to_f64()
        };
        // Row losses in parallel, summed in row order: the same bits on any thread count.
        let total: f64 = if logits.len() >= PAR_MIN_ELEMS {
            let rows: Vec<f64> = (0..n).into_par_iter().map(row_loss).collect();
            rows.iter().sum()
        } else {
            (0..n).map(row_loss).sum()
        };
        Ok(storage(vec![T::from_f64(total)]))
    }
}

impl CustomOp2 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let targets = view::<u32>(ts, tl)?;
        with_float!(self.name(), ls, |T| {
            let logits = view::<T>(ls, ll)?;
            Ok((self.fwd::<T>(&logits, &targets)?, Shape::from(())))
        })
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = crate::dense_on_gpu(logits)?.apply_op3_no_bwd(
            &crate::dense_on_gpu(targets)?,
            &crate::dense_on_gpu(grad)?,
            &CrossEntropySumBwd,
        )?;
        Ok((Some(dlogits), None))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::cross_entropy_sum(s1, l1, s2, l2)
    }
}

/// `(logits, targets, g) -> g * (softmax(logits) - onehot(targets))`.
pub(crate) struct CrossEntropySumBwd;

impl CrossEntropySumBwd {
    fn run<T: Real>(&self, logits: &[T], targets: &[u32], g: T) -> Result<Vec<T>> {
        let n = targets.len();
        let v = logits.len().checked_div(n).unwrap_or(0);
        check_targets(targets, v)?;
        let d = new_rows(logits.len(), v, |r, dr: &mut [T]| {
            let xr = &logits[r * v..(r + 1) * v];
            let max = T::row_max(xr);
            let sum = T::exp_shift_sum(xr, max, dr);
            let scale = g / sum;
            dr.iter_mut().for_each(|o| *o *= scale);
            dr[targets[r] as usize] -= g;
        });
        Ok(d)
    }
}

impl CustomOp3 for CrossEntropySumBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-sum-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let targets = view::<u32>(ts, tl)?;
        with_float!(self.name(), ls, |T| {
            let logits = view::<T>(ls, ll)?;
            let g = view::<T>(gs, gl)?;
            if g.len() != 1 {
                candle_core::bail!("cross-entropy-sum-bwd: expected a scalar gradient, got {:?}", gl.shape())
            }
            let d = self.run::<T>(&logits, &targets, g[0])?;
            Ok((storage(d), ll.shape().clone()))
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
        crate::cuda::cross_entropy_sum_bwd(s1, l1, s2, l2, s3, l3)
    }
}

/// `logits <- scale * (softmax(logits) - onehot(targets))`, row by row in place, remembering
/// the summed loss `sum_n (logsumexp(logits[n]) - logits[n, t_n])` of the rows it overwrote
/// (an in-place op returns nothing, so the total waits in `loss` for the caller).
pub(crate) struct CrossEntropySumGradInPlace {
    pub(crate) scale: f64,
    pub(crate) loss: Mutex<Option<f64>>,
}

impl CrossEntropySumGradInPlace {
    fn run<T: Real>(&self, logits: &mut [T], targets: &[u32]) -> Result<f64> {
        let n = targets.len();
        let v = logits.len().checked_div(n).unwrap_or(0);
        check_targets(targets, v)?;
        let g = T::from_f64(self.scale);
        // The exp-sum row kernel reads one row and writes another: the row is copied to a
        // per-thread scratch row first (in cache, far cheaper than the exp over it).
        let row = |r: usize, dr: &mut [T], scratch: &mut Vec<T>| -> f64 {
            scratch.clear();
            scratch.extend_from_slice(dr);
            let target = targets[r] as usize;
            let max = T::row_max(scratch);
            let sum = T::exp_shift_sum(scratch, max, dr);
            let loss = (max + sum.ln() - scratch[target]).to_f64();
            let scale = g / sum;
            dr.iter_mut().for_each(|o| *o *= scale);
            dr[target] -= g;
            loss
        };
        if v == 0 {
            return Ok(0.0);
        }
        // Row losses in parallel, summed in row order: the same bits on any thread count.
        let losses: Vec<f64> = if logits.len() >= PAR_MIN_ELEMS {
            logits.par_chunks_mut(v).enumerate().map_init(Vec::new, |scratch, (r, dr)| row(r, dr, scratch)).collect()
        } else {
            let mut scratch = Vec::with_capacity(v);
            logits.chunks_mut(v).enumerate().map(|(r, dr)| row(r, dr, &mut scratch)).collect()
        };
        Ok(losses.iter().sum())
    }
}

impl InplaceOp2 for CrossEntropySumGradInPlace {
    fn name(&self) -> &'static str {
        "cross-entropy-sum-grad-in-place"
    }

    fn cpu_fwd(&self, ls: &mut CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<()> {
        let (start, end) = ll
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: the logits must be contiguous", self.name())))?;
        let targets = view::<u32>(ts, tl)?;
        let loss = match ls {
            CpuStorage::F32(x) => self.run::<f32>(&mut x[start..end], &targets)?,
            CpuStorage::F64(x) => self.run::<f64>(&mut x[start..end], &targets)?,
            _ => candle_core::bail!("{}: f32 or f64 logits expected", self.name()),
        };
        *self.loss.lock().map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name())))? = Some(loss);
        Ok(())
    }
}
