//! The backward functions layers call directly (no autograd) against candle's autograd over
//! the reference compositions, plus the in-place accumulator and the row sum.

use brigade_kernels as k;
use brigade_kernels::reference as r;
use candle_core::{DType, Device, Tensor, Var};

use crate::gradcheck::{distinct, max_err, rng, to_f64_vec, uniform};

/// Gradients of `sum(f(inputs) * dy)` with respect to each input, by candle's autograd.
fn autograd(inputs: &[&Tensor], dy: &Tensor, f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&ts).unwrap() * dy).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter().map(|t| grads.get(t).unwrap().clone()).collect()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let e = max_err(&to_f64_vec(got), &to_f64_vec(want));
    assert!(e <= tol, "{what}: max error {e:e} > {tol:e}");
}

#[test]
fn backward_functions_match_autograd_of_the_reference() {
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-10 } else { 2e-5 };
        let mut g = rng(7);
        // LayerNorm: dx, dweight, dbias.
        let (x, w, b) = (
            uniform(&mut g, &[3, 5, 24], 2.0, dtype),
            uniform(&mut g, &[24], 1.0, dtype),
            uniform(&mut g, &[24], 1.0, dtype),
        );
        let dy = uniform(&mut g, &[3, 5, 24], 1.0, dtype);
        let (dx, dw, db) = k::layer_norm_backward(&x, &w, &dy, 1e-5).unwrap();
        let want = autograd(&[&x, &w, &b], &dy, |t| r::layer_norm(&t[0], &t[1], &t[2], 1e-5));
        assert_close("layer_norm dx", &dx, &want[0], tol);
        assert_close("layer_norm dweight", &dw, &want[1], tol);
        assert_close("layer_norm dbias", &db, &want[2], tol);
        // Softmax from its output.
        let x = uniform(&mut g, &[4, 2, 33], 3.0, dtype);
        let dy = uniform(&mut g, &[4, 2, 33], 1.0, dtype);
        let y = k::softmax_last_dim(&x).unwrap();
        let want = autograd(&[&x], &dy, |t| r::softmax_last_dim(&t[0]));
        assert_close("softmax dx", &k::softmax_last_dim_backward(&y, &dy).unwrap(), &want[0], tol);
        // GELU from its input.
        let x = uniform(&mut g, &[7, 40], 4.0, dtype);
        let dy = uniform(&mut g, &[7, 40], 1.0, dtype);
        let want = autograd(&[&x], &dy, |t| r::gelu_tanh(&t[0]));
        // The reference is candle's `gelu`, whose backward hard-codes six-digit constants.
        assert_close("gelu dx", &k::gelu_tanh_backward(&x, &dy).unwrap(), &want[0], tol.max(1e-6));
        // Cross-entropy, scaled (as the pipeline scales by 1 / global terms).
        let logits = uniform(&mut g, &[6, 11], 3.0, dtype);
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu).unwrap();
        let scale = Tensor::new(0.125f64, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let want = autograd(&[&logits], &scale, |t| r::cross_entropy_sum(&t[0], &targets));
        assert_close(
            "cross-entropy dlogits",
            &k::cross_entropy_sum_backward(&logits, &targets, 0.125).unwrap(),
            &want[0],
            tol,
        );
        // Max pooling (distinct values: no ties), with padding and stride.
        let x = distinct(&mut g, &[2, 3, 9, 7], 0.01, dtype);
        let dy = uniform(&mut g, &[2, 3, 5, 4], 1.0, dtype);
        let want = autograd(&[&x], &dy, |t| r::max_pool2d(&t[0], 3, 2, 1));
        assert_close("max_pool dx", &k::max_pool2d_backward(&x, &dy, 3, 2, 1).unwrap(), &want[0], tol);
    }
}

#[test]
fn backward_functions_work_off_the_fused_path_and_reject_bad_shapes() {
    // bf16 takes the autograd fallback over the reference composition.
    let mut g = rng(3);
    let x = uniform(&mut g, &[4, 8], 2.0, DType::F32);
    let dy = uniform(&mut g, &[4, 8], 1.0, DType::F32);
    let fused = k::gelu_tanh_backward(&x, &dy).unwrap();
    let (xb, dyb) = (x.to_dtype(DType::BF16).unwrap(), dy.to_dtype(DType::BF16).unwrap());
    let fallback = k::gelu_tanh_backward(&xb, &dyb).unwrap().to_dtype(DType::F32).unwrap();
    assert_close("bf16 gelu dx", &fallback, &fused, 5e-2);
    let e = k::gelu_tanh_backward(&x, &dy.t().unwrap()).unwrap_err().to_string();
    assert!(e.contains("must have the shape of x"), "{e}");
    let e = k::softmax_last_dim_backward(&x, &x.reshape((8, 4)).unwrap()).unwrap_err().to_string();
    assert!(e.contains("must have the shape of y"), "{e}");
    let e = k::max_pool2d_backward(&x.reshape((1, 1, 4, 8)).unwrap(), &dy, 3, 2, 1).unwrap_err().to_string();
    assert!(e.contains("dy must have shape"), "{e}");
}

