//! The stage runtime: one OS thread per stage (device), running its own action list over the
//! model chunks it holds, one [`StageCompute`] each (one chunk without virtual stages). It
//! receives activations and gradients from whichever devices hold the neighbouring chunks
//! (buffered by (chunk, micro-batch), so it waits only for what its next action needs, in any
//! arrival order), takes part in the end-of-step collective, steps its own optimizer (over all
//! its chunks' parameters), and reports to the driver.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::Sender;

use super::clock::ActionClock;
use super::handoff::{self, HandOff};
use super::norm::squared_norm_sum;
#[cfg(feature = "testing")]
use super::protocol::{Fault, FaultKind};
use super::protocol::{Msg, Outcome, Report, SnapshotKind, StageResult, StageSetup, StageStop};
use super::replicas::{ReduceError, ReplicaReduce};
use super::threads;
use super::transport::{Crossbeam, Mailbox, PeerWatch, Route, Transport, WATCH_EVERY};
use crate::compute::{LossTarget, StageCompute};
use crate::layer::{LayerSpec, ParamStore};
use crate::loss::loss_terms;
use crate::optim::{Optimizer, ParamState, ParamUpdate};
use crate::schedule::{Action, ActionKind, Schedule};

mod save;

/// One model chunk a device holds.
struct Chunk {
    /// Its index in model order.
    index: usize,
    /// Its math: its layers (built over detached views of the device's variables) and
    /// everything in flight between forward and backward steps.
    compute: StageCompute,
}

/// A stage's world: its chunks' layers, parameters, gradients, optimizer state, and channels.
struct StageWorker {
    index: usize,
    /// The id this stage reports under: its index, offset by its replica's (data parallelism).
    slot: usize,
    /// Data parallelism: this stage's replica, and the sum of its gradients over all replicas.
    replica: usize,
    replicas: Option<Arc<dyn ReplicaReduce>>,
    placement: Arc<Vec<usize>>,
    /// This device's chunks, in model order.
    chunks: Vec<Chunk>,
    store: ParamStore,
    optimizer: Optimizer,
    tied: Vec<String>,
    /// Hand-offs to and from the other devices, and the end-of-step collective.
    transport: Box<dyn Transport>,
    /// The hook into exchanges with peers in other processes (waking the MPI thread, the
    /// stuck-rank watchdog); none in one process.
    peer_watch: Option<PeerWatch>,
    reports: Sender<Report>,
    /// A failure armed by a test (`testing::inject_fault`).
    #[cfg(feature = "testing")]
    fault: Option<Fault>,
    /// The previous step's gradients (tied copies summed, unclipped), for inspection.
    last_grads: BTreeMap<String, Tensor>,
    /// Received activations and gradients by (kind, receiving chunk, micro-batch).
    handoffs: Mailbox,
    reduced_in: Option<(Vec<(String, HandOff)>, f64)>,
    waiting: Duration,
    /// The shared compute pool the stage's math runs in, action by action, while the stage
    /// thread itself waits for messages outside it; `None` when the whole stage runs in its
    /// own pool.
    shared_pool: Option<Arc<rayon::ThreadPool>>,
    /// Mixed precision: the dtype the layers compute in, and their copies of the parameters
    /// in it (refreshed from the f32 masters after every optimizer step); empty in f32.
    compute_dtype: DType,
    compute_copies: Vec<(String, Tensor)>,
    /// Debug: synchronise the device after every action, so no hand-off can race.
    sync_each_action: bool,
}

