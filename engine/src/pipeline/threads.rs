//! The thread budget: how many CPU threads a stage may spend on its math, and how that number
//! reaches the code that spends it. Nothing here touches process-wide settings: no environment
//! variable is read or written at run time, so two pipelines in one program keep their own
//! budgets, and `brigade bench` can time configurations in one process.
//!
//! A stage's math runs on the threads of one rayon pool, and brigade passes that pool's size
//! explicitly to every matrix product. (Findings from candle-core 0.11.1's `utils.rs` and
//! `cpu_backend`, and gemm-common 0.19.)
//!
//! 1. **The rayon pool the stage computes in.** By default ([`ThreadPools::PerStage`]) each
//!    stage runs inside its own pool of `threads` workers ([`stage_pool`]). With
//!    [`ThreadPools::Shared`] one pool of `threads × stages` workers serves every stage: the
//!    stage thread waits for messages outside it and enters it for each action's math, so a
//!    stage in a bubble lends its cores to the others. Either way every rayon parallel loop a stage starts
//!    lands in that pool: brigade's kernels (which size their work from
//!    `rayon::current_num_threads()`, with reductions blocked independently of it), and the
//!    tasks gemm spawns for a matrix product.
//! 2. **How many tasks each matrix product is cut into.** candle's CPU `matmul` (and its
//!    `conv2d`, built on it) reads that number from the `RAYON_NUM_THREADS` environment
//!    variable on every call: process-wide, so a pipeline could only steer it with
//!    `std::env::set_var` (unsound while other threads run, and a second pipeline changed the
//!    first one's). brigade does not use it on the training path: every CPU product goes
//!    through brigade's one GEMM call (`brigade_kernels`' `gemm` module: linear layers, weight
//!    gradients, attention, `brigade_kernels::matmul` and `conv2d`), which takes the thread
//!    count as an argument: `rayon::current_num_threads()`, the size of the pool the calling
//!    stage runs in. (ResNet's convolutions and classifier head take this path once their call
//!    sites use `brigade_kernels::conv2d` / `matmul`; while they call candle's, their products
//!    split over candle's default, the physical cores: speed only.) A thread-local set by the stage runtime would carry the same number with
//!    more moving parts; the pool's size is already per stage and cannot go stale. Under
//!    [`ThreadPools::Shared`] a product may split over the whole shared pool (its idle
//!    workers are what sharing lends). Speed only: gemm splits output tiles and accumulates `k`
//!    in the same blocked order whatever the split (`thread_pools_and_thread_counts_do_not_
//!    change_a_bit` in tests/exactness.rs, and brigade's products give candle's bits, tested
//!    in brigade-kernels).
//! 3. **candle's elementwise pool** (`candle_core::utils::barrier_pool`: candle's unary and
//!    binary maps of at least 64K elements). One per process, sized once at its first use from
//!    `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical cores); it cannot be
//!    resized or replaced, every thread shares it, calls queue on one lock, and its workers
//!    spin before parking. The library does not size it (that took `set_var`, and only the
//!    first budget counted). The training path still reaches it: brigade's fused kernels do
//!    GELU, LayerNorm, softmax, cross-entropy, gradient sums and the optimizer, but the
//!    models' own candle ops on tensors of 64K elements or more (a `(2, 128, 256)` activation
//!    already is one) go through it: measured on 2 cores, 2-stage GPT (width 256, context
//!    128, micro-batch 2), its one worker took about 10% as much CPU as the stages and the
//!    steps were 10-12% slower (its worker spins on a core the stages need).
//!    So the `brigade` binary sets `CANDLE_NUM_THREADS=1` when the user has not set it, once,
//!    at the top of `main` before any thread exists (a library caller sizes it the same way,
//!    or leaves candle's default: the physical cores). Results do not depend on its size
//!    (each element is computed independently). [`candle_elementwise_threads`] reports it.
//!
//! Consequences: pipelines in one process with different budgets compute the same numbers,
//! each with its own budget; only the elementwise pool (3) is shared. rayon's global pool,
//! sized from `RAYON_NUM_THREADS` at its first use, runs no stage work (driver-side work such
//! as checkpoint hashing uses it); candle's own rayon pool (`Device::with_context`) is never
//! entered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// How the stages' CPU threads are pooled. Both compute the same numbers, bit for bit.
///
/// Measured on 2 cores, 2 stages of 1 thread (README, "Thread pools"): per-stage pools were
/// faster in every zero-bubble cell and at m = 8 (`gpt-tiny` ZB-H1: 7.2–7.5 ms against
/// 9.3–9.6), the shared pool where GPipe and 1F1B leave a large bubble to lend (m = 4: the
/// 4 × 256 GPT's 1F1B 281 against 316 ms). A shared pool hands every action from the stage
/// thread to a worker and back (60–170 voluntary context switches per `gpt-tiny` step against
/// 8–14), and the simulator models per-stage pools (its mean error on `gpt-tiny`: 3–5%
/// against 11–13% shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadPools {
    /// Each stage computes in its own pool of `threads per stage` workers: no stage ever runs
    /// on another's cores (the simulator's model of a stage).
    #[default]
    PerStage,
    /// One pool of `threads per stage × CPU stages` workers that every CPU stage computes in,
    /// action by action. A stage waiting for a message holds no worker, so the cores of a
    /// stage in a bubble (the pipeline's fill and drain, a lighter stage waiting on a heavier
    /// one) work on the other stages' matrix products. A pipeline with fewer than two CPU
    /// stages runs as `PerStage` (nothing to lend; GPU stages keep their own pools).
    Shared,
}

