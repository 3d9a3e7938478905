//! Live-flow counts that heal. The data path counts a TCP flow from its SYN to its first FIN
//! or RST. A flow that ends with neither (a client that vanished, a conntrack entry evicted)
//! stays counted and would hold a slot of a capped backend for good. For a backend whose
//! listening socket is in this namespace, the kernel's sockets are the truth: a count above
//! the number of its connections at two checks in a row is set down to that number. (The
//! map is read before the sockets, so a flow being opened meanwhile is never mistaken for a
//! leak.)

use std::collections::HashSet;

use tracing::{info, warn};

use crate::{
    datapath::ErrorChain,
    maps::{Maps, MapsError},
    plan::Plan,
    sockets::TcpSockets,
};

#[derive(Debug, Default)]
pub struct Reconciler {
    /// Backend ids whose live-flow count was above their socket count at the last check.
    overcounted: HashSet<u32>,
}

impl Reconciler {
    /// One check of the backends `plan` programmed.
    pub fn check(&mut self, plan: &Plan, maps: &mut Maps) {
        // Read before the sockets: see above.
        let counted: Result<Vec<_>, MapsError> = plan
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|&(id, b)| Ok((id, b.addr, maps.live_flows(id)?)))
            .collect();
        let counted = match counted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "reading live flows");
                return;
            }
        };
        let sockets = TcpSockets::read();
        let mut over = HashSet::new();
        for (id, backend, n) in counted {
            let (addr, port) = (backend.ip(), backend.port());
            if !sockets.is_listening(addr, port) {
                continue;
            }
            let actual = sockets.connections(addr, port) as u64;
            if n <= actual {
                continue;
            }
            if self.overcounted.contains(&id) {
                info!(%backend, counted = n, connections = actual, "live-flow count set down to the backend's connections");
                if let Err(e) = maps.set_live_flows(id, actual) {
                    warn!(error = %ErrorChain(&e), "writing live flows");
                }
            } else {
                over.insert(id);
            }
        }
        self.overcounted = over;
    }
}
