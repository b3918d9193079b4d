//! The Llama family (Touvron et al. 2023; also SmolLM2, TinyLlama, Llama 3 and, with q/k/v
//! biases, Qwen2's shape) as an ordered layer list: `[Embedding, DecoderBlock × n, Head]`.
//!
//! Architecture, parameter names and layouts are exactly Hugging Face's `LlamaForCausalLM`
//! (`model.layers.3.self_attn.q_proj.weight`, ...; linear weights `(out, in)`), so its
//! checkpoints map one to one.
//!
//! - Embedding: token ids `(B, T)` → rows of `model.embed_tokens`, `(B, T, C)`.
//! - Decoder block (pre-RMSNorm): `x + attn(input_layernorm(x))`, then
//!   `x + mlp(post_attention_layernorm(x))`. Attention is causal, grouped-query (each k/v
//!   head serves `H / KV` query heads, read in place), with RoPE in HF's `rotate_half`
//!   convention and optional Llama 3 frequency scaling; the MLP is SwiGLU,
//!   `down(silu(gate(x)) · up(x))`. q/k/v run as one product, gate/up as one product.
//! - Head: `model.norm`, then logits `h · Wᵀ` with `lm_head.weight`, or the embedding's table
//!   when `tie_word_embeddings` (shared by name, as GPT's).
//!
//! Initialisation follows HF: weights `N(0, 0.02)`, biases zero, RMSNorm gains one.
//!
//! Files: `config` (sizes, presets, limits), `model` (the [`PipelineModel`] glue), one file
//! per layer kind (`embedding`, `block` with `attention` and `mlp`, `head`), tests in `tests`.
//! RMSNorm, RoPE and the fused `nn.Linear` are shared building blocks in `models/src/blocks/`.

mod attention;
mod block;
mod config;
mod embedding;
mod head;
mod mlp;
mod model;
#[cfg(test)]
mod tests;

pub use crate::blocks::Llama3RopeScaling;
pub use block::DecoderBlockSpec;
pub use config::{LlamaConfig, LLAMA_MAX_SIZE, PRESET_NAMES};
pub use embedding::EmbeddingSpec;
pub use head::HeadSpec;
pub use model::{model_from_preset, Llama};

use crate::blocks::check_hidden;
#[cfg(doc)]
use brigade_engine::PipelineModel;
