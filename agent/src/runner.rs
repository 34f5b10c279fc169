//! Runs jobs as child processes: one process group each, only their GPUs
//! visible, in their own cgroup or container where the job asks for limits or
//! an image (`isolation`), output kept in a directory per run, stopped with
//! SIGTERM then SIGKILL. Run directories are removed by a retention rule.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::os::fd::AsRawFd;

use anyhow::Context;
use coop_proto::v1 as pb;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::isolation::{Cgroups, RunCgroup, Runtime};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunKey {
    pub job: String,
    pub attempt: u32,
}

impl std::fmt::Display for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.job, self.attempt)
    }
}

#[derive(Debug)]
pub struct Exit {
    pub key: RunKey,
    pub at_ms: i64,
    pub exit_code: i32,
    pub reason: String,
}

struct Running {
    pgid: i32,
    exited: Arc<AtomicBool>,
    stopping: bool,
    /// The runtime and name of its container, if it runs in one.
    container: Option<(Runtime, String)>,
    /// The user it runs as, when runs get users of their own.
    uid: Option<u32>,
}

/// How runs are kept apart (see `isolation`).
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// Per-run cgroups, where the agent could set them up.
    pub cgroups: Option<Cgroups>,
    /// docker or podman, for jobs that name an image.
    pub runtime: Option<Runtime>,
    /// The GPUs' device files, for containers (`None`: simulated GPUs).
    pub gpu_devices: Option<crate::gpu::Devices>,
    /// Each run gets an unprivileged user of its own (the agent runs as root).
    pub run_users: bool,
    /// Each such run also gets a PID namespace of its own (where the kernel
    /// allows it: see `pid_namespaces_work`).
    pub pid_namespaces: bool,
}

/// Like systemd's DynamicUser, runs take uids that no account owns, from
/// 1,900,000,000 to 1,900,004,095: above the ranges systemd hands out
/// (DynamicUser's 61184-65519, nspawn's up to 1,879,048,191). Each agent
/// takes a block of 64 (chosen by its identity), each run the lowest uid of
/// the block that nothing runs as, and a group of the same number.
const RUN_UID_BASE: u32 = 1_900_000_000;
const RUN_UID_BLOCK: u32 = 64;

fn uid_block(agent: &str) -> u32 {
    // FNV-1a: stable across builds and platforms.
    let h = agent.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    RUN_UID_BASE + (h % 64) as u32 * RUN_UID_BLOCK
}

/// The runs of this agent process. Exits arrive on the channel given to `new`.
pub struct Runner {
    dir: PathBuf,
    runs: BTreeMap<RunKey, Running>,
    exits: mpsc::UnboundedSender<Exit>,
    isolation: Isolation,
    /// The agent's identity, in every run's environment (`AGENT_ENV`).
    agent: String,
}

/// Names the agent (its identity) in each run's environment, so that a
/// restarted agent finds its runs' processes even where it has no record.
pub const AGENT_ENV: &str = "COOP_AGENT_ID";

/// What `spawn` did.
pub enum Spawned {
    Started { at_ms: i64, pgid: i32 },
    Failed(Exit),
}

impl Runner {
    pub fn new(
        dir: PathBuf,
        exits: mpsc::UnboundedSender<Exit>,
        isolation: Isolation,
        agent: String,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("jobs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        if isolation.run_users {
            // Runs reach their own directory through these, and list nothing.
            traverse_only(&dir)?;
            traverse_only(&dir.join("jobs"))?;
        }
        Ok(Self {
            dir,
            runs: BTreeMap::new(),
            exits,
            isolation,
            agent,
        })
    }

    pub fn is_running(&self, key: &RunKey) -> bool {
        self.runs.contains_key(key)
    }

    pub fn keys(&self) -> Vec<RunKey> {
        self.runs.keys().cloned().collect()
    }

    fn run_dir(&self, key: &RunKey) -> PathBuf {
        self.dir
            .join("jobs")
            .join(&key.job)
            .join(key.attempt.to_string())
    }

