//! Tests for the data module: file formats, splits, determinism, every error, and the embedded
//! corpora's properties.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::*;

/// A unique path in the system temp dir (process id + counter), removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(ext: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("brigade-data-test-{}-{n}.{ext}", std::process::id());
        Self(std::env::temp_dir().join(name))
    }
    fn with_bytes(ext: &str, bytes: &[u8]) -> Self {
        let f = Self::new(ext);
        std::fs::write(&f.0, bytes).unwrap();
        f
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bin_bytes(ids: &[u16]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<u32>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[test]
fn text_file_round_trips_bytes() {
    let text = b"hello, brigade!\nbytes are tokens: \xff\x00 too.";
    let f = TempFile::with_bytes("txt", text);
    let ds = TokenDataset::from_text_file(&f.0).unwrap();
    assert_eq!(ds.vocab(), 256);
    assert_eq!(ds.len(), text.len());
    let all: Vec<u8> = ds
        .split_tokens(Split::Train)
        .iter()
        .chain(ds.split_tokens(Split::Validation).iter())
        .map(|t| t as u8)
        .collect();
    assert_eq!(all, text);
    // Last 10% (rounded up) is validation.
    assert_eq!(ds.val_len(), text.len().div_ceil(10));
    assert_eq!(ds.train_len() + ds.val_len(), text.len());
    assert!(ds.source().contains(&f.0.display().to_string()));
    assert_eq!(ds.max_id(), 255);
    // from_path treats a non-.bin extension as text.
    let again = TokenDataset::from_path(&f.0).unwrap();
    assert_eq!(again.split_tokens(Split::Train), ds.split_tokens(Split::Train));
}

#[test]
fn bin_file_parses_little_endian_u16() {
    let ids = [0u16, 1, 256, 513, 50256, 7, 42, 1000, 2, 3];
    let f = TempFile::with_bytes("bin", &bin_bytes(&ids));
    let ds = TokenDataset::from_bin_file(&f.0).unwrap();
    let all: Vec<u32> = [ds.split_tokens(Split::Train).to_vec(), ds.split_tokens(Split::Validation).to_vec()].concat();
    assert_eq!(all, ids.map(u32::from));
    assert_eq!(ds.vocab(), GPT2_VOCAB);
    assert_eq!(ds.max_id(), 50256);
    // Dispatch on extension.
    let via_path = TokenDataset::from_path(&f.0).unwrap();
    assert_eq!(via_path.vocab(), GPT2_VOCAB);
    assert_eq!(via_path.len(), ids.len());

    // An id past GPT-2's vocabulary widens it to max + 1.
    let f2 = TempFile::with_bytes("bin", &bin_bytes(&[5, 60000, 9, 9]));
    let ds2 = TokenDataset::from_bin_file(&f2.0).unwrap();
    assert_eq!(ds2.vocab(), 60001);
}

#[test]
fn targets_are_inputs_shifted_by_one() {
    let ds = TokenDataset::embedded_with_len(3, 20_000);
    let (x, y) = ds.batch(Split::Train, 5, 4, 16, 7, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[4, 16]);
    assert_eq!(y.dims(), &[4, 16]);
    assert_eq!(x.dtype(), candle_core::DType::U32);
    let train: Vec<u32> = ds.split_tokens(Split::Train).to_vec();
    for (xr, yr) in rows(&x).iter().zip(rows(&y)) {
        assert_eq!(&xr[1..], &yr[..15]);
        // The row plus its last target is a contiguous window of the training tokens.
        let mut window = xr.clone();
        window.push(yr[15]);
        assert!(train.windows(17).any(|w| w == window.as_slice()));
    }
}

#[test]
fn token_batches_are_deterministic_in_seed_split_index() {
    let ds = TokenDataset::embedded_with_len(0, 50_000);
    let dev = Device::Cpu;
    let get = |split, index, seed| {
        let (x, y) = ds.batch(split, index, 8, 32, seed, &dev).unwrap();
        (rows(&x), rows(&y))
    };
    assert_eq!(get(Split::Train, 10, 1), get(Split::Train, 10, 1));
    assert_ne!(get(Split::Train, 10, 1).0, get(Split::Train, 11, 1).0);
    assert_ne!(get(Split::Train, 10, 1).0, get(Split::Train, 10, 2).0);
    assert_eq!(get(Split::Validation, 3, 1), get(Split::Validation, 3, 1));
    assert_ne!(get(Split::Validation, 3, 1).0, get(Split::Validation, 4, 1).0);
    // A freshly built dataset from the same seed gives the same batches (resume after restart).
    let ds2 = TokenDataset::embedded_with_len(0, 50_000);
    let (x2, _) = ds2.batch(Split::Train, 10, 8, 32, 1, &dev).unwrap();
    assert_eq!(rows(&x2), get(Split::Train, 10, 1).0);
}

#[test]
fn token_splits_are_disjoint() {
    // Ids equal to their position: a window's ids tell exactly where it came from.
    let tokens: Vec<u16> = (0..2000u16).collect();
    let ds = TokenDataset::from_tokens("positions", tokens, 2000).unwrap();
    assert_eq!((ds.train_len(), ds.val_len()), (1800, 200));
    let dev = Device::Cpu;
    for index in 0..20 {
        let (x, y) = ds.batch(Split::Train, index, 8, 16, 9, &dev).unwrap();
        let max = rows(&y).into_iter().flatten().max().unwrap();
        assert!(max < 1800, "train batch reached validation token {max}");
        let (x, y) = (rows(&x), rows(&y));
        let (vx, _) = ds.batch(Split::Validation, index, 8, 16, 9, &dev).unwrap();
        let min = rows(&vx).into_iter().flatten().min().unwrap();
        assert!(min >= 1800, "validation batch reached train token {min}");
        // Windows are contiguous runs of positions.
        for (xr, yr) in x.iter().zip(&y) {
            assert!(xr.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(yr[0], xr[0] + 1);
        }
    }
}

#[test]
fn token_eval_batches_are_fixed_and_cover_the_split() {
    let tokens: Vec<u16> = (0..1000u16).collect();
    let ds = TokenDataset::from_tokens("positions", tokens, 1000).unwrap();
    let dev = Device::Cpu;
    let collect = || -> Vec<Vec<Vec<u32>>> {
        ds.eval_batches(Split::Validation, 3, 2, 10, &dev).unwrap().map(|b| rows(&b.unwrap().0)).collect()
    };
    let a = collect();
    assert_eq!(a.len(), 3);
    assert_eq!(a, collect());
    // Six windows spread from the first start (900) to the last (1000 - 11 = 989).
    let starts: Vec<u32> = a.iter().flatten().map(|r| r[0]).collect();
    assert_eq!(starts.first(), Some(&900));
    assert_eq!(starts.last(), Some(&989));
    assert!(starts.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn fit_context_grows_a_short_validation_split() {
    let tokens: Vec<u16> = (0..100u16).collect();
    let mut ds = TokenDataset::from_tokens("small", tokens, 100).unwrap();
    assert_eq!(ds.val_len(), 10);
    assert!(ds.check_context(16).is_err());
    ds.fit_context(16).unwrap();
    assert_eq!(ds.val_len(), 17);
    assert_eq!(ds.split_tokens(Split::Validation).get(0), Some(83)); // still the tail
    ds.check_context(16).unwrap();
    // Impossible: 100 tokens cannot hold two windows of 61.
    assert!(matches!(ds.fit_context(60), Err(DataError::TooShort { .. })));
}

#[test]
fn token_errors_name_the_file_and_problem() {
    let missing = std::env::temp_dir().join("brigade-data-test-does-not-exist.txt");
    let e = TokenDataset::from_path(&missing).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("does-not-exist.txt"));

    let empty = TempFile::with_bytes("txt", b"");
    let e = TokenDataset::from_text_file(&empty.0).unwrap_err();
    assert!(matches!(e, DataError::Empty { .. }), "{e}");
    assert!(e.to_string().contains("empty"));
    let empty_bin = TempFile::with_bytes("bin", b"");
    assert!(matches!(TokenDataset::from_path(&empty_bin.0), Err(DataError::Empty { .. })));

    let odd = TempFile::with_bytes("bin", &[1, 0, 2]);
    let e = TokenDataset::from_bin_file(&odd.0).unwrap_err();
    assert!(matches!(e, DataError::OddLength { len: 3, .. }), "{e}");
    assert!(e.to_string().contains(&odd.0.display().to_string()));

    let short = TempFile::with_bytes("txt", b"0123456789abcdefghij"); // 18 train, 2 val
    let ds = TokenDataset::from_text_file(&short.0).unwrap();
    let e = ds.check_context(8).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::TooShort { len: 2, need: 9, .. }), "{msg}");
    assert!(msg.contains(&short.0.display().to_string()) && msg.contains("2 tokens"), "{msg}");
    assert!(ds.batch(Split::Train, 0, 1, 32, 0, &Device::Cpu).is_err());
    assert!(ds.batch(Split::Train, 0, 0, 4, 0, &Device::Cpu).is_err());
    ds.batch(Split::Train, 0, 2, 4, 0, &Device::Cpu).unwrap();

    let big = TempFile::with_bytes("bin", &bin_bytes(&[1, 2, 50256, 3]));
    let ds = TokenDataset::from_bin_file(&big.0).unwrap();
    let e = ds.check_vocab(50000).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::TokenBeyondVocab { max_id: 50256, vocab: 50000, .. }));
    assert!(msg.contains("50256") && msg.contains("50000"), "{msg}");
    ds.check_vocab(50257).unwrap();
    assert!(TokenDataset::from_tokens("mem", vec![1u16, 300], 256).is_err());
    assert!(TokenDataset::from_tokens("mem", Vec::<u16>::new(), 256).is_err());
}

