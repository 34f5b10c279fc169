//! `coop agent probe`: checks that each GPU really computes, and measures it.
//! A small kernel compiled with NVRTC must give the right answer; then
//! cuBLAS matrix-multiply throughput (fp16 and bf16) and device memory
//! bandwidth are timed. CUDA's libraries are loaded at run time: without a
//! driver the probe is a clear error, never a panic.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use serde::{Deserialize, Serialize};

/// What the probe found of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProbe {
    pub ordinal: usize,
    /// NVML's form (`GPU-…`), so that it matches the inventory.
    pub uuid: String,
    pub name: String,
    /// The check kernel ran and gave the right answer.
    pub ok: bool,
    /// Why it is not ok, or what could not be measured.
    pub error: Option<String>,
    pub fp16_tflops: Option<f64>,
    pub bf16_tflops: Option<f64>,
    pub memory_gb_per_s: Option<f64>,
}

pub use crate::gpu::Capacity;

impl GpuProbe {
    pub fn capacity(&self) -> Option<Capacity> {
        if !self.ok {
            return None;
        }
        Some(Capacity {
            fp16_gflops: (self.fp16_tflops.unwrap_or(0.0) * 1000.0) as u64,
            bf16_gflops: (self.bf16_tflops.unwrap_or(0.0) * 1000.0) as u64,
            memory_mb_per_s: (self.memory_gb_per_s.unwrap_or(0.0) * 1000.0) as u64,
        })
    }
}

/// Applies a probe to an inventory: GPUs that failed the check are left out
/// (never offered for jobs); the others carry what was measured. Returns
/// what was left out, and why.
pub fn apply(gpus: &mut Vec<crate::GpuInfo>, probes: &[GpuProbe]) -> Vec<(String, String)> {
    let mut dropped = Vec::new();
    gpus.retain_mut(|g| match probes.iter().find(|p| p.uuid == g.uuid) {
        Some(p) if !p.ok => {
            let why = p.error.clone().unwrap_or_else(|| "failed the check".into());
            dropped.push((g.uuid.clone(), why));
            false
        }
        Some(p) => {
            g.measured = p.capacity();
            true
        }
        // A MIG instance or a GPU CUDA did not list: kept, unmeasured.
        None => true,
    });
    dropped
}

const CHECK_KERNEL: &str = r#"
extern "C" __global__ void coop_check(float *out, const float *x, float a, float b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + b;
}
"#;

/// Probes every GPU the CUDA driver sees.
pub fn probe_all() -> anyhow::Result<Vec<GpuProbe>> {
    // cudarc panics when a library is missing: look for each first.
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("probe: cannot load the CUDA driver (libcuda.so.1): is the NVIDIA driver installed?");
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "probe: cannot load NVRTC (libnvrtc.so): install the CUDA runtime compiler \
             (e.g. the cuda-nvrtc-12-8 package)"
        );
    }
    let count = CudaContext::device_count()
        .map_err(|e| anyhow!("probe: CUDA cannot count the GPUs: {e}"))?;
    if count <= 0 {
        bail!("probe: the CUDA driver sees no GPU");
    }
    let ptx = cudarc::nvrtc::compile_ptx(CHECK_KERNEL)
        .map_err(|e| anyhow!("probe: NVRTC failed to compile the check kernel: {e}"))?;
    // SAFETY: only tries to dlopen the library.
    let blas = unsafe { cudarc::cublas::sys::is_culib_present() };
    Ok((0..count as usize)
        .map(|ordinal| {
            let ptx = ptx.clone();
            // A driver fault must not take the agent down with it.
            std::panic::catch_unwind(move || probe_one(ordinal, ptx, blas)).unwrap_or_else(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                GpuProbe {
                    ordinal,
                    uuid: String::new(),
                    name: String::new(),
                    ok: false,
                    error: Some(format!("the probe failed: {why}")),
                    fp16_tflops: None,
                    bf16_tflops: None,
                    memory_gb_per_s: None,
                }
            })
        })
        .collect())
}

