//! `brigade` started by a multi-process launcher (mpirun, srun). This build trains in one
//! process, so a launch as several ranks must end every rank with one `error:` line before it
//! touches anything (no N runs racing for one save directory). The checks through the launchers'
//! environment variables always run; the one under a real `mpirun` skips, saying why, only when
//! mpirun is not installed (CI installs Open MPI).

use std::path::PathBuf;
use std::process::{Command, Output};

fn brigade() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_brigade"));
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        command.env_remove(var);
    }
    command
}

fn save_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-mpi-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train_args(dir: &std::path::Path) -> Vec<String> {
    ["train", "--steps", "2", "--save-dir", dir.to_str().unwrap()].iter().map(|s| s.to_string()).collect()
}

/// Exit code 1 and exactly one line, an `error:` naming the launch.
fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "should refuse; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{needle:?} expected in: {stderr}");
    assert!(out.stdout.is_empty(), "nothing may run before the refusal: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn every_launcher_environment_with_several_processes_is_refused_before_anything_runs() {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        let dir = save_dir(var);
        let out = brigade().args(train_args(&dir)).env(var, "2").output().expect("run brigade");
        assert_refused(&out, &format!("started as one of 2 processes ({var}=2)"));
        assert!(!dir.exists(), "{var}: the save directory must not be created");
    }
}

#[test]
fn one_process_under_a_launcher_runs_as_today() {
    // World size 1 (and a batch script's SLURM_NTASKS) is one process: training goes on to its
    // own checks (here a bad stage count, to stay quick).
    let out = brigade()
        .args(["train", "--stages", "0"])
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .env("SLURM_NTASKS", "4")
        .output()
        .expect("run brigade");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("at least one stage") && !stderr.contains("processes"), "{stderr}");
}

#[test]
fn under_mpirun_every_rank_refuses_and_the_job_ends() {
    let Ok(version) = Command::new("mpirun").arg("--version").output() else {
        println!("SKIPPED: mpirun is not installed (apt-get install openmpi-bin runs this test)");
        return;
    };
    assert!(version.status.success(), "mpirun --version failed");
    let dir = save_dir("mpirun");
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-n", "2", env!("CARGO_BIN_EXE_brigade")])
        .args(train_args(&dir))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run mpirun");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mpirun should fail: {stderr}");
    // Each rank refuses at once; mpirun may end the second before it prints, once the first
    // has failed, so one or two refusals, and no rank trained.
    let refusals = stderr.lines().filter(|l| l.starts_with("error: started as one of 2 processes")).count();
    assert!((1..=2).contains(&refusals), "each rank refuses once: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("step"), "no rank may train: {stdout}");
    assert!(!dir.exists(), "the save directory must not be created");
}