#[test]
fn accumulate_adds_in_place_and_sum_rows_matches_a_reduction() {
    let mut g = rng(11);
    for dtype in [DType::F32, DType::F64] {
        let acc = uniform(&mut g, &[6, 5], 1.0, dtype).copy().unwrap();
        let before = to_f64_vec(&acc);
        // A strided gradient (a transpose) is read through its layout.
        let grad = uniform(&mut g, &[5, 6], 1.0, dtype).t().unwrap();
        k::accumulate(&acc, &grad).unwrap();
        let want: Vec<f64> = before.iter().zip(to_f64_vec(&grad)).map(|(a, b)| a + b).collect();
        assert!(max_err(&to_f64_vec(&acc), &want) < 1e-6);
        let e = k::accumulate(&acc, &grad.t().unwrap()).unwrap_err().to_string();
        assert!(e.contains("does not match the accumulator"), "{e}");

        let x = uniform(&mut g, &[37, 19], 1.0, dtype);
        assert_close("sum_rows", &k::sum_rows(&x).unwrap(), &x.sum(0).unwrap(), 1e-5);
        let xt = uniform(&mut g, &[19, 37], 1.0, dtype).t().unwrap();
        assert_close("sum_rows strided", &k::sum_rows(&xt).unwrap(), &xt.sum(0).unwrap(), 1e-5);
    }
    assert!(k::sum_rows(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).is_err());
}

/// Many row blocks, summed in parallel: close to candle's reduction, and the same bits on one
/// thread and on a pool of two.
#[test]
fn sum_rows_over_many_blocks_is_thread_count_independent() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut g = rng(12);
    for dtype in [DType::F32, DType::F64] {
        for rows in [1000, 2048, 129] {
            let x = uniform(&mut g, &[rows, 67], 1.0, dtype);
            let one = k::sum_rows(&x).unwrap();
            assert_close("sum_rows blocks", &one, &x.sum(0).unwrap(), 1e-4);
            let two = pool.install(|| k::sum_rows(&x)).unwrap();
            assert_eq!(to_f64_vec(&one), to_f64_vec(&two), "{rows} rows {dtype:?}");
        }
    }
}

#[test]
fn matmul_accumulate_adds_the_product_in_place() {
    let mut g = rng(5);
    for dtype in [DType::F32, DType::F64] {
        let acc = uniform(&mut g, &[7, 9], 1.0, dtype).copy().unwrap();
        let before = acc.copy().unwrap();
        // Transposed operands, as a weight step passes xᵀ.
        let a = uniform(&mut g, &[13, 7], 1.0, dtype).t().unwrap();
        let b = uniform(&mut g, &[13, 9], 1.0, dtype);
        k::matmul_accumulate(&acc, &a, &b).unwrap();
        let want = (&before + a.matmul(&b).unwrap()).unwrap();
        assert_close("matmul_accumulate", &acc, &want, 1e-5);
        // Large enough to run GEMM's threaded path inside a pool of two.
        let acc = Tensor::zeros((64, 96), dtype, &Device::Cpu).unwrap();
        let (a, b) = (uniform(&mut g, &[64, 80], 1.0, dtype), uniform(&mut g, &[96, 80], 1.0, dtype).t().unwrap());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            k::matmul_accumulate(&acc, &a, &b).unwrap();
            k::matmul_accumulate(&acc, &a, &b).unwrap();
        });
        assert_close("matmul_accumulate twice", &acc, &(a.matmul(&b).unwrap() * 2.0).unwrap(), 1e-4);
        let e = k::matmul_accumulate(&acc, &b, &a).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }
}

/// `add` equals candle's `a + b` bit for bit (dense and strided, both dtypes, one and two
/// threads) and rejects mismatched operands.
#[test]
fn add_matches_candle_on_any_thread_count() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut g = rng(13);
    for dtype in [DType::F32, DType::F64] {
        for (rows, cols) in [(3, 5), (300, 257)] {
            let a = uniform(&mut g, &[rows, cols], 1.0, dtype);
            let b = uniform(&mut g, &[cols, rows], 1.0, dtype).t().unwrap();
            let want = to_f64_vec(&(&a + &b).unwrap());
            assert_eq!(to_f64_vec(&k::add(&a, &b).unwrap()), want);
            assert_eq!(to_f64_vec(&pool.install(|| k::add(&a, &b)).unwrap()), want);
        }
    }
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    assert!(k::add(&z(&[2, 3]), &z(&[3, 2])).is_err());
}

