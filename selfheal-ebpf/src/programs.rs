//! Probe programs. Every entry forwards to a `try_*` function; the entry maps errors to "do
//! nothing". Filtering happens here, in the kernel: only the target's thread groups and
//! sockets produce events, so the ring buffer carries what the daemon needs and no more.
//!
//! Attach points were chosen for cost: a raw tracepoint for process exit (no tracefs, about
//! half a regular tracepoint's cost) and the `sock`/`tcp` tracepoints, which fire on TCP
//! state changes only, never on every syscall of every process.

use core::ptr::read_volatile;

use crate::capture::{wake_flags, CAPTURE_BYTES};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use selfheal_ebpf::{
    kind, sampled_in, stats, tcp_state, ProcessExit, SockInfo, TargetSet, TcpEvent, ROLE_CLIENT,
    ROLE_SERVER,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// Set by the loader from the kernel's BTF; 0 means unknown.
#[no_mangle]
static TASK_EXIT_CODE_OFFSET: u32 = 0;
/// Set by the loader: 1 when `sched_process_exit` has the `group_dead` argument.
#[no_mangle]
static EXIT_HAS_GROUP_DEAD: u32 = 0;

/// Exits and TCP events to the daemon's main reader, which wakes for each (crash detection
/// must not wait). The loader resizes it from the config (`probes.ring_buffer_bytes`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// The payload capture's records to the decoders, which drain it on a timer in a thread of
/// their own: segments and socket operations (`capture.rs`, `segments.rs`), and copies of
/// the opens, closes and exits their connections need in order with their data. The main
/// reader never copies a capture. The loader resizes it (`probes.ring_buffer_bytes` with the
/// capture on, a page without).
#[map]
pub(crate) static CAPTURES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Thread-group ids of the target (key), maintained by the daemon as the target restarts.
#[map]
static TARGET_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// The first thread groups of the target inline, checked before the hash map (see
/// [`TargetSet`]): the capture programs run on every socket operation of every process, and
/// this makes the common "not the target" answer a load and a few compares.
#[map]
static TARGET_SET: Array<TargetSet> = Array::with_max_entries(1, 0);

/// Whether `tgid` belongs to the target. Never 0: the idle task, `current` in interrupt
/// context, would otherwise match the set's empty slots.
#[inline(always)]
pub(crate) fn is_target(tgid: u32) -> bool {
    if tgid == 0 {
        return false;
    }
    let Some(set) = TARGET_SET.get_ptr(0) else {
        return false;
    };
    // SAFETY: a pointer to the array's only slot, valid for the program's run; the daemon
    // rewrites the slot whole, so a torn read can only miss or add a restarting process for
    // one operation.
    let set = unsafe { &*set };
    let mut i = 0;
    while i < set.tgids.len() {
        if set.tgids[i] == tgid {
            return true;
        }
        i += 1;
    }
    set.overflow != 0 && TARGET_TGIDS.get_ptr(tgid).is_some()
}

/// Whether the current task runs in the target's own cgroup (`TargetSet::cgroup`, set while
/// the segment capture is attached there).
#[inline(always)]
pub(crate) fn in_target_cgroup() -> bool {
    let Some(set) = TARGET_SET.get_ptr(0) else {
        return false;
    };
    // SAFETY: as in `is_target`.
    let cgroup = unsafe { (*set).cgroup };
    // SAFETY: a helper without preconditions.
    cgroup != 0 && unsafe { generated::bpf_get_current_cgroup_id() } == cgroup
}

/// Listening ports of the target (port in host order → tgid).
#[map]
static LISTEN_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(256, 0);

/// Sockets of the target being tracked (kernel `struct sock *` → info). LRU, so a target that
/// opens many connections evicts the oldest instead of filling the table.
#[map]
pub(crate) static SOCKETS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(16384, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::LEN, 0);

/// The payload capture's sampling mask (the daemon writes it, see `sampled_in`).
#[map]
static CAPTURE_SAMPLING: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the payload capture sheds the connection whose socket cookie `cookie` gives
/// (`bpf_get_socket_cookie`, asked only while shedding); a shed one is counted.
#[inline(always)]
pub(crate) fn shed(cookie: impl FnOnce() -> u64) -> bool {
    // SAFETY: a pointer to the array's only slot, valid for the program's run.
    let mask = CAPTURE_SAMPLING
        .get_ptr(0)
        .map_or(0, |mask| unsafe { *mask });
    if mask == 0 || sampled_in(cookie(), mask) {
        return false;
    }
    bump(stats::SHED);
    true
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU; no other program
        // instance runs on this CPU while we hold it (BPF programs are not preempted here).
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn emit<T: 'static>(event: &T) {
    if EVENTS.output::<T>(event, 0).is_ok() {
        bump(stats::EVENTS);
    } else {
        bump(stats::DROPS_RINGBUF_FULL);
    }
}

/// Emits an event that also tells the decoders where a connection or a process ends or
/// starts: with the payload capture on, a copy goes to `CAPTURES`, in order with the data,
/// waking them only as a capture does (a quarter of the ring full).
#[inline(always)]
fn emit_ordering<T: 'static>(event: &T) {
    emit(event);
    // SAFETY: a read of a constant the loader may have patched.
    if unsafe { read_volatile(&CAPTURE_BYTES) } != 0
        && CAPTURES.output::<T>(event, wake_flags()).is_err()
    {
        bump(stats::DROPS_CONNECTION_RINGBUF_FULL);
    }
}

