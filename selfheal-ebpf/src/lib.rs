//! Types shared between the kernel-side programs (`src/main.rs`, built for the BPF target) and
//! the daemon. Everything here is `#[repr(C)]`, `Copy`, with explicit-width fields and explicit
//! padding, so both sides agree on the layout byte for byte; a size assertion sits next to each.
//!
//! This crate must stay `no_std` and free of logic: it is the ABI, nothing more.
#![no_std]

/// Names of the maps and programs in the object, used by the loader.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    /// The payload capture's records, with copies of the opens, closes and exits that order
    /// them (read by the decoders, see `CAPTURES` in the programs).
    pub const CAPTURES: &str = "CAPTURES";
    pub const TARGET_TGIDS: &str = "TARGET_TGIDS";
    pub const TARGET_SET: &str = "TARGET_SET";
    pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
    pub const STATS: &str = "STATS";
    /// One `u32`: the sampling mask of the payload capture (see [`super::sampled_in`]).
    pub const CAPTURE_SAMPLING: &str = "CAPTURE_SAMPLING";
    pub const PROG_PROCESS_EXIT: &str = "sched_process_exit";
    pub const PROG_TCP_STATE: &str = "inet_sock_set_state";
    pub const PROG_TCP_RESET: &str = "tcp_receive_reset";
    pub const PROG_CAPTURE_RECV: &str = "capture_recv";
    pub const PROG_CAPTURE_SEND: &str = "capture_send";
    /// The segment capture on the target's cgroup (see `SegmentEvent`).
    pub const PROG_SEGMENT_INGRESS: &str = "segment_ingress";
    pub const PROG_SEGMENT_EGRESS: &str = "segment_egress";
    /// Bytes of payload captured per syscall, at most [`super::MAX_CAPTURE`].
    pub const GLOBAL_CAPTURE_BYTES: &str = "CAPTURE_BYTES";
    /// Bytes waiting in the captures' ring buffer from which a capture wakes the decoders at
    /// once.
    pub const GLOBAL_WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// Offset of `exit_code` in `struct task_struct`, found in the kernel's BTF at load time.
    pub const GLOBAL_TASK_EXIT_CODE_OFFSET: &str = "TASK_EXIT_CODE_OFFSET";
    /// 1 when `sched_process_exit` carries `group_dead` (Linux 6.16+), else 0.
    pub const GLOBAL_EXIT_HAS_GROUP_DEAD: &str = "EXIT_HAS_GROUP_DEAD";
    /// 1 to capture the target's unix-socket I/O only (beside the segment capture, which sees
    /// its TCP), else 0 (every socket of the target).
    pub const GLOBAL_CAPTURE_UNIX_ONLY: &str = "CAPTURE_UNIX_ONLY";
    /// Offset of `skc_family` in `struct sock`, found in the kernel's BTF at load time.
    pub const GLOBAL_SOCK_FAMILY_OFFSET: &str = "SOCK_FAMILY_OFFSET";
    /// Where a unix socket's peer's bound path is (see [`super::UnixPeerLayout`]).
    pub const GLOBAL_UNIX_PEER_LAYOUT: &str = "UNIX_PEER_LAYOUT";
}

/// Field offsets of the tracepoints the programs read, as this build expects them. The loader
/// checks them against tracefs' `format` files and refuses to attach a program whose layout
/// differs, rather than read garbage.
pub mod offsets {
    pub const INET_SOCK_SET_STATE: &[(&str, usize)] = &[
        ("skaddr", 8),
        ("oldstate", 16),
        ("newstate", 20),
        ("sport", 24),
        ("dport", 26),
        ("family", 28),
        ("protocol", 30),
        ("saddr", 32),
        ("daddr", 36),
        ("saddr_v6", 40),
        ("daddr_v6", 56),
    ];
    pub const TCP_RECEIVE_RESET: &[(&str, usize)] = &[
        ("skaddr", 8),
        ("sport", 16),
        ("dport", 18),
        ("family", 20),
        ("saddr", 22),
        ("daddr", 26),
        ("saddr_v6", 30),
        ("daddr_v6", 46),
    ];
}

