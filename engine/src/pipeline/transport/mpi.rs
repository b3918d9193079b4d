//! The cross-process transport: stages as MPI ranks (`mpi` feature). One communication thread
//! per process initialises MPI, owns every MPI call and finalises MPI when the process is done;
//! everything else talks to it through channels, so the stage runtime is unchanged.
//!
//! - A hand-off to a stage on another rank goes into that stage's proxy inbox (a channel the
//!   communication thread drains) and leaves as one byte message: a safetensors buffer whose
//!   metadata is the header (kind, receiving chunk, micro-batch, receiving device) and whose one
//!   tensor carries dtype, shape and data. Sends are non-blocking (`MPI_Isend`; the buffer lives
//!   until the request completes), so the transport contract holds across processes.
//! - Incoming hand-offs are found with `MPI_Improbe` and delivered into the local stage's inbox,
//!   where its `Mailbox` matches them by key like any other.
//! - Collectives (the end-of-step sums, the checkpoint's plan, start-up checks) are
//!   non-blocking too (`MPI_Iallreduce`, `MPI_Iallgather`, `MPI_Ibarrier`), tested while the
//!   hand-offs keep flowing.
//! - Open MPI's blocking calls spin a core; this thread never blocks in MPI. Idle, it waits on
//!   its channels (a send wakes it at once) with a timeout that backs off from 10 µs to 200 µs
//!   before it probes again, so it does not eat a core of a 2-core machine.
//!
//! - Data parallelism ([`MpiReduce`]): each replica's copy of a stage sends its gradients to the
//!   ranks holding the other replicas' copies (one point-to-point message each, its own tag)
//!   and sums what it receives in replica order, exactly as the in-process reduction does. Point
//!   to point rather than an all-reduce because a rank with several stages reaches their
//!   reductions in whatever order its stage threads finish, and MPI collectives must be entered
//!   in one order on every rank; and because a sum in replica order gives the same bits as one
//!   process, whatever MPI's reduction order would be.
//!
//! Stage ownership: with `S` stages, `D` data-parallel replicas and `W` ranks (`W/D` divides
//! `S`), slot `r × S + s` (stage `s` of replica `r`) belongs to rank `slot / (S·D/W)`: rank
//! `replica × W/D + j` runs the `j`-th contiguous block of its replica's stages; one stage per
//! rank is the usual layout.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender, TryRecvError};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{owner_of, Mailbox, Route, RouteKind};
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::Msg;
use crate::pipeline::replicas::{sum_in_replica_order, ReduceError, ReplicaReduce};

/// The MPI tag of hand-off messages (collectives do not match point-to-point tags).
const HANDOFF_TAG: i32 = 20;
/// The MPI tag of one replica's gradients of one stage, sent to the other replicas' copies.
const REPLICA_TAG: i32 = 21;
/// No abort requested (`Ranks::abort` stores the exit code).
const NO_ABORT: i32 = i32::MIN;
const MIN_IDLE: Duration = Duration::from_micros(10);
const MAX_IDLE: Duration = Duration::from_micros(200);

