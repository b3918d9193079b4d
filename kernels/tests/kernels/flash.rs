//! Flash attention (the CPU twin of the CUDA kernels) against the reference composition:
//! output, log-sum-exp (against an f64 computation straight from the scores) and `dqkv`
//! (against `reference::causal_attention_backward`), for T = 1, T not a multiple of the tile,
//! several tiles, head widths 64 and 32, strided inputs and a thread pool; plus argument errors.

use brigade_kernels as k;
use brigade_kernels::reference as r;
use candle_core::{DType, Device, Tensor};

use crate::gradcheck::{max_err, rng, to_f64_vec, uniform};

/// Each query row's log-sum-exp of its scaled, causally masked scores, in f64.
fn lse_by_hand(qkv: &Tensor, n_head: usize) -> Vec<f64> {
    let (b, t, c3) = qkv.dims3().unwrap();
    let c = c3 / 3;
    let d = c / n_head;
    let x = to_f64_vec(qkv);
    let mut out = Vec::with_capacity(b * n_head * t);
    for bi in 0..b {
        for hi in 0..n_head {
            for i in 0..t {
                let q = &x[(bi * t + i) * c3 + hi * d..][..d];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &x[(bi * t + j) * c3 + c + hi * d..][..d];
                        q.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push(m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln());
            }
        }
    }
    out
}

/// `(merged, lse, dqkv)` of flash attention and of the reference (its lse by hand).
fn both(qkv: &Tensor, n_head: usize, dy: &Tensor) -> ([Vec<f64>; 3], [Vec<f64>; 3]) {
    let (m, lse) = k::flash_attention(qkv, n_head).unwrap();
    let dqkv = k::flash_attention_backward(qkv, &m, &lse, dy, n_head).unwrap();
    let (rm, rp) = r::causal_attention(qkv, n_head).unwrap();
    let rd = r::causal_attention_backward(qkv, &rp, dy, n_head).unwrap();
    (
        [to_f64_vec(&m), to_f64_vec(&lse), to_f64_vec(&dqkv)],
        [to_f64_vec(&rm), lse_by_hand(qkv, n_head), to_f64_vec(&rd)],
    )
}

fn check(b: usize, t: usize, c: usize, n_head: usize, dtype: DType, tol: f64) {
    let mut g = rng((b * 1000 + t * 10 + n_head) as u64);
    let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, dtype);
    let dy = uniform(&mut g, &[b, t, c], 1.0, dtype);
    let (flash, reference) = both(&qkv, n_head, &dy);
    for (what, (a, e)) in ["merged", "lse", "dqkv"].iter().zip(flash.iter().zip(&reference)) {
        let err = max_err(a, e);
        assert!(err < tol, "{what} b{b} t{t} c{c} h{n_head} {dtype:?}: error {err:e} > {tol:e}");
    }
}

#[test]
fn flash_attention_matches_the_reference() {
    // (B, T, C, H): T = 1, T below, at, just past and well past the 64-row tile, head widths
    // 64 and 32 (and small ones), several heads.
    for &(b, t, c, h) in &[
        (1, 1, 64, 1),
        (2, 5, 8, 2),
        (1, 63, 64, 1),
        (2, 64, 64, 2),
        (1, 65, 64, 2),
        (2, 130, 96, 3),
        (1, 200, 128, 2),
    ] {
        check(b, t, c, h, DType::F64, 1e-12);
        check(b, t, c, h, DType::F32, 1e-5);
    }
}

#[test]
fn flash_attention_is_independent_of_the_thread_count() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut g = rng(8);
    let qkv = uniform(&mut g, &[3, 97, 3 * 64], 2.0, DType::F32);
    let dy = uniform(&mut g, &[3, 97, 64], 1.0, DType::F32);
    let serial = both(&qkv, 2, &dy).0;
    let parallel = pool.install(|| both(&qkv, 2, &dy).0);
    assert_eq!(serial, parallel, "the per-head tasks must not depend on the thread count");
}

