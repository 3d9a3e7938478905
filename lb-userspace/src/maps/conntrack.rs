//! Conntrack as userspace sees it: the tracked flows, the live-flow counts and their
//! correction, the insert budget and its flood counters, and the tables carried over from an
//! earlier version or another size.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError};
use lb_common::{CtConfig, Flow, FlowKey, FlowKey6, FlowKeyOf, PROTO_TCP, addr6_of, ipv6_of, maps};

use super::{
    FlowAddrs, Maps, MapsError, VipAddr, addr_be, entries, op, port_be, port_of, sock_of, typed,
};

/// A backend's live-flow count in its two halves: what the data path counted (atomic adds
/// only) and the daemon's correction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCount {
    pub counted: i64,
    pub fix: i64,
}

impl LiveCount {
    /// What decisions read (before the data path's clamp at 0).
    pub fn effective(&self) -> i64 {
        self.counted.wrapping_add(self.fix)
    }
}

/// `FLOOD`, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodTotals {
    /// Packets forwarded by the consistent hash without conntrack state.
    pub stateless: u64,
    /// Seconds any CPU spent in flood mode (one per CPU and second).
    pub flood_seconds: u64,
}

/// Counts a conntrack table's keys, at most its capacity: under LRU churn the kernel's
/// next-key walk restarts from the first bucket when the key it stands on is evicted, so an
/// unbounded walk could count past the capacity (or not end).
fn fill<K: aya::Pod>(
    map: &HashMap<MapData, K, Flow>,
    name: &'static str,
) -> Result<ConntrackFill, MapsError> {
    let capacity = map.map().info().map_err(op("reading", name))?.max_entries();
    let entries = map
        .keys()
        .filter(Result::is_ok)
        .take(capacity as usize)
        .count();
    Ok(ConntrackFill {
        entries: entries as u64,
        capacity: u64::from(capacity),
    })
}

/// How full a conntrack table is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackFill {
    pub entries: u64,
    pub capacity: u64,
}

impl Maps {
    /// Tracked flows (conntrack entries), client → VIP, both families.
    pub fn flows(&self) -> Result<Vec<(FlowAddrs, Flow)>, MapsError> {
        let v4 = entries(&self.conns, maps::CONNS.name)?
            .into_iter()
            .map(|(k, f)| {
                let flow = FlowAddrs {
                    client: sock_of(k.src_be, k.sport_be).into(),
                    vip: sock_of(k.dst_be, k.dport_be).into(),
                    proto: k.proto,
                };
                (flow, f)
            });
        let v6 = entries(&self.conns6, maps::CONNS6.name)?
            .into_iter()
            .map(|(k, f)| {
                let flow = FlowAddrs {
                    client: SocketAddr::new(ipv6_of(&k.src_be).into(), port_of(k.sport_be)),
                    vip: SocketAddr::new(ipv6_of(&k.dst_be).into(), port_of(k.dport_be)),
                    proto: k.proto,
                };
                (flow, f)
            });
        Ok(v4.chain(v6).collect())
    }

    /// Entries and capacity of the IPv4 and IPv6 conntrack tables. Walks every key (about a
    /// second per million entries): callers cache it.
    pub fn conntrack_fill(&self) -> Result<[ConntrackFill; 2], MapsError> {
        Ok([
            fill(&self.conns, maps::CONNS.name)?,
            fill(&self.conns6, maps::CONNS6.name)?,
        ])
    }

    /// Live TCP flows of a backend as decisions read them (the data path's count plus the
    /// daemon's correction; a sum below zero reads as 0, as in the data path).
    pub fn live_flows(&self, backend_id: u32) -> Result<u64, MapsError> {
        Ok(self.live_count(backend_id)?.effective().max(0) as u64)
    }

    /// Both halves of a backend's live-flow count.
    pub fn live_count(&self, backend_id: u32) -> Result<LiveCount, MapsError> {
        let counted = self
            .live_flows
            .get(&backend_id, 0)
            .map_err(op("reading", maps::LIVE_FLOWS.name))?;
        let fix = self
            .live_fix
            .get(&backend_id, 0)
            .map_err(op("reading", maps::LIVE_FIX.name))?;
        Ok(LiveCount {
            counted: counted as i64,
            fix: fix as i64,
        })
    }

    /// Sets the daemon's correction of a backend's count (never the data path's counter,
    /// whose concurrent increments a write would lose).
    pub fn set_live_fix(&mut self, backend_id: u32, fix: i64) -> Result<(), MapsError> {
        self.live_fix
            .set(backend_id, fix as u64, 0)
            .map_err(op("writing", maps::LIVE_FIX.name))
    }

