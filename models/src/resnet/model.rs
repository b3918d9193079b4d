//! ResNet as a [`PipelineModel`]: its name, layer list, loss and input.

use std::sync::Arc;

use brigade_engine::{InputKind, LayerSpec, LossKind, PipelineModel};

use super::{BlockSpec, HeadSpec, ResNetConfig, StemSpec, PRESET_NAMES};
use crate::ModelError;

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
