//! The cross-process transport: stages as MPI ranks (`mpi` feature). One communication thread
//! per process initialises MPI, owns every MPI call and finalises MPI when the process is done;
//! everything else talks to it through channels, so the stage runtime is unchanged.
//!
//! The files, one question each:
//! - this file, [`Ranks`]: the process's handle on the job (rank, size, collectives, abort,
//!   bytes sent), and the jobs it hands to the communication thread;
//! - `comm.rs`: the communication thread itself, the only code that calls MPI;
//! - `wire.rs`: how a hand-off becomes a header and its data (sent and received in place), and
//!   one replica's gradients one byte message, and back;
//! - `reduce.rs`: [`MpiReduce`], data parallelism's gradient sum when the replicas are ranks;
//! - `bell.rs`: the doorbell the communication thread sleeps on, rung by this process and by
//!   the ranks on its host after they send it something;
//! - `health.rs`: how the job ends when a rank fails, dies or hangs (one `error:` line, the
//!   stuck-rank watchdog).
//!
//! How it works:
//! - A hand-off to a stage on another rank goes into that stage's proxy inbox (a channel the
//!   communication thread drains) and leaves as a header and its data, read from the tensor
//!   where it lies (`wire.rs`). Sends are non-blocking (`MPI_Isend`; the buffer lives until the
//!   request completes), so the transport contract holds across processes.
//! - Incoming hand-offs are found with `MPI_Improbe` and delivered into the local stage's inbox,
//!   where its `Mailbox` matches them by key like any other.
//! - Collectives (the end-of-step sums, the checkpoint's plan, start-up checks) are
//!   non-blocking too (`MPI_Iallreduce`, `MPI_Iallgather`, `MPI_Ibarrier`), tested while the
//!   hand-offs keep flowing.
//! - Open MPI's blocking calls spin a core; the communication thread never blocks in MPI. Idle,
//!   it sleeps on its bell (`bell.rs`: no spinning, no yielding) until woken (`Wake`: a job, a
//!   hand-off sent to another rank, a stage starting to wait on another rank, a message from a
//!   rank on its host) or until its next probe is due (`comm.rs`): every 1 ms while a stage of
//!   this rank waits on another rank and every rank rings it, every 25 to 100 µs while one
//!   waits on a rank that cannot ring it (another host) or a collective runs, every 1 ms while
//!   its own sends are in flight, every 4 ms otherwise: a message that comes while the stages
//!   compute waits for nobody, and the polls would take the cores they compute on.
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

mod bell;
mod comm;
mod health;
mod reduce;
mod wire;

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{bounded, unbounded, Receiver, SendError, Sender};

use self::bell::Bell;
use self::health::Health;
pub use self::health::DEFAULT_RANK_TIMEOUT;
pub(in crate::pipeline) use self::reduce::MpiReduce;
use crate::pipeline::protocol::Msg;
use crate::pipeline::transport::{owner_of, Route};

/// No abort requested (`Ranks::abort` stores the exit code).
const NO_ABORT: i32 = i32::MIN;

/// This process's place among the ranks of an MPI job, and the thread that talks MPI for it.
pub struct Ranks {
    rank: usize,
    size: usize,
    jobs: Jobs,
    abort: Arc<AtomicI32>,
    /// Bytes this process sent to each rank: pipeline hand-offs, and replica gradients.
    sent: Arc<Sent>,
    health: Arc<Health>,
    wake: Arc<Wake>,
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

/// How the rest of the process, and the other ranks on its host, wake the communication
/// thread, which sleeps on its [`Bell`] between probes (crossbeam's blocking receives spin and
/// `sched_yield` before they sleep: eight yields a wait, the larger part of the thread's CPU
/// when it waited on its channels).
pub(super) struct Wake {
    bell: Bell,
    /// The bell's count when the communication thread last looked (only that thread uses it).
    seen: AtomicU32,
    /// Stages of this process now waiting for a hand-off from another rank: while any does, the
    /// thread probes at its fastest.
    remote_waits: AtomicUsize,
}

impl Wake {
    fn new() -> Result<Self, String> {
        let bell = Bell::new()?;
        let seen = AtomicU32::new(bell.rings());
        Ok(Self { bell, seen, remote_waits: AtomicUsize::new(0) })
    }

    pub fn ring(&self) {
        self.bell.ring();
    }

    /// Whether it was rung since the last call (called before looking for work: a ring after
    /// this call makes the next [`Wake::sleep`] return at once).
    pub fn take_ring(&self) -> bool {
        let now = self.bell.rings();
        self.seen.swap(now, Ordering::SeqCst) != now
    }

    /// Sleeps until rung (since the last [`Wake::take_ring`]) or until `timeout` passes.
    pub fn sleep(&self, timeout: Duration) {
        self.bell.wait(self.seen.load(Ordering::SeqCst), timeout);
    }

    /// The name this process's bell is opened by on its host (`None`: peers cannot ring it).
    pub fn bell_name(&self) -> Option<String> {
        self.bell.name()
    }

    /// Removes the bell's file once the peers on this host have mapped it.
    pub fn unlink_bell(&self) {
        self.bell.unlink();
    }

