//! The stage-compute seam: the one implementation of a stage's math, which the executor runs
//! action by action and the profiler times layer by layer.
//!
//! A stage is an ordered list of layers that own their backward (see [`Layer`]). Per
//! micro-batch:
//! - [`StageCompute::forward`] (`F`) runs the layers' training forward and stashes what their
//!   backward needs, or only the stage's input when activations are recomputed;
//! - [`StageCompute::backward_input`] (`I`) recomputes the forward if needed, then walks the
//!   layers backwards computing only input gradients, and keeps what each weight step needs;
//! - [`StageCompute::backward_weight`] (`W`) computes the weight gradients (the matrix
//!   products, conv weight and bias gradients) and adds them into the step's sums;
//! - `B` is `I` then `W`.
//!
//! The last stage starts its backward from the loss: it keeps the micro-batch's targets with
//! the stash and derives the output gradient from the stashed (or recomputed) output. A last
//! layer that computes the loss itself ([`Layer::forward_with_loss`], a language model's
//! chunked head) keeps no output: its forward already ran its own backward from the loss
//! (all of it, or under a zero-bubble schedule all but the weight gradients, which wait for
//! `W`: [`StageCompute::set_split_backward`]), so `I` starts at
//! [`Layer::backward_input_from_loss`].
//!
//! Nothing here records an autograd graph: the layers are built over detached parameters
//! ([`crate::ParamStore::shared_view`]), so memory is exactly what the layers save.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::layer::{Gradients, Layer, LossBackward, LossInput, LossKind, Mode, Pass, Saved};
use crate::loss::{microbatch_loss, microbatch_loss_backward};

/// What a stage keeps between a micro-batch's forward and its backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every layer's saved activations (fastest, most memory).
    #[default]
    Off,
    /// Keep only the stage's input and rerun the forward just before the backward.
    Full,
}

impl std::str::FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "full" => Ok(Self::Full),
            other => Err(format!("unknown recomputation `{other}` (expected off or full)")),
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Full => "full",
        })
    }
}

/// The last stage's loss inputs for one micro-batch.
#[derive(Debug, Clone)]
pub struct LossTarget {
    pub targets: Tensor,
    /// Loss terms in the whole global batch (the loss is normalised by it).
    pub global_terms: usize,
}

/// A micro-batch between its forward and its input-gradient step.
struct Stashed {
    input: Tensor,
    /// Per layer, in order; `None` when the forward is recomputed before the backward.
    saved: Option<Vec<Saved>>,
    /// Last stage: the model output (logits) the loss gradient starts from, and the targets.
    output: Option<Tensor>,
    target: Option<LossTarget>,
    /// The last layer computed the loss itself: no output, its backward starts from `saved`.
    fused_loss: bool,
    bytes: u64,
}

/// A last stage's forward: the layers' saved state and the loss, with the output only when
/// the loss was taken from it (not fused into the last layer).
struct LossForward {
    output: Option<Tensor>,
    saved: Vec<Saved>,
    loss: Tensor,
}

/// A micro-batch between its input-gradient and its weight-gradient step.
struct PendingWeights {
    /// Per layer, in order.
    saved: Vec<Saved>,
    bytes: u64,
}

/// A stage's layers and everything in flight between their forward and backward steps.
pub struct StageCompute {
    layers: Vec<Box<dyn Layer>>,
    /// The first stage's input is data: no gradient is computed for it.
    input_needs_grad: bool,
    /// The loss the last stage computes; `None` on other stages.
    loss: Option<LossKind>,
    recompute: Recompute,
    stash: HashMap<usize, Stashed>,
    pending: HashMap<usize, PendingWeights>,
    grads: Gradients,
    live_bytes: u64,
    /// High-water mark of `live_bytes` at action boundaries, and of a recomputation's
    /// transient activations, since [`StageCompute::take_peak_bytes`].
    peak_bytes: u64,
    /// The schedule runs this stage's backward as separate `I` and `W` actions: a last layer
    /// that fuses the loss leaves its weight gradients for `W` ([`LossBackward::InputOnly`]).
    split_backward: bool,
}

/// How far a fused loss's backward goes in the forward that computes it (what
/// [`LossBackward`] asks of the last layer, before the stage lends it its gradient sums).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FusedBackward {
    LossOnly,
    Full,
    InputOnly,
}

impl StageCompute {
    pub fn new(
        layers: Vec<Box<dyn Layer>>,
        input_needs_grad: bool,
        loss: Option<LossKind>,
        recompute: Recompute,
    ) -> Self {
        Self {
            layers,
            input_needs_grad,
            loss,
            recompute,
            stash: HashMap::new(),
            pending: HashMap::new(),
            grads: Gradients::new(),
            live_bytes: 0,
            peak_bytes: 0,
            split_backward: false,
        }
    }

