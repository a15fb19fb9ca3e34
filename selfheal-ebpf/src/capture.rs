//! Payload capture: the first bytes of every read/write-family syscall the target makes on a
//! socket, with the fd, direction, byte count and timestamps.
//!
//! Attach points: the `sys_enter`/`sys_exit` raw tracepoints. The first thing each program
//! does is the tgid lookup, so other processes pay one map lookup per syscall and nothing
//! else. Only fds in the socket table produce events: sockets the target connects or accepts
//! (seen here) and those it had before the daemon started (seeded from procfs by the loader),
//! removed again on close. Payloads are copied straight into the ring buffer, capped at
//! `CAPTURE_BYTES`; a full ring buffer drops the event and counts it.
//!
//! Syscall arguments are read from `struct pt_regs` at x86_64 offsets; the loader only
//! attaches these programs on x86_64.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::{map, raw_tracepoint},
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use selfheal_ebpf::{
    kind, socket_key, stats, syscall, ActiveSyscall, DataEvent, SocketEvent, DIRECTION_RECV,
    DIRECTION_SEND, MAX_CAPTURE, ROLE_CLIENT, ROLE_SERVER, SOCKET_CLOSED, SOCKET_OPENED,
};

use crate::programs::{bump, now_ns, EVENTS, TARGET_TGIDS};

/// Bytes of payload to capture per syscall (the loader sets it; at most `MAX_CAPTURE`).
#[no_mangle]
static CAPTURE_BYTES: u32 = 256;

/// Socket fds of the target: `tgid << 32 | fd` → role.
#[map]
static SOCKET_FDS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Syscalls of the target between enter and exit, by thread (`pid_tgid`).
#[map]
static ACTIVE: LruHashMap<u64, ActiveSyscall> = LruHashMap::with_max_entries(4096, 0);

// x86_64 `struct pt_regs` offsets of the first three syscall arguments.
const REG_DI: usize = 112;
const REG_SI: usize = 104;

