//! Keeping runs apart beyond their GPUs: a cgroup v2 per run with the CPU and
//! memory limits its job asked for, where the agent has a delegated, writable
//! cgroup (systemd `Delegate=yes`, or root on a cgroup v2 machine); and, for
//! jobs that name an image, a container through docker or podman with only
//! the run's GPUs passed in.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Per-run cgroups under `base`, whose children get the cpu and memory
/// controllers.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
}

/// The cgroup v2 path of this process, from the contents of /proc/self/cgroup.
pub fn own_cgroup(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

impl Cgroups {
    /// Prepares per-run cgroups under `root`, or under the agent's own cgroup;
    /// says why not where that cannot be done.
    pub fn detect(root: Option<&Path>) -> Result<Cgroups, String> {
        let base = match root {
            Some(r) => r.to_path_buf(),
            None => {
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                let own = own_cgroup(&own)
                    .ok_or("cgroup v2 is not in use (no 0:: line in /proc/self/cgroup)")?
                    .to_string();
                let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                let mount = cgroup2_mount(&mounts).ok_or("no cgroup2 file system is mounted")?;
                mount.join(own.trim_start_matches('/'))
            }
        };
        let controllers = std::fs::read_to_string(base.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", base.display()))?;
        let have: Vec<&str> = controllers.split_whitespace().collect();
        if !(have.contains(&"cpu") && have.contains(&"memory")) {
            return Err(format!(
                "{}: the cpu and memory controllers are not delegated here (it has: {})",
                base.display(),
                controllers.trim()
            ));
        }
        // A cgroup that holds processes cannot hand controllers to children:
        // the agent moves itself into a leaf of its own first.
        let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
        let me = std::process::id().to_string();
        if procs.split_whitespace().any(|p| p != me) {
            // Not ours to rearrange (a login session, a shared container).
            return Err(format!(
                "{}: other processes share the agent's cgroup; run the agent as a systemd \
                 service with Delegate=yes, or give --cgroup-root",
                base.display()
            ));
        }
        if !procs.trim().is_empty() {
            let leaf = base.join("coop-agent");
            create_dir(&leaf).map_err(|e| format!("{e:#}"))?;
            write(&leaf.join("cgroup.procs"), "0").map_err(|e| format!("{e:#}"))?;
        }
        write(&base.join("cgroup.subtree_control"), "+cpu +memory")
            .map_err(|e| format!("{e:#}"))?;
        Ok(Cgroups { base })
    }

    /// A cgroup for one run, with its limits (0 = none).
    pub fn create(&self, name: &str, cpu_millis: u64, memory_mb: u64) -> anyhow::Result<RunCgroup> {
        let dir = self.base.join(name);
        // Left by a crashed agent: empty by now (its processes were stopped).
        let _ = std::fs::remove_dir(&dir);
        create_dir(&dir)?;
        let cg = RunCgroup { dir };
        if cpu_millis > 0 {
            // Quota per 100 ms period: a thousandth of a CPU is 100 µs.
            write(
                &cg.dir.join("cpu.max"),
                &format!("{} 100000", cpu_millis * 100),
            )?;
        }
        if memory_mb > 0 {
            write(
                &cg.dir.join("memory.max"),
                &(memory_mb * 1024 * 1024).to_string(),
            )?;
        }
        Ok(cg)
    }
}

/// One run's cgroup. Its processes join it between fork and exec.
#[derive(Debug)]
pub struct RunCgroup {
    pub dir: PathBuf,
}

impl RunCgroup {
    /// Opens `cgroup.procs` for the child to write itself into.
    pub fn procs(&self) -> anyhow::Result<std::fs::File> {
        let p = self.dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    /// Whether the kernel's OOM killer killed something in it.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
    }

    /// Removes the cgroup once its processes are gone.
    pub async fn remove(&self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            // The killed processes are still being reaped.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::warn!("could not remove cgroup {}", self.dir.display());
    }
}

fn create_dir(p: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", p.display())),
    }
}

fn write(p: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .with_context(|| format!("writing {value:?} to {}", p.display()))
}

/// The device files of a machine's GPUs, for containers: each GPU's (by
/// UUID), and those every GPU container needs (`/dev/nvidiactl`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub per_gpu: std::collections::BTreeMap<String, Vec<String>>,
    pub shared: Vec<String>,
}

/// docker or podman, and how each is told which GPUs a container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub program: String,
    /// Podman is given GPUs through CDI where the NVIDIA container toolkit
    /// wrote a spec (`nvidia-ctk cdi generate`), else by device file.
    pub cdi: bool,
}

