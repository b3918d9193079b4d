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
