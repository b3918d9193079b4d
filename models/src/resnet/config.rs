//! ResNet's hyper-parameters: block kind, presets, overrides, validation and size limits.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// ResNet preset names.
pub const PRESET_NAMES: &[&str] = &["resnet-tiny", "resnet18", "resnet34", "resnet50"];

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
