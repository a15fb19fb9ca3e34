//! The eBPF probes: load the embedded object, attach what the kernel accepts, keep the
//! kernel-side filter maps in step with the target, and drain the ring buffer of exits and TCP
//! events. The payload capture's records go to a ring of their own (`CAPTURES`), which the
//! decoders' thread reads in place ([`CaptureFeed`], `capture::run`): this reader never
//! copies a capture, and only sets how many connections the kernel captures ([`Sampling`]).
//!
//! Every program attaches on its own: one that fails is logged with the reason and reported
//! as `selfheal_ebpf_probe_attached{probe} 0`, and the daemon carries on (the target tracker's
//! pidfd and the procfs sampler cover process exits and resources without eBPF). Nothing here
//! blocks the kernel side: a full ring buffer drops events in the kernel and counts them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    num::NonZeroUsize,
    os::fd::AsFd,
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use selfheal_ebpf::{
    kind, names, offsets, stats, tcp_state, DataEvent, ProcessExit, SegmentEvent, TargetSet,
    TcpEvent, UnixPeerLayout, DIRECTION_SEND, ROLE_CLIENT,
};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

use super::{
    capture::{process_sockets, Capture, Direction, Endpoints, Role},
    segments::{self, SegmentCapture},
    shedding::{QueueSide, Shedding},
    socket_ops::{self, UnixCapture},
};
use crate::{
    bus::{Bus, Event, ExitStatus, TcpSummary},
    config::{CaptureMode, ProbesConfig, UnixSockets},
    target::{monotonic_ns, KernelExit},
    telemetry::{HowLabel, Metrics, ProbeLabel, ProgramLabel, ReasonLabel},
};

/// The object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/selfheal"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF object is empty (built with AYA_BUILD_SKIP?)")]
    EmptyObject,
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("cannot use map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no eBPF probe could be attached")]
    NothingAttached,
    #[error("cannot poll the ring buffer")]
    Poll(#[source] std::io::Error),
}

/// Where tracefs is, mounting it when it is not (tracepoints need it; raw tracepoints do not).
pub fn tracefs() -> Option<PathBuf> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Some(PathBuf::from(dir));
        }
    }
    let dir = Path::new("/sys/kernel/tracing");
    match nix::mount::mount(
        Some("tracefs"),
        dir,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => {
            tracing::info!(path = %dir.display(), "mounted tracefs");
            Some(dir.to_owned())
        }
        Err(err) => {
            tracing::warn!(error = %err, "tracefs is not mounted and cannot be mounted");
            None
        }
    }
}

/// Field offsets from a tracefs `format` file.
pub fn parse_format(text: &str) -> BTreeMap<String, usize> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let field = line.strip_prefix("field:")?;
            let (decl, rest) = field.split_once(';')?;
            let name = decl
                .split_whitespace()
                .last()?
                .split('[')
                .next()?
                .to_owned();
            let offset = rest
                .trim()
                .strip_prefix("offset:")?
                .split(';')
                .next()?
                .parse()
                .ok()?;
            Some((name, offset))
        })
        .collect()
}

/// Checks that a tracepoint's layout is the one the program was written for.
fn check_layout(
    tracefs: &Path,
    category: &str,
    name: &str,
    expected: &[(&str, usize)],
) -> Result<(), String> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let actual = parse_format(&text);
    for (field, offset) in expected {
        match actual.get(*field) {
            Some(found) if found == offset => {}
            Some(found) => {
                return Err(format!(
                    "{category}:{name} field {field} is at offset {found}, expected {offset}"
                ))
            }
            None => return Err(format!("{category}:{name} has no field {field}")),
        }
    }
    Ok(())
}

/// Byte offset of `member` in the running kernel's `struct name`, from its BTF.
fn member_offset(name: &str, member: &str) -> Result<u32, String> {
    member_offsets(&[(name, member)]).map(|offsets| offsets[0])
}

/// Byte offsets of each `(struct, member)`, from one read of the running kernel's BTF.
fn member_offsets(wanted: &[(&str, &str)]) -> Result<Vec<u32>, String> {
    let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux")
        .map_err(|e| format!("cannot read kernel BTF: {e}"))?;
    let offset = |name: &str, member: &str| {
        let types = btf
            .resolve_types_by_name(name)
            .map_err(|e| format!("no {name} in BTF: {e}"))?;
        for ty in types {
            if let btf_rs::Type::Struct(st) = ty {
                for m in &st.members {
                    if btf.resolve_name(m).is_ok_and(|n| n == member) {
                        return Ok(m.bit_offset() / 8);
                    }
                }
            }
        }
        Err(format!("{name} has no {member} member"))
    };
    wanted
        .iter()
        .map(|(name, member)| offset(name, member))
        .collect()
}

/// Where the unix-socket capture finds a socket's peer's path, from the kernel's BTF; all 0
/// (every unix socket of the target is taken) when it is not there, which the log says.
fn unix_peer_layout() -> UnixPeerLayout {
    let found = member_offsets(&[
        ("unix_sock", "peer"),
        ("unix_sock", "addr"),
        ("unix_address", "len"),
        ("unix_address", "name"),
    ]);
    match found.as_deref() {
        Ok(&[peer, addr, addr_len, addr_name]) if peer != 0 => UnixPeerLayout {
            peer,
            addr,
            addr_len,
            addr_name,
        },
        other => {
            let reason = match other {
                Err(reason) => reason.clone(),
                Ok(_) => "unix_sock.peer at offset 0".to_owned(),
            };
            tracing::warn!(
                %reason,
                "cannot find a unix socket's peer in the kernel's BTF: the unix-socket capture \
                 takes every unix socket of the target, not only its connections to PostgreSQL"
            );
            UnixPeerLayout::default()
        }
    }
}

/// The loaded object with the maps userspace uses.
pub struct Loaded {
    /// Keeps the programs attached; dropping it detaches them.
    ebpf: Ebpf,
    /// Whether the segment capture is loaded, to attach to the target's cgroup.
    segments: bool,
    /// With the segment capture: the unix-socket capture's mode, and whether its programs
    /// are loaded.
    unix: Option<(UnixSockets, bool)>,
    /// Whether the syscall capture (`probes.capture = "syscalls"`) is attached.
    syscalls: bool,
    ring: RingBuf<MapData>,
    /// With the payload capture on: its records, for the decoders (taken by
    /// [`Loaded::take_capture_feed`]).
    feed: Option<CaptureFeed>,
    /// With the payload capture on: how full the decoders' ring is, for the sampling (`None`
    /// also when it cannot be mapped).
    fill: Option<RingFill>,
    /// Whether the payload capture is on (`probes.payload_bytes` > 0).
    capture_on: bool,
    /// Shared with the feed (see [`CaptureFeed::readmissions`]).
    readmissions: Arc<AtomicU64>,
    filters: Filters,
    stats: PerCpuArray<MapData, u64>,
    /// The capture's sampling mask (see `selfheal_ebpf::sampled_in`).
    sampling: Array<MapData, u32>,
}

