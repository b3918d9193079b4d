//! Where a stage runs: the CPU or a CUDA GPU. A pipeline takes one [`StageDevice`] per stage
//! (`--devices cpu,cuda:0,cuda:0`), or places its stages round-robin over the visible GPUs
//! (`--device cuda`). Several stages may share a GPU.
//!
//! Each stage opens its own device on its own thread. On a GPU that means a CUDA stream of its
//! own (`Device::new_cuda_with_stream`): candle's `Device::new_cuda` would put every stage on
//! the per-thread default stream, where cudarc does no cross-stream synchronisation and
//! tensors handed between stage threads would race. With one stream per stage, cudarc records
//! an event on each write and makes the reading stream wait on it, so an activation handed to
//! the next stage is copied on the *receiving* stage's stream once the sender's kernels are done,
//! and stages on one GPU overlap.
//!
//! Once per GPU per process, opening a device also raises the memory pool's release threshold
//! (the default pool hands its memory back to the driver at every synchronisation, and the next
//! step pays to get it again) where the GPU has memory pools at all
//! (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`; some virtualised GPUs have none: a warning, and
//! the stage runs without the threshold), and enables peer access to every other GPU that supports it, so
//! a transfer between stages on two GPUs is one peer copy instead of two trips through the host.
//!
//! Without the `cuda` feature, asking for a GPU is an error that says how to get one.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{EngineError, Result};

/// The device a stage runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StageDevice {
    /// The CPU, with the stage's share of the cores (`threads_per_stage`).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl StageDevice {
    pub fn is_cuda(&self) -> bool {
        matches!(self, StageDevice::Cuda(_))
    }

    /// Opens the device for the calling stage thread: the CPU, or a GPU on a stream of its own.
    pub fn open(&self) -> Result<Device> {
        match *self {
            StageDevice::Cpu => Ok(Device::Cpu),
            StageDevice::Cuda(ordinal) => cuda::open(ordinal),
        }
    }

    /// Parses a comma-separated list, one device per stage: `cpu,cuda:0,cuda:1`.
    pub fn parse_list(list: &str) -> Result<Vec<StageDevice>> {
        list.split(',').map(|s| s.trim().parse()).collect()
    }

    /// `stages` devices of `kind`: all CPU, or round-robin over the visible GPUs (stage `s` on
    /// GPU `s mod n`), so 4 stages on 2 GPUs put stages 0 and 2 on GPU 0.
    pub fn spread(kind: &str, stages: usize) -> Result<Vec<StageDevice>> {
        match kind.trim() {
            "cpu" => Ok(vec![StageDevice::Cpu; stages]),
            "cuda" | "gpu" => {
                let gpus = cuda_device_count()?;
                Ok((0..stages).map(|s| StageDevice::Cuda(s % gpus)).collect())
            }
            other => match other.parse::<StageDevice>()? {
                one @ StageDevice::Cuda(_) => Ok(vec![one; stages]),
                StageDevice::Cpu => Ok(vec![StageDevice::Cpu; stages]),
            },
        }
    }
}

