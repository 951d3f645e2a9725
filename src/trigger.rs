//! A cancellation that a connection can check on every wake-up without a lock.
//!
//! A connection waits for two things besides its bytes: its backend's connections being reset (the
//! operator, a removal's deadline) and the balancer's hard stop (the drain deadline). Both are
//! [`CancellationToken`]s, whose `cancelled()` future takes the token's mutex and its `Notify`'s mutex
//! each time it is polled, and a connection's task is polled on every burst of bytes. Those mutexes are
//! shared by every connection of a backend (on every thread): a lock pair per burst, contended.
//!
//! A [`Trigger`] sets a flag before it cancels its token. A connection polls the token's future once, to
//! register its waker, and afterwards reads the flag ([`Trigger::wait`]). The cancellation is what wakes
//! the task, and the flag was set before it, so a wake-up caused by a cut always sees its flag.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use tokio_util::sync::CancellationToken;

/// A [`CancellationToken`] with a flag set just before it is cancelled.
#[derive(Debug, Default)]
pub(crate) struct Trigger {
    token: CancellationToken,
    fired: AtomicBool,
}

impl Trigger {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Trigger {
            token,
            fired: AtomicBool::new(false),
        }
    }

    /// Sets the flag, then cancels the token (which wakes every waiter).
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Fired through [`fire`](Self::fire). A token cancelled through its parent is not seen here: pair the
    /// child's flag with the parent's, as [`wait`](Self::wait) does.
    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// The token, to wait on or to make children of. Never cancel it directly: [`fire`](Self::fire)
    /// does, after setting the flag that [`wait`](Self::wait) reads.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Resolves once this trigger or `parent` (whose token is this one's parent, or the same) has fired.
    /// The token's future is polled once, to register the task's waker; every later poll reads the two
    /// flags. Polled from one task for its whole life (the registered waker is that task's).
    pub(crate) async fn wait(&self, parent: &Trigger) {
        let mut cancelled = pin!(self.token.cancelled());
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if self.is_fired() || parent.is_fired() {
                return Poll::Ready(());
            }
            if !registered {
                registered = true;
                return cancelled.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wait_ends_when_its_trigger_or_the_parent_fires() {
        for fire_parent in [false, true] {
            let parent = Arc::new(Trigger::default());
            let child = Arc::new(Trigger::new(parent.token().child_token()));
            let (c, p) = (child.clone(), parent.clone());
            let waiting = tokio::spawn(async move { c.wait(&p).await });
            // Let it register, then wake it for nothing a few times (as bytes would): still waiting.
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
            if fire_parent {
                parent.fire();
            } else {
                child.fire();
            }
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("the wait did not end")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_trigger_fired_before_the_wait_ends_it_at_once() {
        let (parent, child) = (Trigger::default(), Trigger::default());
        child.fire();
        tokio::time::timeout(Duration::from_secs(5), child.wait(&parent))
            .await
            .expect("the wait did not end");
    }
}
