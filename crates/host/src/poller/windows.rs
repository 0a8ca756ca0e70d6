//! The Windows poller: an I/O completion port through the `polling`
//! crate, which watches sockets (through AFD) and waitable handles (event
//! objects and the like) alike.

use std::io;
use std::num::NonZeroUsize;
use std::os::windows::io::{AsRawHandle, AsRawSocket};
use std::time::Duration;

use polling::os::iocp::PollerIocpExt;
use polling::{Event as Interested, Events, PollMode};

use super::{Interest, Pollable, Ready, Trigger};

/// How many readinesses one wait reports at most.
const BATCH: usize = 64;

/// A set of watched sockets and waitable handles.
///
/// A source must be [deleted](Poller::delete) before it is closed.
/// A waitable handle is reported readable when it is signalled; an
/// auto-reset event is reset by being reported.
pub struct Poller {
    port: polling::Poller,
    events: Events,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl Poller {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        let batch = NonZeroUsize::new(BATCH).ok_or(io::ErrorKind::InvalidInput)?;
        Ok(Self {
            port: polling::Poller::new()?,
            events: Events::with_capacity(batch),
        })
    }

    /// Watches `source` for `interest`, reporting it as `token`. Only
    /// level triggering exists here: an edge is `Unsupported`.
    pub fn add(
        &self,
        source: Pollable<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        let (wanted, mode) = registration(token, interest, trigger)?;
        match source {
            // SAFETY: the caller deletes the socket before closing it, as
            // this type's contract says, so the port never polls a closed
            // or reused socket.
            Pollable::Socket(s) => unsafe {
                self.port.add_with_mode(s.as_raw_socket(), wanted, mode)
            },
            // SAFETY: as for sockets: deleted before it is closed.
            Pollable::Waitable(h) => unsafe {
                self.port.add_waitable(h.as_raw_handle(), wanted, mode)
            },
        }
    }

    /// Changes what `source` is watched for.
    pub fn modify(
        &self,
        source: Pollable<'_>,
        token: u64,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        let (wanted, mode) = registration(token, interest, trigger)?;
        match source {
            Pollable::Socket(s) => self.port.modify_with_mode(s, wanted, mode),
            Pollable::Waitable(h) => self.port.modify_waitable(h, wanted, mode),
        }
    }

    /// Stops watching `source`.
    pub fn delete(&self, source: Pollable<'_>) -> io::Result<()> {
        match source {
            Pollable::Socket(s) => self.port.delete(s),
            Pollable::Waitable(h) => self.port.remove_waitable(h),
        }
    }

    /// Waits up to `timeout` (forever if `None`) for readiness, and
    /// appends what is ready to `ready`, at most 64 at a time; returns
    /// how many. Zero means the timeout passed.
    pub fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<Ready>) -> io::Result<usize> {
        self.events.clear();
        self.port.wait(&mut self.events, timeout)?;
        let before = ready.len();
        ready.extend(self.events.iter().map(|e| Ready {
            token: e.key as u64,
            readable: e.readable,
            writable: e.writable,
        }));
        Ok(ready.len() - before)
    }

    /// How many readinesses one [`Poller::wait`] reports at most.
    pub fn batch(&self) -> usize {
        self.events.capacity().get()
    }
}

fn registration(
    token: u64,
    interest: Interest,
    trigger: Trigger,
) -> io::Result<(Interested, PollMode)> {
    if trigger == Trigger::Edge {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "edge-triggered polling does not exist on Windows",
        ));
    }
    let key = usize::try_from(token).map_err(|_| io::ErrorKind::InvalidInput)?;
    Ok((
        Interested::new(key, interest.readable, interest.writable),
        PollMode::Level,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AsPollable, Event};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::windows::io::AsSocket;

    fn tokens(poller: &mut Poller, timeout: Duration) -> Vec<Ready> {
        let mut ready = Vec::new();
        poller.wait(Some(timeout), &mut ready).unwrap();
        ready.sort_by_key(|r| r.token);
        ready
    }

    #[test]
    fn an_event_is_readable_from_its_signal_until_drained() {
        let mut poller = Poller::new().unwrap();
        let event = Event::new().unwrap();
        poller
            .add(event.as_pollable(), 3, Interest::READ, Trigger::Level)
            .unwrap();
        assert!(tokens(&mut poller, Duration::ZERO).is_empty());
        event.signal().unwrap();
        event.signal().unwrap();
        let ready = tokens(&mut poller, Duration::from_secs(5));
        assert!(
            ready.len() == 1 && ready[0].token == 3 && ready[0].readable,
            "{ready:?}"
        );
        // Still signalled: a level is reported again.
        assert_eq!(tokens(&mut poller, Duration::from_secs(5)).len(), 1);
        assert_eq!(event.drain().unwrap(), 2);
        assert!(tokens(&mut poller, Duration::from_millis(50)).is_empty());
        assert_eq!(event.drain().unwrap(), 0);
        poller.delete(event.as_pollable()).unwrap();
        event.signal().unwrap();
        assert!(tokens(&mut poller, Duration::from_millis(50)).is_empty());
    }

    #[test]
    fn a_signal_from_another_thread_wakes_a_waiting_poller() {
        let mut poller = Poller::new().unwrap();
        let event = std::sync::Arc::new(Event::new().unwrap());
        poller
            .add(event.as_pollable(), 1, Interest::READ, Trigger::Level)
            .unwrap();
        let signaller = event.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            signaller.signal().unwrap();
        });
        let mut ready = Vec::new();
        assert_eq!(poller.wait(None, &mut ready).unwrap(), 1);
        thread.join().unwrap();
        assert_eq!(event.drain().unwrap(), 1);
    }

    #[test]
    fn sockets_report_readable_and_writable_by_token() {
        let mut poller = Poller::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let source = Pollable::Socket(server.as_socket());
        poller
            .add(source, 7, Interest::READ, Trigger::Level)
            .unwrap();
        assert!(tokens(&mut poller, Duration::from_millis(50)).is_empty());
        client.write_all(b"x").unwrap();
        let ready = tokens(&mut poller, Duration::from_secs(5));
        assert!(
            ready.len() == 1 && ready[0].token == 7 && ready[0].readable,
            "{ready:?}"
        );
        poller
            .modify(source, 8, Interest::BOTH, Trigger::Level)
            .unwrap();
        let ready = tokens(&mut poller, Duration::from_secs(5));
        assert!(
            ready.iter().any(|r| r.token == 8 && r.writable),
            "{ready:?}"
        );
        poller.delete(source).unwrap();
        assert!(tokens(&mut poller, Duration::from_millis(50)).is_empty());
    }

    #[test]
    fn edge_triggering_is_refused_in_one_line() {
        let poller = Poller::new().unwrap();
        let event = Event::new().unwrap();
        let e = poller
            .add(event.as_pollable(), 1, Interest::READ, Trigger::Edge)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }
}
