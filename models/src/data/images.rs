//! Labelled images for the ResNet classifiers: loaded from a safetensors file or drawn by the
//! embedded shapes generator, normalised per channel, and sampled deterministically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::rng::DetRng;
use super::shapes::{self, MIN_SHAPE_SIZE, SHAPE_CLASSES};
use super::{read_file, DataError, Split};

/// Default embedded set: train / validation sizes and image side.
pub const EMBEDDED_SHAPES_TRAIN: usize = 5000;
pub const EMBEDDED_SHAPES_VAL: usize = 1000;
pub const EMBEDDED_SHAPES_SIZE: usize = 32;
/// The most classes an image dataset may declare (ImageNet-21k has 21,841): a bound on what a
/// file's metadata or labels can make the loader allocate.
pub const MAX_CLASSES: usize = 1 << 20;

/// One split: normalised pixels (N·C·H·W, row-major NCHW) and labels.
#[derive(Debug, Clone, Default)]
pub(super) struct Images {
    pub(super) pixels: Vec<f32>,
    pub(super) labels: Vec<u32>,
}

/// Training-time augmentation, applied to every training batch (never to validation):
/// torchvision's `RandomCrop(size, padding=pad)` and `RandomHorizontalFlip()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Pad each side by this many pixels (zeros after normalisation: the channel mean), then
    /// crop back to the original size at a random offset. 0: no crop.
    pub pad: usize,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// The usual CIFAR recipe: 4 pixels of padding and random flips.
    pub fn standard() -> Self {
        Self { pad: 4, flip: true }
    }
}

/// Images `(N, C, H, W)` f32, normalised per channel with the training split's mean and std,
/// and `u32` labels, with a train and a validation split.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    train: Images,
    val: Images,
    channels: usize,
    height: usize,
    width: usize,
    classes: usize,
    class_names: Vec<String>,
    mean: Vec<f32>,
    std: Vec<f32>,
    source: String,
    augment: Augment,
}

