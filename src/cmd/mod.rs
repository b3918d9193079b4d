//! The command-line commands, one file each, and what several of them share: model selection
//! (`model`), the inference pipeline (`inference`), the optimizer and size flags.

pub mod bench;
pub mod export;
pub mod generate;
pub mod inference;
pub mod inspect;
pub mod kernels_bench;
pub mod model;
pub mod output;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod presets;
pub mod profile;
pub mod schedule;
pub mod simulate;
pub mod tokenizer;
pub mod train;

use anyhow::Result;
use brigade::engine::optim::OptimizerConfig;
use brigade::engine::schedule::ScheduleKind;
use clap::ValueEnum;

/// CPU threads a stage gets by default: the cores shared out over the stages (at least 1),
/// as the executor does.
pub fn default_threads(stages: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / stages.max(1)).max(1)
}

/// `--dtype` of `train` and `bench`: what the layers compute in.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum ComputeDtype {
    /// f32 throughout (the exactness mode).
    #[default]
    F32,
    /// Mixed precision: bf16 forward and backward, f32 master weights, optimizer state and
    /// gradient sums.
    Bf16,
    /// As bf16, with f16.
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
            ComputeDtype::F16 => candle_core::DType::F16,
        }
    }
}

/// `--thread-pools` of `train` and `bench`: how the stages' CPU threads are pooled.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum ThreadPoolsArg {
    /// Each stage on its own threads only (what the simulator models; the default).
    #[default]
    PerStage,
    /// One pool for all stages: a stage waiting in a bubble lends its cores to the others, for
    /// the price of a thread hand-over per action.
    Shared,
}

impl ThreadPoolsArg {
    pub fn pools(self) -> brigade::engine::pipeline::ThreadPools {
        match self {
            ThreadPoolsArg::Shared => brigade::engine::pipeline::ThreadPools::Shared,
            ThreadPoolsArg::PerStage => brigade::engine::pipeline::ThreadPools::PerStage,
        }
    }
}

/// `--optimizer`, parsed by clap for every command that takes it.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    Sgd,
}

impl OptimizerArg {
    /// The optimizer with its default hyper-parameters (AdamW: nanoGPT's; SGD: momentum 0.9),
    /// and `weight_decay` instead of the default when given.
    pub fn config(self, weight_decay: Option<f64>) -> OptimizerConfig {
        match (self, weight_decay) {
            (OptimizerArg::Adamw, None) => OptimizerConfig::adamw(),
            (OptimizerArg::Sgd, None) => OptimizerConfig::sgd(),
            (OptimizerArg::Adamw, Some(wd)) => match OptimizerConfig::adamw() {
                OptimizerConfig::AdamW { beta1, beta2, eps, .. } => {
                    OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay: wd }
                }
                other => other,
            },
            (OptimizerArg::Sgd, Some(wd)) => match OptimizerConfig::sgd() {
                OptimizerConfig::Sgd { momentum, nesterov, .. } => {
                    OptimizerConfig::Sgd { momentum, weight_decay: wd, nesterov }
                }
                other => other,
            },
        }
    }

    /// Tensors of state per parameter (for memory estimates).
    pub fn states(self) -> usize {
        match self {
            OptimizerArg::Adamw => 2,
            OptimizerArg::Sgd => 1,
        }
    }
}

/// "1 stage", "2 stages".
pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Parses `2GB`, `500MB`, `64KiB`, `1000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("invalid size {text:?}: expected e.g. 2GB, 500MB or a byte count"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit {other:?} in {text:?}: use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let bytes = (value * scale).round();
    if bytes < 1.0 {
        return Err(format!("size {text:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Schedules with their chunks per device: `kind` (its own v) or `kind:v`, e.g.
/// `interleaved-1f1b:3`, `zb-auto:2`.
pub fn schedule_specs(names: &[String]) -> Result<Vec<(ScheduleKind, usize)>> {
    names
        .iter()
        .map(|n| {
            let (kind, v) = match n.split_once(':') {
                Some((k, v)) => {
                    let v = v.trim().parse::<usize>().map_err(|_| {
                        anyhow::anyhow!("bad schedule {n:?}: expected NAME or NAME:V, V the chunks per device")
                    })?;
                    (k.parse::<ScheduleKind>()?, v)
                }
                None => {
                    let kind = n.parse::<ScheduleKind>()?;
                    (kind, kind.default_virtual_stages())
                }
            };
            // Refuse a v the kind cannot run before anything is profiled.
            kind.check_virtual_stages(v).map_err(|why| anyhow::anyhow!("schedule {n:?}: {why}"))?;
            Ok((kind, v))
        })
        .collect()
}