/// The shared pool of `workers` threads ([`ThreadPools::Shared`]).
pub(crate) fn shared_pool(workers: usize) -> std::result::Result<Arc<rayon::ThreadPool>, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("brigade-compute-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| format!("thread pool: {e}"))
}

/// How many threads brigade starts per core, at most, over all the stages of a pipeline.
/// Oversubscription is allowed (it is only slower), but not without bound: 2,000 threads on
/// two cores neither refuse nor finish in any useful time.
pub const MAX_THREADS_PER_CORE: usize = 8;

/// The cores this process may run on (`std::thread::available_parallelism`, at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The CPUs online on this host (`/sys/devices/system/cpu/online`, e.g. `0-7,16-23`), or
/// [`available_cores`] where that cannot be read. More than `available_cores` when this
/// process is bound to a subset of them (a launcher's `--bind-to`, `taskset`, a cgroup).
pub fn online_cores() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpu_list(list.trim()))
        .unwrap_or_else(available_cores)
}

/// The number of CPUs in a kernel CPU list (`0-3,8,10-11`: 7), or `None` if it is not one.
fn count_cpu_list(list: &str) -> Option<usize> {
    list.split(',').try_fold(0usize, |count, range| {
        let n = match range.split_once('-') {
            Some((lo, hi)) => hi.parse::<usize>().ok()?.checked_sub(lo.parse::<usize>().ok()?)? + 1,
            None => range.parse::<usize>().map(|_| 1).ok()?,
        };
        Some(count + n)
    })
}

/// How many processes share the cores this one sees: its job's `on_host` processes on this
/// host when it may run on every online CPU (nobody split the host between them), 1 when a
/// launcher bound it to a subset (`mpirun` binds each rank to its own cores by default: what
/// it sees is its own). A stage's default thread count divides this process's cores by its
/// own stages times this, so ranks on one host do not oversubscribe it and a rank alone on
/// its host uses all of it (dividing by the job's stages, as one process does, would leave
/// most of a multi-node job's cores idle).
pub(crate) fn processes_sharing_cores(on_host: usize, cores: usize, online: usize) -> usize {
    if cores < online {
        1
    } else {
        on_host.max(1)
    }
}

