//! A blocking reader made pollable by a thread of its own, for input a
//! poller cannot watch: on Windows a console or pipe handle is neither a
//! socket nor a handle that is signalled exactly when bytes can be read.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{AsPollable, Event, Pollable};

/// Bytes read ahead before the thread waits for the reader to take some.
const READ_AHEAD: usize = 4096;

/// Reads another reader on a thread of its own into a bounded buffer.
/// Reads take from the buffer: `WouldBlock` when it is empty, `Ok(0)` at
/// the source's end, the source's error after the bytes before it. It is
/// readable, for a [`crate::Poller`], while it holds bytes or the end.
///
/// The thread stops at the source's end or error, or at the first read
/// to return after this value is dropped: a source that never returns
/// (a console nobody types into) keeps it until the process exits.
#[derive(Debug)]
pub struct ThreadedReader {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when the reader takes bytes from a full buffer.
    room: Condvar,
    /// Signalled while there is something to read.
    ready: Event,
}

#[derive(Debug, Default)]
struct State {
    buffer: VecDeque<u8>,
    /// The source's end (`Ok`) or error, after the buffered bytes.
    end: Option<Result<(), (io::ErrorKind, String)>>,
    dropped: bool,
}

impl ThreadedReader {
    /// Starts reading `source` on a new thread named `name`.
    pub fn spawn<R: Read + Send + 'static>(source: R, name: &str) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            room: Condvar::new(),
            ready: Event::new()?,
        });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || pump(source, &theirs))?;
        Ok(Self { shared })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn pump<R: Read>(mut source: R, shared: &Shared) {
    let mut chunk = [0u8; 1024];
    loop {
        {
            let mut state = shared.lock();
            while state.buffer.len() >= READ_AHEAD && !state.dropped {
                state = shared.room.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.dropped {
                return;
            }
        }
        let result = source.read(&mut chunk);
        let mut state = shared.lock();
        if state.dropped {
            return;
        }
        let done = match result {
            Ok(0) => {
                state.end = Some(Ok(()));
                true
            }
            Ok(n) => {
                state.buffer.extend(&chunk[..n]);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                state.end = Some(Err((e.kind(), e.to_string())));
                true
            }
        };
        // Under the lock, so a reader that empties the buffer and drains
        // the event cannot lose this signal.
        if let Err(e) = shared.ready.signal() {
            log::warn!("threaded reader: {e}");
        }
        if done {
            return;
        }
    }
}

impl Read for ThreadedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        if !state.buffer.is_empty() {
            let n = buf.len().min(state.buffer.len());
            for (to, from) in buf.iter_mut().zip(state.buffer.drain(..n)) {
                *to = from;
            }
            if state.buffer.is_empty() && state.end.is_none() {
                self.shared.ready.drain()?;
            }
            self.shared.room.notify_one();
            return Ok(n);
        }
        match &state.end {
            Some(Ok(())) => Ok(0),
            Some(Err((kind, message))) => Err(io::Error::new(*kind, message.clone())),
            None => {
                self.shared.ready.drain()?;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }
}

impl AsPollable for ThreadedReader {
    fn as_pollable(&self) -> Pollable<'_> {
        self.shared.ready.as_pollable()
    }
}

impl Drop for ThreadedReader {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.shared.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Interest, Poller, Trigger};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A source fed chunk by chunk from the test; its end when the sender
    /// goes.
    struct Chunks(mpsc::Receiver<io::Result<Vec<u8>>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.recv() {
                Ok(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(0),
            }
        }
    }

    fn readable(poller: &mut Poller, timeout: Duration) -> bool {
        let mut ready = Vec::new();
        poller.wait(Some(timeout), &mut ready).unwrap() > 0
    }

    #[test]
    fn bytes_arrive_readable_and_the_end_is_reported_after_them() {
        let (tx, rx) = mpsc::channel();
        let mut reader = ThreadedReader::spawn(Chunks(rx), "test-reader").unwrap();
        let mut poller = Poller::new().unwrap();
        poller
            .add(reader.as_pollable(), 1, Interest::READ, Trigger::Level)
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            reader.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!readable(&mut poller, Duration::from_millis(20)));
        tx.send(Ok(b"hello world".to_vec())).unwrap();
        assert!(readable(&mut poller, Duration::from_secs(5)));
        assert_eq!(reader.read(&mut buf).unwrap(), 8);
        assert_eq!(&buf, b"hello wo");
        // Bytes left: still readable.
        assert!(readable(&mut poller, Duration::from_secs(5)));
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"rld");
        assert!(!readable(&mut poller, Duration::from_millis(20)));
        drop(tx);
        assert!(readable(&mut poller, Duration::from_secs(5)));
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        poller.delete(reader.as_pollable()).unwrap();
    }

    #[test]
    fn the_sources_error_comes_after_its_bytes() {
        let (tx, rx) = mpsc::channel();
        let mut reader = ThreadedReader::spawn(Chunks(rx), "test-reader").unwrap();
        tx.send(Ok(b"ab".to_vec())).unwrap();
        tx.send(Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone")))
            .unwrap();
        let mut poller = Poller::new().unwrap();
        poller
            .add(reader.as_pollable(), 1, Interest::READ, Trigger::Level)
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1];
        let error = loop {
            assert!(readable(&mut poller, Duration::from_secs(5)));
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"ab");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        poller.delete(reader.as_pollable()).unwrap();
    }

    #[test]
    fn a_slow_reader_holds_the_source_back_without_losing_bytes() {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut reader =
            ThreadedReader::spawn(io::Cursor::new(data.clone()), "test-reader").unwrap();
        let mut poller = Poller::new().unwrap();
        poller
            .add(reader.as_pollable(), 1, Interest::READ, Trigger::Level)
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 100];
        loop {
            assert!(readable(&mut poller, Duration::from_secs(5)));
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(reader.shared.lock().buffer.len() <= READ_AHEAD + 1024);
        }
        assert_eq!(got, data);
        poller.delete(reader.as_pollable()).unwrap();
    }
}
