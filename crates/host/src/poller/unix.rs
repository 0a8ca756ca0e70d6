//! The Unix poller: epoll, or kqueue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{Interest, Ready, Trigger};

/// A set of watched descriptors.
///
/// A descriptor must be [deleted](Poller::delete) before it is closed
/// unless the poller goes first: kqueue forgets closed descriptors, epoll
/// only once every duplicate is closed.
pub struct Poller {
    fd: OwnedFd,
    buffer: Vec<sys::RawEvent>,
}

// SAFETY: the buffer only holds readiness records copied out of the
// kernel (flags and our own integer tokens, which rustix stores in a
// pointer-typed field but which are never dereferenced); `&self` methods
// only pass the descriptor to the kernel.
unsafe impl Send for Poller {}
// SAFETY: as above.
unsafe impl Sync for Poller {}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl Poller {
    /// An empty set, close-on-exec.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: sys::create()?,
            buffer: Vec::with_capacity(64),
        })
    }

    /// Watches `fd` for `interest`, reporting it as `token`.
    pub fn add(
        &self,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        sys::add(&self.fd, fd, token, interest, trigger)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(
        &self,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        sys::modify(&self.fd, fd, token, interest, trigger)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        sys::delete(&self.fd, fd)
    }

    /// Waits up to `timeout` (forever if `None`) for readiness, and
    /// appends what is ready to `ready`, at most 64 at a time; returns
    /// how many. Zero means the timeout passed.
    pub fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<Ready>) -> io::Result<usize> {
        self.buffer.clear();
        sys::wait(&self.fd, &mut self.buffer, timeout)?;
        let before = ready.len();
        ready.extend(self.buffer.iter().map(sys::ready));
        Ok(ready.len() - before)
    }

    /// How many readinesses one [`Poller::wait`] reports at most.
    pub fn batch(&self) -> usize {
        self.buffer.capacity()
    }
}

