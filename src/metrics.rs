//! A record of every run: one JSON object per line (JSON Lines), appended and flushed as the
//! run goes, so a run can be plotted (`brigade plot`) or read by any tool while it trains.
//!
//! ```text
//! {"event":"run","label":"...","model":"gpt-tiny","stages":2,"layers":"2+2","schedule":"1F1B","microbatches":4,...}
//! {"event":"step","step":1,"loss":5.54,"lr":0.0003,"grad_norm":1.9,"items_per_sec":2100.5,"unit":"tok/s",
//!  "step_seconds":0.48,"data_seconds":0.0004,"stage_utilization":[0.81,0.77],"wall_seconds":0.49}
//! {"event":"eval","step":100,"loss":2.51,"accuracy":0.33,"wall_seconds":50.2}
//! {"event":"save","step":100,"dir":"runs/a/step-00000100","bytes":1234,"seconds":0.2,"wall_seconds":50.4}
//! ```
//!
//! Steps count from 1 (the step just finished, as the progress output prints them). A resumed
//! run appends to its log, starting with another `run` record. [`read_run`] reads a log back.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::train::Event;
use crate::Error;

/// The file a run's log gets inside its `--save-dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a run is: written as the log's first record (and again after each resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunInfo {
    /// How the run is named on charts (default: the save directory's or the log's name).
    pub label: String,
    pub model: String,
    pub data: String,
    pub stages: usize,
    /// Layers per stage, e.g. `3+3+2`.
    pub layers: String,
    pub schedule: String,
    pub microbatches: usize,
    pub batch_size: usize,
    /// `tok/s` or `img/s`.
    pub unit: String,
    /// The step this process started at (0, or the checkpoint's step on a resume).
    pub start_step: u64,
}

/// What one link between ranks carried per training step, on average over the run: pipeline
/// hand-offs (activations and gradients) and data parallelism's replica gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkBytes {
    pub from: usize,
    pub to: usize,
    pub handoff_per_step: f64,
    pub replica_per_step: f64,
}

/// An open metrics log.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    unit: String,
    started: Instant,
}

