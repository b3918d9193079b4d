//! How a job of ranks ends when one of them fails, dies or hangs: within seconds, with exactly
//! one `error:` line from brigade naming the rank and the cause, wherever brigade can speak.
//!
//! - **A rank that fails** (an error, a corrupt message, a watchdog firing) prints its line,
//!   tells every other rank that it is ending the job (a tiny point-to-point notice), and calls
//!   `MPI_Abort`. The launcher then ends the others, which stay quiet: their peer spoke.
//! - **A rank that dies without a word** (SIGKILL, a segfault, an OOM kill) cannot speak, and
//!   the launcher ends the rest with SIGTERM. The survivors catch it; the lowest-numbered one
//!   names the rank whose process is gone (every rank knows every rank's host and pid, so a
//!   peer on the same host is checked through `/proc`) and exits. mpirun adds its own lines
//!   naming the rank and the signal.
//! - **A rank that is alive but silent** (SIGSTOP, a deadlocked layer, a hung network) is caught
//!   by the watchdog: a rank waiting on a peer (for a hand-off, a replica's gradients, or a
//!   collective the peer has not entered) measures the time since its last message *from that
//!   peer* and fails once it passes `--rank-timeout`. The silence, not the wait, is measured, so
//!   a peer busy in a long compute is not a hang until it has been quiet that long.
//!
//! Checkpoints stay intact in every case: a save commits atomically under `latest` only after
//! every rank's shards are in, so a job ended mid-save leaves the previous one as `latest`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The launcher's SIGTERM (or SIGINT) arrived: the job is being ended.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    // An atomic store is all a signal handler may safely do; the communication thread acts.
    TERMINATED.store(true, Ordering::SeqCst);
}

