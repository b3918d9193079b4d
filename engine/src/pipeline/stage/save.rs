//! The stage half of saving a checkpoint: what a stage would save (`Msg::Manifest`) and the
//! shard files it writes from its own thread (`Msg::Save`), all stages at once, so no stage's
//! tensors are gathered anywhere. The driver half (`driver::save`) plans the files and writes
//! the rest.

use std::collections::HashMap;
#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};

#[cfg(feature = "testing")]
use crate::checkpoint::SaveFault;
use crate::checkpoint::{write_safetensors, ShardFile, TensorInfo};

use super::StageWorker;
use crate::pipeline::protocol::{Manifest, SaveJob, SnapshotKind, StageResult, StageStop};

/// Shard files this process has written, for [`SaveFault::Abort`] (counted across saves, so a
/// test can kill a run in the middle of its second save).
#[cfg(feature = "testing")]
static FILES_WRITTEN_BY_PROCESS: AtomicUsize = AtomicUsize::new(0);

type NamedTensors = Vec<(String, Tensor)>;

impl StageWorker {
    /// The stage's checkpointable tensors, by canonical name, without copying them.
    fn saveable(&self) -> StageResult<(NamedTensors, NamedTensors)> {
        let mut weights: Vec<(String, Tensor)> =
            self.store.vars().map(|(name, _, var)| (name.to_string(), var.as_tensor().clone())).collect();
        for layer in self.chunks.iter().flat_map(|c| c.compute.layers()) {
            weights.extend(layer.buffers());
        }
        let optimizer = self.snapshot(SnapshotKind::OptimizerState)?;
        Ok((weights, optimizer))
    }

    pub(super) fn manifest(&self) -> StageResult<Manifest> {
        let (weights, optimizer) = self.saveable()?;
        let infos = |v: &[(String, Tensor)]| v.iter().map(|(n, t)| TensorInfo::of(n.clone(), t)).collect();
        Ok(Manifest { weights: infos(&weights), optimizer: infos(&optimizer) })
    }

    /// Writes this stage's files of `job`; returns the bytes written.
    pub(super) fn write_shards(&self, job: &SaveJob) -> std::result::Result<u64, String> {
        let (weights, optimizer) = self.saveable().map_err(|e| match e {
            StageStop::Failed(_, m) => m,
            StageStop::Aborted => "aborted".into(),
        })?;
        let tensors: HashMap<String, Tensor> = weights.into_iter().chain(optimizer).collect();
        let mut bytes = 0;
        for (mine, file) in job.files.iter().filter(|f| f.stage == self.index).enumerate() {
            injected_fault_before(job, self.index, mine, file)?;
            let mut contents = Vec::with_capacity(file.names.len());
            for name in &file.names {
                let t = tensors.get(name).ok_or_else(|| format!("stage {} has no tensor {name}", self.index))?;
                let t = t.to_device(&Device::Cpu).map_err(|e| format!("{name}: {e}"))?;
                contents.push((name.clone(), t));
            }
            let path = job.dir.join(&file.file_name);
            bytes += write_safetensors(&path, &contents, &job.header).map_err(|e| e.to_string())?;
            injected_fault_after(job);
        }
        Ok(bytes)
    }
}

/// Test hook (the `testing` feature): [`SaveFault::IoError`] fails `stage` before its file
/// number `mine` (counted from 0 among its own files).
#[cfg(feature = "testing")]
fn injected_fault_before(job: &SaveJob, stage: usize, mine: usize, file: &ShardFile) -> Result<(), String> {
    match job.fault {
        Some(SaveFault::IoError { stage: at, after_files }) if at == stage && mine == after_files => {
            Err(format!("injected I/O failure writing {}", file.file_name))
        }
        _ => Ok(()),
    }
}

/// Test hook (the `testing` feature): [`SaveFault::Abort`] kills the process once it has
/// written that many shard files, as `kill -9` would in the middle of a save.
#[cfg(feature = "testing")]
fn injected_fault_after(job: &SaveJob) {
    if let Some(SaveFault::Abort { after_files }) = job.fault {
        if FILES_WRITTEN_BY_PROCESS.fetch_add(1, Ordering::SeqCst) + 1 >= after_files {
            std::process::abort();
        }
    }
}

/// Without the `testing` feature a save has no faults.
#[cfg(not(feature = "testing"))]
fn injected_fault_before(_: &SaveJob, _: usize, _: usize, _: &ShardFile) -> Result<(), String> {
    Ok(())
}

#[cfg(not(feature = "testing"))]
fn injected_fault_after(_: &SaveJob) {}
