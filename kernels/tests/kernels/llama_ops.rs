//! Llama's ops (RMSNorm, RoPE, SwiGLU, the causal softmax of grouped heads): the fused CPU
//! kernels against their reference twins (values, and the explicit backwards against autograd
//! through the reference composition),
//! the fused backwards against finite differences of the fused forwards, the rayon path,
//! strided inputs, the half-precision fallback and bad arguments.
//!
//! Inputs here are plain tensors (no `Var`): inputs recording an autograd graph take the
//! reference composition by design, which would make a fused-vs-reference test compare the
//! reference with itself. [`untracked`] asserts which path ran.

use brigade_kernels as k;
use brigade_kernels::reference as r;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

/// Gradients of `sum(f(inputs) * dy)` with respect to each input, by autograd.
fn autograd(inputs: &[&Tensor], dy: &Tensor, f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&ts).unwrap() * dy).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter().map(|t| grads.get(t).unwrap().clone()).collect()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let e = max_err(&to_f64_vec(got), &to_f64_vec(want));
    assert!(e <= tol, "{what}: max error {e:e} > {tol:e}");
}

/// Checks that `t` is a plain tensor, so the ops take their fused kernels.
fn untracked(ts: &[&Tensor]) {
    assert!(ts.iter().all(|t| !t.track_op()), "test inputs must not record a graph");
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-6
    }
}

