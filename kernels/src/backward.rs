//! The backward passes of brigade's ops as plain functions: vector-Jacobian products that a
//! layer calls itself, with no autograd graph anywhere.
//!
//! brigade's layers own their backward (forward keeps what the backward needs; the input
//! gradient and the weight gradient are separate steps), so they need each op's VJP as a
//! function, not only as the `bwd` hook candle's autograd calls. On the CPU for f32/f64 these
//! are the same fused backward kernels the autograd hooks use; elsewhere (other dtypes,
//! devices) the VJP is taken by candle's autograd over the [`crate::reference`] composition,
//! so every op has a backward on every device.
//!
//! [`accumulate`] adds a gradient into an accumulator in place: a stage sums each weight's
//! gradient over its micro-batches without a fresh tensor per addition.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};

use crate::gemm::{gemm_into, stage_threads, Mat, MatMut};

use crate::{
    check_cross_entropy_args, check_layer_norm_args, check_max_pool_args, dense_on_gpu, fused, is_half, kernel_device,
};

/// The VJP of `f` at `inputs` for the output gradient `dy`, by candle's autograd: the fallback
/// for dtypes and devices the fused backward kernels do not cover.
fn autograd_vjp(inputs: &[&Tensor], dy: &Tensor, f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let vars = inputs.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?;
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    tensors.iter().map(|t| grads.get(t).cloned().map_or_else(|| t.zeros_like(), Ok)).collect()
}

/// Backward of [`crate::layer_norm`]: `(dx, dweight, dbias)` for the output gradient `dy`.
/// The bias is not needed (the gradients do not depend on it). Mean and variance are recomputed
/// from `x` in the same pass, so the forward need keep nothing but `x`.
pub fn layer_norm_backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    check_layer_norm_args(x, weight, weight, eps)?;
    if x.shape() != dy.shape() {
        candle_core::bail!("layer_norm_backward: dy {:?} must have the shape of x {:?}", dy.shape(), x.shape())
    }
    if !kernel_device(x) {
        let g = autograd_vjp(&[x, weight, &weight.zeros_like()?], dy, |t| {
            crate::reference::layer_norm(&t[0], &t[1], &t[2], eps)
        })?;
        return Ok((g[0].clone(), g[1].clone(), g[2].clone()));
    }
    let packed = dense_on_gpu(x)?.apply_op3_no_bwd(
        &dense_on_gpu(weight)?,
        &dense_on_gpu(&dy.to_dtype(x.dtype())?)?,
        &crate::layer_norm::LayerNormBwd { eps },
    )?;
    let (n, c) = (x.elem_count(), weight.elem_count());
    Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, packed.narrow(0, n, c)?, packed.narrow(0, n + c, c)?))
}

/// [`layer_norm_backward`] plus the gradient that reaches the LayerNorm's input around it,
/// through a residual connection: `(residual + dx, dweight, dbias)`. A pre-LayerNorm block's
/// input gradient is exactly this (`x` feeds both the LayerNorm and the residual add), and on
/// the fused path the sum is written by the pass that writes `dx`: no separate add reading
/// both back into a third buffer. Bit for bit `add(residual, dx)` of [`layer_norm_backward`]'s
/// `dx` (one rounding of the same two terms).
pub fn layer_norm_backward_residual(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    residual: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_layer_norm_args(x, weight, weight, eps)?;
    for (name, t) in [("dy", dy), ("residual", residual)] {
        if t.shape() != x.shape() {
            candle_core::bail!(
                "layer_norm_backward_residual: {name} {:?} must have the shape of x {:?}",
                t.shape(),
                x.shape()
            )
        }
        if t.dtype() != x.dtype() {
            candle_core::bail!("layer_norm_backward_residual: {name} is {:?}, x is {:?}", t.dtype(), x.dtype())
        }
    }
    if !fused(x) || x.track_op() || dy.track_op() || residual.track_op() {
        let (dx, dw, db) = layer_norm_backward(x, weight, dy, eps)?;
        return Ok((add(residual, &dx)?, dw, db));
    }
    crate::layer_norm::layer_norm_backward_residual_cpu(x, weight, dy, residual, eps)
}

