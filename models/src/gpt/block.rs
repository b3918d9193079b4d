//! The transformer block (pre-LayerNorm): `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, with
//! its explicit backward.

use brigade_engine::{Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, Result, Tensor};

use super::attention::{AttentionSaved, CausalSelfAttention};
use super::check_hidden;
use super::config::INIT_STD;
use super::GptConfig;
use crate::blocks::{conv1d_specs, get_all, layer_norm_specs, Conv1D, LayerNorm, LayerNormGrads};

#[derive(Debug, Clone)]
pub struct BlockSpec {
    pub(super) cfg: GptConfig,
    pub(super) index: usize,
}

impl LayerSpec for BlockSpec {
    fn name(&self) -> String {
        format!("transformer.h.{}", self.index)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let p = self.name();
        let c = self.cfg.n_embd;
        // Residual projections are scaled down by √(2·n_layer): two residual adds per block.
        let proj_std = INIT_STD / (2.0 * self.cfg.n_layer as f64).sqrt();
        let mut specs = Vec::with_capacity(12);
        specs.extend(layer_norm_specs(&format!("{p}.ln_1"), c));
        specs.extend(conv1d_specs(&format!("{p}.attn.c_attn"), c, 3 * c, INIT_STD));
        specs.extend(conv1d_specs(&format!("{p}.attn.c_proj"), c, c, proj_std));
        specs.extend(layer_norm_specs(&format!("{p}.ln_2"), c));
        specs.extend(conv1d_specs(&format!("{p}.mlp.c_fc"), c, 4 * c, INIT_STD));
        specs.extend(conv1d_specs(&format!("{p}.mlp.c_proj"), 4 * c, c, proj_std));
        specs
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [ln1_w, ln1_b, attn_w, attn_b, aproj_w, aproj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b] =
            get_all(store, &self.params())?;
        let eps = self.cfg.layer_norm_epsilon;
        Ok(Box::new(Block {
            name: self.name(),
            n_embd: self.cfg.n_embd,
            n_positions: self.cfg.n_positions,
            ln_1: LayerNorm { weight: ln1_w, bias: ln1_b, eps },
            attn: CausalSelfAttention {
                n_head: self.cfg.n_head,
                c_attn: Conv1D::new(attn_w, attn_b),
                c_proj: Conv1D::new(aproj_w, aproj_b),
                cache: None,
            },
            ln_2: LayerNorm { weight: ln2_w, bias: ln2_b, eps },
            mlp: Mlp { c_fc: Conv1D::new(fc_w, fc_b), c_proj: Conv1D::new(mproj_w, mproj_b) },
        }))
    }
}

#[derive(Debug)]
pub(super) struct Mlp {
    pub(super) c_fc: Conv1D,   // C → 4C
    pub(super) c_proj: Conv1D, // 4C → C
}

impl Mlp {
    /// `residual + c_proj(gelu(c_fc(x)))`, the residual added by the last gemm call; with
    /// c_fc's output (GELU's input) and GELU's output, which the backward needs.
    fn forward_saving(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (fc_out, gelu_out) = self.c_fc.forward_gelu(x)?; // (B, T, 4C) each
        let y = self.c_proj.forward_residual(&gelu_out, Some(residual))?; // (B, T, C)
        Ok((y, fc_out, gelu_out))
    }

    /// The input gradient for `dy` from c_fc's saved output; returns it with c_fc's output
    /// gradient, which the weight step needs.
    fn backward_input(&mut self, fc_out: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dfc_out = self.c_proj.backward_input_gelu(dy, fc_out)?;
        Ok((self.c_fc.backward_input(&dfc_out)?, dfc_out))
    }

    /// The two projections' weight gradients from their inputs (`x`: ln_2's output; GELU's
    /// output) and output gradients (`dfc_out`; `dy`).
    fn backward_weight(
        &self,
        x: &Tensor,
        dfc_out: &Tensor,
        gelu_out: &Tensor,
        dy: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        self.c_fc.backward_weight(x, dfc_out, grads)?;
        self.c_proj.backward_weight(gelu_out, dy, grads)
    }

    fn parameters_changed(&mut self) {
        self.c_fc.parameters_changed();
        self.c_proj.parameters_changed();
    }

    fn kept_bytes(&self) -> u64 {
        self.c_fc.kept_bytes() + self.c_proj.kept_bytes()
    }
}

#[derive(Debug)]
pub(super) struct Block {
    pub(super) name: String,
    pub(super) n_embd: usize,
    pub(super) n_positions: usize,
    pub(super) ln_1: LayerNorm,
    pub(super) attn: CausalSelfAttention,
    pub(super) ln_2: LayerNorm,
    pub(super) mlp: Mlp,
}

