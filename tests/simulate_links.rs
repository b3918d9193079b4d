//! `brigade simulate` and `brigade plan` on a cluster: links, nodes, data parallelism, the GPU
//! FLOP model of `--model`, and clear errors for bad link specs and layouts.

use std::process::{Command, Output};

fn brigade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brigade")).args(args).output().expect("run brigade")
}

fn stdout_of(args: &[&str]) -> String {
    let out = brigade(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exits with `code` and an `error:` line containing `needle`.
fn assert_fails_with(args: &[&str], code: i32, needle: &str) {
    let out = brigade(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?} should fail; stderr: {stderr}");
    let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(first.starts_with("error: ") && stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
}

const TINY: [&str; 8] = ["simulate", "--model", "gpt-tiny", "--stages", "2", "--microbatches", "1", "--split=2,2"];

#[test]
fn a_slow_link_adds_its_hand_offs_to_a_one_microbatch_chain() {
    // In one process the modelled profile's messages are free.
    let free = stdout_of(&TINY);
    assert!(free.contains("communication costs the step 0.00 ms; bytes per step: in-process 16 KB"), "{free}");
    assert!(!free.contains("replica(s)"), "no cluster line for today's layout: {free}");
    // Two nodes of one GPU: gpt-tiny hands off 1 x 64 tokens x 64 wide x 2 bytes = 8192 bytes,
    // which at 8.192 MB/s take 1 ms, plus 1 ms latency: 2 ms each way on the critical path.
    let mut args = TINY.to_vec();
    args.extend(["--gpus-per-node", "1", "--node-link", "ethernet:0.008192:1000"]);
    let slow = stdout_of(&args);
    assert!(slow.contains("communication costs the step 4.00 ms; bytes per step: ethernet 16 KB"), "{slow}");
    assert!(slow.contains("1 replica(s) x 2 stage(s) = 2 device(s) on 2 node(s) of 1"), "{slow}");
    let step = |text: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with("predicted step ")).unwrap();
        line["predicted step ".len()..].split(' ').next().unwrap().parse().unwrap()
    };
    assert!((step(&slow) - step(&free) - 4.0).abs() < 0.011, "{} vs {}", step(&slow), step(&free));
}

#[test]
fn data_parallel_all_reduces_on_the_link_it_crosses() {
    let layout = ["--link", "nvlink", "--gpus-per-node", "4", "--nodes", "2", "--data-parallel", "4"];
    let mut pipeline_in_node = TINY.to_vec();
    pipeline_in_node.extend(layout);
    let pp = stdout_of(&pipeline_in_node);
    assert!(pp.contains("4 replica(s) x 2 stage(s) = 8 device(s) on 2 node(s) of 4 (pipeline-in-node)"), "{pp}");
    assert!(pp.contains("global batch 4 x 1 x 1 = 4"), "{pp}");
    // Hand-offs inside a node, the all-reduce's ring across nodes: bytes on both links.
    assert!(pp.contains("bytes per step: nvlink") && pp.contains("infiniband"), "{pp}");
    let mut dp_in_node = pipeline_in_node.clone();
    dp_in_node.extend(["--placement", "dp"]);
    let dp = stdout_of(&dp_in_node);
    assert!(dp.contains("(data-parallel-in-node)"), "{dp}");
    let all_reduce = |text: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with("| 0 |")).unwrap();
        line.trim_end_matches(" |").rsplit("| ").next().unwrap().parse().unwrap()
    };
    assert!(all_reduce(&pp) > 0.0 && all_reduce(&dp) < all_reduce(&pp), "{pp}\n{dp}");
}

#[test]
fn bad_links_and_layouts_get_one_clear_error() {
    let with = |extra: &[&'static str]| {
        let mut args = TINY.to_vec();
        args.extend_from_slice(extra);
        args
    };
    // Syntax (clap): exit code 2.
    assert_fails_with(&with(&["--link", "warp"]), 2, "unknown link kind `warp`");
    assert_fails_with(&with(&["--node-link", "infiniband:0"]), 2, "bandwidth must be a positive number (GB/s)");
    assert_fails_with(&with(&["--link", "nvlink:450:2:9"]), 2, "KIND[:GBPS[:LATENCY_US]]");
    assert_fails_with(&with(&["--placement", "diagonal"]), 2, "pipeline-in-node");
    assert_fails_with(&["simulate", "--model", "gpt-tiny", "--profile", "p.json"], 2, "cannot be used with");
    // Layouts that cannot exist: exit code 1.
    assert_fails_with(&with(&["--nodes", "2"]), 1, "--gpus-per-node");
    assert_fails_with(
        &with(&["--data-parallel", "8", "--gpus-per-node", "4", "--nodes", "2"]),
        1,
        "need 16 devices, but 2 nodes x 4 devices hold 8",
    );
    assert_fails_with(
        &with(&["--gpus-per-node", "1", "--node-link", "in-process"]),
        1,
        "nodes cannot be joined in-process",
    );
    assert_fails_with(&["simulate", "--model", "resnet18"], 1, "covers the GPT and Llama presets");
    assert_fails_with(&with(&["--context", "65"]), 1, "gpt-tiny takes 1 to 64 tokens");
    assert_fails_with(&with(&["--utilisation", "1.5"]), 1, "at most 1");
}

#[test]
fn plan_lays_replicas_on_the_nodes() {
    // 2 replicas on one node of 2 devices: only one stage per replica fits.
    let out = stdout_of(&[
        "plan",
        "--devices",
        "2",
        "--batch-size",
        "8",
        "--microbatches",
        "1,2",
        "--context",
        "16",
        "--profile-repeats",
        "1",
        "--schedules",
        "1f1b",
        "--recompute",
        "off",
        "--data-parallel",
        "2",
        "--gpus-per-node",
        "2",
        "--nodes",
        "1",
        "--link",
        "shm",
    ]);
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| rank")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r.split(" | ").nth(1) == Some("1")), "{out}");
    assert_fails_with(
        &["plan", "--batch-size", "7", "--data-parallel", "2", "--context", "16"],
        1,
        "does not split evenly over 2 data-parallel replicas",
    );
}
