//! Causal grouped-query self-attention with rotary positions: the q/k/v projections as one
//! product, RoPE on queries and keys, the attention core, the output projection, incremental
//! decoding with a KV cache of the k/v heads only, and the explicit input gradient.
//!
//! Grouped-query heads are read in place, with no `repeat_kv` copy. On the CPU (f32/f64, no
//! autograd graph) training's core is `brigade_kernels::grouped_causal_attention`: every
//! product reads the heads through their strides in the projection's `(B, T, heads, D)`
//! layout and writes the merged output, and in the backward the q/k/v gradient, in place, so
//! no permute, transpose or concatenation copies run. Elsewhere (autograd, other devices,
//! decoding) the `G` query heads that share a k/v head are stacked along the row axis,
//! `(B, KV, G·T, D)`, so one batched product per k/v head scores all of them against the
//! shared keys, and the backward's products sum the group's key and value gradients in the
//! same gemm. Training sequences of
//! `FLASH_MIN_SEQUENCE` and longer on the CPU take flash attention instead, by GPT's rule
//! (`brigade_kernels::flash::grouped_flash_attention`): each query head reads its k/v head in
//! place, only each row's log-sum-exp is kept, and the backward sums dk/dv over the group.

use brigade_engine::Gradients;
use brigade_kernels::flash;
use candle_core::{bail, Result, Tensor};

use crate::blocks::{FusedLinear, Rope};

#[derive(Debug)]
pub(super) struct GroupedQueryAttention {
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
    /// q, k and v projections, `C → (H + 2·KV)·D`.
    pub(super) qkv: FusedLinear,
    /// `H·D → C`.
    pub(super) o_proj: FusedLinear,
    /// RoPE's tables, grown to the longest sequence seen (see [`Self::ensure_positions`]).
    pub(super) rope: Rope,
    pub(super) inv_freq: Vec<f64>,
    /// Incremental decoding's rotated keys and values of every position so far, `(B, KV, S, D)`.
    pub(super) cache: Option<(Tensor, Tensor)>,
}

/// What attention's forward keeps for its backward.
pub(super) struct AttentionSaved {
    /// The attention's input (the q/k/v projections' input).
    pub(super) x: Tensor,
    /// Which attention core ran, and so the layouts below.
    pub(super) core: Core,
    /// Rotated queries, rotated keys and values: `(B, KV, G·T, D)` and `(B, KV, T, D)`
    /// (stacked), or `(B, T, H, D)` and `(B, T, KV, D)` (in place, flash).
    pub(super) q: Tensor,
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    /// What the softmax's backward starts from: the probabilities `(B, KV, G·T, T)` (stacked;
    /// the same memory as `(B, H, T, T)`, in place) or each query row's log-sum-exp `(B, H, T)`
    /// (flash: no T×T matrix).
    pub(super) softmax: Tensor,
    /// The merged heads `(B, T, H·D)`, the output projection's input.
    pub(super) merged: Tensor,
}

/// The attention core a training forward ran (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Core {
    /// `brigade_kernels::grouped_causal_attention`: probabilities kept, heads read in place.
    InPlace,
    /// Batched products over the stacked groups (candle ops): probabilities kept.
    Stacked,
    /// `brigade_kernels::flash::grouped_flash_attention`: log-sum-exps kept.
    Flash,
}

impl GroupedQueryAttention {
    /// Grows the RoPE tables to cover positions `0..end`: to the next power of two, so a
    /// long-context config (Llama 3.2's 131072 positions) costs only what is used.
    pub(super) fn ensure_positions(&mut self, end: usize) -> Result<()> {
        if self.rope.positions() < end {
            let device = self.o_proj.parts[0].weight.value.device().clone();
            self.rope = Rope::new(&self.inv_freq, end.next_power_of_two(), &device)?;
        }
        Ok(())
    }

    fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    /// Projects `x` `(B, T, C)` at positions `offset..` to rotated queries `(B, T, H, D)`,
    /// rotated keys `(B, T, KV, D)` and values `(B, T, KV, D)` (a view of the projection).
    fn project_heads(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.n_head, self.n_kv_head, self.head_dim);
        // (B, T, H + 2KV, D): the heads as views of the projection, no copies.
        let qkv = self.qkv.forward(x)?.reshape((b, t, h + 2 * kv, d))?;
        let q = self.rope.forward(&qkv.narrow(2, 0, h)?, offset)?;
        let k = self.rope.forward(&qkv.narrow(2, h, kv)?, offset)?;
        let v = qkv.narrow(2, h + kv, kv)?;
        Ok((q, k, v))
    }

    /// Projects `x` `(B, T, C)` at positions `offset..` to rotated queries `(B, KV, G·T, D)`
    /// and rotated keys and values `(B, KV, T, D)`.
    fn project(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.project_heads(x, offset)?;
        self.stack_groups(&q, &k, &v)
    }

    /// [`Self::project_heads`]'s layouts to the materialised core's: queries `(B, KV, G·T, D)`,
    /// keys and values `(B, KV, T, D)`.
    fn stack_groups(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _, _) = q.dims4()?;
        let (kv, d, g) = (self.n_kv_head, self.head_dim, self.group());
        // Head `i·G + j` is the j-th query head of k/v head i (HF's `repeat_kv` order).
        let q = q.reshape((b, t, kv, g, d))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, kv, g * t, d))?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// The attention core of `T` new positions `offset..offset + T` over keys and values of
    /// positions `0..S`: the heads `(B, KV, G·T, D)` and the probabilities `(B, KV, G·T, S)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, t: usize, offset: usize) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let scale = self.scale();
        // Unscaled scores (B, KV, G·T, S). Row `j·T + i` is position `offset + i`, which sees
        // positions `0..=offset + i`. A whole sequence (training, a prefill from 0) is causal row
        // by row, which the fused scale-mask-softmax computes in one pass; a single new position
        // (decoding) sees every position; a chunk after a cached prefix gets its mask here.
        let scores = q.matmul(&k.t()?)?;
        let probs = if offset == 0 && s == t {
            brigade_kernels::causal_softmax(&scores, scale)?
        } else if t > 1 {
            let rows = self.group() * t;
            let data: Vec<u8> = (0..rows).flat_map(|r| (0..s).map(move |j| u8::from(j <= offset + r % t))).collect();
            let mask = Tensor::from_vec(data, (rows, s), q.device())?.broadcast_as(scores.shape())?;
            let neg_inf =
                Tensor::new(f32::NEG_INFINITY, q.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
            brigade_kernels::softmax_last_dim(&mask.where_cond(&(scores * scale)?, &neg_inf)?)?
        } else {
            brigade_kernels::softmax_last_dim(&(scores * scale)?)?
        };
        Ok((probs.matmul(v)?, probs))
    }

    /// The scores' scale, `1 / sqrt(D)`.
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `(B, KV, G·T, D)` → `(B, T, H·D)`.
    fn merge(&self, y: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let (kv, g, d) = (self.n_kv_head, self.group(), self.head_dim);
        y.reshape((b, kv, g, t, d))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b, t, kv * g * d))
    }

    /// `residual + attention(x)` for `x` `(B, T, C)`, keeping what the backward needs.
    ///
    /// While candle records a graph (the autograd reference, gradient checks), and off the
    /// CPU, the core keeps the probabilities; untracked f32/f64 sequences of
    /// `FLASH_MIN_SEQUENCE` and longer on the CPU take flash attention, as GPT's blocks do.
    /// The exactness tests and gradient checks hold the two together.
    pub(super) fn forward_saving(&mut self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, AttentionSaved)> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project_heads(x, 0)?;
        let (q, k, v, softmax, merged, core) = if !q.track_op() && flash::grouped_takes_flash(&q) {
            // The saved values are dense, so the backward need not gather them again.
            let v = v.contiguous()?;
            let (y, lse) = flash::grouped_flash_attention(&q, &k, &v)?; // (B, T, H, D), (B, H, T)
            let merged = y.reshape((b, t, self.n_head * self.head_dim))?;
            (q, k, v, lse, merged, Core::Flash)
        } else if brigade_kernels::grouped_causal_attention_runs(&q, &k, &v) {
            // `v` stays a view of the projection: the kernels read it through its strides.
            let (merged, probs) = brigade_kernels::grouped_causal_attention(&q, &k, &v)?;
            (q, k, v, probs, merged, Core::InPlace)
        } else {
            let (q, k, v) = self.stack_groups(&q, &k, &v)?;
            let (y, probs) = self.attend(&q, &k, &v, t, 0)?;
            let merged = self.merge(&y, b, t)?;
            (q, k, v, probs, merged, Core::Stacked)
        };
        let out = self.o_proj.forward_residual(&merged, Some(residual))?;
        Ok((out, AttentionSaved { x: x.clone(), core, q, k, v, softmax, merged }))
    }

    /// Attention of the new positions `offset..offset + T` over every position so far: their
    /// keys and values join the cache (k/v heads only). Offset 0 starts a new sequence.
    /// Returns `residual + attention(x)`.
    pub(super) fn forward_incremental(&mut self, x: &Tensor, offset: usize, residual: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
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
        let (q, k_new, v_new) = self.project(x, offset)?;
        let (k, v) = match self.cache.take() {
            Some((k, v)) => (Tensor::cat(&[&k, &k_new], 2)?, Tensor::cat(&[&v, &v_new], 2)?),
            None => (k_new, v_new),
        };
        let (y, _) = self.attend(&q, &k, &v, t, offset)?;
        self.cache = Some((k, v));
        self.o_proj.forward_residual(&self.merge(&y, b, t)?, Some(residual))
    }

    /// The input gradient; returns it with the q/k/v projections' output gradient, which
    /// their weight step needs.
    pub(super) fn backward_input(&self, s: &AttentionSaved, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = dout.dims3()?;
        let (h, kv, d, g) = (self.n_head, self.n_kv_head, self.head_dim, self.group());
        let dmerged = self.o_proj.backward_input(dout)?; // (B, T, H·D)

        if s.core == Core::InPlace {
            // dq, dk (RoPE's backward applied) and dv written in the projection's layout.
            let (cos, sin) = self.rope.tables(0, t)?;
            let dqkv =
                brigade_kernels::grouped_causal_attention_backward(&s.q, &s.k, &s.v, &s.softmax, &dmerged, &cos, &sin)?;
            return Ok((self.qkv.backward_input(&dqkv)?, dqkv));
        }
        // dq (B, T, H, D), dk and dv (B, T, KV, D), before RoPE's backward.
        let (dq, dk, dv) = match s.core {
            Core::Flash => {
                let heads = |y: &Tensor| y.reshape((b, t, h, d));
                flash::grouped_flash_attention_backward(
                    &s.q,
                    &s.k,
                    &s.v,
                    &heads(&s.merged)?,
                    &s.softmax,
                    &heads(&dmerged)?,
                )?
            }
            Core::Stacked | Core::InPlace => {
                let dy = dmerged.reshape((b, t, kv, g, d))?.permute((0, 2, 3, 1, 4))?.contiguous()?;
                let dy = dy.reshape((b, kv, g * t, d))?;
                // dprobs (B, KV, G·T, T); dv (B, KV, T, D): one product per k/v head sums its
                // group's value gradients.
                let dprobs = dy.matmul(&s.v.t()?)?;
                let dv = s.softmax.t()?.matmul(&dy)?;
                // Training's probabilities are the whole sequence's (offset 0): causal row by row.
                let dscores = brigade_kernels::causal_softmax_backward(&s.softmax, &dprobs, self.scale())?;
                let dq = dscores.matmul(&s.k)?; // (B, KV, G·T, D)
                let dk = dscores.t()?.matmul(&s.q)?; // (B, KV, T, D)
                let dq = dq.reshape((b, kv, g, t, d))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b, t, h, d))?;
                (dq, dk.transpose(1, 2)?.contiguous()?, dv.transpose(1, 2)?.contiguous()?)
            }
        };
        let dq = self.rope.backward(&dq, 0)?.reshape((b, t, h * d))?;
        let dk = self.rope.backward(&dk, 0)?.reshape((b, t, kv * d))?;
        let dv = dv.reshape((b, t, kv * d))?;
        let dqkv = Tensor::cat(&[&dq, &dk, &dv], 2)?; // (B, T, (H + 2KV)·D)
        Ok((self.qkv.backward_input(&dqkv)?, dqkv))
    }

    /// The projections' weight gradients from their inputs (`x`; the merged heads) and output
    /// gradients (`dqkv`; `dout`).
    pub(super) fn backward_weight(
        &self,
        x: &Tensor,
        dqkv: &Tensor,
        merged: &Tensor,
        dout: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        self.qkv.backward_weight(x, dqkv, grads)?;
        self.o_proj.backward_weight(merged, dout, grads)
    }
}

