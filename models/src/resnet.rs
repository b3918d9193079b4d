//! ResNet (He et al. 2015) as an ordered layer list: `[Stem, every residual block, Head]`.
//!
//! The architecture and parameter names are exactly torchvision's `resnet18/34/50` (`conv1.weight`,
//! `layer2.0.downsample.1.running_var`, `fc.bias`, ...), so a torchvision checkpoint maps one to
//! one. Bottleneck blocks put the stride on the 3×3 conv (torchvision's "ResNet v1.5").
//!
//! - Stem: `conv1` 7×7 stride 2 (no bias), `bn1`, ReLU, max-pool 3×3 stride 2 padding 1.
//! - One layer per residual block (`layer1.0`, `layer1.1`, ..., `layer4.N`), so a pipeline can cut
//!   between any two blocks. A block's shortcut is `downsample` (1×1 conv with the block's stride,
//!   then BatchNorm) when the shape changes, otherwise the identity.
//! - Head (`fc`): global average pool over `(H, W)`, then `fc` (`weight (classes, in)`, `bias`).
//!
//! Initialisation is torchvision's: convs Kaiming-normal (fan_out, ReLU gain), BatchNorm gain one
//! and bias zero, `fc` weight and bias `U(±1/√in)` (PyTorch's `nn.Linear` default).
//!
//! # BatchNorm under micro-batching
//!
//! The pipeline feeds each stage micro-batches, never the whole mini-batch at once. In
//! [`Mode::Train`] every BatchNorm normalises with the statistics of the **current micro-batch**
//! (mean and biased variance over `N, H, W`, composed from differentiable ops so the gradient
//! flows through the statistics as in PyTorch), exactly what PyTorch does when it is given that
//! micro-batch. So a pipeline run matches a single-device reference that splits the batch into
//! the same micro-batches; it does *not* match one BatchNorm over the full mini-batch. The
//! running statistics are updated once per micro-batch forward, like PyTorch: momentum 0.1,
//! `running_mean ← 0.9·running_mean + 0.1·mean`, `running_var ← 0.9·running_var + 0.1·var_unbiased`,
//! `num_batches_tracked += 1`. (An engine that re-runs a forward, e.g. for activation
//! recomputation, would update them twice.) Like PyTorch, training needs more than one value
//! per channel (`N·H·W > 1`); otherwise the forward is an error. [`Mode::Eval`] normalises with
//! the running statistics.
//!
//! The running statistics are buffers, not parameters: [`Layer::buffers`] returns
//! `<bn>.running_mean` and `<bn>.running_var` (f32, `(C,)`) and `<bn>.num_batches_tracked`
//! (**i64 scalar**, shape `()`, as in torchvision checkpoints); [`Layer::load_buffers`] restores
//! them (any numeric dtype is accepted and converted).

use std::collections::HashMap;
use std::sync::Arc;

use brigade_engine::{
    BufferSpec, Gradients, Init, InputKind, Layer, LayerSpec, LossKind, Mode, ParamSpec, ParamStore, Pass,
    PipelineModel, Saved,
};
use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// ResNet preset names.
pub const PRESET_NAMES: &[&str] = &["resnet-tiny", "resnet18", "resnet34", "resnet50"];

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// The residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3×3 convs (ResNet-18/34).
    BasicBlock,
    /// 1×1 reduce, 3×3, 1×1 expand ×4 (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per block = `expansion × planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::BasicBlock => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The largest value any ResNet size (blocks per stage, widths, classes, input channels) may take.
pub const RESNET_MAX_SIZE: usize = 1 << 20;

/// ResNet hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage (`layer1..layer4`).
    pub layers: [usize; 4],
    /// `planes` of each stage; torchvision uses 64/128/256/512. The stem outputs `widths[0]`.
    pub widths: [usize; 4],
    pub num_classes: usize,
    pub in_channels: usize,
}

impl ResNetConfig {
    /// A named preset: `resnet18`, `resnet34`, `resnet50` (1000 classes) or the CI-sized
    /// `resnet-tiny` (basic blocks `[1, 1, 1, 1]`, widths 8/16/32/64, 10 classes).
    pub fn preset(name: &str) -> std::result::Result<Self, ModelError> {
        const TV: [usize; 4] = [64, 128, 256, 512];
        let (block, layers, widths, num_classes) = match name {
            "resnet-tiny" => (BlockKind::BasicBlock, [1, 1, 1, 1], [8, 16, 32, 64], 10),
            "resnet18" => (BlockKind::BasicBlock, [2, 2, 2, 2], TV, 1000),
            "resnet34" => (BlockKind::BasicBlock, [3, 4, 6, 3], TV, 1000),
            "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3], TV, 1000),
            _ => return Err(ModelError::UnknownPreset { name: name.to_string(), valid: PRESET_NAMES.to_vec() }),
        };
        Ok(Self { block, layers, widths, num_classes, in_channels: 3 })
    }

