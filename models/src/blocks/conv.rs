//! A 2-D convolution without bias: forward, input gradient (a transposed convolution) and
//! weight gradient.

use brigade_engine::Gradients;
use candle_core::{Result, Tensor};

#[derive(Debug)]
pub(crate) struct Conv2d {
    pub(crate) weight: Tensor, // (out, in, k, k)
    pub(crate) weight_name: String,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Conv2d {
    /// `(N, in, H, W)` → `(N, out, H', W')`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        brigade_kernels::conv2d(x, &self.weight, self.padding, self.stride, 1)
    }

    /// The input gradient: a transposed convolution of `dy` with the same weight. The output
    /// padding recovers the rows a strided forward dropped (input sizes not a multiple of the
    /// stride).
    pub(crate) fn backward_input(&self, x_dims: &[usize], dy: &Tensor) -> Result<Tensor> {
        let (dy_h, k) = (dy.dim(2)?, self.weight.dim(2)?);
        let covered = (dy_h - 1) * self.stride + k - 2 * self.padding;
        let out_padding = x_dims[2] - covered;
        dy.conv_transpose2d(&self.weight, self.padding, out_padding, self.stride, 1)
    }

    /// `dW += x ⋆ dy`: the weight gradient is a convolution of the input with the output
    /// gradient over the batch (batch and channel axes swapped), the stride becoming a dilation.
    pub(crate) fn backward_weight(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<()> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let dw = brigade_kernels::conv2d(&x.transpose(0, 1)?, &dy.transpose(0, 1)?, self.padding, 1, self.stride)?
            .transpose(0, 1)?;
        let dw = if dw.dim(2)? != kh || dw.dim(3)? != kw { dw.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { dw };
        grads.add(&self.weight_name, &dw)
    }
}
