//! safetensors files and Hugging Face shard indexes: planning shards, writing them durably,
//! and reading them back (memory-mapped) with every tensor checked against what is expected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::seal::{first_non_finite, Checksums, LazyCheck};
use super::{CheckpointError, CHECKSUMS_FILE};

/// A tensor's name, dtype and shape: what a stage reports before writing, so the driver can
/// plan the shards (and their names, which encode the shard count) up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn of(name: impl Into<String>, t: &Tensor) -> Self {
        Self { name: name.into(), dtype: t.dtype(), shape: t.dims().to_vec() }
    }

    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// One shard file to write: which stage writes it and which tensors go in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    pub stage: usize,
    pub file_name: String,
    pub names: Vec<String>,
    pub bytes: u64,
}

/// Cuts each stage's tensors (in order) into files of at most `max_bytes` (a tensor larger than
/// that gets a file of its own). Files never mix stages, so every stage writes its own.
/// Names follow Hugging Face: `{prefix}-00001-of-00003.safetensors`, or `{prefix}.safetensors`
/// when everything fits in one file.
pub fn plan_shards(prefix: &str, per_stage: &[Vec<TensorInfo>], max_bytes: u64) -> Vec<ShardFile> {
    let mut files: Vec<ShardFile> = Vec::new();
    for (stage, tensors) in per_stage.iter().enumerate() {
        let mut current: Option<ShardFile> = None;
        for t in tensors {
            let size = t.bytes();
            if let Some(file) = &current {
                if file.bytes + size > max_bytes {
                    files.push(current.take().expect("checked Some"));
                }
            }
            let file = current.get_or_insert_with(|| ShardFile {
                stage,
                file_name: String::new(),
                names: Vec::new(),
                bytes: 0,
            });
            file.names.push(t.name.clone());
            file.bytes += size;
        }
        files.extend(current);
    }
    let n = files.len();
    for (i, file) in files.iter_mut().enumerate() {
        file.file_name = if n == 1 {
            format!("{prefix}.safetensors")
        } else {
            format!("{prefix}-{:05}-of-{n:05}.safetensors", i + 1)
        };
    }
    files
}

/// Hugging Face's `*.safetensors.index.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub weight_map: BTreeMap<String, String>,
}

pub fn write_index(path: &Path, files: &[ShardFile]) -> Result<(), CheckpointError> {
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut index = ShardIndex::default();
    index.metadata.insert("total_size".into(), total.into());
    for f in files {
        for name in &f.names {
            index.weight_map.insert(name.clone(), f.file_name.clone());
        }
    }
    let text = serde_json::to_string_pretty(&index).expect("an index always serialises");
    write_file_durably(path, text.as_bytes())
}

pub fn read_index(path: &Path) -> Result<ShardIndex, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    parse_index(path, &bytes)
}

fn parse_index(path: &Path, bytes: &[u8]) -> Result<ShardIndex, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|e| CheckpointError::invalid(path, format!("not a valid shard index: {e}")))
}

/// Writes `bytes` to `path` and flushes it to disk.
pub(crate) fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    f.write_all(bytes).map_err(|e| CheckpointError::io(path, e))?;
    f.sync_all().map_err(|e| CheckpointError::io(path, e))
}

/// Writes one safetensors file (with `metadata` in its header) and flushes it to disk.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<u64, CheckpointError> {
    let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(data, Some(metadata.clone()), path)
        .map_err(|e| CheckpointError::invalid(path, format!("cannot write safetensors: {e}")))?;
    // The safetensors crate creates files readable by their owner only; checkpoints are meant
    // to be shared like any other output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| CheckpointError::io(path, e))?;
    }
    let f = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    f.sync_all().map_err(|e| CheckpointError::io(path, e))?;
    Ok(tensors.iter().map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum())
}

/// The name safetensors and PyTorch users know a dtype by.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        _ => "other",
    }
}

fn from_st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

/// Where one tensor of a [`ShardSet`] lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
}

/// The shards of one prefix (`model` or `optimizer`), memory-mapped, headers parsed and checked
/// against the index.
#[derive(Debug)]
pub struct ShardSet {
    /// The index file, or the single shard when there is no index: what errors name.
    pub source: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
    /// The `metadata` of the first shard's safetensors header.
    pub header_metadata: HashMap<String, String>,
    /// Per file, the checksum to verify it against before its first tensor is used.
    checks: Vec<Option<LazyCheck>>,
    /// The index file's bytes as parsed, and its checksum check.
    index: Option<(Vec<u8>, Option<LazyCheck>)>,
}

