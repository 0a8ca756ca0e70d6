//! A warm pool: VMs restored from one snapshot ahead of demand, handed
//! out in microseconds.
//!
//! A background thread keeps `min_ready` VMs restored and waiting (never
//! more VMs at once than `max_vms`, handed-out ones included). `acquire`
//! takes a waiting one, or restores one itself when none waits, or waits
//! for room when `max_vms` are out. A VM goes to one caller only: it is
//! moved out of the queue. A returned (dropped) [`PooledVm`] is killed
//! (in the background: tearing a VM down takes milliseconds) and the
//! pool restores a fresh one in its place; nothing a caller did in a VM
//! can reach the next caller. After `idle_timeout` without an `acquire`
//! the waiting VMs are stopped, until the next `acquire`.
//!
//! ```no_run
//! use supermachine::{Pool, PoolConfig, Snapshot};
//! let pool = Pool::new(Snapshot::open("/srv/snapshots/web")?, PoolConfig::default())?;
//! let vm = pool.acquire()?; // a restored VM, its agent answering
//! let out = vm.exec(["uname", "-r"]).output()?;
//! drop(vm); // killed; the pool refills
//! println!("{:?}", pool.stats());
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result, Snapshot, Vm, VmConfig};

/// How a pool behaves.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// VMs kept restored and waiting.
    pub min_ready: usize,
    /// Most VMs at once: waiting, being restored and handed out.
    pub max_vms: usize,
    /// Stop the waiting VMs after this long without an `acquire`
    /// (`None`: keep them).
    pub idle_timeout: Option<Duration>,
    /// How long `acquire` waits for room when `max_vms` are out.
    pub acquire_timeout: Duration,
    /// Each restore's hostname, environment, console file, stop grace.
    pub vm: VmConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_ready: 2,
            max_vms: 16,
            idle_timeout: None,
            acquire_timeout: Duration::from_secs(30),
            vm: VmConfig::default(),
        }
    }
}

/// What a pool has done, and has now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// VMs waiting to be handed out.
    pub ready: usize,
    /// VMs being restored.
    pub restoring: usize,
    /// VMs handed out and not yet returned.
    pub in_use: usize,
    /// VMs handed out in all.
    pub handed_out: u64,
    /// Handed out from the waiting queue (the rest were restored on
    /// demand).
    pub handed_out_ready: u64,
    /// Restores that succeeded.
    pub restored: u64,
    /// Restores that failed; `last_error` says why.
    pub failed: u64,
    /// Waiting VMs stopped for idleness.
    pub idled_out: u64,
    /// The last restore failure.
    pub last_error: Option<String>,
}

struct State {
    ready: VecDeque<Vm>,
    stats: PoolStats,
    last_acquire: Instant,
    closed: bool,
}

struct Shared {
    snapshot: Snapshot,
    config: PoolConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(s, timeout)
            .map(|(s, _)| s)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// VMs that count against `max_vms`.
    fn total(s: &State) -> usize {
        s.ready.len() + s.stats.restoring + s.stats.in_use
    }

    /// One restore, accounted; `restoring` was raised by the caller.
    fn restore(&self) -> Result<Vm> {
        let result = Vm::restore(&self.snapshot, &self.config.vm);
        let mut s = self.lock();
        s.stats.restoring -= 1;
        match &result {
            Ok(_) => s.stats.restored += 1,
            Err(e) => {
                s.stats.failed += 1;
                s.stats.last_error = Some(e.to_string());
            }
        }
        drop(s);
        self.changed.notify_all();
        result
    }

    /// The refill thread: restores until `min_ready` wait, stops the
    /// waiting ones when idle, ends when the pool is dropped.
    fn refill(&self) {
        let mut failures = 0u32;
        let mut s = self.lock();
        loop {
            if s.closed {
                return;
            }
            let idle = self
                .config
                .idle_timeout
                .is_some_and(|t| s.last_acquire.elapsed() >= t);
            if idle && !s.ready.is_empty() {
                let stopped: Vec<Vm> = s.ready.drain(..).collect();
                s.stats.idled_out += stopped.len() as u64;
                drop(s);
                drop(stopped);
                s = self.lock();
                continue;
            }
            let short = s.ready.len() + s.stats.restoring < self.config.min_ready;
            if !idle && short && Shared::total(&s) < self.config.max_vms {
                s.stats.restoring += 1;
                drop(s);
                match self.restore() {
                    Ok(vm) => {
                        failures = 0;
                        s = self.lock();
                        s.ready.push_back(vm);
                        self.changed.notify_all();
                    }
                    Err(e) => {
                        // A snapshot that stopped restoring (its disk
                        // rebuilt, say) must not spin: back off.
                        log::warn!("pool: restoring {}: {e}", self.snapshot.id());
                        failures = failures.saturating_add(1);
                        let pause = Duration::from_millis(100) * failures.min(50);
                        s = self.lock();
                        s = self.wait(s, pause);
                    }
                }
                continue;
            }
            let wake = match self.config.idle_timeout {
                Some(t) if !idle => t.saturating_sub(s.last_acquire.elapsed()),
                _ => Duration::from_secs(3600),
            };
            s = self.wait(s, wake.max(Duration::from_millis(1)));
        }
    }
}

