//! The egress policy: which guest packets may leave the VMM.
//!
//! It is applied to every frame the guest transmits, in the VMM, before
//! the frame reaches the backend: a guest cannot route around it. A
//! refused TCP segment is answered with a reset and a refused UDP
//! datagram with an ICMP "administratively prohibited", so the guest's
//! program fails at once instead of waiting for a timeout.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use crate::packet::{
    self, Destination, ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Kind, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP,
};

/// How packets that no rule names are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyMode {
    /// Everything may go out (the rules still apply).
    #[default]
    Open,
    /// Nothing to private, link-local, loopback or host addresses
    /// ([`is_private`], [`EgressPolicy::host_addrs`]); the rest may go.
    DenyPrivate,
    /// Only what an allow rule names (and the resolvers' port 53).
    AllowList,
    /// Everything but what a deny rule names.
    DenyList,
}

impl FromStr for PolicyMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "open" => Ok(Self::Open),
            "deny-private" => Ok(Self::DenyPrivate),
            "allow-list" => Ok(Self::AllowList),
            "deny-list" => Ok(Self::DenyList),
            other => Err(Error::Mode(other.into())),
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::DenyPrivate => "deny-private",
            Self::AllowList => "allow-list",
            Self::DenyList => "deny-list",
        })
    }
}

/// A policy that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not one of the modes.
    #[error("unknown network policy {0:?} (open, deny-private, allow-list or deny-list)")]
    Mode(String),
    /// A rule that is not `CIDR`, `CIDR:PORT`, `CIDR:PORT-PORT` (IPv6 in
    /// brackets when a port follows).
    #[error("bad network rule {rule:?}: {why}")]
    Rule {
        /// The rule as given.
        rule: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// An address range and, optionally, a range of TCP/UDP ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    addr: IpAddr,
    prefix: u8,
    ports: Option<RangeInclusive<u16>>,
}

impl Rule {
    /// Whether the rule names `addr` (and `port`: a port rule names no
    /// packet whose port is unknown).
    fn matches(&self, addr: IpAddr, port: Option<u16>) -> bool {
        in_prefix(addr, self.addr, self.prefix)
            && match (&self.ports, port) {
                (None, _) => true,
                (Some(range), Some(p)) => range.contains(&p),
                (Some(_), None) => false,
            }
    }

    /// Whether the rule could name a packet to `addr` whose port is
    /// unknown (a later IP fragment): for deny rules, which must not be
    /// slipped past by fragmenting.
    fn could_match(&self, addr: IpAddr) -> bool {
        in_prefix(addr, self.addr, self.prefix)
    }
}

impl FromStr for Rule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why| Error::Rule {
            rule: s.into(),
            why,
        };
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            match after {
                "" => (net, None),
                _ => (
                    net,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("expected :PORT after ]"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None) // a bare IPv6 network
        } else {
            match s.split_once(':') {
                Some((net, ports)) => (net, Some(ports)),
                None => (s, None),
            }
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("bad prefix length"))?,
            None => max,
        };
        let ports = match ports {
            None => None,
            Some(p) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let lo: u16 = lo.parse().map_err(|_| bad("bad port"))?;
                let hi: u16 = hi.parse().map_err(|_| bad("bad port"))?;
                if lo > hi {
                    return Err(bad("port range runs backwards"));
                }
                Some(lo..=hi)
            }
        };
        Ok(Self {
            addr,
            prefix,
            ports,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = format!("{}/{}", self.addr, self.prefix);
        match (&self.ports, self.addr) {
            (None, _) => f.write_str(&net),
            (Some(r), IpAddr::V4(_)) if r.start() == r.end() => write!(f, "{net}:{}", r.start()),
            (Some(r), IpAddr::V4(_)) => write!(f, "{net}:{}-{}", r.start(), r.end()),
            (Some(r), IpAddr::V6(_)) if r.start() == r.end() => {
                write!(f, "[{net}]:{}", r.start())
            }
            (Some(r), IpAddr::V6(_)) => write!(f, "[{net}]:{}-{}", r.start(), r.end()),
        }
    }
}