impl ImageDataset {
    /// Loads a safetensors file with tensors
    /// - `images`: `(N, C, H, W)`, f32/f64/f16/bf16 (used as is) or u8 (scaled to [0, 1]);
    /// - `labels`: `(N,)`, any integer dtype, non-negative;
    /// - optionally `val_images` / `val_labels` (same rules, same C, H, W) as the validation
    ///   split; without them the last 10% of `images` is held out.
    ///
    /// The number of classes is the metadata entry `num_classes` (or `classes`), else the
    /// length of the metadata entry `class_names` (a JSON list of strings), else max label + 1.
    /// Pixels are then normalised per channel to zero mean, unit variance (training statistics).
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let format_err = |problem: String| DataError::Format { path: path.to_path_buf(), problem };
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| format_err(format!("not a valid safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_err(format!("not a valid safetensors file ({e})")))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();

        let present = || {
            let mut names: Vec<&str> = st.names().into_iter().collect();
            names.sort_unstable();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        let get = |name: &str| {
            st.tensor(name).map_err(|_| DataError::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                present: present(),
            })
        };

        let (train_px, (c, h, w), n) = read_images(path, "images", &get("images")?)?;
        let train_labels = read_labels(path, "labels", &get("labels")?)?;
        if train_labels.len() != n {
            return Err(DataError::CountMismatch {
                path: path.to_path_buf(),
                images: "images".into(),
                n_images: n,
                labels: "labels".into(),
                n_labels: train_labels.len(),
            });
        }

        let has_vi = st.names().contains(&"val_images");
        let has_vl = st.names().contains(&"val_labels");
        let (train, val) = match (has_vi, has_vl) {
            (true, true) => {
                let (vpx, vchw, vn) = read_images(path, "val_images", &get("val_images")?)?;
                if vchw != (c, h, w) {
                    return Err(format_err(format!(
                        "`val_images` has images of shape {vchw:?} (C, H, W) but `images` has \
                         {:?}",
                        (c, h, w)
                    )));
                }
                let vl = read_labels(path, "val_labels", &get("val_labels")?)?;
                if vl.len() != vn {
                    return Err(DataError::CountMismatch {
                        path: path.to_path_buf(),
                        images: "val_images".into(),
                        n_images: vn,
                        labels: "val_labels".into(),
                        n_labels: vl.len(),
                    });
                }
                (Images { pixels: train_px, labels: train_labels }, Images { pixels: vpx, labels: vl })
            }
            (false, false) => {
                if n < 2 {
                    return Err(DataError::TooFewImages { data: path.display().to_string(), n });
                }
                let n_val = ((n as f64 * 0.1).ceil() as usize).clamp(1, n - 1);
                let cut = n - n_val;
                let per = c * h * w;
                let mut px = train_px;
                let vpx = px.split_off(cut * per);
                let mut labels = train_labels;
                let vl = labels.split_off(cut);
                (Images { pixels: px, labels }, Images { pixels: vpx, labels: vl })
            }
            (true, false) | (false, true) => {
                let (have, lack) = if has_vi { ("val_images", "val_labels") } else { ("val_labels", "val_images") };
                return Err(DataError::MissingTensor {
                    path: path.to_path_buf(),
                    name: format!("{lack} (the file has {have}, which needs it)"),
                    present: present(),
                });
            }
        };
        if train.labels.is_empty() || val.labels.is_empty() {
            return Err(DataError::TooFewImages {
                data: path.display().to_string(),
                n: train.labels.len() + val.labels.len(),
            });
        }

        let max_label = train.labels.iter().chain(&val.labels).copied().max().unwrap_or(0) as usize;
        let meta_names: Option<Vec<String>> = meta.get("class_names").and_then(|s| serde_json::from_str(s).ok());
        let meta_classes = match meta.get("num_classes").or_else(|| meta.get("classes")) {
            Some(s) => Some(
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| format_err(format!("metadata num_classes = {s:?} is not a whole number")))?,
            ),
            None => meta_names.as_ref().map(Vec::len),
        };
        let classes = meta_classes.unwrap_or(max_label + 1);
        if classes > MAX_CLASSES {
            return Err(format_err(format!(
                "{classes} classes (from {}) is more than the {MAX_CLASSES} an image dataset may have",
                if meta_classes.is_some() { "its metadata" } else { "its largest label" }
            )));
        }
        if max_label >= classes {
            return Err(DataError::LabelBeyondClasses {
                data: path.display().to_string(),
                max_label: max_label as u32,
                classes,
                origin: "the file's metadata".into(),
            });
        }
        let class_names = match meta_names {
            Some(names) if names.len() == classes => names,
            _ => (0..classes).map(|k| k.to_string()).collect(),
        };
        let source = format!(
            "images of {} ({} train + {} validation, {c}x{h}x{w}, {classes} classes)",
            path.display(),
            train.labels.len(),
            val.labels.len()
        );
        Ok(Self::normalised(train, val, (c, h, w), class_names, source))
    }

    /// The embedded shapes set: `n_train` + `n_val` images of 3 × `size` × `size`, 10 balanced
    /// classes (see [`SHAPE_CLASSES`]), deterministic in `seed`. Train and validation images
    /// are independent draws. `size` must be at least 8.
    pub fn embedded_shapes(n_train: usize, n_val: usize, size: usize, seed: u64) -> Result<Self, DataError> {
        if size < MIN_SHAPE_SIZE {
            return Err(DataError::InvalidArgument(format!(
                "embedded shapes need images of at least {MIN_SHAPE_SIZE}x{MIN_SHAPE_SIZE} \
                 pixels, got {size}x{size}"
            )));
        }
        if n_train == 0 || n_val == 0 {
            return Err(DataError::InvalidArgument(format!(
                "embedded shapes need at least one training and one validation image, got \
                 {n_train} and {n_val}"
            )));
        }
        Ok(Self::draw_shapes(n_train, n_val, size, seed))
    }

    /// [`Self::embedded_shapes`] with the default 5000 + 1000 images of 32×32.
    pub fn embedded(seed: u64) -> Self {
        Self::draw_shapes(EMBEDDED_SHAPES_TRAIN, EMBEDDED_SHAPES_VAL, EMBEDDED_SHAPES_SIZE, seed)
    }

