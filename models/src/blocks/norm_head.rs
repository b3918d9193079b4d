//! A language model's head as one layer: a final norm (GPT's LayerNorm, Llama's RMSNorm) and
//! the LM projection ([`LmHead`]). GPT's and Llama's heads are this layer over their own norm.
//!
//! In training the head takes the cross-entropy itself ([`Layer::forward_with_loss`]): the
//! logits go through chunk by chunk and never exist whole, and the projection's backward runs
//! while each chunk is in hand. Under a schedule whose backward is one `B`, the table's
//! gradient is summed there too, so the weight step is the norm's only; under a zero-bubble
//! schedule the table's gradient waits for `W`, which is what fills the pipeline's bubbles.

use std::fmt::Debug;

use brigade_engine::{Gradients, Layer, LossBackward, LossInput, LossKind, Mode, Pass, Saved};
use candle_core::{bail, DType, Result, Tensor};

use super::lm_head::{DeferredTableGrad, FusedLoss, KEEP_DLOGITS_BYTES};
use super::{LayerNorm, LayerNormGrads, LmHead, LmHeadGrads, RmsNorm, RmsNormGrads};

/// The norm in front of the projection, with its explicit backward.
pub(crate) trait HeadNorm: Debug + Send {
    /// What its input-gradient step leaves for its weight step.
    type Grads: Send + 'static;
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Self::Grads)>;
    fn backward_weight(&self, g: &Self::Grads, grads: &mut Gradients) -> Result<()>;
}

impl HeadNorm for LayerNorm {
    type Grads = LayerNormGrads;
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LayerNorm::forward(self, x)
    }
    fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, LayerNormGrads)> {
        LayerNorm::backward_input(self, x, dy)
    }
    fn backward_weight(&self, g: &LayerNormGrads, grads: &mut Gradients) -> Result<()> {
        LayerNorm::backward_weight(self, g, grads)
    }
}

impl HeadNorm for RmsNorm {
    type Grads = RmsNormGrads;
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        RmsNorm::forward(self, x)
    }
    fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, RmsNormGrads)> {
        RmsNorm::backward_input(self, x, dy)
    }
    fn backward_weight(&self, g: &RmsNormGrads, grads: &mut Gradients) -> Result<()> {
        RmsNorm::backward_weight(self, g, grads)
    }
}

/// Hidden states between layers must be `(B, T, C)` floats (f32; bf16 or f16 under mixed
/// precision) with `T <= positions`.
pub(crate) fn check_hidden(x: &Tensor, width: usize, positions: usize, what: &str) -> Result<()> {
    match x.dims() {
        &[_, t, c] if c == width && t <= positions => {}
        dims => bail!("{what} expects hidden states (B, T<={positions}, {width}), got {dims:?}"),
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("{what} expects f32 (or bf16/f16, mixed precision) hidden states, got {:?}", x.dtype());
    }
    Ok(())
}

#[derive(Debug)]
pub(crate) struct NormedLmHead<N> {
    /// How errors name the layer, e.g. "GPT head".
    pub(crate) what: &'static str,
    /// The longest sequence the model takes.
    pub(crate) positions: usize,
    pub(crate) norm: N,
    pub(crate) lm_head: LmHead, // over its own or the tied table (V, C)
    /// Rows per chunk of the fused loss; `None`: [`LmHead::chunk_rows`].
    pub(crate) chunk_rows: Option<usize>,
    /// The most bytes of `dlogits` a micro-batch keeps for a deferred weight step.
    pub(crate) keep_dlogits_bytes: usize,
}

/// The table's gradient, as the weight step finds it.
enum TableGrad {
    /// The unfused path's `dlogits` and `h`.
    Unfused(LmHeadGrads),
    /// The fused loss already added it into the sums.
    Summed,
    /// The fused loss left it for the weight step.
    Deferred(DeferredTableGrad),
}

/// What the head's weight step needs: the norm's and the table's.
struct HeadWeightGrads<G> {
    norm: G,
    table: TableGrad,
}

/// What the fused loss keeps for the input-gradient step.
struct FusedSaved {
    x: Tensor,
    dh: Tensor,
    table_grad: Option<DeferredTableGrad>,
}

impl<N: HeadNorm> NormedLmHead<N> {
    /// `what` names the layer in errors ("GPT head"); `positions` is the longest sequence.
    pub(crate) fn new(what: &'static str, positions: usize, norm: N, lm_head: LmHead) -> Self {
        Self { what, positions, norm, lm_head, chunk_rows: None, keep_dlogits_bytes: KEEP_DLOGITS_BYTES }
    }

