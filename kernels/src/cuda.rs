//! Launches brigade's CUDA kernels (`kernels/cuda/brigade.cu`) from the custom ops'
//! `cuda_fwd`: one function per op, for f32 and bf16 storage (f32 accumulation inside).
//!
//! `build.rs` compiles the `.cu` file with the pinned nvcc into PTX for the target compute
//! capability (`CUDA_COMPUTE_CAP`, default 90) and into a cubin whose `ptxas` report it checks
//! for register spills. The PTX is embedded and loaded once per device through candle's module
//! cache (`get_or_load_custom_func`), on the device's own stream, so a stage's kernels queue
//! behind its other work with no host synchronisation.
//!
//! Every kernel here takes dense row-major inputs: the public wrappers make CUDA tensors
//! contiguous before the op runs, and these functions refuse anything else.
//!
//! Nothing in this module has run on a GPU yet (the sessions that wrote it had none); the
//! same algorithms run on the CPU as the ops' `cpu_fwd` and are tested there.
//! Every kernel's own source (f32 instantiation) also runs on the host under
//! `cuda/emulate/run.sh` (one OS thread per CUDA thread, barriers for `__syncthreads` and the
//! warp shuffles) against a direct f64 computation: their indexing, masking and tiling are
//! checked that way, their speed and the GPU's libm are not.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

/// The compiled module (PTX text).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/brigade.ptx"));

/// The ops launched from Rust; each exists as `<op>_f32` and `<op>_bf16` in [`PTX`].
pub const OPS: &[&str] = &[
    "gelu_tanh_fwd",
    "gelu_tanh_bwd",
    "layer_norm_fwd",
    "layer_norm_bwd_dx",
    "layer_norm_bwd_partial",
    "layer_norm_bwd_reduce",
    "softmax_fwd",
    "softmax_bwd",
    "causal_softmax_fwd",
    "causal_softmax_bwd",
    "cross_entropy_rows",
    "sum_to_scalar",
    "cross_entropy_bwd",
    "flash_attention_fwd",
    "flash_attention_bwd_delta",
    "flash_attention_bwd_dkdv",
    "flash_attention_bwd_dq",
    "adamw_step",
    "rms_norm_fwd",
    "rms_norm_bwd_dx",
    "rms_norm_bwd_partial",
    "rms_norm_bwd_reduce",
    "rope",
    "swiglu_fwd",
    "swiglu_bwd",
];

/// Warps (rows) per block of the one-warp-per-row kernels; matches `WARPS` in the `.cu` file.
const WARPS: u32 = 8;

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        dt => bail!("brigade's CUDA kernels take f32 or bf16, got {dt:?}"),
    }
}

/// The kernel `<op>_<dtype>` and the device's stream to launch it on.
fn function(dev: &CudaDevice, op: &str, dtype: DType) -> Result<(Arc<CudaStream>, CudaFunction)> {
    debug_assert!(OPS.contains(&op), "{op} missing from OPS");
    let f = dev.get_or_load_custom_func(&format!("{op}_{}", suffix(dtype)?), "brigade", PTX)?;
    Ok((dev.cuda_stream(), f.into_cuda_function()))
}

/// One warp per row.
fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARPS).max(1), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("CUDA kernel argument {what} = {v} does not fit in i32")))
}

/// A dense view of `s` through `l`, refusing strided layouts.
fn dense<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{op}: the CUDA kernel needs a contiguous input, got strides {:?}", l.stride()),
    }
}

fn alloc<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller's kernel writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or bf16).
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            dt => bail!("brigade's CUDA kernels take f32 or bf16, got {dt:?}"),
        }
    };
}

pub(crate) fn gelu_tanh_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let n = l.shape().elem_count();
    with_dtype!(s.dtype(), |T| {
        let x = dense::<T>(s, l, "gelu-tanh")?;
        let y = alloc::<T>(dev, n)?;
        let (stream, f) = function(dev, "gelu_tanh_fwd", s.dtype())?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&y).arg(&n);
        // SAFETY: x and y hold n elements; the kernel reads x[0..n) and writes y[0..n).
        unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    })
}