/// Backward of [`crate::softmax_last_dim`], from the softmax's output `y`:
/// `dx = y * (dy - sum(dy * y))` per row.
pub fn softmax_last_dim_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    crate::check_rank_at_least_1("softmax_last_dim_backward", y)?;
    if y.shape() != dy.shape() {
        candle_core::bail!("softmax_last_dim_backward: dy {:?} must have the shape of y {:?}", dy.shape(), y.shape())
    }
    if !kernel_device(y) {
        let dot = (dy * y)?.sum_keepdim(candle_core::D::Minus1)?;
        return y * dy.broadcast_sub(&dot)?;
    }
    dense_on_gpu(y)?.apply_op2_no_bwd(&dense_on_gpu(dy)?, &crate::softmax::SoftmaxBwd { log: false })
}

/// Gradient of `scale * cross_entropy_sum(logits, targets)` with respect to the logits:
/// `scale * (softmax(logits) - onehot(targets))`, in the logits' dtype. For half-precision
/// logits it is computed in f32 (the loss's dtype, see [`crate::cross_entropy_sum`]) and
/// rounded once: by the CUDA kernel straight from bf16 logits, elsewhere through an f32 copy.
pub fn cross_entropy_sum_backward(logits: &Tensor, targets: &Tensor, scale: f64) -> Result<Tensor> {
    check_cross_entropy_args(logits, targets)?;
    let half = is_half(logits.dtype());
    if half && !kernel_device(logits) {
        return cross_entropy_sum_backward(&logits.to_dtype(DType::F32)?, targets, scale)?.to_dtype(logits.dtype());
    }
    let targets = targets.to_dtype(DType::U32)?;
    let g = Tensor::new(scale, logits.device())?.to_dtype(if half { DType::F32 } else { logits.dtype() })?;
    if !kernel_device(logits) {
        let d = autograd_vjp(&[logits], &g, |t| crate::reference::cross_entropy_sum(&t[0], &targets))?;
        return Ok(d[0].clone());
    }
    dense_on_gpu(logits)?.apply_op3_no_bwd(&dense_on_gpu(&targets)?, &g, &crate::cross_entropy::CrossEntropySumBwd)
}

/// Backward of [`crate::gelu_tanh`], from its input `x`.
pub fn gelu_tanh_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if x.shape() != dy.shape() {
        candle_core::bail!("gelu_tanh_backward: dy {:?} must have the shape of x {:?}", dy.shape(), x.shape())
    }
    if !kernel_device(x) {
        return Ok(autograd_vjp(&[x], dy, |t| crate::reference::gelu_tanh(&t[0]))?.remove(0));
    }
    dense_on_gpu(x)?.apply_op2_no_bwd(&dense_on_gpu(dy)?, &crate::gelu::GeluTanhBwd)
}

/// Backward of [`crate::max_pool2d`], from its input `x`: each output's gradient goes to the
/// first maximum of its window.
pub fn max_pool2d_backward(x: &Tensor, dy: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (out_h, out_w) = check_max_pool_args(x, kernel, stride, padding)?;
    let (n, c, _, _) = x.dims4()?;
    if dy.dims() != [n, c, out_h, out_w] {
        candle_core::bail!("max_pool2d_backward: dy must have shape {:?}, got {:?}", [n, c, out_h, out_w], dy.dims())
    }
    if !fused(x) {
        return Ok(autograd_vjp(&[x], dy, |t| crate::reference::max_pool2d(&t[0], kernel, stride, padding))?.remove(0));
    }
    let op = crate::max_pool::MaxPool2d { kernel, stride, padding, out_h, out_w };
    x.apply_op2_no_bwd(dy, &crate::max_pool::MaxPool2dBwd(op))
}