// ---------------------------------------------------------------------------------------------
// Embedded text

#[test]
fn embedded_text_sample_is_english_like() {
    let start = std::time::Instant::now();
    let ds = TokenDataset::embedded(0);
    let elapsed = start.elapsed();
    assert!((EMBEDDED_TEXT_BYTES..EMBEDDED_TEXT_BYTES + 2000).contains(&ds.len()), "{} bytes", ds.len());
    // Generous bound: tests build at opt-level 1; release generation is far faster.
    assert!(elapsed.as_secs_f64() < 3.0, "generation took {elapsed:?}");
    assert_eq!(ds.vocab(), 256);
    let text: Vec<u8> = [ds.split_tokens(Split::Train).to_vec(), ds.split_tokens(Split::Validation).to_vec()]
        .concat()
        .into_iter()
        .map(|t| t as u8)
        .collect();
    assert!(text.iter().all(|b| b.is_ascii() && (b.is_ascii_graphic() || b" \n".contains(b))));
    let text = String::from_utf8(text).unwrap();
    println!("{}", &text[..600]);
    assert_eq!(text, String::from_utf8(corpus::generate(0, EMBEDDED_TEXT_BYTES)).unwrap());
    assert_ne!(&text[..1000], &String::from_utf8(corpus::generate(1, 1000)).unwrap()[..1000]);

    for needle in [" plus ", " minus ", " times ", " says ", "\"Where is the ", "The sky is blue."] {
        assert!(text.contains(needle), "corpus lacks {needle:?}");
    }
    // Every "a plus b is c." is correct arithmetic.
    let num = |w: &str| corpus::NUMBERS.iter().position(|n| n.eq_ignore_ascii_case(w));
    let mut checked = 0;
    for sentence in text.split(['.', '?', '\n']) {
        let words: Vec<&str> = sentence.split_whitespace().collect();
        if let [a, op, b, "is", c] = words.as_slice() {
            if let (Some(a), Some(b), Some(c)) = (num(a), num(b), num(c)) {
                match *op {
                    "plus" => assert_eq!(a + b, c, "{sentence}"),
                    "minus" => assert_eq!(a - b, c, "{sentence}"),
                    "times" => assert_eq!(a * b, c, "{sentence}"),
                    _ => continue,
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 1000, "only {checked} arithmetic facts");
}

/// Learnability proxy: a count-based model conditioning on the previous 3 bytes, fit on the
/// training split, already predicts validation bytes at well under 2 nats/byte (uniform bytes:
/// 5.55). A small GPT with a longer context does at least as well.
#[test]
fn embedded_text_is_predictable_from_short_context() {
    let ds = TokenDataset::embedded_with_len(0, 400_000);
    let train = ds.split_tokens(Split::Train).to_vec();
    let val = ds.split_tokens(Split::Validation).to_vec();
    let key = |w: &[u32]| w[0] << 16 | w[1] << 8 | w[2];
    let mut counts: HashMap<u32, [u32; 128]> = HashMap::new();
    for w in train.windows(4) {
        counts.entry(key(w)).or_insert([0; 128])[w[3] as usize] += 1;
    }
    let mut nll = 0.0f64;
    for w in val.windows(4) {
        // Add-0.01 smoothing over the 128 ASCII values.
        let c = counts.get(&key(w));
        let hits = c.map_or(0, |c| c[w[3] as usize]) as f64;
        let total = c.map_or(0, |c| c.iter().sum::<u32>()) as f64;
        nll -= ((hits + 0.01) / (total + 1.28)).ln();
    }
    let per_byte = nll / (val.len() - 3) as f64;
    assert!(per_byte < 1.6, "4-gram validation loss {per_byte:.3} nats/byte");
    println!("4-gram validation loss: {per_byte:.3} nats/byte");
}

// ---------------------------------------------------------------------------------------------
// Images from safetensors

struct ImageFile {
    file: TempFile,
}

/// Writes a safetensors file from (name, dtype, shape, bytes) and optional metadata.
fn write_safetensors(
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) -> ImageFile {
    let file = TempFile::new("safetensors");
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, meta, &file.0).unwrap();
    ImageFile { file }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn safetensors_u8_images_load_normalised_with_tail_validation() {
    // 20 images, 1×2×2, pixel value = image index (u8), label = index % 4.
    let n = 20;
    let px: Vec<u8> = (0..n).flat_map(|i| [i as u8 * 10; 4]).collect();
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 4).collect();
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![n, 1, 2, 2], px), ("labels", Dtype::I64, vec![n], i64_bytes(&labels))],
        None,
    );
    let ds = ImageDataset::from_safetensors(&f.file.0).unwrap();
    assert_eq!((ds.train_len(), ds.val_len()), (18, 2));
    assert_eq!(ds.image_shape(), (1, 2, 2));
    assert_eq!(ds.num_classes(), 4);
    assert_eq!(ds.labels(Split::Validation), &[2, 3]); // images 18 and 19
                                                       // Train pixels are zero-mean, unit-variance after normalisation.
    let train: Vec<f32> = (0..18).flat_map(|i| ds.image(Split::Train, i).unwrap().to_vec()).collect();
    let mean = train.iter().sum::<f32>() / train.len() as f32;
    let var = train.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / train.len() as f32;
    assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "mean {mean} var {var}");
    // Order within the split is kept: image i is brighter than image i - 1.
    assert!(ds.image(Split::Train, 5).unwrap()[0] > ds.image(Split::Train, 4).unwrap()[0]);
    // Validation uses the same transform: image 19 = (190/255 - m) / s.
    let (m, s) = ds.normalisation();
    let expected = (190.0 / 255.0 - m[0]) / s[0];
    assert!((ds.image(Split::Validation, 1).unwrap()[0] - expected).abs() < 1e-5);
    ds.check_model(1, 4).unwrap();
    ds.check_model(1, 10).unwrap();
}

