//! The token embedding (`model.embed_tokens`): token ids → rows of the table (no position
//! embedding: positions enter through RoPE), and its explicit backward.

use brigade_engine::{Gradients, Init, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, DType, Result, Tensor};

use super::config::INIT_STD;
use super::LlamaConfig;
use crate::blocks::{get_all, Param};

pub(super) const EMBED: &str = "model.embed_tokens.weight";

pub(super) fn embed_spec(cfg: &LlamaConfig) -> ParamSpec {
    ParamSpec::new(EMBED, &[cfg.vocab_size, cfg.hidden_size], Init::Normal { std: INIT_STD })
}

#[derive(Debug, Clone)]
pub struct EmbeddingSpec {
    pub(super) cfg: LlamaConfig,
}

impl LayerSpec for EmbeddingSpec {
    fn name(&self) -> String {
        "model.embed_tokens".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![embed_spec(&self.cfg)]
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [table] = get_all(store, &self.params())?;
        Ok(Box::new(Embedding { table, context: self.cfg.max_position_embeddings }))
    }
}

#[derive(Debug)]
pub(super) struct Embedding {
    pub(super) table: Param, // (V, C)
    pub(super) context: usize,
}

impl Embedding {
    /// Validates token ids at positions `offset..` and returns them flattened as u32 with the
    /// batch shape.
    fn checked_ids(&self, ids: &Tensor, offset: usize) -> Result<(Tensor, usize, usize)> {
        let (b, t) = match ids.dims() {
            &[b, t] => (b, t),
            dims => bail!("Llama embedding expects token ids of shape (B, T), got {dims:?}"),
        };
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!("Llama embedding expects integer token ids (u32/i64/u8), got dtype {:?}", ids.dtype());
        }
        if t == 0 || b == 0 {
            bail!("Llama embedding got an empty batch of token ids, shape {:?}", ids.dims());
        }
        if offset == 0 && t > self.context {
            bail!("sequence length {t} exceeds the model's context length {}", self.context);
        }
        if offset + t > self.context {
            bail!("positions {offset}..{} exceed the model's context length {}", offset + t, self.context);
        }
        // Range check first: index_select on an out-of-range id would read garbage or panic.
        // On a GPU the pipeline's batch check has already checked them on the host (as GPT's).
        let vocab = self.table.value.dim(0)?;
        if ids.device().is_cpu() {
            let ids64 = ids.to_dtype(DType::I64)?.flatten_all()?;
            let (lo, hi) = (ids64.min(0)?.to_scalar::<i64>()?, ids64.max(0)?.to_scalar::<i64>()?);
            if lo < 0 || hi >= vocab as i64 {
                let bad = if lo < 0 { lo } else { hi };
                bail!("token id {bad} is out of range for vocabulary size {vocab}");
            }
        }
        Ok((ids.to_dtype(DType::U32)?.flatten_all()?, b, t))
    }

    /// `(B, T)` ids → `(B, T, C)`, with the flattened ids the weight gradient needs.
    fn forward_saving(&self, ids: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        let (flat, b, t) = self.checked_ids(ids, offset)?;
        Ok((self.table.value.index_select(&flat, 0)?.reshape((b, t, ()))?, flat))
    }
}

impl Layer for Embedding {
    fn forward(&mut self, ids: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(ids, 0)?.0)
    }

    fn forward_incremental(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        Ok(self.forward_saving(ids, offset)?.0)
    }

    fn forward_train(&mut self, ids: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, flat) = self.forward_saving(ids, 0)?;
        Ok((y, Saved::new(flat.clone(), &[&flat])))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        // Token ids have no gradient; everything here is the weight step's.
        let flat: Tensor = saved.take("Llama embedding")?;
        Ok((None, Saved::new((flat.clone(), dy.clone()), &[&flat, dy])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (flat, dy): (Tensor, Tensor) = saved.take("Llama embedding")?;
        let (b, t, c) = dy.dims3()?;
        // Scatter-add each position's gradient to its token's row.
        let dtable = self.table.value.zeros_like()?.index_add(&flat, &dy.reshape((b * t, c))?, 0)?;
        grads.add(&self.table.name, &dtable)
    }
}
