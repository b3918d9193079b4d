//! A residual block (basic or bottleneck): conv+BN units with ReLUs between them, the shortcut
//! (identity or downsampling conv+BN), the residual add and final ReLU; and its explicit backward.

use std::collections::HashMap;

use brigade_engine::{BufferSpec, Gradients, Layer, LayerSpec, Mode, ParamSpec, ParamStore, Pass, Saved};
use candle_core::{bail, Result, Tensor};

use super::{check_images, BlockKind};
use crate::blocks::{load_bn_buffers, relu_backward, ConvBn, ConvBnPlan, ConvBnSaved, ConvBnWeightGrads, Statistics};

#[derive(Debug, Clone)]
pub struct BlockSpec {
    pub(super) prefix: String, // "layer2.0"
    pub(super) kind: BlockKind,
    pub(super) in_planes: usize,
    pub(super) planes: usize,
    pub(super) stride: usize,
}

impl BlockSpec {
    /// The main path's conv+BN units, in order, and the shortcut's when it needs one.
    fn plan(&self) -> (Vec<ConvBnPlan>, Option<ConvBnPlan>) {
        let p = &self.prefix;
        let unit = |i: usize, c_in, c_out, kernel, stride| ConvBnPlan {
            conv: format!("{p}.conv{i}"),
            bn: format!("{p}.bn{i}"),
            c_in,
            c_out,
            kernel,
            stride,
            padding: kernel / 2,
        };
        let (planes, s) = (self.planes, self.stride);
        let main = match self.kind {
            BlockKind::BasicBlock => {
                vec![unit(1, self.in_planes, planes, 3, s), unit(2, planes, planes, 3, 1)]
            }
            // v1.5: the stride sits on the 3×3 conv, not the first 1×1.
            BlockKind::Bottleneck => vec![
                unit(1, self.in_planes, planes, 1, 1),
                unit(2, planes, planes, 3, s),
                unit(3, planes, planes * 4, 1, 1),
            ],
        };
        let out = planes * self.kind.expansion();
        let downsample = (s != 1 || self.in_planes != out).then(|| ConvBnPlan {
            conv: format!("{p}.downsample.0"),
            bn: format!("{p}.downsample.1"),
            c_in: self.in_planes,
            c_out: out,
            kernel: 1,
            stride: s,
            padding: 0,
        });
        (main, downsample)
    }
}

impl LayerSpec for BlockSpec {
    fn name(&self) -> String {
        self.prefix.clone()
    }

    fn params(&self) -> Vec<ParamSpec> {
        let (main, downsample) = self.plan();
        main.iter().chain(&downsample).flat_map(|u| u.specs()).collect()
    }

    fn buffer_specs(&self) -> Vec<BufferSpec> {
        let (main, downsample) = self.plan();
        main.iter().chain(&downsample).flat_map(|u| u.buffer_specs()).collect()
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let (main, downsample) = self.plan();
        Ok(Box::new(Block {
            name: self.prefix.clone(),
            in_planes: self.in_planes,
            main: main.iter().map(|u| u.build(store)).collect::<Result<_>>()?,
            downsample: downsample.map(|u| u.build(store)).transpose()?,
        }))
    }
}

#[derive(Debug)]
pub(super) struct Block {
    pub(super) name: String,
    pub(super) in_planes: usize,
    /// conv+BN units; ReLU between them, and after the residual add.
    pub(super) main: Vec<ConvBn>,
    pub(super) downsample: Option<ConvBn>,
}

impl Block {
    /// `(N, in, H, W)` → `(N, planes·expansion, H/stride, W/stride)`, with what the backward
    /// needs. The one forward of every path.
    fn forward_saving(&mut self, x: &Tensor, statistics: Statistics) -> Result<(Tensor, BlockSaved)> {
        check_images(x, self.in_planes, &format!("ResNet block {}", self.name))?;
        let last = self.main.len() - 1;
        let mut units = Vec::with_capacity(self.main.len());
        // The ReLU outputs between units (their backward masks), in order.
        let mut relus = Vec::with_capacity(last);
        let mut out = x.clone();
        for (i, unit) in self.main.iter_mut().enumerate() {
            let (y, s) = unit.forward(&out, statistics)?;
            units.push(s);
            out = y;
            if i < last {
                out = out.relu()?;
                relus.push(out.clone());
            }
        }
        let (identity, shortcut) = match &mut self.downsample {
            Some(ds) => {
                let (y, s) = ds.forward(x, statistics)?;
                (y, Some(s))
            }
            None => (x.clone(), None),
        };
        let y = (out + identity)?.relu()?;
        Ok((y.clone(), BlockSaved { units, relus, shortcut, y }))
    }
}

impl Layer for Block {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_saving(x, Statistics::of(mode))?.0)
    }

    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Saved)> {
        let (y, s) = self.forward_saving(x, Statistics::train(pass))?;
        let mut keep: Vec<Tensor> = s.units.iter().chain(&s.shortcut).flat_map(|u| u.tensors()).cloned().collect();
        keep.extend(s.relus.iter().cloned());
        keep.push(s.y.clone());
        Ok((y, Saved::with_handles(s, keep)))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let s: BlockSaved = saved.take(&self.name)?;
        let dsum = relu_backward(&s.y, dy)?;
        let mut weights = Vec::with_capacity(self.main.len());
        let mut grad = dsum.clone();
        let mut relus = s.relus;
        for (unit, saved) in self.main.iter().zip(s.units).rev() {
            let (dx, w) = unit.backward_input(saved, &grad, true)?;
            weights.push(w);
            grad = dx.ok_or_else(|| candle_core::Error::Msg("conv+BN gave no input gradient".into()))?;
            if let Some(relu_out) = relus.pop() {
                grad = relu_backward(&relu_out, &grad)?;
            }
        }
        weights.reverse();
        let (dshortcut, shortcut) = match (&self.downsample, s.shortcut) {
            (Some(ds), Some(saved)) => {
                let (dx, w) = ds.backward_input(saved, &dsum, true)?;
                (dx.ok_or_else(|| candle_core::Error::Msg("downsample gave no input gradient".into()))?, Some(w))
            }
            (None, None) => (dsum, None),
            _ => bail!("{}: saved state does not match the shortcut", self.name),
        };
        let dx = if need_dx { Some((grad + dshortcut)?) } else { None };
        let keep = weights.iter().chain(&shortcut).flat_map(|w| w.tensors()).cloned().collect();
        let saved = Saved::with_handles((weights, shortcut), keep);
        Ok((dx, saved))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (weights, shortcut): (Vec<ConvBnWeightGrads>, Option<ConvBnWeightGrads>) = saved.take(&self.name)?;
        for (unit, w) in self.main.iter().zip(&weights) {
            unit.backward_weight(w, grads)?;
        }
        if let (Some(ds), Some(w)) = (&self.downsample, &shortcut) {
            ds.backward_weight(w, grads)?;
        }
        Ok(())
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.main.iter().chain(&self.downsample).flat_map(|u| u.bn.buffers()).collect()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        let bns = self.main.iter_mut().chain(self.downsample.as_mut()).map(|u| &mut u.bn);
        load_bn_buffers(bns, buffers)
    }
}

/// A residual block's forward, kept for its backward.
pub(super) struct BlockSaved {
    pub(super) units: Vec<ConvBnSaved>,
    pub(super) relus: Vec<Tensor>,
    pub(super) shortcut: Option<ConvBnSaved>,
    /// The block's output (after the final ReLU).
    pub(super) y: Tensor,
}
