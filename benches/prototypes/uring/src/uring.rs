//! The io_uring mode: one ring per thread and a small completion-driven state machine.
//!
//! Every step of a connection is an SQE: a multishot accept on the thread's listener; per client a
//! `socket`, then `setsockopt(TCP_NODELAY)` linked to the `connect`; then per direction a `recv` into that
//! direction's half of the connection's buffer, a `send` of what came (again for the rest of a short send),
//! and the next `recv` only once it is all sent; on EOF a `shutdown(SHUT_WR)` on the other socket, or, for
//! the last direction to end, the two `close`s. On an error: `AsyncCancel` of everything still in flight on
//! both sockets, then `setsockopt(SO_LINGER 0)` linked to each `close` (the peers see a reset).
//!
//! The loop gathers SQEs from every completion it reaps and hands them all to one `io_uring_enter`
//! (`submit_and_wait(1)`), which also waits for the next completions.
//!
//! Buffer lifetime: a connection's buffer is owned by its slot in `Worker::conns` and the slot is freed only
//! when `ops`, the count of its SQEs whose CQE has not been reaped, is 0. Every SQE that points into a
//! buffer (recv/send) is counted in `ops` when pushed and uncounted when its CQE is reaped, so no kernel
//! write or read into a buffer can outlive it. The other pointers given to the kernel (the backend address,
//! the option values) are `static`s or live in the `Worker`'s boxed fields, which outlive the ring: the
//! ring is only dropped when `run` returns, and then the `Worker` (and every buffer) is leaked on purpose
//! (`mem::forget`) since requests may still be in flight.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{SockAddr, Socket};

use crate::{Options, Setup};

/// A connection's descriptor: a plain file descriptor or a slot in the ring's registered file table.
#[derive(Clone, Copy, Debug)]
enum Fd {
    Raw(i32),
    Fixed(u32),
}

/// Builds an opcode on either kind of descriptor (they are different types in the `io-uring` crate).
macro_rules! on_fd {
    ($fd:expr, |$t:ident| $body:expr) => {
        match $fd {
            Fd::Raw(n) => {
                let $t = types::Fd(n);
                $body
            }
            Fd::Fixed(i) => {
                let $t = types::Fixed(i);
                $body
            }
        }
    };
}

// What a completion is for: the low 8 bits of its user_data; the slot index is in the rest.
const ACCEPT: u64 = 0;
const SOCKET: u64 = 1;
const NODELAY: u64 = 2;
const CONNECT: u64 = 3;
const RECV: u64 = 4; // + direction (0 up: client → backend, 1 down: backend → client)
const SEND: u64 = 6; // + direction
const SHUT: u64 = 8; // + direction
const CANCEL: u64 = 10;
/// Completions nobody waits for (the closes and their `SO_LINGER`, after the slot was freed).
const IGNORE: u64 = 11;
const RETRY_ACCEPT: u64 = 12;

static ONE: libc::c_int = 1;
static LINGER_0: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};
static RETRY: types::Timespec = types::Timespec::new().nsec(10_000_000);

#[derive(Default)]
struct Dir {
    /// Bytes of the buffer being sent not yet sent: `sent..len` (single recv: this direction's half of
    /// the connection's buffer; multishot: the front of `queue`, whose length is there).
    sent: usize,
    len: usize,
    /// The EOF was read.
    ended: bool,
    /// Its FIN was passed on with `shutdown`.
    fin: bool,
    /// Multishot recv: buffers received and not yet all sent (buffer id, length), in order.
    queue: VecDeque<(u16, u32)>,
    /// Multishot recv: one is in flight.
    armed: bool,
    /// Multishot recv: a cancel was asked for because `queue` is long.
    pausing: bool,
    /// Multishot recv: waiting for buffers (the last one ended with ENOBUFS).
    starving: bool,
    /// Multishot recv: a send of the front of `queue` is in flight.
    sending: bool,
}

