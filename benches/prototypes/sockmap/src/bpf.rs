//! Just enough eBPF for the forwarder, without a BPF compiler: an instruction builder with named
//! opcodes, the verdict program built with it, and the bpf(2) calls that create maps, load and attach
//! the program and put sockets in the map (through `libc`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

// ---------------------------------------------------------------------------------------------------
// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).

/// Instruction classes.
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
/// Access sizes.
const BPF_W: u8 = 0x00;
const BPF_DW: u8 = 0x18;
/// Modes.
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;
/// Operand sources.
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
/// ALU operations.
const BPF_ADD: u8 = 0x00;
const BPF_MOV: u8 = 0xb0;
/// Jumps.
const BPF_JEQ: u8 = 0x10;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
/// `src_reg` of a 64-bit immediate load that names a map by its fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// Helper functions (their numbers in `__BPF_FUNC_MAPPER`).
pub const FN_MAP_LOOKUP_ELEM: i32 = 1;
pub const FN_KTIME_GET_NS: i32 = 5;
pub const FN_GET_SOCKET_COOKIE: i32 = 46;
pub const FN_SK_REDIRECT_MAP: i32 = 52;

/// sk_skb verdicts.
pub const SK_DROP: i32 = 0;
pub const SK_PASS: i32 = 1;

/// Registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 kept across calls, r10 frame
/// pointer (read-only).
#[derive(Clone, Copy)]
pub struct Reg(u8);
pub const R0: Reg = Reg(0);
pub const R1: Reg = Reg(1);
pub const R2: Reg = Reg(2);
pub const R3: Reg = Reg(3);
pub const R4: Reg = Reg(4);
pub const R6: Reg = Reg(6);
pub const R7: Reg = Reg(7);
pub const R8: Reg = Reg(8);
pub const R10: Reg = Reg(10);

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst.0 | (src.0 << 4),
        off,
        imm,
    }
}

/// Builds a program; jumps name labels, resolved by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn push(&mut self, i: Insn) -> &mut Self {
        self.insns.push(i);
        self
    }
    /// `dst = src`
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0))
    }
    /// `dst = imm`
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, R0, 0, imm))
    }
    /// `dst += imm`
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(BPF_ALU64 | BPF_ADD | BPF_K, dst, R0, 0, imm))
    }
    /// `dst = *(u32 *)(src + off)`
    pub fn load32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(insn(BPF_LDX | BPF_MEM | BPF_W, dst, src, off, 0))
    }
    /// `dst = *(u64 *)(src + off)`
    pub fn load64(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(insn(BPF_LDX | BPF_MEM | BPF_DW, dst, src, off, 0))
    }
    /// `*(u32 *)(dst + off) = src`
    pub fn store32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(insn(BPF_STX | BPF_MEM | BPF_W, dst, src, off, 0))
    }
    /// `*(u64 *)(dst + off) = src`
    pub fn store64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(insn(BPF_STX | BPF_MEM | BPF_DW, dst, src, off, 0))
    }
    /// `lock *(u64 *)(dst + off) += src`
    pub fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(insn(
            BPF_STX | BPF_ATOMIC | BPF_DW,
            dst,
            src,
            off,
            BPF_ADD as i32,
        ))
    }
    /// `dst = &map` (a 64-bit immediate: two instructions).
    pub fn load_map(&mut self, dst: Reg, map: &Map) -> &mut Self {
        let fd = map.fd.as_raw_fd();
        self.push(insn(
            BPF_LD | BPF_DW | BPF_IMM,
            dst,
            Reg(BPF_PSEUDO_MAP_FD),
            0,
            fd,
        ));
        self.push(Insn::default())
    }
    /// `call helper`
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(insn(BPF_JMP | BPF_CALL, R0, R0, 0, helper))
    }
    /// `if dst == imm goto label`
    pub fn jeq_imm(&mut self, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(insn(BPF_JMP | BPF_JEQ | BPF_K, dst, R0, 0, imm))
    }
    /// `if dst != src goto label`
    pub fn jne(&mut self, dst: Reg, src: Reg, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(insn(BPF_JMP | BPF_JNE | BPF_X, dst, src, 0, 0))
    }
    pub fn exit(&mut self) -> &mut Self {
        self.push(insn(BPF_JMP | BPF_EXIT, R0, R0, 0, 0))
    }
    /// Names the next instruction.
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }
    pub fn finish(mut self) -> io::Result<Vec<Insn>> {
        for &(at, name) in &self.fixups {
            let target = *self.labels.get(name).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no label {name}"))
            })?;
            // A jump's offset counts from the instruction after it.
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        Ok(self.insns)
    }
}

