//! Correctness tests for brigade's fused kernels:
//! - fused vs the `reference` composition (forward values and gradients; odd sizes,
//!   non-contiguous inputs, and sizes large enough to take the rayon path);
//! - every op's gradient vs central finite differences (f64 with tight tolerances, f32 with
//!   loose ones), including candle's built-in `gelu` backward;
//! - error cases: bad shapes/dtypes/geometry return errors naming the problem;
//! - `vmath_accuracy`: the vectorised f32 exp/tanh/GELU/softmax pieces against f64.

mod adamw;
mod attention;
mod backward;
#[cfg(feature = "cuda")]
mod cuda;
mod flash;
mod gemm;
mod gradcheck;
mod linear;
mod llama_ops;
mod transpose;
mod vmath_accuracy;

use brigade_kernels as k;
use brigade_kernels::reference as r;
use candle_core::{DType, Device, Tensor};
use gradcheck::{check_grads, compare, distinct, rng, uniform};

const F32_TOL: f64 = 1e-5;

fn same(ts: &[Tensor]) -> Vec<Tensor> {
    ts.to_vec()
}

/// Transposes the first input's last two dims so the op sees a strided tensor.
fn t_first(ts: &[Tensor]) -> Vec<Tensor> {
    let mut v = ts.to_vec();
    v[0] = v[0].t().unwrap();
    assert!(!v[0].is_contiguous());
    v
}

fn ln_fused(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    k::layer_norm(&ts[0], &ts[1], &ts[2], 1e-5)
}
fn ln_ref(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    r::layer_norm(&ts[0], &ts[1], &ts[2], 1e-5)
}

// ---- fused vs reference ------------------------------------------------------------------

#[test]
fn layer_norm_matches_reference() {
    let mut g = rng(1);
    for dims in [vec![2, 3, 37], vec![5, 1], vec![64, 300]] {
        let c = *dims.last().unwrap();
        let x = (uniform(&mut g, &dims, 2.0, DType::F32) + 0.5).unwrap();
        let w = uniform(&mut g, &[c], 1.0, DType::F32);
        let b = uniform(&mut g, &[c], 1.0, DType::F32);
        compare("layer_norm", &[x, w, b], same, ln_fused, ln_ref, F32_TOL);
    }
    // Non-contiguous x: (37, 6) transposed to (6, 37).
    let x = uniform(&mut g, &[37, 6], 1.0, DType::F32);
    let w = uniform(&mut g, &[37], 1.0, DType::F32);
    let b = uniform(&mut g, &[37], 1.0, DType::F32);
    compare("layer_norm transposed", &[x, w, b], t_first, ln_fused, ln_ref, F32_TOL);
}

#[test]
fn softmax_and_log_softmax_match_reference() {
    let mut g = rng(2);
    for (dims, scale) in [(vec![3, 5, 33], 3.0), (vec![4, 1], 1.0), (vec![70, 257], 3.0), (vec![3, 9], 500.0)] {
        let x = uniform(&mut g, &dims, scale, DType::F32);
        compare(
            "softmax",
            std::slice::from_ref(&x),
            same,
            |t| k::softmax_last_dim(&t[0]),
            |t| r::softmax_last_dim(&t[0]),
            F32_TOL,
        );
        compare(
            "log_softmax",
            &[x],
            same,
            |t| k::log_softmax_last_dim(&t[0]),
            |t| r::log_softmax_last_dim(&t[0]),
            F32_TOL,
        );
    }
    let x = uniform(&mut g, &[2, 17, 6], 2.0, DType::F32);
    compare(
        "softmax transposed",
        std::slice::from_ref(&x),
        t_first,
        |t| k::softmax_last_dim(&t[0]),
        |t| r::softmax_last_dim(&t[0]),
        F32_TOL,
    );
    compare(
        "log_softmax transposed",
        &[x],
        t_first,
        |t| k::log_softmax_last_dim(&t[0]),
        |t| r::log_softmax_last_dim(&t[0]),
        F32_TOL,
    );
}

