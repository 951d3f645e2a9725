//! The wait queue of one service: clients that found every backend that may be picked at its cap wait
//! here, first come first served, for a slot.
//!
//! Only the client at the head of the queue picks; it is woken when a capped backend frees a slot, and
//! when it leaves (served, timed out or gone) it wakes the next. A client that arrives while others wait
//! joins the queue behind them instead of taking a freed slot first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct WaitQueue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// `waiters.len()`, readable without the lock (the hot path reads it once per connection).
    len: AtomicUsize,
    next_ticket: AtomicU64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    wake: Arc<Notify>,
}

/// A client's place in the queue; leaving the queue is dropping it.
#[derive(Debug)]
pub(crate) struct Place<'a> {
    queue: &'a WaitQueue,
    ticket: u64,
    wake: Arc<Notify>,
}

impl WaitQueue {
    fn waiters(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clients waiting now.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// Joins at the back, unless `bound` clients already wait.
    pub(crate) fn join(&self, bound: usize) -> Option<Place<'_>> {
        let mut waiters = self.waiters();
        if waiters.len() >= bound {
            return None;
        }
        let ticket = self.next_ticket.fetch_add(1, Relaxed);
        let wake = Arc::new(Notify::new());
        waiters.push_back(Waiter {
            ticket,
            wake: wake.clone(),
        });
        self.len.store(waiters.len(), Relaxed);
        Some(Place {
            queue: self,
            ticket,
            wake,
        })
    }

    /// A capped backend freed a slot: the client at the head may take it.
    #[inline]
    pub(crate) fn slot_freed(&self) {
        if self.len() != 0 {
            if let Some(head) = self.waiters().front() {
                head.wake.notify_one();
            }
        }
    }
}

impl Place<'_> {
    /// True when this client is at the head of the queue: it may pick.
    pub(crate) fn is_head(&self) -> bool {
        self.queue
            .waiters()
            .front()
            .is_some_and(|w| w.ticket == self.ticket)
    }

    /// Resolves when this client may have reached the head, or a slot may have come free for it.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters();
        let was_head = waiters.front().is_some_and(|w| w.ticket == self.ticket);
        waiters.retain(|w| w.ticket != self.ticket);
        self.queue.len.store(waiters.len(), Relaxed);
        if was_head {
            if let Some(next) = waiters.front() {
                next.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_first_served_and_bounded() {
        let q = WaitQueue::default();
        let a = q.join(2).unwrap();
        let b = q.join(2).unwrap();
        assert!(q.join(2).is_none(), "full");
        assert_eq!(q.len(), 2);
        assert!(a.is_head() && !b.is_head());
        drop(a);
        assert!(b.is_head(), "the next takes the head");
        let c = q.join(2).unwrap();
        drop(b);
        assert!(c.is_head());
        drop(c);
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn the_head_is_woken_by_a_freed_slot_and_the_next_by_the_head_leaving() {
        let q = WaitQueue::default();
        let a = q.join(10).unwrap();
        let b = q.join(10).unwrap();
        q.slot_freed();
        tokio::time::timeout(std::time::Duration::from_secs(5), a.woken())
            .await
            .expect("the head is woken");
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), b.woken())
            .await
            .expect("the next is woken when the head leaves");
        assert!(b.is_head());
    }
}
