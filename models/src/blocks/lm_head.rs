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

use brigade_engine::Gradients;
use candle_core::{DType, Result, Tensor};

use super::Param;

/// The most bytes of logits one chunk of [`LmHead::loss_and_backward`] holds: 125 rows at
/// GPT-2's vocabulary. Rows beyond ~100 keep the GEMMs efficient; the table gradient's GEMM
/// reads and writes its `(V, C)` sum once per chunk, so fewer, larger chunks move less.
pub(crate) const CHUNK_BYTES: usize = 24 << 20;

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
    /// With `grads`, also the backward from that loss: the table's gradient `dlogitsᵀ h` goes
    /// into `grads` chunk by chunk, and `dh = dlogits · W` `(N, C)` is returned. `chunk_rows`
    /// rows at a time ([`LmHead::chunk_rows`]; tests take a few to cover the boundaries). Each chunk's
    /// `dlogits` is what `microbatch_loss_backward` gives for its rows; the table's gradient
    /// sums the chunks' products, so it matches the unfused product to rounding.
    pub(crate) fn loss_and_backward(
        &self,
        h: &Tensor,
        targets: &Tensor,
        global_terms: usize,
        mut grads: Option<&mut Gradients>,
        chunk_rows: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
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
        let mut total: Option<Tensor> = None; // f64 scalar, left on the device
        let mut dh_chunks = Vec::new();
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let h_chunk = h.narrow(0, start, len)?; // (len, C), a contiguous view
            let t_chunk = targets.narrow(0, start, len)?;
            let logits = brigade_kernels::linear(&h_chunk, &table_t, None, None)?; // (len, V)
            let loss = match grads.as_deref_mut() {
                None => brigade_kernels::cross_entropy_sum(&logits, &t_chunk)?.to_dtype(DType::F64)?,
                Some(grads) => {
                    let (loss, dlogits) =
                        brigade_kernels::cross_entropy_sum_with_grad_in_place(logits, &t_chunk, scale)?;
                    dh_chunks.push(brigade_kernels::linear(&dlogits, &self.table.value, None, None)?); // (len, C)
                    grads.add_matmul(&self.table.name, &dlogits.t()?, &h_chunk)?;
                    loss
                }
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
        Ok((loss, dh))
    }
}