#[test]
fn flash_attention_reads_strided_inputs() {
    let mut g = rng(9);
    let wide = uniform(&mut g, &[2, 70, 3 * 32 + 10], 2.0, DType::F64);
    let qkv = wide.narrow(2, 4, 3 * 32).unwrap();
    assert!(!qkv.is_contiguous());
    let dy = uniform(&mut g, &[2, 32, 70], 1.0, DType::F64).transpose(1, 2).unwrap();
    assert!(!dy.is_contiguous());
    let (flash, reference) = both(&qkv, 1, &dy);
    for (a, e) in flash.iter().zip(&reference) {
        assert!(max_err(a, e) < 1e-12);
    }
}

#[test]
fn flash_attention_survives_large_scores() {
    // Scores of several hundred: a softmax without the running max would overflow.
    let mut g = rng(10);
    let qkv = uniform(&mut g, &[1, 90, 3 * 32], 30.0, DType::F32);
    let dy = uniform(&mut g, &[1, 90, 32], 1.0, DType::F32);
    let (flash, reference) = both(&qkv, 1, &dy);
    assert!(flash.iter().flatten().all(|x| x.is_finite()));
    assert!(max_err(&flash[0], &reference[0]) < 1e-5);
    // lse is ~hundreds here: f32 keeps ~1e-7 of it.
    assert!(max_err(&flash[1], &reference[1]) < 1e-5);
}