/// Indices into the per-CPU `STATS` array.
pub mod stats {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPS_RINGBUF_FULL: u32 = 1;
    /// Sockets not tracked because the socket table was full (LRU evicted the oldest instead).
    pub const SOCKETS_TRACKED: u32 = 2;
    /// Payload events lost because the ring buffer was full.
    pub const DROPS_PAYLOAD_RINGBUF_FULL: u32 = 3;
    /// Payload reads from the target's memory that faulted, or socket I/O from a syscall
    /// whose buffer cannot be located (the event is sent without bytes).
    pub const PAYLOAD_READ_FAULTS: u32 = 4;
    /// Payload events written.
    pub const PAYLOAD_EVENTS: u32 = 5;
    /// Segments with payload written by the cgroup programs.
    pub const SEGMENT_EVENTS: u32 = 6;
    /// Segments lost because the ring buffer was full.
    pub const DROPS_SEGMENT_RINGBUF_FULL: u32 = 7;
    /// Packets the cgroup programs could not read (neither IPv4 nor IPv6, or a header load
    /// failed); let through untouched and counted. Packets that are not TCP are not counted.
    pub const SEGMENT_UNPARSED: u32 = 8;
    /// Captures not made because their connection is shed (see [`super::sampled_in`]):
    /// every packet of a shed connection on the cgroup capture (its pure ACKs too: it is shed
    /// before a byte of the packet is read), every socket operation on the syscall capture.
    pub const SHED: u32 = 9;
    /// Opens, closes and exits not copied to the captures' ring buffer because it was full
    /// (the decoders then end such a connection only when it is idle or its process leaves).
    pub const DROPS_CONNECTION_RINGBUF_FULL: u32 = 10;
    pub const LEN: u32 = 11;
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const CLOSE: u32 = 7;
    pub const LISTEN: u32 = 10;
}

/// Discriminant at the start of every ring-buffer record.
pub mod kind {
    pub const PROCESS_EXIT: u32 = 1;
    /// An outbound connect completed (`SYN_SENT` → ESTABLISHED); `duration_ns` is the latency.
    pub const TCP_CONNECT: u32 = 2;
    /// An outbound connect failed (`SYN_SENT` → CLOSE); `duration_ns` is the time it took.
    pub const TCP_CONNECT_FAILED: u32 = 3;
    /// An inbound connection to a listening port of the target was established.
    pub const TCP_ACCEPT: u32 = 4;
    /// A tracked connection closed; `duration_ns` is its lifetime, `old_state` tells how.
    pub const TCP_CLOSE: u32 = 5;
    /// A tracked connection received a reset.
    pub const TCP_RESET: u32 = 6;
    /// Bytes the target read from or wrote to a socket.
    pub const DATA: u32 = 7;
    /// A TCP segment with payload that one of the target's sockets received or sent, seen
    /// by the programs on the target's cgroup.
    pub const SEGMENT: u32 = 8;
}

/// The most payload bytes captured from one syscall.
pub const MAX_CAPTURE: usize = 512;

/// Syscall numbers of the capture programs (`x86_64`).
pub mod syscall {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const CLOSE: u32 = 3;
    pub const READV: u32 = 19;
    pub const WRITEV: u32 = 20;
    pub const CONNECT: u32 = 42;
    pub const ACCEPT: u32 = 43;
    pub const SENDTO: u32 = 44;
    pub const RECVFROM: u32 = 45;
    pub const SENDMSG: u32 = 46;
    pub const RECVMSG: u32 = 47;
    pub const ACCEPT4: u32 = 288;
}

pub const DIRECTION_RECV: u32 = 0;
pub const DIRECTION_SEND: u32 = 1;

