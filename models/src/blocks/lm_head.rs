//! The language-model projection GPT's and Llama's heads end with: logits `h · Wᵀ` over a
//! `(V, C)` table (the token embedding's when tied), the input gradient `dlogits · W`, and the
//! table's gradient `dlogitsᵀ · h`. The norm before it is the head's own (LayerNorm or RMSNorm).
//!
//! With the cross-entropy loss fused in ([`LmHead::loss_and_backward`]), the logits never
//! exist whole: at GPT-2's vocabulary a micro-batch of 2 × 1024 tokens has 411 MB of them, and
//! as much again for their gradient. The tokens go through in chunks of rows; per chunk, one
//! GEMM makes its logits, one pass turns them into the loss and, in place, into their
//! gradient, and two GEMMs take that chunk's share of `dh` and of the table's gradient. A chunk
//! is at most [`CHUNK_BYTES`], under glibc's mmap threshold (32 MiB, see `keep_freed_memory`
//! in the binary), so its buffer comes back from the heap for the next chunk instead of being
//! mapped and faulted in afresh.

use brigade_engine::{Gradients, LossBackward};
use candle_core::{DType, Result, Tensor};

use super::Param;

/// The most bytes of logits one chunk of [`LmHead::loss_and_backward`] holds: 125 rows at
/// GPT-2's vocabulary. Rows beyond ~100 keep the GEMMs efficient; the table gradient's GEMM
/// reads and writes its `(V, C)` sum once per chunk, so fewer, larger chunks move less.
pub(crate) const CHUNK_BYTES: usize = 24 << 20;

/// The most bytes of a micro-batch's `dlogits` kept from the fused loss to a zero-bubble
/// schedule's weight step; beyond it the weight step recomputes them.
pub(crate) const KEEP_DLOGITS_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub(crate) struct LmHead {
    pub(crate) table: Param, // (V, C)
}

/// What the projection's input-gradient step leaves for its weight step: the table's gradient
/// is `dlogitsᵀ h`.
pub(crate) struct LmHeadGrads {
    pub(crate) h: Tensor,       // (B·T, C)
    pub(crate) dlogits: Tensor, // (B·T, V)
}

