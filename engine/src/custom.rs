//! Bring your own model: layers written as a plain candle forward, and a [`Sequential`] builder
//! that turns an ordered list of them into a [`PipelineModel`].
//!
//! An *autograd layer* is a closure that builds a module from a candle-nn [`VarBuilder`]
//! (`candle_nn::linear`, `embedding`, `conv2d`, `layer_norm`, or any `vb.get(shape, name)`) and
//! returns it; its forward is any candle code. brigade derives the three steps a schedule runs:
//! - `F` runs the forward and keeps the recorded autograd graph (under
//!   [`Recompute::Full`](crate::compute::Recompute) the stage keeps only its input and reruns
//!   the forward before the backward);
//! - `I` backpropagates the output gradient through the graph with candle's autograd: the input
//!   gradient goes to the previous layer, the weight gradients are kept;
//! - `W` adds the kept weight gradients into the step's sums.
//!
//! Such layers gain nothing from the `I`/`W` split of zero-bubble schedules (candle's backward
//! computes both at once, during `I`), but they run under every schedule, and they mix freely
//! with explicit layers ([`Sequential::explicit`]), which stay the fast path.
//!
//! Parameter names follow the layer names: a layer named `encoder.0` that calls
//! `candle_nn::linear(4, 8, vb.pp("proj"))` owns `encoder.0.proj.weight` and
//! `encoder.0.proj.bias`, so checkpoints and exports work unchanged. Two layers that ask for the
//! same full name share the parameter (weight tying, also across stages); `vb.root()` reaches
//! names outside the layer's prefix.
//!
//! Costs of the autograd path, besides the graph it keeps: a stage's layers compute on detached
//! views of its variables (see [`crate::compute`]), so an autograd layer computes on variable
//! copies of its parameters, refreshed before each forward (one copy of the layer's parameters
//! per micro-batch), and on a variable copy of its input. Mixed precision is refused.
//!
//! Training and evaluation: a layer's module is a candle-nn [`ModuleT`] (every `Module` is one),
//! run with `train = true` by every training forward (`F`, its recomputation, the single-device
//! reference) and `train = false` by evaluation, `predict` and decoding, so candle-nn's
//! `Dropout` (or a module of the user's) switches itself off outside training. Random ops draw
//! afresh on each run: under recomputation the backward's forward draws a new dropout mask, so
//! the gradient is that of the redrawn mask (as with PyTorch's checkpointing without RNG-state
//! replay), and such a layer cannot match a reference bit for bit. candle-nn's `BatchNorm` is
//! refused when the model is defined (its running statistics would be trained as parameters).
//!
//! Memory: the stash a forward keeps, as `Pipeline` step statistics and `profile` report it,
//! counts for an autograd layer its input's variable copy, its output and every intermediate
//! of the recorded graph (each storage once). Not counted: constants built inside the forward
//! that depend on no parameter or input (a causal mask), which ops of the graph may also hold.
//!
//! Known trap: candle-nn's fused `LayerNorm`/`RmsNorm` modules (on contiguous inputs) and
//! `softmax_last_dim` record no backward: candle's autograd silently stops at them, and plain
//! candle training would leave everything before them untrained. Here an autograd layer whose
//! parameter or input gets no gradient is an error naming it. Use [`layer_norm`] (same
//! parameters, composed of differentiable ops) and `candle_nn::ops::softmax` instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{ModuleT, VarBuilder};

use crate::input::{BatchCheck, InputKindCheck};
use crate::layer::{
    unique_params, Gradients, Init, InputKind, Layer, LayerSpec, LossKind, Mode, ParamSpec, ParamStore, Pass,
    PipelineModel, Saved,
};

/// A module that can live on a stage thread. [`ModuleT`] so that modules that behave differently
/// in training and evaluation (candle-nn's `Dropout`) learn which one runs; every candle
/// `Module` (and every `Fn(&Tensor) -> Result<Tensor>` closure) is one.
pub type BoxedModule = Box<dyn ModuleT + Send>;

/// What builds an autograd layer's module from its parameters.
type BuildFn = dyn Fn(VarBuilder) -> Result<BoxedModule> + Send + Sync;

/// A check of a batch the model declares: `(inputs, targets)` to an error message.
type CheckFn = dyn Fn(&Tensor, Option<&Tensor>) -> std::result::Result<(), String> + Send + Sync;