/// Bytes moved by one socket read or write of the target, taken when the kernel reports the
/// length (`sock:sock_recv_length` / `sock:sock_send_length`): received data is already in the
/// target's buffer then, and sent data is still there.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub kind: u32,
    pub tgid: u32,
    pub pid: u32,
    /// The fd the syscall used (its first argument).
    pub fd: u32,
    /// The syscall (`syscall::*`); another number for I/O whose buffer cannot be located.
    pub nr: u32,
    /// `DIRECTION_RECV` or `DIRECTION_SEND`.
    pub direction: u32,
    /// The bytes the socket operation really moved.
    pub total_len: u64,
    /// How many of them are in `data` (a prefix).
    pub captured: u32,
    /// `ROLE_CLIENT` or `ROLE_SERVER` when the TCP probe saw the connection open, else 0.
    pub role: u32,
    /// The kernel `struct sock *`: identifies the connection for its lifetime.
    pub sock: u64,
    pub ts_ns: u64,
    pub data: [u8; MAX_CAPTURE],
}
const _: () = assert!(core::mem::size_of::<DataEvent>() == 56 + MAX_CAPTURE);

/// Bytes of [`SegmentEvent::headers`]: an IPv6 header (40) or an IPv4 header without options
/// (20), then the TCP header without options (20).
pub const SEGMENT_HEADERS: usize = 60;

/// One TCP segment with payload on a socket of the target's cgroup (`cgroup_skb` ingress or
/// egress). Per packet, not per syscall: the daemon rebuilds each direction's byte stream
/// from the sequence numbers. The kernel copies the headers as they are and the daemon reads
/// them (addresses, ports, sequence number), which keeps the program short: on egress the
/// packet's source is the socket's local end, on ingress its destination.
///
/// The kernel reserves the smallest of [`SEGMENT_CLASSES`] that holds the captured prefix
/// (`SegmentRecord<N>`): the fields before `data` are the same in every size, and the record's
/// length says how much `data` it has. The ring then holds more records before it drops any
/// (at 256 captured bytes, 360 ring bytes a record instead of 616).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SegmentRecord<const N: usize> {
    pub kind: u32,
    /// `DIRECTION_RECV` (ingress) or `DIRECTION_SEND` (egress).
    pub direction: u32,
    /// The kernel `struct sock *`, the same key as `TcpEvent::sock`.
    pub sock: u64,
    pub ts_ns: u64,
    /// Payload bytes in the segment.
    pub len: u32,
    /// How many of them are in `data` (a prefix).
    pub captured: u32,
    /// The IP header (its first 20 bytes for IPv4, all 40 for IPv6), then the TCP header's
    /// first 20 bytes (at 20 or 40); the IP version is the first nibble.
    pub headers: [u8; SEGMENT_HEADERS],
    pub pad: u32,
    pub data: [u8; N],
}

/// The largest segment record.
pub type SegmentEvent = SegmentRecord<MAX_CAPTURE>;
const _: () = assert!(core::mem::size_of::<SegmentEvent>() == 96 + MAX_CAPTURE);
const _: () = assert!(core::mem::size_of::<SegmentRecord<64>>() == 96 + 64);

/// The sizes of `data` the segment programs reserve, smallest first (powers of two, the last
/// [`MAX_CAPTURE`]).
pub const SEGMENT_CLASSES: [usize; 4] = [64, 128, 256, MAX_CAPTURE];
// The programs bound a copy's length with `& (N - 1)`: powers of two, ascending, up to the
// largest record.
const _: () = {
    let mut i = 0;
    while i < SEGMENT_CLASSES.len() {
        assert!(SEGMENT_CLASSES[i].is_power_of_two());
        assert!(i == 0 || SEGMENT_CLASSES[i - 1] < SEGMENT_CLASSES[i]);
        i += 1;
    }
    assert!(SEGMENT_CLASSES[SEGMENT_CLASSES.len() - 1] == MAX_CAPTURE);
};

/// A process of the target exited (the whole thread group when the kernel says so).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessExit {
    pub kind: u32,
    pub tgid: u32,
    /// Thread id of the task whose exit was seen (the last one of the group).
    pub pid: u32,
    /// `task_struct.exit_code`: a wait(2) status (`signal | core << 7` or `code << 8`);
    /// `u32::MAX` when the offset was unknown.
    pub exit_code: u32,
    pub ts_ns: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ProcessExit>() == 40);

/// A TCP event on a socket of the target.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// 1 when the target is the client (it called connect), 2 when it accepted.
    pub role: u16,
    pub old_state: u32,
    pub new_state: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The kernel `struct sock *`, the same key as `DataEvent::sock`.
    pub sock: u64,
}
const _: () = assert!(core::mem::size_of::<TcpEvent>() == 80);

