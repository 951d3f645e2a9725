//! One backend's configuration, and the `HOST:PORT@WEIGHT` form it is written in.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use super::{check_weight, ConfigError, MAX_WEIGHT};

/// One backend: its id, where to connect and how much traffic it takes relative to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendConfig {
    /// The backend's stable id within its service: the name in logs, metrics, stats and the handle's
    /// calls. `HOST:PORT` as configured unless one is given ([`with_id`](Self::with_id)).
    pub id: String,
    /// Where connections go.
    pub addr: SocketAddr,
    /// Relative share of connections, 1..=256.
    pub weight: u32,
    /// A backup takes connections only while no primary may (every primary down, out of rotation, at
    /// its cap, or already tried by the client), as HAProxy's `backup`.
    pub backup: bool,
    /// At most this many connections at once (HAProxy's `maxconn`); when every backend that may be
    /// picked is at its cap, clients wait in the service's queue.
    pub max_connections: Option<u32>,
}

impl BackendConfig {
    /// A primary backend of weight 1, with no cap, whose id is its address.
    pub fn new(addr: SocketAddr) -> Self {
        BackendConfig {
            id: addr.to_string(),
            addr,
            weight: 1,
            backup: false,
            max_connections: None,
        }
    }

    /// The same backend as a backup, or a primary.
    pub fn with_backup(mut self, backup: bool) -> Self {
        self.backup = backup;
        self
    }

    /// The same backend with a cap on connections at once.
    pub fn with_max_connections(mut self, cap: u32) -> Self {
        self.max_connections = Some(cap);
        self
    }

    /// The same backend with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same backend with another id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Checks the id and the weight.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN || self.id.chars().any(char::is_control)
        {
            return Err(ConfigError::out_of_range(
                "backend id",
                format!("'{}'", self.id.escape_debug()),
                format!("1 to {MAX_ID_LEN} characters, none of them control characters"),
            ));
        }
        check_weight(&self.id, self.weight)?;
        if let Some(cap) = self.max_connections {
            if cap == 0 || cap as usize > super::MAX_CONNECTIONS {
                return Err(ConfigError::out_of_range(
                    format!("backend '{}' max_connections", self.id),
                    cap,
                    format!("1..={}", super::MAX_CONNECTIONS),
                ));
            }
        }
        Ok(())
    }
}

/// The longest backend id.
pub const MAX_ID_LEN: usize = 256;

/// A backend as written on the command line, `HOST:PORT` or `HOST:PORT@WEIGHT`, before name resolution.
///
/// ```
/// use ulb_tcp::BackendSpec;
/// let spec: BackendSpec = "localhost:8081@3".parse().unwrap();
/// assert_eq!(spec.host_port, "localhost:8081");
/// assert_eq!(spec.weight, 3);
/// assert!("localhost".parse::<BackendSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendSpec {
    /// `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    pub host_port: String,
    /// The weight after `@`, 1 when absent.
    pub weight: u32,
}

impl FromStr for BackendSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ConfigError::BadBackend {
            value: s.to_string(),
            why: why.to_string(),
        };
        let s_trim = s.trim();
        let (host_port, weight) = match s_trim.rsplit_once('@') {
            Some((hp, w)) => {
                let weight: u32 = w
                    .parse()
                    .map_err(|_| bad("the weight after '@' must be a whole number"))?;
                (hp, weight)
            }
            None => (s_trim, 1),
        };
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(bad(&format!("weight must be 1..={MAX_WEIGHT}")));
        }
        let (host, port) = host_port
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(bad("the port must be 1..=65535")),
        }
        Ok(BackendSpec {
            host_port: host_port.to_string(),
            weight,
        })
    }
}

impl BackendSpec {
    /// Resolves the host (literal addresses need no lookup); the first address returned is used. The
    /// backend's id is `HOST:PORT` as written.
    pub async fn resolve(&self) -> Result<BackendConfig, ConfigError> {
        let unresolvable = |why: String| ConfigError::Unresolvable {
            value: self.host_port.clone(),
            why,
        };
        let addr = if let Ok(addr) = self.host_port.parse::<SocketAddr>() {
            addr
        } else {
            let lookup = tokio::net::lookup_host(self.host_port.as_str());
            match tokio::time::timeout(Duration::from_secs(10), lookup).await {
                Err(_) => return Err(unresolvable("lookup timed out after 10s".into())),
                Ok(Err(e)) => return Err(unresolvable(e.to_string())),
                Ok(Ok(mut addrs)) => addrs
                    .next()
                    .ok_or_else(|| unresolvable("no addresses".into()))?,
            }
        };
        Ok(BackendConfig::new(addr)
            .with_id(self.host_port.clone())
            .with_weight(self.weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs_parse_and_reject() {
        let ok = |s: &str| s.parse::<BackendSpec>().unwrap();
        assert_eq!(ok("127.0.0.1:80").weight, 1);
        assert_eq!(ok("[::1]:80@7").host_port, "[::1]:80");
        assert_eq!(ok("[::1]:80@7").weight, 7);
        for bad in [
            "", "host", "host:", ":80", "h:0", "h:70000", "h:80@0", "h:80@x", "h:80@257",
        ] {
            let err = bad.parse::<BackendSpec>().unwrap_err().to_string();
            assert!(
                err.contains(&format!("'{bad}'")),
                "{err} should name {bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn literal_addresses_resolve_without_lookup() {
        let spec: BackendSpec = "[::1]:8080@2".parse().unwrap();
        let b = spec.resolve().await.unwrap();
        assert_eq!(b.addr, "[::1]:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(b.weight, 2);
        assert_eq!(b.id, "[::1]:8080");
    }

    #[test]
    fn ids_are_checked() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        assert!(b.clone().with_id("web-1").validate().is_ok());
        for bad in [String::new(), "a\nb".into(), "x".repeat(MAX_ID_LEN + 1)] {
            let err = b.clone().with_id(bad.clone()).validate().unwrap_err();
            assert!(err.to_string().starts_with("backend id '"), "{err}");
        }
    }
}
