//! Images from files: a folder per class (torchvision's `ImageFolder`), PNG or JPEG, and the
//! CIFAR-10 binary format. Every file is decoded once, in parallel on all cores (rayon), before
//! training starts, so a training step only copies (and augments) pixels that are already in
//! memory: the first stage never waits on decoding.
//!
//! Layouts:
//! - `DIR/<class>/*.png|jpg|jpeg`: classes are the sub-folders in name order; the last 10% of
//!   each class (by file name) is held out. With `DIR/train/<class>/` and `DIR/val/<class>/`
//!   (or `test/`) those are the splits.
//! - CIFAR-10 binary: records of 1 label byte and 3072 pixel bytes (3 × 32 × 32, channel
//!   planes). A file (the last 10% held out), or the `cifar-10-batches-bin` directory
//!   (`data_batch_1..5.bin` train, `test_batch.bin` validation).
//!
//! Images are resized to `size` × `size` when they are not that size already, and converted to
//! RGB; pixels are scaled to [0, 1] and then normalised per channel like every image set.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::images::{ImageDataset, Images};
use super::DataError;

/// Bytes of one CIFAR-10 record: a label and 3 × 32 × 32 pixels.
pub const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;
/// The largest `--image-size` an image folder is resized to (one 4096² RGB image is 201 MB of
/// f32 pixels; larger sizes are a typo, not a dataset).
pub const MAX_IMAGE_SIZE: usize = 4096;
/// CIFAR-10's class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

fn format_err(path: &Path, problem: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_path_buf(), problem: problem.into() }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
    let mut entries: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    Ok(entries)
}

/// Class folders of `dir` and their image files (sorted), in class-name order.
fn class_folders(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DataError> {
    let mut classes = Vec::new();
    for entry in sorted_entries(dir)? {
        if !entry.is_dir() {
            continue;
        }
        let name = entry.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let files: Vec<PathBuf> = sorted_entries(&entry)?.into_iter().filter(|f| f.is_file() && is_image(f)).collect();
        classes.push((name, files));
    }
    if classes.is_empty() {
        return Err(format_err(
            dir,
            "has no class folders: expected one sub-folder of PNG/JPEG images per class (DIR/<class>/*.png)",
        ));
    }
    if let Some((name, _)) = classes.iter().find(|(_, files)| files.is_empty()) {
        return Err(format_err(dir, format!("class folder `{name}` has no PNG or JPEG images")));
    }
    Ok(classes)
}

/// Refuses a folder whose images, decoded at `size` × `size`, cannot fit in the memory this
/// machine has available (read from `/proc/meminfo`; elsewhere nothing is refused), with the
/// estimate, before decoding any: the allocator would otherwise abort the process.
fn check_decoded_fit(dir: &Path, files: usize, size: usize) -> Result<(), DataError> {
    // f32 RGB planes, held twice while the per-file buffers are joined.
    let needed = files as f64 * 3.0 * (size as f64).powi(2) * 4.0 * 2.0;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kib| kib * 1024.0)
    });
    if let Some(available) = available.filter(|a| needed > *a) {
        return Err(format_err(
            dir,
            format!(
                "decoding {files} images at {size}x{size} needs at least {:.1} GB, but this machine has {:.1} GB \
                 available; choose a smaller --image-size",
                needed / 1e9,
                available / 1e9
            ),
        ));
    }
    Ok(())
}

/// A JPEG decoder fills a cut-off file's missing rows with grey and reports success, where
/// PNG's checksums catch it; so a JPEG must end with its end-of-image marker (FF D9), allowing
/// a little padding after it.
fn check_jpeg_complete(path: &Path) -> Result<(), DataError> {
    let is_jpeg = path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        let e = e.to_ascii_lowercase();
        e == "jpg" || e == "jpeg"
    });
    if !is_jpeg {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(format_err(path, "cannot decode the image (the JPEG is truncated: no end-of-image marker)"));
    }
    Ok(())
}

