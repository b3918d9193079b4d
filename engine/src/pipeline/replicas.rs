//! Data parallelism: the pipeline replicated D times, each replica training on its own slice
//! of the global batch, and the one reduction that makes the D replicas one training run.
//!
//! Each stage sums its gradients over its D copies (one per replica) once per step, after its
//! last backward or weight action and before the gradient norm, through [`ReplicaReduce`].
//! Every micro-batch's loss is already weighted by the global batch's term count, so that sum
//! is exactly the global batch's gradient; from there on each replica does what the single
//! pipeline does (tied gradients, global norm, clipping, optimizer step) on identical inputs,
//! so the replicas' weights stay bit-identical without ever being broadcast.
//!
//! BatchNorm running statistics are not reduced: each replica updates its own from its own
//! micro-batches, and replica 0's are the ones evaluation and checkpoints use (what DDP's
//! default `broadcast_buffers` keeps: rank 0's).
//!
//! The sum is taken in replica order (replica 0 + 1 + ... + D-1) whatever order the replicas
//! arrive in, so results do not depend on timing. [`InProcessReduce`] serves replicas that are
//! threads of one process; `transport::MpiReduce` (`mpi` feature) serves replicas on different
//! MPI ranks, with the same sum in the same order, so both give the same bits; `exchange.rs`
//! holds the bookkeeping it shares with the NCCL transport's sum.

pub(crate) mod exchange;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::Tensor;

/// The pipeline is stopping: a replica waiting for the others gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReduceError {
    Aborted,
    Failed(String),
}

/// Sums each stage's gradients over its replicas.
pub(crate) trait ReplicaReduce: Send + Sync {
    /// Replica `replica`'s gradients of `stage` (the same names, shapes and order in every
    /// replica) in; their sum over all replicas, in replica order, out. Blocks until every
    /// replica of `stage` has contributed; every replica gets the same values.
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError>;

    /// Wakes every waiting replica with [`ReduceError::Aborted`], now and for good.
    fn abort(&self);
}

/// One stage's meeting point: what each replica brought this round, and the sum once all have.
#[derive(Default)]
struct Round {
    contributions: Vec<Option<Vec<Tensor>>>,
    /// The round's result, until every replica has taken it.
    sum: Option<Arc<Result<Vec<Tensor>, String>>>,
    taken: usize,
}

#[derive(Default)]
struct State {
    rounds: Vec<Round>,
    aborted: bool,
}

