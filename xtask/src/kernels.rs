//! The kernel matrix: Debian's packaged kernels booted under qemu on this machine's own
//! filesystem (virtme-ng), each running
//!
//! - the packet fixtures through `BPF_PROG_TEST_RUN` (`tests/tests/packets.rs`),
//! - TC through netlink: attach, takeover, clean-up (`tests/tests/tc_attach.rs`),
//! - the end-to-end takeover test: the daemon on a veth pair, streams through the VIP across
//!   a SIGKILL and a hand-over, then a clean stop (`tests/tests/control.rs`),
//! - a virtio-net NIC backed by a tap device in a namespace on this side: `gpulb_ingress` in
//!   native (driver) mode on it, HTTP through the VIP from this side,
//! - `gpulb check-kernel` (the verifier's instruction counts per program).
//!
//! KVM where it works; otherwise TCG (emulation; here KVM fails nested with an MSR error),
//! with the tests' waits stretched (`GPULB_TEST_PATIENCE`).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{exec, setup};

/// A kernel of the matrix: Debian's packages named `<prefix><number><suffix>`, the newest
/// number the archive has (the archive drops old point releases).
pub struct Kernel {
    pub label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's own kernel (no TCX: TC attaches through netlink) and bookworm's 6.12.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Kernel {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

/// A kernel unpacked under target/kernels: never installed on this machine (a package
/// would make itself the next boot's default kernel).
struct Unpacked {
    release: String,
    vmlinuz: PathBuf,
}

impl Kernel {
    /// The newest package of this kernel the archive can deliver.
    fn package(&self) -> anyhow::Result<String> {
        let list = || -> anyhow::Result<Vec<(u32, String)>> {
            let out = Command::new("apt-cache")
                .args(["pkgnames", self.prefix])
                .output()
                .context("apt-cache pkgnames")?;
            let names: Vec<(u32, String)> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|name| {
                    let n = name.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?;
                    Some((n.parse().ok()?, name.to_owned()))
                })
                .collect();
            if names.is_empty() {
                return Ok(names);
            }
            // pkgnames also lists names only referenced; keep those with a candidate.
            let policy = Command::new("apt-cache")
                .arg("policy")
                .args(names.iter().map(|(_, n)| n))
                .output()
                .context("apt-cache policy")?;
            let policy = String::from_utf8_lossy(&policy.stdout);
            let mut current = "";
            let mut available = Vec::new();
            for line in policy.lines() {
                if let Some(name) = line.strip_suffix(':').filter(|l| !l.starts_with(' ')) {
                    current = name;
                } else if let Some(c) = line.trim().strip_prefix("Candidate: ")
                    && c != "(none)"
                {
                    available.push(current.to_owned());
                }
            }
            Ok(names
                .into_iter()
                .filter(|(_, n)| available.contains(n))
                .collect())
        };
        let mut found = list()?;
        if found.is_empty() {
            exec(Command::new("apt-get").args(["update", "-q"]))?;
            found = list()?;
        }
        found
            .into_iter()
            .max()
            .map(|(_, name)| name)
            .with_context(|| format!("no package {}N{} in the archive", self.prefix, self.suffix))
    }

    /// Downloads and unpacks the package (once).
    fn unpack(&self) -> anyhow::Result<Unpacked> {
        let package = self.package()?;
        let release = package
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-unsigned").or(Some(r)))
            .context("package name")?
            .to_owned();
        let root = out_dir().join(format!("root-{release}"));
        let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
        if !vmlinuz.exists() {
            let debs = out_dir().join("debs");
            fs::create_dir_all(&debs)?;
            println!("[kernels] downloading and unpacking {package}");
            exec(
                Command::new("apt-get")
                    .args(["download", "-q", &package])
                    .current_dir(&debs),
            )?;
            let deb = fs::read_dir(&debs)?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
                    })
                })
                .with_context(|| format!("apt-get download left no {package} .deb"))?;
            exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            ensure!(vmlinuz.exists(), "{package} has no {}", vmlinuz.display());
        }
        Ok(Unpacked { release, vmlinuz })
    }
}

const VIRTME_NG: &str = "virtme-ng==1.42";