#[test]
fn safetensors_explicit_validation_and_metadata() {
    let img = |n: usize, v: f32| f32_bytes(&vec![v; n * 3 * 4 * 4]);
    let names = r#"["a","b","c"]"#.to_string();
    let meta = HashMap::from([("class_names".to_string(), names)]);
    let f = write_safetensors(
        &[
            ("images", Dtype::F32, vec![6, 3, 4, 4], img(6, 0.5)),
            ("labels", Dtype::U8, vec![6], vec![0, 1, 0, 1, 0, 1]),
            ("val_images", Dtype::F32, vec![2, 3, 4, 4], img(2, 0.25)),
            ("val_labels", Dtype::I32, vec![2], [0i32, 1].iter().flat_map(|x| x.to_le_bytes()).collect()),
        ],
        Some(meta),
    );
    let ds = ImageDataset::from_safetensors(&f.file.0).unwrap();
    assert_eq!((ds.train_len(), ds.val_len()), (6, 2));
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.class_names(), &["a", "b", "c"]);
    // Constant channels keep std 1, so only the mean moves.
    assert!((ds.image(Split::Validation, 0).unwrap()[0] + 0.25).abs() < 1e-6);
    ds.check_model(3, 3).unwrap();
    ds.check_model(3, 2).unwrap(); // labels are only 0 and 1
    let e = ds.check_model(3, 1).unwrap_err();
    assert!(matches!(e, DataError::LabelBeyondClasses { max_label: 1, classes: 1, .. }), "{e}");
}