/// The kernel-side filter maps that say which processes and ports are the target's.
struct Filters {
    targets: BpfHashMap<MapData, u32, u32>,
    target_set: Array<MapData, TargetSet>,
    listen_ports: BpfHashMap<MapData, u16, u32>,
    /// What `target_set` holds: the members, sorted, and the cgroup id.
    set: (Vec<u32>, u64),
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::MissingMap { name })
}

/// Loads the object and attaches each probe that the kernel accepts.
pub fn load(config: &ProbesConfig, metrics: &Metrics) -> Result<Loaded, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::EmptyObject);
    }
    let exit_code_offset = member_offset("task_struct", "exit_code").unwrap_or_else(|reason| {
        tracing::warn!(%reason, "exit codes will be reported as unknown");
        0
    });
    let segment_capture = config.payload_bytes > 0 && config.capture == CaptureMode::Cgroup;
    // Beside the segment capture, the socket-operation programs capture unix sockets only,
    // which needs `struct sock`'s family field.
    let unix_capture = (segment_capture && config.unix_sockets != UnixSockets::Off).then(|| {
        member_offset("sock_common", "skc_family").map_err(|reason| {
            format!("cannot find a socket's address family in the kernel's BTF: {reason}")
        })
    });
    let tracefs = tracefs();
    let has_group_dead = tracefs.as_deref().is_some_and(|dir| {
        check_layout(dir, "sched", "sched_process_exit", &[("group_dead", 32)]).is_ok()
    });
    let mut ebpf = EbpfLoader::new()
        .override_global(names::GLOBAL_TASK_EXIT_CODE_OFFSET, &exit_code_offset, true)
        .override_global(
            names::GLOBAL_EXIT_HAS_GROUP_DEAD,
            &u32::from(has_group_dead),
            true,
        )
        .override_global(names::GLOBAL_CAPTURE_BYTES, &config.payload_bytes, true)
        .override_global(
            names::GLOBAL_CAPTURE_UNIX_ONLY,
            &u32::from(segment_capture),
            true,
        )
        .override_global(
            names::GLOBAL_SOCK_FAMILY_OFFSET,
            unix_capture
                .as_ref()
                .and_then(|offset| offset.as_ref().ok())
                .unwrap_or(&16),
            true,
        )
        .override_global(
            names::GLOBAL_UNIX_PEER_LAYOUT,
            &if matches!(unix_capture, Some(Ok(_))) {
                unix_peer_layout()
            } else {
                UnixPeerLayout::default()
            },
            true,
        )
        .override_global(
            names::GLOBAL_WAKEUP_BYTES,
            &u64::from(config.ring_buffer_bytes / 4),
            true,
        )
        .map_max_entries(names::EVENTS, config.ring_buffer_bytes)
        // Without the capture nothing is written there: the least a ring can be, one page.
        .map_max_entries(
            names::CAPTURES,
            if config.payload_bytes > 0 {
                config.ring_buffer_bytes
            } else {
                page_size() as u32
            },
        )
        .load(OBJECT)
        .map_err(EbpfError::Load)?;

    let mut attached = 0;
    let mut report = |probe: &'static str, result: Result<(), String>| {
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                tracing::info!(probe, "eBPF probe attached");
                attached += 1;
            }
            Err(reason) => {
                tracing::warn!(probe, %reason, "eBPF probe not attached; falling back to procfs");
            }
        }
        metrics
            .ebpf_probe_attached
            .get_or_create(&ProbeLabel { probe })
            .set(i64::from(ok));
    };

    report(
        "process_exit",
        attach(
            &mut ebpf,
            names::PROG_PROCESS_EXIT,
            |p: &mut RawTracePoint| {
                p.load()?;
                p.attach("sched_process_exit").map(drop)
            },
        ),
    );
    let tcp = tracefs
        .as_deref()
        .ok_or_else(|| "tracefs is not available".to_owned())
        .and_then(|dir| {
            check_layout(
                dir,
                "sock",
                "inet_sock_set_state",
                offsets::INET_SOCK_SET_STATE,
            )?;
            attach(&mut ebpf, names::PROG_TCP_STATE, |p: &mut TracePoint| {
                p.load()?;
                p.attach("sock", "inet_sock_set_state").map(drop)
            })
        });
    report("tcp_state", tcp);
    let reset = tracefs
        .as_deref()
        .ok_or_else(|| "tracefs is not available".to_owned())
        .and_then(|dir| {
            check_layout(dir, "tcp", "tcp_receive_reset", offsets::TCP_RECEIVE_RESET)?;
            attach(&mut ebpf, names::PROG_TCP_RESET, |p: &mut TracePoint| {
                p.load()?;
                p.attach("tcp", "tcp_receive_reset").map(drop)
            })
        });
    report("tcp_reset", reset);
    let mut segments = false;
    let mut unix = None;
    let mut syscalls = false;
    if segment_capture {
        // Attached to the target's cgroup by the reader, once it knows where the target is.
        match segments::load(&mut ebpf) {
            Ok(()) => {
                segments = true;
                // Not attached until the target is found in a cgroup of its own.
                segments::export(metrics, false);
            }
            Err(reason) => report("payload_capture", Err(reason)),
        }
        // Attached by the reader as `probes.unix_sockets` says; counted even when off.
        let loaded = unix_capture.map(|offset| offset.and_then(|_| socket_ops::load(&mut ebpf)));
        if let Some(Err(reason)) = &loaded {
            tracing::warn!(
                %reason,
                "the target's unix sockets cannot be captured: its connections to PostgreSQL \
                 over one are only counted"
            );
        }
        unix = Some((config.unix_sockets, matches!(loaded, Some(Ok(())))));
    } else if config.payload_bytes > 0 {
        let capture =
            socket_ops::load(&mut ebpf).and_then(|()| socket_ops::attach(&mut ebpf).map(drop));
        let on = capture.is_ok();
        syscalls = on;
        report("payload_capture", capture);
        metrics.set_capture_mode(if on { "syscalls" } else { "none" });
    } else {
        metrics.set_capture_mode("none");
    }
    if attached == 0 && !segments {
        return Err(EbpfError::NothingAttached);
    }

    let map_err = |name| move |source| EbpfError::Map { name, source };
    let ring =
        RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?).map_err(map_err(names::EVENTS))?;
    let targets = BpfHashMap::try_from(take_map(&mut ebpf, names::TARGET_TGIDS)?)
        .map_err(map_err(names::TARGET_TGIDS))?;
    let target_set = Array::try_from(take_map(&mut ebpf, names::TARGET_SET)?)
        .map_err(map_err(names::TARGET_SET))?;
    let listen_ports = BpfHashMap::try_from(take_map(&mut ebpf, names::LISTEN_PORTS)?)
        .map_err(map_err(names::LISTEN_PORTS))?;
    let stats =
        PerCpuArray::try_from(take_map(&mut ebpf, names::STATS)?).map_err(map_err(names::STATS))?;
    let sampling = Array::try_from(take_map(&mut ebpf, names::CAPTURE_SAMPLING)?)
        .map_err(map_err(names::CAPTURE_SAMPLING))?;
    let readmissions = Arc::new(AtomicU64::new(0));
    let (feed, fill) = if config.payload_bytes > 0 {
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::CAPTURES)?)
            .map_err(map_err(names::CAPTURES))?;
        // Without it the capture sheds only for the host's load, never for its decoders'.
        let fill = RingFill::new(&ring, config.ring_buffer_bytes)
            .map_err(|err| {
                tracing::warn!(error = %err, "cannot read how full the capture's ring buffer is: the capture sheds connections only when the host has no CPU to spare");
            })
            .ok();
        let feed = CaptureFeed {
            ring,
            readmissions: readmissions.clone(),
        };
        (Some(feed), fill)
    } else {
        (None, None)
    };
    Ok(Loaded {
        ebpf,
        segments,
        unix,
        syscalls,
        ring,
        feed,
        fill,
        capture_on: config.payload_bytes > 0,
        readmissions,
        filters: Filters {
            targets,
            target_set,
            listen_ports,
            set: (Vec::new(), 0),
        },
        stats,
        sampling,
    })
}

