//! GPT-2 (Radford et al. 2019) as an ordered layer list: `[Embedding, Block × n_layer, Head]`.
//!
//! The architecture, parameter names and layouts are exactly Hugging Face's `GPT2LMHeadModel`
//! (`transformer.h.3.attn.c_attn.weight`, ...), so a Hugging Face checkpoint loads one to one.
//! Note the `Conv1D` layout HF inherited from the original TensorFlow code: linear weights are
//! stored `(in, out)` and applied as `y = x @ W + b`.
//!
//! - Embedding: token ids `(B, T)` → `wte[ids] + wpe[0..T]`, `(B, T, C)`.
//! - Block (pre-LayerNorm): `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, with causal
//!   multi-head self-attention and a GELU-tanh MLP of width `4C`. No dropout: brigade compares
//!   pipeline schedules bit for bit against a single-device reference, and dropout would need
//!   a shared RNG stream across stages for that.
//! - Head: `ln_f`, then logits `x @ wteᵀ`, `(B, T, V)`. The LM head is **tied** to the token
//!   embedding by name: the Head asks the store for `transformer.wte.weight` too, so inside one
//!   stage both layers share one `Var`, and across stages the engine sums the copies' gradients.
//!
//! Initialisation follows GPT-2/nanoGPT: weights `N(0, 0.02)`, the two residual projections
//! (`attn.c_proj`, `mlp.c_proj`) `N(0, 0.02/√(2·n_layer))` so the residual stream's variance does
//! not grow with depth, biases zero, LayerNorm gain one and bias zero.
//!
//! All ops are differentiable through candle's autograd: LayerNorm and softmax come from
//! [`brigade_kernels`] (candle-nn's fused versions have no backward pass).
//!
//! Files: `config` (sizes, presets, limits), `model` (the [`PipelineModel`] glue), one file per
//! layer kind (`embedding`, `block` with `attention`, `head`), tests in `tests`. The shared
//! building blocks (LayerNorm, `Conv1D`) are in `models/src/blocks/`.

mod attention;
mod block;
mod config;
mod embedding;
mod head;
mod model;
#[cfg(test)]
mod tests;

pub use block::BlockSpec;
pub use config::{GptConfig, GPT_MAX_SIZE, MAX_PARAMS, PRESET_NAMES};
pub use embedding::EmbeddingSpec;
pub use head::HeadSpec;
pub use model::{model_from_preset, Gpt};

use crate::blocks::check_hidden;
#[cfg(doc)]
use brigade_engine::PipelineModel;
