//! Live-flow counts that heal, both ways. The data path counts a TCP flow from the end of its
//! handshake to its first FIN or RST. A flow that ends with neither (a client that vanished)
//! stays counted and would hold a slot of a capped backend for good; a flow whose entry was
//! made mid-flow (after an eviction) is never counted; two CPUs racing on one flow's FIN can
//! count it down twice. For a backend whose listening socket is in this namespace the truth
//! is its established connections whose peer has a conntrack entry naming it (so probes,
//! scrapes and direct clients never count). The data path's counter is never written here
//! (that would lose its concurrent increments): a difference seen at two checks in a row, in
//! the same direction, goes into the backend's correction (`LIVE_FIX`), by the smaller of the
//! two. A count below zero is repaired the same way.

use std::collections::HashMap;

use tracing::{info, warn};

use crate::{
    datapath::ErrorChain,
    maps::{Maps, MapsError},
    plan::Plan,
    sockets::TcpSockets,
};

#[derive(Debug, Default)]
pub struct Reconciler {
    /// Backend id → (truth − count) at the last check, where it was not 0.
    off: HashMap<u32, i64>,
}

impl Reconciler {
    /// One check of the backends `plan` programmed.
    pub fn check(&mut self, plan: &Plan, maps: &mut Maps) {
        // The counts are read before the sockets: a flow that completes its handshake
        // meanwhile shows in the sockets only, and one that ends in the count only; either
        // is a one-check difference, which the next check does not repeat.
        let counted: Result<Vec<_>, MapsError> = plan
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s.key, *b)))
            .map(|(vip, (id, b))| Ok((id, vip, b, maps.live_count(id)?)))
            .collect();
        let counted = match counted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "reading live flows");
                return;
            }
        };
        let sockets = TcpSockets::read();
        let mut off = HashMap::new();
        for (id, vip, backend, count) in counted {
            let (addr, port) = (backend.addr.ip(), backend.addr.port());
            if !sockets.is_listening(addr, port) {
                continue;
            }
            let mut truth = 0i64;
            for peer in sockets.peers(addr, port) {
                match maps.flow(*peer, &vip) {
                    Ok(Some(f)) if f.backend == id && f.generation == backend.generation => {
                        truth += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %ErrorChain(&e), "reading conntrack");
                        return;
                    }
                }
            }
            let error = truth - count.effective();
            if error == 0 {
                continue;
            }
            match step(error, self.off.get(&id).copied()) {
                0 => {
                    off.insert(id, error);
                }
                step => {
                    info!(
                        backend = %backend.addr,
                        counted = count.effective(),
                        connections = truth,
                        "live-flow count corrected"
                    );
                    if let Err(e) = maps.set_live_fix(id, count.fix + step) {
                        warn!(error = %ErrorChain(&e), "writing live-flow correction");
                    }
                }
            }
        }
        self.off = off;
    }
}

/// The correction a check makes, given this check's and the last check's differences
/// (truth − count): the smaller of the two when both point the same way, else none.
fn step(now: i64, before: Option<i64>) -> i64 {
    match before {
        Some(b) if now != 0 && b.signum() == now.signum() => now.signum() * now.abs().min(b.abs()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::step;

    #[test]
    fn corrects_both_ways_by_the_smaller_of_two_checks() {
        assert_eq!(step(-3, Some(-5)), -3, "overcounted twice: down");
        assert_eq!(
            step(4, Some(2)),
            2,
            "undercounted twice (a negative count too): up"
        );
        assert_eq!(
            step(-3, None),
            0,
            "once is not enough: a flow may be closing"
        );
        assert_eq!(step(2, Some(-2)), 0, "directions disagree: racing flows");
        assert_eq!(step(0, Some(3)), 0);
    }
}
