//! brigade's one matrix product: every CPU GEMM the training path runs (linear layers, weight
//! gradients, attention's and flash attention's products, convolutions, plain matmuls) goes
//! through [`gemm_into`], with the number of threads it may split over passed explicitly.
//!
//! candle's CPU `matmul` (and the convolutions built on it) reads its thread count from the
//! `RAYON_NUM_THREADS` environment variable on every call: a process-wide setting that a
//! pipeline could only steer with `std::env::set_var`. Calling gemm here instead lets each
//! stage's budget travel with the call. The public entry points ([`matmul`], [`conv2d`],
//! [`crate::linear`], [`crate::matmul_accumulate`]) take the budget from
//! [`stage_threads`]: the size of the rayon pool the caller runs in, which is how a stage's
//! budget reaches its math (see the engine's `pipeline::threads`).
//!
//! Numerics: gemm splits output tiles over threads and accumulates `k` in the same blocked
//! order whatever the split, so a product's bits do not depend on the thread count. [`matmul`]
//! and [`conv2d`] make the same gemm calls (shapes, operand order, im2col layouts and tiles)
//! as candle's CPU `matmul` and `conv2d`, so they return the same bits as candle (tested).

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Products of at least this many multiply-adds are split over the caller's threads; smaller
/// ones are not worth a rayon task.
const PAR_MIN_FLOPS: usize = 1 << 15;

/// The threads a product started here may split over: the size of the rayon pool the caller
/// runs in (a stage's pool inside a pipeline; rayon's global pool elsewhere).
pub fn stage_threads() -> usize {
    rayon::current_num_threads()
}

/// A read-only strided matrix view (`rs` between rows, `cs` between columns).
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub(crate) ptr: *const T,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl<T> Mat<T> {
    /// The view starting at row `r`.
    pub(crate) unsafe fn row(self, r: usize) -> Self {
        Mat { ptr: self.ptr.offset(r as isize * self.rs), ..self }
    }
    /// The transposed view.
    pub(crate) fn t(self) -> Self {
        Mat { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
    /// The view starting at column `c`.
    pub(crate) unsafe fn col(self, c: usize) -> Self {
        Mat { ptr: self.ptr.offset(c as isize * self.cs), ..self }
    }
}

/// A writable strided matrix view.
#[derive(Clone, Copy)]
pub(crate) struct MatMut<T> {
    pub(crate) ptr: *mut T,
    pub(crate) rs: isize,
}

impl<T> MatMut<T> {
    pub(crate) unsafe fn row(self, r: usize) -> Self {
        MatMut { ptr: self.ptr.offset(r as isize * self.rs), ..self }
    }
    pub(crate) fn into_mat(self) -> Mat<T> {
        Mat { ptr: self.ptr, rs: self.rs, cs: 1 }
    }
}

/// `dst (m×n) = beta · a (m×k) · b (k×n)`, plus `dst` when `accumulate` (columns of `dst`
/// contiguous), split over at most `threads` threads of the caller's rayon pool.
///
/// # Safety
/// The views must cover `m×k`, `k×n` and `m×n` valid elements; `dst` must not alias `a`/`b`;
/// when `accumulate`, the `m×n` elements of `dst` must be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut<T>,
    a: Mat<T>,
    b: Mat<T>,
    beta: T,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 && m * n * k >= PAR_MIN_FLOPS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        1,
        dst.rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        parallelism,
    );
}

/// A fresh row-major `(m, n)` buffer holding `a · b`: every element is written by gemm.
///
/// # Safety
/// As [`gemm_into`]: `a` and `b` cover `m×k` and `k×n` valid elements.
unsafe fn product<T: WithDType>(m: usize, n: usize, k: usize, a: Mat<T>, b: Mat<T>, threads: usize) -> Vec<T> {
    if m == 0 || n == 0 {
        return Vec::new();
    }
    if k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    gemm_into(m, n, k, MatMut { ptr: out.as_mut_ptr(), rs: n as isize }, a, b, T::from_f64(1.0), false, threads);
    // SAFETY: gemm overwrote all m·n elements (it does not read `dst` when not accumulating).
    out.set_len(m * n);
    out
}

