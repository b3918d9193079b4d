//! Squared gradient norms for clipping, summed in f64, shared by the driver, the stages and the
//! single-device reference.

use candle_core::Tensor;

/// The squared L2 norm of `t`, summed in f64 (gradient clipping, here and in the reference).
pub(crate) fn squared_norm(t: &Tensor) -> candle_core::Result<f64> {
    squared_norm_sum(std::slice::from_ref(t))
}

/// The squared L2 norm of all of `tensors` together, each summed in f64 and the sums added in
/// order on the tensors' device, then read once (one host synchronisation on a GPU).
pub(crate) fn squared_norm_sum(tensors: &[Tensor]) -> candle_core::Result<f64> {
    let mut total: Option<Tensor> = None;
    for t in tensors {
        // One parallel pass on the CPU (see `brigade_kernels::sum_squares`).
        let sq = brigade_kernels::sum_squares(t)?;
        total = Some(match total {
            Some(acc) => (acc + sq)?,
            None => sq,
        });
    }
    total.map_or(Ok(0.0), |t| t.to_scalar::<f64>())
}
