//! brigade as a hostile or careless user meets it: every bad input ends with one `error:` line
//! naming the problem and the documented exit code (1 for errors, 2 for command-line syntax),
//! never a panic or a hang, and never costs a checkpoint: the checkpoints present before each
//! bad command are byte-identical after it. Then the ways a run could lose or silently replace a
//! checkpoint (another run's save directory, two processes on one directory, bit rot, a
//! diverged step), each shown refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use brigade::engine::checkpoint::{seal, Checkpoint, CheckpointError, FileSum};
use candle_core::{DType, Device, Tensor};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-harden-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny, fast run: gpt-tiny at context 32, batch 4 in 2 micro-batches.
const SMALL: &[&str] = &[
    "--batch-size",
    "4",
    "--microbatches",
    "2",
    "--context",
    "32",
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--plain",
];

/// Trains `steps` steps of the small run into `save` (extra flags appended).
fn train_into(save: &Path, steps: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--stages", "2", "--steps", steps, "--save-dir", save.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(extra);
    brigade(&args)
}

/// Every checkpoint file under `dir` (step directories and `latest`; the lock file holds
/// whichever process last took it) with its size and hash (compact to print when it differs).
fn checkpoint_bytes(dir: &Path) -> BTreeMap<PathBuf, FileSum> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name() != ".lock" {
                out.insert(p.clone(), FileSum::of(&std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// Asserts a clean failure: the exit code, exactly one `error:` line, first, naming `needle`.
fn assert_clean_failure(args: &[&str], code: i32, needle: &str) {
    let out = brigade(args);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: expected exit code {code}; stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{args:?} panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: expected one error line: {stderr}");
    assert!(stderr.starts_with("error:"), "{args:?}: the error line should come first: {stderr}");
    assert!(errors[0].contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
}

/// The table: at least 60 bad inputs across every command, each refused cleanly, and the
/// checkpoints in the save directory byte-identical afterwards.
#[test]
fn bad_inputs_fail_cleanly_and_touch_no_checkpoint() {
    let root = temp_dir("table");
    let save = root.join("run");
    let out = train_into(&save, "2", &[]);
    assert!(out.status.success(), "{:?}", text(&out));
    let s = save.to_str().unwrap().to_string();
    let step = save.join("step-00000002");
    let st = step.to_str().unwrap().to_string();
    let inside = |name: &str| step.join(name).to_str().unwrap().to_string();
    let before = checkpoint_bytes(&save);

    let file = |name: &str, bytes: &[u8]| -> String {
        let p = root.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let empty_dir = root.join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let empty_dir = empty_dir.to_str().unwrap().to_string();
    let empty = file("empty.txt", b"");
    let not_st = file("not.safetensors", b"hello");
    let bad_schedule = file("bad.schedule", b"stage 0: 0F0 0X1\n");
    let two_stage = file("two.schedule", b"stage 0: 0F0 0B0\nstage 1: 1F0 1B0\n");
    let deadlock = file("deadlock.schedule", b"stage 0: 0F0 0B0 0F1 0B1\nstage 1: 1F1 1F0 1B0 1B1\n");
    let save_as_file = file("a-file", b"x");
    let latin1 = file("latin1.txt", b"caf\xe9 au lait\n");
    let tok300 = root.join("tok300.json");
    brigade::tokenizer::TextTokenizer::train_bpe(&[concat!(env!("CARGO_MANIFEST_DIR"), "/README.md").into()], 300, 2)
        .unwrap()
        .save(&tok300)
        .unwrap();
    let tok300 = tok300.to_str().unwrap().to_string();
    let cifar_cut = file("cifar.bin", &[0u8; 3000]);
    let bad_images = root.join("bad-images");
    std::fs::create_dir_all(bad_images.join("cat")).unwrap();
    for f in ["x.png", "y.jpg"] {
        std::fs::write(bad_images.join("cat").join(f), b"\x89PNG truncated").unwrap();
    }
    let bad_images = bad_images.to_str().unwrap().to_string();
    let no_steps = file("no-steps.jsonl", b"{\"event\":\"run\",\"label\":\"x\"}\n");
    let bad_step = file("bad-step.jsonl", b"{\"event\":\"run\"}\n{\"event\":\"step\",\"step\":1}\n");
    let ids = |name: &str, t: Tensor| -> String {
        let p = root.join(name);
        t.save_safetensors("input_ids", &p).unwrap();
        p.to_str().unwrap().to_string()
    };
    let negative = ids("negative.safetensors", Tensor::new(&[[1i64, -1, 2]], &Device::Cpu).unwrap());
    let fractional = ids("fraction.safetensors", Tensor::new(&[[1.5f32, 2.0]], &Device::Cpu).unwrap());
    let good_input = ids("good.safetensors", Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap());
    let fixture_gpt = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-tiny");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let out_dir = root.join("out").to_str().unwrap().to_string();
    let logits = root.join("logits.safetensors").to_str().unwrap().to_string();
    let (in_hf, in_logits, in_profile, in_bench) =
        (inside("hf"), inside("logits.safetensors"), inside("profile.json"), inside("bench"));
    let a_dir = root.to_str().unwrap().to_string();
    let (in_log, in_plot) = (inside("metrics.jsonl"), inside("plot"));

    // (arguments, exit code, what the error line must name)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // train: model, layout and batch
        (vec!["train", "--model", "gpt-huge"], 1, "unknown model preset `gpt-huge`"),
        (vec!["train", "--stages", "0"], 1, "at least one stage"),
        (vec!["train", "--stages", "5"], 1, "cannot split 4 layers into 5 stages"),
        (vec!["train", "--microbatches", "0"], 1, "--microbatches must be at least 1"),
        (vec!["train", "--batch-size", "0"], 1, "batch size must be at least 1"),
        (
            vec!["train", "--batch-size", "10", "--microbatches", "4"],
            1,
            "batch size 10 is not divisible by 4 micro-batches",
        ),
        (vec!["train", "--split", "3,0"], 1, "stage 1 of split 3,0 is empty"),
        (vec!["train", "--split", "a,b"], 1, "cannot parse split \"a,b\""),
        (vec!["train", "--split", "1,1"], 1, "split 1,1 covers 2 layers but the model has 4"),
        (vec!["train", "--partition", "foo"], 1, "unknown --partition \"foo\": expected uniform"),
        (vec!["train", "--schedule", "zigzag"], 1, "unknown schedule \"zigzag\""),
        (vec!["train", "--schedule", &bad_schedule], 1, "0X1"),
        (
            vec!["train", "--schedule", &two_stage, "--microbatches", "4"],
            1,
            "--microbatches 4 disagrees with the schedule file",
        ),
        (vec!["train", "--schedule", &two_stage, "--stages", "3"], 1, "--stages 3 disagrees with the schedule file"),
        // train: optimisation settings that would train silently wrong
        (vec!["train", "--lr=-1"], 1, "--lr must be a finite, non-negative learning rate, got -1"),
        (vec!["train", "--lr", "nan"], 1, "--lr must be a finite"),
        (vec!["train", "--lr", "inf"], 1, "--lr must be a finite"),
        (vec!["train", "--min-lr", "1"], 1, "--min-lr 1 is above --lr 0.003"),
        (vec!["train", "--min-lr=-0.1"], 1, "--min-lr must be a finite, non-negative"),
        (vec!["train", "--weight-decay=-1"], 1, "--weight-decay must be a finite, non-negative"),
        (vec!["train", "--grad-clip", "nan"], 1, "--grad-clip must be a finite"),
        (vec!["train", "--threads-per-stage", "0"], 1, "--threads-per-stage must be at least 1"),
        (vec!["train", "--steps", "0"], 1, "nothing to train"),
        (vec!["train", "--eval-batches", "100000000"], 1, "--eval-batches 100000000 asks for"),
        // train: sizes that cannot fit are refused with an estimate, not an allocator abort
        (vec!["train", "--width", "100000"], 1, "needs at least"),
        (vec!["train", "--width", "1000000"], 1, "parameters, more than brigade supports"),
        (vec!["train", "--layers", "100000"], 1, "needs at least"),
        (vec!["train", "--batch-size", "1000000000", "--microbatches", "1"], 1, "needs at least"),
        (vec!["train", "--context", "10000000"], 1, "needs at least"),
        (vec!["train", "--vocab", "10000000", "--width", "4096"], 1, "needs at least"),
        (vec!["train", "--vocab", "100000000"], 1, "vocab_size = 100000000 is larger than brigade supports"),
        (vec!["train", "--model", "resnet-tiny", "--image-size", "100000"], 1, "needs at least"),
        (vec!["train", "--model", "resnet-tiny", "--image-size", "4"], 1, "at least 8x8"),
        (vec!["train", "--heads", "3"], 1, "n_embd (64) must be divisible by n_head (3)"),
        // train: data
        (vec!["train", "--data", "/nonexistent/brigade/data.txt"], 1, "/nonexistent/brigade/data.txt does not exist"),
        (vec!["train", "--data", &empty], 1, "is empty"),
        (vec!["train", "--model", "resnet-tiny", "--data", &not_st], 1, "not.safetensors"),
        // train: imports
        (
            vec!["train", "--init-from", "/nonexistent/brigade/hf"],
            1,
            "--init-from /nonexistent/brigade/hf does not exist",
        ),
        (vec!["train", "--init-from", fixture_gpt, "--model", "gpt2"], 1, "but the model flags ask for gpt2"),
        (vec!["train", "--init-from", fixture_gpt, "--layers", "3"], 1, "holds a GPT with 2 layers"),
        // train: checkpoints
        (vec!["train", "--save-dir", &s], 1, "already holds 1 checkpoint(s) of another run"),
        (vec!["train", "--save-dir", &st], 1, "is inside the checkpoint"),
        (vec!["train", "--save-dir", &save_as_file], 1, "is a file, not a directory"),
        (vec!["train", "--save-dir", &out_dir, "--keep-last", "0"], 1, "--keep-last 0 would keep no checkpoint"),
        (vec!["train", "--save-dir", "/proc/brigade-cannot-write-here"], 1, "cannot be written"),
        (vec!["train", "--resume", &s, "--save-dir", &st], 1, "is inside the checkpoint"),
        (vec!["train", "--resume", &s, "--model", "resnet-tiny"], 1, "checkpoint, but this run asks for resnet-tiny"),
        (
            vec!["train", "--resume", &s, "--steps", "1"],
            1,
            "nothing to train: --steps 1 is not beyond the checkpoint's step 2",
        ),
        (
            vec!["train", "--resume", &s, "--microbatches", "3", "--steps", "3"],
            1,
            "batch size 4 is not divisible by 3 micro-batches",
        ),
        (vec!["train", "--resume", &s, "--data", readme, "--steps", "3"], 1, "but this run's data is"),
        // a training setting the resumed run would ignore: refused, naming the checkpoint's value
        (vec!["train", "--resume", &s, "--batch-size", "8"], 1, "--batch-size 8 conflicts with the checkpoint"),
        (vec!["train", "--resume", &s, "--seed", "7"], 1, "--seed 7 conflicts with the checkpoint"),
        (vec!["train", "--resume", &s, "--optimizer", "sgd"], 1, "(--optimizer adamw)"),
        (vec!["train", "--resume", &s, "--lr", "0.1"], 1, "--lr 0.1 conflicts with the checkpoint"),
        (vec!["train", "--resume", &s, "--grad-clip", "0"], 1, "(--grad-clip 1)"),
        (vec!["train", "--resume", &s, "--weight-decay", "0"], 1, "(--weight-decay 0.1)"),
        (vec!["train", "--resume", &s, "--warmup", "50"], 1, "--warmup 50 conflicts with the checkpoint"),
        (vec!["train", "--resume", "/nonexistent/brigade/ckpt"], 1, "/nonexistent/brigade/ckpt"),
        (vec!["train", "--resume", &empty_dir], 1, "no checkpoint here"),
        // train: command-line syntax (exit code 2)
        (vec!["train", "--resume", &s, "--init-from", fixture_gpt], 2, "cannot be used with"),
        (vec!["train", "--keep-last", "1"], 2, "--save-dir"),
        (vec!["train", "--overwrite"], 2, "--save-dir"),
        (vec!["train", "--max-shard-size", "12 parsecs"], 2, "invalid size unit \"PARSECS\""),
        (vec!["train", "--max-shard-size", "0"], 2, "must be at least one byte"),
        (vec!["train", "--optimizer", "adam"], 2, "invalid value 'adam'"),
        (vec!["train", "--stages", "two"], 2, "invalid value 'two'"),
        (vec!["train", "--bogus"], 2, "unexpected argument '--bogus'"),
        // absurd sizes (typos of a few digits, hostile configs): refused before anything is sized by them
        (
            vec!["train", "--stages", "2", "--split", "18446744073709551615,5"],
            1,
            "covers 18446744073709551615 layers but the model has 4",
        ),
        (vec!["train", "--stages", "1000000000"], 1, "--stages 1000000000 is more than brigade runs (4096)"),
        (vec!["train", "--schedule", "interleaved-1f1b:1000000000"], 1, "cuts the model into 2000000000 chunks"),
        (
            vec!["train", "--stages", "1", "--threads-per-stage", "10000000"],
            1,
            "10000000 threads per stage over 1 stage(s) is more than brigade starts on",
        ),
        (
            vec!["train", "--layers", "1152921504606846976"],
            1,
            "n_layer = 1152921504606846976 is larger than brigade supports",
        ),
        (
            vec!["train", "--model", "resnet-tiny", "--data", &bad_images, "--image-size", "100000"],
            1,
            "image size 100000 is outside 1..=4096",
        ),
        (vec!["launch"], 2, "unrecognized subcommand 'launch'"),
        // schedule
        (vec!["schedule", "--stages", "0"], 1, "at least one stage"),
        (vec!["schedule", "--microbatches", "0"], 1, "--microbatches must be at least 1"),
        (vec!["schedule", "--microbatches", "1000000000"], 1, "more than the 1000000"),
        (vec!["schedule", "--schedule", "/nonexistent/x.schedule"], 1, "unknown schedule"),
        (vec!["schedule", "--schedule", &deadlock], 1, "deadlock: stage 0 is blocked at 0B0"),
        (vec!["schedule", "--schedule", &two_stage, "--stages", "3"], 1, "--stages 3 disagrees with the schedule file"),
        (vec!["schedule", "--format", "pdf"], 2, "invalid value 'pdf'"),
        // inspect
        (vec!["inspect", "/nonexistent/brigade/ckpt"], 1, "/nonexistent/brigade/ckpt"),
        (vec!["inspect", &empty_dir], 1, "no checkpoint here"),
        (vec!["inspect", &s, "--stages", "9"], 1, "cannot split 4 layers into 9 stages"),
        (vec!["inspect", &s, "--split", "1,1"], 1, "covers 2 layers"),
        // export
        (vec!["export", "--checkpoint", &s, "--out", &s], 1, "is a checkpoint or save directory"),
        (vec!["export", "--checkpoint", &s, "--out", &in_hf], 1, "is inside the checkpoint"),
        (vec!["export", "--checkpoint", &s, "--out", &out_dir, "--dtype", "f8"], 1, "unknown dtype \"f8\""),
        (
            vec!["export", "--checkpoint", "/nonexistent/brigade/ckpt", "--out", &out_dir],
            1,
            "/nonexistent/brigade/ckpt",
        ),
        // predict
        (
            vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &in_logits],
            1,
            "--output is inside the checkpoint",
        ),
        (vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &a_dir], 1, "is a directory"),
        (
            vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &good_input],
            1,
            "is the --input file",
        ),
        (
            vec!["predict", "--checkpoint", &s, "--input", "/nonexistent/in.safetensors", "--output", &logits],
            1,
            "does not exist",
        ),
        (vec!["predict", "--checkpoint", &s, "--input", &not_st, "--output", &logits], 1, "cannot read"),
        (
            vec!["predict", "--checkpoint", &s, "--input", &negative, "--output", &logits],
            1,
            "token ids must be non-negative, found -1",
        ),
        (
            vec!["predict", "--checkpoint", &s, "--input", &fractional, "--output", &logits],
            1,
            "non-negative integers, found 1.5",
        ),
        (
            vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &logits, "--stages", "0"],
            1,
            "--stages must be at least 1",
        ),
        (
            vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &logits, "--stages", "9"],
            1,
            "at most 4 stages",
        ),
        (
            vec!["predict", "--checkpoint", &s, "--input", &good_input, "--output", &logits, "--microbatches", "0"],
            1,
            "--microbatches must be at least 1",
        ),
        (
            vec!["predict", "--checkpoint", "/nonexistent/brigade/ckpt", "--input", &good_input, "--output", &logits],
            1,
            "does not exist",
        ),
        // generate
        (vec!["generate", "--checkpoint", &s, "--prompt", "a", "--prompt-ids", "1"], 2, "cannot be used with"),
        (vec!["generate", "--checkpoint", &s, "--prompt-ids", "-1"], 1, "token id -1 in --prompt-ids is negative"),
        (vec!["generate", "--checkpoint", &s, "--prompt-ids", "1,999"], 1, "beyond the vocabulary of 256"),
        (vec!["generate", "--checkpoint", &s, "--prompt-ids", "1,x"], 1, "invalid token id \"x\""),
        (vec!["generate", "--checkpoint", &s, "--tokens", "1000000000"], 1, "more than the 100000"),
        (vec!["generate", "--checkpoint", &s, "--temperature=-1"], 1, "temperature must be a non-negative number"),
        (vec!["generate", "--checkpoint", &s, "--temperature", "nan"], 1, "temperature must be a non-negative number"),
        (vec!["generate", "--checkpoint", "/nonexistent/brigade/ckpt"], 1, "does not exist"),
        (vec!["generate", "--checkpoint", &s, "--stages", "0"], 1, "--stages must be at least 1"),
        (vec!["generate", "--checkpoint", &s, "--temperature", "1", "--top-k", "0"], 1, "top-k must be at least 1"),
        (vec!["generate", "--checkpoint", &s, "--temperature", "1", "--top-p", "1.5"], 1, "top-p must be in (0, 1]"),
        // tokenizers
        (vec!["tokenizer", "train", "--vocab-size", "100", readme], 1, "--vocab-size 100 is too small"),
        (
            vec!["tokenizer", "train", "--vocab-size", "300", "/nonexistent/corpus.txt"],
            1,
            "text file /nonexistent/corpus.txt does not exist",
        ),
        (vec!["tokenizer", "train", "--vocab-size", "300", &empty], 1, "is empty"),
        (vec!["tokenizer", "train", "--vocab-size", "300", readme, "--out", &a_dir], 1, "is a directory"),
        (
            vec!["tokenize", "--tokenizer", "/nonexistent/tok.json", readme, "--out", &out_dir],
            1,
            "tokenizer file /nonexistent/tok.json does not exist",
        ),
        (
            vec!["tokenize", "--tokenizer", &not_st, readme, "--out", &out_dir],
            1,
            "is not a valid Hugging Face tokenizer.json",
        ),
        (vec!["tokenize", "--tokenizer", &empty_dir, readme, "--out", &out_dir], 1, "has no tokenizer.json"),
        (
            vec!["tokenize", "--tokenizer", &tok300, &latin1, "--out", &out_dir],
            1,
            "is not UTF-8 text (invalid byte at offset 3)",
        ),
        (vec!["tokenize", "--tokenizer", &tok300, readme, "--out", readme], 1, "is one of the input files"),
        (vec!["train", "--tokenizer", &tok300], 1, "--tokenizer needs a text file to tokenize"),
        (
            vec!["train", "--tokenizer", &tok300, "--data", readme, "--vocab", "256"],
            1,
            "has 300 tokens, more than the model's vocabulary of 256",
        ),
        (vec!["train", "--tokenizer", &not_st, "--data", readme], 1, "is not a valid Hugging Face tokenizer.json"),
        (
            vec!["generate", "--checkpoint", &s, "--tokenizer", &tok300],
            1,
            "has 300 tokens, more than the model's vocabulary of 256",
        ),
        (
            vec!["export", "--checkpoint", &s, "--out", &out_dir, "--tokenizer", "/nonexistent/tok.json"],
            1,
            "does not exist",
        ),
        // image folders and CIFAR-10
        (vec!["train", "--model", "resnet-tiny", "--data", &empty_dir], 1, "has no class folders"),
        (vec!["train", "--model", "resnet-tiny", "--data", &bad_images], 1, "x.png: cannot decode the image"),
        (
            vec!["train", "--model", "resnet-tiny", "--data", &cifar_cut],
            1,
            "3000 bytes is not a whole number of CIFAR-10 records",
        ),
        (
            vec!["train", "--model", "resnet-tiny", "--data", "/nonexistent/images"],
            1,
            "/nonexistent/images does not exist",
        ),
        // the metrics log and plot
        (vec!["train", "--log", &a_dir], 1, "is a directory"),
        (vec!["train", "--log", &in_log], 1, "--log is inside the checkpoint"),
        (
            vec!["plot", "/nonexistent/brigade/metrics.jsonl"],
            1,
            "cannot read the metrics log /nonexistent/brigade/metrics.jsonl",
        ),
        (vec!["plot", &empty_dir], 1, "a run's --save-dir holds one"),
        (vec!["plot", &not_st], 1, "line 1: not a JSON record"),
        (vec!["plot", &empty], 1, "is not a brigade metrics log (no \"run\" record)"),
        (vec!["plot", &no_steps], 1, "has no training steps to plot"),
        (vec!["plot", &bad_step], 1, "line 2: a step record missing field `loss`"),
        (vec!["plot", &s, "--labels", "a,b"], 1, "--labels names 2 runs but 1 were given"),
        (vec!["plot", &s, "--out", &in_plot], 1, "--out is inside the checkpoint"),
        // profile, bench
        (vec!["profile", "--out", &in_profile], 1, "--out is inside the checkpoint"),
        (vec!["profile", "--microbatch-size", "0"], 1, "--microbatch-size must be at least 1"),
        (vec!["profile", "--device", "tpu"], 1, "unknown device \"tpu\""),
        (vec!["profile", "--optimizer", "adam"], 2, "invalid value 'adam'"),
        (vec!["profile", "--width", "100000"], 1, "needs at least"),
        (vec!["plan", "--layers", "100000"], 1, "needs at least"),
        (vec!["bench", "--width", "100000", "--out", &out_dir], 1, "needs at least"),
        (vec!["bench", "--out", &in_bench], 1, "--out is inside the checkpoint"),
        (
            vec!["simulate", "--profile", "/nonexistent/profile.json"],
            1,
            "cannot read profile /nonexistent/profile.json",
        ),
        (vec!["simulate", "--profile", &not_st], 1, "is not a profile written by `brigade profile`"),
    ];
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    for (args, code, needle) in &cases {
        assert_clean_failure(args, *code, needle);
        assert_eq!(checkpoint_bytes(&save), before, "{args:?} changed the checkpoints");
    }
    assert!(
        !step.join("hf").exists() && !step.join("logits.safetensors").exists() && !step.join("profile.json").exists()
    );
    println!("{} bad inputs, each refused with one clear error line", cases.len());
    let _ = std::fs::remove_dir_all(&root);
}

