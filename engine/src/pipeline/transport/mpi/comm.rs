//! The communication thread: the only code in the process that calls MPI. It initialises MPI,
//! sends what the proxy inboxes hold, probes for and delivers what other ranks sent, runs the
//! collectives the rest of the process asks for (non-blocking, testing them while hand-offs keep
//! flowing), ends the job when asked to abort, and finalises MPI once every send has completed.
//!
//! How often it probes. Only a probe finds what other ranks sent, and every probe wakes this
//! thread on the cores the rank's stages compute on. Between probes it sleeps on its bell
//! (`bell.rs`), which wakes it at once for what starts in this process (a job, a hand-off to
//! send, a stage starting to wait on another rank) and for every message a rank on its host
//! sends it (they ring after sending). How long it sleeps follows who needs the answer:
//! - someone here waits on another rank (a stage for a hand-off; a stage for other replicas'
//!   gradients, from sending its own until theirs are in; a collective) that cannot ring it
//!   (another host): from [`MIN_IDLE`], doubling up to [`URGENT_IDLE`], since that message's
//!   latency is the step's;
//! - this rank's sends are in flight: [`SENDING_IDLE`], since some transports (TCP between
//!   nodes, shared memory without single-copy) move a large message only while the sender's
//!   MPI progresses (a receiver on this host rings once it has the data, so the send is
//!   retired at once);
//! - someone here waits, and every other rank rings this one: [`RUNG_IDLE`], a safety net (the
//!   message's ring wakes it). Inside a collective, the fast back-off starts once every rank has
//!   entered it (each rings as it enters), since MPI's own messages within it ring nobody;
//! - otherwise [`RELAXED_IDLE`] ([`RUNG_RELAXED_IDLE`] when every other rank rings this one):
//!   what arrives now waits for nobody, and is delivered before the stage needs it or as soon
//!   as its wait wakes this thread; the longer wait bounds how late the launcher's termination
//!   notice (a signal's flag) is seen.
//!
//! Measured on 2 cores, one rank per core (the side-by-side GPT, 2 stages 1F1B m=8): polling
//! every 200 µs whatever happened, the thread woke the compute thread's core thousands of times
//! a second, and waited through crossbeam's `Select`, which spins and calls `sched_yield` eight
//! times per wait before it sleeps. Backing off from 25 to 100 µs while a stage waited, it still
//! woke about 700 times and spent about 13 ms of CPU per step; with bells, see `bell.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::bell::Bell;
use super::health::{catch_termination, host_name, terminated, Health};
use super::wire::{decode_replica, Header, Landing, Payload};
use super::{Job, ReplicaGrads, Sent, Wake, NO_ABORT};
use crate::pipeline::protocol::Msg;
use crate::pipeline::transport::Mailbox;

/// The MPI tag of hand-off headers (collectives do not match point-to-point tags).
const HANDOFF_TAG: i32 = 20;
/// The MPI tag of a hand-off's data, on the payload communicator: only the data of a header
/// already received is probed for there, so the probe for everything else never takes one.
const PAYLOAD_TAG: i32 = 24;
/// The MPI tag of one replica's gradients of one stage, sent to the other replicas' copies.
const REPLICA_TAG: i32 = 21;
/// The MPI tag of the notice a rank sends every other as it enters a collective (its sequence
/// number, 8 bytes), so a rank stuck in one knows which peers have not arrived.
const ARRIVAL_TAG: i32 = 22;
/// The MPI tag of the (empty) notice a rank sends every other before it ends the job: it
/// reports its own failure, so they stay quiet.
const ENDING_TAG: i32 = 23;
/// How long a rank ending the job gives its notices to reach the others before `MPI_Abort`:
/// their communication threads are rung by it, or probe every [`RUNG_RELAXED_IDLE`] at most,
/// so this is ample, and short.
const ENDING_GRACE: Duration = Duration::from_millis(300);
/// The first wait between probes after anything happened.
const MIN_IDLE: Duration = Duration::from_micros(25);
/// The longest wait between probes while a stage or a collective waits on another rank.
const URGENT_IDLE: Duration = Duration::from_micros(100);
/// The longest wait between probes while only this rank's own sends are in flight.
const SENDING_IDLE: Duration = Duration::from_millis(1);
/// The longest wait between probes while nothing here waits on another rank.
const RELAXED_IDLE: Duration = Duration::from_millis(4);
/// The longest wait between probes while someone here waits on another rank, nothing is in
/// flight and every other rank rings this one after sending to it: only what rings nobody (a
/// send the sender's MPI could not start at once) is found by this probe.
const RUNG_IDLE: Duration = Duration::from_millis(5);
/// The longest wait between probes while nothing here waits on another rank, nothing is in
/// flight and every other rank rings this one: what it still looks for unrung is the
/// launcher's termination notice (a signal's flag), which this bounds.
const RUNG_RELAXED_IDLE: Duration = Duration::from_millis(25);

