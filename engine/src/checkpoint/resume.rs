//! Reading a checkpoint back for a model: every tensor the model needs is checked (present,
//! right shape, right dtype, nothing extra) before any of it is used, and the result is laid
//! out by canonical name so any partition can take its part.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::{Checkpoint, CheckpointError, ExpectedTensor, ShardSet};
use crate::layer::{unique_params, BufferSpec, ParamSpec, PipelineModel};
use crate::optim::{OptimizerConfig, ParamState};

/// Everything a pipeline restores from a checkpoint, by canonical name.
#[derive(Debug, Clone, Default)]
pub struct ResumeState {
    pub params: HashMap<String, Tensor>,
    pub buffers: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, ParamState>,
    /// Optimizer steps already taken.
    pub step: u64,
}

/// The weight-file tensors `model` has: every distinct parameter (f32), then every buffer.
/// `param_dtypes` lists the dtypes accepted on disk for parameters (all converted to f32).
pub fn expected_weights(model: &dyn PipelineModel, param_dtypes: &[DType]) -> Vec<ExpectedTensor> {
    let layers = model.layers();
    let mut out: Vec<ExpectedTensor> = unique_params(&layers)
        .into_iter()
        .map(|p| ExpectedTensor { name: p.name, shape: p.shape, dtypes: param_dtypes.to_vec() })
        .collect();
    for layer in &layers {
        for b in layer.buffer_specs() {
            let dtypes = if b.dtype == DType::F32 { param_dtypes.to_vec() } else { vec![b.dtype] };
            out.push(ExpectedTensor { name: b.name, shape: b.shape, dtypes });
        }
    }
    out
}

impl Checkpoint {
    /// Loads and validates everything `model` needs to continue training from this checkpoint.
    pub fn load_resume(&self, model: &dyn PipelineModel) -> Result<ResumeState, CheckpointError> {
        let mut state = self.load_weights(model)?;
        state.optimizer = self.load_optimizer(model)?;
        Ok(state)
    }

    /// Loads and validates parameters and buffers only (inference, fine-tuning).
    pub fn load_weights(&self, model: &dyn PipelineModel) -> Result<ResumeState, CheckpointError> {
        let expected = expected_weights(model, &[DType::F32]);
        let param_names: HashSet<String> = unique_params(&model.layers()).into_iter().map(|p| p.name).collect();
        let mut weights = self.weights.load_validated(&expected, "parameter or buffer")?;
        let mut state = ResumeState { step: self.meta.step, ..Default::default() };
        for e in &expected {
            let t = weights.remove(&e.name).expect("load_validated returns every expected tensor");
            if param_names.contains(&e.name) {
                state.params.insert(e.name.clone(), t);
            } else {
                state.buffers.insert(e.name.clone(), t);
            }
        }
        Ok(state)
    }

    /// The optimizer state the checkpoint's optimizer kind implies: after the first step, every
    /// parameter has it (AdamW moments and step; SGD momentum buffer when momentum is on).
    fn load_optimizer(&self, model: &dyn PipelineModel) -> Result<HashMap<String, ParamState>, CheckpointError> {
        self.check_optimizer(model)?;
        match &self.optimizer {
            Some(set) => optimizer_states(set, self.meta.optimizer, self.meta.step, &unique_params(&model.layers())),
            None => Ok(HashMap::new()),
        }
    }

    /// Checks from the headers that the optimizer files hold exactly the state `model` needs.
    fn check_optimizer(&self, model: &dyn PipelineModel) -> Result<(), CheckpointError> {
        let expected = expected_optimizer(self.meta.optimizer, self.meta.step, &unique_params(&model.layers()));
        match &self.optimizer {
            Some(set) => set.check_mapped(&expected, |n| Some(n.to_string()), "optimizer state").map(|_| ()),
            None => match expected.first() {
                Some(first) => Err(CheckpointError::MissingTensor {
                    path: self.dir.join(format!("{}.safetensors.index.json", super::OPTIMIZER_PREFIX)),
                    name: first.name.clone(),
                }),
                None => Ok(()),
            },
        }
    }
}

