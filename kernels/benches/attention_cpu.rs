//! CPU causal attention: the materialised fused kernel (`causal_attention`, saving the
//! `(B, H, T, T)` probabilities) against flash attention (`flash_attention`, saving the
//! log-sum-exp), forward and forward+backward, at gpt-tiny and GPT-2 124M-ish shapes, on 1 and
//! 2 rayon threads. Prints the median (and min/max) of repeated runs, because the machine may
//! be shared: `cargo bench -p brigade-kernels --bench attention_cpu [-- REPS]`.

use std::time::Instant;

use brigade_kernels as k;
use candle_core::{DType, Device, Tensor};

fn median_ms(reps: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    f(); // warm-up: page faults of the first allocation, rayon start-up
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2], t[0], t[t.len() - 1])
}

fn main() -> candle_core::Result<()> {
    let reps: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(7);
    let dev = Device::Cpu;
    for &(name, b, t, c, h) in &[("gpt-tiny", 16, 128, 256, 4), ("gpt2-ish", 2, 1024, 768, 12)] {
        let qkv = (Tensor::randn(0f32, 1.0, (b, t, 3 * c), &dev)?).to_dtype(DType::F32)?;
        let dy = Tensor::randn(0f32, 1.0, (b, t, c), &dev)?;
        for threads in [1, 2] {
            let pool =
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
            pool.install(|| -> candle_core::Result<()> {
                let run = |what: &str, f: &mut dyn FnMut()| {
                    let (med, min, max) = median_ms(reps, f);
                    println!("{name:9} B={b:2} T={t:4} C={c:3} H={h:2} threads={threads} {what:22} median {med:8.2} ms  (min {min:8.2}, max {max:8.2}, {reps} runs)");
                };
                run("materialised fwd", &mut || {
                    k::causal_attention(&qkv, h).unwrap();
                });
                run("flash fwd", &mut || {
                    k::flash_attention(&qkv, h).unwrap();
                });
                run("materialised fwd+bwd", &mut || {
                    let (_, p) = k::causal_attention(&qkv, h).unwrap();
                    k::causal_attention_backward(&qkv, &p, &dy, h).unwrap();
                });
                run("flash fwd+bwd", &mut || {
                    let (m, lse) = k::flash_attention(&qkv, h).unwrap();
                    k::flash_attention_backward(&qkv, &m, &lse, &dy, h).unwrap();
                });
                Ok(())
            })?;
        }
    }
    Ok(())
}
