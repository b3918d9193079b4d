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
    assert_fails_with(&["train", "--batch-size", "10", "--microbatches", "4"], "batch size 10 is not divisible by 4 micro-batches");
    assert_fails_with(&["train", "--stages", "0"], "at least one stage");
    assert_fails_with(&["train", "--stages", "5"], "cannot split 4 layers into 5 stages");
    assert_fails_with(&["train", "--split", "3,0"], "stage 1 of split 3,0 is empty");
    assert_fails_with(&["train", "--split", "1,1"], "split 1,1 covers 2 layers but the model has 4");
    assert_fails_with(&["train", "--schedule", "zigzag"], "unknown schedule \"zigzag\"");
    assert_fails_with(&["train", "--data", "/nonexistent/brigade/data.txt"], "/nonexistent/brigade/data.txt does not exist");

    let empty = temp_file("empty.txt", b"");
    assert_fails_with(&["train", "--data", empty.to_str().unwrap()], "is empty");
    let short = temp_file("short.txt", b"just a few bytes of text");
    assert_fails_with(&["train", "--data", short.to_str().unwrap()], "needs at least 65");

    let garbage = temp_file("bad.schedule", b"stage 0: 0F0 0X1\n");
    assert_fails_with(&["train", "--schedule", garbage.to_str().unwrap()], "0X1");
    // Parses, but stage 1 runs B0 before F1 needs it while stage 0 waits: a deadlock.
    let deadlock = temp_file(
        "deadlock.schedule",
        b"stage 0: 0F0 0B0 0F1 0B1\nstage 1: 1F1 1F0 1B0 1B1\n",
    );
    // The validator's message names the stuck actions, then draws the grid with markers.
    assert_fails_with_lines(&["schedule", "--schedule", deadlock.to_str().unwrap()], "deadlock: stage 0 is blocked at 0B0 waiting for 1B0", 4);
    let out = brigade(&["schedule", "--schedule", deadlock.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("<-- ERROR HERE"));
    // A valid schedule for the wrong number of stages.
    let two_stage = temp_file("two.schedule", b"stage 0: 0F0 0B0\nstage 1: 1F0 1B0\n");
    assert_fails_with(&["train", "--stages", "2", "--microbatches", "4", "--schedule", two_stage.to_str().unwrap()], "is for 2 stages and 1 micro-batches");

    assert_fails_with(&["train", "--model", "resnet-tiny", "--image-size", "4"], "at least 8x8");

    // Image files whose images and labels disagree, or that are not images at all.
    let dir = std::env::temp_dir().join(format!("brigade-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mismatched = dir.join("mismatched.safetensors");
    let images = candle_core::Tensor::zeros((4, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let labels = candle_core::Tensor::zeros(3, candle_core::DType::U32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("images", images.clone()), ("labels", labels)].into_iter().collect(), &mismatched).unwrap();
    assert_fails_with(&["train", "--model", "resnet-tiny", "--data", mismatched.to_str().unwrap()], "holds 4 images but `labels` holds 3 labels");
    let flat = dir.join("flat.safetensors");
    let flat_images = images.reshape((4, 768)).unwrap();
    let labels = candle_core::Tensor::zeros(4, candle_core::DType::U32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("images", flat_images), ("labels", labels)].into_iter().collect(), &flat).unwrap();
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
        "train", "--plain", "--steps", "40", "--eval-every", "20", "--eval-batches", "2", "--batch-size", "8",
        "--stages", "2", "--schedule", "gpipe",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("held-out loss"), "{stdout}");
    let done = stdout.lines().find(|l| l.starts_with("done:")).expect("summary line");
    // "done: 40 steps in 1.2s, train loss 5.55 -> 3.10, held-out loss 3.05"
    let nums: Vec<f64> = done
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|t| t.parse().ok())
        .collect();
    let (first, last) = (nums[nums.len() - 3], nums[nums.len() - 2]);
    assert!(last < first - 1.0, "loss did not fall: {done}");
}

#[test]
fn resnet_trains_from_the_cli_with_a_split() {
    let out = brigade(&[
        "train", "--model", "resnet-tiny", "--plain", "--steps", "4", "--eval-every", "4", "--eval-batches", "1",
        "--batch-size", "8", "--stages", "3", "--split", "2,3,1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("layers 2,3,1"), "{stdout}");
    assert!(stdout.contains("accuracy"), "{stdout}");
}
