//! The sum of squares of a tensor's elements, accumulated in f64: the gradient norm that
//! clipping needs, once per step over every gradient of a stage.
//!
//! The composition `t.to_dtype(F64).sqr().sum_all()` is three passes on the calling thread
//! (candle's elementwise maps and its reduction run there), two of them writing a fresh f64
//! copy of the whole gradient: for the side-by-side GPT's 3.3M parameters, two 26 MB buffers
//! (page faults and all) while the stage's other threads idle. Here each fixed block of
//! [`BLOCK`] elements is squared and summed in f64 straight from the f32 (or f64) data, on the
//! caller's rayon pool, and the block sums are added in block order, so the result has the same
//! bits whatever the thread count. Within a block, eight running sums (lane `i` takes the
//! elements `i mod 8`) let the loop vectorise; they are added pairwise at the end of the block.
//! The order differs from candle's serial sum, so the two agree to f64 rounding, not bit for bit.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::{view, with_float, Real};

/// Elements per partial sum: 50 blocks for a 256×3·256 weight, so a stage's threads share
/// every large gradient, while a block's eight f64 sums stay exact enough (≤ 8192 terms each).
const BLOCK: usize = 1 << 16;

/// Lanes of running sums within a block.
const LANES: usize = 8;

fn block_sum<T: Real>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            let v = v.to_f64();
            *a += v * v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        let v = v.to_f64();
        *a += v * v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

fn run<T: Real>(x: &[T]) -> f64 {
    let parts: Vec<f64> = if x.len() > BLOCK && rayon::current_num_threads() > 1 {
        x.par_chunks(BLOCK).map(block_sum).collect()
    } else {
        x.chunks(BLOCK).map(block_sum).collect()
    };
    parts.iter().sum()
}

/// `Σ t²` over every element of `t`, as an f64 scalar tensor on `t`'s device. On the CPU for
/// f32 and f64 it is the parallel, blocked kernel above; elsewhere the composition
/// `t.to_dtype(F64).sqr().sum_all()` (which stays on the device, so a GPU stage still reads one
/// number per step).
pub fn sum_squares(t: &Tensor) -> Result<Tensor> {
    if !crate::fused(t) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all();
    }
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else { candle_core::bail!("sum_squares: expected a CPU tensor") };
    let total = with_float!("sum_squares", cpu, |T| Ok(run::<T>(&view::<T>(cpu, l)?)))?;
    Tensor::new(total, t.device())
}
