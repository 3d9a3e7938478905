//! GPUs and the model instances placed on them: NVML discovery (the library is loaded at
//! run time, so gpulb runs on hosts without a driver), simulated GPUs, and the CPUs of each
//! GPU's NUMA node read from its PCI device in sysfs.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::{Config, GpuRef, GpuSelection, Model};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "model {model:?} needs NVIDIA GPUs, but NVML could not be loaded or initialised \
         (is the NVIDIA driver installed?)"
    )]
    Nvml {
        model: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("querying GPU {index} through NVML")]
    Query {
        index: u32,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("model {model:?}: gpu {gpu} not found (this host has: {available})")]
    NotFound {
        model: String,
        gpu: String,
        available: String,
    },
    #[error("model {model:?}: gpu {gpu} is also used by {other:?}")]
    Shared {
        model: String,
        gpu: String,
        other: String,
    },
    #[error(
        "model {model:?}: {found} GPUs are not a multiple of gpus_per_instance = {per_instance}"
    )]
    Uneven {
        model: String,
        found: usize,
        per_instance: u32,
    },
    #[error("model {model:?}: no GPU found")]
    NoGpus { model: String },
    #[error("model {model:?}: instance ports run past 65535 (base_port {base_port})")]
    Ports { model: String, base_port: u16 },
}

/// One GPU as the supervisor needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index (not necessarily CUDA's order, hence the UUID in CUDA_VISIBLE_DEVICES).
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// CPUs of the GPU's NUMA node; empty if unknown (no pinning).
    pub cpus: Vec<usize>,
}

/// What the host has: NVML's GPUs, loaded once and only when a model needs real GPUs.
pub struct Inventory {
    real: Option<Vec<Gpu>>,
}

impl Inventory {
    /// Queries NVML if any model names real GPUs.
    pub fn discover(config: &Config) -> Result<Self, GpuError> {
        let needs = config
            .models
            .iter()
            .find(|m| !matches!(m.gpus, GpuSelection::Simulated(_)));
        let real = match needs {
            Some(model) => Some(nvml_gpus(&model.name)?),
            None => None,
        };
        Ok(Self { real })
    }

    /// An inventory with the given GPUs (tests).
    pub fn with(gpus: Vec<Gpu>) -> Self {
        Self { real: Some(gpus) }
    }

    fn real(&self) -> &[Gpu] {
        self.real.as_deref().unwrap_or_default()
    }
}

fn nvml_gpus(model: &str) -> Result<Vec<Gpu>, GpuError> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|source| GpuError::Nvml {
        model: model.to_owned(),
        source,
    })?;
    let count = nvml.device_count().map_err(|source| GpuError::Nvml {
        model: model.to_owned(),
        source,
    })?;
    (0..count)
        .map(|index| {
            let query = |source| GpuError::Query { index, source };
            let device = nvml.device_by_index(index).map_err(query)?;
            let bus_id = device.pci_info().map_err(query)?.bus_id;
            Ok(Gpu {
                index,
                uuid: device.uuid().map_err(query)?,
                name: device.name().map_err(query)?,
                cpus: local_cpus(Path::new("/sys"), &bus_id),
            })
        })
        .collect()
}

/// What NVML reports of an instance's GPUs now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuUsage {
    /// Mean of the GPUs' `utilization.gpu` (the share of time a kernel ran), 0-1.
    pub utilization: f64,
    /// The fullest GPU's used memory, 0-1.
    pub memory: f64,
}

/// NVML, initialised once per process on first use (`Err`: no driver, say why).
fn nvml() -> Result<&'static nvml_wrapper::Nvml, String> {
    static NVML: std::sync::OnceLock<Result<nvml_wrapper::Nvml, String>> =
        std::sync::OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// Utilisation and memory of the GPUs with these UUIDs. Blocking (NVML calls).