/// Converts a candle-nn initialiser into brigade's, which is a pure function of (seed, name) so
/// every stage layout starts from the same weights.
fn brigade_init(name: &str, shape: &Shape, init: candle_nn::Init) -> Result<Init> {
    use candle_nn::init::NormalOrUniform;
    Ok(match init {
        candle_nn::Init::Const(0.0) => Init::Zeros,
        candle_nn::Init::Const(1.0) => Init::Ones,
        candle_nn::Init::Const(value) => Init::Constant { value },
        candle_nn::Init::Randn { mean: 0.0, stdev } => Init::Normal { std: stdev },
        candle_nn::Init::Uniform { lo, up } if lo == -up => Init::Uniform { bound: up },
        candle_nn::Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => Init::Normal { std },
                NormalOrUniform::Uniform => Init::Uniform { bound: 3f64.sqrt() * std },
            }
        }
        other => candle_core::bail!(
            "{name}: initialiser {other:?} is not supported (use a zero-mean normal, a symmetric uniform, a constant \
             or Kaiming)"
        ),
    })
}

/// The names candle-nn's `batch_norm` gives its running statistics (buffers, not parameters).
const RUNNING_STATISTICS: [&str; 2] = [".running_mean", ".running_var"];

/// The backend that only records which parameters a layer asks for (names, shapes,
/// initialisers), so a model's parameter list is known without building it on a stage.
struct Recorder {
    /// Shared with the caller, who reads it once the `VarBuilder` owning this is gone.
    specs: Arc<Mutex<Vec<ParamSpec>>>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let spec = ParamSpec::new(name, s.dims(), brigade_init(name, &s, h)?);
        let mut specs = self.specs.lock().map_err(|_| candle_core::Error::Msg("parameter recorder poisoned".into()))?;
        match specs.iter().find(|p| p.name == name) {
            Some(p) if p.shape != spec.shape => candle_core::bail!(
                "parameter {name} requested with shape {:?} but already has shape {:?}",
                spec.shape,
                p.shape
            ),
            Some(_) => {}
            None => specs.push(spec),
        }
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: autograd layers create parameters with a shape (`vb.get(shape, name)`)")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.specs.lock().map(|s| s.iter().any(|p| p.name == name)).unwrap_or(false)
    }
}

/// A parameter an autograd layer computes with.
struct LayerParam {
    name: String,
    /// The tensor the module holds: a variable, so candle's backward gives its gradient.
    var: Tensor,
    /// The stage's detached view of the variable the optimizer updates, copied into `var`
    /// before each forward; `None` when `var` is that variable itself (the reference).
    source: Option<Tensor>,
}

/// The backend that hands a layer the stage's parameters, by full name.
struct StoreBackend<'a> {
    store: Mutex<&'a mut ParamStore>,
    specs: HashMap<String, ParamSpec>,
    params: Mutex<Vec<LayerParam>>,
}

impl SimpleBackend for StoreBackend<'_> {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, _: &Device) -> Result<Tensor> {
        if dtype != DType::F32 {
            candle_core::bail!("{name}: autograd layers compute in f32, not {dtype:?}");
        }
        let poisoned = || candle_core::Error::Msg("parameter store poisoned".into());
        let mut params = self.params.lock().map_err(|_| poisoned())?;
        if let Some(p) = params.iter().find(|p| p.name == name) {
            return Ok(p.var.clone());
        }
        let Some(spec) = self.specs.get(name) else {
            candle_core::bail!("{name}: the layer asked for a parameter it did not ask for when the model was defined")
        };
        if spec.shape != s.dims() {
            candle_core::bail!(
                "parameter {name} requested with shape {:?} but defined with {:?}",
                s.dims(),
                spec.shape
            );
        }
        let tensor = self.store.lock().map_err(|_| poisoned())?.get(spec)?;
        let param = if tensor.is_variable() {
            LayerParam { name: name.to_string(), var: tensor, source: None }
        } else {
            let var = Var::from_tensor(&tensor)?.as_tensor().clone();
            LayerParam { name: name.to_string(), var, source: Some(tensor) }
        };
        params.push(LayerParam { name: param.name.clone(), var: param.var.clone(), source: param.source.clone() });
        Ok(param.var)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: autograd layers create parameters with a shape (`vb.get(shape, name)`)")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }
}

/// An autograd layer as data: its name, the closure that builds it, and the parameters that
/// closure asks for (found by running it once against a recorder).
pub struct AutogradLayerSpec {
    name: String,
    build: Arc<BuildFn>,
    params: Vec<ParamSpec>,
}

impl Debug for AutogradLayerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutogradLayerSpec").field("name", &self.name).field("params", &self.params).finish()
    }
}