/// Position tables as the model builds them: `cos`/`sin` of `p · f` for a few frequencies,
/// repeated over both halves, `(T, D)`; with `scrambled` the halves differ (as no real table
/// does) so that a kernel reading the wrong half fails.
fn tables(t: usize, d: usize, offset: usize, scrambled: bool, dtype: DType) -> (Tensor, Tensor) {
    let half = d / 2;
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in offset..offset + t {
        for i in 0..d {
            let f = 1.0 / 10f64.powf((i % half) as f64 / half as f64);
            let angle = p as f64 * f + if scrambled && i >= half { 0.3 } else { 0.0 };
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let mk = |v: Vec<f64>| Tensor::from_vec(v, (t, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    (mk(cos), mk(sin))
}

#[test]
fn rms_norm_matches_its_twin_forward_and_backward() {
    for dtype in [DType::F64, DType::F32] {
        let mut g = rng(21);
        // Odd widths, one-element rows, and (64·2·300) large enough for the rayon path and
        // several blocks of the gain's partial sums.
        for dims in [vec![2, 3, 37], vec![5, 1], vec![64, 2, 300]] {
            let c = *dims.last().unwrap();
            let x = uniform(&mut g, &dims, 2.0, dtype);
            let w = (uniform(&mut g, &[c], 1.0, dtype) + 1.0).unwrap();
            let dy = uniform(&mut g, &dims, 1.0, dtype);
            untracked(&[&x, &w, &dy]);
            let what = format!("rms_norm {dims:?} {dtype:?}");
            assert_close(&what, &k::rms_norm(&x, &w, 1e-5).unwrap(), &r::rms_norm(&x, &w, 1e-5).unwrap(), tol(dtype));
            let (dx, dw) = k::rms_norm_backward(&x, &w, &dy, 1e-5).unwrap();
            let (rdx, rdw) = r::rms_norm_backward(&x, &w, &dy, 1e-5).unwrap();
            let want = autograd(&[&x, &w], &dy, |t| r::rms_norm(&t[0], &t[1], 1e-5));
            // dweight sums over every row: relative to its size.
            let sum_tol = tol(dtype) * (dims.iter().product::<usize>() / c) as f64;
            for (name, got, twin, auto, t) in
                [("dx", &dx, &rdx, &want[0], tol(dtype) * 10.0), ("dweight", &dw, &rdw, &want[1], sum_tol)]
            {
                assert_close(&format!("{what} {name} vs twin"), got, twin, t);
                assert_close(&format!("{what} {name} vs autograd of the twin"), got, auto, t);
            }
        }
    }
    // A strided input (a transposed view) reads the same values.
    let mut g = rng(22);
    let x = uniform(&mut g, &[6, 24], 1.0, DType::F32);
    let w = uniform(&mut g, &[6], 1.0, DType::F32);
    let xt = x.t().unwrap();
    assert!(!xt.is_contiguous());
    let want = k::rms_norm(&xt.contiguous().unwrap(), &w, 1e-6).unwrap();
    assert_close("rms_norm strided", &k::rms_norm(&xt, &w, 1e-6).unwrap(), &want, 0.0);
}

#[test]
fn rope_matches_its_twin_forward_and_backward() {
    for dtype in [DType::F64, DType::F32] {
        let mut g = rng(23);
        // (B, T, H, D): one head, grouped widths, and 4·64·8·16 elements for the rayon path.
        for (dims, scrambled) in [([2, 5, 3, 8], false), ([1, 7, 1, 2], true), ([4, 64, 8, 16], true)] {
            let (t, d) = (dims[1], dims[3]);
            let (cos, sin) = tables(t, d, 3, scrambled, DType::F32);
            let x = uniform(&mut g, &dims, 1.0, dtype);
            let dy = uniform(&mut g, &dims, 1.0, dtype);
            untracked(&[&x, &dy, &cos, &sin]);
            let what = format!("rope {dims:?} {dtype:?}");
            // The tables are f32 whatever the input's dtype: both sides convert them the same.
            let y = k::rope(&x, &cos, &sin).unwrap();
            assert_close(&what, &y, &r::rope(&x, &cos, &sin).unwrap(), tol(dtype));
            let dx = k::rope_backward(&dy, &cos, &sin).unwrap();
            assert_close(&format!("{what} dx vs twin"), &dx, &r::rope_backward(&dy, &cos, &sin).unwrap(), tol(dtype));
            let want = autograd(&[&x], &dy, |ts| r::rope(&ts[0], &cos, &sin));
            assert_close(&format!("{what} dx vs autograd of the twin"), &dx, &want[0], tol(dtype));
        }
    }
    // Position 0 is the identity; a rotation keeps each head's norm.
    let mut g = rng(24);
    let x = uniform(&mut g, &[2, 1, 3, 8], 1.0, DType::F64);
    let (cos, sin) = tables(1, 8, 0, false, DType::F64);
    assert_close("rope at position 0", &k::rope(&x, &cos, &sin).unwrap(), &x, 0.0);
    let x = uniform(&mut g, &[2, 6, 3, 8], 1.0, DType::F64);
    let (cos, sin) = tables(6, 8, 9, false, DType::F64);
    let norms = |t: &Tensor| t.sqr().unwrap().sum_keepdim(3).unwrap();
    assert_close("rope keeps norms", &norms(&k::rope(&x, &cos, &sin).unwrap()), &norms(&x), 1e-12);
}

#[test]
fn swiglu_matches_its_twin_forward_and_backward() {
    for dtype in [DType::F64, DType::F32] {
        let mut g = rng(25);
        // Widths under and over the kernel's 1024-element pieces; 32·2·1100 for the rayon path.
        // Gate values up to ±30 reach both of the sigmoid's tails.
        for (dims, scale) in [(vec![3, 2, 10], 4.0), (vec![4, 2], 1.0), (vec![32, 2, 2200], 30.0)] {
            let gate_up = uniform(&mut g, &dims, scale, dtype);
            let mut half = dims.clone();
            *half.last_mut().unwrap() /= 2;
            let da = uniform(&mut g, &half, 1.0, dtype);
            untracked(&[&gate_up, &da]);
            let what = format!("swiglu {dims:?} {dtype:?}");
            // f32: the vectorised exp is within a few ulp of libm's, scaled by |g| up to 30.
            let t = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
            assert_close(&what, &k::swiglu(&gate_up).unwrap(), &r::swiglu(&gate_up).unwrap(), t);
            let dgu = k::swiglu_backward(&gate_up, &da).unwrap();
            assert_close(&format!("{what} vs twin"), &dgu, &r::swiglu_backward(&gate_up, &da).unwrap(), t);
            let want = autograd(&[&gate_up], &da, |ts| r::swiglu(&ts[0]));
            assert_close(&format!("{what} vs autograd of the twin"), &dgu, &want[0], t);
        }
    }
}

#[test]
fn causal_softmax_matches_its_twin_forward_and_backward() {
    for dtype in [DType::F64, DType::F32] {
        let mut g = rng(28);
        // (B, KV, G·T, T): grouped heads stacked by rows; one key; and the rayon path.
        for dims in [vec![2, 2, 3 * 5, 5], vec![3, 1, 1], vec![4, 2, 2 * 64, 64]] {
            let scores = uniform(&mut g, &dims, 4.0, dtype);
            let dp = uniform(&mut g, &dims, 1.0, dtype);
            untracked(&[&scores, &dp]);
            let what = format!("causal_softmax {dims:?} {dtype:?}");
            let scale = 0.3;
            let p = k::causal_softmax(&scores, scale).unwrap();
            assert_close(&what, &p, &r::causal_softmax(&scores, scale).unwrap(), tol(dtype));
            // Row r sees keys 0..=r % T: everything past it is exactly zero.
            let t = *dims.last().unwrap();
            let rows = to_f64_vec(&p);
            for (row, vals) in rows.chunks(t).enumerate() {
                assert!(vals[row % t + 1..].iter().all(|&v| v == 0.0), "{what}: row {row} sees the future");
            }
            let ds = k::causal_softmax_backward(&p, &dp, scale).unwrap();
            let twin = r::causal_softmax_backward(&p, &dp, scale).unwrap();
            assert_close(&format!("{what} backward vs twin"), &ds, &twin, tol(dtype));
            let want = autograd(&[&scores], &dp, |ts| r::causal_softmax(&ts[0], scale));
            assert_close(&format!("{what} backward vs autograd of the twin"), &ds, &want[0], tol(dtype) * 10.0);
        }
    }
    let mut g = rng(29);
    let x = uniform(&mut g, &[2, 6, 3], 2.0, DType::F64);
    check_explicit(
        "causal_softmax",
        &x,
        |x| k::causal_softmax(x, 0.7),
        |x, dp| k::causal_softmax_backward(&k::causal_softmax(x, 0.7)?, dp, 0.7),
    );
}

/// Central finite differences of `sum(r · f(x))` in f64 against the explicit `grad(x, r)`, one
/// input element at a time.
fn check_explicit(
    name: &str,
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    grad: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) {
    let y = f(x).unwrap();
    let mut g = rng(0xfd);
    let weights: Vec<f64> = (0..y.elem_count()).map(|_| g.random_range(-1.0..1.0)).collect();
    let r_t = Tensor::from_vec(weights.clone(), y.shape(), &Device::Cpu).unwrap();
    let analytic = to_f64_vec(&grad(x, &r_t).unwrap());
    let base = to_f64_vec(x);
    let loss = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
        to_f64_vec(&f(&t).unwrap()).iter().zip(&weights).map(|(a, b)| a * b).sum()
    };
    let h = 1e-6;
    for (j, &a) in analytic.iter().enumerate() {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[j] += h;
        minus[j] -= h;
        let fd = (loss(plus) - loss(minus)) / (2.0 * h);
        let err = (a - fd).abs() / (1.0 + fd.abs());
        assert!(err <= 1e-7, "{name}: d/dx[{j}]: explicit {a} vs finite difference {fd} (err {err:.1e})");
    }
}

#[test]
fn fused_backwards_match_finite_differences() {
    let mut g = rng(26);
    let dtype = DType::F64;
    let w = (uniform(&mut g, &[7], 1.0, dtype) + 1.0).unwrap();
    let x = uniform(&mut g, &[3, 7], 1.5, dtype);
    check_explicit(
        "rms_norm dx",
        &x,
        |x| k::rms_norm(x, &w, 1e-5),
        |x, dy| Ok(k::rms_norm_backward(x, &w, dy, 1e-5)?.0),
    );
    check_explicit(
        "rms_norm dweight",
        &w,
        |w| k::rms_norm(&x, w, 1e-5),
        |w, dy| Ok(k::rms_norm_backward(&x, w, dy, 1e-5)?.1),
    );
    let (cos, sin) = tables(4, 6, 2, true, dtype);
    let x = uniform(&mut g, &[2, 4, 3, 6], 1.0, dtype);
    check_explicit("rope dx", &x, |x| k::rope(x, &cos, &sin), |_, dy| k::rope_backward(dy, &cos, &sin));
    let gate_up = uniform(&mut g, &[3, 2, 10], 4.0, dtype);
    check_explicit("swiglu dgate_up", &gate_up, k::swiglu, k::swiglu_backward);
}

/// bf16 takes the reference composition (RMSNorm's statistics in f32) and lands within
/// bf16's rounding of the f32 kernels.
#[test]
fn half_precision_falls_back_to_the_twins() {
    let mut g = rng(27);
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let close = |what: &str, half: Tensor, full: Tensor| {
        assert_eq!(half.dtype(), DType::BF16, "{what}");
        let e = max_err(&to_f64_vec(&half), &to_f64_vec(&full));
        assert!(e < 3e-2, "{what}: bf16 differs from f32 by {e}");
    };
    let (x, w, dy) = (
        uniform(&mut g, &[4, 16], 2.0, DType::F32),
        uniform(&mut g, &[16], 1.0, DType::F32),
        uniform(&mut g, &[4, 16], 1.0, DType::F32),
    );
    close("rms_norm", k::rms_norm(&bf(&x), &bf(&w), 1e-5).unwrap(), k::rms_norm(&x, &w, 1e-5).unwrap());
    let (dx, _) = k::rms_norm_backward(&bf(&x), &bf(&w), &bf(&dy), 1e-5).unwrap();
    close("rms_norm dx", dx, k::rms_norm_backward(&x, &w, &dy, 1e-5).unwrap().0);
    let (cos, sin) = tables(3, 8, 0, false, DType::F32);
    let x = uniform(&mut g, &[2, 3, 2, 8], 1.0, DType::F32);
    close("rope", k::rope(&bf(&x), &cos, &sin).unwrap(), k::rope(&x, &cos, &sin).unwrap());
    close("rope dx", k::rope_backward(&bf(&x), &cos, &sin).unwrap(), k::rope_backward(&x, &cos, &sin).unwrap());
    let gu = uniform(&mut g, &[5, 12], 3.0, DType::F32);
    let da = uniform(&mut g, &[5, 6], 1.0, DType::F32);
    close("swiglu", k::swiglu(&bf(&gu)).unwrap(), k::swiglu(&gu).unwrap());
    close("swiglu dx", k::swiglu_backward(&bf(&gu), &bf(&da)).unwrap(), k::swiglu_backward(&gu, &da).unwrap());
}

#[test]
fn llama_ops_reject_bad_arguments() {
    let dev = &Device::Cpu;
    let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, dev).unwrap();
    let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
    for f in [k::rms_norm, r::rms_norm] {
        assert!(msg(f(&z(&[2, 4]), &z(&[3]), 1e-5)).contains("weight must have shape (4,)"));
        assert!(msg(f(&z(&[2, 4]), &z(&[4]), 0.0)).contains("eps must be finite and > 0"));
        assert!(msg(f(&z(&[2, 4]), &z(&[4]).to_dtype(DType::F64).unwrap(), 1e-5)).contains("share a float dtype"));
    }
    let e = k::rms_norm_backward(&z(&[2, 4]), &z(&[4]), &z(&[2, 3]), 1e-5).unwrap_err().to_string();
    assert!(e.contains("must match x"), "{e}");
    for f in [k::rope, k::rope_backward, r::rope, r::rope_backward] {
        assert!(msg(f(&z(&[2, 4]), &z(&[2, 4]), &z(&[2, 4]))).contains("(B, T, H, D)"));
        assert!(msg(f(&z(&[1, 2, 1, 3]), &z(&[2, 3]), &z(&[2, 3]))).contains("must be even"));
        assert!(msg(f(&z(&[1, 2, 1, 4]), &z(&[3, 4]), &z(&[2, 4]))).contains("must have shape (2, 4)"));
    }
    for f in [k::swiglu, r::swiglu] {
        assert!(msg(f(&z(&[2, 5]))).contains("must be even"));
    }
    assert!(msg(k::swiglu_backward(&z(&[2, 6]), &z(&[2, 6]))).contains("must be [2, 3]"));
}

/// The plain composition of causal grouped-query attention: each query head against its k/v
/// head (`repeat_kv` by index), scaled scores, the reference causal softmax, the product, and
/// the heads merged to `(B, T, H·D)`. Returns `(merged, probs (B, H, T, T))`.
fn grouped_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, h, d) = q.dims4()?;
    let group = h / k.dim(2)?;
    let (mut ys, mut ps) = (Vec::new(), Vec::new());
    for hi in 0..h {
        let qh = q.narrow(2, hi, 1)?.squeeze(2)?.contiguous()?; // (B, T, D)
        let kh = k.narrow(2, hi / group, 1)?.squeeze(2)?.contiguous()?;
        let vh = v.narrow(2, hi / group, 1)?.squeeze(2)?.contiguous()?;
        let p = r::causal_softmax(&qh.matmul(&kh.t()?)?, 1.0 / (d as f64).sqrt())?; // (B, T, T)
        ys.push(p.matmul(&vh)?);
        ps.push(p);
    }
    Ok((Tensor::cat(&ys, 2)?.reshape((b, t, h * d))?, Tensor::stack(&ps, 1)?))
}