#[test]
fn safetensors_errors_are_specific() {
    let path_of = |f: &ImageFile| f.file.0.display().to_string();

    // Missing file.
    let missing = std::env::temp_dir().join("brigade-data-test-nope.safetensors");
    assert!(matches!(ImageDataset::from_safetensors(&missing), Err(DataError::Missing { .. })));

    // Not a safetensors file.
    let junk = TempFile::with_bytes("safetensors", b"definitely not safetensors");
    let e = ImageDataset::from_safetensors(&junk.0).unwrap_err();
    assert!(matches!(e, DataError::Format { .. }), "{e}");

    // Missing `labels`.
    let f = write_safetensors(&[("images", Dtype::U8, vec![4, 1, 2, 2], vec![0; 16])], None);
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(&e, DataError::MissingTensor { name, .. } if name == "labels"), "{e}");
    assert!(e.to_string().contains(&path_of(&f)) && e.to_string().contains("images"));

    // Wrong rank of images.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![4, 4], vec![0; 16]), ("labels", Dtype::U8, vec![4], vec![0; 4])],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::WrongRank { .. }), "{e}");
    assert!(e.to_string().contains("rank 4"));

    // Image / label count mismatch.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![4, 1, 2, 2], vec![0; 16]), ("labels", Dtype::U8, vec![3], vec![0; 3])],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::CountMismatch { n_images: 4, n_labels: 3, .. }), "{e}");
    assert!(e.to_string().contains("4 images") && e.to_string().contains("3 labels"));

    // Float labels.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![2, 1, 2, 2], vec![0; 8]), ("labels", Dtype::F32, vec![2], f32_bytes(&[0.0, 1.0]))],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::UnsupportedDtype { .. }), "{e}");

    // Negative label.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![2, 1, 2, 2], vec![0; 8]), ("labels", Dtype::I64, vec![2], i64_bytes(&[0, -1]))],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::BadLabel { index: 1, .. }), "{e}");

    // Label beyond the classes the metadata declares.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![3, 1, 2, 2], vec![0; 12]), ("labels", Dtype::U8, vec![3], vec![0, 1, 5])],
        Some(HashMap::from([("num_classes".to_string(), "3".to_string())])),
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::LabelBeyondClasses { max_label: 5, classes: 3, .. }), "{e}");

    // Absurd class counts, from the metadata or from a label, are refused before any
    // allocation sized by them.
    for (labels, meta) in [
        (i64_bytes(&[0, 1]), Some(HashMap::from([("num_classes".to_string(), "18446744073709551615".to_string())]))),
        (i64_bytes(&[0, 4_294_967_295]), None),
    ] {
        let f = write_safetensors(
            &[("images", Dtype::U8, vec![2, 1, 2, 2], vec![0; 8]), ("labels", Dtype::I64, vec![2], labels)],
            meta,
        );
        let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err().to_string();
        assert!(e.contains("classes") && e.contains("more than the 1048576 an image dataset may have"), "{e}");
    }

    // val_images without val_labels.
    let f = write_safetensors(
        &[
            ("images", Dtype::U8, vec![2, 1, 2, 2], vec![0; 8]),
            ("labels", Dtype::U8, vec![2], vec![0, 1]),
            ("val_images", Dtype::U8, vec![1, 1, 2, 2], vec![0; 4]),
        ],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(&e, DataError::MissingTensor { name, .. } if name.starts_with("val_labels")));

    // Validation images of another shape.
    let f = write_safetensors(
        &[
            ("images", Dtype::U8, vec![2, 1, 2, 2], vec![0; 8]),
            ("labels", Dtype::U8, vec![2], vec![0, 1]),
            ("val_images", Dtype::U8, vec![1, 3, 2, 2], vec![0; 12]),
            ("val_labels", Dtype::U8, vec![1], vec![0]),
        ],
        None,
    );
    let e = ImageDataset::from_safetensors(&f.file.0).unwrap_err();
    assert!(matches!(e, DataError::Format { .. }), "{e}");

    // A single image cannot be split.
    let f = write_safetensors(
        &[("images", Dtype::U8, vec![1, 1, 2, 2], vec![0; 4]), ("labels", Dtype::U8, vec![1], vec![0])],
        None,
    );
    assert!(matches!(ImageDataset::from_safetensors(&f.file.0), Err(DataError::TooFewImages { n: 1, .. })));
}

