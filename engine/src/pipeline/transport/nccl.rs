//! GPU tensors between ranks over NCCL (`nccl` feature): when every stage of an MPI job runs on
//! a CUDA GPU, a hand-off to a stage on another rank (and a stage's gradients for the other
//! data-parallel replicas' copies of it) no longer travels as MPI bytes through the host. Its
//! header (key, dtype, shape) still goes over MPI; its data moves GPU to GPU with
//! `ncclSend`/`ncclRecv` on CUDA streams of the link's own, never the default stream (see
//! `device.rs`: candle's default stream does no cross-stream synchronisation).
//!
//! The files, one question each: this one, what crosses over MPI (the `Header`, its
//! `PeerOrder`) and when NCCL is chosen; `nccl/link.rs`, the NCCL thread and its protocol;
//! `nccl/stream.rs`, the lanes (communicators on streams of their own) and the typed
//! `ncclSend`/`ncclRecv` of candle tensors; `nccl/reduce.rs`, data parallelism's gradient sum
//! over them.
//!
//! **Who does what.** One thread per process, the NCCL thread ([`NcclLink`]), owns the NCCL
//! communicators and issues every NCCL call. It drains the proxy inboxes of the stages other
//! ranks own (what the MPI thread drains without NCCL), and for each hand-off: makes its
//! stream wait on the sender's event and takes the tensor onto that stream
//! ([`HandOff::receive`], the one rule for buffers that cross streams), sends the header to the
//! receiving rank over MPI, then issues the `ncclSend`. On the receiving rank the MPI thread
//! delivers headers into the NCCL thread's header inbox, in arrival order; for each, the NCCL
//! thread allocates the tensor on its stream, issues the `ncclRecv` and hands the tensor to the
//! receiving stage with an event recorded after the receive, into the same inbox and `Mailbox`
//! as every other hand-off. The cost of the rule: one device copy onto the link's stream before
//! a send and one off it after a receive (the stage's `receive`), each at device-memory speed.
//!
//! **Why sends and receives pair up.** NCCL matches point-to-point operations between two ranks
//! by issue order alone: the k-th `ncclSend` from A to B meets the k-th `ncclRecv` from A on B.
//! Here (1) the NCCL thread is the only thread of A that issues sends, and it sends each header
//! to B over MPI before issuing that tensor's `ncclSend`, one at a time, so A's sends to B are
//! in the order of A's headers to B; (2) MPI does not overtake: messages with the same source,
//! tag and communicator are received in the order they were sent, and the MPI thread puts them
//! into the one header inbox in that order; (3) B's NCCL thread issues its `ncclRecv`s from A
//! in the order it takes A's headers out of that inbox. So the k-th receive from A is issued for
//! the k-th header from A, which describes the k-th send: same size, same dtype. Every header
//! carries a per-peer sequence number ([`PeerOrder`]), and a receiver that sees one out of
//! order ends the job with an error instead of pairing the wrong buffers.
//!
//! **Why the streams cannot deadlock.** A send blocks its stream on the GPU until the peer's
//! matching receive runs, and a receive until the matching send runs. So each kind of traffic
//! has two communicators, each on its own stream ("lanes"): `up` for what goes from a lower rank
//! to a higher one, `down` for the rest; hand-offs and replica gradients have lanes of their own.
//! And NCCL is chosen only where, in every lane, each rank sends to at most one peer
//! ([`one_peer_per_lane`]): one stage or a contiguous block of stages per rank with GPipe, 1F1B
//! or ZB-V placements (activations go to the next rank up, gradients to the next one down), and
//! data parallelism of 2 (each stage's twin is one rank). That makes a cycle of waits
//! impossible. In the `up` lane take a blocked stream on the highest rank M that has one. Its
//! head is not a send (the receiver is higher, so not blocked, and a receive is issued as soon as
//! its header arrives, which follows the send's issue); so it is the receive of the k-th
//! transfer from some S < M, and S's stream is blocked before its k-th send to M. Not at an
//! earlier send: S sends to M alone, and its sends before the k-th have met M's receives before
//! the k-th, already done. So S is blocked at a receive from a lower rank, and so on down a
//! chain of ranks that ends at one with no lower peer, which is blocked at nothing: a
//! contradiction. The `down` lane is the mirror image. Where the condition fails (interleaved
//! placements wrap from the last rank back to the first; data parallelism of 3 or more sends to
//! several twins), the hand-offs, or the replica sums, stay on MPI bytes.
//!
//! **When.** [`choose_link`]: NCCL when the feature is built, the job has more than one rank,
//! every stage is on a CUDA GPU, each rank's stages share one GPU (one NCCL rank per GPU) and
//! the hand-offs keep to one peer per lane; MPI bytes otherwise. The end-of-step collective (norms, tied gradients) and control stay on
//! MPI. The communicators' unique ids are made by rank 0 (`ncclGetUniqueId`) and sent to every
//! rank with an MPI all-gather.