    /// Checked `(B, T, C)` → normalised `(B·T, C)`.
    fn normalised(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c) = self.lm_head.dims()?;
        check_hidden(x, c, self.positions, self.what)?;
        let (b, t, _) = x.dims3()?;
        self.norm.forward(x)?.reshape((b * t, c))
    }

    /// `(B, T, C)` → normalised `(B·T, C)` and logits `(B, T, V)`.
    fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.normalised(x)?;
        let (b, t, _) = x.dims3()?;
        let logits = self.lm_head.forward(&h, b, t)?; // (B, T, V)
        Ok((h, logits))
    }

    /// The normalised hidden states `(B·T, C)` the fused loss takes, after checking the
    /// targets against `x`'s positions.
    fn normalised_for_loss(&self, x: &Tensor, loss: &LossInput<'_>) -> Result<Tensor> {
        let h = self.normalised(x)?;
        let (b, t, _) = x.dims3()?;
        if loss.targets.dims() != [b, t] {
            bail!("targets of shape {:?} do not match the {}'s positions ({b}, {t})", loss.targets.dims(), self.what);
        }
        Ok(h)
    }

    /// Rows per chunk of the fused loss.
    fn rows(&self, h: &Tensor) -> Result<usize> {
        match self.chunk_rows {
            Some(rows) => Ok(rows),
            None => self.lm_head.chunk_rows(h.dtype()),
        }
    }
}

impl<N: HeadNorm + 'static> Layer for NormedLmHead<N> {
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
        let (x, h): (Tensor, Tensor) = saved.take(self.what)?;
        let (dh, lm_head) = self.lm_head.backward_input(&h, dlogits)?;
        let (dx, norm) = self.norm.backward_input(&x, &dh.reshape(x.shape())?)?; // (B, T, C)
        let kept = vec![lm_head.h.clone(), lm_head.dlogits.clone()];
        let grads = HeadWeightGrads { norm, table: TableGrad::Unfused(lm_head) };
        Ok((Some(dx), Saved::with_handles(grads, kept)))
    }

    fn forward_with_loss(
        &mut self,
        x: &Tensor,
        loss: &LossInput<'_>,
        backward: LossBackward<'_>,
        _pass: Pass,
    ) -> Result<Option<(Tensor, Saved)>> {
        if loss.kind != LossKind::CrossEntropy {
            return Ok(None);
        }
        let h = self.normalised_for_loss(x, loss)?;
        let rows = self.rows(&h)?;
        let loss_only = matches!(backward, LossBackward::LossOnly);
        let FusedLoss { loss: value, dh, table_grad } = self.lm_head.loss_and_backward(
            &h,
            &loss.targets.flatten_all()?,
            loss.global_terms,
            backward,
            rows,
            self.keep_dlogits_bytes,
        )?;
        let saved = match dh {
            Some(dh) => {
                let mut kept = vec![x.clone(), dh.clone()];
                kept.extend(table_grad.iter().flat_map(DeferredTableGrad::tensors));
                Saved::with_handles(FusedSaved { x: x.clone(), dh, table_grad }, kept)
            }
            None if loss_only => Saved::empty(),
            None => bail!("{}: the fused loss returned no input gradient", self.what),
        };
        Ok(Some((value, saved)))
    }

    fn eval_with_loss(&mut self, x: &Tensor, loss: &LossInput<'_>) -> Result<Option<(Tensor, Tensor)>> {
        if loss.kind != LossKind::CrossEntropy {
            return Ok(None);
        }
        let h = self.normalised_for_loss(x, loss)?;
        let rows = self.rows(&h)?;
        let (value, hits) = self.lm_head.eval_loss(&h, &loss.targets.flatten_all()?, loss.global_terms, rows)?;
        Ok(Some((value, hits)))
    }

    fn backward_input_from_loss(&mut self, saved: Saved, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let FusedSaved { x, dh, table_grad } = saved.take(self.what)?;
        let (dx, norm) = self.norm.backward_input(&x, &dh.reshape(x.shape())?)?; // (B, T, C)
        let (table, kept) = match table_grad {
            Some(deferred) => {
                let kept = deferred.tensors();
                (TableGrad::Deferred(deferred), kept)
            }
            None => (TableGrad::Summed, Vec::new()),
        };
        Ok((Some(dx), Saved::with_handles(HeadWeightGrads { norm, table }, kept)))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads<N::Grads> = saved.take(self.what)?;
        self.norm.backward_weight(&w.norm, grads)?;
        match &w.table {
            TableGrad::Unfused(lm_head) => self.lm_head.backward_weight(lm_head, grads),
            TableGrad::Summed => Ok(()),
            TableGrad::Deferred(deferred) => self.lm_head.backward_weight_deferred(deferred, grads),
        }
    }
}
