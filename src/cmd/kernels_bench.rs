//! `brigade kernels-bench`: times each of brigade's kernels alone at GPT-2 124M shapes (B=8,
//! T=1024, C=768, H=12, V=50257; `--small` for a quick check) on the CPU or, in a `cuda` build,
//! a CUDA device, and prints per kernel the median time, the achieved memory bandwidth for the
//! memory-bound ones (and its share of `--peak-gbps`), and TFLOP/s for attention.
//! `benches/torch_kernels.py` times PyTorch's equivalents on the same shapes and prints the same
//! columns, so the GPU check script can run the two side by side.
//!
//! Bytes are the minimum traffic of each op (every input read once, every output written
//! once); attention FLOPs count the causal half of the products (`2·B·H·T²·d` forward, 2.5×
//! that backward), FlashAttention's convention. On a GPU each timed round is `INNER_GPU`
//! back-to-back launches between two device synchronisations, so launch gaps are included but
//! host-side timing noise is amortised.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use brigade::kernels as k;
use candle_core::{DType, Device, Tensor};
use clap::Args;

#[derive(Args)]
pub struct KernelsBenchArgs {
    /// cpu, or cuda / cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 (CUDA only: the CPU kernels are f32/f64).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Reduced shapes (B=2, T=256, C=256, H=4, V=50257; 2 layers of parameters for AdamW).
    #[arg(long)]
    pub small: bool,
    /// Timed rounds per kernel, after one warm-up; the median round is reported.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// CPU threads for the CPU kernels.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Only kernels whose name contains one of these comma-separated words.
    #[arg(long)]
    pub only: Option<String>,
    /// The device's memory bandwidth in GB/s (e.g. 4800 for an H200), to print each
    /// memory-bound kernel's share of it.
    #[arg(long)]
    pub peak_gbps: Option<f64>,
}

/// Launches per timed round on a GPU.
const INNER_GPU: usize = 10;

/// The benchmark's shapes.
#[derive(Clone, Copy, Debug)]
struct Shapes {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    v: usize,
    layers: usize,
}

impl Shapes {
    fn gpt2() -> Self {
        Self { b: 8, t: 1024, c: 768, h: 12, v: 50257, layers: 12 }
    }
    fn small() -> Self {
        Self { b: 2, t: 256, c: 256, h: 4, v: 50257, layers: 2 }
    }
    /// GPT-2's parameter tensors at these shapes (wte, wpe, per block ln_1, attn, ln_2, mlp; ln_f).
    fn parameter_shapes(&self) -> Vec<Vec<usize>> {
        let (c, v, t) = (self.c, self.v, self.t);
        let mut out = vec![vec![v, c], vec![t, c]];
        for _ in 0..self.layers {
            out.extend([vec![c], vec![c], vec![c, 3 * c], vec![3 * c], vec![c, c], vec![c]]);
            out.extend([vec![c], vec![c], vec![c, 4 * c], vec![4 * c], vec![4 * c, c], vec![c]]);
        }
        out.extend([vec![c], vec![c]]);
        out
    }
}

/// One timed kernel: what it moves or computes, and the closure that runs it once.
struct Case<'a> {
    name: &'static str,
    shape: String,
    bytes: Option<f64>,
    flops: Option<f64>,
    run: Box<dyn FnMut() -> candle_core::Result<()> + 'a>,
}

fn parse_device(name: &str) -> Result<Device> {
    let n = name.trim().to_ascii_lowercase();
    if n == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match n.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("invalid device {name:?}: expected cpu, cuda or cuda:N"))?,
        None => bail!("invalid device {name:?}: expected cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        bail!("device {name:?} is not available: this build has no CUDA support (build with --features cuda)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open {name}"))
}

fn parse_dtype(name: &str, dev: &Device) -> Result<DType> {
    match (name.trim().to_ascii_lowercase().as_str(), dev.is_cpu()) {
        ("f32", _) => Ok(DType::F32),
        ("bf16", false) => Ok(DType::BF16),
        ("bf16", true) => bail!("--dtype bf16 needs a CUDA device: the CPU kernels are f32/f64"),
        (other, _) => bail!("invalid --dtype {other:?}: expected f32 or bf16"),
    }
}

pub fn run(args: KernelsBenchArgs) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let most = brigade::engine::pipeline::max_threads();
    if args.threads == 0 || args.threads > most {
        bail!(
            "--threads must be in 1..={most} ({} per core, {} cores)",
            brigade::engine::pipeline::MAX_THREADS_PER_CORE,
            brigade::engine::pipeline::available_cores()
        );
    }
    let dev = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &dev)?;
    let shapes = if args.small { Shapes::small() } else { Shapes::gpt2() };
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(args.threads).build().context("cannot start the thread pool")?;
    pool.install(|| bench_all(&args, &dev, dtype, shapes))
}

