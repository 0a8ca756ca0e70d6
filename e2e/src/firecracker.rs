//! Driving a Firecracker process as the benchmarks' baseline: its API over
//! a Unix socket (HTTP/1.1, one connection kept open, each answer read by
//! its `Content-Length`), its serial console on standard output.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Firecracker, killed when dropped.
pub(crate) struct Firecracker {
    child: Child,
    api: BufReader<UnixStream>,
    socket: PathBuf,
    /// The guest's serial console.
    pub(crate) stdout: Option<BufReader<ChildStdout>>,
}

impl Firecracker {
    /// Starts `binary` with its API on `socket` and waits until the API
    /// accepts a connection.
    pub(crate) fn start(binary: &Path, socket: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new(binary)
            .arg("--api-sock")
            .arg(socket)
            .args(["--level", "Error"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().map(BufReader::new);
        let deadline = Instant::now() + Duration::from_secs(10);
        let api = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("firecracker exited at start: {status}"));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("firecracker's API socket: {e}"));
                }
            }
        };
        Ok(Self {
            child,
            api: BufReader::new(api),
            socket: socket.to_path_buf(),
            stdout,
        })
    }

    /// One API request; fails unless the answer is 2xx.
    pub(crate) fn request(&mut self, method: &str, path: &str, body: &str) -> Result<(), String> {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.api
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let mut status = String::new();
        self.api
            .read_line(&mut status)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            self.api
                .read_line(&mut header)
                .map_err(|e| format!("{method} {path}: {e}"))?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut answer = vec![0u8; length];
        self.api
            .read_exact(&mut answer)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let code = status.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!(
                "{method} {path}: {} {}",
                status.trim(),
                String::from_utf8_lossy(&answer)
            ))
        }
    }

    /// Pauses the VM and writes a Full snapshot (`state`, `memory`) into
    /// `dir`; returns how long `PUT /snapshot/create` took.
    pub(crate) fn snapshot(&mut self, dir: &Path) -> Result<Duration, String> {
        self.request("PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let started = Instant::now();
        self.request(
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                dir.join("state").display(),
                dir.join("memory").display()
            ),
        )?;
        Ok(started.elapsed())
    }

    /// Loads the snapshot in `dir` (its memory file mapped) and resumes
    /// it, its vsock socket moved to `vsock` when given.
    pub(crate) fn restore(&mut self, dir: &Path, vsock: Option<&Path>) -> Result<(), String> {
        let vsock_override = vsock
            .map(|v| format!(r#","vsock_override":{{"uds_path":"{}"}}"#, v.display()))
            .unwrap_or_default();
        self.request(
            "PUT",
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true{vsock_override}}}"#,
                dir.join("state").display(),
                dir.join("memory").display()
            ),
        )
    }

    /// The process id (for memory accounting).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
