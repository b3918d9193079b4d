//! Test helpers: seeded random tensors, a finite-difference gradient checker, and a
//! fused-vs-reference comparator.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform(-scale, scale) values of the given shape and dtype.
pub fn uniform(rng: &mut StdRng, dims: &[usize], scale: f64, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// Distinct values `k * gap` in shuffled order: no ties, and no argmax flips under
/// perturbations smaller than `gap / 2` (what max-pool finite differences need).
pub fn distinct(rng: &mut StdRng, dims: &[usize], gap: f64, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let mut v: Vec<f64> = (0..n).map(|k| (k as f64 - n as f64 / 2.0) * gap).collect();
    v.shuffle(rng);
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Largest `|a - b| / (1 + |b|)` (absolute near zero, relative for large values).
pub fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f64::max)
}

/// `loss = sum_i r_i * y_i`, accumulated in f64. Random weights `r` make every output element
/// matter and feed the op a non-uniform incoming gradient.
fn weighted_sum(y: &Tensor, r: &[f64]) -> f64 {
    to_f64_vec(y).iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Checks the autograd gradient of `f` with respect to each of `inputs` against central
/// finite differences of `L(x) = sum_i r_i f(x)_i` (f64-accumulated), perturbing one element
/// at a time by `±h`. The step actually taken is measured after rounding to the input's dtype,
/// so f32 inputs are handled honestly. Panics with a message naming the input and element when
/// an error exceeds `tol` (relative to `1 + |fd|`); returns the largest error seen.
pub fn check_grads(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, h: f64, tol: f64) -> f64 {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let mut g = rng(0xfd);
    let r: Vec<f64> = (0..y.elem_count()).map(|_| g.random_range(-1.0..1.0)).collect();
    let r_t = Tensor::from_vec(r.clone(), y.shape(), &Device::Cpu).unwrap();
    let loss = (y.to_dtype(DType::F64).unwrap() * &r_t).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();

    let mut worst = 0.0f64;
    for (k, var) in vars.iter().enumerate() {
        let analytic = to_f64_vec(grads.get(var.as_tensor()).expect("no gradient for input"));
        let base = to_f64_vec(&inputs[k]);
        let dtype = inputs[k].dtype();
        let eval = |j: usize, delta: f64| -> (f64, f64) {
            let mut v = base.clone();
            v[j] += delta;
            let t = Tensor::from_vec(v, inputs[k].shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let actual = to_f64_vec(&t)[j];
            let mut args: Vec<Tensor> = inputs.to_vec();
            args[k] = t;
            (weighted_sum(&f(&args).unwrap(), &r), actual)
        };
        #[allow(clippy::needless_range_loop)]
        for j in 0..base.len() {
            let (lp, xp) = eval(j, h);
            let (lm, xm) = eval(j, -h);
            let fd = (lp - lm) / (xp - xm);
            let err = (analytic[j] - fd).abs() / (1.0 + fd.abs());
            worst = worst.max(err);
            assert!(
                err <= tol,
                "{name}: d/d input{k}[{j}]: autograd {} vs finite difference {fd} (err {err:.2e} > {tol:.0e})",
                analytic[j]
            );
        }
    }
    worst
}

/// Runs `fused` and `reference` on the same inputs (after `prep`, e.g. a transpose, so the ops
/// see non-contiguous tensors) and asserts that outputs and the gradients of a random weighted
/// sum agree to `tol`. Returns (output error, gradient error).
pub fn compare(
    name: &str,
    inputs: &[Tensor],
    prep: impl Fn(&[Tensor]) -> Vec<Tensor>,
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) -> (f64, f64) {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&prep(&ts)).unwrap();
        let mut g = rng(0xc0);
        let r: Vec<f64> = (0..y.elem_count()).map(|_| g.random_range(-1.0..1.0)).collect();
        let r = Tensor::from_vec(r, y.shape(), &Device::Cpu).unwrap().to_dtype(y.dtype()).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Vec<f64>> = vars.iter().map(|v| to_f64_vec(grads.get(v.as_tensor()).unwrap())).collect();
        (to_f64_vec(&y), gs)
    };
    let (yf, gf) = run(&fused);
    let (yr, gr) = run(&reference);
    let ey = max_err(&yf, &yr);
    assert!(ey <= tol, "{name}: forward differs from reference by {ey:.2e} > {tol:.0e}");
    let mut eg = 0.0f64;
    for (k, (a, b)) in gf.iter().zip(&gr).enumerate() {
        let e = max_err(a, b);
        assert!(e <= tol, "{name}: gradient of input{k} differs from reference by {e:.2e} > {tol:.0e}");
        eg = eg.max(e);
    }
    eprintln!("{name}: max err forward {ey:.1e}, gradient {eg:.1e}");
    (ey, eg)
}