/// One run's container (see `Runtime::command`).
pub struct Container<'a> {
    pub name: &'a str,
    pub image: &'a str,
    /// The run's directory, mounted at /work.
    pub workdir: &'a Path,
    pub gpus: &'a [String],
    /// The machine's GPU device files; `None` for simulated GPUs (nothing
    /// to pass in).
    pub devices: Option<&'a Devices>,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub env: &'a [(&'a str, String)],
    pub command: &'a [String],
    /// The agent's identity, as a label: a restarted agent finds the
    /// containers a crashed one left by it.
    pub agent: &'a str,
}

/// The label that names a container's agent.
pub const AGENT_LABEL: &str = "coop.agent";

impl Runtime {
    /// `auto` takes podman, then docker, whichever is on PATH.
    pub fn find(choice: &str) -> Option<Runtime> {
        let candidates: &[&str] = match choice {
            "auto" => &["podman", "docker"],
            other => &[other],
        };
        candidates.iter().find(|p| on_path(p)).map(|p| Runtime {
            program: p.to_string(),
            cdi: nvidia_cdi_spec(),
        })
    }

    fn is_podman(&self) -> bool {
        Path::new(&self.program)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("podman"))
    }

    /// Why this runtime cannot give the container its GPUs, if it cannot:
    /// a MIG instance needs CDI, or the container would get its whole board.
    pub fn cannot_pass(&self, c: &Container) -> Option<String> {
        let mig = c.gpus.iter().find(|g| g.starts_with("MIG-"))?;
        (c.devices.is_some() && self.is_podman() && !self.cdi).then(|| {
            format!(
                "MIG instance {mig} cannot be passed to a podman container without CDI \
                 (nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml, then restart the agent)"
            )
        })
    }

    /// The command that runs the container: the run's directory as its
    /// working directory, only the run's GPUs passed in, and the job's limits.
    pub fn command(&self, c: &Container) -> Vec<String> {
        let mut argv: Vec<String> = vec![
            self.program.clone(),
            "run".into(),
            "--rm".into(),
            "--init".into(),
            "--name".into(),
            c.name.into(),
            "--label".into(),
            format!("{AGENT_LABEL}={}", c.agent),
            "--volume".into(),
            format!("{}:/work", c.workdir.display()),
            "--workdir".into(),
            "/work".into(),
        ];
        if let Some(devices) = c.devices.filter(|_| !c.gpus.is_empty()) {
            if !self.is_podman() {
                argv.extend(["--gpus".into(), format!("\"device={}\"", c.gpus.join(","))]);
            } else if self.cdi {
                for g in c.gpus {
                    argv.extend(["--device".into(), format!("nvidia.com/gpu={g}")]);
                }
            } else {
                // The run's GPUs' device files and the driver's shared ones,
                // nothing else; the NVIDIA hook, where installed, reads
                // NVIDIA_VISIBLE_DEVICES for the libraries.
                let mut files: Vec<&String> = c
                    .gpus
                    .iter()
                    .filter_map(|g| devices.per_gpu.get(g))
                    .flatten()
                    .collect();
                files.sort();
                files.dedup();
                files.extend(&devices.shared);
                for f in files {
                    argv.extend(["--device".into(), f.clone()]);
                }
            }
        }
        if c.cpu_millis > 0 {
            argv.extend([
                "--cpus".into(),
                format!("{}.{:03}", c.cpu_millis / 1000, c.cpu_millis % 1000),
            ]);
        }
        if c.memory_mb > 0 {
            argv.extend(["--memory".into(), format!("{}m", c.memory_mb)]);
        }
        for (k, v) in c.env {
            argv.extend(["--env".into(), format!("{k}={v}")]);
        }
        argv.push(c.image.into());
        argv.extend(c.command.iter().cloned());
        argv
    }

    /// Removes every container labelled with `agent` (those a crashed
    /// agent left running); returns their names.
    pub async fn remove_containers_of(&self, agent: &str) -> anyhow::Result<Vec<String>> {
        // A runtime stuck behind a GPU's driver must not hold up the agent.
        const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
        let run = |args: Vec<String>| async move {
            let out = tokio::time::timeout(
                PATIENCE,
                tokio::process::Command::new(&self.program)
                    .args(&args)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} {}: no answer in {PATIENCE:?}", self.program, args[0])
            })?
            .with_context(|| format!("{} {}", self.program, args[0]))?;
            if !out.status.success() {
                anyhow::bail!(
                    "{} {}: {}",
                    self.program,
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        };
        let names: Vec<String> = run(vec![
            "ps".into(),
            "--all".into(),
            "--filter".into(),
            format!("label={AGENT_LABEL}={agent}"),
            "--format".into(),
            "{{.Names}}".into(),
        ])
        .await?
        .split_whitespace()
        .map(str::to_string)
        .collect();
        // Every one is tried; the first failure is reported.
        let mut failed = None;
        for n in &names {
            if let Err(e) = run(vec!["rm".into(), "--force".into(), n.clone()]).await {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(names),
        }
    }
}

/// Whether the NVIDIA container toolkit wrote a CDI spec for its GPUs.
fn nvidia_cdi_spec() -> bool {
    ["/etc/cdi", "/var/run/cdi"].iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("nvidia.com/gpu"))
            })
        })
    })
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_cgroup_and_the_cgroup2_mount_are_read_from_proc() {
        let hybrid = "4:memory:/user\n1:cpu:/\n0::/system.slice/coop-agent.service\n";
        assert_eq!(own_cgroup(hybrid), Some("/system.slice/coop-agent.service"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None, "cgroup v1 only");
        let mounts = "\
25 30 0:22 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 30 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("25 30 0:22 / /x rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn limits_are_written_as_the_kernel_reads_them() {
        // A directory standing in for a delegated cgroup: the files the
        // kernel would provide are created by hand.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroups::detect(Some(dir.path())).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        for f in ["cpu.max", "memory.max"] {
            std::fs::write(run_dir.join(f), "").unwrap();
        }
        let run = cg.create("run", 1500, 2048).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.dir.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(run.dir.join("memory.max")).unwrap(),
            (2048u64 << 20).to_string()
        );
    }

    #[test]
    fn a_cgroup_without_the_controllers_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let err = Cgroups::detect(Some(dir.path())).unwrap_err();
        assert!(
            err.contains("cpu and memory controllers are not delegated"),
            "{err}"
        );
        assert!(err.contains("hugetlb"), "{err}");
    }

    #[test]
    fn containers_get_only_their_gpus_and_their_limits() {
        let docker = Runtime {
            program: "docker".into(),
            cdi: false,
        };
        let gpus = vec!["GPU-a".to_string(), "GPU-c".to_string()];
        let env = [("COOP_JOB_ID", "j".to_string())];
        let cmd = ["python".to_string(), "train.py".to_string()];
        let devices = Devices {
            per_gpu: [
                ("GPU-a", "/dev/nvidia0"),
                ("GPU-b", "/dev/nvidia1"),
                ("GPU-c", "/dev/nvidia2"),
            ]
            .into_iter()
            .map(|(g, d)| (g.to_string(), vec![d.to_string()]))
            .collect(),
            shared: vec!["/dev/nvidiactl".into()],
        };
        let run = Container {
            name: "coop-j-1",
            image: "pytorch:24",
            workdir: Path::new("/d/j/1"),
            gpus: &gpus,
            devices: Some(&devices),
            cpu_millis: 1500,
            memory_mb: 4096,
            env: &env,
            command: &cmd,
            agent: "A1",
        };
        let line = docker.command(&run).join(" ");
        assert!(
            line.starts_with(
                "docker run --rm --init --name coop-j-1 --label coop.agent=A1 --volume /d/j/1:/work --workdir /work"
            ),
            "{line}"
        );
        assert!(line.contains("--gpus \"device=GPU-a,GPU-c\""), "{line}");
        assert!(
            line.contains(
                "--cpus 1.500 --memory 4096m --env COOP_JOB_ID=j pytorch:24 python train.py"
            ),
            "{line}"
        );

        let mut podman = Runtime {
            program: "/usr/bin/podman".into(),
            cdi: true,
        };
        let line = podman.command(&run).join(" ");
        assert!(
            line.contains("--device nvidia.com/gpu=GPU-a --device nvidia.com/gpu=GPU-c --cpus"),
            "{line}"
        );
        podman.cdi = false;
        let line = podman.command(&run).join(" ");
        assert!(
            line.contains(
                "--device /dev/nvidia0 --device /dev/nvidia2 --device /dev/nvidiactl --cpus"
            ),
            "{line}"
        );
        assert!(!line.contains("/dev/nvidia1"), "{line}");
        // Simulated GPUs are not devices: nothing to pass.
        let sim = Container {
            devices: None,
            ..run
        };
        let line = podman.command(&sim).join(" ");
        assert!(!line.contains("nvidia"), "{line}");

        // A MIG instance by device file would be its whole board: refused
        // without CDI.
        let mig = vec!["MIG-a".to_string()];
        let slice = Container {
            gpus: &mig,
            devices: Some(&devices),
            ..sim
        };
        let why = podman.cannot_pass(&slice).expect("refused without CDI");
        assert!(why.contains("MIG-a") && why.contains("CDI"), "{why}");
        assert_eq!(podman.cannot_pass(&run), None, "whole GPUs pass");
        podman.cdi = true;
        assert_eq!(podman.cannot_pass(&slice), None);
        assert_eq!(docker.cannot_pass(&slice), None);
    }
}
