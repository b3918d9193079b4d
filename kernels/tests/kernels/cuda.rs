//! The CUDA kernels against their CPU twins, on a GPU when there is one (`--features cuda`);
//! without a CUDA device each test prints `SKIPPED: ...` straight to stderr (past the harness's
//! capture, so every run shows it) and passes; `benches/gpu-check.sh` fails on a skip. No session
//! has run these on a GPU yet.

use brigade_kernels as k;
use candle_core::{DType, Device, Tensor};

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            use std::io::Write;
            let _ =
                writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({})", e.to_string().lines().next().unwrap_or(""));
            None
        }
    }
}

/// Flash attention fwd+bwd on the GPU against the CPU twin on the same inputs (rounded to the
/// dtype first). Both compute in f32, so f32 agrees to 1e-5; in bf16 the GPU's only extra step
/// is rounding each output to bf16, at most one bf16 ulp (2^-8 relative) once f32 differences
/// can tip a rounding, hence 2^-8 + 1e-5. The log-sum-exp is f32 on both sides.
#[test]
fn flash_attention_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(b, t, c, h) in
        &[(1, 1, 64, 1), (2, 31, 64, 2), (2, 65, 128, 2), (1, 130, 96, 3), (2, 200, 64, 2), (1, 257, 256, 4)]
    {
        let mut g = rng((b * 100 + t) as u64);
        let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, DType::F32);
        let dy = uniform(&mut g, &[b, t, c], 1.0, DType::F32);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2f64.powi(-8) + 1e-5)] {
            // The twin sees exactly the GPU's inputs: rounded to the dtype, then f32.
            let (qkv, dy) = (qkv.to_dtype(dtype).unwrap(), dy.to_dtype(dtype).unwrap());
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let (m, lse) = k::flash_attention(&f32(&qkv), h).unwrap();
            let (gq, gdy) = (qkv.to_device(&dev).unwrap(), dy.to_device(&dev).unwrap());
            let (gm, glse) = k::flash_attention(&gq, h).unwrap();
            let gd = k::flash_attention_backward(&gq, &gm, &glse, &gdy, h).unwrap();
            // The twin's backward gets the GPU's (rounded) output, as the GPU's backward does.
            let gm_host = f32(&gm.to_device(&Device::Cpu).unwrap());
            let dqkv = k::flash_attention_backward(&f32(&qkv), &gm_host, &lse, &f32(&dy), h).unwrap();
            for (what, a, e) in [("merged", &gm, &m), ("lse", &glse, &lse), ("dqkv", &gd, &dqkv)] {
                let tol = if what == "lse" { 1e-5 } else { tol };
                let err = max_err(&to_f64_vec(&a.to_device(&Device::Cpu).unwrap()), &to_f64_vec(e));
                eprintln!("flash {what} b{b} t{t} c{c} h{h} {dtype:?}: {err:.1e}");
                assert!(err < tol, "flash {what} b{b} t{t} c{c} h{h} {dtype:?}: {err:e} > {tol:e}");
            }
        }
    }
}

/// Multi-tensor AdamW on the GPU (one launch, f32 and bf16 gradients, bf16 copies, a tensor
/// past one block's chunk) equals the CPU twin bit for bit: the kernel uses no FMA contraction.
#[test]
fn adamw_cuda_equals_the_cpu_twin() {
    use brigade_kernels::adamw::{step_many, AdamWSlot, AdamWStep};
    let Some(dev) = gpu() else { return };
    let h = AdamWStep { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7, grad_scale: 0.37 };
    let dims: [&[usize]; 3] = [&[1], &[37, 3], &[200_001]];
    for grad_dtype in [DType::F32, DType::BF16] {
        let mut g = rng(31);
        let mk = |g: &mut _, d: &[usize], s, dt| uniform(g, d, s, dt);
        let host: Vec<[Tensor; 4]> = dims
            .iter()
            .map(|d| {
                [
                    mk(&mut g, d, 1.0, DType::F32),
                    mk(&mut g, d, 0.1, DType::F32),
                    mk(&mut g, d, 0.1, DType::F32).abs().unwrap(),
                    mk(&mut g, d, 1.0, grad_dtype),
                ]
            })
            .collect();
        let copy = |t: &Tensor, d: &Device| t.to_device(d).unwrap().copy().unwrap();
        for_both(&host, &dev, &h, grad_dtype, copy);
    }

    fn for_both(
        host: &[[Tensor; 4]],
        dev: &Device,
        h: &AdamWStep,
        grad_dtype: DType,
        copy: impl Fn(&Tensor, &Device) -> Tensor,
    ) {
        let run = |d: &Device| -> Vec<Vec<f64>> {
            let ts: Vec<Vec<Tensor>> = host.iter().map(|s| s.iter().map(|t| copy(t, d)).collect()).collect();
            let bf: Vec<Tensor> = host.iter().map(|s| Tensor::zeros(s[0].shape(), DType::BF16, d).unwrap()).collect();
            let slots: Vec<AdamWSlot> = ts
                .iter()
                .zip(&bf)
                .enumerate()
                .map(|(i, (t, b))| AdamWSlot {
                    param: &t[0],
                    exp_avg: &t[1],
                    exp_avg_sq: &t[2],
                    grad: &t[3],
                    decay: i != 1,
                    param_bf16: Some(b),
                })
                .collect();
            step_many(&slots, h).unwrap();
            ts.iter()
                .zip(&bf)
                .flat_map(|(t, b)| [&t[0], &t[1], &t[2], b].map(|x| to_f64_vec(&x.to_device(&Device::Cpu).unwrap())))
                .collect()
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(dev));
        for (i, (a, e)) in gpu.iter().zip(&cpu).enumerate() {
            assert_eq!(a, e, "adamw tensor {i} (param/m/v/bf16 of slot {}) with {grad_dtype:?} gradients", i / 4);
        }
    }
}