#[test]
fn check_model_rejects_channel_and_class_mismatch() {
    let ds = ImageDataset::embedded_shapes(20, 10, 16, 0).unwrap();
    ds.check_model(3, 10).unwrap();
    let e = ds.check_model(1, 10).unwrap_err();
    assert!(matches!(e, DataError::ChannelMismatch { data_channels: 3, model_channels: 1, .. }));
    assert!(e.to_string().contains("3 channels") && e.to_string().contains("expects 1"));
    let e = ds.check_model(3, 5).unwrap_err();
    assert!(matches!(e, DataError::LabelBeyondClasses { max_label: 9, classes: 5, .. }), "{e}");
    assert!(e.to_string().contains("label 9"));
}

// ---------------------------------------------------------------------------------------------
// Image batches

#[test]
fn image_batches_are_deterministic_and_shaped() {
    let ds = ImageDataset::embedded_shapes(200, 50, 16, 4).unwrap();
    let dev = Device::Cpu;
    let get = |split, index, seed| {
        let (x, y) = ds.batch(split, index, 8, seed, &dev).unwrap();
        assert_eq!(x.dims(), &[8, 3, 16, 16]);
        assert_eq!(y.dims(), &[8]);
        (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.to_vec1::<u32>().unwrap())
    };
    assert_eq!(get(Split::Train, 3, 1), get(Split::Train, 3, 1));
    assert_ne!(get(Split::Train, 3, 1), get(Split::Train, 4, 1));
    assert_ne!(get(Split::Train, 3, 1), get(Split::Train, 3, 2));
    assert_eq!(get(Split::Validation, 0, 1), get(Split::Validation, 0, 1));
    // Each batch row is one stored image with its own label.
    let (px, labels) = get(Split::Train, 7, 9);
    let per = 3 * 16 * 16;
    for (row, &label) in labels.iter().enumerate() {
        let img = &px[row * per..(row + 1) * per];
        let found = (0..ds.train_len()).find(|&i| ds.image(Split::Train, i).unwrap() == img);
        let i = found.expect("batch row is not a training image");
        assert_eq!(ds.labels(Split::Train)[i], label);
    }
    // Same seed gives the same images after regenerating (resume).
    let ds2 = ImageDataset::embedded_shapes(200, 50, 16, 4).unwrap();
    let (x2, _) = ds2.batch(Split::Train, 3, 8, 1, &dev).unwrap();
    assert_eq!(x2.flatten_all().unwrap().to_vec1::<f32>().unwrap(), get(Split::Train, 3, 1).0);
    assert!(ds.batch(Split::Train, 0, 0, 1, &dev).is_err());
}

