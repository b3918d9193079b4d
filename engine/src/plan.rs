//! The planner: which layout and schedule trains fastest within a memory limit, predicted.
//!
//! It enumerates stage counts (1 to the number of devices), the schedules asked for with their
//! chunks per device (GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-H2, ZB-V, and `zb-auto`, which is
//! generated for each layout from its profiled costs within the memory limit), partitions of
//! the model into `stages × v` chunks (uniform, balanced by parameters, balanced by profiled
//! time — the last under the memory limit without virtual stages) and micro-batch counts that
//! divide the batch, simulates each with [`crate::simulate`] with and without activation
//! recomputation, and ranks them: configurations that fit the limit first, then by predicted
//! step time, then by peak memory (so of two equally fast schedules the leaner one wins, as
//! 1F1B does over GPipe). Combinations a schedule cannot run (interleaving with `m` not a
//! multiple of `p`, more chunks than layers) are left out.
//!
//! On a [`Cluster`] (data-parallel replicas, nodes, links) each layout is priced with its
//! hand-offs and gradient all-reduce on the links it crosses ([`StageCosts::place_on`]); each
//! replica takes `batch_size / data_parallel` of the batch, and stage counts whose replicas do
//! not fit the nodes are left out.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::compute::Recompute;
use crate::error::{EngineError, Result};
use crate::partition::{Partition, PartitionError};
use crate::profile::Profile;
use crate::schedule::ScheduleKind;
use crate::simulate::{predict, range_memory, schedule_from_costs, Cluster, Prediction, StageCosts};

/// What to search over.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Most stages (one device each).
    pub devices: usize,
    /// Global batch size (all data-parallel replicas together); only micro-batch counts that
    /// divide a replica's share are tried.
    pub batch_size: usize,
    pub microbatches: Vec<usize>,
    /// Schedules with their chunks per device (`v`).
    pub schedules: Vec<(ScheduleKind, usize)>,
    /// Per-stage (per-device) memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// Activation recomputation settings to try (recomputing costs a forward per backward,
    /// so it only wins where memory requires it).
    pub recompute: Vec<Recompute>,
    /// Replicas, nodes and links ([`Cluster::default`]: one replica, stages as threads of one
    /// process, as today).
    pub cluster: Cluster,
}

/// One simulated configuration.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub stages: usize,
    /// How the partition was chosen (`uniform`, `balanced-params`, `balanced-time`); when
    /// strategies agree, their names are joined with `=`.
    pub partition_name: String,
    /// Layers per chunk (`stages × virtual_stages` chunks).
    pub partition: Partition,
    pub schedule: ScheduleKind,
    pub virtual_stages: usize,
    pub microbatches: usize,
    pub recompute: Recompute,
    pub prediction: Prediction,
    /// Whether every stage's predicted peak memory is within the limit.
    pub fits: bool,
}

impl Candidate {
    /// Predicted examples (sequences or images) per second, `batch_size` per step.
    pub fn throughput(&self, batch_size: usize) -> f64 {
        batch_size as f64 / self.prediction.step_time.max(1e-12)
    }

    pub fn label(&self) -> String {
        format!(
            "{} stage{} ({} {}), {}{}, m={}{}",
            self.stages,
            if self.stages == 1 { "" } else { "s" },
            self.partition,
            self.partition_name,
            self.schedule,
            if self.virtual_stages > 1 { format!(" v={}", self.virtual_stages) } else { String::new() },
            self.microbatches,
            if self.recompute == Recompute::Full { ", recompute" } else { "" }
        )
    }
}

