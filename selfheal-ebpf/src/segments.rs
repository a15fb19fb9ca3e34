//! Segment capture on the target's cgroup: `cgroup_skb` programs that the kernel runs only
//! for packets of sockets created in the cgroup they are attached to (the target's own
//! cgroup2 directory). Other processes never run them — the kernel's check is one pointer
//! compare on the socket's cgroup — and unix sockets, pipes and files never reach them.
//!
//! Per packet: the IPv4 or IPv6 header (no extension headers) and the TCP header are read,
//! packets without payload (handshakes, pure ACKs) leave at once, and a segment record with
//! the sequence number, the payload's length and its first `CAPTURE_BYTES` goes to the ring
//! buffer, keyed by the kernel `struct sock *` like the TCP state events. The daemon rebuilds
//! each direction's byte stream from the sequence numbers (`protocols::tcp`).
//!
//! Every path returns 1: a `cgroup_skb` program that returns 0 drops the target's packet.
//! What cannot be parsed is let through and counted; a full ring buffer drops the record,
//! never the packet.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated,
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use selfheal_ebpf::{kind, stats, SegmentEvent, DIRECTION_RECV, DIRECTION_SEND, MAX_CAPTURE};

use crate::{
    capture::{CAPTURE_BYTES, WAKEUP_BYTES},
    programs::{bump, now_ns, EVENTS},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
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

/// Where the TCP header starts and the packet's addresses.
struct Ip {
    family: u16,
    header_len: u32,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// The packet's IP header; `Ok(None)` for a packet that is not TCP (UDP, ICMP, an IPv6
/// extension header, a later fragment), `Err` for one that cannot be read.
#[inline(always)]
fn ip_header(ctx: &SkBuffContext) -> Result<Option<Ip>, ()> {
    // The program sees the packet from its network header on (no link-layer header).
    let first: u8 = ctx.load(0).map_err(drop)?;
    let mut ip = Ip {
        family: 0,
        header_len: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    match first >> 4 {
        4 => {
            let header: [u8; 20] = ctx.load(0).map_err(drop)?;
            // A fragment other than the first carries no TCP header.
            let fragment_offset = (u16::from(header[6] & 0x1f) << 8) | u16::from(header[7]);
            if header[9] != IPPROTO_TCP || fragment_offset != 0 {
                return Ok(None);
            }
            ip.family = AF_INET;
            ip.header_len = u32::from(header[0] & 0x0f) * 4;
            ip.saddr[..4].copy_from_slice(&header[12..16]);
            ip.daddr[..4].copy_from_slice(&header[16..20]);
        }
        6 => {
            let header: [u8; 40] = ctx.load(0).map_err(drop)?;
            // Extension headers are not walked: TCP must be the next header.
            if header[6] != IPPROTO_TCP {
                return Ok(None);
            }
            ip.family = AF_INET6;
            ip.header_len = 40;
            ip.saddr.copy_from_slice(&header[8..24]);
            ip.daddr.copy_from_slice(&header[24..40]);
        }
        _ => return Err(()),
    }
    Ok(Some(ip))
}

#[inline(always)]
fn segment(ctx: &SkBuffContext, direction: u32) {
    let ip = match ip_header(ctx) {
        Ok(Some(ip)) => ip,
        Ok(None) => return,
        Err(()) => {
            bump(stats::SEGMENT_UNPARSED);
            return;
        }
    };
    let Ok(tcp) = ctx.load::<[u8; 16]>(ip.header_len as usize) else {
        bump(stats::SEGMENT_UNPARSED);
        return;
    };
    let payload_at = ip.header_len + u32::from(tcp[12] >> 4) * 4;
    let len = ctx.len();
    if len <= payload_at {
        // A handshake packet or a pure ACK.
        return;
    }
    let payload_len = len - payload_at;
    // SAFETY: a read of the context's `sk` field, which the kernel sets to the socket the
    // packet is filtered for (a full socket of the cgroup; null is possible and kept as 0).
    let sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk } as u64;

    let Some(mut entry) = EVENTS.reserve::<SegmentEvent>(0) else {
        bump(stats::DROPS_SEGMENT_RINGBUF_FULL);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a read of a constant the loader may have patched.
    let cap = unsafe { read_volatile(&CAPTURE_BYTES) };
    let mut n = payload_len;
    if cap < n {
        n = cap;
    }
    let mut captured = 0;
    if n > 0 {
        // `bpf_skb_load_bytes` wants a length the verifier can bound away from 0 and above
        // the record's buffer: this mask gives 1..=MAX_CAPTURE and leaves `n` in it as is.
        let n = ((n - 1) & (MAX_CAPTURE as u32 - 1)) + 1;
        // SAFETY: `event` is a reserved record; `data` holds MAX_CAPTURE bytes and `n` is at
        // most that; the helper checks the packet's bounds.
        let status = unsafe {
            generated::bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                payload_at,
                (*event).data.as_mut_ptr().cast(),
                n,
            )
        };
        if status == 0 {
            captured = n;
        }
    }
    // SAFETY: `event` points to a reserved ring-buffer record of the right size; every field
    // but the uncaptured tail of `data` is written before it is submitted.
    unsafe {
        (*event).kind = kind::SEGMENT;
        (*event).direction = direction;
        (*event).sock = sock;
        (*event).ts_ns = now_ns();
        (*event).seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        (*event).len = payload_len;
        (*event).captured = captured;
        (*event).family = ip.family;
        (*event).tcp_flags = u16::from(tcp[13]);
        (*event).saddr = ip.saddr;
        (*event).daddr = ip.daddr;
        (*event).sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        (*event).dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        (*event)._pad = 0;
    }
    // SAFETY: a read of a constant the loader may have patched.
    let wake_at = unsafe { read_volatile(&WAKEUP_BYTES) };
    let flags = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= wake_at {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
    bump(stats::SEGMENT_EVENTS);
}
