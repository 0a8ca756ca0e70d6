//! What PID 1 does to the machine: the root file system and the mounts
//! every container expects at boot, the clock, the entropy pool, power-off.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, Instant};

use supermachine_agent_protocol::Clock;

use crate::reaper;

/// What the host put on the kernel command line for the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// The image's root disk (EROFS), e.g. `/dev/vda`.
    pub root: Option<String>,
    /// A writable disk for the overlay's upper layer (default: tmpfs).
    pub upper: Option<String>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// virtio-fs shares to mount.
    pub shares: Vec<ShareMount>,
    /// The network interface's settings (`supermachine.net=`).
    pub net: Option<crate::net::NetParams>,
    /// Extra `/etc/hosts` entries (`supermachine.host=NAME:ADDR`).
    pub hosts: Vec<(String, std::net::IpAddr)>,
}

/// A virtio-fs share: `supermachine.share=TAG,ro|rw,PATH` with the guest
/// path hex-encoded (so any path survives the command line's word
/// splitting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareMount {
    /// The device's tag.
    pub tag: String,
    /// Where it is mounted (absolute).
    pub path: String,
    /// Mounted read-only (the host enforces it too).
    pub read_only: bool,
}

impl ShareMount {
    fn parse(value: &str) -> Option<ShareMount> {
        let mut parts = value.splitn(3, ',');
        let (tag, mode, hex) = (parts.next()?, parts.next()?, parts.next()?);
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            _ => return None,
        };
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let path = String::from_utf8(bytes).ok()?;
        (!tag.is_empty() && path.starts_with('/') && path != "/").then(|| ShareMount {
            tag: tag.to_string(),
            path,
            read_only,
        })
    }
}

impl BootParams {
    /// Reads `supermachine.root=`, `supermachine.upper=` and
    /// `supermachine.hostname=` from a kernel command line.
    pub fn parse(cmdline: &str) -> BootParams {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("supermachine.root=") {
                p.root = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("supermachine.upper=") {
                p.upper = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("supermachine.hostname=") {
                p.hostname = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("supermachine.net=") {
                p.net = crate::net::NetParams::parse(v);
                if p.net.is_none() {
                    log::warn!("ignoring malformed supermachine.net={v}");
                }
            } else if let Some(v) = word.strip_prefix("supermachine.host=") {
                match crate::net::parse_host_entry(v) {
                    Some(entry) => p.hosts.push(entry),
                    None => log::warn!("ignoring malformed supermachine.host={v}"),
                }
            } else if let Some(v) = word.strip_prefix("supermachine.share=") {
                match ShareMount::parse(v) {
                    Some(share) => p.shares.push(share),
                    None => log::warn!("ignoring malformed supermachine.share={v}"),
                }
            }
        }
        p
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// mount(2), with the failing target named in the error.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let d = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string (or null for
    // no data) that outlives the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags,
            d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mounting {fstype} on {target}: {e}"),
        ));
    }
    Ok(())
}

