//! ResNet (He et al. 2015) as an ordered layer list: `[Stem, every residual block, Head]`.
//!
//! The architecture and parameter names are exactly torchvision's `resnet18/34/50` (`conv1.weight`,
//! `layer2.0.downsample.1.running_var`, `fc.bias`, ...), so a torchvision checkpoint maps one to
//! one. Bottleneck blocks put the stride on the 3×3 conv (torchvision's "ResNet v1.5").
//!
//! - Stem: `conv1` 7×7 stride 2 (no bias), `bn1`, ReLU, max-pool 3×3 stride 2 padding 1.
//! - One layer per residual block (`layer1.0`, `layer1.1`, ..., `layer4.N`), so a pipeline can cut
//!   between any two blocks. A block's shortcut is `downsample` (1×1 conv with the block's stride,
//!   then BatchNorm) when the shape changes, otherwise the identity.
//! - Head (`fc`): global average pool over `(H, W)`, then `fc` (`weight (classes, in)`, `bias`).
//!
//! Initialisation is torchvision's: convs Kaiming-normal (fan_out, ReLU gain), BatchNorm gain one
//! and bias zero, `fc` weight and bias `U(±1/√in)` (PyTorch's `nn.Linear` default).
//!
//! # BatchNorm under micro-batching
//!
//! The pipeline feeds each stage micro-batches, never the whole mini-batch at once. In
//! [`Mode::Train`] every BatchNorm normalises with the statistics of the **current micro-batch**
//! (mean and biased variance over `N, H, W`, composed from differentiable ops so the gradient
//! flows through the statistics as in PyTorch), exactly what PyTorch does when it is given that
//! micro-batch. So a pipeline run matches a single-device reference that splits the batch into
//! the same micro-batches; it does *not* match one BatchNorm over the full mini-batch. The
//! running statistics are updated once per micro-batch forward, like PyTorch: momentum 0.1,
//! `running_mean ← 0.9·running_mean + 0.1·mean`, `running_var ← 0.9·running_var + 0.1·var_unbiased`,
//! `num_batches_tracked += 1`. (A recomputation before a backward, [`Pass::Recompute`], leaves
//! them alone, so activation recomputation never counts a micro-batch twice.) Like PyTorch, training needs more than one value
//! per channel (`N·H·W > 1`); otherwise the forward is an error. [`Mode::Eval`] normalises with
//! the running statistics.
//!
//! The running statistics are buffers, not parameters: [`Layer::buffers`] returns
//! `<bn>.running_mean` and `<bn>.running_var` (f32, `(C,)`) and `<bn>.num_batches_tracked`
//! (**i64 scalar**, shape `()`, as in torchvision checkpoints); [`Layer::load_buffers`] restores
//! them (any numeric dtype is accepted and converted).
//!
//! Files: `config` (sizes, presets, limits), `model` (the [`PipelineModel`] glue), one file per
//! layer kind (`stem`, `block`, `head`), tests in `tests`. The shared building blocks (conv,
//! BatchNorm, conv+BN) are in `models/src/blocks/`.

mod block;
mod config;
mod head;
mod model;
mod stem;
#[cfg(test)]
mod tests;

pub use block::BlockSpec;
pub use config::{BlockKind, ResNetConfig, PRESET_NAMES, RESNET_MAX_SIZE};
pub use head::HeadSpec;
pub use model::{model_from_preset, ResNet};
pub use stem::StemSpec;

#[cfg(doc)]
use brigade_engine::{Layer, Mode, Pass, PipelineModel};
use candle_core::{bail, DType, Result, Tensor};

/// Checks a `(N, C, H, W)` f32 input with the expected channel count.
fn check_images(x: &Tensor, channels: usize, what: &str) -> Result<()> {
    match x.dims() {
        &[_, c, _, _] if c == channels => {}
        &[_, c, _, _] => bail!("{what} expects {channels} input channels, got {c} (input {:?})", x.dims()),
        dims => bail!("{what} expects a 4-D input (N, {channels}, H, W), got {dims:?}"),
    }
    if x.dtype() != DType::F32 {
        bail!("{what} expects f32 input, got {:?}", x.dtype());
    }
    Ok(())
}
