//! The loss the last stage computes, shared by the pipeline and the single-device reference so
//! both normalise the same way.
//!
//! The loss of a micro-batch is its *summed* per-example loss divided by the number of examples
//! (tokens, for a language model) in the whole global batch. Summing those over micro-batches
//! gives the global-batch mean, so losses and gradients do not depend on how the batch is split.

use candle_core::{DType, Result, Tensor, Var, D};

use crate::layer::{CustomLoss, LossKind};

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
        LossKind::MeanSquaredError => squared_error_diff(output, targets)?.sqr()?.sum_all()? / global_terms as f64,
        LossKind::Custom(custom) => custom_sum(custom, output, targets)? / global_terms as f64,
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
        LossKind::MeanSquaredError => squared_error_diff(output, targets)? * (2.0 / global_terms as f64),
        LossKind::Custom(custom) => {
            // The user's loss is any candle expression: differentiate it with candle's autograd,
            // from a variable copy of the (graph-free) output.
            let out = Var::from_tensor(&output.detach())?;
            let sum = custom_sum(custom, out.as_tensor(), targets)?;
            let grads = sum.backward()?;
            let grad = match grads.get(out.as_tensor()) {
                Some(g) => g.clone(),
                None => output.zeros_like()?, // the loss does not depend on the output
            };
            grad * (1.0 / global_terms as f64)
        }
    }
}

/// `output - targets` for a regression loss, after checking the shapes match.
fn squared_error_diff(output: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if output.dims() != targets.dims() {
        candle_core::bail!(
            "mean squared error: targets of shape {:?} do not match model output of shape {:?}",
            targets.dims(),
            output.dims()
        );
    }
    output - targets.to_dtype(output.dtype())?
}

/// The user's summed loss, checked to be a scalar.
fn custom_sum(custom: CustomLoss, output: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let sum = (custom.sum)(output, targets)?;
    if sum.elem_count() != 1 {
        candle_core::bail!("custom loss {} must return a scalar, got shape {:?}", custom.name, sum.dims());
    }
    sum.reshape(())
}

/// Number of positions where the arg-max of `output` equals the target.
pub fn correct_predictions(output: &Tensor, targets: &Tensor) -> Result<usize> {
    Ok(correct_predictions_on_device(output, targets)?.to_scalar::<u32>()? as usize)
}

/// [`correct_predictions`] as a u32 scalar left on the output's device, so an evaluation can
/// add them up over micro-batches and read the total once (a read is a host sync on a GPU).
pub fn correct_predictions_on_device(output: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if targets.dtype().is_float() {
        // Regression targets (mean squared error, custom losses): nothing to classify.
        return Tensor::new(0u32, output.device());
    }
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
