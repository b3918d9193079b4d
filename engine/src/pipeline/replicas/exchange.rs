//! What every cross-rank [`ReplicaReduce`](super::ReplicaReduce) shares, whatever carries the
//! bytes (MPI messages through the host, or NCCL between GPUs): which ranks hold a stage's
//! other copies ([`ReplicaLayout`]), the other replicas' gradients kept as they arrive until a
//! round takes them ([`Arrivals`]), and one round of the sum ([`Round`]): this copy's
//! gradients, the others' as they come, and their sum in replica order once all are in, the
//! in-process sum bit for bit. A transport only sends its copy's gradients to the twins and
//! files what it receives.
//!
//! Rounds are matched by order alone: a stage's round `n + 1` starts nowhere before every rank
//! has passed the end-of-step collective of round `n`, so each replica's arrivals are that
//! replica's rounds, oldest first.

// Compiled and unit-tested in every build; only the MPI and NCCL transports use it, and only
// the NCCL one all of it.
#![cfg_attr(not(feature = "nccl"), allow(dead_code))]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use super::{sum_in_replica_order, ReduceError};
use crate::pipeline::transport::owner_of;

/// Where the copies of each stage run: stage `s` of replica `r` is slot `r × stages + s`, on
/// the rank that owns that slot (contiguous blocks of slots per rank, `World::owner`'s rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplicaLayout {
    stages: usize,
    replicas: usize,
    ranks: usize,
}

impl ReplicaLayout {
    pub fn new(stages: usize, replicas: usize, ranks: usize) -> Self {
        Self { stages, replicas, ranks }
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// An error unless replica `replica` has a stage `stage`.
    pub fn check(&self, stage: usize, replica: usize) -> Result<(), ReduceError> {
        if replica >= self.replicas || stage >= self.stages {
            return Err(ReduceError::Failed(format!(
                "stage {stage} of replica {replica}, with {} stages x {} replicas",
                self.stages, self.replicas
            )));
        }
        Ok(())
    }

    /// The rank that runs replica `replica`'s copy of `stage`.
    pub fn rank_of(&self, stage: usize, replica: usize) -> usize {
        owner_of(replica * self.stages + stage, self.stages * self.replicas, self.ranks)
    }

    /// The other replicas' copies of `stage`, as (replica, rank), in replica order: where
    /// replica `replica`'s gradients of it go, and where the rest of its sum comes from.
    pub fn twins(&self, stage: usize, replica: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.replicas).filter(move |&r| r != replica).map(move |r| (r, self.rank_of(stage, r)))
    }

    /// (sender rank, receiver rank) of every replica-gradient transfer of a step: each copy of
    /// each stage to every twin.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        (0..self.stages)
            .flat_map(|stage| {
                (0..self.replicas).flat_map(move |replica| {
                    let from = self.rank_of(stage, replica);
                    self.twins(stage, replica).map(move |(_, to)| (from, to))
                })
            })
            .collect()
    }
}

/// One replica's gradients of a stage on their way in: whole at once over MPI, gradient by
/// gradient over NCCL. Complete once `grads.len() == count`.
struct Incoming {
    grads: Vec<Tensor>,
    count: usize,
}

/// Other replicas' gradients of one stage, by replica in arrival order, until a round takes
/// them.
#[derive(Default)]
pub(crate) struct Arrivals {
    by_replica: HashMap<usize, VecDeque<Incoming>>,
}

impl Arrivals {
    /// Files replica `replica`'s gradients of one round, arrived in one piece.
    pub fn whole(&mut self, replica: usize, grads: Vec<Tensor>) {
        let count = grads.len();
        self.by_replica.entry(replica).or_default().push_back(Incoming { grads, count });
    }

    /// Files gradient `index` of the `count` replica `replica` sends per round: the next one of
    /// its open round, or the first of a new one. Out of order, or with a count that changes
    /// within a round, is an error (the transfers would pair the wrong tensors).
    pub fn piece(&mut self, replica: usize, index: usize, count: usize, tensor: Tensor) -> Result<(), String> {
        if index >= count {
            return Err(format!("replica {replica}'s gradient {index} of {count}"));
        }
        let rounds = self.by_replica.entry(replica).or_default();
        match rounds.back_mut() {
            Some(open) if open.grads.len() < open.count => {
                if count != open.count {
                    return Err(format!(
                        "replica {replica}'s gradient {index} says {count} per round, its round began with {}",
                        open.count
                    ));
                }
                if index != open.grads.len() {
                    return Err(format!(
                        "replica {replica}'s gradient {index} arrived when {} was due",
                        open.grads.len()
                    ));
                }
                open.grads.push(tensor);
            }
            _ if index == 0 => rounds.push_back(Incoming { grads: vec![tensor], count }),
            _ => return Err(format!("replica {replica}'s gradient {index} arrived before its gradient 0")),
        }
        Ok(())
    }

