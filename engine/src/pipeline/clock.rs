//! When a stage's actions ran, for the profiler's trace, the bench and the simulator's check.
//!
//! On the CPU an action's host start and end are its times. On a GPU the host only queues
//! work, so the host times would measure the queueing: a GPU stage records a CUDA event after
//! each action on its stream (no synchronisation), and once the step is over (the stage has
//! synchronised anyway, reading its gradient norm) each action's end becomes the origin's host
//! time plus the GPU time from an origin event to the action's event. An action starts when
//! both the previous action has ended on the GPU and its input had arrived on the host.

use std::time::Instant;

use candle_core::{Device, Result};

use crate::schedule::Action;

/// One action's start and end.
pub(super) type Timing = (Action, Instant, Instant);

pub(super) struct ActionClock {
    #[cfg(feature = "cuda")]
    gpu: Option<gpu::Marks>,
}

impl ActionClock {
    /// Starts a step's clock for a stage on `device`.
    pub(super) fn start(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            Ok(Self { gpu: gpu::Marks::start(device)? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// Marks the end of the action just queued.
    pub(super) fn action_done(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(marks) = &mut self.gpu {
            marks.record()?;
        }
        Ok(())
    }

    /// The step's timings, from the host's `host` (one per action, in order): as they are on
    /// the CPU, moved onto the GPU's clock on a GPU. Call after the stage's work has finished.
    pub(super) fn finish(self, host: Vec<Timing>) -> Result<Vec<Timing>> {
        #[cfg(feature = "cuda")]
        if let Some(marks) = self.gpu {
            return marks.timings(host);
        }
        Ok(host)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result};

    use super::Timing;

    pub(super) struct Marks {
        stream: Arc<CudaStream>,
        origin: CudaEvent,
        origin_at: Instant,
        ends: Vec<CudaEvent>,
    }

    fn event(stream: &CudaStream) -> Result<CudaEvent> {
        stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).w()
    }

    impl Marks {
        pub(super) fn start(device: &Device) -> Result<Option<Self>> {
            let Device::Cuda(cuda) = device else {
                return Ok(None);
            };
            let stream = cuda.cuda_stream();
            let origin = event(&stream)?;
            Ok(Some(Self { stream, origin, origin_at: Instant::now(), ends: Vec::new() }))
        }

        pub(super) fn record(&mut self) -> Result<()> {
            self.ends.push(event(&self.stream)?);
            Ok(())
        }

        pub(super) fn timings(self, host: Vec<Timing>) -> Result<Vec<Timing>> {
            if host.len() != self.ends.len() {
                candle_core::bail!("{} actions timed on the host but {} on the GPU", host.len(), self.ends.len());
            }
            let mut out = Vec::with_capacity(host.len());
            let mut previous_end = self.origin_at;
            for ((action, host_start, _), end) in host.into_iter().zip(&self.ends) {
                let gpu_ms = self.origin.elapsed_ms(end).w()?;
                let end_at = self.origin_at + Duration::from_secs_f64(f64::from(gpu_ms.max(0.0)) / 1e3);
                let start_at = previous_end.max(host_start).min(end_at);
                out.push((action, start_at, end_at));
                previous_end = end_at;
            }
            Ok(out)
        }
    }
}