/// Whether `a` and `b` take brigade's GEMM: CPU, f32 or f64, one dtype, and outside candle's
/// autograd (a tracked operand keeps candle's differentiable `matmul` / `conv2d`).
fn ours(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && !a.track_op()
        && !b.track_op()
}

/// Runs `f` on the CPU slices behind `a` and `b` (f32 or f64, checked by the caller).
fn with_slices<R>(
    a: &Tensor,
    b: &Tensor,
    f32s: impl FnOnce(&[f32], &[f32]) -> Result<R>,
    f64s: impl FnOnce(&[f64], &[f64]) -> Result<R>,
) -> Result<R> {
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    match (&*sa, &*sb) {
        (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(y))) => f32s(x, y),
        (Storage::Cpu(CpuStorage::F64(x)), Storage::Cpu(CpuStorage::F64(y))) => f64s(x, y),
        _ => candle_core::bail!("brigade gemm: f32 or f64 CPU tensors of one dtype expected"),
    }
}

/// `a · b` like candle's `matmul` (same shapes, same bits), through brigade's GEMM on the CPU
/// for f32 and f64: `(…, M, K) · (…, K, N)` with equal leading dimensions. Transposed views
/// are read in place. Other devices and dtypes, and operands candle's autograd tracks, go to
/// candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !ours(a, b) {
        return a.matmul(b);
    }
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || ra != rb || a.dims()[..ra - 2] != b.dims()[..rb - 2] || a.dims()[ra - 1] != b.dims()[rb - 2] {
        candle_core::bail!("matmul: {:?} · {:?} does not fit", a.dims(), b.dims())
    }
    // One stride per operand between the matrices of its batch.
    let a = if batch_stride(a.layout()).is_some() { a.clone() } else { a.contiguous()? };
    let b = if batch_stride(b.layout()).is_some() { b.clone() } else { b.contiguous()? };
    let (m, k, n) = (a.dims()[ra - 2], a.dims()[ra - 1], b.dims()[rb - 1]);
    let batch: usize = a.dims()[..ra - 2].iter().product();
    let mut dims = a.dims()[..ra - 2].to_vec();
    dims.extend([m, n]);
    let (al, bl) = (a.layout().clone(), b.layout().clone());
    let threads = stage_threads();
    fn run<T: WithDType>(
        x: &[T],
        al: &Layout,
        y: &[T],
        bl: &Layout,
        (batch, m, k, n): (usize, usize, usize, usize),
        threads: usize,
    ) -> Vec<T> {
        let (sa, sb) = (batch_stride(al).unwrap_or(0), batch_stride(bl).unwrap_or(0));
        let (ra, rb) = (al.stride().len(), bl.stride().len());
        let mut out = Vec::with_capacity(batch * m * n);
        for i in 0..batch {
            // SAFETY: candle's layouts keep every (m, k) and (k, n) matrix of the batch inside
            // the storages; the product is a fresh buffer.
            let part = unsafe {
                let a = Mat {
                    ptr: x.as_ptr().add(al.start_offset() + i * sa),
                    rs: al.stride()[ra - 2] as isize,
                    cs: al.stride()[ra - 1] as isize,
                };
                let b = Mat {
                    ptr: y.as_ptr().add(bl.start_offset() + i * sb),
                    rs: bl.stride()[rb - 2] as isize,
                    cs: bl.stride()[rb - 1] as isize,
                };
                product(m, n, k, a, b, threads)
            };
            out.extend_from_slice(&part);
        }
        out
    }
    let shape = (batch, m, k, n);
    let device = a.device().clone();
    with_slices(
        &a,
        &b,
        |x, y| Tensor::from_vec(run(x, &al, y, &bl, shape, threads), dims.clone(), &device),
        |x, y| Tensor::from_vec(run(x, &al, y, &bl, shape, threads), dims.clone(), &device),
    )
}