fn in_prefix(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether `addr` is private, shared, link-local, loopback, unspecified,
/// multicast, broadcast or reserved: anything but a global unicast
/// address. IPv6 addresses that carry an IPv4 one (mapped, NAT64, 6to4)
/// are judged by it.
pub fn is_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => is_private_v4(a),
        IpAddr::V6(a) => is_private_v6(a),
    }
}

fn is_private_v4(a: Ipv4Addr) -> bool {
    const NETS: [(Ipv4Addr, u8); 12] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8), // "this network" (0.0.0.0 reaches the host)
        (Ipv4Addr::new(10, 0, 0, 0), 8), // RFC 1918
        (Ipv4Addr::new(100, 64, 0, 0), 10), // shared address space (CGNAT)
        (Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
        (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local
        (Ipv4Addr::new(172, 16, 0, 0), 12), // RFC 1918
        (Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
        (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
        (Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
        (Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
        (Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, broadcast
        (Ipv4Addr::new(192, 88, 99, 0), 24), // 6to4 relay anycast
    ];
    NETS.iter()
        .any(|(net, prefix)| in_prefix(IpAddr::V4(a), IpAddr::V4(*net), *prefix))
}

fn is_private_v6(a: Ipv6Addr) -> bool {
    let bits = u128::from(a);
    let embedded_v4 = |shift: u32| Ipv4Addr::from((bits >> shift) as u32);
    let net = |n: u128, prefix: u8| in_prefix(IpAddr::V6(a), IpAddr::V6(Ipv6Addr::from(n)), prefix);
    if a.is_unspecified() || a.is_loopback() {
        return true;
    }
    if net(0xffff_0000_0000, 96) || net(0x0064_ff9b << 96, 96) {
        return is_private_v4(embedded_v4(0)); // IPv4-mapped, NAT64
    }
    if net(0x2002 << 112, 16) {
        return is_private_v4(embedded_v4(80)); // 6to4
    }
    net(0xfc00 << 112, 7) // unique local
        || net(0xfe80 << 112, 10) // link-local
        || net(0xfec0 << 112, 10) // site-local (deprecated)
        || net(0xff00 << 112, 8) // multicast
        || net(0, 96) // IPv4-compatible (deprecated)
}

/// What to do with a guest frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Allow,
    /// Drop it; give the guest `reply` (a reset or an ICMP error) if any.
    Deny {
        /// A frame for the guest.
        reply: Option<Vec<u8>>,
    },
}

/// Which guest packets may leave the VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// What happens to packets no rule names.
    pub mode: PolicyMode,
    /// Always allowed (after `deny`).
    pub allow: Vec<Rule>,
    /// Always refused, checked first.
    pub deny: Vec<Rule>,
    /// Addresses that reach the host itself (the gateway, the host's own
    /// addresses): private under [`PolicyMode::DenyPrivate`].
    pub host_addrs: Vec<IpAddr>,
    /// The guest's DNS resolvers: port 53 on them stays allowed in every
    /// mode unless a deny rule names it.
    pub resolvers: Vec<IpAddr>,
}

impl EgressPolicy {
    /// Whether this policy lets everything out (nothing to check).
    pub fn is_open(&self) -> bool {
        self.mode == PolicyMode::Open && self.deny.is_empty()
    }

    /// Whether a packet to `addr` (TCP/UDP port `port`, `None` if unknown)
    /// may leave.
    pub fn allows(&self, addr: IpAddr, port: Option<u16>) -> bool {
        let denied = |r: &Rule| match port {
            Some(_) => r.matches(addr, port),
            None => r.could_match(addr),
        };
        if self.deny.iter().any(denied) {
            return false;
        }
        if self.allow.iter().any(|r| r.matches(addr, port)) {
            return true;
        }
        if port == Some(53) && self.resolvers.contains(&addr) {
            return true;
        }
        match self.mode {
            PolicyMode::Open | PolicyMode::DenyList => true,
            PolicyMode::AllowList => false,
            PolicyMode::DenyPrivate => !is_private(addr) && !self.host_addrs.contains(&addr),
        }
    }

    /// The verdict on one frame the guest sent.
    pub fn check(&self, frame: &[u8]) -> Verdict {
        if self.is_open() {
            return Verdict::Allow;
        }
        match packet::classify(frame) {
            Kind::Arp | Kind::NeighbourDiscovery => Verdict::Allow,
            Kind::Other => Verdict::Deny { reply: None },
            Kind::Ip(dst) if self.allows(dst.addr, dst.port) => Verdict::Allow,
            Kind::Ip(dst) => Verdict::Deny {
                reply: refusal(frame, &dst),
            },
        }
    }
}

/// The answer to a refused packet: a TCP reset, or an ICMP
/// "administratively prohibited" for UDP. Nothing for anything else (an
/// ICMP error about an ICMP message is not sent).
fn refusal(frame: &[u8], dst: &Destination) -> Option<Vec<u8>> {
    let l4 = dst.l4_offset?;
    match dst.protocol? {
        PROTO_TCP => tcp_reset(frame, dst.ip_offset, l4),
        PROTO_UDP => icmp_prohibited(frame, dst.ip_offset),
        _ => None,
    }
}

/// (source, destination, IP header length, payload length) of the IP
/// packet at `ip`.
fn ip_endpoints(frame: &[u8], ip: usize) -> Option<(IpAddr, IpAddr, usize)> {
    let h = frame.get(ip..)?;
    match h.first()? >> 4 {
        4 => {
            let src = Ipv4Addr::new(*h.get(12)?, h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(*h.get(16)?, h[17], h[18], h[19]);
            let total = usize::from(packet::be16(h, 2)?);
            Some((src.into(), dst.into(), total.min(h.len())))
        }
        6 => {
            let src: [u8; 16] = h.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = h.get(24..40)?.try_into().ok()?;
            let total = 40 + usize::from(packet::be16(h, 4)?);
            Some((
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                total.min(h.len()),
            ))
        }
        _ => None,
    }
}

/// An Ethernet + IP header from `from` to `to` (the guest) around a
/// `payload_len`-byte `protocol` payload, answering `frame`.
fn reply_headers(
    frame: &[u8],
    from: IpAddr,
    to: IpAddr,
    protocol: u8,
    payload_len: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(ETH_HLEN + 40 + payload_len);
    out.extend_from_slice(frame.get(6..12)?); // back to the guest's MAC
    out.extend_from_slice(frame.get(0..6)?); // from the MAC it sent to
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let total = u16::try_from(20 + payload_len).ok()?;
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = protocol;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let checksum = packet::fold(packet::sum(&ip, 0));
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&u16::try_from(payload_len).ok()?.to_be_bytes());
            ip[6] = protocol;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&ip);
        }
        _ => return None,
    }
    Some(out)
}

