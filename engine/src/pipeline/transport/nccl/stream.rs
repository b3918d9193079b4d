//! The CUDA side of the NCCL link: a lane (one communicator on a CUDA stream of its own, and
//! the candle device of that stream), the typed `ncclSend`/`ncclRecv` of candle tensors on it,
//! the unique ids that create the communicators, and the one-rank check a one-GPU machine can
//! run. What is sent when, and to whom, is `link.rs`'s business.

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};

use super::{nccl_result_text, unique_ids_of, UNIQUE_ID_BYTES};
use crate::pipeline::handoff::HandOff;
use crate::pipeline::transport::World;

/// An NCCL result code as an error line.
pub(super) fn nccl_error(what: &str, e: NcclError) -> String {
    let code = e.0 as u32;
    format!("{what} failed: NCCL error {code}, {}", nccl_result_text(code))
}

/// `count` NCCL unique ids, made by rank 0 and shared with every rank over the world's
/// all-gather (a collective: every rank calls it at the same point). Needs libnccl.so.2, not a GPU.
pub(super) fn share_unique_ids(world: &World, count: usize) -> Result<Vec<Id>, String> {
    let mine = if world.is_lead() {
        let mut bytes = Vec::with_capacity(count * UNIQUE_ID_BYTES);
        for _ in 0..count {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId (is libnccl.so.2 on LD_LIBRARY_PATH?)", e))?;
            bytes.extend(id.internal().iter().map(|&c| c as u8));
        }
        bytes
    } else {
        Vec::new()
    };
    let gathered = world.all_gather(mine)?;
    Ok(unique_ids_of(&gathered, count)?.into_iter().map(|raw| Id::uninit(raw.map(|b| b as _))).collect())
}

/// Runs `$body` with `$t` bound to the Rust type of a candle dtype NCCL can carry.
macro_rules! with_nccl_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::U8 => {
                type $t = u8;
                $body
            }
            DType::U32 => {
                type $t = u32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => Err(format!("dtype {other:?} cannot travel over NCCL")),
        }
    };
}

/// One communicator and the candle device whose stream it runs on (tensors it receives belong
/// to that stream).
pub(super) struct Lane {
    comm: Comm,
    device: Device,
}

impl Lane {
    /// The `name` communicator of rank `rank` of `size` on GPU `gpu`, from the shared `id`,
    /// on a stream of its own: never the default stream, never a stage's. Collective: every
    /// rank opens its lanes in the same order.
    pub fn open(gpu: usize, rank: usize, size: usize, id: Id, name: &str) -> Result<Self, String> {
        let cuda = CudaDevice::new_with_stream(gpu).map_err(|e| format!("cannot open cuda:{gpu} for NCCL: {e}"))?;
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, id).map_err(|e| {
            nccl_error(&format!("creating the NCCL {name} communicator on cuda:{gpu} (rank {rank} of {size})"), e)
        })?;
        Ok(Self { comm, device: Device::Cuda(cuda) })
    }

    /// The device of the lane's stream: a tensor must be taken onto it before it is sent.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `ncclSend` of a contiguous tensor on the lane's stream (the tensor must belong to it).
    pub fn send(&self, tensor: &Tensor, peer: usize) -> Result<(), String> {
        with_nccl_type!(tensor.dtype(), T => send_typed::<T>(&self.comm, tensor, peer))
    }

    /// `ncclRecv` of a `dtype` tensor of `shape` from `peer`, allocated on the lane's stream.
    pub fn recv(&self, dtype: DType, shape: &[usize], peer: usize) -> Result<Tensor, String> {
        let Device::Cuda(cuda) = &self.device else {
            return Err("an NCCL receive needs a GPU".into());
        };
        with_nccl_type!(dtype, T => recv_typed::<T>(&self.comm, cuda, shape, peer))
    }

    /// `ncclAllReduce` (sum) of a contiguous tensor on the lane's stream, into a new tensor.
    fn all_reduce(&self, tensor: &Tensor) -> Result<Tensor, String> {
        with_nccl_type!(tensor.dtype(), T => all_reduce_typed::<T>(&self.comm, tensor))
    }
}

