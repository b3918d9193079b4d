//! The thread budget: how many CPU threads a stage may spend on its math, and how that number
//! reaches the code that spends it.
//!
//! A stage's math runs on three kinds of threads, and only the first can be sized per stage.
//! (Findings from candle-core 0.11.1's `utils.rs` and `cpu_backend`, and gemm-common 0.19.)
//!
//! 1. **The rayon pool the stage computes in.** By default ([`ThreadPools::Shared`]) one pool
//!    of `threads × stages` workers serves every stage: the stage thread waits for messages
//!    outside it and enters it for each action's math, so a stage in a bubble lends its cores
//!    to the others. With [`ThreadPools::PerStage`] each stage runs inside its own pool of
//!    `threads` workers ([`stage_pool`]). Either way every rayon parallel loop a stage starts
//!    lands in that pool: brigade's kernels (which size their work from
//!    `rayon::current_num_threads()`, with reductions blocked independently of it), candle's
//!    rayon-parallel CPU ops (conv2d's im2col and friends), and the tasks gemm spawns for a
//!    matrix product.
//! 2. **How many tasks each matrix product is cut into.** candle's CPU matmul passes
//!    `gemm::Parallelism::Rayon(n)` with `n` read from the `RAYON_NUM_THREADS` environment
//!    variable *on every call* (default: the physical cores); it never passes gemm's `0`
//!    ("the current pool's size"), and there is no per-thread or per-call setting. So `n` is
//!    process-wide and [`apply_thread_budget`] sets it. The tasks still run on the calling
//!    stage's pool; `n` only decides the split (an `n` above the pool's size queues tasks on
//!    fewer workers and shrinks each one's tiles). Speed only: gemm splits output tiles and
//!    accumulates `k` in the same blocked order whatever `n` is.
//! 3. **candle's elementwise pool** (`candle_core::utils::barrier_pool`: unary and binary maps
//!    of at least 64K elements). One per process, sized once, at its first use, from
//!    `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical cores); it cannot be
//!    resized or replaced, every thread shares it, calls queue on one lock, and its workers
//!    spin before parking. Sized above 1 while several stages run, its spinning worker takes a
//!    core and the stages queue on its lock: measured 2x slower steps for gpt-tiny on 2 stages.
//!    [`apply_thread_budget`] sizes it from the first budget the process applies (it builds
//!    the pool right then, so a later pipeline with another budget cannot size it by accident)
//!    and leaves it alone afterwards. Results do not depend on its size (each element is
//!    computed independently).
//!
//! Consequences: several pipelines in one process with different budgets compute the same
//! numbers but not at the same speed as each would alone (2 and 3 are shared). That is why
//! `brigade bench` runs each configuration in a fresh process by default: for faithful
//! timings, not for correct results (`--in-process` gives the same losses). rayon's global
//! pool, sized from `RAYON_NUM_THREADS` at its first use, runs no stage work (driver-side
//! work such as checkpoint hashing uses it); candle's own rayon pool (`Device::with_context`)
//! is never entered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// How the stages' CPU threads are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadPools {
    /// One pool of `threads per stage × CPU stages` workers that every CPU stage computes in,
    /// action by action. A stage waiting for a message holds no worker, so the cores of a
    /// stage in a bubble (the pipeline's fill and drain, a lighter stage waiting on a heavier
    /// one) work on the other stages' matrix products. Measured 7–8% faster on 2 stages of 1
    /// thread, 1F1B and GPipe m=8 (README, "Measured"); the same numbers as `PerStage`, bit
    /// for bit. A pipeline with fewer than two CPU stages runs as `PerStage` (nothing to lend;
    /// GPU stages keep their own pools).
    #[default]
    Shared,
    /// Each stage computes in its own pool of `threads per stage` workers: no stage ever runs
    /// on another's cores (the simulator's model of a stage).
    PerStage,
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

/// The most threads a stage may be given.
pub const MAX_THREADS_PER_STAGE: usize = 1024;

/// The threads each stage gets: `requested`, or the cores shared out over the stages (at
/// least 1).
pub(crate) fn per_stage(requested: Option<usize>, stages: usize) -> Result<usize> {
    match requested {
        // rayon reads 0 as "choose for me"; a budget of 0 is a mistake, not a default.
        Some(0) => Err(EngineError::Config("threads per stage must be at least 1".into())),
        // Oversubscription is allowed (it is only slower), but not without bound: candle
        // spawns one elementwise worker per budgeted thread and panics when it cannot.
        Some(threads) if threads > MAX_THREADS_PER_STAGE => Err(EngineError::Config(format!(
            "{threads} threads per stage is more than brigade starts ({MAX_THREADS_PER_STAGE})"
        ))),
        Some(threads) => Ok(threads),
        None => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            Ok((cores / stages.max(1)).max(1))
        }
    }
}

/// Refuses a thread budget of 0 or above [`MAX_THREADS_PER_STAGE`].
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

/// Makes candle's process-wide CPU parallelism (items 2 and 3 of the module documentation)
/// follow a budget of `threads` per stage. Called before any stage thread starts.
pub(crate) fn apply_thread_budget(threads: usize) {
    // Read by candle on every matmul: set it to this budget each time.
    set_if_different("RAYON_NUM_THREADS", threads);
    // Read once, when the elementwise pool is built: only the first budget can size it.
    ELEMENTWISE_POOL_THREADS.get_or_init(|| {
        set_if_different("CANDLE_NUM_THREADS", threads);
        measure_elementwise_pool()
    });
}

/// The size of candle's elementwise pool (its workers plus the calling thread), once brigade
/// has applied a thread budget; `None` before. It can differ from the first budget when
/// something in the process used the pool before the first pipeline or profile.
pub fn candle_elementwise_threads() -> Option<usize> {
    ELEMENTWISE_POOL_THREADS.get().copied()
}

static ELEMENTWISE_POOL_THREADS: OnceLock<usize> = OnceLock::new();

/// Builds candle's elementwise pool if nothing has yet, and counts the threads it runs a job
/// on: each worker gets its index and the caller the next one.
fn measure_elementwise_pool() -> usize {
    let highest = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|thread| {
        highest.fetch_max(thread, Ordering::Relaxed);
    });
    highest.into_inner() + 1
}

fn set_if_different(var: &str, threads: usize) {
    let wanted = threads.to_string();
    if std::env::var(var).ok().as_deref() != Some(wanted.as_str()) {
        std::env::set_var(var, &wanted);
    }
}