    pub fn log_path(&self, key: &RunKey) -> PathBuf {
        self.run_dir(key).join("output.log")
    }

    /// Starts the run's command with exactly its GPUs visible, in a process
    /// group of its own, in its cgroup or container.
    pub fn spawn(&mut self, key: RunKey, run: &pb::Run) -> Spawned {
        let uid = match self.free_uid(run) {
            Ok(uid) => uid,
            Err(e) => {
                return Spawned::Failed(Exit {
                    key,
                    at_ms: now_ms(),
                    exit_code: 127,
                    reason: format!("spawn failed: {e}"),
                });
            }
        };
        match self.try_spawn(&key, run, uid) {
            Ok((pgid, child, cgroup, container)) => {
                let at_ms = now_ms();
                let exited = Arc::new(AtomicBool::new(false));
                self.runs.insert(
                    key.clone(),
                    Running {
                        pgid,
                        exited: exited.clone(),
                        stopping: false,
                        container: container.clone(),
                        uid,
                    },
                );
                let exits = self.exits.clone();
                let ends = Ends {
                    cgroup,
                    container,
                    memory_mb: run.memory_mb,
                    uid,
                    dir: self.run_dir(&key),
                };
                tokio::spawn(wait_child(key, pgid, child, exited, exits, ends));
                Spawned::Started { at_ms, pgid }
            }
            Err(e) => Spawned::Failed(Exit {
                key,
                at_ms: now_ms(),
                exit_code: 127,
                reason: format!("spawn failed: {e:#}"),
            }),
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_spawn(
        &self,
        key: &RunKey,
        run: &pb::Run,
        uid: Option<u32>,
    ) -> anyhow::Result<(
        i32,
        tokio::process::Child,
        Option<RunCgroup>,
        Option<(Runtime, String)>,
    )> {
        let dir = self.run_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Where the run works: with a user of its own, a directory that only
        // it can enter, beside (not holding) its output, which stays the
        // agent's: a run cannot swap the log for a link to another file.
        let work = match uid {
            Some(uid) => {
                use std::os::unix::fs::PermissionsExt;
                if let Some(job_dir) = dir.parent() {
                    traverse_only(job_dir)?;
                }
                traverse_only(&dir)?;
                let work = dir.join("work");
                std::fs::create_dir_all(&work)?;
                nix::unistd::chown(
                    &work,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(uid)),
                )
                .with_context(|| format!("giving {} to uid {uid}", work.display()))?;
                std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))?;
                work
            }
            None => dir.clone(),
        };
        // `--workdir`: a directory inside the run's own (the scheduler
        // refuses absolute paths and '..'; checked again here), made for the
        // run and given to its user. The run's directory is new, so no link
        // a job made can redirect it.
        let rel = std::path::Path::new(&run.workdir);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            anyhow::bail!("workdir {:?} leaves the run's directory", run.workdir);
        }
        let base = if run.image.is_empty() { &work } else { &dir };
        let start = base.join(rel);
        if !run.workdir.is_empty() {
            let mut at = base.clone();
            for c in rel.components() {
                if let std::path::Component::Normal(part) = c {
                    at.push(part);
                    match std::fs::symlink_metadata(&at) {
                        Ok(m) if m.is_dir() => continue,
                        Ok(_) => anyhow::bail!("workdir: {} is not a directory", at.display()),
                        Err(_) => std::fs::create_dir(&at)
                            .with_context(|| format!("creating {}", at.display()))?,
                    }
                    if let Some(uid) = uid {
                        nix::unistd::chown(
                            &at,
                            Some(nix::unistd::Uid::from_raw(uid)),
                            Some(nix::unistd::Gid::from_raw(uid)),
                        )
                        .with_context(|| format!("giving {} to uid {uid}", at.display()))?;
                    }
                }
            }
        }
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(dir.join("output.log"))?
        };
        let visible = run.gpus.join(",");
        // The member's variables first, so that the agent's own (the run's
        // GPUs and identity) win; the scheduler refuses those names anyway.
        let mut env: Vec<(&str, String)> = run
            .env
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("COOP_")
                    && !k.starts_with("NVIDIA_")
                    && !k.ends_with("_VISIBLE_DEVICES")
            })
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        env.extend([
            ("CUDA_VISIBLE_DEVICES", visible.clone()),
            ("NVIDIA_VISIBLE_DEVICES", visible),
            ("COOP_JOB_ID", key.job.clone()),
            ("COOP_JOB_ATTEMPT", key.attempt.to_string()),
            (AGENT_ENV, self.agent.clone()),
        ]);
        // Set by the scheduler from the job's own record (a member's COOP_*
        // variables are refused at submission and dropped above).
        if let Some(task) = run.array_task_id.filter(|_| !run.array_job_id.is_empty()) {
            env.extend([
                ("COOP_ARRAY_JOB_ID", run.array_job_id.clone()),
                ("COOP_ARRAY_TASK_ID", task.to_string()),
            ]);
        }
        if let Some(rv) = &run.rendezvous {
            env.extend(rendezvous_env(rv, run.gpus.len()));
        }
        let name = format!("coop-{}-{}", key.job, key.attempt);
        let iso = &self.isolation;
        let (argv, container, cgroup) = if run.image.is_empty() {
            // Limits need a cgroup; without one the run goes unlimited.
            let wants_limits = run.cpu_millis > 0 || run.memory_mb > 0;
            let cgroup = match &iso.cgroups {
                Some(cg) if wants_limits => {
                    Some(cg.create(&name, run.cpu_millis, run.memory_mb)?)
                }
                _ => None,
            };
            (run.command.clone(), None, cgroup)
        } else {
            let rt = iso.runtime.clone().context(
                "the job names an image, and this agent has no container runtime (docker or podman)",
            )?;
            let container = crate::isolation::Container {
                name: &name,
                image: &run.image,
                workdir: &dir,
                gpus: &run.gpus,
                devices: iso.gpu_devices.as_ref(),
                cpu_millis: run.cpu_millis,
                memory_mb: run.memory_mb,
                env: &env,
                command: &run.command,
                agent: &self.agent,
            };
            if let Some(why) = rt.cannot_pass(&container) {
                anyhow::bail!(why);
            }
            let mut argv = rt.command(&container);
            if !run.workdir.is_empty()
                && let Some(i) = argv.iter().position(|a| a == "--workdir")
                && i + 1 < argv.len()
            {
                argv[i + 1] = format!("/work/{}", run.workdir.trim_start_matches("./"));
            }
            (argv, Some((rt, name)), None)
        };
        let (program, args) = argv.split_first().context("empty command")?;
        let mut cmd = tokio::process::Command::new(program);
        if container.is_none() {
            // A job sees none of the agent's environment (its credential
            // files are named there, and tokens may be): only what it needs.
            cmd.env_clear()
                .envs(job_env(&work))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        }
        // A container's client (docker, podman) is the agent's own process,
        // with the agent's environment: the job's variables reach only the
        // container, as --env arguments (`LD_PRELOAD` or `PATH` of a member
        // must never reach a process that runs as the agent).
        cmd.args(args)
            .current_dir(if container.is_none() { &start } else { &work })
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if let Some(cg) = &cgroup {
            cmd.env("COOP_CGROUP", &cg.dir);
            let procs = cg.procs()?;
            let fd = procs.as_raw_fd();
            // SAFETY: between fork and exec only a write(2) to an open file
            // descriptor: no allocation, no lock. "0" moves the writer itself.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::unistd::write(fd, b"0")
                        .map(|_| ())
                        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
                });
            }
            if let Some(uid) = uid {
                drop_privileges(&mut cmd, uid, self.isolation.pid_namespaces);
            }
            let child = cmd.spawn().with_context(|| format!("{program:?}"))?;
            drop(procs);
            let pid = child.id().context("child has no pid")? as i32;
            return Ok((pid, child, cgroup, container));
        }
        if let Some(uid) = uid {
            drop_privileges(&mut cmd, uid, self.isolation.pid_namespaces);
        }
        let child = cmd.spawn().with_context(|| format!("{program:?}"))?;
        let pid = child.id().context("child has no pid")? as i32;
        Ok((pid, child, cgroup, container))
    }

    /// The uid for a new run, when runs get users of their own (not for
    /// containers, whose runtime maps users itself).
    /// Never root by default: with none free the run is refused.
    fn free_uid(&self, run: &pb::Run) -> anyhow::Result<Option<u32>> {
        if !self.isolation.run_users || !run.image.is_empty() {
            return Ok(None);
        }
        let base = uid_block(&self.agent);
        let mut taken: std::collections::BTreeSet<u32> =
            self.runs.values().filter_map(|r| r.uid).collect();
        // A uid is free only once nothing of an earlier run is left under it.
        taken.extend(uids_with_processes());
        (base..base + RUN_UID_BLOCK)
            .find(|u| !taken.contains(u))
            .map(Some)
            .context("every uid of this agent's block is still in use")
    }

    /// SIGTERM to the run's process group now, SIGKILL after `grace` if it is
    /// still there. Idempotent.
    pub fn stop(&mut self, key: &RunKey, grace: Duration) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        if run.stopping {
            return;
        }
        run.stopping = true;
        let _ = killpg(Pid::from_raw(run.pgid), Signal::SIGTERM);
        self.kill_after(key, grace);
    }

    /// As `stop`, but a run already stopping with a longer grace is killed
    /// after `grace` all the same (its GPU is gone: the grace is moot).
    pub fn stop_within(&mut self, key: &RunKey, grace: Duration) {
        if self.runs.get(key).is_some_and(|r| r.stopping) {
            self.kill_after(key, grace);
        } else {
            self.stop(key, grace);
        }
    }

    /// SIGKILL to the run's process group (and its container) after `grace`,
    /// unless it has exited by then.
    fn kill_after(&self, key: &RunKey, grace: Duration) {
        let Some(run) = self.runs.get(key) else {
            return;
        };
        let pgid = run.pgid;
        let exited = run.exited.clone();
        let container = run.container.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // The group id is not reused while the waiter has not reaped the leader.
            if !exited.load(Ordering::SeqCst) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                // The container outlives its killed client: kill it too.
                if let Some((rt, name)) = container {
                    remove_container(&rt, &name).await;
                }
            }
        });
    }

    /// Forgets a run whose exit was received.
    pub fn finished(&mut self, key: &RunKey) {
        self.runs.remove(key);
    }

    /// Stops every run and waits until all have exited (SIGKILL after `grace`).
    pub async fn stop_all(&mut self, grace: Duration, exits: &mut mpsc::UnboundedReceiver<Exit>) {
        for key in self.keys() {
            self.stop(&key, grace);
        }
        while !self.runs.is_empty() {
            match exits.recv().await {
                Some(exit) => self.finished(&exit.key),
                None => break,
            }
        }
    }

    /// Removes the directories of runs that are not running and were last
    /// written before `cutoff` (their output with them); returns how many.
    pub fn sweep(&self, cutoff: SystemTime) -> anyhow::Result<usize> {
        let mut removed = 0;
        let jobs = self.dir.join("jobs");
        for job in std::fs::read_dir(&jobs)? {
            let job = job?;
            let job_name = job.file_name().to_string_lossy().to_string();
            for attempt in std::fs::read_dir(job.path())? {
                let attempt = attempt?;
                let running = attempt
                    .file_name()
                    .to_str()
                    .and_then(|a| a.parse().ok())
                    .is_some_and(|attempt| {
                        self.is_running(&RunKey {
                            job: job_name.clone(),
                            attempt,
                        })
                    });
                if running || last_written(&attempt.path()) >= cutoff {
                    continue;
                }
                std::fs::remove_dir_all(attempt.path())?;
                removed += 1;
            }
            // The job's directory goes with its last run.
            let _ = std::fs::remove_dir(job.path());
        }
        Ok(removed)
    }

    /// Reads up to `limit` bytes of a run's output from `offset`.
    pub fn read_log(
        &self,
        key: &RunKey,
        offset: u64,
        limit: u32,
    ) -> anyhow::Result<(Vec<u8>, bool)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.log_path(key);
        // Never through a link: what a run left there is not followed.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|_| anyhow::anyhow!("no output is kept for run {key} on this node"))?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(offset.min(len)))?;
        let mut data = Vec::new();
        f.take(limit as u64).read_to_end(&mut data)?;
        let eof = offset + data.len() as u64 >= len && !self.is_running(key);
        Ok((data, eof))
    }
}

