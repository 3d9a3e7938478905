//! A config reload as a diff: which backends go, which come, which stay as they are (with
//! their new weight, cap, checks and load settings) and which get a new process (command,
//! environment, GPUs or placement changed). Pure: the state task carries the plan out.

use super::backend::BackendSpec;
use crate::{config::Config, control::BackendKey};

/// What happens to a backend the new config declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    /// Same backend, same process: its settings take the new values.
    Kept,
    /// Same backend, its instance's process is stopped and a new one started.
    Replaced,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReloadPlan {
    /// Every backend of the new config, in its order.
    pub backends: Vec<(BackendSpec, Change)>,
    /// Backends the new config no longer declares.
    pub removed: Vec<BackendKey>,
}

impl ReloadPlan {
    pub fn count(&self, change: Change) -> usize {
        self.backends.iter().filter(|(_, c)| *c == change).count()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error("{field}: changed; this takes a restart of gpulb, not a reload")]
    NeedsRestart { field: &'static str },
}

/// The settings a running data path cannot change: the interface it is attached to, where
/// its maps live, their sizes, the socket programs' cgroup.
fn fixed_field_changed(old: &Config, new: &Config) -> Option<&'static str> {
    let fixed: [(&str, bool); 9] = [
        ("interface", new.interface != old.interface),
        ("xdp_mode", new.xdp_mode != old.xdp_mode),
        ("tc_attach", new.tc_attach != old.tc_attach),
        ("pin_path", new.pin_path != old.pin_path),
        ("state_dir", new.state_dir != old.state_dir),
        ("conntrack_size", new.map_sizes.v4 != old.map_sizes.v4),
        // Its default follows whether any VIP is IPv6: the first IPv6 VIP takes a restart
        // unless the size is set; after the last one the table just stays as it is until
        // the next restart.
        (
            "conntrack_size_v6",
            new.map_sizes.v6 > old.map_sizes.v6
                || (new.map_sizes.v6 != old.map_sizes.v6
                    && (new.conntrack_v6_set || old.conntrack_v6_set)),
        ),
        // The other IPv6 maps are sized at start too (small without an IPv6 VIP).
        (
            "vip (the first IPv6 VIP; the IPv6 maps are sized at start)",
            new.map_sizes.ipv6 && !old.map_sizes.ipv6,
        ),
        ("socket_lb", new.socket_lb != old.socket_lb),
    ];
    fixed.iter().find(|(_, changed)| *changed).map(|(f, _)| *f)
}

/// The reload from `old` (whose backends are `current`) to `new` (whose backends are
/// `incoming`).
pub fn diff(
    old: &Config,
    new: &Config,
    current: &[&BackendSpec],
    incoming: Vec<BackendSpec>,
) -> Result<ReloadPlan, ReloadError> {
    if let Some(field) = fixed_field_changed(old, new) {
        return Err(ReloadError::NeedsRestart { field });
    }
    let removed = current
        .iter()
        .filter(|c| !incoming.iter().any(|n| n.key == c.key))
        .map(|c| c.key.clone())
        .collect();
    let backends = incoming
        .into_iter()
        .map(|n| {
            let change = match current.iter().find(|c| c.key == n.key) {
                None => Change::Added,
                Some(c) if c.instance == n.instance => Change::Kept,
                Some(_) => Change::Replaced,
            };
            (n, change)
        })
        .collect();
    Ok(ReloadPlan { backends, removed })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        daemon::backend::specs,
        gpu::{self, Inventory},
    };

    const BASE: &str = r#"
