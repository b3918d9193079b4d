//! The head: final RMSNorm (`model.norm`) and the LM head, its own `lm_head.weight` or tied
//! to the token embedding (`tie_word_embeddings`), one [`NormedLmHead`] (which takes the
//! cross-entropy itself, chunk by chunk, in training).

use brigade_engine::{Init, Layer, LayerSpec, ParamSpec, ParamStore};
use candle_core::Result;

use super::config::INIT_STD;
use super::embedding::embed_spec;
use super::LlamaConfig;
use crate::blocks::{get_all, rms_norm_spec, LmHead, NormedLmHead, RmsNorm};

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
        let norm = RmsNorm { weight: norm, eps: self.cfg.rms_norm_eps };
        Ok(Box::new(NormedLmHead::new("Llama head", self.cfg.max_position_embeddings, norm, LmHead { table })))
    }
}