impl MetricsLog {
    /// Opens `path` (creating its directory), truncating it for a new run or appending to it
    /// for a resumed one, and writes the `run` record.
    pub fn create(path: &Path, info: &RunInfo, append: bool) -> Result<Self, Error> {
        let fail = |e: std::io::Error| Error::Config(format!("cannot write the metrics log {}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let file =
            OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(path).map_err(fail)?;
        let mut log = Self { path: path.to_path_buf(), file, unit: info.unit.clone(), started: Instant::now() };
        let mut record = serde_json::to_value(info).map_err(|e| Error::Config(e.to_string()))?;
        record["event"] = json!("run");
        record["time_unix"] =
            json!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        log.write(&record)?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the record of a training event.
    pub fn record(&mut self, event: &Event) -> Result<(), Error> {
        let wall = self.started.elapsed().as_secs_f64();
        let record = match event {
            Event::Step { stats, items_per_sec, data_seconds } => {
                let step_seconds = stats.elapsed.as_secs_f64();
                let utilization: Vec<f64> =
                    stats.stage_busy.iter().map(|b| round(b.as_secs_f64() / step_seconds.max(1e-9), 4)).collect();
                json!({
                    "event": "step",
                    "step": stats.step + 1,
                    "loss": stats.loss,
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                    "items_per_sec": round(*items_per_sec, 2),
                    "unit": self.unit,
                    "step_seconds": round(step_seconds, 6),
                    "data_seconds": round(*data_seconds, 6),
                    "stage_utilization": utilization,
                    "wall_seconds": round(wall, 3),
                })
            }
            Event::Eval { step, stats } => json!({
                "event": "eval",
                "step": step,
                "loss": stats.loss,
                "accuracy": stats.accuracy(),
                "wall_seconds": round(wall, 3),
            }),
            Event::Saved { step, checkpoint, seconds } => json!({
                "event": "save",
                "step": step,
                "dir": checkpoint.dir.display().to_string(),
                "bytes": checkpoint.bytes,
                "seconds": round(*seconds, 3),
                "wall_seconds": round(wall, 3),
            }),
        };
        self.write(&record)
    }

    /// Appends the run's bytes per training step on each link between ranks (multi-process
    /// runs): `{"event":"links","steps":N,"links":[{"from":0,"to":1,"handoff_bytes_per_step":...,
    /// "replica_bytes_per_step":...}]}`.
    pub fn record_links(&mut self, steps: u64, links: &[LinkBytes]) -> Result<(), Error> {
        let links: Vec<serde_json::Value> = links
            .iter()
            .map(|l| {
                json!({
                    "from": l.from,
                    "to": l.to,
                    "handoff_bytes_per_step": l.handoff_per_step,
                    "replica_bytes_per_step": l.replica_per_step,
                })
            })
            .collect();
        self.write(&json!({ "event": "links", "steps": steps, "links": links }))
    }

    fn write(&mut self, record: &serde_json::Value) -> Result<(), Error> {
        let mut line = record.to_string();
        line.push('\n');
        // One write per line, flushed: a reader (or a crash) never sees half a record.
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::Config(format!("cannot write the metrics log {}: {e}", self.path.display())))
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// One training step as logged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub items_per_sec: f64,
    #[serde(default)]
    pub step_seconds: f64,
    #[serde(default)]
    pub data_seconds: f64,
    #[serde(default)]
    pub stage_utilization: Vec<f64>,
}

/// One evaluation as logged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub loss: f64,
    #[serde(default)]
    pub accuracy: f64,
}

/// A run read back from its log: its latest `run` record, and every step and evaluation (a
/// step logged twice, by a run and a resume that repeated it, keeps the later record).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub path: PathBuf,
    pub info: RunInfo,
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
}

/// Reads a metrics log: `path` is the log or a directory holding `metrics.jsonl` (a
/// `--save-dir`). A line that is not a JSON object, or a record missing a field, is an error
/// naming the line; unknown events and fields are ignored (newer logs stay readable).
pub fn read_run(path: &Path) -> Result<Run, Error> {
    let file_path = if path.is_dir() { path.join(METRICS_FILE) } else { path.to_path_buf() };
    let file = File::open(&file_path).map_err(|e| {
        let hint = if path.is_dir() { " (a run's --save-dir holds one; or pass the --log file)" } else { "" };
        Error::Config(format!("cannot read the metrics log {}: {e}{hint}", file_path.display()))
    })?;
    let bad = |n: usize, what: String| Error::Config(format!("{} line {n}: {what}", file_path.display()));
    let mut info = None;
    let mut steps = std::collections::BTreeMap::new();
    let mut evals = std::collections::BTreeMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(i + 1, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(i + 1, format!("not a JSON record ({e})")))?;
        let event = value
            .get("event")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .ok_or_else(|| bad(i + 1, "no \"event\" field".into()))?;
        let parsed = |e: serde_json::Error| bad(i + 1, format!("a {event} record {e}"));
        match event.as_str() {
            "run" => info = Some(serde_json::from_value::<RunInfo>(value).map_err(parsed)?),
            "step" => {
                let r: StepRecord = serde_json::from_value(value).map_err(parsed)?;
                steps.insert(r.step, r);
            }
            "eval" => {
                let r: EvalRecord = serde_json::from_value(value).map_err(parsed)?;
                evals.insert(r.step, r);
            }
            _ => {}
        }
    }
    let info = info.ok_or_else(|| {
        Error::Config(format!("{} is not a brigade metrics log (no \"run\" record)", file_path.display()))
    })?;
    Ok(Run { path: file_path, info, steps: steps.into_values().collect(), evals: evals.into_values().collect() })
}
