//! `linear` (one gemm writing `x · w + bias + residual`) against the composition, for every
//! combination of bias and residual, strided operands, odd sizes, both dtypes and a thread
//! pool; and the autograd fallback when an input records a graph.

use brigade_kernels as k;
use candle_core::{DType, Tensor, Var};

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

fn composition(x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: Option<&Tensor>) -> Tensor {
    let mut y = x.contiguous().unwrap().matmul(&w.contiguous().unwrap()).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(r) = r {
        y = (y + r).unwrap();
    }
    y
}

fn check(m: usize, kk: usize, n: usize, dtype: DType, transposed_w: bool, tol: f64) {
    let mut g = rng((m * 100 + kk * 10 + n) as u64);
    let x = uniform(&mut g, &[m, kk], 1.0, dtype);
    let w = if transposed_w {
        uniform(&mut g, &[n, kk], 1.0, dtype).t().unwrap()
    } else {
        uniform(&mut g, &[kk, n], 1.0, dtype)
    };
    let b = uniform(&mut g, &[n], 1.0, dtype);
    let r = uniform(&mut g, &[m, n], 1.0, dtype);
    for (bias, res) in [(None, None), (Some(&b), None), (None, Some(&r)), (Some(&b), Some(&r))] {
        let got = to_f64_vec(&k::linear(&x, &w, bias, res).unwrap());
        let want = to_f64_vec(&composition(&x, &w, bias, res));
        let err = max_err(&got, &want);
        assert!(
            err < tol,
            "{m}x{kk}x{n} {dtype:?} wT={transposed_w} bias={} res={}: {err:e}",
            bias.is_some(),
            res.is_some()
        );
    }
}

#[test]
fn linear_matches_the_composition() {
    for &(m, kk, n) in &[(1, 1, 1), (3, 5, 7), (64, 33, 17), (257, 96, 130)] {
        for t in [false, true] {
            check(m, kk, n, DType::F64, t, 1e-12);
            check(m, kk, n, DType::F32, t, 1e-5);
        }
    }
}

#[test]
fn linear_on_a_thread_pool_gives_the_same_values() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut g = rng(2);
    let x = uniform(&mut g, &[300, 64], 1.0, DType::F32);
    let w = uniform(&mut g, &[64, 200], 1.0, DType::F32);
    let b = uniform(&mut g, &[200], 1.0, DType::F32);
    let r = uniform(&mut g, &[300, 200], 1.0, DType::F32);
    let par = to_f64_vec(&pool.install(|| k::linear(&x, &w, Some(&b), Some(&r))).unwrap());
    let want = to_f64_vec(&composition(&x, &w, Some(&b), Some(&r)));
    assert!(max_err(&par, &want) < 1e-5);
}

#[test]
fn linear_stays_differentiable_under_autograd() {
    let mut g = rng(4);
    let x = Var::from_tensor(&uniform(&mut g, &[4, 3], 1.0, DType::F64)).unwrap();
    let w = Var::from_tensor(&uniform(&mut g, &[3, 5], 1.0, DType::F64)).unwrap();
    let b = Var::from_tensor(&uniform(&mut g, &[5], 1.0, DType::F64)).unwrap();
    let y = k::linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), None).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    // d/db of sum(y) is the row count; d/dx is w's row sums.
    assert_eq!(to_f64_vec(grads.get(b.as_tensor()).unwrap()), vec![4.0; 5]);
    let want_dx: Vec<f64> = to_f64_vec(&w.as_tensor().sum(1).unwrap()).repeat(4);
    assert!(max_err(&to_f64_vec(grads.get(x.as_tensor()).unwrap()), &want_dx) < 1e-12);
}

#[test]
fn bad_linear_shapes_are_errors() {
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu).unwrap();
    let msg = |r: candle_core::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(k::linear(&z(&[2, 3]), &z(&[4, 5]), None, None)).contains("do not chain"));
    assert!(msg(k::linear(&z(&[2, 3]), &z(&[3, 5]), Some(&z(&[4])), None)).contains("bias"));
    assert!(msg(k::linear(&z(&[2, 3]), &z(&[3, 5]), None, Some(&z(&[5, 2])))).contains("residual"));
    let f64w = Tensor::zeros((3, 5), DType::F64, &candle_core::Device::Cpu).unwrap();
    assert!(msg(k::linear(&z(&[2, 3]), &f64w, None, None)).contains("dtype"));
}