/// `a + b` for two gradients of one shape and dtype (a residual connection's two branches),
/// on the CPU in f32/f64 one parallel pass on the caller's rayon pool (the stage's threads);
/// elsewhere candle's add. Same values as `a + b`: candle runs its binary ops on its own
/// thread pool, outside the stage's budget (1.1% of the 2-thread GPT step, two per block).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!("add: {:?} {:?} and {:?} {:?} differ", a.shape(), a.dtype(), b.shape(), b.dtype())
    }
    if !fused(a) || !b.device().is_cpu() || a.track_op() || b.track_op() {
        return a + b;
    }
    a.apply_op2_no_bwd(b, &Add)
}

struct Add;

impl candle_core::CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        fn run<T: candle_core::WithDType>(a: &[T], b: &[T]) -> Vec<T> {
            crate::cpu::new_rows(a.len(), ADD_CHUNK, |r, out: &mut [T]| {
                let start = r * ADD_CHUNK;
                for ((o, &u), &v) in out.iter_mut().zip(&a[start..]).zip(&b[start..]) {
                    *o = u + v;
                }
            })
        }
        let out = match (a, b) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run(&crate::cpu::view::<f32>(a, al)?, &crate::cpu::view::<f32>(b, bl)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run(&crate::cpu::view::<f64>(a, al)?, &crate::cpu::view::<f64>(b, bl)?))
            }
            _ => candle_core::bail!("add: f32 or f64 tensors of one dtype expected"),
        };
        Ok((out, al.shape().clone()))
    }
}

/// Elements per parallel task in [`add`].
const ADD_CHUNK: usize = 4096;

/// `acc += g`, in place. Both must have the same shape and dtype, and `acc` must be contiguous
/// and own its storage alone (a fresh result of a computation, not a view of a parameter);
/// `g` may have any layout. Off the fused path it falls back to copying `acc + g` into `acc`.
pub fn accumulate(acc: &Tensor, g: &Tensor) -> Result<()> {
    if acc.shape() != g.shape() || acc.dtype() != g.dtype() {
        candle_core::bail!(
            "accumulate: gradient {:?} {:?} does not match the accumulator {:?} {:?}",
            g.shape(),
            g.dtype(),
            acc.shape(),
            acc.dtype()
        )
    }
    if !acc.is_contiguous() {
        candle_core::bail!("accumulate: the accumulator must be contiguous")
    }
    if !fused(acc) || !g.device().is_cpu() {
        let sum = (acc + g)?;
        return acc.slice_set(&sum, 0, 0);
    }
    acc.inplace_op2(g, &Accumulate)
}

struct Accumulate;

impl InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "accumulate"
    }

    fn cpu_fwd(&self, acc: &mut CpuStorage, al: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let range = al
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("accumulate: the accumulator must be contiguous".into()))?;
        match acc {
            CpuStorage::F32(a) => add_into::<f32>(&mut a[range.0..range.1], g, gl),
            CpuStorage::F64(a) => add_into::<f64>(&mut a[range.0..range.1], g, gl),
            _ => candle_core::bail!("accumulate: f32 or f64 tensors expected"),
        }
    }
}

fn add_into<T: candle_core::WithDType + std::ops::AddAssign>(acc: &mut [T], g: &CpuStorage, gl: &Layout) -> Result<()> {
    let g = crate::cpu::view::<T>(g, gl)?;
    // A plain zip the compiler vectorises; the view is dense (strided inputs are gathered).
    for (a, &v) in acc.iter_mut().zip(g.iter()) {
        *a += v;
    }
    Ok(())
}

/// Column sums of a 2-D `(N, C)` tensor: `(C,)`. A bias's gradient is this over the output
/// gradient's rows; candle's reduction over dimension 0 walks the matrix column by column
/// (6.6% of a GPT training step on one core), this adds whole rows into one accumulator row,
/// which vectorises. The rows are summed in fixed blocks of `SUM_ROWS_BLOCK` (128), in parallel on
/// the caller's rayon pool, and the block sums then added in order: the same bits whatever the
/// thread count (it ran on one thread only, 1.5% of the 2-thread GPT step).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    x.dims2()?;
    if !fused(x) {
        return x.sum(0);
    }
    x.apply_op1_no_bwd(&SumRows)
}

