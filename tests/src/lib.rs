//! Test bed for gpulb: network namespaces joined by a veth pair, processes started inside
//! them, and an HTTP client that runs inside a namespace. Every resource is a drop guard, so
//! a failing test leaves no namespace, link, pinned map or process behind.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking range) and exist only inside
//! the namespaces made here.
#![forbid(unsafe_code)]

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures_util::StreamExt as _;
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The load balancer's side of the veth: backends listen here.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's side.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The VIP; the client routes 198.18.100.0/24 through `LB_ADDR`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP_PORT: u16 = 80;
/// Header the simulated instance answers with (`gpulb::sim::INSTANCE_HEADER`).
pub const INSTANCE_HEADER: &str = "x-sim-instance";

/// Runs a command to completion; the error names it and carries its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A name unique to this process and call, short enough for an interface (≤ 15 bytes).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that lives in this namespace (sockets it opens belong here).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file =
            fs::File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }
}

impl NetNs {
    /// Runs an async task to completion on a single-threaded runtime inside this namespace.
    pub fn block_on<T: Send + 'static>(
        &self,
        task: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(task)
        })?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it, and so its peer.
        if let Err(e) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Two namespaces, `client` and `lb`, joined by a veth pair; the client routes the VIP
/// range through the lb side, where gpulb and the backends run.
pub struct Topology {
    pub client: NetNs,
    pub lb: NetNs,
    /// The veth end in `lb` (where XDP attaches).
    pub lb_if: String,
    pub client_if: String,
}

