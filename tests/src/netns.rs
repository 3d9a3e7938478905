//! Network namespaces and the veth pair between the client and the load balancer, and the
//! addresses (198.18.0.0/15 only) that exist inside them.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, ensure};
use nix::sched::{CloneFlags, setns};

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
