//! The one check every command applies to a path it is about to write (`--out`, `--output`,
//! `--log`, `--json`, `--save-dir`), before any work: never inside a checkpoint, never onto a
//! save directory's own files (its `latest`, lock, step directories, the run's `tokenizer.json`
//! and `metrics.jsonl`), never onto a save directory itself, and never onto one of the
//! command's own inputs. Each refusal is one error naming the flag and the path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use brigade::engine::checkpoint::{refuse_inside_checkpoint, LATEST_FILE, LOCK_FILE, META_FILE};
use brigade::metrics::METRICS_FILE;
use brigade::tokenizer::TOKENIZER_FILE;

/// Where a command writes, and what it must not overwrite.
pub struct OutputPath<'a> {
    path: &'a Path,
    what: &'a str,
    inputs: Vec<PathBuf>,
    own_log: Option<PathBuf>,
    is_save_dir: bool,
}

impl<'a> OutputPath<'a> {
    /// `path`, given as the flag `what` (for messages).
    pub fn new(path: &'a Path, what: &'a str) -> Self {
        Self { path, what, inputs: Vec::new(), own_log: None, is_save_dir: false }
    }

    /// A file or directory the command reads: the output must not replace it.
    pub fn input(mut self, input: impl AsRef<Path>) -> Self {
        self.inputs.push(input.as_ref().to_path_buf());
        self
    }

    /// Inputs, as [`OutputPath::input`].
    pub fn inputs<P: AsRef<Path>>(mut self, inputs: impl IntoIterator<Item = P>) -> Self {
        self.inputs.extend(inputs.into_iter().map(|p| p.as_ref().to_path_buf()));
        self
    }

    /// `train --log` may write the metrics log of its own `--save-dir` (the default place).
    pub fn own_save_dir(mut self, save_dir: Option<&Path>) -> Self {
        self.own_log = save_dir.map(|d| d.join(METRICS_FILE));
        self
    }

    /// `train --save-dir`: the path is meant to be a save directory (its own checks decide
    /// whose).
    pub fn save_dir(mut self) -> Self {
        self.is_save_dir = true;
        self
    }

    /// Refuses the path if writing it could damage a checkpoint, a run or an input.
    pub fn check(&self) -> Result<()> {
        let (path, what) = (self.path, self.what);
        refuse_inside_checkpoint(path, what)?;
        let resolved = resolve(path);
        if !self.is_save_dir && is_save_dir(&resolved) {
            bail!(
                "{what} {} is a checkpoint or save directory (it holds a run's checkpoints); write somewhere else",
                path.display()
            );
        }
        if let (Some(parent), Some(name)) = (resolved.parent(), resolved.file_name().and_then(|n| n.to_str())) {
            let own_log = self.own_log.as_deref().is_some_and(|own| resolve(own) == resolved);
            let reserved = name == LATEST_FILE
                || name == LOCK_FILE
                || name == TOKENIZER_FILE
                || (name == METRICS_FILE && !own_log)
                || name.starts_with("step-");
            if reserved && is_save_dir(parent) {
                bail!(
                    "{what} {} would overwrite the save directory {}'s own {name}; write somewhere else",
                    path.display(),
                    parent.display()
                );
            }
        }
        for input in &self.inputs {
            if same_file(path, input) {
                bail!(
                    "{what} {} is one of the input files ({}); write somewhere else",
                    path.display(),
                    input.display()
                );
            }
        }
        Ok(())
    }
}

/// `path` with symbolic links resolved as far as it exists (a link onto `latest` counts as
/// `latest`), made absolute.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => resolve(parent).join(name),
        _ => absolute,
    }
}

/// Whether `a` and `b` are one file: the same path once resolved, or (hard links) the same
/// inode.
fn same_file(a: &Path, b: &Path) -> bool {
    if resolve(a) == resolve(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    false
}

/// A directory `train --save-dir` made: it has a `latest` file, a lock file, or a step
/// directory holding a checkpoint.
pub fn is_save_dir(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    if dir.join(LATEST_FILE).is_file() || dir.join(LOCK_FILE).is_file() {
        return true;
    }
    std::fs::read_dir(dir).ok().is_some_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_str().is_some_and(|n| n.starts_with("step-")) && e.path().join(META_FILE).is_file()
        })
    })
}
