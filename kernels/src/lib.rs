//! brigade's hot-path ops, each differentiable through candle's autograd.
//!
//! candle-nn's fused `LayerNorm`, `RmsNorm` and `softmax_last_dim` have no backward pass, and
//! candle's `max_pool2d` only differentiates when kernel == stride. Models in brigade call the
//! functions here instead.
//!
//! Each op is a fused CPU kernel registered as a candle custom op (`CustomOp1/2/3`) whose
//! `bwd` applies a second, fused backward custom op — one pass over memory where the
//! composition makes a temporary per elementary op. [`reference`](mod@reference) keeps the composition
//! versions: they are the CPU twins every fused kernel is tested against (values and
//! gradients), the finite-difference tests check both, and the benchmarks use them as the
//! baseline.
//!
//! # Dtypes and devices
//! The fused kernels run for **f32 and f64 tensors on the CPU**. Any other dtype (bf16, f16)
//! or device (CUDA, Metal) transparently falls back to the [`reference`](mod@reference) composition, which is
//! slower but correct and differentiable everywhere; a future CUDA kernel slots in as the
//! custom ops' `cuda_fwd`. Argument validation is shared, so both paths reject the same inputs
//! with the same error messages.
//!
//! # Llama's ops
//! [`rms_norm`], [`rope`] and [`swiglu`] come with explicit backwards ([`rms_norm_backward`],
//! ...), as the Llama layers own theirs: fused CPU kernels (`rms_norm.rs`, `rope.rs`,
//! `swiglu.rs`, split over the stage's rayon pool) and CUDA kernels for f32/bf16, with the
//! [`reference`](mod@reference) compositions as their twins. Inputs recording an autograd graph
//! take the composition, which candle differentiates.
//!
//! # Attention and the optimizer
//! [`causal_attention`] keeps the `(B, H, T, T)` probabilities for its backward (fused CPU
//! kernel; on CUDA batched products around a fused scale-mask-softmax). [`flash_attention`]
//! keeps only each row's log-sum-exp and recomputes the probabilities in its backward
//! ([`flash`]: CPU twin, and CUDA kernels for head widths up to 64). [`adamw::step_many`]
//! updates many f32 parameters and their AdamW moments in place, in one CUDA launch on a GPU.
//!
//! # Limits
//! Gradients are first order: the backward ops are applied without autograd, so
//! differentiating a gradient through a fused op is not supported.

pub mod adamw;
mod attention;
mod backward;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flash;
mod gelu;
mod gemm;
mod grouped_attention;
mod layer_norm;
mod linear;
mod max_pool;
pub mod reference;
mod rms_norm;
mod rope;
mod softmax;
mod sum_squares;
mod swiglu;
mod transpose;
pub mod vmath;

use candle_core::{bail, DType, Result, Tensor};

pub use gemm::{conv2d, matmul, stage_threads};
pub use sum_squares::sum_squares;
pub use transpose::transpose_2d;

pub use backward::{
    accumulate, add, cross_entropy_sum_backward, gelu_tanh_backward, index_add_rows, layer_norm_backward,
    layer_norm_backward_residual, matmul_accumulate, max_pool2d_backward, softmax_last_dim_backward, sum_rows,
};