#[cfg(test)]
mod tests {
    use brigade_engine::gradcheck::check_layer;
    use brigade_engine::{ParamStore, Pass, PipelineModel};
    use candle_core::{Device, Tensor};

    use crate::llama::{Llama, LlamaConfig};

    /// At sequences of `FLASH_MIN_SEQUENCE` and longer a block's grouped-query attention (here
    /// 4 query heads over 2 k/v heads) runs as flash attention on the CPU, keeping only the
    /// log-sum-exp; its explicit backward still matches autograd through the materialised
    /// composition, dk/dv summed over each group.
    #[test]
    fn long_sequences_take_grouped_flash_attention_and_match_autograd() {
        let t = brigade_kernels::FLASH_MIN_SEQUENCE + 3;
        let cfg = LlamaConfig::preset("llama-tiny")
            .unwrap()
            .with_vocab_size(16)
            .with_max_position_embeddings(t)
            .with_num_attention_heads(4)
            .with_hidden_size(16)
            .with_intermediate_size(12)
            .with_num_hidden_layers(1)
            .with_num_key_value_heads(2);
        let model = Llama::new(cfg).unwrap();
        let block = model.layers()[1].clone();
        let hidden = (Tensor::randn(0f32, 1.0, (2, t, 16), &Device::Cpu).unwrap() * 2.0).unwrap();
        let report = check_layer(block.as_ref(), &hidden, 5).unwrap();
        assert!(report.max() <= 1e-5, "{report:?}");
        // It took the flash path: it kept (B, H, T) log-sum-exps, not (B, KV, G·T, T)
        // probabilities. Built as a stage builds it: over detached views of the variables.
        let mut store = ParamStore::new(Device::Cpu, 5);
        block.build(&mut store).unwrap();
        let mut layer = block.build(&mut store.shared_view()).unwrap();
        let (_, saved) = layer.forward_train(&hidden, Pass::First).unwrap();
        let biggest = saved.tensors().iter().map(|s| s.elem_count()).max().unwrap();
        assert!(biggest < 2 * t * t, "a T x T tensor was kept: {biggest} elements");
    }
}
