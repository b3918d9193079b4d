//! The head: final LayerNorm (`ln_f`) and the LM head tied to the token embedding, one
//! [`NormedLmHead`] (which takes the cross-entropy itself, chunk by chunk, in training).

use brigade_engine::{Layer, LayerSpec, ParamSpec, ParamStore};
use candle_core::Result;

use super::embedding::wte_spec;
use super::GptConfig;
use crate::blocks::{get_all, layer_norm_specs, LayerNorm, LmHead, NormedLmHead};

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
        let norm = LayerNorm { weight: w, bias: b, eps: self.cfg.layer_norm_epsilon };
        Ok(Box::new(NormedLmHead::new("GPT head", self.cfg.n_positions, norm, LmHead { table: wte })))
    }
}