fn bench_all(args: &KernelsBenchArgs, dev: &Device, dtype: DType, s: Shapes) -> Result<()> {
    let only: Vec<String> =
        args.only.as_deref().unwrap_or("").split(',').map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|w| name.contains(w.as_str()));
    let elem = dtype.size_in_bytes() as f64;
    let (n, c, v) = (s.b * s.t, s.c, s.v);
    let rand = |shape: &[usize], scale: f64| -> candle_core::Result<Tensor> {
        (Tensor::randn(0f32, 1.0, shape, dev)? * scale)?.to_dtype(dtype)
    };

    let mut cases: Vec<Case> = Vec::new();
    if wanted("layer_norm") {
        let (x, w, bias, dy) = (rand(&[n, c], 1.0)?, rand(&[c], 1.0)?, rand(&[c], 1.0)?, rand(&[n, c], 1.0)?);
        let (x2, w2) = (x.clone(), w.clone());
        cases.push(Case {
            name: "layer_norm_fwd",
            shape: format!("({n}, {c})"),
            bytes: Some(2.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::layer_norm(&x, &w, &bias, 1e-5).map(drop)),
        });
        cases.push(Case {
            name: "layer_norm_bwd",
            shape: format!("({n}, {c})"),
            bytes: Some(3.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::layer_norm_backward(&x2, &w2, &dy, 1e-5).map(drop)),
        });
        // The pre-LayerNorm block's backward: the LayerNorm's dx plus the residual gradient.
        let (x3, w3, dy3, res) = (rand(&[n, c], 1.0)?, rand(&[c], 1.0)?, rand(&[n, c], 1.0)?, rand(&[n, c], 1.0)?);
        cases.push(Case {
            name: "layer_norm_bwd_residual",
            shape: format!("({n}, {c})"),
            bytes: Some(4.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::layer_norm_backward_residual(&x3, &w3, &dy3, &res, 1e-5).map(drop)),
        });
    }
    if wanted("gelu") {
        let (x, dy) = (rand(&[n, 4 * c], 1.0)?, rand(&[n, 4 * c], 1.0)?);
        let x2 = x.clone();
        cases.push(Case {
            name: "gelu_tanh_fwd",
            shape: format!("({n}, {})", 4 * c),
            bytes: Some(2.0 * (n * 4 * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::gelu_tanh(&x).map(drop)),
        });
        cases.push(Case {
            name: "gelu_tanh_bwd",
            shape: format!("({n}, {})", 4 * c),
            bytes: Some(3.0 * (n * 4 * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::gelu_tanh_backward(&x2, &dy).map(drop)),
        });
    }
    // Llama's ops at the same token count and width: RoPE over H heads of C / H, SwiGLU with
    // an intermediate width of 4C (the shape of GPT-2's MLP).
    if wanted("rms_norm") {
        let (x, w, dy) = (rand(&[n, c], 1.0)?, rand(&[c], 1.0)?, rand(&[n, c], 1.0)?);
        let (x2, w2) = (x.clone(), w.clone());
        cases.push(Case {
            name: "rms_norm_fwd",
            shape: format!("({n}, {c})"),
            bytes: Some(2.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::rms_norm(&x, &w, 1e-5).map(drop)),
        });
        cases.push(Case {
            name: "rms_norm_bwd",
            shape: format!("({n}, {c})"),
            bytes: Some(3.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::rms_norm_backward(&x2, &w2, &dy, 1e-5).map(drop)),
        });
    }
    if wanted("rope") {
        let d = c / s.h;
        let (x, cos, sin) = (rand(&[s.b, s.t, s.h, d], 1.0)?, rand(&[s.t, d], 1.0)?, rand(&[s.t, d], 1.0)?);
        let (x2, cos2, sin2) = (x.clone(), cos.clone(), sin.clone());
        let shape = format!("({}, {}, {}, {d})", s.b, s.t, s.h);
        cases.push(Case {
            name: "rope_fwd",
            shape: shape.clone(),
            bytes: Some(2.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::rope(&x, &cos, &sin).map(drop)),
        });
        cases.push(Case {
            name: "rope_bwd",
            shape,
            bytes: Some(2.0 * (n * c) as f64 * elem),
            flops: None,
            run: Box::new(move || k::rope_backward(&x2, &cos2, &sin2).map(drop)),
        });
    }
    if wanted("swiglu") {
        let f = 4 * c;
        let (gate_up, da) = (rand(&[n, 2 * f], 2.0)?, rand(&[n, f], 1.0)?);
        let gate_up2 = gate_up.clone();
        cases.push(Case {
            name: "swiglu_fwd",
            shape: format!("({n}, {})", 2 * f),
            bytes: Some(3.0 * (n * f) as f64 * elem),
            flops: None,
            run: Box::new(move || k::swiglu(&gate_up).map(drop)),
        });
        cases.push(Case {
            name: "swiglu_bwd",
            shape: format!("({n}, {})", 2 * f),
            bytes: Some(5.0 * (n * f) as f64 * elem),
            flops: None,
            run: Box::new(move || k::swiglu_backward(&gate_up2, &da).map(drop)),
        });
    }
    if wanted("cross_entropy") {
        let logits = rand(&[n, v], 2.0)?;
        let ids: Vec<u32> = (0..n).map(|i| ((i as u64 * 2_654_435_761) % v as u64) as u32).collect();
        let targets = Tensor::new(ids.as_slice(), dev)?;
        let (l2, t2) = (logits.clone(), targets.clone());
        cases.push(Case {
            name: "cross_entropy_fwd",
            shape: format!("({n}, {v})"),
            bytes: Some((n * v) as f64 * elem),
            flops: None,
            run: Box::new(move || k::cross_entropy_sum(&logits, &targets).map(drop)),
        });
        cases.push(Case {
            name: "cross_entropy_bwd",
            shape: format!("({n}, {v})"),
            bytes: Some(2.0 * (n * v) as f64 * elem),
            flops: None,
            run: Box::new(move || k::cross_entropy_sum_backward(&l2, &t2, 1.0).map(drop)),
        });
    }
    let (b, t, h) = (s.b, s.t, s.h);
    let d = c / h;
    let attn_fwd_flops = 2.0 * (b * h) as f64 * (t * t) as f64 * d as f64;
    let attn_shape = format!("B={b} T={t} H={h} d={d}");
    if wanted("attention") {
        let (qkv, dy) = (rand(&[b, t, 3 * c], 1.0)?, rand(&[b, t, c], 1.0)?);
        let (q2, q3, q4, dy2) = (qkv.clone(), qkv.clone(), qkv.clone(), dy.clone());
        cases.push(Case {
            name: "attention_materialised_fwd",
            shape: attn_shape.clone(),
            bytes: None,
            flops: Some(attn_fwd_flops),
            run: Box::new(move || k::causal_attention(&qkv, h).map(drop)),
        });
        cases.push(Case {
            name: "attention_materialised_fwd_bwd",
            shape: attn_shape.clone(),
            bytes: None,
            flops: Some(3.5 * attn_fwd_flops),
            run: Box::new(move || {
                let (_, p) = k::causal_attention(&q2, h)?;
                k::causal_attention_backward(&q2, &p, &dy, h).map(drop)
            }),
        });
        cases.push(Case {
            name: "attention_flash_fwd",
            shape: attn_shape.clone(),
            bytes: None,
            flops: Some(attn_fwd_flops),
            run: Box::new(move || k::flash_attention(&q3, h).map(drop)),
        });
        cases.push(Case {
            name: "attention_flash_fwd_bwd",
            shape: attn_shape.clone(),
            bytes: None,
            flops: Some(3.5 * attn_fwd_flops),
            run: Box::new(move || {
                let (m, lse) = k::flash_attention(&q4, h)?;
                k::flash_attention_backward(&q4, &m, &lse, &dy2, h).map(drop)
            }),
        });
    }
    if wanted("adamw") {
        // f32 master weights and moments; gradients in the benchmark's dtype.
        let shapes = s.parameter_shapes();
        let count: usize = shapes.iter().map(|d| d.iter().product::<usize>()).sum();
        let f32s = |scale: f64| -> candle_core::Result<Vec<Tensor>> {
            shapes.iter().map(|d| (Tensor::randn(0f32, 1.0, d.as_slice(), dev)? * scale)?.abs()).collect()
        };
        let (params, ms, vs) = (f32s(0.02)?, f32s(0.01)?, f32s(1e-4)?);
        let grads: Vec<Tensor> = shapes.iter().map(|d| rand(d, 0.01)).collect::<candle_core::Result<_>>()?;
        let mut step = 0u64;
        cases.push(Case {
            name: "adamw_step_many",
            shape: format!("{} tensors, {:.1}M params", shapes.len(), count as f64 / 1e6),
            // Reads param, m, v, grad; writes param, m, v.
            bytes: Some(count as f64 * (24.0 + elem)),
            flops: None,
            run: Box::new(move || {
                step += 1;
                let slots: Vec<k::adamw::AdamWSlot> = (0..params.len())
                    .map(|i| k::adamw::AdamWSlot {
                        param: &params[i],
                        exp_avg: &ms[i],
                        exp_avg_sq: &vs[i],
                        grad: &grads[i],
                        decay: true,
                        param_bf16: None,
                    })
                    .collect();
                let h = k::adamw::AdamWStep {
                    lr: 6e-4,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    step,
                    grad_scale: 1.0,
                };
                k::adamw::step_many(&slots, &h)
            }),
        });
    }
    if wanted("sum_squares") {
        // The gradient-clipping norm: one f64 sum of squares per gradient, as a stage takes it.
        let shapes = s.parameter_shapes();
        let count: usize = shapes.iter().map(|d| d.iter().product::<usize>()).sum();
        let grads: Vec<Tensor> = shapes.iter().map(|d| rand(d, 0.01)).collect::<candle_core::Result<_>>()?;
        cases.push(Case {
            name: "sum_squares_grad_norm",
            shape: format!("{} tensors, {:.1}M params", shapes.len(), count as f64 / 1e6),
            bytes: Some(count as f64 * elem),
            flops: None,
            run: Box::new(move || {
                let mut total = 0f64;
                for g in &grads {
                    total += k::sum_squares(g)?.to_scalar::<f64>()?;
                }
                std::hint::black_box(total);
                Ok(())
            }),
        });
    }
    if cases.is_empty() {
        bail!(
            "--only {:?} matches no kernel (layer_norm, gelu, rms_norm, rope, swiglu, cross_entropy, attention, adamw, sum_squares)",
            args.only.as_deref().unwrap_or("")
        );
    }

    let inner = if dev.is_cpu() { 1 } else { INNER_GPU };
    println!(
        "# brigade kernels-bench: device {:?}, dtype {dtype:?}, threads {}, {} rounds x {inner} (median), shapes {s:?}",
        dev.location(),
        args.threads,
        args.repeats
    );
    println!(
        "{:32} {:34} {:>6} {:>11} {:>9} {:>6} {:>8}",
        "kernel", "shape", "dtype", "median_ms", "GB/s", "%peak", "TFLOP/s"
    );
    for mut case in cases {
        let mut round = || -> Result<f64> {
            dev.synchronize()?;
            let start = Instant::now();
            for _ in 0..inner {
                (case.run)().with_context(|| format!("kernel {}", case.name))?;
            }
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64() / inner as f64)
        };
        round()?; // warm-up: module loading, first allocations
        let mut times: Vec<f64> = (0..args.repeats).map(|_| round()).collect::<Result<_>>()?;
        times.sort_by(|a, b| a.total_cmp(b));
        let secs = times[times.len() / 2];
        let gbps = case.bytes.map(|b| b / secs / 1e9);
        let share = gbps.zip(args.peak_gbps).map(|(g, p)| format!("{:.0}%", 100.0 * g / p));
        let tflops = case.flops.map(|f| f / secs / 1e12);
        let opt = |x: Option<f64>, prec: usize| x.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into());
        println!(
            "{:32} {:34} {:>6} {:>11.3} {:>9} {:>6} {:>8}",
            case.name,
            case.shape,
            format!("{dtype:?}").to_lowercase(),
            secs * 1e3,
            opt(gbps, 1),
            share.unwrap_or_else(|| "-".into()),
            opt(tflops, 3)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_parameter_shapes_count_124m() {
        // GPT-2 small's published count (tied lm_head counted once).
        let n: usize = Shapes::gpt2().parameter_shapes().iter().map(|d| d.iter().product::<usize>()).sum();
        assert_eq!(n, 124_439_808);
    }

    #[test]
    fn devices_and_dtypes_are_checked() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").unwrap_err().to_string().contains("expected cpu, cuda or cuda:N"));
        if !cfg!(feature = "cuda") {
            assert!(parse_device("cuda:0").unwrap_err().to_string().contains("no CUDA support"));
        }
        assert!(parse_dtype("bf16", &Device::Cpu).unwrap_err().to_string().contains("needs a CUDA device"));
        assert_eq!(parse_dtype("F32", &Device::Cpu).unwrap(), DType::F32);
    }
}
