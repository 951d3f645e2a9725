//! Linux zero-copy forwarding: `splice(2)` from one socket into a pipe and from the pipe into the other
//! socket, so that the bytes never enter user space.
//!
//! Pipes are borrowed from a per-thread pool only while data is in flight and given back empty, like the
//! buffers of the pooled path; an idle connection holds none. A pipe that still holds bytes (its connection
//! failed mid-way) is closed rather than pooled.
//!
//! Each pipe costs two descriptors, on top of a connection's two sockets, so pipes have a budget of their
//! own: [`PipeBudget`] counts every pipe in existence in the process, in use or pooled, and
//! [`Pipe::take`] opens a new one only while that count is under the balancer's
//! [`max_pipes`](crate::BalancerConfig::max_pipes). When no pipe can be had (the bound is reached, or
//! `pipe2` fails: descriptors or pipe memory exhausted) the caller carries the bytes through a buffer
//! instead. Pools keep few pipes: at most [`PIPE_POOL_PER_THREAD`] per thread and a quarter of the bound
//! in all, so most of the budget is always open to any thread, and an idle balancer keeps at most that
//! quarter open.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::clock::OncePerSecond;

/// The capacity asked for each pipe, and so the most bytes one `splice` call moves. Four times the
/// default (64 KiB): a quarter of the system calls per byte, which brought the CPU cost per GB carried
/// from 0.39 to 0.29 s (HAProxy's figure) on the benchmark machine. An empty pipe holds no data pages,
/// so pooled pipes cost little memory whatever their capacity.
const PIPE_SIZE: usize = 256 * 1024;

/// Pipes kept per thread; more are closed when given back. Fewer than the buffer pool keeps (its
/// `BUFFER_POOL_PER_THREAD`, 64): a pooled buffer costs only memory, a pooled pipe two descriptors out
/// of the process's budget. A pooled pipe saves four system calls per burst (`pipe2`, two `fcntl`,
/// `close`); 16 cover the bursts one thread has in flight at once on a busy balancer, and the share of
/// the bound ([`POOL_SHARE`]) keeps the pools smaller still at small limits.
const PIPE_POOL_PER_THREAD: usize = 16;

/// The pools together keep at most `max_pipes / POOL_SHARE` pipes.
const POOL_SHARE: usize = 4;

/// The count of pipes in existence, in use and pooled, against which [`Pipe::take`] checks a bound.
/// Descriptors are a process-wide resource, so the balancer counts in one process-wide budget
/// ([`PipeBudget::process`]); several balancers in one process each hold the count to their own bound.
#[derive(Debug)]
struct PipeBudget {
    /// Pipes open: in use, and in every thread's pool.
    live: AtomicUsize,
    /// Of those, the pooled ones.
    pooled: AtomicUsize,
}

static PROCESS: PipeBudget = PipeBudget::new();

impl PipeBudget {
    const fn new() -> Self {
        PipeBudget {
            live: AtomicUsize::new(0),
            pooled: AtomicUsize::new(0),
        }
    }

    /// The process's budget, which the data path uses.
    fn process() -> &'static PipeBudget {
        &PROCESS
    }

    /// Pipes open now, in use and pooled.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// Pipes in the pools now.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.pooled.load(Relaxed)
    }

    /// Counts one more pipe if fewer than `limit` are open.
    fn reserve(&self, limit: usize) -> bool {
        self.live
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }

    fn release(&self) {
        self.live.fetch_sub(1, Relaxed);
    }
}

/// Why no pipe could be had.
#[derive(Debug)]
pub(crate) enum NoPipe {
    /// `max_pipes` pipes are open already.
    Bound,
    /// `pipe2` failed (EMFILE, ENFILE: descriptors or pipe memory exhausted).
    Failed(io::Error),
}

impl NoPipe {
    /// Logs a `pipe2` failure, at most once a second in the process (the bound being reached is normal
    /// under load, and only counted).
    pub(crate) fn log(&self) {
        static GATE: OncePerSecond = OncePerSecond::new();
        let NoPipe::Failed(e) = self else {
            return;
        };
        if GATE.open() {
            tracing::warn!(error = %e, "cannot open a pipe for splice; carrying bytes through a buffer");
        }
    }
}

