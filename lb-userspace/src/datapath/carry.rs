//! What a load carries over into this version's maps: the conntrack tables and VIP tables of
//! the version before, and conntrack tables of another size, set aside and copied.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use lb_common::maps::{self as names, Entries, MapSizes, MapSpec};
use tracing::{info, warn};

use super::{DatapathError, ErrorChain};
use crate::maps::Maps;

/// The conntrack tables to carry into this one's: an earlier version's (`MIGRATED`), and
/// tables of another size set aside at this load or a load that did not finish
/// (`<name>_RESIZED_<pid>`, by this version or an earlier one), each with the table its
/// entries go into.
pub(super) fn tables_to_carry(pin_path: &Path) -> Vec<(PathBuf, MapSpec)> {
    let earlier = names::MIGRATED
        .iter()
        .map(|(old, new)| (pin_path.join(old), *new));
    let aside = fs::read_dir(pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (table, _) = name.split_once(RESIZED)?;
            [
                (names::CONNS.name, names::CONNS),
                (names::CONNS6.name, names::CONNS6),
            ]
            .into_iter()
            .chain(names::MIGRATED)
            .find(|(t, _)| *t == table)
            .map(|(_, into)| (e.path(), into))
        });
    earlier.chain(aside).filter(|(p, _)| p.exists()).collect()
}

/// Copies the entries of the tables to carry (same key and value layout) into this one's:
/// an upgrade or a resize keeps its flows. The first pass runs at load; the second after
/// this version's programs took over (`Datapath::finish_carry`), adding only the flows the
/// old programs opened meanwhile, then the old tables go. Entries that do not fit are left
/// to the consistent hash, like evicted ones.
pub(super) fn carry_conntrack(maps: &mut Maps, tables: &[(PathBuf, MapSpec)], only_new: bool) {
    for (path, new) in tables {
        let old = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let Ok(data) = MapData::from_pin(path) else {
            continue;
        };
        let copied = match aya::maps::Map::from_map_data(data) {
            Ok(map) => maps.copy_flows_from(
                map,
                new.name,
                names::COUNTED_FROM_SYN.contains(&origin_table(&old)),
                only_new,
            ),
            Err(e) => Err(crate::maps::MapsError::Layout {
                name: new.name,
                source: e,
            }),
        };
        match copied {
            Ok(n) => {
                info!(from = %old, to = new.name, flows = n, only_new, "conntrack carried over")
            }
            Err(e) => warn!(from = %old, error = %ErrorChain(&e), "conntrack not carried over"),
        }
    }
}

/// What a set-aside table's name adds to its table's: `<table>_RESIZED_<pid>`.
const RESIZED: &str = "_RESIZED";

/// The table a pinned conntrack table came from: itself, or the one it was set aside from.
fn origin_table(file: &str) -> &str {
    file.split_once(RESIZED).map_or(file, |(table, _)| table)
}

/// The pin of `spec` and its entries, if it is pinned with another size than `sizes` give it.
fn resized(pin_path: &Path, spec: &MapSpec, sizes: &MapSizes) -> Option<(PathBuf, u32)> {
    let path = pin_path.join(spec.name);
    let map = MapData::from_pin(&path).ok()?;
    let entries = map.info().map(|i| i.max_entries()).unwrap_or(0);
    (entries != spec.max_entries(sizes)).then_some((path, entries))
}

/// Moves aside the pinned conntrack tables whose size is not the config's (`conntrack_size`
/// changed, or `conntrack_size_v6` followed a first or last IPv6 VIP), so that new ones are
/// made; their entries are copied over after the load (`carry_conntrack`).
pub(super) fn set_aside_resized(pin_path: &Path, sizes: &MapSizes) -> Result<(), DatapathError> {
    for spec in [names::CONNS, names::CONNS6] {
        let Some((path, entries)) = resized(pin_path, &spec, sizes) else {
            continue;
        };
        // No dot: bpffs refuses names with one.
        let moved = pin_path.join(format!("{}{RESIZED}_{}", spec.name, std::process::id()));
        fs::rename(&path, &moved).map_err(|source| DatapathError::SetAside {
            path: moved.clone(),
            source,
        })?;
        info!(
            map = spec.name,
            from = entries,
            to = spec.max_entries(sizes),
            "conntrack resized: its entries are carried over"
        );
    }
    Ok(())
}

/// Removes the pins of the IPv6 maps sized by whether some VIP is IPv6 (`Entries::Ipv6`)
/// where their size is not this config's (a first IPv6 VIP, or none any more), so that they
/// are made anew. Little in them is lost: the daemon writes `VIP_OF6` from its plan, a fresh
/// rate-limit bucket is a full one, and before a first IPv6 VIP no socket was balanced to
/// one. After the last one is gone, a host socket still connected to it shows the backend,
/// not the VIP, to getpeername/recvmsg. The old programs keep their maps until they are
/// detached.
pub(super) fn drop_resized_ipv6(pin_path: &Path, sizes: &MapSizes) {
    for spec in names::ALL
        .iter()
        .filter(|s| matches!(s.entries, Entries::Ipv6(_)))
    {
        let Some((path, entries)) = resized(pin_path, spec, sizes) else {
            continue;
        };
        let want = spec.max_entries(sizes);
        // If the pin stays, the layout check names it.
        match fs::remove_file(&path) {
            Ok(()) => info!(
                map = spec.name,
                from = entries,
                to = want,
                "IPv6 map resized"
            ),
            Err(e) => warn!(map = spec.name, error = %e, "resized IPv6 map not removed"),
        }
    }
}

/// Marks the ports of every VIP the pinned maps hold in `VIP_PORTS`, before any plan runs:
/// an upgrade from a version without it starts with none, and the new program, attached
/// even when the first sync fails, would pass every VIP's packets untouched.
pub(super) fn mark_vip_ports(maps: &mut Maps) {
    match maps.mark_vip_ports() {
        Ok(0) => {}
        Ok(n) => info!(words = n, "VIP ports marked"),
        Err(e) => warn!(error = %ErrorChain(&e), "VIP ports not marked"),
    }
}

/// Carries the VIP tables of the version before (`SERVICES`, `SERVICES6`, `MAGLEV`) into
/// this one's maps and removes them: the first sync then finds every VIP with its ids and
/// table, as a restart of the same version does. Not carried (logged): the daemon programs
/// the tables anew from its config, and flows whose backend the scheduler chose away from
/// the consistent hash keep it through conntrack.
pub(super) fn migrate_tables(pin_path: &Path, maps: &mut Maps) {
    let open = |name: &str| {
        MapData::from_pin(pin_path.join(name))
            .ok()
            .and_then(|d| aya::maps::Map::from_map_data(d).ok())
    };
    let Some(maglev) = open("MAGLEV") else {
        return;
    };
    match maps.carry_tables(open("SERVICES"), open("SERVICES6"), maglev) {
        Ok(n) => info!(services = n, "VIP tables carried over"),
        Err(e) => warn!(error = %ErrorChain(&e), "VIP tables not carried over"),
    }
    for name in names::MIGRATED_TABLES {
        let _ = fs::remove_file(pin_path.join(name));
    }
}
