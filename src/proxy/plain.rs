//! The baseline data path: Tokio's `copy_bidirectional`.

use std::sync::atomic::Ordering::Relaxed;

use tokio::net::TcpStream;

use super::{Counts, End};
use crate::backend::Backend;

/// The baseline path: Tokio's `copy_bidirectional` with 8 KiB buffers. Byte counts are known only at the
/// end (or not at all when it fails), so metrics and the per-connection log see them late or never.
pub(super) async fn copy(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    b: &Backend,
    counts: &Counts,
) -> End {
    match tokio::io::copy_bidirectional_with_sizes(client, backend, 8192, 8192).await {
        Ok((up, down)) => {
            counts.to_backend.store(up, Relaxed);
            counts.to_client.store(down, Relaxed);
            b.metrics.bytes_to_backend.increment(up);
            b.metrics.bytes_to_client.increment(down);
            b.bytes_to_backend.fetch_add(up, Relaxed);
            b.bytes_to_client.fetch_add(down, Relaxed);
            End::Closed
        }
        // copy_bidirectional does not say which side failed; either way both are reset.
        Err(e) => End::CopyFailed(e),
    }
}
