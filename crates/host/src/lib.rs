//! What supermachine's VMM and devices use from the host OS, one small
//! interface per need, each with a Linux implementation and, where the
//! other hosts have the same thing, a macOS or Windows one:
//!
//! | need | Linux | macOS | Windows |
//! |---|---|---|---|
//! | [`Poller`]: readiness of many descriptors | epoll | kqueue | not yet |
//! | [`Event`]: a wake-up a poller can watch | eventfd | a non-blocking pipe | not yet |
//! | [`connect_unix_nonblocking`] | `SOCK_NONBLOCK` at creation | `O_NONBLOCK` right after | not yet |
//! | [`zero_range`] | `fallocate` | `Unsupported`: the caller writes zeroes | `Unsupported` |
//! | [`punch_hole`] | `fallocate` | `F_PUNCHHOLE` | `FSCTL_SET_ZERO_DATA` |
//! | [`open_dir_beneath`]: no symlinks, no escape | `openat2(RESOLVE_BENEATH)` | `O_NOFOLLOW_ANY` | none |
//! | [`open_in_root`]: a chroot's view of symlinks | `openat2(RESOLVE_IN_ROOT)` | resolved a component at a time | none |
//! | [`mkfifo_at`] | `mknodat` | `mkfifoat` | none |
//! | [`ThreadedReader`]: a blocking reader made pollable | a thread | a thread | a thread |
//! | [`user_cache_dir`] | `$XDG_CACHE_HOME`, `~/.cache` | `$XDG_CACHE_HOME`, `~/.cache` | `$XDG_CACHE_HOME`, `%LOCALAPPDATA%` |
//! | [`process_exists`] | `kill(pid, 0)` | `kill(pid, 0)` | `OpenProcess`, `GetExitCodeProcess` |
//! | [`process_start`]: which process has an id | `/proc/PID/stat` | `proc_pidinfo` | `GetProcessTimes` |
//!
//! See `docs/platforms.md` for what each host runs.

mod dirs;
mod disk;
mod event;
#[cfg(unix)]
mod fs;
#[cfg(unix)]
mod net;
mod poller;
mod process;
mod threaded_reader;

pub use dirs::user_cache_dir;
pub use disk::{punch_hole, zero_range};
pub use event::Event;
#[cfg(unix)]
pub use fs::{mkfifo_at, open_dir, open_dir_beneath, open_in_root};
#[cfg(unix)]
pub use net::connect_unix_nonblocking;
pub use poller::{AsPollable, Interest, Pollable, Poller, Ready, Trigger};
pub use process::{process_exists, process_start};
pub use threaded_reader::ThreadedReader;