    /// A config with stage widths `base, 2·base, 4·base, 8·base`, 3 input channels, validated.
    pub fn custom(
        block: BlockKind,
        layers: [usize; 4],
        base_width: usize,
        num_classes: usize,
    ) -> std::result::Result<Self, ModelError> {
        let base_width = base_width.min(RESNET_MAX_SIZE + 1); // validate names it; no overflow
        let widths = [base_width, 2 * base_width, 4 * base_width, 8 * base_width];
        let cfg = Self { block, layers, widths, num_classes, in_channels: 3 };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn with_in_channels(mut self, in_channels: usize) -> Self {
        self.in_channels = in_channels;
        self
    }

    /// Checks every size is positive and at most [`RESNET_MAX_SIZE`].
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        if self.layers.contains(&0) {
            return Err(ModelError::InvalidConfig(format!(
                "ResNet needs at least one block per stage, got layers {:?}",
                self.layers
            )));
        }
        if self.widths.contains(&0) {
            return Err(ModelError::InvalidConfig(format!("ResNet widths must be positive, got {:?}", self.widths)));
        }
        // Far above torchvision's largest (ResNet-152: 36 blocks, widths to 512).
        let sizes = self.layers.iter().chain(&self.widths).chain([&self.num_classes, &self.in_channels]);
        if let Some(big) = sizes.copied().find(|&v| v > RESNET_MAX_SIZE) {
            return Err(ModelError::InvalidConfig(format!(
                "ResNet size {big} is larger than brigade supports ({RESNET_MAX_SIZE}): layers {:?}, widths {:?}, {} classes, {} input channels",
                self.layers, self.widths, self.num_classes, self.in_channels
            )));
        }
        // An upper bound on the parameters (a bottleneck block of width w has under 512·w²;
        // u128 cannot overflow under the bounds above).
        let blocks: u128 =
            self.layers.iter().zip(&self.widths).map(|(&n, &w)| n as u128 * 512 * (w as u128).pow(2)).sum();
        let params = blocks
            + 4 * (self.widths[3] as u128) * (self.num_classes as u128)
            + 49 * (self.in_channels as u128) * (self.widths[0] as u128);
        if params > crate::gpt::MAX_PARAMS {
            return Err(ModelError::InvalidConfig(format!(
                "ResNet with layers {:?} and widths {:?} has up to ~{params} parameters, more than brigade supports ({})",
                self.layers, self.widths, crate::gpt::MAX_PARAMS
            )));
        }
        if self.num_classes == 0 || self.in_channels == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "ResNet num_classes ({}) and in_channels ({}) must be positive",
                self.num_classes, self.in_channels
            )));
        }
        Ok(())
    }

    /// Channels out of the last stage (the head's input features).
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.block.expansion()
    }
}

/// ResNet as a [`PipelineModel`].
#[derive(Debug, Clone)]
pub struct ResNet {
    name: String,
    cfg: ResNetConfig,
}

impl ResNet {
    /// A model from a validated config. Named after the preset with the same architecture
    /// (plus the class/channel counts when those differ from the preset's).
    pub fn new(cfg: ResNetConfig) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let arch_match = PRESET_NAMES.iter().find_map(|p| {
            let preset = ResNetConfig::preset(p).ok()?;
            let same_arch = preset.block == cfg.block && preset.layers == cfg.layers && preset.widths == cfg.widths;
            same_arch.then_some((*p, preset))
        });
        let name = match arch_match {
            Some((p, preset)) if preset == cfg => p.to_string(),
            Some((p, _)) => format!("{p}(classes={}, in_channels={})", cfg.num_classes, cfg.in_channels),
            None => format!(
                "resnet({:?}, layers={:?}, widths={:?}, classes={}, in_channels={})",
                cfg.block, cfg.layers, cfg.widths, cfg.num_classes, cfg.in_channels
            ),
        };
        Ok(Self { name, cfg })
    }

    pub fn from_preset(name: &str) -> std::result::Result<Self, ModelError> {
        Self::new(ResNetConfig::preset(name)?)
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }
}

/// A ResNet preset as a shareable model (`resnet18`, `resnet-tiny`, ...).
pub fn model_from_preset(name: &str) -> std::result::Result<Arc<dyn PipelineModel>, ModelError> {
    Ok(Arc::new(ResNet::from_preset(name)?))
}

impl PipelineModel for ResNet {
    fn mixed_precision(&self) -> std::result::Result<(), String> {
        Err("ResNet's layers compute in f32 only for now (BatchNorm keeps f32 statistics): use f32".into())
    }

    fn config(&self) -> serde_json::Value {
        crate::ModelConfig::Resnet(self.cfg.clone()).to_json()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        let cfg = &self.cfg;
        let expansion = cfg.block.expansion();
        let mut layers: Vec<Arc<dyn LayerSpec>> = Vec::new();
        layers.push(Arc::new(StemSpec { in_channels: cfg.in_channels, width: cfg.widths[0] }));
        let mut in_planes = cfg.widths[0];
        for (stage, (&blocks, &planes)) in cfg.layers.iter().zip(&cfg.widths).enumerate() {
            for i in 0..blocks {
                // Only the first block of a stage changes resolution (layer1 keeps it: the stem
                // already pooled).
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                layers.push(Arc::new(BlockSpec {
                    prefix: format!("layer{}.{i}", stage + 1),
                    kind: cfg.block,
                    in_planes,
                    planes,
                    stride,
                }));
                in_planes = planes * expansion;
            }
        }
        layers.push(Arc::new(HeadSpec { in_features: in_planes, num_classes: cfg.num_classes }));
        layers
    }