/// Simulates every configuration and returns them ranked, best first. `profile_for(b)` gives
/// the model's profile at micro-batch size `b` (the planner asks once per size).
pub fn plan(request: &PlanRequest, mut profile_for: impl FnMut(usize) -> Result<Profile>) -> Result<Vec<Candidate>> {
    if request.devices == 0 {
        return Err(PartitionError::ZeroStages.into());
    }
    request.cluster.check(1)?;
    let replicas = request.cluster.data_parallel;
    if !request.batch_size.is_multiple_of(replicas) || request.batch_size < replicas {
        return Err(EngineError::Config(format!(
            "the batch size {} does not split evenly over {replicas} data-parallel replicas",
            request.batch_size
        )));
    }
    let replica_batch = request.batch_size / replicas;
    let mut sizes: Vec<usize> = request.microbatches.clone();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.retain(|&m| m > 0 && replica_batch.is_multiple_of(m));
    if sizes.is_empty() {
        return Err(EngineError::Config(format!(
            "none of the micro-batch counts {:?} divides the batch size {}{}",
            request.microbatches,
            replica_batch,
            if replicas > 1 { format!(" of each of {replicas} replicas") } else { String::new() }
        )));
    }
    let limit = request.memory_limit.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    // A micro-batch size the model cannot run (BatchNorm needs two values per channel, say) is
    // skipped, not fatal: the other counts are still worth ranking.
    let mut first_failure = None;
    for m in sizes {
        let profile = match profile_for(replica_batch / m) {
            Ok(p) => p,
            Err(e) => {
                first_failure.get_or_insert(e);
                continue;
            }
        };
        let n = profile.layers.len();
        let params: Vec<usize> = profile.layers.iter().map(|l| l.param_bytes() as usize).collect();
        let times: Vec<f64> = profile.layers.iter().map(|l| l.microbatch_s()).collect();
        let recompute_options =
            if request.recompute.is_empty() { vec![Recompute::Off] } else { request.recompute.clone() };
        for stages in 1..=request.devices.min(n) {
            if request.cluster.check(stages).is_err() {
                continue; // this many stages' replicas do not fit the nodes
            }
            for (&(kind, v), &recompute) in
                request.schedules.iter().flat_map(|k| recompute_options.iter().map(move |r| (k, r)))
            {
                let chunks = stages * v;
                if chunks > n || (v > 1 && stages == 1) {
                    continue; // more chunks than layers; virtual stages on one device gain nothing
                }
                // A schedule that cannot run here (interleaving with m not a multiple of p) is
                // left out. zb-auto is generated per partition below; its unit-cost twin stands
                // in for the memory-aware partitioning.
                let Ok(schedule) = kind.build_with(stages, m, v) else { continue };
                // Memory a chunk would need for layers `r`, following this schedule's stash depth
                // (per device; exact without virtual stages, where a device is one chunk).
                let in_flight: Vec<usize> = (0..stages).map(|s| schedule.peak_in_flight(s)).collect();
                let mut partitions: BTreeMap<Vec<usize>, Vec<&str>> = BTreeMap::new();
                let mut add = |name: &'static str, p: std::result::Result<Partition, PartitionError>| match p {
                    Ok(p) => {
                        partitions.entry(p.counts().to_vec()).or_default().push(name);
                        Ok(())
                    }
                    Err(PartitionError::NoFit { .. }) => Ok(()),
                    Err(e) => Err(e),
                };
                add("uniform", Partition::uniform(n, chunks))?;
                add("balanced-params", Partition::balanced(&params, chunks))?;
                let fits = |s: usize, r: std::ops::Range<usize>| {
                    if v > 1 {
                        return true; // the device totals are checked after simulating
                    }
                    let (static_bytes, stash) = range_memory(&profile, r.clone());
                    let peak = match recompute {
                        Recompute::Off => in_flight[s] as u64 * stash,
                        Recompute::Full => {
                            let input = if r.start > 0 { profile.layers[r.start - 1].output_bytes } else { 0 };
                            (in_flight[s].max(1) as u64 - 1) * input + stash
                        }
                    };
                    static_bytes + peak <= limit
                };
                add("balanced-time", Partition::balanced_time(&times, chunks, fits))?;
                for (counts, names) in partitions {
                    let partition = Partition::manual(&counts, n)?;
                    let mut costs = StageCosts::from_profile_with(&profile, &partition, recompute)?;
                    costs.place_on(schedule.placement(), &request.cluster)?;
                    let schedule = if kind == ScheduleKind::ZbAuto {
                        match schedule_from_costs(kind, stages, m, v, &costs, request.memory_limit) {
                            Ok(s) => s,
                            Err(_) => continue, // nothing fits this limit on this layout
                        }
                    } else {
                        schedule.clone()
                    };
                    let prediction = predict(&schedule, &costs)?;
                    let fits = prediction.peak_memory.iter().all(|&b| b <= limit);
                    out.push(Candidate {
                        stages,
                        partition_name: names.join("="),
                        partition,
                        schedule: kind,
                        virtual_stages: v,
                        microbatches: m,
                        recompute,
                        prediction,
                        fits,
                    });
                }
            }
        }
    }
    // Times equal to 0.1 µs are a tie (two schedules with the same critical path differ only by
    // float rounding), and a tie goes to the lower peak memory.
    if out.is_empty() {
        if let Some(e) = first_failure {
            return Err(e);
        }
    }
    let time_key = |c: &Candidate| (c.prediction.step_time * 1e7).round() as u64;
    out.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(time_key(a).cmp(&time_key(b)))
            .then(a.prediction.max_peak_memory().cmp(&b.prediction.max_peak_memory()))
    });
    Ok(out)
}