pub(crate) fn gelu_tanh_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let n = xl.shape().elem_count();
    with_dtype!(xs.dtype(), |T| {
        let x = dense::<T>(xs, xl, "gelu-tanh-bwd")?;
        let dy = dense::<T>(gs, gl, "gelu-tanh-bwd")?;
        let dx = alloc::<T>(dev, n)?;
        let (stream, f) = function(dev, "gelu_tanh_bwd", xs.dtype())?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&dy).arg(&dx).arg(&n);
        // SAFETY: all three hold n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), xl.shape().clone()))
    })
}

/// `(rows, c)` of a `(..., C)` tensor.
fn rows_of(l: &Layout) -> (usize, usize) {
    let c = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count().checked_div(c).unwrap_or(0), c)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let (rows, c) = rows_of(xl);
    with_dtype!(xs.dtype(), |T| {
        let (x, w, bias) =
            (dense::<T>(xs, xl, "layer-norm")?, dense::<T>(ws, wl, "layer-norm")?, dense::<T>(bs, bl, "layer-norm")?);
        let y = alloc::<T>(dev, rows * c)?;
        let (stream, f) = function(dev, "layer_norm_fwd", xs.dtype())?;
        let (r, cc, e) = (int(rows, "rows")?, int(c, "C")?, eps as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&bias).arg(&y).arg(&r).arg(&cc).arg(&e);
        // SAFETY: x, y are rows·C; w, b are C.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    })
}

/// Rows per chunk of the weight-gradient partial sums: enough chunks to fill the GPU, few
/// enough that the final reduction stays short.
const LN_ROWS_PER_CHUNK: usize = 64;

/// `[dx | dw | db]` packed, as the CPU op.
pub(crate) fn layer_norm_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let (rows, c) = rows_of(xl);
    let n = rows * c;
    with_dtype!(xs.dtype(), |T| {
        let (x, w, dy) = (
            dense::<T>(xs, xl, "layer-norm-bwd")?,
            dense::<T>(ws, wl, "layer-norm-bwd")?,
            dense::<T>(gs, gl, "layer-norm-bwd")?,
        );
        let mut out = alloc::<T>(dev, n + 2 * c)?;
        let stats = alloc::<f32>(dev, 2 * rows)?;
        let chunks = rows.div_ceil(LN_ROWS_PER_CHUNK).max(1);
        let partials = alloc::<f32>(dev, chunks * 2 * c)?;
        let (r, cc, e, per) = (int(rows, "rows")?, int(c, "C")?, eps as f32, int(LN_ROWS_PER_CHUNK, "rows per chunk")?);
        {
            let mut dx = out.slice_mut(0..n.max(1));
            let (stream, f) = function(dev, "layer_norm_bwd_dx", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&w).arg(&dy).arg(&mut dx).arg(&stats).arg(&r).arg(&cc).arg(&e);
            // SAFETY: x, dy, dx are rows·C, w is C, stats is 2·rows.
            unsafe { b.launch(rows_config(rows)) }.w()?;
        }
        {
            let (stream, f) = function(dev, "layer_norm_bwd_partial", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&dy).arg(&stats).arg(&partials).arg(&r).arg(&cc).arg(&per);
            let cfg = LaunchConfig {
                grid_dim: ((c as u32).div_ceil(256).max(1), chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: partials is chunks·2C; each (column, chunk) thread writes its two cells.
            unsafe { b.launch(cfg) }.w()?;
        }
        {
            let mut dwb = out.slice_mut(n..n + 2 * c);
            let k = int(chunks, "chunks")?;
            let (stream, f) = function(dev, "layer_norm_bwd_reduce", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&partials).arg(&mut dwb).arg(&cc).arg(&k);
            // SAFETY: dwb is the last 2C elements of out.
            unsafe { b.launch(LaunchConfig::for_num_elems((2 * c).max(1) as u32)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n + 2 * c)))
    })
}

pub(crate) fn softmax_fwd(s: &CudaStorage, l: &Layout, log: bool) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (rows, c) = rows_of(l);
    with_dtype!(s.dtype(), |T| {
        let x = dense::<T>(s, l, "softmax")?;
        let y = alloc::<T>(dev, rows * c)?;
        let (stream, f) = function(dev, "softmax_fwd", s.dtype())?;
        let (r, cc, lg) = (int(rows, "rows")?, int(c, "C")?, i32::from(log));
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&y).arg(&r).arg(&cc).arg(&lg);
        // SAFETY: x and y are rows·C.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    })
}

pub(crate) fn softmax_bwd(
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    log: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = ys.device();
    let (rows, c) = rows_of(yl);
    with_dtype!(ys.dtype(), |T| {
        let (y, dy) = (dense::<T>(ys, yl, "softmax-bwd")?, dense::<T>(gs, gl, "softmax-bwd")?);
        let dx = alloc::<T>(dev, rows * c)?;
        let (stream, f) = function(dev, "softmax_bwd", ys.dtype())?;
        let (r, cc, lg) = (int(rows, "rows")?, int(c, "C")?, i32::from(log));
        let mut b = stream.launch_builder(&f);
        b.arg(&y).arg(&dy).arg(&dx).arg(&r).arg(&cc).arg(&lg);
        // SAFETY: all three are rows·C.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), yl.shape().clone()))
    })
}

pub(crate) fn causal_softmax_fwd(s: &CudaStorage, l: &Layout, scale: f64) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (rows, t) = rows_of(l);
    with_dtype!(s.dtype(), |T| {
        let x = dense::<T>(s, l, "causal-softmax")?;
        let y = alloc::<T>(dev, rows * t)?;
        let (stream, f) = function(dev, "causal_softmax_fwd", s.dtype())?;
        let (r, tt, sc) = (int(rows, "rows")?, int(t, "T")?, scale as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&y).arg(&r).arg(&tt).arg(&sc);
        // SAFETY: x and y are rows·T.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    })
}

pub(crate) fn causal_softmax_bwd(
    ps: &CudaStorage,
    pl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = ps.device();
    let (rows, t) = rows_of(pl);
    with_dtype!(ps.dtype(), |T| {
        let (p, dp) = (dense::<T>(ps, pl, "causal-softmax-bwd")?, dense::<T>(gs, gl, "causal-softmax-bwd")?);
        let ds = alloc::<T>(dev, rows * t)?;
        let (stream, f) = function(dev, "causal_softmax_bwd", ps.dtype())?;
        let (r, tt, sc) = (int(rows, "rows")?, int(t, "T")?, scale as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&dp).arg(&ds).arg(&r).arg(&tt).arg(&sc);
        // SAFETY: all three are rows·T.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(ds, dev.clone()), pl.shape().clone()))
    })
}

/// The summed loss as an f32 device scalar (for bf16 logits too): per-row losses, then one
/// fixed-order block reduction.
pub(crate) fn cross_entropy_sum(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = ls.device();
    let (rows, v) = rows_of(ll);
    with_dtype!(ls.dtype(), |T| {
        let logits = dense::<T>(ls, ll, "cross-entropy-sum")?;
        let targets = dense::<u32>(ts, tl, "cross-entropy-sum")?;
        let row_loss = alloc::<f32>(dev, rows)?;
        let (r, vv) = (int(rows, "rows")?, int(v, "V")?);
        {
            let (stream, f) = function(dev, "cross_entropy_rows", ls.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&logits).arg(&targets).arg(&row_loss).arg(&r).arg(&vv);
            // SAFETY: logits rows·V, targets and row_loss rows.
            unsafe { b.launch(rows_config(rows)) }.w()?;
        }
        let out = alloc::<f32>(dev, 1)?;
        {
            let (stream, f) = function(dev, "sum_to_scalar", ls.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&row_loss).arg(&out).arg(&r);
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: one block reads rows floats and writes out[0].
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(())))
    })
}

pub(crate) fn cross_entropy_sum_bwd(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = ls.device();
    let (rows, v) = rows_of(ll);
    with_dtype!(ls.dtype(), |T| {
        let logits = dense::<T>(ls, ll, "cross-entropy-sum-bwd")?;
        let targets = dense::<u32>(ts, tl, "cross-entropy-sum-bwd")?;
        let g = dense::<f32>(gs, gl, "cross-entropy-sum-bwd (its scalar gradient is f32)")?;
        let d = alloc::<T>(dev, rows * v)?;
        let (stream, f) = function(dev, "cross_entropy_bwd", ls.dtype())?;
        let (r, vv) = (int(rows, "rows")?, int(v, "V")?);
        let mut b = stream.launch_builder(&f);
        b.arg(&logits).arg(&targets).arg(&g).arg(&d).arg(&r).arg(&vv);
        // SAFETY: logits and d are rows·V, targets rows, g one element.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(d, dev.clone()), ll.shape().clone()))
    })
}

// ---- flash attention ---------------------------------------------------------------------------
//
// Not a `CustomOp`: the forward has two outputs of different dtypes (the output in the input's
// dtype, the log-sum-exp in f32) and a custom op returns one storage, so these functions read
// the tensors' storages and wrap the results with `Tensor::from_storage` themselves (no
// autograd: the pipeline calls the backward explicitly, like the other attention paths). The
// launches still go on the device's own stream through the same module cache.

/// Head widths the flash kernels take (`FA_DMAX` in the `.cu` file).
pub const FLASH_MAX_HEAD_DIM: usize = 64;
/// Query rows per forward block and rows/keys per backward tile (`FA_BQ`, `FA_BR`/`FA_BK`).
const FLASH_BQ: usize = 64;
const FLASH_BT: usize = 32;

/// The CUDA storage of a contiguous tensor and its layout.
fn cuda_storage<'a>(t: &'a Tensor, op: &str) -> Result<(impl std::ops::Deref<Target = Storage> + 'a, Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        bail!("{op}: expected a CUDA tensor, got one on {:?}", t.device().location())
    }
    Ok((s, l.clone()))
}