#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The current task's tgid when it belongs to the target.
#[inline(always)]
fn current_target_tgid() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    is_target(tgid).then_some(tgid)
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub(crate) fn sched_process_exit(ctx: RawTracePointContext) -> u32 {
    match try_sched_process_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_sched_process_exit(ctx: &RawTracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let pid = pid_tgid as u32;
    if !is_target(tgid) {
        return Ok(());
    }
    // SAFETY: a read of a constant the loader may have patched.
    let has_group_dead = unsafe { read_volatile(&EXIT_HAS_GROUP_DEAD) };
    if has_group_dead != 0 {
        // TP_PROTO(struct task_struct *p, bool group_dead)
        let group_dead: u64 = ctx.arg(1);
        if group_dead & 0xff == 0 {
            return Ok(());
        }
    } else if pid != tgid {
        // Without `group_dead`, the leader's exit stands for the process's.
        return Ok(());
    }
    // SAFETY: as above.
    let offset = unsafe { read_volatile(&TASK_EXIT_CODE_OFFSET) };
    let exit_code = if offset == 0 {
        u32::MAX
    } else {
        let task: u64 = ctx.arg(0);
        let field = (task as usize + offset as usize) as *const i32;
        // SAFETY: `bpf_probe_read_kernel` validates the address; a bad one returns an error.
        match unsafe { bpf_probe_read_kernel(field) } {
            Ok(code) => code as u32,
            Err(_) => u32::MAX,
        }
    };
    let event = ProcessExit {
        kind: kind::PROCESS_EXIT,
        tgid,
        pid,
        exit_code,
        ts_ns: now_ns(),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    emit_ordering(&event);
    Ok(())
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub(crate) fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// Reads a tracepoint field. Offsets are checked against tracefs by the loader.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: usize) -> Result<T, i64> {
    // SAFETY: `read_at` goes through `bpf_probe_read_kernel`, which validates the address.
    unsafe { ctx.read_at::<T>(offset) }.map_err(i64::from)
}

struct Endpoints {
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// Reads ports and addresses from a tracepoint record whose v4 addresses are 4 bytes at
/// `v4_at` (saddr, then daddr) and v6 addresses 16 bytes at `v6_at`.
#[inline(always)]
fn endpoints(
    ctx: &TracePointContext,
    ports_at: usize,
    family_at: usize,
    v4_at: usize,
    v6_at: usize,
) -> Result<Endpoints, i64> {
    let family: u16 = field(ctx, family_at)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = field(ctx, v4_at)?;
        let d: [u8; 4] = field(ctx, v4_at + 4)?;
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        saddr = field(ctx, v6_at)?;
        daddr = field(ctx, v6_at + 16)?;
    }
    Ok(Endpoints {
        family,
        sport: field(ctx, ports_at)?,
        dport: field(ctx, ports_at + 2)?,
        saddr,
        daddr,
    })
}

#[inline(always)]
fn tcp_event(
    skaddr: u64,
    kind: u32,
    info: &SockInfo,
    now: u64,
    ends: &Endpoints,
    old: u32,
    new: u32,
) -> TcpEvent {
    TcpEvent {
        kind,
        tgid: info.tgid,
        ts_ns: now,
        duration_ns: now.saturating_sub(info.start_ns),
        family: ends.family,
        sport: ends.sport,
        dport: ends.dport,
        role: info.role as u16,
        old_state: old,
        new_state: new,
        saddr: ends.saddr,
        daddr: ends.daddr,
        sock: skaddr,
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field(ctx, 30)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let skaddr: u64 = field(ctx, 8)?;
    let old = field::<i32>(ctx, 16)? as u32;
    let new = field::<i32>(ctx, 20)? as u32;
    let now = now_ns();
    match new {
        // connect(2) and listen(2) run in the caller's context, so `current` is the owner.
        tcp_state::SYN_SENT => {
            if let Some(tgid) = current_target_tgid() {
                let info = SockInfo {
                    start_ns: now,
                    tgid,
                    role: u32::from(ROLE_CLIENT),
                };
                if SOCKETS.insert(skaddr, info, 0).is_ok() {
                    bump(stats::SOCKETS_TRACKED);
                }
            }
        }
        tcp_state::LISTEN => {
            if let Some(tgid) = current_target_tgid() {
                let sport: u16 = field(ctx, 24)?;
                LISTEN_PORTS.insert(sport, tgid, 0).map_err(i64::from)?;
            }
        }
        // The handshake completes in softirq context: `current` is anybody, so the socket
        // must already be known (client) or belong to a listening port of the target (server).
        tcp_state::ESTABLISHED if old == tcp_state::SYN_SENT => {
            if let Some(info) = SOCKETS.get_ptr_mut(skaddr) {
                // SAFETY: the pointer is to this map's value; the LRU may evict it only after
                // this program returns.
                let snapshot = unsafe { *info };
                let ends = endpoints(ctx, 24, 28, 32, 40)?;
                emit_ordering(&tcp_event(
                    skaddr,
                    kind::TCP_CONNECT,
                    &snapshot,
                    now,
                    &ends,
                    old,
                    new,
                ));
                // From here on `start_ns` measures the connection's lifetime.
                // SAFETY: as above.
                unsafe { (*info).start_ns = now };
            }
        }
        tcp_state::ESTABLISHED if old == tcp_state::SYN_RECV => {
            let sport: u16 = field(ctx, 24)?;
            if let Some(tgid) = LISTEN_PORTS.get_ptr(sport) {
                // SAFETY: a map value pointer, read once.
                let tgid = unsafe { *tgid };
                let info = SockInfo {
                    start_ns: now,
                    tgid,
                    role: u32::from(ROLE_SERVER),
                };
                if SOCKETS.insert(skaddr, info, 0).is_ok() {
                    bump(stats::SOCKETS_TRACKED);
                }
                let ends = endpoints(ctx, 24, 28, 32, 40)?;
                emit_ordering(&tcp_event(
                    skaddr,
                    kind::TCP_ACCEPT,
                    &info,
                    now,
                    &ends,
                    old,
                    new,
                ));
            }
        }
        tcp_state::CLOSE => {
            if let Some(info) = SOCKETS.get_ptr(skaddr) {
                // SAFETY: a map value pointer, copied before the entry is removed.
                let info = unsafe { *info };
                let kind = if old == tcp_state::SYN_SENT {
                    kind::TCP_CONNECT_FAILED
                } else {
                    kind::TCP_CLOSE
                };
                let ends = endpoints(ctx, 24, 28, 32, 40)?;
                emit_ordering(&tcp_event(skaddr, kind, &info, now, &ends, old, new));
                let _ = SOCKETS.remove(skaddr);
            }
        }
        _ => {}
    }
    Ok(())
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    match try_tcp_receive_reset(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let skaddr: u64 = field(ctx, 8)?;
    if let Some(info) = SOCKETS.get_ptr(skaddr) {
        // SAFETY: a map value pointer, read once.
        let info = unsafe { *info };
        let ends = endpoints(ctx, 16, 20, 22, 30)?;
        emit(&tcp_event(
            skaddr,
            kind::TCP_RESET,
            &info,
            now_ns(),
            &ends,
            0,
            0,
        ));
    }
    Ok(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
