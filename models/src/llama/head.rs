//! The head: final RMSNorm (`model.norm`) and the LM head, its own `lm_head.weight` or tied
//! to the token embedding (`tie_word_embeddings`).

use brigade_engine::{Gradients, Init, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{Result, Tensor};

use super::check_hidden;
use super::config::INIT_STD;
use super::embedding::embed_spec;
use super::LlamaConfig;
use crate::blocks::{get_all, rms_norm_spec, LmHead, LmHeadGrads, RmsNorm, RmsNormGrads};

pub(super) const LM_HEAD: &str = "lm_head.weight";

#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub(super) cfg: LlamaConfig,
}

impl LayerSpec for HeadSpec {
    fn name(&self) -> String {
        "lm_head".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let cfg = &self.cfg;
        let table = if cfg.tie_word_embeddings {
            // Tied: the same name (and so the same Var) as the embedding's table.
            embed_spec(cfg)
        } else {
            ParamSpec::new(LM_HEAD, &[cfg.vocab_size, cfg.hidden_size], Init::Normal { std: INIT_STD })
        };
        vec![rms_norm_spec("model.norm", cfg.hidden_size), table]
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [norm, table] = get_all(store, &self.params())?;
        Ok(Box::new(Head {
            context: self.cfg.max_position_embeddings,
            norm: RmsNorm { weight: norm, eps: self.cfg.rms_norm_eps },
            lm_head: LmHead { table },
        }))
    }
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) context: usize,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: LmHead, // over its own or the tied table (V, C)
}

/// What the head's weight step needs: the table's and the norm's.
pub(super) struct HeadWeightGrads {
    pub(super) lm_head: LmHeadGrads,
    pub(super) norm: RmsNormGrads,
}

impl Head {
    /// `(B, T, C)` → normalised `(B·T, C)` and logits `(B, T, V)`.
    fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c) = self.lm_head.dims()?;
        check_hidden(x, c, self.context, "Llama head")?;
        let (b, t, _) = x.dims3()?;
        let h = self.norm.forward(x)?.reshape((b * t, c))?;
        let logits = self.lm_head.forward(&h, b, t)?;
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
        let (x, h): (Tensor, Tensor) = saved.take("Llama head")?;
        let (dh, lm_head) = self.lm_head.backward_input(&h, dlogits)?;
        let (dx, norm) = self.norm.backward_input(&x, &dh.reshape(x.shape())?)?;
        let kept = vec![lm_head.h.clone(), lm_head.dlogits.clone()];
        Ok((Some(dx), Saved::with_handles(HeadWeightGrads { lm_head, norm }, kept)))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads = saved.take("Llama head")?;
        self.norm.backward_weight(&w.norm, grads)?;
        self.lm_head.backward_weight(&w.lm_head, grads)
    }
}
