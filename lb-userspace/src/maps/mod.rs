//! The only module that touches aya maps: typed handles to gpulb's maps, from a freshly loaded
//! object (daemon, tests) or from the pin directory (CLI).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    Addr6, AdmitCounters, AllowKey, AllowKey6, AllowKeyOf, BACKEND_IPV6, Backend, BackendVip,
    BackendVip6, BackendVipOf, Counters, CtConfig, EngineLoad, FloodState, Flow, FlowKey, FlowKey6,
    MAX_MEMBERS, Members, PROTO_TCP, Reason, Sched, Service, ServiceLimits, VipKey, VipKey6,
    VipKeyOf, addr6_of, ipv6_of, maps,
};

mod batch;
mod conntrack;
mod tables;

pub use conntrack::{ConntrackFill, FloodTotals, LiveCount};

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
    #[error(
        "pinned map {} is missing although the daemon's other maps are pinned: the daemon is \
         starting, or is another gpulb version than this command (a SIGUSR2 hands over to \
         the installed version)",
        path.display()
    )]
    NotPinned { path: PathBuf },
    #[error("map {name} has an unexpected type or layout")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("duplicating the descriptor of map {name}")]
    Duplicate {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}")]
    Batch {
        name: &'static str,
        #[source]
        source: batch::BatchError,
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

/// The `VIP_PORTS` words (by index) that hold the bits of these VIPs' (protocol, port).
pub fn vip_port_words<'a>(vips: impl IntoIterator<Item = &'a VipAddr>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for vip in vips {
        let (index, bit) = lb_common::vip_port_bit(vip.proto, vip.addr.port());
        *words.entry(index).or_default() |= bit;
    }
    words
}

/// A VIP as userspace names it, either family: its address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipAddr {
    pub addr: SocketAddr,
    pub proto: u8,
}

impl fmt::Display for VipAddr {
    /// `198.18.100.1:80`, `[2001:db8::1]:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// A `BACKENDS` entry with its address in either family (an IPv6 one is kept in
/// `BACKEND_ADDR6`). `flags` are the `Backend` flags other than `BACKEND_IPV6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: SocketAddr,
    pub weight: u32,
    pub service: u8,
    /// Of the id: bumped when the id goes to a new backend (see `Backend::generation`).
    pub generation: u8,
    pub flags: u16,
    pub max_flows: u16,
}

impl BackendEntry {
    /// Takes no new flows; its established flows continue.
    pub fn is_draining(&self) -> bool {
        self.flags & lb_common::BACKEND_DRAINING != 0
    }

    /// In its VIP's table: takes new flows.
    pub fn takes_new_flows(&self) -> bool {
        self.flags & lb_common::BACKEND_OUT == 0 && self.weight != 0
    }
}

/// A conntrack entry's key, either family: client → VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowAddrs {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: u8,
}

pub struct Maps {
    pub services: HashMap<MapData, VipKey, Service>,
    pub services6: HashMap<MapData, VipKey6, Service>,
    pub backends: Array<MapData, Backend>,
    pub backend_addr6: Array<MapData, Addr6>,
    pub maglev: Array<MapData, u32>,
    pub conns: HashMap<MapData, FlowKey, Flow>,
    pub conns6: HashMap<MapData, FlowKey6, Flow>,
    pub vip_of: HashMap<MapData, VipKey, BackendVip>,
    pub vip_of6: HashMap<MapData, VipKey6, BackendVip6>,
    pub vip_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub backend_egress: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub limits: Array<MapData, ServiceLimits>,
    pub allow: LpmTrie<MapData, AllowKey, u32>,
    pub allow6: LpmTrie<MapData, AllowKey6, u32>,
    pub live_flows: Array<MapData, u64>,
    pub live_fix: Array<MapData, u64>,
    pub flood: PerCpuArray<MapData, FloodState>,
    pub ct_config: Array<MapData, CtConfig>,
    pub members: Array<MapData, Members>,
    pub sched: Array<MapData, Sched>,
    pub backend_load: Array<MapData, EngineLoad>,
    pub admit_stats: PerCpuArray<MapData, AdmitCounters>,
    pub sock_netns: Array<MapData, u64>,
    pub vip_ports: Array<MapData, u64>,
    /// What this process knows each `MAGLEV_V2` block holds (written or read back), by
    /// block: a new table is written as a diff against it.
    tables: std::collections::HashMap<u32, Vec<u32>>,
    /// When each service's entry was last written (by service id): its other block is
    /// brought up to date only once no packet can still be reading it.
    switched: std::collections::HashMap<u32, std::time::Instant>,
}

