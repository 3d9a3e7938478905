//! Processes started inside a namespace, the binaries they run, and the scratch and pin
//! directories they write: drop guards all.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::NetNs;

static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes `bin` look in `dir` (the demo runs release binaries from a debug xtask).
pub fn set_bin_dir(dir: PathBuf) {
    BIN_DIR.set(dir).expect("bin dir set once, before use");
}

/// Where cargo put the workspace's binaries: target/<profile>, next to the running test.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = BIN_DIR.get() {
        return dir.clone();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_owned()
    } else {
        dir.to_owned()
    }
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// `timeout` stretched by `GPULB_TEST_PATIENCE` (a factor, default 1): the kernel matrix
/// runs the tests in an emulated VM (qemu TCG), where loading the programs alone takes
/// tens of seconds. Only waits stretch; nothing a test asserts about order or counts does.
pub fn patience(timeout: Duration) -> Duration {
    static FACTOR: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| {
        std::env::var("GPULB_TEST_PATIENCE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|f: &f64| *f >= 1.0)
            .unwrap_or(1.0)
    });
    timeout.mul_f64(factor)
}

/// A process started in a namespace; SIGTERM on drop, SIGKILL if it lingers. Its stdout
/// and stderr go to `log`.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` inside `ns` (network namespace only: /sys/fs/bpf stays visible).
    pub fn spawn(
        name: &str,
        ns: &NetNs,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, ns, program, args, log_dir, &[])
    }

    /// `spawn` with more environment variables.
    pub fn spawn_with_env(
        name: &str,
        ns: &NetNs,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("nsenter")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg(format!("--net={}", ns.path().display()))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), ns.name))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A placeholder that runs nothing (replaced before use).
    pub fn idle(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            child: None,
            log: PathBuf::new(),
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let timeout = patience(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits for the exit (SIGKILL after `grace`).
    pub fn stop_with(&mut self, signal: Signal, grace: Duration) -> anyhow::Result<ExitStatus> {
        let grace = patience(grace);
        let child = self.child.as_mut().context("already stopped")?;
        kill(Pid::from_raw(child.id() as i32), signal).ok();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.kill().ok();
        let status = child.wait()?;
        self.child = None;
        bail!(
            "{} ignored {signal} for {grace:?}; killed ({status})",
            self.name
        )
    }

    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// True if a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// A bpffs directory for one daemon's pins, removed (with gpulb's maps in it) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Self {
        Self::at(PathBuf::from(format!(
            "/sys/fs/bpf/gpulb-test-{tag}-{}",
            std::process::id()
        )))
    }

    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // gpulb's maps and its pinned links (`link_*`): removing a link's pin detaches it.
        for e in fs::read_dir(&self.path).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if lb_common::maps::is_ours(&name) || name.starts_with("link_") {
                let _ = fs::remove_file(e.path());
            } else if name.starts_with("tc_netlink_") || name.starts_with("tc_clsact_") {
                // Markers of a netlink TC filter; the filter goes with the test's namespace.
                let _ = fs::remove_dir(e.path());
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// A scratch directory for configs and logs, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("gpulb-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Clean-up of a test's `gpulb run`: SIGTERM (which stops its instances), then SIGKILL for
/// any instance carrying `marker` that is left (a SIGKILLed or handed-over daemon leaves its
/// instances running).
pub fn stop_daemon_and_instances(daemon: &mut Proc, marker: &str) {
    if daemon.running()
        && let Err(e) = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(15))
    {
        eprintln!("cleanup: {e:#}");
    }
    for pid in tagged_pids(&format!("GPULB_TEST_MARKER={marker}")) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Pids whose environment holds `entry` (`NAME=value`).
pub fn tagged_pids(entry: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == entry.as_bytes()) {
            out.push(pid);
        }
    }
    out
}