/// The kernels named by `--kernels` ("all", "none" or labels separated by commas).
pub fn select(spec: &str) -> anyhow::Result<Vec<&'static Kernel>> {
    match spec {
        "all" => Ok(KERNELS.iter().collect()),
        "none" => Ok(Vec::new()),
        list => list
            .split(',')
            .map(|label| {
                KERNELS
                    .iter()
                    .find(|k| k.label == label.trim())
                    .with_context(|| {
                        let known: Vec<_> = KERNELS.iter().map(|k| k.label).collect();
                        format!(
                            "--kernels: no kernel {label:?} (known: {})",
                            known.join(", ")
                        )
                    })
            })
            .collect(),
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn vng() -> PathBuf {
    repo().join("target/virtme-ng/bin/vng")
}

/// qemu, busybox (virtme-ng's initramfs), kmod (virtme-ng runs `depmod` on the unpacked
/// kernel's modules), udev (the guest's udevd binds the virtio console the script's output
/// comes through, and loads the NIC's driver), and virtme-ng from PyPI in a virtualenv
/// under target/. The kernels are unpacked when they run.
pub fn ensure() -> anyhow::Result<()> {
    setup::ensure_packages(&[
        "qemu-system-x86",
        "busybox-static",
        "kmod",
        "udev",
        "python3-venv",
    ])?;
    if !vng().exists() {
        println!("[kernels] installing {VIRTME_NG} into target/virtme-ng");
        let venv = repo().join("target/virtme-ng");
        exec(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        exec(Command::new(venv.join("bin/pip")).args(["install", "-q", VIRTME_NG]))?;
    }
    Ok(())
}

/// How the VMs run: with KVM if a trial boot works, else emulated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

fn accel(kernel: &Unpacked) -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| {
        if !Path::new("/dev/kvm").exists() {
            return Accel::Tcg;
        }
        let ok = vng_command(kernel, Accel::Kvm, "true", None, Duration::from_secs(120))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Accel::Kvm
        } else {
            println!("[kernels] KVM does not work here (nested); emulating with TCG");
            Accel::Tcg
        }
    })
}