impl ShardSet {
    /// Opens `{prefix}.safetensors.index.json` in `dir`, or else `{prefix}.safetensors`.
    pub fn open(dir: &Path, prefix: &str) -> Result<Self, CheckpointError> {
        let index_path = dir.join(format!("{prefix}.safetensors.index.json"));
        let single = dir.join(format!("{prefix}.safetensors"));
        if index_path.exists() {
            let index_bytes = std::fs::read(&index_path).map_err(|e| CheckpointError::io(&index_path, e))?;
            let index = parse_index(&index_path, &index_bytes)?;
            let mut file_names: Vec<&String> = index.weight_map.values().collect();
            file_names.sort();
            file_names.dedup();
            let mut set = Self::empty(&index_path);
            set.index = Some((index_bytes, None));
            let mut found: HashMap<String, (usize, Vec<usize>, safetensors::Dtype)> = HashMap::new();
            for name in file_names {
                if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    return Err(CheckpointError::invalid(
                        &index_path,
                        format!("shard file name {name:?} is not a file in this directory"),
                    ));
                }
                let path = dir.join(name);
                let file = set.map_file(&path)?;
                for (tensor, shape, dtype) in set.header(file)? {
                    if let Some((other, _, _)) = found.insert(tensor.clone(), (file, shape, dtype)) {
                        return Err(CheckpointError::invalid(
                            &set.files[file].0,
                            format!("tensor {tensor} is also in {}", set.files[other].0.display()),
                        ));
                    }
                }
            }
            for (tensor, file_name) in &index.weight_map {
                let (file, shape, dtype) = match found.remove(tensor) {
                    Some(hit) if set.files[hit.0].0.file_name().is_some_and(|f| f == file_name.as_str()) => hit,
                    _ => {
                        return Err(CheckpointError::MissingTensor { path: dir.join(file_name), name: tensor.clone() });
                    }
                };
                set.entries.insert(tensor.clone(), Entry { file, shape, dtype });
            }
            if let Some((tensor, (file, _, _))) = found.into_iter().next() {
                return Err(CheckpointError::invalid(
                    &set.files[file].0,
                    format!("tensor {tensor} is not listed in {}", index_path.display()),
                ));
            }
            Ok(set)
        } else if single.exists() {
            let mut set = Self::empty(&single);
            let file = set.map_file(&single)?;
            for (tensor, shape, dtype) in set.header(file)? {
                set.entries.insert(tensor, Entry { file, shape, dtype });
            }
            Ok(set)
        } else {
            Err(CheckpointError::invalid(
                dir,
                format!("neither {prefix}.safetensors.index.json nor {prefix}.safetensors exists"),
            ))
        }
    }

    /// Opens one safetensors file on its own (an import of torchvision-named weights, say).
    pub fn open_file(path: &Path) -> Result<Self, CheckpointError> {
        let mut set = Self::empty(path);
        let file = set.map_file(path)?;
        for (tensor, shape, dtype) in set.header(file)? {
            set.entries.insert(tensor, Entry { file, shape, dtype });
        }
        Ok(set)
    }

    fn empty(source: &Path) -> Self {
        Self {
            source: source.to_path_buf(),
            files: Vec::new(),
            entries: BTreeMap::new(),
            header_metadata: HashMap::new(),
            checks: Vec::new(),
            index: None,
        }
    }

    /// Makes every read verify its file (and the index) against `sums`, once per file, before
    /// any of its bytes are used. A file of the set that `sums` does not list is an error now.
    pub fn expect_checksums(&mut self, sums: &Checksums) -> Result<(), CheckpointError> {
        let missing = |path: &Path| CheckpointError::Checksum {
            path: path.to_path_buf(),
            reason: format!("is not listed in {CHECKSUMS_FILE}: it is not part of the saved checkpoint"),
        };
        for (i, (path, _)) in self.files.iter().enumerate() {
            let sum = sums.get(path).ok_or_else(|| missing(path))?;
            self.checks[i] = Some(LazyCheck::new(sum.clone()));
        }
        if let Some((_, check)) = &mut self.index {
            let sum = sums.get(&self.source).ok_or_else(|| missing(&self.source))?;
            *check = Some(LazyCheck::new(sum.clone()));
        }
        Ok(())
    }

    /// Verifies `file` (and the index) against the recorded checksums, if any (once).
    fn verified(&self, file: usize) -> Result<(), CheckpointError> {
        if let Some((bytes, Some(check))) = &self.index {
            check.verify(&self.source, bytes)?;
        }
        if let Some(check) = &self.checks[file] {
            let (path, map) = &self.files[file];
            check.verify(path, map)?;
        }
        Ok(())
    }

    /// Verifies every file of the set now; returns the bytes checked.
    pub fn verify_now(&self) -> Result<u64, CheckpointError> {
        let mut bytes = 0;
        for file in 0..self.files.len() {
            self.verified(file)?;
            bytes += self.files[file].1.len() as u64;
        }
        Ok(bytes)
    }

    fn map_file(&mut self, path: &Path) -> Result<usize, CheckpointError> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as the set; brigade never writes a
        // file in place (saves go to new files renamed into place), so no brigade process
        // mutates it underneath us.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        self.files.push((path.to_path_buf(), map));
        self.checks.push(None);
        Ok(self.files.len() - 1)
    }

    /// Parses a file's header (checking that the data section matches it: this is where a
    /// truncated file is caught) and lists its tensors.
    fn header(&mut self, file: usize) -> Result<Vec<(String, Vec<usize>, safetensors::Dtype)>, CheckpointError> {
        let (path, map) = &self.files[file];
        let st = SafeTensors::deserialize(map)
            .map_err(|e| CheckpointError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        if self.header_metadata.is_empty() {
            if let Ok((_, meta)) = SafeTensors::read_metadata(map) {
                if let Some(m) = meta.metadata() {
                    self.header_metadata = m.clone();
                }
            }
        }
        Ok(st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec(), view.dtype())).collect())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Every tensor: its file, shape and dtype (unknown dtypes reported as U8 bytes).
    pub fn listing(&self) -> BTreeMap<String, (PathBuf, Vec<usize>, DType)> {
        self.entries
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    (self.files[e.file].0.clone(), e.shape.clone(), from_st_dtype(e.dtype).unwrap_or(DType::U8)),
                )
            })
            .collect()
    }

    /// Files of the set, in index order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// The file holding tensor `name` (the index or single file if there is no such tensor).
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.entries.get(name).map(|e| self.files[e.file].0.clone()).unwrap_or_else(|| self.source.clone())
    }

    /// Loads one tensor onto the CPU, converted to `dtype`. Its file is verified against the
    /// recorded checksum first (the first time), and a value that is not finite is an error:
    /// no checkpoint or exported model legitimately holds one.
    pub fn load(&self, name: &str, dtype: DType) -> Result<Tensor, CheckpointError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor { path: self.source.clone(), name: name.into() })?;
        self.verified(entry.file)?;
        let (path, map) = &self.files[entry.file];
        let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
        let st = SafeTensors::deserialize(map).map_err(|e| corrupt(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| corrupt(e.to_string()))?;
        if let Some(index) = first_non_finite(view.dtype(), view.data()) {
            return Err(CheckpointError::NonFinite { path: path.clone(), name: name.into(), index });
        }
        let t = view.load(&Device::Cpu).map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
        t.to_dtype(dtype).map_err(|e| corrupt(format!("tensor {name}: {e}")))
    }

    /// Loads exactly the `expected` tensors, checking each one's presence, shape and dtype
    /// before anything is returned; a tensor in the files that is not expected is an error too
    /// (`what` says what kind of tensor, for the message). Values are converted to the expected
    /// entry's first allowed dtype.
    pub fn load_validated(
        &self,
        expected: &[ExpectedTensor],
        what: &'static str,
    ) -> Result<HashMap<String, Tensor>, CheckpointError> {
        self.load_mapped(expected, |name| Some(name.to_string()), what)
    }

    /// Like [`ShardSet::load_validated`] for files that name tensors differently: `canonical`
    /// maps a file's tensor name to the expected name, or to `None` for a tensor to ignore.
    pub fn load_mapped(
        &self,
        expected: &[ExpectedTensor],
        canonical: impl Fn(&str) -> Option<String>,
        what: &'static str,
    ) -> Result<HashMap<String, Tensor>, CheckpointError> {
        let in_file = self.check_mapped(expected, canonical, what)?;
        expected.iter().map(|e| Ok((e.name.clone(), self.load(&in_file[&e.name], e.dtypes[0])?))).collect()
    }

    /// Checks, from the headers alone, that the files hold exactly `expected` (presence, shape,
    /// dtype, nothing extra); returns expected name → name in the file. Nothing is read yet, so
    /// each stage can later load only its own tensors.
    pub fn check_mapped(
        &self,
        expected: &[ExpectedTensor],
        canonical: impl Fn(&str) -> Option<String>,
        what: &'static str,
    ) -> Result<HashMap<String, String>, CheckpointError> {
        let wanted: HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        // canonical name -> name in the file
        let mut in_file: HashMap<String, String> = HashMap::new();
        for name in self.entries.keys() {
            let Some(c) = canonical(name) else { continue };
            if !wanted.contains(c.as_str()) {
                return Err(CheckpointError::UnexpectedTensor { path: self.path_of(name), name: name.clone(), what });
            }
            if let Some(other) = in_file.insert(c.clone(), name.clone()) {
                return Err(CheckpointError::invalid(
                    &self.source,
                    format!("tensors {other} and {name} both map to {c}"),
                ));
            }
        }
        for e in expected {
            let Some(file_name) = in_file.get(&e.name) else {
                return Err(CheckpointError::MissingTensor { path: self.source.clone(), name: e.name.clone() });
            };
            let entry = &self.entries[file_name];
            let path = self.path_of(file_name);
            if entry.shape != e.shape {
                return Err(CheckpointError::Shape {
                    path,
                    name: file_name.clone(),
                    found: entry.shape.clone(),
                    expected: e.shape.clone(),
                });
            }
            let ok = from_st_dtype(entry.dtype).is_some_and(|d| e.dtypes.contains(&d));
            if !ok {
                return Err(CheckpointError::Dtype {
                    path,
                    name: file_name.clone(),
                    found: format!("{:?}", entry.dtype),
                    expected: e.dtypes.iter().map(|d| dtype_name(*d)).collect::<Vec<_>>().join(" or "),
                });
            }
        }
        Ok(in_file)
    }
}

/// A tensor a load expects: its name, shape, and the dtypes accepted on disk (the first is
/// what it is converted to).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtypes: Vec<DType>,
}