/// When anything directly in `dir` (or `dir` itself) was last modified.
fn last_written(dir: &std::path::Path) -> SystemTime {
    let modified = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH)
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| modified(&e.path()))
        .chain([modified(dir)])
        .max()
        .unwrap_or(UNIX_EPOCH)
}

/// Identifies a process across agent restarts: the boot and the process's
/// start time, so that a recycled pid is never taken for a run's.
pub fn process_tag(pid: i32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // starttime is field 22; `rest` starts at field 3.
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{}:{start}", boot.trim()))
}

/// The process groups of processes whose environment holds `name=value`
/// (other than this process's own group).
/// The real uids of every process on the machine.
fn uids_with_processes() -> std::collections::BTreeSet<u32> {
    processes().map(|(_, uid)| uid).collect()
}

/// (pid, real uid) of every process, from /proc.
fn processes() -> impl Iterator<Item = (i32, u32)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((pid, uid))
        })
}

/// SIGKILL to every process of `uid` (a run's own user), until none is left.
fn kill_uid(uid: u32) {
    for _ in 0..100 {
        let pids: Vec<i32> = processes()
            .filter(|&(_, u)| u == uid)
            .map(|(p, _)| p)
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets others pass through `dir` to what they may open, without listing it.
fn traverse_only(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// In the child, after everything that needs root (joining the cgroup): a
/// PID namespace of the run's own where asked, then no supplementary groups,
/// the run's gid and uid, and no way back up through setuid programs.
fn drop_privileges(cmd: &mut tokio::process::Command, uid: u32, pid_namespace: bool) {
    // SAFETY: only async-signal-safe system calls between fork and exec; the
    // empty group list is a static slice, nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let err = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
            if pid_namespace {
                enter_pid_namespace()?;
            }
            nix::unistd::setgroups(&[]).map_err(err)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).map_err(err)?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(err)?;
            nix::sys::prctl::set_no_new_privs().map_err(err)
        });
    }
}