/// Whether `t` can take the fused CPU kernels (see the crate docs).
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Whether `t` runs an op that has both kernels (LayerNorm, softmax, cross-entropy, GELU and
/// their backwards): the fused CPU kernels, or with the `cuda` feature the CUDA kernels for
/// f32 and bf16 on a CUDA device.
fn kernel_device(t: &Tensor) -> bool {
    fused(t) || (cfg!(feature = "cuda") && t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16))
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The CUDA kernels read dense rows: a CUDA tensor is made contiguous (free when it already
/// is); CPU tensors pass as they are (the CPU kernels read any layout).
pub(crate) fn dense_on_gpu(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cuda() {
        t.contiguous()
    } else {
        Ok(t.clone())
    }
}

/// Causal self-attention from the fused projection `qkv` `(B, T, 3C)`; returns `(merged
/// (B, T, C), probs (B, H, T, T))` (see [`reference::causal_attention`] for the math). Not
/// differentiable through autograd: the pipeline pairs it with
/// [`causal_attention_backward`]; the composition in [`reference`](mod@reference) is the autograd path.
pub fn causal_attention(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    attention::check_qkv(qkv, n_head)?;
    if fused(qkv) {
        attention::causal_attention_cpu(qkv, n_head)
    } else if kernel_device(qkv) {
        attention::batched_forward(qkv, n_head)
    } else {
        reference::causal_attention(qkv, n_head)
    }
}

/// [`causal_attention`] by the GPU's algorithm on any device with the kernels: batched
/// products around a fused scale-mask-softmax. Public so that its CPU twin is testable.
pub fn causal_attention_batched(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    attention::check_qkv(qkv, n_head)?;
    if !kernel_device(qkv) {
        bail!("causal_attention_batched: no kernels for {:?} on {:?}", qkv.dtype(), qkv.device().location())
    }
    attention::batched_forward(qkv, n_head)
}

/// The backward of [`causal_attention_batched`] (same contract as [`causal_attention_backward`]).
pub fn causal_attention_batched_backward(
    qkv: &Tensor,
    probs: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    attention::check_qkv(qkv, n_head)?;
    if !kernel_device(qkv) {
        bail!("causal_attention_batched_backward: no kernels for {:?} on {:?}", qkv.dtype(), qkv.device().location())
    }
    attention::batched_backward(qkv, probs, dmerged, n_head)
}

/// The backward of [`causal_attention`]: `dqkv` `(B, T, 3C)` from the saved `qkv`, the
/// probabilities it returned and the gradient of its merged output `(B, T, C)`.
pub fn causal_attention_backward(qkv: &Tensor, probs: &Tensor, dmerged: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, t, c) = attention::check_qkv(qkv, n_head)?;
    if probs.dims() != [b, n_head, t, t] || dmerged.dims() != [b, t, c] {
        bail!(
            "causal_attention_backward: probs {:?} and dmerged {:?} must be ({b}, {n_head}, {t}, {t}) and ({b}, {t}, {c}) for qkv {:?}",
            probs.dims(),
            dmerged.dims(),
            qkv.dims()
        )
    }
    if probs.dtype() != qkv.dtype() || dmerged.dtype() != qkv.dtype() {
        bail!("causal_attention_backward: qkv, probs and dmerged must share a dtype")
    }
    if fused(qkv) && probs.device().is_cpu() && dmerged.device().is_cpu() {
        attention::causal_attention_backward_cpu(qkv, probs, dmerged, n_head)
    } else if kernel_device(qkv) {
        attention::batched_backward(qkv, probs, dmerged, n_head)
    } else {
        reference::causal_attention_backward(qkv, probs, dmerged, n_head)
    }
}

/// Causal self-attention by FlashAttention-2 (see [`flash`]): `(merged (B, T, C), lse (B, H,
/// T))`, where `lse` is each query row's log-sum-exp of its scaled scores (f32, or f64 for f64
/// inputs) and no `T×T` matrix is ever stored. Its backward is
/// [`flash_attention_backward`]; `merged` equals [`causal_attention`]'s.
///
/// Runs on the CPU for f32/f64 and, with the `cuda` feature, on a CUDA device for f32/bf16;
/// other dtypes and devices are an error (use [`causal_attention`]).
pub fn flash_attention(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    attention::check_qkv(qkv, n_head)?;
    if fused(qkv) {
        return flash::flash_attention_cpu(qkv, n_head);
    }
    #[cfg(feature = "cuda")]
    if kernel_device(qkv) {
        return cuda::flash_attention(&qkv.contiguous()?, n_head);
    }
    bail!("flash_attention: no kernels for {:?} on {:?}", qkv.dtype(), qkv.device().location())
}

/// The backward of [`flash_attention`]: `dqkv (B, T, 3C)` from the saved `qkv`, its outputs
/// `merged` and `lse`, and the gradient of `merged`.
pub fn flash_attention_backward(
    qkv: &Tensor,
    merged: &Tensor,
    lse: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    flash::check_backward(qkv, merged, lse, dmerged, n_head)?;
    if fused(qkv) {
        return flash::flash_attention_backward_cpu(qkv, merged, lse, dmerged, n_head);
    }
    #[cfg(feature = "cuda")]
    if kernel_device(qkv) {
        let c = |t: &Tensor| t.contiguous();
        return cuda::flash_attention_backward(&c(qkv)?, &c(merged)?, &c(lse)?, &c(dmerged)?, n_head);
    }
    bail!("flash_attention_backward: no kernels for {:?} on {:?}", qkv.dtype(), qkv.device().location())
}

/// What causal attention's forward keeps for its backward, by algorithm.
#[derive(Clone, Debug)]
pub enum AttentionSaved {
    /// The `(B, H, T, T)` probabilities ([`causal_attention`]).
    Probs(Tensor),
    /// Each query row's log-sum-exp, `(B, H, T)` ([`flash_attention`]); its backward also
    /// reads the forward's output.
    LogSumExp(Tensor),
}

impl AttentionSaved {
    /// The saved tensor (for memory accounting and activation handles).
    pub fn tensor(&self) -> &Tensor {
        match self {
            AttentionSaved::Probs(t) | AttentionSaved::LogSumExp(t) => t,
        }
    }
}

/// The shortest sequence [`causal_attention_saving`] runs by flash attention (CPU and CUDA).
pub const FLASH_MIN_SEQUENCE: usize = 256;

/// The algorithm [`causal_attention_saving`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionAlgorithm {
    /// [`flash_attention`]: keeps each row's log-sum-exp, recomputes the probabilities.
    Flash,
    /// [`causal_attention`]: keeps the `(B, H, T, T)` probabilities.
    Materialised,
}

