//! Guest networking: which backend a VM's virtio-net device talks to
//! (passt, which the VM starts and stops; or a socket someone else
//! serves), the addresses the agent gives the guest, and the egress
//! policy the device enforces.
//!
//! passt is user-mode networking: it turns the guest's frames into
//! ordinary sockets of the host user, so nothing needs root, a bridge or
//! a tap device. Each VM gets its own passt, on one end of a socket pair
//! it inherits (`--fd`); it runs `--one-off`, so it also exits when the
//! VMM's end closes, even if the VMM is killed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Child;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
#[cfg(unix)]
use std::{
    io::Read,
    os::fd::AsRawFd,
    os::unix::net::{UnixDatagram, UnixStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
};

#[cfg(unix)]
use supermachine_vmm::{DatagramBackend, EgressPolicy, FrameBackend, StreamBackend};
use supermachine_vmm::{NetConfig, NetRule, PolicyMode};

use crate::shares::find_helper;
use crate::{Error, Result};

/// The guest's MAC address (every VM has its own network, so all share
/// it).
#[cfg_attr(not(unix), allow(dead_code))]
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The guest's IPv4 address, on a /24.
pub const GUEST_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway; through passt it is the host's own loopback.
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The resolver; passt forwards it to the host's.
pub const RESOLVER_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's IPv6 address, on a /64 (a unique local prefix).
pub const GUEST_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5e6d, 0, 0, 0, 0, 0, 0x15);
/// The IPv6 gateway (the host's loopback through passt).
pub const GATEWAY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5e6d, 0, 0, 0, 0, 0, 2);
/// The IPv6 resolver.
pub const RESOLVER_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5e6d, 0, 0, 0, 0, 0, 3);
/// The link MTU: passt's, the largest an IPv4 packet allows.
pub const MTU: u16 = supermachine_vmm::DEFAULT_MTU;

/// Where the guest's frames go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// passt when it is installed, else no network (with a warning).
    #[default]
    Auto,
    /// passt; an error if it is not installed.
    Passt,
    /// No network device: loopback only.
    None,
    /// A Unix stream socket speaking QEMU's `-netdev stream` framing
    /// (gvproxy, a passt started by someone else).
    Stream(PathBuf),
    /// A Unix datagram socket, one frame per datagram (vfkit style).
    Datagram(PathBuf),
}

impl FromStr for NetworkMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "passt" => Ok(Self::Passt),
            "none" => Ok(Self::None),
            _ => {
                if let Some(p) = s.strip_prefix("stream:").filter(|p| !p.is_empty()) {
                    Ok(Self::Stream(p.into()))
                } else if let Some(p) = s.strip_prefix("dgram:").filter(|p| !p.is_empty()) {
                    Ok(Self::Datagram(p.into()))
                } else {
                    Err(Error::InvalidOption(format!(
                        "unknown network {s:?} (passt, none, stream:PATH or dgram:PATH)"
                    )))
                }
            }
        }
    }
}

/// How a VM is networked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    /// The backend.
    pub mode: NetworkMode,
    /// What happens to traffic no rule names.
    pub policy: PolicyMode,
    /// Always allowed (after `deny`).
    pub allow: Vec<NetRule>,
    /// Always refused.
    pub deny: Vec<NetRule>,
    /// Resolvers for the guest's `/etc/resolv.conf` instead of the host's
    /// (which the guest reaches through passt).
    pub dns: Vec<IpAddr>,
    /// Extra `/etc/hosts` entries (`--add-host NAME:ADDR`).
    pub hosts: Vec<(String, IpAddr)>,
    /// The passt program to run; `None` finds it ([`find_passt`]).
    pub passt: Option<PathBuf>,
}

impl Network {
    /// No network at all.
    pub fn none() -> Self {
        Self {
            mode: NetworkMode::None,
            ..Self::default()
        }
    }
}

