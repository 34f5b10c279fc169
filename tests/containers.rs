//! `--image` jobs under a real podman, on GPUs from the stand-in NVML
//! (tests/nvml-standin): only the job's GPUs' device files and
//! NVIDIA_VISIBLE_DEVICES reach the container, its limits apply, and the
//! containers a crashed agent left are removed when it comes back.
//!
//! The image is built here from files on the machine (a static busybox):
//! no registry is reachable from CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use nvidia_ml::scenario::{self, Device, Scenario};

const GIB: u64 = 1 << 30;
/// Minor numbers no real GPU of a test machine has, for the device files
/// the stand-in's GPUs name (/dev/nvidia207, /dev/nvidia208).
const MINORS: [u32; 2] = [207, 208];

fn podman(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("podman")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("podman")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Fails under COOP_REQUIRE_ALL, else says why the test does nothing.
fn cannot(why: &str) {
    assert!(std::env::var_os("COOP_REQUIRE_ALL").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
}

/// A tiny image from the machine's static busybox; removed when dropped.
struct Image {
    name: String,
    _dir: tempfile::TempDir,
}

impl Image {
    fn build() -> Result<Image, String> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("no busybox on this machine (apt-get install busybox-static)")?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for tool in ["sh", "ls", "cat", "echo", "sleep", "true"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
        }
        let tar = dir.path().join("root.tar");
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar");
        let name = format!("localhost/coop-test-{}:latest", std::process::id());
        let o = podman(&["import", tar.to_str().unwrap(), &name], &[]);
        if !o.status.success() {
            return Err(format!("podman import: {}", text(&o)));
        }
        Ok(Image { name, _dir: dir })
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "--force", &self.name], &[]);
    }
}

/// Settings for podman where the sandbox needs them, or why it cannot run.
/// Some sandboxes refuse podman's default RLIMIT_NOFILE/NPROC, or run
/// cgroups in a hybrid mode crun refuses: runc with lower limits works there.
fn podman_settings(image: &str, dir: &Path) -> Result<Option<PathBuf>, String> {
    let run = |env: &[(&str, &str)]| podman(&["run", "--rm", "--init", image, "true"], env);
    let plain = run(&[]);
    if plain.status.success() {
        return Ok(None);
    }
    let conf = dir.join("containers.conf");
    // Limits below what such a sandbox lets a container's process keep
    // (podman's defaults, 1048576 files and 4194304 processes, are not).
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let with = run(&[("CONTAINERS_CONF", conf.to_str().unwrap())]);
    if with.status.success() {
        return Ok(Some(conf));
    }
    Err(format!(
        "podman cannot run a container in this sandbox: {} (and with runc and lower limits: {})",
        text(&plain).trim(),
        text(&with).trim()
    ))
}

/// Character device files standing for the stand-in's GPUs (NVIDIA's major
/// 195); removed when dropped.
struct DeviceFiles(Vec<PathBuf>);

impl DeviceFiles {
    fn make() -> Result<DeviceFiles, String> {
        let mut made = DeviceFiles(vec![]);
        for m in MINORS {
            let p = PathBuf::from(format!("/dev/nvidia{m}"));
            let ours = nix::sys::stat::makedev(195, m as u64);
            match nix::sys::stat::stat(&p) {
                // Left by a run of this test that was killed: taken back.
                Ok(st)
                    if st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFCHR
                        && st.st_rdev == ours =>
                {
                    let _ = std::fs::remove_file(&p);
                }
                Ok(_) => return Err(format!("{} exists already", p.display())),
                Err(_) => {}
            }
            nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                ours,
            )
            .map_err(|e| format!("mknod {}: {e} (the test needs root)", p.display()))?;
            made.0.push(p);
        }
        Ok(made)
    }
}

impl Drop for DeviceFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes, when dropped, the containers whose names start with its prefix
/// (what a failed test would leave).
struct Leftovers<'a>(String, &'a [(&'a str, &'a str)]);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for name in containers(&self.0, self.1) {
            let _ = podman(&["rm", "--force", &name], self.1);
        }
    }
}