/// The fused LayerNorm backward with the residual gradient is the composition it replaces,
/// `add(residual, layer_norm_backward(..).dx)`, bit for bit (the same two terms rounded once),
/// with the same `dweight` and `dbias`: both dtypes, one and two threads, a shape small enough
/// for one thread and one over the parallel threshold with several row blocks, and a strided
/// residual. It also rejects a residual of another shape or dtype.
#[test]
fn layer_norm_backward_residual_is_the_backward_plus_the_residual_bit_for_bit() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut g = rng(21);
    for dtype in [DType::F32, DType::F64] {
        for (rows, c) in [(5, 24), (300, 256)] {
            let x = uniform(&mut g, &[rows, c], 2.0, dtype);
            let w = uniform(&mut g, &[c], 1.0, dtype);
            let dy = uniform(&mut g, &[rows, c], 1.0, dtype);
            let res = uniform(&mut g, &[c, rows], 1.0, dtype).t().unwrap();
            let (dx, dw, db) = k::layer_norm_backward(&x, &w, &dy, 1e-5).unwrap();
            let want = [to_f64_vec(&k::add(&res, &dx).unwrap()), to_f64_vec(&dw), to_f64_vec(&db)];
            for threads in [1, 2] {
                let (fdx, fdw, fdb) = if threads == 1 {
                    k::layer_norm_backward_residual(&x, &w, &dy, &res, 1e-5).unwrap()
                } else {
                    pool.install(|| k::layer_norm_backward_residual(&x, &w, &dy, &res, 1e-5)).unwrap()
                };
                assert_eq!(fdx.dims(), x.dims());
                let got = [to_f64_vec(&fdx), to_f64_vec(&fdw), to_f64_vec(&fdb)];
                for (what, (got, want)) in ["dx", "dweight", "dbias"].iter().zip(got.iter().zip(&want)) {
                    assert_eq!(got, want, "{what}: {rows}×{c} {dtype:?} on {threads} threads");
                }
            }
        }
    }
    let z = |d: &[usize], dt| Tensor::zeros(d, dt, &Device::Cpu).unwrap();
    let (x, w) = (z(&[4, 8], DType::F32), z(&[8], DType::F32));
    let e = k::layer_norm_backward_residual(&x, &w, &x, &z(&[8, 4], DType::F32), 1e-5).unwrap_err().to_string();
    assert!(e.contains("residual") && e.contains("shape"), "{e}");
    let e = k::layer_norm_backward_residual(&x, &w, &x, &z(&[4, 8], DType::F64), 1e-5).unwrap_err().to_string();
    assert!(e.contains("residual") && e.contains("F64"), "{e}");
}

/// `sum_squares` is the f64 sum of squares: within f64 rounding of the composition
/// `to_dtype(F64).sqr().sum_all()` (a different summation order, so not bit for bit; the
/// relative gap of two f64 sums of n positive terms is at most ~n·2⁻⁵³), the same bits on one
/// thread and two, dense or strided, over one block or many, and 0 for an empty tensor.
#[test]
fn sum_squares_is_the_f64_sum_of_squares_on_any_thread_count() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut g = rng(22);
    for dtype in [DType::F32, DType::F64] {
        for dims in [vec![7], vec![3, 5, 24], vec![300, 769]] {
            let x = uniform(&mut g, &dims, 3.0, dtype);
            let x = if dims.len() == 2 { x.t().unwrap() } else { x };
            let want = x.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let one = k::sum_squares(&x).unwrap();
            assert_eq!(one.dtype(), DType::F64);
            let one = one.to_scalar::<f64>().unwrap();
            let two = pool.install(|| k::sum_squares(&x)).unwrap().to_scalar::<f64>().unwrap();
            assert!(((one - want) / want).abs() < 1e-12, "{dims:?} {dtype:?}: {one} vs {want}");
            assert_eq!(one.to_bits(), two.to_bits(), "{dims:?} {dtype:?}: thread count changed the bits");
        }
    }
    assert_eq!(
        k::sum_squares(&Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()).unwrap().to_scalar::<f64>().unwrap(),
        0.0
    );
    // Off the fused dtypes it is the composition.
    let x = uniform(&mut g, &[9], 1.0, DType::F32).to_dtype(DType::BF16).unwrap();
    let want = x.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(k::sum_squares(&x).unwrap().to_scalar::<f64>().unwrap(), want);
}

/// Bits of a tensor, for bit-equality checks.
fn bits(t: &Tensor) -> Vec<u64> {
    to_f64_vec(t).iter().map(|v| v.to_bits()).collect()
}