/// Program `name` of the object, as a `P` (a `CgroupSkb`, a `BtfTracePoint`…).
pub(super) fn program<'e, P>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut P, String>
where
    for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no program {name} in the object"))?
        .try_into()
        .map_err(|e| format!("{name}: {e}"))
}

/// Finds program `name` as a `P` and loads and attaches it with `load_and_attach`.
fn attach<P>(
    ebpf: &mut Ebpf,
    name: &str,
    load_and_attach: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), String>
where
    for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    load_and_attach(program(ebpf, name)?).map_err(|e| format!("{name}: {e}"))
}

/// A decoded ring-buffer record.
#[derive(Debug, Clone)]
pub enum Record {
    Exit(ProcessExit),
    Tcp(TcpEvent),
    /// A socket read or write, or a socket opened or closed.
    Capture(Capture),
}

/// Decodes one record; `None` for a truncated or unknown one. A capture's `captured` range
/// points into `bytes`: its payload is read where it lies, never copied.
pub fn decode(bytes: &[u8]) -> Option<Record> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        kind::PROCESS_EXIT if bytes.len() >= size_of::<ProcessExit>() => {
            // SAFETY: the length was checked, `read_unaligned` has no alignment requirement and
            // `ProcessExit` is plain old data, valid for any bit pattern.
            Some(Record::Exit(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
        kind::TCP_CONNECT..=kind::TCP_RESET if bytes.len() >= size_of::<TcpEvent>() => {
            // SAFETY: as above, for `TcpEvent`.
            Some(Record::Tcp(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast())
            }))
        }
        kind::DATA if bytes.len() >= size_of::<DataEvent>() - selfheal_ebpf::MAX_CAPTURE => {
            let header = size_of::<DataEvent>() - selfheal_ebpf::MAX_CAPTURE;
            let (u32_at, u64_at) = (|at| ne_u32(bytes, at), |at| ne_u64(bytes, at));
            // Field offsets of `DataEvent` (`#[repr(C)]`, no padding).
            let captured = (u32_at(32)? as usize).min(selfheal_ebpf::MAX_CAPTURE);
            bytes.get(header..header + captured)?;
            let (tgid, fd, sock, role, direction_raw, total_len, ts_ns) = (
                u32_at(4)?,
                u32_at(12)?,
                u64_at(40)?,
                u32_at(36)?,
                u32_at(20)?,
                u64_at(24)?,
                u64_at(48)?,
            );
            Some(Record::Capture(Capture::Data {
                tgid,
                fd,
                sock,
                role: Role::from_raw(role),
                direction: if direction_raw == DIRECTION_SEND {
                    Direction::Sent
                } else {
                    Direction::Received
                },
                total_len,
                captured: header..header + captured,
                ts_ns,
            }))
        }
        kind::SEGMENT if bytes.len() >= size_of::<SegmentEvent>() - selfheal_ebpf::MAX_CAPTURE => {
            Some(Record::Capture(decode_segment(bytes)?))
        }
        _ => None,
    }
}

/// The native-endian integer at `at` of a record, `None` past its end.
fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
}

fn ne_u64(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
}

/// A `SegmentEvent`'s fields, with its headers read.
fn decode_segment(bytes: &[u8]) -> Option<Capture> {
    const HEADERS_AT: usize = 32;
    let header = size_of::<SegmentEvent>() - selfheal_ebpf::MAX_CAPTURE;
    let (u32_at, u64_at) = (|at| ne_u32(bytes, at), |at| ne_u64(bytes, at));
    // Field offsets of `SegmentEvent` (`#[repr(C)]`, no padding).
    let (direction_raw, sock, ts_ns, len) = (u32_at(4)?, u64_at(8)?, u64_at(16)?, u32_at(24)?);
    // Records come in several sizes (`SegmentRecord`): the capture ends with the record.
    let captured = (u32_at(28)? as usize)
        .min(selfheal_ebpf::MAX_CAPTURE)
        .min(bytes.len().saturating_sub(header))
        .min(len as usize);
    let headers = bytes.get(HEADERS_AT..HEADERS_AT + selfheal_ebpf::SEGMENT_HEADERS)?;
    // The IP header's addresses (network order, IPv4 in the first 4 bytes) and where the TCP
    // header starts.
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let (family, tcp) = match headers[0] >> 4 {
        4 => {
            saddr[..4].copy_from_slice(&headers[12..16]);
            daddr[..4].copy_from_slice(&headers[16..20]);
            (AF_INET, &headers[20..40])
        }
        6 => {
            saddr.copy_from_slice(&headers[8..24]);
            daddr.copy_from_slice(&headers[24..40]);
            (AF_INET6, &headers[40..60])
        }
        _ => return None,
    };
    let be16 = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let (sport, dport) = (be16(0), be16(2));
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    bytes.get(header..header + captured)?;
    let (direction, endpoints) = if direction_raw == DIRECTION_SEND {
        (
            Direction::Sent,
            Endpoints::from_raw(family, saddr, sport, daddr, dport),
        )
    } else {
        (
            Direction::Received,
            Endpoints::from_raw(family, daddr, dport, saddr, sport),
        )
    };
    Some(Capture::Segment {
        sock,
        direction,
        seq,
        total_len: len,
        captured: header..header + captured,
        endpoints,
        ts_ns,
    })
}

