//! Batch checks: what a batch must satisfy before the driver splits it into micro-batches.
//!
//! A bad batch must be refused by the call that brings it, with a message naming the problem:
//! once it reaches a stage, the failure stops the whole pipeline for good. What is acceptable
//! depends on the model (token ids within the vocabulary and context, images with the right
//! channel count), so the model supplies the check through [`crate::PipelineModel::batch_check`];
//! the driver itself knows nothing of tokens or images. [`InputKindCheck`] is the default: it
//! enforces exactly what the model's [`InputKind`] promises.

use std::fmt::Debug;

use candle_core::{DType, Tensor};

use crate::layer::InputKind;

/// Validates a model's batches on the caller's thread, before any stage sees them.
///
/// A pipeline keeps the check for its whole life (it outlives the borrow of the model given to
/// `Pipeline::new`), hence its own trait object rather than a method called on the model.
pub trait BatchCheck: Send + Sync + Debug {
    /// Checks `inputs` (the whole global batch, `(B, ...)`) and, for training and evaluation,
    /// `targets` (`(B, ...)`; `None` when predicting). The batch dimension, its split into
    /// micro-batches and the targets' integer dtype are checked by the driver before this runs.
    /// The error is the message the caller sees (as `EngineError::Input`).
    fn check_batch(&self, inputs: &Tensor, targets: Option<&Tensor>) -> Result<(), String>;
}

/// The default check: what [`InputKind`] implies, for token models and image classifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputKindCheck {
    /// The model's name, for messages.
    pub model: String,
    pub input: InputKind,
    /// Output classes: labels of image models must be below it (token models use the vocabulary).
    pub num_classes: usize,
}

impl BatchCheck for InputKindCheck {
    fn check_batch(&self, inputs: &Tensor, targets: Option<&Tensor>) -> Result<(), String> {
        let model = &self.model;
        match &self.input {
            InputKind::Tokens { vocab, context } => {
                if inputs.rank() != 2 || !is_integer(inputs.dtype()) {
                    return Err(format!(
                        "{model} expects token ids of shape (batch, time) and an integer dtype, got {:?} {:?}",
                        inputs.dims(),
                        inputs.dtype()
                    ));
                }
                let time = inputs.dims()[1];
                if time > *context {
                    return Err(format!("sequence length {time} exceeds the context of {model} ({context})"));
                }
                if time == 0 {
                    return Err(format!("{model} got empty sequences (shape {:?})", inputs.dims()));
                }
                check_ids_below(inputs, *vocab, "token id", "vocabulary")?;
                if let Some(targets) = targets {
                    if targets.dims() != inputs.dims() {
                        return Err(format!(
                            "targets of shape {:?} do not match token ids of shape {:?}",
                            targets.dims(),
                            inputs.dims()
                        ));
                    }
                    check_ids_below(targets, *vocab, "target token id", "vocabulary")?;
                }
            }
            InputKind::Images { channels } => {
                if inputs.rank() != 4 || inputs.dims()[1] != *channels {
                    return Err(format!(
                        "{model} expects images of shape (batch, {channels}, height, width), got {:?}",
                        inputs.dims()
                    ));
                }
                if inputs.dims()[2] == 0 || inputs.dims()[3] == 0 {
                    return Err(format!("{model} got images with no pixels (shape {:?})", inputs.dims()));
                }
                if inputs.dtype() != DType::F32 {
                    return Err(format!("{model} expects f32 images, got {:?}", inputs.dtype()));
                }
                if let Some(targets) = targets {
                    if targets.rank() != 1 {
                        return Err(format!("image labels must have shape (batch,), got {:?}", targets.dims()));
                    }
                    check_ids_below(targets, self.num_classes, "label", "classes")?;
                }
            }
            InputKind::Features { shape } => {
                if inputs.dtype() != DType::F32 || inputs.rank() == 0 || &inputs.dims()[1..] != shape.as_slice() {
                    return Err(format!(
                        "{model} expects f32 inputs of shape (batch, {}), got {:?} {:?}",
                        shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
                        inputs.dims(),
                        inputs.dtype()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The dtypes class and token ids may come in.
pub(crate) fn is_integer(dtype: DType) -> bool {
    matches!(dtype, DType::U32 | DType::I64 | DType::U8)
}

/// Rejects ids at or beyond `limit`, and negative ones (an `i64` tensor can hold them), before
/// they reach a stage: there they would be an out-of-range index that stops the pipeline
/// instead of just this call.
pub fn check_ids_below(ids: &Tensor, limit: usize, what: &str, of: &str) -> Result<(), String> {
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let as_f64 = ids.to_dtype(DType::F64).map_err(|e| format!("cannot read the {what}s: {e}"))?;
    let extreme = |t: candle_core::Result<Tensor>| {
        t.and_then(|t| t.to_scalar::<f64>()).map_err(|e| format!("cannot read the {what}s: {e}"))
    };
    let max = extreme(as_f64.max_all())?;
    if max >= limit as f64 {
        return Err(format!("{what} {max} is beyond the model's {limit} {of}"));
    }
    if ids.dtype() == DType::I64 {
        let min = extreme(as_f64.min_all())?;
        if min < 0.0 {
            return Err(format!("{what} {min} is negative"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn images() -> InputKindCheck {
        InputKindCheck { model: "net".into(), input: InputKind::Images { channels: 3 }, num_classes: 10 }
    }

    #[test]
    fn image_batches_are_checked_for_shape_dtype_and_labels() {
        let cpu = &Device::Cpu;
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, cpu).unwrap();
        let labels = Tensor::new(&[1u32, 9], cpu).unwrap();
        images().check_batch(&x, Some(&labels)).unwrap();
        images().check_batch(&x, None).unwrap();

        let gray = Tensor::zeros((2, 1, 4, 4), DType::F32, cpu).unwrap();
        let e = images().check_batch(&gray, None).unwrap_err();
        assert!(e.contains("net expects images of shape (batch, 3, height, width), got [2, 1, 4, 4]"), "{e}");
        let e = images().check_batch(&x.to_dtype(DType::F64).unwrap(), None).unwrap_err();
        assert!(e.contains("net expects f32 images, got F64"), "{e}");
        let empty = Tensor::zeros((2, 3, 0, 4), DType::F32, cpu).unwrap();
        let e = images().check_batch(&empty, None).unwrap_err();
        assert!(e.contains("net got images with no pixels (shape [2, 3, 0, 4])"), "{e}");
        let e = images().check_batch(&x, Some(&labels.reshape((2, 1)).unwrap())).unwrap_err();
        assert!(e.contains("image labels must have shape (batch,), got [2, 1]"), "{e}");
        let e = images().check_batch(&x, Some(&Tensor::new(&[1u32, 10], cpu).unwrap())).unwrap_err();
        assert!(e.contains("label 10 is beyond the model's 10 classes"), "{e}");
    }

    #[test]
    fn negative_ids_are_refused_and_empty_ones_pass() {
        let cpu = &Device::Cpu;
        let ids = Tensor::new(&[[0i64, -2]], cpu).unwrap();
        assert_eq!(check_ids_below(&ids, 5, "token id", "vocabulary").unwrap_err(), "token id -2 is negative");
        let none = Tensor::zeros((0, 4), DType::I64, cpu).unwrap();
        check_ids_below(&none, 5, "token id", "vocabulary").unwrap();
    }
}