/// `--add-host NAME:ADDR`.
pub fn parse_host_entry(s: &str) -> Result<(String, IpAddr)> {
    let bad = || Error::InvalidOption(format!("--add-host {s:?}: expected NAME:ADDRESS"));
    let (name, addr) = s.split_once(':').ok_or_else(bad)?;
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(bad());
    }
    Ok((name.to_string(), addr.parse().map_err(|_| bad())?))
}

/// A running passt serving one VM; ended on drop.
#[derive(Debug)]
pub(crate) struct Passt {
    child: Child,
    /// What it printed last (its reason, if it exited).
    last_words: Arc<Mutex<String>>,
}

impl Passt {
    /// Starts passt on one end of a new socket pair; returns it and the
    /// VMM's end.
    #[cfg(unix)]
    fn start(program: &Path, ipv4: bool, ipv6: bool) -> Result<(Passt, UnixStream)> {
        let (ours, theirs) =
            UnixStream::pair().map_err(crate::io_error("making passt's socket pair"))?;
        let fd = theirs.as_raw_fd();
        // passt drops the frames its socket will not take, and the guest's
        // TCP then waits for them to be sent again: give the socket all
        // the room an unprivileged process may (the kernel caps this at
        // net.core.wmem_max). Measured in the test host, this doubled
        // host-to-guest throughput with either passt.
        let room: libc::c_int = 4 << 20;
        // SAFETY: setsockopt reads an int through a valid pointer for the
        // given length; a refusal only leaves the default size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&room as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let mut command = Command::new(program);
        command
            .args(["--foreground", "--one-off"])
            .args(["--fd", &fd.to_string()])
            .args(["--mtu", &MTU.to_string()])
            // No port of the host is forwarded into the guest (`-p` goes
            // over vsock); the guest's own connections go out.
            .args(["--tcp-ports", "none", "--udp-ports", "none"]);
        if ipv4 {
            command
                .args(["--address", &GUEST_IPV4.to_string(), "--netmask", "24"])
                .args(["--gateway", &GATEWAY_IPV4.to_string()])
                .args(["--dns-forward", &RESOLVER_IPV4.to_string()]);
        } else {
            command.arg("--ipv6-only");
        }
        if ipv6 {
            command
                .args(["--address", &GUEST_IPV6.to_string()])
                .args(["--gateway", &GATEWAY_IPV6.to_string()])
                .args(["--dns-forward", &RESOLVER_IPV6.to_string()]);
        } else {
            command.arg("--ipv4-only");
        }
        command.args(["--quiet", "--stderr"]);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only fcntl, which is
        // async-signal-safe, runs: it clears close-on-exec on passt's end
        // of the pair so that passt inherits it.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(crate::io_error(format!("starting {}", program.display())))?;
        drop(theirs);
        let last_words = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let words = last_words.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                if let Some(line) = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty() && !l.starts_with("Failed to send"))
                {
                    *words.lock().unwrap_or_else(|p| p.into_inner()) = line.trim().to_string();
                }
            });
        }
        Ok((Passt { child, last_words }, ours))
    }

    /// Why passt has ended, if it has.
    pub(crate) fn ended(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        // Its stderr reader finishes as the process goes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let words = self.last_words.lock().unwrap_or_else(|p| p.into_inner());
        Some(format!("passt exited ({status}): {words}"))
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // `--one-off`: it ends by itself once the VMM's end is closed; a
        // passt that is still there is ended here.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The passt program: `$SUPERMACHINE_PASST`, else `passt` on PATH.
pub fn find_passt() -> Option<PathBuf> {
    find_helper("passt", "SUPERMACHINE_PASST", &[])
}

/// Whether the host has a default route for IPv4 (`ipv6` false) or IPv6,
/// as passt needs to pick an interface.
fn host_has_default_route(ipv6: bool) -> bool {
    if ipv6 {
        std::fs::read_to_string("/proc/net/ipv6_route").is_ok_and(|t| {
            t.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 10
                    && f[0] == "00000000000000000000000000000000"
                    && f[1] == "00"
                    && f[9] != "lo"
            })
        })
    } else {
        std::fs::read_to_string("/proc/net/route").is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000"
            })
        })
    }
}

