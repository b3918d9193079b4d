//! Rotary position embeddings (Su et al. 2021) in Hugging Face's `rotate_half` convention: the
//! head dimension's first half pairs with its second half (not even with odd entries), so
//! `rope(x) = x · cos + rotate_half(x) · sin` with `rotate_half([a, b]) = [−b, a]` and each
//! frequency repeated over both halves. Also Llama 3's frequency scaling, and the backward.
//! The rotation itself is `brigade_kernels::rope` (a fused CPU kernel, or its reference
//! composition); this file owns the tables.

use candle_core::{Device, Result, Tensor};

/// Llama 3's RoPE scaling (HF `rope_type: "llama3"`): long wavelengths are slowed by `factor`,
/// short ones kept, and the band between interpolated smoothly.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The rotation's inverse frequencies `theta^(−2i/d)` for `i < d/2`, scaled as Llama 3 does
/// when `scaling` is set (HF `_compute_llama3_parameters`).
pub(crate) fn inverse_frequencies(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f64> {
    // As in HF: the exponent and the power in f32.
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(exponent) as f64
        })
        .collect();
    let Some(s) = scaling else { return base };
    let old = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// The cos and sin tables of positions `0..positions`, each `(positions, head_dim)`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(crate) fn new(inv_freq: &[f64], positions: usize, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(positions * 2 * half), Vec::with_capacity(positions * 2 * half));
        for p in 0..positions {
            // The angle rounded to f32 first, as HF's f32 product of positions and frequencies.
            let angles: Vec<f64> = inv_freq.iter().map(|&f| (p as f32 * f as f32) as f64).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32));
                sin.extend(angles.iter().map(|a| a.sin() as f32));
            }
        }
        let shape = (positions, 2 * half);
        Ok(Self { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    pub(crate) fn positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// The tables of positions `offset..offset + t`, each `(t, D)`.
    pub(crate) fn tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?))
    }

    /// Rotates `x` `(B, T, H, D)` holding positions `offset..offset + T`.
    pub(crate) fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, x.dim(1)?)?;
        brigade_kernels::rope(x, &cos, &sin)
    }

    /// The input gradient: the rotation is orthogonal, and `rotate_half`'s transpose is its
    /// negation, so `dx = dy · cos − rotate_half(dy · sin)`.
    pub(crate) fn backward(&self, dy: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, dy.dim(1)?)?;
        brigade_kernels::rope_backward(dy, &cos, &sin)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    #[test]
    fn backward_matches_autograd_and_rotation_keeps_norms() {
        let dev = Device::Cpu;
        let rope = Rope::new(&inverse_frequencies(8, 500.0, None), 12, &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev).unwrap();
        let y = rope.forward(x.as_tensor(), 4).unwrap();
        let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads.get(x.as_tensor()).unwrap();
        let got = rope.backward(&dy, 4).unwrap();
        let diff = (want - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((norm(&y) - norm(x.as_tensor())).abs() < 1e-3 * norm(&y));
        // Position 0 is the identity.
        let y0 = rope.forward(x.as_tensor(), 0).unwrap().narrow(1, 0, 1).unwrap();
        let d0 = (y0 - x.as_tensor().narrow(1, 0, 1).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d0.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn llama3_scaling_matches_hugging_face() {
        // Llama 3.2's scaling: short wavelengths kept, the longest slowed by the factor.
        let s = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inverse_frequencies(64, 500000.0, None);
        let scaled = inverse_frequencies(64, 500000.0, Some(&s));
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 32.0).abs() < 1e-12 * plain[31]);
        assert!(scaled.iter().zip(&plain).all(|(a, b)| a <= b));
    }
}
