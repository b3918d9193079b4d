//! The contract between models and the engine: a model is an ordered list of layers that a
//! partition can cut between any two of them.
//!
//! A [`LayerSpec`] is plain data (shapes, names, hyper-parameters) that can be shipped to a stage
//! thread; the stage calls [`LayerSpec::build`] there with its own [`ParamStore`], so parameters
//! are created on the stage's device and owned by it. Parameter names are the ecosystem's
//! (Hugging Face GPT-2, torchvision ResNet), so a checkpoint maps one to one.
//!
//! Weight tying is expressed by name: two layers that ask for the same parameter name share it.
//! Inside one stage they get the very same `Var` (autograd sums the gradients); across stages
//! each stage holds a copy and the executor sums the copies' gradients before the optimizer
//! step, so the copies stay identical.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::input::{BatchCheck, InputKindCheck};

/// Whether a forward pass is for training (batch statistics, autograd) or evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// How a parameter is initialised. Initialisation is a pure function of (seed, name), so every
/// stage layout and the single-device reference start from identical weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f64,
    },
    /// Kaiming-normal with `fan_out` mode and ReLU gain, torchvision's conv init.
    KaimingNormalFanOut,
    /// Uniform in `[-bound, bound]`.
    Uniform {
        bound: f64,
    },
    /// Every element `value` (candle-nn's `Init::Const` other than 0 and 1).
    Constant {
        value: f64,
    },
}

/// A parameter's name, shape, initialiser, and whether weight decay applies to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// GPT convention: matrices decay, biases and norm gains do not.
    pub weight_decay: bool,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        let weight_decay = shape.len() >= 2;
        Self { name: name.into(), shape: shape.to_vec(), init, weight_decay }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Creates the initial value on `device`, deterministically from `(seed, name)`.
    pub fn initial_value(&self, seed: u64, device: &Device) -> Result<Tensor> {
        let n = self.numel();
        let data: Vec<f32> = match self.init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal { std } => sample_normal(seed, &self.name, n, std)?,
            Init::KaimingNormalFanOut => {
                // fan_out = out_channels * kernel area, for a conv weight (O, I, kh, kw).
                let fan_out = self.shape[0] * self.shape.iter().skip(2).product::<usize>();
                let std = (2.0 / fan_out.max(1) as f64).sqrt();
                sample_normal(seed, &self.name, n, std)?
            }
            Init::Constant { value } => vec![value as f32; n],
            Init::Uniform { bound } => {
                if !(bound.is_finite() && bound >= 0.0) {
                    candle_core::bail!("{}: uniform init bound must be finite and non-negative, got {bound}", self.name)
                }
                let mut rng = param_rng(seed, &self.name);
                (0..n).map(|_| rng.random_range(-bound..=bound) as f32).collect()
            }
        };
        Tensor::from_vec(data, self.shape.as_slice(), device)
    }
}

fn param_rng(seed: u64, name: &str) -> StdRng {
    // FNV-1a of the name, mixed with the seed: stable across runs and platforms.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    StdRng::seed_from_u64(h ^ seed.wrapping_mul(0x9E3779B97F4A7C15))
}

fn sample_normal(seed: u64, name: &str, n: usize, std: f64) -> Result<Vec<f32>> {
    // `Init::Normal` is public: a NaN or negative std is the caller's input, not a bug here.
    let bad = || candle_core::Error::Msg(format!("{name}: normal init needs a finite std >= 0, got {std}"));
    if !(std.is_finite() && std >= 0.0) {
        return Err(bad());
    }
    let normal = Normal::new(0.0, std).map_err(|_| bad())?;
    let mut rng = param_rng(seed, name);
    Ok((0..n).map(|_| normal.sample(&mut rng) as f32).collect())
}

/// A stage's parameters: one `Var` per name, created on the stage's device.
///
/// Layers ask the store for their parameters while being built; a name asked for twice returns
/// the same `Var` (weight tying). Values come from `overrides` when given (resuming, importing),
/// otherwise from the deterministic initialiser.
#[derive(Debug)]
pub struct ParamStore {
    device: Device,
    seed: u64,
    vars: BTreeMap<String, (ParamSpec, Var)>,
    overrides: HashMap<String, Tensor>,
    /// A shared view (see [`ParamStore::shared_view`]): hands out detached tensors of another
    /// store's variables instead of creating any.
    view_of: Option<BTreeMap<String, (ParamSpec, Tensor)>>,
}

