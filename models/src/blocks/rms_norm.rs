//! RMSNorm over the last dimension (Zhang & Sennrich 2019), as Llama and its descendants use it:
//! `y = x / sqrt(mean(x²) + eps) · weight`, with the statistics in f32 whatever the compute
//! dtype (as Hugging Face's `LlamaRMSNorm` does), and its explicit backward.

use brigade_engine::{Gradients, Init, ParamSpec};
use candle_core::{DType, Result, Tensor, D};

use super::Param;

pub(crate) fn rms_norm_spec(prefix: &str, c: usize) -> ParamSpec {
    ParamSpec::new(format!("{prefix}.weight"), &[c], Init::Ones)
}

#[derive(Debug)]
pub(crate) struct RmsNorm {
    pub(crate) weight: Param,
    pub(crate) eps: f64,
}

/// What RMSNorm's input-gradient step leaves for its weight step: the gain's gradient is a
/// row reduction of terms the input gradient computes anyway.
pub(crate) struct RmsNormGrads {
    pub(crate) dweight: Tensor,
}

impl RmsNorm {
    /// The normalised input (before the gain), in f32, and the reciprocal RMS per row.
    fn normalise(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.to_dtype(DType::F32)?;
        // eps inside the square root, as in every Llama implementation.
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        Ok((x.broadcast_mul(&inv_rms)?, inv_rms))
    }

    /// `(..., C)` → `(..., C)` in the input's dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (normed, _) = self.normalise(x)?;
        normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight.value)
    }

    /// `dx` for `dy`, recomputing the statistics from the saved input `x`:
    /// `dx = r · (g − n · mean(g · n))` with `n = x · r` and `g = dy · weight`.
    pub(crate) fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, RmsNormGrads)> {
        let (normed, inv_rms) = self.normalise(x)?;
        let dy32 = dy.to_dtype(DType::F32)?;
        let g = dy32.broadcast_mul(&self.weight.value.to_dtype(DType::F32)?)?;
        let dot = (&g * &normed)?.mean_keepdim(D::Minus1)?;
        let dx = (g - normed.broadcast_mul(&dot)?)?.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
        let c = normed.dim(D::Minus1)?;
        // The gain's gradient: Σ over rows of dy · n (in the compute dtype, as the forward's
        // product of the rounded normalised input with the gain).
        let n_rounded = normed.to_dtype(x.dtype())?;
        let dweight = brigade_kernels::sum_rows(&(dy * n_rounded)?.reshape(((), c))?)?;
        Ok((dx, RmsNormGrads { dweight }))
    }

    pub(crate) fn backward_weight(&self, g: &RmsNormGrads, grads: &mut Gradients) -> Result<()> {
        grads.add(&self.weight.name, &g.dweight)
    }
}