fn targets(g: &mut rand::rngs::StdRng, n: usize, v: usize) -> Tensor {
    use rand::Rng;
    let t: Vec<u32> = (0..n).map(|_| g.random_range(0..v as u32)).collect();
    Tensor::new(t.as_slice(), &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy_matches_reference() {
    let mut g = rng(3);
    for (n, v) in [(13, 29), (1, 1), (128, 300)] {
        let logits = uniform(&mut g, &[n, v], 4.0, DType::F32);
        let t = targets(&mut g, n, v);
        // The loss is a sum over rows: compare relative to its size.
        compare(
            "cross_entropy",
            &[logits],
            same,
            |x| k::cross_entropy_sum(&x[0], &t),
            |x| r::cross_entropy_sum(&x[0], &t),
            F32_TOL,
        );
    }
    // Non-contiguous logits, i64 targets.
    let logits = uniform(&mut g, &[31, 7], 2.0, DType::F32);
    let t = targets(&mut g, 7, 31).to_dtype(DType::I64).unwrap();
    compare(
        "cross_entropy transposed",
        &[logits],
        t_first,
        |x| k::cross_entropy_sum(&x[0], &t),
        |x| r::cross_entropy_sum(&x[0], &t),
        F32_TOL,
    );
}

/// Half-precision logits: the loss is f32, taken from the f32 values of the logits (a bf16 loss
/// would keep ~3 digits), and the gradient comes back in the logits' dtype, rounded once.
#[test]
fn cross_entropy_of_half_logits_is_an_f32_loss_with_a_half_gradient() {
    let mut g = rng(5);
    let (n, v) = (37, 301);
    let t = targets(&mut g, n, v);
    for half in [DType::BF16, DType::F16] {
        let logits = uniform(&mut g, &[n, v], 4.0, DType::F32).to_dtype(half).unwrap();
        let wide = logits.to_dtype(DType::F32).unwrap();
        let loss = k::cross_entropy_sum(&logits, &t).unwrap();
        assert_eq!(loss.dtype(), DType::F32, "{half:?} logits");
        let want = k::cross_entropy_sum(&wide, &t).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
        let d = k::cross_entropy_sum_backward(&logits, &t, 0.25).unwrap();
        assert_eq!(d.dtype(), half);
        let want = k::cross_entropy_sum_backward(&wide, &t, 0.25).unwrap().to_dtype(half).unwrap();
        let (d, want) = (d.to_dtype(DType::F32).unwrap(), want.to_dtype(DType::F32).unwrap());
        let same_bits = d.eq(&want).unwrap().to_dtype(DType::U32).unwrap().sum_all().unwrap();
        assert_eq!(same_bits.to_scalar::<u32>().unwrap() as usize, n * v, "{half:?} gradient");
    }
}

#[test]
fn gelu_matches_reference() {
    let mut g = rng(4);
    for dims in [vec![3, 37], vec![40_000]] {
        let x = uniform(&mut g, &dims, 5.0, DType::F32);
        compare("gelu_tanh", &[x], same, |t| k::gelu_tanh(&t[0]), |t| r::gelu_tanh(&t[0]), F32_TOL);
    }
    let x = uniform(&mut g, &[9, 5], 3.0, DType::F32);
    compare("gelu_tanh transposed", &[x], t_first, |t| k::gelu_tanh(&t[0]), |t| r::gelu_tanh(&t[0]), F32_TOL);
}

#[test]
fn max_pool_matches_reference() {
    let mut g = rng(5);
    let cases: &[(&[usize], usize, usize, usize)] = &[
        (&[2, 3, 9, 11], 3, 2, 1), // ResNet stem geometry, odd sizes
        (&[2, 3, 8, 8], 2, 2, 0),
        (&[1, 2, 7, 5], 3, 1, 1),
        (&[1, 2, 5, 6], 1, 1, 0),
        (&[1, 1, 7, 7], 2, 3, 0),   // stride > kernel: some cells in no window
        (&[1, 1, 3, 3], 5, 1, 2),   // kernel larger than the unpadded input
        (&[4, 8, 32, 32], 3, 2, 1), // rayon path
    ];
    for &(dims, kernel, stride, padding) in cases {
        let x = distinct(&mut g, dims, 0.01, DType::F32);
        compare(
            &format!("max_pool2d {dims:?} k{kernel} s{stride} p{padding}"),
            &[x],
            same,
            |t| k::max_pool2d(&t[0], kernel, stride, padding),
            |t| r::max_pool2d(&t[0], kernel, stride, padding),
            F32_TOL,
        );
    }
    let x = distinct(&mut g, &[2, 2, 6, 9], 0.01, DType::F32);
    compare(
        "max_pool2d transposed",
        &[x],
        t_first,
        |t| k::max_pool2d(&t[0], 3, 2, 1),
        |t| r::max_pool2d(&t[0], 3, 2, 1),
        F32_TOL,
    );
}

#[test]
fn max_pool_ties_go_to_first_max_like_pytorch() {
    // Constant 4x4 input, kernel 3, stride 2, padding 1: windows (rows x cols) are
    // [0,2)x[0,2), [0,2)x[1,4), [1,4)x[0,2), [1,4)x[1,4); row-major first cells are
    // (0,0), (0,1), (1,0), (1,1).
    let x = candle_core::Var::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let y = k::max_pool2d(&x, 3, 2, 1).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    #[rustfmt::skip]
    let expected = [1., 1., 0., 0.,
                    1., 1., 0., 0.,
                    0., 0., 0., 0.,
                    0., 0., 0., 0.];
    assert_eq!(dx, expected);
    // Overlapping windows sharing one argmax accumulate: a single peak in the middle of a
    // 3x3 input is the max of all four 2x2 stride-1 windows.
    let mut v = vec![0f32; 9];
    v[4] = 1.0;
    let x = candle_core::Var::from_vec(v, (1, 1, 3, 3), &Device::Cpu).unwrap();
    let grads = k::max_pool2d(&x, 2, 1, 0).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(dx, [0., 0., 0., 0., 4., 0., 0., 0., 0.]);
}

#[test]
fn unsupported_dtype_falls_back_to_reference() {
    let mut g = rng(6);
    let x = uniform(&mut g, &[4, 16], 2.0, DType::F32);
    let w = uniform(&mut g, &[16], 1.0, DType::F32);
    let b = uniform(&mut g, &[16], 1.0, DType::F32);
    let want = gradcheck::to_f64_vec(&k::layer_norm(&x, &w, &b, 1e-5).unwrap());
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let got = gradcheck::to_f64_vec(&k::layer_norm(&bf(&x), &bf(&w), &bf(&b), 1e-5).unwrap());
    assert!(gradcheck::max_err(&got, &want) < 5e-2);
    let got = gradcheck::to_f64_vec(&k::softmax_last_dim(&bf(&x)).unwrap());
    let want = gradcheck::to_f64_vec(&k::softmax_last_dim(&x).unwrap());
    assert!(gradcheck::max_err(&got, &want) < 1e-2);
}

// ---- finite differences --------------------------------------------------------------------

/// (step, tolerance) per dtype: f64 is tight; f32 is limited by rounding of the loss
/// (~1e-7 * |L| / h) and the O(h²) truncation error.
fn fd_params(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-6, 1e-6),
        _ => (1e-2, 2e-2),
    }
}

