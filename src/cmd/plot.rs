//! `brigade plot`: loss and throughput curves of one or several runs, from their metrics logs,
//! on one chart (SVG and PNG).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::output::OutputPath;

#[derive(Args)]
pub struct PlotArgs {
    /// Runs: metrics logs (`--log` files) or save directories holding `metrics.jsonl`.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output path without extension: writes OUT.svg and OUT.png.
    #[arg(long, default_value = "plot")]
    out: PathBuf,
    /// Legend names, one per run in order (default: each run's own label).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Smooth throughput over this many steps (1: raw).
    #[arg(long, default_value_t = 10)]
    smooth: usize,
}

pub fn run(args: PlotArgs) -> Result<()> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        bail!("--labels names {} runs but {} were given", args.labels.len(), args.runs.len());
    }
    if args.smooth == 0 {
        bail!("--smooth must be at least 1 (1: raw throughput)");
    }
    // Before reading anything: the chart files must not land on a run or a checkpoint.
    let logs = args.runs.iter().map(|r| r.join(brigade::metrics::METRICS_FILE));
    for file in [args.out.with_extension("svg"), args.out.with_extension("png")] {
        OutputPath::new(&file, "--out").inputs(&args.runs).inputs(logs.clone()).check()?;
    }
    let mut runs = args.runs.iter().map(|p| brigade::metrics::read_run(p)).collect::<Result<Vec<_>, _>>()?;
    for (i, run) in runs.iter_mut().enumerate() {
        if let Some(label) = args.labels.get(i) {
            run.info.label = label.clone();
        } else if run.info.label.is_empty() {
            run.info.label = run.path.display().to_string();
        }
    }
    let plotted = brigade::plot::plot(&runs, &args.out, args.smooth)?;
    for run in &runs {
        let last = run.steps.last().expect("plot checks every run has steps");
        let eval = run.evals.last().map(|e| format!(", held-out {:.4} at step {}", e.loss, e.step)).unwrap_or_default();
        println!("{}: {} steps, loss {:.4} at step {}{eval}", run.info.label, run.steps.len(), last.loss, last.step);
    }
    println!("wrote {} and {}", plotted.svg.display(), plotted.png.display());
    Ok(())
}