impl AutogradLayerSpec {
    /// A layer named `name` whose module `build` makes from a [`VarBuilder`] prefixed with
    /// `name`. `build` runs once here (on zeros, to learn the parameters) and once per stage.
    pub fn new<M, F>(name: impl Into<String>, build: F) -> Result<Self>
    where
        M: ModuleT + Send + 'static,
        F: Fn(VarBuilder) -> Result<M> + Send + Sync + 'static,
    {
        let name = name.into();
        if name.is_empty() {
            candle_core::bail!("a layer needs a non-empty name (it prefixes its parameter names)");
        }
        let build: Arc<BuildFn> = Arc::new(move |vb| Ok(Box::new(build(vb)?) as BoxedModule));
        let specs = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder { specs: specs.clone() };
        let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu).pp(&name);
        build(vb).map_err(|e| candle_core::Error::Msg(format!("defining layer {name}: {e}")))?;
        let params = specs.lock().map_err(|_| candle_core::Error::Msg("parameter recorder poisoned".into()))?.clone();
        if let Some(stat) = params.iter().find(|p| RUNNING_STATISTICS.iter().any(|s| p.name.ends_with(s))) {
            candle_core::bail!(
                "layer {name}: {} is a batch norm's running statistic, which an autograd layer would train as a \
                 parameter; candle-nn's BatchNorm is not supported in autograd layers (its statistics are buffers, \
                 updated once per micro-batch, which these layers cannot keep yet): use an explicit layer, or a norm \
                 without running statistics such as brigade_engine::custom::layer_norm",
                stat.name
            );
        }
        Ok(Self { name, build, params })
    }
}

impl LayerSpec for AutogradLayerSpec {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn params(&self) -> Vec<ParamSpec> {
        self.params.clone()
    }

    fn build(&self, store: &mut ParamStore) -> Result<Box<dyn Layer>> {
        let device = store.device().clone();
        let backend = StoreBackend {
            store: Mutex::new(store),
            specs: self.params.iter().map(|p| (p.name.clone(), p.clone())).collect(),
            params: Mutex::new(Vec::new()),
        };
        let params = Arc::new(backend);
        let vb = VarBuilder::from_backend(Box::new(ArcBackend(params.clone())), DType::F32, device).pp(&self.name);
        let module = (self.build)(vb)?;
        let backend = Arc::try_unwrap(params)
            .map_err(|_| candle_core::Error::Msg(format!("{}: the module kept its VarBuilder", self.name)))?;
        let params =
            backend.params.into_inner().map_err(|_| candle_core::Error::Msg("parameter store poisoned".into()))?;
        Ok(Box::new(AutogradLayer { name: self.name.clone(), module, params }))
    }
}

/// Lets the `VarBuilder` borrow a backend that `build` takes back afterwards.
struct ArcBackend<'a>(Arc<StoreBackend<'a>>);

impl SimpleBackend for ArcBackend<'_> {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// A built autograd layer on a stage.
struct AutogradLayer {
    name: String,
    module: BoxedModule,
    params: Vec<LayerParam>,
}

impl AutogradLayer {
    /// Copies the stage's current parameter values into the variables the module computes with
    /// (the optimizer updated the stage's variables in place since the last forward).
    fn refresh(&self) -> Result<()> {
        for p in &self.params {
            if let Some(source) = &p.source {
                p.var.slice_set(source, 0, 0)?;
            }
        }
        Ok(())
    }
}

impl AutogradLayer {
    /// The error for a gradient candle's autograd did not produce: the output does not depend
    /// on `what` through recorded ops, which is almost always an op without a backward that
    /// silently cut the graph (training on would leave weights unchanged without a word).
    fn cut_graph(&self, what: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: the output has no gradient with respect to {what}. An op without a backward cut candle's autograd \
             graph: candle-nn's fused layer_norm, rms_norm and softmax_last_dim are such ops; use \
             brigade_engine::custom::layer_norm and candle_nn::ops::softmax instead",
            self.name
        ))
    }
}