struct SumRows;

/// Rows per partial sum in [`sum_rows`]: 16 blocks for the 2048 tokens of the side-by-side
/// GPT's batch, enough to share between a stage's threads.
const SUM_ROWS_BLOCK: usize = 128;

impl candle_core::CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let c = l.dims()[1];
        fn run<T: candle_core::WithDType + std::ops::AddAssign>(x: &[T], c: usize) -> Vec<T> {
            use rayon::prelude::*;
            let mut acc = vec![T::zero(); c];
            if c == 0 {
                return acc;
            }
            let add_rows = |acc: &mut [T], rows: &[T]| {
                for row in rows.chunks_exact(c) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
            };
            let block_sum = |rows: &[T]| {
                let mut part = vec![T::zero(); c];
                add_rows(&mut part, rows);
                part
            };
            let block = c * SUM_ROWS_BLOCK;
            let parts: Vec<Vec<T>> = if x.len() >= crate::cpu::PAR_MIN_ELEMS {
                x.par_chunks(block).map(block_sum).collect()
            } else {
                x.chunks(block).map(block_sum).collect()
            };
            for part in &parts {
                add_rows(&mut acc, part);
            }
            acc
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run(&crate::cpu::view::<f32>(s, l)?, c)),
            CpuStorage::F64(_) => CpuStorage::F64(run(&crate::cpu::view::<f64>(s, l)?, c)),
            _ => candle_core::bail!("sum-rows: f32 or f64 expected"),
        };
        Ok((out, candle_core::Shape::from(c)))
    }
}

/// `acc += a · b`, in place: `acc` `(M, N)` contiguous and owning its storage, `a` `(M, K)` and
/// `b` `(K, N)` 2-D with any strides (transposed views are read as they are, no copy). A
/// weight step adds `xᵀ·dy` into the gradient's accumulator this way: no output tensor to
/// allocate and zero, and no second pass to add it in.
pub fn matmul_accumulate(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 || acc.dims() != [m, n] {
        candle_core::bail!("matmul_accumulate: {:?} += {:?} · {:?} does not fit", acc.dims(), a.dims(), b.dims())
    }
    if acc.dtype() != a.dtype() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "matmul_accumulate: one dtype expected, got {:?}, {:?}, {:?}",
            acc.dtype(),
            a.dtype(),
            b.dtype()
        )
    }
    if !acc.is_contiguous() {
        candle_core::bail!("matmul_accumulate: the accumulator must be contiguous")
    }
    if !fused(acc) || !a.device().is_cpu() || !b.device().is_cpu() {
        return accumulate(acc, &crate::gemm::matmul(a, b)?);
    }
    acc.inplace_op3(a, b, &MatmulAccumulate { m, n, k })
}

struct MatmulAccumulate {
    m: usize,
    n: usize,
    k: usize,
}

impl candle_core::InplaceOp3 for MatmulAccumulate {
    fn name(&self) -> &'static str {
        "matmul-accumulate"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        a: &CpuStorage,
        l1: &Layout,
        b: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (start, end) = al
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("matmul-accumulate: the accumulator must be contiguous".into()))?;
        match (acc, a, b) {
            (CpuStorage::F32(acc), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                self.run(&mut acc[start..end], a, l1, b, l2);
                Ok(())
            }
            (CpuStorage::F64(acc), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                self.run(&mut acc[start..end], a, l1, b, l2);
                Ok(())
            }
            _ => candle_core::bail!("matmul-accumulate: f32 or f64 tensors of one dtype expected"),
        }
    }
}