// The bookkeeping below is compiled and unit-tested with `mpi` alone (no CUDA needed); only the
// choice of link is used without `nccl`.
#![cfg_attr(not(feature = "nccl"), allow(dead_code))]

use candle_core::DType;

use super::RouteKind;
use crate::device::StageDevice;

/// First word of every header: catches a message that is not one (a wrong version, a stray).
const HEADER_MAGIC: i64 = 0x6e63_636c_0001;
/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub(super) const UNIQUE_ID_BYTES: usize = 128;

/// What a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payload {
    /// A hand-off to the stage in slot `slot`, under its mailbox key.
    HandOff { slot: usize, kind: RouteKind, chunk: usize, microbatch: usize },
    /// Gradient `index` of `count` of stage `stage` from replica `replica`.
    ReplicaGrad { stage: usize, replica: usize, index: usize, count: usize },
}

/// The MPI half of one NCCL transfer: who sends, its place in the sender's sequence to this
/// receiver, what it is, and what the receiver must allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub source: usize,
    pub seq: u64,
    pub payload: Payload,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// The dtypes a header can name (those NCCL has a type for), and their codes on the wire.
const DTYPES: [(DType, i64); 7] = [
    (DType::U8, 0),
    (DType::U32, 1),
    (DType::I64, 2),
    (DType::F16, 3),
    (DType::BF16, 4),
    (DType::F32, 5),
    (DType::F64, 6),
];

impl Header {
    /// The header as integers: `[magic, source, seq, kind, a, b, c, d, dtype, rank, dims...]`.
    pub fn to_words(&self) -> Result<Vec<i64>, String> {
        let dtype = DTYPES
            .iter()
            .find(|(d, _)| *d == self.dtype)
            .map(|(_, code)| *code)
            .ok_or_else(|| format!("dtype {:?} cannot travel over NCCL (NCCL has no such type)", self.dtype))?;
        let (kind, a, b, c, d) = match self.payload {
            Payload::HandOff { slot, kind: RouteKind::Activation, chunk, microbatch } => {
                (0, slot, chunk, microbatch, 0)
            }
            Payload::HandOff { slot, kind: RouteKind::Gradient, chunk, microbatch } => (1, slot, chunk, microbatch, 0),
            Payload::ReplicaGrad { stage, replica, index, count } => (2, stage, replica, index, count),
        };
        let mut words = vec![HEADER_MAGIC, self.source as i64, self.seq as i64, kind];
        words.extend([a, b, c, d].map(|v| v as i64));
        words.extend([dtype, self.shape.len() as i64]);
        words.extend(self.shape.iter().map(|&n| n as i64));
        Ok(words)
    }

