//! The profiler: what each layer of a model costs on this device, measured, so the simulator,
//! the balancer and the planner can reason about layouts before any are run.
//!
//! Per layer, on one micro-batch: forward time (the last layer includes the loss, as the last
//! stage computes it), backward time, activation bytes kept for the backward, parameter /
//! gradient / optimizer-state bytes, the bytes sent to the next stage, and the optimizer step's
//! time. Plus the cost of one hop between stage threads.
//!
//! Every layer runs through the stage-compute seam ([`crate::compute`]) exactly as a stage
//! runs it: `forward_s` is its `F`, `backward_input_s` its `I` (input gradient only),
//! `backward_weight_s` its `W` (weight gradients, accumulated). A full `B` costs both.
//!
//! Layers timed alone miss what a real stage adds around them (the driver splitting the batch
//! and running the end-of-step collective, messages, buffers, the loss read): the profile also
//! runs a one-stage pipeline of the model at 1, 2 and 4 micro-batches and keeps the fixed costs
//! the layer times do not explain, one per step and one per micro-batch
//! ([`OverheadProfile`]); the simulator adds them.
//!
//! Each layer is timed alone with its input computed by the layers before it: the median of
//! `repeats` back-to-back runs after `warmup`, and the lowest such median over `rounds` passes
//! over the model (on a shared machine other processes only add time: a burst of load spoils
//! a round, not the estimate). All of it runs in a thread pool of the stage's size, with
//! candle's thread budget set the same way the executor sets it.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use crossbeam_channel::unbounded;
use serde::{Deserialize, Serialize};

use crate::compute::{LossTarget, Recompute, StageCompute};
use crate::error::{EngineError, Result};
use crate::layer::{ParamStore, PipelineModel};
use crate::loss::loss_terms;
use crate::optim::{Optimizer, OptimizerConfig, ParamUpdate};
use crate::pipeline::{squared_norm, start_elementwise_pool};

/// A model's measured costs for one micro-batch size on one device and thread budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub model: String,
    pub device: String,
    /// CPU threads the layers were timed with (a stage's `threads_per_stage`).
    pub threads: usize,
    pub microbatch_size: usize,
    /// Shape of the profiled micro-batch's input.
    pub input_shape: Vec<usize>,
    pub optimizer: String,
    pub repeats: usize,
    pub layers: Vec<LayerProfile>,
    pub hop: HopProfile,
    /// Fixed costs of a real stage beyond its layers (zero in profiles made before it existed).
    #[serde(default)]
    pub overhead: OverheadProfile,
    /// Cores this process could run on when profiled (0 in profiles made before it was
    /// recorded): with more stage threads than cores, stages time-share them.
    #[serde(default)]
    pub cores: usize,
    /// How much slower the layers run while other stages' threads compute on the machine's
    /// other cores (`None`: not measured, on a GPU, beyond the time budget, or an old profile).
    #[serde(default)]
    pub contention: Option<ContentionProfile>,
}

/// Stages that are threads of one machine slow each other even on cores of their own: they
/// share its memory bandwidth and last-level cache (and, on a virtual machine, whatever the
/// host shares out). Measured as the whole model's forward and backward of one micro-batch
/// (a stage's kind of work), run by `copies` threads at once, each in its own pool of the
/// profile's `threads`, against the same run alone while the others wait: `copies` is as many
/// stages as the cores hold (`cores / threads`, at least 2). Each time is the lowest over
/// rounds of the median pass (load from other processes only adds time).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ContentionProfile {
    /// Copies of the work run at once.
    pub copies: usize,
    /// Seconds of one pass alone.
    pub alone_s: f64,
    /// Seconds of one pass while all `copies` run.
    pub concurrent_s: f64,
    /// Cores the copies ran on (the profile's `cores`), to take time-sharing out of the ratio.
    pub cores: usize,
    /// Threads each copy computed with.
    pub threads: usize,
}

impl ContentionProfile {
    /// How many times slower a pass ran with the other copies running, beyond what sharing
    /// too few cores explains (`copies × threads / cores` when above 1); at least 1 (a faster
    /// concurrent pass is noise).
    pub fn factor(&self) -> f64 {
        let demand = (self.copies * self.threads) as f64 / self.cores.max(1) as f64;
        (self.concurrent_s / self.alone_s.max(1e-12) / demand.max(1.0)).max(1.0)
    }
}

/// What a real pipeline step costs beyond the profiled layers and optimizer: measured on a
/// one-stage pipeline as `step(m) − (m · layers + optimizer)` at m = 1, 2 and 4, fitted by
/// least squares to `step_s + m · microbatch_s` (each at least 0). Besides fixed costs, the
/// per-micro-batch part holds what layers timed alone miss: each layer is timed back to back
/// with its data warm in cache, while a real stage's backward finds its stash gone cold after
/// the other layers' work, which grows with the model rather than staying a fixed
/// millisecond. So it is measured whatever the model's size, within a time budget
/// ([`OVERHEAD_BUDGET_S`]); not measured (zero) only when one pass of it would not fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OverheadProfile {
    /// Per step: the driver's batch split and step messages, the gradient-norm collective.
    pub step_s: f64,
    /// Per micro-batch on a stage: its messages, buffering, loss and bookkeeping.
    pub microbatch_s: f64,
}

