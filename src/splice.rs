//! Linux zero-copy forwarding: `splice(2)` from one socket into a pipe and from the pipe into the other
//! socket, so that the bytes never enter user space.
//!
//! Pipes are borrowed from a per-thread pool only while data is in flight and given back empty, like the
//! buffers of the pooled path; an idle connection holds none. A pipe that still holds bytes (its connection
//! failed mid-way) is closed rather than pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes moved per `splice` call: the default pipe capacity (16 pages).
pub(crate) const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Pipes kept per thread; more are closed when given back.
const POOL_PER_THREAD: usize = 64;

impl Pipe {
    /// A pipe from this thread's pool, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the array we pass, which lives on this stack.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Gives an *empty* pipe back to this thread's pool.
    pub(crate) fn give_back(self) {
        PIPES.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_PER_THREAD {
                pool.push(self);
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