/// What a job's environment holds besides its own variables: the agent's
/// search path, locale and time zone, and its run directory as home and
/// scratch. Nothing else of the agent's environment reaches it.
pub const PASSED_ENV: [&str; 4] = ["LANG", "LC_ALL", "TZ", "TERM"];

/// What launchers expect of one node's process of a multi-node run: the
/// variables torchrun's own processes and `torch.distributed` read, the same
/// as torchrun's options (`PET_*`, so that a bare `torchrun train.py` joins
/// the run), and coop's own.
pub fn rendezvous_env(rv: &pb::Rendezvous, local_gpus: usize) -> Vec<(&'static str, String)> {
    let master = rv.addresses.first().cloned().unwrap_or_default();
    let nodes = rv.addresses.len().to_string();
    let rank = rv.node_rank.to_string();
    let port = rv.port.to_string();
    let local = local_gpus.to_string();
    vec![
        ("MASTER_ADDR", master.clone()),
        ("MASTER_PORT", port.clone()),
        ("WORLD_SIZE", rv.world_size.to_string()),
        ("NNODES", nodes.clone()),
        ("NODE_RANK", rank.clone()),
        ("LOCAL_WORLD_SIZE", local.clone()),
        ("PET_NNODES", nodes.clone()),
        ("PET_NODE_RANK", rank.clone()),
        ("PET_MASTER_ADDR", master),
        ("PET_MASTER_PORT", port),
        ("PET_NPROC_PER_NODE", local),
        ("COOP_NODE_RANK", rank),
        ("COOP_NODES", rv.addresses.join(",")),
    ]
}