/// One layer's costs on one micro-batch. Times in seconds, sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    pub name: String,
    pub forward_s: f64,
    /// A full backward: `backward_input_s + backward_weight_s`.
    pub backward_s: f64,
    /// The input-gradient step (`I`): the input gradient and what the weight step needs.
    pub backward_input_s: f64,
    /// The weight-gradient step (`W`): weight gradients computed and added into the sums.
    pub backward_weight_s: f64,
    /// The full backward run as one `B` (what 1F1B and GPipe run), timed on its own: set
    /// against `backward_s` (its `I` and `W` timed apart) it is what splitting the backward
    /// costs zero-bubble schedules ([`LayerProfile::split_overhead`]). 0 in profiles made
    /// before it was measured.
    #[serde(default)]
    pub backward_fused_s: f64,
    /// Once per step: gradient norm and optimizer update of this layer's parameters.
    pub optimizer_s: f64,
    /// Bytes the layer's forward keeps until its backward (excluding the layer's input, which
    /// the previous layer or the stage boundary accounts for; the last layer's output, which
    /// the loss gradient starts from, included).
    pub activation_bytes: u64,
    /// Bytes of the layer's input when the layer keeps it for its backward and the layer
    /// before does not already keep it (a stage holding both counts it here; a stage starting
    /// at this layer counts its received input instead).
    #[serde(default)]
    pub input_bytes_kept: u64,
    /// Bytes the layer's input-gradient step (`I`) keeps for its weight step (`W`): held from
    /// the `I` to the `W` when a schedule splits the backward.
    #[serde(default)]
    pub weight_stash_bytes: u64,
    /// What the forward keeps beyond `activation_bytes` when the schedule splits the backward
    /// (zero-bubble): a fused loss's inputs to its deferred weight gradient.
    #[serde(default)]
    pub split_extra_bytes: u64,
    /// What the `I` keeps beyond `weight_stash_bytes` when the schedule splits the backward.
    #[serde(default)]
    pub split_weight_stash_extra_bytes: u64,
    /// Bytes the layer keeps between micro-batches beyond its parameters, for the whole step:
    /// values derived from them (a weight's dense transpose for the input gradient), made
    /// again after each optimizer step. Held like the parameters, so counted with them.
    #[serde(default)]
    pub kept_bytes: u64,
    /// The output, which is what a stage boundary after this layer sends downstream (and the
    /// size of the gradient sent back up).
    pub output_bytes: u64,
    /// Parameters this layer uses, by name (tied parameters appear in each user), in bytes.
    pub params: BTreeMap<String, u64>,
    /// Bytes of optimizer state per byte of parameter (AdamW 2, SGD with momentum 1).
    pub optimizer_state_ratio: u64,
}

impl LayerProfile {
    pub fn param_bytes(&self) -> u64 {
        self.params.values().sum()
    }

    /// Forward plus full backward: what one micro-batch costs this layer.
    pub fn microbatch_s(&self) -> f64 {
        self.forward_s + self.backward_s
    }

    /// What `I` and `W` run apart cost beyond one fused `B`, as a fraction of `B`
    /// (`(I + W − B) / B`; negative when the split came out faster, which is noise); `None`
    /// when `B` was not measured.
    pub fn split_overhead(&self) -> Option<f64> {
        (self.backward_fused_s > 0.0).then(|| (self.backward_s - self.backward_fused_s) / self.backward_fused_s)
    }
}

/// Moving a tensor from one stage thread to the next: a channel hop (send, wake the receiver)
/// and, for stages on different devices, a copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopProfile {
    /// One-way latency of a crossbeam message between two threads (half a ping-pong).
    pub latency_s: f64,
    /// Copy throughput, for the per-byte part of a move between devices.
    pub copy_bytes_per_s: f64,
}

impl HopProfile {
    /// Time for a message of `bytes` to reach the next stage.
    pub fn cost(&self, bytes: u64) -> f64 {
        self.latency_s + bytes as f64 / self.copy_bytes_per_s.max(1.0)
    }
}

/// How to profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Timed runs per measurement in each round.
    pub repeats: usize,
    /// Passes over the whole model; the lowest median over rounds is kept.
    pub rounds: usize,
    pub warmup: usize,
    /// CPU threads for the math (match the stage's `threads_per_stage`).
    pub threads: usize,
    pub optimizer: OptimizerConfig,
    pub seed: u64,
    /// The device to profile on (a GPU's times are the stream's: each timer stops after a
    /// device synchronisation).
    pub device: crate::device::StageDevice,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            repeats: 10,
            rounds: 3,
            warmup: 2,
            threads: 1,
            optimizer: OptimizerConfig::adamw(),
            seed: 0,
            device: crate::device::StageDevice::Cpu,
        }
    }
}

/// The pool of `options.threads` workers a profile measures in (a stage's budget), after
/// checking the options: at least one repeat and one thread, within the thread budget.
fn profiling_pool(options: &ProfileOptions) -> Result<rayon::ThreadPool> {
    if options.repeats == 0 || options.threads == 0 {
        return Err(EngineError::Config("profiling needs at least one repeat and one thread".into()));
    }
    crate::pipeline::check_thread_budget(options.threads)?;
    start_elementwise_pool();
    rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()
        .map_err(|e| EngineError::Config(format!("profiler thread pool: {e}")))
}