    pub fn from_words(words: &[i64]) -> Result<Self, String> {
        if words.len() < 10 || words[0] != HEADER_MAGIC {
            return Err(format!("not an NCCL header ({} words, first {:?})", words.len(), words.first()));
        }
        let count = |i: usize| -> Result<usize, String> {
            usize::try_from(words[i]).map_err(|_| format!("word {i} of an NCCL header is negative: {}", words[i]))
        };
        let (a, b, c, d) = (count(4)?, count(5)?, count(6)?, count(7)?);
        let payload = match words[3] {
            0 => Payload::HandOff { slot: a, kind: RouteKind::Activation, chunk: b, microbatch: c },
            1 => Payload::HandOff { slot: a, kind: RouteKind::Gradient, chunk: b, microbatch: c },
            2 => Payload::ReplicaGrad { stage: a, replica: b, index: c, count: d },
            other => return Err(format!("unknown NCCL header kind {other}")),
        };
        let dtype = DTYPES
            .iter()
            .find(|(_, code)| *code == words[8])
            .map(|(d, _)| *d)
            .ok_or_else(|| format!("unknown dtype code {} in an NCCL header", words[8]))?;
        let rank = count(9)?;
        if words.len() != 10 + rank {
            return Err(format!("an NCCL header of rank {rank} has {} words, not {}", words.len(), 10 + rank));
        }
        let shape = (10..10 + rank).map(count).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { source: count(1)?, seq: count(2)? as u64, payload, dtype, shape })
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Per peer, the sequence numbers of headers sent and expected: NCCL pairs point-to-point
/// operations by issue order, so a header out of order would pair the wrong buffers.
#[derive(Debug, Clone)]
pub(super) struct PeerOrder {
    next_out: Vec<u64>,
    next_in: Vec<u64>,
}

impl PeerOrder {
    pub fn new(ranks: usize) -> Self {
        Self { next_out: vec![0; ranks], next_in: vec![0; ranks] }
    }

    /// The sequence number of the next header to `peer`.
    pub fn stamp(&mut self, peer: usize) -> Result<u64, String> {
        let next = self.next_out.get_mut(peer).ok_or_else(|| format!("no rank {peer}"))?;
        *next += 1;
        Ok(*next - 1)
    }

    /// Accepts header `seq` from `peer` if it is the next one expected.
    pub fn admit(&mut self, peer: usize, seq: u64) -> Result<(), String> {
        let expected =
            self.next_in.get_mut(peer).ok_or_else(|| format!("a header from rank {peer}, which does not exist"))?;
        if seq != *expected {
            return Err(format!(
                "NCCL header {seq} from rank {peer} arrived when {expected} was expected: its ncclRecv would pair \
                 with the wrong ncclSend"
            ));
        }
        *expected += 1;
        Ok(())
    }
}

/// Which of the two communicators (each on its own stream) carries a transfer from rank `from`
/// to rank `to`: `Up` from a lower rank to a higher one, `Down` otherwise. Sender and receiver
/// compute the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Side {
    Up = 0,
    Down = 1,
}

impl Side {
    pub fn of(from: usize, to: usize) -> Self {
        if from < to {
            Side::Up
        } else {
            Side::Down
        }
    }
}

/// How stage hand-offs between ranks travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::pipeline) enum LinkChoice {
    /// As MPI byte messages through the host, with why not NCCL.
    MpiBytes(String),
    /// Over NCCL; this rank's GPU.
    Nccl { gpu: usize },
}

/// NCCL when it is built, the job spans several ranks, every slot is on a CUDA GPU and each
/// rank's slots share one GPU (NCCL has one rank per GPU); MPI bytes otherwise, saying why.
/// `devices[s]` and `owners[s]` are slot `s`'s device and rank.
pub(in crate::pipeline) fn choose_link(
    nccl_built: bool,
    devices: &[StageDevice],
    owners: &[usize],
    rank: usize,
    lanes: Result<(), String>,
) -> LinkChoice {
    if !nccl_built {
        return LinkChoice::MpiBytes("built without the nccl feature".into());
    }
    if owners.iter().all(|&o| o == rank) {
        return LinkChoice::MpiBytes("one rank: no hand-off leaves the process".into());
    }
    if let Some(slot) = devices.iter().position(|d| !d.is_cuda()) {
        return LinkChoice::MpiBytes(format!("slot {slot} runs on {}, not a CUDA GPU", devices[slot]));
    }
    let mut gpu_of_rank: Vec<(usize, StageDevice)> = Vec::new();
    for (&owner, &device) in owners.iter().zip(devices) {
        match gpu_of_rank.iter().find(|(r, _)| *r == owner) {
            Some((_, first)) if *first != device => {
                return LinkChoice::MpiBytes(format!(
                    "rank {owner} runs stages on {first} and {device}: NCCL takes one GPU per rank"
                ))
            }
            Some(_) => {}
            None => gpu_of_rank.push((owner, device)),
        }
    }
    if let Err(why) = lanes {
        return LinkChoice::MpiBytes(why);
    }
    match gpu_of_rank.iter().find(|(r, _)| *r == rank) {
        Some((_, StageDevice::Cuda(gpu))) => LinkChoice::Nccl { gpu: *gpu },
        _ => LinkChoice::MpiBytes(format!("rank {rank} runs no stage")),
    }
}