/// The one place the attention algorithm is chosen, for `qkv` `(B, T, 3C)` with `n_head`
/// heads, by the same rule on every device with flash kernels:
/// - `T >= FLASH_MIN_SEQUENCE` on the CPU in f32/f64: [`flash_attention`]. Alone it measured as
///   fast as the materialised kernel at B=16 T=128 C=256 and 1.4-1.7x faster at B=2 T=1024
///   C=768 (`cargo bench -p brigade-kernels --bench attention_cpu`); in GPT-2 124M's blocks
///   (`brigade profile`, T=1024, one example, one thread) forward 4.65 → 3.97 s and backward
///   8.91 → 7.86 s, saved activations 97.5 → 47.2 MB per block. In training at T=128 (the
///   side-by-side GPT, 3 alternating rounds of `train`) it was 0-6% slower (2-stage 1F1B 0.592
///   vs 0.558 s, 1 thread 1.009 vs 0.973 s), where the probabilities are small anyway: shorter
///   sequences keep the materialised kernel;
/// - `T >= FLASH_MIN_SEQUENCE` on CUDA in f32/bf16, where the CUDA flash kernels take the head
///   width (up to 64) and `B·H` (the grid): [`flash_attention`], by the CPU's threshold. It
///   saves the `(B, H, T, T)` probabilities (GPT-2 124M at B=8 T=1024: 201 MB per block in
///   f32) and their softmax pass; its speed against cuBLAS's batched products is still to be
///   measured on a GPU (`brigade kernels-bench --device cuda`, benches/gpu-check.sh);
/// - anything else: [`causal_attention`] (on CUDA batched products on cuBLAS's tensor cores).
///
/// On a GPU each distinct choice is written to stderr once per process (`attention: ...`), so
/// a run's log says what it trained with.
pub fn attention_algorithm(qkv: &Tensor, n_head: usize) -> AttentionAlgorithm {
    let (b, t, c) = match qkv.dims() {
        &[b, t, c3] => (b, t, c3 / 3),
        _ => return AttentionAlgorithm::Materialised,
    };
    let long = t >= FLASH_MIN_SEQUENCE;
    if fused(qkv) {
        return if long { AttentionAlgorithm::Flash } else { AttentionAlgorithm::Materialised };
    }
    #[cfg(feature = "cuda")]
    if kernel_device(qkv) {
        let head_dim = c.checked_div(n_head).unwrap_or(0);
        let fits = head_dim > 0 && head_dim <= cuda::FLASH_MAX_HEAD_DIM && b * n_head <= 65_535;
        let algorithm = if long && fits { AttentionAlgorithm::Flash } else { AttentionAlgorithm::Materialised };
        log_choice_once(format!(
            "attention: {algorithm:?} on {:?} {:?} (T={t}, head width {head_dim}; flash from T={FLASH_MIN_SEQUENCE}, \
             head width <= {})",
            qkv.device().location(),
            qkv.dtype(),
            cuda::FLASH_MAX_HEAD_DIM
        ));
        return algorithm;
    }
    let _ = (b, c, n_head, long);
    AttentionAlgorithm::Materialised
}

/// Writes `line` to stderr the first time it is seen in this process.
#[cfg(feature = "cuda")]
fn log_choice_once(line: String) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if !seen.contains(&line) {
        eprintln!("{line}");
        seen.push(line);
    }
}

/// Causal attention by the algorithm [`attention_algorithm`] chooses for `qkv`, returning
/// `(merged (B, T, C), saved)` for [`causal_attention_saved_backward`].
pub fn causal_attention_saving(qkv: &Tensor, n_head: usize) -> Result<(Tensor, AttentionSaved)> {
    attention::check_qkv(qkv, n_head)?;
    if attention_algorithm(qkv, n_head) == AttentionAlgorithm::Flash {
        let (merged, lse) = flash_attention(qkv, n_head)?;
        return Ok((merged, AttentionSaved::LogSumExp(lse)));
    }
    let (merged, probs) = causal_attention(qkv, n_head)?;
    Ok((merged, AttentionSaved::Probs(probs)))
}