/// `vng --run` of `kernel` with `script` as its command, killed after `limit`; `netns`: qemu
/// runs in that network namespace and the VM gets a virtio-net NIC on a tap device there.
fn vng_command(
    kernel: &Unpacked,
    accel: Accel,
    script: &str,
    netns: Option<&str>,
    limit: Duration,
) -> Command {
    let vmlinuz = kernel.vmlinuz.display().to_string();
    let out = out_dir();
    // A VM that hangs is killed: CI has a deadline.
    let mut args: Vec<String> = vec![
        "timeout".into(),
        "--kill-after=30".into(),
        limit.as_secs().to_string(),
        vng().display().to_string(),
        "--run".into(),
        vmlinuz,
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "3G".into(),
        "--rwdir".into(),
        out.display().to_string(),
    ];
    if accel == Accel::Tcg {
        args.push("--disable-kvm".into());
    }
    if netns.is_some() {
        // 4 queue pairs for 2 vCPUs: native XDP on virtio_net wants a TX queue per CPU on
        // top of the ones the stack uses; and no guest offloads (LRO/GRO_HW and checksum
        // offload), which XDP cannot handle.
        args.push(format!(
            "--qemu-opts={}",
            format_args!(
                "-netdev tap,id=gnic,ifname={TAP},script=no,downscript=no,queues=4,vhost=off \
             -device virtio-net-pci,netdev=gnic,mq=on,vectors=10,mac={NIC_MAC},\
             guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,guest_csum=off"
            )
        ));
    }
    args.push("--exec".into());
    args.push(script.to_owned());
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"));
            c.args(&args);
            c
        }
        None => {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        }
    };
    // vng runs virtme-run from its own virtualenv.
    let path = format!(
        "{}:{}",
        repo().join("target/virtme-ng/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.current_dir(repo()).env("PATH", path);
    cmd
}

/// Where the VMs write what they report (a `--rwdir` of theirs).
fn out_dir() -> PathBuf {
    repo().join("target/kernels")
}

/// The test binaries the VMs run (built by `cargo test --no-run`).
pub struct TestBins {
    pub packets: PathBuf,
    pub tc_attach: PathBuf,
    pub control: PathBuf,
}

impl TestBins {
    pub fn build() -> anyhow::Result<Self> {
        let out = crate::cargo()
            .args([
                "test",
                "--no-run",
                "-p",
                "gpulb-testbed",
                "--test",
                "packets",
                "--test",
                "tc_attach",
                "--test",
                "control",
                "--message-format=json",
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("cargo test --no-run")?;
        ensure!(out.status.success(), "building the test binaries failed");
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|m| {
                    m["reason"] == "compiler-artifact"
                        && m["target"]["name"] == name
                        && m["target"]["kind"][0] == "test"
                })
                .and_then(|m| m["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("no test binary {name}"))
        };
        Ok(Self {
            packets: find("packets")?,
            tc_attach: find("tc_attach")?,
            control: find("control")?,
        })
    }
}

/// The tap device on this side, and the VM NIC's MAC (how the guest finds it).
const TAP: &str = "gtap0";
const NIC_MAC: &str = "52:54:00:67:6c:62";
/// This side of the tap, the VM's NIC, and the VIP behind it (198.18.0.0/15 only).
const HOST_ADDR: &str = "198.18.60.1";
const GUEST_ADDR: &str = "198.18.60.2";
const NIC_VIP: &str = "198.18.160.1";
const NIC_REQUESTS: usize = 20;

/// What one kernel did.
pub struct Outcome {
    pub label: &'static str,
    pub passed: bool,
    pub accel: String,
    pub wall: Duration,
    /// `gpulb check-kernel --json`, if it ran.
    pub check: Option<serde_json::Value>,
    pub nic: Result<String, String>,
}

/// Boots each kernel once and runs everything in it; prints a summary; fails if any failed.
pub fn run(kernels: &[&Kernel], bins: &TestBins) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for kernel in kernels {
        outcomes.push(run_one(kernel, bins)?);
    }
    println!("\n[kernels] summary");
    for o in &outcomes {
        let tc = o
            .check
            .as_ref()
            .and_then(|c| c["tc_attach"].as_str())
            .unwrap_or("?");
        println!(
            "  Linux {:<5} {}  ({}, {:.0} s)  TC egress through {tc}  NIC: {}",
            o.label,
            if o.passed { "passed" } else { "FAILED" },
            o.accel,
            o.wall.as_secs_f64(),
            match &o.nic {
                Ok(s) => s.clone(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        if !o.passed || o.nic.is_err() {
            println!(
                "      logs: {} (vm.log, nic.log, gpulb-nic.log, vng-stderr.log)",
                out_dir().join(o.label).display()
            );
        }
        if let Some(programs) = o.check.as_ref().and_then(|c| c["programs"].as_array()) {
            let counts: Vec<String> = programs
                .iter()
                .map(|p| {
                    format!(
                        "{} {}",
                        p["name"].as_str().unwrap_or("?"),
                        p["verified_instructions"]
                    )
                })
                .collect();
            println!("      verifier: {}", counts.join(", "));
        }
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.passed || o.nic.is_err())
        .map(|o| o.label)
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on Linux {}", failed.join(", "));
    }
    Ok(outcomes)
}

/// A VM of the matrix is killed after this (it takes about 10 minutes under TCG here).
const VM_LIMIT: Duration = Duration::from_secs(40 * 60);
/// Each test binary in the VM is killed after this.
const TEST_LIMIT_S: u32 = 1200;

fn run_one(kernel: &Kernel, bins: &TestBins) -> anyhow::Result<Outcome> {
    let out = out_dir().join(kernel.label);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let unpacked = kernel.unpack()?;
    let accel = accel(&unpacked);
    let patience = if accel == Accel::Tcg { 6 } else { 2 };
    let repo = repo();
    let gpulb = repo.join("target/debug/gpulb");
    let script = format!(
        "set -u; mount -t bpf bpf /sys/fs/bpf; export GPULB_TEST_PATIENCE={patience}; \
         cd {repo}/tests; failed=0; \
         {gpulb} check-kernel --json > {out}/check-kernel.json || failed=1; \
         timeout -k 10 900 sh {out}/nic.sh > {out}/nic.log 2>&1 || failed=1; \
         timeout -k 10 {TEST_LIMIT_S} {packets} --test-threads=1 || failed=1; \
         timeout -k 10 {TEST_LIMIT_S} {tc_attach} --test-threads=1 || failed=1; \
         timeout -k 10 {TEST_LIMIT_S} {control} --exact \
           daemon_restart_and_sigkill_drop_no_stream_and_move_no_flow --test-threads=1 \
           || failed=1; \
         echo \"[vm] Linux $(uname -r): failed=$failed\"; exit $failed",
        repo = repo.display(),
        gpulb = gpulb.display(),
        out = out.display(),
        packets = bins.packets.display(),
        tc_attach = bins.tc_attach.display(),
        control = bins.control.display(),
    );
    fs::write(out.join("nic.sh"), nic_script(&gpulb, &out))?;
    println!(
        "[kernels] Linux {} ({}): booting under qemu ({accel:?})",
        kernel.label, unpacked.release
    );
    let ns = HostSide::new()?;
    let started = Instant::now();
    // virtme-ng reopens its stderr for writing, which truncates a file it was redirected to
    // (a CI log): its stderr goes to a file of its own.
    let stderr = fs::File::create(out.join("vng-stderr.log"))?;
    let mut child = vng_command(&unpacked, accel, &script, Some(&ns.name), VM_LIMIT)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting vng")?;
    let stdout = child.stdout.take().context("vng stdout")?;
    let log_path = out.join("vm.log");
    let printer = thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The verifier's log of a failed load is long; the file keeps it whole.
            if !line.starts_with(|c: char| c.is_ascii_digit()) && !line.starts_with("; ") {
                println!("[vm {}] {line}", log_path.display());
            }
            log.push_str(&line);
            log.push('\n');
        }
        let _ = fs::write(&log_path, &log);
    });
    let nic = ns.serve_requests(&out, &mut child);
    let status = child.wait().context("waiting for vng")?;
    let _ = printer.join();
    let wall = started.elapsed();
    let check = fs::read_to_string(out.join("check-kernel.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Ok(Outcome {
        label: kernel.label,
        passed: status.success(),
        accel: format!("{accel:?}").to_lowercase(),
        wall,
        check,
        nic: nic.map_err(|e| format!("{e:#}")),
    })
}

/// Boots each kernel to run only `gpulb check-kernel --json` (the bench's verifier counts);
/// writes `{"<label>": <report>, ...}` to `path`.
pub fn check_all(kernels: &[&Kernel], gpulb: &Path, path: &Path) -> anyhow::Result<()> {
    let mut all = serde_json::Map::new();
    for kernel in kernels {
        let out = out_dir().join(format!("check-{}", kernel.label));
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let file = out.join("check-kernel.json");
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf; {} check-kernel --json > {}",
            gpulb.display(),
            file.display()
        );
        println!(
            "[kernels] Linux {}: gpulb check-kernel under qemu",
            kernel.label
        );
        let unpacked = kernel.unpack()?;
        let accel = accel(&unpacked);
        let status = vng_command(&unpacked, accel, &script, None, Duration::from_secs(600))
            .stdout(Stdio::null())
            .stderr(fs::File::create(out.join("vng-stderr.log"))?)
            .status()
            .context("starting vng")?;
        let report: serde_json::Value = fs::read_to_string(&file)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .with_context(|| {
                format!("Linux {}: no check-kernel report ({status})", kernel.label)
            })?;
        all.insert(kernel.label.to_owned(), report);
    }
    fs::write(path, serde_json::to_string_pretty(&all)?)?;
    Ok(())
}