/// `AF_INET` and `AF_INET6`, as `Endpoints::from_raw` takes them.
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Exports each program's run count and time, as the kernel keeps them while
/// `kernel.bpf_stats_enabled` is 1 (off by default: the accounting itself costs a little on
/// every run). `seen` holds the totals exported so far.
fn export_program_stats(ebpf: &Ebpf, metrics: &Metrics, seen: &mut HashMap<String, (u64, u64)>) {
    for (name, program) in ebpf.programs() {
        let Ok(info) = program.info() else { continue };
        let (count, ns) = (
            info.run_count(),
            u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        );
        let last = seen.entry(name.to_owned()).or_default();
        let label = ProgramLabel {
            program: name.to_owned(),
        };
        if count > last.0 {
            metrics
                .ebpf_program_runs
                .get_or_create(&label)
                .inc_by(count - last.0);
        }
        if ns > last.1 {
            metrics
                .ebpf_program_run_seconds
                .get_or_create(&label)
                .inc_by((ns - last.1) as f64 * 1e-9);
        }
        *last = (count.max(last.0), ns.max(last.1));
    }
}

/// Running totals between two interval reports.
#[derive(Default)]
struct Window {
    /// Per program: (runs, nanoseconds) exported so far.
    programs: HashMap<String, (u64, u64)>,
    summary: TcpSummary,
    /// The kernel's `STATS` at the last report.
    seen: [u64; stats::LEN as usize],
}

impl Filters {
    /// The id of the target's own cgroup (0: none), for the unix-socket capture.
    fn set_cgroup(&mut self, cgroup: u64) {
        if cgroup != self.set.1 {
            self.write_set(self.set.0.clone(), cgroup);
        }
    }

    fn write_set(&mut self, sorted: Vec<u32>, cgroup: u64) {
        match self.target_set.set(0, TargetSet::of(&sorted, cgroup), 0) {
            Ok(()) => self.set = (sorted, cgroup),
            Err(err) => tracing::warn!(error = %err, "cannot update the eBPF target set"),
        }
    }

    fn sync(&mut self, members: &[u32]) {
        let wanted: HashSet<u32> = members.iter().copied().collect();
        // The hash map holds every process; the inline set the first few, and sends the
        // programs to the hash map when there are more. New processes go into the hash map
        // before the set can point there, and leave the set before the hash map.
        for tgid in &wanted {
            if let Err(err) = self.targets.insert(tgid, 1, 0) {
                tracing::warn!(tgid, error = %err, "cannot add a target process to the eBPF filter");
            }
        }
        let mut sorted: Vec<u32> = wanted.iter().copied().collect();
        sorted.sort_unstable();
        self.write_set(sorted, self.set.1);
        let stale: Vec<u32> = self
            .targets
            .keys()
            .flatten()
            .filter(|k| !wanted.contains(k))
            .collect();
        for tgid in stale {
            let _ = self.targets.remove(&tgid);
        }
        // Listening ports: the kernel side learns new ones from listen(2); ports opened before
        // the daemon started are seeded from procfs.
        let stale: Vec<u16> = self.listen_ports.keys().flatten().collect();
        for port in stale {
            let _ = self.listen_ports.remove(&port);
        }
        for tgid in &wanted {
            for port in process_sockets(*tgid).listening {
                let _ = self.listen_ports.insert(port, tgid, 0);
            }
        }
    }
}

/// Sum over CPUs of one `STATS` slot.
fn stat(stats: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    stats.get(&index, 0).map_or(0, |values| values.iter().sum())
}

/// How the reader is connected to the rest of the daemon.
pub struct Links {
    /// The target's processes, from the tracker.
    pub members: watch::Receiver<Vec<u32>>,
    /// Exits of the target's processes, to the tracker.
    pub exits: mpsc::Sender<KernelExit>,
}

/// The payload capture's ring buffer, for the decoders to read in place (`capture::run`): its
/// records are segments and socket operations, and copies of the opens, closes and exits
/// that order them.
pub struct CaptureFeed {
    pub ring: RingBuf<MapData>,
    /// How many times the sampling took back shed connections (see
    /// `Traffic::set_readmissions`): raised before the kernel's mask is, so a record the
    /// kernel wrote under the new mask is read after the raise.
    pub readmissions: Arc<AtomicU64>,
}

impl Loaded {
    /// The payload capture's records, for the decoders; `None` with the capture off (or once
    /// taken).
    pub fn take_capture_feed(&mut self) -> Option<CaptureFeed> {
        self.feed.take()
    }
}

/// How full a ring buffer is, read from the positions the kernel shares with its reader (the
/// ring's first two pages, mapped read-only), without touching the reader: the sampling on
/// the main runtime reads it while the decoders' thread drains the ring.
struct RingFill {
    pages: NonNull<std::ffi::c_void>,
    page: usize,
    size: usize,
}

// SAFETY: the mapping is read-only and read through atomics only; it lives as long as this.
unsafe impl Send for RingFill {}

impl RingFill {
    fn new(ring: &RingBuf<MapData>, size: u32) -> std::io::Result<Self> {
        let page = page_size();
        let length = NonZeroUsize::new(2 * page).ok_or(std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a new shared read-only mapping of the ring's two position pages (the
        // consumer's, then the producer's), which the kernel allows for any reader; nothing
        // else is mapped at the address the kernel picks.
        let pages = unsafe {
            nix::sys::mman::mmap(
                None,
                length,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                ring.as_fd(),
                0,
            )
        }?;
        Ok(Self {
            pages,
            page,
            size: size as usize,
        })
    }

    /// The share (0–1) of the ring not holding records yet to be read.
    fn free(&self) -> f64 {
        // SAFETY: both positions (the kernel's `unsigned long`) are aligned at the start of
        // their page, inside the mapping; the kernel and the reader update them atomically.
        let (consumer, producer) = unsafe {
            let consumer = &*self.pages.as_ptr().cast::<AtomicUsize>();
            let producer = &*self
                .pages
                .as_ptr()
                .byte_add(self.page)
                .cast::<AtomicUsize>();
            (
                consumer.load(Ordering::Acquire),
                producer.load(Ordering::Acquire),
            )
        };
        let waiting = producer.saturating_sub(consumer) as f64;
        (1.0 - waiting / self.size.max(1) as f64).clamp(0.0, 1.0)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.pages, 2 * self.page) };
    }
}

/// The kernel's page size (the unit of ring buffers' sizes).
fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(4096)
}

/// With payload capture on: how often the sampling is set, and under what idle share of the
/// host's CPUs the capture sheds connections (see [`shedding`]).
#[derive(Clone, Copy, Debug)]
pub struct Draining {
    pub interval: Duration,
    /// `probes.shed_below_idle_percent`; 0: shed only when the decoders fall behind.
    pub shed_below_idle_percent: f64,
}