pub const ROLE_CLIENT: u16 = 1;
pub const ROLE_SERVER: u16 = 2;

/// What the kernel side remembers about a tracked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockInfo {
    pub start_ns: u64,
    pub tgid: u32,
    pub role: u32,
}
const _: () = assert!(core::mem::size_of::<SockInfo>() == 16);

/// How many of the target's thread groups [`TargetSet`] holds inline.
pub const TARGET_SET_LEN: usize = 13;

/// The target's thread-group ids as the hot programs check them: one slot of an array map,
/// which the verifier turns into a direct load, then a few compares — no hashing. Empty slots
/// are 0 (never a user process). When the target has more thread groups than fit, `overflow`
/// is 1 and the programs fall back to the `TARGET_TGIDS` hash map, which always holds all.
/// `cgroup` is the id of the target's own cgroup2 directory while the segment capture is
/// attached there (0 otherwise): the unix-socket capture takes a process of that cgroup the
/// daemon has not listed yet, as the segment capture does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetSet {
    pub cgroup: u64,
    pub overflow: u32,
    pub tgids: [u32; TARGET_SET_LEN],
}
const _: () = assert!(core::mem::size_of::<TargetSet>() == 64);

impl TargetSet {
    /// The set for these thread groups (the first [`TARGET_SET_LEN`], with `overflow` set
    /// when there are more) and this cgroup id.
    pub fn of(members: &[u32], cgroup: u64) -> Self {
        let mut set = Self {
            cgroup,
            ..Self::default()
        };
        for (slot, tgid) in set.tgids.iter_mut().zip(members) {
            *slot = *tgid;
        }
        set.overflow = u32::from(members.len() > TARGET_SET_LEN);
        set
    }
}

/// Where the unix-socket capture finds the path a socket's peer is bound to: byte offsets in
/// the running kernel's `struct unix_sock` (`peer`, `addr`) and `struct unix_address` (`len`,
/// `name`), from its BTF. With them the capture takes only connections to a PostgreSQL
/// server socket (`<dir>/.s.PGSQL.<port>`; an accepted socket shares its listener's address);
/// all 0 (not found) it takes every unix socket of the target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixPeerLayout {
    pub peer: u32,
    pub addr: u32,
    pub addr_len: u32,
    pub addr_name: u32,
}
const _: () = assert!(core::mem::size_of::<UnixPeerLayout>() == 16);

/// Whether the payload capture keeps the connection of the socket with this cookie (the
/// kernel's `bpf_get_socket_cookie`: a counter, unique per socket) when it keeps one
/// connection in `mask + 1` (`mask` is a power of two less one; 0 keeps every connection).
/// The kernel programs decide with it, so a shed connection costs the target only the test;
/// the daemon sets the mask when it falls behind or the host has no CPU to spare. The
/// cookie's bits are mixed first (Fibonacci hashing), so consecutive sockets spread.
// Inlined into the BPF programs, where it runs per packet, like the test below.
#[allow(clippy::inline_always)]
#[inline(always)]
pub fn sampled_in(cookie: u64, mask: u32) -> bool {
    ((cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32) & mask == 0
}

/// Whether `tail`, the last bytes of a bound unix socket path (without its NUL), ends with a
/// PostgreSQL server socket's name: `/.s.PGSQL.` and one to five digits.
#[inline(always)]
pub fn ends_with_postgres_socket(tail: &[u8; 16]) -> bool {
    const NAME: &[u8; 9] = b".s.PGSQL.";
    let mut digits = 1;
    while digits <= 5 {
        let start = 16 - digits - NAME.len();
        let mut ok = tail[start - 1] == b'/';
        let mut i = 0;
        while i < NAME.len() {
            ok &= tail[start + i] == NAME[i];
            i += 1;
        }
        let mut d = 16 - digits;
        while d < 16 {
            ok &= tail[d].is_ascii_digit();
            d += 1;
        }
        if ok {
            return true;
        }
        digits += 1;
    }
    false
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays,
    // and has no implicit padding (the size assertions above pin the layout).
    unsafe impl aya::Pod for super::ProcessExit {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixPeerLayout {}
}