fn as_cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("flash_attention: expected CUDA storage"),
    }
}

fn wrap<T: CudaDType + DeviceRepr>(dev: &CudaDevice, slice: CudaSlice<T>, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The geometry as kernel arguments: `(B·H, T, C, H, d)`, checking the kernels' limits.
fn flash_geometry(qkv: &Tensor, n_head: usize) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let d = c / n_head;
    if d > FLASH_MAX_HEAD_DIM {
        bail!("flash_attention: the CUDA kernels take head widths up to {FLASH_MAX_HEAD_DIM}, got {d}")
    }
    if b * n_head > 65_535 {
        bail!("flash_attention: B·H = {} exceeds the grid's y limit 65535", b * n_head)
    }
    Ok((b * n_head, t, c, n_head, d))
}

/// Forward: `(merged (B, T, C) in qkv's dtype, lse (B, H, T) f32)`. `qkv` is contiguous.
pub(crate) fn flash_attention(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
    let (bh, t, c, h, d) = flash_geometry(qkv, n_head)?;
    let b = bh / h;
    let (guard, l) = cuda_storage(qkv, "flash_attention")?;
    let s = as_cuda(&guard)?;
    let dev = s.device();
    with_dtype!(s.dtype(), |T| {
        let x = dense::<T>(s, &l, "flash-attention")?;
        let out = alloc::<T>(dev, b * t * c)?;
        let lse = alloc::<f32>(dev, bh * t)?;
        let (stream, f) = function(dev, "flash_attention_fwd", s.dtype())?;
        let (tt, cc, hh, dd, scale) =
            (int(t, "T")?, int(c, "C")?, int(h, "H")?, int(d, "d")?, 1.0f32 / (d as f32).sqrt());
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x).arg(&out).arg(&lse).arg(&tt).arg(&cc).arg(&hh).arg(&dd).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(FLASH_BQ).max(1) as u32, bh as u32, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x is B·T·3C, out B·T·C, lse B·H·T; each block writes its own rows of its head.
        unsafe { lb.launch(cfg) }.w()?;
        Ok((wrap(dev, out, (b, t, c)), wrap(dev, lse, (b, h, t))))
    })
}