#[test]
fn layer_norm_grad_matches_finite_differences() {
    for dtype in [DType::F64, DType::F32] {
        let (h, tol) = fd_params(dtype);
        let mut g = rng(11);
        let x = uniform(&mut g, &[3, 7], 1.0, dtype);
        let w = uniform(&mut g, &[7], 1.0, dtype);
        let b = uniform(&mut g, &[7], 1.0, dtype);
        let ins = [x, w, b];
        check_grads("layer_norm", &ins, ln_fused, h, tol);
        check_grads("reference::layer_norm", &ins, ln_ref, h, tol);
        // Non-contiguous x.
        let x = uniform(&mut g, &[7, 3], 1.0, dtype);
        let ins = [x, ins[1].clone(), ins[2].clone()];
        check_grads("layer_norm transposed", &ins, |t| ln_fused(&t_first(t)), h, tol);
    }
}

#[test]
fn softmax_grads_match_finite_differences() {
    for dtype in [DType::F64, DType::F32] {
        let (h, tol) = fd_params(dtype);
        let mut g = rng(12);
        let x = [uniform(&mut g, &[3, 2, 5], 2.0, dtype)];
        check_grads("softmax", &x, |t| k::softmax_last_dim(&t[0]), h, tol);
        check_grads("log_softmax", &x, |t| k::log_softmax_last_dim(&t[0]), h, tol);
        check_grads("reference::softmax", &x, |t| r::softmax_last_dim(&t[0]), h, tol);
        check_grads("reference::log_softmax", &x, |t| r::log_softmax_last_dim(&t[0]), h, tol);
        let x = [uniform(&mut g, &[6, 4], 2.0, dtype)];
        check_grads("softmax transposed", &x, |t| k::softmax_last_dim(&t_first(t)[0]), h, tol);
    }
}

#[test]
fn cross_entropy_grad_matches_finite_differences() {
    for dtype in [DType::F64, DType::F32] {
        let (h, tol) = fd_params(dtype);
        let mut g = rng(13);
        let logits = [uniform(&mut g, &[5, 6], 2.0, dtype)];
        let t = targets(&mut g, 5, 6);
        check_grads("cross_entropy_sum", &logits, |x| k::cross_entropy_sum(&x[0], &t), h, tol);
        check_grads("reference::cross_entropy_sum", &logits, |x| r::cross_entropy_sum(&x[0], &t), h, tol);
    }
}

