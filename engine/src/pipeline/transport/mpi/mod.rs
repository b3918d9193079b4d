//! The cross-process transport: stages as MPI ranks (`mpi` feature). One communication thread
//! per process initialises MPI, owns every MPI call and finalises MPI when the process is done;
//! everything else talks to it through channels, so the stage runtime is unchanged.
//!
//! The files, one question each:
//! - this file, [`Ranks`]: the process's handle on the job (rank, size, collectives, abort,
//!   bytes sent), and the jobs it hands to the communication thread;
//! - `comm.rs`: the communication thread itself, the only code that calls MPI;
//! - `wire.rs`: how a hand-off and one replica's gradients become one byte message and back;
//! - `reduce.rs`: [`MpiReduce`], data parallelism's gradient sum when the replicas are ranks;
//! - `health.rs`: how the job ends when a rank fails, dies or hangs (one `error:` line, the
//!   stuck-rank watchdog).
//!
//! How it works:
//! - A hand-off to a stage on another rank goes into that stage's proxy inbox (a channel the
//!   communication thread drains) and leaves as one byte message (`wire.rs`). Sends are
//!   non-blocking (`MPI_Isend`; the buffer lives until the request completes), so the transport
//!   contract holds across processes.
//! - Incoming hand-offs are found with `MPI_Improbe` and delivered into the local stage's inbox,
//!   where its `Mailbox` matches them by key like any other.
//! - Collectives (the end-of-step sums, the checkpoint's plan, start-up checks) are
//!   non-blocking too (`MPI_Iallreduce`, `MPI_Iallgather`, `MPI_Ibarrier`), tested while the
//!   hand-offs keep flowing.
//! - Open MPI's blocking calls spin a core; the communication thread never blocks in MPI. Idle,
//!   it waits on its channels (a send wakes it at once) with a timeout that backs off from
//!   10 µs to 200 µs before it probes again, so it does not eat a core of a 2-core machine.
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

mod comm;
mod health;
mod reduce;
mod wire;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use self::health::Health;
pub use self::health::DEFAULT_RANK_TIMEOUT;
pub(in crate::pipeline) use self::reduce::MpiReduce;
use crate::pipeline::protocol::Msg;

/// No abort requested (`Ranks::abort` stores the exit code).
const NO_ABORT: i32 = i32::MIN;

/// This process's place among the ranks of an MPI job, and the thread that talks MPI for it.
pub struct Ranks {
    rank: usize,
    size: usize,
    jobs: Sender<Job>,
    abort: Arc<AtomicI32>,
    /// Bytes this process sent to each rank: pipeline hand-offs, and replica gradients.
    sent: Arc<Sent>,
    health: Arc<Health>,
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

/// Bytes this process has sent to each rank, by what they carried (the wire format's bytes:
/// tensor data plus its header; notices and collectives are not counted).
pub(super) struct Sent {
    /// Activations and gradients between a replica's stages.
    pub handoffs: Vec<AtomicU64>,
    /// Gradients a stage sends to its other replicas' copies (data parallelism's reduction).
    pub replicas: Vec<AtomicU64>,
}

impl Sent {
    fn new(size: usize) -> Self {
        Self {
            handoffs: (0..size).map(|_| AtomicU64::new(0)).collect(),
            replicas: (0..size).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn loaded(counts: &[AtomicU64]) -> Vec<u64> {
    counts.iter().map(|b| b.load(Ordering::Relaxed)).collect()
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
            .spawn(move || comm::communicate(job_rx, ready_tx, abort_flag))
            .map_err(|e| format!("cannot start the MPI thread: {e}"))?;
        let (rank, size, sent, health) =
            ready_rx.recv().map_err(|_| "the MPI thread ended during start-up".to_string())??;
        Ok(Arc::new(Self { rank, size, jobs, abort, sent, health, thread: Mutex::new(Some(thread)) }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes this process has sent to each rank so far (hand-offs and replica gradients).
    pub fn bytes_sent(&self) -> Vec<u64> {
        let (handoffs, replicas) = (self.handoff_bytes_sent(), self.replica_bytes_sent());
        handoffs.iter().zip(&replicas).map(|(h, r)| h + r).collect()
    }

    /// Activation and gradient hand-off bytes this process has sent to each rank so far.
    pub fn handoff_bytes_sent(&self) -> Vec<u64> {
        loaded(&self.sent.handoffs)
    }

    /// Replica-gradient bytes (data parallelism's reduction) sent to each rank so far.
    pub fn replica_bytes_sent(&self) -> Vec<u64> {
        loaded(&self.sent.replicas)
    }

    /// The stuck-rank watchdog's limit: a rank waiting on a peer that has sent it nothing for
    /// this long ends the job ([`DEFAULT_RANK_TIMEOUT`] unless set).
    pub fn set_rank_timeout(&self, timeout: Duration) {
        self.health.set_timeout(timeout);
    }

    /// The watchdog: ends the job, naming `peer`, if this rank waits on it for `what` and it
    /// has sent nothing here for longer than the rank timeout.
    pub fn check_peer(&self, peer: usize, what: impl FnOnce() -> String) {
        if peer == self.rank {
            return;
        }
        if let Some(why) = self.health.silent_too_long(peer, &what()) {
            self.fail(&why)
        }
    }

    /// Ends every rank of the job for a failure on this one: one `error: rank N: why` line (the
    /// first failure of this process prints; any later one stays quiet), then [`Ranks::abort`].
    pub fn fail(&self, why: &str) -> ! {
        self.health.report(why);
        self.abort(1)
    }

    /// Ends every rank of the job (`MPI_Abort`), from whichever thread asks. The other ranks are
    /// told first that this one ends the job on purpose, so they do not report it as vanished.
    pub fn abort(&self, code: i32) -> ! {
        self.health.stay_quiet();
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
