//! How a model's ordered layer list is cut into contiguous pipeline stages.
//!
//! A partition is just the number of layers per stage (`3,3,2`). Strategies: manual counts,
//! uniform by layer count, balanced by parameter count, and balanced by measured time (both
//! optimal: the largest stage, by parameters or by time, is as small as any contiguous cut
//! allows; the time balancer can also respect a per-stage memory limit).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PartitionError {
    #[error("a pipeline needs at least one stage")]
    ZeroStages,
    #[error("cannot split {layers} layers into {stages} stages: every stage needs at least one layer")]
    MoreStagesThanLayers { stages: usize, layers: usize },
    #[error("stage {stage} of split {split} is empty: every stage needs at least one layer")]
    EmptyStage { stage: usize, split: String },
    #[error("split {split} covers {sum} layers but the model has {layers}")]
    WrongTotal { split: String, sum: usize, layers: usize },
    #[error("split {split} has {given} stages but {stages} were asked for")]
    StageCountMismatch { split: String, given: usize, stages: usize },
    #[error("cannot parse split {0:?}: expected comma-separated layer counts such as 3,3,2")]
    Parse(String),
    #[error("balanced-time needs a time per layer ({layers} layers, {given} times given): profile the model first")]
    NeedsProfile { layers: usize, given: usize },
    #[error("no split of {layers} layers into {stages} stages fits the memory limit")]
    NoFit { layers: usize, stages: usize },
}

/// Layers per stage, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    counts: Vec<usize>,
}

impl Partition {
    /// Explicit layer counts per stage; they must be positive and sum to `num_layers`.
    pub fn manual(counts: &[usize], num_layers: usize) -> Result<Self, PartitionError> {
        let split = join(counts);
        if counts.is_empty() {
            return Err(PartitionError::ZeroStages);
        }
        if let Some(stage) = counts.iter().position(|&c| c == 0) {
            return Err(PartitionError::EmptyStage { stage, split });
        }
        // Saturating: counts from a command line or a saved file may be absurd, and a wrapped
        // sum could pass the check.
        let sum = counts.iter().fold(0usize, |a, &c| a.saturating_add(c));
        if sum != num_layers {
            return Err(PartitionError::WrongTotal { split, sum, layers: num_layers });
        }
        Ok(Self { counts: counts.to_vec() })
    }

    /// As even as possible by layer count; earlier stages take the remainder.
    pub fn uniform(num_layers: usize, stages: usize) -> Result<Self, PartitionError> {
        check_sizes(num_layers, stages)?;
        let (q, r) = (num_layers / stages, num_layers % stages);
        Ok(Self { counts: (0..stages).map(|s| q + usize::from(s < r)).collect() })
    }

    /// Minimises the largest stage cost (`costs[i]` is layer i's cost, e.g. its parameter
    /// count) over all contiguous partitions, by dynamic programming. Ties prefer earlier cuts.
    pub fn balanced(costs: &[usize], stages: usize) -> Result<Self, PartitionError> {
        // The same DP as by time, unconstrained; f64 sums are exact for any model's parameter
        // counts (below 2^53).
        let costs: Vec<f64> = costs.iter().map(|&c| c as f64).collect();
        Self::balanced_time(&costs, stages, |_, _| true)
    }

    /// Minimises the slowest stage's time (`times[i]`: layer i's seconds per micro-batch) over
    /// every contiguous partition whose stages all satisfy `fits(stage, layers)` (e.g. a memory
    /// limit, which may depend on the stage's index because schedules stash more early on).
    /// Dynamic programming over (stages, layers): O(stages × layers²) cost evaluations.
    pub fn balanced_time(
        times: &[f64],
        stages: usize,
        fits: impl Fn(usize, Range<usize>) -> bool,
    ) -> Result<Self, PartitionError> {
        check_sizes(times.len(), stages)?;
        let n = times.len();
        let mut prefix = vec![0.0f64; n + 1];
        for (i, t) in times.iter().enumerate() {
            prefix[i + 1] = prefix[i] + t.max(0.0);
        }
        // best[k][i]: smallest slowest-stage time splitting the first i layers into k stages.
        let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
        let mut cut = vec![vec![0usize; n + 1]; stages + 1];
        best[0][0] = 0.0;
        for k in 1..=stages {
            // Leave at least one layer for each of the remaining stages.
            for i in k..=n - (stages - k) {
                for j in (k - 1)..i {
                    if !best[k - 1][j].is_finite() || !fits(k - 1, j..i) {
                        continue;
                    }
                    let cost = best[k - 1][j].max(prefix[i] - prefix[j]);
                    if cost < best[k][i] {
                        best[k][i] = cost;
                        cut[k][i] = j;
                    }
                }
            }
        }
        if !best[stages][n].is_finite() {
            return Err(PartitionError::NoFit { layers: n, stages });
        }
        let mut counts = vec![0; stages];
        let mut i = n;
        for k in (1..=stages).rev() {
            let j = cut[k][i];
            counts[k - 1] = i - j;
            i = j;
        }
        Ok(Self { counts })
    }

