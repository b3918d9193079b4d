//! 2-D max pooling over `(N, C, H, W)` with zero-cost padding, forward and backward, for any
//! kernel/stride/padding (candle's built-in pooling only differentiates when kernel == stride;
//! torchvision's ResNet stem needs kernel 3, stride 2, padding 1).
//!
//! Padding is virtual: window bounds are clipped to the image, so padded cells never win and
//! nothing is copied (the composition pads with -1e30, then does `kernel²` `index_select` +
//! `maximum` passes over the whole tensor). Output size is floor mode:
//! `(H + 2p - k) / s + 1`.
//!
//! Ties follow PyTorch: the window is scanned row-major and the *first* maximum wins; a NaN
//! wins over everything (propagates), also like PyTorch.
//!
//! Backward scatters `dy` to each window's argmax. candle's custom-op forward can only return
//! one tensor, so rather than storing argmax indices the backward op `(x, dy) -> dx` recomputes
//! them (a max over `k²` values per output, cheap next to the memory traffic). Each `(n, c)`
//! plane is independent, so both directions parallelise over planes; within a plane the
//! backward accumulates (`+=`) because overlapping windows can share an argmax.
//!
//! Assumes the geometry was validated by the public wrapper (rank 4, kernel >= 1, stride >= 1,
//! padding <= kernel / 2, kernel <= padded size), which guarantees every window holds at
//! least one real cell.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{for_each_row, storage, view, with_float, Real};

#[derive(Clone, Copy)]
pub(crate) struct MaxPool2d {
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl MaxPool2d {
    /// Calls `f(out_index, argmax_index)` for every output cell of one `h x w` plane.
    #[inline]
    fn plane_argmax<T: Real>(&self, plane: &[T], h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for oi in 0..self.out_h {
            // Window rows [oi*s - p, oi*s - p + k) clipped to [0, h).
            let r0 = (oi * s).saturating_sub(p);
            let r1 = (oi * s + k - p).min(h);
            for oj in 0..self.out_w {
                let c0 = (oj * s).saturating_sub(p);
                let c1 = (oj * s + k - p).min(w);
                let mut best = r0 * w + c0;
                let mut best_v = plane[best];
                for r in r0..r1 {
                    for c in c0..c1 {
                        let v = plane[r * w + c];
                        // Strict `>`: the first maximum wins; NaN wins and sticks.
                        if !best_v.is_nan() && (v > best_v || v.is_nan()) {
                            best_v = v;
                            best = r * w + c;
                        }
                    }
                }
                f(oi * self.out_w + oj, best);
            }
        }
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        with_float!(self.name(), s, |T| {
            let x = view::<T>(s, l)?;
            let plane_out = self.out_h * self.out_w;
            let mut y = vec![T::ZERO; n * c * plane_out];
            for_each_row(&mut y, plane_out, |pi, yp| {
                let plane = &x[pi * h * w..(pi + 1) * h * w];
                self.plane_argmax(plane, h, w, |o, a| yp[o] = plane[a]);
            });
            Ok((storage(y), Shape::from((n, c, self.out_h, self.out_w))))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(dy, &MaxPool2dBwd(*self))?))
    }
}

/// `(x, dy) -> dx`, scattering each `dy` to its window's argmax.
pub(crate) struct MaxPool2dBwd(pub(crate) MaxPool2d);

impl CustomOp2 for MaxPool2dBwd {
    fn name(&self) -> &'static str {
        "max-pool2d-bwd"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let p = self.0;
        if gl.dims() != [n, c, p.out_h, p.out_w] {
            candle_core::bail!("max-pool2d-bwd: dy has shape {:?}, expected {:?}", gl.shape(), (n, c, p.out_h, p.out_w))
        }
        with_float!(self.name(), xs, |T| {
            let x = view::<T>(xs, xl)?;
            let dy = view::<T>(gs, gl)?;
            let plane_out = p.out_h * p.out_w;
            let mut dx = vec![T::ZERO; x.len()];
            for_each_row(&mut dx, h * w, |pi, dxp| {
                let plane = &x[pi * h * w..(pi + 1) * h * w];
                let gp = &dy[pi * plane_out..(pi + 1) * plane_out];
                p.plane_argmax(plane, h, w, |o, a| dxp[a] += gp[o]);
            });
            Ok((storage(dx), xl.shape().clone()))
        })
    }
}
