//! `brigade` started by a multi-process launcher (mpirun, srun).
//!
//! Without the `mpi` feature brigade trains in one process, so a launch as several ranks must
//! end every rank with one `error:` line before it touches anything (no N runs racing for one
//! save directory). The checks through the launchers' environment variables always run; the one
//! under a real `mpirun` skips, saying why, only when mpirun is not installed (CI installs Open
//! MPI).
//!
//! With the feature (`cargo test --release --features mpi --test mpi`) the stages run as ranks:
//! 2-rank 1F1B equals the in-process 2-stage run bit for bit (losses and checkpoints), every
//! built-in schedule runs over 2 ranks and one over 4, checkpoints move from ranks to one
//! process and back, and a failing rank ends the job with one `error:` line naming it. A rank
//! killed mid-step (SIGKILL from outside) or mid-save (the save hook's abort between its shard
//! writes) ends the job within seconds, mpirun naming the rank and the signal and the surviving
//! rank printing one `error:` line naming the vanished rank, and `latest` keeps naming a
//! complete checkpoint that resumes on one process. A rank stopped mid-step (SIGSTOP) is named
//! by the survivors' `--rank-timeout` watchdog. Rank 0 prints, and logs, the bytes each link
//! carried per step. A watchdog fails, rather than hangs, a test whose job outlives its bound.

#[cfg(not(feature = "mpi"))]
use std::path::PathBuf;
use std::process::Command;
#[cfg(not(feature = "mpi"))]
use std::process::Output;

fn brigade() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_brigade"));
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        command.env_remove(var);
    }
    command
}

#[cfg(not(feature = "mpi"))]
fn save_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brigade-mpi-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[cfg(not(feature = "mpi"))]
fn train_args(dir: &std::path::Path) -> Vec<String> {
    ["train", "--steps", "2", "--save-dir", dir.to_str().unwrap()].iter().map(|s| s.to_string()).collect()
}

/// Exit code 1 and exactly one line, an `error:` naming the launch.
#[cfg(not(feature = "mpi"))]
fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "should refuse; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{needle:?} expected in: {stderr}");
    assert!(out.stdout.is_empty(), "nothing may run before the refusal: {}", String::from_utf8_lossy(&out.stdout));
}

#[cfg(not(feature = "mpi"))]
#[test]
fn every_launcher_environment_with_several_processes_is_refused_before_anything_runs() {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        let dir = save_dir(var);
        let out = brigade().args(train_args(&dir)).env(var, "2").output().expect("run brigade");
        assert_refused(&out, &format!("started as one of 2 processes ({var}=2)"));
        assert!(!dir.exists(), "{var}: the save directory must not be created");
    }
}

#[cfg(not(feature = "mpi"))]
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

#[cfg(not(feature = "mpi"))]
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

#[cfg(feature = "mpi")]
mod ranks {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    use super::brigade;