/// Reads the optimizer state of `params` (validated beforehand) from `set`.
fn optimizer_states(
    set: &ShardSet,
    optimizer: OptimizerConfig,
    meta_step: u64,
    params: &[ParamSpec],
) -> Result<HashMap<String, ParamState>, CheckpointError> {
    let mut out = HashMap::new();
    if meta_step == 0 {
        return Ok(out);
    }
    for p in params {
        let state = match optimizer {
            OptimizerConfig::AdamW { .. } => {
                let step = set
                    .load(&format!("{}.step", p.name), DType::F64)?
                    .flatten_all()
                    .and_then(|s| s.get(0))
                    .and_then(|s| s.to_scalar::<f64>())
                    .map_err(|e| CheckpointError::invalid(&set.source, format!("{}.step: {e}", p.name)))?;
                if !(step >= 0.0 && step.fract() == 0.0) {
                    return Err(CheckpointError::invalid(
                        &set.source,
                        format!("{}.step is {step}, not a step count", p.name),
                    ));
                }
                // A parameter cannot have taken more optimizer steps than the run has.
                if step > meta_step as f64 {
                    return Err(CheckpointError::invalid(
                        &set.source,
                        format!("{}.step is {step}, but the checkpoint is at step {meta_step}", p.name),
                    ));
                }
                let exp_avg_sq = format!("{}.exp_avg_sq", p.name);
                let exp_avg_sq_t = set.load(&exp_avg_sq, DType::F32)?;
                check_non_negative(set, &exp_avg_sq, &exp_avg_sq_t)?;
                ParamState::AdamW {
                    exp_avg: set.load(&format!("{}.exp_avg", p.name), DType::F32)?,
                    exp_avg_sq: exp_avg_sq_t,
                    step: step as u64,
                }
            }
            OptimizerConfig::Sgd { momentum, .. } if momentum != 0.0 => {
                ParamState::Sgd { momentum_buffer: Some(set.load(&format!("{}.momentum_buffer", p.name), DType::F32)?) }
            }
            OptimizerConfig::Sgd { .. } => continue,
        };
        out.insert(p.name.clone(), state);
    }
    Ok(out)
}

/// AdamW's second moments are running means of squares: a negative one is a damaged file
/// (finite values are already checked by every load), and would turn the next step into NaN.
fn check_non_negative(set: &ShardSet, name: &str, t: &Tensor) -> Result<(), CheckpointError> {
    let min = t
        .flatten_all()
        .and_then(|t| t.min(0))
        .and_then(|m| m.to_scalar::<f32>())
        .map_err(|e| CheckpointError::invalid(set.path_of(name), format!("{name}: {e}")))?;
    if min < 0.0 {
        return Err(CheckpointError::invalid(
            set.path_of(name),
            format!("tensor {name} holds a negative value ({min}); AdamW second moments never are, so the optimizer state is damaged"),
        ));
    }
    Ok(())
}

/// The optimizer tensors a checkpoint with this optimizer and step holds for `params`.
fn expected_optimizer(optimizer: OptimizerConfig, step: u64, params: &[ParamSpec]) -> Vec<ExpectedTensor> {
    let mut expected = Vec::new();
    if step == 0 {
        return expected;
    }
    for p in params {
        match optimizer {
            OptimizerConfig::AdamW { .. } => {
                expected.push(ExpectedTensor {
                    name: format!("{}.exp_avg", p.name),
                    shape: p.shape.clone(),
                    dtypes: vec![DType::F32],
                });
                expected.push(ExpectedTensor {
                    name: format!("{}.exp_avg_sq", p.name),
                    shape: p.shape.clone(),
                    dtypes: vec![DType::F32],
                });
                expected.push(ExpectedTensor {
                    name: format!("{}.step", p.name),
                    shape: vec![1],
                    dtypes: vec![DType::F64],
                });
            }
            OptimizerConfig::Sgd { momentum, .. } if momentum != 0.0 => {
                expected.push(ExpectedTensor {
                    name: format!("{}.momentum_buffer", p.name),
                    shape: p.shape.clone(),
                    dtypes: vec![DType::F32],
                });
            }
            OptimizerConfig::Sgd { .. } => {}
        }
    }
    expected
}

/// A checkpoint whose every tensor was checked against the model (from the headers), from
/// which each stage then loads only its own parameters, buffers and optimizer state, on its
/// own thread: no stage's tensors are gathered anywhere, and stages load in parallel.
#[derive(Debug)]
pub struct StageLoader {
    weights: ShardSet,
    optimizer: Option<ShardSet>,
    optimizer_config: OptimizerConfig,
    step: u64,
}

impl Checkpoint {
    /// Validates the checkpoint against `model` without reading tensor data, and turns it into
    /// a loader the pipeline's stages read from (see `PipelineConfig::resume_from_checkpoint`).
    pub fn into_stage_loader(self, model: &dyn PipelineModel) -> Result<StageLoader, CheckpointError> {
        self.weights.check_mapped(
            &expected_weights(model, &[DType::F32]),
            |n| Some(n.to_string()),
            "parameter or buffer",
        )?;
        self.check_optimizer(model)?;
        Ok(StageLoader {
            weights: self.weights,
            optimizer: self.optimizer,
            optimizer_config: self.meta.optimizer,
            step: self.meta.step,
        })
    }
}

impl StageLoader {
    /// Optimizer steps the checkpoint had taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// One stage's part: the given parameters and buffers, and those parameters' optimizer state.
    pub fn load_stage(&self, params: &[ParamSpec], buffers: &[BufferSpec]) -> Result<ResumeState, CheckpointError> {
        let mut state = ResumeState { step: self.step, ..Default::default() };
        for p in params {
            state.params.insert(p.name.clone(), self.weights.load(&p.name, DType::F32)?);
        }
        for b in buffers {
            state.buffers.insert(b.name.clone(), self.weights.load(&b.name, b.dtype)?);
        }
        if let Some(set) = &self.optimizer {
            state.optimizer = optimizer_states(set, self.optimizer_config, self.step, params)?;
        }
        Ok(state)
    }
}
