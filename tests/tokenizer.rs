//! Tokenizers: a byte-level BPE tokenizer trained on text round-trips every string, compresses,
//! encodes a large text in parallel chunks to exactly the ids of one encode, and carries
//! through the commands: `tokenizer train`, `tokenize` (.bin), `train --tokenizer` on 2
//! stages, `generate` (prompt encoded, output decoded) and `export` (AutoTokenizer files).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use brigade::models::data::{Split, TokenDataset};
use brigade::tokenizer::TextTokenizer;

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn ok(args: &[&str]) -> String {
    let out = brigade(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-tokenizer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// About `bytes` of the embedded English-like corpus, as a text file.
fn corpus_file(dir: &Path, bytes: usize) -> PathBuf {
    let data = TokenDataset::embedded_with_len(1, bytes);
    let text: Vec<u8> =
        [Split::Train, Split::Validation].iter().flat_map(|s| data.split_tokens(*s).iter().map(|t| t as u8)).collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn trained_bpe_round_trips_compresses_and_chunks_exactly() {
    let dir = temp_dir("lib");
    let text_file = corpus_file(&dir, 200_000);
    let tok = TextTokenizer::train_bpe(std::slice::from_ref(&text_file), 500, 2).unwrap();
    assert_eq!(tok.vocab_size(), 500);
    assert!(tok.end_of_text().is_some());
    let text = std::fs::read_to_string(&text_file).unwrap();
    let ids = tok.encode(&text).unwrap();
    assert!(ids.iter().all(|&i| (i as usize) < 500));
    let ratio = text.len() as f64 / ids.len() as f64;
    assert!(ratio > 2.0, "BPE merges should compress English-like text: {ratio:.2} bytes per token");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Bytes never seen in training still encode (byte-level: nothing is unknown).
    let odd = "naïve café — 東京 🙂\ttabs\r\n";
    assert_eq!(tok.decode(&tok.encode(odd).unwrap()).unwrap(), odd);
    // Chunked, parallel encoding gives exactly the ids of one encode, at any chunk size.
    for chunk in [64, 1000, 10_000] {
        let mut seen = 0;
        assert_eq!(tok.encode_in_chunks(&text, chunk, |n| seen += n).unwrap(), ids, "chunks of {chunk}");
        assert_eq!(seen, text.len());
    }
    // Saved and loaded: the same ids; the transformers files name the fast tokenizer.
    let saved = tok.save(&dir.join("tok.json")).unwrap();
    assert_eq!(
        TextTokenizer::load(&saved).unwrap().encode(&text[..5000]).unwrap(),
        ids[..tok.encode(&text[..5000]).unwrap().len()]
    );
    let files = tok.save_for_transformers(&dir.join("hf"), 128).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["eos_token"], "<|endoftext|>");
    assert_eq!(config["model_max_length"], 128);
    assert_eq!(TextTokenizer::find_near(&dir.join("hf")), Some(dir.join("hf").join("tokenizer.json")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_to_tokens_to_a_trained_model_to_text() {
    let dir = temp_dir("cli");
    let text_file = corpus_file(&dir, 300_000);
    let t = |p: &Path| p.to_str().unwrap().to_string();
    let tok = dir.join("tok.json");
    let out = ok(&["tokenizer", "train", "--vocab-size", "400", &t(&text_file), "--out", &t(&tok)]);
    assert!(out.contains("trained a byte-level BPE tokenizer of 400 tokens"), "{out}");

    // tokenize: uint16 little-endian ids, exactly the tokenizer's.
    let bin = dir.join("corpus.bin");
    let out = ok(&["tokenize", "--tokenizer", &t(&tok), &t(&text_file), "--out", &t(&bin)]);
    assert!(out.contains("(uint16)") && out.contains("MB/s"), "{out}");
    let bytes = std::fs::read(&bin).unwrap();
    let ids: Vec<u32> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    let want = TextTokenizer::load(&tok).unwrap().encode(&std::fs::read_to_string(&text_file).unwrap()).unwrap();
    assert_eq!(ids, want);

    // train on the text through the tokenizer, 2 stages; the model's vocabulary is the tokenizer's.
    let run = dir.join("run");
    let out = ok(&[
        "train",
        "--data",
        &t(&text_file),
        "--tokenizer",
        &t(&tok),
        "--stages",
        "2",
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--context",
        "32",
        "--eval-every",
        "30",
        "--eval-batches",
        "2",
        "--plain",
        "--save-dir",
        &t(&run),
    ]);
    assert!(out.contains("vocab=400"), "{out}");
    let first: f64 = out.lines().find(|l| l.starts_with("step     1:")).unwrap().split("loss ").nth(1).unwrap()[..6]
        .parse()
        .unwrap();
    let last: f64 = out.lines().find(|l| l.contains("held-out loss")).unwrap().split("held-out loss ").nth(1).unwrap()
        [..6]
        .parse()
        .unwrap();
    assert!(first > 5.5 && last < first - 1.0, "the loss falls: {first} -> {last}");
    assert!(run.join("tokenizer.json").is_file(), "the tokenizer goes with the run");

    // generate: the prompt is encoded and the output decoded with the run's tokenizer.
    let text = ok(&["generate", "--checkpoint", &t(&run), "--prompt", "The cat", "--tokens", "20"]);
    assert!(text.starts_with("The cat") && text.len() > "The cat".len() + 10, "{text:?}");
    let with_cache =
        ok(&["generate", "--checkpoint", &t(&run), "--prompt", "The cat", "--tokens", "20", "--stages", "1"]);
    let without = ok(&["generate", "--checkpoint", &t(&run), "--prompt", "The cat", "--tokens", "20", "--no-cache"]);
    assert_eq!(with_cache, without);
    assert_eq!(text, without);

    // export: the tokenizer files beside the weights.
    let hf = dir.join("hf");
    let out = ok(&["export", "--checkpoint", &t(&run), "--out", &t(&hf)]);
    assert!(out.contains("AutoTokenizer.from_pretrained"), "{out}");
    assert_eq!(std::fs::read(hf.join("tokenizer.json")).unwrap(), std::fs::read(run.join("tokenizer.json")).unwrap());
    assert!(hf.join("tokenizer_config.json").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Token ids of any width, end to end: a tokenizer whose largest id is 70000 but which has only
/// 4 entries writes uint32 (the width recorded in the sidecar), `train` reads it as uint32, and
/// the same file without its sidecar is refused rather than read as uint16.
#[test]
fn wide_token_ids_survive_tokenize_and_train() {
    let dir = temp_dir("wide");
    let t = |p: &Path| p.to_str().unwrap().to_string();
    let tok = dir.join("sparse.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0,"c":1,"[UNK]":2,"b":70000},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let text_file = dir.join("text.txt");
    std::fs::write(&text_file, "a b c a b c c a ".repeat(100)).unwrap();
    let bin = dir.join("wide.bin");
    let out = ok(&["tokenize", "--tokenizer", &t(&tok), &t(&text_file), "--out", &t(&bin)]);
    assert!(out.contains("(uint32)"), "{out}");
    let bytes = std::fs::read(&bin).unwrap();
    let ids: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(ids.len(), 800);
    assert_eq!(&ids[..6], &[0, 70000, 1, 0, 70000, 1]);
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("wide.bin.json")).unwrap()).unwrap();
    assert_eq!(sidecar["dtype"], "uint32");
    assert_eq!(sidecar["tokens"], 800);
    assert_eq!(sidecar["vocab_size"], 70001);
    let data = TokenDataset::from_path(&bin).unwrap();
    assert_eq!((data.max_id(), data.len(), data.vocab()), (70000, 800, 70001));

    let bin_path = t(&bin);
    let train = || {
        brigade(&[
            "train",
            "--data",
            &bin_path,
            "--stages",
            "1",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--microbatches",
            "1",
            "--context",
            "8",
            "--eval-batches",
            "1",
            "--plain",
            "--vocab",
            "70001",
        ])
    };
    let out = train();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("vocab=70001") && stdout.contains("uint32 tokens"), "{stdout}");

    // Without the sidecar the width is unknown: refused, not read as uint16.
    std::fs::remove_file(dir.join("wide.bin.json")).unwrap();
    let out = train();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("as in a uint32 token file"), "{stderr}");
    // A sidecar that disagrees with the file is refused too.
    std::fs::write(dir.join("wide.bin.json"), r#"{"dtype":"uint32","tokens":5,"vocab_size":70001}"#).unwrap();
    let stderr = String::from_utf8_lossy(&train().stderr).into_owned();
    assert!(stderr.contains("records 5"), "{stderr}");

    // A tokenizer that encodes the text to nothing writes nothing.
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "   \n\n  ").unwrap();
    let out = brigade(&["tokenize", "--tokenizer", &t(&tok), &t(&blank), "--out", &t(&dir.join("none.bin"))]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("to no tokens at all"), "{stderr}");
    assert!(!dir.join("none.bin").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
