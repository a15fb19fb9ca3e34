//! Segment capture on the target's cgroup: `cgroup_skb` programs that the kernel runs only
//! for packets of sockets created in the cgroup they are attached to (the target's own
//! cgroup2 directory). Other processes never run them — the kernel's check is one pointer
//! compare on the socket's cgroup — and unix sockets, pipes and files never reach them.
//!
//! Per packet: while the daemon sheds load, a packet of a shed connection (by its socket
//! cookie, see `selfheal_ebpf::sampled_in`) leaves first, counted, before any byte of it is
//! read. Then the IPv4 or IPv6 header (no extension headers) and the TCP header are read,
//! packets without payload (handshakes, pure ACKs) leave at once, and a segment record with
//! the sequence number, the payload's length and its first `CAPTURE_BYTES` goes to the
//! captures' ring buffer (in the smallest of the record sizes that holds them, see
//! `SegmentRecord`), keyed by the kernel `struct sock *` like the TCP state events. The
//! daemon rebuilds each direction's byte stream from the sequence numbers (`protocols::tcp`).
//!
//! Every path returns 1: a `cgroup_skb` program that returns 0 drops the target's packet.
//! What cannot be parsed is let through and counted; a full ring buffer drops the record,
//! never the packet.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP, helpers::generated, macros::cgroup_skb, programs::SkBuffContext,
};
use selfheal_ebpf::{kind, stats, SegmentRecord, DIRECTION_RECV, DIRECTION_SEND, SEGMENT_CLASSES};

use crate::{
    capture::{wake_flags, CAPTURE_BYTES},
    programs::{bump, now_ns, shed, CAPTURES},
};

const IPPROTO_TCP: u8 = 6;
/// Let the packet through (0 would drop it).
const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub(crate) fn segment_ingress(ctx: SkBuffContext) -> i32 {
    segment(&ctx, DIRECTION_RECV);
    PASS
}

#[cgroup_skb(egress)]
pub(crate) fn segment_egress(ctx: SkBuffContext) -> i32 {
    segment(&ctx, DIRECTION_SEND);
    PASS
}

/// Copies `N` bytes of the packet at `offset` to `to` (a record in the ring buffer).
#[inline(always)]
fn copy<const N: u32>(ctx: &SkBuffContext, offset: u32, to: *mut u8) -> bool {
    // SAFETY: `to` points to at least `N` writable bytes (the caller's record field); the
    // helper checks the packet's bounds.
    unsafe { generated::bpf_skb_load_bytes(ctx.skb.skb.cast(), offset, to.cast(), N) == 0 }
}

#[inline(always)]
fn segment(ctx: &SkBuffContext, direction: u32) {
    // A shed connection costs the target this test alone: no byte of the packet is read.
    // SAFETY: a helper that takes the program's own context.
    if shed(|| unsafe { generated::bpf_get_socket_cookie(ctx.skb.skb.cast()) }) {
        return;
    }
    // The program sees the packet from its network header on (no link-layer header). Only
    // what decides whether the packet carries payload is read before a record is reserved:
    // a handshake packet or a pure ACK leaves after two small loads.
    let Ok(ip) = ctx.load::<[u8; 10]>(0) else {
        bump(stats::SEGMENT_UNPARSED);
        return;
    };
    let (ip_len, copied_ip) = match ip[0] >> 4 {
        4 => {
            // A fragment other than the first carries no TCP header.
            if ip[9] != IPPROTO_TCP || (ip[6] & 0x1f) != 0 || ip[7] != 0 {
                return;
            }
            (u32::from(ip[0] & 0x0f) * 4, 20)
        }
        // Extension headers are not walked: TCP must be the next header.
        6 if ip[6] == IPPROTO_TCP => (40, 40),
        6 => return,
        _ => {
            bump(stats::SEGMENT_UNPARSED);
            return;
        }
    };
    let Ok(data_offset) = ctx.load::<u8>(ip_len as usize + 12) else {
        bump(stats::SEGMENT_UNPARSED);
        return;
    };
    let payload_at = ip_len + u32::from(data_offset >> 4) * 4;
    let len = ctx.len();
    if len <= payload_at {
        return;
    }
    let payload_len = len - payload_at;
    // SAFETY: a read of the context's `sk` field, which the kernel sets to the socket the
    // packet is filtered for (a full socket of the cgroup; null is possible and kept as 0).
    let sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk } as u64;

    // SAFETY: a read of a constant the loader may have patched.
    let cap = unsafe { read_volatile(&CAPTURE_BYTES) };
    let mut n = payload_len;
    if cap < n {
        n = cap;
    }
    let segment = Segment {
        direction,
        sock,
        payload_len,
        payload_at,
        ip_len,
        ipv4: copied_ip == 20,
    };
    // The smallest record that holds the prefix (see `SegmentRecord`).
    if n <= SEGMENT_CLASSES[0] as u32 {
        record::<{ SEGMENT_CLASSES[0] }>(ctx, &segment, n);
    } else if n <= SEGMENT_CLASSES[1] as u32 {
        record::<{ SEGMENT_CLASSES[1] }>(ctx, &segment, n);
    } else if n <= SEGMENT_CLASSES[2] as u32 {
        record::<{ SEGMENT_CLASSES[2] }>(ctx, &segment, n);
    } else {
        record::<{ SEGMENT_CLASSES[3] }>(ctx, &segment, n);
    }
}