impl Dir {
    /// Ended, and every byte read was sent.
    fn drained(&self) -> bool {
        self.ended && !self.sending && self.queue.is_empty()
    }
}

/// Most multishot buffers queued one way before that direction stops reading. The ring is shared by all
/// of the thread's connections: a direction holding many could starve the other direction of the same
/// connection, whose progress its own sends may wait for.
const MAX_QUEUED: usize = 4;

/// The few SQEs one completion leads to, gathered while the connection is borrowed.
#[derive(Default)]
struct Sqes {
    v: [Option<squeue::Entry>; 6],
    n: usize,
}

impl Sqes {
    fn push(&mut self, e: squeue::Entry) {
        // At most 4 are made per completion (cancel, send, two shutdowns): 6 slots never fill.
        if let Some(slot) = self.v.get_mut(self.n) {
            *slot = Some(e);
            self.n += 1;
        }
    }
    fn len(&self) -> usize {
        self.n
    }
    fn take(&mut self) -> impl Iterator<Item = squeue::Entry> + '_ {
        self.v.iter_mut().filter_map(Option::take)
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): `count` buffers of `size` bytes that multishot
/// recvs pick from; each goes back once its bytes are sent.
struct BufRing {
    /// `count` entries of 16 bytes, page-aligned (mmap), shared with the kernel; the tail is the last
    /// two bytes of entry 0.
    ring: *mut types::BufRingEntry,
    mask: u16,
    tail: u16,
    size: usize,
    bufs: Box<[u8]>,
}

impl BufRing {
    fn new(uring: &IoUring, count: u16, size: usize) -> io::Result<Self> {
        let bytes = usize::from(count) * mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is page-aligned, `count` entries long and never unmapped (the `Worker`
        // holding it is leaked, see the module doc), so it stays valid for as long as the ring uses it.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, count, BGID, 0)?;
        }
        let mut b = BufRing {
            ring: ring.cast(),
            mask: count - 1,
            tail: 0,
            size,
            bufs: vec![0u8; usize::from(count) * size].into_boxed_slice(),
        };
        for bid in 0..count {
            b.give(bid);
        }
        Ok(b)
    }

    fn addr(&self, bid: u16) -> *const u8 {
        self.bufs[usize::from(bid) * self.size..].as_ptr()
    }

