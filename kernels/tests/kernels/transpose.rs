//! `transpose_2d` against the definition `out[c][r] = x[r][c]`, element by element: odd
//! shapes that leave partial tiles on both sides, empty and single-element matrices, both
//! dtypes, a strided input, the fallback dtype, and the rank error.

use brigade_kernels as k;
use candle_core::{DType, Tensor};

use crate::gradcheck::{rng, to_f64_vec, uniform};

fn check(x: &Tensor) {
    let (rows, cols) = x.dims2().unwrap();
    let got = k::transpose_2d(x).unwrap();
    assert_eq!(got.dims(), &[cols, rows], "{rows}x{cols}");
    assert!(got.is_contiguous());
    assert_eq!(got.dtype(), x.dtype());
    let (src, out) = (to_f64_vec(x), to_f64_vec(&got));
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(out[c * rows + r].to_bits(), src[r * cols + c].to_bits(), "{rows}x{cols} at ({r}, {c})");
        }
    }
}

#[test]
fn transpose_2d_moves_every_element_to_its_mirror() {
    let mut g = rng(41);
    for dtype in [DType::F32, DType::F64] {
        for (rows, cols) in [(1, 1), (0, 5), (5, 0), (16, 16), (17, 33), (40, 16), (3, 70), (256, 48)] {
            check(&uniform(&mut g, &[rows, cols], 1.0, dtype));
        }
        // A strided (transposed) view is read through its layout.
        let x = uniform(&mut g, &[19, 35], 1.0, dtype).t().unwrap();
        assert!(!x.is_contiguous());
        check(&x);
    }
    // Off the fused dtypes: candle's copy, the same values.
    check(&uniform(&mut g, &[21, 9], 1.0, DType::F32).to_dtype(DType::BF16).unwrap());
}

#[test]
fn transpose_2d_rejects_other_ranks() {
    let x = Tensor::zeros((2, 3, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = k::transpose_2d(&x).unwrap_err().to_string();
    assert!(err.contains("expected a matrix (R, C)"), "{err}");
}