/// The in-place grouped-query attention against the composition: values and probabilities,
/// and its backward (RoPE's backward included, written as `[dq | dk | dv]`) against autograd
/// through RoPE and the composition. Queries, keys and values come as views of one fused
/// projection, so the kernels read them through their strides; T = 70 spans a partial causal
/// block; groups of 1 (plain multi-head), 2 and 3.
#[test]
fn grouped_causal_attention_matches_the_composition_forward_and_backward() {
    for dtype in [DType::F64, DType::F32] {
        let mut g = rng(31);
        for (b, t, h, kv, d) in [(2, 70, 4, 2, 8), (1, 33, 3, 1, 4), (3, 5, 2, 2, 6)] {
            let what = format!("grouped attention b{b} t{t} h{h} kv{kv} d{d} {dtype:?}");
            let qkv = uniform(&mut g, &[b, t, h + 2 * kv, d], 1.5, dtype);
            let (q_pre, k_pre, v) =
                (qkv.narrow(2, 0, h).unwrap(), qkv.narrow(2, h, kv).unwrap(), qkv.narrow(2, h + kv, kv).unwrap());
            let (cos, sin) = tables(t, d, 0, true, dtype);
            let q = k::rope(&q_pre, &cos, &sin).unwrap();
            let kr = k::rope(&k_pre, &cos, &sin).unwrap();
            untracked(&[&q, &kr, &v]);
            // RoPE reads the projection's head slices in place.
            assert_close(&format!("{what}: rope of q"), &q, &r::rope(&q_pre, &cos, &sin).unwrap(), tol(dtype));
            assert_close(&format!("{what}: rope of k"), &kr, &r::rope(&k_pre, &cos, &sin).unwrap(), tol(dtype));
            assert!(k::grouped_causal_attention_runs(&q, &kr, &v));
            let (merged, probs) = k::grouped_causal_attention(&q, &kr, &v).unwrap();
            let (want_merged, want_probs) = grouped_attention_reference(&q, &kr, &v).unwrap();
            assert_close(&format!("{what}: merged"), &merged, &want_merged, tol(dtype));
            assert_close(&format!("{what}: probs"), &probs, &want_probs, tol(dtype));

            let dy = uniform(&mut g, &[b, t, h * d], 1.0, dtype);
            let dqkv = k::grouped_causal_attention_backward(&q, &kr, &v, &probs, &dy, &cos, &sin).unwrap();
            assert_eq!(dqkv.dims(), [b, t, (h + 2 * kv) * d]);
            let want = autograd(
                &[&q_pre.contiguous().unwrap(), &k_pre.contiguous().unwrap(), &v.contiguous().unwrap()],
                &dy,
                |x| {
                    let (q, k) = (r::rope(&x[0], &cos, &sin)?, r::rope(&x[1], &cos, &sin)?);
                    Ok(grouped_attention_reference(&q, &k, &x[2])?.0)
                },
            );
            let dqkv = dqkv.reshape((b, t, h + 2 * kv, d)).unwrap();
            for (i, (name, start, len)) in [("dq", 0, h), ("dk", h, kv), ("dv", h + kv, kv)].into_iter().enumerate() {
                let got = dqkv.narrow(2, start, len).unwrap();
                assert_close(&format!("{what}: {name}"), &got, &want[i], 100.0 * tol(dtype));
            }
        }
    }
}

