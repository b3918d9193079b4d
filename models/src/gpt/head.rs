//! The head: final LayerNorm and the LM head tied to the token embedding.

use brigade_engine::{Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{Result, Tensor};

use super::check_hidden;
use super::embedding::wte_spec;
use super::GptConfig;
use crate::blocks::{get_all, layer_norm_specs, LayerNorm, LayerNormGrads, LmHead, LmHeadGrads};

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
            lm_head: LmHead { table: wte },
        }))
    }
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) n_positions: usize,
    pub(super) ln_f: LayerNorm,
    pub(super) lm_head: LmHead, // over the tied token table (V, C)
}

/// What the head's weight step needs: the tied table's and `ln_f`'s.
pub(super) struct HeadWeightGrads {
    pub(super) lm_head: LmHeadGrads,
    pub(super) ln_f: LayerNormGrads,
}

impl Head {
    /// `(B, T, C)` → normalised `(B·T, C)` and logits `(B, T, V)`.
    fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c) = self.lm_head.dims()?;
        check_hidden(x, c, self.n_positions, "GPT head")?;
        let (b, t, _) = x.dims3()?;
        let h = self.ln_f.forward(x)?.reshape((b * t, c))?; // (B·T, C)
        let logits = self.lm_head.forward(&h, b, t)?; // (B, T, V)
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
        let (dh, lm_head) = self.lm_head.backward_input(&h, dlogits)?;
        let (dx, ln_f) = self.ln_f.backward_input(&x, &dh.reshape(x.shape())?)?; // (B, T, C)
        let kept = vec![lm_head.h.clone(), lm_head.dlogits.clone()];
        Ok((Some(dx), Saved::with_handles(HeadWeightGrads { lm_head, ln_f }, kept)))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads = saved.take("GPT head")?;
        self.ln_f.backward_weight(&w.ln_f, grads)?;
        self.lm_head.backward_weight(&w.lm_head, grads)
    }
}