// ---------------------------------------------------------------------------------------------------
// The state of one socket, shared by the program and user space (an mmap-able array map).

/// One socket's slot in the state array. The program reads `peer`, `ready`, `forwarded` and writes
/// `passed`, `redirected`, `last_ns`; user space writes `peer`, `ready`, `forwarded` and reads the rest.
#[repr(C)]
pub struct SlotState {
    /// The peer socket's index in the sockmap.
    pub peer: AtomicU32,
    /// Set by user space once both sockets are in the sockmap: redirecting is allowed from then on.
    pub ready: AtomicU32,
    /// Bytes of this socket the program passed to its own receive queue (for user space to forward).
    pub passed: AtomicU64,
    /// Bytes of this socket user space has read and completely written into the peer.
    pub forwarded: AtomicU64,
    /// Bytes of this socket the program redirected to the peer's egress.
    pub redirected: AtomicU64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the program last saw bytes from this socket.
    pub last_ns: AtomicU64,
    _pad: [u64; 3],
}

const OFF_PEER: i16 = 0;
const OFF_READY: i16 = 4;
const OFF_PASSED: i16 = 8;
const OFF_FORWARDED: i16 = 16;
const OFF_REDIRECTED: i16 = 24;
const OFF_LAST_NS: i16 = 32;
const _: () = assert!(std::mem::size_of::<SlotState>() == 64);
const _: () = assert!(std::mem::offset_of!(SlotState, ready) == OFF_READY as usize);
const _: () = assert!(std::mem::offset_of!(SlotState, passed) == OFF_PASSED as usize);
const _: () = assert!(std::mem::offset_of!(SlotState, forwarded) == OFF_FORWARDED as usize);
const _: () = assert!(std::mem::offset_of!(SlotState, redirected) == OFF_REDIRECTED as usize);
const _: () = assert!(std::mem::offset_of!(SlotState, last_ns) == OFF_LAST_NS as usize);
const _: () = assert!(std::mem::offset_of!(SlotState, peer) == OFF_PEER as usize);

/// `offsetof(struct __sk_buff, len)`
const SKB_LEN: i16 = 0;

