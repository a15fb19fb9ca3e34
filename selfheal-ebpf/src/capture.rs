//! Payload capture: the first bytes of every socket read and write of the target, with the
//! fd, the connection (`struct sock *`), direction, byte count and time.
//!
//! With the segment capture (`segments.rs`) seeing the target's TCP on its cgroup, the same
//! programs capture only its unix sockets (`CAPTURE_UNIX_ONLY`), and of those only the ones
//! connected to PostgreSQL (`UNIX_PEER_LAYOUT`: the peer is bound to
//! `/run/postgresql/.s.PGSQL.5432` or the like), which no cgroup hook sees. The daemon
//! attaches them then only while the target has such a connection (or always, if so
//! configured).
//!
//! Attach points: the BTF tracepoints `sock_recv_length` and `sock_send_length`. They fire
//! only for socket I/O — never for file I/O or any other syscall — and at a moment when
//! received data is already in the target's buffer and sent data is still in it, so one hook
//! per operation suffices. Other processes pay the dispatch and one tgid check per socket
//! operation (a load and a few compares, see `TargetSet`), nothing else. The syscall's arguments (fd, buffer) come from the task's saved
//! registers (`bpf_task_pt_regs`), read at x86_64 `pt_regs` offsets; the loader attaches these
//! programs only on x86_64. Payloads go straight into the ring buffer, capped at
//! `CAPTURE_BYTES`; a full ring buffer drops the event and counts it.
//!
//! Captures go to a ring buffer of their own, `CAPTURES`, which the decoders drain in place on
//! their own thread. A capture does not wake them (a wake-up per socket operation would cost
//! the target an irq_work and the daemon a context switch each): they drain the ring on a
//! short timer, and a capture wakes them only once `WAKEUP_BYTES` are waiting, so a burst
//! cannot overflow the ring between two timer ticks. Process exits and TCP events go to
//! `EVENTS` with the kernel's default (wake a reader that has caught up), so crash detection
//! is not delayed; those that order the captures are copied to `CAPTURES` too.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use selfheal_ebpf::{
    ends_with_postgres_socket, kind, stats, syscall, DataEvent, UnixPeerLayout, DIRECTION_RECV,
    DIRECTION_SEND, MAX_CAPTURE,
};

use crate::programs::{bump, in_target_cgroup, is_target, now_ns, shed, CAPTURES, SOCKETS};

/// Bytes of payload to capture per operation (the loader sets it; at most `MAX_CAPTURE`).
#[no_mangle]
pub(crate) static CAPTURE_BYTES: u32 = 256;

/// Bytes waiting in `CAPTURES` from which a capture wakes the decoders (the loader sets it
/// to a quarter of the ring).
#[no_mangle]
pub(crate) static WAKEUP_BYTES: u64 = 64 * 1024;

/// 1: capture unix sockets only (the loader sets it when the segment capture sees TCP).
#[no_mangle]
static CAPTURE_UNIX_ONLY: u32 = 0;

/// Offset of `skc_family` in `struct sock` (the loader sets it from the kernel's BTF).
#[no_mangle]
static SOCK_FAMILY_OFFSET: u32 = 16;

/// Where a unix socket's peer's path is (the loader sets it from the kernel's BTF; all 0:
/// every unix socket is taken).
#[no_mangle]
static UNIX_PEER_LAYOUT: UnixPeerLayout = UnixPeerLayout {
    peer: 0,
    addr: 0,
    addr_len: 0,
    addr_name: 0,
};

const AF_UNIX: u16 = 1;
const MSG_PEEK: i64 = 2;

// x86_64 `struct pt_regs` offsets: the syscall number and its first two arguments.
const REG_ORIG_AX: usize = 120;
const REG_DI: usize = 112;
const REG_SI: usize = 104;