/// Drains the ring buffer of exits and TCP events and keeps the filter maps current, until
/// cancelled.
pub async fn run(
    loaded: Loaded,
    links: Links,
    report_interval: Duration,
    draining: Option<Draining>,
    bus: Bus,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), EbpfError> {
    let Links { mut members, exits } = links;
    // `ebpf` is held to the end of this function: dropping it detaches the programs.
    let Loaded {
        ebpf: mut attached,
        segments,
        unix,
        syscalls,
        ring,
        feed: _,
        fill,
        capture_on,
        readmissions,
        mut filters,
        stats: counters,
        sampling,
    } = loaded;
    let mut sampling = capture_on.then(|| Sampling {
        map: sampling,
        level: 0,
        host: Shedding::new(draining.map_or(0.0, |d| d.shed_below_idle_percent)),
        queue: QueueSide::default(),
        fill,
        readmissions,
        failed: false,
    });
    metrics.capture_sampling_ratio.set(1.0);
    let mut segments = segments.then(|| SegmentCapture::new(metrics.clone()));
    let mut unix = unix.map(|(mode, loaded)| UnixCapture::new(mode, loaded, metrics.clone()));
    let initial = members.borrow_and_update().clone();
    filters.sync(&initial);
    sync_segments(&mut segments, &mut attached, &mut filters, &initial);
    if let Some(unix) = &mut unix {
        unix.check(&mut attached, &initial);
    }
    // SAFETY: the ring buffer owns its map fd for as long as it lives, and it lives inside
    // this `AsyncFd` until the end of this function.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|err| EbpfError::Poll(err.into()))?;
    let mut window = Window::default();
    let mut ticker = tokio::time::interval(report_interval);
    // Without payload capture there is no sampling to set: no timer.
    let mut sample =
        tokio::time::interval(draining.map_or(Duration::from_hours(1), |d| d.interval));
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = members.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = members.borrow_and_update().clone();
                filters.sync(&current);
                sync_segments(&mut segments, &mut attached, &mut filters, &current);
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(EbpfError::Poll)?;
                drain(guard.get_inner_mut(), &exits, &metrics, &mut window);
                guard.clear_ready();
            }
            _ = sample.tick(), if sampling.is_some() => {
                let on = capturing(syscalls, segments.as_ref(), unix.as_ref(), &members);
                if let Some(sampling) = &mut sampling {
                    sampling.update(on, &metrics);
                }
            }
            _ = ticker.tick() => {
                // The target can move between cgroups without a change of processes.
                let current = members.borrow().clone();
                sync_segments(&mut segments, &mut attached, &mut filters, &current);
                if let Some(unix) = &mut unix {
                    let current = members.borrow().clone();
                    unix.check(&mut attached, &current);
                }
                export_program_stats(&attached, &metrics, &mut window.programs);
                // The kernel's per-CPU counters, as increments since the last report.
                for index in 0..stats::LEN {
                    let now = stat(&counters, index);
                    let delta = now.saturating_sub(window.seen[index as usize]);
                    window.seen[index as usize] = now;
                    let drop_reason = match index {
                        stats::EVENTS | stats::PAYLOAD_EVENTS | stats::SEGMENT_EVENTS => {
                            metrics.ebpf_ringbuf_events.inc_by(delta);
                            continue;
                        }
                        stats::DROPS_RINGBUF_FULL => "ringbuf_full",
                        stats::DROPS_PAYLOAD_RINGBUF_FULL => "payload_ringbuf_full",
                        stats::PAYLOAD_READ_FAULTS => "payload_unreadable",
                        stats::DROPS_SEGMENT_RINGBUF_FULL => "segment_ringbuf_full",
                        stats::SEGMENT_UNPARSED => "segment_unparsed",
                        stats::SHED => "shed",
                        stats::DROPS_CONNECTION_RINGBUF_FULL => "connection_ringbuf_full",
                        _ => continue,
                    };
                    metrics.ebpf_ringbuf_drops.get_or_create(&ReasonLabel { reason: drop_reason }).inc_by(delta);
                }
                let summary = std::mem::take(&mut window.summary);
                if summary != TcpSummary::default() {
                    bus.publish(Event::TcpSummary(summary));
                }
            }
        }
    }
}

/// Keeps the segment capture on the target's cgroup (see [`SegmentCapture::sync`]) and the
/// filters' cgroup id where it is attached.
fn sync_segments(
    segments: &mut Option<SegmentCapture>,
    ebpf: &mut Ebpf,
    filters: &mut Filters,
    members: &[u32],
) {
    if let Some(segments) = segments {
        segments.sync(ebpf, members);
        filters.set_cgroup(segments.cgroup_id());
    }
}

/// Reads every record waiting in the ring buffer of exits and TCP events.
fn drain(
    ring: &mut RingBuf<MapData>,
    exits: &mpsc::Sender<KernelExit>,
    metrics: &Metrics,
    window: &mut Window,
) {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(Record::Exit(exit)) => {
                let kernel_exit = KernelExit {
                    tgid: exit.tgid,
                    status: ExitStatus::from_wait_status(exit.exit_code),
                    exited_monotonic_ns: exit.ts_ns,
                    observed_monotonic_ns: monotonic_ns(),
                };
                if exits.try_send(kernel_exit).is_err() {
                    metrics
                        .ebpf_ringbuf_drops
                        .get_or_create(&ReasonLabel {
                            reason: "exit_queue_full",
                        })
                        .inc();
                }
            }
            Some(Record::Tcp(event)) => record_tcp(&event, metrics, &mut window.summary),
            // The capture writes to its own ring (`CAPTURES`), never here.
            Some(Record::Capture(_)) | None => {
                metrics
                    .ebpf_ringbuf_drops
                    .get_or_create(&ReasonLabel {
                        reason: "undecodable",
                    })
                    .inc();
            }
        }
    }
}

/// Whether any payload capture program is attached now and the target runs.
fn capturing(
    syscalls: bool,
    segments: Option<&SegmentCapture>,
    unix: Option<&UnixCapture>,
    members: &watch::Receiver<Vec<u32>>,
) -> bool {
    (syscalls
        || segments.is_some_and(SegmentCapture::is_attached)
        || unix.is_some_and(UnixCapture::is_attached))
        && !members.borrow().is_empty()
}

/// The capture's sampling: the kernel's mask and what sets it.
struct Sampling {
    map: Array<MapData, u32>,
    /// The kernel keeps one connection in `1 << level`.
    level: u32,
    host: Shedding,
    queue: QueueSide,
    /// How full the decoders' ring is (`None`: it could not be mapped, see [`load`]).
    fill: Option<RingFill>,
    /// See [`CaptureFeed::readmissions`].
    readmissions: Arc<AtomicU64>,
    /// Whether writing the mask failed (warned once).
    failed: bool,
}

