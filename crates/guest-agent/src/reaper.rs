//! Reaping every child: the processes the agent started, whose exits go
//! back to their sessions, and every orphan the kernel re-parents to PID 1.
//!
//! The reaper blocks in `waitid(P_ALL, WEXITED | WNOWAIT)`, which says
//! which child is a zombie without reaping it, then takes the registry
//! lock and reaps exactly that pid. Spawns hold the same lock from fork to
//! registration, so a child that exits at once is never reaped before its
//! session is registered, and the standard library's own `waitpid` on a
//! child whose exec failed never races us. No signals are involved, so
//! nothing depends on which thread has SIGCHLD blocked.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How a reaped process ended, with its peak RSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reaped {
    /// The raw wait status.
    pub status: i32,
    /// `ru_maxrss` of the process and its waited-for descendants, KiB.
    pub peak_rss_kib: u64,
}

impl Reaped {
    /// The exit code, if the process exited.
    pub fn code(&self) -> Option<i32> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }

    /// The signal, if one killed the process.
    pub fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// Sessions waiting for their process's exit, by pid.
    waiting: HashMap<i32, Sender<Reaped>>,
    /// Bumped by every spawn, to wake a reaper that found no children.
    spawns: u64,
}

/// The registry of started processes and the thread that reaps them.
#[derive(Debug, Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

/// The registry, locked while a child is spawned and registered.
#[derive(Debug)]
pub struct SpawnGuard<'a> {
    registry: MutexGuard<'a, Registry>,
    reaper: &'a Reaper,
}

impl SpawnGuard<'_> {
    /// Registers `pid`: its exit will be sent to `exit`.
    pub fn register(mut self, pid: i32, exit: Sender<Reaped>) {
        self.registry.waiting.insert(pid, exit);
        self.registry.spawns += 1;
        drop(self.registry);
        self.reaper.spawned.notify_all();
    }
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 << 10)
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    /// Locks the registry for a spawn; call [`SpawnGuard::register`] with
    /// the new pid before dropping it.
    pub fn lock_for_spawn(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            registry: self.lock(),
            reaper: self,
        }
    }

    /// The pids of processes started by sessions and still running.
    pub fn session_pids(&self) -> Vec<i32> {
        self.lock().waiting.keys().copied().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let spawns = self.lock().spawns;
            match next_zombie() {
                Ok(pid) => {
                    let mut registry = self.lock();
                    let Some(reaped) = reap(pid) else {
                        // The standard library reaped a child whose exec
                        // failed while we waited for the lock.
                        continue;
                    };
                    if let Some(session) = registry.waiting.remove(&pid) {
                        let _ = session.send(reaped);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    // No children at all: nothing can be re-parented to
                    // us either until something is spawned.
                    let mut registry = self.lock();
                    while registry.spawns == spawns {
                        registry = self
                            .spawned
                            .wait(registry)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("waitid: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// Blocks until some child is a zombie; returns its pid without reaping it.
fn next_zombie() -> io::Result<i32> {
    // SAFETY: siginfo_t is plain data that waitid fills in; all zeroes is
    // a valid value for it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded for a WEXITED event, so the si_pid field of
    // the union is the one it wrote.
    Ok(unsafe { info.si_pid() })
}

/// Reaps `pid` if it is still a zombie.
fn reap(pid: i32) -> Option<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain data; all zeroes is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both out-pointers are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    (rc == pid).then(|| Reaped {
        status,
        peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

/// True while the agent has any child (running or not yet reaped).
pub fn has_children() -> bool {
    // SAFETY: as in `next_zombie`.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    !(rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
}
