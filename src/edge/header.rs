//! PROXY protocol headers (v1 text, v2 binary): the pure parse and the encoding.
//!
//! [`parse`] looks at the bytes a trusted source sent first and says whether they are a whole header
//! (and how long it is), could still become one, cannot be one, or are a broken one. The caps and the
//! first checks (signature, version, command, family, length) are made here, before any byte reaches
//! the `ppp` crate, which then decodes the addresses. Encoding is a few fixed fields and is written here.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The longest v1 header, `PROXY ` to CRLF included (the protocol's own limit).
pub const V1_MAX: usize = 107;

/// The longest v2 header accepted, its 16 fixed bytes included (addresses and TLVs: at most 4080 bytes).
/// The protocol allows 16 + 65,535; a longer header is refused as broken.
pub const V2_MAX: usize = 4096;

/// The 12-byte signature that opens a v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

const V1_PREFIX: &[u8] = b"PROXY ";

/// Which PROXY protocol version is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProxyVersion {
    /// The text header, `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header, which can carry TLVs.
    V2,
}

impl ProxyVersion {
    /// `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

impl std::fmt::Display for ProxyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a PROXY protocol version that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown PROXY protocol version '{0}' (expected v1 or v2)")]
pub struct UnknownProxyVersion(pub String);

impl std::str::FromStr for ProxyVersion {
    type Err = UnknownProxyVersion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(ProxyVersion::V1),
            "v2" | "2" => Ok(ProxyVersion::V2),
            _ => Err(UnknownProxyVersion(s.to_string())),
        }
    }
}

/// What a header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The version it came in.
    pub version: ProxyVersion,
    /// The client's address and the address it connected to; `None` for v1 `UNKNOWN`, a v2 `LOCAL`
    /// command, or a family other than IPv4 and IPv6 (the connection's own addresses are kept then).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// A v2 header's TLVs, as they came (empty for v1).
    pub tlvs: Vec<u8>,
}

/// The answer of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, and its length in bytes: what follows it is the client's payload.
    Header(ProxyHeader, usize),
    /// The bytes are the start of a header; more are needed (never more than [`V2_MAX`] in all).
    Incomplete,
    /// The bytes cannot start a header (for `optional` acceptance: the connection has none).
    NotProxy,
    /// A broken header, and why.
    Invalid(&'static str),
}

/// Looks at the first bytes of a connection. Bounded: it reads at most [`V2_MAX`] of `buf`, never
/// panics, and allocates at most the TLVs of one header.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Parsed::NotProxy
}

/// True once `buf` is long enough to say whether it starts a header or not (the whole v1 prefix or v2
/// signature, or a byte that differs from both).
pub fn decided(buf: &[u8]) -> bool {
    let v2 = buf.len().min(V2_SIGNATURE.len());
    let v1 = buf.len().min(V1_PREFIX.len());
    let maybe_v2 = buf[..v2] == V2_SIGNATURE[..v2];
    let maybe_v1 = buf[..v1] == V1_PREFIX[..v1];
    (!maybe_v1 && !maybe_v2)
        || (maybe_v2 && buf.len() >= V2_SIGNATURE.len())
        || (maybe_v1 && buf.len() >= V1_PREFIX.len())
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Parsed::Invalid("v2: bad version");
    }
    if command > 1 {
        return Parsed::Invalid("v2: unknown command");
    }
    let (family, protocol) = (buf[13] >> 4, buf[13] & 0x0f);
    if family > 3 {
        return Parsed::Invalid("v2: unknown address family");
    }
    if protocol > 2 {
        return Parsed::Invalid("v2: unknown transport protocol");
    }
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > V2_MAX {
        return Parsed::Invalid("v2: longer than the cap");
    }
    if buf.len() < total {
        return Parsed::Incomplete;
    }
    let header = match ppp::v2::Header::try_from(&buf[..total]) {
        Ok(h) => h,
        Err(_) => return Parsed::Invalid("v2: addresses do not fit its length"),
    };
    // TLVs may be carried on: each must fit what is left of the header.
    if header.tlvs().any(|tlv| tlv.is_err()) {
        return Parsed::Invalid("v2: a TLV overruns the header");
    }
    let addresses = match (header.command, header.addresses) {
        (ppp::v2::Command::Local, _) => None,
        (_, ppp::v2::Addresses::IPv4(a)) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        (_, ppp::v2::Addresses::IPv6(a)) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        _ => None,
    };
    Parsed::Header(
        ProxyHeader {
            version: ProxyVersion::V2,
            addresses,
            tlvs: header.tlv_bytes().to_vec(),
        },
        total,
    )
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("v1: no CRLF within 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    if cr + 1 >= window.len() {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("v1: no CRLF within 107 bytes")
        } else {
            Parsed::Incomplete
        };
    }
    if window[cr + 1] != b'\n' {
        return Parsed::Invalid("v1: CR without LF");
    }
    let len = cr + 2;
    if window[..cr].iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Parsed::Invalid("v1: not printable ASCII");
    }
    let header = match ppp::v1::Header::try_from(&window[..len]) {
        Ok(h) => h,
        Err(_) => return Parsed::Invalid("v1: malformed"),
    };
    let addresses = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        ppp::v1::Addresses::Unknown => None,
    };
    Parsed::Header(
        ProxyHeader {
            version: ProxyVersion::V1,
            addresses,
            tlvs: Vec::new(),
        },
        len,
    )
}

