//! The thread budget: how many CPU threads a stage may spend on its math, and how that number
//! reaches the code that spends it.

/// Makes candle's CPU matmuls use at most `threads` threads.
///
/// candle sizes gemm's parallelism from the process-wide `RAYON_NUM_THREADS` (default: every
/// core), whatever rayon pool the call runs in. With one stage thread per core that asks each
/// matmul to split across all cores, and the stages then fight over them: measured 4x slower
/// on 2 cores for gpt-tiny. Every stage of a pipeline gets the same budget, so one
/// process-wide value is coherent; it is set before any stage thread starts.
///
/// Elementwise ops on 64K+ elements go to a second, process-wide pool of candle's, sized once
/// (at its first use) from `CANDLE_NUM_THREADS`, and shared by every thread behind one lock.
/// Sized above 1 while several stages run, its spinning worker takes a core and the stages
/// queue on its lock: measured 2x slower steps for gpt-tiny on 2 stages. Setting the variable
/// here sizes it right when this is the process's first pipeline; it cannot be resized later.
pub(crate) fn apply_thread_budget(threads: usize) {
    let wanted = threads.to_string();
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var(var).ok().as_deref() != Some(wanted.as_str()) {
            std::env::set_var(var, &wanted);
        }
    }
}