impl MatmulAccumulate {
    fn run<T: candle_core::WithDType>(&self, acc: &mut [T], a: &[T], l1: &Layout, b: &[T], l2: &Layout) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        let a = Mat {
            ptr: a.as_ptr().wrapping_add(l1.start_offset()),
            rs: l1.stride()[0] as isize,
            cs: l1.stride()[1] as isize,
        };
        let b = Mat {
            ptr: b.as_ptr().wrapping_add(l2.start_offset()),
            rs: l2.stride()[0] as isize,
            cs: l2.stride()[1] as isize,
        };
        let dst = MatMut { ptr: acc.as_mut_ptr(), rs: n as isize };
        // SAFETY: `acc` holds m·n initialised elements laid out row-major (checked contiguous,
        // shape (m, n) by the caller); `a` and `b` are read through their own layouts' offsets
        // and strides, which candle guarantees stay inside their storages for shapes (m, k),
        // (k, n). Nothing else aliases `acc` during the call (candle holds its write lock).
        unsafe { gemm_into(m, n, k, dst, a, b, T::from_f64(1.0), true, stage_threads()) }
    }
}

/// `acc[ids[i], :] += rows[i, :]` in place, for `acc` `(V, C)` contiguous, `ids` `(N,)` integer
/// and `rows` `(N, C)` of `acc`'s dtype: an embedding table's weight gradient scattered into
/// the step's running sum, with no table-sized temporary per micro-batch. Rows are added in
/// order, so repeated ids sum as `Tensor::index_add` sums them. An id >= V is an error naming it.
pub fn index_add_rows(acc: &Tensor, ids: &Tensor, rows: &Tensor) -> Result<()> {
    let ((v, c), (n, c2)) = (acc.dims2()?, rows.dims2()?);
    if c != c2 || ids.dims() != [n] || !ids.dtype().is_int() {
        candle_core::bail!(
            "index_add_rows: {:?} rows with ids {:?} {:?} do not fit a {:?} table",
            rows.dims(),
            ids.dims(),
            ids.dtype(),
            acc.dims()
        )
    }
    if acc.dtype() != rows.dtype() {
        candle_core::bail!("index_add_rows: rows {:?} do not match the table's dtype {:?}", rows.dtype(), acc.dtype())
    }
    if !acc.is_contiguous() {
        candle_core::bail!("index_add_rows: the table must be contiguous")
    }
    let ids = ids.to_dtype(DType::U32)?;
    if !fused(acc) || !rows.device().is_cpu() {
        let sum = acc.index_add(&ids, rows, 0)?;
        return acc.slice_set(&sum, 0, 0);
    }
    acc.inplace_op3(&ids, rows, &IndexAddRows { v, c })
}

struct IndexAddRows {
    v: usize,
    c: usize,
}

impl candle_core::InplaceOp3 for IndexAddRows {
    fn name(&self) -> &'static str {
        "index-add-rows"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        ids: &CpuStorage,
        il: &Layout,
        rows: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let (start, end) = al
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("index-add-rows: the table must be contiguous".into()))?;
        let ids = crate::cpu::view::<u32>(ids, il)?;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.v) {
            candle_core::bail!("index_add_rows: id {id} at row {i} is out of range for a table of {} rows", self.v)
        }
        match acc {
            CpuStorage::F32(a) => self.run::<f32>(&mut a[start..end], &ids, rows, rl),
            CpuStorage::F64(a) => self.run::<f64>(&mut a[start..end], &ids, rows, rl),
            _ => candle_core::bail!("index-add-rows: f32 or f64 tables expected"),
        }
    }
}

impl IndexAddRows {
    fn run<T: candle_core::WithDType + std::ops::AddAssign>(
        &self,
        acc: &mut [T],
        ids: &[u32],
        rows: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let rows = crate::cpu::view::<T>(rows, rl)?;
        let c = self.c;
        for (i, &id) in ids.iter().enumerate() {
            let dst = &mut acc[id as usize * c..(id as usize + 1) * c];
            for (a, &g) in dst.iter_mut().zip(&rows[i * c..(i + 1) * c]) {
                *a += g;
            }
        }
        Ok(())
    }
}
