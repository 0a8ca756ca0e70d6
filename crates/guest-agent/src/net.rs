//! The guest's network interface: addresses, default routes, MTU and
//! link state, set over rtnetlink (one small request each, acknowledged),
//! plus the resolver and host files the host asked for.
//!
//! The host hands the settings over the kernel command line:
//! `supermachine.net=ip=ADDR/LEN,gw=ADDR,ip6=ADDR/LEN,gw6=ADDR,mtu=N,dns=ADDR+ADDR`
//! and `supermachine.host=NAME:ADDR` (repeatable, for `--add-host`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the host asked the guest's network to be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetParams {
    /// IPv4 address and prefix length.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// IPv4 default gateway.
    pub gateway4: Option<Ipv4Addr>,
    /// IPv6 address and prefix length.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// IPv6 default gateway.
    pub gateway6: Option<Ipv6Addr>,
    /// Link MTU.
    pub mtu: Option<u32>,
    /// Resolvers for `/etc/resolv.conf`.
    pub dns: Vec<IpAddr>,
}

impl NetParams {
    /// Parses the value of `supermachine.net=`; `None` if any part is
    /// malformed (the interface is then left alone).
    pub fn parse(value: &str) -> Option<NetParams> {
        let mut p = NetParams::default();
        for part in value.split(',').filter(|s| !s.is_empty()) {
            let (key, v) = part.split_once('=')?;
            match key {
                "ip" => p.ipv4 = Some(prefixed(v)?),
                "gw" => p.gateway4 = Some(v.parse().ok()?),
                "ip6" => p.ipv6 = Some(prefixed(v)?),
                "gw6" => p.gateway6 = Some(v.parse().ok()?),
                "mtu" => p.mtu = Some(v.parse().ok()?),
                "dns" => {
                    p.dns = v
                        .split('+')
                        .map(|a| a.parse().ok())
                        .collect::<Option<Vec<IpAddr>>>()?
                }
                _ => return None,
            }
        }
        Some(p)
    }
}

fn prefixed<A: std::str::FromStr>(v: &str) -> Option<(A, u8)> {
    let (addr, len) = v.split_once('/')?;
    Some((addr.parse().ok()?, len.parse().ok()?))
}

/// A `supermachine.host=NAME:ADDR` entry.
pub fn parse_host_entry(value: &str) -> Option<(String, IpAddr)> {
    let (name, addr) = value.split_once(':')?;
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then_some((name.to_string(), addr.parse().ok()?))
}

/// Configures `interface`: MTU, up, addresses, default routes.
pub fn configure(interface: &str, p: &NetParams) -> io::Result<()> {
    let link = Netlink::open()?;
    let index = interface_index(interface)?;
    link.set_link(index, p.mtu)?;
    if let Some((addr, len)) = p.ipv4 {
        link.add_address(index, IpAddr::V4(addr), len)?;
    }
    if let Some((addr, len)) = p.ipv6 {
        link.add_address(index, IpAddr::V6(addr), len)?;
    }
    if let Some(gw) = p.gateway4 {
        link.add_default_route(index, Some(IpAddr::V4(gw)), false)?;
    }
    if let Some(gw) = p.gateway6 {
        link.add_default_route(index, Some(IpAddr::V6(gw)), true)?;
    }
    Ok(())
}

/// `/etc/resolv.conf` naming `dns`.
pub fn resolv_conf(dns: &[IpAddr]) -> String {
    let mut text = String::from("# written by supermachine\n");
    for addr in dns {
        text.push_str(&format!("nameserver {addr}\n"));
    }
    text
}

/// The index of network interface `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in an interface name"))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface {name}"),
        )),
        i => Ok(i),
    }
}

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// No duplicate address detection: the address is usable at once.
const IFA_F_NODAD: u8 = 0x02;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;

