//! Accuracy of the vectorised f32 math (`brigade_kernels::vmath`) against f64 libm, for every
//! instruction-set version this CPU can run (the portable one always, AVX2+FMA where present):
//! - `exp` and `tanh`: a sweep over every 97th f32 bit pattern of the whole line (~44M inputs
//!   per function and version, dense in [-20, 20] and everywhere else), random inputs and edge
//!   values, asserting the documented bounds; special values (±inf, NaN, ±0, subnormals).
//! - GELU forward/backward against an f64 evaluation of the formula;
//! - the softmax and LayerNorm row pieces (max, sums, dot, exp-sum, squared deviations, the
//!   LayerNorm backward's sums) for every remainder length;
//! - the fused ops on f32 against the f64 reference compositions at 1e-6 (values and
//!   gradients), which is 10x tighter than the fused-vs-f32-composition tests.
//!
//! `exhaustive_exp_and_tanh_error` (ignored: ~4 min per version on 2 idle cores) checks all
//! 2^32 inputs and prints the measured worst errors the crate documents.

use brigade_kernels as k;
use brigade_kernels::reference as r;
use brigade_kernels::vmath::{self, Isa, EXP_MAX_REL_ERR, GELU_MAX_ERR, TANH_MAX_REL_ERR};
use candle_core::{DType, Tensor};
use rand::Rng;

use crate::gradcheck::{compare, rng, uniform};

/// Bit-pattern stride of the sweeps: odd and not a power of two, so the sampled mantissas
/// vary; 2^32 / 97 ≈ 44M inputs.
const STRIDE: u64 = 97;

/// Every `STRIDE`-th f32 over the whole line (both signs, including inf and NaN patterns), plus
/// the integers and halves in [-20, 20] at step 1/1024 and a set of edge values.
fn sweep_inputs(stride: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..1u64 << 32).step_by(stride as usize).map(|b| f32::from_bits(b as u32)).collect();
    v.extend((-20 * 1024..=20 * 1024).map(|i| i as f32 / 1024.0));
    v.extend(EDGES);
    v
}

const EDGES: [f32; 26] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-45,
    -1e-45,
    f32::EPSILON,
    0.625,
    -0.625,
    0.624_999_94,
    88.0,
    88.72,
    88.722_83,
    88.722_84,
    89.0,
    -87.33,
    -87.34,
    -103.9,
    -103.98,
    -104.0,
    -150.0,
    f32::MAX,
    f32::MIN,
    std::f32::consts::LN_2 / 2.0,
];

/// Runs `f` over `xs` in slices of awkward lengths (so every remainder path of the slice loops
/// runs) and returns the outputs.
fn run_sliced(xs: &[f32], f: impl Fn(&[f32], &mut [f32])) -> Vec<f32> {
    let mut out = vec![0.0f32; xs.len()];
    let mut at = 0;
    let mut len = 1;
    while at < xs.len() {
        let end = (at + len).min(xs.len());
        f(&xs[at..end], &mut out[at..end]);
        at = end;
        len = if len > 5000 { 1 } else { len * 3 + 1 };
    }
    out
}

/// Largest error of `got` vs the f64 `want` under `exp`'s contract; `None` when a non-finite
/// case is wrong. Normal results: relative error. Subnormal results: absolute error beyond
/// half a subnormal ulp (the final rounding), relative to the smallest normal. Results that
/// overflow f32 must be +inf.
fn exp_err(x: f32, got: f32, want: f64) -> Option<f64> {
    if x.is_nan() {
        return got.is_nan().then_some(0.0);
    }
    if want > f32::MAX as f64 * (1.0 + EXP_MAX_REL_ERR) {
        return (got == f32::INFINITY).then_some(0.0);
    }
    if got.is_nan() || got.is_infinite() {
        // Right at the top of the range the relative bound allows rounding up to inf.
        return (got == f32::INFINITY && want > f32::MAX as f64 * (1.0 - EXP_MAX_REL_ERR)).then_some(0.0);
    }
    let g = got as f64;
    if want >= f32::MIN_POSITIVE as f64 {
        Some((g - want).abs() / want)
    } else {
        let half_ulp = f64::powi(2.0, -150);
        Some(((g - want).abs() - half_ulp).max(0.0) / f32::MIN_POSITIVE as f64)
    }
}

