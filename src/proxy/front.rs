//! The PROXY protocol at a connection's start (only when configured): the header a trusted source sent
//! is read and taken as the client's addresses, an untrusted source that sends one is refused, and the
//! header to send every backend connection is built.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::Context;
use crate::edge::{self, read, Refusal, SourceGuard, UNTRUSTED_SNIFF};

/// Who the client is, after its PROXY header if it sent one, and the bytes to send each backend
/// connection first (empty without `send_proxy`).
pub(super) struct Front {
    pub(super) client: SocketAddr,
    pub(super) hello: Vec<u8>,
}

/// `None` when the connection must be closed (counted, and logged at debug).
pub(super) async fn admit(
    ctx: &Context,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Option<Front> {
    let settings = &ctx.settings;
    let mut client = peer;
    let mut local = None;
    let mut tlvs = Vec::new();
    if let Some(accept) = &settings.accept_proxy {
        let refused = if accept.trusts(peer.ip()) {
            match read::read_header(stream, accept.timeout, accept.optional).await {
                Ok(Some(header)) => {
                    if let Some((src, dst)) = header.addresses {
                        client = src;
                        local = Some(dst);
                    }
                    tlvs = header.tlvs;
                    None
                }
                Ok(None) => None,
                Err(why) => Some(why.to_string()),
            }
        } else if read::looks_like_header(stream, UNTRUSTED_SNIFF).await {
            Some("PROXY header from an untrusted source".to_string())
        } else {
            None
        };
        if let Some(why) = refused {
            ctx.metrics.rejected_proxy_header.increment(1);
            tracing::debug!(client = %peer, why, "connection refused");
            return None;
        }
    }
    let hello = match settings.send_proxy {
        None => Vec::new(),
        Some(version) => {
            let local = match local {
                Some(l) => l,
                None => stream.local_addr().ok()?,
            };
            let tlvs = if settings.send_proxy_tlvs {
                &tlvs[..]
            } else {
                &[]
            };
            edge::encode(version, client, local, tlvs)
        }
    };
    Some(Front { client, hello })
}

/// The allow and deny lists, then the per-source limits, on the client's address. `Err` when the
/// connection must be closed (counted by reason, and logged at debug).
pub(super) fn check_source(ctx: &Context, client: SocketAddr) -> Result<Option<SourceGuard>, ()> {
    let ip = client.ip();
    if let Some(acl) = &ctx.settings.acl {
        if !acl.permits(ip) {
            ctx.metrics.rejected_acl.increment(1);
            tracing::debug!(client = %client, "connection refused by the allow and deny lists");
            return Err(());
        }
    }
    let Some(limiter) = &ctx.settings.limiter else {
        return Ok(None);
    };
    match limiter.admit(ip) {
        Ok(guard) => Ok(Some(guard)),
        Err(why) => {
            match why {
                Refusal::PerIpLimit => ctx.metrics.rejected_per_ip_limit.increment(1),
                Refusal::RateLimit => ctx.metrics.rejected_rate_limit.increment(1),
            }
            tracing::debug!(client = %client, why = ?why, "connection refused by the per-source limits");
            Err(())
        }
    }
}
