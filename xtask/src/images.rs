//! Guest initramfs images for the demo, the end-to-end tests and the boot
//! benchmark: Debian's static busybox and a one-purpose `/init` each.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::cpio::Archive;
use crate::deps;
use crate::testhost::Binaries;

const BUSYBOX: &str = "/bin/busybox";

/// Lines every image's /init starts with: applets, /proc, /sys.
const INIT_PRELUDE: &str = "#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
";

/// The guest's view of itself, on one line the tests parse.
const MARKER_LINE: &str = r#"echo "SUPERMACHINE-E2E-MARKER cpus=$(nproc) mem_kib=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)""#;

pub const DEMO_INIT: &str = r#"echo
echo "Hello from a supermachine microVM."
echo "  kernel: $(uname -sr)"
echo "  cpus:   $(nproc)"
echo "  memory: $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "  uptime: $(cut -d' ' -f1 /proc/uptime) s"
echo
poweroff -f
"#;

/// The virtio-blk end-to-end test's guest: writes a known pattern through
/// /dev/vda and reads it back; checks that the read-only /dev/vdb refuses
/// writes and reads its marker; checks the entropy device.
const BLK_INIT: &str = r#"yes SUPERMACHINE-BLK-PATTERN | head -c 4194304 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=65536 conv=fsync 2>/dev/null && echo BLK-WRITTEN
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=65536 count=64 2>/dev/null | cmp - /tmp/pattern && echo BLK-READBACK-OK
if dd if=/tmp/pattern of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; then
  echo BLK-RO-WRITE-ACCEPTED
else
  echo BLK-RO-REFUSED
fi
echo "BLK-RO-CONTENT $(head -c 16 /dev/vdb)"
echo "BLK-SIZES $(cat /sys/block/vda/size) $(cat /sys/block/vdb/ro)"
test -c /dev/hwrng && head -c 64 /dev/hwrng | wc -c | sed 's/^/RNG-BYTES /'
poweroff -f
"#;

/// Debian's static busybox for `arch`: the system's own on x86_64, the
/// arm64 package's from the sysroot on aarch64.
pub fn busybox(arch: Arch) -> Result<PathBuf> {
    let path = match arch {
        Arch::X86_64 => {
            deps::ensure_packages(&["busybox-static"])?;
            PathBuf::from(BUSYBOX)
        }
        Arch::Aarch64 => crate::sysroot::build(arch, crate::sysroot::TEST_HOST_PACKAGES)?
            .join(BUSYBOX.trim_start_matches('/')),
    };
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // A dynamically linked busybox would need its libraries in the image.
    if has_interpreter(&bytes) {
        bail!(
            "{} is dynamically linked; install Debian's busybox-static",
            path.display()
        );
    }
    Ok(path)
}

/// True when an ELF file names a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let word = |at: usize, n: usize| -> Option<u64> {
        let b = elf.get(at..at + n)?;
        Some(b.iter().rev().fold(0u64, |a, x| (a << 8) | u64::from(*x)))
    };
    let (Some(phoff), Some(size), Some(count)) = (word(32, 8), word(54, 2), word(56, 2)) else {
        return false;
    };
    (0..count).any(|i| word((phoff + i * size) as usize, 4) == Some(u64::from(PT_INTERP)))
}

/// A minimal root: busybox, /dev/console, and `init` as /init.
pub fn image(arch: Arch, init_body: &str, dest: &Path) -> Result<()> {
    image_with(arch, init_body, &[], dest)
}

/// [`image`] plus `extra` files (path in the image, host file).
pub fn image_with(arch: Arch, init_body: &str, extra: &[(&str, &Path)], dest: &Path) -> Result<()> {
    let mut a = Archive::default();
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "sbin", "usr", "usr/bin", "usr/sbin",
    ] {
        a.dir(d);
    }
    a.char_device("dev/console", 5, 1)
        .char_device("dev/null", 1, 3);
    a.file_from("bin/busybox", 0o755, &busybox(arch)?)?;
    a.symlink("bin/sh", "busybox");
    for (name, path) in extra {
        a.file_from(name, 0o755, path)?;
    }
    a.file(
        "init",
        0o755,
        format!("{INIT_PRELUDE}{init_body}").as_bytes(),
    );
    a.write_to(dest)
}

