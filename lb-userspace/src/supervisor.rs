//! Model server processes: spawning one per instance (GPU by UUID, CPUs of the GPU's NUMA
//! node, own process group, output to a log file the daemon follows), noticing their exit
//! through a pidfd at once, restarting them with capped exponential backoff, and adopting the
//! instances a previous daemon left running.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sched::CpuSet,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{config::Model, gpu::InstanceSpec};

/// Consecutive short-lived runs after which an instance is reported as crash-looping.
pub const CRASH_LOOP_AFTER: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("opening log file {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawning {instance} ({program})")]
    Spawn {
        instance: String,
        program: String,
        #[source]
        source: io::Error,
    },
}

/// When to restart a crashed instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub delay: Duration,
    pub delay_max: Duration,
    pub stable_after: Duration,
}

impl RestartPolicy {
    pub fn of(model: &Model) -> Self {
        Self {
            delay: model.restart_delay,
            delay_max: model.restart_delay_max,
            stable_after: model.stable_after,
        }
    }

    /// Delay before the restart after `failures` consecutive short runs (≥ 1).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.delay.saturating_mul(factor).min(self.delay_max)
    }
}

/// What a daemon leaves behind for the next one to adopt (`state_dir/instances.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: String,
    pub pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid.
    pub start_time: u64,
    pub port: u16,
    pub restarts: u32,
}

pub fn read_records(path: &Path) -> Vec<InstanceRecord> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "ignoring unreadable instance record");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Atomic replace: a reader (the next daemon) never sees half a file.
pub fn write_records(path: &Path, records: &[InstanceRecord]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(records).map_err(io::Error::other)?,
    )?;
    fs::rename(tmp, path)
}

/// /proc/PID/stat field 22, the process's start time.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What the supervisor tells the daemon.
#[derive(Debug)]
pub enum Event {
    Started {
        instance: String,
        pid: u32,
        start_time: u64,
        restarts: u32,
        adopted: bool,
    },
    Exited {
        instance: String,
        /// When the pidfd became readable.
        at: Instant,
        status: String,
        restarts: u32,
        crash_loop: bool,
        /// `None`: stopped on purpose, not restarted.
        restart_in: Option<Duration>,
    },
}

/// What the daemon asks of a supervisor; the sender is told when it is done.
#[derive(Debug)]
pub enum Command {
    /// Stop (SIGTERM, then SIGKILL after the kill timeout) and start again at once.
    Restart(oneshot::Sender<()>),
    /// Stop and do not start again; the supervisor ends.
    Stop(oneshot::Sender<()>),
    /// Process `pid` did not become ready in time: stop it and count a failed start (restart
    /// after the backoff; a crash loop after a few in a row); `why` says why. Ignored once
    /// another process runs.
    FailStart { pid: u32, why: String },
}

