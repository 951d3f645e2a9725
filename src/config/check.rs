//! The configuration of active health checks: what one check does ([`CheckMode`]), how often it runs and
//! how many results in a row change a verdict ([`HealthCheck`]), and the escapes the bytes of a
//! `send-expect` check are written in ([`unescape`], [`escape`]).

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::config::{ConfigError, MAX_DURATION};

/// The most bytes a `send-expect` check sends, and the most it expects: 16 KiB each.
pub const MAX_CHECK_PAYLOAD: usize = 16 * 1024;

/// The largest [`HealthCheck::rise`] and [`HealthCheck::fall`].
pub const MAX_RISE_FALL: u32 = 1000;

/// The longest [`HealthCheck::path`] and [`HealthCheck::host`]: 4 KiB.
pub const MAX_HTTP_FIELD: usize = 4096;

/// What one check of one backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CheckMode {
    /// No active checks: passive health alone judges the backends.
    None,
    /// A TCP connect within the check timeout passes (the default mode when checks are on).
    #[default]
    Connect,
    /// Connect, write [`HealthCheck::send`], then read until the reply starts with
    /// [`HealthCheck::expect`] (or, with [`HealthCheck::contains`], contains it), within the timeout.
    SendExpect,
    /// `GET PATH HTTP/1.1` with `Host:` and `Connection: close`; a 2xx or 3xx status passes, or exactly
    /// [`HealthCheck::status`] when it is given.
    Http,
}

impl CheckMode {
    /// `none`, `connect`, `send-expect` or `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckMode::None => "none",
            CheckMode::Connect => "connect",
            CheckMode::SendExpect => "send-expect",
            CheckMode::Http => "http",
        }
    }
}

impl fmt::Display for CheckMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CheckMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" => Ok(CheckMode::None),
            "connect" | "tcp" => Ok(CheckMode::Connect),
            "send-expect" => Ok(CheckMode::SendExpect),
            "http" => Ok(CheckMode::Http),
            _ => Err(ConfigError::Unknown {
                field: "check mode",
                value: s.to_string(),
                expected: "connect, send-expect, http or none",
            }),
        }
    }
}

/// Active health checks: every backend is checked, from one place per balancer, every
/// [`interval`](Self::interval) (± 10 %, never in lockstep across backends).
///
/// With checks on, a backend starts down ("not checked yet") and its first passing check puts it in
/// rotation, so a healthy pool serves at once. After that it goes down after [`fall`](Self::fall)
/// failures in a row and comes back after [`rise`](Self::rise) passes in a row; while it is between
/// the two (some failures while up, some passes while down) it is checked four times as often. Passive
/// failures still take a backend down at once, and only the checks bring it back.
///
/// ```
/// use std::time::Duration;
/// use ulb_tcp::HealthCheck;
///
/// let redis = HealthCheck::send_expect(&b"PING\r\n"[..], &b"+PONG"[..])
///     .interval(Duration::from_secs(1))
///     .timeout(Duration::from_millis(500));
/// let web = HealthCheck::http("/healthz").host("app.example").status(200);
/// assert!(redis.validate().is_ok() && web.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What a check does (default [`CheckMode::Connect`]).
    pub mode: CheckMode,
    /// From the end of one check of a backend to the start of the next, ± 10 % (default 2 s; 1 ms to
    /// 24 days); a quarter of it while the backend is in transition.
    pub interval: Duration,
    /// One check, connect included, must pass within this (default 1 s; 1 ms to 24 days).
    pub timeout: Duration,
    /// Passes in a row that bring a backend that is down back up (default 2; 1..=1000).
    pub rise: u32,
    /// Failures in a row that take a backend that is up down (default 3; 1..=1000).
    pub fall: u32,
    /// Check this port of the backend's host instead of the backend's own (default: its own).
    pub port: Option<u16>,
    /// `send-expect`: the bytes to write (may be empty, for servers that speak first; at most 16 KiB).
    pub send: Vec<u8>,
    /// `send-expect`: the bytes the reply must start with (1 byte to 16 KiB).
    pub expect: Vec<u8>,
    /// `send-expect`: the reply must contain [`expect`](Self::expect) anywhere (in its first 64 KiB),
    /// not only at its start.
    pub contains: bool,
    /// `http`: the path to ask for (default `/`; starts with `/`, no spaces or control characters).
    pub path: Option<String>,
    /// `http`: the `Host:` header (default: the address checked, `IP:PORT`).
    pub host: Option<String>,
    /// `http`: the one status that passes (100..=599); by default any 2xx or 3xx passes.
    pub status: Option<u16>,
    /// Open each check with a PROXY protocol header of this version (HAProxy's `check-send-proxy`):
    /// v1 `PROXY UNKNOWN`, v2 `LOCAL`, which speak for no client (default `None`).
    pub send_proxy: Option<crate::edge::ProxyVersion>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::new(CheckMode::Connect)
    }
}