/// Backward: `dqkv (B, T, 3C)`; all inputs contiguous, `lse` f32.
pub(crate) fn flash_attention_backward(
    qkv: &Tensor,
    merged: &Tensor,
    lse: &Tensor,
    dmerged: &Tensor,
    n_head: usize,
) -> Result<Tensor> {
    let (bh, t, c, h, d) = flash_geometry(qkv, n_head)?;
    let b = bh / h;
    let (gq, lq) = cuda_storage(qkv, "flash_attention_backward")?;
    let (go, lo) = cuda_storage(merged, "flash_attention_backward")?;
    let (gl, ll) = cuda_storage(lse, "flash_attention_backward")?;
    let (gd, ld) = cuda_storage(dmerged, "flash_attention_backward")?;
    let s = as_cuda(&gq)?;
    let dev = s.device();
    let dtype = s.dtype();
    with_dtype!(dtype, |T| {
        let x = dense::<T>(s, &lq, "flash-attention-bwd")?;
        let o = dense::<T>(as_cuda(&go)?, &lo, "flash-attention-bwd")?;
        let lse = dense::<f32>(as_cuda(&gl)?, &ll, "flash-attention-bwd")?;
        let dy = dense::<T>(as_cuda(&gd)?, &ld, "flash-attention-bwd")?;
        let delta = alloc::<f32>(dev, bh * t)?;
        let dqkv = alloc::<T>(dev, b * t * 3 * c)?;
        let (rows, tt, cc, hh, dd, scale) =
            (int(bh * t, "B·H·T")?, int(t, "T")?, int(c, "C")?, int(h, "H")?, int(d, "d")?, 1.0f32 / (d as f32).sqrt());
        {
            let (stream, f) = function(dev, "flash_attention_bwd_delta", dtype)?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&o).arg(&dy).arg(&delta).arg(&rows).arg(&tt).arg(&cc).arg(&hh).arg(&dd);
            // SAFETY: o and dy are B·T·C, delta B·H·T (one warp per element).
            unsafe { lb.launch(rows_config(bh * t)) }.w()?;
        }
        let tiles = LaunchConfig {
            grid_dim: (t.div_ceil(FLASH_BT).max(1) as u32, bh as u32, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        for kernel in ["flash_attention_bwd_dkdv", "flash_attention_bwd_dq"] {
            let (stream, f) = function(dev, kernel, dtype)?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&x).arg(&dy).arg(&lse).arg(&delta).arg(&dqkv).arg(&tt).arg(&cc).arg(&hh).arg(&dd).arg(&scale);
            // SAFETY: x and dqkv are B·T·3C, dy B·T·C, lse and delta B·H·T; dkdv writes the k and
            // v thirds (each block its own keys), dq the q third (each block its own rows).
            unsafe { lb.launch(tiles) }.w()?;
        }
        Ok(wrap(dev, dqkv, (b, t, 3 * c)))
    })
}

