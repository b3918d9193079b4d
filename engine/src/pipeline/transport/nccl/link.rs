//! The NCCL link's protocol (see `nccl.rs` for why it pairs every send with its receive): the
//! NCCL thread, which drains the proxy inboxes of other ranks' stages and the replica sums'
//! sends, sends each transfer's header over MPI before its data over NCCL, and issues each
//! receive in the order its header arrives, delivering the tensor where the header says. The
//! lanes it issues them on are `stream.rs`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::cuda_backend::cudarc::nccl::safe::Id;
use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender, TryRecvError};

use super::stream::{share_unique_ids, Lane};
use super::{header_device, Header, Payload, PeerOrder, Side};
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::Msg;
use crate::pipeline::transport::{Attachment, Mailbox, Ranks, RouteKind, World};

/// One replica's gradient as it arrives: (replica, index, gradients per round, tensor on the
/// link's stream).
pub(super) type ReplicaPiece = (usize, usize, usize, HandOff);

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

    /// Where other replicas' gradients of each stage go, by stage.
    pub(super) fn attach_replicas(&self, inboxes: Vec<Sender<ReplicaPiece>>) -> Result<(), String> {
        self.jobs.send(Job::AttachReplicas(inboxes)).map_err(|_| gone())
    }

    /// Queues one replica gradient for `rank`: the NCCL thread sends it in turn with its other
    /// transfers.
    pub(super) fn send_replica(&self, rank: usize, payload: Payload, tensor: HandOff) -> Result<(), String> {
        self.jobs.send(Job::SendReplica { rank, payload, tensor }).map_err(|_| gone())
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

pub(super) fn gone() -> String {
    "the NCCL thread is gone".into()
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
        // Created in the same order on every rank: creating a communicator is collective.
        let names = ["hand-off up", "hand-off down", "replica up", "replica down"];
        let lanes = ids
            .into_iter()
            .zip(names)
            .map(|(id, name)| Lane::open(gpu, rank, size, id, name))
            .collect::<Result<Vec<_>, _>>()?;
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
        let tensor = tensor.receive(lane.device()).and_then(|t| t.contiguous()).map_err(|e| e.to_string())?;
        let header = Header { source: self.rank, seq, payload, dtype: tensor.dtype(), shape: tensor.dims().to_vec() };
        let words = header.to_words()?;
        let envelope =
            Tensor::new(words.as_slice(), &Device::Cpu).and_then(HandOff::send).map_err(|e| e.to_string())?;
        let out = self.header_out.get(&peer).ok_or_else(|| format!("no header route to rank {peer}"))?;
        out.send(Msg::Activation { chunk: 0, microbatch: 0, tensor: envelope })
            .map_err(|_| "the MPI thread is gone".to_string())?;
        // The MPI thread may be asleep between probes (up to 4 ms while no stage waits).
        self.ranks.wake();
        if header.elements() > 0 {
            lane.send(&tensor, peer)?;
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
            Tensor::zeros(header.shape.as_slice(), header.dtype, lane.device()).map_err(|e| e.to_string())?
        } else {
            lane.recv(header.dtype, &header.shape, header.source)?
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