impl LmHead {
    /// `(vocab, width)` of the table.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        self.table.value.dims2()
    }

    /// Normalised hidden states `(B·T, C)` → logits `(B, T, V)`.
    pub(crate) fn forward(&self, h: &Tensor, batch: usize, positions: usize) -> Result<Tensor> {
        let v = self.table.value.dim(0)?;
        brigade_kernels::linear(h, &self.table.value.t()?, None, None)?.reshape((batch, positions, v))
    }

    /// The gradient of the hidden states `(B·T, C)` from the logits' `(B, T, V)`, and what the
    /// weight step needs.
    pub(crate) fn backward_input(&self, h: &Tensor, dlogits: &Tensor) -> Result<(Tensor, LmHeadGrads)> {
        let (b, t, v) = dlogits.dims3()?;
        let dlogits = dlogits.reshape((b * t, v))?;
        let dh = brigade_kernels::linear(&dlogits, &self.table.value, None, None)?;
        Ok((dh, LmHeadGrads { h: h.clone(), dlogits }))
    }

    /// Adds the table's gradient `dlogitsᵀ h` into `grads`.
    pub(crate) fn backward_weight(&self, saved: &LmHeadGrads, grads: &mut Gradients) -> Result<()> {
        grads.add_matmul(&self.table.name, &saved.dlogits.t()?, &saved.h)
    }

    /// Rows per chunk of [`LmHead::loss_and_backward`] whose logits fit [`CHUNK_BYTES`].
    pub(crate) fn chunk_rows(&self, dtype: DType) -> Result<usize> {
        let v = self.table.value.dim(0)?;
        Ok((CHUNK_BYTES / (v * dtype.size_in_bytes()).max(1)).max(1))
    }

    /// The summed cross-entropy of the logits of `h` `(N, C)` against `targets` `(N,)` (u32),
    /// divided by `global_terms`, without the `(N, V)` logits ever existing whole: the loss of
    /// [`LmHead::forward`] followed by `brigade_engine::loss::microbatch_loss`, rounded the same
    /// way (the row losses summed in f64, then to the logits' dtype, f32 for half precision).
    ///
    /// And as much of the backward from that loss as `backward` asks for, `chunk_rows` rows at
    /// a time ([`LmHead::chunk_rows`]; tests take a few to cover the boundaries). Each chunk's
    /// `dlogits` is what `microbatch_loss_backward` gives for its rows:
    /// - `dh = dlogits · W` `(N, C)` is returned unless the backward is [`LossBackward::LossOnly`];
    /// - the table's gradient `dlogitsᵀ h`, a sum of the chunks' products (the unfused
    ///   product to rounding), goes into the sums now ([`LossBackward::Full`]), or is left for
    ///   [`LmHead::backward_weight_deferred`] ([`LossBackward::InputOnly`]), which finds the
    ///   chunks' `dlogits` kept if they take at most `keep_dlogits_bytes`
    ///   ([`KEEP_DLOGITS_BYTES`]), else computes them again.
    pub(crate) fn loss_and_backward(
        &self,
        h: &Tensor,
        targets: &Tensor,
        global_terms: usize,
        mut backward: LossBackward<'_>,
        chunk_rows: usize,
        keep_dlogits_bytes: usize,
    ) -> Result<FusedLoss> {
        let (n, _) = h.dims2()?;
        if targets.dims() != [n] {
            candle_core::bail!("LM head: {n} positions but targets of shape {:?}", targets.dims())
        }
        if global_terms == 0 {
            candle_core::bail!("LM head: the loss is normalised by the global batch's terms, got 0")
        }
        let targets = targets.to_dtype(DType::U32)?;
        let scale = 1.0 / global_terms as f64;
        let table_t = self.table.value.t()?; // (C, V), read in place
        let rows = chunk_rows.max(1);
        // Deferred weights: the chunks' `dlogits` are kept for `W` when they are small (a
        // small vocabulary: 256 KB per micro-batch for the side-by-side GPT), else `W` computes
        // them again from `h` (one more GEMM per chunk, instead of GPT-2's 411 MB held per
        // micro-batch until its `W`).
        let v = self.table.value.dim(0)?;
        let keep_dlogits = n * v * h.dtype().size_in_bytes() <= keep_dlogits_bytes;
        let mut kept = Vec::new();
        let mut total: Option<Tensor> = None; // f64 scalar, left on the device
        let mut dh_chunks = Vec::new();
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let h_chunk = h.narrow(0, start, len)?; // (len, C), a contiguous view
            let t_chunk = targets.narrow(0, start, len)?;
            let logits = brigade_kernels::linear(&h_chunk, &table_t, None, None)?; // (len, V)
            let loss = if let LossBackward::LossOnly = backward {
                brigade_kernels::cross_entropy_sum(&logits, &t_chunk)?.to_dtype(DType::F64)?
            } else {
                let (loss, dlogits) = brigade_kernels::cross_entropy_sum_with_grad_in_place(logits, &t_chunk, scale)?;
                dh_chunks.push(brigade_kernels::linear(&dlogits, &self.table.value, None, None)?); // (len, C)
                match &mut backward {
                    LossBackward::Full(grads) => grads.add_matmul(&self.table.name, &dlogits.t()?, &h_chunk)?,
                    _ if keep_dlogits => kept.push(dlogits),
                    _ => {}
                }
                loss
            };
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
        }
        let total = match total {
            Some(t) => t,
            None => candle_core::bail!("LM head: no positions to take a loss over"),
        };
        let loss_dtype = if matches!(h.dtype(), DType::BF16 | DType::F16) { DType::F32 } else { h.dtype() };
        let loss = (total.to_dtype(loss_dtype)? / global_terms as f64)?;
        let dh = match dh_chunks.len() {
            0 => None,
            1 => dh_chunks.pop(),
            _ => Some(Tensor::cat(&dh_chunks, 0)?),
        };
        let table_grad = match backward {
            LossBackward::InputOnly if keep_dlogits => {
                Some(DeferredTableGrad::Kept { h: h.clone(), dlogits: kept, rows })
            }
            LossBackward::InputOnly => Some(DeferredTableGrad::Recomputed { h: h.clone(), targets, scale, rows }),
            LossBackward::LossOnly | LossBackward::Full(_) => None,
        };
        Ok(FusedLoss { loss, dh, table_grad })
    }

    /// Evaluation: the summed cross-entropy of the logits of `h` `(N, C)` against `targets`
    /// `(N,)` divided by `global_terms` (rounded as [`LmHead::loss_and_backward`] rounds it),
    /// and how many rows' largest logit is the target's (`u32`), chunk by chunk.
    pub(crate) fn eval_loss(
        &self,
        h: &Tensor,
        targets: &Tensor,
        global_terms: usize,
        chunk_rows: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (n, _) = h.dims2()?;
        if targets.dims() != [n] {
            candle_core::bail!("LM head: {n} positions but targets of shape {:?}", targets.dims())
        }
        if n == 0 || global_terms == 0 {
            candle_core::bail!("LM head: no positions to take a loss over")
        }
        let targets = targets.to_dtype(DType::U32)?;
        let table_t = self.table.value.t()?;
        let rows = chunk_rows.max(1);
        let (mut total, mut hits): (Option<Tensor>, Option<Tensor>) = (None, None);
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let logits = brigade_kernels::linear(&h.narrow(0, start, len)?, &table_t, None, None)?; // (len, V)
            let t_chunk = targets.narrow(0, start, len)?;
            let loss = brigade_kernels::cross_entropy_sum(&logits, &t_chunk)?.to_dtype(DType::F64)?;
            let hit = logits.argmax(candle_core::D::Minus1)?.eq(&t_chunk)?.to_dtype(DType::U32)?.sum_all()?;
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
            hits = Some(match hits {
                None => hit,
                Some(h) => (h + hit)?,
            });
        }
        let (Some(total), Some(hits)) = (total, hits) else { candle_core::bail!("LM head: no positions") };
        let loss_dtype = if matches!(h.dtype(), DType::BF16 | DType::F16) { DType::F32 } else { h.dtype() };
        Ok(((total.to_dtype(loss_dtype)? / global_terms as f64)?, hits))
    }

    /// Adds the table's gradient that [`LmHead::loss_and_backward`] left for the weight step,
    /// chunk by chunk in the same order, so the sums come out as they would have there.
    pub(crate) fn backward_weight_deferred(&self, saved: &DeferredTableGrad, grads: &mut Gradients) -> Result<()> {
        match saved {
            DeferredTableGrad::Kept { h, dlogits, rows } => {
                for (i, dlogits) in dlogits.iter().enumerate() {
                    let h_chunk = h.narrow(0, i * rows, dlogits.dim(0)?)?;
                    grads.add_matmul(&self.table.name, &dlogits.t()?, &h_chunk)?;
                }
                Ok(())
            }
            DeferredTableGrad::Recomputed { h, targets, scale, rows } => {
                let table_t = self.table.value.t()?;
                let n = h.dim(0)?;
                for start in (0..n).step_by(*rows) {
                    let len = (*rows).min(n - start);
                    let h_chunk = h.narrow(0, start, len)?;
                    let logits = brigade_kernels::linear(&h_chunk, &table_t, None, None)?;
                    let t_chunk = targets.narrow(0, start, len)?;
                    let (_, dlogits) = brigade_kernels::cross_entropy_sum_with_grad_in_place(logits, &t_chunk, *scale)?;
                    grads.add_matmul(&self.table.name, &dlogits.t()?, &h_chunk)?;
                }
                Ok(())
            }
        }
    }
}

