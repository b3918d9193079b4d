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

use std::sync::Arc;

use brigade_engine::{
    Gradients, Init, InputKind, Layer, LayerSpec, LossKind, Mode, ParamSpec, ParamStore, Pass, PipelineModel, Saved,
};
use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// GPT preset names, smallest first.
pub const PRESET_NAMES: &[&str] = &["gpt-tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// Standard deviation of GPT-2's weight init.
const INIT_STD: f64 = 0.02;

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

/// The largest value any GPT size (vocabulary, context, width, layers, heads) may take; far
/// above any trained GPT (GPT-3: 96 layers, width 12288).
pub const GPT_MAX_SIZE: usize = 1 << 24;
/// The most parameters a model config may describe (2^40, about 1.1 trillion).
pub const MAX_PARAMS: u128 = 1 << 40;

/// GPT-2 hyper-parameters, named as in Hugging Face's `GPT2Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length: the longest sequence the position embedding covers.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
}

impl GptConfig {
    /// A named preset: `gpt-tiny` (CI-sized), `gpt2` (124M), `gpt2-medium` (355M),
    /// `gpt2-large` (774M), `gpt2-xl` (1.5B).
    pub fn preset(name: &str) -> std::result::Result<Self, ModelError> {
        // (vocab, context, n_embd, n_layer, n_head)
        let (v, t, c, l, h) = match name {
            "gpt-tiny" => (256, 64, 64, 2, 4),
            "gpt2" => (50257, 1024, 768, 12, 12),
            "gpt2-medium" => (50257, 1024, 1024, 24, 16),
            "gpt2-large" => (50257, 1024, 1280, 36, 20),
            "gpt2-xl" => (50257, 1024, 1600, 48, 25),
            _ => return Err(ModelError::UnknownPreset { name: name.to_string(), valid: PRESET_NAMES.to_vec() }),
        };
        Self::custom(v, t, c, l, h)
    }

    /// A config from explicit sizes (LayerNorm epsilon 1e-5), validated.
    pub fn custom(
        vocab_size: usize,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
    ) -> std::result::Result<Self, ModelError> {
        let cfg =
            Self { vocab_size, n_positions, n_embd, n_layer, n_head, layer_norm_epsilon: default_layer_norm_epsilon() };
        cfg.validate()?;
        Ok(cfg)
    }

    // Overrides for the CLI (`--n-layer 6` on top of a preset); call `validate` (or `Gpt::new`,
    // which does) afterwards.
    pub fn with_vocab_size(mut self, v: usize) -> Self {
        self.vocab_size = v;
        self
    }
    pub fn with_n_positions(mut self, t: usize) -> Self {
        self.n_positions = t;
        self
    }
    pub fn with_n_embd(mut self, c: usize) -> Self {
        self.n_embd = c;
        self
    }
    pub fn with_n_layer(mut self, l: usize) -> Self {
        self.n_layer = l;
        self
    }
    pub fn with_n_head(mut self, h: usize) -> Self {
        self.n_head = h;
        self
    }
    pub fn with_layer_norm_epsilon(mut self, eps: f64) -> Self {
        self.layer_norm_epsilon = eps;
        self
    }

    /// Checks the sizes are usable: all positive and at most [`GPT_MAX_SIZE`], heads divide
    /// the width, epsilon positive.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ModelError::InvalidConfig(format!("GPT {field} must be positive")));
            }
            if value > GPT_MAX_SIZE {
                return Err(ModelError::InvalidConfig(format!(
                    "GPT {field} = {value} is larger than brigade supports ({GPT_MAX_SIZE})"
                )));
            }
        }
        // An upper bound on the parameters (in u128: the sizes above cannot overflow it), so
        // that counts and allocations derived from the config stay meaningful.
        let (v, p, c, l) = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer].map(|x| x as u128).into();
        let params = v * c + p * c + l * (12 * c * c + 13 * c) + 2 * c;
        if params > MAX_PARAMS {
            return Err(ModelError::InvalidConfig(format!(
                "GPT with vocab {}, context {}, width {} and {} layers has ~{params} parameters, more than brigade supports ({MAX_PARAMS})",
                self.vocab_size, self.n_positions, self.n_embd, self.n_layer
            )));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::InvalidConfig(format!(
                "GPT n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(ModelError::InvalidConfig(format!(
                "GPT layer_norm_epsilon must be positive and finite, got {}",
                self.layer_norm_epsilon
            )));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// GPT-2 as a [`PipelineModel`].
#[derive(Debug, Clone)]
pub struct Gpt {
    name: String,
    cfg: GptConfig,
}

impl Gpt {
    /// A model from a validated config. Its name is the preset's when the config equals one,
    /// otherwise it spells out the sizes.
    pub fn new(cfg: GptConfig) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let name = PRESET_NAMES
            .iter()
            .find(|p| GptConfig::preset(p).as_ref() == Ok(&cfg))
            .map(|p| p.to_string())
            .unwrap_or_else(|| {
                format!(
                    "gpt(vocab={}, ctx={}, embd={}, layers={}, heads={})",
                    cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head
                )
            });
        Ok(Self { name, cfg })
    }

    pub fn from_preset(name: &str) -> std::result::Result<Self, ModelError> {
        Self::new(GptConfig::preset(name)?)
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
}

/// A GPT preset as a shareable model (`gpt-tiny`, `gpt2`, ...).
pub fn model_from_preset(name: &str) -> std::result::Result<Arc<dyn PipelineModel>, ModelError> {
    Ok(Arc::new(Gpt::from_preset(name)?))
}