impl ParamStore {
    pub fn new(device: Device, seed: u64) -> Self {
        Self { device, seed, vars: BTreeMap::new(), overrides: HashMap::new(), view_of: None }
    }

    /// A store whose parameters are this store's, detached: same storage (so they follow every
    /// optimizer step, which updates variables in place), but not variables, so a forward
    /// through layers built from it records no autograd graph. Evaluation uses it.
    pub fn shared_view(&self) -> Self {
        let view =
            self.vars.iter().map(|(n, (spec, var))| (n.clone(), (spec.clone(), var.as_tensor().detach()))).collect();
        Self {
            device: self.device.clone(),
            seed: self.seed,
            vars: BTreeMap::new(),
            overrides: HashMap::new(),
            view_of: Some(view),
        }
    }

    /// Like [`ParamStore::shared_view`], but in `dtype` (mixed precision): each parameter is a
    /// copy of its variable in `dtype`, in storage of its own. The layers compute with these;
    /// the variables stay the f32 masters the optimizer updates, and
    /// [`ParamStore::refresh_compute_copies`] writes them back into the copies after each step.
    /// Returns the view and the copies by name.
    pub fn compute_view(&self, dtype: DType) -> Result<(Self, Vec<(String, Tensor)>)> {
        let mut view = BTreeMap::new();
        let mut copies = Vec::with_capacity(self.vars.len());
        for (name, (spec, var)) in &self.vars {
            let copy = var.as_tensor().detach().to_dtype(dtype)?.contiguous()?;
            copies.push((name.clone(), copy.clone()));
            view.insert(name.clone(), (spec.clone(), copy));
        }
        let store = Self {
            device: self.device.clone(),
            seed: self.seed,
            vars: BTreeMap::new(),
            overrides: HashMap::new(),
            view_of: Some(view),
        };
        Ok((store, copies))
    }

    /// Writes every variable, rounded to the copies' dtype, into the copies made by
    /// [`ParamStore::compute_view`], in place (the layers hold the same storage).
    pub fn refresh_compute_copies(&self, copies: &[(String, Tensor)]) -> Result<()> {
        for (name, copy) in copies {
            let Some((_, var)) = self.vars.get(name) else {
                candle_core::bail!("no variable {name} behind a compute copy")
            };
            let rounded = var.as_tensor().to_dtype(copy.dtype())?;
            copy.slice_set(&rounded, 0, 0)?;
        }
        Ok(())
    }