/// The verdict program, for each skb of a socket in the sockmap:
///
/// ```text
/// if skb.len == 0: return SK_DROP               (a bare FIN: see below)
/// slot  = slots[bpf_get_socket_cookie(skb)]     (absent: SK_PASS, not counted: not ours)
/// st    = &state[slot]
/// st.last_ns = bpf_ktime_get_ns()
/// if st.ready && st.passed == st.forwarded:      every byte before this skb is in the peer already
///     st.redirected += skb.len
///     return bpf_sk_redirect_map(skb, socks, st.peer, 0)    (0: to the peer's egress)
/// st.passed += skb.len
/// return SK_PASS                                 (to this socket's own queue: user space forwards it)
/// ```
///
/// The program runs for one socket's skbs one at a time, in order (under the socket's lock), and
/// `forwarded` never passes `passed`; so once it redirects, it redirects every later skb.
///
/// A FIN without data reaches the verdict as an skb of length 0 (`tcp_read_skb` hands every queued
/// skb over). Redirected, it would reach the peer's backlog, whose `skb_send_sock` sends 0 bytes, which
/// `sk_psock_backlog` takes for a hard error: it sets EPIPE on the peer socket and stops its
/// transmission. Dropped, it costs nothing: the FIN is already recorded in the socket's state
/// (RCV_SHUTDOWN), where user space reads it as EOF.
pub fn verdict_program(slots: &Map, state: &Map, socks: &Map) -> io::Result<Vec<Insn>> {
    let mut a = Asm::default();
    a.mov(R6, R1) // r6 = skb
        .load32(R2, R1, SKB_LEN)
        .jeq_imm(R2, 0, "drop")
        .call(FN_GET_SOCKET_COOKIE)
        .store64(R10, -8, R0)
        .load_map(R1, slots)
        .mov(R2, R10)
        .add_imm(R2, -8)
        .call(FN_MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, "pass_uncounted")
        .load32(R1, R0, 0) // the slot
        .store32(R10, -12, R1)
        .load_map(R1, state)
        .mov(R2, R10)
        .add_imm(R2, -12)
        .call(FN_MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, "pass_uncounted")
        .mov(R7, R0) // r7 = &state[slot]
        .load32(R8, R6, SKB_LEN) // r8 = skb->len
        .call(FN_KTIME_GET_NS)
        .store64(R7, OFF_LAST_NS, R0)
        .load32(R1, R7, OFF_READY)
        .jeq_imm(R1, 0, "pass")
        .load64(R1, R7, OFF_PASSED)
        .load64(R2, R7, OFF_FORWARDED)
        .jne(R1, R2, "pass")
        .atomic_add64(R7, OFF_REDIRECTED, R8)
        .mov(R1, R6)
        .load_map(R2, socks)
        .load32(R3, R7, OFF_PEER)
        .mov_imm(R4, 0)
        .call(FN_SK_REDIRECT_MAP)
        .exit()
        .label("pass")
        .atomic_add64(R7, OFF_PASSED, R8)
        .label("pass_uncounted")
        .mov_imm(R0, SK_PASS)
        .exit()
        .label("drop")
        .mov_imm(R0, SK_DROP)
        .exit();
    a.finish()
}

/// The stream parser for the strparser variant: every skb is one whole message (`return skb->len`).
pub fn parser_program() -> io::Result<Vec<Insn>> {
    let mut a = Asm::default();
    a.load32(R0, R1, SKB_LEN).exit();
    a.finish()
}

// ---------------------------------------------------------------------------------------------------
// bpf(2)

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

pub const MAP_TYPE_HASH: u32 = 1;
pub const MAP_TYPE_ARRAY: u32 = 2;
pub const MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_F_MMAPABLE: u32 = 1 << 10;
const PROG_TYPE_SK_SKB: u32 = 14;
pub const ATTACH_SK_SKB_STREAM_PARSER: u32 = 4;
pub const ATTACH_SK_SKB_STREAM_VERDICT: u32 = 5;
pub const ATTACH_SK_SKB_VERDICT: u32 = 38;

