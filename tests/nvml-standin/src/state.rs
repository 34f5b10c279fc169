//! The library's process-wide state: the loaded scenario, the handle
//! registry and the event sets, behind one mutex.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use crate::scenario::{self, Device, MigDevice, Phase, Scenario};

/// `nvmlReturn_t`.
pub(crate) type Ret = u32;

pub(crate) const SUCCESS: Ret = 0;
pub(crate) const UNINITIALIZED: Ret = 1;
pub(crate) const INVALID_ARGUMENT: Ret = 2;
pub(crate) const NOT_SUPPORTED: Ret = 3;
pub(crate) const NOT_FOUND: Ret = 6;
pub(crate) const INSUFFICIENT_SIZE: Ret = 7;
pub(crate) const DRIVER_NOT_LOADED: Ret = 9;
pub(crate) const TIMEOUT: Ret = 10;
pub(crate) const GPU_IS_LOST: Ret = 15;
pub(crate) const UNKNOWN: Ret = 999;

/// Handle values: GPU handles are `GPU_BASE + id`, MIG handles
/// `MIG_BASE + id`, where `id` is the UUID's place in the registry (stable
/// for the life of the process, so a stale handle keeps naming its UUID).
/// Event sets are `SET_BASE + n`.
const GPU_BASE: usize = 0x1000;
const MIG_BASE: usize = 0x10_0000;
const SET_BASE: usize = 0x4000_0000;

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileSig {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
    dev: u64,
}

impl FileSig {
    fn of(m: &std::fs::Metadata) -> Self {
        FileSig {
            len: m.len(),
            mtime: m.modified().ok(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

#[derive(Default)]
struct Registry {
    uuids: Vec<String>,
    ids: HashMap<String, usize>,
}

impl Registry {
    fn id(&mut self, uuid: &str) -> usize {
        if let Some(&id) = self.ids.get(uuid) {
            return id;
        }
        let id = self.uuids.len();
        self.uuids.push(uuid.to_string());
        self.ids.insert(uuid.to_string(), id);
        id
    }
}

/// One event set: the GPUs registered for XID events, each with how many of
/// its `xids` this set has delivered or had happened before it registered.
#[derive(Default)]
struct EventSet {
    devices: Vec<(String, usize)>,
}

/// What a device handle names, resolved against the current scenario.
pub(crate) enum Target<'a> {
    Gpu {
        index: usize,
        dev: &'a Device,
    },
    Mig {
        parent: &'a Device,
        mig: &'a MigDevice,
    },
}

#[derive(Default)]
pub(crate) struct State {
    refcount: u32,
    path: Option<PathBuf>,
    sig: Option<FileSig>,
    /// The last good scenario.
    pub(crate) scenario: Scenario,
    /// Set while the file on disk is malformed: every call is UNKNOWN.
    broken: bool,
    /// Time zero when the scenario has no `start_unix_ms`: the first load.
    origin_ms: Option<u64>,
    registry: Registry,
    sets: HashMap<usize, EventSet>,
    next_set: usize,
}

enum LoadError {
    Unreadable,
    Malformed(String),
}

fn load(path: &PathBuf) -> Result<(FileSig, Scenario), LoadError> {
    let mut f = std::fs::File::open(path).map_err(|_| LoadError::Unreadable)?;
    let sig = FileSig::of(&f.metadata().map_err(|_| LoadError::Unreadable)?);
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => LoadError::Malformed("not UTF-8".to_string()),
        _ => LoadError::Unreadable,
    })?;
    let scenario = scenario::parse(&text).map_err(LoadError::Malformed)?;
    Ok((sig, scenario))
}

fn complain(path: &std::path::Path, msg: &str) {
    eprintln!("nvml-standin: malformed scenario {}: {msg}", path.display());
}

pub(crate) fn lock() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    /// `nvmlInit_v2`: (re)reads the environment and the file, then counts
    /// one more init.
    pub(crate) fn init(&mut self) -> Ret {
        let Some(path) = std::env::var_os(scenario::ENV_VAR) else {
            return DRIVER_NOT_LOADED;
        };
        let path = PathBuf::from(path);
        let (sig, scenario) = match load(&path) {
            Ok(loaded) => loaded,
            Err(LoadError::Unreadable) => return DRIVER_NOT_LOADED,
            Err(LoadError::Malformed(msg)) => {
                complain(&path, &msg);
                return UNKNOWN;
            }
        };
        if let Some(code) = scenario.init_error.filter(|&c| c != SUCCESS) {
            return code;
        }
        self.path = Some(path);
        self.sig = Some(sig);
        self.scenario = scenario;
        self.broken = false;
        self.origin_ms.get_or_insert_with(scenario::now_unix_ms);
        self.refcount = self.refcount.saturating_add(1);
        SUCCESS
    }