/// `addr` with a v4-mapped IPv6 address written as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Both addresses of one family: IPv4 when both are (or map to) IPv4, else both IPv6 (an IPv4 one
/// v4-mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(src), canonical(dst));
    match (s.ip(), d.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (s, d),
        _ => (as_v6(s), as_v6(d)),
    }
}

fn as_v6(a: SocketAddr) -> SocketAddr {
    let ip: Ipv6Addr = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SocketAddr::new(IpAddr::V6(ip), a.port())
}

/// The header that tells a backend that `source` connected to `destination`. With v2, `tlvs` (raw TLV
/// bytes, as [`ProxyHeader::tlvs`]) are carried as long as the header stays within [`V2_MAX`]; v1
/// carries none.
pub fn encode(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: &[u8],
) -> Vec<u8> {
    let (s, d) = same_family(source, destination);
    match version {
        ProxyVersion::V1 => {
            let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut addrs = Vec::with_capacity(36);
            let family = match (s.ip(), d.ip()) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    addrs.extend_from_slice(&a.octets());
                    addrs.extend_from_slice(&b.octets());
                    0x11 // AF_INET, STREAM
                }
                (a, b) => {
                    addrs.extend_from_slice(&v6_octets(a));
                    addrs.extend_from_slice(&v6_octets(b));
                    0x21 // AF_INET6, STREAM
                }
            };
            addrs.extend_from_slice(&s.port().to_be_bytes());
            addrs.extend_from_slice(&d.port().to_be_bytes());
            if 16 + addrs.len() + tlvs.len() <= V2_MAX {
                addrs.extend_from_slice(tlvs);
            }
            v2(0x21, family, &addrs)
        }
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(version_command);
    out.push(family);
    // At most V2_MAX - 16 (the callers' bound), so it fits a u16.
    out.extend_from_slice(&(body.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The header of a connection that the balancer opens for itself (a health check), which speaks for no
/// client: v1 `PROXY UNKNOWN`, v2 `LOCAL`. The backend then uses the connection's own addresses.
pub fn encode_local(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyVersion::V2 => v2(0x20, 0x00, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn what_is_encoded_parses_back() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            for (s, d) in [
                ("127.0.0.2:40000", "127.0.0.1:8080"),
                ("[2001:db8::1]:1", "[::1]:443"),
                ("[::ffff:10.0.0.1]:5", "10.0.0.2:6"),
                ("10.0.0.1:5", "[2001:db8::2]:6"),
            ] {
                let mut bytes = encode(v, a(s), a(d), &[]);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
                let Parsed::Header(h, n) = parse(&bytes) else {
                    panic!("{v} {s} {d}: {:?}", parse(&bytes));
                };
                assert_eq!(n, len);
                let (ps, pd) = h.addresses.unwrap();
                assert_eq!(canonical(ps), canonical(a(s)), "{v}");
                assert_eq!(canonical(pd), canonical(a(d)), "{v}");
            }
        }
        let tlv = [0x04, 0x00, 0x02, 0xab, 0xcd];
        let bytes = encode(ProxyVersion::V2, a("1.2.3.4:5"), a("5.6.7.8:9"), &tlv);
        let Parsed::Header(h, _) = parse(&bytes) else {
            panic!()
        };
        assert_eq!(h.tlvs, tlv);
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let bytes = encode_local(v);
            assert_eq!(
                parse(&bytes),
                Parsed::Header(
                    ProxyHeader {
                        version: v,
                        addresses: None,
                        tlvs: vec![]
                    },
                    bytes.len()
                )
            );
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        for bytes in [
            encode(ProxyVersion::V1, a("[2001:db8::1]:1"), a("[::1]:443"), &[]),
            encode(ProxyVersion::V2, a("1.2.3.4:5"), a("5.6.7.8:9"), &[]),
        ] {
            for i in 0..bytes.len() {
                assert_eq!(parse(&bytes[..i]), Parsed::Incomplete, "{i}");
            }
        }
        assert_eq!(parse(b"GET /"), Parsed::NotProxy);
        assert!(!decided(b"PROX"));
        assert!(decided(b"PROXY "));
        assert!(decided(b"POST"));
    }
}
