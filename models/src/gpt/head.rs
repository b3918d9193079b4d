//! The head: final LayerNorm and the LM head tied to the token embedding.

use brigade_engine::{Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{Result, Tensor};

use super::check_hidden;
use super::embedding::wte_spec;
use super::GptConfig;
use crate::blocks::{get_all, layer_norm_specs, LayerNorm, LayerNormGrads, Param};

#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub(super) cfg: GptConfig,
}

impl LayerSpec for HeadSpec {
    fn name(&self) -> String {
        "lm_head".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut specs = layer_norm_specs("transformer.ln_f", self.cfg.n_embd).to_vec();
        // Tied: the same name (and so the same Var) as the embedding's token table.
        specs.push(wte_spec(&self.cfg));
        specs
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [w, b, wte] = get_all(store, &self.params())?;
        Ok(Box::new(Head {
            n_positions: self.cfg.n_positions,
            ln_f: LayerNorm { weight: w, bias: b, eps: self.cfg.layer_norm_epsilon },
            wte,
        }))
    }
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) n_positions: usize,
    pub(super) ln_f: LayerNorm,
    pub(super) wte: Param, // (V, C)
}

/// What the head's weight step needs: the tied table's gradient is `dlogitsᵀ h`.
pub(super) struct HeadWeightGrads {
    pub(super) h: Tensor,
    pub(super) dlogits: Tensor,
    pub(super) ln_f: LayerNormGrads,
}

impl Head {
    /// `(B, T, C)` → normalised `(B·T, C)` and logits `(B, T, V)`.
    fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (v, c) = self.wte.value.dims2()?;
        check_hidden(x, c, self.n_positions, "GPT head")?;
        let (b, t, _) = x.dims3()?;
        let h = self.ln_f.forward(x)?.reshape((b * t, c))?; // (B·T, C)
        let logits = brigade_kernels::linear(&h, &self.wte.value.t()?, None, None)?.reshape((b, t, v))?; // (B, T, V)
        Ok((h, logits))
    }
}

impl Layer for Head {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.logits(x)?.1)
    }

    fn forward_incremental(&mut self, x: &Tensor, _offset: usize) -> Result<Tensor> {
        Ok(self.logits(x)?.1)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (h, logits) = self.logits(x)?;
        Ok((logits, Saved::new((x.clone(), h.clone()), &[x, &h])))
    }

    fn backward_input(&mut self, saved: Saved, dlogits: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (x, h): (Tensor, Tensor) = saved.take("GPT head")?;
        let (b, t, v) = dlogits.dims3()?;
        let dlogits = dlogits.reshape((b * t, v))?;
        let dh = brigade_kernels::linear(&dlogits, &self.wte.value, None, None)?.reshape(x.shape())?; // (B, T, C)
        let (dx, ln_f) = self.ln_f.backward_input(&x, &dh)?;
        let saved = Saved::new(HeadWeightGrads { h: h.clone(), dlogits: dlogits.clone(), ln_f }, &[&h, &dlogits]);
        Ok((Some(dx), saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads = saved.take("GPT head")?;
        self.ln_f.backward_weight(&w.ln_f, grads)?;
        grads.add_matmul(&self.wte.name, &w.dlogits.t()?, &w.h)
    }
}