// ---- multi-tensor AdamW ------------------------------------------------------------------------

/// Elements per block of `adamw_step` (`ADAMW_CHUNK` in the `.cu` file).
const ADAMW_CHUNK: usize = 65_536;

/// The device address of a contiguous tensor's first element (`elem` bytes per element).
fn address<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout, stream: &CudaStream) -> Result<u64> {
    let Some((start, _)) = l.contiguous_offsets() else { bail!("adamw: the CUDA kernel needs contiguous tensors") };
    let (ptr, _sync) = s.as_cuda_slice::<T>()?.device_ptr(stream);
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

/// One `adamw_step` launch over every slot (checked by the caller: same device, f32 state,
/// one gradient dtype, contiguous, distinct tensors).
///
/// The kernel writes `param`, `exp_avg`, `exp_avg_sq` (and the bf16 copies) through addresses
/// taken from shared borrows of their storages: candle lends only one storage mutably per op,
/// and a multi-tensor launch needs them all. The storages stay borrowed (their guards held)
/// until the launch is queued on the device's stream, which orders it after every earlier
/// write to them and before every later read.
pub(crate) fn adamw_step_many<'a>(slots: &[crate::adamw::AdamWSlot<'a>], s: &crate::adamw::AdamWScalars) -> Result<()> {
    let Some(first) = slots.first() else { return Ok(()) };
    let grad_dtype = first.grad.dtype();
    let dev = match first.param.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        d => bail!("adamw: expected a CUDA device, got {:?}", d.location()),
    };
    let stream = dev.cuda_stream();
    let mut table: Vec<u64> = Vec::with_capacity(7 * slots.len());
    let mut chunks: Vec<u64> = Vec::new();
    let mut guards = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let n = slot.param.elem_count();
        let mut addr = |t: &'a Tensor, dtype: DType| -> Result<u64> {
            let (g, l) = cuda_storage(t, "adamw")?;
            let a = match dtype {
                DType::BF16 => address::<bf16>(as_cuda(&g)?, &l, &stream)?,
                _ => address::<f32>(as_cuda(&g)?, &l, &stream)?,
            };
            guards.push(g);
            Ok(a)
        };
        table.push(addr(slot.param, DType::F32)?);
        table.push(addr(slot.exp_avg, DType::F32)?);
        table.push(addr(slot.exp_avg_sq, DType::F32)?);
        table.push(addr(slot.grad, grad_dtype)?);
        table.push(match slot.param_bf16 {
            Some(t) => addr(t, DType::BF16)?,
            None => 0,
        });
        table.push(n as u64);
        table.push(u64::from(slot.decay));
        for start in (0..n).step_by(ADAMW_CHUNK) {
            chunks.extend([i as u64, start as u64]);
        }
    }
    if chunks.is_empty() {
        return Ok(());
    }
    let n_chunks = int(chunks.len() / 2, "chunks")?;
    let table = stream.clone_htod(&table).w()?;
    let chunk_table = stream.clone_htod(&chunks).w()?;
    let f = dev
        .get_or_load_custom_func(&format!("adamw_step_{}", suffix(grad_dtype)?), "brigade", PTX)?
        .into_cuda_function();
    let mut b = stream.launch_builder(&f);
    b.arg(&table).arg(&chunk_table).arg(&n_chunks);
    for x in [
        &s.beta1,
        &s.one_minus_beta1,
        &s.beta2,
        &s.one_minus_beta2,
        &s.inv_sqrt_bias_correction2,
        &s.eps,
        &s.step_size,
        &s.decay_factor,
        &s.grad_scale,
    ] {
        b.arg(x);
    }
    let cfg = LaunchConfig { grid_dim: (n_chunks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: every table entry addresses a live, contiguous tensor of `n` elements of the
    // stated dtype (the caller checked shapes and dtypes; the guards keep the storages alive);
    // each block touches elements [start, start + CHUNK) of one tensor, disjoint from every
    // other block's, and no two slots share a tensor.
    unsafe { b.launch(cfg) }.w()?;
    drop(guards);
    Ok(())
}

// ---- Llama: RMSNorm, RoPE, SwiGLU -------------------------------------------------------------

pub(crate) fn rms_norm_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let (rows, c) = rows_of(xl);
    with_dtype!(xs.dtype(), |T| {
        let (x, w) = (dense::<T>(xs, xl, "rms-norm")?, dense::<T>(ws, wl, "rms-norm")?);
        let y = alloc::<T>(dev, rows * c)?;
        let (stream, f) = function(dev, "rms_norm_fwd", xs.dtype())?;
        let (r, cc, e) = (int(rows, "rows")?, int(c, "C")?, eps as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&y).arg(&r).arg(&cc).arg(&e);
        // SAFETY: x, y are rows·C; w is C.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    })
}

/// `[dx | dweight]` packed, as the CPU op: `dx` one warp per row (saving each row's 1/rms),
/// then `dweight` as fixed row chunks' partial sums added in chunk order.
pub(crate) fn rms_norm_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let (rows, c) = rows_of(xl);
    let n = rows * c;
    with_dtype!(xs.dtype(), |T| {
        let (x, w, dy) = (
            dense::<T>(xs, xl, "rms-norm-bwd")?,
            dense::<T>(ws, wl, "rms-norm-bwd")?,
            dense::<T>(gs, gl, "rms-norm-bwd")?,
        );
        let mut out = alloc::<T>(dev, n + c)?;
        let inv_rms = alloc::<f32>(dev, rows)?;
        let chunks = rows.div_ceil(LN_ROWS_PER_CHUNK).max(1);
        let partials = alloc::<f32>(dev, chunks * c)?;
        let (r, cc, e, per) = (int(rows, "rows")?, int(c, "C")?, eps as f32, int(LN_ROWS_PER_CHUNK, "rows per chunk")?);
        {
            let mut dx = out.slice_mut(0..n.max(1));
            let (stream, f) = function(dev, "rms_norm_bwd_dx", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&w).arg(&dy).arg(&mut dx).arg(&inv_rms).arg(&r).arg(&cc).arg(&e);
            // SAFETY: x, dy, dx are rows·C, w is C, inv_rms is rows.
            unsafe { b.launch(rows_config(rows)) }.w()?;
        }
        {
            let (stream, f) = function(dev, "rms_norm_bwd_partial", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&dy).arg(&inv_rms).arg(&partials).arg(&r).arg(&cc).arg(&per);
            let cfg = LaunchConfig {
                grid_dim: ((c as u32).div_ceil(256).max(1), chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: partials is chunks·C; each (column, chunk) thread writes its one cell.
            unsafe { b.launch(cfg) }.w()?;
        }
        {
            let mut dw = out.slice_mut(n..n + c);
            let k = int(chunks, "chunks")?;
            let (stream, f) = function(dev, "rms_norm_bwd_reduce", xs.dtype())?;
            let mut b = stream.launch_builder(&f);
            b.arg(&partials).arg(&mut dw).arg(&cc).arg(&k);
            // SAFETY: dw is the last C elements of out.
            unsafe { b.launch(LaunchConfig::for_num_elems(c.max(1) as u32)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n + c)))
    })
}

/// RoPE over `x` `(B, T, H, D)` with `(T, D)` tables; `transpose`: the backward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    xs: &CudaStorage,
    xl: &Layout,
    cs: &CudaStorage,
    cl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
    transpose: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let (t, h, d) = match xl.dims() {
        &[_, t, h, d] => (t, h, d),
        dims => bail!("rope: x must be (B, T, H, D), got {dims:?}"),
    };
    let n = xl.shape().elem_count();
    with_dtype!(xs.dtype(), |T| {
        let (x, cos, sin) = (dense::<T>(xs, xl, "rope")?, dense::<T>(cs, cl, "rope")?, dense::<T>(ss, sl, "rope")?);
        let y = alloc::<T>(dev, n)?;
        let (stream, f) = function(dev, "rope", xs.dtype())?;
        let (tt, hh, dd, tr) = (int(t, "T")?, int(h, "H")?, int(d, "D")?, i32::from(transpose));
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&cos).arg(&sin).arg(&y).arg(&n).arg(&tt).arg(&hh).arg(&dd).arg(&tr);
        // SAFETY: x and y hold n = B·T·H·D elements, the tables T·D (checked by the wrapper).
        unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    })
}

pub(crate) fn swiglu_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (rows, w) = rows_of(l);
    let f = w / 2;
    let n = rows * f;
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = f;
    }
    with_dtype!(s.dtype(), |T| {
        let gu = dense::<T>(s, l, "swiglu")?;
        let a = alloc::<T>(dev, n)?;
        let (stream, func) = function(dev, "swiglu_fwd", s.dtype())?;
        let ff = int(f, "F")?;
        let mut b = stream.launch_builder(&func);
        b.arg(&gu).arg(&a).arg(&n).arg(&ff);
        // SAFETY: gu holds rows·2F elements, a rows·F.
        unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(a, dev.clone()), Shape::from(dims)))
    })
}