#[test]
fn flash_attention_of_an_empty_sequence_is_empty() {
    let x = Tensor::zeros((2, 0, 12), DType::F32, &Device::Cpu).unwrap();
    let (m, lse) = k::flash_attention(&x, 2).unwrap();
    assert_eq!((m.dims(), lse.dims()), (&[2, 0, 4][..], &[2, 2, 0][..]));
    let dy = Tensor::zeros((2, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let d = k::flash_attention_backward(&x, &m, &lse, &dy, 2).unwrap();
    assert_eq!(d.dims(), &[2, 0, 12]);
}

#[test]
fn bad_flash_attention_arguments_are_errors() {
    let dev = &Device::Cpu;
    let x = Tensor::zeros((2, 4, 12), DType::F32, dev).unwrap();
    let msg = |r: candle_core::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(k::flash_attention(&x, 3).map(|p| p.0)).contains("divisible"));
    let (m, lse) = k::flash_attention(&x, 2).unwrap();
    let bad = Tensor::zeros((2, 4, 5), DType::F32, dev).unwrap();
    assert!(msg(k::flash_attention_backward(&x, &m, &lse, &bad, 2)).contains("dmerged"));
    assert!(msg(k::flash_attention_backward(&x, &m, &lse.to_dtype(DType::F64).unwrap(), &m, 2)).contains("lse"));
    assert!(msg(k::flash_attention(&x.to_dtype(DType::BF16).unwrap(), 2).map(|p| p.0)).contains("no kernels"));
}

#[test]
fn the_saving_api_picks_flash_on_the_cpu_and_the_reference_elsewhere() {
    // A short sequence on the CPU keeps the materialised kernel (measured faster there).
    let mut g = rng(11);
    let short = uniform(&mut g, &[1, k::FLASH_MIN_SEQUENCE - 1, 3 * 16], 2.0, DType::F32);
    assert!(matches!(k::causal_attention_saving(&short, 2).unwrap().1, k::AttentionSaved::Probs(_)));
    let mut g = rng(12);
    let (b, t, c, h) = (2, k::FLASH_MIN_SEQUENCE + 14, 64, 2);
    let qkv = uniform(&mut g, &[b, t, 3 * c], 2.0, DType::F32);
    let dy = uniform(&mut g, &[b, t, c], 1.0, DType::F32);
    let (rm, rp) = r::causal_attention(&qkv, h).unwrap();
    let rd = to_f64_vec(&r::causal_attention_backward(&qkv, &rp, &dy, h).unwrap());
    let (m, saved) = k::causal_attention_saving(&qkv, h).unwrap();
    assert!(matches!(saved, k::AttentionSaved::LogSumExp(_)));
    assert_eq!(saved.tensor().dims(), &[b, h, t]);
    let d = k::causal_attention_saved_backward(&qkv, &m, &saved, &dy, h).unwrap();
    assert!(max_err(&to_f64_vec(&m), &to_f64_vec(&rm)) < 1e-5);
    assert!(max_err(&to_f64_vec(&d), &rd) < 1e-5);
    // bf16 has no CPU kernel: the reference composition, saving probabilities.
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let (m, saved) = k::causal_attention_saving(&bf(&qkv), h).unwrap();
    assert!(matches!(saved, k::AttentionSaved::Probs(_)));
    let d = k::causal_attention_saved_backward(&bf(&qkv), &m, &saved, &bf(&dy), h).unwrap();
    assert!(max_err(&to_f64_vec(&m), &to_f64_vec(&rm)) < 3e-2);
    assert!(max_err(&to_f64_vec(&d), &rd) < 1e-1);
}

/// Grouped-query flash attention's `(out, lse, dq, dk, dv)` and the reference's: the MHA
/// reference over k/v heads repeated to every query head (HF's `repeat_kv`), its dk/dv summed
/// back over each group.
fn grouped_both(q: &Tensor, kv: [&Tensor; 2], dy: &Tensor) -> ([Vec<f64>; 5], [Vec<f64>; 5]) {
    let [kt, vt] = kv;
    let (b, t, h, d) = q.dims4().unwrap();
    let n_kv = kt.dim(2).unwrap();
    let g = h / n_kv;
    let (out, lse) = k::flash::grouped_flash_attention(q, kt, vt).unwrap();
    let (dq, dk, dv) = k::flash::grouped_flash_attention_backward(q, kt, vt, &out, &lse, dy).unwrap();
    let repeat = |x: &Tensor| {
        x.unsqueeze(3).unwrap().broadcast_as((b, t, n_kv, g, d)).unwrap().contiguous().unwrap().reshape((b, t, h * d))
    };
    let flat = |x: &Tensor| x.reshape((b, t, h * d)).unwrap();
    let qkv = Tensor::cat(&[&flat(q), &repeat(kt).unwrap(), &repeat(vt).unwrap()], 2).unwrap();
    let (rm, rp) = r::causal_attention(&qkv, h).unwrap();
    let rd = r::causal_attention_backward(&qkv, &rp, &flat(dy), h).unwrap();
    let part = |i: usize| rd.narrow(2, i * h * d, h * d).unwrap();
    let fold = |x: Tensor| x.reshape((b, t, n_kv, g, d)).unwrap().sum(3).unwrap();
    (
        [&out, &lse, &dq, &dk, &dv].map(to_f64_vec),
        [
            to_f64_vec(&rm),
            lse_by_hand(&qkv, h),
            to_f64_vec(&part(0)),
            to_f64_vec(&fold(part(1))),
            to_f64_vec(&fold(part(2))),
        ],
    )
}

fn check_grouped(b: usize, t: usize, heads: (usize, usize), d: usize, dtype: DType, tol: f64) {
    let (h, kv) = heads;
    let mut g = rng((b * 1000 + t * 10 + h * 3 + kv) as u64);
    let q = uniform(&mut g, &[b, t, h, d], 2.0, dtype);
    let kt = uniform(&mut g, &[b, t, kv, d], 2.0, dtype);
    let vt = uniform(&mut g, &[b, t, kv, d], 2.0, dtype);
    let dy = uniform(&mut g, &[b, t, h, d], 1.0, dtype);
    let (flash, reference) = grouped_both(&q, [&kt, &vt], &dy);
    for (what, (a, e)) in ["out", "lse", "dq", "dk", "dv"].iter().zip(flash.iter().zip(&reference)) {
        let err = max_err(a, e);
        assert!(err < tol, "{what} b{b} t{t} h{h} kv{kv} d{d} {dtype:?}: error {err:e} > {tol:e}");
    }
}

#[test]
fn grouped_flash_attention_matches_the_repeated_reference() {
    // (B, T, (H, KV), D): groups of 1, 2, 3 and 4 (multi-query), T within, at and past the tile.
    for &(b, t, heads, d) in &[
        (1, 1, (2, 1), 8),
        (2, 5, (4, 2), 8),
        (1, 64, (3, 3), 16),
        (2, 65, (6, 2), 16),
        (1, 130, (4, 1), 32),
        (2, 200, (9, 3), 64),
    ] {
        check_grouped(b, t, heads, d, DType::F64, 1e-12);
        check_grouped(b, t, heads, d, DType::F32, 1e-5);
    }
}

#[test]
fn grouped_flash_attention_is_independent_of_the_thread_count() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut g = rng(13);
    let q = uniform(&mut g, &[3, 97, 4, 16], 2.0, DType::F32);
    let kt = uniform(&mut g, &[3, 97, 2, 16], 2.0, DType::F32);
    let vt = uniform(&mut g, &[3, 97, 2, 16], 2.0, DType::F32);
    let dy = uniform(&mut g, &[3, 97, 4, 16], 1.0, DType::F32);
    let serial = grouped_both(&q, [&kt, &vt], &dy).0;
    let parallel = pool.install(|| grouped_both(&q, [&kt, &vt], &dy).0);
    assert_eq!(serial, parallel, "the per-head tasks must not depend on the thread count");
}