fn send_typed<T: CudaDType + NcclType>(comm: &Comm, tensor: &Tensor, peer: usize) -> Result<(), String> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(format!("an NCCL send needs a GPU tensor, not one on {:?}", tensor.device()));
    };
    let (start, end) = layout.contiguous_offsets().ok_or("an NCCL send needs a contiguous tensor")?;
    let slice = cuda.as_cuda_slice::<T>().map_err(|e| e.to_string())?;
    comm.send(&slice.slice(start..end), peer as i32).map_err(|e| nccl_error(&format!("ncclSend to rank {peer}"), e))
}

fn recv_typed<T: CudaDType + NcclType + DeviceRepr>(
    comm: &Comm,
    cuda: &CudaDevice,
    shape: &[usize],
    peer: usize,
) -> Result<Tensor, String> {
    let elements: usize = shape.iter().product();
    // SAFETY: every element is written by the receive before any kernel on this stream reads it.
    let mut buffer = unsafe { comm.stream().alloc::<T>(elements) }
        .map_err(|e| format!("cannot allocate {elements} elements: {e}"))?;
    comm.recv(&mut buffer, peer as i32).map_err(|e| nccl_error(&format!("ncclRecv from rank {peer}"), e))?;
    let storage = CudaStorage::wrap_cuda_slice(buffer, cuda.clone());
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

fn all_reduce_typed<T: CudaDType + NcclType + DeviceRepr>(comm: &Comm, input: &Tensor) -> Result<Tensor, String> {
    let (storage, layout) = input.storage_and_layout();
    let (Storage::Cuda(cuda), Device::Cuda(device)) = (&*storage, input.device()) else {
        return Err("an all-reduce needs a GPU tensor".into());
    };
    let (start, end) = layout.contiguous_offsets().ok_or("an all-reduce needs a contiguous tensor")?;
    let slice = cuda.as_cuda_slice::<T>().map_err(|e| e.to_string())?;
    // SAFETY: the all-reduce writes every element.
    let mut out = unsafe { comm.stream().alloc::<T>(end - start) }.map_err(|e| e.to_string())?;
    comm.all_reduce(&slice.slice(start..end), &mut out, &ReduceOp::Sum).map_err(|e| nccl_error("ncclAllReduce", e))?;
    let storage = CudaStorage::wrap_cuda_slice(out, device.clone());
    Ok(Tensor::from_storage(Storage::Cuda(storage), input.dims(), BackpropOp::none(), false))
}

/// The one-rank check the GPU machine runs (NCCL takes one rank per GPU, so a one-GPU machine
/// can run nothing bigger): on GPU `gpu`, a world of one communicator made from a fresh unique
/// id; returns `tensor` all-reduced (sum) over that world, and `tensor` sent to this rank itself
/// and received back, both through the link's own typed send and receive on a stream of their own.
pub fn one_rank_check(gpu: usize, tensor: &Tensor) -> Result<(Tensor, Tensor), String> {
    let id = share_unique_ids(&World::Local, 1)?.remove(0);
    let lane = Lane::open(gpu, 0, 1, id, "one-rank")?;
    let input = HandOff::send(tensor.clone())
        .and_then(|h| h.receive(lane.device()))
        .and_then(|t| t.contiguous())
        .map_err(|e| e.to_string())?;
    let reduced = lane.all_reduce(&input)?;
    // A send to oneself needs its receive in the same group, or it waits forever.
    group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
    let sent = lane.send(&input, 0);
    let echoed = lane.recv(input.dtype(), input.dims(), 0);
    group_end().map_err(|e| nccl_error("ncclGroupEnd", e))?;
    let echoed = echoed.and_then(|t| sent.map(|_| t))?;
    Ok((reduced, echoed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs wherever libnccl.so.2 loads (no GPU needed): rank 0's ids reach every rank.
    #[test]
    fn unique_ids_are_made_and_shared_without_a_gpu() {
        let ids = share_unique_ids(&World::Local, 2).unwrap();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0].internal(), ids[1].internal(), "each communicator gets its own id");
        assert!(ids[0].internal().iter().any(|&c| c != 0), "an id is not all zeros");
    }
}
