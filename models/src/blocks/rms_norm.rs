//! RMSNorm over the last dimension (Zhang & Sennrich 2019), as Llama and its descendants use it:
//! `y = x / sqrt(mean(x²) + eps) · weight`, with the statistics in f32 for half-precision
//! inputs (as Hugging Face's `LlamaRMSNorm` does), and its explicit backward. The math is
//! `brigade_kernels::rms_norm` (a fused CPU kernel, or its reference composition).

use brigade_engine::{Gradients, Init, ParamSpec};
use candle_core::{Result, Tensor};

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
    /// `(..., C)` → `(..., C)` in the input's dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        brigade_kernels::rms_norm(x, &self.weight.value, self.eps)
    }

    /// `dx` for `dy`, recomputing the statistics from the saved input `x`:
    /// `dx = r · (g − n · mean(g · n))` with `n = x · r` and `g = dy · weight`; the gain's
    /// gradient `Σ_rows dy · n` comes out of the same pass.
    pub(crate) fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, RmsNormGrads)> {
        let (dx, dweight) = brigade_kernels::rms_norm_backward(x, &self.weight.value, dy, self.eps)?;
        Ok((dx, RmsNormGrads { dweight }))
    }

    pub(crate) fn backward_weight(&self, g: &RmsNormGrads, grads: &mut Gradients) -> Result<()> {
        grads.add(&self.weight.name, &g.dweight)
    }
}
