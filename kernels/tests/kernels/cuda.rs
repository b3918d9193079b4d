//! The CUDA kernels against their CPU twins, on a GPU when there is one (`--features cuda`);
//! without a CUDA device each test prints that it skipped and passes. No session has run
//! these on a GPU yet.

use brigade_kernels as k;
use candle_core::{DType, Device, Tensor};

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!(
                "no CUDA device ({}): skipping",
                e.to_string().lines().next().unwrap_or("")
            );
            None
        }
    }
}

/// Flash attention fwd+bwd on the GPU (f32 to 1e-5, bf16 to 3e-2: outputs rounded to bf16's 8
/// bits, 4e-3 each, through two products) against the CPU twin on the same (rounded) inputs.
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
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            // The twin sees exactly the GPU's inputs: rounded to the dtype, then f32.
            let (qkv, dy) = (qkv.to_dtype(dtype).unwrap(), dy.to_dtype(dtype).unwrap());
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let (m, lse) = k::flash_attention(&f32(&qkv), h).unwrap();
            let dqkv = k::flash_attention_backward(&f32(&qkv), &m, &lse, &f32(&dy), h).unwrap();
            let (gq, gdy) = (qkv.to_device(&dev).unwrap(), dy.to_device(&dev).unwrap());
            let (gm, glse) = k::flash_attention(&gq, h).unwrap();
            let gd = k::flash_attention_backward(&gq, &gm, &glse, &gdy, h).unwrap();
            for (what, a, e) in [
                ("merged", &gm, &m),
                ("lse", &glse, &lse),
                ("dqkv", &gd, &dqkv),
            ] {
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