fn tcp_reset(frame: &[u8], ip: usize, l4: usize) -> Option<Vec<u8>> {
    let (src, dst, ip_end) = ip_endpoints(frame, ip)?;
    let tcp = frame.get(l4..ip_end.checked_add(ip)?)?;
    let header_len = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    if flags & RST != 0 || header_len < 20 || tcp.len() < header_len {
        return None;
    }
    let seq = u32::from_be_bytes(*tcp.get(4..8)?.first_chunk::<4>()?);
    let ack = u32::from_be_bytes(*tcp.get(8..12)?.first_chunk::<4>()?);
    // RFC 9293 3.10.7.1: answer an ACK with its acknowledgement number as
    // our sequence; anything else with an ACK of everything it occupied.
    let (our_seq, our_ack, our_flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        let occupied = (tcp.len() - header_len) as u32
            + u32::from(flags & SYN != 0)
            + u32::from(flags & FIN != 0);
        (0, seq.wrapping_add(occupied), RST | ACK)
    };
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(tcp.get(2..4)?); // from their destination port
    segment[2..4].copy_from_slice(tcp.get(0..2)?); // to their source port
    segment[4..8].copy_from_slice(&our_seq.to_be_bytes());
    segment[8..12].copy_from_slice(&our_ack.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = our_flags;
    let checksum = packet::fold(packet::sum(
        &segment,
        packet::pseudo_header(dst, src, PROTO_TCP, segment.len()),
    ));
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    let mut out = reply_headers(frame, dst, src, PROTO_TCP, segment.len())?;
    out.extend_from_slice(&segment);
    Some(out)
}

fn icmp_prohibited(frame: &[u8], ip: usize) -> Option<Vec<u8>> {
    let (src, dst, ip_end) = ip_endpoints(frame, ip)?;
    let original = frame.get(ip..ip.checked_add(ip_end)?)?;
    let (protocol, kind, code, quoted) = match src {
        // RFC 792: the IP header and the first 8 bytes of its payload.
        IpAddr::V4(_) => {
            let header_len = usize::from(original.first()? & 0x0f) * 4;
            (
                PROTO_ICMP,
                3,
                13,
                &original[..(header_len + 8).min(original.len())],
            )
        }
        // RFC 4443: as much as fits in the minimum MTU.
        IpAddr::V6(_) => (PROTO_ICMPV6, 1, 1, &original[..original.len().min(1232)]),
    };
    let mut message = Vec::with_capacity(8 + quoted.len());
    message.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
    message.extend_from_slice(quoted);
    let initial = if protocol == PROTO_ICMPV6 {
        packet::pseudo_header(dst, src, PROTO_ICMPV6, message.len())
    } else {
        0
    };
    let checksum = packet::fold(packet::sum(&message, initial));
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut out = reply_headers(frame, dst, src, protocol, message.len())?;
    out.extend_from_slice(&message);
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_print_back() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.0.2.2", "10.0.2.2/32"),
            ("10.0.2.2:8080", "10.0.2.2/32:8080"),
            ("192.168.0.0/16:1000-2000", "192.168.0.0/16:1000-2000"),
            ("fd00::/8", "fd00::/8"),
            ("::1", "::1/128"),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
            ("[::1]:22-23", "[::1/128]:22-23"),
        ] {
            let rule: Rule = text.parse().unwrap();
            assert_eq!(rule.to_string(), shown, "{text}");
            assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule);
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1:",
            "10.0.0.1:70000",
            "10.0.0.1:9-1",
            "host:80",
            "[::1",
            "[::1]80",
            "::1/129",
            "10.0.0.0/-1",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.to_string().starts_with("bad network rule"), "{bad}: {e}");
        }
        assert_eq!(
            "deny-private".parse::<PolicyMode>(),
            Ok(PolicyMode::DenyPrivate)
        );
        assert!("closed".parse::<PolicyMode>().is_err());
    }

    #[test]
    fn private_addresses_are_every_kind_but_global_unicast() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:0101::1",
        ] {
            assert!(is_private(ip(private)), "{private}");
        }
        for public in [
            "1.1.1.1",
            "172.32.0.1",
            "198.51.100.1",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert!(!is_private(ip(public)), "{public}");
        }
    }

    #[test]
    fn modes_rules_and_resolvers_decide_in_order() {
        let mut p = EgressPolicy {
            mode: PolicyMode::DenyPrivate,
            allow: vec!["10.0.2.2:8080".parse().unwrap()],
            deny: vec!["1.2.3.0/24".parse().unwrap()],
            host_addrs: vec![ip("203.0.113.5")],
            resolvers: vec![ip("10.0.2.3")],
        };
        assert!(p.allows(ip("10.0.2.2"), Some(8080)));
        assert!(!p.allows(ip("10.0.2.2"), Some(8081)));
        assert!(p.allows(ip("10.0.2.3"), Some(53)), "the resolver");
        assert!(!p.allows(ip("10.0.2.3"), Some(80)));
        assert!(!p.allows(ip("203.0.113.5"), Some(443)), "a host address");
        assert!(p.allows(ip("198.51.100.1"), Some(443)));
        assert!(!p.allows(ip("1.2.3.4"), Some(443)), "deny rules come first");
        // A later fragment (no port) is refused by a port deny rule's
        // network, and not let through by a port allow rule.
        p.deny = vec!["198.51.100.0/24:25".parse().unwrap()];
        assert!(!p.allows(ip("198.51.100.1"), None));
        assert!(!p.allows(ip("10.0.2.2"), None));

        p.mode = PolicyMode::AllowList;
        p.deny.clear();
        assert!(p.allows(ip("10.0.2.2"), Some(8080)));
        assert!(p.allows(ip("10.0.2.3"), Some(53)));
        assert!(!p.allows(ip("198.51.100.1"), Some(443)));

        p.mode = PolicyMode::DenyList;
        p.deny = vec!["[2001:db8::/32]:443".parse().unwrap()];
        assert!(!p.allows(ip("2001:db8::1"), Some(443)));
        assert!(p.allows(ip("2001:db8::1"), Some(80)));
        assert!(p.allows(ip("10.9.9.9"), Some(80)));
    }

    /// An IPv6 frame to `dst` with `next` header and `l4` bytes after it.
    fn ipv6_frame(dst: &str, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut h = [0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        h[6] = next;
        h[7] = 64;
        h[8..24].copy_from_slice(&"fd00::15".parse::<Ipv6Addr>().unwrap().octets());
        let IpAddr::V6(d) = ip(dst) else {
            unreachable!()
        };
        h[24..40].copy_from_slice(&d.octets());
        f.extend_from_slice(&h);
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn ipv6_frames_are_judged_through_extension_headers() {
        let p = EgressPolicy {
            mode: PolicyMode::DenyPrivate,
            ..EgressPolicy::default()
        };
        // Neighbour solicitation to a multicast address: housekeeping.
        let ns = ipv6_frame("ff02::1:ff00:1", PROTO_ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p.check(&ns), Verdict::Allow);
        // TCP behind a destination-options header, to a ULA: reset.
        let mut l4 = vec![PROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        let mut syn = [0u8; 20];
        syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
        syn[2..4].copy_from_slice(&80u16.to_be_bytes());
        syn[12] = 5 << 4;
        syn[13] = 0x02;
        l4.extend_from_slice(&syn);
        let frame = ipv6_frame("fd00::2", 60, &l4);
        let Verdict::Deny { reply: Some(rst) } = p.check(&frame) else {
            panic!("not refused with a reset");
        };
        // The reset's checksum verifies (pseudo-header included).
        let src: [u8; 16] = rst[22..38].try_into().unwrap();
        let dst: [u8; 16] = rst[38..54].try_into().unwrap();
        let seg = &rst[54..];
        let acc = packet::pseudo_header(
            Ipv6Addr::from(src).into(),
            Ipv6Addr::from(dst).into(),
            PROTO_TCP,
            seg.len(),
        );
        assert_eq!(packet::fold(packet::sum(seg, acc)), 0);
        assert_eq!(seg[13], 0x14);
        // The same to a public address goes.
        assert_eq!(
            p.check(&ipv6_frame("2606:4700::1111", 60, &l4)),
            Verdict::Allow
        );
        // Other ethertypes and runts are refused when a policy is set.
        assert_eq!(p.check(&[0u8; 10]), Verdict::Deny { reply: None });
        let mut vlan = ns.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(p.check(&vlan), Verdict::Deny { reply: None });
        // Truncated headers never panic.
        for cut in 0..frame.len() {
            let _ = p.check(&frame[..cut]);
        }
    }
}
