//! The AdamW CPU twin against the engine's candle composition (`engine/src/optim.rs`, copied
//! below operation for operation) and an f64 closed form; `step_many` updating tensors in place
//! (f32 and bf16 gradients, the bf16 parameter copy, the rayon path); argument errors.

use brigade_kernels::adamw::{self, AdamWSlices, AdamWSlot, AdamWStep};
use candle_core::{DType, Device, Tensor};

use crate::gradcheck::{rng, uniform};

fn hyper(step: u64) -> AdamWStep {
    AdamWStep { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 1.0 }
}

/// The engine's update, verbatim in candle ops: returns (param, exp_avg, exp_avg_sq).
fn engine_update(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h: &AdamWStep,
    decay: bool,
) -> (Tensor, Tensor, Tensor) {
    let (beta1, beta2, eps, lr, wd) = (h.beta1, h.beta2, h.eps, h.lr, h.weight_decay);
    let t = h.step as i32;
    // The pipeline's clipping: `grad * scale` only when the factor is below 1.
    let g = &if h.grad_scale < 1.0 { (g * h.grad_scale).unwrap() } else { g.clone() };
    let m = ((m * beta1).unwrap() + (g * (1.0 - beta1)).unwrap()).unwrap();
    let v = ((v * beta2).unwrap() + (g.sqr().unwrap() * (1.0 - beta2)).unwrap()).unwrap();
    let bc1 = 1.0 - beta1.powi(t);
    let bc2 = 1.0 - beta2.powi(t);
    let denom = ((v.sqrt().unwrap() / bc2.sqrt()).unwrap() + eps).unwrap();
    let decayed = if decay && wd != 0.0 { (p * (1.0 - lr * wd)).unwrap() } else { p.clone() };
    let update = (m.div(&denom).unwrap() * (lr / bc1)).unwrap();
    ((decayed - update).unwrap(), m, v)
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_twin_equals_the_engine_composition() {
    let mut g = rng(21);
    let n = 1000;
    for decay in [true, false] {
        let p0 = uniform(&mut g, &[n], 1.0, DType::F32);
        let (mut p, mut m, mut v) = (vec(&p0), vec![0f32; n], vec![0f32; n]);
        let (mut tp, mut tm, mut tv) = (p0.clone(), p0.zeros_like().unwrap(), p0.zeros_like().unwrap());
        for step in 1..=5 {
            // Gradients spanning magnitudes, zeros included (the first step's v is then 0).
            let grad = (uniform(&mut g, &[n], 1.0, DType::F32) * 10f64.powi(step as i32 - 3)).unwrap();
            let mut gv = vec(&grad);
            gv[0] = 0.0;
            let grad = Tensor::new(gv.as_slice(), &Device::Cpu).unwrap();
            // Every other step clipped, as a global-norm clip would.
            let h = AdamWStep { grad_scale: if step % 2 == 0 { 0.37 } else { 1.0 }, ..hyper(step) };
            adamw::step(&mut p, &mut m, &mut v, &gv, decay, &h).unwrap();
            (tp, tm, tv) = engine_update(&tp, &tm, &tv, &grad, &h, decay);
            assert_eq!(p, vec(&tp), "param, step {step}, decay {decay}");
            assert_eq!(m, vec(&tm), "exp_avg, step {step}");
            assert_eq!(v, vec(&tv), "exp_avg_sq, step {step}");
        }
    }
}

#[test]
fn adamw_twin_matches_the_closed_form_in_f64() {
    // Two steps by hand with PyTorch's rule (as the engine's own test does).
    let (b1, b2, eps, wd, lr) = (0.9, 0.999, 1e-8, 0.1, 0.01);
    let grads = [[0.5f64, -1.0], [0.25, 2.0]];
    let (mut p, mut m, mut v) = (vec![1.0f32, -2.0], vec![0f32; 2], vec![0f32; 2]);
    let mut expect = [1.0f64, -2.0];
    let (mut em, mut ev) = ([0.0f64; 2], [0.0f64; 2]);
    for (t, gr) in grads.iter().enumerate() {
        let h = AdamWStep { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step: t as u64 + 1, grad_scale: 1.0 };
        let g32 = [gr[0] as f32, gr[1] as f32];
        adamw::step(&mut p, &mut m, &mut v, &g32, true, &h).unwrap();
        let t = t as i32 + 1;
        for i in 0..2 {
            em[i] = b1 * em[i] + (1.0 - b1) * gr[i];
            ev[i] = b2 * ev[i] + (1.0 - b2) * gr[i] * gr[i];
            let denom = (ev[i] / (1.0 - b2.powi(t))).sqrt() + eps;
            expect[i] = expect[i] * (1.0 - lr * wd) - lr * (em[i] / (1.0 - b1.powi(t))) / denom;
        }
    }
    for (got, want) in p.iter().zip(expect) {
        assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }
}

#[test]
fn step_many_updates_tensors_in_place() {
    let mut g = rng(22);
    // Odd sizes, one past the rayon chunk (65536), one with no decay.
    let dims: [&[usize]; 3] = [&[1], &[37, 3], &[70_001]];
    for grad_dtype in [DType::F32, DType::BF16] {
        let params: Vec<Tensor> =
            dims.iter().map(|d| uniform(&mut g, d, 1.0, DType::F32).contiguous().unwrap()).collect();
        let ms: Vec<Tensor> = dims.iter().map(|d| uniform(&mut g, d, 0.1, DType::F32)).collect();
        let vs: Vec<Tensor> = dims.iter().map(|d| uniform(&mut g, d, 0.1, DType::F32).abs().unwrap()).collect();
        let grads: Vec<Tensor> = dims.iter().map(|d| uniform(&mut g, d, 1.0, grad_dtype)).collect();
        let copies: Vec<Tensor> = dims.iter().map(|d| Tensor::zeros(*d, DType::BF16, &Device::Cpu).unwrap()).collect();
        // The twin on slices, from the same starting values.
        let mut want: Vec<[Vec<f32>; 3]> = (0..3).map(|i| [vec(&params[i]), vec(&ms[i]), vec(&vs[i])]).collect();
        let gf: Vec<Vec<f32>> = grads.iter().map(|t| vec(&t.to_dtype(DType::F32).unwrap())).collect();
        let h = hyper(3);
        {
            let mut slices: Vec<AdamWSlices> = want
                .iter_mut()
                .zip(&gf)
                .enumerate()
                .map(|(i, ([p, m, v], g))| AdamWSlices { param: p, exp_avg: m, exp_avg_sq: v, grad: g, decay: i != 1 })
                .collect();
            adamw::step_many_slices(&mut slices, &h).unwrap();
        }
        let slots: Vec<AdamWSlot> = (0..3)
            .map(|i| AdamWSlot {
                param: &params[i],
                exp_avg: &ms[i],
                exp_avg_sq: &vs[i],
                grad: &grads[i],
                decay: i != 1,
                param_bf16: Some(&copies[i]),
            })
            .collect();
        let before = vec(&params[2]);
        adamw::step_many(&slots, &h).unwrap();
        assert_ne!(before, vec(&params[2]), "the parameter tensor itself must change");
        for i in 0..3 {
            assert_eq!(vec(&params[i]), want[i][0], "param {i} {grad_dtype:?}");
            assert_eq!(vec(&ms[i]), want[i][1], "exp_avg {i}");
            assert_eq!(vec(&vs[i]), want[i][2], "exp_avg_sq {i}");
            let copy = vec(&copies[i].to_dtype(DType::F32).unwrap());
            let rounded: Vec<f32> = want[i][0].iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            assert_eq!(copy, rounded, "bf16 copy {i}");
        }
    }
}

#[test]
fn bad_adamw_arguments_are_errors() {
    let dev = &Device::Cpu;
    let z = |n: usize| Tensor::zeros(n, DType::F32, dev).unwrap();
    let (p, m, v, gr) = (z(4), z(4), z(4), z(4));
    let msg = |slots: &[AdamWSlot], h: &AdamWStep| {
        adamw::step_many(slots, h).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let slot = |g: &'static str| -> String {
        let g5 = z(5);
        let gi = Tensor::zeros(4, DType::U32, dev).unwrap();
        let grad = match g {
            "short" => &g5,
            "int" => &gi,
            _ => &gr,
        };
        let exp_avg = if g == "twice" { &p } else { &m };
        msg(&[AdamWSlot { param: &p, exp_avg, exp_avg_sq: &v, grad, decay: true, param_bf16: None }], &hyper(1))
    };
    assert!(slot("short").contains("share a shape"), "{}", slot("short"));
    assert!(slot("int").contains("f32 or all bf16"));
    assert!(slot("twice").contains("passed twice"));
    let ok = [AdamWSlot { param: &p, exp_avg: &m, exp_avg_sq: &v, grad: &gr, decay: true, param_bf16: None }];
    assert!(msg(&ok, &hyper(0)).contains("step counts from 1"));
    assert!(msg(&ok, &AdamWStep { beta2: 1.0, ..hyper(1) }).contains("betas"));
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(msg(&ok, &AdamWStep { grad_scale: bad, ..hyper(1) }).contains("gradient scale"));
    }
    let (mut a, mut b, mut c) = (vec![0f32; 3], vec![0f32; 3], vec![0f32; 2]);
    let e = adamw::step(&mut a, &mut b, &mut c, &[0.0; 3], true, &hyper(1)).unwrap_err().to_string();
    assert!(e.contains("one length"), "{e}");
}