/// The host's own addresses (which passt would reach directly), for the
/// deny-private policy.
#[cfg(unix)]
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list it allocates; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned.
        let entry = unsafe { &*at };
        if !entry.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points at a sockaddr whose family
            // says which larger type it is.
            let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// A VM's network, made: the device's configuration for the VMM, the
/// passt that serves it (if any), and the guest's kernel command-line
/// settings.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) device: NetConfig,
    pub(crate) passt: Option<Passt>,
    pub(crate) cmdline: String,
}

/// What a VM's network will be, decided before anything is started.
#[derive(Debug)]
#[cfg_attr(not(unix), allow(dead_code))]
pub(crate) struct Plan {
    backend: Backend,
    ipv4: bool,
    ipv6: bool,
    resolvers: Vec<IpAddr>,
    /// The guest's settings (`supermachine.net=` and `.host=`).
    cmdline: String,
}

#[derive(Debug)]
#[cfg_attr(not(unix), allow(dead_code))]
enum Backend {
    Passt(PathBuf),
    Stream(PathBuf),
    Datagram(PathBuf),
}

/// Decides `network`'s backend and the guest's settings; `None` for no
/// network. Errors only for what was asked explicitly and cannot be.
pub(crate) fn plan(network: &Network) -> Result<Option<Plan>> {
    let (mut ipv4, mut ipv6) = (host_has_default_route(false), host_has_default_route(true));
    let backend = match &network.mode {
        NetworkMode::None => return Ok(None),
        NetworkMode::Passt if !cfg!(target_os = "linux") => {
            return Err(Error::InvalidOption(
                "--network passt: passt runs on Linux only; here give the guest a network with --network stream:PATH (gvproxy) or dgram:PATH (vfkit style)".into(),
            ));
        }
        NetworkMode::Auto | NetworkMode::Passt => {
            match (network.passt.clone().or_else(find_passt), ipv4 || ipv6) {
                (Some(program), true) => Backend::Passt(program),
                (None, _) if network.mode == NetworkMode::Passt => {
                    return Err(Error::InvalidOption(
                    "--network passt needs passt, which is not installed (apt-get install passt, or set SUPERMACHINE_PASST)".into(),
                ));
                }
                (Some(_), false) if network.mode == NetworkMode::Passt => {
                    return Err(Error::InvalidOption(
                        "--network passt: this host has no default route for passt to use".into(),
                    ));
                }
                (program, _) => {
                    log::info!(
                        "no guest network: {}",
                        if !cfg!(target_os = "linux") {
                            "passt runs on Linux only (--network stream:PATH or dgram:PATH give one)"
                        } else if program.is_none() {
                            "passt is not installed"
                        } else {
                            "this host has no default route"
                        }
                    );
                    return Ok(None);
                }
            }
        }
        NetworkMode::Stream(_) | NetworkMode::Datagram(_) if cfg!(windows) => {
            return Err(Error::InvalidOption(
                "--network stream:/dgram: the network device's backends are Unix sockets, which this build for Windows does not have yet".into(),
            ));
        }
        // Another backend is assumed to serve these addresses (gvproxy's
        // and vfkit's users set theirs to match).
        NetworkMode::Stream(path) => {
            (ipv4, ipv6) = (true, true);
            Backend::Stream(path.clone())
        }
        NetworkMode::Datagram(path) => {
            (ipv4, ipv6) = (true, true);
            Backend::Datagram(path.clone())
        }
    };
    let mut resolvers: Vec<IpAddr> = Vec::new();
    if network.dns.is_empty() {
        if ipv4 {
            resolvers.push(RESOLVER_IPV4.into());
        }
        if ipv6 {
            resolvers.push(RESOLVER_IPV6.into());
        }
    } else {
        resolvers.extend(&network.dns);
    }
    let mut settings = vec![format!("mtu={MTU}")];
    if ipv4 {
        settings.push(format!("ip={GUEST_IPV4}/24"));
        settings.push(format!("gw={GATEWAY_IPV4}"));
    }
    if ipv6 {
        settings.push(format!("ip6={GUEST_IPV6}/64"));
        settings.push(format!("gw6={GATEWAY_IPV6}"));
    }
    let dns: Vec<String> = resolvers.iter().map(ToString::to_string).collect();
    settings.push(format!("dns={}", dns.join("+")));
    let mut cmdline = format!("supermachine.net={}", settings.join(","));
    for (name, addr) in &network.hosts {
        cmdline.push_str(&format!(" supermachine.host={name}:{addr}"));
    }
    Ok(Some(Plan {
        backend,
        ipv4,
        ipv6,
        resolvers,
        cmdline,
    }))
}

