//! `gpulb check-config --print`: the effective config, every default filled in, in the
//! file's own shape (a file that parses to the same `Config`). Probe header values are
//! printed as written (`${VAR}`), never expanded: they are usually keys.

use std::time::Duration;

use toml::{Table, Value};

use super::{
    Affinity, BackendConfig, CheckKind, Config, GpuRef, GpuSelection, HealthCheck, Model,
    PrefixAffinity, SocketLb, Vip,
};

/// The effective config as TOML.
pub fn effective(config: &Config) -> String {
    let mut t = Table::new();
    t.insert("interface".into(), config.interface.clone().into());
    t.insert("xdp_mode".into(), word(config.xdp_mode));
    t.insert("tc_attach".into(), word(config.tc_attach));
    t.insert("pin_path".into(), path(&config.pin_path));
    t.insert("state_dir".into(), path(&config.state_dir));
    t.insert("log_dir".into(), path(&config.log_dir));
    t.insert("conntrack_size".into(), int(config.map_sizes.v4));
    t.insert("conntrack_size_v6".into(), int(config.map_sizes.v6));
    t.insert(
        "conntrack_inserts_per_cpu".into(),
        Value::Integer(config.conntrack_inserts_per_cpu as i64),
    );
    t.insert("drain_timeout_ms".into(), ms(config.drain_timeout));
    t.insert("kill_timeout_ms".into(), ms(config.kill_timeout));
    t.insert(
        "metrics_listen".into(),
        config
            .metrics_listen
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
            .into(),
    );
    t.insert(
        "socket_lb".into(),
        match &config.socket_lb {
            SocketLb::Off => "off".to_owned(),
            SocketLb::Auto => "auto".to_owned(),
            SocketLb::Cgroup(p) => p.display().to_string(),
        }
        .into(),
    );
    t.insert(
        "vip".into(),
        Value::Array(config.vips.iter().map(vip).collect()),
    );
    t.insert(
        "model".into(),
        Value::Array(config.models.iter().map(model).collect()),
    );
    toml::to_string_pretty(&t).expect("a TOML table always serializes")
}

fn vip(v: &Vip) -> Value {
    let mut t = Table::new();
    t.insert("name".into(), v.name.clone().into());
    t.insert("address".into(), v.address.to_string().into());
    t.insert("port".into(), int(v.port));
    t.insert("protocol".into(), word(v.protocol));
    t.insert("maglev_table_size".into(), int(v.maglev_table_size));
    t.insert(
        "affinity".into(),
        match v.affinity {
            Affinity::None => "none",
            Affinity::Client => "client",
        }
        .into(),
    );
    let mut sched = Table::new();
    sched.insert("choices".into(), int(v.scheduler.choices));
    sched.insert("signal_interval_ms".into(), ms(v.scheduler.signal_interval));
    sched.insert("signal_max_age_ms".into(), ms(v.scheduler.signal_max_age));
    sched.insert(
        "prefix_affinity".into(),
        match v.scheduler.prefix_affinity {
            PrefixAffinity::Auto => "auto",
            PrefixAffinity::On => "on",
            PrefixAffinity::Off => "off",
        }
        .into(),
    );
    t.insert("scheduler".into(), Value::Table(sched));
    let mut admission = Table::new();
    if let Some(rate) = v.admission.rate {
        admission.insert("rate".into(), int(rate.per_second));
        admission.insert("burst".into(), int(rate.burst));
        if v.address.is_ipv6() {
            admission.insert("ipv6_prefix".into(), int(rate.ipv6_prefix));
        }
    }
    admission.insert(
        "refuse".into(),
        if v.admission.refuse_rst {
            "rst"
        } else {
            "drop"
        }
        .into(),
    );
    if !v.admission.allow.is_empty() {
        admission.insert(
            "allow".into(),
            Value::Array(
                v.admission
                    .allow
                    .iter()
                    .map(|c| format!("{}/{}", c.addr, c.len).into())
                    .collect(),
            ),
        );
    }
    t.insert("admission".into(), Value::Table(admission));
    t.insert("health".into(), health(&v.health));
    t.insert(
        "backend".into(),
        Value::Array(v.backends.iter().map(backend).collect()),
    );
    Value::Table(t)
}

