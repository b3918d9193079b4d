//! brigade's hot-path ops, each differentiable through candle's autograd.
//!
//! candle-nn's fused `LayerNorm`, `RmsNorm` and `softmax_last_dim` have no backward pass, and
//! candle's `max_pool2d` only differentiates when kernel == stride. Models in brigade call the
//! functions here instead. Every op has a CPU implementation (the reference "twin" for any
//! future CUDA kernel) and a gradient checked against finite differences in the tests.

use candle_core::{DType, Result, Tensor, D};

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// # Shapes
/// - `x`: `(..., C)`, `weight` and `bias`: `(C,)`; returns the shape of `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // The max only shifts for numerical safety; detaching it keeps the gradient exact.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Summed (not averaged) cross-entropy of `logits` `(N, V)` against class ids `targets` `(N,)`
/// (u32). Returns a scalar. Summing lets the pipeline divide by the *global* batch size, so the
/// loss does not depend on how the batch is split into micro-batches.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    picked.sum_all()?.neg()
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// 2-D max pooling over `(N, C, H, W)` with padding (padded cells never win), as torchvision's
/// ResNet stem uses (kernel 3, stride 2, padding 1).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_n, _c, h, w) = x.dims4()?;
    let x = if padding > 0 {
        let pad_value = -1e30f64;
        pad_const(x, padding, pad_value)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    let out_h = (hp - kernel) / stride + 1;
    let out_w = (wp - kernel) / stride + 1;
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