fn job_env(dir: &std::path::Path) -> Vec<(String, std::ffi::OsString)> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut env = vec![
        ("PATH".to_string(), path),
        ("HOME".to_string(), dir.as_os_str().to_owned()),
        ("TMPDIR".to_string(), dir.as_os_str().to_owned()),
    ];
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            env.push((k.to_string(), v));
        }
    }
    env
}

pub fn groups_with_env(name: &str, value: &str) -> Vec<i32> {
    let needle = format!("{name}={value}");
    let own = nix::unistd::getpgrp().as_raw();
    let mut groups: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .filter_map(|pid| nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok())
        .map(|g| g.as_raw())
        .filter(|g| *g != own)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Stops process groups a previous agent process left running: SIGTERM, then
/// SIGKILL to those still there after `grace`.
pub async fn stop_groups(pgids: &[i32], grace: Duration) {
    let alive = |pgid: i32| killpg(Pid::from_raw(pgid), None).is_ok();
    for pgid in pgids {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while pgids.iter().any(|p| alive(*p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pgid in pgids {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
}

/// In a freshly forked child, before exec (async-signal-safe calls only):
/// a PID and mount namespace of the run's own, with its own /proc, so that
/// the job sees no other process of the machine. Returns in the process
/// that goes on to exec the job, PID 2 of the namespace. The process the
/// agent spawned stays outside and ends as the run does; PID 1 waits for
/// the job and exits with it, and the kernel then kills whatever else the
/// run left in the namespace (`setsid` children included).
///
/// Signals: the agent's SIGTERM and SIGKILL go to the run's process group,
/// which all three share: the job gets them directly; the outside process
/// ignores SIGTERM (it must outlive the job's grace); PID 1, like any init,
/// ignores what it has no handler for, except SIGKILL.
fn enter_pid_namespace() -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    use nix::unistd::{ForkResult, fork};
    let err = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS).map_err(err)?;
    // SAFETY: this process is a single-threaded child between fork and exec.
    if let ForkResult::Parent { child } = unsafe { fork() }.map_err(err)? {
        outside(child);
    }
    // PID 1 of the new namespace: its own view of /proc, not the machine's.
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(err)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), flags, none).map_err(err)?;
    // SAFETY: as above.
    match unsafe { fork() }.map_err(err)? {
        ForkResult::Parent { child } => init(child),
        ForkResult::Child => Ok(()),
    }
}

/// Closes what the forked process inherited beyond stdio: the pipe through
/// which the agent learns that the job's exec worked must close when the
/// job execs, not stay open in processes that never exec.
fn close_inherited() {
    use nix::libc;
    // SAFETY: closing descriptors this process will never use again; plain
    // system calls.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9: one by one, as far as the limit goes.
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as i32
            } else {
                1024
            };
            for fd in 3..top {
                libc::close(fd);
            }
        }
    }
}