#[test]
fn image_eval_batches_walk_the_split_in_order() {
    let ds = ImageDataset::embedded_shapes(30, 23, 8, 0).unwrap();
    let dev = Device::Cpu;
    let batches: Vec<(Tensor, Tensor)> =
        ds.eval_batches(Split::Validation, 5, &dev).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 4); // 23 / 5: the last 3 images are dropped
    assert_eq!(ds.eval_batch_count(Split::Validation, 5), 4);
    let labels: Vec<u32> = batches.iter().flat_map(|(_, y)| y.to_vec1::<u32>().unwrap()).collect();
    assert_eq!(labels, &ds.labels(Split::Validation)[..20]);
    let first = batches[0].0.get(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(first, ds.image(Split::Validation, 1).unwrap());
    assert!(ds.eval_batches(Split::Validation, 24, &dev).is_err());
    assert!(ds.eval_batches(Split::Validation, 0, &dev).is_err());
}

// ---------------------------------------------------------------------------------------------
// Embedded shapes

#[test]
fn embedded_shapes_are_balanced_normalised_and_split_disjoint() {
    let start = std::time::Instant::now();
    let ds = ImageDataset::embedded(0);
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs_f64() < 5.0, "generation took {elapsed:?}");
    assert_eq!((ds.train_len(), ds.val_len()), (EMBEDDED_SHAPES_TRAIN, EMBEDDED_SHAPES_VAL));
    assert_eq!(ds.image_shape(), (3, 32, 32));
    assert_eq!(ds.class_names().len(), 10);
    assert_eq!(ds.class_names()[7], "ring");
    assert_eq!(ds.class_counts(Split::Train), vec![500; 10]);
    assert_eq!(ds.class_counts(Split::Validation), vec![100; 10]);
    // Per-channel zero mean / unit variance on train; validation (other random colours, same
    // transform) within sampling noise of it.
    for (split, tol) in [(Split::Train, 0.01), (Split::Validation, 0.15)] {
        for ch in 0..3 {
            let vals: Vec<f32> = (0..ds.len(split))
                .flat_map(|i| ds.image(split, i).unwrap()[ch * 1024..(ch + 1) * 1024].to_vec())
                .collect();
            let mean = vals.iter().sum::<f32>() / vals.len() as f32;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
            assert!(mean.abs() < tol && (var - 1.0).abs() < 0.1, "{split} ch{ch}: {mean} {var}");
        }
    }
    // No validation image is a copy of a training image.
    let key = |img: &[f32]| img.iter().take(64).map(|v| v.to_bits()).collect::<Vec<u32>>();
    let train: std::collections::HashSet<_> =
        (0..ds.train_len()).map(|i| key(ds.image(Split::Train, i).unwrap())).collect();
    assert!((0..ds.val_len()).all(|i| !train.contains(&key(ds.image(Split::Validation, i).unwrap()))));
    // Another seed draws other images.
    let other = ImageDataset::embedded_shapes(10, 10, 32, 1).unwrap();
    assert_ne!(other.image(Split::Train, 0), ds.image(Split::Train, 0));
    assert!(ImageDataset::embedded_shapes(10, 10, 4, 0).is_err());
    assert!(ImageDataset::embedded_shapes(0, 10, 32, 0).is_err());
}