impl PipelineModel for Gpt {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        let mut layers: Vec<Arc<dyn LayerSpec>> = Vec::with_capacity(self.cfg.n_layer + 2);
        layers.push(Arc::new(EmbeddingSpec { cfg: self.cfg.clone() }));
        for index in 0..self.cfg.n_layer {
            layers.push(Arc::new(BlockSpec { cfg: self.cfg.clone(), index }));
        }
        layers.push(Arc::new(HeadSpec { cfg: self.cfg.clone() }));
        layers
    }

    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn config(&self) -> serde_json::Value {
        crate::ModelConfig::Gpt(self.cfg.clone()).to_json()
    }

    fn input(&self) -> InputKind {
        InputKind::Tokens { vocab: self.cfg.vocab_size, context: self.cfg.n_positions }
    }

    fn num_classes(&self) -> usize {
        self.cfg.vocab_size
    }
}

// ---------------------------------------------------------------------------------------------
// Parameter specs (shared by `params()` and `build()`, so the two can never disagree).

const WTE: &str = "transformer.wte.weight";
const WPE: &str = "transformer.wpe.weight";

fn wte_spec(cfg: &GptConfig) -> ParamSpec {
    ParamSpec::new(WTE, &[cfg.vocab_size, cfg.n_embd], Init::Normal { std: INIT_STD })
}

fn layer_norm_specs(prefix: &str, c: usize) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{prefix}.weight"), &[c], Init::Ones),
        ParamSpec::new(format!("{prefix}.bias"), &[c], Init::Zeros),
    ]
}

/// HF `Conv1D` weight `(in, out)` and bias `(out,)`.
fn conv1d_specs(prefix: &str, d_in: usize, d_out: usize, std: f64) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{prefix}.weight"), &[d_in, d_out], Init::Normal { std }),
        ParamSpec::new(format!("{prefix}.bias"), &[d_out], Init::Zeros),
    ]
}

/// A parameter as a layer holds it: its name (gradients are reported by name) and its value.
#[derive(Debug, Clone)]
struct Param {
    name: String,
    value: Tensor,
}

/// Gets `N` parameters from the store in spec order.
fn get_all<const N: usize>(store: &mut ParamStore, specs: &[ParamSpec]) -> Result<[Param; N]> {
    let params =
        specs.iter().map(|s| Ok(Param { name: s.name.clone(), value: store.get(s)? })).collect::<Result<Vec<_>>>()?;
    let got = params.len();
    params.try_into().map_err(|_| candle_core::Error::Msg(format!("expected {N} parameters, got {got}")))
}

// ---------------------------------------------------------------------------------------------
// Small building blocks. Each has the autograd forward (`forward`) and the explicit pieces
// (forward keeping its inputs, input gradient, weight gradient) the pipeline runs.

/// LayerNorm over the last dimension (via the differentiable kernel).
#[derive(Debug)]
struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

/// What a LayerNorm's input-gradient step leaves for its weight step: the fused backward
/// kernel yields the gain and bias gradients in the same pass as the input gradient (they are
/// row reductions of the same terms), so `W` only adds them in.
struct LayerNormGrads {
    dweight: Tensor,
    dbias: Tensor,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        brigade_kernels::layer_norm(x, &self.weight.value, &self.bias.value, self.eps)
    }

    /// `dx` for `dy`, recomputing the statistics from the saved input `x`.
    fn backward_input(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, LayerNormGrads)> {
        let (dx, dweight, dbias) = brigade_kernels::layer_norm_backward(x, &self.weight.value, dy, self.eps)?;
        Ok((dx, LayerNormGrads { dweight, dbias }))
    }

    fn backward_weight(&self, g: &LayerNormGrads, grads: &mut Gradients) -> Result<()> {
        grads.add(&self.weight.name, &g.dweight)?;
        grads.add(&self.bias.name, &g.dbias)
    }
}

/// HF's `Conv1D`: a linear layer with weight stored `(in, out)`, `y = x @ W + b`.
#[derive(Debug)]
struct Conv1D {
    weight: Param,
    bias: Param,
}

