//! Test fixtures: a real registry (Debian's `docker-registry`) on
//! 127.0.0.1, OCI image layouts built from Debian's static busybox, and
//! `skopeo` (a real OCI client) to push them.
#![allow(clippy::unwrap_used, dead_code)]

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install Debian's {package} (`cargo xtask ci` installs it)"
    );
}

/// A registry process with its own storage, stopped on drop.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub addr: String,
    child: Option<Child>,
    config: PathBuf,
}

impl Registry {
    /// Starts a registry; with `user`, it requires that htpasswd login.
    pub fn start(user: Option<(&str, &str)>) -> Self {
        Self::start_with(user, false)
    }

    /// Starts a registry serving HTTPS with a certificate for 127.0.0.1
    /// signed by a CA of its own, at `<dir>/ca.crt`.
    pub fn start_tls() -> Self {
        Self::start_with(None, true)
    }

    /// The CA that signed a TLS registry's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn start_with(user: Option<(&str, &str)>, tls: bool) -> Self {
        need("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((name, pass)) = user {
            need("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", name, pass])
                .output()
                .unwrap();
            assert!(out.status.success());
            fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        if tls {
            make_certificates(dir.path());
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.crt").display(),
                dir.path().join("server.key").display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let mut r = Self {
            dir,
            addr,
            child: None,
            config: config_path,
        };
        r.restart();
        r
    }

