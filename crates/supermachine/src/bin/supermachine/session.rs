//! Attaching this terminal to a guest process (`run` in the foreground,
//! `exec`): its stdout and stderr stream live to ours, our stdin feeds
//! its (with `-i`), and the signals a user sends us go to it.

use std::io::{self, Read, Write};

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;
use supermachine::{ExecBuilder, ExitInfo, OutputReader, Process, ProcessController};

use crate::terminal;

/// Signals passed on to the workload (SIGWINCH becomes a resize).
const FORWARDED: [i32; 7] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH];

/// Spawns `exec` with our stdin (`interactive`) and a terminal of our
/// size (`tty`; raw mode on ours while it runs with both), streams it with
/// [`attach`] and returns its exit status as a shell reports it.
pub fn run(
    mut exec: ExecBuilder<'_>,
    interactive: bool,
    tty: bool,
    on_stop: impl FnOnce() + Send + 'static,
) -> supermachine::Result<u8> {
    if interactive {
        exec = exec.pipe_stdin();
    }
    let _raw = if tty {
        let (rows, cols) = terminal::size();
        exec = exec.tty(rows, cols);
        interactive.then(terminal::RawMode::enter).flatten()
    } else {
        None
    };
    let info = attach(exec.spawn()?, interactive, tty, on_stop)?;
    Ok(u8::try_from(info.status.shell_code()).unwrap_or(u8::MAX))
}

/// Streams an already running `process` (no stdin, no terminal) with
/// [`attach`]; returns its exit status as a shell reports it.
pub fn attach_status(
    process: Process,
    on_stop: impl FnOnce() + Send + 'static,
) -> supermachine::Result<u8> {
    let info = attach(process, false, false, on_stop)?;
    Ok(u8::try_from(info.status.shell_code()).unwrap_or(u8::MAX))
}

/// Streams `process` to this terminal until it exits. `on_stop` runs once,
/// on the first SIGINT or SIGTERM after it has been passed on (`run` uses
/// it to stop the VM if the workload ignores it).
fn attach(
    mut process: Process,
    interactive: bool,
    tty: bool,
    on_stop: impl FnOnce() + Send + 'static,
) -> supermachine::Result<ExitInfo> {
    // Without -i the workload's stdin is /dev/null; with -t alone its
    // terminal simply gets no input (the handle stays open until exit).
    let stdin = process.take_stdin();
    let _idle_terminal_input = match stdin {
        Some(mut input) if interactive => {
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 32 << 10];
                    let mut host = io::stdin().lock();
                    loop {
                        match host.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if input.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    let _ = input.close();
                })
                .ok();
            None
        }
        other => other,
    };
    let stdout = process.take_stdout().map(|r| copy_out(r, false));
    let stderr = process.take_stderr().map(|r| copy_out(r, true));
    let signals = forward_signals(process.controller(), tty, on_stop);
    let result = process.wait();
    for t in [stdout, stderr].into_iter().flatten() {
        let _ = t.join();
    }
    if let Some((handle, thread)) = signals {
        handle.close();
        let _ = thread.join();
    }
    result
}

fn copy_out(mut from: OutputReader, stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let written = if stderr {
                let mut e = io::stderr().lock();
                e.write_all(&buf[..n]).and_then(|()| e.flush())
            } else {
                let mut o = io::stdout().lock();
                o.write_all(&buf[..n]).and_then(|()| o.flush())
            };
            if written.is_err() {
                // Our reader went away: keep draining so the workload is
                // not stopped by a full queue, as it would be by SIGPIPE's
                // absence anyway.
                while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
                return;
            }
        }
    })
}

type SignalThread = (signal_hook::iterator::Handle, std::thread::JoinHandle<()>);

fn forward_signals(
    controller: ProcessController,
    tty: bool,
    on_stop: impl FnOnce() + Send + 'static,
) -> Option<SignalThread> {
    let mut signals = Signals::new(FORWARDED).ok()?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut on_stop = Some(on_stop);
            for signal in signals.forever() {
                if signal == SIGWINCH {
                    if tty {
                        let (rows, cols) = terminal::size();
                        let _ = controller.resize(rows, cols);
                    }
                    continue;
                }
                if controller.signal(signal).is_err() {
                    continue;
                }
                if matches!(signal, SIGINT | SIGTERM)
                    && let Some(f) = on_stop.take()
                {
                    f();
                }
            }
        })
        .ok()?;
    Some((handle, thread))
}
