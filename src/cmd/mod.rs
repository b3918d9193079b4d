//! The command-line commands beyond `train` / `schedule` / `presets`, one file each, and the
//! model selection they share with `train`.

pub mod bench;
pub mod model;
pub mod plan;
pub mod profile;
pub mod simulate;

use anyhow::{bail, Result};
use brigade::engine::optim::OptimizerConfig;
use brigade::engine::schedule::ScheduleKind;

/// CPU threads a stage gets by default: the cores shared out over the stages (at least 1),
/// as the executor does.
pub fn default_threads(stages: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / stages.max(1)).max(1)
}

/// `adamw` or `sgd`, with their default hyper-parameters.
pub fn optimizer(name: &str) -> Result<OptimizerConfig> {
    match name.trim().to_ascii_lowercase().as_str() {
        "adamw" => Ok(OptimizerConfig::adamw()),
        "sgd" => Ok(OptimizerConfig::sgd()),
        other => bail!("unknown optimizer {other:?}: expected adamw or sgd"),
    }
}

pub fn schedules(names: &[String]) -> Result<Vec<ScheduleKind>> {
    names.iter().map(|n| Ok(n.parse::<ScheduleKind>()?)).collect()
}
