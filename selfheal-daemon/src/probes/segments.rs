//! The segment capture's attachment: the `cgroup_skb` programs (selfheal-ebpf
//! `segments.rs`) attached to the target's own cgroup2 directory, moved when the target moves
//! and detached while it has no cgroup of its own.
//!
//! Owns: deciding whether the target's cgroup is its own (every process of the target in one
//! cgroup2 directory that is not the root, and no other process in it or below it) and the
//! program links. Must not: attach to a cgroup other processes live in (they would pay for
//! the programs and their traffic would be taken for the target's), or to the root.
//!
//! A socket belongs to the cgroup its creator was in when it was made, and accepted sockets
//! to the listener's: a target moved into its cgroup after it started listening is seen only
//! on the connections it opens itself, until it restarts there.

use std::{
    collections::HashSet,
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    programs::{cgroup_skb::CgroupSkbLinkId, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
    Ebpf,
};
use selfheal_ebpf::names;

use super::cgroup::{self, Version};
use crate::telemetry::{Metrics, ProbeLabel};

/// Directories below the target's cgroup looked at before it is taken as not its own.
const MAX_SUBTREE_DIRS: usize = 256;

/// The cgroup2 directory all the target's processes are in, when it is not the root.
///
/// `proc_cgroups` holds each member's `/proc/<pid>/cgroup`; `root` is the cgroup mount.
pub fn common_cgroup_in(proc_cgroups: &[(u32, String)], root: &Path) -> Result<PathBuf, String> {
    let mut dirs = proc_cgroups.iter().map(|(pid, text)| {
        let dir = cgroup::locate_in(text, root)
            .into_iter()
            .find(|l| l.version == Version::V2)
            .map(|l| l.dir)
            .ok_or_else(|| format!("process {pid} is in no cgroup2 hierarchy"))?;
        // `0::/../../system.slice/docker-….scope`: the daemon runs in a cgroup namespace of
        // its own (a container's default) and the target's cgroup is outside it, so not
        // under this daemon's cgroup mount at all.
        if dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "process {pid}'s cgroup lies outside the daemon's cgroup namespace ({}): \
                 run the daemon in the host's (docker run --cgroupns host)",
                text.lines()
                    .find(|line| line.starts_with("0::"))
                    .unwrap_or(text.trim())
            ));
        }
        Ok(dir)
    });
    let Some(first) = dirs.next() else {
        return Err("the target has no running process".to_owned());
    };
    let dir = first?;
    for other in dirs {
        if other? != dir {
            return Err("the target's processes are in different cgroups".to_owned());
        }
    }
    let v2_root = cgroup::locate_in("0::/\n", root)
        .into_iter()
        .next()
        .map_or_else(|| root.to_owned(), |l| l.dir);
    if dir == v2_root || dir.as_os_str().is_empty() {
        return Err("the target is in the root cgroup, shared with every process".to_owned());
    }
    Ok(dir)
}

/// The cgroup2 directory the target's processes share, when it is theirs alone: no other
/// process in it or below it.
pub fn own_cgroup_in(
    proc_cgroups: &[(u32, String)],
    root: &Path,
    members: &[u32],
) -> Result<PathBuf, String> {
    let dir = common_cgroup_in(proc_cgroups, root)?;
    let members: HashSet<u32> = members.iter().copied().collect();
    let mut pending = vec![dir.clone()];
    let mut seen = 0;
    while let Some(next) = pending.pop() {
        seen += 1;
        if seen > MAX_SUBTREE_DIRS {
            return Err(format!(
                "{} has more than {MAX_SUBTREE_DIRS} cgroups below it",
                dir.display()
            ));
        }
        let procs = std::fs::read_to_string(next.join("cgroup.procs"))
            .map_err(|e| format!("cannot read {}/cgroup.procs: {e}", next.display()))?;
        if let Some(stranger) = procs
            .lines()
            .filter_map(|line| line.trim().parse::<u32>().ok())
            .find(|pid| !members.contains(pid))
        {
            return Err(format!(
                "{} is shared with process {stranger}, which is not the target",
                next.display()
            ));
        }
        if let Ok(entries) = std::fs::read_dir(&next) {
            pending.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(dir)
}

/// Each running member's `/proc/<pid>/cgroup`.
fn proc_cgroups(members: &[u32]) -> Vec<(u32, String)> {
    members
        .iter()
        .filter_map(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .map(|text| (pid, text))
        })
        .collect()
}

/// The segment programs' links to the target's cgroup.
pub struct SegmentCapture {
    attached: Option<(PathBuf, [CgroupSkbLinkId; 2])>,
    /// Why nothing is attached, as last logged (logged again only when it changes).
    reason: Option<String>,
    metrics: Metrics,
}

const PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (names::PROG_SEGMENT_INGRESS, CgroupSkbAttachType::Ingress),
    (names::PROG_SEGMENT_EGRESS, CgroupSkbAttachType::Egress),
];

