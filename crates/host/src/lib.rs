//! What supermachine's VMM and devices use from the host OS, one small
//! interface per need, each with a Linux implementation and, where macOS
//! has the same thing, a macOS one:
//!
//! | need | Linux | macOS |
//! |---|---|---|
//! | [`Poller`]: readiness of many descriptors | epoll | kqueue |
//! | [`Event`]: a wake-up a poller can watch | eventfd | a non-blocking pipe |
//! | [`connect_unix_nonblocking`] | `SOCK_NONBLOCK` at creation | `O_NONBLOCK` right after |
//! | [`zero_range`], [`punch_hole`] | `fallocate` | `F_PUNCHHOLE` (holes only) |
//! | [`open_dir_beneath`]: no symlinks, no escape | `openat2(RESOLVE_BENEATH)` | `O_NOFOLLOW_ANY` |
//! | [`open_in_root`]: a chroot's view of symlinks | `openat2(RESOLVE_IN_ROOT)` | resolved a component at a time |
//! | [`mkfifo_at`] | `mknodat` | `mkfifoat` |
//!
//! Nothing here exists on Windows yet (see `docs/platforms.md`).

#[cfg(unix)]
mod event;
#[cfg(unix)]
mod fs;
#[cfg(unix)]
mod net;
#[cfg(unix)]
mod poller;

#[cfg(unix)]
pub use event::Event;
#[cfg(unix)]
pub use fs::{mkfifo_at, open_dir, open_dir_beneath, open_in_root, punch_hole, zero_range};
#[cfg(unix)]
pub use net::connect_unix_nonblocking;
#[cfg(unix)]
pub use poller::{Interest, Poller, Ready, Trigger};