pub(super) fn run_stage(setup: StageSetup) {
    let index = setup.slot;
    let reports = setup.reports.clone();
    // Without a shared pool the whole stage runs inside its own pool, so every rayon loop it
    // starts (its kernels, candle's parallel ops, gemm's tasks) stays on its budget. With one,
    // the stage thread stays outside it (a stage waiting for a message must not hold a worker)
    // and enters it for each action's math (`on_pool`).
    let own_pool = match &setup.shared_pool {
        Some(_) => None,
        None => match threads::stage_pool(index, setup.threads) {
            Ok(pool) => Some(pool),
            Err(message) => {
                let _ = reports.send(Report::Failed { stage: index, action: None, message });
                return;
            }
        },
    };
    on_pool(own_pool.as_ref(), move || {
        let outcome = catch_unwind(AssertUnwindSafe(|| -> StageResult<()> {
            let mut worker = StageWorker::build(setup)?;
            worker.serve()
        }));
        let report = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(StageStop::Aborted)) => Report::Aborted { stage: index },
            Ok(Err(StageStop::Failed(action, message))) => Report::Failed { stage: index, action, message },
            Err(panic) => Report::Failed { stage: index, action: None, message: panic_message(&panic) },
        };
        let _ = reports.send(report);
    });
}

/// Runs `f` inside `pool` when there is one, else right here.
pub(super) fn on_pool<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {text}")
}