#[test]
fn gelu_grads_match_finite_differences() {
    let mut g = rng(14);
    let x = [uniform(&mut g, &[4, 9], 4.0, DType::F64)];
    let fused = check_grads("gelu_tanh", &x, |t| k::gelu_tanh(&t[0]), 1e-6, 1e-7);
    // candle's built-in gelu backward hard-codes 6-digit constants (0.797885, 0.0356774, ...):
    // correct, but only to ~1e-6 relative, so it gets a looser bound than the fused one.
    let candle = check_grads("candle gelu", &x, |t| r::gelu_tanh(&t[0]), 1e-6, 1e-5);
    eprintln!("gelu f64 grad vs finite differences: fused {fused:.1e}, candle {candle:.1e}");
    let (h, tol) = fd_params(DType::F32);
    let x = [uniform(&mut g, &[4, 9], 4.0, DType::F32)];
    check_grads("gelu_tanh f32", &x, |t| k::gelu_tanh(&t[0]), h, tol);
    check_grads("candle gelu f32", &x, |t| r::gelu_tanh(&t[0]), h, tol);
}

#[test]
fn max_pool_grad_matches_finite_differences() {
    for dtype in [DType::F64, DType::F32] {
        // Values are spaced 0.05 apart, well beyond the step, so no argmax flips.
        let h = if dtype == DType::F64 { 1e-6 } else { 1e-3 };
        let mut g = rng(15);
        let x = [distinct(&mut g, &[1, 2, 5, 6], 0.05, dtype)];
        for (kernel, stride, padding) in [(3, 2, 1), (2, 1, 0), (3, 3, 1)] {
            check_grads("max_pool2d", &x, |t| k::max_pool2d(&t[0], kernel, stride, padding), h, 1e-4);
            check_grads("reference::max_pool2d", &x, |t| r::max_pool2d(&t[0], kernel, stride, padding), h, 1e-4);
        }
    }
}

// ---- errors --------------------------------------------------------------------------------

fn err_msg(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.shape()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dev = &Device::Cpu;
    let x = Tensor::zeros((2, 4), DType::F32, dev).unwrap();
    let w = Tensor::ones(4, DType::F32, dev).unwrap();
    let w3 = Tensor::ones(3, DType::F32, dev).unwrap();
    let scalar = Tensor::new(1f32, dev).unwrap();

    for (f, what) in [(k::layer_norm as fn(&Tensor, &Tensor, &Tensor, f64) -> _, "fused"), (r::layer_norm, "reference")]
    {
        assert!(err_msg(f(&x, &w3, &w, 1e-5)).contains("weight must have shape (4,)"), "{what}");
        assert!(err_msg(f(&x, &w, &w3, 1e-5)).contains("bias must have shape (4,)"), "{what}");
        assert!(err_msg(f(&scalar, &w, &w, 1e-5)).contains("rank >= 1"), "{what}");
        assert!(err_msg(f(&x, &w.to_dtype(DType::F64).unwrap(), &w, 1e-5)).contains("share a dtype"), "{what}");
        assert!(err_msg(f(&x, &w, &w, -1.0)).contains("eps"), "{what}");
    }
    assert!(err_msg(k::softmax_last_dim(&scalar)).contains("rank >= 1"));
    assert!(err_msg(k::log_softmax_last_dim(&scalar)).contains("rank >= 1"));

    let t = Tensor::new(&[0u32, 7], dev).unwrap();
    for f in [k::cross_entropy_sum, r::cross_entropy_sum] {
        let m = err_msg(f(&x, &t));
        assert!(m.contains("target id 7") && m.contains("row 1"), "{m}");
        assert!(err_msg(f(&x.unsqueeze(0).unwrap(), &t)).contains("logits must have shape (N, V)"));
        assert!(err_msg(f(&x, &Tensor::new(&[0u32], dev).unwrap())).contains("targets must have shape (2,)"));
        assert!(err_msg(f(&x, &t.to_dtype(DType::F32).unwrap())).contains("integer class ids"));
    }

    let img = Tensor::zeros((1, 1, 4, 4), DType::F32, dev).unwrap();
    for f in [k::max_pool2d, r::max_pool2d] {
        assert!(err_msg(f(&x, 2, 2, 0)).contains("(N, C, H, W)"));
        assert!(err_msg(f(&img, 0, 1, 0)).contains("kernel must be at least 1"));
        assert!(err_msg(f(&img, 2, 0, 0)).contains("stride must be at least 1"));
        assert!(err_msg(f(&img, 5, 1, 0)).contains("larger than the padded input"));
        assert!(err_msg(f(&img, 3, 1, 2)).contains("at most half the kernel"));
        let empty = Tensor::zeros((1, 1, 0, 4), DType::F32, dev).unwrap();
        assert!(err_msg(f(&empty, 2, 2, 1)).contains("empty"));
    }
}
