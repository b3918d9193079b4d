//! Doorbells: how a communication thread is woken, by its own process (a stage sent a hand-off
//! to another rank, or started waiting on one; a job) and by the other ranks on its host (they
//! just sent it a message), so that it sleeps while nothing comes instead of probing.
//!
//! Why: Open MPI's shared-memory transport has nothing a thread can block on until a message
//! arrives; only a probe finds one. Polling every 25 to 100 µs while a stage waited on another
//! rank cost each rank about 700 wake-ups and 13 ms of CPU per step of the side-by-side GPT
//! (2 ranks on 2 cores), CPU taken from the cores its stages compute on, and still left each
//! hand-off up to a poll interval late. A bell is a 32-bit counter in shared memory: ringing
//! adds one and wakes whoever waits on it (`FUTEX_WAKE`); the communication thread notes the
//! count before it probes and sleeps only while the count is unchanged (`FUTEX_WAIT` on that
//! value), so a ring between its probe and its sleep is never lost.
//!
//! Each process's bell is a small file under `/dev/shm` that its peers on the same host map;
//! the file is unlinked once they have (the mappings stay). Where it cannot be made (no
//! `/dev/shm`), the bell lives in this process's memory alone and still serves its own
//! threads; peers on other hosts, or without a bell, are polled as before (`comm.rs`).

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use memmap2::MmapMut;

/// Second word of a bell's memory: a file that does not carry it is not a bell.
const BELL_MAGIC: u32 = 0x6265_6c6c;
/// A bell's memory: the counter, then the magic word.
const BELL_BYTES: usize = 8;

/// One process's doorbell (its own, or a peer's mapped here).
pub(super) struct Bell {
    map: MmapMut,
    /// The file's path while it exists (only for this process's own, shared bell).
    path: Mutex<Option<PathBuf>>,
}

impl Bell {
    /// This process's bell: shared through a new file under `/dev/shm` when possible.
    pub fn new() -> Result<Self, String> {
        let bell = match Self::create_shared() {
            Some(shared) => shared,
            None => Self {
                map: MmapMut::map_anon(BELL_BYTES).map_err(|e| format!("cannot map the MPI thread's bell: {e}"))?,
                path: Mutex::new(None),
            },
        };
        bell.magic().store(BELL_MAGIC, Ordering::SeqCst);
        Ok(bell)
    }

    fn create_shared() -> Option<Self> {
        let path =
            PathBuf::from(format!("/dev/shm/brigade-bell-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).ok()?;
        let mapped = file.set_len(BELL_BYTES as u64).ok().and_then(|_| {
            // SAFETY: the file is new, named with a random suffix, and sized here; other
            // processes only ever touch it through the atomics below.
            unsafe { MmapMut::map_mut(&file) }.ok()
        });
        match mapped {
            Some(map) => Some(Self { map, path: Mutex::new(Some(path)) }),
            None => {
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// A peer's bell on this host, by the name it published, if it is still there and is one.
    pub fn open(name: &str) -> Option<Self> {
        if !name.starts_with("/dev/shm/brigade-bell-") {
            return None;
        }
        let file = OpenOptions::new().read(true).write(true).open(name).ok()?;
        if file.metadata().ok()?.len() < BELL_BYTES as u64 {
            return None;
        }
        // SAFETY: a bell file is only ever accessed through the atomics below.
        let map = unsafe { MmapMut::map_mut(&file) }.ok()?;
        let bell = Self { map, path: Mutex::new(None) };
        (bell.magic().load(Ordering::SeqCst) == BELL_MAGIC).then_some(bell)
    }

    /// The name peers open this bell by; `None` when it is not shared.
    pub fn name(&self) -> Option<String> {
        self.path.lock().ok()?.as_ref().map(|p| p.display().to_string())
    }

    /// Removes the file once the peers have mapped it: nothing is left behind, and the
    /// mappings stay valid.
    pub fn unlink(&self) {
        if let Some(path) = self.path.lock().ok().and_then(|mut p| p.take()) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        debug_assert!(index < BELL_BYTES / 4);
        // SAFETY: the mapping is page-aligned and at least BELL_BYTES long, lives as long as
        // `self`, and every access to it, in any process, is atomic.
        unsafe { &*(self.map.as_ptr() as *const AtomicU32).add(index) }
    }

    fn counter(&self) -> &AtomicU32 {
        self.word(0)
    }

    fn magic(&self) -> &AtomicU32 {
        self.word(1)
    }

    /// The count of rings so far (note it before looking for work, then [`Bell::wait`] on it).
    pub fn rings(&self) -> u32 {
        self.counter().load(Ordering::SeqCst)
    }

    /// Wakes whoever waits on this bell now, or makes their next wait return at once.
    pub fn ring(&self) {
        self.counter().fetch_add(1, Ordering::SeqCst);
        futex::wake(self.counter());
    }

    /// Sleeps until the bell rings or `timeout` passes; at once if it has rung since `seen`.
    pub fn wait(&self, seen: u32, timeout: Duration) {
        futex::wait(self.counter(), seen, timeout);
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        self.unlink();
    }
}

#[cfg(target_os = "linux")]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// `FUTEX_WAIT` without the private flag: the word may be shared between processes.
    pub fn wait(word: &AtomicU32, seen: u32, timeout: Duration) {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: a futex wait on a live, aligned 32-bit word; it returns at once if the word
        // no longer holds `seen`, on a wake, a signal or the timeout, any of which is fine.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, seen, &timeout as *const libc::timespec);
        }
    }

    pub fn wake(word: &AtomicU32) {
        // SAFETY: a futex wake on a live, aligned 32-bit word.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }
}

/// Without futexes the waiter polls: a short sleep, then it looks again.
#[cfg(not(target_os = "linux"))]
mod futex {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    pub fn wait(word: &AtomicU32, seen: u32, timeout: Duration) {
        if word.load(Ordering::SeqCst) == seen {
            std::thread::sleep(timeout.min(Duration::from_micros(50)));
        }
    }

    pub fn wake(_word: &AtomicU32) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_peer_rings_through_its_own_mapping_and_wakes_the_sleeper_at_once() {
        let own = Bell::new().unwrap();
        let name = own.name().expect("/dev/shm is available on Linux test machines");
        let peer = Bell::open(&name).expect("the peer maps the bell by its name");
        own.unlink();
        assert!(Bell::open(&name).is_none(), "an unlinked bell cannot be opened again");
        assert!(peer.rings() == own.rings(), "one counter, seen through two mappings");
        let own = Arc::new(own);
        let seen = own.rings();
        let sleeper = {
            let own = own.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while own.rings() == seen && started.elapsed() < Duration::from_secs(20) {
                    own.wait(seen, Duration::from_secs(20));
                }
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        peer.ring();
        let took = sleeper.join().unwrap();
        assert!(took < Duration::from_secs(5), "woken by the ring, not the 20 s limit: {took:?}");
        assert_eq!(own.rings(), seen + 1);
    }

    #[test]
    fn a_ring_before_the_wait_is_not_lost_and_only_bells_open() {
        let bell = Bell::new().unwrap();
        let seen = bell.rings();
        bell.ring();
        let started = Instant::now();
        bell.wait(seen, Duration::from_secs(20));
        assert!(started.elapsed() < Duration::from_secs(5), "the wait saw the count had moved");
        assert!(Bell::open("/etc/hostname").is_none(), "only a bell's path is opened");
        assert!(Bell::open("/dev/shm/brigade-bell-0-missing").is_none());
    }
}
