//! Loads the built stand-in through nvml-wrapper, as the agent does, and
//! checks it against scenarios.
//!
//! NVML state lives in the loaded library, once per process, and the
//! scenario's path is a process-wide environment variable: every test holds
//! `LOCK` from before it sets the variable until its `Nvml`s are dropped.

use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nvidia_ml::scenario::{self, Device, MigDevice, Phase, Scenario, now_unix_ms};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

static LOCK: Mutex<()> = Mutex::new(());

/// The stand-in as cargo builds it. The lib target's cdylib is written,
/// without a hash in its name, to `target/<profile>/deps/libnvidia_ml.so`
/// and copied up to `target/<profile>/libnvidia_ml.so`; this test binary is
/// `target/<profile>/deps/standin-<hash>`.
fn lib_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().expect("profile dir").to_path_buf(),
    ];
    candidates
        .iter()
        .map(|d| d.join("libnvidia_ml.so"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libnvidia_ml.so not in {candidates:?}"))
}

struct Fixture {
    path: PathBuf,
    _dir: tempfile::TempDir,
    _lock: MutexGuard<'static, ()>,
}

impl Fixture {
    /// Takes the lock, writes `s` and points the library at it.
    fn new(s: &Scenario) -> Self {
        let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scenario.json");
        scenario::write(&path, s).expect("write scenario");
        // SAFETY: every test holds LOCK while it touches the environment or
        // NVML, so nothing reads the environment concurrently.
        unsafe { std::env::set_var(scenario::ENV_VAR, &path) };
        Fixture {
            path,
            _dir: dir,
            _lock: lock,
        }
    }

    fn write(&self, s: &Scenario) {
        scenario::write(&self.path, s).expect("rewrite scenario");
    }
}

fn nvml() -> Result<Nvml, NvmlError> {
    let path = lib_path();
    Nvml::builder().lib_path(path.as_os_str()).init()
}

fn gpu(uuid: &str) -> Device {
    Device::new(uuid, "NVIDIA H100 80GB HBM3", 85_520_809_984)
}

fn one_gpu(d: Device) -> Scenario {
    Scenario {
        start_unix_ms: Some(now_unix_ms()),
        devices: vec![d],
        ..Scenario::default()
    }
}

#[test]
fn init_error_codes_pass_through() {
    let fx = Fixture::new(&Scenario::default());
    for (code, check) in [
        (
            9,
            (|e| matches!(e, NvmlError::DriverNotLoaded)) as fn(&NvmlError) -> bool,
        ),
        (4, |e| matches!(e, NvmlError::NoPermission)),
        (999, |e| matches!(e, NvmlError::Unknown)),
    ] {
        fx.write(&Scenario {
            init_error: Some(code),
            ..Scenario::default()
        });
        let err = nvml().expect_err("init must fail");
        assert!(check(&err), "code {code} gave {err:?}");
    }
    std::fs::write(&fx.path, r#"{"devices": [{"uuid": "GPU-x"}]}"#).unwrap();
    assert!(matches!(nvml().err(), Some(NvmlError::Unknown)));
    std::fs::remove_file(&fx.path).unwrap();
    assert!(matches!(nvml().err(), Some(NvmlError::DriverNotLoaded)));
    // A failed init leaves nothing initialised behind it.
    fx.write(&Scenario::default());
    let nvml = nvml().expect("init");
    assert_eq!(nvml.device_count().unwrap(), 0);
}

#[test]
fn unset_env_is_driver_not_loaded() {
    let _fx = Fixture::new(&Scenario::default());
    // SAFETY: as in Fixture::new.
    unsafe { std::env::remove_var(scenario::ENV_VAR) };
    assert!(matches!(nvml().err(), Some(NvmlError::DriverNotLoaded)));
}

#[test]
fn discovery() {
    let mut b = gpu("GPU-bbbbbbbb-0000-0000-0000-000000000001");
    b.name = "NVIDIA A100-SXM4-40GB".to_string();
    b.memory_total_bytes = 42_949_672_960;
    b.minor = Some(5);
    b.power_limit_mw = 400_000;
    b.phases = vec![Phase {
        memory_used_bytes: 1 << 30,
        for_ms: 60_000,
        ..Phase::default()
    }];
    let s = Scenario {
        driver_version: "560.35.03".to_string(),
        cuda_version: 12060,
        start_unix_ms: Some(now_unix_ms()),
        devices: vec![gpu("GPU-aaaaaaaa-0000-0000-0000-000000000000"), b],
        ..Scenario::default()
    };
    let _fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    assert_eq!(nvml.sys_driver_version().unwrap(), "560.35.03");
    assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12060);
    assert_eq!(nvml.device_count().unwrap(), 2);
    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(d0.uuid().unwrap(), s.devices[0].uuid);
    assert_eq!(d0.name().unwrap(), "NVIDIA H100 80GB HBM3");
    assert_eq!(d0.minor_number().unwrap(), 0);
    assert_eq!(d0.enforced_power_limit().unwrap(), 700_000);
    let m0 = d0.memory_info().unwrap();
    assert_eq!(
        (m0.total, m0.used, m0.free, m0.reserved),
        (85_520_809_984, 0, 85_520_809_984, 0)
    );
    let d1 = nvml.device_by_uuid(s.devices[1].uuid.as_str()).unwrap();
    assert_eq!(d1.name().unwrap(), "NVIDIA A100-SXM4-40GB");
    assert_eq!(d1.minor_number().unwrap(), 5);
    assert_eq!(d1.enforced_power_limit().unwrap(), 400_000);
    let m1 = d1.memory_info().unwrap();
    assert_eq!(
        (m1.total, m1.used, m1.free),
        (42_949_672_960, 1 << 30, 42_949_672_960 - (1 << 30))
    );
    assert_eq!(d1.mig_mode().unwrap().current, 0);
    assert_eq!(d1.mig_device_count().unwrap(), 0);
    assert!(
        d1.supported_event_types()
            .unwrap()
            .contains(EventTypes::CRITICAL_XID_ERROR)
    );
    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));
    assert!(matches!(
        nvml.device_by_uuid("GPU-nope"),
        Err(NvmlError::NotFound)
    ));

    // Init is reference-counted: a second Nvml's drop leaves the first working.
    drop(self::nvml().expect("second init"));
    assert_eq!(nvml.device_count().unwrap(), 2);

    // What nvml-wrapper never reaches: v1 calls, small buffers, null pointers.
    let lib = nvml.lib();
    let h0 = unsafe { d0.handle() };
    unsafe {
        let mut buf = [0 as c_char; 96];
        assert_eq!(lib.nvmlDeviceGetUUID(h0, buf.as_mut_ptr(), 8), 7);
        assert_eq!(lib.nvmlDeviceGetUUID(h0, std::ptr::null_mut(), 96), 2);
        let len = s.devices[0].uuid.len() as u32;
        assert_eq!(lib.nvmlDeviceGetUUID(h0, buf.as_mut_ptr(), len), 7);
        assert_eq!(lib.nvmlDeviceGetUUID(h0, buf.as_mut_ptr(), len + 1), 0);
        assert_eq!(
            CStr::from_ptr(buf.as_ptr()).to_str().unwrap(),
            s.devices[0].uuid
        );
        let mut mem: nvml_wrapper_sys::bindings::nvmlMemory_t = std::mem::zeroed();
        assert_eq!(lib.nvmlDeviceGetMemoryInfo(h0, &mut mem), 0);
        assert_eq!(
            (mem.total, mem.free, mem.used),
            (85_520_809_984, 85_520_809_984, 0)
        );
        let mut cuda = 0;
        assert_eq!(lib.nvmlSystemGetCudaDriverVersion(&mut cuda), 0);
        assert_eq!(cuda, 12060);
        let mut reasons = 1;
        assert_eq!(
            lib.nvmlDeviceGetCurrentClocksEventReasons(h0, &mut reasons),
            0
        );
        assert_eq!(reasons, 0);
        assert_eq!(lib.nvmlDeviceGetPowerUsage(std::ptr::null_mut(), &mut 0), 2);
        assert_eq!(lib.nvmlDeviceGetPowerUsage(h0, std::ptr::null_mut()), 2);
        let lost = CStr::from_ptr(lib.nvmlErrorString(15));
        assert_eq!(lost.to_str().unwrap(), "GPU is lost");
    }
}

