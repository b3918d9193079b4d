//! Building blocks shared by the model families: each keeps its parameters, runs its forward,
//! and computes its input and weight gradients, so a layer (a GPT block, a ResNet stem) is a
//! composition of these plus its own glue. Llama adds RMSNorm, RoPE and `nn.Linear` (fused);
//! GPT's and Llama's heads share the LM projection.

mod batch_norm;
mod conv;
mod conv_bn;
mod layer_norm;
mod linear;
mod linear_hf;
mod lm_head;
mod norm_head;
mod param;
mod rms_norm;
mod rope;

pub(crate) use batch_norm::{load_bn_buffers, BatchNorm2d, Statistics};
pub(crate) use conv::Conv2d;
pub(crate) use conv_bn::{relu_backward, ConvBn, ConvBnPlan, ConvBnSaved, ConvBnWeightGrads};
pub(crate) use layer_norm::{layer_norm_specs, LayerNorm, LayerNormGrads};
pub(crate) use linear::{conv1d_specs, Conv1D};
pub(crate) use linear_hf::{linear_specs, FusedLinear, LinearPart};
pub(crate) use lm_head::{LmHead, LmHeadGrads};
pub(crate) use norm_head::{check_hidden, NormedLmHead};
pub(crate) use param::{get_all, Param};
pub(crate) use rms_norm::{rms_norm_spec, RmsNorm, RmsNormGrads};
pub use rope::Llama3RopeScaling;
pub(crate) use rope::{inverse_frequencies, Rope};
