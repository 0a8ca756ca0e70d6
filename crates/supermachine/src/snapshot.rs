//! Snapshots of agent VMs: bake an image's VM once it is ready, restore it
//! in milliseconds as often as needed.
//!
//! A snapshot directory holds the VMM's `state` and `memory` files (see
//! `docs/snapshot.md`) and `vm.json`, which says what the library needs
//! around them: the image, the VM's size, the root disk it was taken
//! with, and the kept workload process to attach to after a restore.
//!
//! Baked snapshots live in the image store beside the image's root disk,
//! under `snapshots/<image-hex>-<key>`, where the key hashes what must
//! match for a `run` to use it: the image, vCPUs, memory, and the
//! workload's argv, environment, directory and user (or none: a VM
//! with its agent up and nothing started).
//!
//! ```no_run
//! use supermachine::{BakeOptions, Image, VmConfig};
//! let image = Image::open("demo")?;
//! let snapshot = image.bake(&BakeOptions::default())?;
//! let vm = snapshot.start(&VmConfig::default())?; // milliseconds
//! let out = vm.exec(["cat", "/etc/hostname"]).output()?;
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::images::{Overrides, ProcessSpec, Store};
use crate::{Error, Image, Result, Vm, VmConfig, io_error};

/// `vm.json`'s format; another is refused.
pub const SNAPSHOT_INFO_VERSION: u32 = 1;
const INFO_FILE: &str = "vm.json";
/// Under the image store.
const SNAPSHOTS_DIR: &str = "snapshots";

/// What `vm.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// [`SNAPSHOT_INFO_VERSION`].
    pub format: u32,
    /// A name given when it was baked.
    pub name: Option<String>,
    /// The image's ID, when it is an image's VM.
    pub image_id: Option<String>,
    /// The image's reference.
    pub image_reference: Option<String>,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The kept workload process, if one was started before the snapshot.
    pub workload: Option<Workload>,
    /// Kept processes of the snapshot (the workload among them), which a
    /// restore can attach to.
    pub kept: Vec<i32>,
    /// Seconds since the epoch when it was taken.
    pub created: u64,
    /// How long baking took until the save began (boot, workload start,
    /// readiness), ms; 0 for a snapshot that was not baked.
    pub bake_ms: u64,
    /// The root disk it was taken with; a restore needs this very file.
    pub root_disk: DiskIdentity,
    /// The guest's network settings, when it has a network device (a
    /// restore gives it a backend).
    #[serde(default)]
    pub network: Option<String>,
}

/// The workload process in a snapshot: its pid, and what it runs (the
/// part of a [`ProcessSpec`] that decides whether a `run` may use it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// The process id in the guest.
    pub pid: i32,
    /// What was started.
    pub spec: WorkloadSpec,
}

/// argv, environment, working directory and user of a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// argv.
    pub args: Vec<String>,
    /// The environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// User, group and supplementary groups.
    pub ids: (u32, u32, Vec<u32>),
}

impl From<&ProcessSpec> for WorkloadSpec {
    fn from(s: &ProcessSpec) -> Self {
        Self {
            args: s.args.clone(),
            env: s.env.clone(),
            cwd: s.cwd.clone(),
            ids: (s.uid, s.gid, s.groups.clone()),
        }
    }
}

/// Which file a disk is: a rebuilt disk (another inode or mtime) under the
/// same path would not match the guest's page cache in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Device and inode.
    pub file: (u64, u64),
    /// Last modification, ns since the epoch.
    pub mtime_ns: i128,
}