/// A non-blocking pipe, counted in its budget for as long as it is open.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    budget: &'static PipeBudget,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Both descriptors are closed right after this, by their OwnedFd.
        self.budget.release();
    }
}

/// A thread's pooled pipes, uncounted from the pooled total when the thread ends.
struct Pool(Vec<Pipe>);

impl Drop for Pool {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            p.budget.pooled.fetch_sub(1, Relaxed);
        }
    }
}

thread_local! {
    static PIPES: RefCell<Pool> = const { RefCell::new(Pool(Vec::new())) };
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one if fewer than `limit` are open in the process.
    pub(crate) fn take(limit: usize) -> Result<Pipe, NoPipe> {
        Self::take_from(PipeBudget::process(), limit)
    }

    /// The same, counted in `budget`.
    fn take_from(budget: &'static PipeBudget, limit: usize) -> Result<Pipe, NoPipe> {
        // `try_with`: while the thread ends, its pool may already be gone.
        let pooled = PIPES
            .try_with(|p| {
                let mut pool = p.borrow_mut();
                let i = pool
                    .0
                    .iter()
                    .rposition(|p| std::ptr::eq(p.budget, budget))?;
                Some(pool.0.swap_remove(i))
            })
            .ok()
            .flatten();
        if let Some(p) = pooled {
            budget.pooled.fetch_sub(1, Relaxed);
            return Ok(p);
        }
        if !budget.reserve(limit) {
            return Err(NoPipe::Bound);
        }
        Self::open(budget).map_err(|e| {
            budget.release();
            NoPipe::Failed(e)
        })
    }

    /// Opens a pipe already counted in `budget`.
    fn open(budget: &'static PipeBudget) -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the array we pass, which lives on this stack.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own, with integer arguments. Growing the pipe can fail (past
        // the per-user pipe limits): the pipe then keeps its default size, which F_GETPIPE_SZ reports.
        let capacity = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            );
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = usize::try_from(capacity).unwrap_or(0).max(4096);
        Ok(Pipe {
            read,
            write,
            capacity,
            budget,
        })
    }

    /// How many bytes the pipe holds when full: the most one fill may move.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Gives an *empty* pipe back to this thread's pool, or closes it when the pool is full or the
    /// pools together already keep their share (a quarter) of `limit`.
    pub(crate) fn give_back(self, limit: usize) {
        let budget = self.budget;
        let share = limit / POOL_SHARE;
        // A pipe not pushed is dropped, and so closed, with the closure; also when the thread's pool is
        // already gone and the closure never runs.
        let _ = PIPES.try_with(move |p| {
            let mut pool = p.borrow_mut();
            let room = pool.0.len() < PIPE_POOL_PER_THREAD
                && budget
                    .pooled
                    .fetch_update(Relaxed, Relaxed, |n| (n < share).then_some(n + 1))
                    .is_ok();
            if room {
                pool.0.push(self);
            }
        });
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe.
    pub(crate) fn fill_from(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into the socket `to`.
    pub(crate) fn drain_into(&self, to: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice only reads and writes kernel objects named by the two descriptors, which the caller
    // keeps open for the duration of the call; the offset pointers are null (both ends are streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget of the test's own, so that tests running side by side do not count each other's pipes
    /// (each test runs on its own thread, and so has its own pool).
    fn budget() -> &'static PipeBudget {
        Box::leak(Box::new(PipeBudget::new()))
    }

    fn take_n(b: &'static PipeBudget, limit: usize, n: usize) -> Vec<Pipe> {
        (0..n)
            .map(|i| match Pipe::take_from(b, limit) {
                Ok(p) => p,
                Err(e) => panic!("pipe {i} of {n} (limit {limit}): {e:?}"),
            })
            .collect()
    }

    #[test]
    fn no_more_than_the_bound_are_open() {
        let b = budget();
        let pipes = take_n(b, 3, 3);
        assert!(matches!(Pipe::take_from(b, 3), Err(NoPipe::Bound)));
        assert_eq!(b.live(), 3);
        // Closing one (it may hold bytes) makes room for one.
        let mut pipes = pipes.into_iter();
        drop(pipes.next());
        assert_eq!(b.live(), 2);
        let again = Pipe::take_from(b, 3).unwrap();
        drop((again, pipes));
        assert_eq!((b.live(), b.pooled()), (0, 0));
        // 0: no pipe at all.
        assert!(matches!(Pipe::take_from(b, 0), Err(NoPipe::Bound)));
        assert_eq!(b.live(), 0);
    }

    #[test]
    fn pooled_pipes_count_and_the_pools_keep_a_quarter_of_the_bound() {
        let b = budget();
        let limit = 8;
        for p in take_n(b, limit, 8) {
            p.give_back(limit);
        }
        // Two kept (a quarter of 8), six closed.
        assert_eq!((b.live(), b.pooled()), (2, 2));
        // Pooled pipes count against the bound: six more may be opened, not eight.
        let mut held = take_n(b, limit, 8);
        assert_eq!((b.live(), b.pooled()), (8, 0));
        assert!(matches!(Pipe::take_from(b, limit), Err(NoPipe::Bound)));
        // Under 4 no pipe is pooled.
        held.drain(..).for_each(|p| p.give_back(3));
        assert_eq!((b.live(), b.pooled()), (0, 0));
    }

    #[test]
    fn a_thread_pools_at_most_its_share() {
        let b = budget();
        let limit = 1000;
        for p in take_n(b, limit, PIPE_POOL_PER_THREAD + 4) {
            p.give_back(limit);
        }
        assert_eq!(
            (b.live(), b.pooled()),
            (PIPE_POOL_PER_THREAD, PIPE_POOL_PER_THREAD)
        );
        // Reuse does not open more.
        let reused = take_n(b, limit, PIPE_POOL_PER_THREAD);
        assert_eq!((b.live(), b.pooled()), (PIPE_POOL_PER_THREAD, 0));
        drop(reused);
        assert_eq!(b.live(), 0);
    }

    #[test]
    fn a_thread_that_ends_closes_its_pool() {
        let b = budget();
        std::thread::spawn(move || {
            for p in take_n(b, 100, 5) {
                p.give_back(100);
            }
            assert_eq!((b.live(), b.pooled()), (5, 5));
        })
        .join()
        .unwrap();
        assert_eq!((b.live(), b.pooled()), (0, 0));
    }

    /// Set in the child process of the test below.
    const EMFILE_CHILD: &str = "ULB_TEST_PIPE_EMFILE_CHILD";

    /// With no descriptor left, `pipe2` fails with EMFILE: the failure is reported as such and the pipe
    /// is not counted. Run in a child process (this test binary again, this test only), because the
    /// open-file limit is the whole process's.
    #[test]
    fn a_failed_pipe2_is_reported_and_not_counted() {
        if std::env::var_os(EMFILE_CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "proxy::pipe::tests::a_failed_pipe2_is_reported_and_not_counted",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(EMFILE_CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "child failed: {text}");
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        let b = budget();
        // A limit a few descriptors above the highest one open.
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(2);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write only the struct passed, which lives on this stack.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = (highest + 9) as libc::rlim_t;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        // Fill every descriptor left under the limit.
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        match Pipe::take_from(b, 100) {
            Err(NoPipe::Failed(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}"),
            Err(NoPipe::Bound) => panic!("not at the bound"),
            Ok(_) => panic!("a pipe with no descriptor left"),
        }
        assert_eq!(b.live(), 0, "a failed pipe2 must not be counted");
        // Two descriptors free: a pipe again.
        assert!(filler.len() >= 2, "{} descriptors filled", filler.len());
        filler.truncate(filler.len() - 2);
        let p = Pipe::take_from(b, 100).unwrap();
        assert_eq!(b.live(), 1);
        drop(p);
        assert_eq!(b.live(), 0);
    }
}