impl StageWorker {
    fn build(mut setup: StageSetup) -> StageResult<Self> {
        if let Some(loader) = setup.checkpoint.take() {
            // This stage reads exactly its own tensors from the (memory-mapped) checkpoint.
            let all_specs: Vec<Arc<dyn LayerSpec>> = setup.chunks.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
            let params = crate::layer::unique_params(&all_specs);
            let buffers: Vec<_> = all_specs.iter().flat_map(|s| s.buffer_specs()).collect();
            let state = loader
                .load_stage(&params, &buffers)
                .map_err(|e| StageStop::Failed(None, format!("loading its part of the checkpoint: {e}")))?;
            setup.initial = state.params;
            setup.initial_buffers = state.buffers;
            setup.initial_optimizer_state = state.optimizer;
        }
        let device =
            setup.device.open().map_err(|e| StageStop::Failed(None, format!("opening {}: {e}", setup.device)))?;
        let mut store = ParamStore::new(device, setup.seed).with_overrides(setup.initial);
        let all_specs: Vec<Arc<dyn LayerSpec>> = setup.chunks.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
        // The variables the optimizer updates in place; the layers compute on detached views of
        // them, so no autograd graph is ever recorded (the layers own their backward). Chunks on
        // one device share the variables (a tied weight held twice here is one variable).
        for spec in crate::layer::unique_params(&all_specs) {
            store.get(&spec).map_err(|e| StageStop::Failed(None, format!("building layers: {e}")))?;
        }
        let (mut view, compute_copies) = if setup.compute_dtype == DType::F32 {
            (store.shared_view(), Vec::new())
        } else {
            store.compute_view(setup.compute_dtype)?
        };
        let mut chunk_layers = Vec::with_capacity(setup.chunks.len());
        for (_, specs) in &setup.chunks {
            let layers = specs
                .iter()
                .map(|spec| spec.build(&mut view))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| StageStop::Failed(None, format!("building layers: {e}")))?;
            chunk_layers.push(layers);
        }
        if !setup.initial_buffers.is_empty() {
            for (spec, layer) in all_specs.iter().zip(chunk_layers.iter_mut().flatten()) {
                let mine: HashMap<String, Tensor> = spec
                    .buffer_specs()
                    .into_iter()
                    .filter_map(|b| setup.initial_buffers.get(&b.name).map(|t| (b.name, t.clone())))
                    .map(|(name, t)| Ok((name, t.to_device(store.device())?)))
                    .collect::<candle_core::Result<_>>()?;
                if !mine.is_empty() {
                    layer
                        .load_buffers(&mine)
                        .map_err(|e| StageStop::Failed(None, format!("restoring buffers of {}: {e}", spec.name())))?;
                }
            }
        }
        let mut optimizer = Optimizer::new(setup.optimizer);
        for (name, _, _) in store.vars() {
            if let Some(state) = setup.initial_optimizer_state.get(name) {
                optimizer.set_state(name, state.to_device(store.device())?)?;
            }
        }
        let last_chunk = setup.placement.len().saturating_sub(1);
        let chunks = setup
            .chunks
            .iter()
            .zip(chunk_layers)
            .map(|((index, _), layers)| Chunk {
                index: *index,
                compute: StageCompute::new(
                    layers,
                    *index > 0,
                    (*index == last_chunk).then_some(setup.loss),
                    setup.recompute,
                ),
            })
            .collect();
        Ok(Self {
            index: setup.index,
            slot: setup.slot,
            replica: setup.replica,
            replicas: setup.replicas,
            placement: setup.placement,
            chunks,
            store,
            optimizer,
            tied: setup.tied,
            transport: Box::new(Crossbeam::new(setup.inbox, setup.peers, setup.reports.clone())),
            peer_watch: setup.peer_watch,
            reports: setup.reports,
            #[cfg(feature = "testing")]
            fault: None,
            last_grads: BTreeMap::new(),
            handoffs: Mailbox::default(),
            reduced_in: None,
            waiting: Duration::ZERO,
            shared_pool: setup.shared_pool,
            compute_dtype: setup.compute_dtype,
            compute_copies,
            sync_each_action: setup.sync_each_action,
        })
    }

    /// The stage's main loop: waits for work between steps.
    fn serve(&mut self) -> StageResult<()> {
        loop {
            let msg = self.transport.recv().map_err(|_| StageStop::Aborted)?;
            match msg {
                Msg::Train { schedule, inputs, targets, global_terms, lr } => {
                    self.timed_step(|w| w.train(&schedule, inputs, targets, global_terms, lr))?
                }
                Msg::Eval { schedule, inputs, targets } => {
                    self.timed_step(|w| w.eval(&schedule, inputs, Some(targets)))?
                }
                Msg::Predict { schedule, inputs } => self.timed_step(|w| w.eval(&schedule, inputs, None))?,
                Msg::Decode { input, offset } => self.timed_step(|w| w.decode(input, offset))?,
                Msg::Snapshot { kind, reply } => {
                    let _ = reply.send(self.snapshot(kind)?);
                }
                Msg::Manifest { reply } => {
                    let _ = reply.send(self.manifest());
                }
                Msg::Save { job, reply } => {
                    let _ = reply.send(self.write_shards(&job));
                }
                Msg::Ping { reply } => {
                    let _ = reply.send(());
                }
                #[cfg(feature = "testing")]
                Msg::InjectFault(_) => self.buffer(msg),
                Msg::Activation { .. } | Msg::Gradient { .. } | Msg::Reduced { .. } => {
                    // Data can arrive before this stage has seen its own step message.
                    self.buffer(msg);
                }
                Msg::Abort | Msg::Shutdown => return Ok(()),
            }
        }
    }

    /// Runs one step message's `work` and reports it done, with the time the stage spent
    /// computing (the step's time less what it waited for messages).
    fn timed_step(&mut self, work: impl FnOnce(&mut Self) -> StageResult<Outcome>) -> StageResult<()> {
        let started = Instant::now();
        self.waiting = Duration::ZERO;
        let outcome = work(self)?;
        let busy = started.elapsed().saturating_sub(self.waiting);
        self.report(Report::Done { stage: self.slot, outcome, busy })
    }

    fn report(&self, report: Report) -> StageResult<()> {
        self.reports.send(report).map_err(|_| StageStop::Aborted)
    }

    fn buffer(&mut self, msg: Msg) {
        let msg = match Mailbox::handoff_of(msg) {
            Ok((key, tensor)) => return self.handoffs.deliver(key, tensor),
            Err(other) => other,
        };
        match msg {
            Msg::Reduced { tied_grads, clip_scale } => self.reduced_in = Some((tied_grads, clip_scale)),
            #[cfg(feature = "testing")]
            Msg::InjectFault(fault) => self.fault = Some(fault),
            _ => {}
        }
    }

    /// Blocks until `ready` finds what it needs in the buffers; an abort ends the wait.
    /// `from`: the device and key of the hand-off waited for, which the stuck-rank watchdog
    /// watches when that device lives in another process.
    fn wait_for<T>(
        &mut self,
        from: Option<(usize, Route)>,
        mut ready: impl FnMut(&mut Self) -> Option<T>,
    ) -> StageResult<T> {
        loop {
            if let Some(found) = ready(self) {
                return Ok(found);
            }
            let started = Instant::now();
            let msg = match (&self.peer_watch, from) {
                (Some(watch), Some((device, key))) => {
                    // Held while this stage waits: the MPI thread looks for the message at
                    // its fastest until then.
                    let _waiting = watch.waiting_on(device);
                    loop {
                        match self.transport.recv_timeout(WATCH_EVERY).map_err(|_| StageStop::Aborted)? {
                            Some(msg) => break msg,
                            None => watch.check(device, key),
                        }
                    }
                }
                _ => self.transport.recv().map_err(|_| StageStop::Aborted)?,
            };
            self.waiting += started.elapsed();
            match msg {
                Msg::Abort | Msg::Shutdown => return Err(StageStop::Aborted),
                Msg::Snapshot { reply, .. } => drop(reply),
                Msg::Manifest { reply } => drop(reply),
                Msg::Save { reply, .. } => drop(reply),
                Msg::Ping { reply } => drop(reply),
                other => self.buffer(other),
            }
        }
    }

    /// Takes in anything already delivered, so an abort is noticed between actions even when
    /// the next action needs no message.
    fn poll_abort(&mut self) -> StageResult<()> {
        while let Some(msg) = self.transport.try_recv() {
            match msg {
                Msg::Abort | Msg::Shutdown => return Err(StageStop::Aborted),
                other => self.buffer(other),
            }
        }
        Ok(())
    }

    /// Fails here if a test armed a fault at `at`; `Ok(true)` asks for a poisoned (NaN) loss.
    #[cfg(feature = "testing")]
    fn armed_fault(&self, at: Option<Action>) -> StageResult<bool> {
        match self.fault {
            Some(f) if f.at == at => match f.kind {
                FaultKind::Error => Err(StageStop::Failed(at, "injected fault".into())),
                FaultKind::Panic => panic!("injected panic in stage {}", self.index),
                FaultKind::NonFiniteLoss => Ok(true),
            },
            _ => Ok(false),
        }
    }

    /// Without the `testing` feature no fault can be armed.
    #[cfg(not(feature = "testing"))]
    fn armed_fault(&self, _at: Option<Action>) -> StageResult<bool> {
        Ok(false)
    }

    fn train(
        &mut self,
        schedule: &Schedule,
        inputs: Vec<Tensor>,
        targets: Vec<Tensor>,
        global_terms: usize,
        lr: f64,
    ) -> StageResult<Outcome> {
        // The previous step's gradients are only for inspection between steps: kept through
        // this one, they would be a second parameter-sized set next to the sums this step
        // builds (498 MB on GPT-2 124M).
        self.last_grads.clear();
        let mut outcome = Outcome::default();
        // The loss of each micro-batch this device finishes, left on the device until the step
        // is done: one read per step, not one host synchronisation per micro-batch.
        let mut losses: Vec<(usize, Tensor)> = Vec::new();
        // The device's stash is the sum over its chunks; each chunk's peak during an action
        // (a recomputation's transient activations included) is added to the others' live bytes.
        let mut device_peak = self.live_bytes();
        let actions = schedule.stage_actions(self.index);
        for c in &mut self.chunks {
            c.compute.take_peak_bytes();
            // Under a zero-bubble schedule a fused loss leaves its weight gradients for `W`.
            let index = c.index;
            let split = actions.iter().any(|a| a.chunk == index && a.kind == ActionKind::BackwardWeight);
            c.compute.set_split_backward(split);
        }
        let mut clock = ActionClock::start(self.store.device())?;
        for &action in schedule.stage_actions(self.index) {
            self.poll_abort()?;
            let poison_loss = self.armed_fault(Some(action))?;
            let (action_start, waited_before) = (Instant::now(), self.waiting);
            let mb = action.microbatch;
            let at = self.chunk_position(action.chunk).map_err(|e| with_action(e, action))?;
            let result: StageResult<()> = match action.kind {
                ActionKind::Forward => {
                    if let Some(loss) = self.forward_train(at, mb, &inputs, &targets, global_terms, poison_loss)? {
                        losses.push((mb, loss));
                    }
                    Ok(())
                }
                ActionKind::Backward => self.backward(at, mb, true),
                ActionKind::BackwardInput => self.backward(at, mb, false),
                ActionKind::BackwardWeight => {
                    let compute = &mut self.chunks[at].compute;
                    Ok(on_pool(self.shared_pool.as_deref(), || compute.backward_weight(mb))?)
                }
            };
            result.map_err(|e| with_action(e, action))?;
            if self.sync_each_action {
                handoff::synchronize(self.store.device()).map_err(|e| with_action(e.into(), action))?;
            }
            let others: u64 =
                self.chunks.iter().enumerate().filter(|(i, _)| *i != at).map(|(_, c)| c.compute.live_bytes()).sum();
            device_peak = device_peak.max(others + self.chunks[at].compute.take_peak_bytes());
            clock.action_done()?;
            // F and B wait for their input first: the action starts when it arrives.
            outcome.timings.push((action, action_start + (self.waiting - waited_before), Instant::now()));
        }
        outcome.peak_stash_bytes = device_peak;
        outcome.loss = self.read_losses(&losses)?;
        self.finish_step(lr)?;
        outcome.timings = clock.finish(std::mem::take(&mut outcome.timings))?;
        Ok(outcome)
    }

    /// The step's loss: the micro-batch losses summed on the device and read once. A non-finite
    /// sum fails the step before the optimizer runs, naming the first bad micro-batch.
    fn read_losses(&self, losses: &[(usize, Tensor)]) -> StageResult<f64> {
        let Some(((_, first), rest)) = losses.split_first() else {
            return Ok(0.0);
        };
        let mut sum = first.clone();
        for (_, loss) in rest {
            sum = (sum + loss)?;
        }
        let total = sum.to_scalar::<f64>()?;
        if total.is_finite() {
            return Ok(total);
        }
        for (mb, loss) in losses {
            let value = loss.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(StageStop::Failed(None, format!("non-finite loss ({value}) at micro-batch {mb}")));
            }
        }
        Err(StageStop::Failed(None, format!("non-finite loss ({total}) summed over the step")))
    }

    /// Bytes every chunk keeps for backward steps right now.
    fn live_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.compute.live_bytes()).sum()
    }

    /// Where chunk `chunk` is in this device's list.
    fn chunk_position(&self, chunk: usize) -> StageResult<usize> {
        self.chunks
            .iter()
            .position(|c| c.index == chunk)
            .ok_or_else(|| StageStop::Failed(None, format!("stage {} does not hold chunk {chunk}", self.index)))
    }

    fn is_last_chunk(&self, chunk: usize) -> bool {
        chunk + 1 == self.placement.len()
    }

    /// The input of `chunk`'s forward of micro-batch `mb`, on this stage's device: the data
    /// (first chunk) or the activation received from the previous chunk. A tensor from another
    /// device is copied here on this stage's stream (free when it is already here).
    fn input_for(&mut self, chunk: usize, mb: usize, inputs: &[Tensor]) -> StageResult<Tensor> {
        let x = if chunk == 0 {
            let x = inputs
                .get(mb)
                .ok_or_else(|| StageStop::Failed(None, format!("no input for micro-batch {mb}")))?
                .to_device(self.store.device())?;
            // Float data (images) enters in the compute dtype; token ids stay integers.
            if x.dtype().is_float() && x.dtype() != self.compute_dtype {
                x.to_dtype(self.compute_dtype)?
            } else {
                x
            }
        } else {
            let key = Route::activation(chunk, mb);
            let from = self.placement.get(chunk - 1).map(|&device| (device, key));
            self.wait_for(from, |w| w.handoffs.take(key))?.receive(self.store.device())?
        };
        Ok(x)
    }

    /// Runs a training forward; on the last stage also the loss, which it returns (on the
    /// device, unread).
    fn forward_train(
        &mut self,
        at: usize,
        mb: usize,
        inputs: &[Tensor],
        targets: &[Tensor],
        global_terms: usize,
        poison_loss: bool,
    ) -> StageResult<Option<Tensor>> {
        let chunk = self.chunks[at].index;
        let x = self.input_for(chunk, mb, inputs)?;
        let target = if self.is_last_chunk(chunk) {
            let targets =
                targets.get(mb).ok_or_else(|| StageStop::Failed(None, format!("no targets for micro-batch {mb}")))?;
            Some(LossTarget { targets: targets.to_device(self.store.device())?, global_terms })
        } else {
            None
        };
        let compute = &mut self.chunks[at].compute;
        let (y, loss) = on_pool(self.shared_pool.as_deref(), || compute.forward(mb, &x, target))?;
        match loss {
            Some(value) if poison_loss => Ok(Some((value * f64::NAN)?)),
            Some(value) => Ok(Some(value)),
            None => {
                self.send_to_chunk(Route::activation(chunk + 1, mb), y)?;
                Ok(None)
            }
        }
    }

    /// The backward of micro-batch `mb`, input gradient only (`I`) or with the weight step
    /// (`B`): the last stage starts from its loss, the others from the gradient received from
    /// downstream; the input gradient goes upstream.
    fn backward(&mut self, at: usize, mb: usize, with_weights: bool) -> StageResult<()> {
        let chunk = self.chunks[at].index;
        let dy = if self.is_last_chunk(chunk) {
            None
        } else {
            let key = Route::gradient(chunk, mb);
            let from = self.placement.get(chunk + 1).map(|&device| (device, key));
            Some(self.wait_for(from, |w| w.handoffs.take(key))?.receive(self.store.device())?)
        };
        let compute = &mut self.chunks[at].compute;
        let dx = on_pool(self.shared_pool.as_deref(), || {
            if with_weights {
                compute.backward(mb, dy.as_ref())
            } else {
                compute.backward_input(mb, dy.as_ref())
            }
        })?;
        if let Some(dx) = dx {
            let to = chunk
                .checked_sub(1)
                .ok_or_else(|| StageStop::Failed(None, "the first chunk has no previous chunk".into()))?;
            self.send_to_chunk(Route::gradient(to, mb), dx)?;
        }
        Ok(())
    }

    /// Routes `tensor` to the device holding `key`'s chunk (the routing table); a chunk on this
    /// device gets it straight into the mailbox.
    fn send_to_chunk(&mut self, key: Route, tensor: Tensor) -> StageResult<()> {
        let chunk = key.chunk;
        // Recorded after the kernels that produced it, whichever stream reads it next.
        let tensor = HandOff::send(tensor)?;
        let device = *self
            .placement
            .get(chunk)
            .ok_or_else(|| StageStop::Failed(None, format!("no chunk {chunk} in the routing table")))?;
        if device == self.index {
            self.handoffs.deliver(key, tensor);
            return Ok(());
        }
        self.transport.send(device, key, tensor).map_err(|_| StageStop::Aborted)?;
        if let Some(peers) = &self.peer_watch {
            peers.sent_to(device);
        }
        Ok(())
    }

    /// The end-of-step collective and the optimizer step.
    fn finish_step(&mut self, lr: f64) -> StageResult<()> {
        if self.chunks.iter().any(|c| c.compute.has_pending_work()) {
            return Err(StageStop::Failed(None, "step ended with unfinished backward work".into()));
        }
        // A parameter used by two chunks here (a tied weight) gets both chunks' sums.
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        for chunk in &mut self.chunks {
            for (name, g) in chunk.compute.take_gradients() {
                let sum = match grads.remove(&name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                grads.insert(name, sum);
            }
        }
        self.sum_over_replicas(&mut grads)?;
        let tied: HashSet<&String> = self.tied.iter().collect();
        let mut untied = Vec::new();
        let mut tied_grads = Vec::new();
        for (name, _, var) in self.store.vars() {
            let grad = match grads.get(name) {
                Some(g) => g.clone(),
                None => {
                    let zeros = var.as_tensor().zeros_like()?;
                    grads.insert(name.to_string(), zeros.clone());
                    zeros
                }
            };
            if tied.contains(&name.to_string()) {
                tied_grads.push((name.to_string(), HandOff::send(grad)?));
            } else {
                untied.push(grad);
            }
        }
        // One reduction and one read for the whole stage (a host sync per step on a GPU).
        let sq_norm = on_pool(self.shared_pool.as_deref(), || squared_norm_sum(&untied))?;
        self.transport.contribute(self.slot, tied_grads, sq_norm).map_err(|_| StageStop::Aborted)?;
        let (reduced, clip_scale) = self.wait_for(None, |w| w.reduced_in.take())?;
        for (name, grad) in reduced {
            grads.insert(name, grad.receive(self.store.device())?);
        }
        self.armed_fault(None).map_err(|e| match e {
            StageStop::Failed(a, m) => StageStop::Failed(a, format!("{m} at the optimizer step")),
            other => other,
        })?;
        // bf16 compute copies are written by the optimizer step itself; other dtypes after it.
        let (bf16_copies, other_copies): (Vec<_>, Vec<_>) =
            self.compute_copies.iter().cloned().partition(|(_, t)| t.dtype() == DType::BF16);
        let bf16_copies: HashMap<String, Tensor> = bf16_copies.into_iter().collect();
        let updates: Vec<ParamUpdate<'_>> = self
            .store
            .vars()
            .filter_map(|(name, spec, var)| {
                Some(ParamUpdate {
                    name,
                    var,
                    grad: grads.get(name)?,
                    decay: spec.weight_decay,
                    bf16_copy: bf16_copies.get(name),
                })
            })
            .collect();
        let optimizer = &mut self.optimizer;
        on_pool(self.shared_pool.as_deref(), || optimizer.step_many(&updates, lr, clip_scale))?;
        self.store.refresh_compute_copies(&other_copies)?;
        for chunk in &mut self.chunks {
            chunk.compute.parameters_changed();
        }
        self.last_grads = grads;
        Ok(())
    }

    /// Data parallelism: replaces every gradient by its sum over this stage's replicas (the
    /// global batch's gradient), before anything reads them. Time spent waiting for the other
    /// replicas counts as waiting.
    fn sum_over_replicas(&mut self, grads: &mut BTreeMap<String, Tensor>) -> StageResult<()> {
        let Some(replicas) = self.replicas.clone() else { return Ok(()) };
        let names: Vec<String> = grads.keys().cloned().collect();
        let mine: Vec<Tensor> = std::mem::take(grads).into_values().collect();
        let started = Instant::now();
        let summed = replicas.all_reduce(self.index, self.replica, mine).map_err(|e| match e {
            ReduceError::Aborted => StageStop::Aborted,
            ReduceError::Failed(why) => StageStop::Failed(None, format!("summing gradients over replicas: {why}")),
        })?;
        self.waiting += started.elapsed();
        for (name, g) in names.into_iter().zip(summed) {
            grads.insert(name, g.to_device(self.store.device())?);
        }
        Ok(())
    }

    /// Forward-only in evaluation mode. With targets, the last stage sums loss and accuracy;
    /// without, it keeps the outputs (prediction).
    fn eval(&mut self, schedule: &Schedule, inputs: Vec<Tensor>, targets: Option<Vec<Tensor>>) -> StageResult<Outcome> {
        let mut outcome = Outcome::default();
        // Loss and hit counts are summed on the device and read once after the last micro-batch.
        let mut sums: Option<(Tensor, Tensor)> = None;
        for &action in schedule.stage_actions(self.index) {
            self.poll_abort()?;
            let (mb, chunk) = (action.microbatch, action.chunk);
            let step = |w: &mut Self, outcome: &mut Outcome, sums: &mut Option<(Tensor, Tensor)>| -> StageResult<()> {
                let at = w.chunk_position(chunk)?;
                let x = w.input_for(chunk, mb, &inputs)?;
                match (&targets, w.is_last_chunk(chunk)) {
                    (Some(targets), true) => {
                        let target = targets
                            .get(mb)
                            .ok_or_else(|| StageStop::Failed(None, format!("no targets for micro-batch {mb}")))?
                            .to_device(w.store.device())?;
                        outcome.terms += loss_terms(&target);
                        // The loss summed (normalised by 1 term), and the hits, per micro-batch.
                        let target = LossTarget { targets: target, global_terms: 1 };
                        let (loss, hits) = w.chunks[at].compute.eval_loss(&x, &target)?;
                        *sums = Some(match sums.take() {
                            None => (loss, hits),
                            Some((l, h)) => ((l + loss)?, (h + hits)?),
                        });
                    }
                    (None, true) => outcome.outputs.push((mb, w.chunks[at].compute.forward_eval(&x)?)),
                    (_, false) => {
                        let y = w.chunks[at].compute.forward_eval(&x)?;
                        w.send_to_chunk(Route::activation(chunk + 1, mb), y)?;
                    }
                }
                Ok(())
            };
            step(self, &mut outcome, &mut sums).map_err(|e| with_action(e, action))?;
            if self.sync_each_action {
                handoff::synchronize(self.store.device()).map_err(|e| with_action(e.into(), action))?;
            }
        }
        if let Some((loss, hits)) = sums {
            outcome.loss = loss.to_scalar::<f64>()?;
            outcome.correct = hits.to_scalar::<u32>()? as usize;
        }
        Ok(outcome)
    }

    /// One incremental step: this device's chunks, in model order, over the new positions,
    /// each keeping its layers' caches. The first chunk takes the driver's ids; the others wait
    /// for their predecessor's activation (possibly from this same device).
    fn decode(&mut self, input: Option<Tensor>, offset: usize) -> StageResult<Outcome> {
        let mut outcome = Outcome::default();
        let mut input = input;
        for at in 0..self.chunks.len() {
            self.poll_abort()?;
            let chunk = self.chunks[at].index;
            let x = match (chunk, input.take()) {
                (0, Some(x)) => self.input_for(0, 0, &[x])?,
                _ => self.input_for(chunk, 0, &[])?,
            };
            let y = self.chunks[at]
                .compute
                .forward_incremental(&x, offset)
                .map_err(|e| StageStop::Failed(None, format!("incremental decoding at position {offset}: {e}")))?;
            if self.is_last_chunk(chunk) {
                outcome.outputs.push((0, y));
            } else {
                self.send_to_chunk(Route::activation(chunk + 1, 0), y)?;
            }
        }
        Ok(outcome)
    }

    fn snapshot(&self, kind: SnapshotKind) -> StageResult<Vec<(String, Tensor)>> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).and_then(|t| t.copy());
        let mut out = Vec::new();
        match kind {
            SnapshotKind::Params => {
                for (name, _, var) in self.store.vars() {
                    out.push((name.to_string(), cpu(var.as_tensor())?));
                }
            }
            SnapshotKind::Grads => {
                for (name, g) in &self.last_grads {
                    out.push((name.clone(), cpu(g)?));
                }
            }
            SnapshotKind::Buffers => {
                for layer in self.chunks.iter().flat_map(|c| c.compute.layers()) {
                    for (name, t) in layer.buffers() {
                        out.push((name, cpu(&t)?));
                    }
                }
            }
            SnapshotKind::OptimizerState => {
                for (name, state) in self.optimizer.state() {
                    match state {
                        ParamState::AdamW { exp_avg, exp_avg_sq, step } => {
                            out.push((format!("{name}.exp_avg"), cpu(exp_avg)?));
                            out.push((format!("{name}.exp_avg_sq"), cpu(exp_avg_sq)?));
                            out.push((format!("{name}.step"), Tensor::new(&[*step as f64], &Device::Cpu)?));
                        }
                        ParamState::Sgd { momentum_buffer: Some(buf) } => {
                            out.push((format!("{name}.momentum_buffer"), cpu(buf)?));
                        }
                        ParamState::Sgd { momentum_buffer: None } => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

fn with_action(e: StageStop, action: Action) -> StageStop {
    match e {
        StageStop::Failed(None, message) => StageStop::Failed(Some(action), message),
        other => other,
    }
}