/// The exit status of `target` as a shell gives it (its code, or 128 +
/// signal), reaping any other child that ends meanwhile (`pid` -1: any).
fn wait_code(pid: i32, target: i32) -> Option<i32> {
    use nix::libc;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let p = unsafe { libc::waitpid(pid, &mut status, 0) };
        if p == -1 {
            if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                continue;
            }
            return None;
        }
        if p == target {
            if libc::WIFEXITED(status) {
                return Some(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                return Some(128 + libc::WTERMSIG(status));
            }
        }
    }
}

/// Neither helper process may dump core: each is a copy of the agent, with
/// its credentials in memory.
fn not_dumpable() {
    // SAFETY: a plain prctl.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// The process the agent spawned: waits outside the namespace for its
/// PID 1 and ends the way the job did (a signal death as that signal).
fn outside(init: Pid) -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    not_dumpable();
    close_inherited();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: setting a disposition, async-signal-safe.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    let code = wait_code(init.as_raw(), init.as_raw()).unwrap_or(127);
    // Only signals that simply end a process are mirrored: not those that
    // stop it or dump its core; the rest end as 128 + signal.
    if code > 128
        && let Ok(sig) = Signal::try_from(code - 128)
        && matches!(
            sig,
            Signal::SIGHUP
                | Signal::SIGINT
                | Signal::SIGKILL
                | Signal::SIGTERM
                | Signal::SIGPIPE
                | Signal::SIGALRM
                | Signal::SIGUSR1
                | Signal::SIGUSR2
        )
    {
        // SAFETY: as above.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        let _ = raise(sig);
    }
    // SAFETY: ending this process without running the parent's atexit handlers.
    unsafe { nix::libc::_exit(code) }
}

