//! The host terminal during `run -t` / `exec -t`: raw mode for as long as
//! the workload runs (restored however the command ends), and its size.

use std::io::IsTerminal;

use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode; dropping it restores the terminal.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `None` when stdin is not a terminal (nothing to change).
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// The window size of the terminal on stdout (else stdin), as rows and
/// columns; 24x80 when neither is a terminal.
pub fn size() -> (u16, u16) {
    let from =
        |ws: termios::Winsize| (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col));
    termios::tcgetwinsize(std::io::stdout())
        .ok()
        .and_then(from)
        .or_else(|| termios::tcgetwinsize(std::io::stdin()).ok().and_then(from))
        .unwrap_or((24, 80))
}