impl HealthCheck {
    /// Checks of this mode with every default.
    pub fn new(mode: CheckMode) -> Self {
        HealthCheck {
            mode,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            send: Vec::new(),
            expect: Vec::new(),
            contains: false,
            path: None,
            host: None,
            status: None,
            send_proxy: None,
        }
    }

    /// Opens each check with a PROXY protocol header of this version.
    pub fn send_proxy(mut self, version: crate::edge::ProxyVersion) -> Self {
        self.send_proxy = Some(version);
        self
    }

    /// TCP connect checks.
    pub fn connect() -> Self {
        HealthCheck::new(CheckMode::Connect)
    }

    /// `send-expect` checks: write `send`, expect a reply that starts with `expect`.
    pub fn send_expect(send: impl Into<Vec<u8>>, expect: impl Into<Vec<u8>>) -> Self {
        HealthCheck {
            send: send.into(),
            expect: expect.into(),
            ..HealthCheck::new(CheckMode::SendExpect)
        }
    }

    /// HTTP checks of `path`.
    pub fn http(path: impl Into<String>) -> Self {
        HealthCheck {
            path: Some(path.into()),
            ..HealthCheck::new(CheckMode::Http)
        }
    }

    /// True unless the mode is [`CheckMode::None`].
    pub fn is_on(&self) -> bool {
        self.mode != CheckMode::None
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: CheckMode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the interval.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }
    /// Sets the timeout of one check.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Sets how many passes in a row bring a backend back up.
    pub fn rise(mut self, n: u32) -> Self {
        self.rise = n;
        self
    }
    /// Sets how many failures in a row take a backend down.
    pub fn fall(mut self, n: u32) -> Self {
        self.fall = n;
        self
    }
    /// Checks this port of the backend's host instead of the backend's own.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// Sets the bytes a `send-expect` check writes.
    pub fn send(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.send = bytes.into();
        self
    }
    /// Sets the bytes a `send-expect` check expects.
    pub fn expect(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.expect = bytes.into();
        self
    }
    /// Expects the bytes anywhere in the reply (`true`), or at its start (`false`, the default).
    pub fn contains(mut self, anywhere: bool) -> Self {
        self.contains = anywhere;
        self
    }
    /// Sets the path an `http` check asks for.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
    /// Sets the `Host:` header of an `http` check.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
    /// Passes an `http` check only on this status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The path an `http` check asks for.
    pub(crate) fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// Checks every value against its documented range, and that no value belongs to another mode; the
    /// error names the first bad one (`check.interval`, `check.send`, ...).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ms = Duration::from_millis(1);
        for (field, d) in [
            ("check.interval", self.interval),
            ("check.timeout", self.timeout),
        ] {
            if d < ms || d > MAX_DURATION {
                return Err(ConfigError::out_of_range(
                    field,
                    format!("{d:?}"),
                    "1ms to 24 days",
                ));
            }
        }
        for (field, n) in [("check.rise", self.rise), ("check.fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&n) {
                return Err(ConfigError::out_of_range(
                    field,
                    n,
                    format!("1..={MAX_RISE_FALL}"),
                ));
            }
        }
        match self.port {
            Some(0) => return Err(ConfigError::out_of_range("check.port", 0, "1..=65535")),
            Some(port) if !self.is_on() => {
                return Err(ConfigError::Unsupported {
                    field: "check.port",
                    value: port.to_string(),
                    why: "is only used when checks are on",
                })
            }
            _ => {}
        }
        if self.send.len() > MAX_CHECK_PAYLOAD {
            return Err(ConfigError::out_of_range(
                "check.send",
                format!("of {} bytes", self.send.len()),
                "at most 16 KiB",
            ));
        }
        if self.expect.len() > MAX_CHECK_PAYLOAD {
            return Err(ConfigError::out_of_range(
                "check.expect",
                format!("of {} bytes", self.expect.len()),
                "1 byte to 16 KiB",
            ));
        }
        let send_expect = self.mode == CheckMode::SendExpect;
        let http = self.mode == CheckMode::Http;
        if send_expect && self.expect.is_empty() {
            return Err(ConfigError::Unsupported {
                field: "check.expect",
                value: String::new(),
                why: "must not be empty in the send-expect mode",
            });
        }
        let misplaced = [
            ("check.send", !self.send.is_empty()),
            ("check.expect", !self.expect.is_empty()),
            ("check.contains", self.contains),
        ];
        for (field, set) in misplaced {
            if set && !send_expect {
                let value = match field {
                    "check.send" => escape(&self.send),
                    "check.expect" => escape(&self.expect),
                    _ => "true".to_string(),
                };
                return Err(ConfigError::Unsupported {
                    field,
                    value,
                    why: "is only used by the send-expect mode",
                });
            }
        }
        let only_http = |field: &'static str, value: String| ConfigError::Unsupported {
            field,
            value,
            why: "is only used by the http mode",
        };
        if let Some(path) = &self.path {
            if !http {
                return Err(only_http("check.path", path.clone()));
            }
            let bad = !path.starts_with('/')
                || path.len() > MAX_HTTP_FIELD
                || path.chars().any(|c| c.is_whitespace() || c.is_control());
            if bad {
                return Err(ConfigError::Unsupported {
                    field: "check.path",
                    value: escape(path.as_bytes()),
                    why:
                        "must start with '/', without spaces or control characters (at most 4 KiB)",
                });
            }
        }
        if let Some(host) = &self.host {
            if !http {
                return Err(only_http("check.host", host.clone()));
            }
            let bad = host.is_empty()
                || host.len() > MAX_HTTP_FIELD
                || host.chars().any(|c| c.is_whitespace() || c.is_control());
            if bad {
                return Err(ConfigError::Unsupported {
                    field: "check.host",
                    value: escape(host.as_bytes()),
                    why: "must be 1 byte to 4 KiB, without spaces or control characters",
                });
            }
        }
        if let Some(status) = self.status {
            if !http {
                return Err(only_http("check.status", status.to_string()));
            }
            if !(100..=599).contains(&status) {
                return Err(ConfigError::out_of_range(
                    "check.status",
                    status,
                    "100..=599",
                ));
            }
        }
        Ok(())
    }
}

