//! Vectorised f32 elementwise math for the fused CPU kernels: `exp`, `tanh`, GELU-tanh forward
//! and backward, the row pieces of softmax / log-softmax / cross-entropy (max, sum of
//! shifted exponentials, dot products) and LayerNorm's row reductions.
//!
//! Why: the scalar libm `tanhf`/`expm1f`/`expf` calls in the GELU and softmax kernels cost
//! ~18% of a GPT training step on the CPU. Here every function is branch-free per element
//! (range reduction + polynomial, selects instead of branches), so the compiler vectorises the
//! slice loops. Each slice function is compiled twice: once for the baseline target (SSE2 on
//! x86_64, NEON on aarch64, ...) and, on x86_64, once with AVX2 + FMA enabled, chosen at run time
//! by [`Isa::best`] (`is_x86_feature_detected!`). Both builds compute the same formulas; the
//! AVX2 one fuses multiply-adds, so the two may differ in the last bit or two, both within the
//! bounds below. f64 is not handled here: the kernels keep libm for f64 (it is the precision
//! reference and not on the training hot path).
//!
//! # Accuracy (measured against f64 libm on the f32 input; tested in `kernels/tests`)
//! - [`exp`]: relative error ≤ [`EXP_MAX_REL_ERR`] (1e-7) for results in the normal range;
//!   results below `f32::MIN_POSITIVE` (x < -87.34) are subnormal, rounded once, so within half
//!   a subnormal ulp (2^-150) of the true value plus the relative bound; `exp(x) = 0` for
//!   x < -103.98, `+inf` above 88.72 (like libm); `exp(0) = 1` exactly. NaN in, NaN out;
//!   `exp(-inf) = 0`, `exp(inf) = inf`.
//! - [`tanh`]: relative error ≤ [`TANH_MAX_REL_ERR`] (2e-7) everywhere (odd polynomial near 0,
//!   so tiny inputs keep full relative accuracy); `±inf -> ±1`, NaN propagates,
//!   `tanh(-0) = -0`.
//! - GELU ([`gelu_tanh_fwd`], [`gelu_tanh_bwd`]): computed as `x · σ(2u)` with
//!   `u = a(x + b x³)` (the same function as `0.5 x (1 + tanh u)`, without the cancellation of
//!   `1 + tanh u` for negative `x`). The error is dominated by rounding `u` in f32, which the
//!   sigmoid amplifies by `2|u|` on the negative side; see [`GELU_MAX_ERR`] for the bound the
//!   tests enforce.
//!
//! Special values of the GELU kernels follow the tanh formula where it is defined:
//! `gelu(inf) = inf`, `gelu(-inf) = NaN` (`-inf · 0`, as candle's `gelu` gives), NaN propagates;
//! the derivative tends to exactly 1 / 0 for large positive / negative `x` and is 1 / 0 at ±inf.

/// Bound on the relative error of [`exp`] for normal results. Measured over all 2^32 inputs
/// (the ignored test `exhaustive_exp_and_tanh_error`): worst 8.16e-8 portable, 8.46e-8 AVX2+FMA,
/// i.e. under 1.5 ulp.
pub const EXP_MAX_REL_ERR: f64 = 1e-7;
/// Bound on the relative error of [`tanh`]. Measured over all 2^32 inputs: worst 1.50e-7 (both
/// versions), just above the switch to the exp form at |x| = 0.625, about 1.4 ulp there.
pub const TANH_MAX_REL_ERR: f64 = 2e-7;
/// Bound the tests enforce for the GELU forward and backward against an f64 evaluation of the
/// same function on the same f32 input. Forward: `|err| <= GELU_MAX_ERR · |gelu(x)| (1 +
/// 2|u| σ(-2u))`; backward: each of the derivative's two terms `σ(2u)` and `2 x u' σ(2u)
/// σ(-2u)` gets the same kind of relative allowance. The `2|u|` factors are the first-order
/// effect of rounding `u` itself in f32 (a few ulp) through the sigmoid: they matter only where
/// the result is already small (x well below -2); elsewhere the error is ~1e-7 relative.
/// Subnormal results (x < -9.3) carry a few subnormal ulps of absolute error on top. Measured
/// worst (every 97th f32 in [-20, 20], both versions): 1.7e-7 forward, 1.9e-7 backward.
pub const GELU_MAX_ERR: f64 = 4e-7;