/// Decodes `files` in parallel to `size` × `size` RGB, [0, 1], channel planes.
fn decode_all(files: &[(PathBuf, u32)], size: usize) -> Result<Images, DataError> {
    let per = 3 * size * size;
    let decoded: Vec<Vec<f32>> = files
        .par_iter()
        .map(|(path, _)| {
            check_jpeg_complete(path)?;
            let img = image::open(path).map_err(|e| format_err(path, format!("cannot decode the image ({e})")))?;
            let img = if img.width() as usize != size || img.height() as usize != size {
                img.resize_exact(size as u32, size as u32, image::imageops::FilterType::Triangle)
            } else {
                img
            };
            let rgb = img.to_rgb8();
            let mut planes = vec![0f32; per];
            let plane = size * size;
            for (i, p) in rgb.pixels().enumerate() {
                for ch in 0..3 {
                    planes[ch * plane + i] = p.0[ch] as f32 / 255.0;
                }
            }
            Ok(planes)
        })
        .collect::<Result<_, DataError>>()?;
    Ok(Images { pixels: decoded.concat(), labels: files.iter().map(|(_, l)| *l).collect() })
}

impl ImageDataset {
    /// An image folder (see the module documentation), resized to `size` × `size` RGB.
    pub fn from_image_folder(dir: impl AsRef<Path>, size: usize) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        if !dir.exists() {
            return Err(DataError::Missing { path: dir.to_path_buf() });
        }
        if size == 0 || size > MAX_IMAGE_SIZE {
            return Err(DataError::InvalidArgument(format!("image size {size} is outside 1..={MAX_IMAGE_SIZE}")));
        }
        let val_dir = ["val", "test"].iter().map(|v| dir.join(v)).find(|d| d.is_dir());
        let (train_files, val_files, names) = match (dir.join("train").is_dir(), val_dir) {
            (true, Some(val_dir)) => {
                let train = class_folders(&dir.join("train"))?;
                let val = class_folders(&val_dir)?;
                let names: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
                let val_names: Vec<String> = val.iter().map(|(n, _)| n.clone()).collect();
                if names != val_names {
                    return Err(format_err(
                        dir,
                        format!("train classes {names:?} differ from {} classes {val_names:?}", val_dir.display()),
                    ));
                }
                let label = |classes: Vec<(String, Vec<PathBuf>)>| -> Vec<(PathBuf, u32)> {
                    classes
                        .into_iter()
                        .enumerate()
                        .flat_map(|(k, (_, files))| files.into_iter().map(move |f| (f, k as u32)))
                        .collect()
                };
                (label(train), label(val), names)
            }
            _ => {
                let classes = class_folders(dir)?;
                let names = classes.iter().map(|(n, _)| n.clone()).collect();
                let (mut train, mut val) = (Vec::new(), Vec::new());
                for (k, (name, files)) in classes.into_iter().enumerate() {
                    if files.len() < 2 {
                        return Err(format_err(
                            dir,
                            format!("class folder `{name}` has 1 image; each class needs 2 (one is held out)"),
                        ));
                    }
                    let n_val = ((files.len() as f64 * 0.1).ceil() as usize).clamp(1, files.len() - 1);
                    let cut = files.len() - n_val;
                    for (i, f) in files.into_iter().enumerate() {
                        if i < cut {
                            train.push((f, k as u32))
                        } else {
                            val.push((f, k as u32))
                        }
                    }
                }
                (train, val, names)
            }
        };
        check_decoded_fit(dir, train_files.len() + val_files.len(), size)?;
        let train = decode_all(&train_files, size)?;
        let val = decode_all(&val_files, size)?;
        if let [name] = names.as_slice() {
            // One class trains to loss 0 and learns nothing. (Checked after decoding, so a
            // broken image is named first.)
            return Err(format_err(
                dir,
                format!("has one class folder (`{name}`); a classifier needs at least 2 classes (one sub-folder each)"),
            ));
        }
        let source = format!(
            "image folder {} ({} train + {} validation, 3x{size}x{size}, {} classes)",
            dir.display(),
            train.labels.len(),
            val.labels.len(),
            names.len()
        );
        Ok(Self::normalised(train, val, (3, size, size), names, source))
    }

    /// CIFAR-10 binary data: one file, or the `cifar-10-batches-bin` directory.
    pub fn from_cifar10(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(DataError::Missing { path: path.to_path_buf() });
        }
        let (train, val) = if path.is_dir() {
            let train_files: Vec<PathBuf> =
                (1..=5).map(|i| path.join(format!("data_batch_{i}.bin"))).filter(|f| f.is_file()).collect();
            let test = path.join("test_batch.bin");
            if train_files.is_empty() || !test.is_file() {
                return Err(format_err(
                    path,
                    "is not a CIFAR-10 directory: expected data_batch_1.bin .. data_batch_5.bin and test_batch.bin",
                ));
            }
            let parts = train_files.par_iter().map(|f| read_cifar(f)).collect::<Result<Vec<_>, _>>()?;
            let train = Images {
                pixels: parts.iter().flat_map(|p| p.pixels.iter().copied()).collect(),
                labels: parts.iter().flat_map(|p| p.labels.iter().copied()).collect(),
            };
            (train, read_cifar(&test)?)
        } else {
            let mut all = read_cifar(path)?;
            let n = all.labels.len();
            if n < 2 {
                return Err(DataError::TooFewImages { data: path.display().to_string(), n });
            }
            let cut = n - ((n as f64 * 0.1).ceil() as usize).clamp(1, n - 1);
            let val = Images { pixels: all.pixels.split_off(cut * 3072), labels: all.labels.split_off(cut) };
            (all, val)
        };
        let source = format!(
            "CIFAR-10 {} ({} train + {} validation, 3x32x32, 10 classes)",
            path.display(),
            train.labels.len(),
            val.labels.len()
        );
        let classes: std::collections::BTreeSet<u32> = train.labels.iter().copied().collect();
        if classes.len() < 2 {
            return Err(format_err(
                path,
                format!(
                    "every training record has label {}; a classifier needs at least 2 classes",
                    classes.first().copied().unwrap_or(0)
                ),
            ));
        }
        let names = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
        Ok(Self::normalised(train, val, (3, 32, 32), names, source))
    }
}