#[btf_tracepoint(function = "sock_recv_length")]
pub(crate) fn capture_recv(ctx: BtfTracePointContext) -> i32 {
    capture(&ctx, DIRECTION_RECV);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub(crate) fn capture_send(ctx: BtfTracePointContext) -> i32 {
    capture(&ctx, DIRECTION_SEND);
    0
}

/// The kernel's 8 bytes at `base + offset` (a saved register, a pointer field); 0 when
/// unreadable.
#[inline(always)]
fn kernel_u64(base: u64, offset: usize) -> u64 {
    // SAFETY: `bpf_probe_read_kernel` validates the address; a bad one reads as 0.
    unsafe { bpf_probe_read_kernel((base as usize + offset) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn capture(ctx: &BtfTracePointContext, direction: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a read of a constant the loader may have patched.
    let unix_only = unsafe { read_volatile(&CAPTURE_UNIX_ONLY) } != 0;
    // Beside the segment capture, a process of the target's cgroup the daemon has not listed
    // yet (a worker just forked, the target just restarted) is taken too, as its TCP is.
    if !is_target(tgid) && !(unix_only && in_target_cgroup()) {
        return;
    }
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let ret: i64 = ctx.arg(1);
    let ret = ret as i32;
    if ret <= 0 {
        return;
    }
    // A peek leaves the data for the next read, which is captured then.
    let flags: i64 = ctx.arg(2);
    if direction == DIRECTION_RECV && flags & MSG_PEEK != 0 {
        return;
    }
    let sock: u64 = ctx.arg(0);
    if unix_only {
        // SAFETY: a read of a constant the loader may have patched.
        let offset = unsafe { read_volatile(&SOCK_FAMILY_OFFSET) };
        let family = (sock as usize + offset as usize) as *const u16;
        // SAFETY: `bpf_probe_read_kernel` validates the address; a bad one is not captured.
        if unsafe { bpf_probe_read_kernel(family) } != Ok(AF_UNIX) || !peer_is_postgres(sock) {
            return;
        }
    }
    // SAFETY: `sock` is the tracepoint's `struct sock *` argument, which the helper takes.
    if shed(|| unsafe { generated::bpf_get_socket_cookie(sock as *mut _) }) {
        return;
    }
    // SAFETY: helpers without preconditions; `bpf_task_pt_regs` takes the BTF task pointer
    // the first one returns.
    let regs = unsafe { generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) } as u64;
    let nr = kernel_u64(regs, REG_ORIG_AX) as u32;
    let role = SOCKETS.get_ptr(sock).map_or(0, |info| {
        // SAFETY: a map value pointer, read once.
        unsafe { (*info).role }
    });

    let Some(mut entry) = CAPTURES.reserve::<DataEvent>(0) else {
        bump(stats::DROPS_PAYLOAD_RINGBUF_FULL);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer record of the right size; every field
    // is written before it is submitted.
    unsafe {
        (*event).kind = kind::DATA;
        (*event).tgid = tgid;
        (*event).pid = pid_tgid as u32;
        (*event).fd = kernel_u64(regs, REG_DI) as u32;
        (*event).nr = nr;
        (*event).direction = direction;
        (*event).total_len = ret as u64;
        (*event).captured = 0;
        (*event).role = role;
        (*event).sock = sock;
        (*event).ts_ns = now_ns();
    }
    let captured = first_buffer(nr, kernel_u64(regs, REG_SI)).and_then(|(src, len)| {
        // SAFETY: a read of a constant the loader may have patched.
        let cap = u64::from(unsafe { read_volatile(&CAPTURE_BYTES) });
        let mut n = ret as u64;
        if len < n {
            n = len;
        }
        if cap < n {
            n = cap;
        }
        if n > MAX_CAPTURE as u64 {
            n = MAX_CAPTURE as u64;
        }
        // SAFETY: `n` is at most MAX_CAPTURE, the size of `data`; the helper validates `src`.
        let status = unsafe {
            generated::bpf_probe_read_user(
                (*event).data.as_mut_ptr().cast(),
                n as u32,
                src as *const _,
            )
        };
        (status == 0).then_some(n as u32)
    });
    match captured {
        // SAFETY: as above.
        Some(n) => unsafe { (*event).captured = n },
        None => bump(stats::PAYLOAD_READ_FAULTS),
    }
    entry.submit(wake_flags());
    bump(stats::PAYLOAD_EVENTS);
}

/// Whether a unix socket is connected to a PostgreSQL server socket (its peer — the socket
/// the server accepted, which shares its listener's address — is bound to
/// `<dir>/.s.PGSQL.<port>`), or the layout is unknown. The target's other unix sockets (a
/// journald stdout, a local cache) cost it nothing more than this test.
#[inline(always)]
fn peer_is_postgres(sock: u64) -> bool {
    // SAFETY: a read of a constant the loader may have patched.
    let layout = unsafe { read_volatile(&UNIX_PEER_LAYOUT) };
    if layout.peer == 0 {
        return true;
    }
    let peer = kernel_u64(sock, layout.peer as usize);
    if peer == 0 {
        return false;
    }
    let addr = kernel_u64(peer, layout.addr as usize);
    if addr == 0 {
        return false;
    }
    // SAFETY (both reads): `bpf_probe_read_kernel` validates the address; a bad one is not
    // captured.
    let Ok(len) =
        (unsafe { bpf_probe_read_kernel((addr + u64::from(layout.addr_len)) as *const i32) })
    else {
        return false;
    };
    // `len` counts the family (2 bytes), the path and, for a path, its NUL: at most 111.
    if !(12..=111).contains(&len) {
        return false;
    }
    let end = addr + u64::from(layout.addr_name) + len as u64;
    let Ok(tail) = (unsafe { bpf_probe_read_kernel((end - 17) as *const [u8; 17]) }) else {
        return false;
    };
    // The path's last 16 bytes, without its NUL; for a path shorter than that, what precedes
    // it (the family) reads as a directory's `/`, as `unix_peers::is_postgres_path` takes it.
    let shift = usize::from(tail[16] != 0);
    let path_starts = 19 - len.min(19) as usize;
    let mut path = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let at = i + shift;
        path[i] = if at < path_starts {
            b'/'
        } else if shift == 1 {
            tail[i + 1]
        } else {
            tail[i]
        };
        i += 1;
    }
    ends_with_postgres_socket(&path)
}

/// The submit flags of a capture: no wake-up of the decoders unless `WAKEUP_BYTES` are
/// waiting.
#[inline(always)]
pub(crate) fn wake_flags() -> u64 {
    // SAFETY: a read of a constant the loader may have patched.
    let wake_at = unsafe { read_volatile(&WAKEUP_BYTES) };
    let flags = if CAPTURES.query(u64::from(BPF_RB_AVAIL_DATA)) >= wake_at {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    u64::from(flags)
}

/// The user buffer holding the operation's first bytes: the syscall's buffer, or the first
/// `iovec` of a vector or message. `None` for I/O that does not come from these syscalls.
#[inline(always)]
fn first_buffer(nr: u32, arg: u64) -> Option<(u64, u64)> {
    let iov = match nr {
        syscall::READ | syscall::WRITE | syscall::SENDTO | syscall::RECVFROM => {
            return Some((arg, u64::MAX))
        }
        syscall::READV | syscall::WRITEV => arg,
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        // SAFETY: `bpf_probe_read_user` validates the address.
        syscall::SENDMSG | syscall::RECVMSG => {
            unsafe { bpf_probe_read_user((arg + 16) as *const u64) }.ok()?
        }
        _ => return None,
    };
    // struct iovec { void *iov_base; size_t iov_len; }
    // SAFETY: as above.
    let base = unsafe { bpf_probe_read_user(iov as *const u64) }.ok()?;
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.ok()?;
    Some((base, len))
}