fn mkdir(path: &str, mode: u32) -> io::Result<()> {
    match fs::create_dir_all(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        Err(e) => Err(io::Error::new(e.kind(), format!("creating {path}: {e}"))),
    }
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// Sets up the machine as PID 1: the image's root under an overlay, the
/// kernel file systems, loopback, the hostname. Returns the hostname.
pub fn boot() -> io::Result<String> {
    // The initramfs has no /proc yet: mount it to read the command line.
    mkdir("/proc", 0o555)?;
    mount(
        "proc",
        "/proc",
        "proc",
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let params = BootParams::parse(&fs::read_to_string("/proc/cmdline")?);
    mkdir("/dev", 0o755)?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    )?;
    if let Some(root) = &params.root {
        enter_image_root(root, params.upper.as_deref())?;
    } else {
        mkdir("/sys", 0o555)?;
    }
    mount_kernel_filesystems()?;
    for share in &params.shares {
        mkdir(&share.path, 0o755)?;
        let flags = if share.read_only { libc::MS_RDONLY } else { 0 };
        mount(&share.tag, &share.path, "virtiofs", flags, None)?;
    }
    bring_up_loopback()?;
    if let Some(net) = &params.net {
        // A workload without its network is still a workload: say why
        // and go on.
        if let Err(e) = crate::net::configure("eth0", net) {
            log::error!("configuring eth0: {e}");
        }
        if !net.dns.is_empty() && Path::new("/etc").is_dir() {
            // A symlink (systemd's stub, say) is replaced, as Docker does.
            let _ = fs::remove_file("/etc/resolv.conf");
            if let Err(e) = fs::write("/etc/resolv.conf", crate::net::resolv_conf(&net.dns)) {
                log::warn!("writing /etc/resolv.conf: {e}");
            }
        }
    }
    let _ = EXTRA_HOSTS.set(params.hosts.clone());
    let hostname = params
        .hostname
        .clone()
        .unwrap_or_else(|| "supermachine".to_string());
    set_hostname(&hostname)?;
    write_host_files(&hostname);
    Ok(hostname)
}

/// Mounts the EROFS disk read-only under an overlay whose upper layer is
/// tmpfs (or the writable disk), and makes it `/`. The initramfs stays
/// underneath, unreachable.
fn enter_image_root(root_disk: &str, upper_disk: Option<&str>) -> io::Result<()> {
    mkdir("/.lower", 0o755)?;
    mkdir("/.rw", 0o755)?;
    mkdir("/.root", 0o755)?;
    mount(root_disk, "/.lower", "erofs", libc::MS_RDONLY, None)?;
    match upper_disk {
        Some(disk) => mount(disk, "/.rw", "ext4", 0, None)?,
        None => mount("rw", "/.rw", "tmpfs", 0, Some("mode=0755"))?,
    }
    mkdir("/.rw/upper", 0o755)?;
    mkdir("/.rw/work", 0o755)?;
    mount(
        "overlay",
        "/.root",
        "overlay",
        0,
        Some("lowerdir=/.lower,upperdir=/.rw/upper,workdir=/.rw/work"),
    )?;
    // Carry /dev and /proc over; everything else is mounted fresh.
    for d in ["dev", "proc"] {
        let target = format!("/.root/{d}");
        if !Path::new(&target).is_dir() {
            mkdir(&target, 0o755)?;
        }
        mount(&format!("/{d}"), &target, "", libc::MS_MOVE, None)?;
    }
    std::env::set_current_dir("/.root")?;
    mount(".", "/", "", libc::MS_MOVE, None)?;
    let dot = cstr(".")?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// /sys, /sys/fs/cgroup, /dev/pts, /dev/shm, /run, /tmp and the /dev
/// links, creating any mount point the image lacks.
fn mount_kernel_filesystems() -> io::Result<()> {
    let ensure = |dir: &str, mode: u32| -> io::Result<()> {
        if Path::new(dir).is_dir() {
            Ok(())
        } else {
            mkdir(dir, mode)
        }
    };
    ensure("/sys", 0o555)?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    ensure("/dev/pts", 0o755)?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    ensure("/dev/shm", 0o1777)?;
    mount("shm", "/dev/shm", "tmpfs", NOSUID_NODEV, Some("mode=1777"))?;
    ensure("/run", 0o755)?;
    mount("run", "/run", "tmpfs", NOSUID_NODEV, Some("mode=0755"))?;
    ensure("/tmp", 0o1777)?;
    mount("tmp", "/tmp", "tmpfs", NOSUID_NODEV, Some("mode=1777"))?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            symlink(target, link)?;
        }
    }
    // /dev/ptmx must open the instance at /dev/pts.
    if fs::symlink_metadata("/dev/ptmx").is_ok() {
        fs::remove_file("/dev/ptmx")?;
    }
    symlink("pts/ptmx", "/dev/ptmx")
}

