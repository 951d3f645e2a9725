//! What changed among a service's backends, as a stream.

use std::net::SocketAddr;

use tokio::sync::broadcast;

use super::{AdminState, BackendId};

/// Events kept for a slow reader before it is told it lagged.
const CAPACITY: usize = 1024;

/// A change to one backend. Sent to every [`BackendEvents`] stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendEvent {
    /// A backend joined the service.
    Added {
        /// Its id.
        id: BackendId,
        /// Where it connects.
        addr: SocketAddr,
        /// Its configured weight.
        weight: u32,
    },
    /// A backend left the service: it takes no new connections, and those open drain.
    Removed {
        /// Its id.
        id: BackendId,
    },
    /// A backend out of rotation (drained, in maintenance, or removed) has no connection left.
    Drained {
        /// Its id.
        id: BackendId,
    },
    /// The operator (or the supervisor) changed a backend's admin state.
    AdminChanged {
        /// Its id.
        id: BackendId,
        /// The state before.
        from: AdminState,
        /// The state now.
        to: AdminState,
    },
    /// A backend's configured weight changed.
    WeightChanged {
        /// Its id.
        id: BackendId,
        /// The weight before.
        from: u32,
        /// The weight now.
        to: u32,
    },
    /// A backend's address changed (its name resolved to another).
    AddressChanged {
        /// Its id.
        id: BackendId,
        /// The address before.
        from: SocketAddr,
        /// The address now.
        to: SocketAddr,
    },
    /// A backend was marked down, or came back up.
    HealthChanged {
        /// Its id.
        id: BackendId,
        /// True when it came back up.
        up: bool,
        /// Why, in words.
        reason: String,
    },
}

impl BackendEvent {
    /// The backend the event is about.
    pub fn id(&self) -> &BackendId {
        match self {
            BackendEvent::Added { id, .. }
            | BackendEvent::Removed { id }
            | BackendEvent::Drained { id }
            | BackendEvent::AdminChanged { id, .. }
            | BackendEvent::WeightChanged { id, .. }
            | BackendEvent::AddressChanged { id, .. }
            | BackendEvent::HealthChanged { id, .. } => id,
        }
    }
}

/// The sending side, one per service, cloned into every backend's state.
#[derive(Debug, Clone)]
pub(crate) struct EventSender(broadcast::Sender<BackendEvent>);

impl EventSender {
    pub(crate) fn new() -> Self {
        EventSender(broadcast::channel(CAPACITY).0)
    }

    /// Sends to every stream open now; nothing when there is none.
    pub(crate) fn send(&self, event: BackendEvent) {
        if self.0.receiver_count() != 0 {
            let _ = self.0.send(event);
        }
    }

    pub(crate) fn subscribe(&self) -> BackendEvents {
        BackendEvents(self.0.subscribe())
    }
}

/// A stream of [`BackendEvent`]s from the moment it was opened
/// ([`BalancerHandle::events`](crate::BalancerHandle::events)).
#[derive(Debug)]
pub struct BackendEvents(broadcast::Receiver<BackendEvent>);

/// A stream fell so far behind that this many events were dropped for it; it goes on with the next one.
/// Read the state again (for example [`BalancerHandle::backends`](crate::BalancerHandle::backends)) to
/// catch up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event stream lagged: {0} events were dropped")]
pub struct EventsLagged(pub u64);

impl BackendEvents {
    /// The next event; `None` once the balancer is gone.
    pub async fn recv(&mut self) -> Option<Result<BackendEvent, EventsLagged>> {
        match self.0.recv().await {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(EventsLagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting; `None` when none is (or the balancer is gone).
    pub(crate) fn try_recv(&mut self) -> Option<Result<BackendEvent, EventsLagged>> {
        match self.0.try_recv() {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(EventsLagged(n))),
            Err(_) => None,
        }
    }
}
