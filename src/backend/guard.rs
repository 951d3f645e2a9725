//! The guard that holds one connection's count on a backend.

use std::sync::Arc;

use super::Backend;

/// Holds one connection on a backend, from the moment it is picked (so that connects in progress count as
/// load) until the connection ends; the count goes back down when the guard is dropped. The count lives in
/// the backend's live state, never in a table snapshot, so a guard taken on an old snapshot gives it back
/// to the same state whatever tables were built meanwhile.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    backend: Arc<Backend>,
}

impl ActiveGuard {
    /// Counts a connection on `backend`, whatever its cap or trial state.
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        backend.acquire();
        ActiveGuard { backend }
    }

    /// Counts a connection on the backend a table just picked, if it takes it (see
    /// [`Backend::claim`]); the backend back when a trial connection is already under way, or its cap is
    /// reached.
    pub(crate) fn claim(backend: Arc<Backend>) -> Result<Self, Arc<Backend>> {
        if backend.claim() {
            Ok(ActiveGuard { backend })
        } else {
            Err(backend)
        }
    }

    /// Counts the connection in the backend's totals, once its connect has succeeded.
    pub(crate) fn connected(&self) {
        self.backend.connected();
    }

    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.backend.release();
    }
}