/// The backward of [`causal_attention_saving`]: `dqkv (B, T, 3C)` from the saved `qkv`, the
/// forward's output `merged`, what it saved and the gradient of `merged`.
pub fn causal_attention_saved_backward(
    qkv: &Tensor,
    merged: &Tensor,
    saved: &AttentionSaved,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    match saved {
        AttentionSaved::Probs(p) => causal_attention_backward(qkv, p, dmerged, n_head),
        AttentionSaved::LogSumExp(lse) => flash_attention_backward(qkv, merged, lse, dmerged, n_head),
    }
}

/// A linear layer's product: `x · w (+ bias) (+ residual)` for `x` `(M, K)`, `w` `(K, N)`, `bias`
/// `(N,)` and `residual` `(M, N)`, in one gemm call writing one output (see `linear.rs`).
/// Operands may be strided (`w.t()` is read in place). When any input is recording an autograd
/// graph, or off the fused dtypes/devices, it is the plain composition (differentiable).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    if !check_linear(x, w, bias, residual)? {
        let mut y = matmul(x, w)?;
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(r) = residual {
            y = (y + r)?;
        }
        return Ok(y);
    }
    linear::linear_cpu(x, w, bias, residual)
}

/// The MLP's first projection and its activation: `(pre, gelu_tanh(pre))` for
/// `pre = x · w + bias` (shapes as in [`linear`]). On the fused path one gemm writes `pre` and
/// one pass per row adds the bias and writes the GELU (see `linear.rs`); `pre` is
/// [`linear`]'s result and the activation is [`gelu_tanh`]'s of it. Tracked or off the fused
/// dtypes/devices, it is that composition (differentiable).
pub fn linear_gelu(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
    if !check_linear(x, w, Some(bias), None)? {
        let pre = linear(x, w, Some(bias), None)?;
        let act = gelu_tanh(&pre)?;
        return Ok((pre, act));
    }
    linear::linear_gelu_cpu(x, w, bias)
}

/// The input gradient through a projection into [`linear_gelu`]'s activation, back to the
/// pre-activation: `gelu_tanh_backward(pre, dy · w)` for `dy` `(M, K)`, `w` `(K, N)` (a
/// transposed weight, read in place) and `pre` `(M, N)`. On the fused path the GELU backward
/// runs in place over the product's buffer (see `linear.rs`), with the same values as the
/// composition, which it is when tracked or off the fused dtypes/devices.
pub fn linear_gelu_backward(dy: &Tensor, w: &Tensor, pre: &Tensor) -> Result<Tensor> {
    let (m, n) = (dy.dims2()?.0, w.dims2()?.1);
    if pre.dims() != [m, n] {
        bail!("linear_gelu_backward: pre must have shape ({m}, {n}), got {:?}", pre.dims())
    }
    if pre.dtype() != dy.dtype() {
        bail!("linear_gelu_backward: dy, w and pre must share a dtype")
    }
    if !check_linear(dy, w, None, None)? || pre.track_op() || !fused(pre) {
        return gelu_tanh_backward(pre, &linear(dy, w, None, None)?);
    }
    linear::linear_gelu_backward_cpu(dy, w, pre)
}

/// Checks [`linear`]'s arguments; returns whether they take the fused CPU path (all untracked,
/// on the fused dtypes and device) rather than the composition.
fn check_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<bool> {
    let ((m, k), (k2, n)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        bail!("linear: x {:?} and w {:?} do not chain", x.dims(), w.dims())
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            bail!("linear: bias must have shape ({n},), got {:?}", b.dims())
        }
    }
    if let Some(r) = residual {
        if r.dims() != [m, n] {
            bail!("linear: residual must have shape ({m}, {n}), got {:?}", r.dims())
        }
    }
    let all = [Some(x), Some(w), bias, residual];
    let all = all.iter().flatten();
    if all.clone().any(|t| t.dtype() != x.dtype()) {
        bail!("linear: x, w, bias and residual must share a dtype")
    }
    Ok(!all.clone().any(|t| t.track_op() || !fused(t)))
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// # Shapes
/// - `x`: `(..., C)`, `weight` and `bias`: `(C,)`; returns the shape of `x`.
///
/// `x` may be non-contiguous (e.g. transposed). `eps` must be finite and >= 0.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_layer_norm_args(x, weight, bias, eps)?;
    if !kernel_device(x) {
        return reference::layer_norm(x, weight, bias, eps);
    }
    dense_on_gpu(x)?.apply_op3(&dense_on_gpu(weight)?, &dense_on_gpu(bias)?, layer_norm::LayerNorm { eps })
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_rank_at_least_1("softmax_last_dim", x)?;
    if !kernel_device(x) {
        return reference::softmax_last_dim(x);
    }
    dense_on_gpu(x)?.apply_op1(softmax::Softmax { log: false })
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_rank_at_least_1("log_softmax_last_dim", x)?;
    if !kernel_device(x) {
        return reference::log_softmax_last_dim(x);
    }
    dense_on_gpu(x)?.apply_op1(softmax::Softmax { log: true })
}

