//! The decoder block (pre-RMSNorm): `x + attn(norm(x))`, then `x + mlp(norm(x))`, with its
//! explicit backward.

use brigade_engine::{Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, Result, Tensor};

use super::attention::{AttentionSaved, GroupedQueryAttention};
use super::check_hidden;
use super::config::INIT_STD;
use super::mlp::SwiGlu;
use super::LlamaConfig;
use crate::blocks::{
    inverse_frequencies, linear_specs, rms_norm_spec, FusedLinear, LinearPart, Param, RmsNorm, RmsNormGrads, Rope,
};

#[derive(Debug, Clone)]
pub struct DecoderBlockSpec {
    pub(super) cfg: LlamaConfig,
    pub(super) index: usize,
}

impl LayerSpec for DecoderBlockSpec {
    fn name(&self) -> String {
        format!("model.layers.{}", self.index)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let p = self.name();
        let cfg = &self.cfg;
        let (c, d, f) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (h, kv, bias) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_bias);
        let mut specs = vec![rms_norm_spec(&format!("{p}.input_layernorm"), c)];
        specs.extend(linear_specs(&format!("{p}.self_attn.q_proj"), c, h * d, INIT_STD, bias));
        specs.extend(linear_specs(&format!("{p}.self_attn.k_proj"), c, kv * d, INIT_STD, bias));
        specs.extend(linear_specs(&format!("{p}.self_attn.v_proj"), c, kv * d, INIT_STD, bias));
        specs.extend(linear_specs(&format!("{p}.self_attn.o_proj"), h * d, c, INIT_STD, false));
        specs.push(rms_norm_spec(&format!("{p}.post_attention_layernorm"), c));
        specs.extend(linear_specs(&format!("{p}.mlp.gate_proj"), c, f, INIT_STD, false));
        specs.extend(linear_specs(&format!("{p}.mlp.up_proj"), c, f, INIT_STD, false));
        specs.extend(linear_specs(&format!("{p}.mlp.down_proj"), f, c, INIT_STD, false));
        specs
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let mut params = self
            .params()
            .iter()
            .map(|s| Ok(Param { name: s.name.clone(), value: store.get(s)? }))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let mut next = || params.next().ok_or_else(|| candle_core::Error::Msg("missing a block parameter".into()));
        let bias = self.cfg.attention_bias;
        let mut part = |with_bias: bool| -> Result<LinearPart> {
            let weight = next()?;
            let bias = if with_bias { Some(next()?) } else { None };
            Ok(LinearPart { weight, bias })
        };
        let norm_weight = part(false)?.weight;
        let qkv = FusedLinear { parts: vec![part(bias)?, part(bias)?, part(bias)?] };
        let o_proj = FusedLinear { parts: vec![part(false)?] };
        let post_norm_weight = part(false)?.weight;
        let gate_up = FusedLinear { parts: vec![part(false)?, part(false)?] };
        let down = FusedLinear { parts: vec![part(false)?] };
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        Ok(Box::new(DecoderBlock {
            name: self.name(),
            hidden: cfg.hidden_size,
            context: cfg.max_position_embeddings,
            input_layernorm: RmsNorm { weight: norm_weight, eps },
            attn: GroupedQueryAttention {
                n_head: cfg.num_attention_heads,
                n_kv_head: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                qkv,
                o_proj,
                // The tables grow with the sequences seen (up to the context), not the context.
                rope: Rope::new(&inv_freq, 0, store.device())?,
                inv_freq,
                cache: None,
            },
            post_attention_layernorm: RmsNorm { weight: post_norm_weight, eps },
            mlp: SwiGlu { gate_up, down },
        }))
    }
}

#[derive(Debug)]
pub(super) struct DecoderBlock {
    pub(super) name: String,
    pub(super) hidden: usize,
    pub(super) context: usize,
    pub(super) input_layernorm: RmsNorm,
    pub(super) attn: GroupedQueryAttention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: SwiGlu,
}

/// A block's forward, kept for its backward.
pub(super) struct BlockSaved {
    /// The block's input (the first norm's input).
    pub(super) x: Tensor,
    pub(super) attn: AttentionSaved,
    /// The residual stream after attention (the second norm's input).
    pub(super) x2: Tensor,
    /// The second norm's output, the gate/up output, and the SwiGLU product.
    pub(super) norm2_out: Tensor,
    pub(super) gate_up: Tensor,
    pub(super) act: Tensor,
}