impl Layer for AutogradLayer {
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.refresh()?;
        self.module.forward_t(x, mode == Mode::Train)
    }

    fn forward_train(&mut self, x: &Tensor, _pass: Pass) -> Result<(Tensor, Saved)> {
        self.refresh()?;
        // A variable copy of a float input, so the backward yields its gradient; integer inputs
        // (token ids) have none.
        let input = if x.dtype().is_float() { Some(Var::from_tensor(&x.detach())?.as_tensor().clone()) } else { None };
        let y = self.module.forward_t(input.as_ref().unwrap_or(x), true)?;
        // The next layer gets the value only: the graph stays with this layer's backward.
        let out = y.detach();
        let handles = input.iter().cloned().chain(crate::memory::graph_tensors(&y)).collect();
        Ok((out, Saved::with_handles((input, y), handles)))
    }

    fn backward_input(&mut self, saved: Saved, dy: &Tensor, need_dx: bool) -> Result<(Option<Tensor>, Saved)> {
        let (input, y): (Option<Tensor>, Tensor) = saved.take(&self.name)?;
        if dy.dims() != y.dims() {
            candle_core::bail!(
                "{}: output gradient of shape {:?} for an output of shape {:?}",
                self.name,
                dy.dims(),
                y.dims()
            );
        }
        // d(sum(y * dy))/dy = dy exactly: backpropagating this scalar is backpropagating dy.
        let grads = (&y * dy.detach().to_dtype(y.dtype())?)?.sum_all()?.backward()?;
        let dx = match (&input, need_dx) {
            (_, false) => None,
            (Some(input), true) => match grads.get(input) {
                Some(g) => Some(g.clone()),
                None => return Err(self.cut_graph("its input")),
            },
            (None, true) => candle_core::bail!("{}: an integer input has no gradient to pass back", self.name),
        };
        let mut weight_grads = Vec::with_capacity(self.params.len());
        for p in &self.params {
            match grads.get(&p.var) {
                Some(g) => weight_grads.push((p.name.clone(), g.clone())),
                None => return Err(self.cut_graph(&format!("parameter {}", p.name))),
            }
        }
        let handles = weight_grads.iter().map(|(_, g)| g.clone()).collect();
        Ok((dx, Saved::with_handles(weight_grads, handles)))
    }

    fn backward_weight(&mut self, saved: Saved, grads: &mut Gradients) -> Result<()> {
        let weight_grads: Vec<(String, Tensor)> = saved.take(&self.name)?;
        for (name, g) in &weight_grads {
            grads.add(name, g)?;
        }
        Ok(())
    }
}

/// Builds a [`SequentialModel`]: an ordered list of named layers, the loss, and the inputs the
/// model takes.
///
/// ```
/// use brigade_engine::custom::Sequential;
/// use brigade_engine::{InputKind, LossKind};
/// use candle_core::Module;
///
/// let model = Sequential::new("mlp")
///     .layer("fc1", |vb| {
///         let fc = candle_nn::linear(4, 16, vb)?;
///         Ok(move |x: &candle_core::Tensor| fc.forward(x)?.relu())
///     })
///     .layer("fc2", |vb| candle_nn::linear(16, 1, vb))
///     .loss(LossKind::MeanSquaredError)
///     .input(InputKind::Features { shape: vec![4] })
///     .build()
///     .unwrap();
/// # use brigade_engine::PipelineModel;
/// assert_eq!(model.num_params(), 4 * 16 + 16 + 16 + 1);
/// ```
#[derive(Default)]
pub struct Sequential {
    name: String,
    layers: Vec<Result<Arc<dyn LayerSpec>>>,
    autograd: bool,
    loss: Option<LossKind>,
    input: Option<InputKind>,
    num_classes: usize,
    checks: Vec<Arc<CheckFn>>,
}