/// `sqrt(2 / π)` and GPT-2's cubic coefficient.
const GELU_A: f32 = 0.797_884_6;
const GELU_B: f32 = 0.044_715;
const GELU_AB: f32 = GELU_A * GELU_B;

/// Elements per block in the reductions: 16 independent f32 accumulators (two AVX registers,
/// four SSE ones) hide the add latency, and the fixed-size inner loops vectorise.
const L: usize = 16;

// ---- instruction-set selection ----------------------------------------------------------------

/// Which compiled version of the slice functions runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The baseline target's code (SSE2 vectors on x86_64), autovectorised, no FMA.
    Portable,
    /// x86_64 with AVX2 and FMA: 8-wide vectors and fused multiply-adds.
    Avx2Fma,
}

impl Isa {
    /// The fastest version this CPU supports (the detection is cached by std).
    #[inline]
    pub fn best() -> Isa {
        if Isa::Avx2Fma.available() {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        }
    }

    /// Whether this CPU can run `self`.
    #[inline]
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma => false,
        }
    }

    /// Every version this CPU can run (what the tests sweep).
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2Fma].into_iter().filter(|i| i.available()).collect()
    }
}

/// Turns each slice function's body into a generic function (`F`: the const FMA switch),
/// instantiates it twice (portable; AVX2+FMA under `#[target_feature]`), and adds an `Isa`
/// method that picks one plus a module-level function that runs the best. Asking for a version
/// the CPU lacks runs the portable one instead, so every call is sound.
macro_rules! simd_fns {
    ($(
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block
    )*) => {
        mod generic {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[inline(always)]
                pub(super) fn $name<const F: bool>($($arg: $ty),*) $(-> $ret)? $body
            )*
        }

        mod portable {
            $(
                pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
                    super::generic::$name::<false>($($arg),*)
                }
            )*
        }

        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            $(
                #[target_feature(enable = "avx2,fma")]
                pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
                    super::generic::$name::<true>($($arg),*)
                }
            )*
        }

        impl Isa {
            $(
                $(#[$doc])*
                #[inline]
                pub fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                    #[cfg(target_arch = "x86_64")]
                    if self == Isa::Avx2Fma && self.available() {
                        // SAFETY: `avx2::$name` only requires the avx2 and fma target
                        // features, and `available()` has just confirmed the CPU has both.
                        return unsafe { avx2::$name($($arg),*) };
                    }
                    portable::$name($($arg),*)
                }
            )*
        }

        $(
            $(#[$doc])*
            ///
            /// Runs the fastest version for this CPU ([`Isa::best`]).
            #[inline]
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                Isa::best().$name($($arg),*)
            }
        )*
    };
}

// ---- per-element kernels (branch-free; inlined into the slice loops) ---------------------------