/// Profiles every layer of `model` on the micro-batch `inputs` / `targets`.
pub fn profile_model(
    model: &dyn PipelineModel,
    inputs: &Tensor,
    targets: &Tensor,
    options: &ProfileOptions,
) -> Result<Profile> {
    let pool = profiling_pool(options)?;
    let mut profile = pool.install(|| {
        // Rounds spaced in time, each layer's lowest median kept: a burst of load from another
        // process spoils one round, not the estimate. (Within a round each layer repeats back to
        // back, caches warm, as a stage runs one layer's work for a micro-batch.)
        let mut best = profile_in_pool(model, inputs, targets, options)?;
        for _ in 1..options.rounds.max(1) {
            let next = profile_in_pool(model, inputs, targets, options)?;
            for (b, n) in best.layers.iter_mut().zip(next.layers) {
                b.forward_s = b.forward_s.min(n.forward_s);
                b.backward_input_s = b.backward_input_s.min(n.backward_input_s);
                b.backward_weight_s = b.backward_weight_s.min(n.backward_weight_s);
                b.backward_s = b.backward_input_s + b.backward_weight_s;
                b.backward_fused_s = b.backward_fused_s.min(n.backward_fused_s);
                b.optimizer_s = b.optimizer_s.min(n.optimizer_s);
            }
            best.hop.latency_s = best.hop.latency_s.min(next.hop.latency_s);
            best.hop.copy_bytes_per_s = best.hop.copy_bytes_per_s.max(next.hop.copy_bytes_per_s);
        }
        Ok::<_, EngineError>(best)
    })?;
    profile.cores = crate::pipeline::available_cores();
    let per_microbatch: f64 = profile.layers.iter().map(|l| l.microbatch_s()).sum();
    profile.contention = measure_contention(model, inputs, targets, options, profile.cores, per_microbatch)?;
    Ok(profile)
}

/// Seconds the contention probe (`measure_contention`) may spend: well under a second on `gpt-tiny`, a few on a
/// GPT of 4 × 256; a model whose passes would not fit is not measured.
pub const CONTENTION_BUDGET_S: f64 = 10.0;

/// Measures [`ContentionProfile`] on a CPU: `None` on a GPU (its stages do not share one
/// machine's cores) and when `copies` passes of `per_microbatch` seconds would overrun
/// [`CONTENTION_BUDGET_S`] even at 3 repeats.
fn measure_contention(
    model: &dyn PipelineModel,
    inputs: &Tensor,
    targets: &Tensor,
    options: &ProfileOptions,
    cores: usize,
    per_microbatch: f64,
) -> Result<Option<ContentionProfile>> {
    if options.device != crate::device::StageDevice::Cpu {
        return Ok(None);
    }
    let threads = options.threads;
    let copies = (cores / threads).max(2);
    if crate::pipeline::check_thread_budget(copies * threads).is_err() {
        return Ok(None);
    }
    // More rounds than the layers get: a ratio of two times is twice as exposed to load.
    let rounds = options.rounds.max(5);
    let Some(repeats) = contention_repeats(per_microbatch, rounds, options) else { return Ok(None) };
    let specs = model.layers();
    let loss = model.loss();
    let target = LossTarget { targets: targets.clone(), global_terms: loss_terms(targets) };
    // Every copy meets the others at each phase's start and end; the alone phase is copy 0's.
    let barrier = std::sync::Barrier::new(copies);
    let run_copy = |copy: usize| -> Result<(Vec<f64>, Vec<f64>)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| EngineError::Config(format!("profiler thread pool: {e}")))?;
        pool.install(|| {
            // A failure still meets every barrier, so the other copies finish instead of waiting.
            let mut failure: Option<EngineError> = None;
            let built = (|| -> Result<StageCompute> {
                let mut store = ParamStore::new(Device::Cpu, options.seed);
                for spec in crate::layer::unique_params(&specs) {
                    store.get(&spec)?;
                }
                let mut view = store.shared_view();
                let layers = specs.iter().map(|s| s.build(&mut view)).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(StageCompute::new(layers, false, Some(loss), Recompute::Off))
            })();
            let mut compute = match built {
                Ok(c) => Some(c),
                Err(e) => {
                    failure = Some(e);
                    None
                }
            };
            let mut pass = |times: Option<&mut Vec<f64>>| {
                let Some(c) = compute.as_mut() else { return };
                let started = Instant::now();
                let ran = c.forward(0, inputs, Some(target.clone())).and_then(|_| c.backward(0, None));
                match ran {
                    Ok(_) => {
                        c.take_gradients();
                        if let Some(times) = times {
                            times.push(started.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert(e.into());
                        compute = None;
                    }
                }
            };
            let (mut alone, mut concurrent) = (Vec::new(), Vec::new());
            for _round in 0..rounds {
                barrier.wait();
                if copy == 0 {
                    let mut times = Vec::with_capacity(repeats);
                    for run in 0..options.warmup + repeats {
                        pass((run >= options.warmup).then_some(&mut times));
                    }
                    alone.push(median(&mut times));
                }
                barrier.wait();
                let mut times = Vec::with_capacity(repeats);
                for run in 0..options.warmup + repeats {
                    pass((run >= options.warmup).then_some(&mut times));
                }
                concurrent.push(median(&mut times));
            }
            match failure {
                Some(e) => Err(e),
                None => Ok((alone, concurrent)),
            }
        })
    };
    let run_copy = &run_copy;
    let results: Vec<Result<(Vec<f64>, Vec<f64>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..copies).map(|copy| scope.spawn(move || run_copy(copy))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(EngineError::Config("a contention probe thread panicked".into()))))
            .collect()
    });
    let lowest = |times: Vec<f64>| times.into_iter().fold(f64::INFINITY, f64::min);
    let mut alone_s = f64::INFINITY;
    let mut concurrent_sum = 0.0;
    for (copy, result) in results.into_iter().enumerate() {
        let (alone, concurrent) = result?;
        if copy == 0 {
            alone_s = lowest(alone);
        }
        concurrent_sum += lowest(concurrent);
    }
    // Every copy's concurrent pass at its best round, averaged: the typical slowed stage.
    let concurrent_s = concurrent_sum / copies as f64;
    Ok(Some(ContentionProfile { copies, alone_s, concurrent_s, cores, threads }))
}