    /// Whether the schedule runs this stage's backward as separate `I` and `W` actions (a
    /// zero-bubble schedule) rather than as `B`. Only where work lands depends on it, never
    /// the result: a `B` after a split forward, or an `I` + `W` after a whole one, computes
    /// the same gradients.
    pub fn set_split_backward(&mut self, split: bool) {
        self.split_backward = split;
    }

    /// What a fused loss's backward does in a forward that keeps its activations.
    fn fused_backward(&self) -> FusedBackward {
        if self.split_backward {
            FusedBackward::InputOnly
        } else {
            FusedBackward::Full
        }
    }

    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Bytes of activations currently kept for backward steps (stashes and pending weight
    /// steps), each storage counted once.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// The most bytes kept at once since the last call (at the end of each action, and while a
    /// recomputed forward's activations are alive); starts over.
    pub fn take_peak_bytes(&mut self) -> u64 {
        std::mem::replace(&mut self.peak_bytes, self.live_bytes)
    }

    fn mark_peak(&mut self, extra: u64) {
        self.peak_bytes = self.peak_bytes.max(self.live_bytes + extra);
    }

    /// The tensors micro-batch `mb`'s stash keeps besides the stage's input: every layer's
    /// saved tensors and, on the last stage, the output (for memory accounting).
    pub fn stashed_tensors(&self, mb: usize) -> impl Iterator<Item = &Tensor> {
        self.stash
            .get(&mb)
            .into_iter()
            .flat_map(|s| s.output.iter().chain(s.saved.iter().flatten().flat_map(|saved| saved.tensors())))
    }

    /// Whether backward work is still outstanding (a step must not end with any).
    pub fn has_pending_work(&self) -> bool {
        !self.stash.is_empty() || !self.pending.is_empty()
    }

    /// `F`: the training forward of micro-batch `mb`. Returns the stage's output and, on the
    /// last stage (`target` given), the micro-batch's loss: an f64 scalar left on the stage's
    /// device (reading it would be a host synchronisation per micro-batch on a GPU). A last
    /// layer that fuses the loss has no output to return: the loss stands in for it.
    pub fn forward(&mut self, mb: usize, x: &Tensor, target: Option<LossTarget>) -> Result<(Tensor, Option<Tensor>)> {
        if self.stash.contains_key(&mb) || self.pending.contains_key(&mb) {
            candle_core::bail!("micro-batch {mb} is already in flight on this stage");
        }
        let (y, saved, loss, fused_loss) = match (&target, self.loss) {
            (Some(t), Some(kind)) => {
                // Activations that are recomputed before the backward: the loss only, now.
                let backward = match self.recompute {
                    Recompute::Off => self.fused_backward(),
                    Recompute::Full => FusedBackward::LossOnly,
                };
                let f = self.run_forward_with_loss(x, t, kind, Pass::First, backward)?;
                let loss = f.loss.to_dtype(DType::F64)?;
                let fused = f.output.is_none();
                (f.output.unwrap_or_else(|| loss.clone()), f.saved, Some(loss), fused)
            }
            (None, None) => {
                let (y, saved) = self.run_forward(x, Pass::First)?;
                (y, saved, None, false)
            }
            (Some(_), None) => candle_core::bail!("targets given to a stage that computes no loss"),
            (None, Some(_)) => {
                candle_core::bail!("the last stage needs targets for micro-batch {mb}")
            }
        };
        let saved = match self.recompute {
            Recompute::Off => Some(saved),
            Recompute::Full => None, // dropped here: only the input is kept
        };
        // The last stage keeps its output (the loss gradient starts from it) unless it reruns
        // the forward anyway, or its last layer took the loss itself.
        let output = (target.is_some() && self.recompute == Recompute::Off && !fused_loss).then(|| y.clone());
        let mut stashed = Stashed { input: x.clone(), saved, output, target, fused_loss, bytes: 0 };
        // The first stage's input is the data batch, which the driver holds anyway: not
        // counted (nor anything sharing its storage, e.g. token ids a layer keeps as they are).
        let all = distinct_bytes(
            std::iter::once(&stashed.input)
                .chain(stashed.output.iter())
                .chain(stashed.saved.iter().flatten().flat_map(|s| s.tensors())),
        );
        let data = if self.input_needs_grad { 0 } else { crate::memory::tensor_bytes(x) };
        stashed.bytes = all.saturating_sub(data);
        self.live_bytes += stashed.bytes;
        self.stash.insert(mb, stashed);
        self.mark_peak(0);
        Ok((y, loss))
    }

    /// The last stage's forward and loss: the last layer takes the loss itself when it can
    /// ([`Layer::forward_with_loss`], running as much of its backward as `backward` says),
    /// else the loss is taken from the stage's output.
    fn run_forward_with_loss(
        &mut self,
        x: &Tensor,
        target: &LossTarget,
        kind: LossKind,
        pass: Pass,
        backward: FusedBackward,
    ) -> Result<LossForward> {
        let Some((last, body)) = self.layers.split_last_mut() else {
            candle_core::bail!("the last stage has no layers to compute a loss from")
        };
        let mut saved = Vec::with_capacity(body.len() + 1);
        let mut h = x.clone();
        for layer in body.iter_mut() {
            let (y, s) = layer.forward_train(&h, pass)?;
            saved.push(s);
            h = y;
        }
        let input = LossInput { kind, targets: &target.targets, global_terms: target.global_terms };
        let backward = match backward {
            FusedBackward::LossOnly => LossBackward::LossOnly,
            FusedBackward::Full => LossBackward::Full(&mut self.grads),
            FusedBackward::InputOnly => LossBackward::InputOnly,
        };
        if let Some((loss, s)) = last.forward_with_loss(&h, &input, backward, pass)? {
            saved.push(s);
            return Ok(LossForward { output: None, saved, loss });
        }
        let (y, s) = last.forward_train(&h, pass)?;
        saved.push(s);
        let loss = microbatch_loss(kind, &y, &target.targets, target.global_terms)?;
        Ok(LossForward { output: Some(y), saved, loss })
    }

    fn run_forward(&mut self, x: &Tensor, pass: Pass) -> Result<(Tensor, Vec<Saved>)> {
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut h = x.clone();
        for layer in self.layers.iter_mut() {
            let (y, s) = layer.forward_train(&h, pass)?;
            saved.push(s);
            h = y;
        }
        Ok((h, saved))
    }

    /// `I`: the input gradient of micro-batch `mb` from its output gradient `dy` (the last
    /// stage derives it from the loss and takes `None`). Returns `None` on the first stage.
    pub fn backward_input(&mut self, mb: usize, dy: Option<&Tensor>) -> Result<Option<Tensor>> {
        let dx = self.input_step(mb, dy)?;
        self.mark_peak(0);
        Ok(dx)
    }

    fn input_step(&mut self, mb: usize, dy: Option<&Tensor>) -> Result<Option<Tensor>> {
        let stashed = self
            .stash
            .remove(&mb)
            .ok_or_else(|| candle_core::Error::Msg(format!("no stashed forward for micro-batch {mb}")))?;
        self.live_bytes = self.live_bytes.saturating_sub(stashed.bytes);
        let (saved, output, fused_loss) = match stashed.saved {
            Some(saved) => (saved, stashed.output, stashed.fused_loss),
            None => {
                let (output, saved) = match (&stashed.target, self.loss) {
                    (Some(t), Some(kind)) => {
                        let backward = self.fused_backward();
                        let f = self.run_forward_with_loss(&stashed.input, t, kind, Pass::Recompute, backward)?;
                        (f.output, f.saved)
                    }
                    _ => {
                        let (y, saved) = self.run_forward(&stashed.input, Pass::Recompute)?;
                        (stashed.target.is_some().then_some(y), saved)
                    }
                };
                let fused_loss = stashed.target.is_some() && output.is_none();
                let data = if self.input_needs_grad { 0 } else { crate::memory::tensor_bytes(&stashed.input) };
                let recomputed = distinct_bytes(
                    std::iter::once(&stashed.input).chain(output.iter()).chain(saved.iter().flat_map(|s| s.tensors())),
                );
                self.mark_peak(recomputed.saturating_sub(data));
                (saved, output, fused_loss)
            }
        };
        // `None`: the last layer took the loss itself and starts its backward from its saved
        // state.
        let mut grad = match (&stashed.target, self.loss, output, dy) {
            (Some(_), Some(_), None, None) if fused_loss => None,
            (Some(t), Some(kind), Some(output), None) => {
                Some(microbatch_loss_backward(kind, &output, &t.targets, t.global_terms)?)
            }
            (None, None, None, Some(dy)) => Some(dy.clone()),
            (Some(_), ..) => {
                candle_core::bail!("the last stage's backward starts from the loss, not a received gradient")
            }
            _ => candle_core::bail!("no output gradient for micro-batch {mb}"),
        };
        let mut weight_saved = Vec::with_capacity(saved.len());
        let last = saved.len();
        for (i, (layer, s)) in self.layers.iter_mut().zip(saved).enumerate().rev() {
            let need_dx = i > 0 || self.input_needs_grad;
            let (dx, w) = match &grad {
                Some(g) => layer.backward_input(s, g, need_dx)?,
                None if i + 1 == last => layer.backward_input_from_loss(s, need_dx)?,
                None => candle_core::bail!("layer {i} of {last} has no output gradient"),
            };
            weight_saved.push(w);
            match dx {
                Some(dx) => grad = Some(dx),
                None if need_dx => {
                    candle_core::bail!("layer {i} of {last} returned no input gradient")
                }
                None => {}
            }
        }
        weight_saved.reverse();
        // As for the stash: the first stage's input is the driver's data batch (a view of the
        // whole batch's storage), which a weight step may keep (an embedding's ids) but which
        // this stage does not hold.
        let bytes = if self.input_needs_grad {
            distinct_bytes(weight_saved.iter().flat_map(|s| s.tensors()))
        } else {
            let all =
                distinct_bytes(std::iter::once(&stashed.input).chain(weight_saved.iter().flat_map(|s| s.tensors())));
            all.saturating_sub(crate::memory::tensor_bytes(&stashed.input))
        };
        self.live_bytes += bytes;
        self.pending.insert(mb, PendingWeights { saved: weight_saved, bytes });
        Ok(grad.filter(|_| self.input_needs_grad))
    }

    /// `W`: the weight gradients of micro-batch `mb`, added into the step's sums.
    pub fn backward_weight(&mut self, mb: usize) -> Result<()> {
        self.weight_step(mb)?;
        self.mark_peak(0);
        Ok(())
    }

    fn weight_step(&mut self, mb: usize) -> Result<()> {
        let pending = self.pending.remove(&mb).ok_or_else(|| {
            candle_core::Error::Msg(format!("weight-gradient step before input-gradient step for micro-batch {mb}"))
        })?;
        self.live_bytes = self.live_bytes.saturating_sub(pending.bytes);
        for (layer, s) in self.layers.iter_mut().zip(pending.saved) {
            layer.backward_weight(s, &mut self.grads)?;
        }
        Ok(())
    }

    /// `B`: both backward steps at once.
    pub fn backward(&mut self, mb: usize, dy: Option<&Tensor>) -> Result<Option<Tensor>> {
        let dx = self.input_step(mb, dy)?;
        self.weight_step(mb)?;
        self.mark_peak(0);
        Ok(dx)
    }

    /// The step's summed weight gradients; the sums start over.
    pub fn take_gradients(&mut self) -> std::collections::BTreeMap<String, Tensor> {
        self.grads.take()
    }

    /// Tells every layer that its parameters changed in place ([`Layer::parameters_changed`]):
    /// after the optimizer's step.
    pub fn parameters_changed(&mut self) {
        for layer in &mut self.layers {
            layer.parameters_changed();
        }
    }

    /// What the layers keep between micro-batches beyond parameters and stashes
    /// ([`Layer::kept_bytes`]), now.
    pub fn kept_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.kept_bytes()).sum()
    }

    /// An incremental forward over new positions `offset..` ([`Layer::forward_incremental`]):
    /// each layer extends its cache; offset 0 starts a new sequence.
    pub fn forward_incremental(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in self.layers.iter_mut() {
            h = layer.forward_incremental(&h, offset)?;
        }
        Ok(h)
    }

    /// The last stage's evaluation of one micro-batch (evaluation mode, nothing kept): its
    /// loss, normalised by `target.global_terms`, as an f64 scalar, and its correct predictions
    /// (`u32`), both left on the device. A last layer that fuses the loss computes them without
    /// the whole output ([`Layer::eval_with_loss`]: GPT-2's logits are 411 MB at 2 × 1024).
    pub fn eval_loss(&mut self, x: &Tensor, target: &LossTarget) -> Result<(Tensor, Tensor)> {
        let Some(kind) = self.loss else { candle_core::bail!("targets given to a stage that computes no loss") };
        let Some((last, body)) = self.layers.split_last_mut() else {
            candle_core::bail!("the last stage has no layers to compute a loss from")
        };
        let mut h = x.clone();
        for layer in body.iter_mut() {
            h = layer.forward(&h, Mode::Eval)?;
        }
        let input = LossInput { kind, targets: &target.targets, global_terms: target.global_terms };
        if let Some((loss, hits)) = last.eval_with_loss(&h, &input)? {
            return Ok((loss.to_dtype(DType::F64)?, hits));
        }
        let y = last.forward(&h, Mode::Eval)?;
        let loss = microbatch_loss(kind, &y, &target.targets, target.global_terms)?.to_dtype(DType::F64)?;
        Ok((loss, crate::loss::correct_predictions_on_device(&y, &target.targets)?))
    }

    /// An evaluation forward (no saving; BatchNorm uses its running statistics).
    pub fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in self.layers.iter_mut() {
            h = layer.forward(&h, Mode::Eval)?;
        }
        Ok(h)
    }
}

/// Bytes of the distinct storages behind `tensors` (views of one allocation count once).
pub fn distinct_bytes<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tensors {
        let (storage, _) = t.storage_and_layout();
        let key = &*storage as *const candle_core::Storage as usize;
        drop(storage);
        if seen.insert(key) {
            total += crate::memory::tensor_bytes(t);
        }
    }
    total
}
