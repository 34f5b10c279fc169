//! Runs jobs as child processes: one process group each, only their GPUs
//! visible, output kept in a file per run, stopped with SIGTERM then SIGKILL.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
}

/// The runs of this agent process. Exits arrive on the channel given to `new`.
pub struct Runner {
    dir: PathBuf,
    runs: BTreeMap<RunKey, Running>,
    exits: mpsc::UnboundedSender<Exit>,
}

/// What `spawn` did.
pub enum Spawned {
    Started { at_ms: i64, pgid: i32 },
    Failed(Exit),
}

impl Runner {
    pub fn new(dir: PathBuf, exits: mpsc::UnboundedSender<Exit>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("jobs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            runs: BTreeMap::new(),
            exits,
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

    /// Starts `command` with exactly `gpus` visible, in a process group of its own.
    pub fn spawn(&mut self, key: RunKey, command: &[String], gpus: &[String]) -> Spawned {
        match self.try_spawn(&key, command, gpus) {
            Ok((pgid, child)) => {
                let at_ms = now_ms();
                let exited = Arc::new(AtomicBool::new(false));
                self.runs.insert(
                    key.clone(),
                    Running {
                        pgid,
                        exited: exited.clone(),
                        stopping: false,
                    },
                );
                let exits = self.exits.clone();
                tokio::spawn(wait_child(key, pgid, child, exited, exits));
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

    fn try_spawn(
        &self,
        key: &RunKey,
        command: &[String],
        gpus: &[String],
    ) -> anyhow::Result<(i32, tokio::process::Child)> {
        let dir = self.run_dir(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("output.log"))?;
        let (program, args) = command.split_first().context("empty command")?;
        let visible = gpus.join(",");
        let child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(&dir)
            .env("CUDA_VISIBLE_DEVICES", &visible)
            .env("NVIDIA_VISIBLE_DEVICES", &visible)
            .env("COOP_JOB_ID", &key.job)
            .env("COOP_JOB_ATTEMPT", key.attempt.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("{program:?}"))?;
        let pid = child.id().context("child has no pid")? as i32;
        Ok((pid, child))
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
        let pgid = run.pgid;
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        let exited = run.exited.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // The group id is not reused while the waiter has not reaped the leader.
            if !exited.load(Ordering::SeqCst) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
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

    /// Reads up to `limit` bytes of a run's output from `offset`.
    pub fn read_log(
        &self,
        key: &RunKey,
        offset: u64,
        limit: u32,
    ) -> anyhow::Result<(Vec<u8>, bool)> {
        let path = self.log_path(key);
        let mut f = std::fs::File::open(&path)
            .map_err(|_| anyhow::anyhow!("no output is kept for run {key} on this node"))?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(offset.min(len)))?;
        let mut data = Vec::new();
        f.take(limit as u64).read_to_end(&mut data)?;
        let eof = offset + data.len() as u64 >= len && !self.is_running(key);
        Ok((data, eof))
    }
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

async fn wait_child(
    key: RunKey,
    pgid: i32,
    mut child: tokio::process::Child,
    exited: Arc<AtomicBool>,
    exits: mpsc::UnboundedSender<Exit>,
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
    // A job ends with its main process: whatever it left in its group goes too.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let _ = exits.send(Exit {
        key,
        at_ms: now_ms(),
        exit_code,
        reason,
    });
}