    /// Values to use instead of the initialiser, by parameter name (shapes are checked).
    pub fn with_overrides(mut self, overrides: HashMap<String, Tensor>) -> Self {
        self.overrides = overrides;
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Returns the parameter named by `spec`, creating it on first use.
    pub fn get(&mut self, spec: &ParamSpec) -> Result<Tensor> {
        if let Some(view) = &self.view_of {
            return match view.get(&spec.name) {
                Some((existing, t)) if existing.shape == spec.shape => Ok(t.clone()),
                Some((existing, _)) => candle_core::bail!(
                    "parameter {} requested with shape {:?} but exists with shape {:?}",
                    spec.name,
                    spec.shape,
                    existing.shape
                ),
                None => candle_core::bail!("parameter {} is not in the store this view shares", spec.name),
            };
        }
        if let Some((existing, var)) = self.vars.get(&spec.name) {
            if existing.shape != spec.shape {
                candle_core::bail!(
                    "parameter {} requested with shape {:?} but already exists with shape {:?}",
                    spec.name,
                    spec.shape,
                    existing.shape
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let value = match self.overrides.get(&spec.name) {
            Some(t) => {
                if t.dims() != spec.shape.as_slice() {
                    candle_core::bail!("parameter {}: expected shape {:?}, got {:?}", spec.name, spec.shape, t.dims());
                }
                // `Var::from_tensor` below copies into storage of its own; no copy needed here
                // (a resumed gpt2 would otherwise hold its weights three times at once).
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None => spec.initial_value(self.seed, &self.device)?,
        };
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        self.vars.insert(spec.name.clone(), (spec.clone(), var));
        Ok(tensor)
    }

    /// All parameters, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &ParamSpec, &Var)> {
        self.vars.iter().map(|(k, (s, v))| (k.as_str(), s, v))
    }

    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// A non-trainable tensor a layer keeps (BatchNorm's running statistics), as data: checkpoints
/// use these to know, before any stage exists, exactly which buffers a model has.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Whether a training forward is a micro-batch's first or a recomputation before its backward
/// (activation recomputation). Layers with side effects (BatchNorm's running statistics) apply
/// them on the first pass only, so recomputing never counts a micro-batch twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    First,
    Recompute,
}

/// What a layer's training forward keeps for its backward (or what its input-gradient step
/// keeps for its weight-gradient step): a layer-specific value, opaque to the engine, plus
/// handles to the tensors it holds so the engine can count the stash's bytes.
pub struct Saved {
    value: Box<dyn Any + Send>,
    tensors: Vec<Tensor>,
}

impl Saved {
    /// Wraps `value`, which keeps `tensors` alive (listed for memory accounting only).
    pub fn new<T: Any + Send>(value: T, tensors: &[&Tensor]) -> Self {
        Self { value: Box::new(value), tensors: tensors.iter().map(|t| (*t).clone()).collect() }
    }

    /// Wraps `value` with handles to the tensors it keeps (collected before `value` took them).
    pub fn with_handles<T: Any + Send>(value: T, tensors: Vec<Tensor>) -> Self {
        Self { value: Box::new(value), tensors }
    }

    /// Nothing saved (a layer whose backward needs nothing, e.g. an identity).
    pub fn empty() -> Self {
        Self::new((), &[])
    }

    /// The tensors this holds, for memory accounting.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// Takes the value back as the type the layer stored; `layer` names it in the error.
    pub fn take<T: Any>(self, layer: &str) -> Result<T> {
        match self.value.downcast::<T>() {
            Ok(v) => Ok(*v),
            Err(_) => candle_core::bail!("{layer}: backward got state saved by another layer"),
        }
    }
}

impl Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved").field("tensors", &self.tensors.len()).finish()
    }
}

/// Weight gradients by parameter name, summed over micro-batches as a stage's `W` steps add
/// them. The first gradient of a name is copied into storage of its own so later ones can be
/// added in place (no fresh tensor per micro-batch).
#[derive(Debug, Default)]
pub struct Gradients {
    by_name: BTreeMap<String, Tensor>,
}

impl Gradients {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `grad` to the gradient of `name`. Sums are kept in f32 whatever the compute dtype:
    /// a bf16 gradient (mixed precision) is widened before it is added.
    pub fn add(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        if grad.dtype() != DType::F32 && grad.dtype() != DType::F64 {
            return self.add(name, &grad.to_dtype(DType::F32)?);
        }
        match self.by_name.get(name) {
            Some(acc) => brigade_kernels::accumulate(acc, grad),
            None => {
                // A fresh, contiguous allocation of its own (`copy` keeps a strided layout).
                let own = if grad.is_contiguous() { grad.copy()? } else { grad.contiguous()? };
                self.by_name.insert(name.to_string(), own);
                Ok(())
            }
        }
    }

    /// Adds the matrix product `a · b` to the gradient of `name`: into the existing sum in
    /// place (one GEMM, no temporary), or as the first term.
    pub fn add_matmul(&mut self, name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dtype() != DType::F32 && a.dtype() != DType::F64 {
            // Mixed precision: the product in the compute dtype (f32 accumulation inside the
            // GEMM), widened into the f32 sum.
            return self.add(name, &a.matmul(b)?);
        }
        match self.by_name.get(name) {
            Some(acc) => brigade_kernels::matmul_accumulate(acc, a, b),
            None => {
                // A product is a fresh, contiguous allocation: it can be the accumulator as is.
                // `linear` reads the transposed operand in place and skips the zero-fill.
                self.by_name.insert(name.to_string(), brigade_kernels::linear(a, b, None, None)?);
                Ok(())
            }
        }
    }

    /// Adds row `i` of `rows` `(N, C)` to row `ids[i]` of the gradient of `name`, a `(table_rows,
    /// C)` embedding table's: scattered into the existing sum in place, or into zeros as the
    /// first term. The table-sized zeros exist once per step, not once per micro-batch.
    pub fn add_rows(&mut self, name: &str, ids: &Tensor, rows: &Tensor, table_rows: usize) -> Result<()> {
        if rows.dtype() != DType::F32 && rows.dtype() != DType::F64 {
            return self.add_rows(name, ids, &rows.to_dtype(DType::F32)?, table_rows);
        }
        if !self.by_name.contains_key(name) {
            let (_, width) = rows.dims2()?;
            let zeros = Tensor::zeros((table_rows, width), rows.dtype(), rows.device())?;
            self.by_name.insert(name.to_string(), zeros);
        }
        match self.by_name.get(name) {
            Some(acc) => brigade_kernels::index_add_rows(acc, ids, rows),
            None => candle_core::bail!("gradient of {name} vanished while it was added to"),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Hands the sums out and starts over (end of a step).
    pub fn take(&mut self) -> BTreeMap<String, Tensor> {
        std::mem::take(&mut self.by_name)
    }
}

/// A built layer, living on one stage's thread.
///
/// Two ways to run it:
/// - [`Layer::forward`] through candle's autograd (any op on a variable records a graph): the
///   single-device reference trains this way, and it is the independent yardstick.
/// - The explicit training path the pipeline runs, on layers built over detached parameters
///   ([`ParamStore::shared_view`]), so no graph exists at all: [`Layer::forward_train`] keeps
///   what the backward needs, [`Layer::backward_input`] computes only the input gradient (plus
///   what the weight step needs), and [`Layer::backward_weight`] computes the weight gradients
///   and adds them into the stage's sums. Zero-bubble schedules run the last two apart.
pub trait Layer: Send {
    /// Runs the layer on one micro-batch. `&mut self` because some layers (BatchNorm) update
    /// running statistics in training mode.
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor>;

    /// Training forward of the explicit path: the output and what the backward needs.
    fn forward_train(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Saved)>;

    /// The input gradient for output gradient `dy` (`None` when `need_dx` is false: the
    /// stage's first layer on data), and what [`Layer::backward_weight`] needs.
    fn backward_input(&mut self, saved: Saved, dy: &Tensor, need_dx: bool) -> Result<(Option<Tensor>, Saved)>;

    /// The weight gradients, added into `grads` by parameter name.
    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()>;

    /// The last layer's training forward fused with the stage's loss, for a layer whose
    /// output is only ever the loss's input and is too large to keep (a language model's
    /// logits: B·T × V floats, 411 MB for GPT-2 at 2 × 1024 tokens). The layer computes the
    /// micro-batch's loss itself (normalised as [`crate::loss::microbatch_loss`] does) without
    /// materialising its whole output, e.g. chunk by chunk.
    ///
    /// The loss's gradient is known as soon as the loss is, so the layer runs as much of its
    /// backward as `backward` asks for while each chunk is in hand (see [`LossBackward`]) and
    /// returns what [`Layer::backward_input_from_loss`] and [`Layer::backward_weight`] need.
    ///
    /// `None`, the default, means the layer does not fuse this loss: the stage then runs
    /// [`Layer::forward_train`] and takes the loss of its output. A fused layer must give the
    /// same loss and gradients as that path (to rounding), whichever `backward` it is given.
    fn forward_with_loss(
        &mut self,
        x: &Tensor,
        loss: &LossInput<'_>,
        backward: LossBackward<'_>,
        pass: Pass,
    ) -> Result<Option<(Tensor, Saved)>> {
        let _ = (x, loss, backward, pass);
        Ok(None)
    }

    /// Evaluation's counterpart of [`Layer::forward_with_loss`] (evaluation mode, nothing
    /// kept): the micro-batch's loss, normalised by `loss.global_terms`, and how many of its
    /// predictions are right (a `u32` scalar), without the whole output existing at once.
    /// `None`, the default: the stage takes both from [`Layer::forward`]'s output.
    fn eval_with_loss(&mut self, x: &Tensor, loss: &LossInput<'_>) -> Result<Option<(Tensor, Tensor)>> {
        let _ = (x, loss);
        Ok(None)
    }

    /// The input gradient after [`Layer::forward_with_loss`] (which already knew the output's
    /// gradient), and what [`Layer::backward_weight`] still needs.
    fn backward_input_from_loss(&mut self, saved: Saved, need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let _ = (saved, need_dx);
        candle_core::bail!("this layer does not compute its loss itself (forward_with_loss returned None)")
    }

    /// Incremental decoding (generation with a KV cache): runs the layer on the `T_new`
    /// positions `offset..offset + T_new` of a sequence whose earlier positions went through
    /// earlier calls. Layers with attention keep their keys and values between calls; an
    /// `offset` of 0 starts a new sequence and drops what they kept. Evaluation mode. Layers
    /// that see each position independently (embeddings need the offset, heads nothing) just
    /// run their forward; the default is an error, for models that cannot decode this way.
    fn forward_incremental(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let _ = (x, offset);
        candle_core::bail!("this layer has no incremental (KV-cache) forward")
    }

    /// Non-trainable state that belongs in checkpoints (e.g. BatchNorm running statistics),
    /// under ecosystem names.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Restores buffers saved by [`Layer::buffers`]; unknown names are an error.
    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        let _ = buffers;
        Ok(())
    }

    /// The parameters this layer was built over changed in place (the optimizer's step). A
    /// layer that keeps values derived from them between micro-batches (a weight's transposed
    /// copy for its input gradient) drops them here, to derive them again from the new values
    /// when next needed. Whoever writes into a built layer's parameters calls this before the
    /// layer runs again; the default keeps nothing.
    fn parameters_changed(&mut self) {}

    /// Bytes this layer holds now beyond its parameters and its micro-batches' stashes:
    /// values it keeps between micro-batches (what [`Layer::parameters_changed`] drops). The
    /// profile counts them with the parameters, as memory a stage holds all step.
    fn kept_bytes(&self) -> u64 {
        0
    }
}

/// How much of its backward a layer that fuses the loss ([`Layer::forward_with_loss`]) runs
/// during its forward.
#[derive(Debug)]
pub enum LossBackward<'a> {
    /// None: the forward's activations are recomputed before the backward, so this pass
    /// computes only the loss and keeps nothing.
    LossOnly,
    /// All of it: the weight gradients go into the step's sums now, and only the input
    /// gradient's last steps are left for [`Layer::backward_input_from_loss`]. For schedules
    /// whose backward is one `B` action, where nothing is gained by waiting.
    Full(&'a mut Gradients),
    /// The input gradient's part: the weight gradients wait for [`Layer::backward_weight`]
    /// (zero-bubble schedules, whose `W` actions fill the pipeline's bubbles; done here, the
    /// head's weight gradient would lengthen the critical path instead).
    InputOnly,
}

/// What a last layer needs to compute the stage's loss itself ([`Layer::forward_with_loss`]).
#[derive(Debug, Clone, Copy)]
pub struct LossInput<'a> {
    pub kind: LossKind,
    /// The micro-batch's targets, in the shape the unfused loss expects next to the output.
    pub targets: &'a Tensor,
    /// Loss terms in the whole global batch (the loss is normalised by it).
    pub global_terms: usize,
}

/// A layer as data: what to build, shippable to any stage.
pub trait LayerSpec: Send + Sync + Debug {
    /// The layer's name prefix, e.g. `transformer.h.3` or `layer2.1`.
    fn name(&self) -> String;

    /// The parameters this layer uses (including tied ones it shares with other layers).
    fn params(&self) -> Vec<ParamSpec>;

    /// Builds the layer on a stage, taking its parameters from `store`. Layers keep the
    /// tensors the store returns (not copies): evaluation builds a second instance from a
    /// [`ParamStore::shared_view`], and it must see every optimizer step.
    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>>;

    /// The buffers the built layer reports through [`Layer::buffers`] (names, shapes, dtypes).
    fn buffer_specs(&self) -> Vec<BufferSpec> {
        Vec::new()
    }

    /// Number of parameter elements this layer uses (tied parameters counted in each user).
    fn param_count(&self) -> usize {
        self.params().iter().map(ParamSpec::numel).sum()
    }
}

/// What the last stage computes from the model's output and the targets. Every loss is a sum
/// over the micro-batch's terms divided by the terms of the whole global batch (see
/// [`crate::loss`]), so it does not depend on how the batch is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// Cross-entropy over the last dimension against integer class/token ids. Works for
    /// language models (`(B, T, V)` logits, `(B, T)` targets, token cross-entropy) and
    /// classifiers (`(B, K)`, `(B,)`, class cross-entropy).
    CrossEntropy,
    /// Mean squared error against float targets of the output's shape (regression): the mean
    /// over every element of the global batch's targets.
    MeanSquaredError,
    /// A loss of the user's: see [`CustomLoss`].
    Custom(CustomLoss),
}

impl LossKind {
    /// Whether the targets are integer class or token ids (the driver checks their dtype).
    pub fn needs_integer_targets(&self) -> bool {
        matches!(self, Self::CrossEntropy)
    }
}

/// A user-supplied loss: a function of `(output, targets)` returning the *sum* of the
/// micro-batch's loss terms as a scalar, written with candle ops (brigade differentiates it
/// with candle's autograd). brigade divides it by the number of target elements in the whole
/// global batch, so the reported loss is the mean per target element.
///
/// A plain function (or a closure that captures nothing) keeps [`LossKind`] `Copy` and lets
/// every stage thread call it; `name` identifies it in messages and comparisons.
#[derive(Clone, Copy)]
pub struct CustomLoss {
    pub name: &'static str,
    pub sum: fn(&Tensor, &Tensor) -> Result<Tensor>,
}

impl CustomLoss {
    pub fn new(name: &'static str, sum: fn(&Tensor, &Tensor) -> Result<Tensor>) -> Self {
        Self { name, sum }
    }
}

impl Debug for CustomLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CustomLoss({})", self.name)
    }
}

