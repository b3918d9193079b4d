//! The last gate before a save becomes a checkpoint, and the check of every read after it:
//! a checkpoint's files are scanned for non-finite values (a diverged step must never replace a
//! good checkpoint) and their checksums are recorded in `checksums.json` when the save commits;
//! every load verifies a file against its recorded checksum before using it, so a flipped byte
//! on disk is an error naming the file instead of silently different weights.
//!
//! xxh3-64 rather than a cryptographic hash: the threat is bit rot and truncation, not an
//! adversary, and xxh3 runs at memory speed (a few GB/s here), so verifying on every load
//! costs a fraction of reading the file at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::files::write_file_durably;
use super::CheckpointError;

/// File in a checkpoint directory holding every other file's size and checksum.
pub const CHECKSUMS_FILE: &str = "checksums.json";
/// The hash recorded (the file says so, so another may follow).
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";

/// One file's recorded size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub xxh3: String,
}

impl FileSum {
    pub fn of(bytes: &[u8]) -> Self {
        Self { bytes: bytes.len() as u64, xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)) }
    }
}

/// The contents of `checksums.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checksums {
    pub algorithm: String,
    /// File name (within the checkpoint directory) → size and checksum.
    pub files: BTreeMap<String, FileSum>,
}

impl Checksums {
    /// Reads `dir/checksums.json`; `None` when the checkpoint has none (saved by a brigade from
    /// before checksums, which loads unverified).
    pub fn read(dir: &Path) -> Result<Option<Self>, CheckpointError> {
        let path = dir.join(CHECKSUMS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CheckpointError::io(&path, e)),
        };
        let sums: Checksums = serde_json::from_str(&text).map_err(|e| {
            CheckpointError::invalid(&path, format!("not a valid checksum list ({e}); the file is damaged"))
        })?;
        if sums.algorithm != CHECKSUM_ALGORITHM {
            return Err(CheckpointError::invalid(
                &path,
                format!(
                    "checksums use {:?}, which this brigade does not know ({CHECKSUM_ALGORITHM} expected)",
                    sums.algorithm
                ),
            ));
        }
        Ok(Some(sums))
    }

    /// The recorded sum of `file` (a path inside the checkpoint directory).
    pub fn get(&self, file: &Path) -> Option<&FileSum> {
        file.file_name().and_then(|n| self.files.get(n.to_string_lossy().as_ref()))
    }
}

/// Checks `bytes` (the contents of `path`) against the recorded `sum`.
pub fn verify_bytes(path: &Path, bytes: &[u8], sum: &FileSum) -> Result<(), CheckpointError> {
    if bytes.len() as u64 != sum.bytes {
        return Err(CheckpointError::Checksum {
            path: path.to_path_buf(),
            reason: format!(
                "is {} bytes, but was saved as {} bytes: it was truncated or overwritten after the save",
                bytes.len(),
                sum.bytes
            ),
        });
    }
    let found = FileSum::of(bytes);
    if found.xxh3 != sum.xxh3 {
        return Err(CheckpointError::Checksum {
            path: path.to_path_buf(),
            reason: format!(
                "checksum mismatch ({CHECKSUM_ALGORITHM} {}, recorded {} at save): the file changed on disk after it was \
                 written (bit rot or an edit); restore it from a copy or use an earlier checkpoint",
                found.xxh3, sum.xxh3
            ),
        });
    }
    Ok(())
}

/// Reads a whole (small) file and checks it against the checkpoint's checksums, if it has any.
pub fn verify_file(path: &Path, sums: Option<&Checksums>) -> Result<(), CheckpointError> {
    let Some(sums) = sums else { return Ok(()) };
    let sum = sums.get(path).ok_or_else(|| CheckpointError::Checksum {
        path: path.to_path_buf(),
        reason: format!("is not listed in {CHECKSUMS_FILE}: it is not part of the saved checkpoint"),
    })?;
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    verify_bytes(path, &bytes, sum)
}

/// A verification done at most once, however many tensors (and stage threads) read the file;
/// the result is kept, so a bad file fails every read of it with the same message.
#[derive(Debug)]
pub(crate) struct LazyCheck {
    sum: FileSum,
    done: OnceLock<Result<(), String>>,
}

impl LazyCheck {
    pub(crate) fn new(sum: FileSum) -> Self {
        Self { sum, done: OnceLock::new() }
    }

    pub(crate) fn verify(&self, path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
        let result = self.done.get_or_init(|| {
            verify_bytes(path, bytes, &self.sum).map_err(|e| match e {
                CheckpointError::Checksum { reason, .. } => reason,
                other => other.to_string(),
            })
        });
        result.clone().map_err(|reason| CheckpointError::Checksum { path: path.to_path_buf(), reason })
    }
}

/// Index of the first non-finite element (NaN or infinity) of little-endian floating-point
/// `data`, by checking that the exponent bits are not all ones. Integer dtypes have none.
pub fn first_non_finite(dtype: safetensors::Dtype, data: &[u8]) -> Option<usize> {
    use safetensors::Dtype as D;
    match dtype {
        D::F32 => scan::<4>(data, 0x7f80_0000),
        D::F64 => scan::<8>(data, 0x7ff0_0000_0000_0000),
        D::F16 => scan::<2>(data, 0x7c00),
        D::BF16 => scan::<2>(data, 0x7f80),
        _ => None,
    }
}

