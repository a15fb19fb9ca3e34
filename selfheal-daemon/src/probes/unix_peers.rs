//! The target's connections to PostgreSQL over unix sockets, which the cgroup capture
//! (`cgroup_skb`, TCP/IP only) cannot see: counted so that their absence from the query
//! metrics is said rather than silent.
//!
//! Owns: one `sock_diag` dump of the connected unix stream sockets (the source `ss -x` reads)
//! and the match of the target's socket inodes against it. An accepted unix socket carries
//! the name of the listener it came from, so a client's peer named `…/.s.PGSQL.<port>` is a
//! PostgreSQL server. Must not: run on the capture's hot path (it is called once per report
//! interval, in `cgroup` mode only).
//!
//! Unix sockets belong to network namespaces, and a dump lists one namespace's: the daemon's,
//! and each other one a member of the target runs in (a container with its own network,
//! which still reaches a PostgreSQL socket on the host through a mounted directory), dumped
//! from a short-lived thread that joins it.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    unix::{
        nlas::{Nla, UnixDiagName},
        ShowFlags, StateFlags, UnixRequest,
    },
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// A connected unix stream socket as `sock_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    pub inode: u32,
    pub peer: Option<u32>,
    /// The path it is bound to (for an accepted socket: its listener's).
    pub path: Option<Vec<u8>>,
}

/// Whether `path` (a bound `sun_path`: an abstract name starts with a NUL) names a PostgreSQL
/// server socket, `<dir>/.s.PGSQL.<port>`: the test the unix-socket capture makes in the
/// kernel, on the path's last 16 bytes (a shorter path is taken as relative to a directory).
pub fn is_postgres_path(path: &[u8]) -> bool {
    let mut tail = [b'/'; 16];
    let take = path.len().min(16);
    tail[16 - take..].copy_from_slice(&path[path.len() - take..]);
    selfheal_ebpf::ends_with_postgres_socket(&tail)
}

/// The sockets whose peer is a PostgreSQL server socket: inode → the server socket's path.
pub fn postgres_clients(sockets: &[UnixSocket]) -> HashMap<u64, &[u8]> {
    let servers: HashMap<u32, &[u8]> = sockets
        .iter()
        .filter_map(|s| Some((s.inode, s.path.as_deref().filter(|p| is_postgres_path(p))?)))
        .collect();
    sockets
        .iter()
        .filter(|s| s.path.is_none())
        .filter_map(|s| Some((u64::from(s.inode), *servers.get(&s.peer?)?)))
        .collect()
}

/// The established unix stream sockets of the daemon's network namespace, with their peers
/// and names, from `sock_diag`.
pub fn dump() -> io::Result<Vec<UnixSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    // The caller is the ring-buffer reader's task: a dump the kernel never finished must not
    // hold it. One second is ample for any host's unix sockets.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `setsockopt` reads `size_of::<timeval>()` bytes from a live `timeval` on the
    // stack, for a socket this function owns.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0),
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::ESTABLISHED,
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::PEER,
            cookie: [0xff; 8],
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut sockets = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        if datagram.is_empty() {
            return Ok(sockets);
        }
        let mut offset = 0;
        while offset < datagram.len() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&datagram[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(response)) => {
                    let mut socket = UnixSocket {
                        inode: response.header.inode,
                        peer: None,
                        path: None,
                    };
                    for nla in &response.nlas {
                        match nla {
                            Nla::Peer(peer) => socket.peer = Some(*peer),
                            Nla::Name(UnixDiagName::Pathname(path)) => {
                                socket.path = Some(path.as_bytes().to_vec());
                            }
                            // As the kernel holds it: a NUL, then the name.
                            Nla::Name(UnixDiagName::Abstract(name)) => {
                                socket.path = Some([&[0], name.as_slice()].concat());
                            }
                            _ => {}
                        }
                    }
                    sockets.push(socket);
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(error) => {
                    return Err(error.to_io());
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The target's connections to PostgreSQL over unix sockets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PostgresUnix {
    pub connections: usize,
    /// The server socket of one of them, for the log.
    pub path: Option<String>,
}

/// The unix sockets of the network namespace `netns` (a `/proc/<pid>/ns/net` path), dumped
/// from a thread that joins it: a netlink socket lists the namespace it was made in.
pub fn dump_in(netns: &std::path::Path) -> io::Result<Vec<UnixSocket>> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                dump()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace's dump panicked")))
    })
}

