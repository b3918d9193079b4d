//! The SwiGLU MLP (Shazeer 2020): `down(silu(gate(x)) · up(x))`, with gate and up as one
//! product, and its explicit backward.

use brigade_engine::Gradients;
use candle_core::{Result, Tensor};

use crate::blocks::FusedLinear;

#[derive(Debug)]
pub(super) struct SwiGlu {
    /// gate and up, `C → 2F`.
    pub(super) gate_up: FusedLinear,
    /// `F → C`.
    pub(super) down: FusedLinear,
}

impl SwiGlu {
    /// `residual + down(silu(gate(x)) · up(x))`, the residual added by the last gemm call; with
    /// the gate/up output and the product (down's input), which the backward needs.
    pub(super) fn forward_saving(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let gate_up = self.gate_up.forward(x)?; // (B, T, 2F)
        let act = brigade_kernels::swiglu(&gate_up)?; // (B, T, F)
        let y = self.down.forward_residual(&act, Some(residual))?;
        Ok((y, gate_up, act))
    }

    /// The input gradient for `dy` from the saved gate/up output; returns it with the gate/up
    /// output gradient, which the weight step needs.
    pub(super) fn backward_input(&self, gate_up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        // silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))), written as [dgate | dup].
        let dact = self.down.backward_input(dy)?; // (B, T, F)
        let dgate_up = brigade_kernels::swiglu_backward(gate_up, &dact)?;
        Ok((self.gate_up.backward_input(&dgate_up)?, dgate_up))
    }

    /// The projections' weight gradients from their inputs (`x`; the product) and output
    /// gradients (`dgate_up`; `dy`).
    pub(super) fn backward_weight(
        &self,
        x: &Tensor,
        dgate_up: &Tensor,
        act: &Tensor,
        dy: &Tensor,
        grads: &mut Gradients,
    ) -> Result<()> {
        self.gate_up.backward_weight(x, dgate_up, grads)?;
        self.down.backward_weight(act, dy, grads)
    }
}