/// The stride between consecutive matrices of a `(…, M, N)` layout's batch, when its leading
/// dimensions collapse into one (`Some(0)` for a single matrix); `None` when they do not.
fn batch_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let lead = dims.len().saturating_sub(2);
    if lead == 0 {
        return Some(0);
    }
    for i in 0..lead - 1 {
        if dims[i] > 1 && strides[i] != strides[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some(strides[lead - 1])
}

/// A 2-D convolution's geometry (candle's `ParamsConv2D`, single group).
#[derive(Clone, Copy)]
struct Conv {
    b: usize,
    c_in: usize,
    i_h: usize,
    i_w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Conv {
    fn out_h(&self) -> usize {
        (self.i_h + 2 * self.padding - self.dilation * (self.k_h - 1) - 1) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.i_w + 2 * self.padding - self.dilation * (self.k_w - 1) - 1) / self.stride + 1
    }
}

/// `x ⋆ w` like candle's `conv2d(x, w, padding, stride, dilation, groups = 1)` (same shapes,
/// same bits): `x` `(N, C_in, H, W)`, `w` `(C_out, C_in, K_h, K_w)` → `(N, C_out, H', W')`.
/// On the CPU in f32 and f64 its products go through brigade's GEMM, with candle's three
/// algorithms (a 1×1 unit-stride kernel as one product per image, other 1×1 kernels through
/// a full im2col, the rest through im2col tiles of 512 output pixels); other devices and
/// dtypes, and operands candle's autograd tracks, go to candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    if !ours(x, w) {
        return x.conv2d(w, padding, stride, dilation, 1);
    }
    let (b, c_in, i_h, i_w) = x.dims4()?;
    let (c_out, c_in_k, k_h, k_w) = w.dims4()?;
    if c_in != c_in_k {
        candle_core::bail!("conv2d: input has {c_in} channels, kernel {c_in_k}")
    }
    if stride == 0 || dilation == 0 || k_h == 0 || k_w == 0 {
        candle_core::bail!("conv2d: stride, dilation and kernel sizes must be at least 1")
    }
    if i_h + 2 * padding < dilation * (k_h - 1) + 1 || i_w + 2 * padding < dilation * (k_w - 1) + 1 {
        candle_core::bail!("conv2d: kernel {k_h}x{k_w} (dilation {dilation}) larger than the padded input {i_h}x{i_w}")
    }
    let p = Conv { b, c_in, i_h, i_w, c_out, k_h, k_w, padding, stride, dilation };
    let (xl, wl) = (x.layout().clone(), w.layout().clone());
    let threads = stage_threads();
    let dims = (b, c_out, p.out_h(), p.out_w());
    let device = x.device().clone();
    with_slices(
        x,
        w,
        |xs, ws| Tensor::from_vec(conv_cpu(&p, xs, &xl, ws, &wl, threads), dims, &device),
        |xs, ws| Tensor::from_vec(conv_cpu(&p, xs, &xl, ws, &wl, threads), dims, &device),
    )
}

fn conv_cpu<T: WithDType>(p: &Conv, x: &[T], xl: &Layout, w: &[T], wl: &Layout, threads: usize) -> Vec<T> {
    if p.k_h == 1 && p.k_w == 1 && p.stride == 1 && p.padding == 0 && p.dilation == 1 {
        conv_1x1(p, x, xl, w, wl, threads)
    } else if p.k_h == 1 && p.k_w == 1 {
        conv_im2col(p, x, xl, w, wl, threads)
    } else {
        conv_tiled(p, x, xl, w, wl, threads)
    }
}

/// The four strides of a rank-4 layout.
fn strides4(l: &Layout) -> (usize, usize, usize, usize) {
    let s = l.stride();
    (s[0], s[1], s[2], s[3])
}

/// A row-major view of a dense `(rows, cols)` buffer.
fn dense<T>(data: &[T], cols: usize) -> Mat<T> {
    Mat { ptr: data.as_ptr(), rs: cols as isize, cs: 1 }
}