    /// A small GPT run; `extra` adds the layout. One thread per stage, own pools: what each
    /// rank does, so the in-process reference computes with the same thread counts.
    fn args(dir: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--plain",
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "8",
            "--microbatches",
            "4",
            "--context",
            "32",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--threads-per-stage",
            "1",
            "--thread-pools",
            "per-stage",
            "--save-every",
            "2",
            "--save-dir",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("brigade-ranks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// mpirun, or why this test cannot run here.
    fn mpirun() -> Option<Command> {
        match Command::new("mpirun").arg("--version").output() {
            Ok(out) if out.status.success() => {
                let mut c = Command::new("mpirun");
                c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
                Some(c)
            }
            _ => {
                println!(
                    "SKIPPED: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev runs this test)"
                );
                None
            }
        }
    }

    fn in_process(args: &[String]) -> Output {
        let out = brigade().args(args).output().expect("run brigade");
        assert!(out.status.success(), "in-process run failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn on_ranks(mpirun: &mut Command, n: usize, args: &[String]) -> Output {
        let out = mpirun
            .args(["--oversubscribe", "-n", &n.to_string(), env!("CARGO_BIN_EXE_brigade")])
            .args(args)
            .output()
            .expect("run mpirun");
        assert!(
            out.status.success(),
            "{n} ranks failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Step → loss from the run's metrics log (JSON: every digit of the f64).
    fn losses(dir: &Path) -> BTreeMap<u64, f64> {
        let log = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("event").and_then(|e| e.as_str()) == Some("step"))
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    }

    /// A safetensors file's tensor table (names, dtypes, shapes, offsets) and data bytes; the
    /// free-form metadata is left out (its JSON key order is a hash map's, not the tensors').
    fn tensors_of(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut table: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        table.as_object_mut().unwrap().remove("__metadata__");
        (table, bytes[8 + n..].to_vec())
    }

    /// Every safetensors file of the save directory's latest checkpoint, by name.
    fn latest_tensors(dir: &Path) -> BTreeMap<String, (serde_json::Value, Vec<u8>)> {
        let latest = std::fs::read_to_string(dir.join("latest")).expect("latest");
        let ckpt = dir.join(latest.trim());
        let files: BTreeMap<String, (serde_json::Value, Vec<u8>)> = std::fs::read_dir(&ckpt)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), tensors_of(&std::fs::read(&p).unwrap())))
            .collect();
        assert!(files.keys().any(|f| f.starts_with("model")), "no weights in {}", ckpt.display());
        files
    }

    /// brigade's `error:` lines. Open MPI may glue a log line of its own (`[host:pid] ...
    /// ORTE_ERROR_LOG: ...`) in front of one when several processes write stderr at once.
    fn error_lines(stderr: &str) -> Vec<&str> {
        stderr.match_indices("error: ").map(|(at, _)| stderr[at..].lines().next().unwrap_or_default()).collect()
    }

    #[test]
    fn two_rank_1f1b_is_the_in_process_run_bit_for_bit_and_checkpoints_move_both_ways() {
        let Some(mut mpi) = mpirun() else { return };
        let layout = ["--stages", "2", "--schedule", "1f1b"];
        let (one, two) = (dir("one-process"), dir("two-ranks"));
        let out = in_process(&args(&one, 4, &layout));
        let ranked = on_ranks(&mut mpi, 2, &args(&two, 4, &layout));
        // Rank 0 prints for the job: one summary.
        let stdout = String::from_utf8_lossy(&ranked.stdout);
        assert_eq!(stdout.lines().filter(|l| l.starts_with("done:")).count(), 1, "{stdout}");
        let reference = losses(&one);
        assert_eq!(reference.len(), 4, "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(losses(&two), reference, "2-rank 1F1B must equal the in-process run bit for bit");
        assert!(latest_tensors(&one) == latest_tensors(&two), "the checkpoints' tensors differ");
        assert_eq!(std::fs::read_to_string(two.join("latest")).unwrap().trim(), "step-00000004");

        // The 2-rank checkpoint continues on one process, and the 1-process one on 2 ranks.
        in_process(&args(&two, 6, &["--resume", two.to_str().unwrap(), "--schedule", "1f1b", "--stages", "2"]));
        let mut mpi = mpirun().unwrap();
        on_ranks(
            &mut mpi,
            2,
            &args(&one, 6, &["--resume", one.to_str().unwrap(), "--schedule", "1f1b", "--stages", "2"]),
        );
        let (a, b) = (losses(&one), losses(&two));
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "resumed across layouts, the runs must stay equal");
        assert!(latest_tensors(&one) == latest_tensors(&two), "the resumed checkpoints' tensors differ");
        let _ = std::fs::remove_dir_all(&one);
        let _ = std::fs::remove_dir_all(&two);
    }

    #[test]
    fn four_ranks_of_data_parallel_2_x_2_stages_are_the_in_process_run_and_resume_on_one_process() {
        let Some(mut mpi) = mpirun() else { return };
        let layout = ["--stages", "2", "--data-parallel", "2", "--schedule", "1f1b"];
        let (one, four) = (dir("dp-one-process"), dir("dp-four-ranks"));
        in_process(&args(&one, 4, &layout));
        // Ranks 0-1 run replica 0's two stages, ranks 2-3 replica 1's.
        let ranked = on_ranks(&mut mpi, 4, &args(&four, 4, &layout));
        let stdout = String::from_utf8_lossy(&ranked.stdout);
        assert!(stdout.contains("2 stages x 2 data-parallel replicas"), "{stdout}");
        let reference = losses(&one);
        assert_eq!(reference.len(), 4);
        // Each stage's gradients are summed in replica order in both runs, and every other sum
        // has at most two non-zero terms: the same bits.
        assert_eq!(losses(&four), reference, "DP 2 x PP 2 over 4 ranks must equal the in-process run");
        assert!(latest_tensors(&one) == latest_tensors(&four), "the checkpoints' tensors differ");

        // Only replica 0 wrote: one checkpoint per save, resumable on one process (one pipeline).
        let resume =
            |dir: &Path| args(dir, 6, &["--resume", dir.to_str().unwrap(), "--schedule", "1f1b", "--stages", "2"]);
        in_process(&resume(&four));
        in_process(&resume(&one));
        let (a, b) = (losses(&one), losses(&four));
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "the 4-rank checkpoint must continue on one process as the in-process one does");
        let _ = std::fs::remove_dir_all(&one);
        let _ = std::fs::remove_dir_all(&four);
    }

