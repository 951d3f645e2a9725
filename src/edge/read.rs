//! Reading a PROXY header off an accepted socket: the bytes are peeked, and only those of the header
//! are consumed, so that the client's payload after it is left in the socket for the data path.

use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::header::{decided, parse, Parsed, ProxyHeader, V2_MAX};

/// Why a connection's header was refused.
#[derive(Debug)]
pub(crate) enum Refused {
    /// No header from a trusted source that must send one.
    Missing,
    /// A broken header.
    Invalid(&'static str),
    /// The whole header did not come within the timeout.
    Timeout,
    /// The client closed before its header was whole.
    Closed,
    /// Reading failed.
    Io(io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Missing => f.write_str("no PROXY header from a trusted source"),
            Refused::Invalid(why) => write!(f, "bad PROXY header: {why}"),
            Refused::Timeout => f.write_str("PROXY header timed out"),
            Refused::Closed => f.write_str("closed before the end of its PROXY header"),
            Refused::Io(e) => write!(f, "reading the PROXY header failed: {e}"),
        }
    }
}

/// While the first bytes cannot yet tell (a part of the signature), look again after this long.
const POLL: Duration = Duration::from_millis(5);

/// Reads the header a trusted source sends, within `timeout`: `Ok(Some)` with the header consumed,
/// `Ok(None)` when `optional` and the bytes are no header (nothing consumed), else why not.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
    optional: bool,
) -> Result<Option<ProxyHeader>, Refused> {
    match tokio::time::timeout(timeout, read(stream, optional)).await {
        Ok(r) => r,
        Err(_) => Err(Refused::Timeout),
    }
}

async fn read(stream: &mut TcpStream, optional: bool) -> Result<Option<ProxyHeader>, Refused> {
    // Bytes already consumed: always a prefix of a header whose start was decided.
    let mut got: Vec<u8> = Vec::new();
    let mut peeked = vec![0u8; V2_MAX];
    loop {
        let room = V2_MAX - got.len();
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(Refused::Io)?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        let mut seen = got.clone();
        seen.extend_from_slice(&peeked[..n]);
        match parse(&seen) {
            Parsed::Header(h, len) => {
                let mut rest = vec![0u8; len.saturating_sub(got.len())];
                stream.read_exact(&mut rest).await.map_err(Refused::Io)?;
                return Ok(Some(h));
            }
            Parsed::NotProxy if optional && got.is_empty() => return Ok(None),
            Parsed::NotProxy => return Err(Refused::Missing),
            Parsed::Invalid(why) => return Err(Refused::Invalid(why)),
            Parsed::Incomplete if decided(&seen) => {
                // All of it belongs to the header: take it, and wait for more.
                let mut take = vec![0u8; n];
                stream.read_exact(&mut take).await.map_err(Refused::Io)?;
                got.extend_from_slice(&take);
            }
            // A part of a signature: peeking again would return at once; look again shortly.
            Parsed::Incomplete => tokio::time::sleep(POLL).await,
        }
    }
}

/// With PROXY acceptance on, for an untrusted source: true when its first bytes (waited for up to
/// `window`) are, or begin, a PROXY header. Nothing is consumed.
pub(crate) async fn looks_like_header(stream: &TcpStream, window: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; 16];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    let first = &buf[..n];
                    if decided(first) {
                        return !matches!(parse(first), Parsed::NotProxy);
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    };
    // Undecided at the end of the window (a lone `P` or `\r`): not a header that can be told.
    tokio::time::timeout(window, sniff).await.unwrap_or(false)
}
