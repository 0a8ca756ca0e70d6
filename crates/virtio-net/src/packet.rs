//! Just enough of Ethernet, IPv4, IPv6, TCP and UDP to decide where a
//! guest frame goes and to answer one that may not go there. Every field
//! is read through bounds-checked slices: the frame is the guest's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ethernet header length (no VLAN tag).
pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const ETHERTYPE_IPV6: u16 = 0x86dd;
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// Where an IP packet is going, as far as the frame tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Destination {
    pub(crate) addr: IpAddr,
    /// TCP, UDP, ICMP, ...; `None` when IPv6 extension headers hide it.
    pub(crate) protocol: Option<u8>,
    /// The TCP or UDP destination port; `None` for other protocols and
    /// for fragments after the first (which carry no port).
    pub(crate) port: Option<u16>,
    /// Offset of the IP header in the frame.
    pub(crate) ip_offset: usize,
    /// Offset of the transport header, when it was found.
    pub(crate) l4_offset: Option<usize>,
}

/// What a frame is, for the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// ARP: between the guest and the gateway only.
    Arp,
    /// IPv6 neighbour discovery (router and neighbour solicitations and
    /// advertisements, redirects): link-local housekeeping.
    NeighbourDiscovery,
    /// An IP packet.
    Ip(Destination),
    /// Anything else (other ethertypes, VLAN tags, runt or malformed
    /// frames).
    Other,
}

pub(crate) fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(*b.get(at..)?.first_chunk::<2>()?))
}

/// Classifies a guest frame.
pub(crate) fn classify(frame: &[u8]) -> Kind {
    match be16(frame, 12) {
        Some(ETHERTYPE_ARP) => Kind::Arp,
        Some(ETHERTYPE_IPV4) => ipv4(frame, ETH_HLEN).map_or(Kind::Other, Kind::Ip),
        Some(ETHERTYPE_IPV6) => ipv6(frame, ETH_HLEN),
        _ => Kind::Other,
    }
}

fn ipv4(frame: &[u8], at: usize) -> Option<Destination> {
    let ip = frame.get(at..)?;
    let first = *ip.first()?;
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 || ip.len() < header_len {
        return None;
    }
    let protocol = ip[9];
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let fragment_offset = be16(ip, 6)? & 0x1fff;
    let l4 = at + header_len;
    let port = (fragment_offset == 0)
        .then(|| transport_port(frame, l4, protocol))
        .flatten();
    Some(Destination {
        addr: IpAddr::V4(dst),
        protocol: Some(protocol),
        port,
        ip_offset: at,
        l4_offset: (fragment_offset == 0).then_some(l4),
    })
}

fn ipv6(frame: &[u8], at: usize) -> Kind {
    let Some(ip) = frame.get(at..at + 40) else {
        return Kind::Other;
    };
    if ip[0] >> 4 != 6 {
        return Kind::Other;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    let addr = IpAddr::V6(Ipv6Addr::from(dst));
    // Walk the extension headers to the transport header.
    let mut next = ip[6];
    let mut l4 = at + 40;
    let mut first_fragment = true;
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte
            // units beyond the first 8.
            0 | 43 | 60 => {
                let Some(h) = frame.get(l4..l4 + 2) else {
                    return Kind::Other;
                };
                next = h[0];
                l4 += 8 + usize::from(h[1]) * 8;
            }
            // Fragment header: 8 bytes.
            44 => {
                let (Some(h), Some(offset)) = (frame.get(l4..l4 + 8), be16(frame, l4 + 2)) else {
                    return Kind::Other;
                };
                next = h[0];
                first_fragment &= offset >> 3 == 0;
                l4 += 8;
            }
            _ => break,
        }
    }
    if next == PROTO_ICMPV6
        && first_fragment
        && let Some(&icmp_type) = frame.get(l4)
        && (133..=137).contains(&icmp_type)
    {
        return Kind::NeighbourDiscovery;
    }
    let known = matches!(next, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6);
    Kind::Ip(Destination {
        addr,
        protocol: known.then_some(next),
        port: first_fragment
            .then(|| transport_port(frame, l4, next))
            .flatten(),
        ip_offset: at,
        l4_offset: (known && first_fragment).then_some(l4),
    })
}

fn transport_port(frame: &[u8], l4: usize, protocol: u8) -> Option<u16> {
    matches!(protocol, PROTO_TCP | PROTO_UDP)
        .then(|| be16(frame, l4 + 2))
        .flatten()
}

/// The Internet checksum's running sum of `data` (RFC 1071), to be
/// folded by [`fold`].
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a running sum into the 16-bit one's-complement checksum.
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The pseudo-header sum of an upper-layer packet (RFC 793, RFC 8200).
pub(crate) fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u64 {
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
        _ => 0,
    };
    acc += u64::from(protocol) + len as u64;
    acc
}
