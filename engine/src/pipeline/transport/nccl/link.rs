//! The NCCL thread and what runs on it (see `nccl.rs` for the protocol and why it pairs every
//! send with its receive): the communicators, their streams, the typed `ncclSend`/`ncclRecv`
//! of candle tensors, and the data-parallel gradient sum that goes through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Select, Sender, TryRecvError};

use super::{header_device, nccl_result_text, unique_ids_of, Header, Payload, PeerOrder, Side, UNIQUE_ID_BYTES};
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::Msg;
use crate::pipeline::replicas::exchange::{Arrivals, ReplicaLayout, Round};
use crate::pipeline::replicas::{ReduceError, ReplicaReduce};
use crate::pipeline::transport::{Attachment, Mailbox, Ranks, RouteKind, World};

/// One replica's gradient as it arrives: (replica, index, gradients per round, tensor on the
/// link's stream).
type ReplicaPiece = (usize, usize, usize, HandOff);

enum Job {
    /// The pipeline's proxy inboxes (slot, owning rank, inbox) and its local stages' inboxes.
    Attach {
        proxies: Vec<(usize, usize, Receiver<Msg>)>,
        incoming: Vec<(usize, Sender<Msg>)>,
    },
    /// By stage: where other replicas' gradients of it go.
    AttachReplicas(Vec<Sender<ReplicaPiece>>),
    SendReplica {
        rank: usize,
        payload: Payload,
        tensor: HandOff,
    },
    Shutdown,
}

