//! The only module that touches aya maps: typed handles to gpulb's maps, from a freshly loaded
//! object (daemon, tests) or from the pin directory (CLI).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    Backend, Counters, Flow, FlowKey, MAGLEV_MAX_SIZE, Reason, RevNat, Service, VipKey, maps,
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
