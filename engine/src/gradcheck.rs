//! Checks a layer's hand-written backward: against candle's autograd through the layer's own
//! [`Layer::forward`](crate::Layer::forward), and against central finite differences. Every layer in brigade's models
//! is tested with it, and a user writing a layer can run it the same way.
//!
//! The layer is built twice from the same deterministic initialisation: once over variables
//! (autograd records the forward), once over detached views (the explicit path the pipeline
//! runs). With a fixed output gradient `dy`, both backward passes compute the gradient of
//! `sum(y · dy)`: the input gradient and every parameter's.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::layer::{Gradients, LayerSpec, Mode, ParamStore, Pass};

/// Largest differences found, relative to the scale of the autograd value
/// (`max |a − b| / max |b|`).
#[derive(Debug, Clone, Default)]
pub struct GradCheck {
    pub output: f64,
    /// `None` when the input takes no gradient (token ids) or `need_dx` was false.
    pub input: Option<f64>,
    pub params: BTreeMap<String, f64>,
}

impl GradCheck {
    /// The worst of all the errors.
    pub fn max(&self) -> f64 {
        self.params.values().copied().chain(self.input).fold(self.output, f64::max)
    }
}

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    if got.dims() != want.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", got.dims(), want.dims());
    }
    let (a, b) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-12))
}

/// A fixed pseudo-random output gradient shaped like `y`.
fn output_grad(y: &Tensor, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let data: Vec<f32> = (0..y.elem_count()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, y.shape(), y.device())?.to_dtype(y.dtype())
}

/// Runs `spec`'s explicit backward and autograd on input `x` (training mode) and reports how
/// far apart they are. Float inputs get an input gradient; integer inputs (token ids) do not.
pub fn check_layer(spec: &dyn LayerSpec, x: &Tensor, seed: u64) -> Result<GradCheck> {
    let device = Device::Cpu;
    let needs_dx = x.dtype().is_float();

    // Autograd through `forward` on variables.
    let mut store = ParamStore::new(device.clone(), seed);
    let mut layer = spec.build(&mut store)?;
    let x_var = if needs_dx { Some(Var::from_tensor(x)?) } else { None };
    let x_in = x_var.as_ref().map_or_else(|| x.clone(), |v| v.as_tensor().clone());
    let y = layer.forward(&x_in, Mode::Train)?;
    let dy = output_grad(&y, seed)?;
    let grads = (&y * &dy)?.sum_all()?.backward()?;

    // The explicit path on detached views of an identically initialised store.
    let mut explicit_store = ParamStore::new(device, seed);
    for p in spec.params() {
        explicit_store.get(&p)?;
    }
    let mut view = explicit_store.shared_view();
    let mut explicit = spec.build(&mut view)?;
    let (y2, saved) = explicit.forward_train(x, Pass::First)?;
    let (dx, weight_saved) = explicit.backward_input(saved, &dy, needs_dx)?;
    let mut sums = Gradients::new();
    explicit.backward_weight(weight_saved, &mut sums)?;

    let mut report = GradCheck { output: rel_err(&y2, &y)?, ..Default::default() };
    if let (Some(var), Some(dx)) = (&x_var, &dx) {
        let want = grads.get(var.as_tensor()).map_or_else(|| var.as_tensor().zeros_like(), |g| Ok(g.clone()))?;
        report.input = Some(rel_err(dx, &want)?);
    }
    for (name, _, var) in store.vars() {
        let want = grads.get(var.as_tensor()).map_or_else(|| var.as_tensor().zeros_like(), |g| Ok(g.clone()))?;
        let got = sums.get(name).map_or_else(|| var.as_tensor().zeros_like(), |g| Ok(g.clone()))?;
        report.params.insert(name.to_string(), rel_err(&got, &want)?);
    }
    Ok(report)
}

/// Compares the explicit gradient of parameter `name` at a few `indices` (of the flattened
/// tensor) with central finite differences of `sum(y · dy)` at step `eps`; returns
/// `(analytic, numeric)` pairs and the largest |analytic| entry of the whole gradient (the
/// scale to judge differences by). Evaluation stays on the explicit path (detached
/// parameters, set in place).
pub fn finite_differences(
    spec: &dyn LayerSpec,
    x: &Tensor,
    seed: u64,
    name: &str,
    indices: &[usize],
    eps: f64,
) -> Result<(Vec<(f64, f64)>, f64)> {
    let mut store = ParamStore::new(Device::Cpu, seed);
    for p in spec.params() {
        store.get(&p)?;
    }
    let mut view = store.shared_view();
    let mut layer = spec.build(&mut view)?;
    let (y, saved) = layer.forward_train(x, Pass::Recompute)?;
    let dy = output_grad(&y, seed)?;
    let (_, weight_saved) = layer.backward_input(saved, &dy, false)?;
    let mut sums = Gradients::new();
    layer.backward_weight(weight_saved, &mut sums)?;
    let var = store.var(name).ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))?.clone();
    let analytic: Vec<f64> = match sums.get(name) {
        Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        None => vec![0.0; var.elem_count()],
    };
    let base: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    let mut objective = |delta: f64, i: usize| -> Result<f64> {
        let mut v = base.clone();
        v[i] += delta as f32;
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
        // Recompute passes leave layer state (BatchNorm statistics) untouched.
        let (y, _) = layer.forward_train(x, Pass::Recompute)?;
        // Summed in f64: the f32 sum's rounding would be amplified by 1 / eps.
        let value = (y.to_dtype(DType::F64)? * dy.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()?;
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
        Ok(value)
    };
    let scale = analytic.iter().fold(0.0f64, |m, a| m.max(a.abs()));
    let pairs = indices
        .iter()
        .map(|&i| {
            let numeric = (objective(eps, i)? - objective(-eps, i)?) / (2.0 * eps);
            Ok((analytic[i], numeric))
        })
        .collect::<Result<_>>()?;
    Ok((pairs, scale))
}