/// `union bpf_attr`, as bytes: each command fills the fields it uses at their offsets.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Self {
        Attr([0; 144])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(&mut self, off: usize, name: &str) -> &mut Self {
        let n = name.len().min(15);
        self.0[off..off + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `union bpf_attr` of the size passed, which lives across the
    // call; the pointers inside it (set by the callers) point at live buffers of the sizes given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// A BPF map; it goes away with its last fd (this one, and the program's reference while it lives).
pub struct Map {
    fd: OwnedFd,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl Map {
    pub fn create(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
        mmapable: bool,
    ) -> io::Result<Map> {
        let mut a = Attr::new();
        a.u32(0, map_type)
            .u32(4, key_size)
            .u32(8, value_size)
            .u32(12, max_entries)
            .u32(16, if mmapable { BPF_F_MMAPABLE } else { 0 })
            .name(28, name);
        let fd = bpf(BPF_MAP_CREATE, &mut a)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_MAP_CREATE {name}: {e}")))?;
        Ok(Map {
            fd: owned(fd),
            key_size,
            value_size,
            max_entries,
        })
    }

    pub fn update<K, V>(&self, key: &K, value: &V) -> io::Result<()> {
        assert_eq!(std::mem::size_of::<K>(), self.key_size as usize);
        assert_eq!(std::mem::size_of::<V>(), self.value_size as usize);
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key as *const K as u64)
            .u64(16, value as *const V as u64)
            .u64(24, 0); // BPF_ANY
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
    }

    pub fn delete<K>(&self, key: &K) -> io::Result<()> {
        assert_eq!(std::mem::size_of::<K>(), self.key_size as usize);
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key as *const K as u64);
        bpf(BPF_MAP_DELETE_ELEM, &mut a).map(drop)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The state array mapped into this process: `SlotState`s shared with the program.
pub struct StateArray {
    _map: Map,
    base: NonNull<SlotState>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory of atomics; every access goes through `&SlotState`, whose
// fields are atomics, so sharing it between threads is sound.
unsafe impl Send for StateArray {}
// SAFETY: as above.
unsafe impl Sync for StateArray {}

impl StateArray {
    pub fn create(entries: u32) -> io::Result<StateArray> {
        let map = Map::create(
            MAP_TYPE_ARRAY,
            4,
            std::mem::size_of::<SlotState>() as u32,
            entries,
            "fwd_state",
            true,
        )?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (entries as usize * std::mem::size_of::<SlotState>()).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd (an mmap-able array of `bytes` bytes); no existing
        // memory is touched; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p as *mut SlotState).ok_or_else(io::Error::last_os_error)?;
        Ok(StateArray {
            len: map.max_entries as usize,
            _map: map,
            base,
            bytes,
        })
    }

    pub fn map(&self) -> &Map {
        &self._map
    }

    pub fn get(&self, slot: u32) -> &SlotState {
        assert!((slot as usize) < self.len);
        // SAFETY: `slot` is in bounds (checked), the mapping lives as long as `self`, is aligned to a page
        // and holds `len` `SlotState`s of 64 bytes each; all fields are atomics, so shared access is fine.
        unsafe { &*self.base.as_ptr().add(slot as usize) }
    }
}

impl Drop for StateArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `create`; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr() as *mut c_void, self.bytes);
        }
    }
}

/// A loaded program; it goes away with its last fd (this one, and the map's reference while attached).
pub struct Prog {
    fd: OwnedFd,
}

impl Prog {
    /// Loads an sk_skb program; on failure the verifier's log is in the error.
    pub fn load_sk_skb(insns: &[Insn], name: &str, expected_attach: u32) -> io::Result<Prog> {
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut a = Attr::new();
        a.u32(0, PROG_TYPE_SK_SKB)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1) // log_level
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64)
            .name(48, name)
            .u32(68, expected_attach);
        match bpf(BPF_PROG_LOAD, &mut a) {
            Ok(fd) => Ok(Prog { fd: owned(fd) }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                Err(io::Error::new(
                    e.kind(),
                    format!(
                        "BPF_PROG_LOAD {name}: {e}; verifier log:\n{}",
                        String::from_utf8_lossy(&log[..end])
                    ),
                ))
            }
        }
    }

    /// Attaches this program to a sockmap: every socket in it runs the program.
    pub fn attach(&self, map: &Map, attach_type: u32) -> io::Result<()> {
        let mut a = Attr::new();
        a.u32(0, map.fd() as u32)
            .u32(4, self.fd.as_raw_fd() as u32)
            .u32(8, attach_type);
        bpf(BPF_PROG_ATTACH, &mut a)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_PROG_ATTACH {attach_type}: {e}")))
    }
}