fn backend(b: &BackendConfig) -> Value {
    let mut t = Table::new();
    t.insert("address".into(), b.address.to_string().into());
    t.insert("port".into(), int(b.port));
    t.insert("weight".into(), int(b.weight));
    t.insert("max_flows".into(), int(b.max_flows));
    t.insert("slots".into(), int(b.slots));
    t.insert("load".into(), word(b.load));
    Value::Table(t)
}

fn model(m: &Model) -> Value {
    let mut t = Table::new();
    t.insert("name".into(), m.name.clone().into());
    t.insert("vip".into(), m.vip.clone().into());
    t.insert(
        "command".into(),
        Value::Array(m.command.iter().map(|a| a.clone().into()).collect()),
    );
    t.insert("served_model".into(), m.served_model.clone().into());
    t.insert(
        "gpus".into(),
        match &m.gpus {
            GpuSelection::All => "all".into(),
            GpuSelection::Simulated(n) => format!("simulated:{n}").into(),
            GpuSelection::List(list) => Value::Array(
                list.iter()
                    .map(|g| match g {
                        GpuRef::Index(i) => int(*i),
                        GpuRef::Uuid(u) => u.clone().into(),
                    })
                    .collect(),
            ),
        },
    );
    t.insert("gpus_per_instance".into(), int(m.gpus_per_instance));
    t.insert("address".into(), m.address.to_string().into());
    t.insert("base_port".into(), int(m.base_port));
    t.insert("weight".into(), int(m.weight));
    t.insert("max_flows".into(), int(m.max_flows));
    t.insert("slots".into(), int(m.slots));
    t.insert("load".into(), word(m.load));
    t.insert("restart_delay_ms".into(), ms(m.restart_delay));
    t.insert("restart_delay_max_ms".into(), ms(m.restart_delay_max));
    t.insert("stable_after_ms".into(), ms(m.stable_after));
    t.insert(
        "env".into(),
        Value::Table(
            m.env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        ),
    );
    t.insert("health".into(), health(&m.health));
    Value::Table(t)
}

fn health(h: &HealthCheck) -> Value {
    let mut t = Table::new();
    t.insert(
        "check".into(),
        match h.kind {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::None => "none",
        }
        .into(),
    );
    t.insert("path".into(), h.path.clone().into());
    if let Some(model) = &h.model {
        t.insert("model".into(), model.clone().into());
    }
    t.insert("interval_ms".into(), ms(h.interval));
    t.insert("timeout_ms".into(), ms(h.timeout));
    t.insert("rise".into(), int(h.rise));
    t.insert("fall".into(), int(h.fall));
    if let Some(limit) = h.start_timeout {
        t.insert("start_timeout_ms".into(), ms(limit));
    }
    t.insert(
        "headers".into(),
        Value::Table(
            h.headers
                .iter()
                .map(|x| (x.name.clone(), x.template.clone().into()))
                .collect(),
        ),
    );
    Value::Table(t)
}

/// A unit enum as its config word (`serde(rename_all = "lowercase")`).
fn word<T: serde::Serialize>(v: T) -> Value {
    Value::try_from(v).expect("a unit enum serializes as a string")
}

fn int(n: impl Into<i64>) -> Value {
    Value::Integer(n.into())
}

fn ms(d: Duration) -> Value {
    Value::Integer(d.as_millis() as i64)
}

fn path(p: &std::path::Path) -> Value {
    p.display().to_string().into()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_printed_config_parses_back_to_the_same_config() {
        let text = r#"
interface = "lo"
conntrack_size = 4096
[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80
[vip.admission]
rate = 50
allow = ["198.18.0.0/15"]
[[vip.backend]]
address = "198.18.0.1"
port = 9000
max_flows = 8
[[model]]
name = "sim"
vip = "chat"
gpus = "simulated:2"
address = "198.18.0.2"
base_port = 9100
env = { A = "b" }
[model.health]
start_timeout_ms = 60000
headers = { X-Probe = "yes" }
"#;
        let config = Config::parse(Path::new("t.toml"), text).expect("valid");
        let printed = effective(&config);
        assert!(printed.contains("drain_timeout_ms = 30000"), "{printed}");
        let again = Config::parse(Path::new("printed.toml"), &printed)
            .unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(again.vips, config.vips);
        assert_eq!(again.models, config.models);
        assert_eq!(again.map_sizes, config.map_sizes);
        assert_eq!(again.drain_timeout, config.drain_timeout);
    }
}