/// Shape features that ignore colour: the pixels far (in RGB) from the border's mean colour
/// form the shape's mask; we measure its geometry.
fn shape_features(img: &[f32], size: usize) -> [f32; 6] {
    let plane = size * size;
    let at = |ch: usize, x: usize, y: usize| img[ch * plane + y * size + x];
    let mut bg = [0f32; 3];
    let mut nb = 0.0;
    for i in 0..size {
        for (x, y) in [(i, 0), (i, size - 1), (0, i), (size - 1, i)] {
            for (ch, b) in bg.iter_mut().enumerate() {
                *b += at(ch, x, y);
            }
            nb += 1.0;
        }
    }
    bg.iter_mut().for_each(|b| *b /= nb);
    let dist: Vec<f32> =
        (0..plane).map(|p| (0..3).map(|ch| (img[ch * plane + p] - bg[ch]).powi(2)).sum::<f32>().sqrt()).collect();
    let max = dist.iter().cloned().fold(0.0, f32::max);
    let mask: Vec<bool> = dist.iter().map(|&d| d > 0.5 * max).collect();
    let on = |x: usize, y: usize| mask[y * size + x];
    let (mut x0, mut x1, mut y0, mut y1, mut area) = (size, 0, size, 0, 0.0f32);
    for y in 0..size {
        for x in 0..size {
            if on(x, y) {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
                area += 1.0;
            }
        }
    }
    if area == 0.0 {
        return [0.0; 6];
    }
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let (cx, cy) = ((x0 + x1) / 2, (y0 + y1) / 2);
    let mut top = 0.0;
    let mut middle_band = 0.0;
    for y in y0..=y1 {
        for x in x0..=x1 {
            if on(x, y) {
                if (y as f32) < y0 as f32 + bh / 2.0 {
                    top += 1.0;
                }
                let in_mid_x = (x as f32 - cx as f32).abs() < bw / 6.0;
                let in_mid_y = (y as f32 - cy as f32).abs() < bh / 6.0;
                if in_mid_x || in_mid_y {
                    middle_band += 1.0;
                }
            }
        }
    }
    // Connected components (4-neighbour), capped: separates the dot grid from everything.
    let mut seen = vec![false; plane];
    let mut components = 0.0f32;
    for start in 0..plane {
        if mask[start] && !seen[start] {
            components += 1.0;
            let mut stack = vec![start];
            seen[start] = true;
            while let Some(p) = stack.pop() {
                let (x, y) = (p % size, p / size);
                let mut push = |q: usize| {
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                };
                if x > 0 {
                    push(p - 1)
                }
                if x + 1 < size {
                    push(p + 1)
                }
                if y > 0 {
                    push(p - size)
                }
                if y + 1 < size {
                    push(p + size)
                }
            }
        }
    }
    [
        area / (bw * bh),
        (bw / bh).ln(),
        if on(cx, cy) { 1.0 } else { 0.0 },
        top / area,
        middle_band / area,
        components.min(12.0) / 12.0,
    ]
}