/// Catches SIGTERM and SIGINT, so a rank ended by its launcher can say why before it exits.
pub(super) fn catch_termination() {
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub(super) fn terminated() -> bool {
    TERMINATED.load(Ordering::SeqCst)
}

/// The watchdog's default: long enough for any legitimate silence of a healthy peer (README,
/// "Multi-process (MPI)": a step, an evaluation, a checkpoint save or a model load), short
/// enough that a hung job gives its nodes back within minutes.
pub const DEFAULT_RANK_TIMEOUT: Duration = Duration::from_secs(300);

/// How far the communication thread may lag before the watchdog distrusts its own clock.
const PULSE_LAG_MS: u64 = 1000;

/// What every thread of the process knows of its peers' health.
pub(super) struct Health {
    rank: usize,
    epoch: Instant,
    /// By rank: when its last message arrived here (ms since `epoch`).
    heard: Vec<AtomicU64>,
    timeout_ms: AtomicU64,
    /// When the communication thread last turned (ms since `epoch`): it turns every few
    /// milliseconds at most, so an old pulse means this process itself was stopped or starved.
    pulse: AtomicU64,
    /// When the communication thread last turned after a lag longer than `PULSE_LAG_MS` (ms
    /// since `epoch`): this process was stopped or starved until then, so no peer's silence
    /// counts from before it.
    resumed: AtomicU64,
    /// This process has printed its `error:` line, or is ending quietly: nothing more.
    reported: AtomicBool,
    /// By rank: it announced that it is ending the job and reports why itself.
    announced: Vec<AtomicBool>,
    /// (host, pid) of every rank.
    places: OnceLock<Vec<(String, u32)>>,
}

impl Health {
    pub fn new(rank: usize, size: usize) -> Self {
        Self {
            rank,
            epoch: Instant::now(),
            heard: (0..size).map(|_| AtomicU64::new(0)).collect(),
            timeout_ms: AtomicU64::new(DEFAULT_RANK_TIMEOUT.as_millis() as u64),
            pulse: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            announced: (0..size).map(|_| AtomicBool::new(false)).collect(),
            places: OnceLock::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The communication thread is turning.
    pub fn pulse(&self) {
        let now = self.now_ms();
        let previous = self.pulse.swap(now, Ordering::SeqCst);
        if now.saturating_sub(previous) > PULSE_LAG_MS {
            self.resumed.store(now, Ordering::SeqCst);
        }
    }

    pub fn heard_from(&self, rank: usize) {
        if let Some(at) = self.heard.get(rank) {
            at.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Every rank took part in a collective: each has just been heard from.
    pub fn heard_from_all(&self) {
        let now = self.now_ms();
        self.heard.iter().for_each(|at| at.store(now, Ordering::Relaxed));
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// The watchdog's complaint, if `peer` (which this rank waits on for `what`) has sent
    /// nothing for longer than the rank timeout.
    /// Quiet while the job is ending anyway (a peer announced its failure, the launcher is
    /// ending it) and while this process's own communication thread lags: a rank that was
    /// itself stopped and then continued (the launcher sends SIGCONT before SIGTERM) sees every
    /// peer silent, and must not blame them.
    pub fn silent_too_long(&self, peer: usize, what: &str) -> Option<String> {
        if terminated() || self.announced.iter().any(|a| a.load(Ordering::SeqCst)) {
            return None;
        }
        if self.now_ms().saturating_sub(self.pulse.load(Ordering::SeqCst)) > PULSE_LAG_MS {
            return None;
        }
        // Silence is counted from the later of the peer's last message and this process's own
        // resumption: continued after a stop, the communication thread may turn (and pulse)
        // before it has read the notice that a peer is ending the job.
        let last = self.heard.get(peer)?.load(Ordering::Relaxed).max(self.resumed.load(Ordering::SeqCst));
        let silent = Duration::from_millis(self.now_ms().saturating_sub(last));
        let timeout = self.timeout();
        (silent > timeout).then(|| {
            format!(
                "nothing from rank {peer} for {} s while waiting for {what}: rank {peer} is stopped, deadlocked or \
                 cut off; ending the job (--rank-timeout {} sets this limit)",
                timeout.as_secs_f64(),
                timeout.as_secs_f64()
            )
        })
    }

    /// Prints this rank's one `error:` line, unless it has printed one already.
    pub fn report(&self, why: &str) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            eprintln!("error: rank {}: {why}", self.rank);
        }
    }

    /// From now on this rank says nothing (it is ending the job quietly).
    pub fn stay_quiet(&self) {
        self.reported.store(true, Ordering::SeqCst);
    }

    pub fn announced(&self, rank: usize) {
        if let Some(flag) = self.announced.get(rank) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    pub fn set_places(&self, places: Vec<(String, u32)>) {
        let _ = self.places.set(places);
    }

    /// How many ranks run on this rank's host, itself included (1 before the places are known).
    pub fn ranks_on_host(&self) -> usize {
        let Some(places) = self.places.get() else { return 1 };
        let Some((here, _)) = places.get(self.rank) else { return 1 };
        places.iter().filter(|(host, _)| host == here).count().max(1)
    }

    /// What this rank says when the launcher ends the job, or `None` where another rank speaks:
    /// a rank that announced its failure, or a lower-numbered survivor.
    pub fn on_termination(&self) -> Option<String> {
        if self.reported.load(Ordering::SeqCst) || self.announced.iter().any(|a| a.load(Ordering::SeqCst)) {
            return None;
        }
        let places = self.places.get()?;
        let here = &places.get(self.rank)?.0;
        let gone: Vec<usize> = places
            .iter()
            .enumerate()
            .filter(|&(rank, (host, pid))| rank != self.rank && host == here && !process_alive(*pid))
            .map(|(rank, _)| rank)
            .collect();
        let first_survivor = (0..places.len()).find(|r| !gone.contains(r))?;
        if first_survivor != self.rank {
            return None;
        }
        Some(match gone.as_slice() {
            [] => "the launcher is ending the job (it was cancelled, or a rank on another host ended without a \
                   word: the launcher's message names it)"
                .to_string(),
            [one] => format!(
                "rank {one} vanished: its process ended without reporting an error (killed, or crashed: the \
                 launcher's message gives the signal); ending the job"
            ),
            many => format!(
                "ranks {} vanished: their processes ended without reporting an error (killed, or crashed: the \
                 launcher's message gives the signal); ending the job",
                many.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
            ),
        })
    }
}

/// This host's name (`/proc/sys/kernel/hostname`, or the environment's).
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Whether process `pid` on this host still runs (a zombie, dead but not yet reaped by the
/// launcher, counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|at| stat[at + 1..].split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_measures_a_peers_silence_and_names_it() {
        let health = Health::new(0, 3);
        health.set_timeout(Duration::from_millis(30));
        health.heard_from_all();
        assert!(health.silent_too_long(1, "a hand-off").is_none(), "just heard from");
        std::thread::sleep(Duration::from_millis(60));
        health.heard_from(2);
        health.pulse();
        let complaint = health.silent_too_long(1, "the gradient of micro-batch 3").expect("rank 1 is silent");
        assert!(complaint.starts_with("nothing from rank 1 for 0.03 s while waiting for the gradient"), "{complaint}");
        assert!(health.silent_too_long(2, "a hand-off").is_none(), "rank 2 spoke since");
        health.announced(2);
        assert!(health.silent_too_long(1, "a hand-off").is_none(), "rank 2 is ending the job and reports it");
    }

    #[test]
    fn a_rank_continued_after_a_stop_does_not_blame_its_peers() {
        let health = Health::new(0, 2);
        health.set_timeout(Duration::from_millis(30));
        health.heard_from_all();
        health.pulse();
        // Stopped (SIGSTOP) for longer than the timeout and the pulse lag, then continued: the
        // communication thread turns once before it reads anything.
        std::thread::sleep(Duration::from_millis(PULSE_LAG_MS + 100));
        health.pulse();
        assert!(health.silent_too_long(1, "a hand-off").is_none(), "the silence began with our own stop");
        // A timeout's worth of silence after resuming does count.
        std::thread::sleep(Duration::from_millis(60));
        health.pulse();
        assert!(health.silent_too_long(1, "a hand-off").is_some(), "rank 1 silent since we resumed");
    }

    #[test]
    fn a_rank_counts_the_ranks_on_its_own_host() {
        let health = Health::new(1, 4);
        assert_eq!(health.ranks_on_host(), 1, "before the places arrive");
        let places = ["a", "b", "b", "c"].iter().map(|h| (h.to_string(), 1)).collect();
        health.set_places(places);
        assert_eq!(health.ranks_on_host(), 2);
        let alone = Health::new(3, 4);
        alone.set_places(["a", "b", "b", "c"].iter().map(|h| (h.to_string(), 1)).collect());
        assert_eq!(alone.ranks_on_host(), 1);
    }

    #[test]
    fn the_lowest_survivor_names_a_vanished_peer_and_an_announced_failure_silences_everyone() {
        // A pid that cannot exist on Linux (above pid_max's ceiling of 2^22).
        let me = std::process::id();
        let places = |pids: [u32; 3]| pids.iter().map(|&p| ("h".to_string(), p)).collect::<Vec<_>>();
        let survivor = Health::new(0, 3);
        survivor.set_places(places([me, 1 << 23, me]));
        let said = survivor.on_termination().expect("rank 0 speaks");
        assert!(said.starts_with("rank 1 vanished"), "{said}");
        let other = Health::new(2, 3);
        other.set_places(places([me, 1 << 23, me]));
        assert!(other.on_termination().is_none(), "rank 0 speaks for the survivors");
        let quiet = Health::new(0, 3);
        quiet.set_places(places([me, me, me]));
        quiet.announced(1);
        assert!(quiet.on_termination().is_none(), "rank 1 reported its own failure");
    }
}