fn tanh_err(x: f32, got: f32) -> Option<f64> {
    if x.is_nan() {
        return got.is_nan().then_some(0.0);
    }
    let want = (x as f64).tanh();
    if !got.is_finite() {
        return None;
    }
    if want == 0.0 {
        // tanh(±0) = ±0 exactly, sign included.
        return (got.to_bits() == x.to_bits()).then_some(0.0);
    }
    Some((got as f64 - want).abs() / want.abs())
}

/// The worst error of `f` over `xs`, panicking with the input on a contract violation.
fn worst(name: &str, xs: &[f32], out: &[f32], err: impl Fn(f32, f32) -> Option<f64>, bound: f64) -> f64 {
    let mut w = (0.0f64, 0.0f32);
    for (&x, &y) in xs.iter().zip(out) {
        match err(x, y) {
            Some(e) if e <= bound => {
                if e > w.0 {
                    w = (e, x)
                }
            }
            Some(e) => panic!("{name}({x:e} = bits {:#x}) = {y:e}: error {e:.3e} > {bound:.1e}", x.to_bits()),
            None => panic!("{name}({x:e} = bits {:#x}) = {y:e} is wrong", x.to_bits()),
        }
    }
    eprintln!("{name}: worst error {:.3e} at x = {:e} ({} inputs)", w.0, w.1, xs.len());
    w.0
}

#[test]
fn exp_is_within_its_documented_bound() {
    let xs = sweep_inputs(STRIDE);
    for isa in Isa::all_available() {
        let out = run_sliced(&xs, |x, o| isa.exp(x, o));
        worst(&format!("{isa:?} exp"), &xs, &out, |x, y| exp_err(x, y, (x as f64).exp()), EXP_MAX_REL_ERR);
        // Random inputs where softmax lives (x - max <= 0, mostly small).
        let mut g = rng(21);
        let xs: Vec<f32> = (0..1 << 20).map(|_| g.random_range(-30.0..0.0f32)).collect();
        let out = run_sliced(&xs, |x, o| isa.exp(x, o));
        worst(&format!("{isa:?} exp random"), &xs, &out, |x, y| exp_err(x, y, (x as f64).exp()), EXP_MAX_REL_ERR);
    }
}

#[test]
fn exp_special_values() {
    for isa in Isa::all_available() {
        let xs = [0.0, -0.0, f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -f32::NAN, -100.0, -200.0, 89.0, 1e30, -1e30];
        let mut out = [0.0f32; 11];
        isa.exp(&xs, &mut out);
        // exp(0) is exactly 1: softmax's largest element gets exactly exp(0).
        assert_eq!(out[0], 1.0, "{isa:?}");
        assert_eq!(out[1], 1.0, "{isa:?}");
        assert_eq!(out[2], 0.0, "{isa:?} exp(-inf)");
        assert_eq!(out[3], f32::INFINITY, "{isa:?} exp(inf)");
        assert!(out[4].is_nan() && out[5].is_nan(), "{isa:?} NaN: {out:?}");
        // exp(-100) = 3.7e-44: a subnormal, correctly rounded (26 · 2^-149 = 3.64e-44).
        let want = (-100f64).exp();
        assert!((out[6] as f64 - want).abs() <= f64::powi(2.0, -150), "{isa:?} exp(-100) = {:e}", out[6]);
        assert!(out[6] > 0.0, "{isa:?}");
        assert_eq!(out[7], 0.0, "{isa:?}");
        assert_eq!(out[8], f32::INFINITY, "{isa:?}");
        assert_eq!(out[9], f32::INFINITY, "{isa:?}");
        assert_eq!(out[10], 0.0, "{isa:?}");
    }
}