fn probe_one(ordinal: usize, ptx: cudarc::nvrtc::Ptx, blas: bool) -> GpuProbe {
    let mut p = GpuProbe {
        ordinal,
        uuid: String::new(),
        name: String::new(),
        ok: false,
        error: None,
        fp16_tflops: None,
        bf16_tflops: None,
        memory_gb_per_s: None,
    };
    let ctx = match CudaContext::new(ordinal) {
        Ok(c) => c,
        Err(e) => {
            p.error = Some(format!("cannot open GPU {ordinal}: {e}"));
            return p;
        }
    };
    p.name = ctx.name().unwrap_or_default();
    p.uuid = ctx
        .uuid()
        .map(|u| format_uuid(&u.bytes))
        .unwrap_or_default();
    let stream = ctx.default_stream();
    if let Err(e) = check(&ctx, &stream, ptx) {
        p.error = Some(format!("check kernel: {e:#}"));
        return p;
    }
    p.ok = true;
    let mut missing = Vec::new();
    match bandwidth(&stream) {
        Ok(gbs) => p.memory_gb_per_s = Some(gbs),
        Err(e) => missing.push(format!("memory bandwidth: {e:#}")),
    }
    if blas {
        match matmul(&stream, half::f16::from_f32) {
            Ok(t) => p.fp16_tflops = Some(t),
            Err(e) => missing.push(format!("fp16 matmul: {e:#}")),
        }
        match matmul(&stream, half::bf16::from_f32) {
            Ok(t) => p.bf16_tflops = Some(t),
            Err(e) => missing.push(format!("bf16 matmul: {e:#}")),
        }
    } else {
        missing.push("matmul: cuBLAS (libcublas.so) not found".into());
    }
    if !missing.is_empty() {
        p.error = Some(missing.join("; "));
    }
    p
}

/// Keeps every visible GPU busy with fp16 matrix multiplies for `secs`,
/// holding their buffers: a known load for checking telemetry and
/// accounting. Returns the multiplies done per GPU.
pub fn burn(secs: f64) -> anyhow::Result<Vec<u64>> {
    // SAFETY: only tries to dlopen the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("probe: cannot load the CUDA driver (libcuda.so.1): is the NVIDIA driver installed?");
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        bail!("probe: cannot load cuBLAS (libcublas.so): install the CUDA libraries");
    }
    let count = CudaContext::device_count().map_err(|e| anyhow!("probe: {e}"))?;
    let threads: Vec<_> = (0..count.max(0) as usize)
        .map(|ordinal| {
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let ctx = CudaContext::new(ordinal)?;
                let stream = ctx.default_stream();
                let n = 8192usize;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
                let host = vec![half::f16::from_f32(0.5); n * n];
                let a = stream.clone_htod(&host)?;
                let mut c = stream.alloc_zeros::<half::f16>(n * n)?;
                let cfg = square(n, half::f16::ONE, half::f16::ZERO);
                let t = Instant::now();
                let mut done = 0;
                while t.elapsed().as_secs_f64() < secs {
                    // SAFETY: a and c are n x n, as the configuration says.
                    unsafe { blas.gemm(cfg, &a, &a, &mut c) }
                        .map_err(|e| anyhow!("gemm: {e:?}"))?;
                    stream.synchronize()?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|_| anyhow!("probe: a burn thread panicked"))?
        })
        .collect()
}

/// NVML writes a GPU's UUID as `GPU-` and 8-4-4-4-12 hex digits.
fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let h: Vec<String> = bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Runs `out = a*x + b` over 1 Mi elements and compares every one. Inputs
/// are small integers, so the answer is exact with or without fused multiply-add.
fn check(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    ptx: cudarc::nvrtc::Ptx,
) -> anyhow::Result<()> {
    let n: i32 = 1 << 20;
    let x: Vec<f32> = (0..n).map(|i| (i % 4096) as f32).collect();
    let (a, b) = (3.0f32, 7.0f32);
    let module = ctx.load_module(ptx).context("loading the module")?;
    let f = module
        .load_function("coop_check")
        .context("finding the kernel")?;
    let x_dev = stream.clone_htod(&x).context("copying to the GPU")?;
    let mut out = stream
        .alloc_zeros::<f32>(n as usize)
        .context("allocating")?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&mut out).arg(&x_dev).arg(&a).arg(&b).arg(&n);
    // SAFETY: the kernel's signature matches the arguments; `out` and `x`
    // hold `n` elements.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.context("launching")?;
    let got = stream.clone_dtoh(&out).context("copying back")?;
    let wrong = x
        .iter()
        .zip(&got)
        .filter(|(x, g)| a * **x + b != **g)
        .count();
    if wrong > 0 {
        bail!("{wrong} of {n} results are wrong");
    }
    Ok(())
}

