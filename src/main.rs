//! The `brigade` command line: train a model on pipeline stages, or print a schedule.

mod cmd;

/// Training frees and reallocates the same large activation and gradient buffers every
/// micro-batch. glibc's defaults hand freed memory back to the OS (heap trimming above 128 KiB,
/// `mmap` for large blocks below an adaptive threshold), so every step pays page faults and
/// kernel zeroing again. Keeping freed memory in the heap, as PyTorch's caching allocator does,
/// measured 8-12% faster steps (GPT 4x256, one thread: 1.23 vs 1.35 s/step, 25% fewer page
/// faults). The resident size then stays at its high-water mark.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        // The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Keeps candle's elementwise thread pool to the calling thread unless the user sizes it
/// (`CANDLE_NUM_THREADS`). That pool is one per process, sized once from the environment, and
/// its spinning worker competes with the stages' own pools, which already parallelise the
/// math (measured: 2-stage gpt-tiny steps 10-12% slower with one worker on 2 cores). The
/// library has no call to size it, so the binary sets the variable here, once, before any
/// thread exists: the only environment brigade writes (see `brigade_engine::pipeline`'s
/// `threads` module).
fn keep_candle_elementwise_inline() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "brigade", version, about = "Pipeline-parallel training of GPT, Llama, ResNet and your own models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model split into pipeline stages.
    Train(Box<cmd::train::TrainArgs>),
    /// Print a schedule's time x stage grid, its action lists and its bubble.
    Schedule(cmd::schedule::ScheduleArgs),
    /// List the model presets with their parameter and layer counts.
    Presets,
    /// Write a checkpoint's weights as Hugging Face GPT-2 / Llama or torchvision ResNet files.
    Export(cmd::export::ExportArgs),
    /// Show a checkpoint: metadata, tensors, and parameters per stage for a layout.
    Inspect(cmd::inspect::InspectArgs),
    /// Run a checkpoint forward-only over pipeline stages: inputs in, logits out.
    Predict(cmd::predict::PredictArgs),
    /// Generate text from a GPT or Llama checkpoint, pipelined over stages.
    Generate(cmd::generate::GenerateArgs),
    /// Measure each layer's time, memory and transfer size, and a stage hop; JSON out.
    Profile(cmd::profile::ProfileArgs),
    /// Rank stage counts, partitions, schedules and micro-batch counts by simulated step time.
    Plan(cmd::plan::PlanArgs),
    /// Run layouts x schedules x micro-batch counts, measure, and compare with the simulator.
    Bench(cmd::bench::BenchArgs),
    /// Predict a step of any schedule (built-in or a file) from a saved profile.
    Simulate(cmd::simulate::SimulateArgs),
    /// Train a tokenizer (byte-level BPE) on text files.
    Tokenizer(cmd::tokenizer::TokenizerArgs),
    /// Turn text files into a token file (.bin) with a tokenizer.
    Tokenize(cmd::tokenizer::TokenizeArgs),
    /// Draw loss and throughput curves of runs (their metrics logs) to SVG and PNG.
    Plot(cmd::plot::PlotArgs),
    /// Time each custom kernel alone at GPT-2 124M shapes: ms, GB/s, TFLOP/s.
    KernelsBench(cmd::kernels_bench::KernelsBenchArgs),
}

/// `println!` and `eprintln!` panic when their stream fails ("failed printing to stdout"): a
/// stdout on a full disk, a closed pipe (`brigade schedule | head`), a closed stderr. Every
/// command prints through them, so the one place to turn that into the house's behaviour is
/// the panic hook: a write error on stdout becomes one `error:` line and exit code 1; a broken
/// pipe, which only means the reader has seen enough, a quiet exit with the code a shell gives
/// a process killed by SIGPIPE (141); a failing stderr, where nothing can be said, exit code 1.
/// Every other panic keeps the default report.
fn exit_cleanly_on_closed_streams() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let broken_pipe = message.contains("Broken pipe") || message.contains("os error 32");
        if let Some(why) = message.strip_prefix("failed printing to stdout: ") {
            if broken_pipe {
                std::process::exit(141);
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: cannot write to stdout: {why}");
            std::process::exit(1);
        }
        if message.starts_with("failed printing to stderr") {
            std::process::exit(if broken_pipe { 141 } else { 1 });
        }
        default_hook(info);
    }));
}

fn main() -> ExitCode {
    keep_freed_memory();
    keep_candle_elementwise_inline();
    exit_cleanly_on_closed_streams();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(*args),
        Command::Schedule(args) => cmd::schedule::run(args),
        Command::Presets => cmd::presets::run(),
        Command::Export(args) => cmd::export::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Predict(args) => cmd::predict::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Profile(args) => cmd::profile::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Simulate(args) => cmd::simulate::run(args),
        Command::Plot(args) => cmd::plot::run(args),
        Command::Tokenizer(args) => cmd::tokenizer::run(args),
        Command::Tokenize(args) => cmd::tokenizer::tokenize(args),
        Command::KernelsBench(args) => cmd::kernels_bench::run(args),
    };
    // What is still buffered must reach stdout too, or the run fails like any other write.
    let result = result.and_then(|()| {
        use std::io::Write;
        std::io::stdout().flush().map_err(|e| anyhow::Error::new(e).context("cannot write to stdout"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            use std::io::Write;
            // A closed or full stderr leaves only the exit code to say it.
            let _ = writeln!(std::io::stderr(), "error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Command-line syntax errors: exit code 2 (1 is every other error), and like every other
/// error one `error:` line naming the problem (clap spreads some over several lines), then
/// clap's hint. `--help` and `--version` print as usual and exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let rendered = e.render().to_string();
    let mut paragraphs = rendered.split("\n\n");
    let first = paragraphs.next().unwrap_or_default();
    let line = first.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    use std::io::Write;
    // Written, not `eprintln!`ed: a closed stderr must not turn exit code 2 into a panic's.
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "{line}");
    if let Some(hint) = rendered.lines().rev().find(|l| l.contains("--help")) {
        let _ = writeln!(stderr, "{}", hint.trim());
    }
    ExitCode::from(2)
}

/// A write to a pipe whose reader has gone (`brigade ... | head`): not an error to report.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The error and its causes on one line, skipping causes a message already spells out.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
