//! One data dir, one process: an exclusive lock held while the process runs.
//!
//! Two schedulers on one raft log would both lead it and acknowledge
//! different writes; the lock makes the second one exit at once instead.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, anyhow};
use nix::fcntl::{Flock, FlockArg};

/// The file the lock is taken on, in the data dir.
pub const LOCK_FILE: &str = "scheduler.lock";

/// Held while the scheduler runs; released when dropped (or the process dies).
pub struct DirLock {
    _held: Flock<std::fs::File>,
}

/// Takes the lock on `dir/file`, naming `what` holds it otherwise. The
/// holder's pid is written into the file so that the refusal can name it.
pub fn lock(dir: &Path, file: &str, what: &str) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(file);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut held = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        let by = match pid.trim() {
            "" => format!("another {what} ({e})"),
            p => format!("another {what} (pid {p})"),
        };
        anyhow!(
            "data-dir: {} is in use by {by}; each {what} needs its own",
            dir.display()
        )
    })?;
    held.set_len(0)?;
    write!(held, "{}", std::process::id())?;
    held.flush()?;
    Ok(DirLock { _held: held })
}

/// Whether `dir/file` is free (nobody holds the lock); does not keep it.
pub fn check(dir: &Path, file: &str, what: &str) -> anyhow::Result<()> {
    if !dir.join(file).exists() {
        return Ok(());
    }
    lock(dir, file, what).map(drop)
}
