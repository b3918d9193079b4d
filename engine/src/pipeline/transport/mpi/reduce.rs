//! Data parallelism across ranks: [`MpiReduce`] sums one stage's gradients over its replicas
//! when the replicas' copies of the stage live on different ranks. Each copy sends its
//! gradients to every other copy (point to point, `wire.rs`'s format, through the communication
//! thread) and sums what it receives in replica order (`replicas/exchange.rs`), bit for bit the
//! in-process sum; why point to point rather than an all-reduce is in the module's docs
//! (`mod.rs`).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};

use super::wire::encode_replica;
use super::{gone, Job, Ranks, ReplicaGrads};
use crate::pipeline::replicas::exchange::{Arrivals, ReplicaLayout, Round};
use crate::pipeline::replicas::{ReduceError, ReplicaReduce};

/// [`ReplicaReduce`] for replicas on different ranks: each copy of a stage sends its gradients
/// to every other replica's copy and sums all of them in replica order (the in-process sum,
/// bit for bit), matching arrivals to rounds by order.
pub(in crate::pipeline) struct MpiReduce {
    ranks: Arc<Ranks>,
    layout: ReplicaLayout,
    /// By stage: other replicas' gradients as the communication thread delivers them.
    inboxes: Vec<Mutex<StageInbox>>,
    aborted: AtomicBool,
}

struct StageInbox {
    delivered: Receiver<ReplicaGrads>,
    arrivals: Arrivals,
}

impl MpiReduce {
    /// Registers this rank's stages with the communication thread (before any replica trains).
    pub fn start(ranks: Arc<Ranks>, replicas: usize, stages: usize) -> Result<Arc<dyn ReplicaReduce>, String> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..stages)
            .map(|stage| {
                let (tx, rx) = unbounded();
                ((stage, tx), Mutex::new(StageInbox { delivered: rx, arrivals: Arrivals::default() }))
            })
            .unzip();
        ranks.jobs.send(Job::AttachReplicas(senders)).map_err(|_| gone())?;
        let layout = ReplicaLayout::new(stages, replicas, ranks.size());
        Ok(Arc::new(Self { ranks, layout, inboxes, aborted: AtomicBool::new(false) }))
    }
}

impl ReplicaReduce for MpiReduce {
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError> {
        let round = Round::new(&self.layout, stage, replica, grads)?;
        let bytes = encode_replica(stage, replica, round.mine()).map_err(ReduceError::Failed)?;
        for (_, rank) in self.layout.twins(stage, replica) {
            self.ranks.jobs.send(Job::SendReplica(rank, bytes.clone())).map_err(|_| ReduceError::Failed(gone()))?;
        }
        // A stage thread panicking mid-wait leaves only whole entries behind.
        let mut inbox = self.inboxes[stage].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let StageInbox { delivered, arrivals } = &mut *inbox;
        round.gather(arrivals, &self.aborted, |arrivals, missing| {
            match delivered.recv_timeout(Duration::from_millis(50)) {
                Ok((r, grads)) => arrivals.whole(r, grads),
                Err(RecvTimeoutError::Timeout) => {
                    // The watchdog: a replica's copy that has gone silent ends the job.
                    for &r in missing {
                        let rank = self.layout.rank_of(stage, r);
                        self.ranks.check_peer(rank, || format!("replica {r}'s gradients of stage {stage}"));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ReduceError::Failed(gone())),
            }
            Ok(())
        })
    }

    fn abort(&self) {
        self.aborted.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
