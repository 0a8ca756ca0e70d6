//! Host directories shared live into the guest (`run -v`): one virtio-fs
//! device per share, each served by its own virtiofsd process that this
//! VM starts, confines to the directory, and stops with the VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, io_error};

/// `HOST_DIR:GUEST_DIR[:ro|:rw]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The host directory (resolved to an absolute path when the VM
    /// starts; it must exist).
    pub host: PathBuf,
    /// Where the guest sees it (absolute, not `/`).
    pub guest: String,
    /// The guest may not write (enforced by virtiofsd on the host).
    pub read_only: bool,
}

impl std::str::FromStr for Share {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not HOST_DIR:GUEST_DIR[:ro]");
        let (rest, read_only) = match s.rsplit_once(':') {
            Some((rest, "ro")) => (rest, true),
            Some((rest, "rw")) => (rest, false),
            _ => (s, false),
        };
        let (host, guest) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        if !guest.starts_with('/') || guest.trim_end_matches('/').is_empty() {
            return Err(format!(
                "'{s}': the guest directory must be absolute and not /"
            ));
        }
        if guest.contains(['\0', ',']) || guest.split('/').any(|c| c == "..") {
            return Err(format!(
                "'{s}': the guest directory {guest:?} is not a plain path"
            ));
        }
        Ok(Share {
            host: PathBuf::from(host),
            guest: guest.trim_end_matches('/').to_string(),
            read_only,
        })
    }
}

impl Share {
    /// The host directory, absolute; an error naming it when it is not a
    /// directory.
    pub fn host_dir(&self) -> Result<PathBuf> {
        let missing = || {
            Error::InvalidOption(format!(
                "host directory {} does not exist (-v {}:{})",
                self.host.display(),
                self.host.display(),
                self.guest
            ))
        };
        let dir = std::fs::canonicalize(&self.host).map_err(|_| missing())?;
        if !dir.is_dir() {
            return Err(Error::InvalidOption(format!(
                "{} is not a directory (-v {}:{})",
                self.host.display(),
                self.host.display(),
                self.guest
            )));
        }
        Ok(dir)
    }

    /// The kernel command-line word the agent mounts it by.
    pub(crate) fn agent_param(&self, tag: &str) -> String {
        let hex: String = self.guest.bytes().map(|b| format!("{b:02x}")).collect();
        let mode = if self.read_only { "ro" } else { "rw" };
        format!("supermachine.share={tag},{mode},{hex}")
    }
}

/// A helper program: `$env_var` if set, else `name` on PATH, else in one
/// of `elsewhere`.
pub(crate) fn find_helper(name: &str, env_var: &str, elsewhere: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(elsewhere.iter().cloned())
        .find(|p| p.is_file())
}

/// The virtiofsd program: `$SUPERMACHINE_VIRTIOFSD`, else `virtiofsd` on
/// PATH, else where distributions and `cargo install` put it.
pub fn find_virtiofsd() -> Result<PathBuf> {
    if !cfg!(target_os = "linux") {
        return Err(Error::InvalidOption(
            "-v: sharing host directories needs virtiofsd, which runs on Linux only".into(),
        ));
    }
    let mut elsewhere: Vec<PathBuf> = vec![
        "/usr/libexec/virtiofsd".into(),
        "/usr/lib/qemu/virtiofsd".into(),
    ];
    if let Some(home) = std::env::var_os("HOME") {
        elsewhere.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    find_helper("virtiofsd", "SUPERMACHINE_VIRTIOFSD", &elsewhere).ok_or_else(|| {
        Error::InvalidOption(
            "-v needs virtiofsd, which is not installed (cargo install virtiofsd, or set SUPERMACHINE_VIRTIOFSD)"
                .into(),
        )
    })
}

/// A running virtiofsd serving one share; stopped on drop.
#[derive(Debug)]
pub(crate) struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Starts virtiofsd for `dir` on `socket` and waits until it listens.
    pub(crate) fn start(
        program: &Path,
        dir: &Path,
        socket: &Path,
        read_only: bool,
    ) -> Result<Self> {
        let mut command = Command::new(program);
        command
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", dir.display()))
            // The guest sees host changes at once and vice versa: a live
            // share, not a copy.
            .arg("--cache=never")
            .arg("--sandbox=namespace")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if read_only {
            command.arg("--readonly");
        }
        let child = command
            .spawn()
            .map_err(io_error(format!("starting {}", program.display())))?;
        let mut daemon = Virtiofsd { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                let mut why = String::new();
                if let Some(mut err) = daemon.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut why);
                }
                let why = why
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string();
                return Err(Error::InvalidOption(format!(
                    "virtiofsd for {} exited ({status}): {why}",
                    dir.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::InvalidOption(format!(
                    "virtiofsd for {} did not start listening within 10 s",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        // It exits by itself when the VMM's connection closes; a daemon
        // that never got one is killed.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_specs_parse_like_docker() {
        let s: Share = "/srv/data:/data".parse().unwrap();
        assert_eq!(
            (s.host.to_str(), s.guest.as_str(), s.read_only),
            (Some("/srv/data"), "/data", false)
        );
        let s: Share = "./rel:/mnt/x/:ro".parse().unwrap();
        assert_eq!(
            (s.host.to_str(), s.guest.as_str(), s.read_only),
            (Some("./rel"), "/mnt/x", true)
        );
        for bad in [
            "/srv",
            "/srv:data",
            ":/data",
            "/srv:/",
            "/srv:/a/../b",
            "/srv:/a,b",
        ] {
            assert!(bad.parse::<Share>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_host_directory_is_named() {
        let s: Share = "/no/such/dir:/data".parse().unwrap();
        let e = s.host_dir().unwrap_err().to_string();
        assert!(
            e.contains("/no/such/dir") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn the_agent_gets_the_path_hex_encoded() {
        let s: Share = "/h:/a b:ro".parse().unwrap();
        assert_eq!(s.agent_param("fs0"), "supermachine.share=fs0,ro,2f612062");
    }
}