    pub fn anyone_waits(&self) -> bool {
        self.remote_waits.load(Ordering::SeqCst) > 0
    }
}

/// The communication thread's job queue: every job wakes it.
struct Jobs {
    queue: Sender<Job>,
    wake: Arc<Wake>,
}

impl Jobs {
    fn send(&self, job: Job) -> Result<(), SendError<Job>> {
        self.queue.send(job)?;
        self.wake.ring();
        Ok(())
    }
}

/// One stage's wait for a hand-off from another rank, from `PeerWatch::waiting_on` until
/// dropped.
pub(in crate::pipeline) struct RemoteWait<'a>(&'a Wake);

impl Drop for RemoteWait<'_> {
    fn drop(&mut self) {
        self.0.remote_waits.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stage's hook into MPI for its exchanges with the other devices of its replica (`replica`,
/// of `stages` stages, `slots` stages in all): it wakes the communication thread when the
/// stage sends a hand-off to another rank or starts waiting for one, and the stuck-rank
/// watchdog checks the awaited rank while a wait lasts.
pub(in crate::pipeline) struct PeerWatch {
    ranks: Arc<Ranks>,
    replica: usize,
    stages: usize,
    slots: usize,
}

impl PeerWatch {
    pub(in crate::pipeline) fn new(ranks: Arc<Ranks>, replica: usize, stages: usize, slots: usize) -> Self {
        Self { ranks, replica, stages, slots }
    }

    fn rank_of(&self, device: usize) -> usize {
        owner_of(self.replica * self.stages + device, self.slots, self.ranks.size())
    }

    fn is_remote(&self, device: usize) -> bool {
        self.rank_of(device) != self.ranks.rank
    }

    /// The stage has put a hand-off for `device` in its inbox: when that is a proxy (the device
    /// lives on another rank), the communication thread is woken to send it.
    pub(in crate::pipeline) fn sent_to(&self, device: usize) {
        if self.is_remote(device) {
            self.ranks.wake.ring();
        }
    }

    /// The stage starts waiting for a hand-off from `device`. When that device lives on another
    /// rank, the communication thread is woken to look for it, and keeps looking at its fastest
    /// until the returned wait is dropped; `None` for a device of this process.
    pub(in crate::pipeline) fn waiting_on(&self, device: usize) -> Option<RemoteWait<'_>> {
        if !self.is_remote(device) {
            return None;
        }
        let wake = &*self.ranks.wake;
        wake.remote_waits.fetch_add(1, Ordering::SeqCst);
        wake.ring();
        Some(RemoteWait(wake))
    }

    /// The watchdog: ends the job, naming the rank, if `device`'s rank (waited on for `key`)
    /// has sent nothing here for longer than the rank timeout.
    pub(in crate::pipeline) fn check(&self, device: usize, key: Route) {
        self.ranks.check_peer(self.rank_of(device), || key.describe())
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
        let (queue, job_rx) = unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let abort = Arc::new(AtomicI32::new(NO_ABORT));
        let abort_flag = abort.clone();
        let wake = Arc::new(Wake::new()?);
        let jobs = Jobs { queue, wake: wake.clone() };
        let comm_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("brigade-mpi".into())
            .spawn(move || comm::communicate(job_rx, ready_tx, abort_flag, comm_wake))
            .map_err(|e| format!("cannot start the MPI thread: {e}"))?;
        let (rank, size, sent, health) =
            ready_rx.recv().map_err(|_| "the MPI thread ended during start-up".to_string())??;
        Ok(Arc::new(Self { rank, size, jobs, abort, sent, health, wake, thread: Mutex::new(Some(thread)) }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// How many ranks of this job run on this host, this one included.
    pub fn ranks_on_host(&self) -> usize {
        self.health.ranks_on_host()
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
        self.wake.ring();
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

    /// Wakes the communication thread for something queued outside its job queue and stages'
    /// hand-offs: the NCCL thread's headers, which its proxy inboxes carry.
    #[cfg(feature = "nccl")]
    pub(in crate::pipeline) fn wake(&self) {
        self.wake.ring();
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The communication thread's sleep, as `comm.rs` does it: on the bell until rung or `limit`.
    fn sleep_until_rung(wake: &Wake, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if wake.take_ring() {
                return true;
            }
            wake.sleep(limit.saturating_sub(started.elapsed()));
        }
        wake.take_ring()
    }

    #[test]
    fn a_ring_wakes_the_sleeping_thread_at_once_and_is_not_lost_before_it_sleeps() {
        let wake = Arc::new(Wake::new().unwrap());
        let (registered, is_registered) = bounded(0);
        let sleeper = {
            let wake = wake.clone();
            std::thread::spawn(move || {
                registered.send(()).unwrap();
                let started = Instant::now();
                let first = sleep_until_rung(&wake, Duration::from_secs(20));
                let first_took = started.elapsed();
                // The second ring comes before this thread sleeps again.
                std::thread::sleep(Duration::from_millis(50));
                let second = sleep_until_rung(&wake, Duration::from_secs(20));
                (first, first_took, second, started.elapsed())
            })
        };
        is_registered.recv().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        wake.ring();
        wake.ring();
        std::thread::sleep(Duration::from_millis(5));
        wake.ring();
        let (first, first_took, second, total) = sleeper.join().unwrap();
        assert!(first && second, "both rings heard");
        assert!(first_took < Duration::from_secs(5), "woken by the ring, not the 20 s limit: {first_took:?}");
        assert!(total < Duration::from_secs(5), "the early ring was kept: {total:?}");
        assert!(!wake.take_ring(), "each ring is heard once");
    }
}