impl DiskIdentity {
    pub(crate) fn of(path: &Path) -> Result<Self> {
        let m = fs::metadata(path).map_err(io_error(format!("root disk {}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            size: m.len(),
            file: crate::sys::file_identity(&m),
            mtime_ns: mtime_ns(&m),
        })
    }
}

/// Last modification, ns since the epoch (before it: negative).
fn mtime_ns(meta: &fs::Metadata) -> i128 {
    match meta.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => after.as_nanos() as i128,
            Err(before) => -(before.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    }
}

/// A snapshot directory.
#[derive(Clone, Debug)]
pub struct Snapshot {
    dir: PathBuf,
    info: SnapshotInfo,
}

impl Snapshot {
    /// The snapshot in `dir` (its `vm.json` read and checked; the state
    /// and memory files are checked when it is restored).
    pub fn open(dir: impl AsRef<Path>) -> Result<Snapshot> {
        let dir = dir.as_ref();
        let path = dir.join(INFO_FILE);
        let bytes = fs::read(&path).map_err(|e| Error::Snapshot {
            path: dir.to_path_buf(),
            why: format!("{INFO_FILE}: {e}"),
        })?;
        let info: SnapshotInfo = serde_json::from_slice(&bytes).map_err(|e| Error::Snapshot {
            path: dir.to_path_buf(),
            why: format!("{INFO_FILE}: {e}"),
        })?;
        if info.format != SNAPSHOT_INFO_VERSION {
            return Err(Error::Snapshot {
                path: dir.to_path_buf(),
                why: format!(
                    "{INFO_FILE} is format {}, this supermachine reads {SNAPSHOT_INFO_VERSION}",
                    info.format
                ),
            });
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            info,
        })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// What it records.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Its ID: the directory's name.
    pub fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Bytes it occupies on disk (the memory file is sparse).
    pub fn disk_usage(&self) -> u64 {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| crate::sys::allocated_bytes(&m))
            .sum()
    }

    /// Restores a VM from it; see [`Vm::restore`].
    pub fn start(&self, options: &VmConfig) -> Result<Vm> {
        Vm::restore(self, options)
    }

    /// Deletes it. VMs restored from it run on (their memory is mapped).
    pub fn remove(self) -> Result<()> {
        fs::remove_dir_all(&self.dir).map_err(io_error(format!("removing {}", self.dir.display())))
    }
}

/// The snapshots baked into `store`, oldest first.
pub fn baked_snapshots(store: &Store) -> Result<Vec<Snapshot>> {
    let dir = store.root().join(SNAPSHOTS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("reading {}", dir.display()))(e)),
    };
    let mut all: Vec<Snapshot> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Snapshot::open(e.path()).ok())
        .collect();
    all.sort_by_key(|s| s.info.created);
    Ok(all)
}

/// How to bake an image's VM.
#[derive(Clone, Debug)]
pub struct BakeOptions {
    /// The VM (vCPUs, memory, ...). A writable disk or shares cannot be
    /// snapshotted and are refused.
    pub vm: VmConfig,
    /// Start the image's command (with `overrides`) before the snapshot;
    /// false bakes a VM with just its agent up.
    pub start_workload: bool,
    /// Changes to the image's command, as `run` takes them.
    pub overrides: Overrides,
    /// Ready when this command exits 0 (run in the guest, repeatedly).
    /// Default: the workload has started and, when the image exposes TCP
    /// ports, each accepts a connection on the guest's loopback.
    pub ready_cmd: Option<Vec<String>>,
    /// How long the workload may take to become ready.
    pub ready_timeout: Duration,
    /// A name to find it by (`snapshot ls`, `snapshot rm`).
    pub name: Option<String>,
}

impl Default for BakeOptions {
    fn default() -> Self {
        Self {
            vm: VmConfig::default(),
            start_workload: true,
            overrides: Overrides::default(),
            ready_cmd: None,
            ready_timeout: Duration::from_secs(60),
            name: None,
        }
    }
}

/// What a baked snapshot's key hashes.
#[derive(Serialize)]
struct KeyParts<'a> {
    image_id: &'a str,
    cpus: u32,
    memory_bytes: u64,
    workload: Option<&'a WorkloadSpec>,
    /// Left out when there is none, so that keys of snapshots baked
    /// before networking stay valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<&'a str>,
}

