//! From a validated config to map contents, and writing them.
//!
//! Ids are kept stable across daemon restarts: a VIP or backend already in the (pinned) maps
//! keeps its id, so the conntrack entries that name it stay right. Writes go backends first,
//! then the VIPs' ports (`VIP_PORTS`), then tables (changed slots only), then SERVICES, so a
//! VIP only becomes visible once its table is complete; removals go the other way.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    BACKEND_OUT, LIMIT_AFFINITY, LIMIT_ALLOWLIST, LIMIT_REFUSE_RST, MAX_BACKENDS, MAX_SERVICES,
    SCHED_STICKY, Sched, Service, ServiceLimits, VIP_PORT_WORDS,
};

use crate::{
    config::{Affinity, Cidr, Config, PrefixAffinity, Vip},
    maglev::{self, MaglevBackend},
    maps::{BackendEntry, Maps, MapsError, VipAddr, vip_port_words},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<PlannedService>,
}

/// SERVICES and BACKENDS contents, as `plan` takes them.
pub type Current = (Vec<(VipAddr, Service)>, Vec<(u32, BackendEntry)>);

impl Plan {
    /// The map contents this plan describes, as `plan` takes them for the next one.
    pub fn current(&self) -> Current {
        (
            self.services.iter().map(|s| (s.key, s.service)).collect(),
            self.services
                .iter()
                .flat_map(|s| s.backends.iter().copied())
                .collect(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedService {
    pub name: String,
    pub key: VipAddr,
    pub service: Service,
    pub backends: Vec<(u32, BackendEntry)>,
    pub table: Vec<u32>,
    pub limits: ServiceLimits,
    /// The backends in the table (taking new flows), in id order: `MEMBERS`.
    pub members: Vec<u32>,
    pub sched: Sched,
    pub allow: Vec<Cidr>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no free {what} id (all {max} in use)")]
    NoFreeId { what: &'static str, max: u32 },
}

/// The lowest id in `lo..hi` not in `used`, marked used.
fn allocate(
    used: &mut BTreeSet<u32>,
    lo: u32,
    hi: u32,
    what: &'static str,
) -> Result<u32, PlanError> {
    let id = (lo..hi)
        .find(|id| !used.contains(id))
        .ok_or(PlanError::NoFreeId { what, max: hi - lo })?;
    used.insert(id);
    Ok(id)
}

pub fn vip_key(vip: &Vip) -> VipAddr {
    VipAddr {
        addr: SocketAddr::new(vip.address, vip.port),
        proto: vip.protocol.number(),
    }
}

/// What one VIP should hold: its backends, and which of them take new flows.
#[derive(Debug, Clone)]
pub struct DesiredService<'a> {
    pub vip: &'a Vip,
    pub backends: Vec<DesiredBackend>,
    /// New flows stay on their hash's picks while those have room (`SCHED_STICKY`).
    pub sticky: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Concurrent TCP flow cap; 0: none.
    pub max_flows: u16,
    /// `BACKEND_DRAINING`, for the CLI; the plan adds `BACKEND_OUT`.
    pub flags: u16,
    /// Takes new flows (ready, not draining); otherwise only its established flows reach
    /// it: out of the Maglev table and the members, flagged `BACKEND_OUT`.
    pub in_table: bool,
}

/// Every `[[vip.backend]]` of `config`, all taking new flows (no model instances).
pub fn static_backends(config: &Config) -> Vec<DesiredService<'_>> {
    config
        .vips
        .iter()
        .map(|vip| DesiredService {
            vip,
            backends: vip
                .backends
                .iter()
                .map(|b| DesiredBackend {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    max_flows: b.max_flows,
                    flags: 0,
                    in_table: true,
                })
                .collect(),
            sticky: vip.scheduler.prefix_affinity != PrefixAffinity::Off,
        })
        .collect()
}

/// What the maps should hold, reusing the ids found in the maps now.
pub fn plan(
    desired: &[DesiredService<'_>],
    current_services: &[(VipAddr, Service)],
    current_backends: &[(u32, BackendEntry)],
) -> Result<Plan, PlanError> {
    let service_ids: HashMap<VipAddr, u32> =
        current_services.iter().map(|(k, s)| (*k, s.id)).collect();
    let blocks: HashMap<VipAddr, u32> = current_services
        .iter()
        .map(|(k, s)| (*k, s.block))
        .collect();
    // Existing backends by (service id, address and port).
    let backend_ids: HashMap<(u8, SocketAddr), (u32, u8)> = current_backends
        .iter()
        .map(|(id, b)| ((b.service, b.addr), (*id, b.generation)))
        .collect();

    // Every VIP/backend that stays keeps its id; new ones get fresh ids.
    let keys: Vec<VipAddr> = desired.iter().map(|d| vip_key(d.vip)).collect();
    // Ids in the maps now are not handed to anything new: conntrack entries may still name
    // a removed backend, and must not be sent to its successor.
    let mut used_services: BTreeSet<u32> = service_ids.values().copied().collect();
    let mut service_of = Vec::with_capacity(keys.len());
    for key in &keys {
        match service_ids.get(key) {
            Some(&id) => service_of.push(id),
            None => service_of.push(allocate(&mut used_services, 0, MAX_SERVICES, "service")?),
        }
    }

    let mut used_backends: BTreeSet<u32> = backend_ids.values().map(|&(id, _)| id).collect();

    let mut services = Vec::with_capacity(desired.len());
    for ((d, key), &sid) in desired.iter().zip(keys).zip(&service_of) {
        let vip = d.vip;
        let mut backends = Vec::with_capacity(d.backends.len());
        let mut members = Vec::with_capacity(d.backends.len());
        for b in &d.backends {
            let k = (sid as u8, SocketAddr::new(b.address, b.port));
            // A fresh id's generation is set by `apply`, from the slot's.
            let (id, generation) = match backend_ids.get(&k) {
                Some(&known) => known,
                None => (allocate(&mut used_backends, 1, MAX_BACKENDS, "backend")?, 0),
            };
            let out = if b.in_table { 0 } else { BACKEND_OUT };
            backends.push((
                id,
                BackendEntry {
                    addr: k.1,
                    weight: b.weight,
                    service: sid as u8,
                    generation,
                    flags: b.flags | out,
                    max_flows: b.max_flows,
                },
            ));
            members.push(MaglevBackend {
                id,
                key: maglev::backend_key(b.address, b.port),
                weight: if b.in_table { b.weight } else { 0 },
            });
        }
        let table = maglev::build_table(&members, vip.maglev_table_size);
        let mut in_table: Vec<u32> = members
            .iter()
            .filter(|m| m.weight > 0)
            .map(|m| m.id)
            .collect();
        in_table.sort_unstable();
        services.push(PlannedService {
            name: vip.name.clone(),
            key,
            // The block in use; `apply` moves a changed table to the other one.
            service: Service {
                id: sid,
                table_size: vip.maglev_table_size,
                block: blocks
                    .get(&key)
                    .copied()
                    .unwrap_or(Service::first_block(sid)),
                _pad: 0,
            },
            backends,
            table,
            limits: limits(vip),
            members: in_table,
            sched: Sched {
                max_age_ns: vip.scheduler.signal_max_age.as_nanos() as u64,
                choices: vip.scheduler.choices,
                flags: if d.sticky { SCHED_STICKY } else { 0 },
            },
            allow: vip.admission.allow.clone(),
        });
    }
    Ok(Plan { services })
}

/// The data path's admission settings of a VIP, and its hash key.
fn limits(vip: &Vip) -> ServiceLimits {
    let mut l = ServiceLimits::default();
    if let Some(rate) = vip.admission.rate {
        l.interval_ns = 1_000_000_000 / u64::from(rate.per_second);
        l.burst_ns = l.interval_ns * u64::from(rate.burst);
        l.v6_prefix = u32::from(rate.ipv6_prefix);
    }
    let flag = |on: bool, f: u32| if on { f } else { 0 };
    l.flags = flag(vip.admission.refuse_rst, LIMIT_REFUSE_RST)
        | flag(!vip.admission.allow.is_empty(), LIMIT_ALLOWLIST)
        | flag(vip.affinity == Affinity::Client, LIMIT_AFFINITY);
    l
}

/// What `apply` wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub slots_written: usize,
    pub services_removed: usize,
    pub backends_removed: usize,
}

/// Makes the maps hold `plan`, writing only what differs. `previous`: the plan last applied
/// by this process, trusted instead of reading the tables back (a 65537-slot table is 65537
/// syscalls to read); `None` reads the maps. A backend given a fresh id gets the next
/// generation of its slot, written into `plan` too.
pub fn apply(
    maps: &mut Maps,
    plan: &mut Plan,
    previous: Option<&Plan>,
) -> Result<Applied, MapsError> {
    let mut applied = Applied::default();
    let (current_services, current_backends) = match previous {
        Some(p) => p.current(),
        None => (maps.services()?, maps.backends()?),
    };
    let allowed: Vec<(u32, Cidr)> = match previous {
        Some(p) => p
            .services
            .iter()
            .flat_map(|s| s.allow.iter().map(|c| (s.service.id, *c)))
            .collect(),
        None => maps
            .allowed()?
            .into_iter()
            .map(|(id, addr, len)| (id, Cidr { addr, len }))
            .collect(),
    };

    for s in &mut plan.services {
        for (id, backend) in &mut s.backends {
            let current = current_backends.iter().find(|&&(i, _)| i == *id);
            if current.is_none() {
                // A fresh id: conntrack entries of its earlier holders name the generation
                // before, so they do not match it, and it starts with no live flows.
                backend.generation = maps.slot_generation(*id)?.wrapping_add(1);
                maps.reset_live(*id)?;
            }
            let unchanged = current.is_some_and(|&(_, b)| b == *backend);
            // VIP_OF first: the flows the new entry takes can be answered at once. Written
            // for every backend when the maps were read back (a start, a takeover, an
            // upgrade from a version without VIP_OF), not only for changed ones.
            if !unchanged || previous.is_none() {
                maps.set_vip_of(*id, backend, &s.key)?;
            }
            if !unchanged {
                maps.set_backend(*id, backend)?;
            }
        }
    }
    // The ports of new VIPs are marked before their service entries are written, and the
    // ports of removed ones cleared after theirs are gone: the data path never passes a
    // VIP's packet as another port's.
    let ports_before = vip_port_words(current_services.iter().map(|(k, _)| k));
    let ports_after = vip_port_words(plan.services.iter().map(|s| &s.key));
    let mut both = ports_before.clone();
    for (index, word) in &ports_after {
        *both.entry(*index).or_default() |= word;
    }
    write_vip_ports(maps, &both)?;
    for s in &mut plan.services {
        // A changed table goes into the service's other block, and the service's entry,
        // written last, switches to it at once: the data path never sees half a table.
        let current = current_services
            .iter()
            .find(|(k, c)| *k == s.key && c.id == s.service.id)
            .map(|(_, c)| *c);
        s.service.block = match current {
            Some(c)
                if c.table_size == s.service.table_size
                    && maps.block_table(c.block, c.table_size)? == s.table =>
            {
                c.block
            }
            Some(c) => {
                maps.await_spare(c.id);
                // Brought up to the table in use first (if the tick has not yet), so that
                // only this change's slots are written below.
                if c.table_size == s.service.table_size {
                    maps.catch_up(&c)?;
                }
                let block = Service::other_block(c.block);
                applied.slots_written += maps.write_table(block, &s.table)?;
                block
            }
            // Not visible yet: its first block, and the same table in the other, so that the
            // next change writes only the slots it changes.
            None => {
                // The id may have been a removed VIP's a moment ago.
                maps.await_spare(s.service.id);
                let block = Service::first_block(s.service.id);
                applied.slots_written += maps.write_table(block, &s.table)?;
                maps.write_table(Service::other_block(block), &s.table)?;
                block
            }
        };
        let before =
            previous.and_then(|p| p.services.iter().find(|c| c.service.id == s.service.id));
        if before.is_none_or(|b| b.members != s.members) {
            maps.set_members(s.service.id, &s.members)?;
        }
        if before.is_none_or(|b| b.sched != s.sched) {
            maps.set_sched(s.service.id, s.sched)?;
        }
        // Prefixes before limits: a VIP that turns its allow-list on has it filled first.
        write_allow(maps, s.service.id, &s.allow, &allowed)?;
        if before.is_none_or(|b| b.limits != s.limits) {
            maps.set_limits(s.service.id, s.limits)?;
        }
        if !current_services.contains(&(s.key, s.service)) {
            maps.set_service(s.key, s.service)?;
        }
    }
    let planned_keys: Vec<VipAddr> = plan.services.iter().map(|s| s.key).collect();
    for (key, service) in current_services
        .iter()
        .filter(|(k, _)| !planned_keys.contains(k))
    {
        maps.remove_service(key)?;
        // Its id may be handed out again: no limits or prefixes may linger for the next VIP.
        maps.set_limits(service.id, ServiceLimits::default())?;
        maps.set_members(service.id, &[])?;
        maps.set_sched(service.id, Sched::default())?;
        write_allow(maps, service.id, &[], &allowed)?;
        applied.services_removed += 1;
    }
    let mut exact = ports_after;
    for index in ports_before.keys() {
        exact.entry(*index).or_default();
    }
    if previous.is_none() {
        // A start knows nothing of what an earlier process left (an apply cut short between
        // the two writes): every word is brought to the plan's.
        for index in 0..VIP_PORT_WORDS {
            exact.entry(index).or_default();
        }
    }
    write_vip_ports(maps, &exact)?;
    let planned_ids: BTreeSet<u32> = plan
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|(id, _)| *id))
        .collect();
    for (id, _) in current_backends
        .iter()
        .filter(|(id, _)| !planned_ids.contains(id))
    {
        maps.clear_backend(*id)?;
        applied.backends_removed += 1;
    }
    Ok(applied)
}

/// Writes the `VIP_PORTS` words that differ from these, as read back.
fn write_vip_ports(maps: &mut Maps, words: &BTreeMap<u32, u64>) -> Result<(), MapsError> {
    for (&index, &word) in words {
        if maps.vip_port_word(index)? != word {
            maps.set_vip_port_word(index, word)?;
        }
    }
    Ok(())
}

/// Makes a service's prefixes in `ALLOW` exactly `want`: adds first, then removes, so a
/// prefix that stays is never missing.
fn write_allow(
    maps: &mut Maps,
    service_id: u32,
    want: &[Cidr],
    current: &[(u32, Cidr)],
) -> Result<(), MapsError> {
    let has: Vec<Cidr> = current
        .iter()
        .filter(|(id, _)| *id == service_id)
        .map(|(_, c)| *c)
        .collect();
    for c in want.iter().filter(|c| !has.contains(c)) {
        maps.allow_prefix(service_id, c.addr, c.len)?;
    }
    for c in has.iter().filter(|c| !want.contains(c)) {
        maps.remove_prefix(service_id, c.addr, c.len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(ports: &[u16]) -> Config {
        let mut text = String::from(
            "interface = \"lo\"\n[[vip]]\nname = \"chat\"\naddress = \"198.18.100.1\"\nport = 80\nmaglev_table_size = 251\n",
        );
        for p in ports {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"198.18.0.1\"\nport = {p}\n"
            ));
        }
        Config::parse(Path::new("t.toml"), &text).expect("valid config")
    }

    fn plan_of(config: &Config, current: &Current) -> Plan {
        plan(&static_backends(config), &current.0, &current.1).expect("plan")
    }

    #[test]
    fn fresh_plan_numbers_backends_from_one() {
        let p = plan_of(&config(&[8001, 8002]), &Current::default());
        let ids: Vec<u32> = p.services[0].backends.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(p.services[0].members, vec![1, 2]);
        assert_eq!(p.services[0].sched.choices, lb_common::DEFAULT_CHOICES);
        assert_eq!(p.services[0].sched.max_age_ns, 500_000_000);
        assert_eq!(p.services[0].service.id, 0);
        assert!(p.services[0].table.iter().all(|id| ids.contains(id)));
    }

    #[test]
    fn existing_ids_survive_a_replan() {
        let first = plan_of(&config(&[8001, 8002, 8003]), &Current::default());
        // 8001 removed, 8004 added: 8002 and 8003 keep their ids, 8004 takes a free one.
        let second = plan_of(&config(&[8002, 8003, 8004]), &first.current());
        let id_of = |p: &Plan, port: u16| {
            p.services[0]
                .backends
                .iter()
                .find(|(_, b)| b.addr.port() == port)
                .map(|(id, _)| *id)
        };
        assert_eq!(id_of(&second, 8002), id_of(&first, 8002));
        assert_eq!(id_of(&second, 8003), id_of(&first, 8003));
        // Not even 8001's id: conntrack entries may still name it.
        let new = id_of(&second, 8004).expect("8004 planned");
        assert!(!first.services[0].backends.iter().any(|(id, _)| *id == new));
    }

    #[test]
    fn backends_out_of_the_table_keep_their_entry_but_no_slot() {
        let c = config(&[8001, 8002]);
        let mut desired = static_backends(&c);
        desired[0].backends[1].in_table = false;
        desired[0].backends[1].flags = lb_common::BACKEND_DRAINING;
        let p = plan(&desired, &[], &[]).expect("plan");
        let (out_id, out) = p.services[0].backends[1];
        assert_eq!(
            out.flags,
            lb_common::BACKEND_DRAINING | BACKEND_OUT,
            "flagged out: the data path sends it no new flow even before the table changes"
        );
        assert!(!out.takes_new_flows());
        assert_eq!(
            p.services[0].members,
            vec![p.services[0].backends[0].0],
            "only what takes new flows is a member"
        );
        assert_eq!(out.weight, 1, "the configured weight is kept for the CLI");
        assert!(!p.services[0].table.contains(&out_id));
        assert!(
            p.services[0]
                .table
                .iter()
                .all(|&id| id == p.services[0].backends[0].0)
        );
    }
}
