//! Shared helpers for the criterion benches: a model of identity layers, so a pipeline of it
//! measures the executor's own cost (messages, bookkeeping, the step's collective) with
//! almost no math in the way.

use std::sync::Arc;

use brigade_engine::{
    Gradients, InputKind, Layer, LayerSpec, LossKind, Mode, ParamSpec, ParamStore, Pass, PipelineModel, Saved,
};
use candle_core::{DType, Device, Result, Tensor};

/// `layers` parameter-free layers on `(B, width, 1, 1)` "images"; the loss is cross-entropy
/// over the `width` values.
#[derive(Debug, Clone, Copy)]
pub struct IdentityModel {
    pub layers: usize,
    pub width: usize,
}

#[derive(Debug)]
struct IdentitySpec(usize);

struct Identity;

impl Layer for Identity {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        // (B, W, 1, 1) -> (B, W); idempotent after the first layer.
        x.flatten_from(1)
    }
    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        Ok((x.flatten_from(1)?, Saved::new(x.dims().to_vec(), &[])))
    }
    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let dims: Vec<usize> = saved.take("identity")?;
        Ok((Some(dy.reshape(dims)?), Saved::empty()))
    }
    fn backward_weight(&mut self, _saved: Saved, _grads: &mut Gradients) -> Result<()> {
        Ok(())
    }
}

impl LayerSpec for IdentitySpec {
    fn name(&self) -> String {
        format!("identity.{}", self.0)
    }
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn build(&self, _store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        Ok(Box::new(Identity))
    }
}

impl PipelineModel for IdentityModel {
    fn name(&self) -> String {
        format!("identity x{}", self.layers)
    }
    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        (0..self.layers).map(|i| Arc::new(IdentitySpec(i)) as Arc<dyn LayerSpec>).collect()
    }
    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }
    fn input(&self) -> InputKind {
        InputKind::Images { channels: self.width }
    }
    fn num_classes(&self) -> usize {
        self.width
    }
}

impl IdentityModel {
    /// A batch of `batch` inputs and labels for this model.
    pub fn batch(&self, batch: usize) -> Result<(Tensor, Tensor)> {
        let x = Tensor::ones((batch, self.width, 1, 1), DType::F32, &Device::Cpu)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % self.width as u32).collect();
        Ok((x, Tensor::new(labels.as_slice(), &Device::Cpu)?))
    }
}
