//! A whole gpulb under test: topology, instances, config, daemon; and the CLI that reads it.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::{
    LB_ADDR, PinDir, Proc, TempDir, Topology, VIP, VIP_PORT, bin, sh, stop_daemon_and_instances,
    tagged_pids, wait_until,
};

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
        .find(|r| r["counter"] == name)
        .and_then(|r| r["value"].as_u64())
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
    /// More environment for the daemon (and so its instances), from `managed_env`.
    pub daemon_env: Vec<(String, String)>,
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

/// One simulated instance that `Stack::start_instances` starts.
#[derive(Debug, Clone, Copy)]
pub struct Instance<'a> {
    /// Extra `gpulb-sim` flags.
    pub args: &'a [&'a str],
    /// Lines in its `[[vip.backend]]`.
    pub backend: &'a str,
}

/// Generic-mode XDP, for tests of the data path's RSTs: a veth delivers what native XDP_TX
/// sends back only when the peer veth runs an XDP program of its own (the driver kicks the
/// peer's NAPI only then), and the client's end has none.
pub const XDP_TX_MODE: &str = "xdp_mode = \"generic\"";

/// Port of the i-th (0-based) simulated instance.
pub fn sim_port(i: usize) -> u16 {
    8001 + i as u16
}

/// The row of `gpulb backends --json` for `instance`.
pub fn backend_row<'a>(rows: &'a [serde_json::Value], instance: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["daemon"]["instance"] == instance)
        .unwrap_or_else(|| panic!("no backend {instance} in {rows:#?}"))
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
        let instances: Vec<Instance<'_>> = (0..backends)
            .map(|_| Instance {
                args: sim_args,
                backend: extra.backend,
            })
            .collect();
        Self::start_instances(tag, &instances, pins, extra)
    }

    /// Instances started by the test bed, each with its own `gpulb-sim` flags and
    /// `[[vip.backend]]` lines (the `backend` of `extra` is not used).
    pub fn start_instances(
        tag: &str,
        instances: &[Instance<'_>],
        pins: PinDir,
        extra: Extra<'_>,
    ) -> anyhow::Result<Self> {
        let topo = Topology::new(tag)?;
        let dir = TempDir::new(tag)?;
        let mut sims = Vec::with_capacity(instances.len());
        for (i, instance) in instances.iter().enumerate() {
            let listen = format!("{LB_ADDR}:{}", sim_port(i));
            let name = format!("sim-{}", i + 1);
            let mut args = vec!["--listen", &listen, "--name", &name];
            args.extend_from_slice(instance.args);
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
        for (i, instance) in instances.iter().enumerate() {
            vip.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{LB_ADDR}\"\nport = {}\n{}\n",
                sim_port(i),
                instance.backend
            ));
        }
        vip.push_str(extra.tail);
        let stack = Self::launch(
            topo,
            dir,
            pins,
            sims,
            extra.top,
            extra.vip,
            &vip,
            Vec::new(),
        )?;
        // At least: `tail` may add backends of its own.
        stack.wait_ready_by(instances.len(), Duration::from_secs(30), |ready, n| {
            ready >= n
        })?;
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
        Self::managed_env(tag, backends, pins, vip_extra, model_extra, Vec::new())
    }

    /// `managed_with`, the daemon started with `env` added to its environment.
    pub fn managed_env(
        tag: &str,
        backends: usize,
        pins: PinDir,
        vip_extra: &str,
        model_extra: &str,
        env: Vec<(String, String)>,
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
        Self::launch(topo, dir, pins, Vec::new(), "", vip_extra, &model, env)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "private; each caller names its parts"
    )]
    fn launch(
        topo: Topology,
        dir: TempDir,
        pins: PinDir,
        sims: Vec<Proc>,
        top_extra: &str,
        vip_extra: &str,
        rest: &str,
        daemon_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        // 65536 unless the test sizes conntrack itself.
        let conntrack = if top_extra.contains("conntrack_size =") {
            ""
        } else {
            "conntrack_size = 65536\n"
        };
        let config = format!(
            "{top_extra}\ninterface = \"{}\"\npin_path = \"{}\"\nstate_dir = \"{dir}/state\"\n\
             log_dir = \"{dir}/instances\"\n{conntrack}\
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
            daemon_env,
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
        self.daemon = Proc::spawn_with_env(
            &name,
            &self.topo.lb,
            &bin("gpulb"),
            &["run", "--config", &config_arg],
            &self.dir.path,
            &self.daemon_env,
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
