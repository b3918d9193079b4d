//! A matrix's transpose in dense row-major storage: what a layer keeps when a product reads
//! its weight transposed on every micro-batch.
//!
//! gemm reads a transposed view in place, but it then packs the operand by gathering one
//! element per cache line for every micro-batch's product; a dense copy made once per
//! optimizer step is packed from contiguous rows instead. candle's `t().contiguous()` walks
//! the source one column at a time, with a cache miss per element once the matrix outgrows
//! L1. Here the matrix goes through square [`TILE`]×[`TILE`] tiles: each tile's rows are read
//! contiguously into a stack buffer and its columns written out contiguously, so both sides
//! touch whole cache lines.

use std::mem::MaybeUninit;

use candle_core::{bail, Result, Storage, Tensor};

use crate::cpu::{view, with_float};

/// Tile side: a 16×16 tile of f32 is one 64-byte cache line per row, and the tile (1 KiB,
/// 2 KiB in f64) stays in L1 between its read and its write.
const TILE: usize = 16;

/// `srcᵀ` `(cols, rows)` for a dense row-major `src` `(rows, cols)`, in a fresh buffer written
/// once (no zero-fill first).
fn transposed<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(rows * cols);
    let dst = &mut out.spare_capacity_mut()[..rows * cols];
    let mut tile = [[MaybeUninit::new(T::default()); TILE]; TILE];
    for r0 in (0..rows).step_by(TILE) {
        let nr = (rows - r0).min(TILE);
        for c0 in (0..cols).step_by(TILE) {
            let nc = (cols - c0).min(TILE);
            for i in 0..nr {
                let row = &src[(r0 + i) * cols + c0..][..nc];
                for (j, &v) in row.iter().enumerate() {
                    tile[j][i] = MaybeUninit::new(v);
                }
            }
            for (j, column) in tile.iter().enumerate().take(nc) {
                dst[(c0 + j) * rows + r0..][..nr].copy_from_slice(&column[..nr]);
            }
        }
    }
    // SAFETY: the tiles cover every (row, column) pair once, so all rows·cols elements of the
    // output were written above.
    unsafe { out.set_len(rows * cols) };
    out
}

/// `x` `(R, C)` transposed into a fresh, dense `(C, R)` tensor: the same values as
/// `x.t()?.contiguous()`. f32 and f64 on the CPU take the tiled copy above (any input layout);
/// other dtypes and devices take candle's copy.
pub fn transpose_2d(x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = match x.dims() {
        &[r, c] => (r, c),
        d => bail!("transpose_2d: expected a matrix (R, C), got shape {d:?}"),
    };
    if !crate::fused(x) {
        return x.t()?.contiguous();
    }
    let (s, l) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*s else { bail!("transpose_2d: expected a CPU tensor") };
    with_float!("transpose_2d", cpu, |T| {
        let src = view::<T>(cpu, l)?;
        Tensor::from_vec(transposed(&src, rows, cols), (cols, rows), x.device())
    })
}
