//! The composition versions of brigade's ops: each is built from ordinary candle tensor ops, so
//! candle's autograd differentiates it with no custom backward code. They are deliberately
//! simple and slow (every line allocates a temporary) and they are the *CPU twins* the fused
//! kernels in this crate are tested against, and the baseline the benchmarks compare with.
//! They accept any float dtype and any device, which is why the public API falls back to them
//! for dtypes/devices the fused kernels do not cover (see the crate docs).
//!
//! Argument validation (ranks, shapes, pooling geometry) is shared with the fused path, so
//! both versions reject the same inputs with the same messages instead of panicking.

use candle_core::{DType, Result, Tensor, D};

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::check_layer_norm_args(x, weight, bias, eps)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// The dtype RMSNorm's statistics are taken in: f32 for half-precision inputs (as Hugging
/// Face's `LlamaRMSNorm`), the input's own otherwise.
fn rms_stats_dtype(dtype: DType) -> DType {
    if crate::is_half(dtype) {
        DType::F32
    } else {
        dtype
    }
}

/// The normalised input `x / rms(x)` (before the gain) and `1 / rms(x)` per row, both in
/// [`rms_stats_dtype`].
fn rms_normalise(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(rms_stats_dtype(x.dtype()))?;
    // eps inside the square root, as in every Llama implementation.
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((x.broadcast_mul(&inv_rms)?, inv_rms))
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    crate::check_rms_norm_args(x, weight, eps)?;
    let (normed, _) = rms_normalise(x, eps)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(weight)
}

/// The explicit backward of [`rms_norm`]: `(dx, dweight)`, with `n = x / rms(x)` and
/// `g = dy · weight`, `dx = (g − n · mean(g · n)) / rms(x)` and `dweight = Σ_rows dy · n`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    crate::check_rms_norm_args(x, weight, eps)?;
    let stats = rms_stats_dtype(x.dtype());
    let (normed, inv_rms) = rms_normalise(x, eps)?;
    let g = dy.to_dtype(stats)?.broadcast_mul(&weight.to_dtype(stats)?)?;
    let dot = (&g * &normed)?.mean_keepdim(D::Minus1)?;
    let dx = (g - normed.broadcast_mul(&dot)?)?.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
    let c = normed.dim(D::Minus1)?;
    // In the compute dtype, as the forward's product of the rounded normalised input and gain.
    let n_rounded = normed.to_dtype(x.dtype())?;
    let dweight = crate::sum_rows(&(dy * n_rounded)?.reshape(((), c))?)?;
    Ok((dx, dweight))
}

/// `[a, b]` → `[−b, a]` over the last dimension's halves.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (a, b) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    Tensor::cat(&[&b.neg()?, &a], D::Minus1)
}

/// `(T, D)` tables → `(1, T, 1, D)` in `dtype`, to broadcast over `(B, T, H, D)`.
fn rope_tables(cos: &Tensor, sin: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let shape = |m: &Tensor| m.to_dtype(dtype)?.unsqueeze(0)?.unsqueeze(2);
    Ok((shape(cos)?, shape(sin)?))
}

/// Rotary position embeddings (`rotate_half` convention): `x · cos + rotate_half(x) · sin` for
/// `x` `(B, T, H, D)` and tables `(T, D)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::check_rope_args(x, cos, sin)?;
    let (cos, sin) = rope_tables(cos, sin, x.dtype())?;
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

/// The explicit backward of [`rope`]: the rotation is orthogonal and `rotate_half`'s transpose
/// is its negation, so `dx = dy · cos − rotate_half(dy · sin)`.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::check_rope_args(dy, cos, sin)?;
    let (cos, sin) = rope_tables(cos, sin, dy.dtype())?;
    dy.broadcast_mul(&cos)? - rotate_half(&dy.broadcast_mul(&sin)?)?
}