/// [`ReplicaReduce`] for replicas that are threads of this process: a barrier per stage and a
/// sum taken by the last replica to arrive.
pub(crate) struct InProcessReduce {
    replicas: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl InProcessReduce {
    pub fn new(replicas: usize, stages: usize) -> Self {
        let rounds = (0..stages).map(|_| Round { contributions: vec![None; replicas], ..Round::default() }).collect();
        Self { replicas, state: Mutex::new(State { rounds, aborted: false }), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A replica that panicked while holding the lock left no half-written round behind
        // (every update below is a single assignment), so the state is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>, until: impl Fn(&State) -> bool) -> MutexGuard<'a, State> {
        self.changed.wait_while(guard, |s| !s.aborted && !until(s)).unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The element-wise sum of every replica's gradients, in replica order.
pub(crate) fn sum_in_replica_order(contributions: Vec<Vec<Tensor>>) -> candle_core::Result<Vec<Tensor>> {
    let mut replicas = contributions.into_iter();
    let Some(mut sum) = replicas.next() else { return Ok(Vec::new()) };
    for grads in replicas {
        if grads.len() != sum.len() {
            candle_core::bail!("replicas hold different parameters ({} vs {} gradients)", grads.len(), sum.len());
        }
        for (acc, g) in sum.iter_mut().zip(grads) {
            *acc = (&*acc + g.to_device(acc.device())?)?;
        }
    }
    Ok(sum)
}

impl ReplicaReduce for InProcessReduce {
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError> {
        if replica >= self.replicas {
            return Err(ReduceError::Failed(format!("replica {replica} of {}", self.replicas)));
        }
        let mut state = self.lock();
        if stage >= state.rounds.len() {
            return Err(ReduceError::Failed(format!("stage {stage} of {}", state.rounds.len())));
        }
        // The previous round's result must be taken by everyone before this one starts.
        state = self.wait(state, |s| s.rounds[stage].sum.is_none());
        if state.aborted {
            return Err(ReduceError::Aborted);
        }
        let round = &mut state.rounds[stage];
        round.contributions[replica] = Some(grads);
        if round.contributions.iter().all(Option::is_some) {
            let contributions = round.contributions.iter_mut().filter_map(Option::take).collect();
            let sum = sum_in_replica_order(contributions).map_err(|e| e.to_string());
            round.sum = Some(Arc::new(sum));
            self.changed.notify_all();
        } else {
            state = self.wait(state, |s| s.rounds[stage].sum.is_some());
            if state.aborted {
                return Err(ReduceError::Aborted);
            }
        }
        let round = &mut state.rounds[stage];
        let sum = round.sum.clone().ok_or(ReduceError::Aborted)?;
        round.taken += 1;
        if round.taken == self.replicas {
            round.sum = None;
            round.taken = 0;
            self.changed.notify_all();
        }
        drop(state);
        sum.as_ref().clone().map_err(ReduceError::Failed)
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tensor(v: f32) -> Tensor {
        Tensor::new(&[v], &Device::Cpu).unwrap()
    }

    #[test]
    fn every_replica_gets_the_sum_in_replica_order_over_many_rounds() {
        let reduce = Arc::new(InProcessReduce::new(3, 2));
        let handles: Vec<_> = (0..3)
            .flat_map(|replica| (0..2).map(move |stage| (replica, stage)))
            .map(|(replica, stage)| {
                let reduce = reduce.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|round| {
                            let mine = vec![tensor((replica * 100 + stage * 10 + round) as f32)];
                            let sum = reduce.all_reduce(stage, replica, mine).unwrap();
                            sum[0].to_vec1::<f32>().unwrap()[0]
                        })
                        .collect::<Vec<f32>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let stage = i % 2;
            let got = h.join().unwrap();
            let want: Vec<f32> = (0..20).map(|round| (300 + 30 * stage + 3 * round) as f32).collect();
            assert_eq!(got, want, "stage {stage}");
        }
    }

    #[test]
    fn the_sum_is_taken_in_replica_order_whoever_arrives_last() {
        // In f32 each of the three ways to pair the terms rounds differently: replica order
        // gives 50000008, the others 50000004 and 50000000.
        let values = [-1e8f32, 5.0, 1.5e8];
        let want = (values[0] + values[1]) + values[2];
        assert!(want != (values[0] + values[2]) + values[1] && want != (values[1] + values[2]) + values[0]);
        for late in 0..3 {
            let reduce = Arc::new(InProcessReduce::new(3, 1));
            let handles: Vec<_> = (0..3)
                .map(|replica| {
                    let reduce = reduce.clone();
                    std::thread::spawn(move || {
                        if replica == late {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        reduce.all_reduce(0, replica, vec![tensor(values[replica])]).unwrap()[0]
                            .to_vec1::<f32>()
                            .unwrap()[0]
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), want, "replica {late} arriving last");
            }
        }
    }

    #[test]
    fn abort_wakes_a_replica_waiting_for_the_others() {
        let reduce = Arc::new(InProcessReduce::new(2, 1));
        let waiting = {
            let reduce = reduce.clone();
            std::thread::spawn(move || reduce.all_reduce(0, 0, vec![tensor(1.0)]))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        reduce.abort();
        assert_eq!(waiting.join().unwrap().unwrap_err(), ReduceError::Aborted);
        assert_eq!(reduce.all_reduce(0, 1, vec![tensor(1.0)]).unwrap_err(), ReduceError::Aborted);
    }

    #[test]
    fn a_replica_or_stage_out_of_range_is_an_error() {
        let reduce = InProcessReduce::new(2, 1);
        assert!(matches!(reduce.all_reduce(0, 2, vec![]), Err(ReduceError::Failed(_))));
        assert!(matches!(reduce.all_reduce(1, 0, vec![]), Err(ReduceError::Failed(_))));
    }
}
