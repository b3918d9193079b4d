//! Conv + BatchNorm, the unit every ResNet layer is made of: its plan (names, shapes, buffers),
//! forward, input gradient and weight gradient; and ReLU's backward, which joins the units.

use brigade_engine::{BufferSpec, Gradients, Init, ParamSpec, ParamStore};
use candle_core::{DType, Result, Tensor};

use super::{BatchNorm2d, Conv2d, Statistics};

/// What one conv (no bias) followed by a BatchNorm needs; drives both `params()` and `build()`.
#[derive(Debug, Clone)]
pub(crate) struct ConvBnPlan {
    pub(crate) conv: String, // e.g. "layer2.0.conv1" or "layer2.0.downsample.0"
    pub(crate) bn: String,   // e.g. "layer2.0.bn1" or "layer2.0.downsample.1"
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl ConvBnPlan {
    /// The BatchNorm's running statistics, named and shaped as torchvision's state dict.
    pub(crate) fn buffer_specs(&self) -> [BufferSpec; 3] {
        let c = self.c_out;
        let spec =
            |suffix: &str, shape: Vec<usize>, dtype| BufferSpec { name: format!("{}.{suffix}", self.bn), shape, dtype };
        [
            spec("running_mean", vec![c], DType::F32),
            spec("running_var", vec![c], DType::F32),
            spec("num_batches_tracked", vec![], DType::I64),
        ]
    }

    pub(crate) fn specs(&self) -> [ParamSpec; 3] {
        let k = self.kernel;
        [
            ParamSpec::new(format!("{}.weight", self.conv), &[self.c_out, self.c_in, k, k], Init::KaimingNormalFanOut),
            ParamSpec::new(format!("{}.weight", self.bn), &[self.c_out], Init::Ones),
            ParamSpec::new(format!("{}.bias", self.bn), &[self.c_out], Init::Zeros),
        ]
    }

    pub(crate) fn build(&self, store: &mut ParamStore) -> Result<ConvBn> {
        let [w, gamma, beta] = self.specs();
        let device = store.device().clone();
        Ok(ConvBn {
            conv: Conv2d {
                weight: store.get(&w)?,
                weight_name: w.name.clone(),
                stride: self.stride,
                padding: self.padding,
            },
            bn: BatchNorm2d::new(self.bn.clone(), store.get(&gamma)?, store.get(&beta)?, &device)?,
        })
    }
}

#[derive(Debug)]
pub(crate) struct ConvBn {
    pub(crate) conv: Conv2d,
    pub(crate) bn: BatchNorm2d,
}

/// A conv+BN unit's forward, kept for its backward.
pub(crate) struct ConvBnSaved {
    pub(crate) x: Tensor,
    pub(crate) normed: Tensor,
    pub(crate) std: Tensor,
}

/// What a conv+BN unit's weight step needs.
pub(crate) struct ConvBnWeightGrads {
    pub(crate) x: Tensor,
    pub(crate) dconv_out: Tensor,
    pub(crate) dgamma: Tensor,
    pub(crate) dbeta: Tensor,
}

impl ConvBn {
    /// Conv, then BatchNorm with `statistics`; returns the output and what the backward needs.
    pub(crate) fn forward(&mut self, x: &Tensor, statistics: Statistics) -> Result<(Tensor, ConvBnSaved)> {
        let (y, normed, std) = self.bn.forward(&self.conv.forward(x)?, statistics)?;
        Ok((y, ConvBnSaved { x: x.clone(), normed, std }))
    }

    /// The input gradient (when `need_dx`) and what the weight step needs.
    pub(crate) fn backward_input(
        &self,
        s: ConvBnSaved,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, ConvBnWeightGrads)> {
        let (dconv_out, dgamma, dbeta) = self.bn.backward(&s.normed, &s.std, dy)?;
        let dx = if need_dx { Some(self.conv.backward_input(s.x.dims(), &dconv_out)?) } else { None };
        Ok((dx, ConvBnWeightGrads { x: s.x, dconv_out, dgamma, dbeta }))
    }

    pub(crate) fn backward_weight(&self, w: &ConvBnWeightGrads, grads: &mut Gradients) -> Result<()> {
        self.conv.backward_weight(&w.x, &w.dconv_out, grads)?;
        grads.add(&format!("{}.weight", self.bn.name), &w.dgamma)?;
        grads.add(&format!("{}.bias", self.bn.name), &w.dbeta)
    }
}

impl ConvBnSaved {
    pub(crate) fn tensors(&self) -> [&Tensor; 3] {
        [&self.x, &self.normed, &self.std]
    }
}

impl ConvBnWeightGrads {
    pub(crate) fn tensors(&self) -> [&Tensor; 2] {
        [&self.x, &self.dconv_out]
    }
}

/// ReLU's backward from its output: the gradient passes where the output is positive.
pub(crate) fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.gt(0f32)?.where_cond(dy, &dy.zeros_like()?)
}