/// SwiGLU's activation: `[gate | up]` `(..., 2F)` → `silu(gate) · up` `(..., F)`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let f = crate::check_swiglu_args(gate_up)?;
    gate_up.narrow(D::Minus1, 0, f)?.silu()? * gate_up.narrow(D::Minus1, f, f)?
}

/// The explicit backward of [`swiglu`]: `[dgate | dup]` from `gate_up` and the output gradient
/// `dact`, with `silu'(g) = σ(g) (1 + g (1 − σ(g)))`.
pub fn swiglu_backward(gate_up: &Tensor, dact: &Tensor) -> Result<Tensor> {
    let f = crate::check_swiglu_args(gate_up)?;
    let (gate, up) = (gate_up.narrow(D::Minus1, 0, f)?, gate_up.narrow(D::Minus1, f, f)?);
    let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
    let dup = (dact * (&gate * &sigmoid)?)?;
    let dsilu = (&sigmoid * ((&gate * (1.0 - &sigmoid)?)? + 1.0)?)?;
    let dgate = ((dact * up)? * dsilu)?;
    Tensor::cat(&[&dgate, &dup], D::Minus1)
}

/// Row `r` of `x` viewed as `(rows, S)` keeps columns `0..=r % S`; the rest become `fill`.
fn causal_rows(x: &Tensor, fill: f32) -> Result<Tensor> {
    let s = x.dim(D::Minus1)?;
    let rows = x.elem_count() / s.max(1);
    let keep: Vec<u8> = (0..rows).flat_map(|r| (0..s).map(move |j| u8::from(j <= r % s))).collect();
    let keep = Tensor::from_vec(keep, x.shape(), x.device())?;
    let fill = Tensor::new(fill, x.device())?.to_dtype(x.dtype())?.broadcast_as(x.shape())?;
    keep.where_cond(x, &fill)
}

/// Causal softmax of scaled scores (see `brigade_kernels::causal_softmax`): scale, mask the
/// keys past each row's position with `-inf` (replaced, so their gradient is exactly zero),
/// softmax.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    crate::check_rank_at_least_1("causal_softmax", scores)?;
    softmax_last_dim(&causal_rows(&(scores * scale)?, f32::NEG_INFINITY)?)
}

/// The explicit backward of [`causal_softmax`]: `scale · P ⊙ (dP − rowsum(dP ⊙ P))` (masked
/// entries have `P = 0`).
pub fn causal_softmax_backward(probs: &Tensor, dprobs: &Tensor, scale: f64) -> Result<Tensor> {
    crate::check_rank_at_least_1("causal_softmax_backward", probs)?;
    let s = (dprobs * probs)?.sum_keepdim(D::Minus1)?;
    (probs * dprobs.broadcast_sub(&s)?)? * scale
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::check_rank_at_least_1("softmax_last_dim", x)?;
    // The max only shifts for numerical safety; detaching it keeps the gradient exact.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::check_rank_at_least_1("log_softmax_last_dim", x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Summed cross-entropy of `logits` `(N, V)` against class ids `targets` `(N,)`.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    crate::check_cross_entropy_args(logits, targets)?;
    let targets = targets.to_dtype(DType::U32)?;
    let v = logits.dim(1)? as u32;
    // gather does not bounds-check on every backend; check here so a bad id is an error.
    if let Some((row, &id)) = targets.to_vec1::<u32>()?.iter().enumerate().find(|(_, &t)| t >= v) {
        candle_core::bail!("cross_entropy_sum: target id {id} at row {row} is out of range for {v} classes")
    }
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.sum_all()?.neg()
}