/// One CIFAR-10 binary file, pixels scaled to [0, 1]; decoded in parallel by record.
fn read_cifar(path: &Path) -> Result<Images, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    if bytes.len() % CIFAR_RECORD != 0 {
        return Err(format_err(
            path,
            format!(
                "{} bytes is not a whole number of CIFAR-10 records ({CIFAR_RECORD} bytes each: 1 label + 3x32x32 pixels); \
                 the file is truncated or not CIFAR-10 binary",
                bytes.len()
            ),
        ));
    }
    let records: Vec<&[u8]> = bytes.chunks_exact(CIFAR_RECORD).collect();
    if let Some((i, r)) = records.iter().enumerate().find(|(_, r)| r[0] >= 10) {
        return Err(format_err(path, format!("record {i} has label {}, but CIFAR-10 labels are 0..9", r[0])));
    }
    let mut pixels = vec![0f32; records.len() * 3072];
    pixels.par_chunks_mut(3072).zip(records.par_iter()).for_each(|(out, r)| {
        for (o, &b) in out.iter_mut().zip(&r[1..]) {
            *o = b as f32 / 255.0;
        }
    });
    Ok(Images { pixels, labels: records.iter().map(|r| r[0] as u32).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Augment, Split};
    use candle_core::Device;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("brigade-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `classes` folders of `per_class` solid-colour images (PNG, the last one JPEG), 12x12
    /// except one 20x20 that must be resized.
    fn image_folder(dir: &Path, classes: &[(&str, [u8; 3])], per_class: usize) {
        for (name, rgb) in classes {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            for i in 0..per_class {
                let side = if i == 1 { 20 } else { 12 };
                let img = image::RgbImage::from_pixel(side, side, image::Rgb(*rgb));
                let file = if i + 1 == per_class { format!("{i}.jpg") } else { format!("{i}.png") };
                img.save(dir.join(name).join(file)).unwrap();
            }
        }
    }

    #[test]
    fn image_folder_classes_splits_and_pixels() {
        let dir = temp_dir("folder");
        let colours = [("zebra", [0, 0, 255]), ("cat", [255, 0, 0]), ("dog", [0, 255, 0])];
        image_folder(&dir, &colours, 6);
        std::fs::write(dir.join("cat").join("notes.txt"), "not an image").unwrap();
        let ds = ImageDataset::from_image_folder(&dir, 12).unwrap();
        assert_eq!(ds.class_names(), ["cat", "dog", "zebra"]);
        assert_eq!((ds.train_len(), ds.val_len()), (15, 3), "5 + 1 per class");
        assert_eq!(ds.image_shape(), (3, 12, 12));
        assert_eq!(ds.labels(Split::Validation), [0, 1, 2]);
        assert_eq!(ds.class_counts(Split::Train), [5, 5, 5]);
        // Undo the normalisation: the first cat image is pure red, the resized one too.
        let (mean, std) = ds.normalisation();
        for i in [0, 1] {
            let px = ds.image(Split::Train, i).unwrap();
            let value = |ch: usize, at: usize| px[ch * 144 + at] * std[ch] + mean[ch];
            assert!((value(0, 0) - 1.0).abs() < 1e-5 && value(1, 77).abs() < 1e-5 && value(2, 143).abs() < 1e-5);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn image_folder_errors_name_the_problem() {
        let dir = temp_dir("bad");
        let e = ImageDataset::from_image_folder(&dir, 12).unwrap_err().to_string();
        assert!(e.contains("has no class folders"), "{e}");
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        let e = ImageDataset::from_image_folder(&dir, 12).unwrap_err().to_string();
        assert!(e.contains("class folder `empty` has no PNG or JPEG images"), "{e}");
        image_folder(&dir.join("x"), &[("a", [1, 2, 3]), ("b", [4, 5, 6])], 3);
        std::fs::write(dir.join("x").join("b").join("broken.png"), b"\x89PNG not really").unwrap();
        let e = ImageDataset::from_image_folder(dir.join("x"), 12).unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("cannot decode the image"), "{e}");
        let e = ImageDataset::from_image_folder(dir.join("missing"), 12).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        for size in [0, 100_000] {
            let e = ImageDataset::from_image_folder(dir.join("x"), size).unwrap_err().to_string();
            assert!(e.contains(&format!("image size {size} is outside 1..=4096")), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cut_off_jpeg_and_a_single_class_are_refused() {
        let dir = temp_dir("cut");
        image_folder(&dir.join("ok"), &[("a", [1, 2, 3]), ("b", [4, 5, 6])], 3);
        ImageDataset::from_image_folder(dir.join("ok"), 12).unwrap();
        // The same JPEG cut in half: the decoder alone would fill it with grey and succeed.
        let jpeg = dir.join("ok").join("b").join("2.jpg");
        let bytes = std::fs::read(&jpeg).unwrap();
        std::fs::write(&jpeg, &bytes[..bytes.len() / 2]).unwrap();
        let e = ImageDataset::from_image_folder(dir.join("ok"), 12).unwrap_err().to_string();
        assert!(e.contains("2.jpg") && e.contains("the JPEG is truncated"), "{e}");
        image_folder(&dir.join("one"), &[("only", [1, 2, 3])], 3);
        let e = ImageDataset::from_image_folder(dir.join("one"), 12).unwrap_err().to_string();
        assert!(e.contains("has one class folder (`only`)"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `n` CIFAR records: label `i % 10`, pixel j of record i = (i + j) % 256.
    fn cifar_bytes(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| std::iter::once((i % 10) as u8).chain((0..3072).map(move |j| ((i + j) % 256) as u8)))
            .collect()
    }

    #[test]
    fn cifar_binary_loads_and_bad_files_are_refused() {
        let dir = temp_dir("cifar");
        let file = dir.join("data_batch_1.bin");
        std::fs::write(&file, cifar_bytes(20)).unwrap();
        let ds = ImageDataset::from_cifar10(&file).unwrap();
        assert_eq!((ds.train_len(), ds.val_len(), ds.num_classes()), (18, 2, 10));
        assert_eq!(ds.labels(Split::Validation), [8, 9]);
        assert_eq!(ds.class_names()[3], "cat");
        let (mean, std) = ds.normalisation();
        let px = ds.image(Split::Train, 5).unwrap();
        assert!((px[1024 + 7] * std[1] + mean[1] - ((5 + 1024 + 7) % 256) as f32 / 255.0).abs() < 1e-5);
        // The directory layout: data batches train, the test batch validates.
        std::fs::write(dir.join("test_batch.bin"), cifar_bytes(4)).unwrap();
        let ds = ImageDataset::from_cifar10(&dir).unwrap();
        assert_eq!((ds.train_len(), ds.val_len()), (20, 4));

        let mut truncated = cifar_bytes(3);
        truncated.truncate(3 * CIFAR_RECORD - 5);
        std::fs::write(&file, truncated).unwrap();
        let e = ImageDataset::from_cifar10(&file).unwrap_err().to_string();
        assert!(e.contains("data_batch_1.bin") && e.contains("not a whole number of CIFAR-10 records"), "{e}");
        let mut bad_label = cifar_bytes(3);
        bad_label[CIFAR_RECORD] = 12;
        std::fs::write(&file, bad_label).unwrap();
        let e = ImageDataset::from_cifar10(&file).unwrap_err().to_string();
        assert!(e.contains("record 1 has label 12"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every augmented training image is one of its source's 81 shifts (pad 4) or their
    /// mirrors, with zeros shifted in; several different moves occur; validation is untouched.
    #[test]
    fn augmentation_crops_and_flips_training_batches_only() {
        let dir = temp_dir("augment");
        let file = dir.join("c.bin");
        std::fs::write(&file, cifar_bytes(30)).unwrap();
        let plain = ImageDataset::from_cifar10(&file).unwrap();
        let augmented = plain.clone().with_augment(Augment::standard());
        let (x, y) = augmented.batch(Split::Train, 3, 16, 0, &Device::Cpu).unwrap();
        let (x0, y0) = plain.batch(Split::Train, 3, 16, 0, &Device::Cpu).unwrap();
        assert_eq!(y.to_vec1::<u32>().unwrap(), y0.to_vec1::<u32>().unwrap(), "the same images are picked");
        let x: Vec<Vec<f32>> = x.flatten_from(1).unwrap().to_vec2().unwrap();
        let x0: Vec<Vec<f32>> = x0.flatten_from(1).unwrap().to_vec2().unwrap();
        let shifted = |src: &[f32], dy: usize, dx: usize, flip: bool| -> Vec<f32> {
            let mut out = vec![0f32; 3072];
            for ch in 0..3 {
                for yy in 0..32 {
                    for xx in 0..32 {
                        let (sy, sx) = ((yy + dy) as isize - 4, (xx + dx) as isize - 4);
                        let ox = if flip { 31 - xx } else { xx };
                        if (0..32).contains(&sy) && (0..32).contains(&sx) {
                            out[(ch * 32 + yy) * 32 + ox] = src[(ch * 32 + sy as usize) * 32 + sx as usize];
                        }
                    }
                }
            }
            out
        };
        let mut moves = std::collections::HashSet::new();
        for (out, src) in x.iter().zip(&x0) {
            let found = (0..9)
                .flat_map(|dy| (0..9).flat_map(move |dx| [(dy, dx, false), (dy, dx, true)]))
                .find(|&(dy, dx, f)| shifted(src, dy, dx, f) == *out);
            moves.insert(found.expect("an augmented image is a crop (and maybe a flip) of its source"));
        }
        assert!(moves.len() > 4 && moves.iter().any(|m| m.2) && moves.iter().any(|m| !m.2), "{moves:?}");
        let (v, _) = augmented.batch(Split::Validation, 3, 3, 0, &Device::Cpu).unwrap();
        let (v0, _) = plain.batch(Split::Validation, 3, 3, 0, &Device::Cpu).unwrap();
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v0.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
