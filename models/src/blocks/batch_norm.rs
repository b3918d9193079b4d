//! `BatchNorm2d` with PyTorch's semantics, per micro-batch: batch statistics in training (the
//! running statistics updated once per micro-batch), running statistics in evaluation, and
//! the buffers checkpoints keep. See the ResNet module docs for how this meets micro-batching.

use std::collections::HashMap;

use brigade_engine::{Mode, Pass};
use candle_core::{bail, DType, Result, Tensor};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Which statistics a BatchNorm normalises with: the one place training and evaluation differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Statistics {
    /// The micro-batch's own (training), folding them into the running statistics when
    /// `update_running`.
    Batch { update_running: bool },
    /// The running statistics (evaluation); they stay as they are.
    Running,
}

impl Statistics {
    /// For [`Layer::forward`](brigade_engine::Layer::forward): every training call is a
    /// micro-batch and counts in the running statistics.
    pub(crate) fn of(mode: Mode) -> Self {
        match mode {
            Mode::Train => Self::Batch { update_running: true },
            Mode::Eval => Self::Running,
        }
    }

    /// For the explicit training path: a recomputation leaves the running statistics alone, so
    /// activation recomputation never counts a micro-batch twice.
    pub(crate) fn train(pass: Pass) -> Self {
        Self::Batch { update_running: pass == Pass::First }
    }
}

/// `BatchNorm2d` with PyTorch's semantics, per micro-batch (see the module docs).
#[derive(Debug)]
pub(crate) struct BatchNorm2d {
    pub(crate) name: String,
    pub(crate) weight: Tensor,       // (C,)
    pub(crate) bias: Tensor,         // (C,)
    pub(crate) running_mean: Tensor, // (C,), no autograd
    pub(crate) running_var: Tensor,  // (C,), no autograd
    pub(crate) num_batches_tracked: i64,
}

impl BatchNorm2d {
    pub(crate) fn new(name: String, weight: Tensor, bias: Tensor, device: &candle_core::Device) -> Result<Self> {
        let c = weight.dim(0)?;
        Ok(Self {
            name,
            weight,
            bias,
            running_mean: Tensor::zeros(c, DType::F32, device)?,
            running_var: Tensor::ones(c, DType::F32, device)?,
            num_batches_tracked: 0,
        })
    }

    pub(crate) fn channels(&self) -> usize {
        self.running_mean.dims()[0]
    }

    /// `(N, C, H, W)` → `(N, C, H, W)`, with the normalised input and the per-channel standard
    /// deviation the backward needs. The one forward of every path: the autograd reference and
    /// evaluation (through [`Statistics::of`]) and the explicit training path
    /// ([`Statistics::train`]); only the statistics differ between training and evaluation.
    pub(crate) fn forward(&mut self, x: &Tensor, statistics: Statistics) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.channels() {
            bail!("{}: expected {} channels, got input {:?}", self.name, self.channels(), x.dims());
        }
        let per_channel = (1, c, 1, 1);
        let (normed, std) = match statistics {
            Statistics::Batch { update_running } => {
                let count = n * h * w;
                if count < 2 {
                    bail!(
                        "{}: training BatchNorm needs more than one value per channel, got input \
                         {:?} (use a larger micro-batch or larger images)",
                        self.name,
                        x.dims()
                    );
                }
                // Composed from differentiable ops, so under autograd the gradient flows through
                // the statistics as in PyTorch.
                let mean = x.mean_keepdim((0, 2, 3))?; // (1, C, 1, 1)
                let centered = x.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim((0, 2, 3))?; // biased, (1, C, 1, 1)
                let std = (&var + BN_EPS)?.sqrt()?;
                let normed = centered.broadcast_div(&std)?;
                if update_running {
                    // Running statistics: detached (buffers, outside any autograd graph),
                    // unbiased variance, PyTorch's momentum rule.
                    let m = BN_MOMENTUM;
                    let batch_mean = mean.detach().flatten_all()?;
                    let batch_var = (var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?;
                    self.running_mean = ((&self.running_mean * (1.0 - m))? + (batch_mean * m)?)?;
                    self.running_var = ((&self.running_var * (1.0 - m))? + (batch_var * m)?)?;
                    self.num_batches_tracked += 1;
                }
                (normed, std)
            }
            Statistics::Running => {
                let mean = self.running_mean.reshape(per_channel)?;
                let std = (self.running_var.reshape(per_channel)? + BN_EPS)?.sqrt()?;
                (x.broadcast_sub(&mean)?.broadcast_div(&std)?, std)
            }
        };
        let y = normed
            .broadcast_mul(&self.weight.reshape(per_channel)?)?
            .broadcast_add(&self.bias.reshape(per_channel)?)?;
        Ok((y, normed, std))
    }

    /// The input gradient from the normalised input and standard deviation, with the gain and
    /// bias gradients (per-channel reductions the input gradient needs anyway):
    /// `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`.
    pub(crate) fn backward(&self, normed: &Tensor, std: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = dy.dims4()?;
        let count = (n * h * w) as f64;
        let dbias = dy.sum_keepdim((0, 2, 3))?; // (1, C, 1, 1)
        let dweight = (dy * normed)?.sum_keepdim((0, 2, 3))?;
        let gain = self.weight.reshape((1, c, 1, 1))?.broadcast_div(std)?;
        let centered =
            dy.broadcast_sub(&(&dbias / count)?)?.broadcast_sub(&normed.broadcast_mul(&(&dweight / count)?)?)?;
        let dx = centered.broadcast_mul(&gain)?;
        Ok((dx, dweight.flatten_all()?, dbias.flatten_all()?))
    }