    /// Replica `replica`'s oldest round, if all of it has arrived.
    pub fn take(&mut self, replica: usize) -> Option<Vec<Tensor>> {
        let rounds = self.by_replica.get_mut(&replica)?;
        if rounds.front().is_some_and(|r| r.grads.len() == r.count) {
            rounds.pop_front().map(|r| r.grads)
        } else {
            None
        }
    }
}

/// One round of one stage's sum on one copy: its own gradients, the other replicas' as they
/// come, and their sum in replica order once all are in.
pub(crate) struct Round {
    stage: usize,
    replica: usize,
    /// By replica; this copy's from the start.
    contributions: Vec<Option<Vec<Tensor>>>,
    /// Gradients per replica (this copy's count: every replica holds the same parameters).
    count: usize,
}

impl Round {
    /// Replica `replica`'s round of `stage`, holding its own `grads`.
    pub fn new(layout: &ReplicaLayout, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Self, ReduceError> {
        layout.check(stage, replica)?;
        let count = grads.len();
        let mut contributions = vec![None; layout.replicas()];
        contributions[replica] = Some(grads);
        Ok(Self { stage, replica, contributions, count })
    }

    /// This copy's own gradients, to send to its twins.
    pub fn mine(&self) -> &[Tensor] {
        self.contributions[self.replica].as_deref().unwrap_or_default()
    }

    /// The replicas whose gradients have not come in yet, in replica order.
    pub fn missing(&self) -> Vec<usize> {
        self.contributions.iter().enumerate().filter(|(_, c)| c.is_none()).map(|(r, _)| r).collect()
    }

    /// Adds replica `replica`'s gradients (the same count as this copy's).
    pub fn add(&mut self, replica: usize, grads: Vec<Tensor>) -> Result<(), ReduceError> {
        let (stage, count) = (self.stage, self.count);
        let slot = self.contributions.get_mut(replica).ok_or_else(|| {
            ReduceError::Failed(format!("gradients of stage {stage} from replica {replica}, which does not exist"))
        })?;
        if slot.is_some() {
            return Err(ReduceError::Failed(format!("replica {replica}'s gradients of stage {stage} came twice")));
        }
        if grads.len() != count {
            return Err(ReduceError::Failed(format!(
                "replica {replica} sent {} gradients of stage {stage}, this copy has {count}: the replicas hold \
                 different parameters",
                grads.len()
            )));
        }
        *slot = Some(grads);
        Ok(())
    }

    /// The element-wise sum over all replicas, in replica order (an error while some are
    /// missing).
    pub fn sum(self) -> Result<Vec<Tensor>, ReduceError> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(ReduceError::Failed(format!("stage {}'s sum taken without replicas {missing:?}", self.stage)));
        }
        sum_in_replica_order(self.contributions.into_iter().flatten().collect())
            .map_err(|e| ReduceError::Failed(e.to_string()))
    }

    /// Completes the round from `arrivals` and returns its sum. While some replica is missing,
    /// `wait` is called with the missing replicas (for a watchdog): it files what arrives into
    /// `arrivals`, returning within a bounded time so that `aborted` is seen.
    pub fn gather(
        mut self,
        arrivals: &mut Arrivals,
        aborted: &AtomicBool,
        mut wait: impl FnMut(&mut Arrivals, &[usize]) -> Result<(), ReduceError>,
    ) -> Result<Vec<Tensor>, ReduceError> {
        loop {
            let missing = self.missing();
            for &replica in &missing {
                if let Some(grads) = arrivals.take(replica) {
                    self.add(replica, grads)?;
                }
            }
            let missing = self.missing();
            if missing.is_empty() {
                return self.sum();
            }
            if aborted.load(Ordering::SeqCst) {
                return Err(ReduceError::Aborted);
            }
            wait(arrivals, &missing)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tensor(v: f32) -> Tensor {
        Tensor::new(&[v], &Device::Cpu).unwrap()
    }

    fn values(ts: &[Tensor]) -> Vec<f32> {
        ts.iter().map(|t| t.to_vec1::<f32>().unwrap()[0]).collect()
    }

    fn failure(e: ReduceError) -> String {
        match e {
            ReduceError::Failed(why) => why,
            ReduceError::Aborted => panic!("expected a failure, got Aborted"),
        }
    }

    #[test]
    fn twins_are_the_other_replicas_copies_on_the_ranks_that_own_them() {
        // DP 2 x PP 2 on 4 ranks: slots 0-1 (replica 0) on ranks 0-1, slots 2-3 on ranks 2-3.
        let dp2 = ReplicaLayout::new(2, 2, 4);
        assert_eq!(dp2.twins(0, 0).collect::<Vec<_>>(), [(1, 2)]);
        assert_eq!(dp2.twins(1, 0).collect::<Vec<_>>(), [(1, 3)]);
        assert_eq!(dp2.twins(1, 1).collect::<Vec<_>>(), [(0, 1)]);
        assert_eq!(dp2.pairs(), [(0, 2), (2, 0), (1, 3), (3, 1)]);
        // The same on 2 ranks: each replica's two stages share one rank.
        let packed = ReplicaLayout::new(2, 2, 2);
        assert_eq!(packed.twins(1, 0).collect::<Vec<_>>(), [(1, 1)]);
        assert_eq!(packed.pairs(), [(0, 1), (1, 0), (0, 1), (1, 0)]);
        // DP 3, one stage: every copy pairs with both others, in replica order.
        let dp3 = ReplicaLayout::new(1, 3, 3);
        assert_eq!(dp3.twins(0, 1).collect::<Vec<_>>(), [(0, 0), (2, 2)]);
        assert_eq!(dp3.pairs(), [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]);
        // One process holds everything.
        assert_eq!(ReplicaLayout::new(3, 2, 1).twins(2, 1).collect::<Vec<_>>(), [(0, 0)]);
    }

    #[test]
    fn a_stage_or_replica_out_of_range_is_an_error() {
        let layout = ReplicaLayout::new(2, 2, 4);
        assert!(layout.check(1, 1).is_ok());
        assert!(failure(layout.check(2, 0).unwrap_err()).contains("stage 2 of replica 0"));
        assert!(failure(Round::new(&layout, 0, 2, vec![]).err().unwrap()).contains("2 stages x 2 replicas"));
    }

    #[test]
    fn the_sum_is_in_replica_order_whatever_order_the_replicas_come_in() {
        // In f32 each of the three ways to pair the terms rounds differently: replica order
        // gives 50000008, the others 50000004 and 50000000.
        let v = [-1e8f32, 5.0, 1.5e8];
        let want = (v[0] + v[1]) + v[2];
        assert!(want != (v[0] + v[2]) + v[1] && want != (v[1] + v[2]) + v[0], "the values must tell orders apart");
        let layout = ReplicaLayout::new(1, 3, 3);
        for mine in 0..3 {
            for first in (0..3).filter(|&r| r != mine) {
                let mut round = Round::new(&layout, 0, mine, vec![tensor(v[mine])]).unwrap();
                let second = 3 - mine - first;
                round.add(first, vec![tensor(v[first])]).unwrap();
                assert_eq!(round.missing(), [second]);
                round.add(second, vec![tensor(v[second])]).unwrap();
                assert_eq!(values(&round.sum().unwrap()), [want], "mine {mine}, first {first}");
            }
        }
    }

    #[test]
    fn wrong_counts_duplicates_and_missing_replicas_are_errors() {
        let layout = ReplicaLayout::new(1, 3, 3);
        let mut round = Round::new(&layout, 0, 1, vec![tensor(1.0), tensor(2.0)]).unwrap();
        assert_eq!(values(round.mine()), [1.0, 2.0]);
        let short = failure(round.add(0, vec![tensor(1.0)]).unwrap_err());
        assert!(short.contains("replica 0 sent 1 gradients of stage 0, this copy has 2"), "{short}");
        assert!(failure(round.add(1, vec![tensor(1.0), tensor(2.0)]).unwrap_err()).contains("came twice"));
        assert!(failure(round.add(3, vec![]).unwrap_err()).contains("does not exist"));
        round.add(2, vec![tensor(3.0), tensor(4.0)]).unwrap();
        assert!(failure(round.sum().unwrap_err()).contains("without replicas [0]"));
    }

    #[test]
    fn arrivals_give_whole_rounds_oldest_first_and_refuse_pieces_out_of_order() {
        let mut arrivals = Arrivals::default();
        arrivals.piece(1, 0, 2, tensor(10.0)).unwrap();
        assert!(arrivals.take(1).is_none(), "half a round is not taken");
        arrivals.piece(1, 1, 2, tensor(11.0)).unwrap();
        arrivals.piece(1, 0, 2, tensor(20.0)).unwrap();
        assert_eq!(values(&arrivals.take(1).unwrap()), [10.0, 11.0]);
        assert!(arrivals.take(1).is_none() && arrivals.take(0).is_none());
        let skipped = arrivals.piece(1, 2, 3, tensor(0.0)).unwrap_err();
        assert!(skipped.contains("began with 2"), "a count that changes mid-round: {skipped}");
        assert!(arrivals.piece(1, 0, 2, tensor(0.0)).unwrap_err().contains("gradient 0 arrived when 1 was due"));
        assert!(arrivals.piece(2, 1, 2, tensor(0.0)).unwrap_err().contains("before its gradient 0"));
        assert!(arrivals.piece(2, 2, 2, tensor(0.0)).is_err(), "an index past the count");

        arrivals.whole(0, vec![tensor(1.0)]);
        arrivals.whole(0, vec![tensor(2.0)]);
        assert_eq!(values(&arrivals.take(0).unwrap()), [1.0]);
        assert_eq!(values(&arrivals.take(0).unwrap()), [2.0]);
        assert!(arrivals.take(0).is_none());
    }

    #[test]
    fn gather_waits_for_the_missing_replicas_and_takes_only_their_oldest_rounds() {
        let layout = ReplicaLayout::new(1, 3, 3);
        let mut arrivals = Arrivals::default();
        // Replica 2's next round came early (it must wait for a later round); replica 0's
        // round comes piece by piece during the waits.
        arrivals.whole(2, vec![tensor(300.0)]);
        arrivals.whole(2, vec![tensor(3000.0)]);
        let mut script = vec![(0, 0, 100.0)].into_iter();
        let mut waits = Vec::new();
        let round = Round::new(&layout, 0, 1, vec![tensor(20.0)]).unwrap();
        let sum = round
            .gather(&mut arrivals, &AtomicBool::new(false), |arrivals, missing| {
                waits.push(missing.to_vec());
                if let Some((replica, index, v)) = script.next() {
                    arrivals.piece(replica, index, 1, tensor(v)).map_err(ReduceError::Failed)?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(values(&sum), [420.0]);
        assert_eq!(waits, [vec![0]], "waited once, for replica 0 alone");
        assert_eq!(values(&arrivals.take(2).unwrap()), [3000.0], "the later round is kept");
    }

    #[test]
    fn gather_stops_on_abort_and_passes_on_the_transports_failure() {
        let layout = ReplicaLayout::new(1, 2, 2);
        let round = Round::new(&layout, 0, 0, vec![tensor(1.0)]).unwrap();
        let aborted = AtomicBool::new(false);
        let got = round.gather(&mut Arrivals::default(), &aborted, |_, _| {
            aborted.store(true, Ordering::SeqCst);
            Ok(())
        });
        assert_eq!(got.unwrap_err(), ReduceError::Aborted);

        let round = Round::new(&layout, 0, 0, vec![tensor(1.0)]).unwrap();
        let got = round
            .gather(&mut Arrivals::default(), &AtomicBool::new(false), |_, _| Err(ReduceError::Failed("gone".into())));
        assert_eq!(got.unwrap_err(), ReduceError::Failed("gone".into()));

        // A whole round with the wrong count fails the sum instead of waiting forever.
        let mut arrivals = Arrivals::default();
        arrivals.whole(1, vec![tensor(1.0), tensor(2.0)]);
        let round = Round::new(&layout, 0, 0, vec![tensor(1.0)]).unwrap();
        let got = round.gather(&mut arrivals, &AtomicBool::new(false), |_, _| panic!("nothing to wait for"));
        assert!(failure(got.unwrap_err()).contains("replica 1 sent 2 gradients"));
    }
}