/// A pool of VMs restored from one snapshot.
pub struct Pool {
    shared: Arc<Shared>,
    refiller: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("snapshot", &self.shared.snapshot.path())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// A pool of `snapshot`'s VMs; it starts restoring `min_ready` of
    /// them at once, in the background.
    pub fn new(snapshot: Snapshot, config: PoolConfig) -> Result<Pool> {
        if config.max_vms == 0 || config.min_ready > config.max_vms {
            return Err(Error::InvalidOption(format!(
                "a pool needs 0 <= min_ready ({}) <= max_vms ({}) and max_vms >= 1",
                config.min_ready, config.max_vms
            )));
        }
        crate::snapshot::check_snapshottable(&config.vm)?;
        let shared = Arc::new(Shared {
            snapshot,
            config,
            state: Mutex::new(State {
                ready: VecDeque::new(),
                stats: PoolStats::default(),
                last_acquire: Instant::now(),
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let refiller = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pool-refill".into())
                .spawn(move || shared.refill())
                .map_err(crate::io_error("starting the pool's refill thread"))?
        };
        Ok(Pool {
            shared,
            refiller: Some(refiller),
        })
    }

    /// A VM for the caller alone: a waiting one (microseconds), else one
    /// restored now, else (with `max_vms` out) the first to become free
    /// within `acquire_timeout`.
    pub fn acquire(&self) -> Result<PooledVm> {
        let deadline = Instant::now() + self.shared.config.acquire_timeout;
        let mut s = self.shared.lock();
        s.last_acquire = Instant::now();
        loop {
            if let Some(vm) = s.ready.pop_front() {
                s.stats.in_use += 1;
                s.stats.handed_out += 1;
                s.stats.handed_out_ready += 1;
                drop(s);
                // The refill thread tops the queue up again.
                self.shared.changed.notify_all();
                return Ok(self.pooled(vm));
            }
            if Shared::total(&s) < self.shared.config.max_vms {
                s.stats.restoring += 1;
                drop(s);
                let vm = self.shared.restore()?;
                let mut s = self.shared.lock();
                s.stats.in_use += 1;
                s.stats.handed_out += 1;
                return Ok(self.pooled(vm));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::InvalidOption(format!(
                    "no pool VM became free within {:?} ({} are out)",
                    self.shared.config.acquire_timeout, self.shared.config.max_vms
                )));
            }
            s = self.shared.wait(s, left);
        }
    }

    /// A waiting VM, if one is ready now.
    pub fn try_acquire(&self) -> Option<PooledVm> {
        let mut s = self.shared.lock();
        s.last_acquire = Instant::now();
        let vm = s.ready.pop_front()?;
        s.stats.in_use += 1;
        s.stats.handed_out += 1;
        s.stats.handed_out_ready += 1;
        drop(s);
        self.shared.changed.notify_all();
        Some(self.pooled(vm))
    }

    fn pooled(&self, vm: Vm) -> PooledVm {
        PooledVm {
            vm: Some(vm),
            shared: self.shared.clone(),
        }
    }

    /// Counts, now.
    pub fn stats(&self) -> PoolStats {
        let s = self.shared.lock();
        PoolStats {
            ready: s.ready.len(),
            ..s.stats.clone()
        }
    }

    /// Waits until `n` VMs are ready (or `timeout` passes); true if they are.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        while s.ready.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.shared.wait(s, left);
        }
        true
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let waiting: Vec<Vm> = {
            let mut s = self.shared.lock();
            s.closed = true;
            s.ready.drain(..).collect()
        };
        self.shared.changed.notify_all();
        drop(waiting);
        if let Some(t) = self.refiller.take() {
            let _ = t.join();
        }
    }
}

/// A VM from a [`Pool`]; derefs to [`Vm`]. Dropping it kills the VM and
/// makes room for a fresh one.
pub struct PooledVm {
    vm: Option<Vm>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PooledVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PooledVm").field(&self.vm).finish()
    }
}

impl PooledVm {
    /// Takes the VM out of the pool's care: it no longer counts against
    /// `max_vms`, and its owner stops it.
    pub fn into_inner(mut self) -> Vm {
        self.release();
        // `release` leaves the VM for us; only `Drop` kills.
        self.vm
            .take()
            .unwrap_or_else(|| unreachable!("a PooledVm holds its VM until dropped"))
    }

    fn release(&self) {
        let mut s = self.shared.lock();
        s.stats.in_use = s.stats.in_use.saturating_sub(1);
        drop(s);
        self.shared.changed.notify_all();
    }
}

impl std::ops::Deref for PooledVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("a PooledVm holds its VM until dropped"))
    }
}

impl std::ops::DerefMut for PooledVm {
    fn deref_mut(&mut self) -> &mut Vm {
        self.vm
            .as_mut()
            .unwrap_or_else(|| unreachable!("a PooledVm holds its VM until dropped"))
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else {
            return;
        };
        self.release();
        // Tearing a VM down takes milliseconds; the caller need not wait.
        let killed = std::thread::Builder::new()
            .name("pool-discard".into())
            .spawn(move || drop(vm.kill()));
        if let Err(e) = killed {
            log::warn!("pool: discarding a VM in the background: {e}");
        }
    }
}