/// `bytes` between double quotes, escaped as [`escape`] does.
pub(crate) fn quoted(bytes: &[u8]) -> String {
    format!("\"{}\"", escape(bytes))
}

/// Parses the escapes of a `send-expect` check's bytes: `\r`, `\n`, `\t`, `\\` and `\xHH` (two hex
/// digits: any byte). Every other character stands for its UTF-8 bytes.
///
/// ```
/// assert_eq!(ulb_tcp::health::unescape(r"PING\r\n"), Ok(b"PING\r\n".to_vec()));
/// assert_eq!(ulb_tcp::health::unescape(r"\x00\x00\x00\x08\x04\xd2\x16\x2f").unwrap().len(), 8);
/// assert!(ulb_tcp::health::unescape(r"\q").is_err());
/// ```
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        match chars.next().map(|(_, c)| c) {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).map(|(_, c)| c).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 => out.push(b),
                    _ => {
                        return Err(format!(
                            "bad escape '\\x{hex}' at byte {i} (\\x takes two hex digits)"
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape '\\{other}' at byte {i} (use \\r, \\n, \\t, \\\\ or \\xHH)"
                ))
            }
            None => return Err("a lone '\\' at the end (write \\\\ for a backslash)".into()),
        }
    }
    Ok(out)
}

