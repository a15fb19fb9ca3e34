//! cgroup v1 and v2: where a process's cgroups are, and what they say about memory and CPU.
//!
//! Pure parsers over the text of `/proc/<pid>/cgroup` and cgroup files, plus thin readers.
//! Hybrid hosts (v1 controllers and a v2 tree at `/sys/fs/cgroup/unified`) are handled: a v1
//! controller is preferred where it is mounted, as that is where the kernel enforces limits.

use std::path::{Path, PathBuf};

pub const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One line of `/proc/<pid>/cgroup`, resolved to a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub version: Version,
    /// Controllers of a v1 hierarchy (`["cpu", "cpuacct"]`, `["name=systemd"]`); empty for v2.
    pub controllers: Vec<String>,
    pub dir: PathBuf,
}

/// Resolves `/proc/<pid>/cgroup` against the host's cgroup mount.
pub fn locate(proc_cgroup: &str) -> Vec<Location> {
    locate_in(proc_cgroup, Path::new(ROOT))
}

pub fn locate_in(proc_cgroup: &str, root: &Path) -> Vec<Location> {
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?.trim_start_matches('/');
            if controllers.is_empty() {
                // v2: its own mount on hybrid hosts, the root on unified ones.
                let unified = root.join("unified");
                let base = if unified.join("cgroup.procs").exists() {
                    unified
                } else {
                    root.to_owned()
                };
                return Some(Location {
                    version: Version::V2,
                    controllers: Vec::new(),
                    dir: base.join(path),
                });
            }
            let names: Vec<String> = controllers.split(',').map(str::to_owned).collect();
            // A hierarchy is mounted at its joined controller list or at the name of one of
            // them (`cpu,cpuacct` with `cpu` and `cpuacct` symlinks, or separately).
            let mount_names = std::iter::once(controllers.trim_start_matches("name=").to_owned())
                .chain(
                    names
                        .iter()
                        .map(|n| n.trim_start_matches("name=").to_owned()),
                );
            let base = mount_names
                .map(|name| root.join(name))
                .find(|dir| dir.exists())?;
            Some(Location {
                version: Version::V1,
                controllers: names,
                dir: base.join(path),
            })
        })
        .collect()
}

/// The directory enforcing `controller` (`memory`, `cpu`): a v1 hierarchy with it, else the
/// v2 directory when that has the controller's files.
pub fn controller_dir(locations: &[Location], controller: &str) -> Option<(Version, PathBuf)> {
    let v1 = locations
        .iter()
        .find(|l| l.version == Version::V1 && l.controllers.iter().any(|c| c == controller));
    if let Some(location) = v1 {
        return Some((Version::V1, location.dir.clone()));
    }
    let probe = match controller {
        "memory" => "memory.current",
        _ => "cpu.stat",
    };
    locations
        .iter()
        .find(|l| l.version == Version::V2 && l.dir.join(probe).exists())
        .map(|l| (Version::V2, l.dir.clone()))
}

/// v1 reports "no limit" as a page-rounded `i64::MAX`; anything that large is unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// Parses a memory limit file's content; `None` means unlimited.
pub fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|v| *v < V1_UNLIMITED)
}

/// `nr_throttled` from a `cpu.stat` file (same key in v1 and v2).
pub fn parse_nr_throttled(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|line| line.strip_prefix("nr_throttled ")?.trim().parse().ok())
}

/// Memory charged to the cgroup and its limit (`None` when unlimited).
pub fn read_memory(version: Version, dir: &Path) -> Option<(u64, Option<u64>)> {
    let (usage, limit) = match version {
        Version::V1 => ("memory.usage_in_bytes", "memory.limit_in_bytes"),
        Version::V2 => ("memory.current", "memory.max"),
    };
    let usage = std::fs::read_to_string(dir.join(usage))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let limit = std::fs::read_to_string(dir.join(limit))
        .ok()
        .and_then(|t| parse_limit(&t));
    Some((usage, limit))
}

pub fn read_nr_throttled(dir: &Path) -> Option<u64> {
    parse_nr_throttled(&std::fs::read_to_string(dir.join("cpu.stat")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_layout_prefers_v1_controllers() {
        let root = tempfile::tempdir().expect("tempdir");
        for dir in ["memory/app", "cpu/app", "unified/app", "systemd/app"] {
            std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        }
        std::fs::write(root.path().join("unified/cgroup.procs"), "").expect("write");
        std::fs::write(root.path().join("unified/app/cpu.stat"), "usage_usec 1\n").expect("write");
        let text = "12:memory:/app\n5:cpu:/app\n1:name=systemd:/app\n0::/app\n";
        let locations = locate_in(text, root.path());
        assert_eq!(locations.len(), 4);
        assert_eq!(
            controller_dir(&locations, "memory"),
            Some((Version::V1, root.path().join("memory/app")))
        );
        assert_eq!(
            controller_dir(&locations, "cpu"),
            Some((Version::V1, root.path().join("cpu/app")))
        );
        assert_eq!(locations[2].dir, root.path().join("systemd/app"));
        assert_eq!(locations[3].dir, root.path().join("unified/app"));
    }

    #[test]
    fn pure_v2_layout() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("svc")).expect("mkdir");
        std::fs::write(root.path().join("svc/memory.current"), "1048576\n").expect("write");
        std::fs::write(root.path().join("svc/memory.max"), "max\n").expect("write");
        std::fs::write(
            root.path().join("svc/cpu.stat"),
            "nr_periods 10\nnr_throttled 4\n",
        )
        .expect("write");
        let locations = locate_in("0::/svc\n", root.path());
        let (version, dir) = controller_dir(&locations, "memory").expect("memory");
        assert_eq!(version, Version::V2);
        assert_eq!(read_memory(version, &dir), Some((1_048_576, None)));
        assert_eq!(read_nr_throttled(&dir), Some(4));
    }

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("268435456"), Some(268_435_456));
        assert_eq!(
            parse_nr_throttled("nr_periods 5\nnr_throttled 2\nthrottled_time 9\n"),
            Some(2)
        );
        assert_eq!(parse_nr_throttled("usage_usec 3\n"), None);
    }
}