    fn loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn input(&self) -> InputKind {
        InputKind::Images { channels: self.cfg.in_channels }
    }

    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }
}

// ---------------------------------------------------------------------------------------------
// Conv + BatchNorm, the unit every layer is made of.

/// What one conv (no bias) followed by a BatchNorm needs; drives both `params()` and `build()`.
#[derive(Debug, Clone)]
struct ConvBnPlan {
    conv: String, // e.g. "layer2.0.conv1" or "layer2.0.downsample.0"
    bn: String,   // e.g. "layer2.0.bn1" or "layer2.0.downsample.1"
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvBnPlan {
    /// The BatchNorm's running statistics, named and shaped as torchvision's state dict.
    fn buffer_specs(&self) -> [BufferSpec; 3] {
        let c = self.c_out;
        let spec =
            |suffix: &str, shape: Vec<usize>, dtype| BufferSpec { name: format!("{}.{suffix}", self.bn), shape, dtype };
        [
            spec("running_mean", vec![c], DType::F32),
            spec("running_var", vec![c], DType::F32),
            spec("num_batches_tracked", vec![], DType::I64),
        ]
    }

    fn specs(&self) -> [ParamSpec; 3] {
        let k = self.kernel;
        [
            ParamSpec::new(format!("{}.weight", self.conv), &[self.c_out, self.c_in, k, k], Init::KaimingNormalFanOut),
            ParamSpec::new(format!("{}.weight", self.bn), &[self.c_out], Init::Ones),
            ParamSpec::new(format!("{}.bias", self.bn), &[self.c_out], Init::Zeros),
        ]
    }

    fn build(&self, store: &mut ParamStore) -> Result<ConvBn> {
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
struct Conv2d {
    weight: Tensor, // (out, in, k, k)
    weight_name: String,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `(N, in, H, W)` → `(N, out, H', W')`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }

    /// The input gradient: a transposed convolution of `dy` with the same weight. The output
    /// padding recovers the rows a strided forward dropped (input sizes not a multiple of the
    /// stride).
    fn backward_input(&self, x_dims: &[usize], dy: &Tensor) -> Result<Tensor> {
        let (dy_h, k) = (dy.dim(2)?, self.weight.dim(2)?);
        let covered = (dy_h - 1) * self.stride + k - 2 * self.padding;
        let out_padding = x_dims[2] - covered;
        dy.conv_transpose2d(&self.weight, self.padding, out_padding, self.stride, 1)
    }

    /// `dW += x ⋆ dy`: the weight gradient is a convolution of the input with the output
    /// gradient over the batch (batch and channel axes swapped), the stride becoming a dilation.
    fn backward_weight(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<()> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let dw = x.transpose(0, 1)?.conv2d(&dy.transpose(0, 1)?, self.padding, 1, self.stride, 1)?.transpose(0, 1)?;
        let dw = if dw.dim(2)? != kh || dw.dim(3)? != kw { dw.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { dw };
        grads.add(&self.weight_name, &dw)
    }
}

/// `BatchNorm2d` with PyTorch's semantics, per micro-batch (see the module docs).
#[derive(Debug)]
struct BatchNorm2d {
    name: String,
    weight: Tensor,       // (C,)
    bias: Tensor,         // (C,)
    running_mean: Tensor, // (C,), no autograd
    running_var: Tensor,  // (C,), no autograd
    num_batches_tracked: i64,
}

impl BatchNorm2d {
    fn new(name: String, weight: Tensor, bias: Tensor, device: &candle_core::Device) -> Result<Self> {
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

    fn channels(&self) -> usize {
        self.running_mean.dims()[0]
    }

    /// `(N, C, H, W)` → `(N, C, H, W)`.
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.channels() {
            bail!("{}: expected {} channels, got input {:?}", self.name, self.channels(), x.dims());
        }
        let per_channel = (1, c, 1, 1);
        let normed = match mode {
            Mode::Train => {
                let count = n * h * w;
                if count < 2 {
                    bail!(
                        "{}: training BatchNorm needs more than one value per channel, got input \
                         {:?} (use a larger micro-batch or larger images)",
                        self.name,
                        x.dims()
                    );
                }
                let mean = x.mean_keepdim((0, 2, 3))?; // (1, C, 1, 1)
                let centered = x.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim((0, 2, 3))?; // biased, (1, C, 1, 1)
                let normed = centered.broadcast_div(&(&var + BN_EPS)?.sqrt()?)?;
                // Running statistics: detached, unbiased variance, PyTorch's momentum rule.
                let m = BN_MOMENTUM;
                let batch_mean = mean.detach().flatten_all()?;
                let batch_var = (var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?;
                self.running_mean = ((&self.running_mean * (1.0 - m))? + (batch_mean * m)?)?;
                self.running_var = ((&self.running_var * (1.0 - m))? + (batch_var * m)?)?;
                self.num_batches_tracked += 1;
                normed
            }
            Mode::Eval => {
                let mean = self.running_mean.reshape(per_channel)?;
                let std = (self.running_var.reshape(per_channel)? + BN_EPS)?.sqrt()?;
                x.broadcast_sub(&mean)?.broadcast_div(&std)?
            }
        };
        normed.broadcast_mul(&self.weight.reshape(per_channel)?)?.broadcast_add(&self.bias.reshape(per_channel)?)
    }

    /// Training forward of the explicit path: normalises with the micro-batch's statistics
    /// (updating the running ones on the first pass only) and returns the output with the
    /// normalised input and the per-channel standard deviation the backward needs.
    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.channels() {
            bail!("{}: expected {} channels, got input {:?}", self.name, self.channels(), x.dims());
        }
        let count = n * h * w;
        if count < 2 {
            bail!(
                "{}: training BatchNorm needs more than one value per channel, got input {:?} (use a larger \
                 micro-batch or larger images)",
                self.name,
                x.dims()
            );
        }
        let per_channel = (1, c, 1, 1);
        let mean = x.mean_keepdim((0, 2, 3))?; // (1, C, 1, 1)
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?; // biased
        let std = (&var + BN_EPS)?.sqrt()?;
        let normed = centered.broadcast_div(&std)?;
        if pass == Pass::First {
            let m = BN_MOMENTUM;
            let batch_var = (var.flatten_all()? * (count as f64 / (count - 1) as f64))?;
            self.running_mean = ((&self.running_mean * (1.0 - m))? + (mean.flatten_all()? * m)?)?;
            self.running_var = ((&self.running_var * (1.0 - m))? + (batch_var * m)?)?;
            self.num_batches_tracked += 1;
        }
        let y = normed
            .broadcast_mul(&self.weight.reshape(per_channel)?)?
            .broadcast_add(&self.bias.reshape(per_channel)?)?;
        Ok((y, normed, std))
    }

    /// The input gradient from the normalised input and standard deviation, with the gain and
    /// bias gradients (per-channel reductions the input gradient needs anyway):
    /// `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`.
    fn backward(&self, normed: &Tensor, std: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
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

    fn buffers(&self) -> Vec<(String, Tensor)> {
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
    fn load_from(&mut self, buffers: &mut HashMap<String, Tensor>) -> Result<()> {
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

#[derive(Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// A conv+BN unit's forward, kept for its backward.
struct ConvBnSaved {
    x: Tensor,
    normed: Tensor,
    std: Tensor,
}

/// What a conv+BN unit's weight step needs.
struct ConvBnWeightGrads {
    x: Tensor,
    dconv_out: Tensor,
    dgamma: Tensor,
    dbeta: Tensor,
}

impl ConvBn {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, mode)
    }

    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, ConvBnSaved)> {
        let (y, normed, std) = self.bn.forward_train(&self.conv.forward(x)?, pass)?;
        Ok((y, ConvBnSaved { x: x.clone(), normed, std }))
    }

    /// The input gradient (when `need_dx`) and what the weight step needs.
    fn backward_input(
        &self,
        s: ConvBnSaved,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, ConvBnWeightGrads)> {
        let (dconv_out, dgamma, dbeta) = self.bn.backward(&s.normed, &s.std, dy)?;
        let dx = if need_dx { Some(self.conv.backward_input(s.x.dims(), &dconv_out)?) } else { None };
        Ok((dx, ConvBnWeightGrads { x: s.x, dconv_out, dgamma, dbeta }))
    }

    fn backward_weight(&self, w: &ConvBnWeightGrads, grads: &mut Gradients) -> Result<()> {
        self.conv.backward_weight(&w.x, &w.dconv_out, grads)?;
        grads.add(&format!("{}.weight", self.bn.name), &w.dgamma)?;
        grads.add(&format!("{}.bias", self.bn.name), &w.dbeta)
    }
}

impl ConvBnSaved {
    fn tensors(&self) -> [&Tensor; 3] {
        [&self.x, &self.normed, &self.std]
    }
}

impl ConvBnWeightGrads {
    fn tensors(&self) -> [&Tensor; 2] {
        [&self.x, &self.dconv_out]
    }
}

/// ReLU's backward from its output: the gradient passes where the output is positive.
fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.gt(0f32)?.where_cond(dy, &dy.zeros_like()?)
}

/// Loads `buffers` into `bns`; names that belong to none of them are an error.
fn load_bn_buffers<'a>(
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

/// Checks a `(N, C, H, W)` f32 input with the expected channel count.
fn check_images(x: &Tensor, channels: usize, what: &str) -> Result<()> {
    match x.dims() {
        &[_, c, _, _] if c == channels => {}
        &[_, c, _, _] => bail!("{what} expects {channels} input channels, got {c} (input {:?})", x.dims()),
        dims => bail!("{what} expects a 4-D input (N, {channels}, H, W), got {dims:?}"),
    }
    if x.dtype() != DType::F32 {
        bail!("{what} expects f32 input, got {:?}", x.dtype());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stem.

#[derive(Debug, Clone)]
pub struct StemSpec {
    in_channels: usize,
    width: usize,
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
struct Stem {
    in_channels: usize,
    conv_bn: ConvBn,
}

impl Layer for Stem {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        check_images(x, self.in_channels, "ResNet stem")?; // (N, 3, H, W)
        let h = self.conv_bn.forward(x, mode)?.relu()?; // (N, w0, H/2, W/2)
        brigade_kernels::max_pool2d(&h, 3, 2, 1) // (N, w0, H/4, W/4)
    }

    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Saved)> {
        check_images(x, self.in_channels, "ResNet stem")?;
        let (h, unit) = self.conv_bn.forward_train(x, pass)?;
        let h = h.relu()?;
        let y = brigade_kernels::max_pool2d(&h, 3, 2, 1)?;
        let keep = unit.tensors().into_iter().chain([&h]).cloned().collect();
        let saved = Saved::with_handles((unit, h.clone()), keep);
        Ok((y, saved))
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

// ---------------------------------------------------------------------------------------------
// Residual blocks.

#[derive(Debug, Clone)]
pub struct BlockSpec {
    prefix: String, // "layer2.0"
    kind: BlockKind,
    in_planes: usize,
    planes: usize,
    stride: usize,
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
struct Block {
    name: String,
    in_planes: usize,
    /// conv+BN units; ReLU between them, and after the residual add.
    main: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Layer for Block {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        check_images(x, self.in_planes, &format!("ResNet block {}", self.name))?;
        let last = self.main.len() - 1;
        let mut out = x.clone();
        for (i, unit) in self.main.iter_mut().enumerate() {
            out = unit.forward(&out, mode)?;
            if i < last {
                out = out.relu()?;
            }
        }
        let identity = match &mut self.downsample {
            Some(ds) => ds.forward(x, mode)?,
            None => x.clone(),
        };
        (out + identity)?.relu() // (N, planes·expansion, H/stride, W/stride)
    }

    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Saved)> {
        check_images(x, self.in_planes, &format!("ResNet block {}", self.name))?;
        let last = self.main.len() - 1;
        let mut units = Vec::with_capacity(self.main.len());
        // The ReLU outputs between units (their backward masks), in order.
        let mut relus = Vec::with_capacity(last);
        let mut out = x.clone();
        for (i, unit) in self.main.iter_mut().enumerate() {
            let (y, s) = unit.forward_train(&out, pass)?;
            units.push(s);
            out = y;
            if i < last {
                out = out.relu()?;
                relus.push(out.clone());
            }
        }
        let (identity, shortcut) = match &mut self.downsample {
            Some(ds) => {
                let (y, s) = ds.forward_train(x, pass)?;
                (y, Some(s))
            }
            None => (x.clone(), None),
        };
        let y = (out + identity)?.relu()?;
        let mut keep: Vec<Tensor> = units.iter().chain(&shortcut).flat_map(|u| u.tensors()).cloned().collect();
        keep.extend(relus.iter().cloned());
        keep.push(y.clone());
        let saved = Saved::with_handles(BlockSaved { units, relus, shortcut, y: y.clone() }, keep);
        Ok((y, saved))
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
struct BlockSaved {
    units: Vec<ConvBnSaved>,
    relus: Vec<Tensor>,
    shortcut: Option<ConvBnSaved>,
    /// The block's output (after the final ReLU).
    y: Tensor,
}

// ---------------------------------------------------------------------------------------------
// Head: global average pool + fc.

#[derive(Debug, Clone)]
pub struct HeadSpec {
    in_features: usize,
    num_classes: usize,
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
struct Head {
    in_features: usize,
    weight: Tensor, // (classes, in)
    bias: Tensor,   // (classes,)
}

impl Layer for Head {
    fn forward(&mut self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        check_images(x, self.in_features, "ResNet head")?;
        let pooled = x.mean((2, 3))?; // (N, C)
        pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias) // (N, classes)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        check_images(x, self.in_features, "ResNet head")?;
        let pooled = x.mean((2, 3))?; // (N, C)
        let y = pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        Ok((y, Saved::new((pooled.clone(), x.dims().to_vec()), &[&pooled])))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, _need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (pooled, dims): (Tensor, Vec<usize>) = saved.take("ResNet head")?;
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        // The mean over H·W spreads each channel's gradient evenly over its positions.
        let dpooled = (dy.matmul(&self.weight)? / (h * w) as f64)?; // (N, C)
        let dx = dpooled.reshape((n, c, 1, 1))?.broadcast_as((n, c, h, w))?.contiguous()?;
        Ok((Some(dx), Saved::new((pooled.clone(), dy.clone()), &[&pooled, dy])))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let (pooled, dy): (Tensor, Tensor) = saved.take("ResNet head")?;
        grads.add_matmul("fc.weight", &dy.t()?, &pooled)?;
        grads.add("fc.bias", &brigade_kernels::sum_rows(&dy)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_refused() {
        let e = ResNetConfig::custom(BlockKind::BasicBlock, [2, 2, 2, 2], usize::MAX, 10).unwrap_err().to_string();
        assert!(e.contains("is larger than brigade supports"), "{e}");
        let e = ResNetConfig::custom(BlockKind::Bottleneck, [1 << 20, 1, 1, 1], 1 << 12, 10).unwrap_err().to_string();
        assert!(e.contains("parameters, more than brigade supports"), "{e}");
        ResNetConfig::custom(BlockKind::Bottleneck, [3, 8, 36, 3], 64, 1000).unwrap();
        // ResNet-152
    }
    use brigade_engine::layer::unique_params;
    use candle_core::{Device, Var};

    fn build_all(model: &dyn PipelineModel, store: &mut ParamStore) -> Vec<Box<dyn Layer>> {
        model.layers().iter().map(|l| l.build(store).unwrap()).collect()
    }

    fn run(layers: &mut [Box<dyn Layer>], x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for l in layers.iter_mut() {
            h = l.forward(&h, mode)?;
        }
        Ok(h)
    }

    /// Deterministic pseudo-random images in [-1, 1].
    fn images(n: usize, c: usize, hw: usize) -> Tensor {
        let data: Vec<f32> = (0..n * c * hw * hw).map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0).collect();
        Tensor::from_vec(data, (n, c, hw, hw), &Device::Cpu).unwrap()
    }

    #[test]
    fn param_counts_match_torchvision() {
        for (name, n) in [("resnet18", 11_689_512usize), ("resnet34", 21_797_672), ("resnet50", 25_557_032)] {
            assert_eq!(ResNet::from_preset(name).unwrap().num_params(), n, "{name}");
        }
        // resnet-tiny by hand: stem 8·3·49 + 16; layer1.0 2·(8·8·9) + 32;
        // layer2.0 16·8·9 + 16·16·9 + 64 + (16·8 + 32); layer3.0, layer4.0 likewise; fc 64·10 + 10.
        let by_hand = (1176 + 16) + (1152 + 32) + (3456 + 64 + 160) + (13824 + 128 + 576) + (55296 + 256 + 2176) + 650;
        assert_eq!(ResNet::from_preset("resnet-tiny").unwrap().num_params(), by_hand);
    }

    #[test]
    fn layer_list_and_torchvision_names() {
        let model = ResNet::from_preset("resnet18").unwrap();
        let names: Vec<String> = model.layers().iter().map(|l| l.name()).collect();
        assert_eq!(names.len(), 1 + 8 + 1);
        assert_eq!(names[0], "stem");
        assert_eq!(
            names[1..9],
            ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
        );
        assert_eq!(names[9], "fc");
        let params: Vec<ParamSpec> = unique_params(&model.layers());
        let has = |n: &str| params.iter().any(|p| p.name == n);
        for n in [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
            "layer1.1.bn2.bias",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(has(n), "missing {n}");
        }
        assert!(!has("layer1.0.downsample.0.weight")); // basic layer1 keeps the shape
        assert!(!has("bn1.running_mean")); // buffers are not parameters
                                           // resnet50: bottleneck, downsample already in layer1.0 (64 → 256), stride on conv2.
        let r50 = ResNet::from_preset("resnet50").unwrap();
        let layers = r50.layers();
        assert_eq!(layers.len(), 1 + 16 + 1);
        let l2 = layers.iter().find(|l| l.name() == "layer2.0").unwrap().params();
        let shape = |n: &str| l2.iter().find(|p| p.name == n).map(|p| p.shape.clone());
        assert_eq!(shape("layer2.0.conv1.weight"), Some(vec![128, 256, 1, 1]));
        assert_eq!(shape("layer2.0.conv2.weight"), Some(vec![128, 128, 3, 3]));
        assert_eq!(shape("layer2.0.conv3.weight"), Some(vec![512, 128, 1, 1]));
        assert_eq!(shape("layer2.0.downsample.0.weight"), Some(vec![512, 256, 1, 1]));
        assert!(unique_params(&layers).iter().any(|p| p.name == "layer1.0.downsample.1.bias"));
        let fc = unique_params(&layers).into_iter().find(|p| p.name == "fc.weight").unwrap();
        assert_eq!(fc.shape, vec![1000, 2048]);
        assert_eq!(fc.init, Init::Uniform { bound: 1.0 / 2048f64.sqrt() });
    }

    #[test]
    fn forward_shapes_basic_and_bottleneck() {
        let tiny = ResNet::from_preset("resnet-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&tiny, &mut store);
        let x = images(2, 3, 32);
        let mut h = x.clone();
        let mut shapes = Vec::new();
        for l in layers.iter_mut() {
            h = l.forward(&h, Mode::Train).unwrap();
            shapes.push(h.dims().to_vec());
        }
        assert_eq!(
            shapes,
            [vec![2, 8, 8, 8], vec![2, 8, 8, 8], vec![2, 16, 4, 4], vec![2, 32, 2, 2], vec![2, 64, 1, 1], vec![2, 10]]
        );
        assert_eq!(run(&mut layers, &x, Mode::Eval).unwrap().dims(), &[2, 10]);

        let cfg = ResNetConfig::custom(BlockKind::Bottleneck, [1, 2, 1, 1], 4, 7).unwrap();
        let model = ResNet::new(cfg).unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&model, &mut store);
        assert_eq!(run(&mut layers, &images(2, 3, 16), Mode::Train).unwrap().dims(), &[2, 7]);
    }

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
        let y = bn.forward(&x, Mode::Train).unwrap();
        let (s0, s1) = ((1.25f32 + 1e-5).sqrt(), (3f32 + 1e-5).sqrt());
        close(&vals(&y), &[-1.5 / s0, -0.5 / s0, 0.5 / s0, 1.5 / s0, -1. / s1, -1. / s1, -1. / s1, 3. / s1]);
        close(&vals(&bn.running_mean), &[0.25, 0.1]);
        close(&vals(&bn.running_var), &[0.9 + 0.1 * 5. / 3., 0.9 + 0.4]);
        assert_eq!(bn.num_batches_tracked, 1);
        // A second micro-batch updates again (once per micro-batch).
        bn.forward(&x, Mode::Train).unwrap();
        close(&vals(&bn.running_mean), &[0.9 * 0.25 + 0.25, 0.9 * 0.1 + 0.1]);
        assert_eq!(bn.num_batches_tracked, 2);
        // Eval uses the running statistics and leaves them alone.
        let (rm, rv) = (vals(&bn.running_mean), vals(&bn.running_var));
        let y = bn.forward(&x, Mode::Eval).unwrap();
        let e0 = |v: f32| (v - rm[0]) / (rv[0] + 1e-5).sqrt();
        let e1 = |v: f32| (v - rm[1]) / (rv[1] + 1e-5).sqrt();
        close(&vals(&y), &[e0(1.), e0(2.), e0(3.), e0(4.), e1(0.), e1(0.), e1(0.), e1(4.)]);
        assert_eq!(bn.num_batches_tracked, 2);
        close(&vals(&bn.running_mean), &rm);
    }

    #[test]
    fn buffers_round_trip_and_errors() {
        let model = ResNet::from_preset("resnet-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&model, &mut store);
        run(&mut layers, &images(2, 3, 32), Mode::Train).unwrap();
        let stem: HashMap<String, Tensor> = layers[0].buffers().into_iter().collect();
        let mut keys: Vec<_> = stem.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var"]);
        assert_eq!(stem["bn1.num_batches_tracked"].dtype(), DType::I64);
        assert_eq!(stem["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(), 1);
        let l2: Vec<String> = layers[2].buffers().into_iter().map(|(k, _)| k).collect();
        assert!(l2.contains(&"layer2.0.downsample.1.running_var".to_string()), "{l2:?}");
        assert_eq!(l2.len(), 9);

        // Load into a fresh model: Eval outputs then match.
        let mut store2 = ParamStore::new(Device::Cpu, 0);
        let mut fresh = build_all(&model, &mut store2);
        for (a, b) in layers.iter().zip(fresh.iter_mut()) {
            b.load_buffers(&a.buffers().into_iter().collect()).unwrap();
        }
        let x = images(2, 3, 32);
        let ya = vals(&run(&mut layers, &x, Mode::Eval).unwrap());
        let yb = vals(&run(&mut fresh, &x, Mode::Eval).unwrap());
        close(&ya, &yb);

        let mut bad = stem.clone();
        bad.insert("bn2.running_mean".into(), Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
        let e = fresh[0].load_buffers(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown buffers") && e.contains("bn2.running_mean"), "{e}");
        let mut missing = stem.clone();
        missing.remove("bn1.running_var");
        assert!(fresh[0].load_buffers(&missing).unwrap_err().to_string().contains("missing buffer bn1.running_var"));
    }

    /// Checks autograd's gradient of `loss` against central finite differences on a few entries
    /// of each named parameter. f32 and ReLU kinks limit how small `eps` can usefully be.
    fn check_grads(store: &ParamStore, names: &[&str], eps: f32, mut loss: impl FnMut() -> Tensor) {
        let grads = loss().backward().unwrap();
        for name in names {
            let var: Var = store.var(name).unwrap().clone();
            let analytic = vals(grads.get(var.as_tensor()).unwrap());
            let base = vals(var.as_tensor());
            for &i in &[0usize, base.len() / 3, base.len() - 1] {
                let mut eval = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l = loss().to_scalar::<f32>().unwrap() as f64;
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                    l
                };
                let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
                let a = analytic[i] as f64;
                assert!(
                    (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs().max(numeric.abs()),
                    "{name}[{i}]: autograd {a} vs finite difference {numeric}"
                );
            }
        }
    }

    /// The whole network in training mode (micro-batch statistics in every BatchNorm).
    /// Every layer's hand-written backward against autograd and finite differences: the stem,
    /// basic blocks with and without a downsampling shortcut, bottlenecks, and the head.
    #[test]
    fn explicit_backward_matches_autograd_and_finite_differences() {
        use brigade_engine::gradcheck::{check_layer, finite_differences};
        for kind in [BlockKind::BasicBlock, BlockKind::Bottleneck] {
            let model = ResNet::new(ResNetConfig::custom(kind, [1, 2, 1, 1], 4, 5).unwrap()).unwrap();
            // 64×64 leaves layer4 a 2×2 map: BatchNorm on a 1×1 map with 2 images has a zero true
            // input gradient, and two implementations then only agree on rounding noise.
            let mut x = images(2, 3, 64);
            let mut store = ParamStore::new(Device::Cpu, 9);
            for spec in model.layers() {
                let report = check_layer(spec.as_ref(), &x, 9).unwrap();
                // BatchNorm's input gradient is a difference of near-equal terms, which the
                // closed form and autograd's composition round differently (up to ~2e-5 seen).
                assert!(report.max() <= 1e-4, "{kind:?} {}: {report:?}", spec.name());
                for p in spec.params().iter().take(4) {
                    let n = p.numel();
                    let (pairs, scale) =
                        finite_differences(spec.as_ref(), &x, 9, &p.name, &[0, n / 2, n - 1], 1e-3).unwrap();
                    for (analytic, numeric) in pairs {
                        // Judged against the whole gradient's scale, loosely: a step of 1e-3 moves a
                        // few values across ReLU and max-pool kinks, each worth an O(1) error in
                        // the quotient, and f32 forwards add noise / eps. The tight check is the
                        // one against autograd above; this one catches signs and missing factors.
                        assert!(
                            (analytic - numeric).abs() <= 5e-2 * scale.max(numeric.abs()),
                            "{kind:?} {}: explicit {analytic} vs finite difference {numeric}",
                            p.name
                        );
                    }
                }
                x = spec.build(&mut store).unwrap().forward(&x, Mode::Train).unwrap().detach();
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let model = ResNet::from_preset("resnet-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 5);
        let mut layers = build_all(&model, &mut store);
        let x = images(3, 3, 32);
        let targets = Tensor::from_slice(&[1u32, 4, 7], 3, &Device::Cpu).unwrap();
        let names = [
            "layer1.0.conv2.weight",
            "layer1.0.bn1.weight",
            "layer2.0.downsample.0.weight",
            "layer3.0.bn2.bias",
            "layer4.0.conv1.weight",
            "fc.weight",
            "fc.bias",
        ];
        check_grads(&store, &names, 1e-3, || {
            brigade_kernels::cross_entropy_sum(&run(&mut layers, &x, Mode::Train).unwrap(), &targets).unwrap()
        });
    }

    /// The stem alone (conv, BatchNorm, ReLU, padded max-pool), in training and eval mode: as
    /// the first layer it sees every downstream kink, so it is checked on its own.
    #[test]
    fn stem_gradients_match_finite_differences() {
        let model = ResNet::from_preset("resnet-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 6);
        let mut stem = model.layers()[0].build(&mut store).unwrap();
        let x = images(2, 3, 16);
        let r = images(2, 8, 4).affine(0.7, 0.1).unwrap(); // a fixed random projection
        for mode in [Mode::Train, Mode::Eval] {
            check_grads(&store, &["conv1.weight", "bn1.weight", "bn1.bias"], 1e-3, || {
                (stem.forward(&x, mode).unwrap() * &r).unwrap().sum_all().unwrap()
            });
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = ResNet::from_preset("resnet-tiny").unwrap();
        let mut store = ParamStore::new(Device::Cpu, 0);
        let mut layers = build_all(&model, &mut store);
        let e = layers[0].forward(&images(1, 1, 32), Mode::Train).unwrap_err().to_string();
        assert!(e.contains("expects 3 input channels, got 1"), "{e}");
        let u8s = Tensor::zeros((1, 3, 8, 8), DType::U8, &Device::Cpu).unwrap();
        assert!(layers[0].forward(&u8s, Mode::Train).unwrap_err().to_string().contains("f32"));
        let flat = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(layers[0].forward(&flat, Mode::Train).unwrap_err().to_string().contains("4-D"));
        // One value per channel cannot be batch-normalised in training (PyTorch refuses too).
        let e = run(&mut layers, &images(1, 3, 32), Mode::Train).unwrap_err().to_string();
        assert!(e.contains("more than one value per channel"), "{e}");
        assert_eq!(run(&mut layers, &images(1, 3, 32), Mode::Eval).unwrap().dims(), &[1, 10]);

        let e = ResNetConfig::preset("resnet101").unwrap_err().to_string();
        assert!(e.contains("unknown model preset `resnet101`") && e.contains("resnet50"), "{e}");
        assert!(ResNetConfig::custom(BlockKind::BasicBlock, [1, 0, 1, 1], 8, 10).is_err());
        assert!(ResNet::new(ResNetConfig::preset("resnet18").unwrap().with_num_classes(0)).is_err());
    }

    #[test]
    fn config_serde_names_and_overrides() {
        let cfg = ResNetConfig::preset("resnet50").unwrap().with_num_classes(10);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"bottleneck\""), "{json}");
        assert_eq!(serde_json::from_str::<ResNetConfig>(&json).unwrap(), cfg);
        let model = ResNet::new(cfg).unwrap();
        assert_eq!(model.name(), "resnet50(classes=10, in_channels=3)");
        assert_eq!(model.num_classes(), 10);
        assert_eq!(ResNet::from_preset("resnet-tiny").unwrap().name(), "resnet-tiny");
        assert_eq!(model.input(), InputKind::Images { channels: 3 });
        assert_eq!(model.loss(), LossKind::CrossEntropy);
    }

    #[test]
    fn lib_preset_dispatch() {
        let names = crate::preset_names();
        assert_eq!(names.len(), 9);
        for n in &names {
            assert_eq!(crate::preset(n).unwrap().name(), *n);
        }
        let e = crate::preset("vgg16").unwrap_err().to_string();
        assert!(e.contains("`vgg16`") && e.contains("gpt2-xl") && e.contains("resnet-tiny"), "{e}");
    }
}
