//! Building blocks shared by the model families: each keeps its parameters, runs its forward,
//! and computes its input and weight gradients, so a layer (a GPT block, a ResNet stem) is a
//! composition of these plus its own glue. The next family (Llama) reuses them.

mod batch_norm;
mod conv;
mod conv_bn;
mod layer_norm;
mod linear;
mod param;

pub(crate) use batch_norm::{load_bn_buffers, BatchNorm2d, Statistics};
pub(crate) use conv::Conv2d;
pub(crate) use conv_bn::{relu_backward, ConvBn, ConvBnPlan, ConvBnSaved, ConvBnWeightGrads};
pub(crate) use layer_norm::{layer_norm_specs, LayerNorm, LayerNormGrads};
pub(crate) use linear::{conv1d_specs, Conv1D};
pub(crate) use param::{get_all, Param};