impl Sequential {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Self::default() }
    }

    /// Appends an autograd layer (see the module docs): `build` makes its module from a
    /// [`VarBuilder`] prefixed with `name`. Errors surface in [`Sequential::build`].
    pub fn layer<M, F>(mut self, name: impl Into<String>, build: F) -> Self
    where
        M: ModuleT + Send + 'static,
        F: Fn(VarBuilder) -> Result<M> + Send + Sync + 'static,
    {
        self.autograd = true;
        self.layers.push(AutogradLayerSpec::new(name, build).map(|s| Arc::new(s) as Arc<dyn LayerSpec>));
        self
    }

    /// Appends an explicit layer (one that owns its backward, e.g. a built-in GPT block).
    pub fn explicit(mut self, spec: Arc<dyn LayerSpec>) -> Self {
        self.layers.push(Ok(spec));
        self
    }

    pub fn loss(mut self, loss: LossKind) -> Self {
        self.loss = Some(loss);
        self
    }

    /// What the model takes; the pipeline checks every batch against it.
    pub fn input(mut self, input: InputKind) -> Self {
        self.input = Some(input);
        self
    }

    /// The number of output classes (vocabulary size for language models); cross-entropy
    /// labels must be below it.
    pub fn classes(mut self, n: usize) -> Self {
        self.num_classes = n;
        self
    }

    /// A further check every batch must pass (after the [`Sequential::input`] one), run on the
    /// caller's thread before the batch reaches a stage; the error is the message the caller sees.
    pub fn check(
        mut self,
        check: impl Fn(&Tensor, Option<&Tensor>) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// The model, after checking the definition: at least one layer, distinct layer names, a
    /// loss and an input kind, class counts for cross-entropy, and one shape per parameter name.
    pub fn build(self) -> Result<SequentialModel> {
        let name = self.name;
        let layers = self.layers.into_iter().collect::<Result<Vec<_>>>()?;
        if layers.is_empty() {
            candle_core::bail!("model {name} has no layers");
        }
        let mut names = HashSet::new();
        for layer in &layers {
            if !names.insert(layer.name()) {
                candle_core::bail!("model {name}: two layers are named {}", layer.name());
            }
        }
        let Some(loss) = self.loss else { candle_core::bail!("model {name} has no loss (Sequential::loss)") };
        let Some(input) = self.input else { candle_core::bail!("model {name} declares no input (Sequential::input)") };
        if loss == LossKind::CrossEntropy && self.num_classes == 0 && !matches!(input, InputKind::Tokens { .. }) {
            candle_core::bail!("model {name}: cross-entropy needs the number of classes (Sequential::classes)");
        }
        let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for layer in &layers {
            for p in layer.params() {
                match shapes.get(&p.name) {
                    Some(shape) if *shape != p.shape => candle_core::bail!(
                        "model {name}: parameter {} is used with shapes {shape:?} and {:?} (tied parameters need one \
                         shape)",
                        p.name,
                        p.shape
                    ),
                    Some(_) => {}
                    None => {
                        shapes.insert(p.name.clone(), p.shape.clone());
                    }
                }
            }
        }
        let num_classes = match (&input, self.num_classes) {
            (InputKind::Tokens { vocab, .. }, 0) => *vocab,
            (_, n) => n,
        };
        debug_assert_eq!(unique_params(&layers).len(), shapes.len());
        Ok(SequentialModel { name, layers, autograd: self.autograd, loss, input, num_classes, checks: self.checks })
    }
}

/// A user-defined model: the ordered layers a [`Sequential`] declared.
#[derive(Clone)]
pub struct SequentialModel {
    name: String,
    layers: Vec<Arc<dyn LayerSpec>>,
    autograd: bool,
    loss: LossKind,
    input: InputKind,
    num_classes: usize,
    checks: Vec<Arc<CheckFn>>,
}

impl Debug for SequentialModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialModel")
            .field("name", &self.name)
            .field("layers", &self.layers.iter().map(|l| l.name()).collect::<Vec<_>>())
            .field("loss", &self.loss)
            .field("input", &self.input)
            .finish()
    }
}

/// The input kind's check, then the model's own.
struct DeclaredChecks {
    base: InputKindCheck,
    checks: Vec<Arc<CheckFn>>,
}

impl Debug for DeclaredChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeclaredChecks").field("base", &self.base).field("checks", &self.checks.len()).finish()
    }
}

impl BatchCheck for DeclaredChecks {
    fn check_batch(&self, inputs: &Tensor, targets: Option<&Tensor>) -> std::result::Result<(), String> {
        self.base.check_batch(inputs, targets)?;
        self.checks.iter().try_for_each(|check| check(inputs, targets))
    }
}

impl PipelineModel for SequentialModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn layers(&self) -> Vec<Arc<dyn LayerSpec>> {
        self.layers.clone()
    }

    fn loss(&self) -> LossKind {
        self.loss
    }

    fn input(&self) -> InputKind {
        self.input.clone()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn batch_check(&self) -> Arc<dyn BatchCheck> {
        Arc::new(DeclaredChecks {
            base: InputKindCheck { model: self.name.clone(), input: self.input.clone(), num_classes: self.num_classes },
            checks: self.checks.clone(),
        })
    }

    fn mixed_precision(&self) -> std::result::Result<(), String> {
        if self.autograd {
            return Err(format!("{} has autograd layers, which compute in f32 only", self.name));
        }
        Ok(())
    }
}

/// A layer norm over the last dimension that candle's autograd can differentiate: the
/// parameters of `candle_nn::layer_norm` (`weight` ones, `bias` zeros), with the forward written
/// as a composition instead of candle-nn's fused op, which has no backward.
///
/// # Shapes
/// `(..., size)` in, `(..., size)` out.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
    Ok(LayerNorm { weight, bias, eps })
}

/// See [`layer_norm`].
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.dim(candle_core::D::Minus1)? as f64;
        let centred = x.broadcast_sub(&(x.sum_keepdim(candle_core::D::Minus1)? / size)?)?;
        let variance = (centred.sqr()?.sum_keepdim(candle_core::D::Minus1)? / size)?;
        centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}