/// The inverse of [`unescape`], for messages: printable ASCII as it is (a `"` as `\"`), `\r`, `\n`,
/// `\t`, `\\`, and `\xHH` for every other byte.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        let pg = unescape(r"\x00\x00\x00\x08\x04\xd2\x16\x2f").unwrap();
        assert_eq!(pg, [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]);
        assert_eq!(unescape(r"a\tb\\c\r\n").unwrap(), b"a\tb\\c\r\n");
        assert_eq!(unescape("é").unwrap(), "é".as_bytes());
        assert_eq!(escape(&pg), r"\x00\x00\x00\x08\x04\xd2\x16/");
        assert_eq!(escape(b"-ERR \"x\"\r\n"), r#"-ERR \"x\"\r\n"#);
        for bad in [r"\q", r"\x4", r"\xzz", "\\"] {
            assert!(unescape(bad).is_err(), "{bad}");
        }
        assert!(unescape(r"\q").unwrap_err().contains(r"'\q'"));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(HealthCheck::default().validate().is_ok());
        let err = |c: HealthCheck| c.validate().unwrap_err().to_string();
        assert!(
            err(HealthCheck::connect().interval(Duration::ZERO)).starts_with("check.interval 0ns")
        );
        assert!(err(HealthCheck::connect().timeout(MAX_DURATION * 2)).starts_with("check.timeout"));
        assert_eq!(
            err(HealthCheck::connect().rise(0)),
            "check.rise 0 is out of range (1..=1000)"
        );
        assert!(err(HealthCheck::connect().fall(1001)).starts_with("check.fall 1001"));
        assert!(err(HealthCheck::connect().port(0)).starts_with("check.port 0"));
        assert!(err(HealthCheck::send_expect(vec![b'x'; 16385], "+")).starts_with("check.send"));
        assert!(err(HealthCheck::send_expect("", vec![b'x'; 16385])).starts_with("check.expect"));
        assert_eq!(
            err(HealthCheck::send_expect("PING\r\n", "")),
            "check.expect '' must not be empty in the send-expect mode"
        );
        assert!(HealthCheck::send_expect("", "220 ").validate().is_ok());
        assert_eq!(
            err(HealthCheck::connect().send("PING")),
            "check.send 'PING' is only used by the send-expect mode"
        );
        assert!(err(HealthCheck::connect().contains(true)).starts_with("check.contains"));
        assert!(err(HealthCheck::http("healthz")).starts_with("check.path 'healthz' must start"));
        assert!(err(HealthCheck::connect().mode(CheckMode::None).port(1)).starts_with("check.port"));
        assert!(err(HealthCheck::http("/a b")).starts_with("check.path"));
        assert!(err(HealthCheck::connect().path("/")).contains("only used by the http mode"));
        assert!(err(HealthCheck::http("/").host("a\r\nX: y")).starts_with("check.host"));
        assert!(err(HealthCheck::http("/").status(99)).starts_with("check.status 99"));
        assert!(err(HealthCheck::connect().status(200)).starts_with("check.status"));
        assert!(HealthCheck::http("/healthz")
            .host("h")
            .status(204)
            .validate()
            .is_ok());
    }

    #[test]
    fn modes_parse() {
        for m in [
            CheckMode::None,
            CheckMode::Connect,
            CheckMode::SendExpect,
            CheckMode::Http,
        ] {
            assert_eq!(m.as_str().parse::<CheckMode>(), Ok(m));
        }
        let e = "ping".parse::<CheckMode>().unwrap_err().to_string();
        assert!(e.contains("'ping'") && e.contains("send-expect"), "{e}");
    }
}
