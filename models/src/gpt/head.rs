//! The head: final LayerNorm and the LM head tied to the token embedding.
//!
//! In training the head takes the cross-entropy itself ([`Layer::forward_with_loss`]): the
//! logits go through chunk by chunk and never exist whole (see `blocks/lm_head.rs`), and the
//! table's gradient is added while each chunk is in hand, so its weight step is `ln_f`'s only.

use brigade_engine::{Gradients, Layer, LayerSpec, LossInput, LossKind, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, Result, Tensor};

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
            chunk_rows: None,
        }))
    }
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) n_positions: usize,
    pub(super) ln_f: LayerNorm,
    pub(super) lm_head: LmHead, // over the tied token table (V, C)
    /// Rows per chunk of the fused loss; `None`: [`LmHead::chunk_rows`].
    pub(super) chunk_rows: Option<usize>,
}

/// What the head's weight step needs: `ln_f`'s, and the tied table's unless the fused loss
/// already added it.
pub(super) struct HeadWeightGrads {
    pub(super) lm_head: Option<LmHeadGrads>,
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
        Ok((Some(dx), Saved::with_handles(HeadWeightGrads { lm_head: Some(lm_head), ln_f }, kept)))
    }

    fn forward_with_loss(
        &mut self,
        x: &Tensor,
        loss: &LossInput<'_>,
        grads: Option<&mut Gradients>,
        _pass: Pass,
    ) -> Result<Option<(Tensor, Saved)>> {
        if loss.kind != LossKind::CrossEntropy {
            return Ok(None);
        }
        let (_, c) = self.lm_head.dims()?;
        check_hidden(x, c, self.n_positions, "GPT head")?;
        let (b, t, _) = x.dims3()?;
        if loss.targets.dims() != [b, t] {
            bail!("targets of shape {:?} do not match the GPT head's positions ({b}, {t})", loss.targets.dims());
        }
        let h = self.ln_f.forward(x)?.reshape((b * t, c))?; // (B·T, C)
        let rows = match self.chunk_rows {
            Some(rows) => rows,
            None => self.lm_head.chunk_rows(h.dtype())?,
        };
        let with_grads = grads.is_some();
        let (value, dh) =
            self.lm_head.loss_and_backward(&h, &loss.targets.flatten_all()?, loss.global_terms, grads, rows)?;
        let saved = match dh {
            Some(dh) => Saved::new((x.clone(), dh.clone()), &[x, &dh]),
            None if with_grads => bail!("GPT head: the fused loss returned no input gradient"),
            None => Saved::empty(),
        };
        Ok(Some((value, saved)))
    }

    fn backward_input_from_loss(&mut self, saved: Saved, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (x, dh): (Tensor, Tensor) = saved.take("GPT head")?;
        let (dx, ln_f) = self.ln_f.backward_input(&x, &dh.reshape(x.shape())?)?; // (B, T, C)
        Ok((Some(dx), Saved::new(HeadWeightGrads { lm_head: None, ln_f }, &[])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads = saved.take("GPT head")?;
        self.ln_f.backward_weight(&w.ln_f, grads)?;
        match &w.lm_head {
            Some(lm_head) => self.lm_head.backward_weight(lm_head, grads),
            None => Ok(()),
        }
    }
}
