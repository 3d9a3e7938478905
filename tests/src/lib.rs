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
/// More addresses of the client's side, for tests that need several sources.
pub const CLIENT_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const CLIENT_ADDR3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
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
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// Starts `f` on a thread that lives in this namespace; join it for the result.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<thread::JoinHandle<anyhow::Result<T>>> {
        let file =
            fs::File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        Ok(thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        }))
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
        for extra in [CLIENT_ADDR2, CLIENT_ADDR3] {
            client.ip(&["addr", "add", &format!("{extra}/24"), "dev", &client_if])?;
        }
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
            if lb_common::maps::ALL.contains(&name.as_str()) || name.starts_with("link_") {
                let _ = fs::remove_file(e.path());
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
    burst_in_background(ns, url, count, concurrency, stream, max_tokens)?
        .join()
        .map_err(|_| anyhow::anyhow!("burst thread panicked"))?
}

/// Replies of a `burst`.
pub type Replies = anyhow::Result<Vec<anyhow::Result<Reply>>>;

/// `burst` on its own thread: join the handle for the replies.
pub fn burst_in_background(
    ns: &NetNs,
    url: &str,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<thread::JoinHandle<Replies>> {
    let url = url.to_owned();
    let handle = ns.spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(burst_task(url, count, concurrency, stream, max_tokens))
    })?;
    Ok(thread::spawn(move || {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("burst thread panicked"))?
            .and_then(|r| r)
    }))
}