#[test]
fn cross_entropy_with_grad_in_place_is_the_loss_and_the_backward_in_one_pass() {
    let mut g = rng(11);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // 6 × 11 runs the rows serially; 40 × 1031 (over the parallel threshold) on two threads.
    for (n, v) in [(6usize, 11usize), (40, 1031)] {
        for dtype in [DType::F32, DType::F64] {
            let what = format!("{n}x{v} {dtype:?}");
            let logits = uniform(&mut g, &[n, v], 4.0, dtype);
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
            let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
            let want_loss = k::cross_entropy_sum(&logits, &targets).unwrap().to_dtype(DType::F64).unwrap();
            let want_grad = k::cross_entropy_sum_backward(&logits, &targets, 0.125).unwrap();
            // The kernel overwrites its input: hand it a copy.
            let owned = logits.copy().unwrap();
            let (loss, grad) =
                pool.install(|| k::cross_entropy_sum_with_grad_in_place(owned.clone(), &targets, 0.125)).unwrap();
            assert_eq!(loss.dtype(), DType::F64, "{what}");
            // Same operations per row as the backward kernel: the same bits.
            assert_eq!(bits(&grad), bits(&want_grad), "{what}: gradient");
            assert_eq!(grad.dtype(), dtype, "{what}");
            // In place: the gradient is the handed-over tensor.
            assert_eq!(bits(&owned), bits(&want_grad), "{what}: written in place");
            // The loss sums the same row losses; the exp-sum comes from the gradient's pass.
            let (got, want) = (loss.to_scalar::<f64>().unwrap(), want_loss.to_scalar::<f64>().unwrap());
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            assert!((got - want).abs() <= tol * want.abs(), "{what}: loss {got} vs {want}");
            // One thread: the same bits as two.
            let (loss1, grad1) =
                k::cross_entropy_sum_with_grad_in_place(logits.copy().unwrap(), &targets, 0.125).unwrap();
            assert_eq!(bits(&grad1), bits(&grad), "{what}: one thread");
            assert_eq!(loss1.to_scalar::<f64>().unwrap().to_bits(), got.to_bits(), "{what}: one-thread loss");
        }
    }
    // A target past the vocabulary is an error naming it, never a read out of bounds.
    let logits = uniform(&mut g, &[2, 5], 1.0, DType::F32);
    let e = k::cross_entropy_sum_with_grad_in_place(logits, &Tensor::new(&[1u32, 5], &Device::Cpu).unwrap(), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target id 5 at row 1"), "{e}");
    // bf16 takes the composition: an f64 loss, a bf16 gradient, both as the two ops give them.
    let logits = uniform(&mut g, &[3, 7], 2.0, DType::BF16);
    let targets = Tensor::new(&[0u32, 6, 2], &Device::Cpu).unwrap();
    let (loss, grad) = k::cross_entropy_sum_with_grad_in_place(logits.clone(), &targets, 0.5).unwrap();
    assert_eq!((loss.dtype(), grad.dtype()), (DType::F64, DType::BF16));
    assert_eq!(bits(&grad), bits(&k::cross_entropy_sum_backward(&logits, &targets, 0.5).unwrap()));
}

#[test]
fn index_add_rows_scatters_into_the_running_sum() {
    let mut g = rng(12);
    for dtype in [DType::F32, DType::F64] {
        let acc = uniform(&mut g, &[7, 5], 1.0, dtype);
        let before = acc.copy().unwrap();
        // Repeated ids sum; untouched rows stay as they were.
        let ids = Tensor::new(&[3u32, 0, 3, 6, 3], &Device::Cpu).unwrap();
        let rows = uniform(&mut g, &[5, 5], 1.0, dtype);
        k::index_add_rows(&acc, &ids, &rows).unwrap();
        let want = before.index_add(&ids, &rows, 0).unwrap();
        assert_close(&format!("index_add_rows {dtype:?}"), &acc, &want, 1e-15);
        assert_eq!(bits(&acc.get(1).unwrap()), bits(&before.get(1).unwrap()));
        // i64 ids are taken as well.
        let ids64 = Tensor::new(&[1i64, 1], &Device::Cpu).unwrap();
        let two = uniform(&mut g, &[2, 5], 1.0, dtype);
        let want = acc.index_add(&ids64.to_dtype(DType::U32).unwrap(), &two, 0).unwrap();
        k::index_add_rows(&acc, &ids64, &two).unwrap();
        assert_close("index_add_rows i64 ids", &acc, &want, 1e-15);
    }
    let acc = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let rows = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    let e = k::index_add_rows(&acc, &Tensor::new(&[4u32], &Device::Cpu).unwrap(), &rows).unwrap_err().to_string();
    assert!(e.contains("id 4 at row 0 is out of range for a table of 4 rows"), "{e}");
    assert_eq!(acc.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "an error leaves the sum untouched");
    let e = k::index_add_rows(&acc, &Tensor::new(&[0u32], &Device::Cpu).unwrap(), &rows.to_dtype(DType::F64).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not match the table's dtype"), "{e}");
}
