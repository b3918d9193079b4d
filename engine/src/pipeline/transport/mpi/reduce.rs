//! Data parallelism across ranks: [`MpiReduce`] sums one stage's gradients over its replicas
//! when the replicas' copies of the stage live on different ranks. Each copy sends its
//! gradients to every other copy (point to point, `wire.rs`'s format, through the communication
//! thread) and sums what it receives in replica order, bit for bit the in-process sum; why point
//! to point rather than an all-reduce is in the module's docs (`mod.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{unbounded, Receiver};

use super::wire::encode_replica;
use super::{gone, Job, Ranks, ReplicaGrads};
use crate::pipeline::replicas::{sum_in_replica_order, ReduceError, ReplicaReduce};
use crate::pipeline::transport::owner_of;

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
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    // The watchdog: a replica's copy that has gone silent ends the job.
                    for (r, _) in contributions.iter().enumerate().filter(|(_, c)| c.is_none()) {
                        let rank = owner_of(r * self.stages + stage, slots, self.ranks.size());
                        self.ranks.check_peer(rank, || format!("replica {r}'s gradients of stage {stage}"));
                    }
                }
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