/// Why the first candidate is recommended, in a few sentences.
pub fn explain(ranked: &[Candidate], request: &PlanRequest) -> String {
    let mut text = String::new();
    let Some(best) = ranked.first() else { return "nothing to rank".into() };
    if !best.fits {
        let lightest = ranked.iter().min_by_key(|c| c.prediction.max_peak_memory()).unwrap_or(best);
        let _ = write!(
            text,
            "No configuration fits the memory limit; the leanest, {}, needs {} per stage.",
            lightest.label(),
            human_bytes(lightest.prediction.max_peak_memory())
        );
        return text;
    }
    let p = &best.prediction;
    let _ = write!(
        text,
        "Recommended: {}. Predicted {:.2} ms/step ({:.0} examples/s), bubble {:.1}%, peak memory {} on the fullest stage",
        best.label(),
        1e3 * p.step_time,
        best.throughput(request.batch_size),
        100.0 * p.bubble_fraction,
        human_bytes(p.max_peak_memory())
    );
    match request.memory_limit {
        Some(limit) => {
            let _ = write!(text, " (limit {}).", human_bytes(limit));
        }
        None => text.push('.'),
    }
    // Why this schedule: against 1F1B on the same stages, micro-batches and recomputation.
    if best.schedule != ScheduleKind::OneFOneB {
        let baseline = ranked
            .iter()
            .filter(|c| {
                c.schedule == ScheduleKind::OneFOneB
                    && c.stages == best.stages
                    && c.microbatches == best.microbatches
                    && c.recompute == best.recompute
            })
            .min_by(|a, b| a.prediction.step_time.total_cmp(&b.prediction.step_time));
        if let Some(base) = baseline {
            let _ = write!(
                text,
                " Against 1F1B on the same stages and m ({:.2} ms, bubble {:.1}%, peak {}), {} {}.",
                1e3 * base.prediction.step_time,
                100.0 * base.prediction.bubble_fraction,
                human_bytes(base.prediction.max_peak_memory()),
                best.schedule,
                why_faster(best.schedule)
            );
        }
    }
    if let Some(second) = ranked.get(1).filter(|c| c.fits) {
        let slower = 100.0 * (second.prediction.step_time / p.step_time - 1.0);
        if slower.abs() < 0.05 {
            let _ = write!(
                text,
                " Runner-up {} is as fast but needs more memory ({} vs {}).",
                second.label(),
                human_bytes(second.prediction.max_peak_memory()),
                human_bytes(p.max_peak_memory())
            );
        } else {
            let _ = write!(text, " Runner-up {} is {:.1}% slower.", second.label(), slower);
        }
    }
    let excluded = ranked.iter().filter(|c| !c.fits).count();
    if excluded > 0 {
        let faster = ranked.iter().filter(|c| !c.fits && c.prediction.step_time < p.step_time).count();
        let _ = write!(
            text,
            " {excluded} configuration{} exceed{} the memory limit ({faster} of them would be faster).",
            if excluded == 1 { "" } else { "s" },
            if excluded == 1 { "s" } else { "" }
        );
    }
    if best.stages > 1 {
        let single = ranked
            .iter()
            .filter(|c| c.stages == 1 && c.fits)
            .map(|c| c.prediction.step_time)
            .fold(f64::INFINITY, f64::min);
        if single.is_finite() {
            let _ = write!(text, " Best single-stage layout: {:.2} ms/step.", 1e3 * single);
        }
    }
    text
}