#[test]
fn tanh_is_within_its_documented_bound() {
    let xs = sweep_inputs(STRIDE);
    for isa in Isa::all_available() {
        let out = run_sliced(&xs, |x, o| isa.tanh(x, o));
        worst(&format!("{isa:?} tanh"), &xs, &out, tanh_err, TANH_MAX_REL_ERR);
    }
}

#[test]
fn tanh_special_values() {
    for isa in Isa::all_available() {
        let xs = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 0.0, 1e-40, -1e-40, 50.0, -50.0];
        let mut out = [0.0f32; 9];
        isa.tanh(&xs, &mut out);
        assert_eq!(&out[..2], &[1.0, -1.0], "{isa:?}");
        assert!(out[2].is_nan(), "{isa:?}");
        assert_eq!(out[3].to_bits(), (-0.0f32).to_bits(), "{isa:?} tanh(-0)");
        assert_eq!(out[4].to_bits(), 0, "{isa:?} tanh(0)");
        // Subnormal inputs: tanh(x) = x to f32 precision.
        assert_eq!(&out[5..7], &[1e-40, -1e-40], "{isa:?}");
        assert_eq!(&out[7..], &[1.0, -1.0], "{isa:?}");
    }
}

// ---- GELU ----------------------------------------------------------------------------------

const GELU_A: f64 = 0.797_884_560_802_865_4; // sqrt(2 / π)
const GELU_B: f64 = 0.044715;

/// `(gelu(x), gelu'(x), scale)` in f64 for the f32 input `x`, and the scale the error bound is
/// relative to (see `GELU_MAX_ERR`): `σ(±2u)` come from separate `exp`s so neither the value
/// nor the derivative cancels, unlike `1 + tanh u` on the negative side.
fn gelu_ref(x: f32) -> (f64, f64, f64, f64) {
    let x = x as f64;
    let u = GELU_A * (x + GELU_B * x * x * x);
    let du = GELU_A * (1.0 + 3.0 * GELU_B * x * x);
    let s = 1.0 / (1.0 + (-2.0 * u).exp());
    let c = 1.0 / (1.0 + (2.0 * u).exp());
    let tail = 2.0 * x * du * s * c;
    // First-order effect of a few-ulp error in f32's `u`: relative `2|u| c` on the value and
    // on each term of the derivative.
    let amp = 1.0 + 2.0 * u.abs() * c;
    // The tail's factor σ(2u)σ(-2u) has d ln / du = 2(c - s), so its relative error is
    // up to 2|u| times `u`'s on either side.
    (x * s, s + tail, (x * s).abs() * amp, s * amp + tail.abs() * (1.0 + 2.0 * u.abs()))
}

#[test]
fn gelu_reference_formula_is_the_tanh_formula() {
    // The f64 reference above uses x σ(2u); check it against the defining formula
    // 0.5 x (1 + tanh u) and its derivative where the latter does not cancel (x > -4).
    for i in -4000..=20000 {
        let x = i as f32 / 1000.0;
        let (g, dg, _, _) = gelu_ref(x);
        let xd = x as f64;
        let u = GELU_A * (xd + GELU_B * xd * xd * xd);
        let t = u.tanh();
        let g2 = 0.5 * xd * (1.0 + t);
        let dg2 = 0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * GELU_A * (1.0 + 3.0 * GELU_B * xd * xd);
        assert!((g - g2).abs() <= 1e-12 * (1.0 + g2.abs()), "gelu({x})");
        assert!((dg - dg2).abs() <= 1e-12 * (1.0 + dg2.abs()), "gelu'({x})");
    }
}