/// What [`segment`] found in a packet with payload.
struct Segment {
    direction: u32,
    sock: u64,
    payload_len: u32,
    payload_at: u32,
    ip_len: u32,
    ipv4: bool,
}

/// Sends the segment with the first `n` (1..=N) bytes of its payload in a record of `N`.
#[inline(always)]
fn record<const N: usize>(ctx: &SkBuffContext, segment: &Segment, n: u32) {
    let Some(mut entry) = CAPTURES.reserve::<SegmentRecord<N>>(0) else {
        bump(stats::DROPS_SEGMENT_RINGBUF_FULL);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved record; `headers` holds 60 bytes: 20 or 40 of IP
    // header at 0, 20 of TCP header after them.
    let headers = unsafe { (*event).headers.as_mut_ptr() };
    let ip_len = segment.ip_len;
    let headers_copied = if segment.ipv4 {
        // SAFETY: as above.
        copy::<20>(ctx, 0, headers) && copy::<20>(ctx, ip_len, unsafe { headers.add(20) })
    } else {
        // SAFETY: as above.
        copy::<40>(ctx, 0, headers) && copy::<20>(ctx, ip_len, unsafe { headers.add(40) })
    };
    if !headers_copied {
        entry.discard(u64::from(BPF_RB_NO_WAKEUP));
        bump(stats::SEGMENT_UNPARSED);
        return;
    }
    // `bpf_skb_load_bytes` wants a length the verifier can bound away from 0 and above the
    // record's buffer: this mask gives 1..=N and leaves `n` (1..=N) as it is. The volatile
    // read keeps the compiler, which knows `n`'s range on this path, from dropping the mask.
    // SAFETY: a read of a local.
    let n = unsafe { read_volatile(&n) };
    let n = ((n.wrapping_sub(1)) & (N as u32 - 1)) + 1;
    // SAFETY: `data` holds N bytes and `n` is at most that; the helper checks the packet's
    // bounds.
    let status = unsafe {
        generated::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            segment.payload_at,
            (*event).data.as_mut_ptr().cast(),
            n,
        )
    };
    let captured = if status == 0 { n } else { 0 };
    // SAFETY: `event` points to a reserved ring-buffer record of the right size; every field
    // but the uncaptured tail of `data` is written before it is submitted.
    unsafe {
        (*event).kind = kind::SEGMENT;
        (*event).direction = segment.direction;
        (*event).sock = segment.sock;
        (*event).ts_ns = now_ns();
        (*event).len = segment.payload_len;
        (*event).captured = captured;
        (*event).pad = 0;
    }
    entry.submit(wake_flags());
    bump(stats::SEGMENT_EVENTS);
}
