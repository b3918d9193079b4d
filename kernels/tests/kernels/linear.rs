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