    /// The generator behind both constructors; arguments already validated.
    fn draw_shapes(n_train: usize, n_val: usize, size: usize, seed: u64) -> Self {
        let (tp, tl) = shapes::generate(n_train, size, seed, 1);
        let (vp, vl) = shapes::generate(n_val, size, seed, 2);
        let source = format!(
            "embedded shapes (seed {seed}, {n_train} train + {n_val} validation, 3x{size}x{size}, \
             10 classes)"
        );
        let names = SHAPE_CLASSES.iter().map(|s| s.to_string()).collect();
        Self::normalised(
            Images { pixels: tp, labels: tl },
            Images { pixels: vp, labels: vl },
            (3, size, size),
            names,
            source,
        )
    }

    /// Per-channel standardisation with the training split's statistics (applied to both
    /// splits, so validation sees exactly the transform the model was trained under).
    pub(super) fn normalised(
        mut train: Images,
        mut val: Images,
        (c, h, w): (usize, usize, usize),
        class_names: Vec<String>,
        source: String,
    ) -> Self {
        let plane = h * w;
        let mut mean = vec![0f32; c];
        let mut std = vec![1f32; c];
        for ch in 0..c {
            let (mut s, mut s2, mut count) = (0f64, 0f64, 0usize);
            for img in train.pixels.chunks_exact(c * plane) {
                for &v in &img[ch * plane..(ch + 1) * plane] {
                    s += v as f64;
                    s2 += (v as f64) * (v as f64);
                }
                count += plane;
            }
            if count > 0 {
                let m = s / count as f64;
                let var = (s2 / count as f64 - m * m).max(0.0);
                mean[ch] = m as f32;
                // A constant channel would divide by zero; leave its scale alone.
                std[ch] = if var > 1e-12 { var.sqrt() as f32 } else { 1.0 };
            }
        }
        for px in [&mut train.pixels, &mut val.pixels] {
            for img in px.chunks_exact_mut(c * plane) {
                for ch in 0..c {
                    for v in &mut img[ch * plane..(ch + 1) * plane] {
                        *v = (*v - mean[ch]) / std[ch];
                    }
                }
            }
        }
        Self {
            train,
            val,
            channels: c,
            height: h,
            width: w,
            classes: class_names.len(),
            class_names,
            mean,
            std,
            source,
            augment: Augment::default(),
        }
    }

    fn split(&self, split: Split) -> &Images {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.val,
        }
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// `(C, H, W)` of one image.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Names of the classes, index = label (`"0"`, `"1"`, … when a file gives none).
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn train_len(&self) -> usize {
        self.train.labels.len()
    }

    pub fn val_len(&self) -> usize {
        self.val.labels.len()
    }

    pub fn len(&self, split: Split) -> usize {
        self.split(split).labels.len()
    }

    pub fn labels(&self, split: Split) -> &[u32] {
        &self.split(split).labels
    }

    /// Normalised pixels of image `i` of `split` (C·H·W values), if it exists.
    pub fn image(&self, split: Split, i: usize) -> Option<&[f32]> {
        let per = self.channels * self.height * self.width;
        self.split(split).pixels.get(i * per..(i + 1) * per)
    }

