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
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or("")
            );
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
    for &(b, t, c, h) in &[
        (1, 1, 64, 1),
        (2, 31, 64, 2),
        (2, 65, 128, 2),
        (1, 130, 96, 3),
        (2, 200, 64, 2),
        (1, 257, 256, 4),
    ] {
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
            let dqkv =
                k::flash_attention_backward(&f32(&qkv), &gm_host, &lse, &f32(&dy), h).unwrap();
            for (what, a, e) in [
                ("merged", &gm, &m),
                ("lse", &glse, &lse),
                ("dqkv", &gd, &dqkv),
            ] {
                let tol = if what == "lse" { 1e-5 } else { tol };
                let err = max_err(
                    &to_f64_vec(&a.to_device(&Device::Cpu).unwrap()),
                    &to_f64_vec(e),
                );
                eprintln!("flash {what} b{b} t{t} c{c} h{h} {dtype:?}: {err:.1e}");
                assert!(
                    err < tol,
                    "flash {what} b{b} t{t} c{c} h{h} {dtype:?}: {err:e} > {tol:e}"
                );
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
    let h = AdamWStep {
        lr: 6e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 7,
        grad_scale: 0.37,
    };
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
            let ts: Vec<Vec<Tensor>> = host
                .iter()
                .map(|s| s.iter().map(|t| copy(t, d)).collect())
                .collect();
            let bf: Vec<Tensor> = host
                .iter()
                .map(|s| Tensor::zeros(s[0].shape(), DType::BF16, d).unwrap())
                .collect();
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
                .flat_map(|(t, b)| {
                    [&t[0], &t[1], &t[2], b]
                        .map(|x| to_f64_vec(&x.to_device(&Device::Cpu).unwrap()))
                })
                .collect()
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(dev));
        for (i, (a, e)) in gpu.iter().zip(&cpu).enumerate() {
            assert_eq!(
                a,
                e,
                "adamw tensor {i} (param/m/v/bf16 of slot {}) with {grad_dtype:?} gradients",
                i / 4
            );
        }
    }
}
