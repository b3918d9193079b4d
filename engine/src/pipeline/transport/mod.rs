//! The transport seam: the one interface through which a stage's runtime sends and receives
//! what crosses between devices (activations downstream, input gradients upstream) and takes
//! part in the end-of-step collective. [`Crossbeam`] is the in-process implementation (one
//! channel inbox per stage thread). Across processes (`mpi` feature, [`World::Ranks`]) each
//! stage keeps that same transport: a stage on another rank is a proxy inbox that the rank's
//! MPI thread drains and sends on, and what arrives from other ranks is delivered into the local
//! stage's inbox (`mpi.rs`); the driver adds the ranks' all-reduce to the end-of-step collective.
//!
//! The contract every implementation keeps:
//! - [`Transport::send`] never waits for the receiver: the message is buffered (an unbounded
//!   channel here; a non-blocking send whose buffer lives until completion across processes).
//! - Receives are matched by [`Route`] (kind, chunk, micro-batch): whatever arrives is kept
//!   in the stage's [`Mailbox`] until the action that needs exactly that key runs, so arrival
//!   order never matters and a message for a later action never blocks an earlier one.
//!
//! Why any schedule the validator accepts then runs across processes without deadlock: the
//! validator (`schedule::timeline`) simulates the executor under exactly these two rules (each
//! stage runs its own list in order; a stage blocks only when its next action's input, named
//! by its key, has not been produced yet; producing it never waits) and rejects any schedule
//! in which some stage can never start its next action. Nothing in those rules depends on the
//! stages sharing a process: a non-blocking send completes whatever the receiver is doing, and
//! a keyed receive waits only for the one message the simulation showed will be produced. So a
//! run over ranks follows the same dependency graph the validator proved acyclic; the only
//! new blocking point is the end-of-step collective, which every stage enters once, after its
//! last action, and whose inputs depend on nothing but that stage's own finished actions.

mod crossbeam;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
mod nccl;

use std::collections::HashMap;
#[cfg(feature = "mpi")]
use std::sync::Arc;
use std::time::Duration;

pub(super) use self::crossbeam::Crossbeam;
#[cfg(feature = "mpi")]
pub(super) use self::mpi::{Attachment, MpiReduce, PeerWatch};
#[cfg(feature = "mpi")]
pub use self::mpi::{Ranks, DEFAULT_RANK_TIMEOUT};
#[cfg(feature = "nccl")]
pub use self::nccl::one_rank_check as nccl_one_rank_check;
#[cfg(feature = "mpi")]
pub(super) use self::nccl::{choose_link, hand_off_pairs, one_peer_per_lane, LinkChoice};
#[cfg(feature = "nccl")]
pub(super) use self::nccl::{NcclLink, NcclReduce};
use super::handoff::HandOff;
use super::protocol::Msg;

/// What a hand-off between stages carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum RouteKind {
    /// A chunk's input for a micro-batch (from the holder of the previous chunk).
    Activation,
    /// A chunk's output gradient for a micro-batch (from the holder of the next chunk).
    Gradient,
}

/// The key receives are matched by: which chunk receives it, for which micro-batch, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Route {
    pub kind: RouteKind,
    /// The receiving chunk.
    pub chunk: usize,
    pub microbatch: usize,
}

impl Route {
    /// What a stage waiting for this hand-off waits for, in words (the rank watchdog's line).
    #[cfg(feature = "mpi")]
    pub fn describe(&self) -> String {
        let what = match self.kind {
            RouteKind::Activation => "activation",
            RouteKind::Gradient => "gradient",
        };
        format!("the {what} of micro-batch {} for chunk {}", self.microbatch, self.chunk)
    }

    pub fn activation(chunk: usize, microbatch: usize) -> Self {
        Self { kind: RouteKind::Activation, chunk, microbatch }
    }

    pub fn gradient(chunk: usize, microbatch: usize) -> Self {
        Self { kind: RouteKind::Gradient, chunk, microbatch }
    }
}

/// A stage's hook into its exchanges with stages in other processes (`mpi.rs`): a hand-off sent
/// to one, or a wait for one, wakes the MPI thread, and the stuck-rank watchdog checks the
/// awaited rank now and then while a wait lasts. Absent in one process, where a peer cannot stop
/// without the driver seeing it; without the `mpi` feature it cannot exist.
#[cfg(not(feature = "mpi"))]
pub(super) enum PeerWatch {}

#[cfg(not(feature = "mpi"))]
impl PeerWatch {
    pub fn sent_to(&self, _device: usize) {
        match *self {}
    }

    pub fn waiting_on(&self, _device: usize) -> Option<()> {
        match *self {}
    }

    pub fn check(&self, _device: usize, _key: Route) {
        match *self {}
    }
}

/// How often a watched wait looks at the watchdog.
pub(super) const WATCH_EVERY: Duration = Duration::from_millis(250);

/// The other end is gone (the pipeline is stopping): the stage ends as aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed;