/// The guest's half of the NIC case: find the virtio NIC by its MAC, serve two simulated
/// instances behind a VIP with `gpulb_ingress` in native mode on it, tell this side, wait for
/// its requests, stop cleanly.
fn nic_script(gpulb: &Path, out: &Path) -> String {
    let sim = gpulb.with_file_name("gpulb-sim");
    format!(
        r#"set -eu
out={out}
nic=$(for d in /sys/class/net/*; do if [ "$(cat $d/address)" = "{NIC_MAC}" ]; then basename $d; fi; done)
[ -n "$nic" ] || {{ echo "no NIC with MAC {NIC_MAC}"; exit 1; }}
echo "NIC $nic, driver $(basename $(readlink /sys/class/net/$nic/device/driver)), $(ls -d /sys/class/net/$nic/queues/rx-* | wc -l) rx queues"
ip link set lo up
ip addr add {GUEST_ADDR}/24 dev $nic
ip link set $nic up
work=/tmp/gpulb-nic; mkdir -p $work
daemon=""; sims=""
# Whatever happens, nothing of this case runs on into the tests after it.
trap 'kill $daemon $sims 2>/dev/null || true' EXIT
for i in 1 2; do
  {sim} --listen {GUEST_ADDR}:800$i --name nic-sim-$i > $work/sim-$i.log 2>&1 &
  sims="$sims $!"
done
cat > $work/gpulb.toml <<EOF
interface = "$nic"
xdp_mode = "native"
pin_path = "/sys/fs/bpf/gpulb-nic"
state_dir = "$work/state"
log_dir = "$work/log"
conntrack_size = 65536
drain_timeout_ms = 1000
[[vip]]
name = "nic"
address = "{NIC_VIP}"
port = 80
[vip.health]
interval_ms = 200
# One client, one request at a time: balanced, so the requests alternate (sticky would keep
# the client on one instance, as it should).
[vip.scheduler]
prefix_affinity = "off"
[[vip.backend]]
address = "{GUEST_ADDR}"
port = 8001
[[vip.backend]]
address = "{GUEST_ADDR}"
port = 8002
EOF
{gpulb} run --config $work/gpulb.toml > $out/gpulb-nic.log 2>&1 &
daemon=$!
n=0; until grep -q "gpulb ready" $out/gpulb-nic.log; do
  kill -0 $daemon 2>/dev/null || {{ echo "gpulb exited:"; cat $out/gpulb-nic.log; exit 1; }}
  n=$((n+1)); [ $n -lt 1800 ] || {{ echo "gpulb did not start"; exit 1; }}; sleep 0.1
done
n=0; until grep -q "in_table=2" $out/gpulb-nic.log; do
  n=$((n+1)); [ $n -lt 600 ] || {{ echo "backends not in the table"; exit 1; }}; sleep 0.1
done
ip -d link show dev $nic > $out/link.txt
grep -q "prog/xdp " $out/link.txt || {{ echo "not attached in native mode:"; cat $out/link.txt; exit 1; }}
touch $out/ready
n=0; until [ -e $out/done ]; do
  n=$((n+1)); [ $n -lt 6000 ] || {{ echo "no requests from the host side"; exit 1; }}; sleep 0.1
done
kill -TERM $daemon; wait $daemon; daemon=""
[ ! -e /sys/fs/bpf/gpulb-nic ] || {{ echo "pins left behind"; exit 1; }}
ip -d link show dev $nic | grep -q "prog/xdp" && {{ echo "XDP left attached"; exit 1; }}
echo "nic case done"
"#,
        out = out.display(),
        sim = sim.display(),
        gpulb = gpulb.display(),
    )
}

/// The network namespace qemu runs in, where its tap device appears; deleted on drop.
struct HostSide {
    name: String,
}

impl HostSide {
    fn new() -> anyhow::Result<Self> {
        // Those of a run that was killed (its pid is gone) go first.
        for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("gpulb-vm-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = Command::new("ip").args(["netns", "delete", &name]).status();
            }
        }
        let name = format!("gpulb-vm-{}", std::process::id());
        exec(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self { name })
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        exec(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Whether qemu has made its tap device here yet.
    fn has_tap(&self) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", TAP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the guest's "ready", sends requests to the VIP through the tap, checks each
    /// reply, and tells the guest it is done. Returns what it saw.
    fn serve_requests(&self, out: &Path, vm: &mut std::process::Child) -> anyhow::Result<String> {
        let ready = out.join("ready");
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut addressed = false;
        let result = (|| {
            while !ready.exists() {
                if !addressed && self.has_tap() {
                    self.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", TAP])?;
                    self.ip(&["link", "set", TAP, "up"])?;
                    self.ip(&["link", "set", "lo", "up"])?;
                    self.ip(&["route", "add", &format!("{NIC_VIP}/32"), "via", GUEST_ADDR])?;
                    addressed = true;
                }
                if vm.try_wait()?.is_some() {
                    bail!("the VM exited before the NIC case was ready");
                }
                ensure!(Instant::now() < deadline, "the NIC case never got ready");
                thread::sleep(Duration::from_millis(200));
            }
            let link = fs::read_to_string(out.join("link.txt")).unwrap_or_default();
            let mode = if link.contains("prog/xdp ") && !link.contains("xdpgeneric") {
                "native xdp"
            } else {
                bail!("the NIC is not in native XDP mode: {link}");
            };
            let mut instances = std::collections::BTreeMap::<String, usize>::new();
            for i in 0..NIC_REQUESTS {
                let reply = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", self.name))
                    .args(["curl", "-sS", "-m", "20", "-D", "-", "-o", "/dev/null"])
                    .args(["-H", "content-type: application/json", "-d"])
                    .arg(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#)
                    .arg(format!("http://{NIC_VIP}/v1/chat/completions"))
                    .output()?;
                let head = String::from_utf8_lossy(&reply.stdout).to_lowercase();
                ensure!(
                    reply.status.success() && head.starts_with("http/1.1 200"),
                    "request {i} through the VIP failed: {head}{}",
                    String::from_utf8_lossy(&reply.stderr)
                );
                let instance = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-sim-instance:"))
                    .map_or("?", str::trim)
                    .to_owned();
                *instances.entry(instance).or_default() += 1;
            }
            ensure!(
                instances.len() == 2,
                "requests did not reach both instances: {instances:?}"
            );
            Ok(format!(
                "{NIC_REQUESTS}/{NIC_REQUESTS} requests through virtio_net in {mode}, split {:?}",
                instances.values().collect::<Vec<_>>()
            ))
        })();
        // Whatever happened, let the guest go on.
        let _ = fs::write(out.join("done"), "");
        result
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
