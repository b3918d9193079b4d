//! Fused kernels vs their `reference` compositions, forward + backward.
//!
//! Each iteration builds the op on a `Var`, reduces with `sum_all` and runs `backward()`, so
//! the timing covers what a training step pays: the forward, candle's graph walk and the
//! backward kernels. The reduction and graph overhead are identical for both variants.
//!
//! The `vmath ...` groups time the vectorised f32 math alone (one thread, no candle) against the
//! scalar libm loops the kernels ran before, once per instruction-set version this CPU has.
//!
//! Run: `cargo bench -p brigade-benches --bench kernels -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use brigade_kernels as k;
use brigade_kernels::reference as r;
use brigade_kernels::vmath;
use candle_core::{Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};

/// Deterministic pseudo-random values in [-2, 2) (an LCG: the bench needs no statistical
/// quality, only reproducible, non-degenerate inputs without ties).
fn data(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn fwd_bwd(y: Result<Tensor>) {
    let grads = y.unwrap().sum_all().unwrap().backward().unwrap();
    black_box(grads);
}

/// Benchmarks `fused` against `reference` in one group: forward + backward on `Var`s, and
/// (group `... fwd`) forward alone on detached tensors, which splits the cost.
fn pair(
    c: &mut Criterion,
    name: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|t| if t.dtype().is_float() { Var::from_tensor(t).unwrap().as_tensor().clone() } else { t.clone() })
        .collect();
    let mut g = c.benchmark_group(format!("{name} fwd+bwd"));
    g.bench_function("fused", |bn| bn.iter(|| fwd_bwd(fused(&vars))));
    g.bench_function("reference", |bn| bn.iter(|| fwd_bwd(reference(&vars))));
    // What any elementwise op pays here besides its own kernels: candle's graph walk,
    // `sum_all`'s broadcast gradient, and zero-init + accumulate of each input's gradient.
    g.bench_function("baseline x*1 (graph overhead)", |bn| bn.iter(|| fwd_bwd(vars[0].affine(1.0, 0.0))));
    g.finish();
    let mut g = c.benchmark_group(format!("{name} fwd"));
    g.bench_function("fused", |bn| bn.iter(|| black_box(fused(inputs).unwrap())));
    g.bench_function("reference", |bn| bn.iter(|| black_box(reference(inputs).unwrap())));
    g.finish();
}

/// Group `{name} bwd`, row `fused`: the fused backward kernel alone, called as the explicit VJP
/// a layer runs (no autograd graph, no reduction), which is what the kernel change moves.
fn bwd_only<T>(c: &mut Criterion, name: &str, f: impl Fn() -> Result<T>) {
    let mut g = c.benchmark_group(format!("{name} bwd"));
    g.bench_function("fused", |bn| bn.iter(|| black_box(f().unwrap())));
    g.finish();
}

fn bench_layer_norm(c: &mut Criterion) {
    let ins = [data(&[16, 128, 256], 1), data(&[256], 2), data(&[256], 3)];
    pair(
        c,
        "layer_norm 16x128x256",
        &ins,
        |t| k::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        |t| r::layer_norm(&t[0], &t[1], &t[2], 1e-5),
    );
    let dy = data(&[16, 128, 256], 10);
    bwd_only(c, "layer_norm 16x128x256", || k::layer_norm_backward(&ins[0], &ins[1], &dy, 1e-5));
}

fn bench_softmax(c: &mut Criterion) {
    let ins = [data(&[16, 4, 128, 128], 4)];
    pair(c, "softmax 16x4x128x128", &ins, |t| k::softmax_last_dim(&t[0]), |t| r::softmax_last_dim(&t[0]));
    pair(c, "log_softmax 16x4x128x128", &ins, |t| k::log_softmax_last_dim(&t[0]), |t| r::log_softmax_last_dim(&t[0]));
    let y = k::softmax_last_dim(&ins[0]).unwrap();
    let dy = data(&[16, 4, 128, 128], 11);
    bwd_only(c, "softmax 16x4x128x128", || k::softmax_last_dim_backward(&y, &dy));
}

fn bench_cross_entropy(c: &mut Criterion) {
    let t: Vec<u32> = (0..2048u32).map(|i| (i * 37) % 256).collect();
    let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
    let ins = [data(&[2048, 256], 5), t];
    pair(
        c,
        "cross_entropy 2048x256",
        &ins,
        |t| k::cross_entropy_sum(&t[0], &t[1]),
        |t| r::cross_entropy_sum(&t[0], &t[1]),
    );
    bwd_only(c, "cross_entropy 2048x256", || k::cross_entropy_sum_backward(&ins[0], &ins[1], 1.0 / 2048.0));
}