/// This process's NCCL thread: started once per pipeline, on every rank in the same order
/// (creating the communicators is collective).
pub(in crate::pipeline) struct NcclLink {
    jobs: Sender<Job>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NcclLink {
    /// Shares the unique ids over MPI, creates the hand-off lanes (and, with `replica_lanes`,
    /// the replica sums' lanes) on `gpu` on a new thread, and routes the NCCL headers of a
    /// pipeline with `slots` slots to it. Every rank passes the same `replica_lanes`.
    pub fn start(ranks: Arc<Ranks>, gpu: usize, slots: usize, replica_lanes: bool) -> Result<Arc<Self>, String> {
        let (rank, size) = (ranks.rank(), ranks.size());
        let ids = share_unique_ids(&World::Ranks(ranks.clone()), if replica_lanes { 4 } else { 2 })?;
        // Headers to each peer leave through a proxy inbox of the MPI thread; headers to this
        // rank come back through one inbox, in MPI's arrival order.
        let (mut header_out, mut outgoing) = (HashMap::new(), Vec::new());
        for peer in (0..size).filter(|&p| p != rank) {
            let (tx, rx) = unbounded();
            header_out.insert(peer, tx);
            outgoing.push((header_device(slots, peer), peer, rx));
        }
        let (header_tx, header_in) = unbounded();
        ranks.attach(Attachment { outgoing, incoming: vec![(header_device(slots, rank), header_tx)] })?;
        let (jobs, job_rx) = unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("brigade-nccl".into())
            .spawn(move || {
                let link = match Link::open(ranks.clone(), gpu, ids, header_out, header_in) {
                    Ok(link) => link,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                link.run(job_rx)
            })
            .map_err(|e| format!("cannot start the NCCL thread: {e}"))?;
        ready_rx.recv().map_err(|_| "the NCCL thread ended during start-up".to_string())??;
        Ok(Arc::new(Self { jobs, thread: Mutex::new(Some(thread)) }))
    }

    /// Hands the pipeline's channels to the NCCL thread (what `Ranks::attach` gets without it).
    pub fn attach(
        &self,
        proxies: Vec<(usize, usize, Receiver<Msg>)>,
        incoming: Vec<(usize, Sender<Msg>)>,
    ) -> Result<(), String> {
        self.jobs.send(Job::Attach { proxies, incoming }).map_err(|_| gone())
    }
}

impl Drop for NcclLink {
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Shutdown);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

fn gone() -> String {
    "the NCCL thread is gone".into()
}

/// An NCCL result code as an error line.
fn nccl_error(what: &str, e: candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> String {
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

/// The lane (index into `Link::lanes`) of a transfer of `payload` from rank `from` to `to`:
/// hand-offs up and down, then replica gradients up and down.
fn lane_of(payload: &Payload, from: usize, to: usize) -> usize {
    let side = Side::of(from, to) as usize;
    match payload {
        Payload::HandOff { .. } => side,
        Payload::ReplicaGrad { .. } => 2 + side,
    }
}

/// One communicator, the candle device whose stream it runs on (tensors it receives belong to
/// that stream).
struct Lane {
    comm: Comm,
    device: Device,
}

/// The NCCL thread's state.
struct Link {
    ranks: Arc<Ranks>,
    rank: usize,
    /// By [`lane_of`]: 2 (hand-offs) or 4 (and replica gradients).
    lanes: Vec<Lane>,
    order: PeerOrder,
    header_out: HashMap<usize, Sender<Msg>>,
    header_in: Receiver<Msg>,
    headers_open: bool,
    proxies: Vec<(usize, usize, Receiver<Msg>)>,
    incoming: HashMap<usize, Sender<Msg>>,
    replica_inboxes: Vec<Sender<ReplicaPiece>>,
    /// What arrived before the pipeline (or its replica sums) attached.
    early: Vec<(Payload, HandOff)>,
}

impl Link {
    fn open(
        ranks: Arc<Ranks>,
        gpu: usize,
        ids: Vec<Id>,
        header_out: HashMap<usize, Sender<Msg>>,
        header_in: Receiver<Msg>,
    ) -> Result<Self, String> {
        let (rank, size) = (ranks.rank(), ranks.size());
        let lane = |(id, name): (Id, &str)| -> Result<Lane, String> {
            // A stream of the link's own: never the default stream, never a stage's.
            let cuda = CudaDevice::new_with_stream(gpu).map_err(|e| format!("cannot open cuda:{gpu} for NCCL: {e}"))?;
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, id).map_err(|e| {
                nccl_error(&format!("creating the NCCL {name} communicator on cuda:{gpu} (rank {rank} of {size})"), e)
            })?;
            Ok(Lane { comm, device: Device::Cuda(cuda) })
        };
        // Created in the same order on every rank: creating a communicator is collective.
        let names = ["hand-off up", "hand-off down", "replica up", "replica down"];
        let lanes = ids.into_iter().zip(names).map(lane).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            ranks,
            rank,
            lanes,
            order: PeerOrder::new(size),
            header_out,
            header_in,
            headers_open: true,
            proxies: Vec::new(),
            incoming: HashMap::new(),
            replica_inboxes: Vec::new(),
            early: Vec::new(),
        })
    }

    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            {
                let mut select = Select::new();
                select.recv(&jobs);
                if self.headers_open {
                    select.recv(&self.header_in);
                }
                for (_, _, rx) in &self.proxies {
                    select.recv(rx);
                }
                // The timeout only bounds a wait on channels that all closed at once.
                let _ = select.ready_timeout(Duration::from_millis(100));
            }
            loop {
                match jobs.try_recv() {
                    Ok(Job::Shutdown) | Err(TryRecvError::Disconnected) => return,
                    Ok(job) => {
                        if let Err(e) = self.job(job) {
                            self.fail(&e)
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            // Headers in arrival order: the receives are issued in the senders' order.
            while self.headers_open {
                match self.header_in.try_recv() {
                    Ok(envelope) => {
                        if let Err(e) = self.receive(envelope) {
                            self.fail(&e)
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    // The MPI thread serves another pipeline now: no more headers for this one.
                    Err(TryRecvError::Disconnected) => self.headers_open = false,
                }
            }
            let mut outbound = Vec::new();
            self.proxies.retain(|(slot, rank, rx)| loop {
                match rx.try_recv() {
                    // Control messages to a proxy (abort, shutdown) concern the stage's own rank.
                    Ok(msg) => {
                        if let Ok((key, tensor)) = Mailbox::handoff_of(msg) {
                            let payload = Payload::HandOff {
                                slot: *slot,
                                kind: key.kind,
                                chunk: key.chunk,
                                microbatch: key.microbatch,
                            };
                            outbound.push((*rank, payload, tensor));
                        }
                    }
                    Err(TryRecvError::Empty) => break true,
                    Err(TryRecvError::Disconnected) => break false,
                }
            });
            for (rank, payload, tensor) in outbound {
                if let Err(e) = self.send(rank, payload, tensor) {
                    self.fail(&format!("cannot send a hand-off to rank {rank}: {e}"))
                }
            }
        }
    }

    fn job(&mut self, job: Job) -> Result<(), String> {
        match job {
            Job::Attach { proxies, incoming } => {
                self.proxies = proxies;
                self.incoming = incoming.into_iter().collect();
                self.deliver_early();
            }
            Job::AttachReplicas(inboxes) => {
                self.replica_inboxes = inboxes;
                self.deliver_early();
            }
            Job::SendReplica { rank, payload, tensor } => self.send(rank, payload, tensor)?,
            Job::Shutdown => {}
        }
        Ok(())
    }

    fn lane(&self, payload: &Payload, from: usize, to: usize) -> Result<&Lane, String> {
        self.lanes.get(lane_of(payload, from, to)).ok_or_else(|| {
            format!("{payload:?} from rank {from} to {to}: this job has no NCCL lanes for replica gradients")
        })
    }

    fn deliver_early(&mut self) {
        for (payload, tensor) in std::mem::take(&mut self.early) {
            self.deliver(payload, tensor);
        }
    }

    /// Header over MPI, then the data over NCCL, in that order, from this one thread.
    fn send(&mut self, peer: usize, payload: Payload, tensor: HandOff) -> Result<(), String> {
        let seq = self.order.stamp(peer)?;
        let lane = self.lane(&payload, self.rank, peer)?;
        // The lane's stream waits for the sender's event; the copy then belongs to the lane's
        // stream, which frees it after the send in stream order.
        let tensor = tensor.receive(&lane.device).and_then(|t| t.contiguous()).map_err(|e| e.to_string())?;
        let header = Header { source: self.rank, seq, payload, dtype: tensor.dtype(), shape: tensor.dims().to_vec() };
        let words = header.to_words()?;
        let envelope =
            Tensor::new(words.as_slice(), &Device::Cpu).and_then(HandOff::send).map_err(|e| e.to_string())?;
        let out = self.header_out.get(&peer).ok_or_else(|| format!("no header route to rank {peer}"))?;
        out.send(Msg::Activation { chunk: 0, microbatch: 0, tensor: envelope })
            .map_err(|_| "the MPI thread is gone".to_string())?;
        if header.elements() > 0 {
            send_tensor(&lane.comm, &tensor, peer)?;
        }
        Ok(())
    }

    /// One header from the MPI thread: its receive, then the tensor to whoever waits for it.
    fn receive(&mut self, envelope: Msg) -> Result<(), String> {
        let (_, words) =
            Mailbox::handoff_of(envelope).map_err(|_| "the MPI thread delivered a control message as a header")?;
        let words = words.receive(&Device::Cpu).and_then(|t| t.to_vec1::<i64>()).map_err(|e| e.to_string())?;
        let header = Header::from_words(&words)?;
        self.order.admit(header.source, header.seq)?;
        let lane = self.lane(&header.payload, header.source, self.rank)?;
        let tensor = if header.elements() == 0 {
            Tensor::zeros(header.shape.as_slice(), header.dtype, &lane.device).map_err(|e| e.to_string())?
        } else {
            recv_tensor(&lane.comm, &lane.device, header.dtype, &header.shape, header.source)?
        };
        // The event the receiving stage's stream waits on: recorded after the receive.
        let tensor = HandOff::send(tensor).map_err(|e| e.to_string())?;
        self.deliver(header.payload, tensor);
        Ok(())
    }

    fn deliver(&mut self, payload: Payload, tensor: HandOff) {
        match payload {
            Payload::HandOff { slot, kind, chunk, microbatch } => match self.incoming.get(&slot) {
                Some(inbox) => {
                    let msg = match kind {
                        RouteKind::Activation => Msg::Activation { chunk, microbatch, tensor },
                        RouteKind::Gradient => Msg::Gradient { chunk, microbatch, tensor },
                    };
                    // A closed inbox is a stage that has stopped: nothing waits for its data.
                    drop(inbox.send(msg));
                }
                None => self.early.push((payload, tensor)),
            },
            Payload::ReplicaGrad { stage, replica, index, count } => match self.replica_inboxes.get(stage) {
                Some(inbox) => drop(inbox.send((replica, index, count, tensor))),
                None => self.early.push((payload, tensor)),
            },
        }
    }

    /// A transfer that failed cannot be retried (the peer's calls are already paired with it):
    /// end the job, saying why.
    fn fail(&self, why: &str) -> ! {
        eprintln!("error: rank {}: {why}", self.rank);
        self.ranks.abort(1)
    }
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

/// `ncclSend` of a contiguous tensor on `comm`'s stream (the tensor must belong to it).
fn send_tensor(comm: &Comm, tensor: &Tensor, peer: usize) -> Result<(), String> {
    with_nccl_type!(tensor.dtype(), T => send_typed::<T>(comm, tensor, peer))
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

/// `ncclRecv` of a `dtype` tensor of `shape` from `peer`, allocated on `comm`'s stream.
fn recv_tensor(comm: &Comm, device: &Device, dtype: DType, shape: &[usize], peer: usize) -> Result<Tensor, String> {
    let Device::Cuda(cuda) = device else {
        return Err("an NCCL receive needs a GPU".into());
    };
    with_nccl_type!(dtype, T => recv_typed::<T>(comm, cuda, shape, peer))
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

/// The one-rank check the GPU machine runs (NCCL takes one rank per GPU, so a one-GPU machine
/// can run nothing bigger): on GPU `gpu`, a world of one communicator made from a fresh unique
/// id; returns `tensor` all-reduced (sum) over that world, and `tensor` sent to this rank itself
/// and received back, both through the link's own typed send and receive on a stream of their own.
pub fn one_rank_check(gpu: usize, tensor: &Tensor) -> Result<(Tensor, Tensor), String> {
    let cuda = CudaDevice::new_with_stream(gpu).map_err(|e| format!("cannot open cuda:{gpu}: {e}"))?;
    let id = share_unique_ids(&World::Local, 1)?.remove(0);
    let comm =
        Comm::from_rank(cuda.cuda_stream(), 0, 1, id).map_err(|e| nccl_error("creating a one-rank communicator", e))?;
    let device = Device::Cuda(cuda);
    let input = HandOff::send(tensor.clone())
        .and_then(|h| h.receive(&device))
        .and_then(|t| t.contiguous())
        .map_err(|e| e.to_string())?;
    let reduced = with_nccl_type!(input.dtype(), T => all_reduce_typed::<T>(&comm, &input))?;
    // A send to oneself needs its receive in the same group, or it waits forever.
    group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
    let sent = send_tensor(&comm, &input, 0);
    let echoed = recv_tensor(&comm, &device, input.dtype(), input.dims(), 0);
    group_end().map_err(|e| nccl_error("ncclGroupEnd", e))?;
    let echoed = echoed.and_then(|t| sent.map(|_| t))?;
    Ok((reduced, echoed))
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

/// [`ReplicaReduce`] for replicas on different ranks with GPU stages: each copy of a stage
/// sends its gradients, one transfer each, through the NCCL thread to every other replica's
/// copy and sums all of them in replica order on its own stream, matching arrivals to rounds
/// by order.
pub(in crate::pipeline) struct NcclReduce {
    link: Arc<NcclLink>,
    layout: ReplicaLayout,
    /// By stage: other replicas' gradients as the NCCL thread delivers them.
    inboxes: Vec<Mutex<StageInbox>>,
    aborted: AtomicBool,
}

struct StageInbox {
    delivered: Receiver<ReplicaPiece>,
    arrivals: Arrivals,
}

impl NcclReduce {
    /// Registers this rank's stages with the NCCL thread (before any replica trains).
    pub fn start(
        link: Arc<NcclLink>,
        ranks: usize,
        replicas: usize,
        stages: usize,
    ) -> Result<Arc<dyn ReplicaReduce>, String> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..stages)
            .map(|_| {
                let (tx, rx) = unbounded();
                (tx, Mutex::new(StageInbox { delivered: rx, arrivals: Arrivals::default() }))
            })
            .unzip();
        link.jobs.send(Job::AttachReplicas(senders)).map_err(|_| gone())?;
        let layout = ReplicaLayout::new(stages, replicas, ranks);
        Ok(Arc::new(Self { link, layout, inboxes, aborted: AtomicBool::new(false) }))
    }
}

impl ReplicaReduce for NcclReduce {
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError> {
        let round = Round::new(&self.layout, stage, replica, grads)?;
        let count = round.mine().len();
        let Some(device) = round.mine().first().map(|g| g.device().clone()) else {
            return Ok(Vec::new());
        };
        let failed = |e: candle_core::Error| ReduceError::Failed(e.to_string());
        for (_, rank) in self.layout.twins(stage, replica) {
            for (index, grad) in round.mine().iter().enumerate() {
                let tensor = HandOff::send(grad.clone()).map_err(failed)?;
                let payload = Payload::ReplicaGrad { stage, replica, index, count };
                self.link
                    .jobs
                    .send(Job::SendReplica { rank, payload, tensor })
                    .map_err(|_| ReduceError::Failed(gone()))?;
            }
        }
        // A stage thread panicking mid-wait leaves only whole entries behind.
        let mut inbox = self.inboxes[stage].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let StageInbox { delivered, arrivals } = &mut *inbox;
        round.gather(arrivals, &self.aborted, |arrivals, _| {
            match delivered.recv_timeout(Duration::from_millis(50)) {
                Ok((r, index, count, tensor)) => {
                    // Onto the stage's stream as it arrives: it waits for the receive's event.
                    let tensor = tensor.receive(&device).map_err(failed)?;
                    arrivals.piece(r, index, count, tensor).map_err(ReduceError::Failed)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(ReduceError::Failed(gone())),
            }
            Ok(())
        })
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
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