/// How a stage's messages travel. One per stage, owned by its runtime.
pub(super) trait Transport: Send {
    /// Sends `tensor` under `key` to device `to` without waiting for it to be received.
    fn send(&self, to: usize, key: Route, tensor: HandOff) -> Result<(), Closed>;
    /// Waits for the next message to this stage: a hand-off from any peer, the collective's
    /// answer, or a control message.
    fn recv(&self) -> Result<Msg, Closed>;
    /// The next message if one has already arrived.
    fn try_recv(&self) -> Option<Msg>;
    /// Like [`Transport::recv`], for at most `timeout` (`Ok(None)`: nothing came).
    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Msg>, Closed>;
    /// This stage's share of the end-of-step collective (its squared gradient norm and the
    /// gradients of parameters it shares with other stages); the answer arrives through
    /// [`Transport::recv`] as `Msg::Reduced`.
    fn contribute(&self, stage: usize, tied_grads: Vec<(String, HandOff)>, sq_norm: f64) -> Result<(), Closed>;
}

/// Which processes the pipeline's stages live in: all in this one (the default), or spread
/// over the ranks of an MPI job, each running the same driver over the stages it owns.
#[derive(Debug, Clone, Default)]
pub enum World {
    #[default]
    Local,
    #[cfg(feature = "mpi")]
    Ranks(Arc<Ranks>),
}

impl World {
    /// This process's rank and the world size ((0, 1) in one process).
    pub fn rank_and_size(&self) -> (usize, usize) {
        match self {
            World::Local => (0, 1),
            #[cfg(feature = "mpi")]
            World::Ranks(r) => (r.rank(), r.size()),
        }
    }

    /// How many of the job's processes run on this host, this one included (1 in one process).
    pub fn processes_on_host(&self) -> usize {
        match self {
            World::Local => 1,
            #[cfg(feature = "mpi")]
            World::Ranks(r) => r.ranks_on_host(),
        }
    }

    /// More than one process takes part.
    pub fn is_distributed(&self) -> bool {
        self.rank_and_size().1 > 1
    }

    /// The process that prints, writes the checkpoint's manifest and `latest` (rank 0).
    pub fn is_lead(&self) -> bool {
        self.rank_and_size().0 == 0
    }

    /// Whether this process runs slot `slot` of `slots` (a slot is stage `s` of data-parallel
    /// replica `r`, `r × stages + s`; without data parallelism slots are stages): rank `k` of
    /// `W` owns the contiguous slots `k*N/W .. (k+1)*N/W` (call [`World::check_fits`] first).
    /// Slots are numbered replica by replica, so rank `replica × W/D + j` runs the `j`-th block
    /// of its replica's stages: a replica's ranks are consecutive.
    pub fn owns(&self, slot: usize, slots: usize) -> bool {
        self.owner(slot, slots) == self.rank_and_size().0
    }

    /// The rank that runs slot `slot` of `slots`.
    pub fn owner(&self, slot: usize, slots: usize) -> usize {
        owner_of(slot, slots, self.rank_and_size().1)
    }

    /// `replicas` copies of `stages` stages split evenly over the ranks, each rank within one
    /// replica, or why not.
    pub fn check_fits(&self, stages: usize, replicas: usize) -> Result<(), String> {
        let (_, size) = self.rank_and_size();
        let replicas = replicas.max(1);
        if size == 1 || (size.is_multiple_of(replicas) && stages.is_multiple_of(size / replicas)) {
            return Ok(());
        }
        if replicas == 1 {
            return Err(format!(
                "{stages} stages do not split over {size} processes: each rank runs the same number of stages, so \
                 start a process count that divides {stages} (one per stage: mpirun -n {stages}), or pass --stages \
                 as a multiple of {size}"
            ));
        }
        Err(format!(
            "{replicas} data-parallel replicas of {stages} stages do not split over {size} processes: every \
             replica runs on {size}/{replicas} ranks, so the process count must be {replicas} times a divisor of \
             {stages} (one per stage: mpirun -n {})",
            replicas * stages
        ))
    }

    /// The hook into exchanges with other processes for the stages of data-parallel replica
    /// `replica` (`stages` stages, `slots` in all), or `None` in one process.
    pub(super) fn peer_watch(&self, replica: usize, stages: usize, slots: usize) -> Option<PeerWatch> {
        match self {
            #[cfg(feature = "mpi")]
            World::Ranks(ranks) if self.is_distributed() => Some(PeerWatch::new(ranks.clone(), replica, stages, slots)),
            _ => {
                let _ = (replica, stages, slots);
                None
            }
        }
    }

    /// Element-wise sums over the processes (the values themselves in one process).
    pub(super) fn sum_f64(&self, values: Vec<f64>) -> Result<Vec<f64>, String> {
        match self {
            World::Local => Ok(values),
            #[cfg(feature = "mpi")]
            World::Ranks(r) => r.sum_f64(values),
        }
    }

    pub(super) fn sum_f32(&self, values: Vec<f32>) -> Result<Vec<f32>, String> {
        match self {
            World::Local => Ok(values),
            #[cfg(feature = "mpi")]
            World::Ranks(r) => r.sum_f32(values),
        }
    }

