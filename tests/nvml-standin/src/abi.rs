//! The exported NVML symbols, with NVML's C signatures and struct layouts
//! (as nvml-wrapper-sys 0.10 declares them). Every body runs under
//! `catch_unwind`: nothing unwinds into C.

#![allow(non_snake_case)]

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crate::scenario::XID_EVENT;
use crate::state::{
    INSUFFICIENT_SIZE, INVALID_ARGUMENT, NOT_SUPPORTED, Ret, SUCCESS, State, TIMEOUT, Target,
    UNINITIALIZED, UNKNOWN, lock,
};

/// `nvmlDevice_t` and `nvmlEventSet_t`: opaque pointers whose addresses the
/// library chooses.
type Handle = *mut c_void;

/// `nvmlMemory_t`.
#[repr(C)]
pub(crate) struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub(crate) struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub(crate) struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlEventData_t` as `nvmlEventSetWait_v2` fills it. The v1 call's
/// struct ends before `gpu_instance_id`.
#[repr(C)]
pub(crate) struct EventData {
    device: Handle,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

fn guard(f: impl FnOnce() -> Ret) -> Ret {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(UNKNOWN)
}

/// Runs `f` on the initialised, current state.
fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T, Ret>) -> Result<T, Ret> {
    let mut st = lock();
    st.ready()?;
    f(&mut st)
}

fn call(f: impl FnOnce(&mut State) -> Result<(), Ret>) -> Ret {
    guard(|| match with_state(f) {
        Ok(()) => SUCCESS,
        Err(code) => code,
    })
}

/// Writes `v` through an output pointer; null is INVALID_ARGUMENT.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), Ret> {
    if p.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    unsafe { p.write(v) };
    Ok(())
}

/// Copies `s` and a NUL into a caller's buffer of `len` bytes.
///
/// # Safety
/// `buf` is null or valid for `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), Ret> {
    if buf.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    if (len as usize) <= s.len() {
        return Err(INSUFFICIENT_SIZE);
    }
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

fn handle(value: usize) -> Handle {
    std::ptr::without_provenance_mut(value)
}

/// The GPU behind a handle; MIG handles are NOT_SUPPORTED.
fn gpu_only(st: &State, device: Handle) -> Result<(usize, &crate::scenario::Device), Ret> {
    match st.resolve(device.addr())? {
        Target::Gpu { index, dev } => Ok((index, dev)),
        Target::Mig { .. } => Err(NOT_SUPPORTED),
    }
}

// ---- Init, shutdown, errors, system -------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> Ret {
    guard(|| lock().init())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> Ret {
    guard(|| lock().init())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    guard(|| lock().init())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> Ret {
    guard(|| lock().shutdown())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    call(|st| unsafe { put_str(version, length, &st.scenario.driver_version) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> Ret {
    call(|st| {
        let v = format!("12.{}", st.scenario.driver_version);
        unsafe { put_str(version, length, &v) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(cuda: *mut c_int) -> Ret {
    call(|st| unsafe { put(cuda, st.scenario.cuda_version) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(cuda: *mut c_int) -> Ret {
    call(|st| unsafe { put(cuda, st.scenario.cuda_version) })
}

// ---- Discovery ----------------------------------------------------------

fn device_count(count: *mut c_uint) -> Ret {
    call(|st| {
        let n = c_uint::try_from(st.scenario.devices.len()).unwrap_or(c_uint::MAX);
        unsafe { put(count, n) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    device_count(count)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> Ret {
    device_count(count)
}

fn handle_by_index(index: c_uint, device: *mut Handle) -> Ret {
    call(|st| {
        let dev = st
            .scenario
            .devices
            .get(index as usize)
            .ok_or(INVALID_ARGUMENT)?;
        if dev.lost {
            return Err(crate::state::GPU_IS_LOST);
        }
        let uuid = dev.uuid.clone();
        let h = st.gpu_handle(&uuid);
        unsafe { put(device, handle(h)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Handle) -> Ret {
    handle_by_index(index, device)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut Handle) -> Ret {
    handle_by_index(index, device)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut Handle,
) -> Ret {
    call(|st| {
        if uuid.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        let uuid = unsafe { CStr::from_ptr(uuid) };
        let uuid = uuid.to_str().map_err(|_| crate::state::NOT_FOUND)?;
        let h = st.handle_by_uuid(uuid)?;
        unsafe { put(device, handle(h)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Handle,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    call(|st| {
        let s = match st.resolve(device.addr())? {
            Target::Gpu { dev, .. } => &dev.uuid,
            Target::Mig { mig, .. } => &mig.uuid,
        };
        unsafe { put_str(uuid, length, s) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Handle,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    call(|st| {
        let s = match st.resolve(device.addr())? {
            Target::Gpu { dev, .. } => &dev.name,
            Target::Mig { mig, .. } => &mig.name,
        };
        unsafe { put_str(name, length, s) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: Handle, minor: *mut c_uint) -> Ret {
    call(|st| {
        let (index, dev) = gpu_only(st, device)?;
        let m = dev
            .minor
            .unwrap_or(c_uint::try_from(index).unwrap_or(c_uint::MAX));
        unsafe { put(minor, m) }
    })
}

/// (total, used) of a GPU (from its phase) or MIG device (from its entry).
fn memory(st: &State, device: Handle) -> Result<(u64, u64), Ret> {
    Ok(match st.resolve(device.addr())? {
        Target::Gpu { dev, .. } => (dev.memory_total_bytes, st.phase(dev).memory_used_bytes),
        Target::Mig { mig, .. } => (mig.memory_total_bytes, mig.memory_used_bytes),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Handle, memory_out: *mut Memory) -> Ret {
    call(|st| {
        let (total, used) = memory(st, device)?;
        let free = total.saturating_sub(used);
        unsafe { put(memory_out, Memory { total, free, used }) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Handle,
    memory_out: *mut MemoryV2,
) -> Ret {
    call(|st| {
        let (total, used) = memory(st, device)?;
        if memory_out.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        // Any version is accepted and left as the caller set it.
        let version = unsafe { (*memory_out).version };
        let free = total.saturating_sub(used);
        let v = MemoryV2 {
            version,
            total,
            reserved: 0,
            free,
            used,
        };
        unsafe { put(memory_out, v) }
    })
}

// ---- MIG ----------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Handle,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        let mode = c_uint::from(!dev.mig.is_empty());
        if current.is_null() || pending.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        unsafe {
            put(current, mode)?;
            put(pending, mode)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: Handle, count: *mut c_uint) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        unsafe { put(count, dev.effective_mig_slots()) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: Handle,
    index: c_uint,
    mig_device: *mut Handle,
) -> Ret {
    call(|st| {
        let h = st.mig_handle_by_index(device.addr(), index)?;
        unsafe { put(mig_device, handle(h)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: Handle, is_mig: *mut c_uint) -> Ret {
    call(|st| {
        let v = match st.resolve(device.addr())? {
            Target::Gpu { .. } => 0,
            Target::Mig { .. } => 1,
        };
        unsafe { put(is_mig, v) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: Handle,
    device: *mut Handle,
) -> Ret {
    call(|st| {
        let uuid = match st.resolve(mig_device.addr())? {
            Target::Gpu { .. } => return Err(INVALID_ARGUMENT),
            Target::Mig { parent, .. } => parent.uuid.clone(),
        };
        let h = st.gpu_handle(&uuid);
        unsafe { put(device, handle(h)) }
    })
}

// ---- Readings -----------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: Handle,
    limit: *mut c_uint,
) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        unsafe { put(limit, dev.power_limit_mw) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: Handle, power: *mut c_uint) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        unsafe { put(power, st.phase(dev).power_mw) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: Handle,
    energy: *mut c_ulonglong,
) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        if !dev.energy_counter {
            return Err(NOT_SUPPORTED);
        }
        unsafe { put(energy, st.energy(dev)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Handle,
    utilization: *mut Utilization,
) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        if !dev.mig.is_empty() {
            return Err(NOT_SUPPORTED);
        }
        let p = st.phase(dev);
        let u = Utilization {
            gpu: p.utilization_pct,
            memory: p.memory_util_pct,
        };
        unsafe { put(utilization, u) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: Handle,
    sensor: c_uint,
    temp: *mut c_uint,
) -> Ret {
    call(|st| {
        let dev = match st.resolve(device.addr())? {
            Target::Gpu { dev, .. } => dev,
            Target::Mig { parent, .. } => parent,
        };
        if sensor != 0 {
            return Err(INVALID_ARGUMENT);
        }
        unsafe { put(temp, st.phase(dev).temperature_c) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: Handle,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        if counter_type > 1 {
            return Err(INVALID_ARGUMENT);
        }
        let n = match error_type {
            0 => 0,
            1 => st.phase(dev).ecc_uncorrected,
            _ => return Err(INVALID_ARGUMENT),
        };
        unsafe { put(count, n) }
    })
}

fn throttle_reasons(device: Handle, reasons: *mut c_ulonglong) -> Ret {
    call(|st| {
        let (_, dev) = gpu_only(st, device)?;
        unsafe { put(reasons, st.phase(dev).throttle_reasons) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: Handle,
    reasons: *mut c_ulonglong,
) -> Ret {
    throttle_reasons(device, reasons)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: Handle,
    reasons: *mut c_ulonglong,
) -> Ret {
    throttle_reasons(device, reasons)
}

// ---- Events -------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: Handle,
    types: *mut c_ulonglong,
) -> Ret {
    call(|st| {
        gpu_only(st, device)?;
        unsafe { put(types, XID_EVENT) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut Handle) -> Ret {
    call(|st| {
        if set.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        let h = st.create_set();
        unsafe { put(set, handle(h)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: Handle,
    types: c_ulonglong,
    set: Handle,
) -> Ret {
    call(|st| st.register(device.addr(), types, set.addr()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: Handle) -> Ret {
    guard(|| {
        let mut st = lock();
        // Freeing after the last shutdown is UNINITIALIZED, as in NVML;
        // a malformed file does not stop a free.
        if let Err(UNINITIALIZED) = st.ready() {
            return UNINITIALIZED;
        }
        st.free_set(set.addr())
    })
}

/// Waits up to `timeout_ms` for the set's next XID; `v2` says whether the
/// caller's struct has the instance ids.
///
/// # Safety
/// `data` is null or valid for a write of the (v1 or v2) event data.
unsafe fn wait(set: Handle, data: *mut EventData, timeout_ms: c_uint, v2: bool) -> Ret {
    guard(|| {
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            let next = with_state(|st| {
                if data.is_null() {
                    return Err(INVALID_ARGUMENT);
                }
                st.next_xid(set.addr())
            });
            match next {
                Err(code) => return code,
                Ok(Some((device, xid))) => {
                    unsafe {
                        (&raw mut (*data).device).write(handle(device));
                        (&raw mut (*data).event_type).write(XID_EVENT);
                        (&raw mut (*data).event_data).write(xid);
                        if v2 {
                            (&raw mut (*data).gpu_instance_id).write(u32::MAX);
                            (&raw mut (*data).compute_instance_id).write(u32::MAX);
                        }
                    }
                    return SUCCESS;
                }
                Ok(None) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return TIMEOUT;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: Handle,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    unsafe { wait(set, data, timeout_ms, true) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait(
    set: Handle,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    unsafe { wait(set, data, timeout_ms, false) }
}