    pub(crate) fn shutdown(&mut self) -> Ret {
        if self.refcount == 0 {
            return UNINITIALIZED;
        }
        self.refcount -= 1;
        if self.refcount == 0 {
            self.sets.clear();
        }
        SUCCESS
    }

    /// Before every call but init: initialised, and the scenario current.
    /// A file that vanished keeps the last good scenario; a malformed one
    /// makes calls UNKNOWN until it is fixed.
    pub(crate) fn ready(&mut self) -> Result<(), Ret> {
        if self.refcount == 0 {
            return Err(UNINITIALIZED);
        }
        let Some(path) = self.path.clone() else {
            return Err(UNINITIALIZED);
        };
        if let Ok(meta) = std::fs::metadata(&path)
            && Some(FileSig::of(&meta)) != self.sig
        {
            match load(&path) {
                Ok((sig, scenario)) => {
                    self.sig = Some(sig);
                    self.scenario = scenario;
                    self.broken = false;
                }
                Err(LoadError::Unreadable) => {}
                Err(LoadError::Malformed(msg)) => {
                    complain(&path, &msg);
                    self.sig = Some(FileSig::of(&meta));
                    self.broken = true;
                }
            }
        }
        if self.broken { Err(UNKNOWN) } else { Ok(()) }
    }

    pub(crate) fn start_ms(&self) -> u64 {
        self.scenario
            .start_unix_ms
            .or(self.origin_ms)
            .unwrap_or_default()
    }

    /// The readings of `dev` now.
    pub(crate) fn phase(&self, dev: &Device) -> Phase {
        scenario::phase_at(dev, self.start_ms(), scenario::now_unix_ms())
    }

    /// The energy counter of `dev` now.
    pub(crate) fn energy(&self, dev: &Device) -> u64 {
        scenario::energy_mj(dev, self.start_ms(), scenario::now_unix_ms())
    }

    pub(crate) fn gpu_handle(&mut self, uuid: &str) -> usize {
        GPU_BASE + self.registry.id(uuid)
    }

    fn mig_handle(&mut self, uuid: &str) -> usize {
        MIG_BASE + self.registry.id(uuid)
    }