/// Whether every rank sends to at most one peer per lane (see the module docs: what makes the
/// NCCL streams deadlock-free). `pairs` are (sender, receiver) ranks of the traffic of one kind;
/// pairs within one rank do not count.
pub(in crate::pipeline) fn one_peer_per_lane(pairs: impl IntoIterator<Item = (usize, usize)>) -> Result<(), String> {
    let mut first: std::collections::HashMap<(usize, Side), usize> = std::collections::HashMap::new();
    for (from, to) in pairs.into_iter().filter(|(f, t)| f != t) {
        let side = Side::of(from, to);
        let peer = *first.entry((from, side)).or_insert(to);
        if peer != to {
            return Err(format!(
                "rank {from} sends {} to ranks {peer} and {to}: NCCL pairs of one stream could wait on each other",
                if side == Side::Up { "up" } else { "down" }
            ));
        }
    }
    Ok(())
}

/// The (sender, receiver) ranks of a pipeline's hand-offs: chunk `c`'s activation to chunk
/// `c + 1` and the gradient back, in every replica. `placement[c]` is chunk `c`'s stage and
/// `owner(slot)` the rank of slot `replica × stages + stage`.
pub(in crate::pipeline) fn hand_off_pairs(
    placement: &[usize],
    stages: usize,
    replicas: usize,
    owner: impl Fn(usize) -> usize,
) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for replica in 0..replicas {
        for pair in placement.windows(2) {
            let (a, b) = (owner(replica * stages + pair[0]), owner(replica * stages + pair[1]));
            pairs.extend([(a, b), (b, a)]);
        }
    }
    pairs
}

/// The MPI "device" numbers the NCCL headers travel under: one past the pipeline's slots per
/// rank, so the MPI thread routes them to the NCCL thread's header inbox, not to a stage.
pub(super) fn header_device(slots: usize, rank: usize) -> usize {
    slots + rank
}

/// `count` unique ids out of rank 0's contribution to the all-gather that shares them.
pub(super) fn unique_ids_of(gathered: &[Vec<u8>], count: usize) -> Result<Vec<[u8; UNIQUE_ID_BYTES]>, String> {
    let root = gathered.first().ok_or("no rank answered the NCCL id exchange")?;
    if root.len() != count * UNIQUE_ID_BYTES {
        return Err(format!("rank 0 sent {} bytes of NCCL unique ids, not {count} x {UNIQUE_ID_BYTES}", root.len()));
    }
    Ok(root.chunks_exact(UNIQUE_ID_BYTES).map(|c| c.try_into().expect("chunks of UNIQUE_ID_BYTES")).collect())
}

/// What an NCCL result code means, for an error line a user can act on.
pub(super) fn nccl_result_text(code: u32) -> &'static str {
    match code {
        0 => "success",
        1 => "a CUDA call inside NCCL failed (ncclUnhandledCudaError)",
        2 => "a system call failed: network, shared memory or file descriptors (ncclSystemError)",
        3 => "NCCL's internal error, often a peer that died (ncclInternalError)",
        4 => "an invalid argument: a bad pointer, count or peer rank (ncclInvalidArgument)",
        5 => "invalid usage: e.g. two ranks on one GPU, or mismatched calls across ranks (ncclInvalidUsage)",
        6 => "a remote rank failed or the network broke (ncclRemoteError)",
        7 => "an operation is still in progress (ncclInProgress)",
        _ => "an unknown NCCL result",
    }
}