/// Two custom losses are the same loss when they have the same name.
impl PartialEq for CustomLoss {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for CustomLoss {}

/// The element type a model takes as input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputKind {
    /// Integer token ids `(B, T)` with `T <= context` and ids `< vocab`.
    Tokens { vocab: usize, context: usize },
    /// Images `(B, C, H, W)` in f32 with the given channel count.
    Images { channels: usize },
    /// f32 tensors `(B, ..shape)`: feature vectors and other inputs of user-defined models
    /// (see [`crate::custom`]).
    Features { shape: Vec<usize> },
}

/// A model the engine can partition and train.
pub trait PipelineModel: Send + Sync + Debug {
    /// Human-readable name (usually the preset).
    fn name(&self) -> String;
    /// The ordered layers; a partition cuts this list.
    fn layers(&self) -> Vec<Arc<dyn LayerSpec>>;
    fn loss(&self) -> LossKind;
    fn input(&self) -> InputKind;
    /// Number of output classes (vocabulary size for language models).
    fn num_classes(&self) -> usize;

    /// The model's configuration as JSON, enough to rebuild it (checkpoints store it).
    /// Models that cannot be rebuilt from data return `null`.
    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Distinct trainable parameters (tied ones once), from the specs alone: nothing is
    /// allocated, so this is cheap even for the largest presets.
    fn num_params(&self) -> usize {
        unique_params(&self.layers()).iter().map(ParamSpec::numel).sum()
    }

