//! The stem: `conv1` 7×7 stride 2, `bn1`, ReLU, max-pool 3×3 stride 2, and its explicit backward.

use std::collections::HashMap;

use brigade_engine::{BufferSpec, Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{Result, Tensor};

use super::check_images;
use crate::blocks::{load_bn_buffers, relu_backward, ConvBn, ConvBnPlan, ConvBnSaved, ConvBnWeightGrads, Statistics};

#[derive(Debug, Clone)]
pub struct StemSpec {
    pub(super) in_channels: usize,
    pub(super) width: usize,
}

impl StemSpec {
    fn plan(&self) -> ConvBnPlan {
        ConvBnPlan {
            conv: "conv1".into(),
            bn: "bn1".into(),
            c_in: self.in_channels,
            c_out: self.width,
            kernel: 7,
            stride: 2,
            padding: 3,
        }
    }
}

impl LayerSpec for StemSpec {
    fn name(&self) -> String {
        "stem".to_string()
    }

    fn params(&self) -> Vec<ParamSpec> {
        self.plan().specs().to_vec()
    }

    fn buffer_specs(&self) -> Vec<BufferSpec> {
        self.plan().buffer_specs().to_vec()
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        Ok(Box::new(Stem { in_channels: self.in_channels, conv_bn: self.plan().build(store)? }))
    }
}

#[derive(Debug)]
pub(super) struct Stem {
    pub(super) in_channels: usize,
    pub(super) conv_bn: ConvBn,
}

impl Stem {
    /// `(N, C, H, W)` → `(N, w0, H/4, W/4)`, with the conv+BN unit's saved state and the ReLU
    /// output (the max-pool's input). The one forward of every path.
    fn forward_saving(&mut self, x: &Tensor, statistics: Statistics) -> Result<(Tensor, (ConvBnSaved, Tensor))> {
        check_images(x, self.in_channels, "ResNet stem")?; // (N, 3, H, W)
        let (h, unit) = self.conv_bn.forward(x, statistics)?;
        let h = h.relu()?; // (N, w0, H/2, W/2)
        let y = brigade_kernels::max_pool2d(&h, 3, 2, 1)?; // (N, w0, H/4, W/4)
        Ok((y, (unit, h)))
    }
}

impl Layer for Stem {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(x, Statistics::of(mode))?.0)
    }

    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, (unit, h)) = self.forward_saving(x, Statistics::train(pass))?;
        let keep = unit.tensors().into_iter().chain([&h]).cloned().collect();
        Ok((y, Saved::with_handles((unit, h), keep)))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (unit, h): (ConvBnSaved, Tensor) = saved.take("ResNet stem")?;
        let dh = relu_backward(&h, &brigade_kernels::max_pool2d_backward(&h, dy, 3, 2, 1)?)?;
        let (dx, w) = self.conv_bn.backward_input(unit, &dh, need_dx)?;
        let keep = w.tensors().into_iter().cloned().collect();
        let saved = Saved::with_handles(w, keep);
        Ok((dx, saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        self.conv_bn.backward_weight(&saved.take::<ConvBnWeightGrads>("ResNet stem")?, grads)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.conv_bn.bn.buffers()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        load_bn_buffers(std::iter::once(&mut self.conv_bn.bn), buffers)
    }
}
