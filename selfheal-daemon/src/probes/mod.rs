//! Probes: what the daemon observes. eBPF programs in the kernel (process exits, TCP state of
//! the target's sockets, socket payloads) and OS readers (procfs, cgroupfs, host), all
//! publishing on the bus or handing over to the decoders.
//!
//! Must not: block on the kernel side, or grow without bound on the user side.

pub mod capture;
pub mod cgroup;
pub mod ebpf;
pub mod os;
pub mod segments;
pub mod shedding;
pub mod socket_ops;
pub mod unix_peers;