    /// What a batch must satisfy before the pipeline hands it to the stages (checked on the
    /// caller's thread, so a bad batch fails its own call instead of stopping the pipeline).
    /// The default enforces what [`PipelineModel::input`] promises; a model with further
    /// requirements returns its own check.
    fn batch_check(&self) -> Arc<dyn BatchCheck> {
        Arc::new(InputKindCheck { model: self.name(), input: self.input(), num_classes: self.num_classes() })
    }

    /// Whether the layers can compute in bf16/f16 under mixed precision (f32 masters); a model
    /// that cannot yet says why, and the pipeline refuses the config with that reason.
    fn mixed_precision(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Every distinct parameter of `layers`, in first-use order (tied parameters once).
pub fn unique_params(layers: &[Arc<dyn LayerSpec>]) -> Vec<ParamSpec> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for layer in layers {
        for p in layer.params() {
            if seen.insert(p.name.clone()) {
                out.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_init_parameters_are_errors_not_panics() {
        let dev = Device::Cpu;
        for init in [Init::Normal { std: -1.0 }, Init::Normal { std: f64::NAN }, Init::Uniform { bound: f64::INFINITY }]
        {
            let e = ParamSpec::new("w", &[2, 2], init).initial_value(0, &dev).unwrap_err().to_string();
            assert!(e.contains("w: ") && e.contains("init"), "{e}");
        }
        let w = ParamSpec::new("w", &[2, 2], Init::Normal { std: 0.02 }).initial_value(0, &dev).unwrap();
        assert_eq!(w.dims(), &[2, 2]);
    }
}