    /// Per-channel (mean, std) subtracted/divided out of the raw pixels.
    pub fn normalisation(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.std)
    }

    /// How many images of each class `split` holds.
    pub fn class_counts(&self, split: Split) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.split(split).labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Errors if the images do not have `channels` channels or a label is `>= num_classes`.
    pub fn check_model(&self, channels: usize, num_classes: usize) -> Result<(), DataError> {
        if channels != self.channels {
            return Err(DataError::ChannelMismatch {
                data: self.source.clone(),
                data_channels: self.channels,
                model_channels: channels,
            });
        }
        let max_label = self.train.labels.iter().chain(&self.val.labels).copied().max();
        if let Some(max_label) = max_label {
            if max_label as usize >= num_classes {
                return Err(DataError::LabelBeyondClasses {
                    data: self.source.clone(),
                    max_label,
                    classes: num_classes,
                    origin: "the model".into(),
                });
            }
        }
        Ok(())
    }

    /// `batch_size` images drawn uniformly (with replacement) from `split`, chosen only by
    /// `(seed, split, index)` so a resumed run sees the same batches. Returns images
    /// `(B, C, H, W)` f32 and labels `(B,)` u32.
    pub fn batch(
        &self,
        split: Split,
        index: u64,
        batch_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<(Tensor, Tensor), DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidArgument("batch size must be at least 1".into()));
        }
        let n = self.len(split);
        let mut rng = DetRng::for_stream(seed, split.stream_id(), index);
        let picks: Vec<usize> = (0..batch_size).map(|_| rng.below_usize(n)).collect();
        if split == Split::Train && self.augment != Augment::default() {
            // Drawn after the picks from the same stream: still a function of (seed, index).
            let moves: Vec<(usize, usize, bool)> = (0..batch_size)
                .map(|_| {
                    let dy = rng.below_usize(2 * self.augment.pad + 1);
                    let dx = rng.below_usize(2 * self.augment.pad + 1);
                    (dy, dx, self.augment.flip && rng.below_usize(2) == 1)
                })
                .collect();
            return self.gather_augmented(&picks, &moves, device);
        }
        self.gather(split, &picks, device)
    }

    /// Training augmentation for [`Self::batch`] (see [`Augment`]); default none.
    pub fn with_augment(mut self, augment: Augment) -> Self {
        self.augment = augment;
        self
    }

    pub fn augment(&self) -> Augment {
        self.augment
    }

    /// Training images `picks`, each shifted by its crop offset `(dy, dx)` in the padded image
    /// (`pad` = no shift) and mirrored when asked; pixels shifted in from the padding are 0.
    fn gather_augmented(
        &self,
        picks: &[usize],
        moves: &[(usize, usize, bool)],
        device: &Device,
    ) -> Result<(Tensor, Tensor), DataError> {
        let (c, h, w, pad) = (self.channels, self.height, self.width, self.augment.pad);
        let per = c * h * w;
        let mut px = vec![0f32; picks.len() * per];
        let mut labels = Vec::with_capacity(picks.len());
        for ((&i, &(dy, dx, flip)), out) in picks.iter().zip(moves).zip(px.chunks_exact_mut(per)) {
            let src = &self.train.pixels[i * per..(i + 1) * per];
            labels.push(self.train.labels[i]);
            for ch in 0..c {
                for y in 0..h {
                    // Output row y shows padded row y + dy, i.e. source row y + dy - pad.
                    let Some(sy) = (y + dy).checked_sub(pad).filter(|&r| r < h) else { continue };
                    for x in 0..w {
                        let ox = if flip { w - 1 - x } else { x };
                        if let Some(sx) = (x + dx).checked_sub(pad).filter(|&col| col < w) {
                            out[(ch * h + y) * w + ox] = src[(ch * h + sy) * w + sx];
                        }
                    }
                }
            }
        }
        let b = picks.len();
        let x = Tensor::from_vec(px, (b, c, h, w), device)?;
        let y = Tensor::from_vec(labels, b, device)?;
        Ok((x, y))
    }

    /// Number of full batches [`Self::eval_batches`] yields.
    /// Errors unless the validation split holds at least one batch of `batch_size` images:
    /// checked before training, not found at the first evaluation.
    pub fn check_eval_batch(&self, batch_size: usize) -> Result<(), DataError> {
        let n = self.len(Split::Validation);
        if n < batch_size {
            return Err(DataError::InvalidArgument(format!(
                "{}: the validation split has {n} images, fewer than one batch of {batch_size}; use --batch-size {n} \
                 or less, or more validation images",
                self.source
            )));
        }
        Ok(())
    }

    /// A hash of the images and labels of both splits and their shape (xxh3-128): the same
    /// images from any path hash alike, other images of the same count do not.
    pub fn content_hash(&self) -> String {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(b"brigade-images-v1");
        for n in [self.channels, self.height, self.width, self.classes] {
            hasher.update(&(n as u64).to_le_bytes());
        }
        for split in [&self.train, &self.val] {
            hasher.update(&(split.labels.len() as u64).to_le_bytes());
            for chunk in split.labels.chunks(1 << 14) {
                hasher.update(&chunk.iter().flat_map(|l| l.to_le_bytes()).collect::<Vec<u8>>());
            }
            for chunk in split.pixels.chunks(1 << 14) {
                hasher.update(&chunk.iter().flat_map(|p| p.to_bits().to_le_bytes()).collect::<Vec<u8>>());
            }
        }
        format!("xxh3-128:{:032x}", hasher.digest128())
    }

    pub fn eval_batch_count(&self, split: Split, batch_size: usize) -> usize {
        self.len(split).checked_div(batch_size).unwrap_or(0)
    }

    /// The whole of `split` in order, `batch_size` images at a time. The last partial batch
    /// (`len % batch_size` images) is dropped so every batch has the same shape (pipeline
    /// stages are built for one micro-batch size); pick a batch size that divides the split to
    /// see every image. Errors if the split has fewer than `batch_size` images.
    pub fn eval_batches<'a>(
        &'a self,
        split: Split,
        batch_size: usize,
        device: &'a Device,
    ) -> Result<impl Iterator<Item = Result<(Tensor, Tensor), DataError>> + 'a, DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidArgument("batch size must be at least 1".into()));
        }
        let n = self.len(split);
        if n < batch_size {
            return Err(DataError::InvalidArgument(format!(
                "{}: the {split} split has {n} images, fewer than one batch of {batch_size}",
                self.source
            )));
        }
        Ok((0..n / batch_size).map(move |b| {
            let picks: Vec<usize> = (b * batch_size..(b + 1) * batch_size).collect();
            self.gather(split, &picks, device)
        }))
    }

    fn gather(&self, split: Split, picks: &[usize], device: &Device) -> Result<(Tensor, Tensor), DataError> {
        let data = self.split(split);
        let per = self.channels * self.height * self.width;
        let mut px = Vec::with_capacity(picks.len() * per);
        let mut labels = Vec::with_capacity(picks.len());
        for &i in picks {
            px.extend_from_slice(&data.pixels[i * per..(i + 1) * per]);
            labels.push(data.labels[i]);
        }
        let b = picks.len();
        let x = Tensor::from_vec(px, (b, self.channels, self.height, self.width), device)?;
        let y = Tensor::from_vec(labels, b, device)?;
        Ok((x, y))
    }
}