/// A 1×1 kernel, unit stride, no padding: per image `(C_out, C_in) · (C_in, H·W)`.
fn conv_1x1<T: WithDType>(p: &Conv, x: &[T], xl: &Layout, w: &[T], wl: &Layout, threads: usize) -> Vec<T> {
    let x = &x[xl.start_offset()..];
    let (s0, s1, s2, s3) = strides4(xl);
    let w = &w[wl.start_offset()..];
    let (k0, k1, _, _) = strides4(wl);
    let spatial = p.i_h * p.i_w;
    let kernel: Cow<[T]> = if k0 == p.c_in && k1 == 1 {
        Cow::Borrowed(&w[..p.c_out * p.c_in])
    } else {
        Cow::Owned((0..p.c_out).flat_map(|o| (0..p.c_in).map(move |i| w[o * k0 + i * k1])).collect())
    };
    let mut out = vec![T::zero(); p.b * p.c_out * spatial];
    out.par_chunks_mut((p.c_out * spatial).max(1)).enumerate().for_each(|(bi, dst)| {
        let mut image = Vec::with_capacity(p.c_in * spatial);
        for c in 0..p.c_in {
            for h in 0..p.i_h {
                for v in 0..p.i_w {
                    image.push(x[bi * s0 + c * s1 + h * s2 + v * s3]);
                }
            }
        }
        // SAFETY: dense buffers of (c_out, c_in), (c_in, spatial) and (c_out, spatial).
        let y = unsafe { product(p.c_out, spatial, p.c_in, dense(&kernel, p.c_in), dense(&image, spatial), threads) };
        dst.copy_from_slice(&y);
    });
    out
}

/// Other 1×1 kernels: one `(N·H'·W', C_in) · (C_in, C_out)` product over a full im2col, then
/// NHWC → NCHW.
fn conv_im2col<T: WithDType>(p: &Conv, x: &[T], xl: &Layout, w: &[T], wl: &Layout, threads: usize) -> Vec<T> {
    let (oh, ow) = (p.out_h(), p.out_w());
    let x = &x[xl.start_offset()..];
    let (s0, s1, s2, s3) = strides4(xl);
    let k = p.c_in * p.k_h * p.k_w;
    // im2col rows: one per output pixel, columns (c, kh, kw); zeros where the kernel reads padding.
    let mut col = vec![T::zero(); p.b * oh * ow * k];
    for bi in 0..p.b {
        for h in 0..oh {
            for v in 0..ow {
                let row = ((bi * oh + h) * ow + v) * k;
                for c in 0..p.c_in {
                    for kh in 0..p.k_h {
                        let sh = h * p.stride + kh * p.dilation;
                        if sh < p.padding || sh >= p.i_h + p.padding {
                            continue;
                        }
                        for kw in 0..p.k_w {
                            let sw = v * p.stride + kw * p.dilation;
                            if sw < p.padding || sw >= p.i_w + p.padding {
                                continue;
                            }
                            col[row + (c * p.k_h + kh) * p.k_w + kw] =
                                x[bi * s0 + c * s1 + (sh - p.padding) * s2 + (sw - p.padding) * s3];
                        }
                    }
                }
            }
        }
    }
    let kernel: Cow<[T]> = if wl.is_contiguous() {
        Cow::Borrowed(&w[wl.start_offset()..wl.start_offset() + p.c_out * k])
    } else {
        Cow::Owned(strided_copy(w, wl))
    };
    // The kernel `(C_out, k)` read transposed as `(k, C_out)`.
    let wt = Mat { ptr: kernel.as_ptr(), rs: 1, cs: k as isize };
    // SAFETY: `col` is dense (N·H'·W', k); `kernel` holds C_out·k elements.
    let nhwc = unsafe { product(p.b * oh * ow, p.c_out, k, dense(&col, k), wt, threads) };
    let mut out = vec![T::zero(); nhwc.len()];
    for bi in 0..p.b {
        for pixel in 0..oh * ow {
            for c in 0..p.c_out {
                out[(bi * p.c_out + c) * oh * ow + pixel] = nhwc[(bi * oh * ow + pixel) * p.c_out + c];
            }
        }
    }
    out
}