    /// Starts the process again (same storage and port).
    pub fn restart(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.addr).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (the storage stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The stored blob file for `digest` (to corrupt it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes an OCI layout with skopeo (`all`: every manifest of the index).
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<&str>) {
        self.push_as(layout, tag, repo, creds, None);
    }

    /// Pushes with skopeo, converting to `format` (`v2s2`: Docker schema 2)
    /// when given.
    pub fn push_as(
        &self,
        layout: &Path,
        tag: &str,
        repo: &str,
        creds: Option<&str>,
        format: Option<&str>,
    ) {
        need("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some(f) = format {
            cmd.args(["--format", f]);
        }
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A CA (`ca.crt`) and a server certificate for 127.0.0.1 it signed
/// (`server.crt`, `server.key`), made with openssl in `dir`.
pub fn make_certificates(dir: &Path) {
    need("openssl", "openssl");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=supermachine test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

/// The one-line registry error a pull should have failed with.
pub fn registry_refusal(
    result: Result<supermachine_oci::ImageRecord, supermachine_oci::Error>,
) -> String {
    match result {
        Err(supermachine_oci::Error::Registry(why)) => {
            assert!(!why.contains('\n'), "one line: {why}");
            why
        }
        other => panic!("expected a registry error, got {other:?}"),
    }
}

/// `skopeo copy SRC DEST` (transports spelled out, as skopeo takes them).
pub fn skopeo_copy(src: &str, dest: &str) {
    need("skopeo", "skopeo");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", src, dest])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        supermachine_oci::Digest::sha256_of(bytes).hex()
    )
}

/// How a test layer is compressed.
#[derive(Clone, Copy)]
pub enum Packing {
    Gzip,
    Zstd,
}

/// A layer: tar entries (path, content or symlink target, is_dir).
pub enum Item {
    File(&'static str, Vec<u8>, u32),
    Dir(&'static str),
    Symlink(&'static str, &'static str),
}

pub fn layer_tar(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match item {
            Item::File(path, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                b.append_data(&mut h, path, &data[..]).unwrap();
            }
            Item::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            Item::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// An OCI image layout directory being built.
pub struct Layout {
    pub dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

/// What was written for one image.
pub struct Built {
    pub manifest: String,
    pub config: String,
    pub layers: Vec<String>,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> (String, u64) {
        let digest = sha256(bytes);
        let hex = digest.strip_prefix("sha256:").unwrap();
        fs::write(self.dir.join("blobs/sha256").join(hex), bytes).unwrap();
        (digest, bytes.len() as u64)
    }

    /// Adds an image for `arch` with these layers and `Cmd`.
    pub fn image(&mut self, arch: &str, layers: &[(Packing, Vec<u8>)], cmd: &[&str]) -> Built {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut digests = Vec::new();
        for (packing, tar) in layers {
            diff_ids.push(sha256(tar));
            let (bytes, media_type) = match packing {
                Packing::Gzip => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(tar).unwrap();
                    (
                        e.finish().unwrap(),
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                    )
                }
                Packing::Zstd => (
                    zstd_compress(tar),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            let (digest, size) = self.blob(&bytes);
            digests.push(digest.clone());
            descriptors
                .push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
        }
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (config_digest, config_size) = self.blob(config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": descriptors,
        });
        let bytes = manifest.to_string();
        let (manifest_digest, manifest_size) = self.blob(bytes.as_bytes());
        self.manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
        Built {
            manifest: manifest_digest,
            config: config_digest,
            layers: digests,
        }
    }

    /// Writes index.json naming everything added under `tag`: one image
    /// directly, several through a nested multi-platform index.
    pub fn finish(&self, tag: &str) {
        let top = if self.manifests.len() == 1 {
            let mut m = self.manifests[0].clone();
            m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
            m
        } else {
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": self.manifests,
            });
            let (digest, size) = self.blob(index.to_string().as_bytes());
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest, "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })
        };
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
        fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// The busybox base layer: /bin/busybox, /bin/sh, /etc/passwd.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX}: {e} (install Debian's busybox-static; `cargo xtask ci` does)")
    });
    layer_tar(&[
        Item::Dir("bin"),
        Item::File("bin/busybox", busybox, 0o755),
        Item::Symlink("bin/sh", "busybox"),
        Item::Dir("etc"),
        Item::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nweb:x:80:80::/srv:/bin/sh\n".to_vec(),
            0o644,
        ),
        Item::File("etc/group", b"root:x:0:\nweb:x:80:\n".to_vec(), 0o644),
    ])
}

/// Unpacks a stored image into a new directory under `work`.
pub fn unpack(
    store: &supermachine_oci::Store,
    record: &supermachine_oci::ImageRecord,
    work: &Path,
) -> tempfile::TempDir {
    let tree = tempfile::tempdir_in(work).unwrap();
    supermachine_oci::rootfs::unpack_image(
        store,
        record,
        tree.path(),
        supermachine_oci::Limits::default(),
    )
    .unwrap();
    tree
}

/// The unpacked tree holds Debian's busybox, byte for byte.
pub fn assert_busybox_in(tree: &Path) {
    assert_eq!(
        file_digest(&tree.join("bin/busybox")),
        file_digest(Path::new(BUSYBOX))
    );
}

/// A digest of the unpacked file at `path` in a pulled image's tree.
pub fn file_digest(path: &Path) -> String {
    format!("{:x}", Sha256::digest(fs::read(path).unwrap()))
}

/// A TCP relay in front of a registry that, when armed, stops passing the
/// registry's bytes once `cut_after` of them have gone through, so a test
/// can stop the registry in the middle of a blob.
pub struct Relay {
    pub addr: String,
    shared: std::sync::Arc<RelayState>,
}

struct RelayState {
    cut_after: std::sync::atomic::AtomicU64,
    passed: std::sync::atomic::AtomicU64,
    tripped: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
    tripped_signal: std::sync::Condvar,
    clients: std::sync::Mutex<Vec<TcpStream>>,
}

impl Relay {
    /// Relays to `upstream`; `cut_after` bytes from it pass (`u64::MAX`:
    /// all of them).
    pub fn start(upstream: &str, cut_after: u64) -> Self {
        use std::sync::atomic::AtomicU64;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = std::sync::Arc::new(RelayState {
            cut_after: AtomicU64::new(cut_after),
            passed: AtomicU64::new(0),
            tripped: std::sync::Mutex::new(false),
            released: std::sync::Condvar::new(),
            tripped_signal: std::sync::Condvar::new(),
            clients: std::sync::Mutex::new(Vec::new()),
        });
        let upstream = upstream.to_string();
        let state = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                state
                    .clients
                    .lock()
                    .unwrap()
                    .push(client.try_clone().unwrap());
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let state = state.clone();
                std::thread::spawn(move || state.pass(server, client));
            }
        });
        Self { addr, shared }
    }

    /// Waits until the cut point is reached.
    pub fn wait_until_cut(&self) {
        let mut tripped = self.shared.tripped.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !*tripped {
            assert!(
                Instant::now() < deadline,
                "the transfer never reached the cut"
            );
            tripped = self
                .shared
                .tripped_signal
                .wait_timeout(tripped, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// Closes every client connection held at the cut, and lets all
    /// later traffic through.
    pub fn cut_and_open(&self) {
        self.shared
            .cut_after
            .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        for c in self.shared.clients.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.shared.released.notify_all();
    }
}

impl RelayState {
    fn pass(&self, mut server: TcpStream, mut client: TcpStream) {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let before = self.passed.fetch_add(n as u64, Ordering::SeqCst);
            let limit = self.cut_after.load(Ordering::SeqCst);
            if before + n as u64 > limit {
                let allowed = limit.saturating_sub(before) as usize;
                let _ = client.write_all(&buf[..allowed.min(n)]);
                let mut tripped = self.tripped.lock().unwrap();
                *tripped = true;
                self.tripped_signal.notify_all();
                while self.cut_after.load(Ordering::SeqCst) != u64::MAX {
                    tripped = self.released.wait(tripped).unwrap();
                }
                return;
            }
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
    }
}

/// `data` as libzstd compresses it (on Linux, where the tests run), or
/// as the pure-Rust encoder does where libzstd is not built.
pub fn zstd_compress(data: &[u8]) -> Vec<u8> {
    #[cfg(target_os = "linux")]
    return zstd::encode_all(data, 3).unwrap();
    #[cfg(not(target_os = "linux"))]
    return ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest);
}
