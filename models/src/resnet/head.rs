//! The head (`fc`): global average pool over `(H, W)`, then a linear layer; and its explicit backward.

use brigade_engine::{Gradients, Init, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{Result, Tensor};

use super::check_images;

#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub(super) in_features: usize,
    pub(super) num_classes: usize,
}

impl LayerSpec for HeadSpec {
    fn name(&self) -> String {
        "fc".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let bound = 1.0 / (self.in_features as f64).sqrt();
        vec![
            ParamSpec::new("fc.weight", &[self.num_classes, self.in_features], Init::Uniform { bound }),
            ParamSpec::new("fc.bias", &[self.num_classes], Init::Uniform { bound }),
        ]
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let [w, b] = <[ParamSpec; 2]>::try_from(self.params())
            .map_err(|_| candle_core::Error::Msg("fc: expected two parameters".into()))?;
        Ok(Box::new(Head { in_features: self.in_features, weight: store.get(&w)?, bias: store.get(&b)? }))
    }
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) in_features: usize,
    pub(super) weight: Tensor, // (classes, in)
    pub(super) bias: Tensor,   // (classes,)
}

impl Head {
    /// `(N, C, H, W)` → logits `(N, classes)`, with the pooled features `(N, C)` the weight
    /// gradient needs. The one forward of every path.
    fn forward_saving(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        check_images(x, self.in_features, "ResNet head")?;
        let pooled = x.mean((2, 3))?; // (N, C)
        let y = brigade_kernels::matmul(&pooled, &self.weight.t()?)?.broadcast_add(&self.bias)?; // (N, classes)
        Ok((y, pooled))
    }
}

impl Layer for Head {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(x)?.0)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, pooled) = self.forward_saving(x)?;
        Ok((y, Saved::new((pooled.clone(), x.dims().to_vec()), &[&pooled])))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (pooled, dims): (Tensor, Vec<usize>) = saved.take("ResNet head")?;
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        // The mean over H·W spreads each channel's gradient evenly over its positions.
        let dpooled = (brigade_kernels::matmul(dy, &self.weight)? / (h * w) as f64)?; // (N, C)
        let dx = dpooled.reshape((n, c, 1, 1))?.broadcast_as((n, c, h, w))?.contiguous()?;
        Ok((Some(dx), Saved::new((pooled.clone(), dy.clone()), &[&pooled, dy])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (pooled, dy): (Tensor, Tensor) = saved.take("ResNet head")?;
        grads.add_matmul("fc.weight", &dy.t()?, &pooled)?;
        grads.add("fc.bias", &brigade_kernels::sum_rows(&dy)?)
    }
}