pub fn usage(uuids: &[String]) -> Result<GpuUsage, String> {
    let nvml = nvml()?;
    let mut samples = Vec::with_capacity(uuids.len());
    for uuid in uuids {
        let err = |e: nvml_wrapper::error::NvmlError| format!("NVML {uuid}: {e}");
        let device = nvml.device_by_uuid(uuid.as_str()).map_err(err)?;
        let util = device.utilization_rates().map_err(err)?;
        let mem = device.memory_info().map_err(err)?;
        samples.push((
            f64::from(util.gpu) / 100.0,
            mem.used as f64 / (mem.total.max(1)) as f64,
        ));
    }
    combine_usage(&samples).ok_or_else(|| "no GPU to ask NVML about".to_owned())
}

/// (utilisation, memory) of each GPU → the instance's: mean utilisation, fullest memory.
pub fn combine_usage(samples: &[(f64, f64)]) -> Option<GpuUsage> {
    if samples.is_empty() {
        return None;
    }
    Some(GpuUsage {
        utilization: samples.iter().map(|s| s.0).sum::<f64>() / samples.len() as f64,
        memory: samples.iter().map(|s| s.1).fold(0.0, f64::max),
    })
}

/// `N` simulated GPUs for `model`, with stable fake UUIDs and no NUMA affinity.
pub fn simulated(model: &str, n: u32) -> Vec<Gpu> {
    (0..n)
        .map(|index| {
            let h = lb_common::fmix64(model.bytes().fold(u64::from(index), |h, b| {
                h.wrapping_mul(31).wrapping_add(u64::from(b))
            }));
            Gpu {
                index,
                uuid: format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    h >> 32,
                    (h >> 16) & 0xffff,
                    h & 0xffff,
                    index,
                    h & 0xffff_ffff_ffff
                ),
                name: "gpulb simulated GPU".into(),
                cpus: Vec::new(),
            }
        })
        .collect()
}

/// NVML's bus id (`00000000:3B:00.0`) as sysfs names it (`0000:3b:00.0`).
fn sysfs_bus_id(nvml: &str) -> String {
    let lower = nvml.to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => lower,
    }
}

/// The CPUs local to a PCI device (`local_cpulist`); empty if sysfs does not say.
pub fn local_cpus(sysfs: &Path, nvml_bus_id: &str) -> Vec<usize> {
    let path = sysfs
        .join("bus/pci/devices")
        .join(sysfs_bus_id(nvml_bus_id))
        .join("local_cpulist");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| parse_cpulist(s.trim()))
        .unwrap_or_default()
}

/// `0-3,8,10-11` → [0, 1, 2, 3, 8, 10, 11].
pub fn parse_cpulist(list: &str) -> Option<Vec<usize>> {
    let mut cpus = BTreeSet::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(part.parse().ok()?);
            }
        }
    }
    Some(cpus.into_iter().collect())
}

/// One model server process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// `<model>-<n>`.
    pub name: String,
    pub model: String,
    pub vip: String,
    pub address: IpAddr,
    pub port: u16,
    pub gpus: Vec<Gpu>,
    /// The command with placeholders filled in.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// CPUs to pin to: the union of the GPUs' NUMA-local CPUs (empty: no pinning).
    pub cpus: Vec<usize>,
}