    pub fn stages(&self) -> usize {
        self.counts.len()
    }

    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    pub fn num_layers(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The layer index range of each stage.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.counts
            .iter()
            .map(|c| {
                let r = start..start + c;
                start += c;
                r
            })
            .collect()
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&join(&self.counts))
    }
}

/// How to choose a partition; resolved against a concrete model with [`PartitionStrategy::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionStrategy {
    Uniform,
    BalancedParams,
    /// Balanced by measured time: nanoseconds per micro-batch of each layer (forward plus
    /// backward, from a profile). Parsed empty from `balanced-time`; fill it before resolving.
    BalancedTime(Vec<u64>),
    Manual(Vec<usize>),
}

impl PartitionStrategy {
    /// `layer_params[i]` is layer i's parameter count.
    pub fn resolve(&self, layer_params: &[usize], stages: usize) -> Result<Partition, PartitionError> {
        match self {
            Self::Uniform => Partition::uniform(layer_params.len(), stages),
            Self::BalancedParams => Partition::balanced(layer_params, stages),
            Self::BalancedTime(nanos) => {
                if nanos.len() != layer_params.len() {
                    return Err(PartitionError::NeedsProfile { layers: layer_params.len(), given: nanos.len() });
                }
                let times: Vec<f64> = nanos.iter().map(|&n| n as f64).collect();
                Partition::balanced_time(&times, stages, |_, _| true)
            }
            Self::Manual(counts) => {
                if counts.len() != stages {
                    return Err(PartitionError::StageCountMismatch {
                        split: join(counts),
                        given: counts.len(),
                        stages,
                    });
                }
                Partition::manual(counts, layer_params.len())
            }
        }
    }
}

impl FromStr for PartitionStrategy {
    type Err = PartitionError;

    /// `uniform`, `balanced` / `balanced-params`, `balanced-time` (needs a profile), or layer
    /// counts such as `3,3,2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Self::Uniform),
            "balanced" | "balanced-params" => Ok(Self::BalancedParams),
            "balanced-time" => Ok(Self::BalancedTime(Vec::new())),
            other => other
                .split(',')
                .map(|c| c.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Manual)
                .map_err(|_| PartitionError::Parse(s.to_string())),
        }
    }
}

fn check_sizes(layers: usize, stages: usize) -> Result<(), PartitionError> {
    if stages == 0 {
        return Err(PartitionError::ZeroStages);
    }
    if stages > layers {
        return Err(PartitionError::MoreStagesThanLayers { stages, layers });
    }
    Ok(())
}