/// Timed passes per phase for the contention probe: the profile's repeats (at least 3), fewer
/// for a model whose `rounds` × (an alone and a concurrent phase) would overrun
/// [`CONTENTION_BUDGET_S`]; `None` when even 3 would.
fn contention_repeats(per_microbatch: f64, rounds: usize, options: &ProfileOptions) -> Option<usize> {
    let affordable = CONTENTION_BUDGET_S / (2.0 * rounds as f64 * per_microbatch.max(1e-9)) - options.warmup as f64;
    let repeats = affordable.floor().min(options.repeats.max(3) as f64);
    (repeats >= 3.0).then_some(repeats as usize)
}

fn profile_in_pool(
    model: &dyn PipelineModel,
    inputs: &Tensor,
    targets: &Tensor,
    options: &ProfileOptions,
) -> Result<Profile> {
    let specs = model.layers();
    if specs.is_empty() {
        return Err(EngineError::Config(format!("model {} has no layers", model.name())));
    }
    let (host_inputs, host_targets) = (inputs.clone(), targets.clone());
    let device = options.device.open()?;
    let (inputs, targets) = (&inputs.to_device(&device)?, &targets.to_device(&device)?);
    // Work on a GPU is queued: a timer stops only once the device has done it.
    let done = || device.synchronize();
    let mut store = ParamStore::new(device.clone(), options.seed);
    for spec in crate::layer::unique_params(&specs) {
        store.get(&spec)?;
    }
    let mut view = store.shared_view();
    let optimizer_state_ratio = match options.optimizer {
        OptimizerConfig::AdamW { .. } => 2,
        OptimizerConfig::Sgd { momentum, .. } => u64::from(momentum != 0.0),
    };
    let terms = loss_terms(targets);
    let last = specs.len() - 1;
    let mut x = inputs.clone();
    let mut out = Vec::with_capacity(specs.len());
    let mut previous_kept = std::collections::HashSet::new();
    let mut computes = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        // Each layer alone as a one-layer stage, through the same seam the executor runs: the
        // model's input needs no gradient; the last layer computes the loss.
        let target = (i == last).then(|| LossTarget { targets: targets.clone(), global_terms: terms });
        let layer = spec.build(&mut view)?;
        let mut compute = StageCompute::new(vec![layer], i > 0, (i == last).then(|| model.loss()), Recompute::Off);
        let (y, _) = compute.forward(0, &x, target.clone())?;
        // What the layer keeps, its input's storage left out (the stage boundary or the layer
        // before accounts for it), and whether it keeps that input itself.
        let kept: Vec<Tensor> = compute.stashed_tensors(0).cloned().collect();
        let input_key = storage_key(&x);
        let keeps_input = i > 0 && kept.iter().any(|t| storage_key(t) == input_key);
        let activation_bytes = crate::compute::distinct_bytes(kept.iter().filter(|t| storage_key(t) != input_key));
        let input_bytes_kept =
            if keeps_input && !previous_kept.contains(&input_key) { crate::memory::tensor_bytes(&x) } else { 0 };
        previous_kept = kept.iter().map(storage_key).collect();
        let output_bytes = (y.elem_count() * y.dtype().size_in_bytes()) as u64;
        // Downstream of a hidden layer, any gradient costs the same; ones stand in for it.
        let dy = if i == last { None } else { Some(y.ones_like()?) };
        compute.backward(0, dy.as_ref())?;
        // The same forward as a zero-bubble schedule runs it.
        compute.set_split_backward(true);
        compute.forward(0, &x, target.clone())?;
        let split_kept: Vec<Tensor> = compute.stashed_tensors(0).cloned().collect();
        let split_bytes = crate::compute::distinct_bytes(split_kept.iter().filter(|t| storage_key(t) != input_key));
        let split_extra_bytes = split_bytes.saturating_sub(activation_bytes);
        compute.backward(0, dy.as_ref())?;
        compute.set_split_backward(false);

        // Each run times F, I and W, then F again and a fused B: the split and the fused
        // backward alternate, so load from other processes falls on both alike.
        let (mut f, mut bi, mut bw, mut bf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..options.warmup + options.repeats {
            done()?;
            // F as a zero-bubble schedule runs it: a fused loss leaves its weight gradients
            // for W. The second F is the one a schedule of B actions runs, which does them.
            compute.set_split_backward(true);
            let t0 = Instant::now();
            compute.forward(0, &x, target.clone())?;
            done()?;
            let t1 = Instant::now();
            compute.backward_input(0, dy.as_ref())?;
            done()?;
            let t2 = Instant::now();
            compute.backward_weight(0)?;
            done()?;
            let t3 = Instant::now();
            compute.set_split_backward(false);
            compute.forward(0, &x, target.clone())?;
            done()?;
            compute.backward(0, dy.as_ref())?;
            done()?;
            let t5 = Instant::now();
            if run >= options.warmup {
                f.push((t1 - t0).as_secs_f64());
                bi.push((t2 - t1).as_secs_f64());
                bw.push((t3 - t2).as_secs_f64());
                // The fused backward: what F + B takes beyond the split F (the same for a
                // layer whose forward does no backward work; a fused loss's head does its
                // weight gradient in this F).
                bf.push(((t5 - t3) - (t1 - t0).min(t5 - t3)).as_secs_f64());
            }
        }
        let (forward_s, backward_input_s, backward_weight_s) = (median(&mut f), median(&mut bi), median(&mut bw));
        let backward_fused_s = median(&mut bf);
        // After backwards since the parameters last changed: what the layer keeps for the rest
        // of a step.
        let kept_bytes = compute.kept_bytes();

        let grads = compute.take_gradients();
        let layer_vars: Vec<(String, Var, bool)> = spec
            .params()
            .iter()
            .filter_map(|p| store.var(&p.name).map(|v| (p.name.clone(), v.clone(), p.weight_decay)))
            .collect();
        let weight_grads: Vec<Tensor> = layer_vars
            .iter()
            .map(|(name, v, _)| match grads.get(name) {
                Some(g) => Ok(g.clone()),
                None => v.zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut optimizer = Optimizer::new(options.optimizer);
        // What a stage does per step: the norm of each gradient, then one multi-tensor step.
        let updates: Vec<ParamUpdate<'_>> = layer_vars
            .iter()
            .zip(&weight_grads)
            .map(|((name, var, decay), grad)| ParamUpdate { name, var, grad, decay: *decay, bf16_copy: None })
            .collect();
        let optimizer_s = typical_time(options, || {
            for g in &weight_grads {
                squared_norm(g)?;
            }
            optimizer.step_many(&updates, 1e-6, 1.0)?;
            Ok(done()?)
        })?;
        compute.parameters_changed();
        let params =
            spec.params().iter().map(|p| (p.name.clone(), (p.numel() * DType::F32.size_in_bytes()) as u64)).collect();
        out.push(LayerProfile {
            name: spec.name(),
            forward_s,
            backward_s: backward_input_s + backward_weight_s,
            backward_input_s,
            backward_weight_s,
            backward_fused_s,
            optimizer_s,
            activation_bytes,
            input_bytes_kept,
            // Measured below, with the real output gradient.
            weight_stash_bytes: 0,
            split_extra_bytes,
            split_weight_stash_extra_bytes: 0,
            kept_bytes,
            output_bytes,
            params,
            optimizer_state_ratio,
        });
        computes.push((compute, x.clone(), target));
        x = y;
    }
    // What each layer's `I` keeps for its `W` depends on the gradient it gets (its layout, not
    // just its size), so it is measured on one real backward chain through all layers: layer
    // i's `I` gets layer i+1's input gradient, as it does inside a stage.
    let mut h = inputs.clone();
    for (compute, _, target) in computes.iter_mut() {
        h = compute.forward(1, &h, target.clone())?.0;
    }
    let mut dy: Option<Tensor> = None;
    for (i, (compute, _, _)) in computes.iter_mut().enumerate().rev() {
        let dx = compute.backward_input(1, dy.as_ref())?;
        out[i].weight_stash_bytes = compute.live_bytes();
        compute.backward_weight(1)?;
        dy = dx;
    }
    // Again as a zero-bubble schedule splits it: what the `I`s keep beyond that.
    let mut h = inputs.clone();
    for (compute, _, target) in computes.iter_mut() {
        compute.set_split_backward(true);
        h = compute.forward(1, &h, target.clone())?.0;
    }
    let mut dy: Option<Tensor> = None;
    for (i, (compute, _, _)) in computes.iter_mut().enumerate().rev() {
        let dx = compute.backward_input(1, dy.as_ref())?;
        out[i].split_weight_stash_extra_bytes = compute.live_bytes().saturating_sub(out[i].weight_stash_bytes);
        compute.backward_weight(1)?;
        compute.set_split_backward(false);
        dy = dx;
    }
    let probe_bytes = out.iter().map(|l| l.output_bytes).max().unwrap_or(4096).max(4096);
    Ok(Profile {
        model: model.name(),
        device: options.device.to_string(),
        threads: options.threads,
        microbatch_size: inputs.dim(0)?,
        input_shape: inputs.dims().to_vec(),
        optimizer: match options.optimizer {
            OptimizerConfig::AdamW { .. } => "adamw".into(),
            OptimizerConfig::Sgd { .. } => "sgd".into(),
        },
        repeats: options.repeats,
        overhead: measure_overhead(model, &host_inputs, &host_targets, options, &out)?,
        // Set once over all rounds by `profile_model`.
        cores: 0,
        contention: None,
        layers: out,
        hop: measure_hop(probe_bytes as usize, options.repeats.max(50) * 4)?,
    })
}

/// The whole model's backward in stage order, fused and split: what a zero-bubble schedule
/// changes beyond each layer's `I + W` timed back to back (per layer in [`LayerProfile`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageOrderSplit {
    /// Two micro-batches' fused backwards after their forwards (`F0 F1 B0 B1`), seconds: what
    /// `F0 F1 B0 B1` takes beyond the split run's forwards (a fused loss does some of its
    /// backward in F, more of it when the backward is not split).
    pub fused_s: f64,
    /// The same split, each `W` deferred behind the other micro-batch's `I` as zero-bubble
    /// schedules defer it (`F0 F1 I0 I1 W0 W1`), seconds of backward.
    pub split_s: f64,
}

impl StageOrderSplit {
    /// `(split − fused) / fused`.
    pub fn overhead(&self) -> f64 {
        (self.split_s - self.fused_s) / self.fused_s.max(1e-12)
    }
}

/// Runs the whole model as one stage on two copies of the micro-batch `inputs` / `targets`
/// and times the backward part of `F0 F1 B0 B1` against `F0 F1 I0 I1 W0 W1`: the lowest over
/// `rounds` of the median of `repeats`, in a pool of `threads`, as [`profile_model`] times.
pub fn stage_order_split(
    model: &dyn PipelineModel,
    inputs: &Tensor,
    targets: &Tensor,
    options: &ProfileOptions,
) -> Result<StageOrderSplit> {
    let pool = profiling_pool(options)?;
    pool.install(|| {
        let device = options.device.open()?;
        let (inputs, targets) = (inputs.to_device(&device)?, targets.to_device(&device)?);
        let specs = model.layers();
        let mut store = ParamStore::new(device.clone(), options.seed);
        for spec in crate::layer::unique_params(&specs) {
            store.get(&spec)?;
        }
        let mut view = store.shared_view();
        let layers = specs.iter().map(|s| s.build(&mut view)).collect::<candle_core::Result<Vec<_>>>()?;
        let mut compute = StageCompute::new(layers, false, Some(model.loss()), Recompute::Off);
        let target = LossTarget { targets: targets.clone(), global_terms: 2 * loss_terms(&targets) };
        let done = || device.synchronize();
        let (mut best_fused, mut best_split) = (f64::INFINITY, f64::INFINITY);
        for _round in 0..options.rounds.max(1) {
            let (mut fused, mut split) = (Vec::new(), Vec::new());
            for run in 0..options.warmup + options.repeats {
                done()?;
                compute.set_split_backward(false);
                let t0 = Instant::now();
                for mb in 0..2 {
                    compute.forward(mb, &inputs, Some(target.clone()))?;
                }
                for mb in 0..2 {
                    compute.backward(mb, None)?;
                }
                done()?;
                let t1 = Instant::now();
                // Each phase starts from empty gradient sums (the first micro-batch's W sets
                // them, the second adds), so both accumulate alike.
                compute.take_gradients();
                compute.set_split_backward(true);
                let t_split = Instant::now();
                for mb in 0..2 {
                    compute.forward(mb, &inputs, Some(target.clone()))?;
                }
                done()?;
                let t2 = Instant::now();
                for mb in 0..2 {
                    compute.backward_input(mb, None)?;
                }
                for mb in 0..2 {
                    compute.backward_weight(mb)?;
                }
                done()?;
                let t3 = Instant::now();
                compute.take_gradients();
                if run >= options.warmup {
                    let split_forward = t2 - t_split;
                    fused.push(((t1 - t0) - split_forward.min(t1 - t0)).as_secs_f64());
                    split.push((t3 - t2).as_secs_f64());
                }
            }
            best_fused = best_fused.min(median(&mut fused));
            best_split = best_split.min(median(&mut split));
        }
        Ok(StageOrderSplit { fused_s: best_fused, split_s: best_split })
    })
}

/// Runs the model as a one-stage pipeline (1F1B, the profile's optimizer, threads and device)
/// on the profiled micro-batch repeated m = 1, 2 and 4 times, and fits what the step takes
/// beyond the layers' and optimizer's profiled times. Each step time is the median over
/// [`OVERHEAD_ROUNDS`] rounds of the median of `repeats` steps: the layers' times are their
/// best rounds, so what a typical step takes beyond them (the way layers compose in a stage,
/// and the machine's usual load, which the bench's median step includes) is the overhead.
fn measure_overhead(
    model: &dyn PipelineModel,
    inputs: &Tensor,
    targets: &Tensor,
    options: &ProfileOptions,
    layers: &[LayerProfile],
) -> Result<OverheadProfile> {
    let per_microbatch: f64 = layers.iter().map(|l| l.forward_s + l.backward_input_s + l.backward_weight_s).sum();
    let optimizer: f64 = layers.iter().map(|l| l.optimizer_s).sum();
    let counts = [1usize, 2, 4];
    let Some(repeats) = overhead_repeats(per_microbatch, &counts, options) else {
        return Ok(OverheadProfile::default());
    };
    let mut excess = [0.0; 3];
    // The widest spread of a count's round medians: how far apart the same step came out,
    // which no fitted cost below it can be told from.
    let mut noise = 0.0f64;
    for (slot, m) in counts.into_iter().enumerate() {
        let x = Tensor::cat(&vec![inputs; m], 0)?;
        let y = Tensor::cat(&vec![targets; m], 0)?;
        let config = crate::pipeline::PipelineConfig::default()
            .stages(1)
            .schedule(crate::schedule::ScheduleKind::OneFOneB)
            .microbatches(m)
            .optimizer(options.optimizer)
            .threads_per_stage(options.threads)
            .devices(vec![options.device])
            .seed(options.seed);
        let mut pipeline = crate::pipeline::Pipeline::new(model, config)?;
        for _ in 0..options.warmup {
            pipeline.train_step(&x, &y)?;
        }
        let mut rounds = [0.0; OVERHEAD_ROUNDS];
        for round in &mut rounds {
            let mut times = Vec::with_capacity(repeats);
            for _ in 0..repeats {
                times.push(pipeline.train_step(&x, &y)?.elapsed.as_secs_f64());
            }
            *round = median(&mut times);
        }
        let (lowest, highest) = rounds.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        excess[slot] = median(&mut rounds) - (m as f64 * per_microbatch + optimizer);
        noise = noise.max(highest - lowest);
    }
    Ok(fit_overhead(&counts, &excess, noise))
}

/// Seconds `measure_overhead` may spend: a few seconds on a model of 50 ms per micro-batch
/// (at the default 10 repeats), a bounded share of a profile of a larger one.
pub const OVERHEAD_BUDGET_S: f64 = 20.0;

/// Rounds of timed steps at each micro-batch count for the overhead fit (odd, so the median is
/// a round's).
const OVERHEAD_ROUNDS: usize = 3;

/// Timed steps per round ([`OVERHEAD_ROUNDS`]) at each micro-batch count for the overhead fit: the
/// profile's repeats (at least 3), fewer for a model whose steps would overrun
/// [`OVERHEAD_BUDGET_S`], at least 1; `None` when even one would.
fn overhead_repeats(per_microbatch: f64, counts: &[usize], options: &ProfileOptions) -> Option<usize> {
    let microbatches: usize = counts.iter().sum();
    // Warm-up steps, then the rounds of `repeats` steps, at each count; a step costs about
    // its micro-batches' layers.
    let affordable = OVERHEAD_BUDGET_S / (microbatches as f64 * per_microbatch.max(1e-9)) - options.warmup as f64;
    let repeats = (affordable / OVERHEAD_ROUNDS as f64).floor().min(options.repeats.max(3) as f64);
    (repeats >= 1.0).then_some(repeats as usize)
}

/// Least squares of `excess = step_s + m · microbatch_s` over the micro-batch counts, each
/// coefficient clamped at 0 (noise can make a fitted cost negative; a cost cannot be), and
/// each dropped (0) when what it adds over the measured counts is within `noise`, the widest
/// spread of one count's rounds: a slope that moves the excess by less than the rounds
/// disagree is the rounds' noise, and would otherwise be multiplied into every micro-batch of
/// every prediction (a 2-round fit on 120 ms steps once read 8.9 ms per micro-batch from it,
/// and 0 the next run).
fn fit_overhead(counts: &[usize], excess: &[f64], noise: f64) -> OverheadProfile {
    let n = counts.len() as f64;
    let mean_m = counts.iter().sum::<usize>() as f64 / n;
    let mean_e = excess.iter().sum::<f64>() / n;
    let cov: f64 = counts.iter().zip(excess).map(|(&m, e)| (m as f64 - mean_m) * (e - mean_e)).sum();
    let var: f64 = counts.iter().map(|&m| (m as f64 - mean_m).powi(2)).sum();
    let range = counts.iter().max().zip(counts.iter().min()).map_or(0, |(hi, lo)| hi - lo) as f64;
    let slope = if var > 0.0 { (cov / var).max(0.0) } else { 0.0 };
    let microbatch_s = if slope * range > noise { slope } else { 0.0 };
    let step_s = (mean_e - microbatch_s * mean_m).max(0.0);
    OverheadProfile { microbatch_s, step_s: if step_s > noise { step_s } else { 0.0 } }
}

/// Identifies a tensor's allocation (views of one allocation share it).
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle_core::Storage as usize
}