impl Conv1D {
    /// `(B, T, in)` → `(B, T, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `residual + x @ W + b`, the residual connection written by the same gemm call.
    fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = self.weight.value.dim(1)?;
        // A 2-D product over the flattened tokens: one gemm.
        let residual = residual.map(|r| r.reshape((b * t, d_out))).transpose()?;
        brigade_kernels::linear(
            &x.reshape((b * t, d_in))?,
            &self.weight.value,
            Some(&self.bias.value),
            residual.as_ref(),
        )?
        .reshape((b, t, d_out))
    }

    /// `dx = dy @ Wᵀ`, `(B, T, out)` → `(B, T, in)`.
    fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        let (b, t, d_out) = dy.dims3()?;
        let d_in = self.weight.value.dim(0)?;
        brigade_kernels::linear(&dy.reshape((b * t, d_out))?, &self.weight.value.t()?, None, None)?
            .reshape((b, t, d_in))
    }

    /// `dW += xᵀ dy` over all tokens, `db += Σ dy`.
    fn backward_weight(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<()> {
        let (b, t, d_in) = x.dims3()?;
        let d_out = dy.dim(2)?;
        let x = x.reshape((b * t, d_in))?;
        let dy = dy.reshape((b * t, d_out))?;
        grads.add_matmul(&self.weight.name, &x.t()?, &dy)?;
        grads.add(&self.bias.name, &brigade_kernels::sum_rows(&dy)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding: token ids → token + position embeddings.

#[derive(Debug, Clone)]
pub struct EmbeddingSpec {
    cfg: GptConfig,
}

impl LayerSpec for EmbeddingSpec {
    fn name(&self) -> String {
        "transformer.embed".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let cfg = &self.cfg;
        vec![wte_spec(cfg), ParamSpec::new(WPE, &[cfg.n_positions, cfg.n_embd], Init::Normal { std: INIT_STD })]
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [wte, wpe] = get_all(store, &self.params())?;
        Ok(Box::new(Embedding { wte, wpe, vocab: self.cfg.vocab_size }))
    }
}

#[derive(Debug)]
struct Embedding {
    wte: Param, // (V, C)
    wpe: Param, // (ctx, C)
    vocab: usize,
}

impl Embedding {
    /// Validates token ids and returns them flattened as u32 with the batch shape.
    fn checked_ids(&self, ids: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (b, t) = match ids.dims() {
            &[b, t] => (b, t),
            dims => bail!("GPT embedding expects token ids of shape (B, T), got {dims:?}"),
        };
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!("GPT embedding expects integer token ids (u32/i64/u8), got dtype {:?}", ids.dtype());
        }
        let context = self.wpe.value.dim(0)?;
        if t == 0 || b == 0 {
            bail!("GPT embedding got an empty batch of token ids, shape {:?}", ids.dims());
        }
        if t > context {
            bail!("sequence length {t} exceeds the model's context length {context}");
        }
        // Range check first: index_select on an out-of-range id would read garbage or panic.
        // On a GPU reading the ids back would stop the stage's stream twice per micro-batch:
        // there the pipeline's batch check (`InputKind::Tokens`) has already checked them on
        // the host, once per step, before they were uploaded.
        if ids.device().is_cpu() {
            let ids64 = ids.to_dtype(DType::I64)?.flatten_all()?;
            let (lo, hi) = (ids64.min(0)?.to_scalar::<i64>()?, ids64.max(0)?.to_scalar::<i64>()?);
            if lo < 0 || hi >= self.vocab as i64 {
                let bad = if lo < 0 { lo } else { hi };
                bail!("token id {bad} is out of range for vocabulary size {}", self.vocab);
            }
        }
        Ok((ids.to_dtype(DType::U32)?.flatten_all()?, b, t))
    }

    /// Token plus position embeddings of positions `offset..offset + t`.
    fn embed(&self, flat: &Tensor, b: usize, t: usize, offset: usize) -> Result<Tensor> {
        let tok = self.wte.value.index_select(flat, 0)?.reshape((b, t, ()))?; // (B, T, C)
        let pos = self.wpe.value.narrow(0, offset, t)?; // (T, C)
        tok.broadcast_add(&pos) // (B, T, C)
    }
}

impl Layer for Embedding {
    fn forward(&mut self, ids: &Tensor, _mode: Mode) -> Result<Tensor> {
        let (flat, b, t) = self.checked_ids(ids)?;
        self.embed(&flat, b, t, 0)
    }

    fn forward_incremental(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (flat, b, t) = self.checked_ids(ids)?;
        let context = self.wpe.value.dim(0)?;
        if offset + t > context {
            bail!("positions {offset}..{} exceed the model's context length {context}", offset + t);
        }
        self.embed(&flat, b, t, offset)
    }

    fn forward_train(&mut self, ids: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (flat, b, t) = self.checked_ids(ids)?;
        let y = self.embed(&flat, b, t, 0)?;
        Ok((y, Saved::new(flat.clone(), &[&flat])))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        // Token ids have no gradient; everything here is the weight step's.
        let flat: Tensor = saved.take("GPT embedding")?;
        Ok((None, Saved::new((flat.clone(), dy.clone()), &[&flat, dy])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (flat, dy): (Tensor, Tensor) = saved.take("GPT embedding")?;
        let (b, t, c) = dy.dims3()?;
        let dy2 = dy.reshape((b * t, c))?;
        // Rows of the token table: scatter-add each position's gradient to its token's row.
        let dwte = self.wte.value.zeros_like()?.index_add(&flat, &dy2, 0)?;
        grads.add(&self.wte.name, &dwte)?;
        // Position rows 0..T get the batch sum; rows past T get zero.
        let context = self.wpe.value.dim(0)?;
        let dwpe =
            brigade_kernels::sum_rows(&dy.reshape((b, t * c))?)?.reshape((t, c))?.pad_with_zeros(0, 0, context - t)?;
        grads.add(&self.wpe.name, &dwpe)
    }
}

// ---------------------------------------------------------------------------------------------
// Transformer block.

#[derive(Debug, Clone)]
pub struct BlockSpec {
    cfg: GptConfig,
    index: usize,
}

impl LayerSpec for BlockSpec {
    fn name(&self) -> String {
        format!("transformer.h.{}", self.index)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let p = self.name();
        let c = self.cfg.n_embd;
        // Residual projections are scaled down by √(2·n_layer): two residual adds per block.
        let proj_std = INIT_STD / (2.0 * self.cfg.n_layer as f64).sqrt();
        let mut specs = Vec::with_capacity(12);
        specs.extend(layer_norm_specs(&format!("{p}.ln_1"), c));
        specs.extend(conv1d_specs(&format!("{p}.attn.c_attn"), c, 3 * c, INIT_STD));
        specs.extend(conv1d_specs(&format!("{p}.attn.c_proj"), c, c, proj_std));
        specs.extend(layer_norm_specs(&format!("{p}.ln_2"), c));
        specs.extend(conv1d_specs(&format!("{p}.mlp.c_fc"), c, 4 * c, INIT_STD));
        specs.extend(conv1d_specs(&format!("{p}.mlp.c_proj"), 4 * c, c, proj_std));
        specs
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [ln1_w, ln1_b, attn_w, attn_b, aproj_w, aproj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b] =
            get_all(store, &self.params())?;
        let eps = self.cfg.layer_norm_epsilon;
        Ok(Box::new(Block {
            name: self.name(),
            n_embd: self.cfg.n_embd,
            n_positions: self.cfg.n_positions,
            ln_1: LayerNorm { weight: ln1_w, bias: ln1_b, eps },
            attn: CausalSelfAttention {
                n_head: self.cfg.n_head,
                c_attn: Conv1D { weight: attn_w, bias: attn_b },
                c_proj: Conv1D { weight: aproj_w, bias: aproj_b },
                cache: None,
            },
            ln_2: LayerNorm { weight: ln2_w, bias: ln2_b, eps },
            mlp: Mlp { c_fc: Conv1D { weight: fc_w, bias: fc_b }, c_proj: Conv1D { weight: mproj_w, bias: mproj_b } },
        }))
    }
}

#[derive(Debug)]
struct CausalSelfAttention {
    n_head: usize,
    c_attn: Conv1D, // C → 3C (q, k, v fused)
    c_proj: Conv1D, // C → C
    /// Incremental decoding's keys and values of every position so far, each `(B, H, T, D)`.
    cache: Option<(Tensor, Tensor)>,
}

/// What attention's forward keeps: its input, the fused `qkv` projection, the attention
/// probabilities and the merged heads (the output projection's input).
struct AttentionSaved {
    x: Tensor,
    qkv: Tensor,
    /// What the attention backward starts from: the probabilities (materialised path) or the
    /// per-row log-sum-exp (flash attention, the CPU's f32 path: no T×T matrix kept).
    saved: brigade_kernels::AttentionSaved,
    merged: Tensor,
}

impl CausalSelfAttention {
    /// `(B, T, C)` → `(B, T, C)`, keeping what the backward needs.
    ///
    /// While candle records a graph (the autograd reference, gradient checks) the attention
    /// core is the differentiable composition; otherwise it is the fused kernel, whose backward
    /// is [`Self::backward_input`]'s explicit call. The exactness tests hold the two together.
    fn forward_saving(&mut self, x: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, AttentionSaved)> {
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let (merged, saved) = if qkv.track_op() {
            let (merged, probs) = brigade_kernels::reference::causal_attention(&qkv, self.n_head)?;
            (merged, brigade_kernels::AttentionSaved::Probs(probs))
        } else {
            brigade_kernels::causal_attention_saving(&qkv, self.n_head)?
        }; // (B, T, C), probabilities (B, H, T, T) or log-sum-exp (B, H, T)
        let out = self.c_proj.forward_residual(&merged, residual)?;
        Ok((out, AttentionSaved { x: x.clone(), qkv, saved, merged }))
    }

    /// Attention of the new positions `offset..offset + T` over every position so far: their
    /// keys and values join the cache, so each step computes only `T` rows of scores instead
    /// of the whole window's. Offset 0 starts a new sequence.
    /// Returns `residual + attention(x)`.
    fn forward_incremental(&mut self, x: &Tensor, offset: usize, residual: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, d) = (self.n_head, c / self.n_head);
        if offset == 0 {
            self.cache = None;
        }
        let cached = match &self.cache {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        if cached != offset {
            bail!("incremental attention at position {offset}, but {cached} positions are cached (start again at 0)");
        }
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
            // (B, H, T, D)
        };
        let (q, k_new, v_new) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match self.cache.take() {
            Some((k, v)) => (Tensor::cat(&[&k, &k_new], 2)?, Tensor::cat(&[&v, &v_new], 2)?), // (B, H, S, D)
            None => (k_new, v_new),
        };
        let s = offset + t;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (B, H, T, S)
                                                                        // New position `offset + i` sees positions `0..=offset + i`; a single new token sees all.
        let scores = if t > 1 {
            let data: Vec<u8> = (0..t).flat_map(|i| (0..s).map(move |j| u8::from(j <= offset + i))).collect();
            let mask = Tensor::from_vec(data, (t, s), x.device())?.broadcast_as(scores.shape())?;
            let neg_inf =
                Tensor::new(f32::NEG_INFINITY, x.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
            mask.where_cond(&scores, &neg_inf)?
        } else {
            scores
        };
        let probs = brigade_kernels::softmax_last_dim(&scores)?; // (B, H, T, S)
        let y = probs.matmul(&v)?; // (B, H, T, D)
        self.cache = Some((k, v));
        let merged = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.c_proj.forward_residual(&merged, Some(residual))
    }

    /// The input gradient; returns it with the gradients of the two projections' outputs
    /// (`dqkv`, `dout`), which is what their weight steps need.
    fn backward_input(&self, s: &AttentionSaved, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        let dmerged = self.c_proj.backward_input(dout)?; // (B, T, C)
        let dqkv =
            brigade_kernels::causal_attention_saved_backward(&s.qkv, &s.merged, &s.saved, &dmerged, self.n_head)?; // (B, T, 3C)
        let dx = self.c_attn.backward_input(&dqkv)?;
        Ok((dx, dqkv))
    }
}

#[derive(Debug)]
struct Mlp {
    c_fc: Conv1D,   // C → 4C
    c_proj: Conv1D, // 4C → C
}

impl Mlp {
    /// `residual + c_proj(gelu(c_fc(x)))`, the residual added by the last gemm call.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = brigade_kernels::gelu_tanh(&self.c_fc.forward(x)?)?; // (B, T, 4C)
        self.c_proj.forward_residual(&h, Some(residual)) // (B, T, C)
    }
}

#[derive(Debug)]
struct Block {
    name: String,
    n_embd: usize,
    n_positions: usize,
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// A block's forward, kept for its backward.
struct BlockSaved {
    attn: AttentionSaved,
    /// The residual stream after attention (ln_2's input).
    x2: Tensor,
    /// ln_2's output (c_fc's input), c_fc's output (GELU's input), GELU's output.
    ln2_out: Tensor,
    fc_out: Tensor,
    gelu_out: Tensor,
}

/// What a block's weight step needs: each projection's input and output gradient, and the
/// LayerNorms' gradients.
struct BlockWeightGrads {
    ln1_out: Tensor,
    dqkv: Tensor,
    merged: Tensor,
    dattn_out: Tensor,
    ln1: LayerNormGrads,
    ln2_out: Tensor,
    dfc_out: Tensor,
    gelu_out: Tensor,
    dmlp_out: Tensor,
    ln2: LayerNormGrads,
}

impl Layer for Block {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        check_hidden(x, self.n_embd, self.n_positions, "GPT block")?;
        let (x2, _) = self.attn.forward_saving(&self.ln_1.forward(x)?, Some(x))?; // (B, T, C)
        self.mlp.forward_residual(&self.ln_2.forward(&x2)?, &x2)
    }

    fn forward_incremental(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        check_hidden(x, self.n_embd, self.n_positions, "GPT block")?;
        if offset + x.dim(1)? > self.n_positions {
            bail!("positions {offset}..{} exceed the model's context length {}", offset + x.dim(1)?, self.n_positions);
        }
        let x2 = self.attn.forward_incremental(&self.ln_1.forward(x)?, offset, x)?; // (B, T, C)
        self.mlp.forward_residual(&self.ln_2.forward(&x2)?, &x2)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        check_hidden(x, self.n_embd, self.n_positions, "GPT block")?;
        let ln1_out = self.ln_1.forward(x)?;
        // Residual connections are added by the output projections' gemm calls.
        let (x2, mut attn) = self.attn.forward_saving(&ln1_out, Some(x))?;
        attn.x = ln1_out; // the attention's input is ln_1's output; the block input is `x`
        let ln2_out = self.ln_2.forward(&x2)?;
        let fc_out = self.mlp.c_fc.forward(&ln2_out)?;
        let gelu_out = brigade_kernels::gelu_tanh(&fc_out)?;
        let y = self.mlp.c_proj.forward_residual(&gelu_out, Some(&x2))?;
        let keep = [x, &attn.x, &attn.qkv, attn.saved.tensor(), &attn.merged, &x2, &ln2_out, &fc_out, &gelu_out];
        let keep = keep.into_iter().cloned().collect();
        let saved = Saved::with_handles((x.clone(), BlockSaved { attn, x2, ln2_out, fc_out, gelu_out }), keep);
        Ok((y, saved))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (x, s): (Tensor, BlockSaved) = saved.take(&self.name)?;
        // MLP branch: y = x2 + c_proj(gelu(c_fc(ln_2(x2)))).
        let dgelu_out = self.mlp.c_proj.backward_input(dy)?;
        let dfc_out = brigade_kernels::gelu_tanh_backward(&s.fc_out, &dgelu_out)?;
        let dln2_out = self.mlp.c_fc.backward_input(&dfc_out)?;
        let (dx2_ln, ln2) = self.ln_2.backward_input(&s.x2, &dln2_out)?;
        let dx2 = (dy + dx2_ln)?;
        // Attention branch: x2 = x + attn(ln_1(x)).
        let (dln1_out, dqkv) = self.attn.backward_input(&s.attn, &dx2)?;
        let (dx_ln, ln1) = self.ln_1.backward_input(&x, &dln1_out)?;
        let dx = (&dx2 + dx_ln)?;
        let w = BlockWeightGrads {
            ln1_out: s.attn.x,
            dqkv,
            merged: s.attn.merged,
            dattn_out: dx2,
            ln1,
            ln2_out: s.ln2_out,
            dfc_out,
            gelu_out: s.gelu_out,
            dmlp_out: dy.clone(),
            ln2,
        };
        let keep = [&w.ln1_out, &w.dqkv, &w.merged, &w.dattn_out, &w.ln2_out, &w.dfc_out, &w.gelu_out, &w.dmlp_out];
        let keep = keep.into_iter().cloned().collect();
        let saved = Saved::with_handles(w, keep);
        Ok((Some(dx), saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: BlockWeightGrads = saved.take(&self.name)?;
        self.ln_1.backward_weight(&w.ln1, grads)?;
        self.attn.c_attn.backward_weight(&w.ln1_out, &w.dqkv, grads)?;
        self.attn.c_proj.backward_weight(&w.merged, &w.dattn_out, grads)?;
        self.ln_2.backward_weight(&w.ln2, grads)?;
        self.mlp.c_fc.backward_weight(&w.ln2_out, &w.dfc_out, grads)?;
        self.mlp.c_proj.backward_weight(&w.gelu_out, &w.dmlp_out, grads)
    }
}

/// Hidden states between layers must be `(B, T, C)` floats (f32; bf16 or f16 under mixed
/// precision) with `T <= context`.
fn check_hidden(x: &Tensor, n_embd: usize, n_positions: usize, what: &str) -> Result<()> {
    match x.dims() {
        &[_, t, c] if c == n_embd && t <= n_positions => {}
        dims => bail!("{what} expects hidden states (B, T<={n_positions}, {n_embd}), got {dims:?}"),
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("{what} expects f32 (or bf16/f16, mixed precision) hidden states, got {:?}", x.dtype());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Head: final LayerNorm and the LM head tied to the token embedding.

#[derive(Debug, Clone)]
pub struct HeadSpec {
    cfg: GptConfig,
}

impl LayerSpec for HeadSpec {
    fn name(&self) -> String {
        "lm_head".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut specs = layer_norm_specs("transformer.ln_f", self.cfg.n_embd).to_vec();
        // Tied: the same name (and so the same Var) as the embedding's token table.
        specs.push(wte_spec(&self.cfg));
        specs
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [w, b, wte] = get_all(store, &self.params())?;
        Ok(Box::new(Head {
            n_positions: self.cfg.n_positions,
            ln_f: LayerNorm { weight: w, bias: b, eps: self.cfg.layer_norm_epsilon },
            wte,
        }))
    }
}

#[derive(Debug)]
struct Head {
    n_positions: usize,
    ln_f: LayerNorm,
    wte: Param, // (V, C)
}

/// What the head's weight step needs: the tied table's gradient is `dlogitsᵀ h`.
struct HeadWeightGrads {
    h: Tensor,
    dlogits: Tensor,
    ln_f: LayerNormGrads,
}

impl Head {
    /// `(B, T, C)` → normalised `(B·T, C)` and logits `(B, T, V)`.
    fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (v, c) = self.wte.value.dims2()?;
        check_hidden(x, c, self.n_positions, "GPT head")?;
        let (b, t, _) = x.dims3()?;
        let h = self.ln_f.forward(x)?.reshape((b * t, c))?; // (B·T, C)
        let logits = brigade_kernels::linear(&h, &self.wte.value.t()?, None, None)?.reshape((b, t, v))?; // (B, T, V)
        Ok((h, logits))
    }
}

impl Layer for Head {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.logits(x)?.1)
    }

    fn forward_incremental(&mut self, x: &Tensor, _offset: usize) -> Result<Tensor> {
        Ok(self.logits(x)?.1)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (h, logits) = self.logits(x)?;
        Ok((logits, Saved::new((x.clone(), h.clone()), &[x, &h])))
    }

    fn backward_input(&mut self, saved: Saved, dlogits: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (x, h): (Tensor, Tensor) = saved.take("GPT head")?;
        let (b, t, v) = dlogits.dims3()?;
        let dlogits = dlogits.reshape((b * t, v))?;
        let dh = brigade_kernels::linear(&dlogits, &self.wte.value, None, None)?.reshape(x.shape())?; // (B, T, C)
        let (dx, ln_f) = self.ln_f.backward_input(&x, &dh)?;
        let saved = Saved::new(HeadWeightGrads { h: h.clone(), dlogits: dlogits.clone(), ln_f }, &[&h, &dlogits]);
        Ok((Some(dx), saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let w: HeadWeightGrads = saved.take("GPT head")?;
        self.ln_f.backward_weight(&w.ln_f, grads)?;
        grads.add_matmul(&self.wte.name, &w.dlogits.t()?, &w.h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brigade_engine::layer::unique_params;
    use candle_core::{Device, Var};

    fn tiny() -> GptConfig {
        GptConfig::preset("gpt-tiny").unwrap()
    }

    #[test]
    fn absurd_sizes_are_refused_by_name() {
        // A size far past any model (a typo, or a hostile config.json) names the field.
        let e = GptConfig::custom(256, 64, 64, 1 << 60, 4).unwrap_err().to_string();
        assert!(e.contains("n_layer = 1152921504606846976 is larger than brigade supports"), "{e}");
        // Each size within bounds, but together over 2^40 parameters.
        let e = GptConfig::custom(256, 64, 1 << 16, 1 << 16, 4).unwrap_err().to_string();
        assert!(e.contains("parameters, more than brigade supports"), "{e}");
        // GPT-2 XL-sized configs are fine.
        GptConfig::custom(50257, 1024, 1600, 48, 25).unwrap();
    }

    /// Builds every layer of `model` in one store.
    fn build_all(model: &dyn PipelineModel, store: &mut ParamStore) -> Vec<Box<dyn Layer>> {
        model.layers().iter().map(|l| l.build(store).unwrap()).collect()
    }

    fn run(layers: &mut [Box<dyn Layer>], x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in layers.iter_mut() {
            h = l.forward(&h, Mode::Train)?;
        }
        Ok(h)
    }

    fn ids(data: &[u32], b: usize, t: usize) -> Tensor {
        Tensor::from_slice(data, (b, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn param_counts_match_hugging_face() {
        let expected = [
            ("gpt2", 124_439_808usize),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
        ];
        for (name, n) in expected {
            assert_eq!(Gpt::from_preset(name).unwrap().num_params(), n, "{name}");
        }
        // gpt-tiny: wte 256·64 + wpe 64·64 + 2 blocks · (12·64² + 13·64) + ln_f 128.
        let tiny = Gpt::from_preset("gpt-tiny").unwrap();
        assert_eq!(tiny.num_params(), 16384 + 4096 + 2 * (12 * 4096 + 13 * 64) + 128);
        // The layer list counts the tied table in both users.
        let per_layer: usize = tiny.layers().iter().map(|l| l.param_count()).sum();
        assert_eq!(per_layer, tiny.num_params() + 256 * 64);
    }

    #[test]
    fn layer_list_and_names() {
        let model = Gpt::from_preset("gpt-tiny").unwrap();
        let names: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
        assert_eq!(names, ["transformer.embed", "transformer.h.0", "transformer.h.1", "lm_head"]);
        let params: Vec<String> = unique_params(&model.layers()).into_iter().map(|p| p.name).collect();
        for n in [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.1.ln_1.weight",
            "transformer.h.1.attn.c_attn.weight",
            "transformer.h.1.attn.c_attn.bias",
            "transformer.h.1.attn.c_proj.weight",
            "transformer.h.1.ln_2.bias",
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_proj.bias",
            "transformer.ln_f.weight",
        ] {
            assert!(params.iter().any(|p| p == n), "missing {n}");
        }
        let attn = unique_params(&model.layers())
            .into_iter()
            .find(|p| p.name == "transformer.h.0.attn.c_attn.weight")
            .unwrap();
        assert_eq!(attn.shape, vec![64, 192]); // Conv1D layout (in, out)
        assert_eq!(model.input(), InputKind::Tokens { vocab: 256, context: 64 });
        assert_eq!(model.name(), "gpt-tiny");
    }

    #[test]
    fn forward_shapes_and_tied_head() {
        let model = Gpt::from_preset("gpt-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&model, &mut store);
        let data: Vec<u32> = (0..2 * 10).map(|i| (i * 37 % 256) as u32).collect();
        let logits = run(&mut layers, &ids(&data, 2, 10)).unwrap();
        assert_eq!(logits.dims(), &[2, 10, 256]);
        // Tied: one Var for the table, and its gradient gets contributions from both layers.
        assert_eq!(store.len(), unique_params(&model.layers()).len());
        let loss = logits.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let wte = store.var(WTE).unwrap();
        let g = grads.get(wte.as_tensor()).unwrap();
        // Rows of tokens never fed in still get gradient through the head.
        let unused_row = g.get(1).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(unused_row.to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn causal_future_tokens_do_not_change_past_logits() {
        let model = Gpt::from_preset("gpt-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 1);
        let mut layers = build_all(&model, &mut store);
        let a: Vec<u32> = vec![5, 17, 200, 3, 99, 42, 7, 8];
        let mut b = a.clone();
        b[5] = 250;
        b[7] = 1;
        let la = run(&mut layers, &ids(&a, 1, 8)).unwrap();
        let lb = run(&mut layers, &ids(&b, 1, 8)).unwrap();
        let diff = (&la - &lb).unwrap().abs().unwrap();
        let past = diff.narrow(1, 0, 5).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let future = diff.narrow(1, 5, 3).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(past, 0.0);
        assert!(future > 1e-4);
    }

    /// Every layer's hand-written backward (input and weight steps) against autograd through its
    /// `forward`, and a few entries of every parameter's gradient against finite differences.
    #[test]
    fn explicit_backward_matches_autograd_and_finite_differences() {
        use brigade_engine::gradcheck::{check_layer, finite_differences};
        let model = Gpt::new(GptConfig::custom(16, 8, 8, 2, 2).unwrap()).unwrap();
        let layers = model.layers();
        let ids = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
        // Hidden states of a trained model's order of magnitude, so LayerNorm is well
        // conditioned for finite differences.
        let hidden = (Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
        for (i, spec) in layers.iter().enumerate() {
            let x = if i == 0 { &ids } else { &hidden };
            let report = check_layer(spec.as_ref(), x, 5).unwrap();
            assert!(report.max() <= 1e-5, "{}: {report:?}", spec.name());
            assert_eq!(report.input.is_some(), i > 0, "{}", spec.name());
            assert_eq!(report.params.len(), spec.params().len());
            for p in spec.params() {
                let n = p.numel();
                let (pairs, _) = finite_differences(spec.as_ref(), x, 5, &p.name, &[0, n / 3, n - 1], 1e-2).unwrap();
                for (analytic, numeric) in pairs {
                    assert!(
                        (analytic - numeric).abs() <= 2e-3 + 2e-2 * analytic.abs().max(numeric.abs()),
                        "{}: explicit {analytic} vs finite difference {numeric}",
                        p.name
                    );
                }
            }
        }
    }

    /// At sequences of `FLASH_MIN_SEQUENCE` and longer a block's attention runs as flash
    /// attention on the CPU (only the log-sum-exp saved); its explicit backward still matches
    /// autograd through the reference composition.
    #[test]
    fn long_sequences_take_flash_attention_and_match_autograd() {
        use brigade_engine::gradcheck::check_layer;
        let t = brigade_kernels::FLASH_MIN_SEQUENCE + 3;
        let model = Gpt::new(GptConfig::custom(16, t, 8, 1, 2).unwrap()).unwrap();
        let block = model.layers()[1].clone();
        let hidden = (Tensor::randn(0f32, 1.0, (1, t, 8), &Device::Cpu).unwrap() * 2.0).unwrap();
        let report = check_layer(block.as_ref(), &hidden, 5).unwrap();
        assert!(report.max() <= 1e-5, "{report:?}");
        // It took the flash path: it kept (B, H, T) log-sum-exps, not (B, H, T, T) probabilities.
        // Built as a stage builds it: over detached views of the variables (no autograd graph).
        let mut store = ParamStore::new(Device::Cpu, 5);
        block.build(&mut store).unwrap();
        let mut layer = block.build(&mut store.shared_view()).unwrap();
        let (_, saved) = layer.forward_train(&hidden, Pass::First).unwrap();
        let biggest = saved.tensors().iter().map(|s| s.elem_count()).max().unwrap();
        assert!(biggest < 2 * t * t, "a T x T tensor was kept: {biggest} elements");
    }

    /// Central finite differences on a few entries of several parameters against autograd.
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = GptConfig::custom(16, 8, 8, 2, 2).unwrap();
        let model = Gpt::new(cfg).unwrap();
        let mut store = ParamStore::new(Device::Cpu, 3);
        let mut layers = build_all(&model, &mut store);
        let x = ids(&[1, 5, 9, 2, 15, 0, 3, 3, 7, 11], 2, 5);
        let targets = Tensor::from_slice(&[5u32, 9, 2, 15, 0, 3, 3, 7, 11, 4], 10, &Device::Cpu).unwrap();
        let loss_of = |layers: &mut [Box<dyn Layer>]| -> Tensor {
            let logits = run(layers, &x).unwrap().reshape((10, 16)).unwrap();
            brigade_kernels::cross_entropy_sum(&logits, &targets).unwrap()
        };
        // GPT-2's 0.02-std embeddings make LayerNorm's input tiny, so a finite-difference step
        // would be a large relative change; scale them to a trained model's order of magnitude.
        for name in [WTE, WPE] {
            let var = store.var(name).unwrap();
            var.set(&(var.as_tensor() * 25.0).unwrap()).unwrap();
        }
        let grads = loss_of(&mut layers).backward().unwrap();
        let names = [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.attn.c_proj.weight",
            "transformer.h.1.mlp.c_fc.bias",
            "transformer.h.0.mlp.c_proj.weight",
            "transformer.ln_f.bias",
        ];
        for name in names {
            let var: Var = store.var(name).unwrap().clone();
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let analytic: Vec<f32> = analytic.to_vec1().unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for &i in &[0usize, 3, base.len() / 2, base.len() - 1] {
                let eps = 1e-2f32;
                let mut eval = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l = loss_of(&mut layers).to_scalar::<f32>().unwrap() as f64;
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                    l
                };
                let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
                let a = analytic[i] as f64;
                assert!(
                    (numeric - a).abs() <= 1e-3 + 2e-2 * a.abs().max(numeric.abs()),
                    "{name}[{i}]: autograd {a} vs finite difference {numeric}"
                );
            }
        }
    }

    /// Decoding with the KV cache (a 3-token prefill, then one token at a time) gives the
    /// full forward's logits at every position; out-of-order offsets and positions past the
    /// context are errors.
    #[test]
    fn incremental_forward_matches_full_forward() {
        let model = Gpt::from_preset("gpt-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 7);
        let mut layers = build_all(&model, &mut store);
        let data: Vec<u32> = vec![3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 4, 62, 64, 33, 83, 27];
        let (b, t) = (2, 8);
        let full = run(&mut layers, &ids(&data, b, t)).unwrap(); // (B, T, V)
        let step = |layers: &mut [Box<dyn Layer>], x: &Tensor, offset: usize| {
            layers.iter_mut().try_fold(x.clone(), |h, l| l.forward_incremental(&h, offset)).unwrap()
        };
        let all = ids(&data, b, t);
        let mut pieces = vec![step(&mut layers, &all.narrow(1, 0, 3).unwrap(), 0)];
        for pos in 3..t {
            pieces.push(step(&mut layers, &all.narrow(1, pos, 1).unwrap(), pos));
        }
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let diff = (&full - &cached).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "cached logits differ from the full forward by {diff}");
        // Starting again at 0 forgets the old sequence: same logits as the first time.
        let again = step(&mut layers, &all.narrow(1, 0, 3).unwrap(), 0);
        let d = (&again - &pieces[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0);
        let e = layers[1]
            .forward_incremental(&Tensor::zeros((2, 1, 64), DType::F32, &Device::Cpu).unwrap(), 7)
            .unwrap_err();
        assert!(e.to_string().contains("but 3 positions are cached"), "{e}");
        let e = layers[0].forward_incremental(&ids(&[1, 2], 1, 2), 63).unwrap_err();
        assert!(e.to_string().contains("positions 63..65 exceed the model's context length 64"), "{e}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = Gpt::from_preset("gpt-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&model, &mut store);
        let emb = &mut layers[0];
        let too_long: Vec<u32> = vec![1; 65];
        let e = emb.forward(&ids(&too_long, 1, 65), Mode::Train).unwrap_err().to_string();
        assert!(e.contains("exceeds the model's context length 64"), "{e}");
        let e = emb.forward(&ids(&[1, 256], 1, 2), Mode::Train).unwrap_err().to_string();
        assert!(e.contains("token id 256 is out of range for vocabulary size 256"), "{e}");
        let neg = Tensor::from_slice(&[1i64, -1], (1, 2), &Device::Cpu).unwrap();
        let e = emb.forward(&neg, Mode::Train).unwrap_err().to_string();
        assert!(e.contains("token id -1"), "{e}");
        let floats = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let e = emb.forward(&floats, Mode::Train).unwrap_err().to_string();
        assert!(e.contains("integer token ids"), "{e}");
        let flat = Tensor::from_slice(&[1u32, 2], 2, &Device::Cpu).unwrap();
        assert!(emb.forward(&flat, Mode::Train).unwrap_err().to_string().contains("(B, T)"));
        let wrong_width = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu).unwrap();
        let e = layers[1].forward(&wrong_width, Mode::Train).unwrap_err().to_string();
        assert!(e.contains("GPT block expects hidden states"), "{e}");

        let e = GptConfig::preset("gpt3").unwrap_err().to_string();
        assert!(e.contains("unknown model preset `gpt3`") && e.contains("gpt2-medium"), "{e}");
        let e = GptConfig::custom(10, 8, 10, 1, 3).unwrap_err().to_string();
        assert!(e.contains("divisible"), "{e}");
        assert!(Gpt::new(tiny().with_n_layer(0)).is_err());
    }

    #[test]
    fn config_serde_and_overrides() {
        let cfg = GptConfig::preset("gpt2").unwrap().with_n_layer(6).with_n_positions(256);
        let json = serde_json::to_string(&cfg).unwrap();
        let back: GptConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        // Epsilon defaults when absent, as in HF config files that omit it.
        let back: GptConfig =
            serde_json::from_str(r#"{"vocab_size":256,"n_positions":64,"n_embd":64,"n_layer":2,"n_head":4}"#).unwrap();
        assert_eq!(back, tiny());
        assert_eq!(Gpt::new(back).unwrap().name(), "gpt-tiny");
        assert!(Gpt::new(cfg).unwrap().name().starts_with("gpt(vocab=50257"));
    }

    #[test]
    fn init_follows_gpt2() {
        let model = Gpt::from_preset("gpt2").unwrap();
        let layers = model.layers();
        let specs = layers[1].params();
        let get = |n: &str| specs.iter().find(|p| p.name == n).unwrap().clone();
        assert_eq!(get("transformer.h.0.attn.c_attn.weight").init, Init::Normal { std: 0.02 });
        let proj = Init::Normal { std: 0.02 / 24f64.sqrt() };
        assert_eq!(get("transformer.h.0.attn.c_proj.weight").init, proj);
        assert_eq!(get("transformer.h.0.mlp.c_proj.weight").init, proj);
        assert_eq!(get("transformer.h.0.mlp.c_fc.bias").init, Init::Zeros);
        assert_eq!(get("transformer.h.0.ln_2.weight").init, Init::Ones);
        assert!(!get("transformer.h.0.ln_2.weight").weight_decay);
        assert!(get("transformer.h.0.mlp.c_fc.weight").weight_decay);
    }
}