/// Summed (not averaged) cross-entropy of `logits` `(N, V)` against class ids `targets` `(N,)`
/// (u32; other integer dtypes are converted). Returns a scalar. Summing lets the pipeline
/// divide by the *global* batch size, so the loss does not depend on how the batch is split
/// into micro-batches. A target id >= V is an error naming the id.
///
/// Half-precision (bf16/f16) logits give an **f32** loss: the log-sum-exp and the sum are taken
/// in f32. The CUDA kernel reads bf16 logits as they are (no f32 copy of the `(N, V)` logits,
/// 1.6 GB at GPT-2's vocabulary and 8 × 1024 positions); elsewhere they are widened first.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_cross_entropy_args(logits, targets)?;
    if !kernel_device(logits) {
        if is_half(logits.dtype()) {
            return cross_entropy_sum(&logits.to_dtype(DType::F32)?, targets);
        }
        return reference::cross_entropy_sum(logits, targets);
    }
    let targets = dense_on_gpu(&targets.to_dtype(DType::U32)?)?;
    dense_on_gpu(logits)?.apply_op2(&targets, cross_entropy::CrossEntropySum)
}

/// The summed cross-entropy of `logits` `(N, V)` against `targets` `(N,)` and its gradient
/// `scale · (softmax(logits) − onehot(targets))`, as `(loss, dlogits)`: the loss an f64 scalar
/// (the row losses summed in f64, before any rounding to the logits' dtype), the gradient in
/// the logits' dtype and shape.
///
/// On the fused CPU kernels (f32/f64, contiguous logits) the gradient is written **over
/// `logits`** in one pass that also takes the loss: the caller hands over a tensor it owns and
/// no longer needs (a language-model head's chunk of logits). The returned gradient shares its
/// storage. Elsewhere it is [`cross_entropy_sum`] and [`cross_entropy_sum_backward`], with
/// `logits` left as it was.
pub fn cross_entropy_sum_with_grad_in_place(logits: Tensor, targets: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    check_cross_entropy_args(&logits, targets)?;
    if !fused(&logits) || !logits.is_contiguous() {
        let loss = cross_entropy_sum(&logits, targets)?.to_dtype(DType::F64)?;
        let grad = cross_entropy_sum_backward(&logits, targets, scale)?;
        return Ok((loss, grad));
    }
    let targets = targets.to_dtype(DType::U32)?;
    let op = cross_entropy::CrossEntropySumGradInPlace { scale, loss: std::sync::Mutex::new(None) };
    logits.inplace_op2(&targets, &op)?;
    let loss = op.loss.into_inner().ok().flatten().ok_or_else(|| {
        candle_core::Error::Msg("cross_entropy_sum_with_grad_in_place: the kernel returned no loss".into())
    })?;
    Ok((Tensor::new(loss, logits.device())?, logits))
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !kernel_device(x) {
        return reference::gelu_tanh(x);
    }
    dense_on_gpu(x)?.apply_op1(gelu::GeluTanh)
}

/// 2-D max pooling over `(N, C, H, W)` with padding (padded cells never win), as torchvision's
/// ResNet stem uses (kernel 3, stride 2, padding 1). Output size is floor mode,
/// `(H + 2 * padding - kernel) / stride + 1`. Gradient ties go to the first maximum in
/// row-major window order, like PyTorch.
///
/// Errors unless `x` has rank 4 with non-empty H and W, `kernel >= 1`, `stride >= 1`,
/// `padding <= kernel / 2` (PyTorch's rule; it keeps every window over at least one real
/// cell) and `kernel` fits in the padded input.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (out_h, out_w) = check_max_pool_args(x, kernel, stride, padding)?;
    if !fused(x) {
        return reference::max_pool2d(x, kernel, stride, padding);
    }
    x.apply_op1(max_pool::MaxPool2d { kernel, stride, padding, out_h, out_w })
}