/// The network namespaces `members` run in besides the daemon's: one `/proc/<pid>/ns/net`
/// path each.
fn other_namespaces(members: &[u32]) -> Vec<std::path::PathBuf> {
    let own = std::fs::read_link("/proc/self/ns/net").ok();
    let mut seen = HashSet::new();
    members
        .iter()
        .filter_map(|pid| {
            let path = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
            let id = std::fs::read_link(&path).ok()?;
            (Some(&id) != own.as_ref() && seen.insert(id)).then_some(path)
        })
        .collect()
}

/// `members`' connections to PostgreSQL over unix sockets, in whichever network namespace
/// they are (socket inodes are unique across namespaces, so the dumps join). Blocking I/O.
pub fn postgres_connections(members: &[u32]) -> io::Result<PostgresUnix> {
    let mut sockets = dump()?;
    for netns in other_namespaces(members) {
        match dump_in(&netns) {
            Ok(more) => sockets.extend(more),
            // The process exited since: its namespace is nobody's concern.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            // The other namespaces' connections still count.
            Err(err) => {
                static SAID: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        netns = %netns.display(),
                        error = %err,
                        "cannot list the unix sockets of the target's network namespace: its \
                         connections to PostgreSQL there are not noticed"
                    );
                }
            }
        }
    }
    let clients = postgres_clients(&sockets);
    let mut found = PostgresUnix::default();
    if clients.is_empty() {
        return Ok(found);
    }
    let mut seen = HashSet::new();
    for &pid in members {
        let Ok(fds) = procfs::process::Process::new(pid as i32).and_then(|p| p.fd()) else {
            continue;
        };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                if let Some(path) = clients.get(&inode) {
                    if seen.insert(inode) {
                        found.connections += 1;
                        found.path.get_or_insert_with(|| match path.split_first() {
                            Some((0, name)) => {
                                format!("@{}", OsStr::from_bytes(name).to_string_lossy())
                            }
                            _ => OsStr::from_bytes(path).to_string_lossy().into_owned(),
                        });
                    }
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_socket_paths_are_recognised() {
        assert!(is_postgres_path(b"/var/run/postgresql/.s.PGSQL.5432"));
        assert!(is_postgres_path(b".s.PGSQL.6543"));
        assert!(!is_postgres_path(b"/var/run/postgresql/.s.PGSQL.5432.lock"));
        assert!(!is_postgres_path(b"/var/run/postgresql/.s.PGSQL."));
        assert!(!is_postgres_path(b"/run/systemd/journal/stdout"));
        assert!(is_postgres_path(b"/tmp/.s.PGSQL.1"));
        assert!(is_postgres_path(
            b"/a/very/long/directory/name/.s.PGSQL.65535"
        ));
        assert!(!is_postgres_path(b"/tmp/.s.PGSQL.123456"), "six digits");
        assert!(
            !is_postgres_path(b"/tmp/x.s.PGSQL.5432"),
            "not the whole name"
        );
        assert!(!is_postgres_path(b"/tmp/.s.PGSQL.54a2"));
        assert!(!is_postgres_path(b""));
        // PostgreSQL's abstract sockets (`unix_socket_directories = '@pg'`).
        assert!(is_postgres_path(b"\0pg/.s.PGSQL.5432"));
        assert!(!is_postgres_path(b"\0.s.PGSQL.5432"));
    }

    #[test]
    fn only_clients_whose_peer_is_a_postgres_server_socket_count() {
        let socket = |inode, peer, path: Option<&str>| UnixSocket {
            inode,
            peer,
            path: path.map(|p| p.as_bytes().to_vec()),
        };
        let sockets = [
            // A client and the server end PostgreSQL accepted.
            socket(10, Some(11), None),
            socket(11, Some(10), Some("/tmp/pg/.s.PGSQL.5432")),
            // A service's stdout to the journal.
            socket(20, Some(21), None),
            socket(21, Some(20), Some("/run/systemd/journal/stdout")),
            // A socketpair: no names at all.
            socket(30, Some(31), None),
            socket(31, Some(30), None),
            // A client whose peer is not in the dump.
            socket(40, Some(99), None),
        ];
        let clients = postgres_clients(&sockets);
        assert_eq!(clients.len(), 1, "{clients:?}");
        assert_eq!(clients.get(&10), Some(&&b"/tmp/pg/.s.PGSQL.5432"[..]));
    }
}
