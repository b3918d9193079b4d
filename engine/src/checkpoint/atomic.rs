//! Atomic checkpoint directories: everything is written under a hidden temporary name and
//! renamed into place only when complete, then a `latest` pointer is swapped the same way.
//! A crash at any moment leaves either the old state or the new one, never a half-written
//! checkpoint that a resume would pick up.

use std::path::{Path, PathBuf};

use super::files::write_file_durably;
use super::{seal, CheckpointError, META_FILE};

/// File in a save directory naming its newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
const PARTIAL_MARK: &str = ".partial-";

/// `step-00000100`: sorts by step as text.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// A checkpoint directory under construction.
#[derive(Debug)]
pub struct StagingDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Starts building `target` (which may already exist: it is replaced on commit).
    pub fn begin(target: &Path) -> Result<Self, CheckpointError> {
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| CheckpointError::io(parent, e))?;
        let name = target
            .file_name()
            .ok_or_else(|| CheckpointError::invalid(target, "a checkpoint path needs a final directory name"))?
            .to_string_lossy()
            .into_owned();
        let nonce =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = parent.join(format!(".{name}{PARTIAL_MARK}{}-{nonce}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
        Ok(Self { tmp, target: target.to_path_buf(), committed: false })
    }

    /// Where files go until commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished directory into place (replacing an older one of the same name).
    /// A checkpoint (a directory with `brigade.json`) is sealed first: refused if any tensor
    /// is not finite, else its files' checksums are recorded (see `seal`).
    pub fn commit(mut self) -> Result<PathBuf, CheckpointError> {
        if self.tmp.join(META_FILE).is_file() {
            seal::seal(&self.tmp).map_err(|e| match e {
                // Named by the checkpoint it would have become, not the hidden staging name.
                CheckpointError::Diverged { file, name, index, .. } => {
                    CheckpointError::Diverged { dir: self.target.clone(), file, name, index }
                }
                other => other,
            })?;
        }
        sync_dir(&self.tmp)?;
        if self.target.exists() {
            // Same step saved twice (a run resumed from an earlier step into the same save
            // directory): move the old one aside first, since rename cannot replace a non-empty
            // directory. The aside name is a partial one, so a crash right here leaves nothing
            // that pruning would not clean up, and `resolve_checkpoint` falls back to the
            // newest complete checkpoint if `latest` names the missing one.
            let old = self.tmp.with_file_name(format!(
                "{}-replaced",
                self.tmp.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            std::fs::rename(&self.target, &old).map_err(|e| CheckpointError::io(&self.target, e))?;
            std::fs::rename(&self.tmp, &self.target).map_err(|e| CheckpointError::io(&self.target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| CheckpointError::io(&self.target, e))?;
        }
        if let Some(parent) = self.target.parent() {
            sync_dir(parent)?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagingDir {
    /// An abandoned save (error, panic) removes its partial files.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Directory fsync makes the renames durable on POSIX; elsewhere opening a directory fails,
    // and there is nothing more to do.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

/// Points `save_dir/latest` at `checkpoint` (a directory inside `save_dir`), atomically.
pub fn update_latest(save_dir: &Path, checkpoint: &Path) -> Result<(), CheckpointError> {
    let name = checkpoint
        .file_name()
        .ok_or_else(|| CheckpointError::invalid(checkpoint, "checkpoint path has no directory name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = save_dir.join(format!(".{LATEST_FILE}{PARTIAL_MARK}{}", std::process::id()));
    write_file_durably(&tmp, format!("{name}\n").as_bytes())?;
    let latest = save_dir.join(LATEST_FILE);
    std::fs::rename(&tmp, &latest).map_err(|e| CheckpointError::io(&latest, e))?;
    sync_dir(save_dir)
}

/// The checkpoint directory `path` means: itself if it holds `brigade.json`, else the one its
/// `latest` file names.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, CheckpointError> {
    resolve_checkpoint_noting(path).map(|(dir, _)| dir)
}

/// [`resolve_checkpoint`], with a note for the user when `latest` names a directory that is not
/// a checkpoint and the newest complete one is used instead.
pub fn resolve_checkpoint_noting(path: &Path) -> Result<(PathBuf, Option<String>), CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint directory"),
        ));
    }
    if path.join(META_FILE).is_file() {
        return Ok((path.to_path_buf(), None));
    }
    let latest = path.join(LATEST_FILE);
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).map_err(|e| CheckpointError::io(&latest, e))?;
        let name = name.trim();
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(CheckpointError::invalid(
                &latest,
                format!("names {name:?}, which is not a checkpoint directory name"),
            ));
        }
        let dir = path.join(name);
        if !dir.join(META_FILE).is_file() {
            // A save that died between moving an old copy of this step aside and renaming the
            // new one into place: the newest complete checkpoint is the right answer.
            if let Some(newest) = list_checkpoints(path)?.pop() {
                let note = format!(
                    "{} names {name}, which is not a complete checkpoint; using the newest one, {}",
                    latest.display(),
                    newest.file_name().unwrap_or_default().to_string_lossy()
                );
                return Ok((newest, Some(note)));
            }
            return Err(CheckpointError::invalid(&latest, format!("names {name}, which holds no {META_FILE}")));
        }
        return Ok((dir, None));
    }
    Err(CheckpointError::NotACheckpoint { path: path.to_path_buf() })
}

/// Complete checkpoints (`step-*` directories with metadata) in `save_dir`, oldest first.
pub fn list_checkpoints(save_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(save_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(CheckpointError::io(save_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io(save_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && entry.path().join(META_FILE).is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes the partial directories of saves whose process is gone (killed mid-save), and the
/// half-swapped `.latest.partial-*` files of such processes. They are never loadable; a live
/// process's partial files (another run saving into the same place) are left alone.
pub fn remove_dead_partials(save_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(save_dir) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.split(PARTIAL_MARK).nth(1).filter(|_| name.starts_with('.')) else { continue };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        let alive = match pid {
            Some(pid) if pid == std::process::id() => true,
            Some(pid) => process_alive(pid),
            None => true,
        };
        if alive {
            continue;
        }
        let gone = if entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        if gone.is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Whether a process exists (Linux: `/proc/<pid>`; elsewhere assumed alive, so nothing of
/// another process is ever removed there).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Keeps the newest `keep` checkpoints of `save_dir` (never the one `latest` names).
/// Returns the removed directories.
pub fn prune_checkpoints(save_dir: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let latest = resolve_checkpoint(save_dir).ok();
    let all = list_checkpoints(save_dir)?;
    let mut removed = Vec::new();
    let excess = all.len().saturating_sub(keep.max(1));
    for dir in all.into_iter().take(excess) {
        if Some(&dir) == latest.as_ref() {
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        removed.push(dir);
    }
    Ok(removed)
}