// ---- Llama's ops: RMSNorm, RoPE, SwiGLU --------------------------------------------------------
//
// Each has an explicit backward (the Llama layers own theirs). The kernels run when every input
// is outside an autograd graph and on a kernel device (f32/f64 on the CPU; with the `cuda`
// feature f32/bf16 on a GPU); anything else (bf16 on the CPU, inputs recording a graph) takes
// the `reference` composition, which autograd differentiates, so the layers' explicit backward
// is checked against a different computation than its own.

/// Whether every tensor in `ts` can take a kernel with no autograd graph to record.
fn kernel_untracked(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| kernel_device(t) && !t.track_op())
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · weight`, the statistics in f32
/// for bf16/f16 inputs (as Hugging Face's `LlamaRMSNorm`).
///
/// # Shapes
/// - `x`: `(..., C)`, `weight`: `(C,)`; returns the shape of `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_rms_norm_args(x, weight, eps)?;
    if !kernel_untracked(&[x, weight]) {
        return reference::rms_norm(x, weight, eps);
    }
    dense_on_gpu(x)?.apply_op2_no_bwd(&dense_on_gpu(weight)?, &rms_norm::RmsNorm { eps })
}

/// The backward of [`rms_norm`]: `(dx, dweight)` for the output gradient `dy`, recomputing the
/// statistics from `x`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check_rms_norm_args(x, weight, eps)?;
    if dy.dims() != x.dims() || dy.dtype() != x.dtype() {
        bail!("rms_norm_backward: dy {:?} {:?} must match x {:?} {:?}", dy.dims(), dy.dtype(), x.dims(), x.dtype())
    }
    if !kernel_untracked(&[x, weight, dy]) {
        return reference::rms_norm_backward(x, weight, dy, eps);
    }
    let packed =
        dense_on_gpu(x)?.apply_op3_no_bwd(&dense_on_gpu(weight)?, &dense_on_gpu(dy)?, &rms_norm::RmsNormBwd { eps })?;
    let (n, c) = (x.elem_count(), weight.elem_count());
    Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, packed.narrow(0, n, c)?))
}

/// Rotary position embeddings in Hugging Face's `rotate_half` convention:
/// `x · cos + rotate_half(x) · sin`, `rotate_half([a, b]) = [−b, a]` over the head's halves.
///
/// # Shapes
/// - `x`: `(B, T, H, D)` with `D` even; `cos`, `sin`: `(T, D)`, the tables of `x`'s positions
///   (any float dtype; they are converted to `x`'s). Returns the shape of `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_either(x, cos, sin, false)
}

/// The backward of [`rope`] (the transposed rotation): `dx = dy · cos − rotate_half(dy · sin)`.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_either(dy, cos, sin, true)
}

fn rope_either(x: &Tensor, cos: &Tensor, sin: &Tensor, transpose: bool) -> Result<Tensor> {
    check_rope_args(x, cos, sin)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    if !kernel_untracked(&[x, &cos, &sin]) {
        return if transpose { reference::rope_backward(x, &cos, &sin) } else { reference::rope(x, &cos, &sin) };
    }
    dense_on_gpu(x)?.apply_op3_no_bwd(&dense_on_gpu(&cos)?, &dense_on_gpu(&sin)?, &rope::Rope { transpose })
}

/// SwiGLU's activation from the gate and up projections' joint output: `[gate | up]`
/// `(..., 2F)` → `silu(gate) · up` `(..., F)`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    check_swiglu_args(gate_up)?;
    if !kernel_untracked(&[gate_up]) {
        return reference::swiglu(gate_up);
    }
    dense_on_gpu(gate_up)?.apply_op1_no_bwd(&swiglu::SwiGlu)
}

/// The backward of [`swiglu`]: `[dgate | dup]` `(..., 2F)` from the saved `gate_up` and the
/// gradient `dact` `(..., F)` of its output.
pub fn swiglu_backward(gate_up: &Tensor, dact: &Tensor) -> Result<Tensor> {
    let f = check_swiglu_args(gate_up)?;
    let mut want = gate_up.dims().to_vec();
    if let Some(last) = want.last_mut() {
        *last = f;
    }
    if dact.dims() != want || dact.dtype() != gate_up.dtype() {
        bail!("swiglu_backward: dact {:?} {:?} must be {want:?} {:?}", dact.dims(), dact.dtype(), gate_up.dtype())
    }
    if !kernel_untracked(&[gate_up, dact]) {
        return reference::swiglu_backward(gate_up, dact);
    }
    dense_on_gpu(gate_up)?.apply_op2_no_bwd(&dense_on_gpu(dact)?, &swiglu::SwiGluBwd)
}