    /// Hands buffer `bid` (back) to the kernel.
    fn give(&mut self, bid: u16) {
        let addr = self.addr(bid) as u64;
        // SAFETY: `tail & mask` is below `count`, so the entry is inside the mapping; the kernel only
        // reads entries between its head and our tail, and this one is past the tail until the store
        // below publishes it. The tail field is the `resv` of entry 0, which the setters do not touch.
        unsafe {
            let e = &mut *self.ring.add(usize::from(self.tail & self.mask));
            e.set_addr(addr);
            e.set_len(self.size as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }
}

const BGID: u16 = 0;

struct Conn {
    client: Fd,
    backend: Option<Fd>,
    /// Two halves: up (client → backend) then down.
    buf: Box<[u8]>,
    dir: [Dir; 2],
    /// SQEs pushed whose CQE has not been reaped.
    ops: u32,
    /// A failure was seen: cancel what is in flight, then reset both.
    aborting: bool,
    /// The backend connection is established.
    connected: bool,
}

struct Worker {
    ring: IoUring,
    listener: i32,
    direct: bool,
    backend: Box<SockAddr>,
    half: usize,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    pool: Vec<Box<[u8]>>,
    /// `--recv multi`: the provided buffers of this thread's multishot recvs.
    bufs: Option<BufRing>,
    /// Directions whose multishot recv ended for want of buffers, to re-arm once some come back.
    starving: Vec<(u32, u8)>,
    /// Buffers were given back since `starving` was last looked at.
    returned: bool,
}

pub fn run(sock: Socket, o: &Options) -> io::Result<()> {
    let mut b = IoUring::builder();
    match o.setup {
        Setup::Plain => {}
        Setup::Coop => {
            b.setup_single_issuer().setup_coop_taskrun();
        }
        Setup::Defer => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
    }
    b.setup_cqsize(o.entries * 4);
    let ring = b.build(o.entries)?;
    if o.direct {
        // Room for every accepted and backend socket of this thread (the table counts against
        // RLIMIT_NOFILE).
        let slots = (crate::nofile() / 2).clamp(64, 1 << 20) as u32;
        ring.submitter().register_files_sparse(slots)?;
    }
    let bufs = if o.recv_multi {
        Some(BufRing::new(&ring, o.bufs, o.buf)?)
    } else {
        None
    };
    let mut w = Worker {
        ring,
        listener: sock.into_raw_fd(),
        direct: o.direct,
        backend: Box::new(SockAddr::from(o.backend)),
        half: o.buf,
        conns: Vec::new(),
        free: Vec::new(),
        pool: Vec::new(),
        bufs,
        starving: Vec::new(),
        returned: false,
    };
    let r = w.serve();
    // In-flight requests may still point into the buffers: never free them (see the module doc).
    mem::forget(w);
    r
}

fn ud(idx: u32, tag: u64) -> u64 {
    (u64::from(idx) << 8) | tag
}

impl Worker {
    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in an entry pushed here stays valid until its completion is reaped:
            // buffers are owned by a slot that lives while its `ops` count is above 0, and the other
            // pointers are statics or boxed in the `Worker`, which is never freed (see the module doc).
            let pushed = unsafe { self.ring.submission().push(&e) };
            if pushed.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(self.listener))
            .allocate_file_index(self.direct)
            // Direct descriptors are no file descriptors: the kernel refuses SOCK_CLOEXEC for them.
            .flags(if self.direct { 0 } else { libc::SOCK_CLOEXEC })
            .build()
            .user_data(ud(0, ACCEPT));
        self.push(e)
    }

