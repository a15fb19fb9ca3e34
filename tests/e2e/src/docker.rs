//! A private Docker Engine for tests, as ../shared/ENVIRONMENT.md describes: Debian's dockerd
//! in its own mount namespace (tmpfs on `/run` and `/etc/docker`), all state in a scratch
//! directory, no networking set up, containers under a cgroup of the test's own. There is no
//! registry: images are imported from a tarball (a busybox-static root filesystem). Dropping
//! it kills and removes everything it started.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{wait_for, Proc};

const START: &str = r#"set -e
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /etc/docker
exec dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" -H "unix://$DIR/docker.sock" \
  --pidfile "$DIR/docker.pid" --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
  --userland-proxy=false --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent="/$GROUP"
"#;

pub struct DockerEngine {
    dir: tempfile::TempDir,
    group: String,
    engine: Option<Proc>,
}

impl DockerEngine {
    pub fn start() -> Result<Self> {
        if !Path::new("/usr/sbin/dockerd").exists() {
            bail!("dockerd is not installed; run `cargo xtask setup`");
        }
        let dir = tempfile::Builder::new()
            .prefix("selfheal-docker-")
            .tempdir()?;
        let group = format!("selfheal-test-docker-{}", std::process::id());
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "bash", "-c", START])
            .env("DIR", dir.path())
            .env("GROUP", &group);
        let engine = Proc::spawn_logged("dockerd", command, &dir.path().join("dockerd.log"))?;
        let mut this = Self {
            dir,
            group,
            engine: Some(engine),
        };
        let ready = wait_for("the Docker Engine API", Duration::from_secs(30), || {
            if let Some(status) = this.engine.as_mut().and_then(Proc::try_status) {
                return Some(Err(status));
            }
            this.docker(&["version", "--format", "{{.Server.APIVersion}}"])
                .ok()
                .map(Ok)
        })?;
        if let Err(status) = ready {
            let log =
                std::fs::read_to_string(this.dir.path().join("dockerd.log")).unwrap_or_default();
            bail!("dockerd exited ({status}):\n{log}");
        }
        Ok(this)
    }

    /// The engine's API socket.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Runs the docker CLI against this engine; its trimmed stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket().display()))
            .output()
            .context("cannot run the docker CLI")?;
        if !output.status.success() {
            bail!(
                "docker {args:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Imports a busybox-static root filesystem as image `name`.
    pub fn import_busybox(&self, name: &str) -> Result<()> {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            bail!("busybox-static is not installed; run `cargo xtask setup`");
        }
        let rootfs = self.dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::copy(busybox, rootfs.join("bin/busybox"))?;
        for applet in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        self.import_rootfs(&rootfs, name)
    }

    /// Imports the directory `rootfs` as image `name`.
    fn import_rootfs(&self, rootfs: &Path, name: &str) -> Result<()> {
        let tar = rootfs.with_extension("tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?;
        if !status.success() {
            bail!("tar failed ({status})");
        }
        self.docker(&["import", &tar.display().to_string(), name])
            .map(|_| ())
    }

    /// Imports the busybox image (as `selfheal-test:latest`) and runs container `name`
    /// sleeping for an hour; its process id. busybox `sleep` as PID 1 ignores SIGTERM, so a
    /// `docker restart -t 1` kills it after the second.
    pub fn start_sleeper(&self, name: &str) -> Result<u32> {
        self.import_busybox("selfheal-test:latest")?;
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "selfheal-test:latest",
            "/bin/sleep",
            "3600",
        ])?;
        self.pid(name)
    }

    /// Imports `binary` with the shared libraries `ldd` names for it as image `name`, the
    /// binary at `/<file name>`.
    pub fn import_binary(&self, name: &str, binary: &Path) -> Result<()> {
        let rootfs = self
            .dir
            .path()
            .join(format!("rootfs-{}", name.replace([':', '/'], "-")));
        std::fs::create_dir_all(rootfs.join("tmp"))?;
        let file = binary
            .file_name()
            .with_context(|| format!("{} has no file name", binary.display()))?;
        std::fs::copy(binary, rootfs.join(file))
            .with_context(|| format!("copying {}", binary.display()))?;
        let ldd = Command::new("ldd").arg(binary).output()?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`
            let path = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            let Some(path) = path else { continue };
            let target = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(path, &target).with_context(|| format!("copying {path}"))?;
        }
        self.import_rootfs(&rootfs, name)
    }

    /// Runs the demo backend as container `name` on the host's network (the engine sets up
    /// none of its own), listening on `port` and using `database_url`, with `extra` `docker
    /// run` options (`--memory 256m`); its process id once it answers `/health`.
    pub fn start_demo_backend(
        &self,
        name: &str,
        database_url: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<u32> {
        self.import_binary("selfheal-demo:latest", &crate::bin("demo-backend"))?;
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["run", "-d", "--name", name, "--network", "host"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "selfheal-demo:latest",
            "/demo-backend",
            "--listen",
            &listen,
            "--database-url",
            database_url,
        ]);
        self.docker(&args)?;
        let health = format!("http://{listen}/health");
        wait_for(
            "the containerized backend to answer",
            Duration::from_secs(30),
            || crate::http().get(&health).call().ok(),
        )
        .with_context(|| {
            format!(
                "container logs:\n{}",
                self.docker(&["logs", name]).unwrap_or_default()
            )
        })?;
        self.pid(name)
    }

    /// `State.Pid` of a container (0 when it is not running).
    pub fn pid(&self, container: &str) -> Result<u32> {
        let out = self.docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        out.parse()
            .with_context(|| format!("inspect answered {out:?}"))
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            for id in ids.lines() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        if let Some(mut engine) = self.engine.take() {
            engine.stop();
        }
        crate::kill_cgroup(&self.group);
        crate::remove_cgroup(&self.group);
    }
}