impl AsFd for Poller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use super::*;
    use rustix::buffer::spare_capacity;
    use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};

    pub(super) type RawEvent = epoll::Event;

    pub(super) fn create() -> io::Result<OwnedFd> {
        Ok(epoll::create(CreateFlags::CLOEXEC)?)
    }

    fn flags(interest: Interest, trigger: Trigger) -> EventFlags {
        let mut flags = EventFlags::empty();
        if interest.readable {
            flags |= EventFlags::IN | EventFlags::RDHUP;
        }
        if interest.writable {
            flags |= EventFlags::OUT;
        }
        if trigger == Trigger::Edge {
            flags |= EventFlags::ET;
        }
        flags
    }

    pub(super) fn add(
        poller: &OwnedFd,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        let data = EventData::new_u64(token);
        Ok(epoll::add(poller, fd, data, flags(interest, trigger))?)
    }

    pub(super) fn modify(
        poller: &OwnedFd,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        let data = EventData::new_u64(token);
        Ok(epoll::modify(poller, fd, data, flags(interest, trigger))?)
    }

    pub(super) fn delete(poller: &OwnedFd, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(epoll::delete(poller, fd)?)
    }

    pub(super) fn wait(
        poller: &OwnedFd,
        buffer: &mut Vec<RawEvent>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let timeout = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: t.subsec_nanos().into(),
        });
        loop {
            match epoll::wait(poller, spare_capacity(buffer), timeout.as_ref()) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) fn ready(event: &RawEvent) -> Ready {
        let f = event.flags;
        Ready {
            token: event.data.u64(),
            readable: f
                .intersects(EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR),
            writable: f.intersects(EventFlags::OUT | EventFlags::ERR),
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use super::*;
    use rustix::buffer::spare_capacity;
    use rustix::event::kqueue::{self, EventFilter, EventFlags};

    pub(super) type RawEvent = kqueue::Event;

    pub(super) fn create() -> io::Result<OwnedFd> {
        // kqueue descriptors are not inherited across fork, and
        // rustix sets close-on-exec on the ones it makes.
        Ok(kqueue::kqueue()?)
    }

    /// Applies `changes`, each answered by a receipt, so that every
    /// failure is reported (ENOENT ignored where `missing_ok`).
    fn apply(poller: &OwnedFd, changes: &[kqueue::Event], missing_ok: bool) -> io::Result<()> {
        let mut receipts = Vec::with_capacity(changes.len());
        // SAFETY: the descriptors named stay open for this call; what
        // happens to them after is the caller's contract (see `Poller`).
        unsafe {
            kqueue::kevent(
                poller,
                changes,
                spare_capacity(&mut receipts),
                Some(Duration::ZERO),
            )?
        };
        for receipt in &receipts {
            let errno = receipt.data();
            let missing = errno == i64::from(rustix::io::Errno::NOENT.raw_os_error());
            if receipt.flags().contains(EventFlags::ERROR) && errno != 0 && !(missing_ok && missing)
            {
                return Err(io::Error::from_raw_os_error(errno as i32));
            }
        }
        Ok(())
    }

    fn changes(
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> [kqueue::Event; 2] {
        let raw = fd.as_raw_fd();
        let on = |wanted: bool| {
            let mut flags = EventFlags::RECEIPT;
            if wanted {
                flags |= EventFlags::ADD;
                if trigger == Trigger::Edge {
                    flags |= EventFlags::CLEAR;
                }
            } else {
                flags |= EventFlags::DELETE;
            }
            flags
        };
        let udata = token as usize as *mut std::ffi::c_void;
        [
            kqueue::Event::new(EventFilter::Read(raw), on(interest.readable), udata),
            kqueue::Event::new(EventFilter::Write(raw), on(interest.writable), udata),
        ]
    }

    /// EV_ADD adds a filter or updates it, so adding is modifying (a
    /// filter not asked for is deleted: ENOENT on a new descriptor, which
    /// is ignored).
    pub(super) use modify as add;

    pub(super) fn modify(
        poller: &OwnedFd,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        apply(poller, &changes(fd, token, interest, trigger), true)
    }

    pub(super) fn delete(poller: &OwnedFd, fd: BorrowedFd<'_>) -> io::Result<()> {
        let none = Interest {
            readable: false,
            writable: false,
        };
        apply(poller, &changes(fd, 0, none, Trigger::Level), true)
    }

    pub(super) fn wait(
        poller: &OwnedFd,
        buffer: &mut Vec<RawEvent>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        loop {
            // SAFETY: as in `apply`; no changes are made here.
            match unsafe { kqueue::kevent(poller, &[], spare_capacity(buffer), timeout) } {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) fn ready(event: &RawEvent) -> Ready {
        let token = event.udata() as usize as u64;
        let error = event.flags().contains(EventFlags::ERROR);
        match event.filter() {
            EventFilter::Write(_) => Ready {
                token,
                readable: error,
                writable: true,
            },
            // EOF is reported on the read filter: readable, a read says so.
            _ => Ready {
                token,
                readable: true,
                writable: error,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readiness_is_reported_by_token_level_and_edge() {
        let mut poller = Poller::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        poller
            .add(b.as_fd(), 7, Interest::READ, Trigger::Level)
            .unwrap();
        poller
            .add(c.as_fd(), 9, Interest::READ, Trigger::Edge)
            .unwrap();
        let mut ready = Vec::new();
        assert_eq!(poller.wait(Some(Duration::ZERO), &mut ready).unwrap(), 0);
        a.write_all(b"x").unwrap();
        d.write_all(b"y").unwrap();
        poller
            .wait(Some(Duration::from_secs(5)), &mut ready)
            .unwrap();
        ready.sort_by_key(|r| r.token);
        assert_eq!(ready.len(), 2, "{ready:?}");
        assert!(ready[0].token == 7 && ready[0].readable && !ready[0].writable);
        assert!(ready[1].token == 9 && ready[1].readable);
        // Level keeps reporting the unread byte; edge does not.
        ready.clear();
        poller.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert_eq!(ready.iter().map(|r| r.token).collect::<Vec<_>>(), [7]);
        // Asking for writability too; then deleting.
        poller
            .modify(b.as_fd(), 8, Interest::BOTH, Trigger::Level)
            .unwrap();
        ready.clear();
        poller.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(
            ready.iter().any(|r| r.token == 8 && r.writable),
            "{ready:?}"
        );
        poller.delete(b.as_fd()).unwrap();
        ready.clear();
        poller.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(ready.iter().all(|r| r.token != 8), "{ready:?}");
    }

    #[test]
    fn a_hang_up_reads_as_readable_and_a_poller_nests() {
        let mut inner = Poller::new().unwrap();
        let mut outer = Poller::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        inner
            .add(b.as_fd(), 1, Interest::READ, Trigger::Edge)
            .unwrap();
        outer
            .add(inner.as_fd(), 2, Interest::READ, Trigger::Level)
            .unwrap();
        drop(a);
        let mut ready = Vec::new();
        outer
            .wait(Some(Duration::from_secs(5)), &mut ready)
            .unwrap();
        assert_eq!(ready[0].token, 2);
        ready.clear();
        inner.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(ready[0].token == 1 && ready[0].readable);
    }
}