    /// Every process's `bytes`, by rank.
    pub(super) fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
        match self {
            World::Local => Ok(vec![bytes]),
            #[cfg(feature = "mpi")]
            World::Ranks(r) => r.all_gather(bytes),
        }
    }

    pub(super) fn barrier(&self) -> Result<(), String> {
        match self {
            World::Local => Ok(()),
            #[cfg(feature = "mpi")]
            World::Ranks(r) => r.barrier(),
        }
    }
}

/// The rank of `size` that runs slot `slot` of `slots`: contiguous blocks of `slots / size`.
pub(super) fn owner_of(slot: usize, slots: usize, size: usize) -> usize {
    slot / (slots / size.max(1)).max(1)
}

/// Received hand-offs by key, kept until the action that needs them runs.
#[derive(Default)]
pub(super) struct Mailbox {
    waiting: HashMap<Route, HandOff>,
}

impl Mailbox {
    pub fn deliver(&mut self, key: Route, tensor: HandOff) {
        self.waiting.insert(key, tensor);
    }

    pub fn take(&mut self, key: Route) -> Option<HandOff> {
        self.waiting.remove(&key)
    }

    /// The hand-off `msg` carries, as (key, tensor); any other message back as it was.
    pub fn handoff_of(msg: Msg) -> Result<(Route, HandOff), Msg> {
        match msg {
            Msg::Activation { chunk, microbatch, tensor } => Ok((Route::activation(chunk, microbatch), tensor)),
            Msg::Gradient { chunk, microbatch, tensor } => Ok((Route::gradient(chunk, microbatch), tensor)),
            other => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn mailbox_matches_by_kind_chunk_and_microbatch_in_any_arrival_order() {
        let t = |v: f32| HandOff::send(Tensor::new(&[v], &Device::Cpu).unwrap()).unwrap();
        let mut mailbox = Mailbox::default();
        mailbox.deliver(Route::gradient(1, 0), t(3.0));
        mailbox.deliver(Route::activation(1, 1), t(2.0));
        mailbox.deliver(Route::activation(1, 0), t(1.0));
        assert!(mailbox.take(Route::activation(2, 0)).is_none());
        let value = |x: Option<HandOff>| x.unwrap().receive(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(value(mailbox.take(Route::activation(1, 0))), 1.0);
        assert_eq!(value(mailbox.take(Route::gradient(1, 0))), 3.0);
        assert_eq!(value(mailbox.take(Route::activation(1, 1))), 2.0);
        assert!(mailbox.take(Route::activation(1, 0)).is_none(), "a hand-off is taken once");
    }

    #[test]
    fn ranks_own_contiguous_blocks_of_stages_and_one_process_owns_all() {
        assert_eq!((0..4).map(|s| owner_of(s, 4, 4)).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!((0..4).map(|s| owner_of(s, 4, 2)).collect::<Vec<_>>(), [0, 0, 1, 1]);
        assert_eq!((0..3).map(|s| owner_of(s, 3, 1)).collect::<Vec<_>>(), [0, 0, 0]);
        // Data parallel 2 x 4 stages (slot = replica x 4 + stage) on 4 ranks: ranks 0-1 run
        // replica 0, two stages each, and ranks 2-3 replica 1.
        assert_eq!((0..8).map(|s| owner_of(s, 8, 4)).collect::<Vec<_>>(), [0, 0, 1, 1, 2, 2, 3, 3]);
        let world = World::Local;
        assert!((0..5).all(|s| world.owns(s, 5)) && world.is_lead() && !world.is_distributed());
        assert!(world.check_fits(3, 1).is_ok() && world.check_fits(3, 2).is_ok());
    }

    #[test]
    fn crossbeam_sends_never_wait_and_keep_their_keys() {
        let cpu = |v: f32| HandOff::send(Tensor::new(&[v], &Device::Cpu).unwrap()).unwrap();
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let (reports, _report_rx) = crossbeam_channel::unbounded();
        let stage0 = Crossbeam::new(rx0, vec![tx0.clone(), tx1.clone()], reports.clone());
        let stage1 = Crossbeam::new(rx1, vec![tx0, tx1], reports);
        // Many sends with nobody receiving yet: none blocks.
        for mb in 0..64 {
            stage0.send(1, Route::activation(1, mb), cpu(mb as f32)).unwrap();
        }
        stage1.send(0, Route::gradient(0, 5), cpu(5.0)).unwrap();
        let (key, _) = Mailbox::handoff_of(stage0.recv().unwrap()).ok().unwrap();
        assert_eq!(key, Route::gradient(0, 5));
        let mut mailbox = Mailbox::default();
        while let Some(msg) = stage1.try_recv() {
            let (key, tensor) = Mailbox::handoff_of(msg).ok().unwrap();
            mailbox.deliver(key, tensor);
        }
        let got =
            mailbox.take(Route::activation(1, 63)).unwrap().receive(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![63.0]);
    }
}