#[cfg(feature = "nccl")]
mod link;
#[cfg(feature = "nccl")]
mod reduce;
#[cfg(feature = "nccl")]
mod stream;
#[cfg(feature = "nccl")]
pub(in crate::pipeline) use link::NcclLink;
#[cfg(feature = "nccl")]
pub(in crate::pipeline) use reduce::NcclReduce;
#[cfg(feature = "nccl")]
pub use stream::one_rank_check;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::replicas::exchange::ReplicaLayout;

    #[test]
    fn a_header_survives_its_words_and_rejects_damage() {
        let headers = [
            Header {
                source: 3,
                seq: 41,
                payload: Payload::HandOff { slot: 5, kind: RouteKind::Gradient, chunk: 2, microbatch: 7 },
                dtype: DType::BF16,
                shape: vec![8, 128, 768],
            },
            Header {
                source: 0,
                seq: 0,
                payload: Payload::ReplicaGrad { stage: 1, replica: 2, index: 9, count: 12 },
                dtype: DType::F32,
                shape: vec![],
            },
        ];
        for header in headers {
            let words = header.to_words().unwrap();
            assert_eq!(Header::from_words(&words).unwrap(), header);
            assert!(Header::from_words(&words[..words.len() - 1]).is_err() || header.shape.is_empty());
            let mut bad = words.clone();
            bad[0] += 1;
            assert!(Header::from_words(&bad).unwrap_err().contains("not an NCCL header"));
            let mut bad = words.clone();
            bad[8] = 99;
            assert!(Header::from_words(&bad).unwrap_err().contains("dtype code 99"));
            let mut bad = words;
            bad[9] += 1;
            assert!(Header::from_words(&bad).is_err(), "a rank that disagrees with the dims is refused");
        }
        let activation = Header {
            source: 1,
            seq: 2,
            payload: Payload::HandOff { slot: 0, kind: RouteKind::Activation, chunk: 0, microbatch: 3 },
            dtype: DType::F16,
            shape: vec![2, 3],
        };
        assert_eq!(Header::from_words(&activation.to_words().unwrap()).unwrap().elements(), 6);
        let odd = Header { dtype: DType::I16, ..activation };
        assert!(odd.to_words().unwrap_err().contains("I16"));
    }

    #[test]
    fn peer_order_numbers_each_peer_apart_and_refuses_a_header_out_of_order() {
        let mut sender = PeerOrder::new(3);
        let to_one: Vec<u64> = (0..3).map(|_| sender.stamp(1).unwrap()).collect();
        let to_two = sender.stamp(2).unwrap();
        assert_eq!((to_one, to_two), (vec![0, 1, 2], 0));
        assert!(sender.stamp(3).is_err());

        let mut receiver = PeerOrder::new(3);
        receiver.admit(0, 0).unwrap();
        receiver.admit(2, 0).unwrap();
        receiver.admit(0, 1).unwrap();
        let skipped = receiver.admit(0, 3).unwrap_err();
        assert!(skipped.contains("header 3 from rank 0") && skipped.contains("2 was expected"), "{skipped}");
        assert!(receiver.admit(2, 0).is_err(), "a repeated header is refused");
        receiver.admit(0, 2).unwrap();
        assert!(receiver.admit(5, 0).is_err());
    }

    #[test]
    fn sender_and_receiver_pick_the_same_side_and_opposite_directions_differ() {
        for (a, b) in [(0, 1), (3, 7), (2, 5)] {
            assert_eq!(Side::of(a, b), Side::Up);
            assert_eq!(Side::of(b, a), Side::Down);
            assert_ne!(Side::of(a, b), Side::of(b, a), "A to B and B to A never share a stream");
        }
    }

    #[test]
    fn nccl_is_chosen_only_for_gpu_stages_one_gpu_per_rank_across_ranks() {
        let why = |c: LinkChoice| match c {
            LinkChoice::MpiBytes(why) => why,
            other => panic!("expected MPI bytes, got {other:?}"),
        };
        let gpus = [StageDevice::Cuda(0), StageDevice::Cuda(1), StageDevice::Cuda(0), StageDevice::Cuda(1)];
        // 4 slots on 4 ranks (2 nodes x 2 GPUs, or DP 2 x PP 2).
        assert_eq!(choose_link(true, &gpus, &[0, 1, 2, 3], 1, Ok(())), LinkChoice::Nccl { gpu: 1 });
        assert_eq!(choose_link(true, &gpus, &[0, 1, 2, 3], 2, Ok(())), LinkChoice::Nccl { gpu: 0 });
        assert!(why(choose_link(true, &gpus, &[0, 1, 2, 3], 0, Err("two peers".into()))).contains("two peers"));
        assert!(why(choose_link(false, &gpus, &[0, 1, 2, 3], 0, Ok(()))).contains("without the nccl feature"));
        assert!(why(choose_link(true, &gpus, &[0, 0, 0, 0], 0, Ok(()))).contains("one rank"));
        let mixed = [StageDevice::Cuda(0), StageDevice::Cpu];
        assert!(why(choose_link(true, &mixed, &[0, 1], 0, Ok(()))).contains("slot 1 runs on cpu"));
        // Two stages of rank 0 on two GPUs: NCCL would need two ranks.
        assert!(
            why(choose_link(true, &gpus, &[0, 0, 1, 1], 0, Ok(()))).contains("rank 0 runs stages on cuda:0 and cuda:1")
        );
        let same_gpu = [StageDevice::Cuda(3), StageDevice::Cuda(3), StageDevice::Cuda(5), StageDevice::Cuda(5)];
        assert_eq!(choose_link(true, &same_gpu, &[0, 0, 1, 1], 1, Ok(())), LinkChoice::Nccl { gpu: 5 });
    }

    #[test]
    fn one_peer_per_lane_holds_for_chains_and_v_and_fails_where_streams_could_cross() {
        // One stage per rank, 4 ranks (slot = rank): 1F1B's placement and ZB-V's.
        let owner = |slot: usize| slot;
        assert!(one_peer_per_lane(hand_off_pairs(&[0, 1, 2, 3], 4, 1, owner)).is_ok());
        assert!(one_peer_per_lane(hand_off_pairs(&[0, 1, 2, 3, 3, 2, 1, 0], 4, 1, owner)).is_ok());
        // Interleaved: chunk 3 on rank 3 hands to chunk 4 on rank 0, and its gradients go to 2.
        let interleaved = one_peer_per_lane(hand_off_pairs(&[0, 1, 2, 3, 0, 1, 2, 3], 4, 1, owner)).unwrap_err();
        assert!(interleaved.contains("rank 3 sends down to ranks"), "{interleaved}");
        // Two stages per rank (4 stages on 2 ranks): rank 0 <-> rank 1 only.
        assert!(one_peer_per_lane(hand_off_pairs(&[0, 1, 2, 3], 4, 1, |s| s / 2)).is_ok());
        // DP 2 x PP 2 on 4 ranks: hand-offs 0<->1 and 2<->3; each stage's twin is one rank.
        let dp = |slot: usize| slot;
        assert!(one_peer_per_lane(hand_off_pairs(&[0, 1], 2, 2, dp)).is_ok());
        assert!(one_peer_per_lane(ReplicaLayout::new(2, 2, 4).pairs()).is_ok());
        // DP 3: replica 0's copy sends up to two twins.
        let dp3 = one_peer_per_lane(ReplicaLayout::new(1, 3, 3).pairs()).unwrap_err();
        assert!(dp3.contains("rank 0 sends up to ranks 1 and 2"), "{dp3}");
        // DP 2 with both stages on one rank per replica: one twin rank for both stages.
        assert!(one_peer_per_lane(ReplicaLayout::new(2, 2, 2).pairs()).is_ok());
    }

    #[test]
    fn unique_ids_come_from_rank_zero_and_a_short_contribution_is_an_error() {
        let root: Vec<u8> = (0..2 * UNIQUE_ID_BYTES).map(|i| (i % 251) as u8).collect();
        let ids = unique_ids_of(&[root.clone(), vec![], vec![]], 2).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(&ids[0][..], &root[..UNIQUE_ID_BYTES]);
        assert_eq!(&ids[1][..], &root[UNIQUE_ID_BYTES..]);
        assert!(unique_ids_of(&[root[..100].to_vec()], 2).unwrap_err().contains("100 bytes"));
        assert!(unique_ids_of(&[], 1).is_err());
        assert_eq!(header_device(8, 3), 11);
        assert!(nccl_result_text(5).contains("two ranks on one GPU"));
    }
}
