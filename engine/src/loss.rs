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

/// `sum(loss over the micro-batch) / global_terms`, a scalar that backpropagates.
pub fn microbatch_loss(
    kind: LossKind,
    output: &Tensor,
    targets: &Tensor,
    global_terms: usize,
) -> Result<Tensor> {
    match kind {
        LossKind::CrossEntropy => {
            let (logits, targets) = flatten_for_classes(output, targets)?;
            brigade_kernels::cross_entropy_sum(&widened(&logits)?, &targets)? / global_terms as f64
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
            brigade_kernels::cross_entropy_sum_backward(
                &widened(&logits)?,
                &targets,
                1.0 / global_terms as f64,
            )?
            .reshape(output.shape())?
            .to_dtype(output.dtype())
        }
    }
}

/// Mixed precision: half-precision logits are widened to f32, so the log-sum-exp and the sum
/// over the micro-batch are taken in f32 (the loss gradient goes back in the logits' dtype).
fn widened(logits: &Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32),
        _ => Ok(logits.clone()),
    }
}

/// Number of positions where the arg-max of `output` equals the target.
pub fn correct_predictions(output: &Tensor, targets: &Tensor) -> Result<usize> {
    let (logits, targets) = flatten_for_classes(output, targets)?;
    let predicted = logits.argmax(D::Minus1)?;
    let hits = predicted
        .eq(&targets)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(hits as usize)
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
