//! The socket-operation capture: the BTF tracepoint programs (selfheal-ebpf `capture.rs`) on
//! `sock_recv_length`/`sock_send_length`. With `probes.capture = "syscalls"` they are the whole
//! capture, attached at load. Beside the cgroup capture they capture only the target's unix
//! sockets (filtered in the kernel), for PostgreSQL reached through a unix socket, which no
//! cgroup program sees; [`UnixCapture`] attaches them as `probes.unix_sockets` says.
//!
//! Owns: loading, attaching and detaching these programs, and finding the target's unix-socket
//! connections to PostgreSQL (`unix_peers`) once per report interval. Must not: stay attached
//! in `auto` once the target has had no such connection for [`IDLE`] — while attached, every
//! process on the host pays the programs' filter on each socket operation.

use std::time::{Duration, Instant};

use aya::{
    programs::{tp_btf::BtfTracePointLinkId, BtfTracePoint},
    Ebpf,
};
use selfheal_ebpf::names;

use super::unix_peers;
use crate::{
    config::UnixSockets,
    telemetry::{Metrics, ProbeLabel},
};

/// How long `auto` keeps the programs attached after the target's last unix-socket connection
/// to PostgreSQL was seen: a target restarting (and reconnecting) within it is captured from
/// its new connections' first bytes.
pub const IDLE: Duration = Duration::from_mins(1);

/// The programs and the tracepoints they attach to.
const PROGRAMS: [(&str, &str); 2] = [
    (names::PROG_CAPTURE_RECV, "sock_recv_length"),
    (names::PROG_CAPTURE_SEND, "sock_send_length"),
];

/// The probe name of the unix-socket capture in `selfheal_ebpf_probe_attached`.
const PROBE: &str = "unix_capture";

fn program<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut BtfTracePoint, String> {
    super::ebpf::program(ebpf, name)
}

