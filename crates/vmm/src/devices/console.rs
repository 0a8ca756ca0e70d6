//! The serial console's output: passed to its destination byte for byte,
//! and read line by line for the kernel's last words.
//!
//! Without ACPI the guest kernel has no way to say "I powered off" or "I
//! panicked" other than its console: `poweroff` ends in "reboot: System
//! halted" / "reboot: Power down" followed by a halt, and a panic prints
//! "Kernel panic - not syncing: ..." before it resets (or hangs, with
//! `panic=0`). The guest can print these lines itself; that only ends its
//! own VM, which it can always do anyway.

use std::io::{self, Write};
use std::sync::Arc;

use crate::ExitReason;
use crate::lifecycle::Lifecycle;

const MAX_LINE: usize = 1024;
const PANIC_MARK: &str = "Kernel panic - not syncing";
const PANIC_END_MARK: &str = "---[ end Kernel panic";
/// `kernel_halt()` and `kernel_power_off()` print these after "reboot: "
/// (with no power-off device: "Power off not available: System halted instead").
const HALT_MARKS: [&str; 2] = ["System halted", "Power down"];

pub(crate) struct ConsoleSink {
    out: Box<dyn Write + Send>,
    out_failed: bool,
    line: Vec<u8>,
    lifecycle: Arc<Lifecycle>,
}

impl ConsoleSink {
    pub(crate) fn new(out: Box<dyn Write + Send>, lifecycle: Arc<Lifecycle>) -> Self {
        Self {
            out,
            out_failed: false,
            line: Vec::with_capacity(128),
            lifecycle,
        }
    }

    fn end_of_line(&mut self) {
        let raw = String::from_utf8_lossy(&self.line);
        let text = without_timestamp(raw.trim_end_matches('\r'));
        // The end line repeats the panic line's words, so it is tested first.
        if text.starts_with(PANIC_END_MARK) {
            self.lifecycle.guest_panic_complete();
        } else if text.contains(PANIC_MARK) {
            self.lifecycle.note_panic(text.trim().to_string());
        } else if text
            .strip_prefix("reboot: ")
            .is_some_and(|rest| HALT_MARKS.iter().any(|m| rest.contains(m)))
        {
            self.lifecycle.finish(Ok(ExitReason::PowerOff));
        }
        self.line.clear();
    }
}

/// Strips printk's "[    1.234567] " prefix.
fn without_timestamp(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[')
        && let Some(close) = rest.find("] ")
        && rest[..close]
            .trim()
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
    {
        return &rest[close + 2..];
    }
    line
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.out_failed
            && let Err(e) = self.out.write_all(buf)
        {
            // The guest must not stall or die because our output did.
            log::warn!("console output failed, dropping further output: {e}");
            self.out_failed = true;
        }
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.out_failed {
            return Ok(());
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink() -> (ConsoleSink, Arc<Lifecycle>, Shared) {
        let lc = Arc::new(Lifecycle::new().unwrap());
        let out = Shared::default();
        (ConsoleSink::new(Box::new(out.clone()), lc.clone()), lc, out)
    }

    #[test]
    fn output_passes_through_and_ordinary_lines_end_nothing() {
        let (mut s, lc, out) = sink();
        s.write_all(b"[    0.000000] Linux version 6.12\r\nhello\n")
            .unwrap();
        assert_eq!(
            out.0.lock().unwrap().as_slice(),
            b"[    0.000000] Linux version 6.12\r\nhello\n"
        );
        assert!(!lc.is_finished());
    }

    #[test]
    fn halt_line_is_a_power_off() {
        let (mut s, lc, _) = sink();
        s.write_all(b"[    6.4] reboot: Power off not available: System halted instead\r\n")
            .unwrap();
        assert!(matches!(lc.wait(), Ok(ExitReason::PowerOff)));
    }

    #[test]
    fn panic_then_reset_is_a_panic_with_its_message() {
        let (mut s, lc, _) = sink();
        s.write_all(
            b"[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
        )
        .unwrap();
        assert!(!lc.is_finished());
        lc.guest_reset();
        match lc.wait() {
            Err(Error::GuestPanic(m)) => {
                assert_eq!(
                    m,
                    "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn end_of_panic_finishes_even_without_a_reset() {
        let (mut s, lc, _) = sink();
        s.write_all(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n---[ end Kernel panic - not syncing: VFS ]---\n")
            .unwrap();
        assert!(matches!(lc.wait(), Err(Error::GuestPanic(m)) if m.contains("VFS")));
    }

    #[test]
    fn reset_without_panic_is_a_reboot_and_long_lines_are_bounded() {
        let (mut s, lc, _) = sink();
        s.write_all(&vec![b'x'; 10 * MAX_LINE]).unwrap();
        assert!(s.line.len() <= MAX_LINE);
        lc.guest_reset();
        assert!(matches!(lc.wait(), Ok(ExitReason::Reboot)));
    }
}