/// Writes every guest image the tests and benchmark use into `dir`.
pub fn build_test_images(dir: &Path, bins: &Binaries) -> Result<()> {
    let arch = bins.arch;
    fs::create_dir_all(dir)?;
    image(
        arch,
        &format!("{MARKER_LINE}\npoweroff -f\n"),
        &dir.join("poweroff.cpio"),
    )?;
    image(
        arch,
        &format!("{MARKER_LINE}\nreboot -f\n"),
        &dir.join("reboot.cpio"),
    )?;
    // /init exiting makes the kernel panic ("Attempted to kill init!").
    image(
        arch,
        "echo 'init: exiting on purpose'\nexit 3\n",
        &dir.join("panic.cpio"),
    )?;
    image(
        arch,
        "echo SUPERMACHINE-BENCH-INIT\nsleep 1\npoweroff -f\n",
        &dir.join("bench.cpio"),
    )?;
    image(arch, DEMO_INIT, &dir.join("demo.cpio"))?;
    image(arch, BLK_INIT, &dir.join("blk.cpio"))?;
    image_with(
        arch,
        "/bin/vsock-peer\npoweroff -f\n",
        &[("bin/vsock-peer", &bins.vsock_peer)],
        &dir.join("vsock.cpio"),
    )?;
    // `bench_runs=N` on the kernel command line reaches /init's environment.
    image_with(
        arch,
        "/bin/bench-peer --blk-runs \"${bench_runs:-3}\"\npoweroff -f\n",
        &[("bin/bench-peer", &bins.bench_peer)],
        &dir.join("bench-virtio.cpio"),
    )?;
    Ok(())
}