/// [`first_non_finite`] for `N`-byte floats whose exponent bits are `exponent`. Every load and
/// save scans all tensor bytes, so the common case (nothing found) runs branch-free over
/// blocks, which the compiler vectorises; only a block that has a hit is searched again.
fn scan<const N: usize>(data: &[u8], exponent: u64) -> Option<usize> {
    const BLOCK: usize = 1024;
    let bad = |c: &[u8]| {
        let mut bits = [0u8; 8];
        bits[..N].copy_from_slice(c);
        u64::from_le_bytes(bits) & exponent == exponent
    };
    for (b, block) in data.chunks(BLOCK * N).enumerate() {
        if block.chunks_exact(N).fold(false, |any, c| any | bad(c)) {
            return block.chunks_exact(N).position(bad).map(|i| b * BLOCK + i);
        }
    }
    None
}

/// Records the checksum of every file in the checkpoint directory `dir` (being committed) in
/// `dir/checksums.json`, after checking that no tensor of its safetensors files holds a
/// non-finite value: a step that diverged is refused here, before the directory is renamed
/// into place, so it never replaces (or, through pruning, costs) a good checkpoint.
pub fn seal(dir: &Path) -> Result<Checksums, CheckpointError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != CHECKSUMS_FILE && entry.file_type().map_err(|e| CheckpointError::io(entry.path(), e))?.is_file() {
            names.push(name);
        }
    }
    // Files are independent: hash (and scan) them in parallel.
    let sums: Vec<(String, FileSum)> = names
        .into_par_iter()
        .map(|name| {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
            let len = file.metadata().map_err(|e| CheckpointError::io(&path, e))?.len();
            // An empty file cannot be mapped; it is hashed as empty.
            let map = if len == 0 {
                None
            } else {
                // SAFETY: read-only map of a file in this process's own unfinished save
                // directory, which nothing else writes.
                Some(unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?)
            };
            let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
            if name.ends_with(".safetensors") {
                check_finite(&path, bytes)?;
            }
            Ok((name, FileSum::of(bytes)))
        })
        .collect::<Result<_, CheckpointError>>()?;
    let sums = Checksums { algorithm: CHECKSUM_ALGORITHM.into(), files: sums.into_iter().collect() };
    let text = serde_json::to_string_pretty(&sums).expect("checksums always serialise");
    write_file_durably(&dir.join(CHECKSUMS_FILE), text.as_bytes())?;
    Ok(sums)
}

/// Every floating-point tensor of the safetensors file `bytes` is finite.
fn check_finite(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    for (name, view) in st.tensors() {
        if let Some(i) = first_non_finite(view.dtype(), view.data()) {
            return Err(CheckpointError::Diverged {
                dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                file: path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                name,
                index: i,
            });
        }
    }
    Ok(())
}

/// Verifies every file `sums` lists in `dir` (a full check, as `brigade inspect` does);
/// returns the files and bytes verified.
pub fn verify_all(dir: &Path, sums: &Checksums) -> Result<(usize, u64), CheckpointError> {
    let results: Vec<Result<u64, CheckpointError>> = sums
        .files
        .par_iter()
        .map(|(name, sum)| {
            let path: PathBuf = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
            let len = file.metadata().map_err(|e| CheckpointError::io(&path, e))?.len();
            // SAFETY: read-only map; brigade never writes a committed checkpoint's files in place.
            let map = if len == 0 {
                None
            } else {
                Some(unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?)
            };
            verify_bytes(&path, map.as_deref().unwrap_or(&[]), sum)?;
            Ok(sum.bytes)
        })
        .collect();
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok((sums.files.len(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype as D;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn non_finite_values_are_found_at_their_index_in_every_float_dtype() {
        // Across a block boundary (1024 elements), and the largest finite values are fine.
        let mut v = vec![f32::MAX; 3000];
        v[0] = f32::MIN;
        assert_eq!(first_non_finite(D::F32, &bytes_f32(&v)), None);
        for (i, bad) in [(0, f32::NAN), (1023, f32::INFINITY), (1024, f32::NEG_INFINITY), (2999, f32::NAN)] {
            let mut w = v.clone();
            w[i] = bad;
            assert_eq!(first_non_finite(D::F32, &bytes_f32(&w)), Some(i), "{bad} at {i}");
        }
        let f64s: Vec<u8> = [1.0f64, f64::MAX, f64::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(D::F64, &f64s), Some(2));
        // f16: 0x7bff is the largest finite, 0x7c00 infinity; bf16: 0x7f7f finite, 0x7f80 infinity.
        let f16s: Vec<u8> = [0x3c00u16, 0x7bff, 0xfc00].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(D::F16, &f16s), Some(2));
        let bf16s: Vec<u8> = [0x7f7fu16, 0x7fc0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(D::BF16, &bf16s), Some(1));
        // Integers have no non-finite values, whatever their bits.
        assert_eq!(first_non_finite(D::I64, &[0xff; 16]), None);
    }

    #[test]
    fn a_changed_or_truncated_file_fails_verification() {
        let data = b"some checkpoint bytes".to_vec();
        let sum = FileSum::of(&data);
        let path = Path::new("f.safetensors");
        verify_bytes(path, &data, &sum).unwrap();
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        let err = verify_bytes(path, &flipped, &sum).unwrap_err().to_string();
        assert!(err.contains("f.safetensors") && err.contains("checksum mismatch"), "{err}");
        let err = verify_bytes(path, &data[..10], &sum).unwrap_err().to_string();
        assert!(err.contains("is 10 bytes, but was saved as 21 bytes"), "{err}");
        // The result is kept: a second read of a bad file fails the same way without rehashing.
        let check = LazyCheck::new(sum);
        assert!(check.verify(path, &flipped).is_err());
        assert!(check.verify(path, &data).is_err(), "a file found bad stays bad for this load");
    }
}
