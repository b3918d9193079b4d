//! The driver half of saving a checkpoint from a running pipeline: every stage writes its own
//! shards from its own thread (`stage::save`), all stages at once, so no stage's tensors are
//! gathered anywhere. The driver only plans the files (names encode the shard count, so the
//! plan comes first), then writes the small index and metadata files and renames the finished
//! directory into place.
//!
//! Across MPI ranks: every rank gathers every stage's manifest (so all plan the same files),
//! rank 0 opens the staging directory and tells the others its path, each rank's stages write
//! their own shards into it, and once all have written (the byte count's all-reduce is the
//! barrier) rank 0 writes the index and metadata and commits, as in one process. The save
//! directory must be shared by the ranks (one node, or a shared file system).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use crossbeam_channel::unbounded;

use super::Pipeline;
use crate::checkpoint::{
    plan_shards, write_index, write_safetensors, CheckpointError, CheckpointMeta, ModelMeta, SaveOptions,
    SavedCheckpoint, ShardFile, StagingDir, TensorInfo, TrainingMeta, FORMAT_VERSION, META_FILE, OPTIMIZER_PREFIX,
    TRAINING_STATE_FILE, WEIGHTS_PREFIX,
};
use crate::error::{EngineError, Result};
use crate::pipeline::protocol::{Manifest, Msg, SaveJob, StageStop};

impl Pipeline {
    /// Writes a checkpoint of the current state to `dir` (replacing it if it exists, atomically:
    /// until the final rename, `dir` keeps its old contents). Each stage writes its own
    /// shards concurrently; the pipeline stays usable if the save fails.
    pub fn save_checkpoint(
        &mut self,
        dir: &Path,
        model: ModelMeta,
        training: TrainingMeta,
        options: &SaveOptions,
    ) -> Result<SavedCheckpoint> {
        self.ensure_running()?;
        let mut mine = Vec::new();
        for s in self.local_stages() {
            let (tx, rx) = unbounded();
            self.send(s, Msg::Manifest { reply: tx })?;
            match rx.recv() {
                Ok(Ok(m)) => mine.push((s, m)),
                Ok(Err(StageStop::Failed(_, message))) => {
                    return Err(CheckpointError::StageWrite { stage: s, message }.into())
                }
                Ok(Err(StageStop::Aborted)) | Err(_) => return Err(self.stage_gone(s)),
            }
        }
        let manifests = self.all_manifests(mine)?;
        // Tied weights live on several stages; the first holder writes them.
        let (mut seen_w, mut seen_o) = (HashSet::new(), HashSet::new());
        let weights: Vec<Vec<TensorInfo>> = manifests
            .iter()
            .map(|m| m.weights.iter().filter(|t| seen_w.insert(t.name.clone())).cloned().collect())
            .collect();
        let optimizer: Vec<Vec<TensorInfo>> = manifests
            .iter()
            .map(|m| m.optimizer.iter().filter(|t| seen_o.insert(t.name.clone())).cloned().collect())
            .collect();
        let num_params: usize = {
            let params: HashSet<&str> = self.param_names.iter().map(String::as_str).collect();
            weights
                .iter()
                .flatten()
                .filter(|t| params.contains(t.name.as_str()))
                .map(|t| t.shape.iter().product::<usize>())
                .sum()
        };
        let num_tensors = weights.iter().map(Vec::len).sum();
        let weight_files = plan_shards(WEIGHTS_PREFIX, &weights, options.max_shard_bytes);
        let optimizer_files = plan_shards(OPTIMIZER_PREFIX, &optimizer, options.max_shard_bytes);

        // Rank 0 (the only process without MPI) stages; the others write into its directory.
        let staging = if self.is_lead_process() { Some(StagingDir::begin(dir)?) } else { None };
        let staging_path = self.lead_path(staging.as_ref().map(|s| s.path().to_path_buf()))?;
        let header: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("brigade.model".to_string(), model.name.clone()),
            ("brigade.step".to_string(), self.step.to_string()),
            ("brigade.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("brigade.config".to_string(), model.config.to_string()),
            ("brigade.partition".to_string(), self.partition.to_string()),
            ("brigade.schedule".to_string(), self.schedule.name().to_string()),
        ]
        .into_iter()
        .collect();
        let all_files: Vec<ShardFile> = weight_files.iter().chain(&optimizer_files).cloned().collect();
        let job = Arc::new(SaveJob {
            dir: staging_path,
            files: all_files.clone(),
            header: header.clone(),
            #[cfg(feature = "testing")]
            fault: options.fault,
        });
        // All stages write at once; then collect every answer.
        let mut replies = Vec::new();
        for s in self.local_stages() {
            let (tx, rx) = unbounded();
            self.send(s, Msg::Save { job: job.clone(), reply: tx })?;
            replies.push((s, rx));
        }
        let mut bytes = 0;
        let mut failure = None;
        for (s, rx) in replies {
            match rx.recv() {
                Ok(Ok(b)) => bytes += b,
                Ok(Err(message)) => {
                    failure.get_or_insert(CheckpointError::StageWrite { stage: s, message });
                }
                Err(_) => return Err(self.stage_gone(s)),
            }
        }
        if let Some(e) = failure {
            return Err(e.into()); // `staging` is dropped here and removes the partial files.
        }
        if self.world().is_distributed() {
            // Every rank's shards are written once the sum is known.
            let total = self.world().sum_f64(vec![bytes as f64]).map_err(collective)?;
            bytes = total[0] as u64;
        }
        let mut files: Vec<PathBuf> = all_files.iter().map(|f| dir.join(&f.file_name)).collect();
        files.push(dir.join(TRAINING_STATE_FILE));
        let Some(staging) = staging else {
            return Ok(SavedCheckpoint { dir: dir.to_path_buf(), bytes, files });
        };

        write_index(&staging.path().join(format!("{WEIGHTS_PREFIX}.safetensors.index.json")), &weight_files)?;
        if !optimizer_files.is_empty() {
            write_index(&staging.path().join(format!("{OPTIMIZER_PREFIX}.safetensors.index.json")), &optimizer_files)?;
        }
        let state = training_state_tensors(self.step, &training)?;
        write_safetensors(&staging.path().join(TRAINING_STATE_FILE), &state, &header)?;
        let meta = CheckpointMeta {
            format: CheckpointMeta::FORMAT.into(),
            format_version: FORMAT_VERSION,
            brigade_version: env!("CARGO_PKG_VERSION").into(),
            model,
            step: self.step,
            partition: self.partition.counts().to_vec(),
            schedule: self.schedule.name().to_string(),
            // A data-parallel run's checkpoint is the one-pipeline run's with as many micro-batches
            // (the same computation), so it resumes on any number of replicas.
            microbatches: self.microbatches * self.replicas,
            optimizer: self.optimizer,
            lr_schedule: self.lr,
            seed: self.seed,
            grad_clip: self.grad_clip,
            training,
            num_params,
            num_tensors,
        };
        crate::checkpoint::write_file_durably(&staging.path().join(META_FILE), meta.to_json().as_bytes())?;
        let dir = staging.commit()?;
        Ok(SavedCheckpoint { dir, bytes, files })
    }
}

