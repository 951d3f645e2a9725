//! Buffers borrowed from a per-thread pool while data is in flight.

use std::cell::RefCell;

/// A buffer borrowed from the current thread's pool, given back on drop.
pub(crate) struct PooledBuf(Vec<u8>);

thread_local! {
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread; more than this are freed, so a burst does not pin memory for ever. More than
/// the pipe pool keeps (`PIPE_POOL_PER_THREAD` in `pipe.rs`): a pooled buffer costs only memory (64 of
/// the default 64 KiB are 4 MiB a thread), while a pooled pipe holds two descriptors of the process's
/// budget.
const BUFFER_POOL_PER_THREAD: usize = 64;

impl PooledBuf {
    pub(crate) fn take(size: usize) -> Self {
        let reused = BUFFERS.with(|p| {
            let mut pool = p.borrow_mut();
            // Buffers of another size (another balancer in this process) are not reused.
            pool.pop().filter(|b| b.len() == size)
        });
        PooledBuf(reused.unwrap_or_else(|| vec![0; size]))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        BUFFERS.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < BUFFER_POOL_PER_THREAD {
                pool.push(buf);
            }
        });
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}
