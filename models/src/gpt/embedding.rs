//! The embedding layer: token ids → token + position embeddings, and its explicit backward.

use brigade_engine::{Gradients, Init, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, DType, Result, Tensor};

use super::config::INIT_STD;
use super::GptConfig;
use crate::blocks::{get_all, Param};

pub(super) const WTE: &str = "transformer.wte.weight";
pub(super) const WPE: &str = "transformer.wpe.weight";

pub(super) fn wte_spec(cfg: &GptConfig) -> ParamSpec {
    ParamSpec::new(WTE, &[cfg.vocab_size, cfg.n_embd], Init::Normal { std: INIT_STD })
}

#[derive(Debug, Clone)]
pub struct EmbeddingSpec {
    pub(super) cfg: GptConfig,
}

impl LayerSpec for EmbeddingSpec {
    fn name(&self) -> String {
        "transformer.embed".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let cfg = &self.cfg;
        vec![wte_spec(cfg), ParamSpec::new(WPE, &[cfg.n_positions, cfg.n_embd], Init::Normal { std: INIT_STD })]
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [wte, wpe] = get_all(store, &self.params())?;
        Ok(Box::new(Embedding { wte, wpe, vocab: self.cfg.vocab_size }))
    }
}

#[derive(Debug)]
pub(super) struct Embedding {
    pub(super) wte: Param, // (V, C)
    pub(super) wpe: Param, // (ctx, C)
    pub(super) vocab: usize,
}

impl Embedding {
    /// Validates token ids and returns them flattened as u32 with the batch shape.
    fn checked_ids(&self, ids: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (b, t) = match ids.dims() {
            &[b, t] => (b, t),
            dims => bail!("GPT embedding expects token ids of shape (B, T), got {dims:?}"),
        };
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!("GPT embedding expects integer token ids (u32/i64/u8), got dtype {:?}", ids.dtype());
        }
        let context = self.wpe.value.dim(0)?;
        if t == 0 || b == 0 {
            bail!("GPT embedding got an empty batch of token ids, shape {:?}", ids.dims());
        }
        if t > context {
            bail!("sequence length {t} exceeds the model's context length {context}");
        }
        // Range check first: index_select on an out-of-range id would read garbage or panic.
        // On a GPU reading the ids back would stop the stage's stream twice per micro-batch:
        // there the pipeline's batch check (`InputKind::Tokens`) has already checked them on
        // the host, once per step, before they were uploaded.
        if ids.device().is_cpu() {
            let ids64 = ids.to_dtype(DType::I64)?.flatten_all()?;
            let (lo, hi) = (ids64.min(0)?.to_scalar::<i64>()?, ids64.max(0)?.to_scalar::<i64>()?);
            if lo < 0 || hi >= self.vocab as i64 {
                let bad = if lo < 0 { lo } else { hi };
                bail!("token id {bad} is out of range for vocabulary size {}", self.vocab);
            }
        }
        Ok((ids.to_dtype(DType::U32)?.flatten_all()?, b, t))
    }

    /// `(B, T)` ids → `(B, T, C)`, with the flattened ids the weight gradient needs. The one
    /// forward of [`Layer::forward`] and [`Layer::forward_train`] (decoding adds an offset).
    fn forward_saving(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (flat, b, t) = self.checked_ids(ids)?;
        Ok((self.embed(&flat, b, t, 0)?, flat))
    }

    /// Token plus position embeddings of positions `offset..offset + t`.
    fn embed(&self, flat: &Tensor, b: usize, t: usize, offset: usize) -> Result<Tensor> {
        let tok = self.wte.value.index_select(flat, 0)?.reshape((b, t, ()))?; // (B, T, C)
        let pos = self.wpe.value.narrow(0, offset, t)?; // (T, C)
        tok.broadcast_add(&pos) // (B, T, C)
    }
}

impl Layer for Embedding {
    fn forward(&mut self, ids: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(ids)?.0)
    }

    fn forward_incremental(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (flat, b, t) = self.checked_ids(ids)?;
        let context = self.wpe.value.dim(0)?;
        if offset + t > context {
            bail!("positions {offset}..{} exceed the model's context length {context}", offset + t);
        }
        self.embed(&flat, b, t, offset)
    }

    fn forward_train(&mut self, ids: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, flat) = self.forward_saving(ids)?;
        Ok((y, Saved::new(flat.clone(), &[&flat])))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        // Token ids have no gradient; everything here is the weight step's.
        let flat: Tensor = saved.take("GPT embedding")?;
        Ok((None, Saved::new((flat.clone(), dy.clone()), &[&flat, dy])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (flat, dy): (Tensor, Tensor) = saved.take("GPT embedding")?;
        let (b, t, c) = dy.dims3()?;
        let dy2 = dy.reshape((b * t, c))?;
        // Rows of the token table: each position's gradient scattered onto its token's row of
        // the step's running sum, in place (a fresh (V, C) table per micro-batch was 154 MB at
        // GPT-2's vocabulary, zeroed and then added whole for a few thousand rows).
        grads.add_rows(&self.wte.name, &flat, &dy2, self.vocab)?;
        // Position rows 0..T get the batch sum; rows past T get zero.
        let context = self.wpe.value.dim(0)?;
        let dwpe =
            brigade_kernels::sum_rows(&dy.reshape((b, t * c))?)?.reshape((t, c))?.pad_with_zeros(0, 0, context - t)?;
        grads.add(&self.wpe.name, &dwpe)
    }
}
