//! The control plane's costs: Maglev table builds, table writes into the map, and the maps'
//! kernel memory.

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use gpulb::{
    datapath::Datapath,
    maglev::{self, MaglevBackend},
};
use gpulb_testbed::PinDir;
use lb_common::MAGLEV_MAX_SIZE;

use crate::{Opts, Report, tools::memlock};

/// Maglev rebuild time by backend count, and the memory of the conntrack maps.
pub(crate) fn control_plane(opts: &Opts, report: &mut Report) {
    let mut t = String::from(
        "Weighted Maglev table build (M = 65537, equal weights; best of runs), the daemon's \
         cost for every ejection, re-admission or weight change of a VIP:\n\n\
         | backends | build time |\n|---:|---:|\n",
    );
    let runs = if opts.quick { 2 } else { 5 };
    for n in [10u32, 100, 1000] {
        let backends = equal_backends(n);
        let best = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build_table(&backends, lb_common::MAGLEV_DEFAULT_SIZE);
                assert_eq!(table.len(), MAGLEV_MAX_SIZE as usize);
                t.elapsed()
            })
            .min()
            .expect("runs");
        let _ = writeln!(t, "| {n} | {:.2} ms |", best.as_secs_f64() * 1000.0);
    }

    let pins = PinDir::new("bench-mem");
    let flows = 1u32 << 20;
    // What the daemon sizes without an IPv6 VIP.
    let flows6 = lb_common::CONNTRACK6_IDLE_SIZE;
    let mut dp = Datapath::load(
        &pins.path,
        lb_common::maps::MapSizes {
            v4: flows,
            v6: flows6,
            ipv6: false,
        },
    )
    .expect("load the data path");
    table_writes(&pins, &mut dp, runs, &mut t);
    let _ = write!(
        t,
        "\nKernel memory (memlock from /proc/PID/fdinfo) with `conntrack_size = {flows}` and \
         `conntrack_size_v6 = {flows6}` (its default without an IPv6 VIP, which also keeps the \
         other IPv6 maps at {} entries; LRU maps are preallocated, so this is the cost of that \
         many tracked flows whether or not they are in use):\n\n\
         | map | memory |\n|---|---:|\n",
        lb_common::IPV6_IDLE_ENTRIES
    );
    let mut total = 0;
    let mut conntrack = 0;
    for name in lb_common::maps::ALL.map(|m| m.name) {
        let data = aya::maps::MapData::from_pin(pins.path.join(name)).expect("pinned map");
        let bytes = memlock(&data);
        total += bytes;
        if name == lb_common::maps::CONNS.name {
            conntrack = bytes;
        }
        let _ = writeln!(t, "| `{name}` | {:.1} MiB |", bytes as f64 / 1048576.0);
    }
    let _ = writeln!(t, "| all | {:.1} MiB |", total as f64 / 1048576.0);
    let mib = conntrack as f64 / 1048576.0;
    let _ = writeln!(
        t,
        "\n{flows} tracked IPv4 flows (one entry each, reverse NAT derived): {mib:.1} MiB; \
         target <= 128 MiB: {}.",
        if mib <= 128.0 { "met" } else { "NOT met" }
    );
    drop(dp);
    report.section("control plane", &t);
}

/// `n` backends of weight 1 with distinct addresses (only hashed, never sent to).
fn equal_backends(n: u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            id: i + 1,
            key: maglev::backend_key(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 1).into(), 8000),
            weight: 1,
        })
        .collect()
}

/// Writing Maglev tables into a block of `MAGLEV_V2`: the daemon's batch writes against one
/// `bpf()` call per slot (aya's `Array::set`, how gpulb wrote them before), the same slots.
fn table_writes(pins: &PinDir, dp: &mut Datapath, runs: u32, t: &mut String) {
    let four = maglev::build_table(&equal_backends(4), lb_common::MAGLEV_DEFAULT_SIZE);
    let three = maglev::build_table(&equal_backends(3), lb_common::MAGLEV_DEFAULT_SIZE);
    let ejected = maglev::diff(&four, &three).len();
    let mut slots: aya::maps::Array<aya::maps::MapData, u32> = aya::maps::Array::try_from(
        aya::maps::Map::from_map_data(
            aya::maps::MapData::from_pin(pins.path.join(lb_common::maps::MAGLEV.name))
                .expect("pinned MAGLEV"),
        )
        .expect("MAGLEV as a map"),
    )
    .expect("MAGLEV as an array");
    // (zeroed block -> 4 backends: every slot), (4 -> 3 backends: one instance ejected).
    let mut best = |batch: bool, from: &[u32], to: &[u32]| {
        (0..runs)
            .map(|_| {
                let zero = vec![0; from.len()];
                dp.maps.write_table(0, &zero).expect("reset");
                dp.maps.write_table(0, from).expect("from");
                let start = Instant::now();
                if batch {
                    dp.maps.write_table(0, to).expect("batch write");
                } else {
                    for (slot, id) in maglev::diff(from, to) {
                        slots.set(slot, id, 0).expect("slot write");
                    }
                }
                let took = start.elapsed();
                // Forget what `dp.maps` knows the block holds: written behind its back.
                dp.maps.write_slots(0, &[]).expect("no slots");
                took
            })
            .min()
            .expect("runs")
            .as_secs_f64()
            * 1000.0
    };
    let zero = vec![0; four.len()];
    let rows = [
        ("a whole table (65537 slots)", &zero, &four),
        (
            &*format!("one of 4 backends ejected ({ejected} slots)"),
            &four,
            &three,
        ),
    ]
    .map(|(what, from, to)| (what.to_owned(), best(true, from, to), best(false, from, to)));
    let _ = write!(
        t,
        "\nWriting a table into a block of `MAGLEV_V2` (best of runs; the daemon writes only \
         the slots that differ, into the block no packet reads):\n\n\
         | write | batches (`BPF_MAP_UPDATE_BATCH`) | one call per slot | speed-up |\n\
         |---|---:|---:|---:|\n"
    );
    for (what, batch, single) in rows {
        let _ = writeln!(
            t,
            "| {what} | {batch:.2} ms | {single:.2} ms | {:.2}x |",
            single / batch
        );
    }
}
