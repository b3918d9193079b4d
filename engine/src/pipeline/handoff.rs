//! Handing a tensor from one stage (or the driver) to another: the one rule for buffers that
//! cross streams.
//!
//! **Who owns a buffer.** A tensor belongs to the stream of the device that computed it (the
//! sender's). Its kernels are only *queued* when the sender's host thread moves on: nothing
//! about the tensor says when they finish. cudarc would record a write event if the kernels
//! took the output as `&mut`, but candle's CUDA backend and brigade's own launches pass outputs
//! as `&`, so no write event is ever recorded and a reader on another stream would wait on
//! nothing.
//!
//! **The rule.** Every tensor that leaves a stage's stream goes through [`HandOff::send`]
//! (activations and input gradients between stages, in training, evaluation, prediction and
//! decoding; tied gradients to the driver and the driver's summed tied gradients back), which
//! records a CUDA event on the sender's stream after the producing kernels. The receiver calls
//! [`HandOff::receive`] before any use: its own stream waits on that event (a device-side wait,
//! the host never blocks), and only then is the tensor copied onto its stream (or, when it is
//! already on the receiver's device, first used there). After `receive` the receiver's copy
//! belongs to the receiver's stream; the sender's buffer is read by that copy only and is never
//! written again (tensors are immutable).
//!
//! **Across GPUs.** Each event is recorded in the sender's own context (cudarc refuses to
//! record on another context's stream); waiting on an event of another context is allowed. The
//! copy is then a peer copy on the receiver's stream (cudarc's `memcpy_dtod` between contexts).
//! cudarc records the source's read event on the *sender's* stream in that case, so the sender
//! could free (and its pool reuse) the source before the peer copy has run: after a copy across
//! contexts the sender's stream therefore waits on an event recorded after the copy.
//!
//! On the CPU (and in a build without `cuda`) a hand-off is the tensor itself: `send` records
//! nothing and `receive` is `to_device`.

use candle_core::{Device, Result, Tensor};

/// A tensor on its way to another stream, with the event that marks it complete.
#[derive(Clone)]
pub(crate) struct HandOff {
    tensor: Tensor,
    #[cfg(feature = "cuda")]
    ready: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaEvent>>,
}

impl HandOff {
    /// Wraps `tensor` for another stream: on a GPU, records an event on its stream after
    /// everything queued so far (the kernels that produced it).
    pub(crate) fn send(tensor: Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            let ready = match tensor.device() {
                Device::Cuda(cuda) => Some(std::sync::Arc::new(cuda.cuda_stream().record_event(None).w()?)),
                _ => None,
            };
            Ok(Self { tensor, ready })
        }
        #[cfg(not(feature = "cuda"))]
        {
            Ok(Self { tensor })
        }
    }

    /// The tensor on `device`, safe to use on its stream: the stream waits for the sender's
    /// event first, then copies (a peer copy between GPUs; nothing when already there).
    pub(crate) fn receive(self, device: &Device) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(ready), Device::Cuda(to)) = (&self.ready, device) {
            use candle_core::cuda_backend::WrapErr;
            let to_stream = to.cuda_stream();
            to_stream.wait(ready).w()?;
            let copy = self.tensor.to_device(device)?;
            if let Device::Cuda(from) = self.tensor.device() {
                let from_stream = from.cuda_stream();
                if from_stream.context() != to_stream.context() {
                    // The source is freed on the sender's stream: not before the peer copy ran.
                    let copied = to_stream.record_event(None).w()?;
                    from_stream.wait(&copied).w()?;
                    to_stream.context().bind_to_thread().w()?;
                }
            }
            return Ok(copy);
        }
        self.tensor.to_device(device)
    }

    /// The tensor as sent, for a receiver on the sender's own stream (a chunk handing to the
    /// next chunk on the same device: stream order already covers it).
    pub(crate) fn into_local(self) -> Tensor {
        self.tensor
    }
}

/// Blocks the host until everything queued on `device` has run: the debug switch
/// (`PipelineConfig::sync_each_action`) that takes every race out, to bisect a numerical
/// surprise. Nothing on the CPU.
pub(crate) fn synchronize(device: &Device) -> Result<()> {
    device.synchronize()
}