pub(crate) fn swiglu_bwd(s: &CudaStorage, l: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (rows, w) = rows_of(l);
    let f = w / 2;
    let n = rows * f;
    with_dtype!(s.dtype(), |T| {
        let (gu, da) = (dense::<T>(s, l, "swiglu-bwd")?, dense::<T>(gs, gl, "swiglu-bwd")?);
        let dgu = alloc::<T>(dev, 2 * n)?;
        let (stream, func) = function(dev, "swiglu_bwd", s.dtype())?;
        let ff = int(f, "F")?;
        let mut b = stream.launch_builder(&func);
        b.arg(&gu).arg(&da).arg(&dgu).arg(&n).arg(&ff);
        // SAFETY: gu and dgu hold rows·2F elements, da rows·F.
        unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dgu, dev.clone()), l.shape().clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel launched from Rust is in the compiled module, for both dtypes, and the
    /// module holds nothing Rust does not launch. Runs without a GPU.
    #[test]
    fn every_launched_kernel_is_in_the_module() {
        let entries: Vec<&str> = PTX
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or("").trim())
            .collect();
        let mut wanted: Vec<String> = OPS.iter().flat_map(|op| [format!("{op}_f32"), format!("{op}_bf16")]).collect();
        for w in &wanted {
            assert!(entries.contains(&w.as_str()), "kernel {w} is launched from Rust but missing from the PTX");
        }
        let mut got: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        got.sort();
        wanted.sort();
        assert_eq!(got, wanted, "the module and the launched list differ");
    }
}