#[inline(always)]
fn reg(regs: u64, offset: usize) -> u64 {
    // SAFETY: `bpf_probe_read_kernel` validates the address; a bad one reads as 0.
    unsafe { bpf_probe_read_kernel((regs as usize + offset) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn socket_event(tgid: u32, fd: u32, what: u32, role: u32) {
    let event = SocketEvent {
        kind: kind::SOCKET,
        tgid,
        fd,
        what,
        role,
        pad: 0,
        ts_ns: now_ns(),
    };
    if EVENTS.output::<SocketEvent>(&event, 0).is_ok() {
        bump(stats::EVENTS);
    } else {
        bump(stats::DROPS_RINGBUF_FULL);
    }
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub(crate) fn capture_sys_enter(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if TARGET_TGIDS.get_ptr(tgid).is_none() {
        return 0;
    }
    let nr: u64 = ctx.arg(1);
    let regs: u64 = ctx.arg(0);
    let nr = nr as u32;
    match nr {
        syscall::READ
        | syscall::WRITE
        | syscall::READV
        | syscall::WRITEV
        | syscall::SENDTO
        | syscall::RECVFROM
        | syscall::SENDMSG
        | syscall::RECVMSG => {
            let fd = reg(regs, REG_DI) as u32;
            let Some(role) = SOCKET_FDS.get_ptr(socket_key(tgid, fd)) else {
                return 0;
            };
            // SAFETY: a map value pointer, read once.
            let role = unsafe { *role };
            let active = ActiveSyscall {
                enter_ns: now_ns(),
                buf: reg(regs, REG_SI),
                fd,
                nr,
                role,
                pad: 0,
            };
            let _ = ACTIVE.insert(pid_tgid, active, 0);
        }
        syscall::CONNECT => {
            let fd = reg(regs, REG_DI) as u32;
            let role = u32::from(ROLE_CLIENT);
            if SOCKET_FDS.insert(socket_key(tgid, fd), role, 0).is_ok() {
                socket_event(tgid, fd, SOCKET_OPENED, role);
            }
        }
        syscall::ACCEPT | syscall::ACCEPT4 => {
            let active = ActiveSyscall {
                enter_ns: now_ns(),
                buf: 0,
                fd: 0,
                nr,
                role: u32::from(ROLE_SERVER),
                pad: 0,
            };
            let _ = ACTIVE.insert(pid_tgid, active, 0);
        }
        syscall::CLOSE => {
            let fd = reg(regs, REG_DI) as u32;
            let key = socket_key(tgid, fd);
            if let Some(role) = SOCKET_FDS.get_ptr(key) {
                // SAFETY: a map value pointer, read once before the entry is removed.
                let role = unsafe { *role };
                let _ = SOCKET_FDS.remove(key);
                socket_event(tgid, fd, SOCKET_CLOSED, role);
            }
        }
        _ => {}
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub(crate) fn capture_sys_exit(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if TARGET_TGIDS.get_ptr(tgid).is_none() {
        return 0;
    }
    let Some(active) = ACTIVE.get_ptr(pid_tgid) else {
        return 0;
    };
    // SAFETY: a map value pointer, copied before the entry is removed.
    let active = unsafe { *active };
    let _ = ACTIVE.remove(pid_tgid);
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    match active.nr {
        syscall::ACCEPT | syscall::ACCEPT4 => {
            let fd = ret as u32;
            if SOCKET_FDS
                .insert(socket_key(tgid, fd), active.role, 0)
                .is_ok()
            {
                socket_event(tgid, fd, SOCKET_OPENED, active.role);
            }
        }
        _ if ret > 0 => data_event(tgid, pid_tgid as u32, &active, ret as u64),
        _ => {}
    }
    0
}

/// The user buffer holding the syscall's first bytes: the buffer itself, or the first
/// `iovec` of a vector or message.
#[inline(always)]
fn first_buffer(active: &ActiveSyscall) -> Option<(u64, u64)> {
    let iov = match active.nr {
        syscall::READ | syscall::WRITE | syscall::SENDTO | syscall::RECVFROM => {
            return Some((active.buf, u64::MAX))
        }
        syscall::READV | syscall::WRITEV => active.buf,
        // struct msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
        // SAFETY: `bpf_probe_read_user` validates the address.
        _ => unsafe { bpf_probe_read_user((active.buf + 16) as *const u64) }.ok()?,
    };
    // struct iovec { void *iov_base; size_t iov_len; }
    // SAFETY: as above.
    let base = unsafe { bpf_probe_read_user(iov as *const u64) }.ok()?;
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.ok()?;
    Some((base, len))
}

#[inline(always)]
fn data_event(tgid: u32, pid: u32, active: &ActiveSyscall, total: u64) {
    let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
        bump(stats::DROPS_PAYLOAD_RINGBUF_FULL);
        return;
    };
    let event = entry.as_mut_ptr();
    let direction = match active.nr {
        syscall::WRITE | syscall::WRITEV | syscall::SENDTO | syscall::SENDMSG => DIRECTION_SEND,
        _ => DIRECTION_RECV,
    };
    // SAFETY: `event` points to a reserved ring-buffer record of the right size; every field
    // is written before it is submitted.
    unsafe {
        (*event).kind = kind::DATA;
        (*event).tgid = tgid;
        (*event).pid = pid;
        (*event).fd = active.fd;
        (*event).nr = active.nr;
        (*event).direction = direction;
        (*event).total_len = total;
        (*event).captured = 0;
        (*event).role = active.role;
        (*event).enter_ns = active.enter_ns;
        (*event).exit_ns = now_ns();
    }
    if let Some((src, len)) = first_buffer(active) {
        // SAFETY: a read of a constant the loader may have patched.
        let cap = u64::from(unsafe { read_volatile(&CAPTURE_BYTES) });
        let mut n = total;
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
        let ok = unsafe {
            generated::bpf_probe_read_user(
                (*event).data.as_mut_ptr().cast(),
                n as u32,
                src as *const _,
            )
        } == 0;
        if ok {
            // SAFETY: as above.
            unsafe { (*event).captured = n as u32 };
        } else {
            bump(stats::PAYLOAD_READ_FAULTS);
        }
    }
    entry.submit(0);
    bump(stats::PAYLOAD_EVENTS);
}