/// The agent tests' image, as an EROFS root disk like the ones `pull`
/// builds: Debian's static busybox with every applet linked, accounts
/// (root, and `app` in the extra group `staff`), a home for `app`, and
/// the tests' guest programs.
pub fn build_test_rootfs(bins: &Binaries, dest: &Path) -> Result<()> {
    use std::os::unix::fs::{PermissionsExt, chown};
    deps::ensure_packages(&["erofs-utils"])?;
    let tree = tempfile::tempdir()?;
    let root = tree.path();
    for d in [
        "bin", "dev", "etc", "proc", "sys", "tmp", "root", "home/app", "usr/bin", "usr/sbin",
        "sbin", "var/tmp",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    chown(root.join("home/app"), Some(1000), Some(1000))?;
    install_busybox(root, bins.arch)?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n",
    )?;
    for (name, path) in [
        ("tcp-echo", &bins.tcp_echo),
        ("bench-peer", &bins.bench_peer),
    ] {
        let target = root.join("usr/bin").join(name);
        fs::copy(path, &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
    }
    let _ = fs::remove_file(dest);
    crate::util::run(
        std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(dest)
            .arg(root),
    )
}

/// An empty ext4 file system of `bytes`: the writable disk the agent
/// tests give a VM for writes that outlive it.
pub fn build_empty_ext4(dest: &Path, bytes: u64) -> Result<()> {
    deps::ensure_packages(&["e2fsprogs"])?;
    let _ = fs::remove_file(dest);
    fs::File::create(dest)?.set_len(bytes)?;
    crate::util::run(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(dest),
    )
}

/// The demo image's name (`supermachine run demo`).
pub const DEMO_IMAGE: &str = "docker.io/library/demo:latest";

/// What the demo image runs.
const DEMO_HELLO: &str = r#"#!/bin/sh
echo "Hello from a supermachine microVM."
echo "  image:  demo (busybox, as user $(id -un) in $(pwd))"
echo "  kernel: $(uname -sr)"
echo "  cpus:   $(nproc)"
echo "  memory: $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "  args:   $*"
"#;

/// The demo image as a multi-platform OCI layout (amd64 and arm64):
/// Debian's static busybox of each architecture with every applet linked,
/// accounts, and a `hello` program as its Cmd.
pub fn build_demo_layout(dest: &Path) -> Result<()> {
    let mut trees = Vec::new();
    let mut platforms = Vec::new();
    for (arch, architecture) in [(Arch::X86_64, "amd64"), (Arch::Aarch64, "arm64")] {
        let tree = tempfile::tempdir()?;
        demo_tree(tree.path(), arch)?;
        platforms.push(crate::oci_layout::PlatformImage {
            architecture,
            layers: vec![crate::oci_layout::Layer::Dir {
                root: tree.path().to_path_buf(),
                entries: DEMO_TOP.map(String::from).to_vec(),
            }],
        });
        trees.push(tree);
    }
    crate::oci_layout::write_multi_platform(
        dest,
        DEMO_IMAGE,
        &serde_json::json!({
            "Cmd": ["hello"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
            "WorkingDir": "/home/demo",
        }),
        &platforms,
    )
}

/// The demo image's top-level directories.
const DEMO_TOP: [&str; 6] = ["bin", "etc", "home", "root", "tmp", "usr"];

/// The demo image unpacked as an OCI runtime bundle (`rootfs/` and the
/// `config.json` of `crun spec`, running `true`): the container baseline
/// of `cargo xtask bench run`. Skipped (Ok(false)) without crun.
pub fn build_demo_bundle(dest: &Path) -> Result<bool> {
    if !crate::util::have("crun") {
        return Ok(false);
    }
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    let rootfs = dest.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    demo_tree(&rootfs, Arch::X86_64)?;
    crate::util::run(
        std::process::Command::new("crun")
            .arg("spec")
            .current_dir(dest),
    )?;
    let path = dest.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["cwd"] = serde_json::json!("/home/demo");
    fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(true)
}

/// Debian's static busybox as `root/bin/busybox`, every applet a symlink
/// to it in `root/bin`.
fn install_busybox(root: &Path, arch: Arch) -> Result<()> {
    fs::create_dir_all(root.join("bin"))?;
    fs::copy(busybox(arch)?, root.join("bin/busybox"))?;
    // The applets, as this machine's busybox (the same Debian version)
    // lists them.
    let list = std::process::Command::new(busybox(Arch::X86_64)?)
        .arg("--list")
        .output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(())
}

/// The demo image's files, written under `root`.
fn demo_tree(root: &Path, arch: Arch) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["bin", "etc", "home/demo", "root", "tmp", "usr/local/bin"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    install_busybox(root, arch)?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ndemo:x:1000:1000:demo:/home/demo:/bin/sh\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\ndemo:x:1000:\n")?;
    let hello = root.join("usr/local/bin/hello");
    fs::write(&hello, DEMO_HELLO)?;
    fs::set_permissions(&hello, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The glibc test image's name.
pub const DEBIAN_IMAGE: &str = "docker.io/library/debian-python:bookworm";

/// What goes into the Debian image besides the minimal base.
const DEBIAN_PACKAGES: &str = "python3";

/// A Debian bookworm root file system with python3, built by mmdebstrap
/// from Debian's archive and cached (keyed by suite and packages), as an
/// OCI layout at `dest`: a real glibc distribution image, the kind users
/// run.
pub fn build_debian_layout(dest: &Path) -> Result<()> {
    deps::ensure_packages(&["mmdebstrap"])?;
    let key = crate::util::hash_parts(&[b"bookworm minbase", DEBIAN_PACKAGES.as_bytes(), b"v1"]);
    let cache = crate::util::cache_root()?.join("images");
    fs::create_dir_all(&cache)?;
    let entry = cache.join(format!("debian-python-{}", &key[..16]));
    let tarball = entry.join("rootfs.tar");
    if !tarball.is_file() {
        eprintln!(
            "xtask: building the Debian bookworm + {DEBIAN_PACKAGES} root file system (mmdebstrap)"
        );
        let staging = crate::util::Staging::new(&cache, "debian-python")?;
        crate::util::run(
            std::process::Command::new("mmdebstrap")
                .args(["--quiet", "--variant=minbase"])
                .arg(format!("--include={DEBIAN_PACKAGES}"))
                // Documentation nobody in a VM reads.
                .args([
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "bookworm",
                ])
                .arg(staging.path().join("rootfs.tar")),
        )?;
        staging.commit(&entry)?;
    }
    crate::oci_layout::write(
        dest,
        &crate::oci_layout::Image {
            name: DEBIAN_IMAGE,
            layers: vec![crate::oci_layout::Layer::Tar(tarball)],
            exec: serde_json::json!({
                "Cmd": ["python3"],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            }),
        },
    )?;
    Ok(())
}
