//! The language-model projection GPT's and Llama's heads end with: logits `h · Wᵀ` over a
//! `(V, C)` table (the token embedding's when tied), the input gradient `dlogits · W`, and the
//! table's gradient `dlogitsᵀ · h`. The norm before it is the head's own (LayerNorm or RMSNorm).

use brigade_engine::Gradients;
use candle_core::{Result, Tensor};

use super::Param;

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
}