    /// A handle to a device, refusing unknown handles (INVALID_ARGUMENT),
    /// lost GPUs and GPUs no longer in the file (GPU_IS_LOST).
    pub(crate) fn resolve(&self, handle: usize) -> Result<Target<'_>, Ret> {
        let (is_mig, id) = if (MIG_BASE..SET_BASE).contains(&handle) {
            (true, handle - MIG_BASE)
        } else if (GPU_BASE..MIG_BASE).contains(&handle) {
            (false, handle - GPU_BASE)
        } else {
            return Err(INVALID_ARGUMENT);
        };
        let uuid = self.registry.uuids.get(id).ok_or(INVALID_ARGUMENT)?;
        let devices = &self.scenario.devices;
        let target = if is_mig {
            devices.iter().find_map(|parent| {
                let mig = parent.mig.iter().find(|m| &m.uuid == uuid)?;
                Some(Target::Mig { parent, mig })
            })
        } else {
            devices
                .iter()
                .enumerate()
                .find(|(_, d)| &d.uuid == uuid)
                .map(|(index, dev)| Target::Gpu { index, dev })
        };
        match target {
            None => Err(GPU_IS_LOST),
            Some(Target::Gpu { dev, .. } | Target::Mig { parent: dev, .. }) if dev.lost => {
                Err(GPU_IS_LOST)
            }
            Some(t) => Ok(t),
        }
    }

    /// The handle of a GPU or MIG device by UUID.
    pub(crate) fn handle_by_uuid(&mut self, uuid: &str) -> Result<usize, Ret> {
        let found = self.scenario.devices.iter().find_map(|d| {
            if d.uuid == uuid {
                Some((d.lost, false))
            } else {
                d.mig
                    .iter()
                    .any(|m| m.uuid == uuid)
                    .then_some((d.lost, true))
            }
        });
        match found {
            None => Err(NOT_FOUND),
            Some((true, _)) => Err(GPU_IS_LOST),
            Some((false, false)) => Ok(self.gpu_handle(uuid)),
            Some((false, true)) => Ok(self.mig_handle(uuid)),
        }
    }

    pub(crate) fn mig_handle_by_index(&mut self, gpu: usize, index: u32) -> Result<usize, Ret> {
        let dev = match self.resolve(gpu)? {
            Target::Gpu { dev, .. } => dev,
            Target::Mig { .. } => return Err(INVALID_ARGUMENT),
        };
        if dev.mig.is_empty() {
            return Err(NOT_SUPPORTED);
        }
        match dev.mig.get(index as usize) {
            Some(m) => {
                let uuid = m.uuid.clone();
                Ok(self.mig_handle(&uuid))
            }
            None if index < dev.effective_mig_slots() => Err(NOT_FOUND),
            None => Err(INVALID_ARGUMENT),
        }
    }

    pub(crate) fn create_set(&mut self) -> usize {
        let handle = SET_BASE + self.next_set;
        self.next_set += 1;
        self.sets.insert(handle, EventSet::default());
        handle
    }

    pub(crate) fn free_set(&mut self, set: usize) -> Ret {
        match self.sets.remove(&set) {
            Some(_) => SUCCESS,
            None => INVALID_ARGUMENT,
        }
    }

    pub(crate) fn register(&mut self, dev: usize, types: u64, set: usize) -> Result<(), Ret> {
        if !self.sets.contains_key(&set) {
            return Err(INVALID_ARGUMENT);
        }
        // Like NVML, a set hears of errors from its registration on.
        let (uuid, seen) = match self.resolve(dev)? {
            Target::Gpu { dev, .. } => (dev.uuid.clone(), dev.xids.len()),
            Target::Mig { .. } => return Err(NOT_SUPPORTED),
        };
        let Some(set) = self.sets.get_mut(&set) else {
            return Err(INVALID_ARGUMENT);
        };
        if types & scenario::XID_EVENT != 0 && !set.devices.iter().any(|(u, _)| *u == uuid) {
            set.devices.push((uuid, seen));
        }
        Ok(())
    }

    /// The next undelivered XID of any GPU registered in `set`: its GPU's
    /// handle and the XID, marked delivered.
    pub(crate) fn next_xid(&mut self, set: usize) -> Result<Option<(usize, u64)>, Ret> {
        let devices = &self.scenario.devices;
        let set = self.sets.get_mut(&set).ok_or(INVALID_ARGUMENT)?;
        let next = set.devices.iter_mut().find_map(|(uuid, delivered)| {
            let dev = devices.iter().find(|d| d.uuid == *uuid)?;
            let xid = *dev.xids.get(*delivered)?;
            *delivered += 1;
            Some((uuid.clone(), xid))
        });
        Ok(next.map(|(uuid, xid)| (self.gpu_handle(&uuid), xid)))
    }
}