#[test]
fn mig() {
    let mut d = gpu("GPU-11111111-0000-0000-0000-000000000000");
    d.phases = vec![Phase {
        temperature_c: 55,
        for_ms: 60_000,
        ..Phase::default()
    }];
    d.mig = vec![
        MigDevice {
            uuid: "MIG-22222222-0000-0000-0000-000000000000".to_string(),
            name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".to_string(),
            memory_total_bytes: 10_200_547_328,
            memory_used_bytes: 1_000_000,
        },
        MigDevice {
            uuid: "MIG-33333333-0000-0000-0000-000000000000".to_string(),
            name: "NVIDIA H100 80GB HBM3 MIG 3g.40gb".to_string(),
            memory_total_bytes: 40_652_193_792,
            memory_used_bytes: 0,
        },
    ];
    let s = one_gpu(d);
    let _fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    let gpu = nvml.device_by_index(0).unwrap();
    let mode = gpu.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(gpu.mig_device_count().unwrap(), 7);
    assert!(!gpu.mig_is_mig_device_handle().unwrap());
    assert!(matches!(
        gpu.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    assert_eq!(gpu.power_usage().unwrap(), 60_000);
    assert!(gpu.total_energy_consumption().is_ok());

    let m0 = gpu.mig_device_by_index(0).unwrap();
    assert_eq!(m0.uuid().unwrap(), s.devices[0].mig[0].uuid);
    assert_eq!(m0.name().unwrap(), s.devices[0].mig[0].name);
    let mem = m0.memory_info().unwrap();
    assert_eq!(
        (mem.total, mem.used, mem.free),
        (10_200_547_328, 1_000_000, 10_199_547_328)
    );
    assert!(m0.mig_is_mig_device_handle().unwrap());
    assert_eq!(m0.temperature(TemperatureSensor::Gpu).unwrap(), 55);
    assert_eq!(
        m0.mig_parent_device().unwrap().uuid().unwrap(),
        s.devices[0].uuid
    );
    for r in [
        m0.power_usage().map(u64::from),
        m0.total_energy_consumption(),
    ] {
        assert!(matches!(r, Err(NvmlError::NotSupported)), "{r:?}");
    }
    assert!(matches!(
        m0.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        m0.enforced_power_limit(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(m0.minor_number(), Err(NvmlError::NotSupported)));
    assert!(matches!(
        m0.current_throttle_reasons(),
        Err(NvmlError::NotSupported)
    ));
    let ecc = m0.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile);
    assert!(matches!(ecc, Err(NvmlError::NotSupported)));
    assert!(matches!(
        gpu.mig_device_by_index(2),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        gpu.mig_device_by_index(7),
        Err(NvmlError::InvalidArg)
    ));

    let m1 = nvml
        .device_by_uuid(s.devices[0].mig[1].uuid.as_str())
        .unwrap();
    assert!(m1.mig_is_mig_device_handle().unwrap());
    assert_eq!(m1.memory_info().unwrap().total, 40_652_193_792);

    // Registering a MIG device fails, and nvml-wrapper frees the set.
    let set = nvml.create_event_set().unwrap();
    let err = m1
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .unwrap_err();
    assert!(matches!(err.error, NvmlError::NotSupported), "{err:?}");
}

/// Reads `f` between two clock readings: `(before, value, after)`.
fn timed<T>(f: impl FnOnce() -> T) -> (u64, T, u64) {
    let t0 = now_unix_ms();
    let v = f();
    (t0, v, now_unix_ms())
}

#[test]
fn energy_counter_is_the_closed_form() {
    let start = now_unix_ms() - 10_000;
    let mut a = gpu("GPU-e0000000-0000-0000-0000-000000000000");
    a.energy_base_mj = 1_000_000;
    a.phases = vec![
        Phase {
            for_ms: 300,
            power_mw: 100_000,
            ..Phase::default()
        },
        Phase {
            for_ms: 700,
            power_mw: 250_000,
            ..Phase::default()
        },
    ];
    let mut old = gpu("GPU-e1111111-0000-0000-0000-000000000000");
    old.energy_counter = false;
    old.phases = vec![Phase {
        for_ms: 1000,
        power_mw: 123_000,
        ..Phase::default()
    }];
    let s = Scenario {
        start_unix_ms: Some(start),
        devices: vec![a, old],
        ..Scenario::default()
    };
    let _fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    let dev = nvml.device_by_index(0).unwrap();
    let mut last = 0;
    for _ in 0..2 {
        let (t0, e, t1) = timed(|| dev.total_energy_consumption().unwrap());
        let lo = scenario::energy_mj(&s.devices[0], start, t0);
        let hi = scenario::energy_mj(&s.devices[0], start, t1);
        assert!(lo <= e && e <= hi, "{lo} <= {e} <= {hi}");
        assert!(e > last);
        last = e;
        std::thread::sleep(Duration::from_millis(120));
    }
    let old = nvml.device_by_index(1).unwrap();
    assert!(matches!(
        old.total_energy_consumption(),
        Err(NvmlError::NotSupported)
    ));
    assert_eq!(old.power_usage().unwrap(), 123_000);
}

#[test]
fn phases_change_readings_over_time() {
    let phase = |i: u32| Phase {
        for_ms: 150,
        utilization_pct: 10 + i,
        memory_util_pct: 20 + i,
        memory_used_bytes: u64::from(i) << 30,
        power_mw: 100_000 + i * 1000,
        temperature_c: 50 + i,
        ecc_uncorrected: u64::from(i),
        throttle_reasons: [0, 0x4, 0x20][i as usize],
    };
    let mut d = gpu("GPU-f0000000-0000-0000-0000-000000000000");
    d.phases = (0..3).map(phase).collect();
    let s = one_gpu(d);
    let (d, start) = (&s.devices[0], s.start_unix_ms.unwrap());
    let _fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    let dev = nvml.device_by_index(0).unwrap();
    let mut seen = [false; 3];
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.contains(&false) {
        assert!(Instant::now() < deadline, "phases seen: {seen:?}");
        let (t0, read, t1) = timed(|| {
            let u = dev.utilization_rates().unwrap();
            let m = dev.memory_info().unwrap();
            (
                u.gpu,
                u.memory,
                m.used,
                dev.power_usage().unwrap(),
                dev.temperature(TemperatureSensor::Gpu).unwrap(),
                dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .unwrap(),
                dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                    .unwrap(),
                dev.current_throttle_reasons().unwrap().bits(),
            )
        });
        let i = scenario::phase_index_at(d, start, t0);
        if i == scenario::phase_index_at(d, start, t1) {
            let p = scenario::phase_at(d, start, t0);
            let want = (
                p.utilization_pct,
                p.memory_util_pct,
                p.memory_used_bytes,
                p.power_mw,
                p.temperature_c,
                p.ecc_uncorrected,
                0,
                p.throttle_reasons,
            );
            assert_eq!(read, want, "phase {i}");
            seen[i] = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lost_and_removed_devices() {
    let mut a = gpu("GPU-a0000000-0000-0000-0000-000000000000");
    a.mig = vec![MigDevice {
        uuid: "MIG-a1111111-0000-0000-0000-000000000000".to_string(),
        name: "MIG 1g.10gb".to_string(),
        memory_total_bytes: 10 << 30,
        memory_used_bytes: 0,
    }];
    let b = gpu("GPU-b0000000-0000-0000-0000-000000000000");
    let mut s = Scenario {
        devices: vec![a, b],
        ..Scenario::default()
    };
    let fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    let (ua, ub) = (s.devices[0].uuid.clone(), s.devices[1].uuid.clone());
    let mig_uuid = s.devices[0].mig[0].uuid.clone();
    let dev_a = nvml.device_by_uuid(ua.as_str()).unwrap();
    let mig_a = dev_a.mig_device_by_index(0).unwrap();

    s.devices[0].lost = true;
    fx.write(&s);
    assert!(matches!(
        nvml.device_by_uuid(ua.as_str()),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(
        nvml.device_by_uuid(mig_uuid.as_str()),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(nvml.device_by_index(0), Err(NvmlError::GpuLost)));
    assert!(matches!(dev_a.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(dev_a.power_usage(), Err(NvmlError::GpuLost)));
    assert!(matches!(mig_a.memory_info(), Err(NvmlError::GpuLost)));
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(nvml.device_by_index(1).unwrap().uuid().unwrap(), ub);

    // Gone from the file: not found by UUID, stale handles lost.
    let removed = s.devices.remove(0);
    fx.write(&s);
    assert!(matches!(
        nvml.device_by_uuid(ua.as_str()),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(dev_a.uuid(), Err(NvmlError::GpuLost)));
    assert_eq!(nvml.device_count().unwrap(), 1);
    assert_eq!(nvml.device_by_index(0).unwrap().uuid().unwrap(), ub);

    // A malformed rewrite fails every call until it is fixed.
    std::fs::write(&fx.path, "{").unwrap();
    assert!(matches!(nvml.device_count(), Err(NvmlError::Unknown)));

    // Back again, healthy: handles name UUIDs, so the old one works.
    s.devices.insert(
        0,
        Device {
            lost: false,
            ..removed
        },
    );
    fx.write(&s);
    assert_eq!(dev_a.uuid().unwrap(), ua);
    assert_eq!(mig_a.uuid().unwrap(), mig_uuid);
}

#[test]
fn xids_are_delivered_once_each() {
    let a = gpu("GPU-c0000000-0000-0000-0000-000000000000");
    let mut b = gpu("GPU-d0000000-0000-0000-0000-000000000000");
    b.xids = vec![13];
    let mut s = Scenario {
        devices: vec![a, b],
        ..Scenario::default()
    };
    let fx = Fixture::new(&s);
    let nvml = nvml().expect("init");
    let (ua, ub) = (s.devices[0].uuid.clone(), s.devices[1].uuid.clone());
    let set = nvml.create_event_set().unwrap();
    let set = nvml
        .device_by_index(0)
        .unwrap()
        .register_events(EventTypes::CRITICAL_XID_ERROR, set);
    let set = set.unwrap();
    let set = nvml
        .device_by_index(1)
        .unwrap()
        .register_events(EventTypes::CRITICAL_XID_ERROR, set);
    let set = set.unwrap();
    let next = |timeout_ms| {
        set.wait(timeout_ms).map(|e| {
            assert!(e.event_type.contains(EventTypes::CRITICAL_XID_ERROR));
            let Some(XidError::Value(xid)) = e.event_data else {
                panic!("event data {:?}", e.event_data);
            };
            (e.device.uuid().unwrap(), xid)
        })
    };
    // As with NVML, a set hears of XIDs from its registration on: not of
    // those before it.
    assert!(matches!(next(0), Err(NvmlError::Timeout)));
    s.devices[1].xids.push(31);
    fx.write(&s);
    assert_eq!(next(1000).unwrap(), (ub.clone(), 31));
    assert!(matches!(next(0), Err(NvmlError::Timeout)));

    s.devices[0].xids = vec![79, 48];
    fx.write(&s);
    assert_eq!(next(1000).unwrap(), (ua.clone(), 79));
    assert_eq!(next(1000).unwrap(), (ua.clone(), 48));
    let (t0, r) = (Instant::now(), next(60));
    assert!(matches!(r, Err(NvmlError::Timeout)));
    assert!(t0.elapsed() >= Duration::from_millis(60));

    // Appended while a wait is in progress.
    let writer = {
        let mut s = s.clone();
        let path = fx.path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            s.devices[0].xids.push(63);
            scenario::write(Path::new(&path), &s).unwrap();
        })
    };
    assert_eq!(next(10_000).unwrap(), (ua.clone(), 63));
    writer.join().unwrap();

    // A lost device delivers what remains, then nothing, without an error.
    s.devices[0].xids = vec![79, 48, 63, 94];
    s.devices[0].lost = true;
    fx.write(&s);
    let data = set.wait(1000).unwrap();
    assert!(matches!(data.event_data, Some(XidError::Value(94))));
    assert!(matches!(data.device.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(next(30), Err(NvmlError::Timeout)));
    set.release_events().unwrap();
}