impl InstanceSpec {
    /// `CUDA_VISIBLE_DEVICES`: UUIDs, because NVML and CUDA may number GPUs differently.
    pub fn cuda_visible_devices(&self) -> String {
        self.gpus
            .iter()
            .map(|g| g.uuid.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every instance of every model: GPUs assigned, commands filled in.
pub fn instances(config: &Config, inventory: &Inventory) -> Result<Vec<InstanceSpec>, GpuError> {
    let mut out = Vec::new();
    let mut owner: Vec<(String, String)> = Vec::new(); // (gpu uuid, model)
    for model in &config.models {
        let gpus = model_gpus(model, inventory)?;
        if gpus.is_empty() {
            return Err(GpuError::NoGpus {
                model: model.name.clone(),
            });
        }
        if !matches!(model.gpus, GpuSelection::Simulated(_)) {
            for g in &gpus {
                if let Some((_, other)) = owner.iter().find(|(u, _)| *u == g.uuid) {
                    return Err(GpuError::Shared {
                        model: model.name.clone(),
                        gpu: format!("{} ({})", g.index, g.uuid),
                        other: other.clone(),
                    });
                }
                owner.push((g.uuid.clone(), model.name.clone()));
            }
        }
        let per = model.gpus_per_instance as usize;
        if gpus.len() % per != 0 {
            return Err(GpuError::Uneven {
                model: model.name.clone(),
                found: gpus.len(),
                per_instance: model.gpus_per_instance,
            });
        }
        for (n, chunk) in gpus.chunks(per).enumerate() {
            let port = u16::try_from(u32::from(model.base_port) + n as u32).map_err(|_| {
                GpuError::Ports {
                    model: model.name.clone(),
                    base_port: model.base_port,
                }
            })?;
            out.push(instance(model, n, port, chunk.to_vec()));
        }
    }
    Ok(out)
}

fn model_gpus(model: &Model, inventory: &Inventory) -> Result<Vec<Gpu>, GpuError> {
    let real = inventory.real();
    match &model.gpus {
        GpuSelection::Simulated(n) => Ok(simulated(&model.name, *n)),
        GpuSelection::All => Ok(real.to_vec()),
        GpuSelection::List(refs) => refs
            .iter()
            .map(|r| {
                real.iter()
                    .find(|g| match r {
                        GpuRef::Index(i) => g.index == *i,
                        GpuRef::Uuid(u) => g.uuid == *u,
                    })
                    .cloned()
                    .ok_or_else(|| GpuError::NotFound {
                        model: model.name.clone(),
                        gpu: r.to_string(),
                        available: if real.is_empty() {
                            "no GPUs".into()
                        } else {
                            real.iter()
                                .map(|g| format!("{} {}", g.index, g.uuid))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    })
            })
            .collect(),
    }
}

fn instance(model: &Model, n: usize, port: u16, gpus: Vec<Gpu>) -> InstanceSpec {
    let name = format!("{}-{n}", model.name);
    let mut spec = InstanceSpec {
        name,
        model: model.name.clone(),
        vip: model.vip.clone(),
        address: model.address,
        port,
        cpus: gpus
            .iter()
            .flat_map(|g| g.cpus.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        gpus,
        argv: Vec::new(),
        env: model
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let fill = |arg: &str| {
        arg.replace("{port}", &port.to_string())
            .replace("{address}", &model.address.to_string())
            .replace(
                "{listen}",
                &std::net::SocketAddr::new(model.address, port).to_string(),
            )
            .replace("{name}", &spec.name)
            .replace("{model}", &model.served_model)
            .replace("{gpus}", &spec.cuda_visible_devices())
            .replace("{tp}", &model.gpus_per_instance.to_string())
    };
    let mut argv: Vec<String> = model.command.iter().map(|a| fill(a)).collect();
    if argv[0] == "gpulb-sim" {
        argv[0] = sibling_binary("gpulb-sim").display().to_string();
    }
    spec.argv = argv;
    spec
}

/// `name` next to the running executable if it is there, else `name` (found through PATH).
fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| name.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulist_parses_ranges_and_singles() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist("5"), Some(vec![5]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
    }

    #[test]
    fn nvml_bus_id_maps_to_sysfs() {
        assert_eq!(sysfs_bus_id("00000000:3B:00.0"), "0000:3b:00.0");
        assert_eq!(sysfs_bus_id("0000:3b:00.0"), "0000:3b:00.0");
    }

    #[test]
    fn local_cpus_read_from_the_pci_device() {
        let root = std::env::temp_dir().join(format!("gpulb-sysfs-{}", std::process::id()));
        let dev = root.join("bus/pci/devices/0000:3b:00.0");
        std::fs::create_dir_all(&dev).expect("fake sysfs");
        std::fs::write(dev.join("local_cpulist"), "16-19,48\n").expect("write");
        let cpus = local_cpus(&root, "00000000:3B:00.0");
        let missing = local_cpus(&root, "00000000:AF:00.0");
        std::fs::remove_dir_all(&root).expect("clean");
        assert_eq!(cpus, vec![16, 17, 18, 19, 48]);
        assert!(missing.is_empty());
    }

    fn config(models: &str) -> Config {
        let text = format!(
            "interface = \"lo\"\n[[vip]]\nname = \"chat\"\naddress = \"198.18.100.1\"\nport = 80\n{models}"
        );
        Config::parse(Path::new("t.toml"), &text).expect("valid config")
    }

    fn gpu(index: u32, cpus: &[usize]) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index:08}"),
            name: "H100".into(),
            cpus: cpus.to_vec(),
        }
    }

    #[test]
    fn instances_get_uuids_ports_cpus_and_filled_commands() {
        let c = config(
            "[[model]]\nname = \"qwen\"\nvip = \"chat\"\ngpus = [2, \"GPU-00000003\", 0, 1]\n\
             gpus_per_instance = 2\naddress = \"198.18.0.1\"\nbase_port = 8001\n\
             command = [\"vllm\", \"serve\", \"{model}\", \"--port\", \"{port}\", \"-tp\", \"{tp}\"]\n\
             served_model = \"Qwen/Qwen2.5-7B\"\n",
        );
        let inv = Inventory::with(vec![
            gpu(0, &[0, 1]),
            gpu(1, &[0, 1]),
            gpu(2, &[2, 3]),
            gpu(3, &[4]),
        ]);
        let list = instances(&c, &inv).expect("instances");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "qwen-0");
        assert_eq!(list[0].cuda_visible_devices(), "GPU-00000002,GPU-00000003");
        assert_eq!(list[0].cpus, vec![2, 3, 4]);
        assert_eq!(list[0].port, 8001);
        assert_eq!(
            list[0].argv,
            [
                "vllm",
                "serve",
                "Qwen/Qwen2.5-7B",
                "--port",
                "8001",
                "-tp",
                "2"
            ]
        );
        assert_eq!(list[1].cuda_visible_devices(), "GPU-00000000,GPU-00000001");
        assert_eq!(list[1].port, 8002);
    }

    #[test]
    fn missing_gpu_is_named_with_what_exists() {
        let c = config(
            "[[model]]\nname = \"qwen\"\nvip = \"chat\"\ngpus = [7]\naddress = \"198.18.0.1\"\n\
             base_port = 8001\ncommand = [\"vllm\"]\n",
        );
        let e = instances(&c, &Inventory::with(vec![gpu(0, &[])]))
            .expect_err("gpu 7 is missing")
            .to_string();
        assert!(
            e.contains("gpu 7 not found (this host has: 0 GPU-00000000)"),
            "{e}"
        );
    }

    #[test]
    fn simulated_gpus_have_distinct_uuids_and_run_the_simulator() {
        let c = config(
            "[[model]]\nname = \"sim\"\nvip = \"chat\"\ngpus = \"simulated:3\"\n\
             address = \"198.18.0.1\"\nbase_port = 9000\n",
        );
        let list = instances(&c, &Inventory::with(Vec::new())).expect("instances");
        let uuids: BTreeSet<String> = list.iter().map(|i| i.cuda_visible_devices()).collect();
        assert_eq!(uuids.len(), 3);
        assert!(list[2].argv[0].ends_with("gpulb-sim"));
        assert_eq!(
            list[2].argv[1..5],
            ["--listen", "198.18.0.1:9002", "--name", "sim-2"]
        );
    }
}