/// A running instance: our child, or one adopted from a previous daemon.
enum Running {
    /// `pidfd` tells the exit before the child is reaped: while it is a zombie its pid (the
    /// process group's id) cannot be reused, so the group can be killed safely.
    Child {
        child: tokio::process::Child,
        pidfd: Option<AsyncFd<OwnedFd>>,
    },
    Adopted {
        pid: u32,
        pidfd: AsyncFd<OwnedFd>,
    },
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child { child, .. } => child.id().unwrap_or(0),
            Running::Adopted { pid, .. } => *pid,
        }
    }

    /// Resolves when the process has exited; for our child, the rest of its process group
    /// (workers it forked, holding GPU memory) is killed before it is reaped.
    async fn wait(&mut self) -> String {
        let pid = self.pid();
        match self {
            Running::Child { child, pidfd } => {
                if let Some(fd) = pidfd {
                    let _ = fd.readable().await;
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                match child.wait().await {
                    Ok(status) => describe(status),
                    Err(e) => format!("wait failed: {e}"),
                }
            }
            Running::Adopted { pidfd, .. } => {
                // An adopted process is init's child: its status is not ours to read, and
                // once init reaps it its pid may be reused, so its group is left alone.
                let _ = pidfd.readable().await;
                "exited (adopted; status unknown)".into()
            }
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`; returns once the leader is gone.
    async fn terminate(&mut self, grace: Duration) -> String {
        let pgid = Pid::from_raw(self.pid() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                warn!(
                    pid = self.pid(),
                    ?grace,
                    "did not stop after SIGTERM; sending SIGKILL"
                );
                let _ = killpg(pgid, Signal::SIGKILL);
                self.wait().await
            }
        }
    }
}

/// A pidfd for `pid`, registered with tokio: readable once the process has exited.
#[expect(unsafe_code, reason = "registering the pidfd with tokio's reactor")]
fn pidfd(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(pid as i32)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and the same for its whole
    // lifetime.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => Signal::try_from(sig)
            .map_or_else(|_| format!("signal {sig}"), |s| format!("killed by {s}")),
        _ => status.to_string(),
    }
}

/// Adopts `record`'s process if it is still the same process (pid and start time).
fn adopt(record: &InstanceRecord) -> Option<Running> {
    // pidfd first, then the start time: the pidfd pins the process we checked.
    let pidfd = pidfd(record.pid)?;
    if proc_start_time(record.pid) != Some(record.start_time) {
        return None;
    }
    Some(Running::Adopted {
        pid: record.pid,
        pidfd,
    })
}

pub fn log_path(log_dir: &Path, instance: &str) -> PathBuf {
    log_dir.join(format!("{instance}.log"))
}

#[expect(unsafe_code, reason = "pre_exec sets the CPU affinity of the child")]
fn spawn(spec: &InstanceSpec, log_dir: &Path) -> Result<Running, SupervisorError> {
    let path = log_path(log_dir, &spec.name);
    let log_err = |source| SupervisorError::Log {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(log_dir).map_err(log_err)?;
    // A file, not a pipe: the server keeps writing if the daemon dies or restarts. Appended
    // across restarts (the last crash's output stays), and O_APPEND lets `follow_log`
    // rotate it under the running server (copy, then truncate).
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(log_err)?;
    let err = log.try_clone().map_err(log_err)?;
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("CUDA_VISIBLE_DEVICES", spec.cuda_visible_devices())
        .env("GPULB_INSTANCE", &spec.name)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own group: stopping it reaches the workers it forks, and a signal to the
        // daemon's group (Ctrl-C) does not.
        .process_group(0);
    if !spec.cpus.is_empty() {
        let mut set = CpuSet::new();
        for &cpu in &spec.cpus {
            if cpu < CpuSet::count() {
                let _ = set.set(cpu);
            }
        }
        // SAFETY: runs in the forked child before exec; it only calls sched_setaffinity(2),
        // which is async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
            });
        }
    }
    let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
        instance: spec.name.clone(),
        program: spec.argv[0].clone(),
        source,
    })?;
    // Opened before anything can reap the child, so it is this process's pidfd.
    let pidfd = child.id().and_then(pidfd);
    Ok(Running::Child { child, pidfd })
}

/// Everything a supervisor needs besides its instance.
#[derive(Clone)]
pub struct Context {
    pub log_dir: PathBuf,
    pub kill_timeout: Duration,
    pub events: mpsc::UnboundedSender<Event>,
    pub cancel: CancellationToken,
}

/// Runs one instance until told to stop, or until `cancel` (then the process is left
/// running for the next daemon to adopt).
pub async fn supervise(
    spec: InstanceSpec,
    policy: RestartPolicy,
    adopt_from: Option<InstanceRecord>,
    ctx: Context,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut restarts = adopt_from.as_ref().map_or(0, |r| r.restarts);
    let mut failures = 0u32;
    let mut adopted = adopt_from.as_ref().and_then(adopt);
    if adopt_from.is_some() && adopted.is_none() {
        warn!(instance = %spec.name, "recorded instance is gone; starting a new one");
    }
    // The log is appended to: what earlier processes (or an adopted one) wrote is not
    // copied into the daemon's log again.
    let path = log_path(&ctx.log_dir, &spec.name);
    let written = fs::metadata(&path).map_or(0, |m| m.len());
    let writer = Arc::new(AtomicU32::new(0));
    let tail = tokio::spawn(follow_log(
        spec.name.clone(),
        path,
        written,
        writer.clone(),
        ctx.cancel.clone(),
    ));
    loop {
        let is_adopted = adopted.is_some();
        let mut running = match adopted.take() {
            Some(r) => r,
            None => match spawn(&spec, &ctx.log_dir) {
                Ok(r) => r,
                Err(e) => {
                    error!(instance = %spec.name, error = %crate::datapath::ErrorChain(&e), "spawn failed");
                    let failure = Failure {
                        at: Instant::now(),
                        status: format!("spawn failed: {e}"),
                        restarts,
                    };
                    let (delay, _) = failure.report(&spec, &ctx, &policy, &mut failures);
                    if !pause(delay, &mut commands, &ctx.cancel).await {
                        break;
                    }
                    restarts += 1;
                    continue;
                }
            },
        };
        let pid = running.pid();
        writer.store(pid, Ordering::Relaxed);
        let started = Instant::now();
        let _ = ctx.events.send(Event::Started {
            instance: spec.name.clone(),
            pid,
            start_time: proc_start_time(pid).unwrap_or(0),
            restarts,
            adopted: is_adopted,
        });
        info!(instance = %spec.name, pid, adopted = is_adopted, gpus = %spec.cuda_visible_devices(), "instance started");

        tokio::select! {
            // Hand-over first: never act on a command channel closed by the daemon exiting.
            biased;
            () = ctx.cancel.cancelled() => {
                // Hand-over: the process keeps serving; the next daemon adopts it.
                break;
            }
            status = running.wait() => {
                if started.elapsed() >= policy.stable_after {
                    failures = 0;
                }
                let failure = Failure { at: Instant::now(), status: status.clone(), restarts };
                let (delay, crash_loop) = failure.report(&spec, &ctx, &policy, &mut failures);
                if crash_loop {
                    error!(instance = %spec.name, pid, %status, failures, restart_in = ?delay, "instance is crash-looping");
                } else {
                    warn!(instance = %spec.name, pid, %status, restart_in = ?delay, "instance exited");
                }
                if !pause(delay, &mut commands, &ctx.cancel).await {
                    break;
                }
                restarts += 1;
            }
            command = next_command(&mut commands, pid) => {
                // No sender left: the daemon is going away (hand-over, crash); the process
                // keeps serving for the next daemon. Only an explicit command stops it.
                let Some(command) = command else { break };
                let status = running.terminate(ctx.kill_timeout).await;
                let (done, again) = match command {
                    Command::Restart(done) => (Some(done), true),
                    Command::Stop(done) => (Some(done), false),
                    Command::FailStart { why, .. } => {
                        let failure = Failure { at: Instant::now(), status: why.clone(), restarts };
                        let (delay, _) = failure.report(&spec, &ctx, &policy, &mut failures);
                        error!(instance = %spec.name, pid, why = %why, %status, failures, restart_in = ?delay, "instance failed to start");
                        if !pause(delay, &mut commands, &ctx.cancel).await {
                            break;
                        }
                        restarts += 1;
                        continue;
                    }
                };
                info!(instance = %spec.name, pid, %status, restart = again, "instance stopped");
                let _ = ctx.events.send(Event::Exited {
                    instance: spec.name.clone(),
                    at: Instant::now(),
                    status,
                    restarts,
                    crash_loop: false,
                    restart_in: again.then_some(Duration::ZERO),
                });
                if let Some(done) = done {
                    let _ = done.send(());
                }
                if !again {
                    break;
                }
                failures = 0;
            }
        }
    }
    tail.abort();
}

/// A run that failed: the process exited, could not be spawned, or did not become ready in
/// time.
struct Failure {
    at: Instant,
    status: String,
    restarts: u32,
}

impl Failure {
    /// Counts it against `failures`, tells the state task, and returns the backoff before the
    /// next start and whether the instance is now crash-looping.
    fn report(
        self,
        spec: &InstanceSpec,
        ctx: &Context,
        policy: &RestartPolicy,
        failures: &mut u32,
    ) -> (Duration, bool) {
        *failures += 1;
        let delay = policy.backoff(*failures);
        let crash_loop = *failures >= CRASH_LOOP_AFTER;
        let _ = ctx.events.send(Event::Exited {
            instance: spec.name.clone(),
            at: self.at,
            status: self.status,
            restarts: self.restarts,
            crash_loop,
            restart_in: Some(delay),
        });
        (delay, crash_loop)
    }
}

/// The next command for the process `pid`: a failed start meant for an earlier process is
/// dropped. Cancel-safe (as `recv`).
async fn next_command(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    pid: u32,
) -> Option<Command> {
    loop {
        match commands.recv().await {
            Some(Command::FailStart { pid: of, .. }) if of != pid => {}
            other => return other,
        }
    }
}

/// Sleeps `delay` before a restart; false if told to stop (or cancelled) meanwhile.
async fn pause(
    delay: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    cancel: &CancellationToken,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            () = cancel.cancelled() => return false,
            command = commands.recv() => match command {
                // Restart: go now.
                Some(Command::Restart(done)) => {
                    let _ = done.send(());
                    return true;
                }
                Some(Command::Stop(done)) => {
                    let _ = done.send(());
                    return false;
                }
                // Nothing is running to fail: keep waiting out the delay.
                Some(Command::FailStart { .. }) => {}
                None => return false,
            },
        }
    }
}

/// An instance log is rotated once it reaches this size ...
const LOG_MAX_BYTES: u64 = 64 << 20;
/// ... keeping this many older files (`<instance>.log.1` the newest).
const LOG_KEEP: usize = 3;

/// Whether process `pid` writes its stdout in append mode (`O_APPEND`), so that truncating
/// its log under it is safe. An adopted process of an earlier gpulb, which opened its log
/// with truncate, does not: it would write on at its old offset, leaving a hole. No process
/// (0): nothing writes.
fn appends(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/1")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_APPEND as u32 != 0)
}

/// Shifts `path.1`.. up by one (dropping the oldest past `keep`), copies `path` to `path.1`
/// and truncates it: the server writes on through its O_APPEND descriptor. Lines written
/// between the copy and the truncation are lost (as with logrotate's copytruncate).
fn rotate_log(path: &Path, keep: usize) -> io::Result<()> {
    let numbered = |i: usize| PathBuf::from(format!("{}.{i}", path.display()));
    for i in (1..keep).rev() {
        match fs::rename(numbered(i), numbered(i + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    fs::copy(path, numbered(1))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// Copies the instance's output into the daemon's log, a line at a time, tagged with the
/// instance, from byte `pos` on; rotates the file once it is past `LOG_MAX_BYTES`, if its
/// writer (`writer`, the pid) appends.
async fn follow_log(
    instance: String,
    path: PathBuf,
    mut pos: u64,
    writer: Arc<AtomicU32>,
    cancel: CancellationToken,
) {
    let mut file: Option<File> = None;
    let mut pending = String::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if file.is_none() {
            file = File::open(&path).ok();
        }
        let mut read_any = false;
        if let Some(f) = &mut file {
            // Truncated (rotated, or by hand): start over from its beginning.
            if f.metadata().map(|m| m.len()).unwrap_or(0) < pos {
                pos = 0;
                pending.clear();
            }
            if f.seek(SeekFrom::Start(pos)).is_ok()
                && let Ok(n) = f.read(&mut buf)
                && n > 0
            {
                pos += n as u64;
                read_any = true;
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let line = line.trim_end();
                    if !line.is_empty() {
                        info!(target: "gpulb::model", instance = %instance, "{line}");
                    }
                }
            }
        }
        if !read_any && pos >= LOG_MAX_BYTES && appends(writer.load(Ordering::Relaxed)) {
            let rotate = path.clone();
            match tokio::task::spawn_blocking(move || rotate_log(&rotate, LOG_KEEP)).await {
                Ok(Ok(())) => pos = 0,
                Ok(Err(e)) => {
                    warn!(instance = %instance, path = %path.display(), error = %e, "rotating the instance log failed");
                }
                Err(e) => {
                    warn!(instance = %instance, error = %e, "rotating the instance log failed")
                }
            }
        }
        if !read_any {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_files_and_empties_the_log() {
        let dir = std::env::temp_dir().join(format!("gpulb-rotate-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("m-0.log");
        for round in 1..=3 {
            fs::write(&log, format!("round {round}\n")).expect("write");
            rotate_log(&log, 2).expect("rotate");
        }
        let read = |name: &str| fs::read_to_string(dir.join(name)).expect(name);
        assert_eq!(read("m-0.log"), "");
        assert_eq!(read("m-0.log.1"), "round 3\n");
        assert_eq!(read("m-0.log.2"), "round 2\n");
        assert!(!dir.join("m-0.log.3").exists(), "only `keep` old files");
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            delay: Duration::from_millis(100),
            delay_max: Duration::from_millis(1000),
            stable_after: Duration::from_secs(60),
        };
        let got: Vec<u64> = (1..=6).map(|f| p.backoff(f).as_millis() as u64).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(200), Duration::from_millis(1000));
    }

    #[test]
    fn start_time_of_this_process_is_stable() {
        let me = std::process::id();
        let t = proc_start_time(me).expect("own /proc/PID/stat");
        assert_eq!(proc_start_time(me), Some(t));
        assert_eq!(proc_start_time(u32::MAX), None);
    }
}