/// A block's forward, kept for its backward.
pub(super) struct BlockSaved {
    /// The block's input (ln_1's input).
    pub(super) x: Tensor,
    pub(super) attn: AttentionSaved,
    /// The residual stream after attention (ln_2's input).
    pub(super) x2: Tensor,
    /// ln_2's output (c_fc's input), c_fc's output (GELU's input), GELU's output.
    pub(super) ln2_out: Tensor,
    pub(super) fc_out: Tensor,
    pub(super) gelu_out: Tensor,
}

/// What a block's weight step needs: each projection's input and output gradient, and the
/// LayerNorms' gradients.
pub(super) struct BlockWeightGrads {
    pub(super) ln1_out: Tensor,
    pub(super) dqkv: Tensor,
    pub(super) merged: Tensor,
    pub(super) dattn_out: Tensor,
    pub(super) ln1: LayerNormGrads,
    pub(super) ln2_out: Tensor,
    pub(super) dfc_out: Tensor,
    pub(super) gelu_out: Tensor,
    pub(super) dmlp_out: Tensor,
    pub(super) ln2: LayerNormGrads,
}

impl Block {
    /// `(B, T, C)` → `(B, T, C)`, with what the backward needs. The one forward of every path:
    /// [`Layer::forward`] (the autograd reference, evaluation) and [`Layer::forward_train`].
    fn forward_saving(&mut self, x: &Tensor) -> Result<(Tensor, BlockSaved)> {
        check_hidden(x, self.n_embd, self.n_positions, "GPT block")?;
        // Residual connections are added by the output projections' gemm calls.
        let (x2, attn) = self.attn.forward_saving(&self.ln_1.forward(x)?, Some(x))?; // (B, T, C)
        let ln2_out = self.ln_2.forward(&x2)?;
        let (y, fc_out, gelu_out) = self.mlp.forward_saving(&ln2_out, &x2)?;
        Ok((y, BlockSaved { x: x.clone(), attn, x2, ln2_out, fc_out, gelu_out }))
    }
}

impl Layer for Block {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(x)?.0)
    }

    fn forward_incremental(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        check_hidden(x, self.n_embd, self.n_positions, "GPT block")?;
        if offset + x.dim(1)? > self.n_positions {
            bail!("positions {offset}..{} exceed the model's context length {}", offset + x.dim(1)?, self.n_positions);
        }
        let x2 = self.attn.forward_incremental(&self.ln_1.forward(x)?, offset, x)?; // (B, T, C)
        Ok(self.mlp.forward_saving(&self.ln_2.forward(&x2)?, &x2)?.0)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, s) = self.forward_saving(x)?;
        let a = &s.attn;
        let keep = [&s.x, &a.x, &a.qkv, a.saved.tensor(), &a.merged, &s.x2, &s.ln2_out, &s.fc_out, &s.gelu_out];
        let keep = keep.into_iter().cloned().collect();
        Ok((y, Saved::with_handles(s, keep)))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let s: BlockSaved = saved.take(&self.name)?;
        // MLP branch: y = x2 + c_proj(gelu(c_fc(ln_2(x2)))).
        let (dln2_out, dfc_out) = self.mlp.backward_input(&s.fc_out, dy)?;
        let (dx2, ln2) = self.ln_2.backward_input_residual(&s.x2, &dln2_out, dy)?; // dy + ln_2's dx
                                                                                   // Attention branch: x2 = x + attn(ln_1(x)).
        let (dln1_out, dqkv) = self.attn.backward_input(&s.attn, &dx2)?;
        let (dx, ln1) = self.ln_1.backward_input_residual(&s.x, &dln1_out, &dx2)?; // dx2 + ln_1's dx
        let w = BlockWeightGrads {
            ln1_out: s.attn.x,
            dqkv,
            merged: s.attn.merged,
            dattn_out: dx2,
            ln1,
            ln2_out: s.ln2_out,
            dfc_out,
            gelu_out: s.gelu_out,
            dmlp_out: dy.clone(),
            ln2,
        };
        let keep = [&w.ln1_out, &w.dqkv, &w.merged, &w.dattn_out, &w.ln2_out, &w.dfc_out, &w.gelu_out, &w.dmlp_out];
        let keep = keep.into_iter().cloned().collect();
        let saved = Saved::with_handles(w, keep);
        Ok((Some(dx), saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: BlockWeightGrads = saved.take(&self.name)?;
        self.ln_1.backward_weight(&w.ln1, grads)?;
        self.attn.backward_weight(&w.ln1_out, &w.dqkv, &w.merged, &w.dattn_out, grads)?;
        self.ln_2.backward_weight(&w.ln2, grads)?;
        self.mlp.backward_weight(&w.ln2_out, &w.dfc_out, &w.gelu_out, &w.dmlp_out, grads)
    }

    fn parameters_changed(&mut self) {
        self.attn.parameters_changed();
        self.mlp.parameters_changed();
    }

    fn kept_bytes(&self) -> u64 {
        self.attn.kept_bytes() + self.mlp.kept_bytes()
    }
}