/// A backend's address and port with its VIP's protocol: its `VIP_OF` key.
fn backend_vip_addr(backend: &BackendEntry, vip: &VipAddr) -> VipAddr {
    VipAddr {
        addr: backend.addr,
        proto: vip.proto,
    }
}

/// A `SERVICES`/`SERVICES6` key with the address as that family's map holds it.
fn vip_key<A>(addr_be: A, vip: &VipAddr) -> VipKeyOf<A> {
    VipKeyOf {
        addr_be,
        port_be: port_be(vip.addr.port()),
        proto: vip.proto,
        _pad: 0,
    }
}

/// An `ALLOW`/`ALLOW6` key: the service id (32 bits, matched whole), then the prefix.
fn allow_key<A>(service: u32, addr_be: A, len: u8) -> Key<AllowKeyOf<A>>
where
    AllowKeyOf<A>: aya::Pod,
{
    Key::new(32 + u32::from(len), AllowKeyOf { service, addr_be })
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

/// Reads every entry of a hash map; an entry removed between key and value reads (an LRU
/// eviction) is skipped, not an error.
fn entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    map.iter()
        .filter_map(|r| match r {
            Ok(kv) => Some(Ok(kv)),
            Err(MapError::KeyNotFound) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(op("reading", name))
}

impl Maps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_source(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// A second set of handles to the same maps (duplicated descriptors): what the metrics
    /// read while the state task writes through the first.
    pub fn duplicate(&self) -> Result<Self, MapsError> {
        let fds: std::collections::HashMap<&'static str, &MapData> = [
            (maps::SERVICES.name, self.services.map()),
            (maps::SERVICES6.name, self.services6.map()),
            (maps::BACKENDS.name, self.backends.map()),
            (maps::BACKEND_ADDR6.name, self.backend_addr6.map()),
            (maps::MAGLEV.name, self.maglev.map()),
            (maps::CONNS.name, self.conns.map()),
            (maps::CONNS6.name, self.conns6.map()),
            (maps::VIP_OF.name, self.vip_of.map()),
            (maps::VIP_OF6.name, self.vip_of6.map()),
            (maps::VIP_STATS.name, self.vip_stats.map()),
            (maps::BACKEND_STATS.name, self.backend_stats.map()),
            (maps::BACKEND_EGRESS.name, self.backend_egress.map()),
            (maps::REASONS.name, self.reasons.map()),
            (maps::LIMITS.name, self.limits.map()),
            (maps::ALLOW.name, self.allow.map()),
            (maps::ALLOW6.name, self.allow6.map()),
            (maps::LIVE_FLOWS.name, self.live_flows.map()),
            (maps::LIVE_FIX.name, self.live_fix.map()),
            (maps::FLOOD.name, self.flood.map()),
            (maps::CT_CONFIG.name, self.ct_config.map()),
            (maps::MEMBERS.name, self.members.map()),
            (maps::SCHED.name, self.sched.map()),
            (maps::BACKEND_LOAD.name, self.backend_load.map()),
            (maps::ADMIT_STATS.name, self.admit_stats.map()),
            (maps::SOCK_NETNS.name, self.sock_netns.map()),
            (maps::VIP_PORTS.name, self.vip_ports.map()),
        ]
        .into_iter()
        .collect();
        Self::from_source(|name| {
            let data = fds.get(name).ok_or(MapsError::Missing { name })?;
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| MapsError::Duplicate { name, source })?;
            let data = MapData::from_fd(fd).map_err(|source| MapsError::Layout { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
        })
    }

    /// Opens the maps a running daemon pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Self::from_source(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| {
                // Missing where the others are pinned: a daemon still pinning its maps, or
                // one of a version with other maps.
                if !path.exists() && dir.join(maps::SERVICES.name).exists() {
                    MapsError::NotPinned { path }
                } else {
                    MapsError::OpenPinned { path, source }
                }
            })?;
            Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
        })
    }

    /// Builds the typed handles from `get(name)` for each of gpulb's maps.
    fn from_source(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed(maps::SERVICES.name, get(maps::SERVICES.name)?)?,
            services6: typed(maps::SERVICES6.name, get(maps::SERVICES6.name)?)?,
            backends: typed(maps::BACKENDS.name, get(maps::BACKENDS.name)?)?,
            backend_addr6: typed(maps::BACKEND_ADDR6.name, get(maps::BACKEND_ADDR6.name)?)?,
            maglev: typed(maps::MAGLEV.name, get(maps::MAGLEV.name)?)?,
            conns: typed(maps::CONNS.name, get(maps::CONNS.name)?)?,
            conns6: typed(maps::CONNS6.name, get(maps::CONNS6.name)?)?,
            vip_of: typed(maps::VIP_OF.name, get(maps::VIP_OF.name)?)?,
            vip_of6: typed(maps::VIP_OF6.name, get(maps::VIP_OF6.name)?)?,
            vip_stats: typed(maps::VIP_STATS.name, get(maps::VIP_STATS.name)?)?,
            backend_stats: typed(maps::BACKEND_STATS.name, get(maps::BACKEND_STATS.name)?)?,
            backend_egress: typed(maps::BACKEND_EGRESS.name, get(maps::BACKEND_EGRESS.name)?)?,
            reasons: typed(maps::REASONS.name, get(maps::REASONS.name)?)?,
            limits: typed(maps::LIMITS.name, get(maps::LIMITS.name)?)?,
            allow: typed(maps::ALLOW.name, get(maps::ALLOW.name)?)?,
            allow6: typed(maps::ALLOW6.name, get(maps::ALLOW6.name)?)?,
            live_flows: typed(maps::LIVE_FLOWS.name, get(maps::LIVE_FLOWS.name)?)?,
            live_fix: typed(maps::LIVE_FIX.name, get(maps::LIVE_FIX.name)?)?,
            flood: typed(maps::FLOOD.name, get(maps::FLOOD.name)?)?,
            ct_config: typed(maps::CT_CONFIG.name, get(maps::CT_CONFIG.name)?)?,
            members: typed(maps::MEMBERS.name, get(maps::MEMBERS.name)?)?,
            sched: typed(maps::SCHED.name, get(maps::SCHED.name)?)?,
            backend_load: typed(maps::BACKEND_LOAD.name, get(maps::BACKEND_LOAD.name)?)?,
            admit_stats: typed(maps::ADMIT_STATS.name, get(maps::ADMIT_STATS.name)?)?,
            sock_netns: typed(maps::SOCK_NETNS.name, get(maps::SOCK_NETNS.name)?)?,
            vip_ports: typed(maps::VIP_PORTS.name, get(maps::VIP_PORTS.name)?)?,
            tables: std::collections::HashMap::new(),
            switched: std::collections::HashMap::new(),
        })
    }

    /// Every VIP, both families.
    pub fn services(&self) -> Result<Vec<(VipAddr, Service)>, MapsError> {
        let v4 = entries(&self.services, maps::SERVICES.name)?
            .into_iter()
            .map(|(k, s)| {
                let addr = SocketAddr::from(sock_of(k.addr_be, k.port_be));
                (
                    VipAddr {
                        addr,
                        proto: k.proto,
                    },
                    s,
                )
            });
        let v6 = entries(&self.services6, maps::SERVICES6.name)?
            .into_iter()
            .map(|(k, s)| {
                let addr = SocketAddr::new(ipv6_of(&k.addr_be).into(), port_of(k.port_be));
                (
                    VipAddr {
                        addr,
                        proto: k.proto,
                    },
                    s,
                )
            });
        Ok(v4.chain(v6).collect())
    }

    pub fn set_service(&mut self, vip: VipAddr, service: Service) -> Result<(), MapsError> {
        self.switched.insert(service.id, std::time::Instant::now());
        match vip.addr.ip() {
            IpAddr::V4(ip) => self
                .services
                .insert(vip_key(addr_be(ip), &vip), service, 0)
                .map_err(op("writing", maps::SERVICES.name)),
            IpAddr::V6(ip) => self
                .services6
                .insert(vip_key(addr6_of(ip), &vip), service, 0)
                .map_err(op("writing", maps::SERVICES6.name)),
        }
    }

    pub fn remove_service(&mut self, vip: &VipAddr) -> Result<(), MapsError> {
        match vip.addr.ip() {
            IpAddr::V4(ip) => self
                .services
                .remove(&vip_key(addr_be(ip), vip))
                .map_err(op("removing from", maps::SERVICES.name)),
            IpAddr::V6(ip) => self
                .services6
                .remove(&vip_key(addr6_of(ip), vip))
                .map_err(op("removing from", maps::SERVICES6.name)),
        }
    }

    fn entry(&self, id: u32, b: &Backend) -> Result<BackendEntry, MapsError> {
        let ip = if b.is_ipv6() {
            let a = self
                .backend_addr6
                .get(&id, 0)
                .map_err(op("reading", maps::BACKEND_ADDR6.name))?;
            IpAddr::V6(ipv6_of(&a))
        } else {
            IpAddr::V4(ip_of(b.addr_be))
        };
        Ok(BackendEntry {
            addr: SocketAddr::new(ip, port_of(b.port_be)),
            weight: b.weight,
            service: b.service,
            generation: b.generation,
            flags: b.flags & !BACKEND_IPV6,
            max_flows: b.max_flows,
        })
    }

    /// The backend with this id (unset: a zero address).
    pub fn backend(&self, id: u32) -> Result<BackendEntry, MapsError> {
        let b = self
            .backends
            .get(&id, 0)
            .map_err(op("reading", maps::BACKENDS.name))?;
        self.entry(id, &b)
    }

    /// Every programmed backend, by id.
    pub fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, MapsError> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(op("reading", maps::BACKENDS.name))?;
            if id != 0 && !b.is_unset() {
                out.push((id as u32, self.entry(id as u32, &b)?));
            }
        }
        Ok(out)
    }

    /// Writes a backend; an IPv6 address goes in first, so the data path never sees an
    /// IPv6 entry without it.
    pub fn set_backend(&mut self, id: u32, b: &BackendEntry) -> Result<(), MapsError> {
        let (addr_be, flags) = match b.addr.ip() {
            IpAddr::V4(ip) => (addr_be(ip), b.flags),
            IpAddr::V6(ip) => {
                self.backend_addr6
                    .set(id, addr6_of(ip), 0)
                    .map_err(op("writing", maps::BACKEND_ADDR6.name))?;
                (0, b.flags | BACKEND_IPV6)
            }
        };
        let backend = Backend {
            addr_be,
            weight: b.weight,
            port_be: port_be(b.addr.port()),
            service: b.service,
            generation: b.generation,
            flags,
            max_flows: b.max_flows,
        };
        self.backends
            .set(id, backend, 0)
            .map_err(op("writing", maps::BACKENDS.name))
    }

    /// The generation of a backend slot, set or cleared.
    pub fn slot_generation(&self, id: u32) -> Result<u8, MapsError> {
        let b = self
            .backends
            .get(&id, 0)
            .map_err(op("reading", maps::BACKENDS.name))?;
        Ok(b.generation)
    }

    /// Empties a backend slot (its Maglev slots must already point elsewhere), keeping its
    /// generation so that the next holder of the id gets a new one.
    pub fn clear_backend(&mut self, id: u32) -> Result<(), MapsError> {
        let old = self.backend(id)?;
        self.remove_vip_of(old.addr, id)?;
        let cleared = Backend {
            generation: old.generation,
            ..Backend::default()
        };
        self.backends
            .set(id, cleared, 0)
            .map_err(op("writing", maps::BACKENDS.name))?;
        self.backend_addr6
            .set(id, [0; 4], 0)
            .map_err(op("writing", maps::BACKEND_ADDR6.name))
    }

    /// Records which VIP a backend's replies are rewritten to (`VIP_OF`).
    pub fn set_vip_of(
        &mut self,
        id: u32,
        backend: &BackendEntry,
        vip: &VipAddr,
    ) -> Result<(), MapsError> {
        fn value<A>(vip_be: A, vip: &VipAddr, id: u32, b: &BackendEntry) -> BackendVipOf<A> {
            BackendVipOf {
                vip_be,
                vport_be: port_be(vip.addr.port()),
                service: b.service,
                generation: b.generation,
                backend: id,
            }
        }
        match (backend.addr.ip(), vip.addr.ip()) {
            (IpAddr::V4(b), IpAddr::V4(v)) => {
                let key = vip_key(addr_be(b), &backend_vip_addr(backend, vip));
                self.vip_of
                    .insert(key, value(addr_be(v), vip, id, backend), 0)
                    .map_err(op("writing", maps::VIP_OF.name))
            }
            (IpAddr::V6(b), IpAddr::V6(v)) => {
                let key = vip_key(addr6_of(b), &backend_vip_addr(backend, vip));
                self.vip_of6
                    .insert(key, value(addr6_of(v), vip, id, backend), 0)
                    .map_err(op("writing", maps::VIP_OF6.name))
            }
            // The config keeps a VIP's backends in its family.
            _ => Ok(()),
        }
    }

    /// Forgets a backend address in `VIP_OF`, for either protocol, where the entry is still
    /// backend `id`'s (a newer holder of the address keeps its own).
    pub fn remove_vip_of(&mut self, addr: SocketAddr, id: u32) -> Result<(), MapsError> {
        fn forget<K: aya::Pod, V: aya::Pod>(
            map: &mut HashMap<MapData, K, V>,
            key: &K,
            owner: impl Fn(&V) -> u32,
            id: u32,
        ) -> Result<(), MapsError> {
            match map.get(key, 0) {
                Ok(v) if owner(&v) == id => map
                    .remove(key)
                    .map_err(op("removing from", maps::VIP_OF.name)),
                Ok(_) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(op("reading", maps::VIP_OF.name)(e)),
            }
        }
        for proto in [PROTO_TCP, lb_common::PROTO_UDP] {
            let vip = VipAddr { addr, proto };
            match addr.ip() {
                IpAddr::V4(ip) => forget(
                    &mut self.vip_of,
                    &vip_key(addr_be(ip), &vip),
                    |v| v.backend,
                    id,
                )?,
                IpAddr::V6(ip) => forget(
                    &mut self.vip_of6,
                    &vip_key(addr6_of(ip), &vip),
                    |v| v.backend,
                    id,
                )?,
            }
        }
        Ok(())
    }

    pub fn limits(&self, service_id: u32) -> Result<ServiceLimits, MapsError> {
        self.limits
            .get(&service_id, 0)
            .map_err(op("reading", maps::LIMITS.name))
    }

    pub fn set_limits(&mut self, service_id: u32, limits: ServiceLimits) -> Result<(), MapsError> {
        self.limits
            .set(service_id, limits, 0)
            .map_err(op("writing", maps::LIMITS.name))
    }

    /// The backends a service's decisions weigh beside the hash's pick (at most
    /// `MAX_MEMBERS`; more are not written).
    pub fn set_members(&mut self, service_id: u32, ids: &[u32]) -> Result<(), MapsError> {
        let mut m = Members::default();
        let n = ids.len().min(MAX_MEMBERS);
        m.ids[..n].copy_from_slice(&ids[..n]);
        m.count = n as u32;
        self.members
            .set(service_id, m, 0)
            .map_err(op("writing", maps::MEMBERS.name))
    }

    pub fn sched(&self, service_id: u32) -> Result<Sched, MapsError> {
        self.sched
            .get(&service_id, 0)
            .map_err(op("reading", maps::SCHED.name))
    }

    pub fn set_sched(&mut self, service_id: u32, sched: Sched) -> Result<(), MapsError> {
        self.sched
            .set(service_id, sched, 0)
            .map_err(op("writing", maps::SCHED.name))
    }

    /// What a backend's engine last reported, and its capacity.
    pub fn engine(&self, backend_id: u32) -> Result<EngineLoad, MapsError> {
        self.backend_load
            .get(&backend_id, 0)
            .map_err(op("reading", maps::BACKEND_LOAD.name))
    }

    pub fn set_engine(&mut self, backend_id: u32, load: EngineLoad) -> Result<(), MapsError> {
        self.backend_load
            .set(backend_id, load, 0)
            .map_err(op("writing", maps::BACKEND_LOAD.name))
    }

    /// Every allowed prefix, both families: (service id, address, prefix length).
    pub fn allowed(&self) -> Result<Vec<(u32, IpAddr, u8)>, MapsError> {
        let v4 = self.allow.keys().map(|k| {
            let k = k.map_err(op("reading", maps::ALLOW.name))?;
            let data = k.data();
            let ip = IpAddr::V4(ip_of(data.addr_be));
            Ok((data.service, ip, (k.prefix_len() - 32) as u8))
        });
        let v6 = self.allow6.keys().map(|k| {
            let k = k.map_err(op("reading", maps::ALLOW6.name))?;
            let data = k.data();
            let ip = IpAddr::V6(ipv6_of(&data.addr_be));
            Ok((data.service, ip, (k.prefix_len() - 32) as u8))
        });
        v4.chain(v6).collect()
    }

    pub fn allow_prefix(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        len: u8,
    ) -> Result<(), MapsError> {
        match addr {
            IpAddr::V4(ip) => self
                .allow
                .insert(&allow_key(service_id, addr_be(ip), len), 1, 0)
                .map_err(op("writing", maps::ALLOW.name)),
            IpAddr::V6(ip) => self
                .allow6
                .insert(&allow_key(service_id, addr6_of(ip), len), 1, 0)
                .map_err(op("writing", maps::ALLOW6.name)),
        }
    }

    pub fn remove_prefix(
        &mut self,
        service_id: u32,
        addr: IpAddr,
        len: u8,
    ) -> Result<(), MapsError> {
        match addr {
            IpAddr::V4(ip) => self
                .allow
                .remove(&allow_key(service_id, addr_be(ip), len))
                .map_err(op("removing from", maps::ALLOW.name)),
            IpAddr::V6(ip) => self
                .allow6
                .remove(&allow_key(service_id, addr6_of(ip), len))
                .map_err(op("removing from", maps::ALLOW6.name)),
        }
    }

    /// The network namespace whose sockets the socket programs balance.
    pub fn set_sock_netns(&mut self, cookie: u64) -> Result<(), MapsError> {
        self.sock_netns
            .set(0, cookie, 0)
            .map_err(op("writing", maps::SOCK_NETNS.name))
    }

    /// `VIP_PORTS` word `index` (`lb_common::vip_port_bit`).
    pub fn vip_port_word(&self, index: u32) -> Result<u64, MapsError> {
        self.vip_ports
            .get(&index, 0)
            .map_err(op("reading", maps::VIP_PORTS.name))
    }

    pub fn set_vip_port_word(&mut self, index: u32, word: u64) -> Result<(), MapsError> {
        self.vip_ports
            .set(index, word, 0)
            .map_err(op("writing", maps::VIP_PORTS.name))
    }

    /// Sets the `VIP_PORTS` bits of every VIP these maps hold (clearing none); how many
    /// words changed.
    pub fn mark_vip_ports(&mut self) -> Result<usize, MapsError> {
        let mut changed = 0;
        for (index, word) in vip_port_words(self.services()?.iter().map(|(k, _)| k)) {
            let held = self.vip_port_word(index)?;
            if held | word != held {
                self.set_vip_port_word(index, held | word)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// A VIP's admission counters, summed over CPUs.
    pub fn admit_counters(&self, service_id: u32) -> Result<AdmitCounters, MapsError> {
        let values = self
            .admit_stats
            .get(&service_id, 0)
            .map_err(op("reading", maps::ADMIT_STATS.name))?;
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
        Self::summed(&self.vip_stats, maps::VIP_STATS.name, service_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters, MapsError> {
        Self::summed(&self.backend_stats, maps::BACKEND_STATS.name, backend_id)
    }

    /// Replies NATed back to clients from the backend, summed over CPUs.
    pub fn backend_egress(&self, backend_id: u32) -> Result<Counters, MapsError> {
        Self::summed(&self.backend_egress, maps::BACKEND_EGRESS.name, backend_id)
    }

    /// Packets per reason, summed over CPUs (`REASONS_V3` has room for more reasons than
    /// this build knows).
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>, MapsError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let values = self
                    .reasons
                    .get(&(r as u32), 0)
                    .map_err(op("reading", maps::REASONS.name))?;
                Ok((r, values.iter().sum()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(addr: &str, proto: u8) -> VipAddr {
        VipAddr {
            addr: addr.parse().expect("address"),
            proto,
        }
    }

    #[test]
    fn vip_port_words_hold_one_bit_per_protocol_and_port() {
        let vips = [
            vip("198.18.100.1:80", PROTO_TCP),
            vip("198.18.100.2:80", PROTO_TCP),
            vip("[2001:db8::1]:81", PROTO_TCP),
            vip("198.18.100.1:80", lb_common::PROTO_UDP),
            vip("198.18.100.1:8000", PROTO_TCP),
        ];
        let words = vip_port_words(&vips);
        let (tcp80, bit80) = lb_common::vip_port_bit(PROTO_TCP, 80);
        let (_, bit81) = lb_common::vip_port_bit(PROTO_TCP, 81);
        let (udp80, _) = lb_common::vip_port_bit(lb_common::PROTO_UDP, 80);
        let (tcp8000, bit8000) = lb_common::vip_port_bit(PROTO_TCP, 8000);
        assert_eq!(words.len(), 3, "{words:?}");
        assert_eq!(
            words[&tcp80],
            bit80 | bit81,
            "both families, one word for 64 ports"
        );
        assert_eq!(words[&udp80].count_ones(), 1, "UDP apart from TCP");
        assert_eq!(words[&tcp8000], bit8000);
        assert!(vip_port_words(&[]).is_empty());
    }
}
