//! PyTorch's `nn.Linear` (weight stored `(out, in)`, optional bias), and several of them fused
//! into one product: Llama's q/k/v projections and its gate/up pair each run as one gemm over
//! their weights stacked by rows, while each keeps its own Hugging Face parameter name.

use brigade_engine::{Gradients, Init, ParamSpec};
use candle_core::{Result, Tensor};

use super::Param;

/// An `nn.Linear` weight `(out, in)`, and its bias `(out,)` when `bias`.
pub(crate) fn linear_specs(prefix: &str, d_in: usize, d_out: usize, std: f64, bias: bool) -> Vec<ParamSpec> {
    let mut specs = vec![ParamSpec::new(format!("{prefix}.weight"), &[d_out, d_in], Init::Normal { std })];
    if bias {
        specs.push(ParamSpec::new(format!("{prefix}.bias"), &[d_out], Init::Zeros));
    }
    specs
}

/// One `nn.Linear` of a fused product.
#[derive(Debug)]
pub(crate) struct LinearPart {
    pub(crate) weight: Param,
    pub(crate) bias: Option<Param>,
}

/// Linear layers sharing an input, run as one product: `y = x · [W₁; W₂; …]ᵀ (+ b) (+ r)`.
#[derive(Debug)]
pub(crate) struct FusedLinear {
    pub(crate) parts: Vec<LinearPart>,
}

impl FusedLinear {
    /// The stacked `(Σ out, in)` weight and `(Σ out,)` bias (no copy for a single part).
    fn stacked(&self) -> Result<(Tensor, Option<Tensor>)> {
        let weights: Vec<&Tensor> = self.parts.iter().map(|p| &p.weight.value).collect();
        let weight = if weights.len() == 1 { weights[0].clone() } else { Tensor::cat(&weights, 0)? };
        let biases: Option<Vec<&Tensor>> = self.parts.iter().map(|p| p.bias.as_ref().map(|b| &b.value)).collect();
        let bias = match biases {
            Some(b) if b.len() == 1 => Some(b[0].clone()),
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None => None,
        };
        Ok((weight, bias))
    }

    /// `(B, T, in)` → `(B, T, Σ out)`, plus `residual` (same shape as the output) when given.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let (weight, bias) = self.stacked()?;
        let d_out = weight.dim(0)?;
        let residual = residual.map(|r| r.reshape((b * t, d_out))).transpose()?;
        brigade_kernels::linear(&x.reshape((b * t, d_in))?, &weight.t()?, bias.as_ref(), residual.as_ref())?
            .reshape((b, t, d_out))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `dx = dy · W`, `(B, T, Σ out)` → `(B, T, in)`.
    pub(crate) fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        let (b, t, d_out) = dy.dims3()?;
        let (weight, _) = self.stacked()?;
        let d_in = weight.dim(1)?;
        brigade_kernels::linear(&dy.reshape((b * t, d_out))?, &weight, None, None)?.reshape((b, t, d_in))
    }

    /// Each part's `dW += dyᵢᵀ x` over all tokens (`dyᵢ` its columns of `dy`), `db += Σ dyᵢ`.
    pub(crate) fn backward_weight(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<()> {
        let (b, t, d_in) = x.dims3()?;
        let x = x.reshape((b * t, d_in))?;
        let dy = dy.reshape((b * t, dy.dim(2)?))?;
        let mut offset = 0;
        for part in &self.parts {
            let d_out = part.weight.value.dim(0)?;
            let dy_part = dy.narrow(1, offset, d_out)?;
            grads.add_matmul(&part.weight.name, &dy_part.t()?, &x)?;
            if let Some(bias) = &part.bias {
                grads.add(&bias.name, &brigade_kernels::sum_rows(&dy_part.contiguous()?)?)?;
            }
            offset += d_out;
        }
        Ok(())
    }
}