/// Different classes differ in their mean shape statistics, enough that a nearest-centroid
/// classifier on six colour-blind features (fit on train, scored on validation) is far above
/// the 10% chance level; a CNN learns richer features than these.
#[test]
fn embedded_shape_classes_differ_and_are_separable() {
    let size = 32;
    let ds = ImageDataset::embedded_shapes(1000, 500, size, 11).unwrap();
    let feats = |split| -> Vec<[f32; 6]> {
        (0..ds.len(split)).map(|i| shape_features(ds.image(split, i).unwrap(), size)).collect()
    };
    let (train_f, val_f) = (feats(Split::Train), feats(Split::Validation));
    let mut centroid = [[0f32; 6]; 10];
    let mut spread = [0f32; 6];
    for (f, &l) in train_f.iter().zip(ds.labels(Split::Train)) {
        for k in 0..6 {
            centroid[l as usize][k] += f[k] / 100.0;
        }
    }
    for (f, &l) in train_f.iter().zip(ds.labels(Split::Train)) {
        for k in 0..6 {
            spread[k] += (f[k] - centroid[l as usize][k]).powi(2) / 1000.0;
        }
    }
    let spread: Vec<f32> = spread.iter().map(|v| v.sqrt().max(1e-3)).collect();
    // Every pair of classes differs in some mean statistic by a large margin.
    for a in 0..10 {
        for b in a + 1..10 {
            let gap = (0..6).map(|k| (centroid[a][k] - centroid[b][k]).abs() / spread[k]).fold(0.0, f32::max);
            assert!(gap > 0.5, "classes {a} and {b} have near-identical statistics ({gap})");
        }
    }
    let mut correct = 0;
    for (f, &l) in val_f.iter().zip(ds.labels(Split::Validation)) {
        let dist = |c: &[f32; 6]| (0..6).map(|k| ((f[k] - c[k]) / spread[k]).powi(2)).sum::<f32>();
        let pred = (0..10).min_by(|&a, &b| dist(&centroid[a]).total_cmp(&dist(&centroid[b]))).unwrap();
        correct += usize::from(pred as u32 == l);
    }
    let acc = correct as f32 / val_f.len() as f32;
    println!("nearest-centroid accuracy on shape features: {acc:.3}");
    assert!(acc > 0.4, "nearest-centroid accuracy {acc}");
}