    fn serve(&mut self) -> io::Result<()> {
        self.arm_accept()?;
        let mut batch: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(user, res, flags) in &batch {
                self.complete(user, res, flags)?;
            }
            if self.returned && !self.starving.is_empty() {
                self.feed_starving()?;
            }
            self.returned = false;
        }
    }

    fn complete(&mut self, user: u64, res: i32, flags: u32) -> io::Result<()> {
        let (idx, tag) = ((user >> 8) as u32, user & 0xff);
        match tag {
            ACCEPT => {
                if res >= 0 {
                    let fd = if self.direct {
                        Fd::Fixed(res as u32)
                    } else {
                        Fd::Raw(res)
                    };
                    self.accepted(fd)?;
                }
                if matches!(
                    -res,
                    libc::EINVAL | libc::EBADF | libc::ENOTSOCK | libc::EOPNOTSUPP
                ) {
                    return Err(io::Error::other(format!(
                        "multishot accept: {}",
                        io::Error::from_raw_os_error(-res)
                    )));
                }
                if !cqueue::more(flags) {
                    if res < 0 && res != -libc::ECANCELED {
                        // Out of descriptors or memory: try again after a little while rather than spin.
                        let e = opcode::Timeout::new(&RETRY)
                            .build()
                            .user_data(ud(0, RETRY_ACCEPT));
                        self.push(e)?;
                    } else {
                        self.arm_accept()?;
                    }
                }
                Ok(())
            }
            RETRY_ACCEPT => self.arm_accept(),
            IGNORE => Ok(()),
            _ => self.conn_event(idx, tag, res, flags),
        }
    }

    fn accepted(&mut self, client: Fd) -> io::Result<()> {
        let buf = self
            .pool
            .pop()
            .unwrap_or_else(|| vec![0u8; 2 * self.half].into_boxed_slice());
        let conn = Conn {
            client,
            backend: None,
            buf,
            dir: [Dir::default(), Dir::default()],
            ops: 1,
            aborting: false,
            connected: false,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.conns[i as usize] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        let mut e = opcode::Socket::new(
            self.backend.domain().into(),
            libc::SOCK_STREAM | if self.direct { 0 } else { libc::SOCK_CLOEXEC },
            0,
        );
        if self.direct {
            e = e.file_index(Some(types::DestinationSlot::auto_target()));
        }
        self.push(e.build().user_data(ud(idx, SOCKET)))
    }

    fn conn_event(&mut self, idx: u32, tag: u64, res: i32, flags: u32) -> io::Result<()> {
        let half = self.half;
        let direct = self.direct;
        let multi = self.bufs.is_some();
        let addr_ptr = self.backend.as_ptr();
        let addr_len = self.backend.len();
        let Some(c) = self.conns.get_mut(idx as usize).and_then(Option::as_mut) else {
            return Ok(());
        };
        let is_recv = tag == RECV || tag == RECV + 1;
        // A multishot recv stays in flight while its completions say "more".
        if !(is_recv && cqueue::more(flags)) {
            c.ops -= 1;
        }
        let was_aborting = c.aborting;
        let mut sqes = Sqes::default();
        let mut returned: [Option<u16>; 2] = [None, None];
        if c.aborting {
            // Only waiting for what is in flight to come back; hand back any buffer that came with it.
            if is_recv && multi {
                returned[0] = cqueue::buffer_select(flags);
            }
        } else if tag == CANCEL || tag == NODELAY || tag == SHUT || tag == SHUT + 1 {
            if res < 0 && tag != CANCEL {
                c.aborting = true;
            }
        } else if is_recv && multi {
            let d = (tag - RECV) as usize;
            let dir = &mut c.dir[d];
            if !cqueue::more(flags) {
                dir.armed = false;
            }
            match res {
                n if n > 0 => match cqueue::buffer_select(flags) {
                    Some(bid) => {
                        dir.queue.push_back((bid, n as u32));
                        if dir.queue.len() >= MAX_QUEUED && dir.armed && !dir.pausing {
                            // The far side is slow: stop reading this way until the queue drains.
                            dir.pausing = true;
                            sqes.push(
                                opcode::AsyncCancel::new(ud(idx, tag))
                                    .build()
                                    .user_data(ud(idx, CANCEL)),
                            );
                        }
                        if !dir.sending {
                            sqes.push(send_multi(c, idx, d, self.bufs.as_ref()));
                        }
                    }
                    None => c.aborting = true,
                },
                0 => dir.ended = true,
                e if e == -libc::ENOBUFS => {
                    dir.starving = true;
                    self.starving.push((idx, d as u8));
                }
                e if e == -libc::ECANCELED && dir.pausing => {}
                _ => c.aborting = true,
            }
        } else if res < 0 || (res == 0 && (tag == SEND || tag == SEND + 1)) {
            c.aborting = true;
        } else {
            match tag {
                SOCKET => {
                    let fd = if direct {
                        Fd::Fixed(res as u32)
                    } else {
                        Fd::Raw(res)
                    };
                    c.backend = Some(fd);
                    sqes.push(
                        on_fd!(fd, |t| opcode::SetSockOpt::new(
                            t,
                            libc::IPPROTO_TCP as u32,
                            libc::TCP_NODELAY as u32,
                            (&raw const ONE).cast(),
                            mem::size_of::<libc::c_int>() as u32,
                        )
                        .build())
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(ud(idx, NODELAY)),
                    );
                    sqes.push(
                        on_fd!(fd, |t| opcode::Connect::new(t, addr_ptr.cast(), addr_len)
                            .build())
                        .user_data(ud(idx, CONNECT)),
                    );
                }
                CONNECT => {
                    c.connected = true;
                    for d in 0..2 {
                        sqes.push(recv_sqe(c, idx, d, half, multi));
                    }
                }
                t if t == RECV || t == RECV + 1 => {
                    let d = (t - RECV) as usize;
                    if res == 0 {
                        c.dir[d].ended = true;
                    } else {
                        c.dir[d].sent = 0;
                        c.dir[d].len = res as usize;
                        sqes.push(send_sqe(c, idx, d, half));
                    }
                }
                t if (t == SEND || t == SEND + 1) && multi => {
                    let d = (t - SEND) as usize;
                    let dir = &mut c.dir[d];
                    dir.sent += res as usize;
                    let (bid, len) = dir.queue.front().copied().unwrap_or((0, 0));
                    if dir.sent < len as usize {
                        sqes.push(send_multi(c, idx, d, self.bufs.as_ref()));
                    } else {
                        dir.queue.pop_front();
                        dir.sent = 0;
                        returned[0] = Some(bid);
                        if dir.queue.is_empty() {
                            dir.sending = false;
                        } else {
                            sqes.push(send_multi(c, idx, d, self.bufs.as_ref()));
                        }
                    }
                }
                t if t == SEND || t == SEND + 1 => {
                    let d = (t - SEND) as usize;
                    c.dir[d].sent += res as usize;
                    sqes.push(if c.dir[d].sent < c.dir[d].len {
                        send_sqe(c, idx, d, half)
                    } else {
                        recv_sqe(c, idx, d, half, false)
                    });
                }
                _ => {}
            }
        }
        // Multishot: a direction not reading (its recv ended for want of nothing, was paused, or got
        // buffers back after ENOBUFS) reads again once its queue is short.
        if multi && c.connected && !c.aborting {
            for d in 0..2 {
                let dir = &c.dir[d];
                if !dir.armed && !dir.ended && !dir.starving && dir.queue.len() < MAX_QUEUED {
                    sqes.push(recv_sqe(c, idx, d, half, true));
                }
            }
        }
        // A direction whose EOF was read and whose bytes are all sent passes its FIN on, unless the other
        // direction is done too: then the close sends both.
        if !c.aborting {
            for d in 0..2 {
                if c.dir[d].drained() && !c.dir[d].fin && !c.dir[1 - d].drained() {
                    c.dir[d].fin = true;
                    let to = dest(c, d);
                    sqes.push(
                        on_fd!(to, |t| opcode::Shutdown::new(t, libc::SHUT_WR).build())
                            .user_data(ud(idx, SHUT + d as u64)),
                    );
                }
            }
        }
        c.ops += sqes.len() as u32;
        let (ops, aborting) = (c.ops, c.aborting);
        let both_ended = c.dir[0].drained() && c.dir[1].drained();
        let just_aborted = aborting && !was_aborting && ops > 0;
        for e in sqes.take() {
            self.push(e)?;
        }
        for bid in returned.into_iter().flatten() {
            self.give_back(bid);
        }
        if just_aborted {
            // Cancel whatever else is in flight on either socket; its completions come back as errors.
            self.cancel_all(idx)?;
        }
        if ops == 0 && (aborting || both_ended) {
            self.finish(idx, aborting)?;
        }
        Ok(())
    }

    fn give_back(&mut self, bid: u16) {
        if let Some(b) = self.bufs.as_mut() {
            b.give(bid);
            self.returned = true;
        }
    }

    /// Re-arms the multishot recvs that ran out of buffers.
    fn feed_starving(&mut self) -> io::Result<()> {
        let half = self.half;
        for (idx, d) in mem::take(&mut self.starving) {
            let d = usize::from(d);
            let Some(c) = self.conns.get_mut(idx as usize).and_then(Option::as_mut) else {
                continue;
            };
            let dir = &c.dir[d];
            if c.aborting || !c.connected || !dir.starving || dir.armed || dir.ended {
                continue;
            }
            c.dir[d].starving = false;
            if c.dir[d].queue.len() >= MAX_QUEUED {
                // Its next send completion re-arms it.
                continue;
            }
            c.ops += 1;
            let e = recv_sqe(c, idx, d, half, true);
            self.push(e)?;
        }
        Ok(())
    }

    fn cancel_all(&mut self, idx: u32) -> io::Result<()> {
        let Some(c) = self.conns[idx as usize].as_mut() else {
            return Ok(());
        };
        let fds = [Some(c.client), c.backend];
        let mut es = Vec::with_capacity(2);
        for fd in fds.into_iter().flatten() {
            let b = on_fd!(fd, |t| types::CancelBuilder::fd(t)).all();
            es.push(
                opcode::AsyncCancel2::new(b)
                    .build()
                    .user_data(ud(idx, CANCEL)),
            );
        }
        c.ops += es.len() as u32;
        for e in es {
            self.push(e)?;
        }
        Ok(())
    }

    /// Nothing is in flight: close both (after `SO_LINGER` 0 when aborting) and free the slot.
    fn finish(&mut self, idx: u32, reset: bool) -> io::Result<()> {
        let Some(c) = self.conns[idx as usize].take() else {
            return Ok(());
        };
        self.free.push(idx);
        self.pool.push(c.buf);
        for dir in &c.dir {
            for &(bid, _) in &dir.queue {
                self.give_back(bid);
            }
        }
        for fd in [Some(c.client), c.backend].into_iter().flatten() {
            if reset {
                let e = on_fd!(fd, |t| opcode::SetSockOpt::new(
                    t,
                    libc::SOL_SOCKET as u32,
                    libc::SO_LINGER as u32,
                    (&raw const LINGER_0).cast(),
                    mem::size_of::<libc::linger>() as u32,
                )
                .build())
                .flags(squeue::Flags::IO_LINK)
                .user_data(ud(0, IGNORE));
                self.push(e)?;
            }
            let e = on_fd!(fd, |t| opcode::Close::new(t).build()).user_data(ud(0, IGNORE));
            self.push(e)?;
        }
        Ok(())
    }
}

