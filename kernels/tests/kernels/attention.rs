//! The fused causal attention against the reference composition: forward outputs and
//! probabilities, and its explicit backward against candle's autograd through the
//! composition (f64 tightly, f32 to 1e-5), over odd sequence lengths that straddle the causal
//! blocks, several head counts, strided inputs, and a thread pool (the per-head parallel
//! path). The reference's explicit backward is checked the same way, and both against
//! finite differences in f64.

use brigade_kernels as k;
use brigade_kernels::reference as r;
use candle_core::{DType, Tensor, Var};

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

/// `(merged, probs, dqkv)` of the fused path and of autograd through the composition, for one
/// random incoming gradient.
fn both(qkv: &Tensor, n_head: usize, dy: &Tensor) -> ([Vec<f64>; 3], [Vec<f64>; 3]) {
    let (m, p) = k::causal_attention(qkv, n_head).unwrap();
    let dqkv = k::causal_attention_backward(qkv, &p, dy, n_head).unwrap();
    let fused = [to_f64_vec(&m), to_f64_vec(&p), to_f64_vec(&dqkv)];

    let var = Var::from_tensor(&qkv.contiguous().unwrap()).unwrap();
    let (rm, rp) = r::causal_attention(var.as_tensor(), n_head).unwrap();
    let loss = (&rm * dy).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap();
    (fused, [to_f64_vec(&rm), to_f64_vec(&rp), to_f64_vec(g)])
}

fn check(b: usize, t: usize, c: usize, n_head: usize, dtype: DType, tol: f64) {
    let mut g = rng((b * 1000 + t * 10 + n_head) as u64);
    let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, dtype);
    let dy = uniform(&mut g, &[b, t, c], 1.0, dtype);
    let (fused, reference) = both(&qkv, n_head, &dy);
    for (what, (a, e)) in ["merged", "probs", "dqkv"].iter().zip(fused.iter().zip(&reference)) {
        let err = max_err(a, e);
        assert!(err < tol, "{what} b{b} t{t} c{c} h{n_head} {dtype:?}: error {err:e} > {tol:e}");
    }
    // The probabilities are exactly zero above the diagonal and rows sum to one.
    let p = &fused[1];
    for row in 0..b * n_head * t {
        let i = row % t;
        let r = &p[row * t..(row + 1) * t];
        assert!(r[i + 1..].iter().all(|&x| x == 0.0), "masked probabilities must be exact zeros");
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn fused_attention_matches_autograd_through_the_composition() {
    for &(b, t, c, h) in &[(1, 1, 4, 1), (2, 5, 8, 2), (1, 32, 16, 4), (2, 33, 12, 3), (1, 70, 8, 1), (3, 64, 16, 2)] {
        check(b, t, c, h, DType::F64, 1e-12);
        check(b, t, c, h, DType::F32, 1e-5);
    }
}

#[test]
fn fused_attention_runs_per_head_in_parallel_identically() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut g = rng(7);
    let qkv = uniform(&mut g, &[3, 45, 48], 2.0, DType::F32);
    let dy = uniform(&mut g, &[3, 45, 16], 1.0, DType::F32);
    let serial = both(&qkv, 4, &dy).0;
    let parallel = pool.install(|| both(&qkv, 4, &dy).0);
    assert_eq!(serial, parallel, "the per-head tasks must not depend on the thread count");
}

#[test]
fn fused_attention_reads_strided_inputs() {
    let mut g = rng(3);
    // qkv as a narrow (non-contiguous) view of a wider tensor; dy transposed twice.
    let wide = uniform(&mut g, &[2, 9, 40], 2.0, DType::F64);
    let qkv = wide.narrow(2, 4, 24).unwrap();
    assert!(!qkv.is_contiguous());
    let dy = uniform(&mut g, &[2, 8, 9], 1.0, DType::F64).transpose(1, 2).unwrap();
    assert!(!dy.is_contiguous());
    let (fused, reference) = both(&qkv, 2, &dy);
    for (a, e) in fused.iter().zip(&reference) {
        assert!(max_err(a, e) < 1e-12);
    }
}

#[test]
fn reference_backward_matches_autograd_and_finite_differences() {
    let mut g = rng(11);
    let (b, t, c, h) = (2, 6, 8, 2);
    let qkv = uniform(&mut g, &[b, t, 3 * c], 1.5, DType::F64);
    let dy = uniform(&mut g, &[b, t, c], 1.0, DType::F64);
    let (_, p) = r::causal_attention(&qkv, h).unwrap();
    let explicit = to_f64_vec(&r::causal_attention_backward(&qkv, &p, &dy, h).unwrap());
    let autograd = both(&qkv, h, &dy).1[2].clone();
    assert!(max_err(&explicit, &autograd) < 1e-12);
    // Central differences of sum(merged · dy) in f64.
    let base = to_f64_vec(&qkv);
    let loss = |v: &[f64]| {
        let x = Tensor::from_vec(v.to_vec(), (b, t, 3 * c), qkv.device()).unwrap();
        let (m, _) = k::causal_attention(&x, h).unwrap();
        to_f64_vec(&m).iter().zip(to_f64_vec(&dy)).map(|(a, b)| a * b).sum::<f64>()
    };
    let eps = 1e-6;
    for i in (0..base.len()).step_by(7) {
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (loss(&up) - loss(&down)) / (2.0 * eps);
        assert!((fd - explicit[i]).abs() < 1e-6 * (1.0 + fd.abs()), "element {i}: fd {fd} vs {}", explicit[i]);
    }
}

#[test]
fn bad_attention_shapes_are_errors() {
    let x = Tensor::zeros((2, 4, 12), DType::F32, &candle_core::Device::Cpu).unwrap();
    let msg = |r: candle_core::Result<_>| r.err().map(|e: candle_core::Error| e.to_string()).unwrap_or_default();
    assert!(msg(k::causal_attention(&x, 0).map(|_| ())).contains("n_head"));
    assert!(msg(k::causal_attention(&x, 3).map(|_| ())).contains("divisible"));
    assert!(msg(k::causal_attention(&x.flatten_all().unwrap(), 1).map(|_| ())).contains("(B, T, 3C)"));
    let (_, p) = k::causal_attention(&x, 2).unwrap();
    let bad_dy = Tensor::zeros((2, 4, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(msg(k::causal_attention_backward(&x, &p, &bad_dy, 2).map(|_| ())).contains("dmerged"));
}

/// The GPU's algorithm (batched products around the fused scale-mask-softmax and its
/// backward), run through the ops' CPU twins, against the fused CPU kernel and the reference.
#[test]
fn batched_products_path_matches_the_fused_kernel_and_the_reference() {
    for &(b, t, c, h) in &[(1, 1, 4, 1), (2, 5, 8, 2), (2, 33, 12, 3), (1, 70, 16, 4)] {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let mut g = rng((b * 7 + t) as u64);
            let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, dtype);
            let dy = uniform(&mut g, &[b, t, c], 1.0, dtype);
            let (m, p) = k::causal_attention_batched(&qkv, h).unwrap();
            let dqkv = k::causal_attention_batched_backward(&qkv, &p, &dy, h).unwrap();
            let batched = [to_f64_vec(&m), to_f64_vec(&p), to_f64_vec(&dqkv)];
            let (fused, reference) = both(&qkv, h, &dy);
            for i in 0..3 {
                assert!(max_err(&batched[i], &fused[i]) < tol, "output {i} vs fused, b{b} t{t} {dtype:?}");
                assert!(max_err(&batched[i], &reference[i]) < tol, "output {i} vs reference, b{b} t{t} {dtype:?}");
            }
        }
    }
}
