//! LayerNorm over the last dimension: its parameters, forward, and fused backward.

use brigade_engine::{Gradients, Init, ParamSpec};
use candle_core::{Result, Tensor};

use super::Param;

pub(crate) fn layer_norm_specs(prefix: &str, c: usize) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{prefix}.weight"), &[c], Init::Ones),
        ParamSpec::new(format!("{prefix}.bias"), &[c], Init::Zeros),
    ]
}

/// LayerNorm over the last dimension (via the differentiable kernel).
#[derive(Debug)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Param,
    pub(crate) bias: Param,
    pub(crate) eps: f64,
}

/// What a LayerNorm's input-gradient step leaves for its weight step: the fused backward
/// kernel yields the gain and bias gradients in the same pass as the input gradient (they are
/// row reductions of the same terms), so `W` only adds them in.
pub(crate) struct LayerNormGrads {
    pub(crate) dweight: Tensor,
    pub(crate) dbias: Tensor,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        brigade_kernels::layer_norm(x, &self.weight.value, &self.bias.value, self.eps)
    }

    /// `dx` for `dy`, recomputing the statistics from the saved input `x`.
    pub(crate) fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, LayerNormGrads)> {
        let (dx, dweight, dbias) = brigade_kernels::layer_norm_backward(x, &self.weight.value, dy, self.eps)?;
        Ok((dx, LayerNormGrads { dweight, dbias }))
    }

    /// `residual + dx` for `dy`: the input gradient of a pre-LayerNorm block's residual stream,
    /// which reaches `x` both through this LayerNorm and around it (`residual`), summed in the
    /// pass that writes `dx`.
    pub(crate) fn backward_input_residual(
        &self,
        x: &Tensor,
        dy: &Tensor,
        residual: &Tensor,
    ) -> Result<(Tensor, LayerNormGrads)> {
        let (dx, dweight, dbias) =
            brigade_kernels::layer_norm_backward_residual(x, &self.weight.value, dy, residual, self.eps)?;
        Ok((dx, LayerNormGrads { dweight, dbias }))
    }

    pub(crate) fn backward_weight(&self, g: &LayerNormGrads, grads: &mut Gradients) -> Result<()> {
        grads.add(&self.weight.name, &g.dweight)?;
        grads.add(&self.bias.name, &g.dbias)
    }
}