fn bench_max_pool(c: &mut Criterion) {
    let ins = [data(&[16, 16, 32, 32], 6)];
    pair(
        c,
        "max_pool2d 16x16x32x32 k3s2p1",
        &ins,
        |t| k::max_pool2d(&t[0], 3, 2, 1),
        |t| r::max_pool2d(&t[0], 3, 2, 1),
    );
}

fn bench_gelu(c: &mut Criterion) {
    let ins = [data(&[16, 128, 1024], 7)];
    pair(c, "gelu_tanh 16x128x1024", &ins, |t| k::gelu_tanh(&t[0]), |t| r::gelu_tanh(&t[0]));
    let dy = data(&[16, 128, 1024], 12);
    bwd_only(c, "gelu_tanh 16x128x1024", || k::gelu_tanh_backward(&ins[0], &dy));
}

// ---- elementwise math: scalar libm vs brigade_kernels::vmath, per instruction set ---------------

const GELU_A: f32 = 0.797_884_6;
const GELU_B: f32 = 0.044_715;

/// The f32 GELU forward the kernel ran before `vmath` (scalar `tanhf`), kept here as the baseline.
fn gelu_fwd_scalar(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + (GELU_A * v * (1.0 + GELU_B * v * v)).tanh());
    }
}

/// The f32 GELU backward the kernel ran before `vmath`.
fn gelu_bwd_scalar(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        let t = (GELU_A * v * (1.0 + GELU_B * v * v)).tanh();
        let du = GELU_A * (1.0 + 3.0 * GELU_B * v * v);
        *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
}

/// Softmax rows of 128 the way the kernel ran them before `vmath` (scalar `expf`, sequential
/// sums): max, exp + sum, scale.
fn softmax_rows_scalar(x: &[f32], y: &mut [f32], c: usize) {
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let mut sum = 0.0;
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v - max).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        yr.iter_mut().for_each(|o| *o *= inv);
    }
}

fn softmax_rows_vmath(isa: vmath::Isa, x: &[f32], y: &mut [f32], c: usize) {
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let max = isa.max(xr);
        let inv = 1.0 / isa.exp_shift_sum(xr, max, yr);
        yr.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One thread, 1M elements (the size of a GPT MLP activation slice): the per-element cost of
/// each version without rayon or candle around it.
fn bench_vmath(c: &mut Criterion) {
    let n = 1 << 20;
    let x = data(&[n], 8).to_vec1::<f32>().unwrap();
    let x: Vec<f32> = x.iter().map(|v| v * 2.5).collect(); // [-5, 5): GELU's busy range
    let dy = data(&[n], 9).to_vec1::<f32>().unwrap();
    let mut out = vec![0.0f32; n];
    let isas = vmath::Isa::all_available();

    // exp on [-5, 0], where softmax's shifted inputs live.
    let neg: Vec<f32> = x.iter().map(|v| -v.abs()).collect();
    let mut g = c.benchmark_group("vmath exp 1M");
    g.bench_function("scalar libm", |b| b.iter(|| out.iter_mut().zip(&neg).for_each(|(o, &v)| *o = v.exp())));
    for &isa in &isas {
        g.bench_function(format!("{isa:?}"), |b| b.iter(|| isa.exp(&neg, &mut out)));
    }
    g.finish();

    let mut g = c.benchmark_group("vmath tanh 1M");
    g.bench_function("scalar libm", |b| b.iter(|| out.iter_mut().zip(&x).for_each(|(o, &v)| *o = v.tanh())));
    for &isa in &isas {
        g.bench_function(format!("{isa:?}"), |b| b.iter(|| isa.tanh(&x, &mut out)));
    }
    g.finish();

    let mut g = c.benchmark_group("vmath gelu fwd 1M");
    g.bench_function("scalar libm", |b| b.iter(|| gelu_fwd_scalar(&x, &mut out)));
    for &isa in &isas {
        g.bench_function(format!("{isa:?}"), |b| b.iter(|| isa.gelu_tanh_fwd(&x, &mut out)));
    }
    g.finish();

    let mut g = c.benchmark_group("vmath gelu bwd 1M");
    g.bench_function("scalar libm", |b| b.iter(|| gelu_bwd_scalar(&x, &dy, &mut out)));
    for &isa in &isas {
        g.bench_function(format!("{isa:?}"), |b| b.iter(|| isa.gelu_tanh_bwd(&x, &dy, &mut out)));
    }
    g.finish();

    let mut g = c.benchmark_group("vmath softmax rows 8192x128");
    g.bench_function("scalar libm", |b| b.iter(|| softmax_rows_scalar(&x, &mut out, 128)));
    for &isa in &isas {
        g.bench_function(format!("{isa:?}"), |b| b.iter(|| softmax_rows_vmath(isa, &x, &mut out, 128)));
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_vmath,
    bench_layer_norm,
    bench_softmax,
    bench_cross_entropy,
    bench_max_pool,
    bench_gelu
);
criterion_main!(benches);
