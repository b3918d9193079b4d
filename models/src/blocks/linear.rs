//! Hugging Face's `Conv1D`, a linear layer stored `(in, out)`: its parameters, forward (with an
//! optional residual added by the same gemm), input gradient and weight gradient.
//!
//! The input gradient `dy · Wᵀ` reads the weight transposed. Read in place, gemm packs it by
//! gathering one element per cache line, on every micro-batch: at the side-by-side GPT's
//! micro-batches of 256 rows that gather was 7% of a pipeline stage's time. On the CPU the
//! layer keeps a dense `Wᵀ` instead, made on the first input gradient after each optimizer
//! step ([`Conv1D::parameters_changed`] drops it) and shared by the step's micro-batches: one
//! more copy of the weight in memory, the same bits (gemm sums `k` in the same order however
//! its operands are laid out).

use brigade_engine::{Gradients, Init, ParamSpec};
use candle_core::{Result, Tensor};

use super::Param;

/// HF `Conv1D` weight `(in, out)` and bias `(out,)`.
pub(crate) fn conv1d_specs(prefix: &str, d_in: usize, d_out: usize, std: f64) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{prefix}.weight"), &[d_in, d_out], Init::Normal { std }),
        ParamSpec::new(format!("{prefix}.bias"), &[d_out], Init::Zeros),
    ]
}

/// HF's `Conv1D`: a linear layer with weight stored `(in, out)`, `y = x @ W + b`.
#[derive(Debug)]
pub(crate) struct Conv1D {
    weight: Param,
    bias: Param,
    /// `Wᵀ` `(out, in)`, dense, for the input gradient on the CPU; `None` until the first input
    /// gradient after the parameters last changed.
    weight_t: Option<Tensor>,
}

impl Conv1D {
    pub(crate) fn new(weight: Param, bias: Param) -> Self {
        Self { weight, bias, weight_t: None }
    }

    /// The weight as the input gradient reads it, `(out, in)`: on the CPU the kept dense copy
    /// (made now if there is none); elsewhere the transposed view, which the GPU's gemm reads
    /// at no cost.
    fn weight_t(&mut self) -> Result<Tensor> {
        let w = &self.weight.value;
        if !w.device().is_cpu() {
            return w.t();
        }
        if let Some(t) = &self.weight_t {
            return Ok(t.clone());
        }
        let t = brigade_kernels::transpose_2d(w)?;
        self.weight_t = Some(t.clone());
        Ok(t)
    }

    /// The parameters changed in place: the kept `Wᵀ` is stale.
    pub(crate) fn parameters_changed(&mut self) {
        self.weight_t = None;
    }

    /// The bytes of the kept `Wᵀ` (0 while there is none).
    pub(crate) fn kept_bytes(&self) -> u64 {
        self.weight_t.as_ref().map_or(0, |t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
    }

    /// `(B, T, in)` → `(B, T, out)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `residual + x @ W + b`, the residual connection written by the same gemm call.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = self.weight.value.dim(1)?;
        // A 2-D product over the flattened tokens: one gemm.
        let residual = residual.map(|r| r.reshape((b * t, d_out))).transpose()?;
        brigade_kernels::linear(
            &x.reshape((b * t, d_in))?,
            &self.weight.value,
            Some(&self.bias.value),
            residual.as_ref(),
        )?
        .reshape((b, t, d_out))
    }

    /// `(x @ W + b, gelu_tanh(x @ W + b))`, both `(B, T, out)`: a projection and its GELU in
    /// one fused call (no bias pass before the gemm, no separate GELU op reading it back).
    pub(crate) fn forward_gelu(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = self.weight.value.dim(1)?;
        let (pre, act) =
            brigade_kernels::linear_gelu(&x.reshape((b * t, d_in))?, &self.weight.value, &self.bias.value)?;
        Ok((pre.reshape((b, t, d_out))?, act.reshape((b, t, d_out))?))
    }

    /// The gradient of [`Self::forward_gelu`]'s input projection's pre-activation `pre`
    /// `(B, T, in)` when this layer reads its activation: `gelu'(pre) · (dy @ Wᵀ)`, in one
    /// fused call (the GELU backward in place over the product).
    pub(crate) fn backward_input_gelu(&mut self, dy: &Tensor, pre: &Tensor) -> Result<Tensor> {
        let (b, t, d_out) = dy.dims3()?;
        let d_in = self.weight.value.dim(0)?;
        let pre = pre.reshape((b * t, d_in))?;
        brigade_kernels::linear_gelu_backward(&dy.reshape((b * t, d_out))?, &self.weight_t()?, &pre)?
            .reshape((b, t, d_in))
    }

    /// `dx = dy @ Wᵀ`, `(B, T, out)` → `(B, T, in)`.
    pub(crate) fn backward_input(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (b, t, d_out) = dy.dims3()?;
        let d_in = self.weight.value.dim(0)?;
        brigade_kernels::linear(&dy.reshape((b * t, d_out))?, &self.weight_t()?, None, None)?.reshape((b, t, d_in))
    }

    /// `dW += xᵀ dy` over all tokens, `db += Σ dy`.
    pub(crate) fn backward_weight(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<()> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = dy.dim(2)?;
        let x = x.reshape((b * t, d_in))?;
        let dy = dy.reshape((b * t, d_out))?;
        grads.add_matmul(&self.weight.name, &x.t()?, &dy)?;
        grads.add(&self.bias.name, &brigade_kernels::sum_rows(&dy)?)
    }
}