/// Loads the segment programs (attached later, by [`SegmentCapture::sync`]).
pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    for (name, _) in PROGRAMS {
        program(ebpf, name)?
            .load()
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

fn program<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut CgroupSkb, String> {
    super::ebpf::program(ebpf, name)
}

impl SegmentCapture {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            attached: None,
            reason: None,
            metrics,
        }
    }

    /// Attaches the programs to the target's own cgroup, moves them when it changed, and
    /// detaches them while the target runs without one. Between two runs of the target
    /// (no members) they stay where they are: a unit or container restarted into the same
    /// cgroup is seen from its first packet.
    ///
    /// Only the first attachment asks for the cgroup to be the target's alone: once attached,
    /// the programs stay while every member is still in that directory, so a short-lived
    /// process the target starts there (a child it forks, a health script) does not turn the
    /// capture off; its segments, if it has any, count as the target's.
    pub fn sync(&mut self, ebpf: &mut Ebpf, members: &[u32]) {
        if members.is_empty() && self.attached.is_some() {
            return;
        }
        let texts = proc_cgroups(members);
        let root = Path::new(cgroup::ROOT);
        if let Some((current, _)) = &self.attached {
            if common_cgroup_in(&texts, root).is_ok_and(|dir| &dir == current) {
                return;
            }
        }
        let wanted = own_cgroup_in(&texts, root, members);
        self.detach(ebpf);
        let outcome = wanted.and_then(|dir| {
            let links = attach(ebpf, &dir)?;
            Ok((dir, links))
        });
        match outcome {
            Ok((dir, links)) => {
                tracing::info!(cgroup = %dir.display(), "capturing the target's TCP segments on its cgroup");
                self.attached = Some((dir, links));
                self.reason = None;
            }
            Err(reason) => {
                if members.is_empty() {
                    // Between two runs of the target: nothing to say yet.
                } else if self.reason.as_ref() != Some(&reason) {
                    tracing::warn!(
                        %reason,
                        "payload capture is waiting for the target to run in a cgroup of its own \
                         (a systemd unit, a container, or a process started in its own cgroup2 \
                         directory); set probes.capture = \"syscalls\" to capture a target in a \
                         shared cgroup at a cost to every process"
                    );
                    self.reason = Some(reason);
                }
            }
        }
        self.export();
    }

    /// The id of the cgroup the programs are attached to (its directory's inode number on
    /// cgroup2, what `bpf_get_current_cgroup_id` returns), 0 when detached.
    pub fn cgroup_id(&self) -> u64 {
        self.attached.as_ref().map_or(0, |(dir, _)| {
            std::fs::metadata(dir).map_or(0, |meta| std::os::unix::fs::MetadataExt::ino(&meta))
        })
    }

    /// Whether the programs are attached to the target's cgroup.
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    fn detach(&mut self, ebpf: &mut Ebpf) {
        let Some((dir, links)) = self.attached.take() else {
            return;
        };
        for ((name, _), link) in PROGRAMS.into_iter().zip(links) {
            if let Err(err) =
                program(ebpf, name).and_then(|p| p.detach(link).map_err(|e| e.to_string()))
            {
                tracing::warn!(program = name, cgroup = %dir.display(), error = %err, "cannot detach the segment capture");
            }
        }
        tracing::info!(cgroup = %dir.display(), "segment capture detached from the target's former cgroup");
    }

    fn export(&self) {
        export(&self.metrics, self.attached.is_some());
    }
}