/// Pixels (N·C·H·W), (C, H, W), N.
type RawImages = (Vec<f32>, (usize, usize, usize), usize);

/// Reads a rank-4 image tensor as f32 (u8 scaled to [0, 1]).
fn read_images(path: &Path, name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<RawImages, DataError> {
    let shape = view.shape();
    if shape.len() != 4 {
        return Err(DataError::WrongRank {
            path: path.to_path_buf(),
            name: name.into(),
            shape: shape.to_vec(),
            expected: "rank 4 (N, C, H, W)",
        });
    }
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    if c == 0 || h == 0 || w == 0 {
        return Err(DataError::WrongRank {
            path: path.to_path_buf(),
            name: name.into(),
            shape: shape.to_vec(),
            expected: "non-zero C, H and W",
        });
    }
    let d = view.data();
    let px: Vec<f32> = match view.dtype() {
        Dtype::U8 => d.iter().map(|&b| b as f32 / 255.0).collect(),
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => d.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(DataError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.into(),
                dtype: format!("{other:?}"),
                allowed: "f32, f64, f16, bf16 or u8",
            })
        }
    };
    if let Some(bad) = px.iter().position(|v| !v.is_finite()) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            problem: format!("`{name}` holds a non-finite pixel value at flat index {bad}"),
        });
    }
    Ok((px, (c, h, w), n))
}

/// Reads a rank-1 integer label tensor; negative labels are an error.
fn read_labels(path: &Path, name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<u32>, DataError> {
    let shape = view.shape();
    if shape.len() != 1 {
        return Err(DataError::WrongRank {
            path: path.to_path_buf(),
            name: name.into(),
            shape: shape.to_vec(),
            expected: "rank 1 (N)",
        });
    }
    let d = view.data();
    let wide: Vec<i128> = match view.dtype() {
        Dtype::U8 => d.iter().map(|&b| b as i128).collect(),
        Dtype::I8 => d.iter().map(|&b| b as i8 as i128).collect(),
        Dtype::U16 => d.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i128).collect(),
        Dtype::I16 => d.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as i128).collect(),
        Dtype::U32 => d.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128).collect(),
        Dtype::I32 => d.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128).collect(),
        Dtype::U64 => d.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as i128).collect(),
        Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as i128).collect(),
        other => {
            return Err(DataError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.into(),
                dtype: format!("{other:?}"),
                allowed: "an integer dtype (u8, i8, u16, i16, u32, i32, u64, i64)",
            })
        }
    };
    wide.into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).map_err(|_| DataError::BadLabel {
                path: path.to_path_buf(),
                name: name.into(),
                index: i,
                value: v.to_string(),
            })
        })
        .collect()
}