/// Loads both programs into the kernel, unattached.
pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    // The programs read syscall arguments at x86_64 `pt_regs` offsets.
    if !cfg!(target_arch = "x86_64") {
        return Err("the socket-operation capture reads x86_64 syscall registers".to_owned());
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    for (name, tracepoint) in PROGRAMS {
        program(ebpf, name)?
            .load(tracepoint, &btf)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Attaches both loaded programs; on a failure the one already attached is detached.
pub fn attach(ebpf: &mut Ebpf) -> Result<[BtfTracePointLinkId; 2], String> {
    let recv = program(ebpf, PROGRAMS[0].0)?
        .attach()
        .map_err(|e| format!("{}: {e}", PROGRAMS[0].0))?;
    let send = program(ebpf, PROGRAMS[1].0)?
        .attach()
        .map_err(|e| format!("{}: {e}", PROGRAMS[1].0));
    match send {
        Ok(send) => Ok([recv, send]),
        Err(err) => {
            if let Ok(p) = program(ebpf, PROGRAMS[0].0) {
                let _ = p.detach(recv);
            }
            Err(err)
        }
    }
}

fn detach(ebpf: &mut Ebpf, links: [BtfTracePointLinkId; 2]) {
    for ((name, _), link) in PROGRAMS.into_iter().zip(links) {
        if let Err(err) =
            program(ebpf, name).and_then(|p| p.detach(link).map_err(|e| e.to_string()))
        {
            tracing::warn!(program = name, error = %err, "cannot detach the unix-socket capture");
        }
    }
}

/// What to do with the programs after a count of the target's unix-socket connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Attach,
    Detach,
    Keep,
}

/// The decision of `auto` and `always`, given whether the programs are attached, the count
/// (`None` when it could not be made) and the time since a connection was last seen.
fn step(
    mode: UnixSockets,
    attached: bool,
    connections: Option<usize>,
    since_seen: Option<Duration>,
) -> Step {
    match (mode, attached) {
        (UnixSockets::Always, false) => Step::Attach,
        (UnixSockets::Auto, false) if connections.is_some_and(|n| n > 0) => Step::Attach,
        // A count that fails for as long detaches too: the hooks cost every process.
        (UnixSockets::Auto, true)
            if connections.is_none_or(|n| n == 0) && since_seen.is_none_or(|idle| idle >= IDLE) =>
        {
            Step::Detach
        }
        (UnixSockets::Off | UnixSockets::Always | UnixSockets::Auto, _) => Step::Keep,
    }
}

/// The unix-socket capture beside the cgroup capture.
pub struct UnixCapture {
    mode: UnixSockets,
    /// Whether the programs are loaded (else the connections are only counted).
    loaded: bool,
    links: Option<[BtfTracePointLinkId; 2]>,
    /// When the target last had a unix-socket connection to PostgreSQL.
    last_seen: Option<Instant>,
    /// Connections last counted while not captured (logged when they appear).
    unseen: usize,
    /// Listing unix sockets failed once (said once).
    unix_diag_failed: bool,
    /// Attaching failed once (said once; the connections count as unseen).
    attach_failed: bool,
    metrics: Metrics,
}

impl UnixCapture {
    /// `loaded`: whether [`load`] succeeded; without it the connections are only counted.
    pub fn new(mode: UnixSockets, loaded: bool, metrics: Metrics) -> Self {
        let capture = Self {
            mode,
            loaded,
            links: None,
            last_seen: None,
            unseen: 0,
            unix_diag_failed: false,
            attach_failed: false,
            metrics,
        };
        capture.export();
        capture
    }

    /// Counts the target's connections to PostgreSQL over a unix socket and attaches or
    /// detaches the programs as the mode says. Connections are "unseen" while the programs
    /// are not attached; the log says so when some appear. A count that fails leaves the
    /// last one standing.
    pub fn check(&mut self, ebpf: &mut Ebpf, members: &[u32]) {
        let can_attach = self.loaded && !self.attach_failed;
        if self.mode == UnixSockets::Always && self.links.is_some() {
            // Nothing to decide, and nothing unseen while attached: no count.
            self.set_unseen(0);
            return;
        }
        let found = if members.is_empty() {
            Some(unix_peers::PostgresUnix::default())
        } else {
            match unix_peers::postgres_connections(members) {
                Ok(found) => Some(found),
                Err(err) => {
                    if !self.unix_diag_failed {
                        let hint = if self.mode == UnixSockets::Auto && can_attach {
                            "; set probes.unix_sockets = \"always\" to capture its unix sockets \
                             anyway"
                        } else {
                            ""
                        };
                        tracing::warn!(
                            error = %err,
                            "cannot list unix sockets (sock_diag; is the unix_diag module \
                             loaded?): a target talking to PostgreSQL over a unix socket would \
                             not be noticed{hint}"
                        );
                        self.unix_diag_failed = true;
                    }
                    None
                }
            }
        };
        let connections = found.as_ref().map(|f| f.connections);
        if connections.is_some_and(|n| n > 0) {
            self.last_seen = Some(Instant::now());
        }
        let since_seen = self.last_seen.map(|at| at.elapsed());
        let mode = if self.loaded {
            self.mode
        } else {
            UnixSockets::Off
        };
        match step(mode, self.links.is_some(), connections, since_seen) {
            Step::Attach if can_attach => match attach(ebpf) {
                Ok(links) => {
                    tracing::info!(
                        mode = ?self.mode,
                        "capturing the target's unix-socket connections to PostgreSQL: every \
                         process's socket operations pay the in-kernel filter while this is on"
                    );
                    self.links = Some(links);
                }
                Err(reason) => {
                    tracing::warn!(%reason, "cannot capture the target's unix sockets");
                    self.attach_failed = true;
                }
            },
            Step::Detach => {
                if let Some(links) = self.links.take() {
                    detach(ebpf, links);
                    tracing::info!(
                        idle = ?IDLE,
                        "unix-socket capture detached: no unix-socket connection of the target \
                         to PostgreSQL was seen for a while"
                    );
                }
            }
            Step::Attach | Step::Keep => {}
        }
        // A failed count leaves the last one standing.
        let Some(found) = found else {
            self.export();
            return;
        };
        let unseen = if self.links.is_some() {
            0
        } else {
            found.connections
        };
        if unseen > 0 && self.unseen == 0 {
            let hint = if self.mode == UnixSockets::Off {
                "connect it over TCP (host=127.0.0.1), or have its unix sockets captured \
                 (probes.unix_sockets = \"auto\": every process's socket operations then pay \
                 an in-kernel filter while the target has such a connection)"
            } else {
                "the unix-socket capture is not available here (see the warning above); \
                 connect it over TCP (host=127.0.0.1)"
            };
            tracing::warn!(
                connections = found.connections,
                socket = found.path.as_deref().unwrap_or("?"),
                "the target talks to PostgreSQL over a unix socket, which the cgroup capture \
                 does not see: its queries are not measured; {hint}"
            );
        }
        self.set_unseen(unseen);
    }

    fn set_unseen(&mut self, unseen: usize) {
        self.unseen = unseen;
        self.metrics
            .capture_unseen_postgres_connections
            .set(i64::try_from(unseen).unwrap_or(i64::MAX));
        self.export();
    }

    /// Whether the programs are attached.
    pub fn is_attached(&self) -> bool {
        self.links.is_some()
    }

    fn export(&self) {
        self.metrics
            .ebpf_probe_attached
            .get_or_create(&ProbeLabel { probe: PROBE })
            .set(i64::from(self.links.is_some()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_attaches_on_a_connection_and_detaches_after_a_quiet_minute() {
        let auto = |attached, connections, since: Option<u64>| {
            step(
                UnixSockets::Auto,
                attached,
                connections,
                since.map(Duration::from_secs),
            )
        };
        assert_eq!(auto(false, Some(0), None), Step::Keep);
        assert_eq!(auto(false, Some(2), Some(0)), Step::Attach);
        assert_eq!(auto(true, Some(2), Some(0)), Step::Keep);
        assert_eq!(auto(true, Some(0), Some(5)), Step::Keep, "a quiet moment");
        assert_eq!(auto(true, Some(0), Some(60)), Step::Detach);
        assert_eq!(auto(true, None, Some(5)), Step::Keep, "a count failed once");
        assert_eq!(
            auto(true, None, Some(600)),
            Step::Detach,
            "no count for a minute"
        );
        assert_eq!(auto(false, None, None), Step::Keep);
    }

    #[test]
    fn always_attaches_at_once_and_off_never() {
        for connections in [None, Some(0), Some(3)] {
            assert_eq!(
                step(UnixSockets::Always, false, connections, None),
                Step::Attach
            );
            assert_eq!(
                step(
                    UnixSockets::Always,
                    true,
                    connections,
                    Some(Duration::from_hours(1))
                ),
                Step::Keep
            );
            assert_eq!(step(UnixSockets::Off, false, connections, None), Step::Keep);
        }
    }
}
