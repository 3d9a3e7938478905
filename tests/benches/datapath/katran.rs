//! Katran's XDP balancer (`katran/lib/bpf/balancer.bpf.c`, the default build), measured in
//! the same run and through the same wrapper as gpulb_ingress:
//! `cargo xtask bench datapath --katran <katran source tree>`.
//!
//! Built as Katran's own `Makefile-bpf` builds it (clang to LLVM IR, llc to BPF), with
//! Debian's clang-22. Configured as its userspace would be for one VIP with one real: the
//! VIP, the real, the VIP's Maglev ring, the router MAC, and an LRU map per CPU (Katran's
//! `lru_mapping`, made like `KatranLb::createLruMap`: a plain LRU hash, one per core).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, of_maps::ArrayOfMaps},
    programs::Xdp,
};

/// Katran's limits and counter indexes (`balancer_consts.h`).
const RING_SIZE: u32 = 65537;
/// `stats[MAX_VIPS + LRU_CNTRS]`: v1 packets to VIPs, v2 LRU misses.
const STATS_LRU: u32 = 512;
/// `stats[MAX_VIPS + NEW_CONN_RATE_CNTR]`: v1 new connections in the window, v2 its start.
const STATS_NEW_CONN: u32 = 514;
/// `stats[MAX_VIPS + XDP_TX_CNTR]` and `XDP_PASS_CNTR`: packets (v1) by verdict.
const STATS_TX: u32 = 529;
const STATS_PASS: u32 = 531;
/// Past this many new connections in a second a CPU stops inserting (`MAX_CONN_RATE`).
pub const MAX_CONN_RATE: u32 = 125_000;
/// `struct flow_key` (40 bytes) → `struct real_pos_lru` (16 bytes).
type FlowKey = [u8; 40];
type RealPos = [u8; 16];
/// The per-CPU LRU's size: Katran's default 8 M entries over the forwarding cores, capped
/// at gpulb's bench conntrack size, so both tables are sized alike.
const LRU_ENTRIES: u32 = 1 << 20;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Builds `balancer.bpf.c` of the Katran tree `src` into `out/balancer.o`.
pub fn build(src: &Path, out: &Path) -> PathBuf {
    let source = src.join("katran/lib/bpf/balancer.bpf.c");
    assert!(
        source.exists(),
        "{} has no katran/lib/bpf/balancer.bpf.c: --katran takes a Katran source tree",
        src.display()
    );
    std::fs::create_dir_all(out).expect("Katran build dir");
    let ir = out.join("balancer.bc");
    let obj = out.join("balancer.o");
    let status = Command::new("clang-22")
        .current_dir(src)
        .args(["-I.", "-Ikatran/lib/linux_includes", "-D__KERNEL__"])
        .args([
            "-Wno-unused-value",
            "-Wno-pointer-sign",
            "-Wno-compare-distinct-pointer-types",
        ])
        .args(["-O2", "-g", "-emit-llvm", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&ir)
        .status()
        .expect("clang-22 (cargo xtask installs it for --katran)");
    assert!(status.success(), "clang-22 failed on {}", source.display());
    let status = Command::new("llc-22")
        .args(["-march=bpf", "-filetype=obj", "-o"])
        .arg(&obj)
        .arg(&ir)
        .status()
        .expect("llc-22");
    assert!(status.success(), "llc-22 failed on {}", ir.display());
    obj
}

/// Katran loaded and configured: VIP 198.18.100.1:80/TCP → real 198.18.0.2.
pub struct Katran {
    pub ebpf: Ebpf,
    stats: PerCpuArray<MapData, [u64; 2]>,
    lru_mapping: ArrayOfMaps<MapData, Lru>,
    /// The LRU map of every CPU (one map: the bench runs on one CPU).
    pub lru: Lru,
    cpus: u32,
}

impl Katran {
    pub fn load(obj: &Path) -> Self {
        let mut ebpf = EbpfLoader::new()
            // One VIP (vip_num 0): its ring is the first RING_SIZE slots; the rest of the
            // 512 rings (268 MB) would never be read.
            .map_max_entries("ch_rings", RING_SIZE)
            .load_file(obj)
            .expect("load Katran's object");
        let prog: &mut Xdp = ebpf
            .program_mut("balancer_ingress")
            .expect("balancer_ingress")
            .try_into()
            .expect("XDP");
        prog.load().expect("the verifier accepts Katran's balancer");

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .unwrap_or_else(|| panic!("Katran's object has no map {name}"))
        };
        let mut vips: HashMap<_, [u8; 20], [u8; 8]> =
            HashMap::try_from(take(&mut ebpf, "vip_map")).expect("vip_map");
        // struct vip_definition: address (16), port (network order), proto, pad.
        let mut vip = [0u8; 20];
        vip[..4].copy_from_slice(&[198, 18, 100, 1]);
        vip[16..18].copy_from_slice(&80u16.to_be_bytes());
        vip[18] = 6;
        // struct vip_meta: flags 0 (LRU on, source port hashed), vip_num 0.
        vips.insert(vip, [0u8; 8], 0).expect("vip_map");
        let mut reals: Array<_, [u8; 20]> =
            Array::try_from(take(&mut ebpf, "reals")).expect("reals");
        // Real 1 (0 means "none" in a ring): 198.18.0.2, IPv4.
        let mut real = [0u8; 20];
        real[..4].copy_from_slice(&[198, 18, 0, 2]);
        reals.set(1, real, 0).expect("reals");
        let mut rings: Array<_, u32> =
            Array::try_from(take(&mut ebpf, "ch_rings")).expect("ch_rings");
        for slot in 0..RING_SIZE {
            rings.set(slot, 1, 0).expect("ch_rings");
        }
        let mut ctl: Array<_, [u8; 8]> =
            Array::try_from(take(&mut ebpf, "ctl_array")).expect("ctl_array");
        // The default router's MAC: the encapsulated packet's destination.
        ctl.set(0, [2, 0, 0, 0, 0, 3, 0, 0], 0).expect("ctl_array");
        let stats = PerCpuArray::try_from(take(&mut ebpf, "stats")).expect("stats");
        let lru_mapping =
            ArrayOfMaps::try_from(take(&mut ebpf, "lru_mapping")).expect("lru_mapping");
        let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
        let mut katran = Self {
            ebpf,
            stats,
            lru_mapping,
            lru: new_lru(),
            cpus,
        };
        katran.fresh_lru();
        katran
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program("balancer_ingress")
            .expect("balancer_ingress")
            .try_into()
            .expect("XDP")
    }

    /// An empty LRU map for every CPU (faster than deleting a million keys).
    pub fn fresh_lru(&mut self) {
        self.lru = new_lru();
        for cpu in 0..self.cpus {
            self.lru_mapping
                .set(cpu, &self.lru, 0)
                .expect("lru_mapping");
        }
    }

    /// A counter summed over CPUs.
    pub fn stat(&self, index: u32) -> [u64; 2] {
        let per_cpu = self.stats.get(&index, 0).expect("stats");
        per_cpu
            .iter()
            .fold([0, 0], |acc, v| [acc[0] + v[0], acc[1] + v[1]])
    }

    /// Sets the new-connection rate window of every CPU: `(0, 0)` opens a fresh one (LRU
    /// inserts for the next `MAX_CONN_RATE` SYNs); a huge count in a window that started now
    /// is a flood (no inserts for a second).
    pub fn set_conn_rate(&mut self, count: u64, window_start_ns: u64) {
        let values = PerCpuValues::try_from(vec![[count, window_start_ns]; self.cpus as usize])
            .expect("per-CPU values");
        self.stats
            .set(STATS_NEW_CONN, values, 0)
            .expect("stats rate window");
    }

    pub fn lru_entries(&self) -> usize {
        self.lru.keys().filter_map(Result::ok).count()
    }

    pub fn lru_misses(&self) -> u64 {
        self.stat(STATS_LRU)[1]
    }

    pub fn tx(&self) -> u64 {
        self.stat(STATS_TX)[0]
    }

    pub fn passed(&self) -> u64 {
        self.stat(STATS_PASS)[0]
    }
}

type Lru = HashMap<MapData, FlowKey, RealPos>;

fn new_lru() -> Lru {
    let obj = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<FlowKey>() as u32,
        size_of::<RealPos>() as u32,
        LRU_ENTRIES,
        0,
    );
    let data = MapData::create(obj, "katran_lru", None).expect("create Katran's LRU map");
    HashMap::try_from(Map::LruHashMap(data)).expect("LRU hash")
}

/// `CLOCK_MONOTONIC` in ns: `bpf_ktime_get_ns`'s clock.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32).as_nanos() as u64
}
