//! What a daemon leaves for the next one: `state_dir/state.json` (instance pids, drains,
//! operator weights), and what it finds in the pinned maps at takeover.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::backend::Backend;
use crate::{
    config::Config, control::BackendKey, datapath::Datapath, maglev, maps::MapsError, plan,
    supervisor::InstanceRecord,
};

/// `state_dir/state.json`: what a restarted daemon needs to carry on.
const STATE_FILE: &str = "state.json";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub instances: Vec<InstanceRecord>,
    /// Operator weights (`gpulb weight`).
    pub weights: BTreeMap<BackendKey, u32>,
    /// Drained backends (`gpulb drain`).
    pub drained: Vec<BackendKey>,
}

impl Persisted {
    pub fn read(state_dir: &Path) -> Self {
        let path = state_dir.join(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
                Self::default()
            }),
            Err(_) => Self::default(),
        }
    }

    /// What `backends` say now.
    pub fn of<'a>(backends: impl Iterator<Item = &'a Backend> + Clone) -> Self {
        Self {
            instances: backends
                .clone()
                .filter_map(|b| {
                    let (spec, process) = (b.spec.instance.as_ref()?, b.process.as_ref()?);
                    Some(InstanceRecord {
                        name: spec.name.clone(),
                        pid: process.pid?,
                        start_time: process.start_time,
                        port: spec.port,
                        restarts: process.restarts,
                    })
                })
                .collect(),
            weights: backends
                .clone()
                .filter_map(|b| Some((b.key().clone(), b.weight_override?)))
                .collect(),
            drained: backends
                .filter(|b| b.draining)
                .map(|b| b.key().clone())
                .collect(),
        }
    }

    /// Writes the file atomically (a reader never sees half of it); a SIGKILLed daemon
    /// leaves it current.
    pub fn write(&self, state_dir: &Path) {
        let result = std::fs::create_dir_all(state_dir).and_then(|()| {
            let tmp = state_dir.join("state.json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(tmp, state_dir.join(STATE_FILE))
        });
        if let Err(e) = result {
            warn!(dir = %state_dir.display(), error = %e, "writing the state file");
        }
    }

    pub fn remove(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
    }
}

/// What takeover found in the maps: backends holding slots, and the drain flags.
#[derive(Debug, Default)]
pub struct Inherited {
    pub in_table: Vec<BackendKey>,
    pub draining: Vec<BackendKey>,
}

impl Inherited {
    pub fn read(config: &Config, datapath: &Datapath) -> Result<Self, MapsError> {
        let maps = &datapath.maps;
        let mut out = Self::default();
        let backends = maps.backends()?;
        for (key, service) in maps.services()? {
            let Some(vip) = config.vips.iter().find(|v| plan::vip_key(v) == key) else {
                continue;
            };
            let held = maglev::slot_counts(&maps.maglev_table(&service)?);
            for (id, b) in backends
                .iter()
                .filter(|(_, b)| u32::from(b.service) == service.id)
            {
                let key = BackendKey {
                    vip: vip.name.clone(),
                    addr: b.addr,
                };
                if held.get(id).copied().unwrap_or(0) > 0 {
                    out.in_table.push(key.clone());
                }
                if b.is_draining() {
                    out.draining.push(key);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_keeps_its_format() {
        // As an earlier gpulb wrote it: backend keys as `vip/address:port` strings.
        let text = r#"{
          "instances": [{"name": "sim-llm-0", "pid": 42, "start_time": 7, "port": 8001, "restarts": 1}],
          "weights": {"chat/198.18.0.1:8002": 3},
          "drained": ["chat/[::1]:8003"]
        }"#;
        let p: Persisted = serde_json::from_str(text).expect("reads");
        let key = |s: &str| s.parse::<BackendKey>().expect("key");
        assert_eq!(p.weights.get(&key("chat/198.18.0.1:8002")), Some(&3));
        assert_eq!(p.drained, vec![key("chat/[::1]:8003")]);
        let again: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&p).expect("writes")).expect("JSON");
        assert_eq!(again["weights"]["chat/198.18.0.1:8002"], 3);
        assert_eq!(again["drained"][0], "chat/[::1]:8003");
    }
}