/// The GPU's tolerance against its CPU twin: both compute in f32 (1e-5 for reduction order);
/// in bf16 the GPU also rounds each output to bf16, at most one bf16 ulp (2^-8 relative) once
/// f32 differences can tip a rounding. `max_err` is relative to `1 + |twin|`.
fn twin_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8) + 1e-5,
        _ => 1e-5,
    }
}

/// `t` as the twin sees it: on the host, widened to f32.
fn host_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

/// Random host inputs rounded to `dtype`: `(on the GPU in dtype, on the host in f32)`.
fn twin_inputs(dev: &Device, x: &Tensor, dtype: DType) -> (Tensor, Tensor) {
    let rounded = x.to_dtype(dtype).unwrap();
    (rounded.to_device(dev).unwrap(), host_f32(&rounded))
}

fn assert_twin(what: &str, dtype: DType, gpu: &Tensor, twin: &Tensor) {
    assert_eq!(gpu.dtype(), dtype, "{what}: the GPU output's dtype");
    assert_eq!(gpu.dims(), twin.dims(), "{what}: shape");
    let err = max_err(&to_f64_vec(&host_f32(gpu)), &to_f64_vec(twin));
    let tol = twin_tol(dtype);
    eprintln!("{what} {dtype:?}: {err:.1e}");
    assert!(err <= tol, "{what} {dtype:?}: {err:e} > {tol:e}");
}

/// bias-free GELU(tanh) forward and backward, over lengths that are not multiples of a block.
#[test]
fn gelu_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for n in [1usize, 1000, 4097, 3 * 1024 * 769] {
        let mut g = rng(n as u64);
        let x = uniform(&mut g, &[n], 6.0, DType::F32);
        let dy = uniform(&mut g, &[n], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let ((gx, cx), (gdy, cdy)) = (twin_inputs(&dev, &x, dtype), twin_inputs(&dev, &dy, dtype));
            let what = format!("gelu n{n}");
            assert_twin(&what, dtype, &k::gelu_tanh(&gx).unwrap(), &k::gelu_tanh(&cx).unwrap());
            assert_twin(
                &format!("{what} backward"),
                dtype,
                &k::gelu_tanh_backward(&gx, &gdy).unwrap(),
                &k::gelu_tanh_backward(&cx, &cdy).unwrap(),
            );
        }
    }
}

/// LayerNorm forward, and backward's dx, dweight and dbias (the latter from per-block partials
/// reduced in a fixed order), for widths off the block size, one row, and GPT-2's shape.
#[test]
fn layer_norm_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(rows, c) in &[(1usize, 5usize), (13, 37), (9, 300), (1, 769), (8 * 1024, 768)] {
        let mut g = rng((rows * 1000 + c) as u64);
        let x = uniform(&mut g, &[rows, c], 3.0, DType::F32);
        let w = uniform(&mut g, &[c], 1.0, DType::F32);
        let b = uniform(&mut g, &[c], 1.0, DType::F32);
        let dy = uniform(&mut g, &[rows, c], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let [(gx, cx), (gw, cw), (gb, cb), (gdy, cdy)] = [&x, &w, &b, &dy].map(|t| twin_inputs(&dev, t, dtype));
            let what = format!("layer_norm {rows}x{c}");
            assert_twin(
                &what,
                dtype,
                &k::layer_norm(&gx, &gw, &gb, 1e-5).unwrap(),
                &k::layer_norm(&cx, &cw, &cb, 1e-5).unwrap(),
            );
            let (gdx, gdw, gdb) = k::layer_norm_backward(&gx, &gw, &gdy, 1e-5).unwrap();
            let (cdx, cdw, cdb) = k::layer_norm_backward(&cx, &cw, &cdy, 1e-5).unwrap();
            assert_twin(&format!("{what} dx"), dtype, &gdx, &cdx);
            assert_twin(&format!("{what} dweight"), dtype, &gdw, &cdw);
            assert_twin(&format!("{what} dbias"), dtype, &gdb, &cdb);
        }
    }
}

