//! Tier 2: snapshots of a real KVM machine (the counting test guest, which
//! runs natively even where Linux cannot), restored by the real CLI in
//! fresh processes.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use supermachine::{Console, Machine, MachineConfig};
use supermachine_test_guests as guests;

const CLI: &str = env!("CARGO_BIN_EXE_supermachine");

/// Console output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Boots the counting guest, lets it report a few times, and snapshots it
/// with the machine stopped at the pause. Returns the snapshot directory
/// and everything the guest printed before the pause.
fn snapshot_counting_guest(dir: &Path, memory: u64) -> (PathBuf, String) {
    snapshot_with(dir, memory, "snapshot", |_| {})
}

/// [`snapshot_counting_guest`] with the machine's config adjusted, into
/// `dir/name`.
fn snapshot_with(
    dir: &Path,
    memory: u64,
    name: &str,
    adjust: impl FnOnce(&mut MachineConfig),
) -> (PathBuf, String) {
    let kernel = dir.join("counting.elf");
    std::fs::write(&kernel, guests::counting_guest(10)).unwrap();
    let captured = Captured::default();
    let mut config = MachineConfig::new(&kernel);
    config.memory_bytes = memory;
    adjust(&mut config);
    config.console = Console::Writer(Box::new(captured.clone()));
    let machine = Machine::start(config).expect("tier-2 tests need /dev/kvm");
    let deadline = Instant::now() + Duration::from_secs(20);
    while guests::reports(&captured.text()).len() < 20 {
        assert!(Instant::now() < deadline, "the guest did not count");
        std::thread::sleep(Duration::from_millis(5));
    }
    let snapshot = dir.join(name);
    let stats = machine.snapshot_and_stop(&snapshot).unwrap();
    assert_eq!(stats.memory_bytes, memory);
    assert!(stats.memory_data_bytes < 1 << 20, "{stats:?}");
    assert_eq!(machine.wait().unwrap(), supermachine::ExitReason::Stopped);
    (snapshot, captured.text())
}

/// A `supermachine boot --restore` process, killed when dropped.
struct Restored {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Restored {
    fn start(snapshot: &Path) -> Self {
        let mut child = Command::new(CLI)
            .args(["boot", "--restore"])
            .arg(snapshot)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    /// Reads `n` lines (the first may complete a line begun before the
    /// snapshot).
    fn lines(&mut self, n: usize) -> String {
        let mut text = String::new();
        for _ in 0..n {
            let before = text.len();
            self.out.read_line(&mut text).unwrap();
            assert!(text.len() > before, "the restored guest stopped printing");
        }
        text
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// `before` + `after` must be the reports 1, 2, 3, ... with nothing lost
/// or repeated.
fn assert_consecutive(before: &str, after: &str) {
    let all = format!("{before}{after}");
    let reports = guests::reports(&all);
    let expected: Vec<u64> = (1..=reports.len() as u64).collect();
    assert_eq!(
        reports, expected,
        "before the snapshot: {before:?}\nafter: {after:?}"
    );
}

#[test]
fn a_restored_machine_continues_in_a_fresh_process_and_restores_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, before) = snapshot_counting_guest(dir.path(), 128 << 20);
    let memory = snapshot.join("memory");
    let memory_hash = sha256(&memory);
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), 128 << 20);

    // A fresh process picks up exactly where the guest paused.
    let mut a = Restored::start(&snapshot);
    let a_first = a.lines(10);
    assert_consecutive(&before, &a_first);

    // While A runs on (its counter far past the snapshot's), a second
    // restore of the same snapshot starts from the snapshot, not from A.
    let a_later = a.lines(200);
    let a_reports = guests::reports(&format!("{before}{a_first}{a_later}"));
    let mut b = Restored::start(&snapshot);
    let b_first = b.lines(10);
    assert_eq!(b_first, a_first, "B did not start from the snapshot");
    let a_more = a.lines(5);
    assert_eq!(
        guests::reports(&a_more)[0],
        a_reports.last().unwrap() + 1,
        "A was disturbed by B"
    );
    drop(a);
    drop(b);
    assert_eq!(
        sha256(&memory),
        memory_hash,
        "a restore wrote to the memory file"
    );
}

/// Runs `supermachine boot --restore DIR` and returns its exit status and
/// standard error.
fn restore_error(snapshot: &Path) -> (bool, String) {
    restore_error_with(snapshot, &[])
}

fn restore_error_with(snapshot: &Path, extra: &[&std::ffi::OsStr]) -> (bool, String) {
    let mut child = Command::new(CLI)
        .args(["boot", "--restore"])
        .arg(snapshot)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(stdout.is_empty(), "the guest ran: {stdout:?}");
    (status.success(), stderr)
}

#[test]
fn damaged_snapshots_are_refused_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, _) = snapshot_counting_guest(dir.path(), 64 << 20);
    let state = std::fs::read(snapshot.join("state")).unwrap();
    let memory = std::fs::read(snapshot.join("memory")).unwrap();
    let case = |name: &str, state: &[u8], memory: &[u8]| -> String {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("state"), state).unwrap();
        std::fs::write(d.join("memory"), memory).unwrap();
        let (ok, stderr) = restore_error(&d);
        assert!(!ok, "{name}: restored");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            2,
            "{name}: left files behind"
        );
        stderr
    };
    let mut tampered = state.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(case("tampered", &tampered, &memory).contains("checksum mismatch"));
    assert!(case("truncated", &state[..state.len() / 2], &memory).contains("truncated"));
    let mut other_version = state.clone();
    other_version[8] = 99;
    assert!(case("version", &other_version, &memory).contains("format version 99"));
    assert!(case("short memory", &state, &memory[..memory.len() / 2]).contains("holds"));
    let (ok, stderr) = restore_error(&dir.path().join("nonexistent"));
    assert!(!ok);
    assert!(stderr.contains("nonexistent"), "{stderr}");
}

#[test]
fn a_snapshot_is_refused_where_its_devices_differ() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("vsock.sock");
    let (with_devices, _) = snapshot_with(dir.path(), 64 << 20, "with-devices", |c| {
        c.disks = vec![supermachine::DiskConfig {
            path: disk.clone(),
            read_only: false,
        }];
        c.vsock = Some(supermachine::VsockConfig {
            cid: 3,
            socket: socket.clone(),
        });
    });
    let (plain, _) = snapshot_counting_guest(dir.path(), 64 << 20);
    let new_socket = dir.path().join("restored.sock");

    // Its vsock device needs a socket of its own.
    let (ok, stderr) = restore_error(&with_devices);
    assert!(
        !ok && stderr.contains("a socket for it is needed"),
        "{stderr}"
    );
    // A socket for a snapshot without vsock is a mistake, not ignored.
    let (ok, stderr) = restore_error_with(&plain, &["--vsock".as_ref(), new_socket.as_os_str()]);
    assert!(!ok && stderr.contains("no vsock device"), "{stderr}");
    assert!(!new_socket.exists(), "the refused restore left its socket");
    // A disk that changed size since the snapshot.
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let (ok, stderr) =
        restore_error_with(&with_devices, &["--vsock".as_ref(), new_socket.as_os_str()]);
    assert!(!ok && stderr.contains("was 1048576 bytes"), "{stderr}");
    assert!(!new_socket.exists(), "the refused restore left its socket");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