/// Whether the segment capture is attached, as `selfheal_ebpf_probe_attached` and
/// `selfheal_capture_mode` say it.
pub fn export(metrics: &Metrics, on: bool) {
    metrics
        .ebpf_probe_attached
        .get_or_create(&ProbeLabel {
            probe: "payload_capture",
        })
        .set(i64::from(on));
    metrics.set_capture_mode(if on { "cgroup" } else { "none" });
}

/// Attaches both programs to `dir`; on a failure the one already attached is detached.
fn attach(ebpf: &mut Ebpf, dir: &Path) -> Result<[CgroupSkbLinkId; 2], String> {
    let cgroup = File::open(dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    // aya 0.14 passes the mode as link flags, which the kernel refuses for anything but
    // `Single` (aya#1078); links to a cgroup stack with others' programs anyway.
    let ingress = program(ebpf, PROGRAMS[0].0)?
        .attach(&cgroup, PROGRAMS[0].1, CgroupAttachMode::Single)
        .map_err(|e| format!("{}: {e}", PROGRAMS[0].0))?;
    let egress = program(ebpf, PROGRAMS[1].0)?
        .attach(&cgroup, PROGRAMS[1].1, CgroupAttachMode::Single)
        .map_err(|e| format!("{}: {e}", PROGRAMS[1].0));
    match egress {
        Ok(egress) => Ok([ingress, egress]),
        Err(err) => {
            if let Ok(p) = program(ebpf, PROGRAMS[0].0) {
                let _ = p.detach(ingress);
            }
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dirs: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("unified")).expect("mkdir");
        std::fs::write(root.path().join("unified/cgroup.procs"), "1\n").expect("write");
        for (dir, procs) in dirs {
            let path = root.path().join("unified").join(dir);
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join("cgroup.procs"), procs).expect("write");
        }
        root
    }

    #[test]
    fn a_cgroup_of_the_targets_processes_alone_is_its_own() {
        let root = tree(&[("app", "10\n11\n"), ("app/worker", "12\n")]);
        let procs = vec![(10, "0::/app\n".to_owned()), (11, "0::/app\n".to_owned())];
        assert_eq!(
            own_cgroup_in(&procs, root.path(), &[10, 11, 12]),
            Ok(root.path().join("unified/app"))
        );
    }

    #[test]
    fn shared_root_split_and_crowded_cgroups_are_refused() {
        let root = tree(&[("app", "10\n99\n"), ("svc", "20\n"), ("svc/x", "21\n77\n")]);
        let one = |pid: u32, path: &str| vec![(pid, format!("0::{path}\n"))];
        let refused = |procs: &[(u32, String)], members: &[u32]| {
            own_cgroup_in(procs, root.path(), members).expect_err("refused")
        };
        assert!(refused(&one(10, "/app"), &[10]).contains("process 99"));
        assert!(refused(&one(20, "/svc"), &[20, 21]).contains("process 77"));
        assert!(refused(&one(5, "/"), &[5]).contains("root cgroup"));
        let split = vec![(10, "0::/app\n".to_owned()), (20, "0::/svc\n".to_owned())];
        assert!(refused(&split, &[10, 20]).contains("different cgroups"));
        assert!(refused(&[], &[]).contains("no running process"));
        assert!(refused(&[(3, "4:memory:/x\n".to_owned())], &[3]).contains("no cgroup2"));
        // Seen from a sidecar in a cgroup namespace of its own.
        let outside = refused(&one(30, "/../../system.slice/docker-ab.scope"), &[30]);
        assert!(
            outside.contains("outside the daemon's cgroup namespace")
                && outside.contains("0::/../../system.slice/docker-ab.scope")
                && outside.contains("--cgroupns host"),
            "{outside}"
        );
    }
}