/// What a schedule does about the bubble, in a phrase.
fn why_faster(kind: ScheduleKind) -> &'static str {
    match kind {
        ScheduleKind::GPipe => "runs every forward first (same bubble as 1F1B, more memory)",
        ScheduleKind::OneFOneB => "is the baseline",
        ScheduleKind::Interleaved => "cuts each device's layers into v chunks, so the warm-up and cool-down are v times shorter (v times the messages)",
        ScheduleKind::ZbH1 => "splits each backward and defers the weight steps into 1F1B's idle time, at 1F1B's memory",
        ScheduleKind::ZbH2 => "also starts more forwards early, filling the warm-up too, for more activation memory",
        ScheduleKind::ZbV => "splits backwards and runs two half-size chunks per device in a V, halving the ramp at 1F1B's memory",
        ScheduleKind::ZbAuto => "was generated for these measured costs: backwards split, weight steps placed where a device would otherwise wait, forwards admitted as the memory limit allows",
    }
}

/// `1.5 MB`, `320 KB`, `12 B` (decimal units).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{HopProfile, LayerProfile};

    /// A synthetic profile: compute and activations scale with the micro-batch size `b`;
    /// `slow` multiplies the last layer's time.
    fn profile(b: usize, slow: f64) -> Profile {
        let layers = (0..4)
            .map(|i| {
                let scale = if i == 3 { slow } else { 1.0 } * b as f64;
                LayerProfile {
                    name: format!("layer{i}"),
                    forward_s: 1e-3 * scale,
                    backward_s: 2e-3 * scale,
                    backward_input_s: 2e-3 * scale,
                    backward_weight_s: 0.0,
                    backward_fused_s: 2e-3 * scale,
                    optimizer_s: 0.0,
                    activation_bytes: 1000 * b as u64,
                    input_bytes_kept: 0,
                    weight_stash_bytes: 0,
                    split_extra_bytes: 0,
                    split_weight_stash_extra_bytes: 0,
                    kept_bytes: 0,
                    output_bytes: 100 * b as u64,
                    params: [(format!("layer{i}.weight"), 4000)].into_iter().collect(),
                    optimizer_state_ratio: 2,
                }
            })
            .collect();
        Profile {
            model: "synthetic".into(),
            device: "cpu".into(),
            threads: 1,
            microbatch_size: b,
            input_shape: vec![b],
            optimizer: "adamw".into(),
            repeats: 1,
            layers,
            hop: HopProfile { latency_s: 0.0, copy_bytes_per_s: f64::INFINITY },
            overhead: Default::default(),
            cores: 0,
            contention: None,
        }
    }

    fn request(limit: Option<u64>) -> PlanRequest {
        PlanRequest {
            devices: 2,
            batch_size: 8,
            microbatches: vec![1, 2, 3, 4, 8],
            schedules: vec![(ScheduleKind::GPipe, 1), (ScheduleKind::OneFOneB, 1)],
            memory_limit: limit,
            recompute: vec![Recompute::Off],
            cluster: Cluster::default(),
        }
    }

    #[test]
    fn links_and_replicas_reshape_the_ranking() {
        use crate::simulate::{LinkKind, LinkSpec};
        // Free links: 2 stages win (see ranks_by_predicted_time_and_breaks_ties_by_memory).
        // One device per node over a link of 100 ms per message: more than a whole step on one
        // stage (at most 96 ms), so one stage wins.
        let mut req = request(None);
        req.cluster = Cluster {
            devices_per_node: Some(1),
            nodes: Some(2),
            inter_node: LinkSpec { kind: LinkKind::Ethernet, bytes_per_s: None, latency_s: Some(0.1) },
            ..Cluster::default()
        };
        let ranked = plan(&req, |b| Ok(profile(b, 1.0))).unwrap();
        assert_eq!(ranked[0].stages, 1, "{}", ranked[0].label());
        let two = ranked.iter().find(|c| c.stages == 2).unwrap();
        assert!(two.prediction.exposed_communication >= 0.2, "{}", two.prediction.exposed_communication);
        // 2 replicas on 2 devices: only one stage each fits; each replica profiles half the batch.
        let mut req = request(None);
        req.cluster = Cluster { data_parallel: 2, devices_per_node: Some(2), nodes: Some(1), ..Cluster::default() };
        let mut asked = Vec::new();
        let ranked = plan(&req, |b| {
            asked.push(b);
            Ok(profile(b, 1.0))
        })
        .unwrap();
        assert!(ranked.iter().all(|c| c.stages == 1));
        assert_eq!(asked, vec![4, 2, 1], "micro-batches of the 4 examples a replica gets");
        assert!(ranked.iter().all(|c| c.microbatches != 8), "8 does not divide a replica's 4");
        req.batch_size = 7;
        let err = plan(&req, |b| Ok(profile(b, 1.0))).unwrap_err().to_string();
        assert!(err.contains("does not split evenly over 2 data-parallel replicas"), "{err}");
    }

    #[test]
    fn recomputation_costs_a_forward_and_stashes_only_the_input() {
        let profile = profile(4, 1.0);
        let partition = Partition::manual(&[2, 2], 4).unwrap();
        let off = StageCosts::from_profile(&profile, &partition).unwrap();
        let full = StageCosts::from_profile_with(&profile, &partition, Recompute::Full).unwrap();
        for s in 0..2 {
            assert_eq!(full.forward[s], off.forward[s]);
            assert!((full.backward_input[s] - (off.backward_input[s] + off.forward[s])).abs() < 1e-12);
            assert_eq!(full.recompute_bytes[s], off.stash_bytes[s]);
        }
        // The first stage's input is data (nothing to stash); the second keeps what it received.
        assert_eq!(full.stash_bytes, vec![0, profile.layers[1].output_bytes]);
        let schedule = ScheduleKind::GPipe.build(2, 4).unwrap();
        let (p_off, p_full) = (predict(&schedule, &off).unwrap(), predict(&schedule, &full).unwrap());
        assert!(p_full.step_time > p_off.step_time);
        for s in 0..2 {
            let fixed = off.static_bytes[s];
            assert_eq!(p_off.peak_memory[s], fixed + 4 * off.stash_bytes[s]);
            assert_eq!(p_full.peak_memory[s], fixed + 3 * full.stash_bytes[s] + off.stash_bytes[s]);
        }
    }

    #[test]
    fn recomputation_is_chosen_only_where_memory_requires_it() {
        let mut req = request(None);
        req.recompute = vec![Recompute::Off, Recompute::Full];
        let ranked = plan(&req, |b| Ok(profile(b, 1.0))).unwrap();
        assert_eq!(ranked[0].recompute, Recompute::Off, "recomputing only costs time");
        let leanest = |r: Recompute| {
            ranked.iter().filter(|c| c.recompute == r).map(|c| c.prediction.max_peak_memory()).min().unwrap()
        };
        let (off, full) = (leanest(Recompute::Off), leanest(Recompute::Full));
        assert!(full < off, "recomputation must save memory: {full} vs {off}");
        req.memory_limit = Some(off - 1);
        let ranked = plan(&req, |b| Ok(profile(b, 1.0))).unwrap();
        assert!(ranked[0].fits);
        assert_eq!(ranked[0].recompute, Recompute::Full);
        assert!(explain(&ranked, &req).contains("recompute"), "{}", explain(&ranked, &req));
    }

    #[test]
    fn ranks_by_predicted_time_and_breaks_ties_by_memory() {
        let mut asked = Vec::new();
        let ranked = plan(&request(None), |b| {
            asked.push(b);
            Ok(profile(b, 1.0))
        })
        .unwrap();
        // 3 does not divide 8; each micro-batch size is profiled once.
        assert_eq!(asked, vec![8, 4, 2, 1]);
        assert!(ranked.iter().all(|c| c.microbatches != 3));
        assert!(ranked.windows(2).all(|w| w[0].prediction.step_time <= w[1].prediction.step_time + 1e-7));
        // Equal stages: 2 stages with the most micro-batches has the smallest bubble, and 1F1B
        // ties GPipe on time but stashes fewer micro-batches.
        let best = &ranked[0];
        assert_eq!((best.stages, best.schedule, best.microbatches), (2, ScheduleKind::OneFOneB, 8));
        assert_eq!(ranked[1].schedule, ScheduleKind::GPipe);
        assert!((ranked[1].prediction.step_time - best.prediction.step_time).abs() < 1e-9);
        assert!(ranked[1].prediction.max_peak_memory() > best.prediction.max_peak_memory());
        // Identical partitions from different strategies are simulated once.
        assert!(ranked.iter().any(|c| c.partition_name == "uniform=balanced-params=balanced-time"));
        assert!(explain(&ranked, &request(None)).starts_with("Recommended: 2 stages (2,2"));
    }

    #[test]
    fn memory_limit_excludes_what_does_not_fit() {
        // Static per stage of two layers: 2 x 4000 x (1 + 1 + 2) = 32000 bytes; one stage of four
        // needs 64000. At m = 8 a stage stashes 2000-2100 bytes per micro-batch: GPipe keeps 8,
        // 1F1B at most 2.
        let limit = 40_000;
        let ranked = plan(&request(Some(limit)), |b| Ok(profile(b, 1.0))).unwrap();
        let first_misfit = ranked.iter().position(|c| !c.fits).unwrap();
        assert!(ranked[first_misfit..].iter().all(|c| !c.fits), "fitting configurations come first");
        for c in &ranked {
            assert_eq!(c.fits, c.prediction.peak_memory.iter().all(|&b| b <= limit), "{}", c.label());
        }
        assert!(ranked.iter().filter(|c| c.stages == 1).all(|c| !c.fits));
        let gpipe8 =
            ranked.iter().find(|c| c.schedule == ScheduleKind::GPipe && c.microbatches == 8 && c.stages == 2).unwrap();
        assert!(!gpipe8.fits);
        assert_eq!((ranked[0].stages, ranked[0].schedule, ranked[0].microbatches), (2, ScheduleKind::OneFOneB, 8));
        assert!(ranked[0].fits);
    }

    #[test]
    fn an_expensive_layer_gets_a_stage_of_its_own() {
        let ranked = plan(&request(None), |b| Ok(profile(b, 3.0))).unwrap();
        assert_eq!(ranked[0].partition.counts(), &[3, 1]);
        assert!(ranked[0].partition_name.contains("balanced-time"));
        let uniform = ranked.iter().find(|c| c.partition.counts() == [2, 2] && c.microbatches == 8).unwrap();
        assert!(uniform.prediction.step_time > ranked[0].prediction.step_time);
    }

    #[test]
    fn a_microbatch_size_that_cannot_run_is_skipped_not_fatal() {
        // Micro-batches of 1 fail (as BatchNorm does on 1×1 maps); the others are still ranked.
        let ranked = plan(&request(None), |b| {
            if b == 1 {
                Err(EngineError::Config("training BatchNorm needs more than one value per channel".into()))
            } else {
                Ok(profile(b, 1.0))
            }
        })
        .unwrap();
        assert!(!ranked.is_empty());
        assert!(ranked.iter().all(|c| c.microbatches != 8), "m = 8 means micro-batches of 1");
        // When nothing can run, the first failure is the answer.
        let err = plan(&request(None), |_| Err(EngineError::Config("cannot run".into()))).unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
    }
}
