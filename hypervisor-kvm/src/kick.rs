//! Making a running vCPU return from `KVM_RUN` without losing a kick.
//!
//! A kick sets `pending` and sends the vCPU's thread a real-time signal.
//! While the thread may be inside `KVM_RUN`, a thread-local pointer names
//! its `kvm_run` page; the signal handler sets `immediate_exit` there, so
//! `KVM_RUN` returns `EINTR` whether the signal lands before or during the
//! ioctl. A kick can make one extra, spurious `Interrupted` exit; it can
//! never be lost.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use kvm_bindings::kvm_run;
use supermachine_hypervisor::{self as hv, VcpuKicker};

thread_local! {
    static KVM_RUN_OF_THIS_THREAD: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick_signal(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN_OF_THIS_THREAD.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set only between `begin_run` and `end_run`
        // on this very thread, while the vCPU (and so its kvm_run mapping)
        // is borrowed by `run()`; a volatile byte store is signal-safe.
        unsafe { ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

pub(crate) fn install_signal_handler() -> hv::Result<()> {
    static INSTALLED: OnceLock<Option<i32>> = OnceLock::new();
    let failure = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal)
            .err()
            .map(|e| e.errno())
    });
    match failure {
        None => Ok(()),
        Some(errno) => Err(hv::Error::Os {
            op: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(*errno),
        }),
    }
}

/// A thread's pthread id. On musl `pthread_t` is a pointer, hence the wrapper.
#[derive(Clone, Copy, Debug)]
struct ThreadId(libc::pthread_t);

// SAFETY: a pthread id is an opaque handle naming a thread; POSIX lets any
// thread of the process pass it to pthread_kill.
unsafe impl Send for ThreadId {}

/// Shared between a vCPU and its kickers.
#[derive(Debug, Default)]
pub(crate) struct KickState {
    pending: AtomicBool,
    /// The thread running the vCPU; `None` before its first run and after
    /// the vCPU is dropped, so a kick never signals a thread that is gone.
    thread: Mutex<Option<ThreadId>>,
}

impl KickState {
    /// Called on the vCPU thread before `KVM_RUN`. Returns true when a kick
    /// is already pending, in which case the caller must not enter the guest.
    pub(crate) fn begin_run(&self, run: *mut kvm_run) -> bool {
        {
            let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
            if thread.is_none() {
                // SAFETY: pthread_self has no preconditions.
                *thread = Some(ThreadId(unsafe { libc::pthread_self() }));
            }
        }
        KVM_RUN_OF_THIS_THREAD.with(|c| c.set(run));
        if self.pending.swap(false, Ordering::SeqCst) {
            KVM_RUN_OF_THIS_THREAD.with(|c| c.set(ptr::null_mut()));
            // SAFETY: `run` is this vCPU's kvm_run page, owned by the caller.
            unsafe { ptr::write_volatile(&raw mut (*run).immediate_exit, 0) };
            return true;
        }
        false
    }

    /// Called on the vCPU thread after `KVM_RUN` returns.
    pub(crate) fn end_run(&self) {
        KVM_RUN_OF_THIS_THREAD.with(|c| c.set(ptr::null_mut()));
    }

    /// Forgets a kick that has been answered with `Interrupted`.
    pub(crate) fn clear(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    /// The vCPU is going away: stop signalling its thread.
    pub(crate) fn detach(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl VcpuKicker for KickState {
    fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is a live thread: `detach` clears it (under this
            // lock) before the vCPU, which its thread owns, is dropped.
            unsafe { libc::pthread_kill(t.0, kick_signal()) };
        }
    }
}