/// Softmax over the last dimension, forward and backward (from the GPU's own output, as a
/// layer's backward gets it), and log-softmax's forward, up to GPT-2's vocabulary as the row.
#[test]
fn softmax_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(rows, c) in &[(1usize, 1usize), (11, 33), (3, 257), (4, 50257)] {
        let mut g = rng((rows * 100_000 + c) as u64);
        let x = uniform(&mut g, &[rows, c], 8.0, DType::F32);
        let dy = uniform(&mut g, &[rows, c], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let ((gx, cx), (gdy, cdy)) = (twin_inputs(&dev, &x, dtype), twin_inputs(&dev, &dy, dtype));
            let what = format!("softmax {rows}x{c}");
            let gy = k::softmax_last_dim(&gx).unwrap();
            assert_twin(&what, dtype, &gy, &k::softmax_last_dim(&cx).unwrap());
            assert_twin(
                &format!("{what} backward"),
                dtype,
                &k::softmax_last_dim_backward(&gy, &gdy).unwrap(),
                &k::softmax_last_dim_backward(&host_f32(&gy), &cdy).unwrap(),
            );
            assert_twin(
                &format!("log_{what}"),
                dtype,
                &k::log_softmax_last_dim(&gx).unwrap(),
                &k::log_softmax_last_dim(&cx).unwrap(),
            );
        }
    }
}

/// The materialised causal attention (batched products around the fused scale-mask-softmax)
/// against its CPU twin, `causal_attention_batched`, forward and backward; T = 1 included. f32
/// only: in bf16 this path rounds its scores and probabilities between launches, which the f32
/// twin does not model; bf16 attention is checked on the flash kernels above.
#[test]
fn batched_causal_attention_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(b, t, c, h) in &[(1usize, 1usize, 64usize, 1usize), (2, 37, 96, 3), (2, 130, 256, 4)] {
        let mut g = rng((b * 1000 + t) as u64);
        let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, DType::F32);
        let dy = uniform(&mut g, &[b, t, c], 1.0, DType::F32);
        let dtype = DType::F32;
        {
            let ((gq, cq), (gdy, cdy)) = (twin_inputs(&dev, &qkv, dtype), twin_inputs(&dev, &dy, dtype));
            let what = format!("attention b{b} t{t} c{c} h{h}");
            let (gm, gp) = k::causal_attention(&gq, h).unwrap();
            let (cm, cp) = k::causal_attention_batched(&cq, h).unwrap();
            assert_twin(&format!("{what} merged"), dtype, &gm, &cm);
            assert_twin(&format!("{what} probs"), dtype, &gp, &cp);
            assert_twin(
                &format!("{what} dqkv"),
                dtype,
                &k::causal_attention_backward(&gq, &gp, &gdy, h).unwrap(),
                &k::causal_attention_batched_backward(&cq, &host_f32(&gp), &cdy, h).unwrap(),
            );
        }
    }
}

/// Fused softmax cross-entropy: the summed loss is f32 for bf16 logits too (read from bf16
/// logits, no f32 copy), and the logits' gradient comes back in their dtype; rows up to GPT-2's
/// vocabulary, one row with one class.
#[test]
fn cross_entropy_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(rows, v) in &[(1usize, 1usize), (7, 1000), (64, 50257)] {
        let mut g = rng((rows * 100_000 + v) as u64);
        let logits = uniform(&mut g, &[rows, v], 6.0, DType::F32);
        let ids: Vec<u32> = (0..rows as u32).map(|r| (r * 7919) % v as u32).collect();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let gt = targets.to_device(&dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (gl, cl) = twin_inputs(&dev, &logits, dtype);
            let what = format!("cross_entropy {rows}x{v}");
            let loss = k::cross_entropy_sum(&gl, &gt).unwrap();
            // The loss is f32 for either dtype, so it is held to f32's tolerance.
            assert_twin(&what, DType::F32, &loss, &k::cross_entropy_sum(&cl, &targets).unwrap());
            let scale = 1.0 / 3.0;
            assert_twin(
                &format!("{what} backward"),
                dtype,
                &k::cross_entropy_sum_backward(&gl, &gt, scale).unwrap(),
                &k::cross_entropy_sum_backward(&cl, &targets, scale).unwrap(),
            );
        }
    }
}