/// The most threads brigade starts for one pipeline (all stages together) or one profile:
/// [`MAX_THREADS_PER_CORE`] per available core.
pub fn max_threads() -> usize {
    MAX_THREADS_PER_CORE.saturating_mul(available_cores())
}

/// The threads each stage gets: `requested`, or the cores shared out over the stages (at
/// least 1). Refuses 0, and budgets whose total over `stages` exceeds [`max_threads`].
/// `stages` counts the stages on this process's cores: its own, times the processes sharing
/// those cores ([`processes_sharing_cores`]).
pub(crate) fn per_stage(requested: Option<usize>, stages: usize) -> Result<usize> {
    let cores = available_cores();
    match requested {
        // rayon reads 0 as "choose for me"; a budget of 0 is a mistake, not a default.
        Some(0) => Err(EngineError::Config("threads per stage must be at least 1".into())),
        Some(threads) if threads.saturating_mul(stages.max(1)) > max_threads() => Err(EngineError::Config(format!(
            "{threads} threads per stage over {} stage(s) is more than brigade starts on {cores} cores \
                 (at most {MAX_THREADS_PER_CORE} per core: {} threads in all)",
            stages.max(1),
            max_threads()
        ))),
        Some(threads) => Ok(threads),
        None => Ok((cores / stages.max(1)).max(1)),
    }
}

/// Refuses a thread budget of 0 or above [`max_threads`] (a profile's single pool).
pub(crate) fn check_thread_budget(threads: usize) -> Result<()> {
    per_stage(Some(threads), 1).map(|_| ())
}

/// The rayon pool stage `index` runs its math in: exactly `threads` workers.
pub(crate) fn stage_pool(index: usize, threads: usize) -> std::result::Result<rayon::ThreadPool, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("brigade-stage-{index}-worker-{i}"))
        .build()
        .map_err(|e| format!("thread pool: {e}"))
}

/// The size of candle's elementwise pool (its workers plus the calling thread), once a
/// pipeline or a profile has started in this process; `None` before. brigade does not size
/// the pool (item 3 of the module documentation): this reports what the environment gave it.
pub fn candle_elementwise_threads() -> Option<usize> {
    ELEMENTWISE_POOL_THREADS.get().copied()
}

/// Builds candle's elementwise pool if nothing has yet, so that it starts before the stages
/// do rather than in the middle of one's step, and records its size.
pub(crate) fn start_elementwise_pool() {
    ELEMENTWISE_POOL_THREADS.get_or_init(measure_elementwise_pool);
}

static ELEMENTWISE_POOL_THREADS: OnceLock<usize> = OnceLock::new();

/// Counts the threads candle's elementwise pool runs a job on (building it if needed): each
/// worker gets its index and the caller the next one.
fn measure_elementwise_pool() -> usize {
    let highest = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|thread| {
        highest.fetch_max(thread, Ordering::Relaxed);
    });
    highest.into_inner() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_list_counts_its_ranges_and_singles() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0-3,x"), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list(""), None);
    }

    #[test]
    fn ranks_share_a_host_unless_bound_to_their_own_cores() {
        // Two ranks on a 16-CPU host, neither bound: each sees all 16 and must take half.
        assert_eq!(processes_sharing_cores(2, 16, 16), 2);
        // Bound to a socket each (8 of 16): what each sees is its own.
        assert_eq!(processes_sharing_cores(2, 8, 16), 1);
        // One rank alone on its host (a multi-node job) or one process: all of it.
        assert_eq!(processes_sharing_cores(1, 16, 16), 1);
        assert_eq!(processes_sharing_cores(0, 16, 16), 1);
        // So a rank alone on a 16-core node runs its one stage on 16 threads, where dividing
        // by the job's 2 stages gave 8.
        assert_eq!(per_stage(None, 1).unwrap(), available_cores());
    }
}