impl Pipeline {
    /// Every stage's manifest, in stage order: this process's own, and under MPI every other
    /// rank's (gathered as JSON: name, dtype, shape).
    fn all_manifests(&self, mine: Vec<(usize, Manifest)>) -> Result<Vec<Manifest>> {
        if !self.world().is_distributed() {
            return Ok(mine.into_iter().map(|(_, m)| m).collect());
        }
        let encode = |infos: &[TensorInfo]| -> Vec<serde_json::Value> {
            infos.iter().map(|t| serde_json::json!([t.name, t.dtype.as_str(), t.shape])).collect()
        };
        let local: Vec<serde_json::Value> =
            mine.iter().map(|(s, m)| serde_json::json!([s, encode(&m.weights), encode(&m.optimizer)])).collect();
        let bytes = serde_json::to_vec(&local).map_err(|e| collective(e.to_string()))?;
        let mut by_stage: Vec<Option<Manifest>> = (0..self.stage_count()).map(|_| None).collect();
        for rank_bytes in self.world().all_gather(bytes).map_err(collective)? {
            let stages: Vec<(usize, Vec<WireInfo>, Vec<WireInfo>)> =
                serde_json::from_slice(&rank_bytes).map_err(|e| collective(format!("a manifest: {e}")))?;
            for (stage, weights, optimizer) in stages {
                let decode = |infos: Vec<WireInfo>| -> Result<Vec<TensorInfo>> {
                    infos
                        .into_iter()
                        .map(|(name, dtype, shape)| {
                            let dtype = dtype.parse().map_err(|e| collective(format!("dtype {dtype}: {e}")))?;
                            Ok(TensorInfo { name, dtype, shape })
                        })
                        .collect()
                };
                let slot = by_stage.get_mut(stage).ok_or_else(|| collective(format!("no stage {stage}")))?;
                *slot = Some(Manifest { weights: decode(weights)?, optimizer: decode(optimizer)? });
            }
        }
        by_stage
            .into_iter()
            .enumerate()
            .map(|(s, m)| m.ok_or_else(|| collective(format!("no rank sent stage {s}'s manifest"))))
            .collect()
    }

    /// The staging directory rank 0 opened (`path` there), on every rank.
    fn lead_path(&self, path: Option<PathBuf>) -> Result<PathBuf> {
        if !self.world().is_distributed() {
            return path.ok_or_else(|| collective("no staging directory".into()));
        }
        let bytes = path.map(|p| p.to_string_lossy().into_owned().into_bytes()).unwrap_or_default();
        let all = self.world().all_gather(bytes).map_err(collective)?;
        let first = all.into_iter().next().unwrap_or_default();
        Ok(PathBuf::from(String::from_utf8(first).map_err(|e| collective(e.to_string()))?))
    }
}

/// A manifest entry as the ranks exchange it: (name, dtype, shape).
type WireInfo = (String, String, Vec<usize>);

fn collective(why: String) -> EngineError {
    EngineError::Config(format!("saving across MPI ranks: {why}"))
}

/// The training position as tensors (`training_state.safetensors`). brigade's randomness is
/// counter-based (batch `i` is a function of `(data_seed, i)`; initialisation of `(seed,
/// name)`), so the RNG state is exactly `(data_seed, data_position)`. u64 values are stored
/// bit-for-bit as i64.
fn training_state_tensors(step: u64, t: &TrainingMeta) -> Result<Vec<(String, Tensor)>> {
    let scalar = |v: u64| Tensor::new(&[v as i64], &Device::Cpu);
    Ok(vec![
        ("global_step".into(), scalar(step)?),
        ("lr_schedule_step".into(), scalar(step)?),
        ("data_position".into(), scalar(t.data_position)?),
        ("rng_data_seed".into(), scalar(t.data_seed)?),
    ])
}

impl From<CheckpointError> for EngineError {
    fn from(e: CheckpointError) -> Self {
        EngineError::Checkpoint(e)
    }
}