#[test]
fn grouped_causal_attention_rejects_bad_arguments() {
    let x = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (q, kv) = (x(&[2, 4, 4, 8]), x(&[2, 4, 2, 8]));
    for (q, k, v, what) in [
        (x(&[2, 4, 8]), kv.clone(), kv.clone(), "q must be (B, T, H, D)"),
        (q.clone(), x(&[2, 5, 2, 8]), x(&[2, 5, 2, 8]), "k must be"),
        (q.clone(), kv.clone(), x(&[2, 4, 1, 8]), "must have k's shape"),
        (x(&[2, 4, 3, 8]), kv.clone(), kv.clone(), "multiple of the 2 k/v heads"),
        (x(&[2, 4, 2, 7]), x(&[2, 4, 2, 7]), x(&[2, 4, 2, 7]), "must be even"),
        (
            q.to_dtype(DType::F16).unwrap(),
            kv.to_dtype(DType::F16).unwrap(),
            kv.to_dtype(DType::F16).unwrap(),
            "f32 or f64",
        ),
    ] {
        let err = k::grouped_causal_attention(&q, &k, &v).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
    let (probs, dy) = (x(&[2, 4, 4, 4]), x(&[2, 4, 32]));
    let (cos, sin) = (x(&[4, 8]), x(&[4, 8]));
    let err = k::grouped_causal_attention_backward(&q, &kv, &kv, &x(&[2, 4, 4, 3]), &dy, &cos, &sin).unwrap_err();
    assert!(err.to_string().contains("probs"), "{err}");
    let err = k::grouped_causal_attention_backward(&q, &kv, &kv, &probs, &dy, &x(&[3, 8]), &sin).unwrap_err();
    assert!(err.to_string().contains("tables"), "{err}");
    assert!(k::grouped_causal_attention_backward(&q, &kv, &kv, &probs, &dy, &cos, &sin).is_ok());
}
