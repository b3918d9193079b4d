//! How a model's ordered layer list is cut into contiguous pipeline stages.
//!
//! A partition is just the number of layers per stage (`3,3,2`). Strategies: manual counts,
//! uniform by layer count, and balanced by parameter count (optimal: the slowest stage, by
//! parameters, is as small as any contiguous cut allows).

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
        let sum: usize = counts.iter().sum();
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
        check_sizes(costs.len(), stages)?;
        let n = costs.len();
        let mut prefix = vec![0u128; n + 1];
        for (i, c) in costs.iter().enumerate() {
            prefix[i + 1] = prefix[i] + *c as u128;
        }
        // best[k][i]: smallest max-stage cost splitting the first i layers into k stages.
        let inf = u128::MAX;
        let mut best = vec![vec![inf; n + 1]; stages + 1];
        let mut cut = vec![vec![0usize; n + 1]; stages + 1];
        best[0][0] = 0;
        for k in 1..=stages {
            for i in k..=n {
                for j in (k - 1)..i {
                    if best[k - 1][j] == inf {
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
    Manual(Vec<usize>),
}

impl PartitionStrategy {
    /// `layer_params[i]` is layer i's parameter count.
    pub fn resolve(&self, layer_params: &[usize], stages: usize) -> Result<Partition, PartitionError> {
        match self {
            Self::Uniform => Partition::uniform(layer_params.len(), stages),
            Self::BalancedParams => Partition::balanced(layer_params, stages),
            Self::Manual(counts) => {
                if counts.len() != stages {
                    return Err(PartitionError::StageCountMismatch { split: join(counts), given: counts.len(), stages });
                }
                Partition::manual(counts, layer_params.len())
            }
        }
    }
}

impl FromStr for PartitionStrategy {
    type Err = PartitionError;

    /// `uniform`, `balanced` / `balanced-params`, or layer counts such as `3,3,2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Self::Uniform),
            "balanced" | "balanced-params" => Ok(Self::BalancedParams),
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
            let costs: Vec<usize> = (0..n).map(|i| 1 + ((seed >> (i % 50)) as usize).wrapping_mul(7919) % 100).collect();
            let p = Partition::balanced(&costs, stages).unwrap();
            assert_eq!(p.num_layers(), n);
            assert!(p.counts().iter().all(|&c| c > 0));
            let worst = p.ranges().iter().map(|r| costs[r.clone()].iter().sum::<usize>()).max().unwrap();
            assert_eq!(worst, brute_force_best(&costs, stages), "costs {costs:?} stages {stages}");
        }
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