/// PID 1 of the run's namespace: reaps whatever ends in it and exits with
/// the job.
fn init(job: Pid) -> ! {
    not_dumpable();
    close_inherited();
    let code = wait_code(-1, job.as_raw()).unwrap_or(127);
    // SAFETY: as in `outside`.
    unsafe { nix::libc::_exit(code) }
}

/// Whether this machine gives runs PID namespaces of their own: a shell run
/// that way must find itself PID 2. Needs root.
pub fn pid_namespaces_work() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/sh");
    // PID 2, and a /proc of the namespace (a process of it has a small pid).
    cmd.args([
        "-c",
        "[ $$ -eq 2 ] && [ \"$(readlink /proc/self)\" -lt 100 ]",
    ]);
    // SAFETY: only async-signal-safe calls between fork and exec (see above).
    unsafe { cmd.pre_exec(enter_pid_namespace) };
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("a run in its own PID namespace ended with {s}")),
        Err(e) => Err(e.to_string()),
    }
}

/// What to clean up and look at when a run ends.
struct Ends {
    cgroup: Option<RunCgroup>,
    container: Option<(Runtime, String)>,
    memory_mb: u64,
    /// The run's own user, if it had one, and its directory.
    uid: Option<u32>,
    dir: PathBuf,
}

async fn remove_container(rt: &Runtime, name: &str) {
    let _ = tokio::process::Command::new(&rt.program)
        .args(["rm", "--force", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

async fn wait_child(
    key: RunKey,
    pgid: i32,
    mut child: tokio::process::Child,
    exited: Arc<AtomicBool>,
    exits: mpsc::UnboundedSender<Exit>,
    ends: Ends,
) {
    let (exit_code, reason) = match child.wait().await {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => (code, String::new()),
            (None, Some(sig)) => (128 + sig, format!("killed by signal {sig}")),
            (None, None) => (-1, "unknown exit status".to_string()),
        },
        Err(e) => (-1, format!("waiting for the process failed: {e}")),
    };
    exited.store(true, Ordering::SeqCst);
    // A job ends with its main process: whatever it left in its group goes too,
    // and with a user of its own, whatever runs as that user anywhere
    // (`setsid` escapes the group, not the uid). Its directory then closes to
    // the next run that gets the uid.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    if let Some(uid) = ends.uid {
        let _ = tokio::task::spawn_blocking(move || kill_uid(uid)).await;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&ends.dir, std::fs::Permissions::from_mode(0o700));
    }
    let mut reason = reason;
    if let Some(cg) = &ends.cgroup {
        if cg.oom_killed() {
            reason = format!("out of memory: its limit is {} MiB", ends.memory_mb);
        }
        cg.remove().await;
    }
    if let Some((rt, name)) = &ends.container {
        remove_container(rt, name).await;
    }
    let _ = exits.send(Exit {
        key,
        at_ms: now_ms(),
        exit_code,
        reason,
    });
}
