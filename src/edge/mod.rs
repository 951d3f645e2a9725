//! The edge of a connection: PROXY protocol headers sent to backends and accepted from trusted sources,
//! allow and deny lists, and per-source limits.
//!
//! * `header`: the pure [`parse`] (caps first, then the `ppp` crate) and [`encode`].
//! * `read`: reading a header off an accepted socket without taking a byte of the client's payload
//!   (peek, then consume exactly the header), under a timeout.
//! * `acl`: allow and deny lists of networks ([`Acl`]), matched in O(prefix length).
//! * `limits`: concurrent connections and new connections a second per source ([`Limiter`]), in a
//!   table bounded in memory ([`limits::MAX_TABLE_BYTES`]).
//!
//! Used by `config` (the types), `proxy` (per connection) and `health` (checks that send a header);
//! imports nothing of theirs but [`ConfigError`](crate::ConfigError).

mod acl;
mod header;
pub mod limits;
pub(crate) mod read;

use std::net::IpAddr;
use std::time::Duration;

pub use acl::{Acl, NetSet};
pub use header::{
    canonical, decided, encode, encode_local, parse, Parsed, ProxyHeader, ProxyVersion,
    UnknownProxyVersion, V1_MAX, V2_MAX, V2_SIGNATURE,
};
pub use ipnet::IpNet;
pub use limits::{Limiter, Refusal, SourceGuard, SourceLimits};

/// The default [`AcceptProxy::timeout`]: 3 s.
pub const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a connection from an untrusted source (with [`AcceptProxy`] on) is watched for a PROXY
/// header among its first bytes before it is carried: 200 ms, or until its first bytes come. A client
/// that waits for the server to speak first is delayed by this much.
pub const UNTRUSTED_SNIFF: Duration = Duration::from_millis(200);

/// Accepting PROXY protocol headers (v1 or v2) from trusted sources.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptProxy {
    /// The sources whose headers are trusted (IPv4 and IPv6 networks; a v4-mapped IPv6 source is
    /// matched as IPv4 too). A header from any other source closes its connection.
    pub from: Vec<IpNet>,
    /// How long a trusted source may take to send its whole header (default 3 s; 1 ms to 24 days).
    pub timeout: Duration,
    /// A trusted source may also connect without a header (default `false`: it is closed).
    pub optional: bool,
}

impl AcceptProxy {
    /// Headers trusted from these networks, with the default timeout, required.
    pub fn new(from: impl IntoIterator<Item = IpNet>) -> Self {
        AcceptProxy {
            from: from.into_iter().collect(),
            timeout: DEFAULT_ACCEPT_TIMEOUT,
            optional: false,
        }
    }
    /// Sets the header timeout.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Lets trusted sources connect without a header.
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }
    /// True when `ip` (as it is, or its IPv4 form when v4-mapped) is in a trusted network.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let v4 = ip.to_canonical();
        self.from
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&v4))
    }
}
