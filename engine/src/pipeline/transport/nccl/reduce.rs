//! Data parallelism across ranks with GPU stages: [`NcclReduce`] sums one stage's gradients
//! over its replicas through the NCCL thread (`link.rs`), each gradient GPU to GPU, in replica
//! order on the stage's own stream (`replicas/exchange.rs`): what `MpiReduce` does through the
//! host, with the same sum in the same order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};

use super::link::{gone, NcclLink, ReplicaPiece};
use super::Payload;
use crate::pipeline::handoff::HandOff;
use crate::pipeline::replicas::exchange::{Arrivals, ReplicaLayout, Round};
use crate::pipeline::replicas::{ReduceError, ReplicaReduce};

/// [`ReplicaReduce`] for replicas on different ranks with GPU stages: each copy of a stage
/// sends its gradients, one transfer each, through the NCCL thread to every other replica's
/// copy and sums all of them in replica order on its own stream, matching arrivals to rounds
/// by order.
pub(in crate::pipeline) struct NcclReduce {
    link: Arc<NcclLink>,
    layout: ReplicaLayout,
    /// By stage: other replicas' gradients as the NCCL thread delivers them.
    inboxes: Vec<Mutex<StageInbox>>,
    aborted: AtomicBool,
}

struct StageInbox {
    delivered: Receiver<ReplicaPiece>,
    arrivals: Arrivals,
}

impl NcclReduce {
    /// Registers this rank's stages with the NCCL thread (before any replica trains).
    pub fn start(
        link: Arc<NcclLink>,
        ranks: usize,
        replicas: usize,
        stages: usize,
    ) -> Result<Arc<dyn ReplicaReduce>, String> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..stages)
            .map(|_| {
                let (tx, rx) = unbounded();
                (tx, Mutex::new(StageInbox { delivered: rx, arrivals: Arrivals::default() }))
            })
            .unzip();
        link.attach_replicas(senders)?;
        let layout = ReplicaLayout::new(stages, replicas, ranks);
        Ok(Arc::new(Self { link, layout, inboxes, aborted: AtomicBool::new(false) }))
    }
}

impl ReplicaReduce for NcclReduce {
    fn all_reduce(&self, stage: usize, replica: usize, grads: Vec<Tensor>) -> Result<Vec<Tensor>, ReduceError> {
        let round = Round::new(&self.layout, stage, replica, grads)?;
        let count = round.mine().len();
        let Some(device) = round.mine().first().map(|g| g.device().clone()) else {
            return Ok(Vec::new());
        };
        let failed = |e: candle_core::Error| ReduceError::Failed(e.to_string());
        for (_, rank) in self.layout.twins(stage, replica) {
            for (index, grad) in round.mine().iter().enumerate() {
                let tensor = HandOff::send(grad.clone()).map_err(failed)?;
                let payload = Payload::ReplicaGrad { stage, replica, index, count };
                self.link.send_replica(rank, payload, tensor).map_err(ReduceError::Failed)?;
            }
        }
        // A stage thread panicking mid-wait leaves only whole entries behind.
        let mut inbox = self.inboxes[stage].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let StageInbox { delivered, arrivals } = &mut *inbox;
        round.gather(arrivals, &self.aborted, |arrivals, _| {
            match delivered.recv_timeout(Duration::from_millis(50)) {
                Ok((r, index, count, tensor)) => {
                    // Onto the stage's stream as it arrives: it waits for the receive's event.
                    let tensor = tensor.receive(&device).map_err(failed)?;
                    arrivals.piece(r, index, count, tensor).map_err(ReduceError::Failed)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(ReduceError::Failed(gone())),
            }
            Ok(())
        })
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}
