//! brigade's GEMM entry points (`matmul`, `conv2d`) against candle's `matmul` and `conv2d`:
//! the same bits (they make the same gemm calls), for each of candle's three convolution
//! algorithms, strided operands (the weight gradient's transposed views), both dtypes, one
//! thread and a pool of three; the shape errors; and the fallback for tracked operands.

use brigade_kernels as k;
use candle_core::{DType, Tensor, Var};

use crate::gradcheck::{rng, uniform};

/// The bit patterns of a float tensor's elements.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().into_iter().map(|v| v.to_bits() as u64).collect(),
        _ => t.to_vec1::<f64>().unwrap().into_iter().map(f64::to_bits).collect(),
    }
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

#[test]
fn matmul_gives_candles_bits() {
    for dtype in [DType::F32, DType::F64] {
        for threads in [1, 3] {
            let mut g = rng(7);
            let a = uniform(&mut g, &[37, 70], 1.0, dtype);
            let b = uniform(&mut g, &[70, 45], 1.0, dtype);
            let bt = uniform(&mut g, &[45, 70], 1.0, dtype).t().unwrap();
            let batched_a = uniform(&mut g, &[2, 3, 9, 17], 1.0, dtype);
            let batched_b = uniform(&mut g, &[2, 3, 17, 5], 1.0, dtype);
            let cases = [(a.clone(), b), (a, bt), (batched_a, batched_b)];
            for (x, y) in &cases {
                let ours = in_pool(threads, || k::matmul(x, y).unwrap());
                let want = x.matmul(y).unwrap();
                assert_eq!(ours.dims(), want.dims());
                assert_eq!(bits(&ours), bits(&want), "{:?} · {:?}, {threads} threads", x.dims(), y.dims());
            }
        }
    }
}

/// Input dims, kernel dims, padding, stride, dilation.
type ConvCase = ([usize; 4], [usize; 4], usize, usize, usize);

#[test]
fn conv2d_gives_candles_bits_on_each_algorithm() {
    // (input dims, kernel dims, padding, stride, dilation): 1×1 unit stride (one product per
    // image), 1×1 stride 2 (full im2col), 3×3 padded and strided (im2col tiles; 40×40 outputs
    // take more than one 512-pixel tile), and a dilated one as the weight gradient runs it.
    let cases: [ConvCase; 5] = [
        ([2, 5, 6, 7], [4, 5, 1, 1], 0, 1, 1),
        ([2, 5, 7, 6], [4, 5, 1, 1], 0, 2, 1),
        ([2, 3, 40, 40], [6, 3, 3, 3], 1, 1, 1),
        ([3, 4, 9, 11], [5, 4, 3, 3], 1, 2, 1),
        ([3, 4, 9, 9], [5, 4, 4, 4], 1, 1, 2),
    ];
    for dtype in [DType::F32, DType::F64] {
        for threads in [1, 3] {
            for (i, &(xd, wd, padding, stride, dilation)) in cases.iter().enumerate() {
                let mut g = rng(i as u64);
                let x = uniform(&mut g, &xd, 1.0, dtype);
                let w = uniform(&mut g, &wd, 1.0, dtype);
                let ours = in_pool(threads, || k::conv2d(&x, &w, padding, stride, dilation).unwrap());
                let want = x.conv2d(&w, padding, stride, dilation, 1).unwrap();
                assert_eq!(ours.dims(), want.dims(), "case {i}");
                assert_eq!(bits(&ours), bits(&want), "case {i}, {dtype:?}, {threads} threads");
            }
        }
    }
}

#[test]
fn conv2d_reads_strided_operands_like_candle() {
    // The weight gradient: x and dy with batch and channel axes swapped (strided views).
    let mut g = rng(11);
    let x = uniform(&mut g, &[4, 3, 10, 10], 1.0, DType::F32);
    let dy = uniform(&mut g, &[4, 6, 5, 5], 1.0, DType::F32);
    let (xt, dyt) = (x.transpose(0, 1).unwrap(), dy.transpose(0, 1).unwrap());
    for (padding, dilation) in [(1, 2), (0, 2)] {
        let ours = k::conv2d(&xt, &dyt, padding, 1, dilation).unwrap();
        let want = xt.conv2d(&dyt, padding, 1, dilation, 1).unwrap();
        assert_eq!(bits(&ours), bits(&want), "padding {padding}");
    }
    // A 1×1 kernel that is a strided view (the full-im2col path copies it first).
    let w = uniform(&mut g, &[3, 6, 1, 1], 1.0, DType::F32).transpose(0, 1).unwrap();
    let x = uniform(&mut g, &[2, 3, 7, 7], 1.0, DType::F32);
    for stride in [1, 2] {
        let ours = k::conv2d(&x, &w, 0, stride, 1).unwrap();
        assert_eq!(bits(&ours), bits(&x.conv2d(&w, 0, stride, 1, 1).unwrap()), "stride {stride}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let t = |d: &[usize]| Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = k::matmul(&t(&[3, 4]), &t(&[5, 2])).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
    let e = k::matmul(&t(&[2, 3, 4]), &t(&[3, 4, 2])).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
    let e = k::conv2d(&t(&[1, 3, 5, 5]), &t(&[2, 4, 3, 3]), 0, 1, 1).unwrap_err().to_string();
    assert!(e.contains("channels"), "{e}");
    let e = k::conv2d(&t(&[1, 3, 2, 2]), &t(&[2, 3, 3, 3]), 0, 1, 1).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
    let e = k::conv2d(&t(&[1, 3, 5, 5]), &t(&[2, 3, 3, 3]), 0, 0, 1).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
}

#[test]
fn tracked_operands_keep_candles_autograd() {
    let mut g = rng(3);
    let w = Var::from_tensor(&uniform(&mut g, &[4, 3], 1.0, DType::F64)).unwrap();
    let x = uniform(&mut g, &[2, 4], 1.0, DType::F64);
    let y = k::matmul(&x, w.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(w.as_tensor()).is_some(), "matmul on a Var must record its graph");
    let kernel = Var::from_tensor(&uniform(&mut g, &[2, 3, 3, 3], 1.0, DType::F64)).unwrap();
    let image = uniform(&mut g, &[1, 3, 5, 5], 1.0, DType::F64);
    let y = k::conv2d(&image, kernel.as_tensor(), 1, 1, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(kernel.as_tensor()).is_some(), "conv2d on a Var must record its graph");
}
