//! The `brigade` binary as a user meets it: bad input gets one clear line and a non-zero exit
//! (never a panic trace), and the main commands work end to end.

use std::path::PathBuf;
use std::process::{Command, Output};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Asserts a clean failure: exit code 1, one `error:` line naming `needle`, no panic.
fn assert_fails_with(args: &[&str], needle: &str) {
    assert_fails_with_lines(args, needle, 1);
}

/// Like [`assert_fails_with`], for errors that add detail lines (a schedule's grid).
fn assert_fails_with_lines(args: &[&str], needle: &str, max_lines: usize) {
    let out = brigade(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() <= max_lines, "{args:?}: expected at most {max_lines} lines, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    assert!(lines[0].contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
}

#[test]
fn bad_input_gets_one_clear_line() {
    assert_fails_with(&["train", "--model", "gpt-huge"], "unknown model preset `gpt-huge`; valid presets: gpt-tiny");
    assert_fails_with(
        &["train", "--batch-size", "10", "--microbatches", "4"],
        "batch size 10 is not divisible by 4 micro-batches",
    );
    assert_fails_with(&["train", "--stages", "0"], "at least one stage");
    assert_fails_with(&["train", "--stages", "5"], "cannot split 4 layers into 5 stages");
    assert_fails_with(&["train", "--split", "3,0"], "stage 1 of split 3,0 is empty");
    assert_fails_with(&["train", "--split", "1,1"], "split 1,1 covers 2 layers but the model has 4");
    assert_fails_with(&["train", "--schedule", "zigzag"], "unknown schedule \"zigzag\"");
    assert_fails_with(
        &["train", "--data", "/nonexistent/brigade/data.txt"],
        "/nonexistent/brigade/data.txt does not exist",
    );

    let empty = temp_file("empty.txt", b"");
    assert_fails_with(&["train", "--data", empty.to_str().unwrap()], "is empty");
    let short = temp_file("short.txt", b"just a few bytes of text");
    assert_fails_with(&["train", "--data", short.to_str().unwrap()], "needs at least 65");

    let garbage = temp_file("bad.schedule", b"stage 0: 0F0 0X1\n");
    assert_fails_with(&["train", "--schedule", garbage.to_str().unwrap()], "0X1");
    // Parses, but stage 1 runs B0 before F1 needs it while stage 0 waits: a deadlock.
    let deadlock = temp_file("deadlock.schedule", b"stage 0: 0F0 0B0 0F1 0B1\nstage 1: 1F1 1F0 1B0 1B1\n");
    // The validator's message names the stuck actions, then draws the grid with markers.
    assert_fails_with_lines(
        &["schedule", "--schedule", deadlock.to_str().unwrap()],
        "deadlock: stage 0 is blocked at 0B0 waiting for 1B0",
        4,
    );
    let out = brigade(&["schedule", "--schedule", deadlock.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("<-- ERROR HERE"));
    // A valid schedule for the wrong number of stages.
    let two_stage = temp_file("two.schedule", b"stage 0: 0F0 0B0\nstage 1: 1F0 1B0\n");
    assert_fails_with(
        &["train", "--stages", "2", "--microbatches", "4", "--schedule", two_stage.to_str().unwrap()],
        "--microbatches 4 disagrees with the schedule file, which is for 2 stages and 1 micro-batch",
    );

    assert_fails_with(&["train", "--model", "resnet-tiny", "--image-size", "4"], "at least 8x8");

    // Image files whose images and labels disagree, or that are not images at all.
    let dir = std::env::temp_dir().join(format!("brigade-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mismatched = dir.join("mismatched.safetensors");
    let images =
        candle_core::Tensor::zeros((4, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let labels = candle_core::Tensor::zeros(3, candle_core::DType::U32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("images", images.clone()), ("labels", labels)].into_iter().collect(),
        &mismatched,
    )
    .unwrap();
    assert_fails_with(
        &["train", "--model", "resnet-tiny", "--data", mismatched.to_str().unwrap()],
        "holds 4 images but `labels` holds 3 labels",
    );
    let flat = dir.join("flat.safetensors");
    let flat_images = images.reshape((4, 768)).unwrap();
    let labels = candle_core::Tensor::zeros(4, candle_core::DType::U32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("images", flat_images), ("labels", labels)].into_iter().collect(), &flat)
        .unwrap();
    assert_fails_with(&["train", "--model", "resnet-tiny", "--data", flat.to_str().unwrap()], "has shape [4, 768]");
    assert_fails_with(&["train", "--model", "resnet-tiny", "--data", short.to_str().unwrap()], "short.txt");
}

#[test]
fn schedule_command_prints_grid_and_bubble() {
    let out = brigade(&["schedule", "--schedule", "gpipe", "--stages", "3", "--microbatches", "4"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stage 2 |"), "{stdout}");
    // (p-1)/(m+p-1) = 2/6.
    assert!(stdout.contains("theoretical bubble (p-1)/(m+p-1) = 33.3%"), "{stdout}");
    let out = brigade(&["schedule", "--schedule", "gpipe", "--stages", "3", "--microbatches", "4", "--format", "text"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("stage 0: 0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3"), "{text}");

    // Both printed forms load back as schedule files and print the same schedule again.
    for (name, printed) in [("grid.schedule", stdout.to_string()), ("text.schedule", text.clone())] {
        let file = temp_file(name, printed.as_bytes());
        let out = brigade(&["schedule", "--schedule", file.to_str().unwrap(), "--format", "text"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), text, "{name} did not round-trip");
    }
}

#[test]
fn training_runs_end_to_end_and_learns() {
    let out = brigade(&[
        "train",
        "--plain",
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--eval-batches",
        "2",
        "--batch-size",
        "8",
        "--stages",
        "2",
        "--schedule",
        "gpipe",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("held-out loss"), "{stdout}");
    let done = stdout.lines().find(|l| l.starts_with("done:")).expect("summary line");
    // "done: 40 steps in 1.2s, train loss 5.55 -> 3.10, held-out loss 3.05"
    let nums: Vec<f64> =
        done.split(|c: char| !(c.is_ascii_digit() || c == '.')).filter_map(|t| t.parse().ok()).collect();
    let (first, last) = (nums[nums.len() - 3], nums[nums.len() - 2]);
    assert!(last < first - 1.0, "loss did not fall: {done}");
}

#[test]
fn resnet_trains_from_the_cli_with_a_split() {
    let out = brigade(&[
        "train",
        "--model",
        "resnet-tiny",
        "--plain",
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "1",
        "--batch-size",
        "8",
        "--stages",
        "3",
        "--split",
        "2,3,1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("layers 2,3,1"), "{stdout}");
    assert!(stdout.contains("accuracy"), "{stdout}");
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SMALL: &[&str] = &[
    "--steps",
    "4",
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

/// Save, resume on another layout, inspect, export, predict and generate, end to end.
#[test]
fn checkpoint_commands_work_end_to_end() {
    let dir = temp_dir("ckpt");
    let save = dir.join("run");
    let s = save.to_str().unwrap();
    let mut args = vec!["train", "--stages", "2", "--save-dir", s, "--save-every", "2", "--keep-last", "1"];
    args.extend(SMALL);
    let out = brigade(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("saved"), "{}", text(&out).0);
    let kept: Vec<_> =
        std::fs::read_dir(&save).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
    assert!(kept.contains(&"step-00000004".to_string()) && !kept.contains(&"step-00000002".to_string()), "{kept:?}");

    // Resume on 3 stages up to step 6.
    let mut args = vec!["train", "--stages", "3", "--resume", s, "--save-dir", s];
    args.extend(SMALL);
    let steps = args.iter().position(|a| *a == "--steps").unwrap() + 1;
    args[steps] = "6";
    let out = brigade(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("resume") && stdout.contains("step 4"), "{stdout}");
    assert!(
        stdout.contains("step     5") && !stdout.contains("step     4:"),
        "resumed run must start at step 5: {stdout}"
    );

    let out = brigade(&["inspect", s, "--stages", "3", "--tensors"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("step       6") && stdout.contains("stage 2:") && stdout.contains("transformer.wte.weight"),
        "{stdout}"
    );

    let export = dir.join("hf");
    let out = brigade(&["export", "--checkpoint", s, "--out", export.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(export.join("config.json").exists() && export.join("model.safetensors").exists());

    let input = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt-tiny/input.safetensors");
    let logits = dir.join("logits.safetensors");
    let out = brigade(&[
        "predict",
        "--checkpoint",
        s,
        "--input",
        input.to_str().unwrap(),
        "--output",
        logits.to_str().unwrap(),
        "--stages",
        "2",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let got = candle_core::safetensors::load(&logits, &candle_core::Device::Cpu).unwrap();
    assert_eq!(got["logits"].dims(), &[2, 16, 256]);

    // Greedy generation is deterministic and independent of the stage count.
    let gen = |stages: &str| {
        let out = brigade(&["generate", "--checkpoint", s, "--prompt", "The ", "--tokens", "12", "--stages", stages]);
        assert!(out.status.success(), "{:?}", text(&out));
        text(&out).0
    };
    let one = gen("1");
    assert!(one.starts_with("The "), "{one}");
    assert_eq!(one, gen("3"));
    // Sampling is seeded: the same seed gives the same text, another seed (almost surely) not.
    let sample = |seed: &str| {
        let out = brigade(&[
            "generate",
            "--checkpoint",
            s,
            "--prompt",
            "a",
            "--tokens",
            "40",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{:?}", text(&out));
        text(&out).0
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process killed in the middle of a save leaves the previous checkpoint as `latest`, and
/// the run resumes from it.
#[test]
fn killed_save_leaves_the_last_checkpoint_resumable() {
    let dir = temp_dir("killed");
    let save = dir.join("run");
    let s = save.to_str().unwrap();
    let mut args = vec!["train", "--stages", "2", "--save-dir", s, "--save-every", "1"];
    args.extend(SMALL);
    // Each save of 2 stages writes 4 shard files; abort on the 6th: in the middle of step 2's.
    let out = Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(&args)
        .env("BRIGADE_TEST_SAVE_FAULT", "abort:6")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the process should have been killed");
    let latest = std::fs::read_to_string(save.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000001");
    let partial =
        std::fs::read_dir(&save).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(partial, "the killed save should have left its hidden partial directory");
    assert!(!save.join("step-00000002").exists(), "a half-written checkpoint must never appear under its final name");

    let mut args = vec!["train", "--stages", "1", "--resume", s, "--save-dir", s];
    args.extend(SMALL);
    let out = brigade(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("step 1)"), "{stdout}");
    let leftovers =
        std::fs::read_dir(&save).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(!leftovers, "the next save should remove the dead save's partial directory");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fine-tuning from PyTorch weights: a Hugging Face GPT-2 directory, and torchvision ResNet
/// weights with the classifier left out.
#[test]
fn training_starts_from_pretrained_weights() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let gpt = fixtures.join("gpt-tiny");
    let mut args = vec!["train", "--init-from", gpt.to_str().unwrap(), "--stages", "2"];
    args.extend(SMALL);
    let out = brigade(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("init     28 weights"), "{stdout}");
    let resnet = fixtures.join("resnet-tiny/model.safetensors");
    let args = [
        "train",
        "--model",
        "resnet-tiny",
        "--init-from",
        resnet.to_str().unwrap(),
        "--init-skip",
        "fc.",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--plain",
    ];
    let out = brigade(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("init     72 weights"), "{stdout}");
}

/// A resumed run with only `--resume` continues the same run: the checkpoint's seed (and so
/// the same embedded data), its planned number of steps, and the same losses.
#[test]
fn resume_alone_continues_the_same_run() {
    let dir = temp_dir("resume-alone");
    let save = dir.join("run");
    let s = save.to_str().unwrap();
    let common = [
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
    let mut args = vec!["train", "--stages", "2", "--seed", "3", "--steps", "6", "--save-dir", s, "--save-every", "3"];
    args.extend(common);
    let out = brigade(&args);
    let (full, stderr) = text(&out);
    assert!(out.status.success(), "{full}{stderr}");
    let later = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| {
                ["step     4:", "step     5:", "step     6:"].iter().any(|p| l.starts_with(p)) && l.contains("| lr")
            })
            .map(|l| l.split(" | ").next().unwrap().to_string())
            .collect()
    };
    let step3 = save.join("step-00000003");
    let mut args = vec!["train", "--stages", "1", "--resume", step3.to_str().unwrap()];
    args.extend(common);
    let out = brigade(&args);
    let (resumed, stderr) = text(&out);
    assert!(out.status.success(), "{resumed}{stderr}");
    assert_eq!(later(&resumed), later(&full), "resumed:\n{resumed}\nfull:\n{full}");
    assert_eq!(later(&resumed).len(), 3);
    assert!(!resumed.contains("step     7:"), "the run should stop at the checkpoint's planned 6 steps: {resumed}");
    // The wrong data is refused rather than trained on.
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    assert_fails_with(
        &["train", "--resume", step3.to_str().unwrap(), "--data", readme, "--batch-size", "4", "--microbatches", "2"],
        "but this run's data is",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_commands_reject_bad_input() {
    let dir = temp_dir("ckpt-bad");
    assert_fails_with(&["inspect", "/nonexistent/brigade/ckpt"], "/nonexistent/brigade/ckpt");
    assert_fails_with(&["train", "--resume", dir.to_str().unwrap()], "no checkpoint here");
    // Argument syntax errors are clap's: exit code 2 and a usage hint, still no panic.
    let out = brigade(&["train", "--max-shard-size", "12 parsecs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("invalid size unit \"PARSECS\""), "{:?}", text(&out));
    assert_fails_with(
        &["export", "--checkpoint", dir.to_str().unwrap(), "--out", "/tmp/x", "--dtype", "f8"],
        "unknown dtype \"f8\"",
    );
    // A GPT checkpoint resumed as a ResNet.
    let save = dir.join("run");
    let s = save.to_str().unwrap();
    let mut args = vec!["train", "--stages", "1", "--save-dir", s];
    args.extend(SMALL);
    assert!(brigade(&args).status.success());
    assert_fails_with(
        &["train", "--resume", s, "--model", "resnet-tiny"],
        "checkpoint, but this run asks for resnet-tiny",
    );
    assert_fails_with(&["generate", "--checkpoint", s, "--prompt-ids", "1,999"], "beyond the vocabulary of 256");
    assert_fails_with(
        &["train", "--resume", s, "--steps", "2"],
        "nothing to train: --steps 2 is not beyond the checkpoint's step 4",
    );
    assert_fails_with(&["export", "--checkpoint", s, "--out", s], "is a checkpoint or save directory");
    assert_fails_with(&["train", "--steps", "0"], "nothing to train");
    let not_safetensors = temp_file("not.safetensors", b"hello");
    assert_fails_with(
        &["predict", "--checkpoint", s, "--input", not_safetensors.to_str().unwrap(), "--output", "/tmp/o.safetensors"],
        "cannot read",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every run leaves a JSON-lines record in its save directory (or `--log`): one record per
/// step with loss, learning rate, gradient norm, throughput and stage utilisation, one per
/// evaluation; a resume appends. `brigade plot` draws two runs on one chart, SVG and PNG.
#[test]
fn runs_are_logged_and_plotted() {
    let dir = std::env::temp_dir().join(format!("brigade-cli-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let save = dir.join("two-stages");
    let log = dir.join("one-stage.jsonl");
    let small = ["--batch-size", "4", "--context", "32", "--eval-every", "3", "--eval-batches", "1", "--plain"];
    let run = |extra: &[&str]| {
        let mut args = vec!["train"];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        let out = brigade(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["--steps", "4", "--stages", "2", "--microbatches", "2", "--save-dir", save.to_str().unwrap()]);
    run(&["--steps", "6", "--stages", "1", "--microbatches", "1", "--log", log.to_str().unwrap()]);

    let records = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let logged = records(&save.join("metrics.jsonl"));
    let kinds: Vec<&str> = logged.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["run", "step", "step", "step", "eval", "step", "eval", "save"]);
    assert_eq!(logged[0]["stages"], 2);
    assert_eq!(logged[0]["unit"], "tok/s");
    let steps: Vec<&serde_json::Value> = logged.iter().filter(|r| r["event"] == "step").collect();
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i as u64 + 1);
        assert!(s["loss"].as_f64().unwrap() > 0.0 && s["grad_norm"].as_f64().unwrap() > 0.0);
        assert!(s["lr"].as_f64().unwrap() > 0.0 && s["items_per_sec"].as_f64().unwrap() > 0.0);
        let util: Vec<f64> = s["stage_utilization"].as_array().unwrap().iter().map(|u| u.as_f64().unwrap()).collect();
        assert_eq!(util.len(), 2);
        assert!(util.iter().all(|u| *u > 0.0 && *u <= 1.0), "{util:?}");
    }
    let out =
        brigade(&["plot", save.to_str().unwrap(), log.to_str().unwrap(), "--out", dir.join("chart").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(dir.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("two-stages: 2 stages") && svg.contains("one-stage: 1 stage"),
        "{}",
        &svg[..200]
    );
    assert!(svg.matches("<polyline").count() >= 4, "a loss and a throughput line per run");
    let png = std::fs::read(dir.join("chart.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 480);

    // A resume appends: a second run record, then steps 5 and 6.
    let out = brigade(&[
        "train",
        "--resume",
        save.to_str().unwrap(),
        "--steps",
        "6",
        "--stages",
        "1",
        "--microbatches",
        "1",
        "--plain",
        "--eval-batches",
        "0",
        "--save-dir",
        save.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logged = records(&save.join("metrics.jsonl"));
    let resumed: Vec<(String, u64)> = logged
        .iter()
        .skip(8)
        .map(|r| (r["event"].as_str().unwrap().to_string(), r["step"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(resumed, [("run".to_string(), 0), ("step".into(), 5), ("step".into(), 6), ("save".into(), 6)]);
    assert_eq!(logged[8]["start_step"], 4);
    let _ = std::fs::remove_dir_all(&dir);
}