    /// A fresh id starts at zero live flows: no flow can name it yet (its generation is new),
    /// so nothing races with these writes.
    pub fn reset_live(&mut self, backend_id: u32) -> Result<(), MapsError> {
        self.live_flows
            .set(backend_id, 0, 0)
            .map_err(op("writing", maps::LIVE_FLOWS.name))?;
        self.set_live_fix(backend_id, 0)
    }

    /// The conntrack entry of a client's flow to a VIP, if it has one.
    pub fn flow(&self, client: SocketAddr, vip: &VipAddr) -> Result<Option<Flow>, MapsError> {
        fn key<A>(src_be: A, dst_be: A, client: SocketAddr, vip: &VipAddr) -> FlowKeyOf<A> {
            FlowKeyOf {
                src_be,
                dst_be,
                sport_be: port_be(client.port()),
                dport_be: port_be(vip.addr.port()),
                proto: vip.proto,
                _pad: 0,
                _pad2: 0,
            }
        }
        let found = match (client.ip().to_canonical(), vip.addr.ip()) {
            (IpAddr::V4(c), IpAddr::V4(v)) => {
                let k = key(addr_be(c), addr_be(v), client, vip);
                self.conns.get(&k, 0)
            }
            (IpAddr::V6(c), IpAddr::V6(v)) => {
                let k = key(addr6_of(c), addr6_of(v), client, vip);
                self.conns6.get(&k, 0)
            }
            _ => return Ok(None),
        };
        match found {
            Ok(f) => Ok(Some(f)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op("reading", maps::CONNS.name)(e)),
        }
    }

    /// Copies every entry of an earlier version's conntrack table (`map`, same layout as
    /// `into`'s) into `into`; returns how many. `counted_from_syn`: the table is of the first
    /// version, which counted a flow from its SYN, so a TCP flow it had not counted has ended
    /// and is marked done, never to be counted.
    ///
    /// `only_new`: entries the table already has are left as they are (the second pass, after
    /// this version's programs took over and may have updated them).
    pub fn copy_flows_from(
        &mut self,
        map: Map,
        into: &'static str,
        counted_from_syn: bool,
        only_new: bool,
    ) -> Result<usize, MapsError> {
        fn copy<A: Copy>(
            from: &HashMap<MapData, FlowKeyOf<A>, Flow>,
            to: &mut HashMap<MapData, FlowKeyOf<A>, Flow>,
            name: &'static str,
            counted_from_syn: bool,
            only_new: bool,
        ) -> Result<usize, MapsError>
        where
            FlowKeyOf<A>: aya::Pod,
        {
            let mut entries = entries(from, name)?;
            for (k, v) in &mut entries {
                if counted_from_syn && k.proto == PROTO_TCP && !v.is_counted() {
                    v.flags |= lb_common::FLOW_DONE;
                }
            }
            for (k, v) in &entries {
                // BPF_NOEXIST (1): fails with EEXIST on a key the table has.
                match to.insert(k, v, u64::from(only_new)) {
                    Ok(()) => {}
                    Err(MapError::SyscallError(e))
                        if only_new && e.io_error.raw_os_error() == Some(17) => {}
                    Err(e) => return Err(op("writing", name)(e)),
                }
            }
            Ok(entries.len())
        }
        if into == maps::CONNS.name {
            let from: HashMap<MapData, FlowKey, Flow> = typed(into, map)?;
            copy(&from, &mut self.conns, into, counted_from_syn, only_new)
        } else {
            let from: HashMap<MapData, FlowKey6, Flow> = typed(into, map)?;
            copy(&from, &mut self.conns6, into, counted_from_syn, only_new)
        }
    }

    /// Sets the conntrack insert budget (`CT_CONFIG`).
    pub fn set_ct_config(&mut self, config: CtConfig) -> Result<(), MapsError> {
        self.ct_config
            .set(0, config, 0)
            .map_err(op("writing", maps::CT_CONFIG.name))
    }

    /// Flood-mode counters, summed over CPUs: (packets forwarded without state, seconds a
    /// CPU spent in flood mode).
    pub fn flood(&self) -> Result<FloodTotals, MapsError> {
        let values = self
            .flood
            .get(&0, 0)
            .map_err(op("reading", maps::FLOOD.name))?;
        Ok(values
            .iter()
            .fold(FloodTotals::default(), |t, c| FloodTotals {
                stateless: t.stateless + c.stateless,
                flood_seconds: t.flood_seconds + c.flood_windows,
            }))
    }
}