/// What a block's weight step needs: each projection's input and output gradient, and the
/// norms' gain gradients.
pub(super) struct BlockWeightGrads {
    pub(super) norm1_out: Tensor,
    pub(super) dqkv: Tensor,
    pub(super) merged: Tensor,
    pub(super) dattn_out: Tensor,
    pub(super) norm1: RmsNormGrads,
    pub(super) norm2_out: Tensor,
    pub(super) dgate_up: Tensor,
    pub(super) act: Tensor,
    pub(super) dmlp_out: Tensor,
    pub(super) norm2: RmsNormGrads,
}

impl DecoderBlock {
    fn check(&mut self, x: &Tensor, offset: usize) -> Result<()> {
        check_hidden(x, self.hidden, self.context, "Llama block")?;
        let end = offset + x.dim(1)?;
        if end > self.context {
            bail!("positions {offset}..{end} exceed the model's context length {}", self.context);
        }
        self.attn.ensure_positions(end)
    }

    /// `(B, T, C)` → `(B, T, C)`, with what the backward needs. The one forward of every path:
    /// [`Layer::forward`] (the autograd reference, evaluation) and [`Layer::forward_train`].
    fn forward_saving(&mut self, x: &Tensor) -> Result<(Tensor, BlockSaved)> {
        self.check(x, 0)?;
        // Residual connections are added by the output projections' gemm calls.
        let (x2, attn) = self.attn.forward_saving(&self.input_layernorm.forward(x)?, x)?;
        let norm2_out = self.post_attention_layernorm.forward(&x2)?;
        let (y, gate_up, act) = self.mlp.forward_saving(&norm2_out, &x2)?;
        Ok((y, BlockSaved { x: x.clone(), attn, x2, norm2_out, gate_up, act }))
    }
}

impl Layer for DecoderBlock {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(x)?.0)
    }

    fn forward_incremental(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        self.check(x, offset)?;
        let x2 = self.attn.forward_incremental(&self.input_layernorm.forward(x)?, offset, x)?;
        Ok(self.mlp.forward_saving(&self.post_attention_layernorm.forward(&x2)?, &x2)?.0)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, s) = self.forward_saving(x)?;
        let a = &s.attn;
        let keep = [&s.x, &a.x, &a.q, &a.k, &a.v, &a.softmax, &a.merged, &s.x2, &s.norm2_out, &s.gate_up, &s.act];
        let keep = keep.into_iter().cloned().collect();
        Ok((y, Saved::with_handles(s, keep)))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let s: BlockSaved = saved.take(&self.name)?;
        // MLP branch: y = x2 + mlp(norm2(x2)).
        let (dnorm2_out, dgate_up) = self.mlp.backward_input(&s.gate_up, dy)?;
        let (dx2_norm, norm2) = self.post_attention_layernorm.backward_input(&s.x2, &dnorm2_out)?;
        // The residual branches' sums on the stage's threads (candle's add runs on its own pool).
        let dx2 = brigade_kernels::add(dy, &dx2_norm)?;
        // Attention branch: x2 = x + attn(norm1(x)).
        let (dnorm1_out, dqkv) = self.attn.backward_input(&s.attn, &dx2)?;
        let (dx_norm, norm1) = self.input_layernorm.backward_input(&s.x, &dnorm1_out)?;
        let dx = brigade_kernels::add(&dx2, &dx_norm)?;
        let w = BlockWeightGrads {
            norm1_out: s.attn.x,
            dqkv,
            merged: s.attn.merged,
            dattn_out: dx2,
            norm1,
            norm2_out: s.norm2_out,
            dgate_up,
            act: s.act,
            dmlp_out: dy.clone(),
            norm2,
        };
        let keep = [&w.norm1_out, &w.dqkv, &w.merged, &w.dattn_out, &w.norm2_out, &w.dgate_up, &w.act, &w.dmlp_out];
        let keep = keep.into_iter().cloned().collect();
        Ok((Some(dx), Saved::with_handles(w, keep)))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: BlockWeightGrads = saved.take(&self.name)?;
        self.input_layernorm.backward_weight(&w.norm1, grads)?;
        self.attn.backward_weight(&w.norm1_out, &w.dqkv, &w.merged, &w.dattn_out, grads)?;
        self.post_attention_layernorm.backward_weight(&w.norm2, grads)?;
        self.mlp.backward_weight(&w.norm2_out, &w.dgate_up, &w.act, &w.dmlp_out, grads)
    }
}