fn join(counts: &[usize]) -> String {
    counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_spreads_remainder_first() {
        assert_eq!(Partition::uniform(8, 3).unwrap().counts(), &[3, 3, 2]);
        assert_eq!(Partition::uniform(4, 4).unwrap().ranges(), vec![0..1, 1..2, 2..3, 3..4]);
    }

    #[test]
    fn invalid_partitions_are_named() {
        assert_eq!(Partition::uniform(3, 0), Err(PartitionError::ZeroStages));
        assert_eq!(Partition::uniform(3, 4), Err(PartitionError::MoreStagesThanLayers { stages: 4, layers: 3 }));
        let e = Partition::manual(&[3, 0, 2], 5).unwrap_err();
        assert!(e.to_string().contains("stage 1 of split 3,0,2 is empty"), "{e}");
        let e = Partition::manual(&[3, 3], 8).unwrap_err();
        assert!(e.to_string().contains("covers 6 layers but the model has 8"), "{e}");
        // Counts whose sum wraps around usize must not pass as the right total.
        let e = Partition::manual(&[usize::MAX, 5], 4).unwrap_err();
        assert!(matches!(e, PartitionError::WrongTotal { .. }), "{e}");
        assert!("3,x".parse::<PartitionStrategy>().is_err());
        let e = PartitionStrategy::Manual(vec![1, 1]).resolve(&[1, 1, 1], 3).unwrap_err();
        assert!(matches!(e, PartitionError::StageCountMismatch { .. }));
    }

    fn brute_force_best(costs: &[usize], stages: usize) -> usize {
        // Enumerate every placement of stages-1 cuts among len-1 gaps.
        fn rec(costs: &[usize], stages: usize) -> usize {
            if stages == 1 {
                return costs.iter().sum();
            }
            (1..=costs.len() - (stages - 1))
                .map(|first| costs[..first].iter().sum::<usize>().max(rec(&costs[first..], stages - 1)))
                .min()
                .unwrap()
        }
        rec(costs, stages)
    }

    #[test]
    fn balanced_is_optimal_against_brute_force() {
        let mut seed = 12345u64;
        for _ in 0..200 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = 1 + (seed >> 33) as usize % 9;
            let stages = 1 + (seed >> 40) as usize % n;
            let costs: Vec<usize> =
                (0..n).map(|i| 1 + ((seed >> (i % 50)) as usize).wrapping_mul(7919) % 100).collect();
            let p = Partition::balanced(&costs, stages).unwrap();
            assert_eq!(p.num_layers(), n);
            assert!(p.counts().iter().all(|&c| c > 0));
            let worst = p.ranges().iter().map(|r| costs[r.clone()].iter().sum::<usize>()).max().unwrap();
            assert_eq!(worst, brute_force_best(&costs, stages), "costs {costs:?} stages {stages}");
        }
    }

    /// Every contiguous split of `n` layers into `stages` non-empty stages.
    fn all_splits(n: usize, stages: usize) -> Vec<Vec<usize>> {
        if stages == 1 {
            return vec![vec![n]];
        }
        (1..=n - (stages - 1))
            .flat_map(|first| {
                all_splits(n - first, stages - 1).into_iter().map(move |mut rest| {
                    rest.insert(0, first);
                    rest
                })
            })
            .collect()
    }

    #[test]
    fn balanced_time_is_optimal_against_brute_force_with_and_without_a_memory_limit() {
        let mut seed = 99u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        for case in 0..300 {
            let n = 1 + next() as usize % 9;
            let stages = 1 + next() as usize % n;
            let times: Vec<f64> = (0..n).map(|_| (1 + next() % 1000) as f64 / 7.0).collect();
            let bytes: Vec<u64> = (0..n).map(|_| 1 + next() % 50).collect();
            // Earlier stages stash more micro-batches (1F1B): memory = (stages - s) x bytes.
            let limit = if case % 2 == 0 { u64::MAX } else { 40 + next() % 200 };
            let fits = |s: usize, r: Range<usize>| (stages - s) as u64 * bytes[r].iter().sum::<u64>() <= limit;
            let stage_time = |counts: &[usize]| {
                Partition::manual(counts, n)
                    .unwrap()
                    .ranges()
                    .iter()
                    .map(|r| times[r.clone()].iter().sum::<f64>())
                    .fold(0.0, f64::max)
            };
            let feasible: Vec<Vec<usize>> = all_splits(n, stages)
                .into_iter()
                .filter(|c| Partition::manual(c, n).unwrap().ranges().into_iter().enumerate().all(|(s, r)| fits(s, r)))
                .collect();
            let brute = feasible.iter().map(|c| stage_time(c)).fold(f64::INFINITY, f64::min);
            match Partition::balanced_time(&times, stages, fits) {
                Ok(p) => {
                    assert!(p.ranges().into_iter().enumerate().all(|(s, r)| fits(s, r)), "limit broken: {p}");
                    assert!(
                        (stage_time(p.counts()) - brute).abs() < 1e-9,
                        "times {times:?} stages {stages}: {p} vs {brute}"
                    );
                }
                Err(e) => {
                    assert!(feasible.is_empty(), "balancer gave up ({e}) but {feasible:?} fit");
                    assert_eq!(e, PartitionError::NoFit { layers: n, stages });
                }
            }
        }
    }

    #[test]
    fn balanced_time_strategy_needs_times_for_every_layer() {
        let s = "balanced-time".parse::<PartitionStrategy>().unwrap();
        assert_eq!(s, PartitionStrategy::BalancedTime(vec![]));
        assert!(matches!(s.resolve(&[1, 1, 1], 2), Err(PartitionError::NeedsProfile { layers: 3, given: 0 })));
        // One slow layer gets a stage to itself, whatever the parameter counts say.
        let p = PartitionStrategy::BalancedTime(vec![10, 10, 10, 90]).resolve(&[100, 100, 100, 1], 2).unwrap();
        assert_eq!(p.counts(), &[3, 1]);
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("uniform".parse::<PartitionStrategy>().unwrap(), PartitionStrategy::Uniform);
        assert_eq!("balanced".parse::<PartitionStrategy>().unwrap(), PartitionStrategy::BalancedParams);
        assert_eq!("3, 3,2".parse::<PartitionStrategy>().unwrap(), PartitionStrategy::Manual(vec![3, 3, 2]));
        let p = "balanced".parse::<PartitionStrategy>().unwrap().resolve(&[10, 1, 1, 10], 2).unwrap();
        assert_eq!(p.to_string(), "2,2");
    }
}