impl Sampling {
    /// Sets how many connections the kernel captures from how full the decoders' ring is
    /// and how much CPU the host has idle: whole connections are shed (their parsers
    /// resynchronise when they come back) rather than the daemon falling behind or taking
    /// CPU the target could use. Opens and closes are never shed, so the connection
    /// table stays right. While nothing is `capturing` (the target not running, no program
    /// attached: the target not yet in a cgroup of its own, or no unix-socket connection to
    /// PostgreSQL noticed) nothing sheds and the readings start over: no shedding is logged
    /// for a capture that takes nothing.
    fn update(&mut self, capturing: bool, metrics: &Metrics) {
        let free = self.fill.as_ref().map_or(1.0, RingFill::free);
        let level = if capturing {
            let now = std::time::Instant::now();
            self.queue.observe(now, free).max(self.host.observe(now))
        } else {
            self.queue = QueueSide::default();
            self.host.reset();
            0
        };
        if level == self.level {
            return;
        }
        if level < self.level {
            // Before the mask: whatever the kernel captures under the new one is read after.
            self.readmissions.fetch_add(1, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        if let Err(err) = self.map.set(0, (1u32 << level) - 1, 0) {
            if !self.failed {
                tracing::warn!(error = %err, "cannot set the payload capture's sampling; it stays as it was");
                self.failed = true;
            }
            return;
        }
        let idle = self.host.idle_percent();
        let ring_full = (1.0 - free) * 100.0;
        match (self.level, level) {
            (0, _) => tracing::info!(
                keep_one_in = 1u32 << level,
                host_cpu_idle_percent = format!("{idle:.0}"),
                decode_ring_full_percent = format!("{ring_full:.0}"),
                "payload capture is shedding connections: the host has no CPU to spare or the decoders are behind"
            ),
            (_, 0) if !capturing => tracing::info!(
                "payload capture stopped shedding: nothing is captured now (the target is down or \
                 the capture detached); it keeps every connection when it captures again"
            ),
            (_, 0) => tracing::info!("payload capture keeps every connection again"),
            _ => tracing::debug!(keep_one_in = 1u32 << level, idle, ring_full, "payload capture sampling changed"),
        }
        if self.level == 0 || level == 0 {
            metrics.set_capture_shedding(level > 0);
        }
        self.level = level;
        metrics
            .capture_sampling_ratio
            .set(1.0 / f64::from(1u32 << level));
    }
}

/// What a TCP event means for the traffic decoders' connection table: an open carries the
/// connection's addresses (the socket's own as local, its destination as remote, whichever
/// side connected).
pub(crate) fn connection_change(event: &TcpEvent) -> Option<Capture> {
    match event.kind {
        kind::TCP_CONNECT | kind::TCP_ACCEPT => Some(Capture::Opened {
            tgid: event.tgid,
            sock: event.sock,
            role: if event.kind == kind::TCP_CONNECT {
                Role::Client
            } else {
                Role::Server
            },
            endpoints: Endpoints::from_raw(
                event.family,
                event.saddr,
                event.sport,
                event.daddr,
                event.dport,
            ),
            ts_ns: event.ts_ns,
        }),
        kind::TCP_CLOSE | kind::TCP_CONNECT_FAILED => Some(Capture::Closed {
            sock: event.sock,
            ts_ns: event.ts_ns,
        }),
        _ => None,
    }
}

fn record_tcp(event: &TcpEvent, metrics: &Metrics, summary: &mut TcpSummary) {
    let ms = event.duration_ns as f64 / 1e6;
    match event.kind {
        kind::TCP_CONNECT => {
            metrics
                .tcp_connect_duration_seconds
                .observe(event.duration_ns as f64 / 1e9);
            summary.connects += 1;
            summary.max_connect_ms = summary.max_connect_ms.max(ms);
        }
        kind::TCP_CONNECT_FAILED => {
            metrics.tcp_connect_failures.inc();
            summary.connect_failures += 1;
        }
        kind::TCP_ACCEPT => {
            metrics.tcp_accepts.inc();
            summary.accepts += 1;
        }
        kind::TCP_CLOSE => {
            // A normal close passes through FIN_WAIT or CLOSE_WAIT; straight from ESTABLISHED
            // (or SYN_RECV) to CLOSE is an abort: a reset was sent or received.
            let how = if matches!(
                event.old_state,
                tcp_state::ESTABLISHED | tcp_state::SYN_RECV
            ) {
                "abort"
            } else {
                "normal"
            };
            let role = if event.role == ROLE_CLIENT {
                "client"
            } else {
                "server"
            };
            metrics
                .tcp_closes
                .get_or_create(&HowLabel { how, role })
                .inc();
            summary.closes += 1;
        }
        kind::TCP_RESET => {
            metrics.tcp_resets_received.inc();
            summary.resets += 1;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inline_target_set_holds_the_first_processes_and_flags_the_rest() {
        let few = TargetSet::of(&[7, 42], 0);
        assert_eq!(few.overflow, 0);
        assert_eq!(&few.tgids[..3], &[7, 42, 0]);
        let exactly: Vec<u32> = (1..=selfheal_ebpf::TARGET_SET_LEN as u32).collect();
        assert_eq!(TargetSet::of(&exactly, 0).overflow, 0);
        let many: Vec<u32> = (1..=selfheal_ebpf::TARGET_SET_LEN as u32 + 1).collect();
        let set = TargetSet::of(&many, 9);
        assert_eq!(
            set.overflow, 1,
            "more processes than slots send the kernel to the hash map"
        );
        assert_eq!(
            set.tgids.to_vec(),
            many[..selfheal_ebpf::TARGET_SET_LEN].to_vec()
        );
        assert_eq!(TargetSet::of(&[], 0), TargetSet::default());
    }

    #[test]
    fn sampling_keeps_whole_connections_in_the_asked_share() {
        use selfheal_ebpf::sampled_in;
        // Socket cookies: a counter.
        let socks: Vec<u64> = (1..=4000u64).collect();
        assert!(socks.iter().all(|&s| sampled_in(s, 0)));
        for (mask, share) in [(1u32, 2usize), (3, 4), (15, 16)] {
            let kept = socks.iter().filter(|&&s| sampled_in(s, mask)).count();
            let expected = 4000 / share;
            assert!(
                kept.abs_diff(expected) < expected / 4,
                "{kept} of 4000 kept at one in {share}"
            );
            // A connection kept at a smaller share is kept at every larger one.
            assert!(socks
                .iter()
                .filter(|&&s| sampled_in(s, mask))
                .all(|&s| sampled_in(s, mask >> 1)));
        }
    }

    const FORMAT: &str = "name: inet_sock_set_state\nID: 2287\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
        \tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
        \tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\nprint fmt: \"...\"\n";

    #[test]
    fn tracefs_formats_parse() {
        let fields = parse_format(FORMAT);
        assert_eq!(fields.get("skaddr"), Some(&8));
        assert_eq!(fields.get("oldstate"), Some(&16));
        assert_eq!(fields.get("saddr"), Some(&32));
        assert_eq!(fields.get("common_type"), Some(&0));
    }

    #[test]
    fn a_changed_layout_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let event = dir.path().join("events/sock/inet_sock_set_state");
        std::fs::create_dir_all(&event).expect("mkdir");
        std::fs::write(event.join("format"), FORMAT).expect("write");
        assert!(check_layout(
            dir.path(),
            "sock",
            "inet_sock_set_state",
            &[("skaddr", 8), ("oldstate", 16)]
        )
        .is_ok());
        let moved = check_layout(
            dir.path(),
            "sock",
            "inet_sock_set_state",
            &[("oldstate", 20)],
        )
        .expect_err("moved");
        assert!(
            moved.contains("oldstate is at offset 16, expected 20"),
            "{moved}"
        );
        let missing = check_layout(
            dir.path(),
            "sock",
            "inet_sock_set_state",
            &[("newstate", 20)],
        )
        .expect_err("missing");
        assert!(missing.contains("no field newstate"), "{missing}");
        assert!(
            check_layout(dir.path(), "tcp", "tcp_receive_reset", &[]).is_err(),
            "no format file"
        );
    }

    #[test]
    fn records_decode_and_garbage_is_refused() {
        let exit = ProcessExit {
            kind: kind::PROCESS_EXIT,
            tgid: 42,
            pid: 43,
            exit_code: 9,
            ts_ns: 7,
            comm: *b"demo-backend\0\0\0\0",
        };
        // SAFETY: `ProcessExit` is plain old data; viewing it as bytes is what the kernel does.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const exit).cast::<u8>(), size_of::<ProcessExit>())
        };
        match decode(bytes) {
            Some(Record::Exit(decoded)) => {
                assert_eq!((decoded.tgid, decoded.exit_code, decoded.ts_ns), (42, 9, 7));
            }
            other => panic!("decoded {other:?}"),
        }
        assert!(decode(&bytes[..20]).is_none(), "truncated");
        assert!(decode(&[0xff; 80]).is_none(), "unknown kind");
        assert!(decode(&[]).is_none(), "empty");
    }

    proptest::proptest! {
        /// Whatever follows a known kind, a record decodes or is refused without a panic, and
        /// a capture's range lies inside the record.
        #[test]
        fn any_record_bytes_are_safe(
            kind_index in 0usize..4,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..700),
        ) {
            let kinds = [kind::PROCESS_EXIT, kind::TCP_CONNECT, kind::DATA, kind::SEGMENT];
            let mut bytes = kinds[kind_index].to_ne_bytes().to_vec();
            bytes.extend_from_slice(&body);
            if let Some(Record::Capture(
                Capture::Data { captured, .. } | Capture::Segment { captured, .. },
            )) = decode(&bytes)
            {
                proptest::prop_assert!(captured.end <= bytes.len());
                proptest::prop_assert!(captured.len() <= selfheal_ebpf::MAX_CAPTURE);
            }
        }
    }

    #[test]
    fn segment_records_decode_with_the_targets_end_as_local() {
        let mut event = SegmentEvent {
            kind: kind::SEGMENT,
            direction: selfheal_ebpf::DIRECTION_RECV,
            sock: 0xffff_8880_0bad_cafe,
            ts_ns: 42,
            len: 9000,
            captured: 16,
            headers: [0; selfheal_ebpf::SEGMENT_HEADERS],
            pad: 0,
            data: [0; selfheal_ebpf::MAX_CAPTURE],
        };
        // IPv4 from 10.0.0.2 to 127.0.0.1, then TCP from port 51000 to 8080, seq 0xfffffff0.
        event.headers[0] = 0x45;
        event.headers[9] = 6;
        event.headers[12..16].copy_from_slice(&[10, 0, 0, 2]);
        event.headers[16..20].copy_from_slice(&[127, 0, 0, 1]);
        event.headers[20..22].copy_from_slice(&51_000u16.to_be_bytes());
        event.headers[22..24].copy_from_slice(&8080u16.to_be_bytes());
        event.headers[24..28].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        event.data[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
        let as_bytes = |event: &SegmentEvent| {
            // SAFETY: `SegmentEvent` is plain old data; viewing it as bytes is what the
            // kernel does.
            unsafe {
                std::slice::from_raw_parts(
                    std::ptr::from_ref(event).cast::<u8>(),
                    size_of::<SegmentEvent>(),
                )
            }
            .to_vec()
        };
        let bytes = as_bytes(&event);
        let Some(Record::Capture(capture)) = decode(&bytes) else {
            panic!("a segment")
        };
        let ends = |local: &str, remote: &str| {
            Some(Endpoints::Tcp {
                local: local.parse().expect("address"),
                remote: remote.parse().expect("address"),
            })
        };
        // Received: the packet's destination is the target's end.
        assert_eq!(
            capture,
            Capture::Segment {
                sock: 0xffff_8880_0bad_cafe,
                direction: Direction::Received,
                seq: 0xffff_fff0,
                total_len: 9000,
                captured: 96..112,
                endpoints: ends("127.0.0.1:8080", "10.0.0.2:51000"),
                ts_ns: 42,
            }
        );
        // The payload is read where it lies in the record.
        assert_eq!(&bytes[96..112], b"GET / HTTP/1.1\r\n");
        // Sent: its source is. A claimed capture beyond the record or the payload is clamped.
        event.direction = DIRECTION_SEND;
        event.captured = 10_000;
        event.len = 100;
        let Some(Record::Capture(Capture::Segment {
            captured,
            endpoints,
            ..
        })) = decode(&as_bytes(&event))
        else {
            panic!("a segment")
        };
        assert_eq!(captured, 96..196);
        assert_eq!(endpoints, ends("10.0.0.2:51000", "127.0.0.1:8080"));
        // IPv6: the addresses are 16 bytes and TCP starts at 40.
        event.headers = [0; selfheal_ebpf::SEGMENT_HEADERS];
        event.headers[0] = 0x60;
        event.headers[6] = 6;
        event.headers[8..24].copy_from_slice(
            &"fd00::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets(),
        );
        event.headers[24..40].copy_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        event.headers[40..42].copy_from_slice(&443u16.to_be_bytes());
        event.headers[42..44].copy_from_slice(&40_000u16.to_be_bytes());
        let Some(Record::Capture(Capture::Segment { endpoints, .. })) = decode(&as_bytes(&event))
        else {
            panic!("a segment")
        };
        assert_eq!(endpoints, ends("[fd00::2]:443", "[::1]:40000"));
        // The smallest record size: the same fields, 64 bytes of data.
        let small = selfheal_ebpf::SEGMENT_CLASSES[0];
        assert_eq!(size_of::<selfheal_ebpf::SegmentRecord<64>>(), 96 + small);
        event.data[..4].copy_from_slice(b"HTTP");
        event.captured = 4;
        let bytes = as_bytes(&event);
        let Some(Record::Capture(Capture::Segment { captured, .. })) = decode(&bytes[..96 + small])
        else {
            panic!("a small segment")
        };
        assert_eq!(&bytes[captured], b"HTTP");
        // A claimed capture beyond a small record ends with the record.
        event.captured = 100;
        let Some(Record::Capture(Capture::Segment { captured, .. })) =
            decode(&as_bytes(&event)[..96 + small])
        else {
            panic!("a small segment")
        };
        assert_eq!(captured.len(), small);
        // A truncated record and an unknown IP version are refused.
        let bytes = as_bytes(&event);
        assert!(decode(&bytes[..60]).is_none());
        event.headers[0] = 0x50;
        assert!(decode(&as_bytes(&event)).is_none());
    }

    #[test]
    fn payload_records_decode_with_their_prefix_only() {
        let mut event = DataEvent {
            kind: kind::DATA,
            tgid: 10,
            pid: 11,
            fd: 7,
            nr: selfheal_ebpf::syscall::WRITEV,
            direction: DIRECTION_SEND,
            total_len: 4096,
            captured: 17,
            role: u32::from(selfheal_ebpf::ROLE_SERVER),
            sock: 0xffff_8880_dead_beef,
            ts_ns: 99,
            data: [0; selfheal_ebpf::MAX_CAPTURE],
        };
        event.data[..17].copy_from_slice(b"HTTP/1.1 200 OK\r\n");
        // SAFETY: `DataEvent` is plain old data; viewing it as bytes is what the kernel does.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<DataEvent>())
        };
        let Some(Record::Capture(capture)) = decode(bytes) else {
            panic!("a capture")
        };
        assert_eq!(
            capture,
            Capture::Data {
                tgid: 10,
                fd: 7,
                sock: 0xffff_8880_dead_beef,
                role: Some(Role::Server),
                direction: Direction::Sent,
                total_len: 4096,
                captured: 56..73,
                ts_ns: 99,
            }
        );
        assert_eq!(&bytes[56..73], b"HTTP/1.1 200 OK\r\n");
        // A claimed length beyond the record is clamped, never read past the end.
        event.captured = 10_000;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<DataEvent>())
        };
        let Some(Record::Capture(Capture::Data { captured, .. })) = decode(bytes) else {
            panic!("a capture")
        };
        assert_eq!(captured.len(), selfheal_ebpf::MAX_CAPTURE);
        assert!(decode(&bytes[..40]).is_none(), "truncated header");
    }

    /// Against the running kernel (needs root, as the daemon): the decoders' ring gets a copy
    /// of a target process's exit, the main ring the exit itself, and the fill the sampling
    /// reads follows what the decoders' ring holds.
    #[test]
    #[ignore = "loads eBPF programs: needs root, `sudo cargo xtask test` runs it"]
    fn exits_reach_both_rings_and_the_captures_ring_fill_is_read_from_the_kernel() {
        let config = ProbesConfig {
            payload_bytes: 64,
            ring_buffer_bytes: 4096,
            ..ProbesConfig::default()
        };
        let mut loaded = load(&config, &Metrics::new())
            .expect("the eBPF object loads (these checks need root, as the daemon does)");
        let fill = loaded
            .fill
            .take()
            .expect("with the capture on, its ring's fill");
        let mut feed = loaded
            .take_capture_feed()
            .expect("with the capture on, a feed");
        assert!(
            loaded.take_capture_feed().is_none(),
            "the feed is taken once"
        );
        assert!(
            (fill.free() - 1.0).abs() < f64::EPSILON,
            "an empty ring is all free"
        );

        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .expect("sleep runs");
        loaded.filters.sync(&[child.id()]);
        child.wait().expect("sleep ends");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fill.free() >= 1.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let free = fill.free();
        // One record: an 8-byte header and the exit, of a 4096-byte ring.
        let expected = 1.0 - (8 + size_of::<ProcessExit>()) as f64 / 4096.0;
        assert!(
            (free - expected).abs() < 1e-9,
            "the ring holds the exit's copy: {free} free, expected {expected}"
        );
        let copy = feed
            .ring
            .next()
            .expect("the exit's copy in the captures' ring");
        assert!(
            matches!(decode(&copy), Some(Record::Exit(exit)) if exit.tgid == child.id()),
            "the copy is the exit of {}",
            child.id()
        );
        drop(copy);
        assert!(feed.ring.next().is_none(), "nothing else was captured");
        assert!(
            (fill.free() - 1.0).abs() < f64::EPSILON,
            "read, the ring is free again"
        );
        let exit = loaded.ring.next().expect("the exit in the main ring");
        assert!(matches!(decode(&exit), Some(Record::Exit(exit)) if exit.tgid == child.id()));
    }

    #[test]
    fn tcp_events_update_metrics_and_the_summary() {
        let metrics = Metrics::new();
        let mut summary = TcpSummary::default();
        let event = |kind, old_state, duration_ns| TcpEvent {
            kind,
            tgid: 1,
            ts_ns: 0,
            duration_ns,
            family: 2,
            sport: 1,
            dport: 5432,
            role: ROLE_CLIENT,
            old_state,
            new_state: tcp_state::CLOSE,
            saddr: [0; 16],
            daddr: [0; 16],
            sock: 0xffff_8880_0000_1000,
        };
        assert_eq!(
            connection_change(&event(kind::TCP_CLOSE, tcp_state::ESTABLISHED, 1)),
            Some(Capture::Closed {
                sock: 0xffff_8880_0000_1000,
                ts_ns: 0
            })
        );
        // The target connected from 10.0.0.7:40000 to 10.0.0.9:5432.
        let mut connect = event(kind::TCP_CONNECT, tcp_state::SYN_SENT, 1);
        connect.sport = 40_000;
        connect.saddr[..4].copy_from_slice(&[10, 0, 0, 7]);
        connect.daddr[..4].copy_from_slice(&[10, 0, 0, 9]);
        assert_eq!(
            connection_change(&connect),
            Some(Capture::Opened {
                tgid: 1,
                sock: 0xffff_8880_0000_1000,
                role: Role::Client,
                endpoints: Some(Endpoints::Tcp {
                    local: "10.0.0.7:40000".parse().expect("addr"),
                    remote: "10.0.0.9:5432".parse().expect("addr"),
                }),
                ts_ns: 0,
            })
        );
        // An accept: the socket's own address is the target's listening one, the
        // destination is the client.
        let mut accept = event(kind::TCP_ACCEPT, tcp_state::SYN_RECV, 1);
        (accept.family, accept.sport, accept.dport) = (10, 8080, 51_000);
        accept.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        accept.daddr = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .expect("ip")
            .octets();
        assert!(matches!(
            connection_change(&accept),
            Some(Capture::Opened {
                role: Role::Server,
                endpoints: Some(Endpoints::Tcp { local, remote }),
                ..
            }) if local.to_string() == "[::1]:8080" && remote.to_string() == "[2001:db8::1]:51000"
        ));
        record_tcp(
            &event(kind::TCP_CONNECT, tcp_state::SYN_SENT, 2_000_000),
            &metrics,
            &mut summary,
        );
        record_tcp(
            &event(kind::TCP_CONNECT_FAILED, tcp_state::SYN_SENT, 1),
            &metrics,
            &mut summary,
        );
        record_tcp(
            &event(kind::TCP_CLOSE, tcp_state::ESTABLISHED, 1),
            &metrics,
            &mut summary,
        );
        record_tcp(&event(kind::TCP_CLOSE, 5, 1), &metrics, &mut summary);
        assert_eq!(
            (summary.connects, summary.connect_failures, summary.closes),
            (1, 1, 2)
        );
        assert!((summary.max_connect_ms - 2.0).abs() < 1e-9);
        let text = metrics.encode();
        assert!(
            text.contains("selfheal_tcp_closes_total{how=\"abort\",role=\"client\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("selfheal_tcp_closes_total{how=\"normal\",role=\"client\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("selfheal_tcp_connect_failures_total 1"),
            "{text}"
        );
    }
}