/// This process's place among the ranks of an MPI job, and the thread that talks MPI for it.
pub struct Ranks {
    rank: usize,
    size: usize,
    jobs: Sender<Job>,
    abort: Arc<AtomicI32>,
    /// Hand-off bytes this process sent to each rank.
    sent: Arc<Vec<AtomicU64>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranks").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

/// The channels of one pipeline: proxy inboxes of the stages other ranks own (their hand-offs
/// leave through MPI) and the inboxes of this rank's own stages (incoming hand-offs go there).
pub(in crate::pipeline) struct Attachment {
    /// (device, owning rank, the proxy inbox's receiving end).
    pub outgoing: Vec<(usize, usize, Receiver<Msg>)>,
    /// (device, its stage's inbox).
    pub incoming: Vec<(usize, Sender<Msg>)>,
}

/// One replica's gradients of one stage, as received: (replica, gradients).
type ReplicaGrads = (usize, Vec<Tensor>);

enum Job {
    Attach(Attachment),
    /// Where each local stage's replica gradients go: (stage, its channel).
    AttachReplicas(Vec<(usize, Sender<ReplicaGrads>)>),
    /// A replica-gradient message to a rank.
    SendReplica(usize, Vec<u8>),
    SumF64(Vec<f64>, Sender<Vec<f64>>),
    SumF32(Vec<f32>, Sender<Vec<f32>>),
    Gather(Vec<u8>, Sender<Vec<Vec<u8>>>),
    Barrier(Sender<()>),
    Shutdown,
}

impl Ranks {
    /// Initialises MPI on a new communication thread (the process must have been started by
    /// mpirun or srun, or run alone as a one-rank world).
    pub fn start() -> Result<Arc<Self>, String> {
        let (jobs, job_rx) = unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let abort = Arc::new(AtomicI32::new(NO_ABORT));
        let abort_flag = abort.clone();
        let thread = std::thread::Builder::new()
            .name("brigade-mpi".into())
            .spawn(move || communicate(job_rx, ready_tx, abort_flag))
            .map_err(|e| format!("cannot start the MPI thread: {e}"))?;
        let (rank, size, sent) = ready_rx.recv().map_err(|_| "the MPI thread ended during start-up".to_string())??;
        Ok(Arc::new(Self { rank, size, jobs, abort, sent, thread: Mutex::new(Some(thread)) }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Hand-off bytes this process has sent to each rank so far.
    pub fn bytes_sent(&self) -> Vec<u64> {
        self.sent.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// Ends every rank of the job (`MPI_Abort`), from whichever thread asks.
    pub fn abort(&self, code: i32) -> ! {
        self.abort.store(code, Ordering::SeqCst);
        // The communication thread checks the flag every turn; should it be gone, exit anyway
        // (the launcher then ends the other ranks, seeing this one fail).
        std::thread::sleep(Duration::from_secs(10));
        std::process::exit(code)
    }

    /// Element-wise sums over all ranks (every rank gets the same result).
    pub fn sum_f64(&self, values: Vec<f64>) -> Result<Vec<f64>, String> {
        self.call(|reply| Job::SumF64(values, reply))
    }

    pub fn sum_f32(&self, values: Vec<f32>) -> Result<Vec<f32>, String> {
        self.call(|reply| Job::SumF32(values, reply))
    }

    /// Every rank's `bytes`, by rank.
    pub fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
        self.call(|reply| Job::Gather(bytes, reply))
    }

    pub fn barrier(&self) -> Result<(), String> {
        self.call(Job::Barrier)
    }

    pub(in crate::pipeline) fn attach(&self, attachment: Attachment) -> Result<(), String> {
        self.jobs.send(Job::Attach(attachment)).map_err(|_| gone())
    }

    fn call<T>(&self, job: impl FnOnce(Sender<T>) -> Job) -> Result<T, String> {
        let (tx, rx) = bounded(1);
        self.jobs.send(job(tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }
}

fn gone() -> String {
    "the MPI communication thread is gone".into()
}

impl Drop for Ranks {
    /// Finalises MPI once the last user is done (the thread completes its sends first).
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Shutdown);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

type Ready = Result<(usize, usize, Arc<Vec<AtomicU64>>), String>;

/// The communication thread: MPI's whole life, from initialisation to finalisation.
fn communicate(jobs: Receiver<Job>, ready: Sender<Ready>, abort: Arc<AtomicI32>) {
    // Only this thread ever calls MPI.
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = ready.send(Err("MPI was already initialised in this process".into()));
        return;
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let sent = Arc::new((0..size).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    if ready.send(Ok((rank, size, sent.clone()))).is_err() {
        return;
    }
    let mut comm = Comm {
        world,
        rank,
        abort,
        sent,
        outgoing: Vec::new(),
        incoming: HashMap::new(),
        early: Vec::new(),
        replica_inboxes: HashMap::new(),
        early_replicas: Vec::new(),
        in_flight: Vec::new(),
        idle: MIN_IDLE,
    };
    loop {
        let busy = comm.pump();
        match jobs.try_recv() {
            Ok(Job::Shutdown) | Err(TryRecvError::Disconnected) => break,
            Ok(job) => comm.run(job),
            Err(TryRecvError::Empty) if busy => comm.idle = MIN_IDLE,
            Err(TryRecvError::Empty) => comm.wait(&jobs),
        }
    }
    // Every hand-off sent must be delivered before MPI_Finalize.
    while !comm.in_flight.is_empty() {
        if !comm.pump() {
            std::thread::sleep(MIN_IDLE);
        }
    }
    drop(comm);
    drop(universe);
}

/// A non-blocking send and the buffer it reads, freed once the request completes.
struct InFlight {
    request: Option<Request<'static, [u8], StaticScope>>,
    buffer: *mut [u8],
}

struct Comm {
    world: SimpleCommunicator,
    rank: usize,
    abort: Arc<AtomicI32>,
    sent: Arc<Vec<AtomicU64>>,
    outgoing: Vec<(usize, usize, Receiver<Msg>)>,
    incoming: HashMap<usize, Sender<Msg>>,
    /// Hand-offs that arrived before this rank's pipeline attached (a faster peer).
    early: Vec<(usize, Msg)>,
    /// By stage: where other replicas' gradients of it go, and those that came before that.
    replica_inboxes: HashMap<usize, Sender<ReplicaGrads>>,
    early_replicas: Vec<(usize, ReplicaGrads)>,
    in_flight: Vec<InFlight>,
    idle: Duration,
}

impl Comm {
    fn run(&mut self, job: Job) {
        match job {
            Job::Attach(attachment) => {
                self.outgoing = attachment.outgoing;
                self.incoming = attachment.incoming.into_iter().collect();
                for (device, msg) in std::mem::take(&mut self.early) {
                    self.deliver(device, msg);
                }
            }
            Job::AttachReplicas(inboxes) => {
                self.replica_inboxes = inboxes.into_iter().collect();
                for (stage, grads) in std::mem::take(&mut self.early_replicas) {
                    self.deliver_replica(stage, grads);
                }
            }
            Job::SendReplica(rank, bytes) => self.send(rank, bytes, REPLICA_TAG),
            Job::SumF64(values, reply) => {
                let sum = self.sum(values);
                let _ = reply.send(sum);
            }
            Job::SumF32(values, reply) => {
                let sum = self.sum(values);
                let _ = reply.send(sum);
            }
            Job::Gather(bytes, reply) => {
                let gathered = self.gather(bytes);
                let _ = reply.send(gathered);
            }
            Job::Barrier(reply) => {
                let mut request = self.world.immediate_barrier();
                loop {
                    match request.test() {
                        Ok(_) => break,
                        Err(pending) => request = pending,
                    }
                    self.progress();
                }
                let _ = reply.send(());
            }
            Job::Shutdown => {}
        }
    }

    /// Waits for a send into a proxy inbox or a job, at most the current back-off.
    fn wait(&mut self, jobs: &Receiver<Job>) {
        let mut select = Select::new();
        select.recv(jobs);
        for (_, _, rx) in &self.outgoing {
            select.recv(rx);
        }
        let _ = select.ready_timeout(self.idle);
        self.idle = (self.idle * 2).min(MAX_IDLE);
    }

    /// One turn of a wait inside a collective: keep hand-offs flowing, back off when idle.
    fn progress(&mut self) {
        if self.pump() {
            self.idle = MIN_IDLE;
        } else {
            std::thread::sleep(self.idle);
            self.idle = (self.idle * 2).min(MAX_IDLE);
        }
    }

    /// Sends what the proxy inboxes hold, retires finished sends, delivers what has arrived.
    /// Whether anything happened.
    fn pump(&mut self) -> bool {
        let code = self.abort.load(Ordering::SeqCst);
        if code != NO_ABORT {
            self.world.abort(code);
        }
        let mut busy = false;
        let mut outbound = Vec::new();
        for (device, rank, rx) in &self.outgoing {
            while let Ok(msg) = rx.try_recv() {
                // Control messages to a proxy (abort, shutdown) concern the stage's own rank.
                if let Ok((key, tensor)) = Mailbox::handoff_of(msg) {
                    outbound.push((*rank, *device, key, tensor));
                }
            }
        }
        for (rank, device, key, tensor) in outbound {
            busy = true;
            match encode(device, key, tensor) {
                Ok(bytes) => self.send(rank, bytes, HANDOFF_TAG),
                Err(e) => self.fail(&format!("cannot send a hand-off to rank {rank}: {e}")),
            }
        }
        let before = self.in_flight.len();
        self.in_flight.retain_mut(|flight| match flight.request.take().map(Request::test) {
            Some(Ok(_)) | None => {
                // SAFETY: the request that read the buffer has completed; it came from Box::leak.
                unsafe { drop(Box::from_raw(flight.buffer)) };
                false
            }
            Some(Err(pending)) => {
                flight.request = Some(pending);
                true
            }
        });
        busy |= self.in_flight.len() != before;
        while let Some(probed) = self.world.any_process().immediate_matched_probe_with_tag(HANDOFF_TAG) {
            busy = true;
            let (bytes, status) = probed.matched_receive_vec::<u8>();
            match decode(&bytes) {
                Ok((device, msg)) => self.deliver(device, msg),
                Err(e) => self.fail(&format!("a hand-off from rank {} is corrupt: {e}", status.source_rank())),
            }
        }
        while let Some(probed) = self.world.any_process().immediate_matched_probe_with_tag(REPLICA_TAG) {
            busy = true;
            let (bytes, status) = probed.matched_receive_vec::<u8>();
            match decode_replica(&bytes) {
                Ok((stage, grads)) => self.deliver_replica(stage, grads),
                Err(e) => self.fail(&format!("replica gradients from rank {} are corrupt: {e}", status.source_rank())),
            }
        }
        busy
    }

    fn deliver_replica(&mut self, stage: usize, grads: ReplicaGrads) {
        match self.replica_inboxes.get(&stage) {
            // A closed channel is a pipeline that has stopped: nothing waits for the sum.
            Some(inbox) => drop(inbox.send(grads)),
            None => self.early_replicas.push((stage, grads)),
        }
    }

    fn send(&mut self, rank: usize, bytes: Vec<u8>, tag: i32) {
        if let Some(count) = self.sent.get(rank) {
            count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        let buffer: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let raw = buffer as *const [u8] as *mut [u8];
        let request = self.world.process_at_rank(rank as i32).immediate_send_with_tag(StaticScope, buffer, tag);
        self.in_flight.push(InFlight { request: Some(request), buffer: raw });
    }

    fn deliver(&mut self, device: usize, msg: Msg) {
        match self.incoming.get(&device) {
            // A closed inbox is a stage that has stopped: nothing waits for its data.
            Some(inbox) => drop(inbox.send(msg)),
            None => self.early.push((device, msg)),
        }
    }

    /// A broken hand-off cannot be recovered: end the job, saying why.
    fn fail(&self, why: &str) -> ! {
        eprintln!("error: rank {}: {why}", self.rank);
        self.world.abort(1)
    }

    fn sum<T: Equivalence + Default + Clone>(&mut self, values: Vec<T>) -> Vec<T> {
        let mut sums = vec![T::default(); values.len()];
        mpi::request::scope(|scope| {
            let mut request =
                self.world.immediate_all_reduce_into(scope, &values[..], &mut sums[..], SystemOperation::sum());
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => request = pending,
                }
                self.progress();
            }
        });
        sums
    }

    fn gather(&mut self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let size = self.world.size() as usize;
        let lengths = self.all_gather(vec![bytes.len() as u64], size);
        let longest = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = bytes;
        padded.resize(longest, 0);
        let all = self.all_gather(padded, size);
        lengths.iter().enumerate().map(|(r, &len)| all[r * longest..r * longest + len as usize].to_vec()).collect()
    }

    fn all_gather<T: Equivalence + Default + Clone>(&mut self, values: Vec<T>, size: usize) -> Vec<T> {
        let mut all = vec![T::default(); values.len() * size];
        mpi::request::scope(|scope| {
            let mut request = self.world.immediate_all_gather_into(scope, &values[..], &mut all[..]);
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => request = pending,
                }
                self.progress();
            }
        });
        all
    }
}

/// One hand-off as one byte message: a safetensors buffer (dtype, shape and data of tensor `t`)
/// whose metadata is the routing header.
fn encode(device: usize, key: Route, tensor: HandOff) -> Result<Vec<u8>, String> {
    let tensor = tensor.receive(&Device::Cpu).map_err(|e| e.to_string())?;
    let kind = match key.kind {
        RouteKind::Activation => "activation",
        RouteKind::Gradient => "gradient",
    };
    let header: HashMap<String, String> = [
        ("kind", kind.to_string()),
        ("chunk", key.chunk.to_string()),
        ("microbatch", key.microbatch.to_string()),
        ("device", device.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize([("t", &tensor)], Some(header)).map_err(|e| e.to_string())
}

fn decode(bytes: &[u8]) -> Result<(usize, Msg), String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let header = meta.metadata().as_ref().ok_or("no header")?;
    let field = |name: &str| -> Result<usize, String> {
        header.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {name} in the header"))
    };
    let (chunk, microbatch, device) = (field("chunk")?, field("microbatch")?, field("device")?);
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let tensor: Tensor = tensors.remove("t").ok_or("no tensor")?;
    let tensor = HandOff::send(tensor).map_err(|e| e.to_string())?;
    let msg = match header.get("kind").map(String::as_str) {
        Some("activation") => Msg::Activation { chunk, microbatch, tensor },
        Some("gradient") => Msg::Gradient { chunk, microbatch, tensor },
        other => return Err(format!("unknown kind {other:?}")),
    };
    Ok((device, msg))
}

/// One replica's gradients of one stage as one byte message: a safetensors buffer with the
/// tensors named by position and (stage, replica, count) in its metadata.
fn encode_replica(stage: usize, replica: usize, grads: &[Tensor]) -> Result<Vec<u8>, String> {
    let on_cpu: Vec<(String, Tensor)> = grads
        .iter()
        .enumerate()
        .map(|(i, g)| Ok((i.to_string(), g.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    let header: HashMap<String, String> = [
        ("stage".to_string(), stage.to_string()),
        ("replica".to_string(), replica.to_string()),
        ("count".to_string(), grads.len().to_string()),
    ]
    .into_iter()
    .collect();
    safetensors::serialize(on_cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(header)).map_err(|e| e.to_string())
}

/// (stage, (replica, gradients in order)).
fn decode_replica(bytes: &[u8]) -> Result<(usize, ReplicaGrads), String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let header = meta.metadata().as_ref().ok_or("no header")?;
    let field = |name: &str| -> Result<usize, String> {
        header.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {name} in the header"))
    };
    let (stage, replica, count) = (field("stage")?, field("replica")?, field("count")?);
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let grads = (0..count)
        .map(|i| tensors.remove(&i.to_string()).ok_or_else(|| format!("no gradient {i} of {count}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((stage, (replica, grads)))
}

/// [`ReplicaReduce`] for replicas on different ranks: each copy of a stage sends its gradients
/// to every other replica's copy and sums all of them in replica order (the in-process sum,
/// bit for bit). A stage's round `n + 1` cannot start anywhere before every rank has passed
/// the end-of-step collective of round `n`, so arrivals are matched to rounds by order alone.
pub(in crate::pipeline) struct MpiReduce {
    ranks: Arc<Ranks>,
    replicas: usize,
    stages: usize,
    /// By stage: other replicas' gradients as they arrive, and those not yet summed.
    arrivals: Vec<Mutex<Arrivals>>,
    aborted: AtomicBool,
}

struct Arrivals {
    inbox: Receiver<ReplicaGrads>,
    waiting: HashMap<usize, VecDeque<Vec<Tensor>>>,
}

impl MpiReduce {
    /// Registers this rank's stages with the communication thread (before any replica trains).
    pub fn start(ranks: Arc<Ranks>, replicas: usize, stages: usize) -> Result<Arc<dyn ReplicaReduce>, String> {
        let (senders, arrivals): (Vec<_>, Vec<_>) = (0..stages)
            .map(|stage| {
                let (tx, rx) = unbounded();
                ((stage, tx), Mutex::new(Arrivals { inbox: rx, waiting: HashMap::new() }))
            })
            .unzip();
        ranks.jobs.send(Job::AttachReplicas(senders)).map_err(|_| gone())?;
        Ok(Arc::new(Self { ranks, replicas, stages, arrivals, aborted: AtomicBool::new(false) }))
    }
}

impl ReplicaReduce for MpiReduce {
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError> {
        if replica >= self.replicas || stage >= self.stages {
            return Err(ReduceError::Failed(format!(
                "stage {stage} of replica {replica}, with {} stages x {} replicas",
                self.stages, self.replicas
            )));
        }
        let bytes = encode_replica(stage, replica, &grads).map_err(ReduceError::Failed)?;
        let slots = self.stages * self.replicas;
        for other in (0..self.replicas).filter(|&r| r != replica) {
            let rank = owner_of(other * self.stages + stage, slots, self.ranks.size());
            self.ranks.jobs.send(Job::SendReplica(rank, bytes.clone())).map_err(|_| ReduceError::Failed(gone()))?;
        }
        let mut contributions: Vec<Option<Vec<Tensor>>> = vec![None; self.replicas];
        contributions[replica] = Some(grads);
        // A stage thread panicking mid-wait leaves only whole entries behind.
        let mut arrivals = self.arrivals[stage].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            for (r, slot) in contributions.iter_mut().enumerate().filter(|(_, c)| c.is_none()) {
                *slot = arrivals.waiting.get_mut(&r).and_then(VecDeque::pop_front);
            }
            if contributions.iter().all(Option::is_some) {
                break;
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(ReduceError::Aborted);
            }
            match arrivals.inbox.recv_timeout(Duration::from_millis(50)) {
                Ok((r, g)) => arrivals.waiting.entry(r).or_default().push_back(g),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(ReduceError::Failed(gone())),
            }
        }
        drop(arrivals);
        sum_in_replica_order(contributions.into_iter().flatten().collect())
            .map_err(|e| ReduceError::Failed(e.to_string()))
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_off_survives_its_byte_message_with_key_dtype_shape_and_bits() {
        let tensor = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        let tensor = (tensor / 7.0).unwrap();
        let bytes = encode(3, Route::gradient(5, 7), HandOff::send(tensor.clone()).unwrap()).unwrap();
        let (device, msg) = decode(&bytes).unwrap();
        assert_eq!(device, 3);
        let (key, got) = Mailbox::handoff_of(msg).ok().unwrap();
        assert_eq!(key, Route::gradient(5, 7));
        let got = got.receive(&Device::Cpu).unwrap();
        assert_eq!(got.dims(), &[2, 3, 4]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(decode(&bytes[..bytes.len() / 2]).is_err(), "a truncated message is an error, not a panic");
    }

    #[test]
    fn replica_gradients_survive_their_byte_message_in_order() {
        let grads: Vec<Tensor> =
            (0..12).map(|i| (Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap() / (i as f64 + 3.0)).unwrap()).collect();
        let bytes = encode_replica(3, 1, &grads).unwrap();
        let (stage, (replica, got)) = decode_replica(&bytes).unwrap();
        assert_eq!((stage, replica, got.len()), (3, 1, 12));
        for (want, got) in grads.iter().zip(&got) {
            assert_eq!(want.to_vec1::<f32>().unwrap(), got.to_vec1::<f32>().unwrap());
        }
        assert!(decode_replica(&bytes[..bytes.len() / 2]).is_err());
    }
}