#[test]
fn gelu_fwd_and_bwd_are_within_their_documented_bound() {
    // Every f32 in [-20, 20] at stride 97 is ~22M inputs per version; beyond that GELU is x or
    // 0 (checked below with the special values).
    let lo = (-20.0f32).to_bits() as u64; // negative floats: bits above 0x8000_0000
    let hi = 20.0f32.to_bits() as u64;
    let mut xs: Vec<f32> = (0..=hi)
        .step_by(STRIDE as usize)
        .chain((0x8000_0000..=lo).step_by(STRIDE as usize))
        .map(|b| f32::from_bits(b as u32))
        .collect();
    let mut g = rng(22);
    xs.extend((0..1 << 18).map(|_| g.random_range(-12.0..12.0f32)));
    xs.extend(EDGES.iter().filter(|x| x.abs() <= 1e4));
    // Subnormal results (x < -9.3, or tiny x) carry an absolute error of a few subnormal ulps:
    // σ(2u) has exp's half-ulp error, which the value multiplies by |x| and the derivative by
    // |2 x u'|, and the result itself is rounded once more. Allow 8 ulps for each.
    let sub = 8.0 * f64::powi(2.0, -149);
    let dy: Vec<f32> = (0..xs.len()).map(|i| [1.0, -0.5, 3.0][i % 3]).collect();
    for isa in Isa::all_available() {
        let y = run_sliced(&xs, |x, o| isa.gelu_tanh_fwd(x, o));
        let mut dx = vec![0.0f32; xs.len()];
        isa.gelu_tanh_bwd(&xs, &dy, &mut dx);
        let (mut wf, mut wb) = (0.0f64, 0.0f64);
        for i in 0..xs.len() {
            let (g, dg, sg, sdg) = gelu_ref(xs[i]);
            let xa = xs[i].abs() as f64;
            let want_dx = dy[i] as f64 * dg;
            let slack_f = sub * (1.0 + xa);
            let slack_b = sub * (2.0 + 2.0 * xa * GELU_A * (1.0 + 3.0 * GELU_B * xa * xa));
            // Error beyond the subnormal slack, relative to the scale of the bound; the floor
            // keeps x = 0 (scale 0) from being 0 / 0.
            let scaled = |err: f64, slack: f64, scale: f64| (err - slack).max(0.0) / scale.max(f64::MIN_POSITIVE);
            let ef = scaled((y[i] as f64 - g).abs(), slack_f, sg);
            let eb = scaled((dx[i] as f64 - want_dx).abs(), dy[i].abs() as f64 * slack_b, dy[i].abs() as f64 * sdg);
            assert!(ef <= GELU_MAX_ERR, "{isa:?} gelu({:e}) = {:e}, want {g:e} (scaled error {ef:.2e})", xs[i], y[i]);
            assert!(
                eb <= GELU_MAX_ERR,
                "{isa:?} gelu'({:e}) · {} = {:e}, want {want_dx:e} (scaled error {eb:.2e})",
                xs[i],
                dy[i],
                dx[i]
            );
            wf = wf.max(ef);
            wb = wb.max(eb);
        }
        eprintln!("{isa:?} gelu: worst scaled error fwd {wf:.3e}, bwd {wb:.3e} ({} inputs)", xs.len());
    }
}

#[test]
fn gelu_special_values() {
    for isa in Isa::all_available() {
        let xs = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, 1e4, -1e4, 1e20, -1e20, f32::MAX, f32::MIN];
        let mut y = [0.0f32; 10];
        let mut d = [0.0f32; 10];
        isa.gelu_tanh_fwd(&xs, &mut y);
        isa.gelu_tanh_bwd(&xs, &[1.0; 10], &mut d);
        assert_eq!(y[0], f32::INFINITY, "{isa:?}");
        // -inf · σ(-inf) = -inf · 0, as the tanh formula (and candle's gelu) gives.
        assert!(y[1].is_nan() && y[2].is_nan(), "{isa:?} {y:?}");
        assert_eq!(y[3], 0.0, "{isa:?}");
        assert_eq!([y[4], y[6], y[8]], [1e4, 1e20, f32::MAX], "{isa:?}");
        assert_eq!([y[5], y[7], y[9]], [0.0; 3], "{isa:?}");
        // Derivative: exactly 1 / 0 far out, never NaN for non-NaN input.
        assert_eq!([d[0], d[4], d[6], d[8]], [1.0; 4], "{isa:?} {d:?}");
        assert_eq!([d[1], d[5], d[7], d[9]], [0.0; 4], "{isa:?} {d:?}");
        assert!(d[2].is_nan(), "{isa:?}");
        assert_eq!(d[3], 0.5, "{isa:?} gelu'(0)");
    }
}