/// The median of `repeats` back-to-back runs after `warmup`.
fn typical_time(options: &ProfileOptions, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..options.warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(options.repeats);
    for _ in 0..options.repeats {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Ping-pongs a tensor of `bytes` between two threads over crossbeam channels, as stages send
/// activations and gradients, and times a copy of it.
pub fn measure_hop(bytes: usize, round_trips: usize) -> Result<HopProfile> {
    let elems = (bytes / 4).max(1);
    let tensor = Tensor::zeros(elems, DType::F32, &Device::Cpu)?;
    let (to_peer, peer_inbox) = unbounded::<Tensor>();
    let (to_main, main_inbox) = unbounded::<Tensor>();
    let peer = std::thread::spawn(move || {
        while let Ok(t) = peer_inbox.recv() {
            if to_main.send(t).is_err() {
                break;
            }
        }
    });
    let trip = |t: Tensor| -> Result<Tensor> {
        to_peer.send(t).map_err(|_| EngineError::Config("hop probe thread ended".into()))?;
        main_inbox.recv().map_err(|_| EngineError::Config("hop probe thread ended".into()))
    };
    let mut t = tensor.clone();
    for _ in 0..10 {
        t = trip(t)?;
    }
    // Median of batches of round trips: robust to the odd descheduling, unlike a single total.
    let mut batches = Vec::new();
    for _ in 0..9 {
        let started = Instant::now();
        for _ in 0..round_trips.div_ceil(9) {
            t = trip(t)?;
        }
        batches.push(started.elapsed().as_secs_f64() / (2 * round_trips.div_ceil(9)) as f64);
    }
    let latency_s = median(&mut batches);
    drop(to_peer);
    let _ = peer.join();

    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        std::hint::black_box(tensor.copy()?);
        times.push(started.elapsed().as_secs_f64());
    }
    let copy_s = times.into_iter().fold(f64::INFINITY, f64::min).max(1e-9);
    Ok(HopProfile { latency_s, copy_bytes_per_s: (elems * 4) as f64 / copy_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_overhead_is_i_plus_w_beyond_a_fused_b() {
        let mut layer = LayerProfile {
            name: "l".into(),
            forward_s: 1.0,
            backward_s: 2.06,
            backward_input_s: 1.0,
            backward_weight_s: 1.06,
            backward_fused_s: 2.0,
            optimizer_s: 0.0,
            activation_bytes: 0,
            input_bytes_kept: 0,
            weight_stash_bytes: 0,
            split_extra_bytes: 0,
            split_weight_stash_extra_bytes: 0,
            kept_bytes: 0,
            output_bytes: 0,
            params: BTreeMap::new(),
            optimizer_state_ratio: 0,
        };
        assert!((layer.split_overhead().unwrap() - 0.03).abs() < 1e-12);
        // A profile from before the fused B was timed reads it as 0: nothing to compare.
        let mut json = serde_json::to_value(&layer).unwrap();
        json.as_object_mut().unwrap().remove("backward_fused_s");
        layer = serde_json::from_value(json).unwrap();
        assert_eq!(layer.split_overhead(), None);
    }

    #[test]
    fn the_overhead_is_measured_within_its_budget_whatever_the_model() {
        let options = ProfileOptions { repeats: 10, warmup: 2, ..ProfileOptions::default() };
        let counts = [1, 2, 4];
        // gpt-tiny (a few ms a micro-batch): the profile's repeats.
        assert_eq!(overhead_repeats(0.003, &counts, &options), Some(10));
        // GPT 4 x 256 (about 60 ms): measured (it was skipped above 50 ms), in about 13 s.
        assert_eq!(overhead_repeats(0.06, &counts, &options), Some(10));
        // 300 ms a micro-batch: fewer repeats, within the budget.
        let repeats = overhead_repeats(0.3, &counts, &options).unwrap();
        assert_eq!(repeats, 2);
        assert!(7.0 * (2 + OVERHEAD_ROUNDS * repeats) as f64 * 0.3 <= OVERHEAD_BUDGET_S);
        // GPT-2 124M-sized (seconds a micro-batch): out of budget, not measured.
        assert_eq!(overhead_repeats(2.0, &counts, &options), None);
        // At least 3 repeats when the profile asks for fewer and there is time.
        assert_eq!(overhead_repeats(0.003, &counts, &ProfileOptions { repeats: 1, ..options }), Some(3));
    }

    #[test]
    fn the_contention_factor_is_the_slowdown_beyond_time_sharing() {
        let probe = ContentionProfile { copies: 2, alone_s: 0.010, concurrent_s: 0.016, cores: 2, threads: 1 };
        assert!((probe.factor() - 1.6).abs() < 1e-12);
        // On one core the two copies time-share it: half of the 1.6 is that, the rest (0.8)
        // is noise, read as no contention at all.
        assert_eq!(ContentionProfile { cores: 1, ..probe }.factor(), 1.0);
        assert!((ContentionProfile { cores: 1, concurrent_s: 0.024, ..probe }.factor() - 1.2).abs() < 1e-12);
        // A concurrent pass faster than the alone one is noise too.
        assert_eq!(ContentionProfile { concurrent_s: 0.009, ..probe }.factor(), 1.0);
        // An old profile has neither field.
        let json = r#"{"model":"m","device":"cpu","threads":1,"microbatch_size":1,"input_shape":[1],
            "optimizer":"adamw","repeats":1,"layers":[],"hop":{"latency_s":0.0,"copy_bytes_per_s":1.0}}"#;
        let old: Profile = serde_json::from_str(json).unwrap();
        assert_eq!((old.cores, old.contention), (0, None));
    }

    #[test]
    fn the_contention_probe_stays_within_its_budget() {
        let options = ProfileOptions { repeats: 10, warmup: 2, ..ProfileOptions::default() };
        assert_eq!(contention_repeats(0.003, 3, &options), Some(10));
        let repeats = contention_repeats(0.3, 3, &options).unwrap();
        assert!(repeats >= 3 && 6.0 * (2 + repeats) as f64 * 0.3 <= CONTENTION_BUDGET_S, "{repeats}");
        assert_eq!(contention_repeats(2.0, 3, &options), None);
    }

    #[test]
    fn the_overhead_fit_recovers_a_line_and_never_goes_negative() {
        let fit = fit_overhead(&[1, 2, 4], &[0.003 + 0.0005, 0.003 + 0.001, 0.003 + 0.002], 0.0);
        assert!((fit.step_s - 0.003).abs() < 1e-12 && (fit.microbatch_s - 0.0005).abs() < 1e-12, "{fit:?}");
        // Noise that makes the excess fall with m: no negative per-micro-batch cost.
        let fit = fit_overhead(&[1, 2, 4], &[0.004, 0.003, 0.001], 0.0);
        assert_eq!(fit.microbatch_s, 0.0);
        assert!((fit.step_s - (0.008 / 3.0)).abs() < 1e-12, "{fit:?}");
        // Layers that took longer in the profile than in the pipeline: no negative step cost.
        assert_eq!(fit_overhead(&[1, 2, 4], &[-0.001, -0.001, -0.001], 0.0), OverheadProfile::default());
    }

    #[test]
    fn the_overhead_fit_drops_what_the_rounds_cannot_resolve() {
        let line = [0.003 + 0.0005, 0.003 + 0.001, 0.003 + 0.002];
        // Rounds 1 ms apart: the slope moves the excess by 1.5 ms over m = 1..4, so it stays,
        // and so does the 3 ms step cost.
        let fit = fit_overhead(&[1, 2, 4], &line, 0.001);
        assert!((fit.step_s - 0.003).abs() < 1e-12 && (fit.microbatch_s - 0.0005).abs() < 1e-12, "{fit:?}");
        // Rounds 2 ms apart: the slope is noise; the step cost is the mean excess, still above it.
        let fit = fit_overhead(&[1, 2, 4], &line, 0.002);
        assert_eq!(fit.microbatch_s, 0.0);
        assert!((fit.step_s - (0.0125 / 3.0)).abs() < 1e-12, "{fit:?}");
        // Rounds 5 ms apart: neither cost is told from the noise.
        assert_eq!(fit_overhead(&[1, 2, 4], &line, 0.005), OverheadProfile::default());
        // Like the 4 x 256 GPT's run that read 8.9 ms per micro-batch: a slope of 8 ms on
        // 120 ms steps whose rounds were 30 ms apart is dropped.
        let fit = fit_overhead(&[1, 2, 4], &[-0.004, 0.010, 0.022], 0.030);
        assert_eq!(fit, OverheadProfile::default());
    }
}