interface = "lo"
[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80
[[vip.backend]]
address = "198.18.0.1"
port = 9000
[[model]]
name = "m"
vip = "chat"
gpus = "simulated:2"
address = "198.18.0.1"
base_port = 8001
"#;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("t.toml"), text).expect("valid config")
    }

    fn backends(c: &Config) -> Vec<BackendSpec> {
        specs(
            c,
            gpu::instances(c, &Inventory::with(Vec::new())).expect("instances"),
        )
    }

    fn plan(old: &str, new: &str) -> Result<ReloadPlan, ReloadError> {
        let (old, new) = (config(old), config(new));
        let current = backends(&old);
        diff(
            &old,
            &new,
            &current.iter().collect::<Vec<_>>(),
            backends(&new),
        )
    }

    fn changes(p: &ReloadPlan) -> Vec<(String, Change)> {
        p.backends
            .iter()
            .map(|(s, c)| (s.key.to_string(), *c))
            .collect()
    }

    #[test]
    fn an_unchanged_config_keeps_everything() {
        let p = plan(BASE, BASE).expect("plan");
        assert!(p.removed.is_empty());
        assert_eq!(p.count(Change::Kept), 3);
    }

    #[test]
    fn weights_caps_and_checks_change_in_place() {
        let new = BASE
            .replace(
                "base_port = 8001\n",
                "base_port = 8001\nweight = 3\nmax_flows = 9\n",
            )
            .replace("port = 9000\n", "port = 9000\nweight = 2\n");
        let p = plan(BASE, &new).expect("plan");
        assert_eq!(p.count(Change::Kept), 3, "{:?}", changes(&p));
        let instance = &p.backends[1].0;
        assert_eq!((instance.weight, instance.max_flows), (3, 9));
        assert_eq!(p.backends[0].0.weight, 2);
    }

    #[test]
    fn a_new_command_replaces_the_instances_and_more_gpus_add_one() {
        let new = BASE
            .replace("gpus = \"simulated:2\"", "gpus = \"simulated:3\"")
            .replace(
                "base_port = 8001\n",
                "base_port = 8001\ncommand = [\"gpulb-sim\", \"--listen\", \"{listen}\", \"--slots\", \"8\"]\n",
            );
        let p = plan(BASE, &new).expect("plan");
        assert_eq!(
            changes(&p),
            vec![
                ("chat/198.18.0.1:9000".into(), Change::Kept),
                ("chat/198.18.0.1:8001".into(), Change::Replaced),
                ("chat/198.18.0.1:8002".into(), Change::Replaced),
                ("chat/198.18.0.1:8003".into(), Change::Added),
            ]
        );
    }

    #[test]
    fn a_removed_backend_is_listed() {
        let new = BASE.replace(
            "[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 9000\n",
            "",
        );
        let p = plan(BASE, &new).expect("plan");
        assert_eq!(
            p.removed,
            vec!["chat/198.18.0.1:9000".parse().expect("key")]
        );
        assert_eq!(p.backends.len(), 2);
    }

    #[test]
    fn settings_of_the_running_data_path_need_a_restart() {
        for (from, to, field) in [
            (
                "interface = \"lo\"",
                "interface = \"lo\"\nconntrack_size = 4096",
                "conntrack_size",
            ),
            (
                "interface = \"lo\"",
                "interface = \"lo\"\nxdp_mode = \"generic\"",
                "xdp_mode",
            ),
            (
                "interface = \"lo\"",
                "interface = \"lo\"\nsocket_lb = \"off\"",
                "socket_lb",
            ),
        ] {
            let e = plan(BASE, &BASE.replace(from, to)).expect_err("needs a restart");
            assert_eq!(e, ReloadError::NeedsRestart { field });
        }
    }

    /// The IPv6 maps follow the first IPv6 VIP (a restart, to size them), not the last one's
    /// removal (they stay until the next restart).
    #[test]
    fn the_first_ipv6_vip_needs_a_restart_the_last_ones_removal_does_not() {
        let v6 = format!(
            "{BASE}[[vip]]\nname = \"chat6\"\naddress = \"2001:db8:1::1\"\nport = 80\n\
             [[vip.backend]]\naddress = \"2001:db8::1\"\nport = 9000\n"
        );
        assert_eq!(
            plan(BASE, &v6).expect_err("sizes the IPv6 table"),
            ReloadError::NeedsRestart {
                field: "conntrack_size_v6"
            }
        );
        plan(&v6, BASE).expect("the table stays as it is");
        let set = |t: &str| {
            t.replacen(
                "interface = \"lo\"",
                "interface = \"lo\"\nconntrack_size_v6 = 131072",
                1,
            )
        };
        assert_eq!(
            plan(&set(BASE), &set(&v6)).expect_err("a set size, the other IPv6 maps idle"),
            ReloadError::NeedsRestart {
                field: "vip (the first IPv6 VIP; the IPv6 maps are sized at start)"
            }
        );
        plan(&set(&v6), &set(BASE)).expect("the maps stay as they are");
    }
}