/// `linear_gelu` against `linear` then `gelu_tanh`, on one thread and on a pool of two, for
/// odd sizes, a transposed weight and both dtypes: the pre-activation equals `linear`'s bits
/// where K fits gemm's one depth block (all sizes here), the activation `gelu_tanh`'s of it.
#[test]
fn linear_gelu_matches_linear_then_gelu() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for &(m, kk, n) in &[(1, 1, 1), (3, 5, 7), (64, 33, 17), (257, 96, 130), (300, 64, 200)] {
        for dtype in [DType::F64, DType::F32] {
            for transposed_w in [false, true] {
                let mut g = rng((m * 100 + kk * 10 + n) as u64);
                let x = uniform(&mut g, &[m, kk], 1.0, dtype);
                let w = if transposed_w {
                    uniform(&mut g, &[n, kk], 1.0, dtype).t().unwrap()
                } else {
                    uniform(&mut g, &[kk, n], 1.0, dtype)
                };
                let b = uniform(&mut g, &[n], 1.0, dtype);
                let want_pre = k::linear(&x, &w, Some(&b), None).unwrap();
                let want_act = to_f64_vec(&k::gelu_tanh(&want_pre).unwrap());
                let want_pre = to_f64_vec(&want_pre);
                for threads in [1, 2] {
                    let (pre, act) = if threads == 1 {
                        k::linear_gelu(&x, &w, &b).unwrap()
                    } else {
                        pool.install(|| k::linear_gelu(&x, &w, &b)).unwrap()
                    };
                    assert_eq!(pre.dims(), [m, n]);
                    assert_eq!(act.dims(), [m, n]);
                    let what = format!("{m}x{kk}x{n} {dtype:?} wT={transposed_w} threads={threads}");
                    assert_eq!(to_f64_vec(&pre), want_pre, "pre-activation, {what}");
                    assert_eq!(to_f64_vec(&act), want_act, "activation, {what}");
                }
            }
        }
    }
}

#[test]
fn linear_gelu_stays_differentiable_under_autograd_and_checks_shapes() {
    let mut g = rng(5);
    let x = Var::from_tensor(&uniform(&mut g, &[4, 3], 1.0, DType::F64)).unwrap();
    let w = uniform(&mut g, &[3, 5], 1.0, DType::F64);
    let b = uniform(&mut g, &[5], 1.0, DType::F64);
    let (pre, act) = k::linear_gelu(x.as_tensor(), &w, &b).unwrap();
    assert!(act.track_op(), "a tracked input must give a differentiable composition");
    let want = to_f64_vec(&k::gelu_tanh(&pre).unwrap());
    assert!(max_err(&to_f64_vec(&act), &want) < 1e-15);
    assert!(act.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).is_some());
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu).unwrap();
    let msg = |r: candle_core::Result<(Tensor, Tensor)>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(k::linear_gelu(&z(&[2, 3]), &z(&[4, 5]), &z(&[5]))).contains("do not chain"));
    assert!(msg(k::linear_gelu(&z(&[2, 3]), &z(&[3, 5]), &z(&[4]))).contains("bias"));
}

/// `linear_gelu_backward` against `linear` then `gelu_tanh_backward`: the same bits, on one
/// thread and on a pool of two, for odd sizes (rows longer than its stack chunk), a
/// transposed weight and both dtypes; and its shape checks.
#[test]
fn linear_gelu_backward_matches_the_composition() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for &(m, kk, n) in &[(1, 1, 1), (3, 5, 7), (64, 33, 17), (130, 40, 600)] {
        for dtype in [DType::F64, DType::F32] {
            for transposed_w in [false, true] {
                let mut g = rng((m * 100 + kk * 10 + n) as u64 + 1);
                let dy = uniform(&mut g, &[m, kk], 1.0, dtype);
                let w = if transposed_w {
                    uniform(&mut g, &[n, kk], 1.0, dtype).t().unwrap()
                } else {
                    uniform(&mut g, &[kk, n], 1.0, dtype)
                };
                let pre = uniform(&mut g, &[m, n], 3.0, dtype);
                let product = k::linear(&dy, &w, None, None).unwrap();
                let want = to_f64_vec(&k::gelu_tanh_backward(&pre, &product).unwrap());
                for threads in [1, 2] {
                    let got = if threads == 1 {
                        k::linear_gelu_backward(&dy, &w, &pre).unwrap()
                    } else {
                        pool.install(|| k::linear_gelu_backward(&dy, &w, &pre)).unwrap()
                    };
                    assert_eq!(got.dims(), [m, n]);
                    assert_eq!(to_f64_vec(&got), want, "{m}x{kk}x{n} {dtype:?} wT={transposed_w} threads={threads}");
                }
            }
        }
    }
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = k::linear_gelu_backward(&z(&[2, 3]), &z(&[3, 5]), &z(&[2, 4])).unwrap_err().to_string();
    assert!(e.contains("pre must have shape"), "{e}");
    assert!(k::linear_gelu_backward(&z(&[2, 3]), &z(&[4, 5]), &z(&[2, 5])).is_err());
}