/// The socket bytes of direction `d` are written to.
fn dest(c: &Conn, d: usize) -> Fd {
    if d == 0 {
        // `backend` is set before any recv is posted.
        c.backend.unwrap_or(c.client)
    } else {
        c.client
    }
}

fn src(c: &Conn, d: usize) -> Fd {
    if d == 0 {
        c.client
    } else {
        c.backend.unwrap_or(c.client)
    }
}

/// The next recv of direction `d`: into its half of the connection's buffer, or (`multi`) a multishot
/// recv that picks provided buffers.
fn recv_sqe(c: &mut Conn, idx: u32, d: usize, half: usize, multi: bool) -> squeue::Entry {
    let e = if multi {
        c.dir[d].armed = true;
        c.dir[d].pausing = false;
        on_fd!(src(c, d), |t| opcode::RecvMulti::new(t, BGID).build())
    } else {
        let ptr = c.buf[d * half..].as_mut_ptr();
        on_fd!(src(c, d), |t| opcode::Recv::new(t, ptr, half as u32)
            .build())
    };
    e.user_data(ud(idx, RECV + d as u64))
}

/// Sends the rest of the front buffer of direction `d`'s queue (multishot recv).
fn send_multi(c: &mut Conn, idx: u32, d: usize, bufs: Option<&BufRing>) -> squeue::Entry {
    let dir = &mut c.dir[d];
    dir.sending = true;
    let (bid, len) = dir.queue.front().copied().unwrap_or((0, 0));
    let sent = dir.sent;
    let ptr = bufs
        .map_or(std::ptr::null(), |b| b.addr(bid))
        .wrapping_add(sent);
    on_fd!(dest(c, d), |t| opcode::Send::new(t, ptr, len - sent as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build())
    .user_data(ud(idx, SEND + d as u64))
}

fn send_sqe(c: &mut Conn, idx: u32, d: usize, half: usize) -> squeue::Entry {
    let Dir { sent, len, .. } = c.dir[d];
    let ptr = c.buf[d * half + sent..].as_ptr();
    on_fd!(dest(c, d), |t| opcode::Send::new(
        t,
        ptr,
        (len - sent) as u32
    )
    .flags(libc::MSG_NOSIGNAL)
    .build())
    .user_data(ud(idx, SEND + d as u64))
}