/// Whether [`grouped_causal_attention`] runs for these operands: f32 or f64 CPU tensors that
/// candle's autograd does not track (the composition is the autograd path).
pub fn grouped_causal_attention_runs(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| fused(t) && !t.track_op())
}

/// Causal grouped-query attention with the heads read in place: rotated queries `q`
/// `(B, T, H, D)`, rotated keys `k` and values `v` `(B, T, KV, D)` (any layout whose last axis
/// is unit-stride, such as views of the fused projection), query head `i·G + j` reading k/v
/// head `i` (`G = H / KV`, Hugging Face's `repeat_kv` order), scores scaled by `1/√D`.
/// Returns `(merged (B, T, H·D), probs (B, H, T, T))`. CPU, f32 or f64
/// ([`grouped_causal_attention_runs`]); the pipeline pairs it with
/// [`grouped_causal_attention_backward`].
pub fn grouped_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = grouped_attention::check(q, k, v)?;
    grouped_attention::forward_cpu(g, q, k, v)
}

/// The backward of [`grouped_causal_attention`] from its saved operands, the probabilities it
/// returned and the gradient `dmerged` `(B, T, H·D)` of its output: the projections' gradient
/// `(B, T, (H + 2KV)·D)`, `[dq | dk | dv]` per position, with RoPE's backward (tables `cos`,
/// `sin` `(T, D)` of positions `0..T`) applied to `dq` and `dk`, as [`rope_backward`] would.
pub fn grouped_causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dmerged: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let g = grouped_attention::check(q, k, v)?;
    let (b, t, h, d) = (g.b, g.t, g.h, g.d);
    if probs.dims() != [b, h, t, t] || dmerged.dims() != [b, t, h * d] {
        bail!(
            "grouped_causal_attention_backward: probs {:?} and dmerged {:?} must be ({b}, {h}, {t}, {t}) and ({b}, {t}, {})",
            probs.dims(),
            dmerged.dims(),
            h * d
        )
    }
    if cos.dims() != [t, d] || sin.dims() != [t, d] {
        bail!("grouped_causal_attention_backward: tables must be ({t}, {d}), got {:?} and {:?}", cos.dims(), sin.dims())
    }
    let dtype = q.dtype();
    if probs.dtype() != dtype || dmerged.dtype() != dtype || !fused(probs) || !fused(dmerged) {
        bail!("grouped_causal_attention_backward: probs and dmerged must be {dtype:?} CPU tensors like q")
    }
    let (cos, sin) = (cos.to_dtype(dtype)?.to_device(q.device())?, sin.to_dtype(dtype)?.to_device(q.device())?);
    grouped_attention::backward_cpu(g, q, k, v, probs, dmerged, &cos, &sin)
}

/// Causal softmax of attention scores, scaled: each row of the last dimension `S`, counted over
/// all leading dimensions as `r`, sees keys `0..=r % S` (the rest come out 0). So `(B, H, T, T)`
/// scores, and grouped-query heads stacked as `(B, KV, G·T, T)`, are causal per head. One pass,
/// where scale, mask and softmax are three.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    check_rank_at_least_1("causal_softmax", scores)?;
    if !kernel_untracked(&[scores]) {
        return reference::causal_softmax(scores, scale);
    }
    dense_on_gpu(scores)?.apply_op1_no_bwd(&attention::CausalSoftmax { scale })
}

/// The backward of [`causal_softmax`] from its output: `scale · P ⊙ (dP − rowsum(dP ⊙ P))`.
pub fn causal_softmax_backward(probs: &Tensor, dprobs: &Tensor, scale: f64) -> Result<Tensor> {
    check_rank_at_least_1("causal_softmax_backward", probs)?;
    if probs.dims() != dprobs.dims() || probs.dtype() != dprobs.dtype() {
        bail!("causal_softmax_backward: probs {:?} and dprobs {:?} differ", probs.dims(), dprobs.dims())
    }
    if !kernel_untracked(&[probs, dprobs]) {
        return reference::causal_softmax_backward(probs, dprobs, scale);
    }
    dense_on_gpu(probs)?.apply_op2_no_bwd(&dense_on_gpu(dprobs)?, &attention::CausalSoftmaxBwd { scale })
}

// ---- argument validation, shared by the fused and the reference paths ----------------------

pub(crate) fn check_rms_norm_args(x: &Tensor, w: &Tensor, eps: f64) -> Result<()> {
    check_rank_at_least_1("rms_norm", x)?;
    let c = x.dims()[x.rank() - 1];
    if w.dims() != [c] {
        bail!("rms_norm: weight must have shape ({c},) to match x {:?}, got {:?}", x.shape(), w.shape())
    }
    if w.dtype() != x.dtype() || !x.dtype().is_float() {
        bail!("rms_norm: x and weight must share a float dtype, got {:?} and {:?}", x.dtype(), w.dtype())
    }
    if !(eps.is_finite() && eps > 0.0) {
        bail!("rms_norm: eps must be finite and > 0, got {eps}")
    }
    Ok(())
}