/// GELU with the tanh approximation, differentiated by candle's built-in `gelu` backward.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// 2-D max pooling over `(N, C, H, W)` with padding (padded cells never win), built from
/// `index_select` + `maximum`. Ties split the gradient the way candle's `maximum` does, which
/// differs from PyTorch; the fused version follows PyTorch (first max wins).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (out_h, out_w) = crate::check_max_pool_args(x, kernel, stride, padding)?;
    // index_select needs a dense input.
    let x = x.contiguous()?;
    let x = if padding > 0 { pad_const(&x, padding, -1e30f64)? } else { x };
    let mut out: Option<Tensor> = None;
    for di in 0..kernel {
        let rows: Vec<u32> = (0..out_h).map(|i| (i * stride + di) as u32).collect();
        let rows = Tensor::new(rows.as_slice(), x.device())?;
        let xr = x.index_select(&rows, 2)?;
        for dj in 0..kernel {
            let cols: Vec<u32> = (0..out_w).map(|j| (j * stride + dj) as u32).collect();
            let cols = Tensor::new(cols.as_slice(), x.device())?;
            let window = xr.index_select(&cols, 3)?;
            out = Some(match out {
                None => window,
                Some(acc) => acc.maximum(&window)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max_pool2d: kernel must be at least 1".into()))
}

fn pad_const(x: &Tensor, padding: usize, value: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let side = Tensor::full(value as f32, (n, c, h, padding), x.device())?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&side, x, &side], 3)?;
    let w2 = w + 2 * padding;
    let top = Tensor::full(value as f32, (n, c, padding, w2), x.device())?.to_dtype(x.dtype())?;
    Tensor::cat(&[&top, &x, &top], 2)
}

/// Causal self-attention from the fused projection `qkv` `(B, T, 3C)` (queries, keys, values
/// side by side, each split into `n_head` heads of width `C / n_head`), scaled by
/// `1 / sqrt(head width)`. Returns `(merged, probs)`: the heads' outputs merged back to
/// `(B, T, C)`, and the attention probabilities `(B, H, T, T)` (zero above the diagonal).
pub fn causal_attention(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    let (b, t, c) = crate::attention::check_qkv(qkv, n_head)?;
    let d = c / n_head;
    let (q, k, v) = split_heads(qkv, n_head)?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (B, H, T, T)
                                                                    // Masked scores are replaced (not added to) so their gradient is exactly zero; the diagonal
                                                                    // is never masked, so every row keeps a finite max.
    let keep: Vec<u8> = (0..t).flat_map(|i| (0..t).map(move |j| u8::from(j <= i))).collect();
    let keep = Tensor::from_vec(keep, (t, t), qkv.device())?.broadcast_as(scores.shape())?;
    let neg_inf =
        Tensor::new(f32::NEG_INFINITY, qkv.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
    let probs = softmax_last_dim(&keep.where_cond(&scores, &neg_inf)?)?;
    let merged = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
    Ok((merged, probs))
}

/// The explicit backward of [`causal_attention`]: `dqkv` `(B, T, 3C)` from the saved `qkv`,
/// the probabilities and the gradient of the merged output.
pub fn causal_attention_backward(qkv: &Tensor, probs: &Tensor, dmerged: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, t, c) = crate::attention::check_qkv(qkv, n_head)?;
    let d = c / n_head;
    let (q, k, v) = split_heads(qkv, n_head)?;
    let dy = dmerged.reshape((b, t, n_head, d))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
    let dprobs = dy.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(&dy)?;
    // softmax backward: P ⊙ (dP − rowsum(dP ⊙ P)); masked entries have P = 0.
    let s = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = ((probs * dprobs.broadcast_sub(&s)?)? * (1.0 / (d as f64).sqrt()))?;
    let dq = dscores.matmul(&k)?;
    let dk = dscores.t()?.matmul(&q)?;
    let merge = |g: Tensor| g.transpose(1, 2)?.reshape((b, t, c));
    Tensor::cat(&[merge(dq)?, merge(dk)?, merge(dv)?], 2)
}

/// `(B, T, 3C)` → three contiguous `(B, H, T, D)` head tensors.
pub(crate) fn split_heads(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let split = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * c, c)?.reshape((b, t, n_head, c / n_head))?.transpose(1, 2)?.contiguous()
    };
    Ok((split(0)?, split(1)?, split(2)?))
}