/// A layout's elements in row-major order.
fn strided_copy<T: WithDType>(data: &[T], l: &Layout) -> Vec<T> {
    let dims = l.dims();
    let strides = l.stride();
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let offset: usize = l.start_offset() + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[offset]);
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// Output pixels per im2col tile (candle's `TILE_SIZE`).
const CONV_TILE: usize = 512;

/// The general case: per image and tile of output pixels, `(C_out, k) · (k, tile)` over an
/// im2col tile with rows `(kh, kw, c)` read from an NHWC copy of the input.
fn conv_tiled<T: WithDType>(p: &Conv, x: &[T], xl: &Layout, w: &[T], wl: &Layout, threads: usize) -> Vec<T> {
    let (oh, ow) = (p.out_h(), p.out_w());
    let x = &x[xl.start_offset()..];
    let (s0, s1, s2, s3) = strides4(xl);
    let w = &w[wl.start_offset()..];
    let (k0, k1, k2, k3) = strides4(wl);
    let (n0, n1, n2) = (p.i_h * p.i_w * p.c_in, p.i_w * p.c_in, p.c_in);
    let mut nhwc = vec![T::zero(); p.b * p.c_in * p.i_h * p.i_w];
    for bi in 0..p.b {
        for h in 0..p.i_h {
            for v in 0..p.i_w {
                for c in 0..p.c_in {
                    nhwc[bi * n0 + h * n1 + v * n2 + c] = x[bi * s0 + c * s1 + h * s2 + v * s3];
                }
            }
        }
    }
    let k = p.c_in * p.k_h * p.k_w;
    let mut kernel = Vec::with_capacity(p.c_out * k);
    for o in 0..p.c_out {
        for kh in 0..p.k_h {
            for kw in 0..p.k_w {
                for c in 0..p.c_in {
                    kernel.push(w[o * k0 + c * k1 + kh * k2 + kw * k3]);
                }
            }
        }
    }
    let pixels = oh * ow;
    let plane = p.c_out * pixels;
    let mut out = vec![T::zero(); p.b * plane];
    let tiles = pixels.div_ceil(CONV_TILE);
    let dst = crate::attention::Shared(out.as_mut_ptr());
    (0..p.b * tiles).into_par_iter().for_each(|job| {
        let (bi, tile) = (job / tiles, job % tiles);
        let start = tile * CONV_TILE;
        let size = (start + CONV_TILE).min(pixels) - start;
        let mut col = vec![T::zero(); k * size];
        for (j, pixel) in (start..start + size).enumerate() {
            let (y, xo) = (pixel / ow, pixel % ow);
            for c in 0..p.c_in {
                let mut row = c;
                for kh in 0..p.k_h {
                    let sy = (y * p.stride + kh * p.dilation) as isize - p.padding as isize;
                    if sy < 0 || sy >= p.i_h as isize {
                        row += p.c_in * p.k_w;
                        continue;
                    }
                    for kw in 0..p.k_w {
                        let sx = (xo * p.stride + kw * p.dilation) as isize - p.padding as isize;
                        if sx >= 0 && sx < p.i_w as isize {
                            col[row * size + j] = nhwc[bi * n0 + sy as usize * n1 + sx as usize * n2 + c];
                        }
                        row += p.c_in;
                    }
                }
            }
        }
        // SAFETY: dense (c_out, k) and (k, size) buffers.
        let y = unsafe { product(p.c_out, size, k, dense(&kernel, k), dense(&col, size), threads) };
        // Rebinding captures the whole `Shared` (Send) rather than its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        for (j, pixel) in (start..start + size).enumerate() {
            for o in 0..p.c_out {
                // SAFETY: each (image, tile) job writes its own output pixels only.
                unsafe { *dst.0.add(bi * plane + o * pixels + pixel) = y[o * size + j] };
            }
        }
    });
    out
}
