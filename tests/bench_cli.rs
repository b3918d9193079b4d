//! `brigade profile`, `plan`, `bench` and `train --partition balanced-time` end to end, and
//! their bad-input errors.

use std::process::{Command, Output};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn assert_fails_with(args: &[&str], needle: &str) {
    let out = brigade(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: expected {needle:?} in {stderr}");
}

#[test]
fn bad_bench_input_gets_one_clear_line() {
    // A GPU in a CPU build says how to get one; a device that does not exist names the forms.
    if !cfg!(feature = "cuda") {
        assert_fails_with(&["profile", "--device", "cuda"], "built without GPU support");
        assert_fails_with(&["train", "--steps", "1", "--device", "cuda"], "--features cuda");
        assert_fails_with(&["bench", "--layouts", "2", "--devices", "cuda:0,cuda:1"], "built without GPU support");
    }
    assert_fails_with(&["profile", "--device", "tpu"], "unknown device \"tpu\"");
    assert_fails_with(&["train", "--steps", "1", "--devices", "cpu,cpu,cpu"], "3 devices for 2 stages");

    assert_fails_with(&["bench", "--layouts", "0"], "at least one stage");
    assert_fails_with(&["bench", "--rounds", "0"], "--rounds must be at least 1");
    assert_fails_with(&["bench", "--layouts", "2x"], "bad layout \"2x\"");
    assert_fails_with(&["bench", "--microbatches", "3"], "batch size 16 is not divisible by 3 micro-batches");
    assert_fails_with(&["bench", "--schedules", "zigzag"], "unknown schedule `zigzag`");
    assert_fails_with(&["plan", "--devices", "0"], "--devices must be at least 1");
    assert_fails_with(&["plan", "--memory-limit", "0"], "--memory-limit must be a positive number");
    assert_fails_with(&["plan", "--microbatches", "3,5"], "divides the batch size 16");
    assert_fails_with(
        &["simulate", "--profile", "/nonexistent/profile.json"],
        "cannot read profile /nonexistent/profile.json",
    );
}

#[test]
fn profile_plan_and_bench_run_end_to_end() {
    let dir = std::env::temp_dir().join(format!("brigade-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let profile_path = dir.join("profile.json");
    let out = brigade(&[
        "profile",
        "--microbatch-size",
        "2",
        "--context",
        "16",
        "--repeats",
        "1",
        "--out",
        profile_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile_path).unwrap()).unwrap();
    assert_eq!(profile["layers"].as_array().unwrap().len(), 4);
    assert_eq!(profile["microbatch_size"], 2);

    // Any schedule, here a hand-written one with split backwards, simulated from the profile.
    let schedule = dir.join("split.schedule");
    std::fs::write(&schedule, "stage 0: 0F0 0F1 0I0 0W0 0I1 0W1\nstage 1: 1F0 1I0 1F1 1I1 1W0 1W1\n").unwrap();
    let out = brigade(&[
        "simulate",
        "--profile",
        profile_path.to_str().unwrap(),
        "--schedule",
        schedule.to_str().unwrap(),
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--split",
        "3,1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("schedule custom, 2 stages (layers 3,1), 2 micro-batches of 2"), "{stdout}");
    assert!(stdout.contains("| 0 | 0: 0..3 |") && stdout.contains("| 1 | 1: 3..4 |"), "{stdout}");
    // Stage 1 runs F, I back to back: one micro-batch stashed at a time; stage 0 holds both.
    assert!(stdout.lines().any(|l| l.starts_with("| 0 | 0: 0..3 |") && l.contains("| 2 |")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("| 1 | 1: 3..4 |") && l.contains("| 1 |")), "{stdout}");
    assert_fails_with(
        &[
            "simulate",
            "--profile",
            profile_path.to_str().unwrap(),
            "--schedule",
            schedule.to_str().unwrap(),
            "--microbatches",
            "4",
        ],
        "--microbatches 4 disagrees with the schedule file, which is for 2 stages and 2 micro-batches",
    );
    // Counts that would take hours or all memory are refused, not attempted.
    assert_fails_with(
        &["simulate", "--profile", profile_path.to_str().unwrap(), "--microbatches", "1000000000"],
        "more than the 1000000",
    );
    assert_fails_with(
        &["simulate", "--profile", profile_path.to_str().unwrap(), "--stages", "100000"],
        "--stages 100000 is more than brigade runs (4096)",
    );
    assert_fails_with(
        &["simulate", "--profile", profile_path.to_str().unwrap(), "--stages", "9"],
        "the profile has 4 layers, so at most 4 stages",
    );

    let out = brigade(&[
        "plan",
        "--devices",
        "2",
        "--batch-size",
        "8",
        "--microbatches",
        "2,4",
        "--context",
        "16",
        "--profile-repeats",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 1 stage: one partition; 2 stages: up to three; x 2 schedules x 2 micro-batch counts.
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| rank")).collect();
    assert!(rows.len() >= 8, "{stdout}");
    assert!(rows[0].starts_with("| 1 |"), "{stdout}");
    assert!(stdout.contains("Recommended: "), "{stdout}");

    // In this process (the default) and a fresh process per configuration: same report.
    for mode in [None, Some("--process-per-run")] {
        let bench_dir = dir.join(format!("bench{}", mode.unwrap_or("")));
        let mut args = vec![
            "bench",
            "--plain",
            "--layouts",
            "1,2",
            "--schedules",
            "1f1b",
            "--microbatches",
            "2",
            "--batch-size",
            "4",
            "--context",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--profile-repeats",
            "1",
            "--out",
            bench_dir.to_str().unwrap(),
        ];
        args.extend(mode);
        let out = brigade(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        // A context override makes a custom GPT, named by its sizes.
        assert!(stdout.contains("ctx=16, embd=64, layers=2, heads=4) | 1 4 (uniform) | 1f1b | 1 | 2 |"), "{stdout}");
        assert!(stdout.contains("ctx=16, embd=64, layers=2, heads=4) | 2 2,2 (uniform) | 1f1b | 1 | 2 |"), "{stdout}");
        assert!(stdout.contains("simulator's worst error"), "{stdout}");
        // Three rounds (the default) of one step each, and the first configuration twice per
        // round: its two copies' gap is the noise, set beside the simulator's error.
        assert!(stdout.contains("3 round(s) of 1 measured step(s) per configuration"), "{stdout}");
        assert!(stdout.contains("noise: 1 stage(s), 1f1b, m=2 ran twice per round"), "{stdout}");
        assert!(stdout.contains("simulator against the noise: mean |error| "), "{stdout}");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bench_dir.join("bench.json")).unwrap()).unwrap();
        assert_eq!(json["rows"].as_array().unwrap().len(), 2);
        assert!(json["rows"].as_array().unwrap().iter().all(|r| r["steps"] == 3), "{json}");
        let rounds = json["rounds_by_run"].as_array().unwrap();
        assert!(rounds.iter().all(|r| r["round_medians_s"].as_array().unwrap().len() == 3), "{json}");
        assert!(json["noise"]["apart"].as_f64().unwrap() >= 0.0, "{json}");
        assert!(json["simulator"]["mean_abs_error"].as_f64().unwrap() >= 0.0, "{json}");
        for run in [
            "gpt_vocab_256_ctx_16_embd_64_layers_2_heads_4-p1-1f1b-m2",
            "gpt_vocab_256_ctx_16_embd_64_layers_2_heads_4-p2-1f1b-m2",
        ] {
            let trace: serde_json::Value =
                serde_json::from_slice(&std::fs::read(bench_dir.join(format!("{run}.trace.json"))).unwrap()).unwrap();
            assert!(!trace["traceEvents"].as_array().unwrap().is_empty());
            assert!(std::fs::read_to_string(bench_dir.join(format!("{run}.svg"))).unwrap().starts_with("<svg"));
        }
    }
}

#[test]
fn train_accepts_balanced_time() {
    let out = brigade(&[
        "train",
        "--plain",
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--batch-size",
        "4",
        "--context",
        "16",
        "--stages",
        "2",
        "--partition",
        "balanced-time",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("pipeline ")).expect("pipeline line");
    assert!(line.contains("2 stages (layers "), "{line}");
}