pub(crate) fn check_rope_args(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (t, d) = match x.dims() {
        &[_, t, _, d] => (t, d),
        dims => bail!("rope: x must have shape (B, T, H, D), got {dims:?}"),
    };
    if !d.is_multiple_of(2) {
        bail!("rope: the head width must be even, got {d}")
    }
    if cos.dims() != [t, d] || sin.dims() != [t, d] {
        bail!(
            "rope: cos and sin must have shape ({t}, {d}) to match x {:?}, got {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    if !x.dtype().is_float() || !cos.dtype().is_float() || !sin.dtype().is_float() {
        bail!("rope: x and the tables must be floats, got {:?}, {:?}, {:?}", x.dtype(), cos.dtype(), sin.dtype())
    }
    Ok(())
}

/// Checks `[gate | up]` and returns `F`, half its last dimension.
pub(crate) fn check_swiglu_args(gate_up: &Tensor) -> Result<usize> {
    check_rank_at_least_1("swiglu", gate_up)?;
    let w = gate_up.dims()[gate_up.rank() - 1];
    if !w.is_multiple_of(2) {
        bail!("swiglu: the last dimension holds [gate | up] and must be even, got {:?}", gate_up.dims())
    }
    if !gate_up.dtype().is_float() {
        bail!("swiglu: gate_up must be a float dtype, got {:?}", gate_up.dtype())
    }
    Ok(w / 2)
}

pub(crate) fn check_rank_at_least_1(op: &str, x: &Tensor) -> Result<()> {
    if x.rank() == 0 {
        bail!("{op}: expected a tensor of rank >= 1, got a scalar")
    }
    Ok(())
}

pub(crate) fn check_layer_norm_args(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<()> {
    check_rank_at_least_1("layer_norm", x)?;
    let c = x.dims()[x.rank() - 1];
    if w.dims() != [c] {
        bail!("layer_norm: weight must have shape ({c},) to match x {:?}, got {:?}", x.shape(), w.shape())
    }
    if b.dims() != [c] {
        bail!("layer_norm: bias must have shape ({c},) to match x {:?}, got {:?}", x.shape(), b.shape())
    }
    if w.dtype() != x.dtype() || b.dtype() != x.dtype() {
        bail!(
            "layer_norm: x, weight and bias must share a dtype, got {:?}, {:?}, {:?}",
            x.dtype(),
            w.dtype(),
            b.dtype()
        )
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("layer_norm: eps must be finite and >= 0, got {eps}")
    }
    Ok(())
}

pub(crate) fn check_cross_entropy_args(logits: &Tensor, targets: &Tensor) -> Result<()> {
    let (n, v) = match logits.dims() {
        &[n, v] => (n, v),
        d => bail!("cross_entropy_sum: logits must have shape (N, V), got {d:?}"),
    };
    if targets.dims() != [n] {
        bail!("cross_entropy_sum: targets must have shape ({n},) to match logits ({n}, {v}), got {:?}", targets.shape())
    }
    if !targets.dtype().is_int() {
        bail!("cross_entropy_sum: targets must be integer class ids, got dtype {:?}", targets.dtype())
    }
    if !logits.dtype().is_float() {
        bail!("cross_entropy_sum: logits must be a float dtype, got {:?}", logits.dtype())
    }
    Ok(())
}

/// Validates pooling geometry and returns the output `(height, width)`.
pub(crate) fn check_max_pool_args(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<(usize, usize)> {
    let (h, w) = match x.dims() {
        &[_, _, h, w] => (h, w),
        d => bail!("max_pool2d: x must have shape (N, C, H, W), got {d:?} (rank {})", d.len()),
    };
    if kernel == 0 {
        bail!("max_pool2d: kernel must be at least 1")
    }
    if stride == 0 {
        bail!("max_pool2d: stride must be at least 1")
    }
    if padding > kernel / 2 {
        bail!("max_pool2d: padding {padding} must be at most half the kernel ({kernel})")
    }
    if h == 0 || w == 0 {
        bail!("max_pool2d: input spatial size {h}x{w} is empty")
    }
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    if kernel > hp || kernel > wp {
        bail!("max_pool2d: kernel {kernel} is larger than the padded input {hp}x{wp}")
    }
    Ok(((hp - kernel) / stride + 1, (wp - kernel) / stride + 1))
}
