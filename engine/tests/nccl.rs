//! The one-rank NCCL smoke test (`nccl` feature), for the GPU machine: NCCL takes one rank per
//! GPU, so a one-GPU machine can check no more than this. On GPU 0 it all-reduces a known tensor
//! over a one-rank world and sends it to its own rank and back, through the same typed
//! `ncclSend`/`ncclRecv` the transport uses, and compares both with the values put in. It is
//! compiled only with the feature (`benches/gpu-build.sh` builds it, `benches/gpu-check.sh`
//! runs it); without a GPU it fails, it never passes.
#![cfg(feature = "nccl")]

use brigade_engine::pipeline::nccl_one_rank_check;
use candle_core::{DType, Device, Tensor};

fn gpu() -> Device {
    Device::new_cuda_with_stream(0)
        .expect("the NCCL smoke test needs GPU 0: run it on the GPU machine (benches/gpu-check.sh)")
}

#[test]
fn one_rank_all_reduce_and_send_to_self_return_the_known_values() {
    let device = gpu();
    // Rows 2..5 of an (8, 5) ramp: contiguous, but 10 elements into its buffer, so a send that
    // ignored the layout's offset would return rows 0..3.
    let ramp = ((Tensor::arange(0f32, 40.0, &device).unwrap().reshape((8, 5)).unwrap() * 0.25).unwrap() - 3.0).unwrap();
    let rows = ramp.narrow(0, 2, 3).unwrap();
    let want: Vec<f32> = (10..25).map(|i| i as f32 * 0.25 - 3.0).collect();
    let (reduced, echoed) = nccl_one_rank_check(0, &rows).unwrap();
    for (name, got) in [("all-reduce", reduced), ("send to self", echoed)] {
        assert_eq!(got.dims(), &[3, 5], "{name}");
        assert_eq!(got.dtype(), DType::F32, "{name}");
        let got = got.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn bf16_and_a_transposed_tensor_travel_too() {
    let device = gpu();
    // (3, 4) transposed to (4, 3): not contiguous, so the check makes it contiguous first.
    let base = (Tensor::arange(0f32, 12.0, &device).unwrap().reshape((3, 4)).unwrap() * 0.5).unwrap();
    let tensor = base.t().unwrap().to_dtype(DType::BF16).unwrap();
    // Element (i, j) of the transpose is base (j, i) = (4j + i) / 2, exact in bf16.
    let want: Vec<f32> = (0..4).flat_map(|i| (0..3).map(move |j| (4 * j + i) as f32 * 0.5)).collect();
    let (reduced, echoed) = nccl_one_rank_check(0, &tensor).unwrap();
    for (name, got) in [("all-reduce", reduced), ("send to self", echoed)] {
        assert_eq!((got.dims(), got.dtype()), (&[4usize, 3][..], DType::BF16), "{name}");
        let got = got.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{name}");
    }
}