/// Device-to-device copies of 256 MiB: bytes read plus written per second.
fn bandwidth(stream: &Arc<CudaStream>) -> anyhow::Result<f64> {
    let n = 64 << 20; // f32s: 256 MiB
    let src = stream.alloc_zeros::<f32>(n)?;
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    stream.synchronize()?;
    let bytes = 2.0 * (n * 4) as f64 * iters as f64;
    Ok(bytes / t.elapsed().as_secs_f64() / 1e9)
}

/// `C = alpha A B + beta C` for n x n matrices, none transposed.
fn square<T>(n: usize, alpha: T, beta: T) -> GemmConfig<T> {
    GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha,
        lda: n as i32,
        ldb: n as i32,
        beta,
        ldc: n as i32,
    }
}

/// Square 4096 matrix multiplies through cuBLAS: TFLOP/s.
fn matmul<T>(stream: &Arc<CudaStream>, from_f32: fn(f32) -> T) -> anyhow::Result<f64>
where
    T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy,
    CudaBlas: Gemm<T>,
{
    let n = 4096usize;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
    let host: Vec<T> = (0..n * n).map(|i| from_f32((i % 7) as f32 / 8.0)).collect();
    let a = stream.clone_htod(&host)?;
    let b = stream.clone_htod(&host)?;
    let mut c = stream.alloc_zeros::<T>(n * n)?;
    let cfg = square(n, from_f32(1.0), from_f32(0.0));
    let run = |c: &mut cudarc::driver::CudaSlice<T>| {
        // SAFETY: a, b and c are n x n, as the configuration says.
        unsafe { blas.gemm(cfg, &a, &b, c) }.map_err(|e| anyhow!("gemm: {e:?}"))
    };
    run(&mut c)?; // warm-up: picks the algorithm
    stream.synchronize()?;
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        run(&mut c)?;
    }
    stream.synchronize()?;
    let flops = 2.0 * (n as f64).powi(3) * iters as f64;
    Ok(flops / t.elapsed().as_secs_f64() / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_written_as_nvml_writes_them() {
        let bytes: [std::ffi::c_char; 16] =
            std::array::from_fn(|i| (i as u8 * 17) as std::ffi::c_char);
        assert_eq!(
            format_uuid(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff"
        );
    }

    fn probe(uuid: &str, ok: bool) -> GpuProbe {
        GpuProbe {
            ordinal: 0,
            uuid: uuid.into(),
            name: "H100".into(),
            ok,
            error: (!ok).then(|| "check kernel: 3 of 1048576 results are wrong".into()),
            fp16_tflops: ok.then_some(700.5),
            bf16_tflops: ok.then_some(690.0),
            memory_gb_per_s: ok.then_some(3000.25),
        }
    }

    #[test]
    fn a_gpu_that_fails_its_check_is_not_offered_and_the_others_carry_their_figures() {
        let gpu = |uuid: &str| crate::GpuInfo {
            uuid: uuid.into(),
            index: 0,
            model: "H100-80GB-HBM3".into(),
            memory_mb: 81_559,
            measured: None,
            power_limit_w: 700,
        };
        let mut gpus = vec![gpu("GPU-a"), gpu("GPU-b"), gpu("MIG-c")];
        let dropped = apply(&mut gpus, &[probe("GPU-a", true), probe("GPU-b", false)]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0, "GPU-b");
        assert!(dropped[0].1.contains("results are wrong"));
        let kept: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(kept, ["GPU-a", "MIG-c"]);
        assert_eq!(
            gpus[0].measured,
            Some(Capacity {
                fp16_gflops: 700_500,
                bf16_gflops: 690_000,
                memory_mb_per_s: 3_000_250,
            })
        );
        assert_eq!(gpus[1].measured, None);
    }

    #[test]
    fn without_a_driver_the_probe_is_an_error_not_a_panic() {
        // On a machine with a GPU this probes it instead.
        match probe_all() {
            Ok(gpus) => assert!(!gpus.is_empty()),
            Err(e) => assert!(e.to_string().starts_with("probe:"), "{e}"),
        }
    }
}
