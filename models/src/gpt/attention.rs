//! Causal multi-head self-attention: the fused `qkv` projection, the attention core (fused
//! kernel, or the differentiable composition while autograd records), the output projection,
//! incremental decoding with a KV cache, and the input gradient.

use brigade_engine::Gradients;
use candle_core::{bail, Result, Tensor};

use crate::blocks::Conv1D;

#[derive(Debug)]
pub(super) struct CausalSelfAttention {
    pub(super) n_head: usize,
    pub(super) c_attn: Conv1D, // C → 3C (q, k, v fused)
    pub(super) c_proj: Conv1D, // C → C
    /// Incremental decoding's keys and values of every position so far, each `(B, H, T, D)`.
    pub(super) cache: Option<(Tensor, Tensor)>,
}

/// What attention's forward keeps: its input, the fused `qkv` projection, the attention
/// probabilities and the merged heads (the output projection's input).
pub(super) struct AttentionSaved {
    pub(super) x: Tensor,
    pub(super) qkv: Tensor,
    /// What the attention backward starts from: the probabilities (materialised path) or the
    /// per-row log-sum-exp (flash attention, the CPU's f32 path: no T×T matrix kept).
    pub(super) saved: brigade_kernels::AttentionSaved,
    pub(super) merged: Tensor,
}

impl CausalSelfAttention {
    /// `(B, T, C)` → `(B, T, C)`, keeping what the backward needs.
    ///
    /// While candle records a graph (the autograd reference, gradient checks) the attention
    /// core is the differentiable composition; otherwise it is the fused kernel, whose backward
    /// is [`Self::backward_input`]'s explicit call. The exactness tests hold the two together.
    pub(super) fn forward_saving(&mut self, x: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, AttentionSaved)> {
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let (merged, saved) = if qkv.track_op() {
            let (merged, probs) = brigade_kernels::reference::causal_attention(&qkv, self.n_head)?;
            (merged, brigade_kernels::AttentionSaved::Probs(probs))
        } else {
            brigade_kernels::causal_attention_saving(&qkv, self.n_head)?
        }; // (B, T, C), probabilities (B, H, T, T) or log-sum-exp (B, H, T)
        let out = self.c_proj.forward_residual(&merged, residual)?;
        Ok((out, AttentionSaved { x: x.clone(), qkv, saved, merged }))
    }

    /// Attention of the new positions `offset..offset + T` over every position so far: their
    /// keys and values join the cache, so each step computes only `T` rows of scores instead
    /// of the whole window's. Offset 0 starts a new sequence.
    /// Returns `residual + attention(x)`.
    pub(super) fn forward_incremental(&mut self, x: &Tensor, offset: usize, residual: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, d) = (self.n_head, c / self.n_head);
        if offset == 0 {
            self.cache = None;
        }
        let cached = match &self.cache {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        if cached != offset {
            bail!("incremental attention at position {offset}, but {cached} positions are cached (start again at 0)");
        }
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
            // (B, H, T, D)
        };
        let (q, k_new, v_new) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match self.cache.take() {
            Some((k, v)) => (Tensor::cat(&[&k, &k_new], 2)?, Tensor::cat(&[&v, &v_new], 2)?), // (B, H, S, D)
            None => (k_new, v_new),
        };
        let s = offset + t;
        let scores = (brigade_kernels::matmul(&q, &k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (B, H, T, S)
                                                                                           // New position `offset + i` sees positions `0..=offset + i`; a single new token sees all.
        let scores = if t > 1 {
            let data: Vec<u8> = (0..t).flat_map(|i| (0..s).map(move |j| u8::from(j <= offset + i))).collect();
            let mask = Tensor::from_vec(data, (t, s), x.device())?.broadcast_as(scores.shape())?;
            let neg_inf =
                Tensor::new(f32::NEG_INFINITY, x.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
            mask.where_cond(&scores, &neg_inf)?
        } else {
            scores
        };
        let probs = brigade_kernels::softmax_last_dim(&scores)?; // (B, H, T, S)
        let y = brigade_kernels::matmul(&probs, &v)?; // (B, H, T, D)
        self.cache = Some((k, v));
        let merged = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.c_proj.forward_residual(&merged, Some(residual))
    }

    /// The input gradient; returns it with the gradients of the two projections' outputs
    /// (`dqkv`, `dout`), which is what their weight steps need.
    pub(super) fn backward_input(&mut self, s: &AttentionSaved, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        let dmerged = self.c_proj.backward_input(dout)?; // (B, T, C)
        let dqkv =
            brigade_kernels::causal_attention_saved_backward(&s.qkv, &s.merged, &s.saved, &dmerged, self.n_head)?; // (B, T, 3C)
        let dx = self.c_attn.backward_input(&dqkv)?;
        Ok((dx, dqkv))
    }

    /// The two projections' weight gradients from their inputs (`x`: the attention's input,
    /// ln_1's output; `merged`: the merged heads) and output gradients (`dqkv`; `dout`). Only
    /// these are kept for the weight step, not the probabilities.
    pub(super) fn backward_weight(
        &self,
        x: &Tensor,
        dqkv: &Tensor,
        merged: &Tensor,
        dout: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        self.c_attn.backward_weight(x, dqkv, grads)?;
        self.c_proj.backward_weight(merged, dout, grads)
    }

    /// The projections' parameters changed in place (the optimizer's step).
    pub(super) fn parameters_changed(&mut self) {
        self.c_attn.parameters_changed();
        self.c_proj.parameters_changed();
    }

    /// The projections' kept transposed weights, in bytes.
    pub(super) fn kept_bytes(&self) -> u64 {
        self.c_attn.kept_bytes() + self.c_proj.kept_bytes()
    }
}