impl fmt::Display for StageDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageDevice::Cpu => write!(f, "cpu"),
            StageDevice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for StageDevice {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || EngineError::Config(format!("unknown device {s:?}: expected cpu, cuda or cuda:N (N the GPU ordinal)"));
        match s.trim() {
            "cpu" => Ok(StageDevice::Cpu),
            "cuda" | "gpu" => Ok(StageDevice::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").or_else(|| other.strip_prefix("gpu:")).ok_or_else(bad)?;
                ordinal.parse().map(StageDevice::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// Checks a per-stage device list against the stage count, and that every GPU named exists.
pub(crate) fn check_devices(devices: &[StageDevice], stages: usize) -> Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    if devices.len() != stages {
        return Err(EngineError::Config(format!(
            "{} devices given ({}) for {stages} stages: give one device per stage",
            devices.len(),
            devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
        )));
    }
    if let Some(max) = devices.iter().filter_map(|d| if let StageDevice::Cuda(i) = d { Some(*i) } else { None }).max() {
        let gpus = cuda_device_count()?;
        if max >= gpus {
            return Err(EngineError::Config(format!(
                "cuda:{max} does not exist: this machine has {gpus} GPU{} (cuda:0..cuda:{})",
                if gpus == 1 { "" } else { "s" },
                gpus.saturating_sub(1)
            )));
        }
    }
    Ok(())
}

/// How many CUDA GPUs this process sees; an error (one line, naming the cause) when it sees
/// none, or when brigade was built without the `cuda` feature.
pub fn cuda_device_count() -> Result<usize> {
    cuda::device_count()
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::*;

    fn not_built() -> EngineError {
        EngineError::Config(
            "this brigade was built without GPU support: rebuild with `cargo build --release --features cuda` \
             (see README, \"GPUs\")"
                .into(),
        )
    }

    pub(super) fn open(_ordinal: usize) -> Result<Device> {
        Err(not_built())
    }

    pub(super) fn device_count() -> Result<usize> {
        Err(not_built())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext};

    use super::*;

    fn no_gpu(e: impl fmt::Display) -> EngineError {
        let e = e.to_string();
        EngineError::Config(format!("no usable CUDA GPU: {e}; {}", fix_for(&e)))
    }

    /// What to do about a driver error, in the words of the error's name.
    fn fix_for(error: &str) -> &'static str {
        if error.contains("INSUFFICIENT_DRIVER") || error.contains("UNSUPPORTED_PTX_VERSION") {
            "the NVIDIA driver is older than the CUDA this binary was built with: build with the toolkit \
             pinned to the driver's CUDA (../shared/cuda/toolchain.sh pins 13.0 for driver 580)"
        } else if error.contains("NO_DEVICE") || error.contains("0 devices") {
            "no GPU is visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES"
        } else if error.contains("CUDA_ERROR_UNKNOWN") || error.contains("NOT_INITIALIZED") {
            "the CUDA driver did not initialise: is this the real libcuda.so.1 (not a build stub) and is \
             the NVIDIA driver loaded (`nvidia-smi`)?"
        } else {
            "is the NVIDIA driver installed and a GPU visible (`nvidia-smi`)?"
        }
    }

    pub(super) fn device_count() -> Result<usize> {
        let n = CudaContext::device_count().map_err(no_gpu)?;
        if n <= 0 {
            return Err(no_gpu("the driver reports 0 devices"));
        }
        Ok(n as usize)
    }

    /// GPUs already prepared in this process (release threshold, peer access).
    static PREPARED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

    pub(super) fn open(ordinal: usize) -> Result<Device> {
        let gpus = device_count()?;
        if ordinal >= gpus {
            return Err(EngineError::Config(format!("cuda:{ordinal} does not exist: this machine has {gpus} GPU(s)")));
        }
        let device = Device::new_cuda_with_stream(ordinal).map_err(|e| no_gpu(format!("cuda:{ordinal}: {e}")))?;
        let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
        if prepared.get_or_insert_with(HashSet::new).insert(ordinal) {
            prepare(ordinal, gpus).map_err(|e| EngineError::Config(format!("preparing cuda:{ordinal}: {e}")))?;
        }
        Ok(device)
    }

    /// Raises the default pool's release threshold and enables peer access from `ordinal` to
    /// every GPU that allows it. The stage thread's context is current (the device was just
    /// opened on it).
    fn prepare(ordinal: usize, gpus: usize) -> std::result::Result<(), String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| e.to_string())?;
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: plain driver calls on a valid device and its primary context (bound above);
        // the pool handle is the device's default pool, which the driver owns.
        unsafe {
            let dev = result::device::get(ordinal as i32).map_err(|e| e.to_string())?;
            let pools = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
                .map_err(|e| e.to_string())?;
            if pools == 1 {
                if let Err(e) = keep_pool_memory(dev) {
                    eprintln!(
                        "warning: cuda:{ordinal}: cannot raise the memory pool's release threshold ({e}); \
                         training runs, paying to get memory back from the driver after each synchronisation"
                    );
                }
            } else {
                eprintln!(
                    "warning: cuda:{ordinal} has no memory pools (some virtualised GPUs): training runs without \
                     the pool's release threshold, on the driver's own allocations"
                );
            }
            for peer in (0..gpus).filter(|&p| p != ordinal) {
                let peer_dev = result::device::get(peer as i32).map_err(|e| e.to_string())?;
                let mut can = 0i32;
                sys::cuDeviceCanAccessPeer(&mut can, dev, peer_dev).result().map_err(|e| e.to_string())?;
                if can == 1 {
                    let peer_ctx = CudaContext::new(peer).map_err(|e| e.to_string())?;
                    ctx.bind_to_thread().map_err(|e| e.to_string())?;
                    match sys::cuCtxEnablePeerAccess(peer_ctx.cu_ctx(), 0) {
                        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
                        other => return Err(format!("enabling peer access cuda:{ordinal} -> cuda:{peer}: {other:?}")),
                    }
                }
            }
        }
        Ok(())
    }

    /// Raises the device's default pool's release threshold to the maximum, so memory freed
    /// during a step stays in the pool for the next one.
    ///
    /// # Safety
    /// `dev` is a valid device and its primary context is current on this thread.
    unsafe fn keep_pool_memory(dev: sys::CUdevice) -> std::result::Result<(), String> {
        let mut pool = std::mem::MaybeUninit::uninit();
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), dev).result().map_err(|e| e.to_string())?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_lists() {
        assert_eq!(
            StageDevice::parse_list("cpu, cuda:0,cuda:3,gpu").unwrap(),
            vec![StageDevice::Cpu, StageDevice::Cuda(0), StageDevice::Cuda(3), StageDevice::Cuda(0)]
        );
        for bad in ["cuda:x", "tpu", "cuda:", ""] {
            let e = StageDevice::parse_list(bad).unwrap_err().to_string();
            assert!(e.contains("unknown device") && e.contains("cuda:N"), "{bad}: {e}");
        }
        assert_eq!(StageDevice::Cuda(2).to_string(), "cuda:2");
        assert_eq!(StageDevice::spread("cpu", 3).unwrap(), vec![StageDevice::Cpu; 3]);
    }

    #[test]
    fn device_lists_must_match_the_stages() {
        let e = check_devices(&[StageDevice::Cpu], 2).unwrap_err().to_string();
        assert!(e.contains("1 devices given (cpu) for 2 stages"), "{e}");
        assert!(check_devices(&[], 4).is_ok());
        assert!(check_devices(&[StageDevice::Cpu; 2], 2).is_ok());
    }

    /// Without the feature a GPU is refused with the way to get one; with it on a machine
    /// without a GPU, with the driver's reason. Never a panic.
    #[test]
    fn a_gpu_that_is_not_there_is_a_clear_error() {
        match StageDevice::Cuda(0).open() {
            Ok(device) => assert!(device.is_cuda()),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("--features cuda") || e.contains("no usable CUDA GPU"), "{e}");
            }
        }
    }
}