/// An rtnetlink socket: one request at a time, each acknowledged.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket.
    pub fn open() -> io::Result<Self> {
        // SAFETY: socket has no memory-safety preconditions.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a descriptor we just created and nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: std::cell::Cell::new(1),
        })
    }

    /// Sets the MTU (if given) and brings the link up.
    pub fn set_link(&self, index: u32, mtu: Option<u32>) -> io::Result<()> {
        let mut body = Vec::new();
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        body.extend_from_slice(&0u16.to_ne_bytes()); // type
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // flags
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // change
        if let Some(mtu) = mtu {
            attribute(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.request(RTM_NEWLINK, 0, &body)
            .map_err(|e| context(e, "setting the link up"))
    }

    /// Adds `addr/len` to interface `index`.
    pub fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> io::Result<()> {
        let (family, bytes, flags) = match addr {
            IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec(), 0),
            IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec(), IFA_F_NODAD),
        };
        let mut body = vec![family as u8, len, flags, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        attribute(&mut body, IFA_LOCAL, &bytes);
        attribute(&mut body, IFA_ADDRESS, &bytes);
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body)
            .map_err(|e| context(e, &format!("adding address {addr}/{len}")))
    }

    /// Adds a default route through `gateway` (or straight out of the
    /// interface) on interface `index`.
    pub fn add_default_route(
        &self,
        index: u32,
        gateway: Option<IpAddr>,
        ipv6: bool,
    ) -> io::Result<()> {
        let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
        let scope = if gateway.is_some() { 0 } else { 253 }; // universe / link
        let mut body = vec![
            family as u8,
            0, // dst_len: default
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes()); // flags
        match gateway {
            Some(IpAddr::V4(g)) => attribute(&mut body, RTA_GATEWAY, &g.octets()),
            Some(IpAddr::V6(g)) => attribute(&mut body, RTA_GATEWAY, &g.octets()),
            None => {}
        }
        attribute(&mut body, RTA_OIF, &index.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
            .map_err(|e| context(e, "adding the default route"))
    }

    fn request(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let len = u32::try_from(16 + body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))?;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: the buffer is valid for its length; the kernel is the
        // destination of an unaddressed netlink send.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        loop {
            // SAFETY: the buffer is valid and writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let reply = &reply[..n as usize];
            let field = |at: usize| reply.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
            let (Some(kind), Some(seq_bytes), Some(code)) = (
                reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]])),
                field(8),
                field(16),
            ) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink reply",
                ));
            };
            if u32::from_ne_bytes(seq_bytes) != seq || kind != NLMSG_ERROR {
                continue;
            }
            return match i32::from_ne_bytes(code) {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
    }
}

/// Appends a netlink attribute, padded to 4 bytes.
fn attribute(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_are_refused() {
        let p = NetParams::parse(
            "ip=10.0.2.15/24,gw=10.0.2.2,ip6=fd00::15/64,gw6=fd00::2,mtu=65520,dns=10.0.2.3+fd00::3",
        )
        .unwrap();
        assert_eq!(p.ipv4, Some((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(p.gateway6, Some("fd00::2".parse().unwrap()));
        assert_eq!(p.mtu, Some(65520));
        assert_eq!(p.dns.len(), 2);
        assert_eq!(NetParams::parse("").unwrap(), NetParams::default());
        for bad in [
            "ip=10.0.2.15",
            "gw=x",
            "mtu=big",
            "dns=1.2.3.4+",
            "what=1",
            "ip",
        ] {
            assert_eq!(NetParams::parse(bad), None, "{bad}");
        }
        assert_eq!(
            parse_host_entry("db:fd00::5"),
            Some(("db".into(), "fd00::5".parse().unwrap()))
        );
        assert_eq!(parse_host_entry("bad name:1.2.3.4"), None);
        assert_eq!(parse_host_entry("x:not-an-ip"), None);
        assert_eq!(
            resolv_conf(&["10.0.2.3".parse().unwrap()]),
            "# written by supermachine\nnameserver 10.0.2.3\n"
        );
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut b = Vec::new();
        attribute(&mut b, 1, &[1, 2, 3, 4, 5]);
        assert_eq!(b.len(), 12);
        assert_eq!(
            &b[..4],
            &[9u16.to_ne_bytes(), 1u16.to_ne_bytes()].concat()[..]
        );
    }
}
