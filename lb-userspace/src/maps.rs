//! The only module that touches aya maps: typed handles to gpulb's maps, from a freshly loaded
//! object (daemon, tests) or from the pin directory (CLI).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    AdmitCounters, AllowKey, Backend, Candidates, Counters, Flow, FlowKey, MAGLEV_MAX_SIZE, Reason,
    RevNat, Service, ServiceLimits, VipKey, maps,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the BPF object")]
    Missing { name: &'static str },
    #[error(
        "opening pinned map {}: is `gpulb run` running with this pin path?",
        path.display()
    )]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name} has an unexpected type or layout")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} map {name}")]
    Op {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn op(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, name, source }
}

/// Network-order helpers: `_be` fields hold the bytes of the header as a native integer.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
pub fn port_be(port: u16) -> u16 {
    port.to_be()
}
pub fn ip_of(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}
pub fn port_of(port_be: u16) -> u16 {
    u16::from_be(port_be)
}
pub fn sock_of(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_of(addr_be), port_of(port_be))
}

pub struct Maps {
    pub services: HashMap<MapData, VipKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub conns: HashMap<MapData, FlowKey, Flow>,
    pub revnat: HashMap<MapData, FlowKey, RevNat>,
    pub vip_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub limits: Array<MapData, ServiceLimits>,
    pub allow: LpmTrie<MapData, AllowKey, u32>,
    pub live_flows: Array<MapData, u64>,
    pub candidates: Array<MapData, Candidates>,
    pub admit_stats: PerCpuArray<MapData, AdmitCounters>,
    pub sock_netns: Array<MapData, u64>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

impl Maps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_source(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Opens the maps a running daemon pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Self::from_source(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(|source| MapsError::OpenPinned { path, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
        })
    }

    /// Builds the typed handles from `get(name)` for each of gpulb's maps.
    fn from_source(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed(maps::SERVICES, get(maps::SERVICES)?)?,
            backends: typed(maps::BACKENDS, get(maps::BACKENDS)?)?,
            maglev: typed(maps::MAGLEV, get(maps::MAGLEV)?)?,
            conns: typed(maps::CONNS, get(maps::CONNS)?)?,
            revnat: typed(maps::REVNAT, get(maps::REVNAT)?)?,
            vip_stats: typed(maps::VIP_STATS, get(maps::VIP_STATS)?)?,
            backend_stats: typed(maps::BACKEND_STATS, get(maps::BACKEND_STATS)?)?,
            reasons: typed(maps::REASONS, get(maps::REASONS)?)?,
            limits: typed(maps::LIMITS, get(maps::LIMITS)?)?,
            allow: typed(maps::ALLOW, get(maps::ALLOW)?)?,
            live_flows: typed(maps::LIVE_FLOWS, get(maps::LIVE_FLOWS)?)?,
            candidates: typed(maps::CANDIDATES, get(maps::CANDIDATES)?)?,
            admit_stats: typed(maps::ADMIT_STATS, get(maps::ADMIT_STATS)?)?,
            sock_netns: typed(maps::SOCK_NETNS, get(maps::SOCK_NETNS)?)?,
        })
    }

    pub fn services(&self) -> Result<Vec<(VipKey, Service)>, MapsError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op("reading", maps::SERVICES))
    }

    pub fn set_service(&mut self, key: VipKey, service: Service) -> Result<(), MapsError> {
        self.services
            .insert(key, service, 0)
            .map_err(op("writing", maps::SERVICES))
    }

    pub fn remove_service(&mut self, key: &VipKey) -> Result<(), MapsError> {
        self.services
            .remove(key)
            .map_err(op("removing from", maps::SERVICES))
    }

    pub fn backend(&self, id: u32) -> Result<Backend, MapsError> {
        self.backends
            .get(&id, 0)
            .map_err(op("reading", maps::BACKENDS))
    }

    /// Every programmed backend, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, MapsError> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(op("reading", maps::BACKENDS))?;
            if id != 0 && !b.is_unset() {
                out.push((id as u32, b));
            }
        }
        Ok(out)
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapsError> {
        self.backends
            .set(id, backend, 0)
            .map_err(op("writing", maps::BACKENDS))
    }

    /// The Maglev table of a service (its first `table_size` slots).
    pub fn maglev_table(&self, service: &Service) -> Result<Vec<u32>, MapsError> {
        let base = service.id * MAGLEV_MAX_SIZE;
        (base..base + service.table_size)
            .map(|i| self.maglev.get(&i, 0).map_err(op("reading", maps::MAGLEV)))
            .collect()
    }

    /// Writes the given (slot, backend id) pairs of a service's table.
    pub fn write_slots(&mut self, service_id: u32, slots: &[(u32, u32)]) -> Result<(), MapsError> {
        let base = service_id * MAGLEV_MAX_SIZE;
        for &(slot, id) in slots {
            self.maglev
                .set(base + slot, id, 0)
                .map_err(op("writing", maps::MAGLEV))?;
        }
        Ok(())
    }

    /// Tracked flows (conntrack entries), client → VIP.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>, MapsError> {
        // A flow evicted between key and value reads is skipped, not an error.
        self.conns
            .iter()
            .filter_map(|r| match r {
                Ok(kv) => Some(Ok(kv)),
                Err(MapError::KeyNotFound) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(op("reading", maps::CONNS))
    }

    pub fn limits(&self, service_id: u32) -> Result<ServiceLimits, MapsError> {
        self.limits
            .get(&service_id, 0)
            .map_err(op("reading", maps::LIMITS))
    }

    pub fn set_limits(&mut self, service_id: u32, limits: ServiceLimits) -> Result<(), MapsError> {
        self.limits
            .set(service_id, limits, 0)
            .map_err(op("writing", maps::LIMITS))
    }

    pub fn set_candidates(&mut self, service_id: u32, c: Candidates) -> Result<(), MapsError> {
        self.candidates
            .set(service_id, c, 0)
            .map_err(op("writing", maps::CANDIDATES))
    }

    /// Every allowed prefix: (service id, address, prefix length).
    pub fn allowed(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, MapsError> {
        self.allow
            .keys()
            .map(|k| {
                let k = k.map_err(op("reading", maps::ALLOW))?;
                let data = k.data();
                Ok((
                    data.service,
                    ip_of(data.addr_be),
                    (k.prefix_len() - 32) as u8,
                ))
            })
            .collect()
    }

    fn allow_key(service_id: u32, addr: Ipv4Addr, len: u8) -> Key<AllowKey> {
        Key::new(
            32 + u32::from(len),
            AllowKey {
                service: service_id,
                addr_be: addr_be(addr),
            },
        )
    }

    pub fn allow_prefix(
        &mut self,
        service_id: u32,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), MapsError> {
        self.allow
            .insert(&Self::allow_key(service_id, addr, len), 1, 0)
            .map_err(op("writing", maps::ALLOW))
    }

    pub fn remove_prefix(
        &mut self,
        service_id: u32,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), MapsError> {
        self.allow
            .remove(&Self::allow_key(service_id, addr, len))
            .map_err(op("removing from", maps::ALLOW))
    }

    /// Live TCP flows the data path counts for a backend (below-zero races read as 0).
    pub fn live_flows(&self, backend_id: u32) -> Result<u64, MapsError> {
        let v = self
            .live_flows
            .get(&backend_id, 0)
            .map_err(op("reading", maps::LIVE_FLOWS))?;
        Ok(if (v as i64) < 0 { 0 } else { v })
    }

    /// Overwrites a backend's live-flow count (reconciliation; see `daemon::state`).
    pub fn set_live_flows(&mut self, backend_id: u32, n: u64) -> Result<(), MapsError> {
        self.live_flows
            .set(backend_id, n, 0)
            .map_err(op("writing", maps::LIVE_FLOWS))
    }

    /// The network namespace whose sockets the socket programs balance.
    pub fn set_sock_netns(&mut self, cookie: u64) -> Result<(), MapsError> {
        self.sock_netns
            .set(0, cookie, 0)
            .map_err(op("writing", maps::SOCK_NETNS))
    }

    /// A VIP's admission counters, summed over CPUs.
    pub fn admit_counters(&self, service_id: u32) -> Result<AdmitCounters, MapsError> {
        let values = self
            .admit_stats
            .get(&service_id, 0)
            .map_err(op("reading", maps::ADMIT_STATS))?;
        Ok(values
            .iter()
            .fold(AdmitCounters::default(), |a, c| AdmitCounters {
                rate_limited: a.rate_limited + c.rate_limited,
                not_allowed: a.not_allowed + c.not_allowed,
                backends_full: a.backends_full + c.backends_full,
                redirected: a.redirected + c.redirected,
            }))
    }

    /// Per-CPU counters summed.
    fn summed(
        map: &PerCpuArray<MapData, Counters>,
        name: &'static str,
        index: u32,
    ) -> Result<Counters, MapsError> {
        let values = map.get(&index, 0).map_err(op("reading", name))?;
        Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            new_flows: acc.new_flows + c.new_flows,
        }))
    }

    pub fn vip_counters(&self, service_id: u32) -> Result<Counters, MapsError> {
        Self::summed(&self.vip_stats, maps::VIP_STATS, service_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters, MapsError> {
        Self::summed(&self.backend_stats, maps::BACKEND_STATS, backend_id)
    }

    /// Packets per reason, summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>, MapsError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let values = self
                    .reasons
                    .get(&(r as u32), 0)
                    .map_err(op("reading", maps::REASONS))?;
                Ok((r, values.iter().sum()))
            })
            .collect()
    }
}