/// What [`LmHead::loss_and_backward`] computed.
pub(crate) struct FusedLoss {
    /// The micro-batch's loss (a scalar).
    pub(crate) loss: Tensor,
    /// `dh` `(N, C)`, unless only the loss was asked for.
    pub(crate) dh: Option<Tensor>,
    /// The table's gradient, when it waits for the weight step.
    pub(crate) table_grad: Option<DeferredTableGrad>,
}

/// The table's gradient `Σ_chunks dlogitsᵀ h` waiting for the weight step of a zero-bubble
/// schedule.
pub(crate) enum DeferredTableGrad {
    /// Each chunk's `dlogits`, with the hidden states they multiply.
    Kept { h: Tensor, dlogits: Vec<Tensor>, rows: usize },
    /// Too large to keep: each chunk's logits and their gradient are computed again.
    Recomputed { h: Tensor, targets: Tensor, scale: f64, rows: usize },
}

impl DeferredTableGrad {
    /// The tensors it holds (for the stage's memory accounting).
    pub(crate) fn tensors(&self) -> Vec<Tensor> {
        match self {
            Self::Kept { h, dlogits, .. } => std::iter::once(h).chain(dlogits).cloned().collect(),
            Self::Recomputed { h, targets, .. } => vec![h.clone(), targets.clone()],
        }
    }
}