    #[test]
    fn a_world_that_does_not_fit_the_replicas_is_refused_before_training() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("dp-misfit");
        let out = mpi
            .args(["--oversubscribe", "-n", "3", env!("CARGO_BIN_EXE_brigade")])
            .args(args(&dir, 2, &["--stages", "2", "--data-parallel", "2"]))
            .output()
            .expect("run mpirun");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let errors = error_lines(&stderr);
        assert!(!errors.is_empty() && errors.iter().all(|e| e.contains("do not split over 3 processes")), "{stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("step "), "no rank may train");
        assert!(!dir.join("latest").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_built_in_schedule_runs_over_ranks_as_it_does_in_one_process() {
        // (schedule, stages, ranks): one stage per rank, and two per rank once.
        let cases: [(&str, usize, usize); 8] = [
            ("gpipe", 2, 2),
            ("interleaved-1f1b", 2, 2),
            ("zb-h1", 2, 2),
            ("zb-h2", 2, 2),
            ("zb-v", 2, 2),
            ("zb-auto", 2, 2),
            ("1f1b", 4, 4),
            ("1f1b", 4, 2),
        ];
        for (schedule, stages, n) in cases {
            let Some(mut mpi) = mpirun() else { return };
            let stages = stages.to_string();
            let layout = ["--stages", &stages, "--schedule", schedule];
            let (one, many) = (dir(&format!("{schedule}-{stages}-one")), dir(&format!("{schedule}-{stages}-{n}")));
            in_process(&args(&one, 2, &layout));
            on_ranks(&mut mpi, n, &args(&many, 2, &layout));
            let (a, b) = (losses(&one), losses(&many));
            assert_eq!(a.len(), 2, "{schedule}");
            for (step, loss) in &a {
                // Two partial norms sum alike in any order; four may associate differently (in
                // one process they sum in arrival order), a last-bit change of the clipping factor.
                let tolerance = if stages == "2" { 0.0 } else { 1e-6 * loss.abs() };
                assert!(
                    (loss - b[step]).abs() <= tolerance,
                    "{schedule} over {n} ranks, step {step}: {loss} vs {}",
                    b[step]
                );
            }
            let _ = std::fs::remove_dir_all(&one);
            let _ = std::fs::remove_dir_all(&many);
        }
    }

    #[test]
    fn a_failing_rank_ends_every_rank_with_one_error_line_naming_it() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("fault");
        // Stage 1 (rank 1's) fails writing its first checkpoint shard; rank 0 waits in the save.
        let started = Instant::now();
        let out = mpi
            .args(["--oversubscribe", "-n", "2", "-x", "BRIGADE_TEST_SAVE_FAULT=io:1:0", env!("CARGO_BIN_EXE_brigade")])
            .args(args(&dir, 4, &["--stages", "2"]))
            .output()
            .expect("run mpirun");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(60), "the job must end promptly");
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
        assert!(errors[0].starts_with("error: rank 1: ") && errors[0].contains("stage 1"), "{stderr}");
        assert!(!dir.join("latest").exists(), "no checkpoint was committed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job under a watchdog: stdout and stderr drained as they come (a full pipe would stall
    /// the ranks), and every process of the job killed if it outlives `limit`, so a hang fails
    /// the test instead of hanging it.
    struct Job {
        mpirun: std::process::Child,
        stdout: Option<std::thread::JoinHandle<String>>,
        stderr: Option<std::thread::JoinHandle<String>>,
    }

    impl Job {
        fn start(mpirun: &mut Command) -> Job {
            use std::io::Read;
            use std::process::Stdio;
            let mut child = mpirun.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run mpirun");
            let drain = |mut pipe: Box<dyn Read + Send>| {
                std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = pipe.read_to_end(&mut bytes);
                    String::from_utf8_lossy(&bytes).into_owned()
                })
            };
            let stdout = Some(drain(Box::new(child.stdout.take().unwrap())));
            let stderr = Some(drain(Box::new(child.stderr.take().unwrap())));
            Job { mpirun: child, stdout, stderr }
        }

        fn running(&mut self) -> bool {
            matches!(self.mpirun.try_wait(), Ok(None))
        }

        /// The pid of rank `rank`: the process under mpirun whose environment says so.
        fn rank_pid(&self, rank: usize) -> Option<u32> {
            let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
            descendants(self.mpirun.id()).into_iter().find(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == wanted.as_bytes()))
            })
        }

        /// Waits for the job to end (exit status, stdout, stderr); fails the test, after killing
        /// every process of the job, if it has not ended within `limit`.
        fn wait(&mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
            let deadline = Instant::now() + limit;
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let hung = self.running();
            self.kill();
            let status = self.mpirun.wait().expect("wait for mpirun");
            let stdout = self.stdout.take().and_then(|t| t.join().ok()).unwrap_or_default();
            let stderr = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
            assert!(
                !hung,
                "the job hung: still running {limit:?} on; killed it.\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
            (status, stdout, stderr)
        }

        /// Kills every process of the job still running (ranks first: mpirun killed first
        /// would leave them behind).
        fn kill(&mut self) {
            if self.running() {
                for pid in descendants(self.mpirun.id()) {
                    sigkill(pid);
                }
                let _ = self.mpirun.kill();
            }
        }
    }

    impl Drop for Job {
        /// A failed assertion must not leave the job running.
        fn drop(&mut self) {
            self.kill();
            let _ = self.mpirun.wait();
        }
    }

    /// `kill -9 pid`; whether the signal was sent.
    fn sigkill(pid: u32) -> bool {
        // SAFETY: kill(2) takes plain integers and touches no memory of this process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
    }

    /// Every process below `pid` (mpirun's ranks and anything they started), from /proc.
    fn descendants(pid: u32) -> Vec<u32> {
        let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter_map(|p| {
                        // `pid (comm) state ppid ...`: the command name may hold spaces, so
                        // parse after its closing parenthesis.
                        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                        let ppid = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()?;
                        Some((p, ppid))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut found = vec![pid];
        let mut at = 0;
        while at < found.len() {
            let parent = found[at];
            found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
            at += 1;
        }
        found.remove(0);
        found
    }

    /// The checkpoint `latest` names, after checking that it resumes on one process (one stage:
    /// another layout than the ranks') and trains `more` steps from where it stopped.
    fn resumes_on_one_process(dir: &Path, more: u64) -> u64 {
        let latest = std::fs::read_to_string(dir.join("latest")).expect("`latest` must survive the crash");
        let step: u64 = latest.trim().strip_prefix("step-").and_then(|s| s.parse().ok()).expect("a step directory");
        assert!(dir.join(latest.trim()).is_dir(), "`latest` names {latest}, which is gone");
        let out = in_process(&args(dir, step + more, &["--resume", dir.to_str().unwrap(), "--stages", "1"]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("step {step})")), "should resume from step {step}: {stdout}");
        let trained = losses(dir);
        assert!(
            (step + 1..=step + more).all(|s| trained.get(&s).is_some_and(|l| l.is_finite())),
            "the resumed run should log steps {} to {}: {trained:?}",
            step + 1,
            step + more
        );
        step
    }

    /// Exactly one `error:` line from brigade: the surviving rank 0 naming rank 1 as gone.
    fn assert_one_vanished_line(stderr: &str) {
        let errors = error_lines(stderr);
        assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
        assert!(errors[0].starts_with("error: rank 0: rank 1 vanished: its process ended"), "{stderr}");
    }

    /// `kill -STOP pid` or `kill -CONT pid`.
    fn signal(pid: u32, signal: libc::c_int) -> bool {
        // SAFETY: kill(2) takes plain integers and touches no memory of this process.
        unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
    }

    #[test]
    fn a_stopped_rank_is_named_by_the_watchdog_and_the_job_ends_within_seconds() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("stopped-rank");
        // Far more steps than the test waits for; a 2-second watchdog.
        let mut job = Job::start(mpi.args(["--oversubscribe", "-n", "2", env!("CARGO_BIN_EXE_brigade")]).args(args(
            &dir,
            100_000,
            &["--stages", "2", "--schedule", "1f1b", "--rank-timeout", "2"],
        )));
        let deadline = Instant::now() + Duration::from_secs(60);
        let committed = |dir: &Path| std::fs::read_to_string(dir.join("latest")).unwrap_or_default();
        while committed(&dir).trim() < "step-00000002" {
            assert!(job.running() && Instant::now() < deadline, "no checkpoint within a minute");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Rank 1 is in a step (or a save): alive, but it will never send again.
        let pid = job.rank_pid(1).expect("rank 1's process");
        assert!(signal(pid, libc::SIGSTOP), "cannot stop rank 1 (pid {pid})");
        let stopped = Instant::now();
        let ended = job.wait(Duration::from_secs(40));
        // However the job ended, the stopped process must not outlive the test.
        sigkill(pid);
        let (status, _, stderr) = ended;
        let took = stopped.elapsed();
        println!("ended {took:?} after the stop; stderr:\n{stderr}");
        assert!(!status.success(), "the job must fail: {stderr}");
        // 2 s of silence, then the abort: well within seconds even on a loaded machine.
        assert!(took >= Duration::from_secs(2), "the watchdog fired before its limit: {took:?}");
        assert!(took < Duration::from_secs(30), "the job should end within seconds of the limit: {took:?}");
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
        assert!(errors[0].starts_with("error: rank 0: nothing from rank 1 for 2 s while waiting for "), "{stderr}");
        assert!(errors[0].contains("--rank-timeout"), "the line should name the flag: {stderr}");
        resumes_on_one_process(&dir, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bytes_per_step_on_each_link_are_what_the_hand_off_shapes_imply() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("links");
        let out = on_ranks(&mut mpi, 2, &args(&dir, 3, &["--stages", "2", "--schedule", "1f1b"]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        // gpt-tiny (width 64), batch 8 in 4 micro-batches of 2, context 32: each micro-batch sends
        // one (2, 32, 64) f32 activation 0 -> 1 and one gradient of that shape 1 -> 0. The
        // evaluation's forwards (every 2 steps) are not training steps and are left out.
        let data = 4.0 * (2 * 32 * 64 * 4) as f64;
        // Each hand-off's data is sent as it lies, after a header of 8-byte words: magic,
        // device, kind, chunk, micro-batch, dtype, rank, and the three dimensions (80 bytes).
        let within = |bytes: f64| bytes == data + 4.0 * 80.0;
        let log = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
        let record: serde_json::Value = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "links")
            .unwrap_or_else(|| panic!("no links record in the metrics log:\n{log}"));
        assert_eq!(record["steps"], 3, "{record}");
        let links = record["links"].as_array().unwrap();
        assert_eq!(links.len(), 2, "{record}");
        for (from, to) in [(0, 1), (1, 0)] {
            let link = links.iter().find(|l| l["from"] == from && l["to"] == to).expect("link");
            let handoffs = link["handoff_bytes_per_step"].as_f64().unwrap();
            assert!(within(handoffs), "rank {from} -> {to}: {handoffs} bytes per step, {data} of data: {record}");
            assert_eq!(link["replica_bytes_per_step"], 0.0, "no data parallelism: {record}");
            let line = format!("link     rank {from} -> rank {to}: {handoffs:.0} bytes per step (hand-offs {handoffs:.0}, replica gradients 0)");
            assert!(stdout.contains(&line), "rank 0 should print {line:?}: {stdout}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rank_killed_mid_step_ends_the_job_and_leaves_the_last_checkpoint_resumable() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("killed-mid-step");
        // Far more steps than the test waits for: the job only ends by the kill.
        let mut job = Job::start(mpi.args(["--oversubscribe", "-n", "2", env!("CARGO_BIN_EXE_brigade")]).args(args(
            &dir,
            100_000,
            &["--stages", "2", "--schedule", "1f1b"],
        )));
        // Two checkpoints committed (so one replaced another as `latest`), and training on.
        let deadline = Instant::now() + Duration::from_secs(60);
        let committed = |dir: &Path| std::fs::read_to_string(dir.join("latest")).unwrap_or_default();
        while committed(&dir).trim() < "step-00000004" {
            assert!(job.running() && Instant::now() < deadline, "no second checkpoint within a minute");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Step 4's save has completed on both ranks (rank 0 commits after rank 1's shards are
        // in), so rank 1 is in step 5: computing, or waiting for rank 0's activations.
        let pid = job.rank_pid(1).expect("rank 1's process");
        assert!(sigkill(pid), "cannot kill rank 1 (pid {pid}): {}", std::io::Error::last_os_error());
        let killed = Instant::now();
        let (status, _, stderr) = job.wait(Duration::from_secs(30));
        assert!(!status.success(), "the job must fail: {stderr}");
        println!("ended {:?} after the kill; stderr:\n{stderr}", killed.elapsed());
        // Rank 1 cannot speak once killed: mpirun names it and the signal ("mpirun noticed that
        // process rank 1 with PID 0 on node ... exited on signal 9 (Killed)"; Open MPI 4.1 prints
        // PID 0 for a process killed from outside), and the survivor, ended by mpirun's SIGTERM,
        // names the rank whose process is gone.
        assert!(
            stderr.contains("rank 1") && stderr.contains("signal 9"),
            "stderr should name the killed rank and the signal: {stderr}"
        );
        assert_one_vanished_line(&stderr);
        resumes_on_one_process(&dir, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rank_killed_mid_save_leaves_the_previous_checkpoint_as_latest_and_resumable() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("killed-mid-save");
        let bin = env!("CARGO_BIN_EXE_brigade");
        let train = args(&dir, 100_000, &["--stages", "2", "--schedule", "1f1b"]);
        // Rank 1's stage writes 2 shard files per save (weights, optimizer state). The test hook
        // aborts the process (SIGABRT, no unwinding, no cleanup: as `kill -9` would) after its
        // 3rd file: in the middle of step 4's save, one file written, one not, while rank 0
        // waits for the save to complete. Only rank 1 gets the variable (`env` execs brigade,
        // same pid, same flags).
        let started = Instant::now();
        let mut job = Job::start(
            mpi.args(["--oversubscribe", "-n", "1", bin])
                .args(&train)
                .args([":", "-n", "1", "env", "BRIGADE_TEST_SAVE_FAULT=abort:3", bin])
                .args(&train),
        );
        let (status, stdout, stderr) = job.wait(Duration::from_secs(60));
        assert!(!status.success(), "the job must fail: {stderr}");
        println!("ended {:?} after the start; stderr:\n{stderr}", started.elapsed());
        assert!(
            stderr.contains("rank 1") && stderr.contains("signal 6"),
            "stderr should name the aborted rank and the signal: {stderr}"
        );
        assert_one_vanished_line(&stderr);
        assert_eq!(
            std::fs::read_to_string(dir.join("latest")).expect("latest").trim(),
            "step-00000002",
            "the interrupted save must not become `latest`: {stdout}"
        );
        assert!(
            !dir.join("step-00000004").exists(),
            "a half-written checkpoint must never appear under its final name"
        );
        // Killed between shard writes: the hidden staging directory holds rank 1's first file
        // (and whatever rank 0 wrote meanwhile), not all four shards, and no metadata.
        let partial = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(".step-00000004.partial-"))
            .expect("the killed save should have left its hidden partial directory");
        let written: Vec<String> = std::fs::read_dir(&partial)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let shards = written.iter().filter(|f| f.ends_with("-of-00002.safetensors")).count();
        assert!((1..4).contains(&shards), "the save should have died between shard writes: {written:?}");
        assert!(!written.iter().any(|f| f == "brigade.json"), "no metadata before every shard is in: {written:?}");
        assert_eq!(resumes_on_one_process(&dir, 2), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ranks_with_different_flags_or_a_world_that_does_not_fit_are_refused_before_training() {
        let Some(mut mpi) = mpirun() else { return };
        let dir = dir("misfit");
        let out = mpi
            .args(["--oversubscribe", "-n", "3", env!("CARGO_BIN_EXE_brigade")])
            .args(args(&dir, 2, &["--stages", "2"]))
            .output()
            .expect("run mpirun");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("2 stages do not split over 3 processes"), "{stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("step "), "nothing may train");

        let mut mpi = mpirun().unwrap();
        let bin = env!("CARGO_BIN_EXE_brigade");
        let a = args(&dir, 2, &["--stages", "2", "--lr", "0.001"]);
        let b = args(&dir, 2, &["--stages", "2", "--lr", "0.002"]);
        let out = mpi
            .args(["--oversubscribe", "-n", "1", bin])
            .args(&a)
            .arg(":")
            .args(["-n", "1", bin])
            .args(&b)
            .output()
            .expect("run mpirun");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("rank 1 was started with other flags than rank 0"), "{stderr}");
        assert!(!dir.join("latest").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