fn bring_up_loopback() -> io::Result<()> {
    // SAFETY: socket has no memory-safety preconditions; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq through a valid pointer.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bringing up lo: {e}")));
    }
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// /etc/hostname and /etc/hosts as Docker provides them. They land in the
/// overlay's upper layer; an image without /etc gets none.
/// `--add-host` entries, kept for every rewrite of `/etc/hosts`.
static EXTRA_HOSTS: std::sync::OnceLock<Vec<(String, std::net::IpAddr)>> =
    std::sync::OnceLock::new();

fn write_host_files(hostname: &str) {
    if !Path::new("/etc").is_dir() {
        return;
    }
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    );
    for (name, addr) in EXTRA_HOSTS.get().into_iter().flatten() {
        hosts.push_str(&format!("{addr}\t{name}\n"));
    }
    for (path, text) in [
        ("/etc/hostname", format!("{hostname}\n")),
        ("/etc/hosts", hosts),
    ] {
        if let Err(e) = fs::write(path, text) {
            log::warn!("writing {path}: {e}");
        }
    }
}

/// Steps the wall clock.
pub fn set_clock(clock: Clock) -> io::Result<()> {
    if clock.nanos >= 1_000_000_000 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nanoseconds must be below one second",
        ));
    }
    let ts = libc::timespec {
        tv_sec: clock.secs as _,
        tv_nsec: clock.nanos as _,
    };
    // SAFETY: a valid timespec pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `bytes` into the kernel's pool and credits them as entropy
/// (RNDADDENTROPY: the host's bytes come from its own CSPRNG).
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    if bytes.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "at most 4096 entropy bytes at once",
        ));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    let random = fs::OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of the size its header
    // gives, which `info` holds in full.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// After a restore: mixes `bytes` in (see [`add_entropy`]), then makes
/// the kernel reseed its generator at once (RNDRESEEDCRNG) instead of at
/// its next scheduled reseed, so that restores of one snapshot, which
/// start with the same generator state, part ways from the first byte
/// read after this.
pub fn reseed(bytes: &[u8]) -> io::Result<()> {
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    if bytes.len() < 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a reseed needs at least 32 bytes",
        ));
    }
    add_entropy(bytes)?;
    let random = fs::OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new hostname: the kernel's, /etc/hostname and /etc/hosts.
pub fn rename_host(name: &str) -> io::Result<()> {
    set_hostname(name)?;
    write_host_files(name);
    Ok(())
}

/// Stops every process (SIGTERM, then SIGKILL after `grace_ms`), syncs
/// and powers off.
pub fn shut_down(grace_ms: u32) {
    // SAFETY: kill(-1) signals every process but PID 1; no memory involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_millis(u64::from(grace_ms));
    while reaper::has_children() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_millis(500);
    while reaper::has_children() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    power_off();
}

/// Syncs and powers the machine off; never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; nothing is left to do.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_parameters_come_from_the_command_line() {
        let p = BootParams::parse(
            "console=ttyS0 quiet supermachine.root=/dev/vda supermachine.hostname=box-1 virtio_mmio.device=4K@0xd0000000:5",
        );
        assert_eq!(p.root.as_deref(), Some("/dev/vda"));
        assert_eq!(p.hostname.as_deref(), Some("box-1"));
        assert_eq!(p.upper, None);
        assert_eq!(BootParams::parse(""), BootParams::default());
    }

    #[test]
    fn shares_come_hex_encoded_and_bad_ones_are_dropped() {
        // "/data dir" and "/ro".
        let p = BootParams::parse(
            "supermachine.share=fs0,rw,2f646174612064697220 supermachine.share=fs1,ro,2f726f \
             supermachine.share=fs2,xx,2f78 supermachine.share=fs3,ro,2f7 supermachine.share=fs4,ro,2f",
        );
        assert_eq!(
            p.shares,
            vec![
                ShareMount {
                    tag: "fs0".into(),
                    path: "/data dir ".into(),
                    read_only: false
                },
                ShareMount {
                    tag: "fs1".into(),
                    path: "/ro".into(),
                    read_only: true
                },
            ]
        );
    }
}
