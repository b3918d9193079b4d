//! Guards around the places checkpoints live, so no run loses or silently replaces another's:
//! an advisory lock held on a save directory for the whole run (a second process refuses
//! instead of both saving and one run's checkpoints vanishing), a writability check before any
//! training, and the test every command writing a file applies so that nothing is written
//! inside a checkpoint directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{CheckpointError, CheckpointMeta, META_FILE};

/// Lock file in a save directory, held (advisory, exclusive) by the run saving into it.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive advisory lock on a save directory; released when dropped (or when the
/// process dies: the operating system drops the lock with the file descriptor, so a killed
/// run never leaves a directory locked).
#[derive(Debug)]
pub struct SaveDirLock {
    dir: PathBuf,
    _file: File,
}

impl SaveDirLock {
    /// Creates `dir` if needed, checks that files and directories can be written in it, and
    /// takes its lock. Fails, naming the directory, if it cannot be written or another
    /// process holds the lock.
    pub fn acquire(dir: &Path) -> Result<Self, CheckpointError> {
        if dir.exists() && !dir.is_dir() {
            return Err(CheckpointError::invalid(dir, "is a file, not a directory; --save-dir needs a directory"));
        }
        if let Some(ckpt) = checkpoint_containing(dir) {
            return Err(CheckpointError::invalid(
                dir,
                format!(
                    "is inside the checkpoint {}; save into a directory of its own (checkpoints go in DIR/step-N)",
                    ckpt.display()
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| unwritable(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unwritable(dir, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another brigade run (pid {holder})")
                };
                return Err(CheckpointError::invalid(
                    dir,
                    format!(
                        "is in use: {who} holds {}; wait for it to finish or choose another --save-dir",
                        path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(CheckpointError::io(&path, e)),
        }
        // The holder's pid, for the message another process gets.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        check_writable(dir)?;
        Ok(Self { dir: dir.to_path_buf(), _file: file })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn unwritable(dir: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::invalid(dir, format!("cannot be written ({e}); choose a writable --save-dir"))
}

/// A save creates a directory, files in it and renames; try exactly that now rather than after
/// hours of training.
fn check_writable(dir: &Path) -> Result<(), CheckpointError> {
    // Named like a partial save, so a process killed right here leaves nothing that the
    // dead-partial cleaning would not remove.
    let probe = dir.join(format!(".write-test.partial-{}", std::process::id()));
    let result = std::fs::create_dir(&probe)
        .and_then(|()| std::fs::write(probe.join("probe"), b"brigade"))
        .and_then(|()| std::fs::rename(probe.join("probe"), probe.join("renamed")));
    let _ = std::fs::remove_dir_all(&probe);
    result.map_err(|e| unwritable(dir, e))
}

/// The checkpoint directory `path` is in or is (the nearest ancestor holding `brigade.json`),
/// if any. `path` need not exist.
pub fn checkpoint_containing(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    // Resolve symbolic links of the part that exists, so a link into a checkpoint counts.
    let mut existing = absolute.as_path();
    while !existing.exists() {
        existing = existing.parent()?;
    }
    let resolved = existing.canonicalize().ok()?;
    resolved.ancestors().find(|dir| dir.join(META_FILE).is_file()).map(Path::to_path_buf)
}

/// Refuses an output file or directory `path` that lies inside a checkpoint directory (writing
/// there would corrupt the checkpoint or make its files disagree with its checksums). `what`
/// names the option, for the message (`--output`).
pub fn refuse_inside_checkpoint(path: &Path, what: &str) -> Result<(), CheckpointError> {
    match checkpoint_containing(path) {
        Some(ckpt) => Err(CheckpointError::invalid(
            path,
            format!(
                "{what} is inside the checkpoint {}; write it somewhere else (a checkpoint is never written into)",
                ckpt.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Whether two checkpoints belong to one run (the same model, seed, data, batch size,
/// optimizer and learning-rate schedule: one continues the other); if not, what differs.
pub fn same_run(a: &CheckpointMeta, b: &CheckpointMeta) -> Result<(), String> {
    let mut diffs = Vec::new();
    if a.model.config != b.model.config {
        diffs.push(format!("model {} vs {}", a.model.name, b.model.name));
        if a.model.name == b.model.name {
            diffs.push("(another config)".into());
        }
    }
    if a.seed != b.seed {
        diffs.push(format!("seed {} vs {}", a.seed, b.seed));
    }
    if a.training.data != b.training.data {
        diffs.push(format!("data {} vs {}", a.training.data, b.training.data));
    }
    if a.training.data_seed != b.training.data_seed {
        diffs.push(format!("data seed {} vs {}", a.training.data_seed, b.training.data_seed));
    }
    if a.training.batch_size != b.training.batch_size {
        diffs.push(format!("batch size {} vs {}", a.training.batch_size, b.training.batch_size));
    }
    if a.optimizer != b.optimizer {
        diffs.push("another optimizer".into());
    }
    if a.lr_schedule != b.lr_schedule {
        diffs.push("another learning-rate schedule".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join(", "))
    }
}