/// `a * b + c`, fused (one rounding) in the FMA build.
#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `x` clamped to `[lo, hi]`, NaN kept (comparisons with NaN are false). Compiles to min/max.
#[inline(always)]
fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// Above ln(f32::MAX) = 88.7228 the result overflows to inf anyway; clamping keeps `n <= 129`.
const EXP_HI: f32 = 88.8;
/// Below ln(2^-150) = -103.97 the result rounds to 0 anyway; clamping keeps `n >= -150`.
const EXP_LO: f32 = -104.0;
/// 1.5 · 2^23: adding it rounds a float of magnitude < 2^22 to an integer held in the low
/// mantissa bits (round to nearest even), the classic branch-free `round` + `as i32`.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 split Cody–Waite style (Cephes): `LN2_HI` has 9 significant bits, so `n · LN2_HI` is
/// exact for |n| < 2^15 and `x - n ln 2` loses nothing to cancellation.
const LN2_HI: f32 = 0.693_359_4; // = 0.693359375 = 355 / 512 as an f32
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` by `x = n ln2 + r`, `|r| <= ln2 / 2`, `e^x = 2^n e^r` with Cephes' degree-7 polynomial
/// for `e^r` (`expf.c`; its coefficients rounded to the nearest f32). `2^n` is applied as two
/// factors `2^(n - n/2) · 2^(n/2)`, each a normal float for every clamped `n` in [-150, 129]:
/// results near f32::MAX come out finite, those past it `inf`, and subnormal results are rounded
/// once, correctly, by the final multiply.
#[inline(always)]
fn exp1<const F: bool>(x: f32) -> f32 {
    let x = clamp(x, EXP_LO, EXP_HI);
    let t = fma::<F>(x, std::f32::consts::LOG2_E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    // For finite x, `t`'s bits minus the magic's are `n` as an integer. A NaN gives garbage
    // here, harmlessly: `p` is NaN and so is the product.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = fma::<F>(n, -LN2_HI, x);
    let r = fma::<F>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = fma::<F>(p, r, 1.398_199_9e-3);
    p = fma::<F>(p, r, 8.333_452e-3);
    p = fma::<F>(p, r, 4.166_579_6e-2);
    p = fma::<F>(p, r, 1.666_666_5e-1);
    p = fma::<F>(p, r, 0.5); // Cephes' 5.0000001201e-1, as an f32
    let p = fma::<F>(p, r * r, r) + 1.0;
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) << 23) as u32);
    let s2 = f32::from_bits((n2.wrapping_add(127) << 23) as u32);
    p * s1 * s2
}

/// `tanh x`: Cephes' (`tanhf.c`) odd polynomial `x + x³ P(x²)` for |x| < 0.625 (keeps the
/// relative accuracy of tiny inputs), else `sign(x) (1 - e) / (1 + e)` with `e = exp(-2|x|)` in
/// (0, 0.29], which has no cancellation and no overflow (`e` underflows to 0 for large |x|,
/// giving ±1).
#[inline(always)]
fn tanh1<const F: bool>(x: f32) -> f32 {
    let ax = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3;
    p = fma::<F>(p, z, 2.063_908_8e-2);
    p = fma::<F>(p, z, -5.373_971_6e-2);
    p = fma::<F>(p, z, 1.333_144_2e-1);
    p = fma::<F>(p, z, -3.333_328e-1);
    // `copysign` keeps tanh(-0) = -0 (the unfused `-0·… + -0` rounds to +0).
    let small = fma::<F>(p * z, x, x).copysign(x);
    let e = exp1::<F>(-2.0 * ax);
    let big = ((1.0 - e) / (1.0 + e)).copysign(x);
    // NaN: `ax < 0.625` is false, and `big` is NaN.
    if ax < 0.625 {
        small
    } else {
        big
    }
}

/// `(u, σ(2u), σ(2u) σ(-2u))` for GELU at `x`, with `u = a(x + b x³)`.
///
/// `σ(2u) = 1 / (1 + e^{-2u})`; with `e = exp(-2|u|)` in (0, 1] (no overflow), `q = 1/(1+e)`
/// and `e q` are `σ(2|u|)` and `σ(-2|u|)`, both to full relative accuracy, and `u`'s sign picks
/// which is `σ(2u)`. The product `σ(2u)σ(-2u) = e q²` is symmetric.
#[inline(always)]
fn gelu_parts<const F: bool>(x: f32) -> (f32, f32, f32) {
    let u = x * fma::<F>(GELU_AB, x * x, GELU_A);
    let e = exp1::<F>(-2.0 * u.abs());
    let q = 1.0 / (1.0 + e);
    let eq = e * q;
    let s = if u >= 0.0 { q } else { eq };
    (u, s, eq * q)
}

/// GELU-tanh: `0.5 x (1 + tanh u) = x σ(2u)`.
#[inline(always)]
fn gelu1<const F: bool>(x: f32) -> f32 {
    x * gelu_parts::<F>(x).1
}

/// d GELU / dx `= σ(2u) + 2 x u'(x) σ(2u) σ(-2u)`, `u' = a (1 + 3 b x²)`.
///
/// `x` is clamped to ±1e4 first: past |x| ≈ 10 the derivative is already exactly 1 or 0 in
/// f32, and the clamp keeps `x u'` finite so `inf · 0` cannot make a NaN for huge inputs.
#[inline(always)]
fn gelu_grad1<const F: bool>(x: f32) -> f32 {
    let x = clamp(x, -1e4, 1e4);
    let (_, s, sc) = gelu_parts::<F>(x);
    let du = fma::<F>(3.0 * GELU_AB, x * x, GELU_A);
    fma::<F>(2.0 * x * du, sc, s)
}