#[test]
fn grouped_flash_attention_takes_long_cpu_sequences_only() {
    let at = |t: usize, dtype: DType| Tensor::zeros((1, t, 2, 4), dtype, &Device::Cpu).unwrap();
    assert!(k::flash::grouped_takes_flash(&at(k::FLASH_MIN_SEQUENCE, DType::F32)));
    assert!(!k::flash::grouped_takes_flash(&at(k::FLASH_MIN_SEQUENCE - 1, DType::F32)));
    assert!(!k::flash::grouped_takes_flash(&at(k::FLASH_MIN_SEQUENCE, DType::BF16)));
}

#[test]
fn bad_grouped_flash_attention_arguments_are_errors() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let msg = |r: candle_core::Result<(Tensor, Tensor)>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let q = z(&[2, 4, 4, 8]);
    assert!(msg(k::flash::grouped_flash_attention(&q, &z(&[2, 4, 3, 8]), &z(&[2, 4, 3, 8]))).contains("multiple"));
    assert!(msg(k::flash::grouped_flash_attention(&q, &z(&[2, 4, 2, 8]), &z(&[2, 4, 2, 4]))).contains("(B, T, KV, D)"));
    assert!(msg(k::flash::grouped_flash_attention(&q, &z(&[2, 5, 2, 8]), &z(&[2, 5, 2, 8]))).contains("(B, T, KV, D)"));
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let kv = z(&[2, 4, 2, 8]);
    assert!(msg(k::flash::grouped_flash_attention(&bf(&q), &bf(&kv), &bf(&kv))).contains("no kernels"));
    let (out, lse) = k::flash::grouped_flash_attention(&q, &kv, &kv).unwrap();
    let back = |lse: &Tensor, dy: &Tensor| {
        k::flash::grouped_flash_attention_backward(&q, &kv, &kv, &out, lse, dy).err().map(|e| e.to_string())
    };
    assert!(back(&lse, &z(&[2, 4, 4, 4])).unwrap_or_default().contains("dout"));
    assert!(back(&lse.to_dtype(DType::F64).unwrap(), &out).unwrap_or_default().contains("lse"));
    assert!(back(&lse, &out).is_none());
}