    pub(crate) fn buffers(&self) -> Vec<(String, Tensor)> {
        let nbt = Tensor::new(self.num_batches_tracked, self.running_mean.device());
        let mut out = vec![
            (format!("{}.running_mean", self.name), self.running_mean.clone()),
            (format!("{}.running_var", self.name), self.running_var.clone()),
        ];
        // A 0-dim i64 tensor cannot fail to build on a live device; skip it if it somehow did.
        if let Ok(nbt) = nbt {
            out.push((format!("{}.num_batches_tracked", self.name), nbt));
        }
        out
    }

    /// Takes this BatchNorm's three buffers out of `buffers` (removing them), checking shapes.
    pub(crate) fn load_from(&mut self, buffers: &mut HashMap<String, Tensor>) -> Result<()> {
        let device = self.running_mean.device().clone();
        let c = self.channels();
        let mut take = |suffix: &str| -> Result<Tensor> {
            let key = format!("{}.{suffix}", self.name);
            buffers.remove(&key).ok_or_else(|| candle_core::Error::Msg(format!("missing buffer {key}")))
        };
        let (mean, var, nbt) = (take("running_mean")?, take("running_var")?, take("num_batches_tracked")?);
        for (what, t) in [("running_mean", &mean), ("running_var", &var)] {
            if t.dims() != [c] {
                bail!("buffer {}.{what}: expected shape [{c}], got {:?}", self.name, t.dims());
            }
        }
        if nbt.elem_count() != 1 {
            bail!("buffer {}.num_batches_tracked: expected a scalar, got {:?}", self.name, nbt.dims());
        }
        self.running_mean = mean.to_dtype(DType::F32)?.to_device(&device)?;
        self.running_var = var.to_dtype(DType::F32)?.to_device(&device)?;
        self.num_batches_tracked = nbt.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
        Ok(())
    }
}

/// Loads `buffers` into `bns`; names that belong to none of them are an error.
pub(crate) fn load_bn_buffers<'a>(
    bns: impl Iterator<Item = &'a mut BatchNorm2d>,
    buffers: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut remaining = buffers.clone();
    for bn in bns {
        bn.load_from(&mut remaining)?;
    }
    if !remaining.is_empty() {
        let mut unknown: Vec<_> = remaining.keys().cloned().collect();
        unknown.sort();
        bail!("unknown buffers for this layer: {}", unknown.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn bn_layer(c: usize) -> BatchNorm2d {
        let dev = Device::Cpu;
        let w = Tensor::ones(c, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(c, DType::F32, &dev).unwrap();
        BatchNorm2d::new("bn".into(), w, b, &dev).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn batchnorm_train_eval_and_running_stats() {
        let mut bn = bn_layer(2);
        // (N=1, C=2, 2, 2): channel 0 = 1,2,3,4 (mean 2.5, var 1.25, unbiased 5/3);
        // channel 1 = 0,0,0,4 (mean 1, var 3, unbiased 4).
        let x = Tensor::from_slice(&[1f32, 2., 3., 4., 0., 0., 0., 4.], (1, 2, 2, 2), &Device::Cpu).unwrap();
        let (y, _, _) = bn.forward(&x, Statistics::of(Mode::Train)).unwrap();
        let (s0, s1) = ((1.25f32 + 1e-5).sqrt(), (3f32 + 1e-5).sqrt());
        close(&vals(&y), &[-1.5 / s0, -0.5 / s0, 0.5 / s0, 1.5 / s0, -1. / s1, -1. / s1, -1. / s1, 3. / s1]);
        close(&vals(&bn.running_mean), &[0.25, 0.1]);
        close(&vals(&bn.running_var), &[0.9 + 0.1 * 5. / 3., 0.9 + 0.4]);
        assert_eq!(bn.num_batches_tracked, 1);
        // A second micro-batch updates again (once per micro-batch).
        bn.forward(&x, Statistics::of(Mode::Train)).unwrap();
        close(&vals(&bn.running_mean), &[0.9 * 0.25 + 0.25, 0.9 * 0.1 + 0.1]);
        assert_eq!(bn.num_batches_tracked, 2);
        // Eval uses the running statistics and leaves them alone.
        let (rm, rv) = (vals(&bn.running_mean), vals(&bn.running_var));
        let (y, _, _) = bn.forward(&x, Statistics::of(Mode::Eval)).unwrap();
        let e0 = |v: f32| (v - rm[0]) / (rv[0] + 1e-5).sqrt();
        let e1 = |v: f32| (v - rm[1]) / (rv[1] + 1e-5).sqrt();
        close(&vals(&y), &[e0(1.), e0(2.), e0(3.), e0(4.), e1(0.), e1(0.), e1(0.), e1(4.)]);
        assert_eq!(bn.num_batches_tracked, 2);
        close(&vals(&bn.running_mean), &rm);
    }
}
