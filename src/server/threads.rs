//! [`ServingThreads`]: per-core serving threads shared by every balancer of a process. Each thread runs
//! a current-thread Tokio runtime of its own; [`BalancerHandle::accept_on_threads`] gives each thread one
//! of the `SO_REUSEPORT` listeners of an address, and a connection lives its whole life on the thread
//! that accepted it, as with [`TcpBalancer::serve_per_core`](super::TcpBalancer::serve_per_core). Unlike
//! that, listeners and balancers come and go while the threads run: this is what a configuration file
//! with several services, reloaded, runs on.

use std::io;
use std::num::NonZeroUsize;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::MAX_THREADS;

/// N serving threads, each driving a current-thread runtime until [`stop`](ServingThreads::stop).
#[derive(Debug)]
pub struct ServingThreads {
    handles: Vec<Handle>,
    stop: CancellationToken,
    joins: Vec<std::thread::JoinHandle<()>>,
}

impl ServingThreads {
    /// Starts `threads` threads (at most [`MAX_THREADS`]).
    pub fn start(threads: NonZeroUsize) -> io::Result<ServingThreads> {
        if threads.get() > MAX_THREADS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{threads} threads is more than {MAX_THREADS}"),
            ));
        }
        let stop = CancellationToken::new();
        let mut set = ServingThreads {
            handles: Vec::with_capacity(threads.get()),
            stop: stop.clone(),
            joins: Vec::with_capacity(threads.get()),
        };
        for i in 0..threads.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            set.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("ulb-tcp-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()));
            match join {
                Ok(j) => set.joins.push(j),
                Err(e) => {
                    set.stop.cancel();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot start serving thread {i}: {e}"),
                    ));
                }
            }
        }
        Ok(set)
    }

    /// How many threads.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    pub(super) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every thread and waits for them to exit. Tasks still on them are dropped (their sockets
    /// closed): call it once every balancer on them has drained.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut self.joins);
        let _ = tokio::task::spawn_blocking(move || {
            for j in joins {
                if j.join().is_err() {
                    tracing::error!("a serving thread panicked");
                }
            }
        })
        .await;
    }
}

impl Drop for ServingThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