impl Topology {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let client = NetNs::new(&format!("gpulb-{tag}-client-{}", std::process::id()))?;
        let lb = NetNs::new(&format!("gpulb-{tag}-lb-{}", std::process::id()))?;
        let lb_if = unique("glb");
        let client_if = unique("gcl");
        // Created inside the client namespace, so nothing ever exists in the caller's.
        client.ip(&[
            "link", "add", &client_if, "type", "veth", "peer", "name", &lb_if, "netns", &lb.name,
        ])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/24"),
            "dev",
            &client_if,
        ])?;
        client.ip(&["link", "set", &client_if, "up"])?;
        lb.ip(&["addr", "add", &format!("{LB_ADDR}/24"), "dev", &lb_if])?;
        lb.ip(&["link", "set", &lb_if, "up"])?;
        client.ip(&[
            "route",
            "add",
            &format!("{}/24", Ipv4Addr::from(u32::from(VIP) & !0xff)),
            "via",
            &LB_ADDR.to_string(),
        ])?;
        Ok(Self {
            client,
            lb,
            lb_if,
            client_if,
        })
    }
}

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
        let log = log_dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("nsenter")
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

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
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
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("cleanup: {e:#}");
            }
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
        for name in lb_common::maps::ALL {
            let _ = fs::remove_file(self.path.join(name));
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

/// What one completion request got back.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The instance that answered (`x-sim-instance`).
    pub instance: String,
    /// Tokens received (SSE chunks before `[DONE]`, or words of the message).
    pub tokens: usize,
    /// Streaming: whether `data: [DONE]` arrived.
    pub done: bool,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

/// One chat completion to `url` (streaming or not), from the calling thread's namespace.
pub async fn chat(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<Reply> {
    let start = Instant::now();
    let body = serde_json::json!({
        "model": "sim-llm",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    let resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let instance = resp
        .headers()
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    ensure!(
        status.is_success(),
        "POST {url}: HTTP {status} from {instance}"
    );
    if !stream {
        let v: serde_json::Value = resp.json().await.context("reading JSON body")?;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
        let total = start.elapsed();
        return Ok(Reply {
            instance,
            tokens: text.split_whitespace().count(),
            done: true,
            time_to_first_token: total,
            total,
        });
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let (mut tokens, mut done, mut first) = (0, false, None);
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(
            &chunk.context("reading SSE stream")?,
        ));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim()
                .strip_prefix("data:")
                .map(str::trim)
                .unwrap_or("");
            if data == "[DONE]" {
                done = true;
            } else if data.contains("\"delta\"") {
                tokens += 1;
                first.get_or_insert_with(|| start.elapsed());
            }
        }
    }
    let total = start.elapsed();
    Ok(Reply {
        instance,
        tokens,
        done,
        time_to_first_token: first.unwrap_or(total),
        total,
    })
}

/// `count` chat requests to `url`, `concurrency` at a time, from inside `ns`; each result
/// in request order. Bounded by `count` and by a 60 s timeout per request.
pub fn burst(
    ns: &NetNs,
    url: &str,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<Vec<anyhow::Result<Reply>>> {
    let url = url.to_owned();
    ns.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(0) // one connection per request: each is a new flow
            .build()?;
        let results = futures_util::stream::iter(0..count)
            .map(|_| chat(&client, &url, stream, max_tokens))
            .buffered(concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        Ok(results)
    })
}

/// A GET from inside `ns`: (status, body).
pub fn get(ns: &NetNs, url: &str) -> anyhow::Result<(u16, String)> {
    let url = url.to_owned();
    ns.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let resp = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    })
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// `http://<VIP>:<port><path>`
pub fn vip_url(path: &str) -> String {
    format!("http://{VIP}:{VIP_PORT}{path}")
}

/// Runs the `gpulb` CLI (in the caller's namespace: the pinned maps are global).
pub fn gpulb_cli(args: &[&str]) -> anyhow::Result<String> {
    sh(bin("gpulb").to_str().context("UTF-8 path")?, args)
}

/// A running gpulb: the topology, `backends` simulated GPU instances on
/// `LB_ADDR:8001..`, and `gpulb run` attached to the lb side of the veth. Dropped in field
/// order: daemon, instances, pins, scratch files, then the namespaces.
pub struct Stack {
    pub daemon: Proc,
    pub sims: Vec<Proc>,
    pub pins: PinDir,
    pub dir: TempDir,
    pub topo: Topology,
    pub config: PathBuf,
}

/// Port of the i-th (0-based) simulated instance.
pub fn sim_port(i: usize) -> u16 {
    8001 + i as u16
}

impl Stack {
    /// `sim_args` are extra `gpulb-sim` flags for every instance.
    pub fn start(
        tag: &str,
        backends: usize,
        pins: PinDir,
        sim_args: &[&str],
    ) -> anyhow::Result<Self> {
        let topo = Topology::new(tag)?;
        let dir = TempDir::new(tag)?;
        let mut sims = Vec::with_capacity(backends);
        for i in 0..backends {
            let listen = format!("{LB_ADDR}:{}", sim_port(i));
            let name = format!("sim-{}", i + 1);
            let mut args = vec!["--listen", &listen, "--name", &name];
            args.extend_from_slice(sim_args);
            sims.push(Proc::spawn(
                &name,
                &topo.lb,
                &bin("gpulb-sim"),
                &args,
                &dir.path,
            )?);
        }
        for sim in &mut sims {
            sim.wait_for_log("serving", Duration::from_secs(10))?;
        }
        let mut config = format!(
            "interface = \"{}\"\npin_path = \"{}\"\nconntrack_size = 65536\n\n\
             [[vip]]\nname = \"chat\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\n",
            topo.lb_if,
            pins.path.display()
        );
        for i in 0..backends {
            config.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{LB_ADDR}\"\nport = {}\n",
                sim_port(i)
            ));
        }
        let config_path = dir.path.join("gpulb.toml");
        fs::write(&config_path, config)?;
        let config_arg = config_path.to_str().context("UTF-8 path")?.to_owned();
        let mut daemon = Proc::spawn(
            "gpulb",
            &topo.lb,
            &bin("gpulb"),
            &["run", "--config", &config_arg],
            &dir.path,
        )?;
        daemon.wait_for_log("gpulb ready", Duration::from_secs(30))?;
        Ok(Self {
            daemon,
            sims,
            pins,
            dir,
            topo,
            config: config_path,
        })
    }

    pub fn pin_arg(&self) -> String {
        self.pins.path.display().to_string()
    }
}