/// The directory a bake of `image` with this VM size and workload goes to.
fn baked_dir(image: &Image, vm: &VmConfig, workload: Option<&WorkloadSpec>) -> Result<PathBuf> {
    let network = crate::network::guest_view(&vm.network)?;
    let parts = KeyParts {
        image_id: image.id(),
        cpus: vm.cpus,
        memory_bytes: vm.memory_bytes,
        workload,
        network: network.as_deref(),
    };
    let json = serde_json::to_vec(&parts).map_err(|e| Error::InvalidOption(e.to_string()))?;
    let key: String = Sha256::digest(&json)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let image_hex = image.id().strip_prefix("sha256:").unwrap_or(image.id());
    Ok(image
        .store()
        .root()
        .join(SNAPSHOTS_DIR)
        .join(format!("{image_hex}-{key}")))
}

/// A half-made bake directory, removed when dropped unless stored.
struct BakeDir {
    path: PathBuf,
    stored: bool,
}

impl BakeDir {
    fn beside(dest: &Path) -> BakeDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            ".bake-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        BakeDir {
            path: dest.with_file_name(name),
            stored: false,
        }
    }

    /// Renames it to `dest`, replacing what was there.
    fn store(mut self, dest: &Path) -> Result<()> {
        if dest.exists() {
            fs::remove_dir_all(dest).map_err(io_error(format!("replacing {}", dest.display())))?;
        }
        fs::rename(&self.path, dest).map_err(io_error(format!("storing {}", dest.display())))?;
        self.stored = true;
        Ok(())
    }
}

impl Drop for BakeDir {
    fn drop(&mut self) {
        if !self.stored {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

impl Image {
    /// Boots a VM of this image, starts its command (unless
    /// `start_workload` is false), waits until it is ready, snapshots it
    /// and keeps the snapshot in the store, replacing one baked before
    /// with the same key. `run` and [`Image::baked_snapshot`] find it.
    pub fn bake(&self, options: &BakeOptions) -> Result<Snapshot> {
        let began = Instant::now();
        check_snapshottable(&options.vm)?;
        let spec = self.command(&options.overrides)?;
        let workload_spec = options.start_workload.then(|| WorkloadSpec::from(&spec));
        let dest = baked_dir(self, &options.vm, workload_spec.as_ref())?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(io_error(format!("creating {}", parent.display())))?;
        }
        let bake_dir = BakeDir::beside(&dest);

        let vm = self.start(&options.vm)?;
        let mut workload = None;
        let mut process = None;
        if let Some(spec_key) = workload_spec {
            let mut p = vm.exec_spec(&spec).keep().spawn()?;
            let tail = OutputTail::default();
            for reader in [p.take_stdout(), p.take_stderr()].into_iter().flatten() {
                tail.collect(reader);
            }
            workload = Some((
                Workload {
                    pid: p.pid(),
                    spec: spec_key,
                },
                tail,
            ));
            process = Some(p);
        }
        wait_ready(&vm, &spec, options, process.as_ref(), workload.as_ref())?;
        let info = SnapshotInfo {
            name: options.name.clone(),
            image_id: Some(self.id().to_string()),
            image_reference: Some(self.reference().to_string()),
            kept: workload.iter().map(|(w, _)| w.pid).collect(),
            workload: workload.map(|(w, _)| w),
            bake_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..vm.snapshot_info()?
        };
        vm.snapshot_and_stop_into(&bake_dir.path, &info)?;
        drop(process);
        bake_dir.store(&dest)?;
        Snapshot::open(&dest)
    }

    /// The baked snapshot `run` would restore for `spec` with `vm`'s size
    /// and guest network settings: one whose workload is `spec`, else one
    /// with no workload. Snapshots whose root disk was rebuilt since are
    /// passed over.
    pub fn baked_snapshot(&self, spec: &ProcessSpec, vm: &VmConfig) -> Result<Option<Snapshot>> {
        let wanted = WorkloadSpec::from(spec);
        let network = crate::network::guest_view(&vm.network)?;
        let (cpus, memory_bytes) = (vm.cpus, vm.memory_bytes);
        for workload in [Some(&wanted), None] {
            let dir = baked_dir(self, vm, workload)?;
            if !dir.is_dir() {
                continue;
            }
            let snapshot = Snapshot::open(&dir)?;
            let i = &snapshot.info;
            let matches = i.image_id.as_deref() == Some(self.id())
                && i.cpus == cpus
                && i.memory_bytes == memory_bytes
                && i.workload.as_ref().map(|w| &w.spec) == workload
                && i.network == network;
            let disk = DiskIdentity::of(&i.root_disk.path).ok();
            if matches && disk.as_ref() == Some(&i.root_disk) {
                return Ok(Some(snapshot));
            }
            log::info!(
                "passing over snapshot {}: it no longer matches its image's root disk",
                dir.display()
            );
        }
        Ok(None)
    }
}

/// The last output of a bake's workload, for the error when it fails.
#[derive(Clone, Default)]
struct OutputTail(Arc<Mutex<Vec<u8>>>);

impl OutputTail {
    const KEEP: usize = 4096;

    fn collect(&self, mut reader: crate::OutputReader) {
        let tail = self.clone();
        let _ = std::thread::Builder::new()
            .name("bake-output".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut t = tail.0.lock().unwrap_or_else(|p| p.into_inner());
                    t.extend_from_slice(&buf[..n]);
                    let excess = t.len().saturating_sub(Self::KEEP);
                    t.drain(..excess);
                }
            });
    }