pub(super) type Ready = Result<(usize, usize, Arc<Sent>, Arc<Health>), String>;

/// The communication thread: MPI's whole life, from initialisation to finalisation.
pub(super) fn communicate(jobs: Receiver<Job>, ready: Sender<Ready>, abort: Arc<AtomicI32>, wake: Arc<Wake>) {
    // Only this thread ever calls MPI.
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = ready.send(Err("MPI was already initialised in this process".into()));
        return;
    };
    let world = universe.world();
    let payloads = world.duplicate();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let sent = Arc::new(Sent::new(size));
    let health = Arc::new(Health::new(rank, size));
    let mut comm = Comm {
        world,
        payloads,
        rank,
        abort,
        sent: sent.clone(),
        health: health.clone(),
        collectives: 0,
        arrived: vec![0; size],
        ending: false,
        outgoing: Vec::new(),
        incoming: HashMap::new(),
        early: Vec::new(),
        awaiting: (0..size).map(|_| VecDeque::new()).collect(),
        replica_inboxes: HashMap::new(),
        early_replicas: Vec::new(),
        in_flight: Vec::new(),
        replica_debt: 0,
        wake,
        backoff: MIN_IDLE,
        peer_bells: (0..size).map(|_| None).collect(),
        rung_by_all: false,
    };
    // After MPI_Init, so the launcher's SIGTERM reaches brigade's handler, not a default one.
    catch_termination();
    // Every rank's host and pid: a survivor names a peer whose process is gone.
    let place = format!("{}\n{}", host_name(), std::process::id());
    let places: Vec<(String, u32)> = comm
        .gather(place.into_bytes())
        .iter()
        .map(|p| {
            let text = String::from_utf8_lossy(p);
            let (host, pid) = text.split_once('\n').unwrap_or_default();
            (host.to_string(), pid.parse().unwrap_or(0))
        })
        .collect();
    comm.open_peer_bells(&places);
    health.set_places(places);
    if ready.send(Ok((rank, size, sent, health))).is_err() {
        return;
    }
    loop {
        let busy = comm.pump();
        match jobs.try_recv() {
            Ok(Job::Shutdown) | Err(TryRecvError::Disconnected) => break,
            Ok(job) => comm.run(job),
            Err(TryRecvError::Empty) if busy => comm.backoff = MIN_IDLE,
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

/// A matched probe, repeated once when it finds nothing. Open MPI's `MPI_Improbe` looks for a
/// match before it runs the progress engine, so a message that the call's own progress brings
/// in is found only by the next probe; measured, about one hand-off in four arrived so, and
/// with a single probe waited for the next timed probe (up to 25 ms) instead of its ring.
fn probe_twice<T>(probe: impl Fn() -> Option<T>) -> Option<T> {
    probe().or_else(probe)
}

/// A non-blocking send and the owner of the bytes it reads, dropped once the request completes.
struct InFlight {
    request: Option<Request<'static, [u8], StaticScope>>,
    _bytes: SendBuffer,
}

/// What a send reads: a message of its own, or a hand-off's tensor in place.
enum SendBuffer {
    Bytes(Vec<u8>),
    Tensor(Payload),
}

impl SendBuffer {
    fn bytes(&self) -> &[u8] {
        match self {
            SendBuffer::Bytes(bytes) => bytes,
            SendBuffer::Tensor(payload) => payload.bytes(),
        }
    }
}

struct Comm {
    world: SimpleCommunicator,
    /// A duplicate of `world` for hand-offs' data alone ([`PAYLOAD_TAG`]).
    payloads: SimpleCommunicator,
    rank: usize,
    abort: Arc<AtomicI32>,
    sent: Arc<Sent>,
    health: Arc<Health>,
    /// Collectives entered so far, and by rank the number of the last one each has entered.
    collectives: u64,
    arrived: Vec<u64>,
    /// This rank is ending the job: its notices are on their way.
    ending: bool,
    outgoing: Vec<(usize, usize, Receiver<Msg>)>,
    incoming: HashMap<usize, Sender<Msg>>,
    /// Hand-offs that arrived before this rank's pipeline attached (a faster peer).
    early: Vec<(usize, Msg)>,
    /// By source rank, in arrival order: hand-offs whose header came and whose data has not.
    awaiting: Vec<VecDeque<Landing>>,
    /// By stage: where other replicas' gradients of it go, and those that came before that.
    replica_inboxes: HashMap<usize, Sender<ReplicaGrads>>,
    early_replicas: Vec<(usize, ReplicaGrads)>,
    in_flight: Vec<InFlight>,
    /// Replica-gradient messages sent less those received: above 0, a local stage waits for
    /// other replicas' gradients (it sends its own, then waits for theirs).
    replica_debt: i64,
    wake: Arc<Wake>,
    /// The next wait between probes while someone waits on another rank (the back-off).
    backoff: Duration,
    /// By rank: the bells of the ranks on this host, rung after sending to them.
    peer_bells: Vec<Option<Bell>>,
    /// Every other rank rings this one's bell after sending to it.
    rung_by_all: bool,
}

impl Comm {
    /// Maps the bells of the other ranks on this host (`places`: every rank's host and pid),
    /// and learns whether every other rank has mapped this one's; then this rank's bell file
    /// goes (the mappings stay).
    fn open_peer_bells(&mut self, places: &[(String, u32)]) {
        let names = self.gather(self.wake.bell_name().unwrap_or_default().into_bytes());
        let here = places.get(self.rank).map(|(host, _)| host.clone()).unwrap_or_default();
        for (rank, name) in names.iter().enumerate() {
            let same_host = places.get(rank).is_some_and(|(host, _)| *host == here);
            if rank != self.rank && same_host {
                self.peer_bells[rank] = Bell::open(&String::from_utf8_lossy(name));
            }
        }
        let mapped: Vec<u8> = self.peer_bells.iter().map(|bell| bell.is_some() as u8).collect();
        let mapped_by = self.gather(mapped);
        self.rung_by_all = (0..mapped_by.len())
            .filter(|&rank| rank != self.rank)
            .all(|rank| mapped_by[rank].get(self.rank).copied() == Some(1));
        self.wake.unlink_bell();
    }

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
            Job::SendReplica(rank, bytes) => {
                self.replica_debt += 1;
                self.send(rank, bytes, REPLICA_TAG)
            }
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
                self.enter_collective();
                let mut request = self.world.immediate_barrier();
                loop {
                    match request.test() {
                        Ok(_) => break,
                        Err(pending) => request = pending,
                    }
                    self.progress_collective();
                }
                self.health.heard_from_all();
                let _ = reply.send(());
            }
            Job::Shutdown => {}
        }
    }

    /// Whether someone waits on a message from another rank: a stage for a hand-off, or for
    /// other replicas' gradients after sending its own.
    fn someone_waits(&self) -> bool {
        self.wake.anyone_waits() || self.replica_debt > 0
    }

    /// Sleeps until woken or until the next probe is due (the module documentation says how
    /// long that is), unless a job or a hand-off to send is already waiting.
    fn wait(&mut self, jobs: &Receiver<Job>) {
        if !jobs.is_empty() || self.outgoing.iter().any(|(_, _, rx)| !rx.is_empty()) {
            self.backoff = MIN_IDLE;
            return;
        }
        let sleep = match (self.someone_waits(), self.in_flight.is_empty(), self.rung_by_all) {
            (true, _, false) => self.backoff,
            (_, false, _) => SENDING_IDLE,
            (true, true, true) => RUNG_IDLE,
            (false, true, true) => RUNG_RELAXED_IDLE,
            (false, true, false) => RELAXED_IDLE,
        };
        self.sleep(sleep);
    }

    /// Sleeps for `duration` unless woken. A wake starts the urgent back-off from its shortest
    /// wait again; without one it doubles, up to [`URGENT_IDLE`].
    fn sleep(&mut self, duration: Duration) {
        let woken = self.wake.take_ring() || {
            self.wake.sleep(duration);
            self.wake.take_ring()
        };
        self.backoff = if woken { MIN_IDLE } else { (self.backoff * 2).min(URGENT_IDLE) };
    }

    /// One turn of a wait inside a collective (or while the job ends): keep hand-offs flowing,
    /// back off when idle, never beyond [`URGENT_IDLE`] (every rank waits on the slowest).
    fn progress(&mut self) {
        self.progress_for(self.backoff)
    }

    /// One turn of a wait: a pump, then, if nothing happened, a sleep of `idle` at most.
    fn progress_for(&mut self, idle: Duration) {
        if self.pump() {
            self.backoff = MIN_IDLE;
        } else {
            self.sleep(idle);
        }
    }

    /// Sends what the proxy inboxes hold, retires finished sends, delivers what has arrived.
    /// Whether anything happened.
    fn pump(&mut self) -> bool {
        self.health.pulse();
        let code = self.abort.load(Ordering::SeqCst);
        if code != NO_ABORT && !self.ending {
            self.end_job(code);
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
            match Payload::of(device, key, tensor).and_then(|(header, payload)| Ok((header.to_bytes()?, payload))) {
                Ok((header, payload)) => {
                    // The data first: the header's ring then finds both.
                    self.post(rank, SendBuffer::Tensor(payload), PAYLOAD_TAG);
                    self.send(rank, header, HANDOFF_TAG);
                }
                Err(e) => self.fail(&format!("cannot send a hand-off to rank {rank}: {e}")),
            }
        }
        let before = self.in_flight.len();
        // A completed request has read its bytes: their owner goes with it.
        self.in_flight.retain_mut(|flight| match flight.request.take().map(Request::test) {
            Some(Ok(_)) | None => false,
            Some(Err(pending)) => {
                flight.request = Some(pending);
                true
            }
        });
        busy |= self.in_flight.len() != before;
        // One probe for every tag: each probe runs Open MPI's progress engine once.
        while let Some(probed) = probe_twice(|| self.world.any_process().immediate_matched_probe()) {
            busy = true;
            let (bytes, status) = probed.matched_receive_vec::<u8>();
            self.receive(status.source_rank() as usize, status.tag(), bytes);
        }
        busy |= self.land_payloads();
        if terminated() && !self.ending {
            self.terminated_by_launcher();
        }
        busy
    }

    /// Acts on one message from rank `from`.
    fn receive(&mut self, from: usize, tag: i32, bytes: Vec<u8>) {
        if tag == ENDING_TAG {
            return self.health.announced(from);
        }
        self.health.heard_from(from);
        match tag {
            HANDOFF_TAG => match Header::from_bytes(&bytes).and_then(Landing::new) {
                Ok(landing) => self.awaiting[from].push_back(landing),
                Err(e) => self.fail(&format!("a hand-off from rank {from} is corrupt: {e}")),
            },
            REPLICA_TAG => {
                self.replica_debt -= 1;
                match decode_replica(&bytes) {
                    Ok((stage, grads)) => self.deliver_replica(stage, grads),
                    Err(e) => self.fail(&format!("replica gradients from rank {from} are corrupt: {e}")),
                }
            }
            ARRIVAL_TAG => {
                let entered = bytes.try_into().map(u64::from_le_bytes).unwrap_or(0);
                if let Some(arrived) = self.arrived.get_mut(from) {
                    *arrived = (*arrived).max(entered);
                }
            }
            other => self.fail(&format!("rank {from} sent a message with unknown tag {other}")),
        }
    }

    /// The launcher is ending the job (a rank died, or it was cancelled): say so once, for
    /// the job, unless another rank already did, and go.
    fn terminated_by_launcher(&mut self) -> ! {
        if let Some(why) = self.health.on_termination() {
            self.health.report(&why);
        }
        // SAFETY: _exit ends the process at once; no MPI call may follow a termination, and
        // atexit handlers could wait on MPI.
        unsafe { libc::_exit(128 + libc::SIGTERM) }
    }

    /// Tells every other rank that this one ends the job (it reports for itself), gives the
    /// notices a moment to arrive, and calls `MPI_Abort`.
    fn end_job(&mut self, code: i32) -> ! {
        self.ending = true;
        self.health.stay_quiet();
        let (me, size) = (self.rank, self.world.size() as usize);
        for rank in (0..size).filter(|&r| r != me) {
            self.send(rank, Vec::new(), ENDING_TAG);
        }
        let started = Instant::now();
        while started.elapsed() < ENDING_GRACE {
            self.progress();
        }
        self.world.abort(code)
    }

    /// Before a collective: tells every other rank that this one has entered it.
    fn enter_collective(&mut self) {
        self.collectives += 1;
        let (me, size) = (self.rank, self.world.size() as usize);
        for rank in (0..size).filter(|&r| r != me) {
            self.send(rank, self.collectives.to_le_bytes().to_vec(), ARRIVAL_TAG);
        }
    }

    /// One turn of a wait inside a collective, under the watchdog: a peer that has not entered
    /// it and has been silent past the rank timeout ends the job. While some peer has not
    /// entered and every peer rings this rank, the wait is long: that peer's arrival notice
    /// rings.
    fn progress_collective(&mut self) {
        let waiting = self.collectives;
        let late = |comm: &Self| (0..comm.arrived.len()).any(|r| r != comm.rank && comm.arrived[r] < waiting);
        if self.rung_by_all && late(self) {
            self.progress_for(RUNG_IDLE);
        } else {
            self.progress();
        }
        let missing: Vec<usize> =
            (0..self.arrived.len()).filter(|&r| r != self.rank && self.arrived[r] < waiting).collect();
        for peer in missing {
            if let Some(why) = self
                .health
                .silent_too_long(peer, "it to join a collective (end-of-step sums, a checkpoint's plan, or a barrier)")
            {
                self.fail(&why);
            }
        }
    }

    fn deliver_replica(&mut self, stage: usize, grads: ReplicaGrads) {
        match self.replica_inboxes.get(&stage) {
            // A closed channel is a pipeline that has stopped: nothing waits for the sum.
            Some(inbox) => drop(inbox.send(grads)),
            None => self.early_replicas.push((stage, grads)),
        }
    }

    fn send(&mut self, rank: usize, bytes: Vec<u8>, tag: i32) {
        self.post(rank, SendBuffer::Bytes(bytes), tag)
    }

    /// Starts a non-blocking send of `buffer`'s bytes (on the payload communicator for
    /// [`PAYLOAD_TAG`]), kept in flight with their owner until it completes, and rings the
    /// receiver's bell for any message but a payload (its header follows).
    fn post(&mut self, rank: usize, buffer: SendBuffer, tag: i32) {
        let counted = match tag {
            HANDOFF_TAG | PAYLOAD_TAG => self.sent.handoffs.get(rank),
            REPLICA_TAG => self.sent.replicas.get(rank),
            _ => None,
        };
        if let Some(count) = counted {
            count.fetch_add(buffer.bytes().len() as u64, Ordering::Relaxed);
        }
        // SAFETY: the bytes are a vector's heap buffer or a tensor's storage, neither of which
        // moves when its owner does; the owner stays in `in_flight` with the request until the
        // request has completed (`pump`), and is never written meanwhile.
        let bytes: &'static [u8] = unsafe { &*(buffer.bytes() as *const [u8]) };
        let comm = if tag == PAYLOAD_TAG { &self.payloads } else { &self.world };
        let request = comm.process_at_rank(rank as i32).immediate_send_with_tag(StaticScope, bytes, tag);
        self.in_flight.push(InFlight { request: Some(request), _bytes: buffer });
        if tag != PAYLOAD_TAG {
            if let Some(Some(bell)) = self.peer_bells.get(rank) {
                bell.ring();
            }
        }
    }

    /// Receives the data of each hand-off whose header came and whose data is here, each
    /// source's in the order of its headers (MPI keeps one source's messages in order on a
    /// communicator), straight into the buffer that becomes the tensor, and delivers it.
    /// Whether anything came.
    fn land_payloads(&mut self) -> bool {
        let mut busy = false;
        for from in 0..self.awaiting.len() {
            while !self.awaiting[from].is_empty() {
                let source = self.payloads.process_at_rank(from as i32);
                let probed = probe_twice(|| source.immediate_matched_probe_with_tag(PAYLOAD_TAG));
                let Some((message, status)) = probed else { break };
                let Some(mut landing) = self.awaiting[from].pop_front() else { break };
                busy = true;
                if let Err(e) = landing.check_size(status.count(u8::equivalent_datatype()) as usize) {
                    self.fail(&format!("a hand-off from rank {from} is corrupt: {e}"));
                }
                message.matched_receive_into(landing.bytes_mut());
                match landing.into_message() {
                    Ok((device, msg)) => self.deliver(device, msg),
                    Err(e) => self.fail(&format!("a hand-off from rank {from} cannot be received: {e}")),
                }
                // The sender's send has completed: it retires it now, not at its next probe.
                if let Some(Some(bell)) = self.peer_bells.get(from) {
                    bell.ring();
                }
            }
        }
        busy
    }

    fn deliver(&mut self, device: usize, msg: Msg) {
        match self.incoming.get(&device) {
            // A closed inbox is a stage that has stopped: nothing waits for its data.
            Some(inbox) => drop(inbox.send(msg)),
            None => self.early.push((device, msg)),
        }
    }

    /// A broken hand-off cannot be recovered: end the job, saying why.
    fn fail(&mut self, why: &str) -> ! {
        self.health.report(why);
        self.end_job(1)
    }

    fn sum<T: Equivalence + Default + Clone>(&mut self, values: Vec<T>) -> Vec<T> {
        let mut sums = vec![T::default(); values.len()];
        self.enter_collective();
        mpi::request::scope(|scope| {
            let mut request =
                self.world.immediate_all_reduce_into(scope, &values[..], &mut sums[..], SystemOperation::sum());
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => request = pending,
                }
                self.progress_collective();
            }
        });
        self.health.heard_from_all();
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
        self.enter_collective();
        mpi::request::scope(|scope| {
            let mut request = self.world.immediate_all_gather_into(scope, &values[..], &mut all[..]);
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => request = pending,
                }
                self.progress_collective();
            }
        });
        self.health.heard_from_all();
        all
    }
}
