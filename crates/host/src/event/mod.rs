//! A wake-up an event loop can watch: readable once signalled, until
//! drained.

#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub use unix::Event;
#[cfg(windows)]
pub use windows::Event;