    fn last_line(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| format!(" (its last output: {l})"))
            .unwrap_or_default()
    }
}

/// Waits until the workload is ready: `ready_cmd` succeeds, or every
/// exposed TCP port accepts a connection, or (neither) it has started.
fn wait_ready(
    vm: &Vm,
    spec: &ProcessSpec,
    options: &BakeOptions,
    process: Option<&crate::Process>,
    workload: Option<&(Workload, OutputTail)>,
) -> Result<()> {
    let deadline = Instant::now() + options.ready_timeout;
    let ports: Vec<u16> = spec
        .ports
        .iter()
        .filter(|p| !p.udp)
        .map(|p| p.number)
        .collect();
    loop {
        if let (Some(p), Some((_, tail))) = (process, workload)
            && p.has_exited()
        {
            return Err(Error::Agent(format!(
                "the workload exited before it was ready{}",
                tail.last_line()
            )));
        }
        let ready = match &options.ready_cmd {
            Some(cmd) => vm
                .exec(cmd.iter().cloned())
                .timeout(Duration::from_secs(10))
                .output()?
                .status
                .success(),
            None if process.is_some() => ports.iter().all(|&port| vm.connect(port).is_ok()),
            None => true,
        };
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            let what = match &options.ready_cmd {
                Some(cmd) => format!("`{}` did not succeed", cmd.join(" ")),
                None => format!("port(s) {ports:?} did not accept connections"),
            };
            return Err(Error::Agent(format!(
                "the workload was not ready within {:?}: {what}",
                options.ready_timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Snapshots cannot hold a writable disk (each restore would write the
/// one file) or a share (its state lives in virtiofsd).
pub(crate) fn check_snapshottable(config: &VmConfig) -> Result<()> {
    if config.writable_disk.is_some() {
        return Err(Error::InvalidOption(
            "a VM with a writable disk cannot be snapshotted (every restore would write the same disk)".into(),
        ));
    }
    if !config.shares.is_empty() {
        return Err(Error::InvalidOption(
            "a VM with shared directories cannot be snapshotted (their state lives in virtiofsd)"
                .into(),
        ));
    }
    Ok(())
}