/// A second process on a save directory refuses while the first holds it; a killed holder's
/// lock disappears with it.
#[test]
fn a_locked_save_directory_is_refused() {
    let root = temp_dir("lock");
    let save = root.join("run");
    assert!(train_into(&save, "2", &[]).status.success());
    let before = checkpoint_bytes(&save);
    // This process plays the other run, holding the lock as a training run does.
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(save.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    let s = save.to_str().unwrap();
    let mut args = vec!["train", "--resume", s, "--save-dir", s, "--steps", "3"];
    args.extend(SMALL);
    assert_clean_failure(&args, 1, "is in use");
    assert_eq!(checkpoint_bytes(&save), before);
    drop(lock);
    let out = brigade(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(save.join("step-00000003").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// Another run's save directory is refused, a resume continuing the same run is not, and
/// `--overwrite` replaces the other run's checkpoints only once the new run has saved.
#[test]
fn another_runs_checkpoints_are_never_replaced_by_surprise() {
    let root = temp_dir("other-run");
    let save = root.join("run");
    let s = save.to_str().unwrap();
    assert!(train_into(&save, "2", &["--save-every", "1"]).status.success());
    let before = checkpoint_bytes(&save);
    // Another seed is another run, whether started fresh or resumed from elsewhere.
    let out = train_into(&save, "2", &["--seed", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("already holds 2 checkpoint(s) of another run"), "{:?}", text(&out));
    let other = root.join("other");
    assert!(train_into(&other, "1", &["--seed", "7"]).status.success());
    let mut args = vec!["train", "--resume", other.to_str().unwrap(), "--save-dir", s, "--steps", "2"];
    args.extend(SMALL);
    assert_clean_failure(&args, 1, "seed 7 vs 0");
    assert_eq!(checkpoint_bytes(&save), before, "a refused run changed the checkpoints");
    // The same run resumed from its first checkpoint into its own directory is fine.
    let first = save.join("step-00000001");
    let mut args = vec!["train", "--resume", first.to_str().unwrap(), "--save-dir", s, "--steps", "2"];
    args.extend(SMALL);
    let out = brigade(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(Checkpoint::open(&save).unwrap().meta.step, 2);
    // With --overwrite the new run takes the directory; the old run's checkpoints go once it saved.
    let out = train_into(&save, "1", &["--seed", "1", "--overwrite"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let names: Vec<String> = std::fs::read_dir(&save)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(names, vec!["step-00000001".to_string()], "the other run's step-2 should be gone");
    assert_eq!(Checkpoint::open(&save).unwrap().meta.seed, 1);
    let _ = std::fs::remove_dir_all(&root);
}

/// A copy of a checkpoint with one byte flipped at `offset` from the end of `file`.
fn flipped(src: &Path, dst: &Path, file: &str, offset_from_end: usize) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let path = dst.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() - offset_from_end;
    bytes[i] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
}

/// One flipped bit inside a tensor's data (which still parses, and would load as slightly
/// different weights) is caught by every command that reads the checkpoint, naming the file.
#[test]
fn bit_rot_is_detected_by_every_reader() {
    let root = temp_dir("bitrot");
    let save = root.join("run");
    assert!(train_into(&save, "2", &[]).status.success());
    let good = save.join("step-00000002");
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-tiny/input.safetensors");
    // A good copy passes (the checksums are right), so the failures below are the flip's.
    let out = brigade(&["inspect", good.to_str().unwrap()]);
    assert!(out.status.success() && text(&out).0.contains("checksums  ok: 8 files"), "{:?}", text(&out));

    let shard = "model-00002-of-00002.safetensors";
    let bad = root.join("bad-weights");
    flipped(&good, &bad, shard, 100);
    let b = bad.to_str().unwrap();
    let logits = root.join("logits.safetensors");
    let out_dir = root.join("hf");
    let mut resume = vec!["train", "--resume", b, "--steps", "3"];
    resume.extend(SMALL);
    let commands: Vec<Vec<&str>> = vec![
        resume,
        vec!["inspect", b],
        vec!["export", "--checkpoint", b, "--out", out_dir.to_str().unwrap()],
        vec!["predict", "--checkpoint", b, "--input", input, "--output", logits.to_str().unwrap()],
        vec!["generate", "--checkpoint", b, "--tokens", "3"],
        vec![
            "train",
            "--init-from",
            b,
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--microbatches",
            "2",
            "--plain",
            "--eval-batches",
            "1",
        ],
    ];
    for args in &commands {
        assert_clean_failure(args, 1, "checksum mismatch");
        let (_, stderr) = text(&brigade(args));
        assert!(stderr.contains(shard), "{args:?}: the error should name the file: {stderr}");
    }
    assert!(!logits.exists(), "no output from a damaged checkpoint");

    // The optimizer state and the metadata are covered too.
    let bad_opt = root.join("bad-optimizer");
    flipped(&good, &bad_opt, "optimizer-00001-of-00002.safetensors", 64);
    let mut resume = vec!["train", "--resume", bad_opt.to_str().unwrap(), "--steps", "3"];
    resume.extend(SMALL);
    assert_clean_failure(&resume, 1, "checksum mismatch");
    let bad_meta = root.join("bad-meta");
    std::fs::create_dir_all(&bad_meta).unwrap();
    for e in std::fs::read_dir(&good).unwrap().flatten() {
        std::fs::copy(e.path(), bad_meta.join(e.file_name())).unwrap();
    }
    // A changed digit in the learning rate still parses: only the checksum sees it.
    let meta = std::fs::read_to_string(bad_meta.join("brigade.json")).unwrap();
    let edited = meta.replacen("\"base_lr\": 0.003", "\"base_lr\": 0.008", 1);
    assert_ne!(meta, edited);
    std::fs::write(bad_meta.join("brigade.json"), edited).unwrap();
    assert_clean_failure(&["inspect", bad_meta.to_str().unwrap()], 1, "brigade.json: checksum mismatch");
    let _ = std::fs::remove_dir_all(&root);
}

/// Rewrites one tensor of a checkpoint shard and re-records the checksums, as a damaged
/// optimizer that was nonetheless saved consistently would look.
fn rewrite_and_reseal(dir: &Path, file: &str, name: &str, edit: impl Fn(&Tensor) -> Tensor) {
    let path = dir.join(file);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let t = edit(&tensors[name]);
    tensors.insert(name.to_string(), t);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    // Sealing refuses non-finite values, so record the sums by hand for those.
    let mut sums: brigade::engine::checkpoint::Checksums =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checksums.json")).unwrap()).unwrap();
    sums.files.insert(file.to_string(), brigade::engine::checkpoint::FileSum::of(&std::fs::read(&path).unwrap()));
    std::fs::write(dir.join("checksums.json"), serde_json::to_string(&sums).unwrap()).unwrap();
}

/// Optimizer state is validated on load: negative second moments and non-finite values are
/// errors naming the tensor, so a damaged state never trains on to NaN.
#[test]
fn damaged_optimizer_state_is_refused() {
    let root = temp_dir("optim");
    let save = root.join("run");
    assert!(train_into(&save, "2", &[]).status.success());
    let good = save.join("step-00000002");
    let copy = |name: &str| {
        let dst = root.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&good).unwrap().flatten() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        dst
    };
    let file = "optimizer-00001-of-00002.safetensors";
    let tensor = "transformer.wpe.weight";
    let negative = copy("negative");
    rewrite_and_reseal(&negative, file, &format!("{tensor}.exp_avg_sq"), |t| (t.ones_like().unwrap() * -1.0).unwrap());
    let nan = copy("nan");
    rewrite_and_reseal(&nan, file, &format!("{tensor}.exp_avg"), |t| (t.zeros_like().unwrap() / 0.0).unwrap());
    for (dir, needle) in [(&negative, "holds a negative value"), (&nan, "holds NaN or infinity")] {
        let mut args = vec!["train", "--resume", dir.to_str().unwrap(), "--steps", "3"];
        args.extend(SMALL);
        assert_clean_failure(&args, 1, needle);
        let (_, stderr) = text(&brigade(&args));
        assert!(stderr.contains(file) && stderr.contains(tensor), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A diverged model is never saved: the save is refused before it is renamed into place, so
/// the checkpoint of the same name saved before, `latest` and pruning are untouched.
#[test]
fn a_non_finite_model_never_becomes_a_checkpoint() {
    let root = temp_dir("nan");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    let before = checkpoint_bytes(&save);
    // Weights with a NaN, saved under the existing checkpoint's name.
    let saved = Checkpoint::open(&save).unwrap();
    let mut weights: std::collections::HashMap<String, Tensor> =
        saved.weights.names().map(|n| (n.to_string(), saved.weights.load(n, DType::F32).unwrap())).collect();
    drop(saved);
    let poisoned = (weights["transformer.h.0.ln_1.bias"].zeros_like().unwrap() / 0.0).unwrap();
    weights.insert("transformer.h.0.ln_1.bias".into(), poisoned);
    let model = brigade::models::ModelConfig::preset("gpt-tiny").unwrap();
    let model = match model {
        brigade::models::ModelConfig::Gpt(g) => brigade::models::ModelConfig::Gpt(g.with_n_positions(32)),
        other => other,
    }
    .build()
    .unwrap();
    let mut config = brigade::engine::pipeline::PipelineConfig::default().stages(2).microbatches(2);
    config.initial_params = weights;
    let mut pipeline = brigade::engine::pipeline::Pipeline::new(model.as_ref(), config).unwrap();
    let meta = brigade::engine::checkpoint::ModelMeta { name: model.name(), config: model.config() };
    let err = pipeline
        .save_checkpoint(&save.join("step-00000001"), meta, Default::default(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not saving") && err.contains("step-00000001") && err.contains("transformer.h.0.ln_1.bias"),
        "{err}"
    );
    assert!(err.contains("diverged"), "{err}");
    assert_eq!(checkpoint_bytes(&save), before, "a refused save changed the checkpoints");
    let leftovers =
        std::fs::read_dir(&save).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(!leftovers, "the refused save left its partial directory");
    // A run that diverges (a NaN loss at step 2) stops before saving anything of it, so
    // --keep-last 1 never prunes the last good checkpoint.
    let wild = root.join("wild");
    let out = train_into(&wild, "6", &["--save-every", "1", "--keep-last", "1", "--lr", "1e30", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("non-finite loss") || text(&out).1.contains("diverged"), "{:?}", text(&out));
    let latest = std::fs::read_to_string(wild.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000001");
    let ckpt = Checkpoint::open(&wild).unwrap();
    ckpt.verify_all().unwrap();
    assert!(
        ckpt.weights.names().all(|n| ckpt.weights.load(n, DType::F32).is_ok()),
        "latest ({latest}) must hold finite weights"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Leftovers of a killed save's `latest` swap are cleaned like its partial directories, and a
/// `latest` naming nothing is reported when brigade falls back to the newest checkpoint.
#[test]
fn stale_partial_files_are_cleaned_and_fallbacks_reported() {
    let root = temp_dir("stale");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    // pid_max is at most 2^22 on Linux: this process cannot exist.
    let stale = save.join(".latest.partial-4194305");
    std::fs::write(&stale, "step-00000009\n").unwrap();
    let s = save.to_str().unwrap();
    let mut args = vec!["train", "--resume", s, "--save-dir", s, "--steps", "2"];
    args.extend(SMALL);
    assert!(brigade(&args).status.success());
    assert!(!stale.exists(), "the dead process's .latest.partial file should be removed");
    std::fs::write(save.join("latest"), "step-00000007\n").unwrap();
    let out = brigade(&["inspect", s]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("names step-00000007, which is not a complete checkpoint; using the newest one, step-00000002"),
        "{stderr}"
    );
    assert!(stdout.contains("step       2 of 2"), "{stdout}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Output a new user reads: eval and save lines without a terminal, singular counts, the steps
/// a resumed run actually ran, readable inspect values, shareable predict output, and schedule
/// files that supply their own counts without claiming to be the built-in schedule.
#[test]
fn output_a_new_user_can_act_on() {
    let root = temp_dir("output");
    let save = root.join("run");
    let s = save.to_str().unwrap();
    // No --plain, output piped: the progress bar is off but eval and save lines are printed.
    let out = brigade(&[
        "train",
        "--stages",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--microbatches",
        "1",
        "--context",
        "32",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--save-dir",
        s,
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("held-out loss") && stdout.contains("saved"), "{stdout}");
    assert!(stdout.contains("pipeline 1 stage (") && stdout.contains("1 micro-batch of 4"), "{stdout}");
    let mut args = vec!["train", "--resume", s, "--save-dir", s, "--steps", "4"];
    args.extend(SMALL);
    let (stdout, _) = text(&brigade(&args));
    assert!(stdout.contains("done: 2 steps (step 2 to 4)"), "{stdout}");

    let (stdout, _) = text(&brigade(&["inspect", s]));
    assert!(stdout.contains("optimizer  AdamW (betas 0.9, 0.95"), "{stdout}");
    assert!(stdout.contains("lr         3e-3 peak") && !stdout.contains("LrSchedule {"), "{stdout}");
    assert!(stdout.contains("checksums  ok"), "{stdout}");

    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-tiny/input.safetensors");
    let logits = root.join("logits.safetensors");
    let out = brigade(&["predict", "--checkpoint", s, "--input", input, "--output", logits.to_str().unwrap()]);
    assert!(out.status.success(), "{:?}", text(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&logits).unwrap().permissions().mode() & 0o777, 0o644);
    }

    // A printed 1F1B schedule, edited (stage 0 runs its forwards first: GPipe order).
    let printed = text(&brigade(&["schedule", "--stages", "2", "--microbatches", "2", "--format", "text"])).0;
    assert!(printed.contains("stage 0: 0F0 0F1 0B0 0B1"), "{printed}");
    let edited = printed.replace("stage 1: 1F0 1B0 1F1 1B1", "stage 1: 1F0 1F1 1B0 1B1");
    assert_ne!(printed, edited);
    let file = root.join("edited.schedule");
    std::fs::write(&file, edited).unwrap();
    let mut args = vec![
        "train",
        "--schedule",
        file.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--context",
        "32",
        "--eval-batches",
        "1",
        "--plain",
    ];
    let out = brigade(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "the file's 2 stages and 2 micro-batches should be used: {stderr}");
    assert!(stdout.contains("pipeline 2 stages") && stdout.contains("2 micro-batches of 2"), "{stdout}");
    assert!(stdout.contains("schedule custom (edited 1f1b from"), "{stdout}");
    // Unedited, it is the built-in schedule and says so.
    let same = root.join("same.schedule");
    std::fs::write(&same, &printed).unwrap();
    args[2] = same.to_str().unwrap();
    let (stdout, _) = text(&brigade(&args));
    assert!(stdout.contains("schedule 1f1b,"), "{stdout}");
    let _ = std::fs::remove_dir_all(&root);
}

/// The library refuses the same things the CLI does: an optimizer state loaded through the
/// API is checked, and a save-dir claim without `overwrite` is refused.
#[test]
fn library_errors_are_typed() {
    let root = temp_dir("lib");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    std::fs::write(save.join("step-00000001/checksums.json"), b"{ broken").unwrap();
    let err = Checkpoint::open(&save).unwrap_err();
    assert!(matches!(err, CheckpointError::Invalid { .. }) && err.to_string().contains("checksums.json"), "{err}");
    // Re-sealing restores a consistent checkpoint (for tools that edit one on purpose).
    seal(&save.join("step-00000001")).unwrap();
    Checkpoint::open(&save).unwrap().verify_all().unwrap().expect("checksums recorded");
    let _ = std::fs::remove_dir_all(&root);
}

/// A step can be finite while the weights it leaves predict only NaN (`--lr 1e30`: the step's
/// loss is computed before the update). The run warns once and saves nothing over the
/// checkpoints already in the save directory; into an empty one it still writes its first
/// checkpoint, the only thing there is to inspect.
#[test]
fn weights_with_a_non_finite_held_out_loss_never_replace_a_checkpoint() {
    let root = temp_dir("nan-eval");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    let before = checkpoint_bytes(&save);
    let wild = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--stages", "2", "--steps", "1", "--save-dir", dir.to_str().unwrap()];
        args.extend(["--batch-size", "4", "--microbatches", "2", "--context", "32", "--plain"]);
        args.extend(["--eval-every", "1", "--eval-batches", "1", "--lr", "1e30", "--warmup", "0"]);
        args.extend(extra);
        brigade(&args)
    };
    // --overwrite: the first run's checkpoint (same name, step-00000001) would be replaced.
    // The run logs elsewhere: a new run restarts the save directory's metrics log.
    let log = root.join("wild.jsonl");
    let out = wild(&save, &["--overwrite", "--log", log.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "one warning: {stderr}");
    assert!(warnings[0].contains("held-out loss is NaN") || warnings[0].contains("held-out loss is inf"), "{stderr}");
    assert!(warnings[0].contains("no checkpoint is saved over those in"), "{stderr}");
    assert!(!stdout.contains(": saved "), "nothing is saved: {stdout}");
    assert_eq!(checkpoint_bytes(&save), before, "the good checkpoint changed");
    Checkpoint::open(&save).unwrap().verify_all().unwrap();
    // An empty save directory gets the run's checkpoint, with the same warning.
    let empty = root.join("empty");
    let out = wild(&empty, &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("warning:")).count(), 1, "{stderr}");
    assert!(stdout.contains(": saved "), "{stdout}");
    assert_eq!(std::fs::read_to_string(empty.join("latest")).unwrap().trim(), "step-00000001");
    let _ = std::fs::remove_dir_all(&root);
}

/// A full or closed stdout or stderr ends a command with one `error:` line (or, for a reader
/// that has gone away, quietly), never a panic.
#[test]
fn a_full_or_closed_output_stream_is_no_panic() {
    use std::process::Stdio;
    let run = |args: &[&str], stdout: Stdio, stderr: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).stdout(stdout).stderr(stderr).output().unwrap()
    };
    let full = || Stdio::from(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
    // stdout on a full disk: one error line naming it, exit code 1.
    for args in [&["presets"][..], &["schedule", "--stages", "4", "--microbatches", "8"]] {
        let out = run(args, full(), Stdio::piped());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: cannot write to stdout"), "{stderr}");
    }
    // stderr on a full disk, for an error and for clap's usage error: only the exit code says it.
    for (args, code) in [(&["train", "--stages", "0"][..], 1), (&["train", "--bogus"], 2)] {
        let out = run(args, Stdio::piped(), full());
        assert_eq!(out.status.code(), Some(code), "{args:?}");
    }
    // Both full.
    let out = run(&["presets"], full(), full());
    assert_eq!(out.status.code(), Some(1));
    // A reader that stops reading (`brigade schedule | head`): a quiet exit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["schedule", "--stages", "8", "--microbatches", "4000", "--format", "text"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "a broken pipe should be quiet: {stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

/// The output guard every writing command shares: nothing lands inside a checkpoint, on a save
/// directory's own files (`latest`, the lock, a step name, the run's `tokenizer.json` and
/// `metrics.jsonl`), on a save directory, or on the command's own inputs; each refused before
/// any work, with one error line, every file of the run byte-identical afterwards.
#[test]
fn writers_never_land_on_a_run_or_their_inputs() {
    let root = temp_dir("writers");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let tok = root.join("tok.json");
    brigade::tokenizer::TextTokenizer::train_bpe(&[readme.into()], 300, 2).unwrap().save(&tok).unwrap();
    let tok = tok.to_str().unwrap().to_string();
    let save = root.join("run");
    let out = train_into(&save, "2", &["--tokenizer", &tok, "--data", readme]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(save.join("tokenizer.json").is_file() && save.join("metrics.jsonl").is_file());
    let before = checkpoint_bytes(&save);
    let s = save.to_str().unwrap().to_string();
    let own = |name: &str| save.join(name).to_str().unwrap().to_string();
    let (latest, run_tok, metrics, lock, future_step) =
        (own("latest"), own("tokenizer.json"), own("metrics.jsonl"), own(".lock"), own("step-00000009"));
    let (in_step, plot_in_step) = (own("step-00000002/x.bin"), own("step-00000002/plot"));
    // A link elsewhere onto the run's `latest` is the run's `latest`.
    let link = root.join("link-to-latest");
    #[cfg(unix)]
    std::os::unix::fs::symlink(save.join("latest"), &link).unwrap();
    let link = link.to_str().unwrap().to_string();
    let text_file = root.join("corpus.txt");
    std::fs::write(&text_file, "some text to tokenize, some text to tokenize\n").unwrap();
    let text_file = text_file.to_str().unwrap().to_string();
    let hard_link = root.join("corpus-link.txt");
    std::fs::hard_link(&text_file, &hard_link).unwrap();
    let hard_link = hard_link.to_str().unwrap().to_string();
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt-tiny/input.safetensors");
    let v = "--vocab-size";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // tokenizer train --out
        (vec!["tokenizer", "train", v, "300", readme, "--out", &latest], "own latest"),
        (vec!["tokenizer", "train", v, "300", readme, "--out", &run_tok], "own tokenizer.json"),
        (vec!["tokenizer", "train", v, "300", readme, "--out", &in_step], "is inside the checkpoint"),
        (vec!["tokenizer", "train", v, "300", readme, "--out", &link], "own latest"),
        (vec!["tokenizer", "train", v, "300", &text_file, "--out", &text_file], "is one of the input files"),
        (vec!["tokenizer", "train", v, "300", &text_file, "--out", &hard_link], "is one of the input files"),
        (vec!["tokenizer", "train", v, "300", readme, "--out", &future_step], "own step-00000009"),
        // tokenize --out
        (vec!["tokenize", "--tokenizer", &tok, readme, "--out", &latest], "own latest"),
        (vec!["tokenize", "--tokenizer", &tok, readme, "--out", &run_tok], "own tokenizer.json"),
        (vec!["tokenize", "--tokenizer", &tok, readme, "--out", &in_step], "is inside the checkpoint"),
        (vec!["tokenize", "--tokenizer", &tok, readme, "--out", &tok], "is one of the input files"),
        (vec!["tokenize", "--tokenizer", &tok, &text_file, "--out", &hard_link], "is one of the input files"),
        // predict --output, profile --out, plan --json, plot --out
        (vec!["predict", "--checkpoint", &s, "--input", input, "--output", &latest], "own latest"),
        (vec!["predict", "--checkpoint", &s, "--input", input, "--output", &run_tok], "own tokenizer.json"),
        (vec!["predict", "--checkpoint", &s, "--input", input, "--output", &metrics], "own metrics.jsonl"),
        (vec!["profile", "--out", &latest], "own latest"),
        (vec!["profile", "--out", &lock], "own .lock"),
        (vec!["profile", "--out", &metrics], "own metrics.jsonl"),
        (vec!["plan", "--json", &run_tok], "own tokenizer.json"),
        (vec!["plot", &s, "--out", &plot_in_step], "is inside the checkpoint"),
        // train --log and --save-dir: another run's log, the run's own files, its inputs
        (vec!["train", "--log", &latest], "own latest"),
        (vec!["train", "--log", &metrics], "own metrics.jsonl"),
        (vec!["train", "--log", &run_tok], "own tokenizer.json"),
        (vec!["train", "--data", &text_file, "--log", &text_file], "is one of the input files"),
        // export --out and bench --out
        (vec!["export", "--checkpoint", &s, "--out", &future_step], "own step-00000009"),
        (vec!["export", "--checkpoint", &s, "--out", &s], "is a checkpoint or save directory"),
        (vec!["bench", "--out", &s], "is a checkpoint or save directory"),
    ];
    for (args, needle) in &cases {
        assert_clean_failure(args, 1, needle);
        assert_eq!(checkpoint_bytes(&save), before, "{args:?} changed the run's files");
    }
    assert_eq!(std::fs::read(&text_file).unwrap(), b"some text to tokenize, some text to tokenize\n");
    // The run's own log, in its own save directory, is still its to write.
    let out = train_into(&save, "3", &["--resume", &s, "--tokenizer", &tok, "--data", readme, "--log", &metrics]);
    assert!(out.status.success(), "{:?}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}

/// Inputs are checked at their full width before they reach a model: `predict` refuses token
/// ids outside the vocabulary (an int64 id of 2^32 + 1 is not id 1) and non-finite images;
/// `export` checks the tokenizer against the model before writing anything, and leaves nothing
/// behind when it fails.
#[test]
fn ids_and_inputs_are_checked_at_full_width() {
    let root = temp_dir("width");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    let s = save.to_str().unwrap().to_string();
    let before = checkpoint_bytes(&save);
    let ids = |name: &str, t: Tensor| -> String {
        let p = root.join(name);
        t.save_safetensors("input_ids", &p).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cpu = &Device::Cpu;
    let wraps = ids("wraps.safetensors", Tensor::new(&[[1i64, (1i64 << 32) + 1]], cpu).unwrap());
    let beyond = ids("beyond.safetensors", Tensor::new(&[[1u32, 256]], cpu).unwrap());
    let beyond_f = ids("beyond-f.safetensors", Tensor::new(&[[1f32, 300.0]], cpu).unwrap());
    let logits = root.join("logits.safetensors").to_str().unwrap().to_string();
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let tok = root.join("tok300.json");
    brigade::tokenizer::TextTokenizer::train_bpe(&[readme.into()], 300, 2).unwrap().save(&tok).unwrap();
    let tok = tok.to_str().unwrap().to_string();
    let hf = root.join("hf").to_str().unwrap().to_string();
    fn p<'a>(s: &'a str, input: &'a str, logits: &'a str) -> Vec<&'a str> {
        vec!["predict", "--checkpoint", s, "--input", input, "--output", logits]
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (p(&s, &wraps, &logits), "token id 4294967297 is outside the model's vocabulary of 256"),
        (p(&s, &beyond, &logits), "token id 256 is outside the model's vocabulary of 256"),
        (p(&s, &beyond_f, &logits), "token id 300 is outside the model's vocabulary of 256"),
        (
            vec!["export", "--checkpoint", &s, "--out", &hf, "--tokenizer", &tok],
            "more than the model's vocabulary of 256",
        ),
    ];
    for (args, needle) in &cases {
        assert_clean_failure(args, 1, needle);
        assert_eq!(checkpoint_bytes(&save), before, "{args:?} changed the checkpoints");
    }
    assert!(!Path::new(&logits).exists());
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains("hf")), "a failed export left {left:?}");
    // A good export still lands whole.
    let out = brigade(&["export", "--checkpoint", &s, "--out", &hf]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(Path::new(&hf).join("model.safetensors").is_file() && Path::new(&hf).join("config.json").is_file());

    // An image of NaNs gives no logits.
    let resnet = root.join("resnet");
    let r = resnet.to_str().unwrap();
    let out = brigade(&[
        "train",
        "--model",
        "resnet-tiny",
        "--stages",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--microbatches",
        "1",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--plain",
        "--save-dir",
        r,
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let nan = root.join("nan.safetensors");
    Tensor::full(f32::NAN, (1, 3, 32, 32), cpu).unwrap().save_safetensors("images", &nan).unwrap();
    let nan = nan.to_str().unwrap();
    assert_clean_failure(
        &["predict", "--checkpoint", r, "--input", nan, "--output", &logits],
        1,
        "images must be finite",
    );
    assert!(!Path::new(&logits).exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// What would only fail late, or train silently wrong, is refused before training: a
/// validation split smaller than one batch, a one-class classification set (folder or CIFAR),
/// a cut-off JPEG, a vocabulary that cannot fit, a prompt or text encoded to nothing.
#[test]
fn data_problems_are_refused_before_training() {
    let root = temp_dir("upfront");
    let save = root.join("run");
    assert!(train_into(&save, "1", &[]).status.success());
    let s = save.to_str().unwrap().to_string();
    let before = checkpoint_bytes(&save);
    let cifar = |name: &str, labels: &[u8]| -> String {
        let mut bytes = Vec::new();
        for &l in labels {
            bytes.push(l);
            bytes.extend((0..3072).map(|i| (i % 251) as u8));
        }
        let p = root.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    // 20 records: 18 train, 2 validation.
    let small_val = cifar("small-val.bin", &[0, 1].repeat(10));
    let one_label = cifar("one-label.bin", &[3; 20]);
    let folder = |name: &str, classes: &[&str], file: &str, bytes: &[u8]| -> String {
        let dir = root.join(name);
        for c in classes {
            std::fs::create_dir_all(dir.join(c)).unwrap();
            for i in 0..3 {
                std::fs::write(dir.join(c).join(format!("{i}{file}")), bytes).unwrap();
            }
        }
        dir.to_str().unwrap().to_string()
    };
    // A valid 1x1 PNG.
    let png: &[u8] = b"\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\x0d\x49\x44\x41\x54\x78\xda\x63\x64\x60\xf8\x5f\x0f\x00\x02\x87\x01\x80\xeb\x47\xba\x92\x00\x00\x00\x00\x49\x45\x4e\x44\xae\x42\x60\x82";
    let one_class = folder("one-class", &["cat"], ".png", png);
    let cut_jpeg = folder("cut-jpeg", &["cat", "dog"], ".jpg", b"\xFF\xD8\xFF\xE0 cut here");
    // More 4096x4096 images than this machine's memory holds decoded (about 400 MB each): the
    // folder is refused with the estimate before any file is read (so they may be empty).
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(64 << 30, |kib| kib * 1024);
    let per_class = (available / (400 << 20)) as usize + 2;
    let many = root.join("many");
    for c in ["a", "b"] {
        std::fs::create_dir_all(many.join(c)).unwrap();
        for i in 0..per_class {
            std::fs::write(many.join(c).join(format!("{i}.png")), b"").unwrap();
        }
    }
    let many = many.to_str().unwrap().to_string();
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let sparse = root.join("sparse.json");
    std::fs::write(
        &sparse,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let sparse = sparse.to_str().unwrap().to_string();
    let blank = root.join("blank.txt");
    std::fs::write(&blank, "  \n \n").unwrap();
    let blank = blank.to_str().unwrap().to_string();
    let resnet = |data: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["train", "--model", "resnet-tiny", "--stages", "1", "--batch-size", "4"];
        args.extend(["--microbatches", "1", "--data", data]);
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    };
    let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (resnet(&small_val, &[]), "the validation split has 2 images, fewer than one batch of 4"),
        (resnet(&one_label, &[]), "every training record has label 3"),
        (resnet(&one_class, &[]), "has one class folder (`cat`)"),
        (resnet(&cut_jpeg, &[]), "the JPEG is truncated"),
        (resnet(&cut_jpeg, &["--image-size", "100000"]), "image size 100000 is outside"),
        (resnet(&many, &["--image-size", "4096"]), "images at 4096x4096 needs at least"),
        (resnet(&small_val, &["--image-size", "64"]), "--image-size 64 does not apply to"),
        (resnet(&small_val, &["--image-size", "100000"]), "its images are 32x32"),
        (owned(&["tokenizer", "train", "--vocab-size", "4294967295", readme]), "more than brigade trains"),
        (owned(&["tokenizer", "train", "--vocab-size", "100000000", readme]), "would need at least"),
        (owned(&["generate", "--checkpoint", &s, "--tokenizer", &sparse, "--prompt", "   "]), "to no tokens at all"),
        (owned(&["train", "--data", &blank, "--tokenizer", &sparse, "--vocab", "256"]), "to no tokens at all"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&args, 1, needle);
        assert_eq!(checkpoint_bytes(&save), before, "{args:?} changed the checkpoints");
    }
    // The same small CIFAR file trains when a batch fits its validation split.
    let mut args = vec!["train", "--model", "resnet-tiny", "--stages", "1", "--batch-size", "2", "--microbatches", "1"];
    args.extend(["--steps", "1", "--eval-batches", "1", "--plain", "--data", &small_val]);
    let out = brigade(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}

/// A resume knows its data and tokenizer by content: the same content under another path
/// resumes; other content of the same name and size, or a tokenizer with swapped ids, is
/// refused; a flag that conflicts with the resumed run is an error, never ignored.
#[test]
fn resume_knows_its_data_by_content() {
    let root = temp_dir("identity");
    let readme = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let data = root.join("data.txt");
    std::fs::write(&data, &readme).unwrap();
    let tok = root.join("tok.json");
    brigade::tokenizer::TextTokenizer::train_bpe(std::slice::from_ref(&data), 300, 2).unwrap().save(&tok).unwrap();
    let save = root.join("run");
    let (d, t) = (data.to_str().unwrap(), tok.to_str().unwrap());
    let out = train_into(&save, "2", &["--data", d, "--tokenizer", t]);
    assert!(out.status.success(), "{:?}", text(&out));
    let s = save.to_str().unwrap().to_string();
    let before = checkpoint_bytes(&save);

    // The same bytes elsewhere; one byte changed at the same path and size.
    std::fs::create_dir_all(root.join("moved")).unwrap();
    let moved = root.join("moved").join("other-name.txt");
    std::fs::write(&moved, &readme).unwrap();
    let mut changed = readme.clone();
    let at = changed.iter().position(|&b| b == b'e').unwrap();
    changed[at] = b'a';
    let changed_path = root.join("moved").join("data.txt");
    std::fs::write(&changed_path, &changed).unwrap();
    // The tokenizer with two ids swapped, and an exact copy elsewhere.
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let keys: Vec<String> = vocab.keys().take(2).cloned().collect();
    let (a, b) = (vocab[&keys[0]].clone(), vocab[&keys[1]].clone());
    vocab.insert(keys[0].clone(), b);
    vocab.insert(keys[1].clone(), a);
    let swapped = root.join("swapped.json");
    std::fs::write(&swapped, serde_json::to_string(&json).unwrap()).unwrap();
    let tok_copy = root.join("moved").join("tokenizer-copy.json");
    std::fs::copy(&tok, &tok_copy).unwrap();
    let (m, c, sw, tc) = (
        moved.to_str().unwrap(),
        changed_path.to_str().unwrap(),
        swapped.to_str().unwrap(),
        tok_copy.to_str().unwrap(),
    );

    let resume = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["train", "--resume", &s, "--save-dir", &s, "--steps", "3"];
        args.extend(SMALL);
        if extra.contains(&"--context") {
            // The one asked for replaces SMALL's.
            let at = args.iter().position(|a| *a == "--context").unwrap();
            args.drain(at..at + 2);
        }
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (resume(&["--data", c, "--tokenizer", t]), "(its content differs)"),
        (resume(&["--data", d, "--tokenizer", sw]), "differs in content from the run's tokenizer"),
        (resume(&["--data", d, "--tokenizer", t, "--vocab", "512"]), "--vocab 512 conflicts with the checkpoint"),
        (resume(&["--data", d, "--tokenizer", t, "--layers", "3"]), "--layers 3 conflicts with the checkpoint"),
        (resume(&["--data", d, "--tokenizer", t, "--context", "16"]), "--context 16 conflicts with the checkpoint"),
        (resume(&[]), "this run's data is"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // A tokenized --data prints its progress line on stderr before the refusal: the one
        // error line need not come first here.
        let out = brigade(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: expected one error line: {stderr}");
        assert!(errors[0].contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
        assert_eq!(checkpoint_bytes(&save), before, "{args:?} changed the checkpoints");
    }
    // The same data and tokenizer, stored elsewhere: the run continues.
    let args = resume(&["--data", m, "--tokenizer", tc]);
    let out = brigade(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("done: 1 step (step 2 to 3)"), "{:?}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}