// ---- softmax row pieces ----------------------------------------------------------------------

/// f64 sum of `|terms|`: the natural scale of a float sum's rounding error.
fn abs_sum(v: impl Iterator<Item = f64>) -> f64 {
    v.map(f64::abs).sum()
}

#[test]
fn row_reductions_match_f64_for_every_remainder() {
    let mut g = rng(23);
    for isa in Isa::all_available() {
        for n in (0..70).chain([255, 256, 257, 1000, 50257]) {
            let x: Vec<f32> = (0..n).map(|_| g.random_range(-8.0..8.0f32)).collect();
            let y: Vec<f32> = (0..n).map(|_| g.random_range(-2.0..2.0f32)).collect();
            let xd = || x.iter().map(|&v| v as f64);
            // max: exact.
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(isa.max(&x), want_max, "{isa:?} max n={n}");
            // Sums: error within n ulp-ish of the absolute sum (f32 accumulation).
            let tol = |scale: f64| 4.0 * f32::EPSILON as f64 * (n as f64).sqrt().max(1.0) * scale + 1e-30;
            let s = isa.sum(&x) as f64;
            let want: f64 = xd().sum();
            assert!((s - want).abs() <= tol(abs_sum(xd())), "{isa:?} sum n={n}: {s} vs {want}");
            let d = isa.dot(&x, &y) as f64;
            let want: f64 = xd().zip(&y).map(|(a, &b)| a * b as f64).sum();
            let scale = abs_sum(xd().zip(&y).map(|(a, &b)| a * b as f64));
            assert!((d - want).abs() <= tol(scale), "{isa:?} dot n={n}: {d} vs {want}");
            // exp-sum with a shift, and the per-element exps it stores.
            let shift = isa.max(&x);
            let mut e = vec![0.0f32; n];
            let s = isa.exp_shift_sum(&x, shift, &mut e) as f64;
            let s2 = isa.sum_exp_shift(&x, shift) as f64;
            let want: f64 = xd().map(|v| (v - shift as f64).exp()).sum();
            assert!(
                (s - want).abs() <= tol(want) + EXP_MAX_REL_ERR * want,
                "{isa:?} exp_shift_sum n={n}: {s} vs {want}"
            );
            assert!(
                (s2 - want).abs() <= tol(want) + EXP_MAX_REL_ERR * want,
                "{isa:?} sum_exp_shift n={n}: {s2} vs {want}"
            );
            for (i, (&ei, &xi)) in e.iter().zip(&x).enumerate() {
                let w = ((xi - shift) as f64).exp();
                assert!((ei as f64 - w).abs() <= EXP_MAX_REL_ERR * w, "{isa:?} exp_shift_sum n={n} [{i}]");
            }
            // LayerNorm's reductions: sum of squared deviations, and the backward's sums with
            // their dw/db accumulation (into non-zero accumulators, as across rows).
            let mean = (xd().sum::<f64>() / n.max(1) as f64) as f32;
            let v = isa.sum_sq_dev(&x, mean) as f64;
            let want: f64 = xd().map(|a| (a - mean as f64).powi(2)).sum();
            assert!((v - want).abs() <= tol(want), "{isa:?} sum_sq_dev n={n}: {v} vs {want}");
            let w: Vec<f32> = (0..n).map(|_| g.random_range(0.5..1.5f32)).collect();
            let (mut dw, mut db) = (y.clone(), w.clone());
            let rstd = 0.7f32;
            let (sg, sgx) = isa.layer_norm_bwd_sums(&x, &y, &w, (mean, rstd), &mut dw, &mut db);
            let xhat = |i: usize| (x[i] as f64 - mean as f64) * rstd as f64;
            let gi = |i: usize| y[i] as f64 * w[i] as f64;
            let want_g: f64 = (0..n).map(gi).sum();
            let want_gx: f64 = (0..n).map(|i| gi(i) * xhat(i)).sum();
            let scale_g = abs_sum((0..n).map(gi));
            let scale_gx = abs_sum((0..n).map(|i| gi(i) * xhat(i)));
            assert!((sg as f64 - want_g).abs() <= tol(scale_g), "{isa:?} ln sum(g) n={n}");
            assert!((sgx as f64 - want_gx).abs() <= tol(scale_gx), "{isa:?} ln sum(g xhat) n={n}");
            for i in 0..n {
                let want_dw = y[i] as f64 + y[i] as f64 * xhat(i);
                let want_db = w[i] as f64 + y[i] as f64;
                let e = 4.0 * f32::EPSILON as f64;
                assert!((dw[i] as f64 - want_dw).abs() <= e * (1.0 + want_dw.abs()), "{isa:?} dw n={n} [{i}]");
                assert!((db[i] as f64 - want_db).abs() <= e * (1.0 + want_db.abs()), "{isa:?} db n={n} [{i}]");
            }
            // Log-softmax backward: dx = dy - exp(y) dy_sum, with y <= 0 like log-probabilities.
            let ly: Vec<f32> = x.iter().map(|&v| v - shift - 3.0).collect();
            let mut dx = vec![0.0f32; n];
            isa.log_softmax_bwd(&ly, &y, 1.5, &mut dx);
            for i in 0..n {
                let ex = (ly[i] as f64).exp();
                let w = y[i] as f64 - ex * 1.5;
                let scale = (y[i].abs() as f64) + ex * 1.5;
                assert!(
                    (dx[i] as f64 - w).abs() <= 2.0 * EXP_MAX_REL_ERR * scale,
                    "{isa:?} log_softmax_bwd n={n} [{i}]"
                );
            }
        }
        // NaN: max skips it, and the exp-sum carries it into the row.
        let x = [1.0, f32::NAN, 3.0];
        assert_eq!(isa.max(&x), 3.0, "{isa:?}");
        assert!(isa.sum_exp_shift(&x, 3.0).is_nan(), "{isa:?}");
        // All -inf (a fully masked row): max is -inf, as the scalar scan gives.
        assert_eq!(isa.max(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY, "{isa:?}");
        assert_eq!(isa.max(&[]), f32::NEG_INFINITY, "{isa:?}");
    }
}

// ---- fused ops on f32 vs the f64 compositions ----------------------------------------------

/// Tolerance of the f32 fused ops against the f64 compositions (`|a - b| / (1 + |b|)`).
const TIGHT: f64 = 1e-6;

fn to64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

#[test]
fn fused_f32_ops_match_f64_compositions_tightly() {
    let mut g = rng(24);
    for (dims, scale) in [(vec![3, 5, 33], 3.0), (vec![70, 257], 8.0), (vec![16, 128], 30.0)] {
        let x = uniform(&mut g, &dims, scale, DType::F32);
        compare(
            "softmax f32 vs f64 composition",
            std::slice::from_ref(&x),
            |t| t.to_vec(),
            |t| k::softmax_last_dim(&t[0]),
            |t| r::softmax_last_dim(&to64(&t[0])),
            TIGHT,
        );
        compare(
            "log_softmax f32 vs f64 composition",
            &[x],
            |t| t.to_vec(),
            |t| k::log_softmax_last_dim(&t[0]),
            |t| r::log_softmax_last_dim(&to64(&t[0])),
            TIGHT,
        );
    }
    for dims in [vec![3, 5, 33], vec![64, 300], vec![2, 4096]] {
        let c = *dims.last().unwrap();
        let x = (uniform(&mut g, &dims, 2.0, DType::F32) + 0.5).unwrap();
        let w = uniform(&mut g, &[c], 1.0, DType::F32);
        let b = uniform(&mut g, &[c], 1.0, DType::F32);
        compare(
            "layer_norm f32 vs f64 composition",
            &[x, w, b],
            |t| t.to_vec(),
            |t| k::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| r::layer_norm(&to64(&t[0]), &to64(&t[1]), &to64(&t[2]), 1e-5),
            TIGHT,
        );
    }
    for (n, v) in [(13, 29), (128, 300), (4, 5000)] {
        let logits = uniform(&mut g, &[n, v], 6.0, DType::F32);
        let t: Vec<u32> = (0..n).map(|_| g.random_range(0..v as u32)).collect();
        let t = Tensor::new(t.as_slice(), &candle_core::Device::Cpu).unwrap();
        compare(
            "cross_entropy f32 vs f64 composition",
            &[logits],
            |x| x.to_vec(),
            |x| k::cross_entropy_sum(&x[0], &t),
            |x| r::cross_entropy_sum(&to64(&x[0]), &t),
            TIGHT,
        );
    }
    // GELU: candle's f64 gelu *backward* hard-codes 6-digit constants (~1e-6 relative), so the
    // f64 yardstick is the fused f64 kernel (libm tanh, the formula in gelu.rs); its forward is
    // also checked against candle's f64 forward, which uses exact constants.
    for dims in [vec![3, 37], vec![40_000]] {
        let x = uniform(&mut g, &dims, 6.0, DType::F32);
        compare(
            "gelu_tanh f32 vs f64 fused (libm)",
            std::slice::from_ref(&x),
            |t| t.to_vec(),
            |t| k::gelu_tanh(&t[0]),
            |t| k::gelu_tanh(&to64(&t[0])),
            TIGHT,
        );
        let got = crate::gradcheck::to_f64_vec(&k::gelu_tanh(&x).unwrap());
        let want = crate::gradcheck::to_f64_vec(&r::gelu_tanh(&to64(&x)).unwrap());
        let e = crate::gradcheck::max_err(&got, &want);
        assert!(e <= TIGHT, "gelu_tanh f32 vs candle f64 forward: {e:.2e}");
    }
}

/// All 2^32 inputs, both versions: prints the measured worst errors that `vmath`'s constants
/// document. `cargo test --release -p brigade-kernels -- --ignored exhaustive --nocapture`.
#[test]
#[ignore = "minutes: every f32; run by hand when the polynomials change"]
fn exhaustive_exp_and_tanh_error() {
    use rayon::prelude::*;
    for isa in Isa::all_available() {
        let (e, t) = (0u64..1 << 16)
            .into_par_iter()
            .map(|hi| {
                let xs: Vec<f32> = (0..1u32 << 16).map(|lo| f32::from_bits(((hi as u32) << 16) | lo)).collect();
                let mut ye = vec![0.0f32; xs.len()];
                let mut yt = vec![0.0f32; xs.len()];
                isa.exp(&xs, &mut ye);
                isa.tanh(&xs, &mut yt);
                let mut w = ((0.0f64, 0.0f32), (0.0f64, 0.0f32));
                for i in 0..xs.len() {
                    let x = xs[i];
                    let ee = exp_err(x, ye[i], (x as f64).exp()).unwrap_or_else(|| panic!("exp({x:e}) = {:e}", ye[i]));
                    let et = tanh_err(x, yt[i]).unwrap_or_else(|| panic!("tanh({x:e}) = {:e}", yt[i]));
                    if ee > w.0 .0 {
                        w.0 = (ee, x);
                    }
                    if et > w.1 .0 {
                        w.1 = (et, x);
                    }
                }
                w
            })
            .reduce(
                || ((0.0, 0.0), (0.0, 0.0)),
                |a, b| (if a.0 .0 >= b.0 .0 { a.0 } else { b.0 }, if a.1 .0 >= b.1 .0 { a.1 } else { b.1 }),
            );
        eprintln!("{isa:?}: exp worst {:.3e} at {:e}; tanh worst {:.3e} at {:e}", e.0, e.1, t.0, t.1);
        assert!(e.0 <= EXP_MAX_REL_ERR && t.0 <= TANH_MAX_REL_ERR);
    }
}

#[test]
fn module_functions_run_the_best_isa() {
    let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
    let (mut a, mut b) = (vec![0.0; 1000], vec![0.0; 1000]);
    vmath::tanh(&xs, &mut a);
    Isa::best().tanh(&xs, &mut b);
    assert_eq!(a, b);
    vmath::exp(&xs, &mut a);
    Isa::best().exp(&xs, &mut b);
    assert_eq!(a, b);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        Isa::best() == Isa::Avx2Fma,
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    );
}