/// Llama's RMSNorm forward and backward (dx, and dweight from fixed row chunks' partials), for
/// widths off the warp size, one row, and SmolLM2-135M's width over a batch of 4 × 512.
#[test]
fn rms_norm_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(rows, c) in &[(1usize, 5usize), (13, 37), (9, 300), (4 * 512, 576)] {
        let mut g = rng((rows * 1000 + c) as u64 + 7);
        let x = uniform(&mut g, &[rows, c], 3.0, DType::F32);
        let w = uniform(&mut g, &[c], 1.0, DType::F32);
        let dy = uniform(&mut g, &[rows, c], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let [(gx, cx), (gw, cw), (gdy, cdy)] = [&x, &w, &dy].map(|t| twin_inputs(&dev, t, dtype));
            let what = format!("rms_norm {rows}x{c}");
            assert_twin(&what, dtype, &k::rms_norm(&gx, &gw, 1e-5).unwrap(), &k::rms_norm(&cx, &cw, 1e-5).unwrap());
            let (gdx, gdw) = k::rms_norm_backward(&gx, &gw, &gdy, 1e-5).unwrap();
            let (cdx, cdw) = k::rms_norm_backward(&cx, &cw, &cdy, 1e-5).unwrap();
            assert_twin(&format!("{what} dx"), dtype, &gdx, &cdx);
            assert_twin(&format!("{what} dweight"), dtype, &gdw, &cdw);
        }
    }
}

/// RoPE forward and backward over `(B, T, H, D)` with tables whose halves differ (so a kernel
/// pairing the wrong entries fails), a head width of 2, and Llama's 64.
#[test]
fn rope_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(b, t, h, d) in &[(1usize, 1usize, 1usize, 2usize), (2, 7, 3, 8), (2, 130, 9, 64)] {
        let mut g = rng((b * 1000 + t * 10 + d) as u64);
        let x = uniform(&mut g, &[b, t, h, d], 2.0, DType::F32);
        let cos = uniform(&mut g, &[t, d], 1.0, DType::F32);
        let sin = uniform(&mut g, &[t, d], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let [(gx, cx), (gc, cc), (gs, cs)] = [&x, &cos, &sin].map(|t| twin_inputs(&dev, t, dtype));
            let what = format!("rope {b}x{t}x{h}x{d}");
            assert_twin(&what, dtype, &k::rope(&gx, &gc, &gs).unwrap(), &k::rope(&cx, &cc, &cs).unwrap());
            assert_twin(
                &format!("{what} backward"),
                dtype,
                &k::rope_backward(&gx, &gc, &gs).unwrap(),
                &k::rope_backward(&cx, &cc, &cs).unwrap(),
            );
        }
    }
}

/// SwiGLU (`silu(gate) · up` from `[gate | up]`) forward and backward, gate values reaching the
/// sigmoid's tails. The GPU's `__expf` is within a few ulp of the twin's exp, inside the 1e-5.
#[test]
fn swiglu_cuda_matches_the_cpu_twin() {
    let Some(dev) = gpu() else { return };
    for &(rows, f) in &[(1usize, 1usize), (7, 688), (4 * 512, 1536)] {
        let mut g = rng((rows * 10_000 + f) as u64);
        let gu = uniform(&mut g, &[rows, 2 * f], 12.0, DType::F32);
        let da = uniform(&mut g, &[rows, f], 1.0, DType::F32);
        for dtype in [DType::F32, DType::BF16] {
            let [(ggu, cgu), (gda, cda)] = [&gu, &da].map(|t| twin_inputs(&dev, t, dtype));
            let what = format!("swiglu {rows}x{f}");
            assert_twin(&what, dtype, &k::swiglu(&ggu).unwrap(), &k::swiglu(&cgu).unwrap());
            assert_twin(
                &format!("{what} backward"),
                dtype,
                &k::swiglu_backward(&ggu, &gda).unwrap(),
                &k::swiglu_backward(&cgu, &cda).unwrap(),
            );
        }
    }
}
