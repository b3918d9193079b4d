//! The loss the last stage computes, shared by the pipeline and the single-device reference so
//! both normalise the same way.
//!
//! The loss of a micro-batch is its *summed* per-example loss divided by the number of examples
//! (tokens, for a language model) in the whole global batch. Summing those over micro-batches
//! gives the global-batch mean, so losses and gradients do not depend on how the batch is split.

use candle_core::{DType, Result, Tensor, D};

use crate::layer::LossKind;

/// Number of loss terms in `targets` (tokens for `(B, T)`, examples for `(B,)`).
pub fn loss_terms(targets: &Tensor) -> usize {
    targets.elem_count()
}

/// `sum(loss over the micro-batch) / global_terms`, a scalar that backpropagates. Half-precision
/// outputs give an f32 loss (the log-sum-exp is taken in f32) and a gradient in their dtype.
pub fn microbatch_loss(kind: LossKind, output: &Tensor, targets: &Tensor, global_terms: usize) -> Result<Tensor> {
    match kind {
        LossKind::CrossEntropy => {
            let (logits, targets) = flatten_for_classes(output, targets)?;
            brigade_kernels::cross_entropy_sum(&logits, &targets)? / global_terms as f64
        }
    }
}

/// The gradient of [`microbatch_loss`] with respect to `output`, in `output`'s shape: the
/// explicit backward the pipeline's last stage starts from.
pub fn microbatch_loss_backward(
    kind: LossKind,
    output: &Tensor,
    targets: &Tensor,
    global_terms: usize,
) -> Result<Tensor> {
    match kind {
        LossKind::CrossEntropy => {
            let (logits, targets) = flatten_for_classes(output, targets)?;
            brigade_kernels::cross_entropy_sum_backward(&logits, &targets, 1.0 / global_terms as f64)?
                .reshape(output.shape())?
                .to_dtype(output.dtype())
        }
    }
}

/// Number of positions where the arg-max of `output` equals the target.
pub fn correct_predictions(output: &Tensor, targets: &Tensor) -> Result<usize> {
    Ok(correct_predictions_on_device(output, targets)?.to_scalar::<u32>()? as usize)
}

/// [`correct_predictions`] as a u32 scalar left on the output's device, so an evaluation can
/// add them up over micro-batches and read the total once (a read is a host sync on a GPU).
pub fn correct_predictions_on_device(output: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (logits, targets) = flatten_for_classes(output, targets)?;
    let predicted = logits.argmax(D::Minus1)?;
    predicted.eq(&targets)?.to_dtype(DType::U32)?.sum_all()
}

/// Reshapes `(..., V)` logits and `(...)` targets into `(N, V)` and `(N,)`.
fn flatten_for_classes(output: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let classes = output.dim(D::Minus1)?;
    let n = output.elem_count() / classes.max(1);
    if targets.elem_count() != n || &output.dims()[..output.rank() - 1] != targets.dims() {
        candle_core::bail!(
            "targets of shape {:?} do not match model output of shape {:?}",
            targets.dims(),
            output.dims()
        );
    }
    let logits = output.reshape((n, classes))?;
    let targets = targets.reshape(n)?.to_dtype(DType::U32)?;
    Ok((logits, targets))
}