/// Names of the containers (running or not) whose name starts with `prefix`.
fn containers(prefix: &str, env: &[(&str, &str)]) -> Vec<String> {
    let o = podman(
        &[
            "ps",
            "--all",
            "--filter",
            &format!("name=^{prefix}"),
            "--format",
            "{{.Names}}",
        ],
        env,
    );
    assert!(o.status.success(), "podman ps: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn wait_containers(
    prefix: &str,
    env: &[(&str, &str)],
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) {
    poll(
        &format!("containers {prefix}* {what}"),
        || containers(prefix, env),
        |now| pred(now),
    );
}

#[test]
fn image_jobs_get_only_their_gpus_their_limits_and_no_leftovers() {
    if !require_tool("podman", &["--version"], "apt-get install podman") {
        return;
    }
    let image = match Image::build() {
        Ok(i) => i,
        Err(why) => return cannot(&why),
    };
    let work = tempfile::tempdir().unwrap();
    let conf = match podman_settings(&image.name, work.path()) {
        Ok(c) => c,
        Err(why) => return cannot(&why),
    };
    let _devices = match DeviceFiles::make() {
        Ok(d) => d,
        Err(why) => return cannot(&format!("cannot make GPU device files: {why}")),
    };
    let gpus: Vec<Device> = MINORS
        .iter()
        .enumerate()
        .map(|(i, m)| Device {
            minor: Some(*m),
            ..Device::new(&format!("GPU-c-{i}"), "NVIDIA H100 80GB HBM3", 80 * GIB)
        })
        .collect();
    let lib = work.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    std::fs::copy(standin_lib(), lib.join("libnvidia-ml.so.1")).unwrap();
    let scenario_file = work.path().join("scenario.json");
    scenario::write(
        &scenario_file,
        &Scenario {
            devices: gpus,
            ..Scenario::default()
        },
    )
    .unwrap();
    let mut env: Vec<(&str, &str)> = vec![
        ("LD_LIBRARY_PATH", lib.to_str().unwrap()),
        (scenario::ENV_VAR, scenario_file.to_str().unwrap()),
    ];
    let conf_path = conf.as_ref().map(|c| c.to_str().unwrap().to_string());
    if let Some(c) = &conf_path {
        env.push(("CONTAINERS_CONF", c.as_str()));
    }
    let podman_env: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k == "CONTAINERS_CONF")
        .collect();

    let s = Split::start(&[]);
    let c = &s.c;
    c.add_member("acme");
    let agent_args = ["--no-probe", "--container-runtime", "podman"];
    let mut agent = s.agent_env("box", "acme", "nvml", &agent_args, &env);
    c.wait_node("box", "up", |n| {
        n["state"] == "up" && n["connected"] == true
    });

    // Only its GPU's device file, its GPU's UUID, and its limits.
    let id = c.submit(&[
        "--member",
        "acme",
        "--image",
        &image.name,
        "--cpus",
        "0.5",
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "ls /dev; echo visible=$NVIDIA_VISIBLE_DEVICES; \
         cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
         cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    ]);
    let job = c.wait_final(&id);
    assert_eq!(job["state"], "completed", "{job:#}");
    let log = c.logs(&id);
    let uuid = job["gpus"][0].as_str().unwrap();
    let i: usize = uuid.strip_prefix("GPU-c-").unwrap().parse().unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.contains(&format!("nvidia{}", MINORS[i]).as_str()),
        "{log}"
    );
    assert!(
        !lines.contains(&format!("nvidia{}", MINORS[1 - i]).as_str()),
        "{log}"
    );
    assert!(lines.contains(&format!("visible={uuid}").as_str()), "{log}");
    // 64 MiB, and half a CPU (a 50 ms quota in each 100 ms period).
    assert!(
        lines.contains(&"67108864") && lines.iter().any(|l| l.starts_with("50000")),
        "{log}"
    );

    // The agent dies with a container running: the next one removes it. The
    // job ignores SIGTERM, so its client is killed and its container stays.
    let id = c.submit(&[
        "--member",
        "acme",
        "--image",
        &image.name,
        "--",
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 1; done",
    ]);
    let _leftovers = Leftovers(format!("coop-{id}-"), &podman_env);
    c.wait_job(&id, "running", |j| j["state"] == "running");
    let running = format!("coop-{id}-1");
    wait_containers(&running, &podman_env, "started", |n| n.len() == 1);
    // And one its client had created but not yet started when the agent
    // died: `--rm` never removes a container that never ran.
    let o = podman(
        &[
            "inspect",
            &running,
            "--format",
            "{{index .Config.Labels \"coop.agent\"}}",
        ],
        &podman_env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let label = format!("coop.agent={}", String::from_utf8_lossy(&o.stdout).trim());
    let created = format!("coop-{id}-created");
    let o = podman(
        &[
            "create",
            "--name",
            &created,
            "--label",
            &label,
            &image.name,
            "true",
        ],
        &podman_env,
    );
    assert!(o.status.success(), "{}", text(&o));
    agent.kill9();
    assert_eq!(
        containers(&format!("coop-{id}-"), &podman_env).len(),
        2,
        "the containers outlive their agent"
    );
    let _agent = s.agent_env("box", "acme", "nvml", &agent_args, &env);
    wait_containers(&running, &podman_env, "removed", |n| n.is_empty());
    wait_containers(&created, &podman_env, "removed", |n| n.is_empty());
    c.ok(&["job", "cancel", &id]);
    c.wait_final(&id);
}