// ---- slice functions ---------------------------------------------------------------------------

/// Sum of the lane accumulators, in lane order (fixed, so results are reproducible for a given
/// ISA). Sequential on purpose: with a pairwise tree here LLVM's SLP vectoriser falls back to
/// 2-wide vectors for the whole accumulation loop (checked in the disassembly).
#[inline(always)]
fn hsum(acc: [f32; L]) -> f32 {
    let mut s = 0.0;
    for v in acc {
        s += v;
    }
    s
}

simd_fns! {
    /// `out[i] = exp(x[i])`. Panics if the lengths differ.
    fn exp(x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "vmath::exp: length mismatch");
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp1::<F>(v);
        }
    }

    /// `out[i] = tanh(x[i])`. Panics if the lengths differ.
    fn tanh(x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "vmath::tanh: length mismatch");
        for (o, &v) in out.iter_mut().zip(x) {
            *o = tanh1::<F>(v);
        }
    }

    /// GELU-tanh forward, `y[i] = 0.5 x (1 + tanh(a (x + b x³)))`. Panics if the lengths differ.
    fn gelu_tanh_fwd(x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "vmath::gelu_tanh_fwd: length mismatch");
        for (o, &v) in y.iter_mut().zip(x) {
            *o = gelu1::<F>(v);
        }
    }

    /// GELU-tanh backward, `dx[i] = dy[i] · gelu'(x[i])`. Panics if the lengths differ.
    fn gelu_tanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        assert!(
            x.len() == dx.len() && dy.len() == dx.len(),
            "vmath::gelu_tanh_bwd: length mismatch"
        );
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *o = g * gelu_grad1::<F>(v);
        }
    }

    /// The largest element (`-inf` for an empty slice). NaNs are skipped, as in a
    /// `v > max` scan: a row's NaN still propagates through the following exp-sum.
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; L];
        let mut chunks = x.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in acc.iter().chain(chunks.remainder()) {
            m = if v > m { v } else { m };
        }
        m
    }

    /// The sum of the elements (16 lane accumulators).
    fn sum(x: &[f32]) -> f32 {
        let mut acc = [0.0f32; L];
        let mut chunks = x.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] += c[i];
            }
        }
        chunks.remainder().iter().fold(hsum(acc), |s, &v| s + v)
    }

    /// `sum(x[i] * y[i])`. Panics if the lengths differ.
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        assert_eq!(x.len(), y.len(), "vmath::dot: length mismatch");
        let mut acc = [0.0f32; L];
        let mut xc = x.chunks_exact(L);
        let mut yc = y.chunks_exact(L);
        for (a, b) in (&mut xc).zip(&mut yc) {
            for i in 0..L {
                acc[i] = fma::<F>(a[i], b[i], acc[i]);
            }
        }
        xc.remainder()
            .iter()
            .zip(yc.remainder())
            .fold(hsum(acc), |s, (&a, &b)| fma::<F>(a, b, s))
    }

    /// `out[i] = exp(x[i] - shift)`; returns the sum of `out` (softmax's numerators and
    /// denominator in one pass). Panics if the lengths differ.
    fn exp_shift_sum(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        assert_eq!(x.len(), out.len(), "vmath::exp_shift_sum: length mismatch");
        let mut acc = [0.0f32; L];
        let mut xc = x.chunks_exact(L);
        let mut oc = out.chunks_exact_mut(L);
        for (a, o) in (&mut xc).zip(&mut oc) {
            for i in 0..L {
                let e = exp1::<F>(a[i] - shift);
                o[i] = e;
                acc[i] += e;
            }
        }
        let mut s = hsum(acc);
        for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
            *o = exp1::<F>(v - shift);
            s += *o;
        }
        s
    }

    /// `sum(exp(x[i] - shift))` without storing the exponentials (cross-entropy's forward).
    fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
        let mut acc = [0.0f32; L];
        let mut chunks = x.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] += exp1::<F>(c[i] - shift);
            }
        }
        chunks
            .remainder()
            .iter()
            .fold(hsum(acc), |s, &v| s + exp1::<F>(v - shift))
    }

    /// `sum((x[i] - mean)²)`: LayerNorm's variance numerator (two-pass, so no cancellation).
    fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0.0f32; L];
        let mut chunks = x.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                let d = c[i] - mean;
                acc[i] = fma::<F>(d, d, acc[i]);
            }
        }
        chunks.remainder().iter().fold(hsum(acc), |s, &v| {
            let d = v - mean;
            fma::<F>(d, d, s)
        })
    }

    /// LayerNorm backward's reduction pass over one row, with `(mean, rstd) = stats`,
    /// `xhat = (x - mean) rstd` and `g = dy w`: returns `(sum(g), sum(g xhat))` and accumulates
    /// `dw += dy xhat`, `db += dy`. Panics unless all slices have the same length.
    fn layer_norm_bwd_sums(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        stats: (f32, f32),
        dw: &mut [f32],
        db: &mut [f32]
    ) -> (f32, f32) {
        let (mean, rstd) = stats;
        let n = x.len();
        assert!(
            dy.len() == n && w.len() == n && dw.len() == n && db.len() == n,
            "vmath::layer_norm_bwd_sums: length mismatch"
        );
        let (mut ag, mut agx) = ([0.0f32; L], [0.0f32; L]);
        let full = n - n % L;
        let mut k = 0;
        while k < full {
            // Fixed-size views, so the inner loop has no bounds checks and vectorises.
            let (xs, gs, ws) = (&x[k..k + L], &dy[k..k + L], &w[k..k + L]);
            let (dws, dbs) = (&mut dw[k..k + L], &mut db[k..k + L]);
            for i in 0..L {
                let xhat = (xs[i] - mean) * rstd;
                let g = gs[i] * ws[i];
                ag[i] += g;
                agx[i] = fma::<F>(g, xhat, agx[i]);
                dws[i] = fma::<F>(gs[i], xhat, dws[i]);
                dbs[i] += gs[i];
            }
            k += L;
        }
        let (mut sg, mut sgx) = (hsum(ag), hsum(agx));
        for i in full..n {
            let xhat = (x[i] - mean) * rstd;
            let g = dy[i] * w[i];
            sg += g;
            sgx = fma::<F>(g, xhat, sgx);
            dw[i] = fma::<F>(dy[i], xhat, dw[i]);
            db[i] += dy[i];
        }
        (sg, sgx)
    }

    /// Log-softmax backward for one row: `dx[i] = dy[i] - exp(y[i]) * dy_sum`, `y` the forward
    /// output. Panics if the lengths differ.
    fn log_softmax_bwd(y: &[f32], dy: &[f32], dy_sum: f32, dx: &mut [f32]) {
        assert!(
            y.len() == dx.len() && dy.len() == dx.len(),
            "vmath::log_softmax_bwd: length mismatch"
        );
        for ((o, &v), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = fma::<F>(-exp1::<F>(v), dy_sum, g);
        }
    }
}