async fn burst_task(
    url: String,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> Replies {
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
}

/// How a TCP connect from a namespace ended.
#[derive(Debug)]
pub enum Connect {
    Open(std::net::TcpStream),
    /// Answered with a RST.
    Refused,
    TimedOut,
    Failed(std::io::Error),
}

impl Connect {
    pub fn is_open(&self) -> bool {
        matches!(self, Connect::Open(_))
    }
}

/// `count` TCP connects to `to`, one after the other, from inside `ns` (from `source` if
/// given, else the route's address), each bounded by `timeout`. Open ones stay open.
pub fn connects(
    ns: &NetNs,
    source: Option<Ipv4Addr>,
    to: std::net::SocketAddrV4,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Connect>> {
    ns.run(move || {
        (0..count)
            .map(|_| connect_one(source, to, timeout))
            .collect()
    })
}

fn connect_one(source: Option<Ipv4Addr>, to: std::net::SocketAddrV4, timeout: Duration) -> Connect {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return Connect::Failed(e),
    };
    if let Some(src) = source
        && let Err(e) = socket.bind(&SockAddr::from(std::net::SocketAddrV4::new(src, 0)))
    {
        return Connect::Failed(e);
    }
    match socket.connect_timeout(&SockAddr::from(to), timeout) {
        Ok(()) => Connect::Open(socket.into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Connect::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Connect::TimedOut,
        Err(e) => Connect::Failed(e),
    }
}

/// One HTTP/1.1 GET on an open connection, which stays open: the status line.
pub fn http_get_on(stream: &mut std::net::TcpStream, path: &str) -> anyhow::Result<String> {
    Ok(http_head_on(stream, path)?
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

/// One HTTP/1.1 GET on an open connection: the first read of the answer (status line and
/// headers, lower-case names as hyper sends them).
pub fn http_head_on(stream: &mut std::net::TcpStream, path: &str) -> anyhow::Result<String> {
    http_on(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: gpulb\r\n\r\n"),
    )
}

/// A one-token completion on an open connection: the instance that answered.
pub fn completion_on(stream: &mut std::net::TcpStream) -> anyhow::Result<String> {
    let body = r#"{"model":"sim-llm","prompt":"hi","max_tokens":1}"#;
    let head = http_on(
        stream,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: gpulb\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{INSTANCE_HEADER}: ")))
        .map(|i| i.trim().to_owned())
        .with_context(|| format!("no {INSTANCE_HEADER} in {head:?}"))
}

fn http_on(stream: &mut std::net::TcpStream, request: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
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

/// A read command (`vips`, `stats`, `flows`, ...) with `--json` on the maps under `pins`.
pub fn read_pinned(pins: &Path, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let pins = pins.display().to_string();
    let mut full = args.to_vec();
    full.extend_from_slice(&["--json", "--pin-path", &pins]);
    let v: serde_json::Value = serde_json::from_str(&gpulb_cli(&full)?)?;
    v.as_array()
        .cloned()
        .with_context(|| format!("gpulb {} --json is an array", args.join(" ")))
}

/// Packets counted for a verdict reason, from `gpulb stats --json` on the maps under `pins`.
pub fn reason_count(pins: &Path, name: &str) -> u64 {
    let rows = read_pinned(pins, &["stats"]).expect("gpulb stats");
    rows.iter()
        .find(|r| r["reason"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no reason {name} in {rows:?}"))
}

/// Runs the `gpulb` CLI (in the caller's namespace: the pinned maps are global).
pub fn gpulb_cli(args: &[&str]) -> anyhow::Result<String> {
    sh(bin("gpulb").to_str().context("UTF-8 path")?, args)
}

/// A running gpulb: the topology, `backends` simulated GPU instances on
/// `LB_ADDR:8001..` (started by the test bed, or by the daemon as a `[[model]]`), and
/// `gpulb run` attached to the lb side of the veth. On drop: the daemon stops (and stops
/// its instances), any instance left behind by a killed daemon is killed, then pins,
/// scratch files and namespaces go.
pub struct Stack {
    pub daemon: Proc,
    pub sims: Vec<Proc>,
    pub pins: PinDir,
    pub dir: TempDir,
    pub topo: Topology,
    pub config: PathBuf,
    /// The daemon's control socket.
    pub socket: PathBuf,
    /// In the environment of every instance the daemon starts (found and killed on drop).
    pub marker: String,
    daemons: u32,
}

/// More config lines for `Stack::start_with`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra<'a> {
    /// Top-level keys.
    pub top: &'a str,
    /// In the `[[vip]]` table.
    pub vip: &'a str,
    /// In each `[[vip.backend]]`.
    pub backend: &'a str,
    /// At the end of the config (more `[[vip]]`s, say).
    pub tail: &'a str,
}

/// Generic-mode XDP, for tests of the data path's RSTs: a veth delivers what native XDP_TX
/// sends back only when the peer veth runs an XDP program of its own (the driver kicks the
/// peer's NAPI only then), and the client's end has none.
pub const XDP_TX_MODE: &str = "xdp_mode = \"generic\"";

/// Port of the i-th (0-based) simulated instance.
pub fn sim_port(i: usize) -> u16 {
    8001 + i as u16
}

/// Name of the model the managed stacks run.
pub const MODEL: &str = "sim-llm";

impl Stack {
    /// Instances started by the test bed, named in the config as `[[vip.backend]]`s;
    /// `sim_args` are extra `gpulb-sim` flags for every instance.
    pub fn start(
        tag: &str,
        backends: usize,
        pins: PinDir,
        sim_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(tag, backends, pins, sim_args, Extra::default())
    }

    /// `start` with `top_extra` lines at the top of the config, `vip_extra` lines in the
    /// `[[vip]]` table and `backend_extra` lines in each `[[vip.backend]]`.
    pub fn start_with(
        tag: &str,
        backends: usize,
        pins: PinDir,
        sim_args: &[&str],
        extra: Extra<'_>,
    ) -> anyhow::Result<Self> {
        let Extra {
            top: top_extra,
            vip: vip_extra,
            backend: backend_extra,
            tail,
        } = extra;
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
        let mut vip = String::new();
        for i in 0..backends {
            vip.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{LB_ADDR}\"\nport = {}\n{backend_extra}\n",
                sim_port(i)
            ));
        }
        vip.push_str(tail);
        let stack = Self::launch(topo, dir, pins, sims, top_extra, vip_extra, &vip)?;
        // At least: `tail` may add backends of its own.
        stack.wait_ready_by(backends, Duration::from_secs(30), |ready, n| ready >= n)?;
        Ok(stack)
    }

    /// `backends` instances of model `sim-llm` on `gpus = "simulated:N"`, started and
    /// supervised by the daemon. `model_extra`: more TOML lines for the `[[model]]` table
    /// (e.g. a `command` with simulator flags, restart delays, `[model.health]`). Returns
    /// once the daemon is up; `wait_ready` waits for the instances.
    pub fn managed(
        tag: &str,
        backends: usize,
        pins: PinDir,
        model_extra: &str,
    ) -> anyhow::Result<Self> {
        Self::managed_with(tag, backends, pins, "", model_extra)
    }

    /// `managed` with `vip_extra` lines in the `[[vip]]` table; `{marker}` in `model_extra`
    /// becomes the stack's marker (for more `[[model]]`s' `env`).
    pub fn managed_with(
        tag: &str,
        backends: usize,
        pins: PinDir,
        vip_extra: &str,
        model_extra: &str,
    ) -> anyhow::Result<Self> {
        let topo = Topology::new(tag)?;
        let dir = TempDir::new(tag)?;
        let marker = format!("{}", dir.path.display());
        let model = format!(
            "\n[[model]]\nname = \"{MODEL}\"\nvip = \"chat\"\ngpus = \"simulated:{backends}\"\n\
             address = \"{LB_ADDR}\"\nbase_port = {}\n\
             env = {{ GPULB_TEST_MARKER = \"{marker}\" }}\n{}\n",
            sim_port(0),
            model_extra.replace("{marker}", &marker)
        );
        Self::launch(topo, dir, pins, Vec::new(), "", vip_extra, &model)
    }

    fn launch(
        topo: Topology,
        dir: TempDir,
        pins: PinDir,
        sims: Vec<Proc>,
        top_extra: &str,
        vip_extra: &str,
        rest: &str,
    ) -> anyhow::Result<Self> {
        let config = format!(
            "{top_extra}\ninterface = \"{}\"\npin_path = \"{}\"\nstate_dir = \"{dir}/state\"\n\
             log_dir = \"{dir}/instances\"\nconntrack_size = 65536\n\
             drain_timeout_ms = 2000\nkill_timeout_ms = 2000\n\n\
             [[vip]]\nname = \"chat\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\n{vip_extra}\n\
             [vip.health]\ninterval_ms = 200\n{rest}",
            topo.lb_if,
            pins.path.display(),
            dir = dir.path.display(),
        );
        let config_path = dir.path.join("gpulb.toml");
        fs::write(&config_path, config)?;
        let mut stack = Self {
            daemon: Proc::idle("gpulb"),
            sims,
            pins,
            socket: dir.path.join("state/control.sock"),
            marker: dir.path.display().to_string(),
            dir,
            topo,
            config: config_path,
            daemons: 0,
        };
        stack.start_daemon()?;
        Ok(stack)
    }

    /// Starts `gpulb run` (again: a restart takes over what the last one left).
    pub fn start_daemon(&mut self) -> anyhow::Result<()> {
        self.daemons += 1;
        let name = if self.daemons == 1 {
            "gpulb".to_owned()
        } else {
            format!("gpulb-{}", self.daemons)
        };
        let config_arg = self.config.to_str().context("UTF-8 path")?.to_owned();
        self.daemon = Proc::spawn(
            &name,
            &self.topo.lb,
            &bin("gpulb"),
            &["run", "--config", &config_arg],
            &self.dir.path,
        )?;
        self.daemon
            .wait_for_log("gpulb ready", Duration::from_secs(30))
    }

    /// Waits until `n` backends are ready (in the table, probes passing).
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_ready_by(n, timeout, |ready, n| ready == n)
    }

    fn wait_ready_by(
        &self,
        n: usize,
        timeout: Duration,
        done: impl Fn(usize, usize) -> bool,
    ) -> anyhow::Result<()> {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(timeout, || {
            let Ok(rows) = self.backends() else {
                return false;
            };
            let ready = rows.iter().filter(|r| r["state"] == "ready").count();
            last = serde_json::Value::Array(rows);
            done(ready, n)
        });
        ensure!(
            ok,
            "{n} backends not ready within {timeout:?}: {last:#}\n{}",
            self.daemon.log_text()
        );
        Ok(())
    }

    pub fn pin_arg(&self) -> String {
        self.pins.path.display().to_string()
    }

    pub fn socket_arg(&self) -> String {
        self.socket.display().to_string()
    }

    /// `gpulb backends --json`, with the daemon's view.
    pub fn backends(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = gpulb_cli(&[
            "backends",
            "--json",
            "--pin-path",
            &self.pin_arg(),
            "--socket",
            &self.socket_arg(),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v.as_array().cloned().context("backends JSON is an array")
    }

    /// A read command (`vips`, `stats`, `flows`, ...) with `--json` and this stack's pins.
    pub fn read(&self, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
        read_pinned(&self.pins.path, args)
    }

    /// Packets counted for a verdict reason (`gpulb stats`).
    pub fn reason(&self, name: &str) -> u64 {
        reason_count(&self.pins.path, name)
    }

    /// A control command (`drain`, `weight`, ...) with this stack's socket.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.socket_arg();
        let mut full = args.to_vec();
        full.extend_from_slice(&["--socket", &socket]);
        gpulb_cli(&full)
    }

    /// Pids of processes carrying this stack's marker (instances the daemon started).
    pub fn instance_pids(&self) -> Vec<u32> {
        tagged_pids(&format!("GPULB_TEST_MARKER={}", self.marker))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        stop_daemon_and_instances(&mut self.daemon, &self.marker);
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

/// One request of a `Load`.
#[derive(Debug)]
pub struct LoadResult {
    pub started: Instant,
    pub result: Result<Reply, String>,
}

impl LoadResult {
    /// Succeeded with every token and `[DONE]`.
    pub fn complete(&self, max_tokens: u32) -> bool {
        matches!(&self.result, Ok(r) if r.done && r.tokens == max_tokens as usize)
    }
}

/// Steady streaming load from a namespace: `concurrency` clients, each sending one request
/// after another (a new connection each) until stopped, or `limit` passes.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<anyhow::Result<anyhow::Result<Vec<LoadResult>>>>>,
}

impl Load {
    pub fn start(
        ns: &NetNs,
        url: &str,
        concurrency: usize,
        max_tokens: u32,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let url = url.to_owned();
        let handle = ns.spawn(move || -> anyhow::Result<Vec<LoadResult>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(0)
                    .build()?;
                let deadline = Instant::now() + limit;
                let workers = (0..concurrency).map(|_| {
                    let (client, url, flag) = (client.clone(), url.clone(), flag.clone());
                    async move {
                        let mut out = Vec::new();
                        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                            let started = Instant::now();
                            let result = chat(&client, &url, true, max_tokens)
                                .await
                                .map_err(|e| format!("{e:#}"));
                            out.push(LoadResult { started, result });
                        }
                        out
                    }
                });
                let all = futures_util::future::join_all(workers).await;
                Ok(all.into_iter().flatten().collect())
            })
        })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops sending; waits for the requests in flight and returns every result.
    pub fn stop(mut self) -> Vec<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("stopped once");
        handle
            .join()
            .expect("load thread panicked")
            .and_then(|r| r)
            .expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The daemon's Prometheus endpoint (default `metrics_listen`), scraped inside `ns`.
pub fn scrape(ns: &NetNs) -> anyhow::Result<String> {
    let (status, body) = get(ns, "http://127.0.0.1:9464/metrics")?;
    ensure!(status == 200, "GET /metrics: HTTP {status}: {body}");
    Ok(body)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`
/// (`key="value"` strings); `None` if there is no such sample.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric_name, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric_name != name || !labels.iter().all(|l| label_text.contains(l)) {
            continue;
        }
        let v: f64 = value.parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// The `p` quantile (0 to 1) of `v`, nearest rank; NaN for no values.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What one run of the slow-instance scenario measured.
#[derive(Debug, Clone, Copy)]
pub struct SlowScenario {
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub requests: usize,
    pub failed: usize,
    /// Requests the fourth (slow) instance served.
    pub to_slow: usize,
    /// Mean of the fourth instance's `vllm:num_requests_waiting`, sampled every 100 ms.
    pub slow_queue_mean: f64,
}

/// The simulator flags that make the fourth instance of `four_instance_scenario` slow.
pub const SLOW: &[&str] = &["--slots", "1", "--tokens-per-second", "50"];

/// Three default simulated instances and a fourth run with `fourth` extra simulator flags
/// (`SLOW`, or none for four equal instances) behind one VIP with `vip` lines in its table
/// (e.g. `load_aware = true`); `requests` streaming chats, `concurrency` at a time.
pub fn four_instance_scenario(
    tag: &str,
    vip: &str,
    fourth: &[&str],
    requests: usize,
    concurrency: usize,
    tokens: u32,
) -> anyhow::Result<SlowScenario> {
    let slow_port = 8101;
    let flags: String = fourth.iter().map(|f| format!(", {f:?}")).collect();
    let slow = format!(
        "[model.health]\ninterval_ms = 100\n\n[[model]]\nname = \"slow\"\nvip = \"chat\"\n\
         served_model = \"{MODEL}\"\ngpus = \"simulated:1\"\naddress = \"{LB_ADDR}\"\n\
         base_port = {slow_port}\nenv = {{ GPULB_TEST_MARKER = \"{{marker}}\" }}\n\
         command = [\"gpulb-sim\", \"--listen\", \"{{address}}:{{port}}\", \"--name\", \"{{name}}\", \
         \"--model\", \"{{model}}\"{flags}]\n\
         [model.health]\ninterval_ms = 100\n"
    );
    let stack = Stack::managed_with(tag, 3, PinDir::new(tag), vip, &slow)?;
    stack.wait_ready(4, Duration::from_secs(30))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = stack.topo.lb.spawn(move || -> Vec<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::new();
        let url = format!("http://{LB_ADDR}:{slow_port}/metrics");
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let text = rt.block_on(async { client.get(&url).send().await.ok()?.text().await.ok() });
            if let Some(v) = text
                .as_deref()
                .and_then(|t| metric(t, "vllm:num_requests_waiting", &[]))
            {
                samples.push(v);
            }
            thread::sleep(Duration::from_millis(100));
        }
        samples
    })?;
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/chat/completions"),
        requests,
        concurrency,
        true,
        tokens,
    )?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))??;
    let ok: Vec<&Reply> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.done && r.tokens == tokens as usize)
        .collect();
    let ttft: Vec<f64> = ok
        .iter()
        .map(|r| r.time_to_first_token.as_secs_f64() * 1000.0)
        .collect();
    Ok(SlowScenario {
        ttft_p50_ms: percentile(ttft.clone(), 0.5),
        ttft_p95_ms: percentile(ttft, 0.95),
        requests,
        failed: requests - ok.len(),
        to_slow: ok.iter().filter(|r| r.instance == "slow-0").count(),
        slow_queue_mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
    })
}