/// What the guest will see of `network` (its settings), for snapshot
/// keys; `None` without a network.
pub(crate) fn guest_view(network: &Network) -> Result<Option<String>> {
    Ok(plan(network)?.map(|p| p.cmdline))
}

impl Plan {
    /// Starts or connects the backend. ([`plan`] gives no plan on
    /// Windows, which has no backend yet.)
    #[cfg(not(unix))]
    pub(crate) fn attach(self, _network: &Network) -> Result<Attached> {
        Err(Error::InvalidOption(
            "this build for Windows has no guest network backend yet".into(),
        ))
    }

    /// Starts or connects the backend.
    #[cfg(unix)]
    pub(crate) fn attach(self, network: &Network) -> Result<Attached> {
        let (backend, passt): (Box<dyn FrameBackend>, Option<Passt>) = match &self.backend {
            Backend::Passt(program) => {
                let (passt, socket) = Passt::start(program, self.ipv4, self.ipv6)?;
                let backend =
                    StreamBackend::new(socket).map_err(crate::io_error("passt's socket"))?;
                (Box::new(backend), Some(passt))
            }
            Backend::Stream(path) => {
                let socket = UnixStream::connect(path)
                    .map_err(crate::io_error(format!("connecting to {}", path.display())))?;
                let backend = StreamBackend::new(socket)
                    .map_err(crate::io_error(path.display().to_string()))?;
                (Box::new(backend), None)
            }
            Backend::Datagram(path) => {
                let socket = UnixDatagram::unbound()
                    .and_then(|s| s.connect(path).map(|()| s))
                    .map_err(crate::io_error(format!("connecting to {}", path.display())))?;
                let backend = DatagramBackend::new(socket)
                    .map_err(crate::io_error(path.display().to_string()))?;
                (Box::new(backend), None)
            }
        };
        let mut host_addrs = host_addresses();
        host_addrs.extend([IpAddr::V4(GATEWAY_IPV4), IpAddr::V6(GATEWAY_IPV6)]);
        let policy = EgressPolicy {
            mode: network.policy,
            allow: network.allow.clone(),
            deny: network.deny.clone(),
            host_addrs,
            resolvers: self.resolvers,
        };
        Ok(Attached {
            device: NetConfig {
                mac: GUEST_MAC,
                mtu: MTU,
                policy,
                backend,
            },
            passt,
            cmdline: self.cmdline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_host_entries_parse() {
        assert_eq!("passt".parse::<NetworkMode>().unwrap(), NetworkMode::Passt);
        assert_eq!(
            "stream:/run/gv.sock".parse::<NetworkMode>().unwrap(),
            NetworkMode::Stream("/run/gv.sock".into())
        );
        for bad in ["tap", "stream:", "dgram"] {
            let e = bad.parse::<NetworkMode>().unwrap_err().to_string();
            assert!(e.contains("unknown network"), "{e}");
        }
        assert_eq!(
            parse_host_entry("db.local:10.0.2.2").unwrap(),
            ("db.local".into(), IpAddr::V4(GATEWAY_IPV4))
        );
        assert!(parse_host_entry("db").is_err());
        assert!(parse_host_entry("a b:1.2.3.4").is_err());
        assert!(parse_host_entry("db:nowhere").is_err());
    }
}
