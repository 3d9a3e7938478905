//! The maps carry BTF for their keys and values, so `bpftool map dump` shows fields by name;
//! a pin made without BTF (by a gpulb before this change) is taken over and keeps working.
//! Needs root (namespaces, BPF) and bpftool.

use std::{fs, process::Command};

use gpulb_testbed::{PinDir, Stack, burst, vip_url};
use lb_common::maps::{self as spec, MapSpec};
use serde_json::Value;

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .args(["--json"])
        .args(args)
        .output()
        .expect("bpftool runs (a Debian package of the test set)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}

fn dump(pins: &PinDir, map: MapSpec) -> Vec<Value> {
    let path = pins.path.join(map.name);
    let path = path.to_str().expect("UTF-8 path");
    bpftool(&["map", "dump", "pinned", path])
        .as_array()
        .expect("a dump is an array")
        .clone()
}

/// The map's BTF id as the kernel reports it (0: none).
fn btf_id(pins: &PinDir, map: MapSpec) -> u64 {
    let path = pins.path.join(map.name);
    let info = bpftool(&["map", "show", "pinned", path.to_str().expect("UTF-8 path")]);
    info["btf_id"].as_u64().unwrap_or(0)
}

#[test]
fn bpftool_shows_map_fields_and_a_pin_without_btf_is_taken_over() {
    let pins = PinDir::new("btf");
    // VIP_OF as a gpulb without BTF made it: same type, sizes, entries and flags.
    fs::create_dir_all(&pins.path).expect("pin dir");
    let old = pins.path.join(spec::VIP_OF.name);
    let entries = spec::VIP_OF.default_entries().to_string();
    let status = Command::new("bpftool")
        .args(["map", "create", old.to_str().expect("UTF-8 path")])
        .args(["type", "hash", "key"])
        .arg(spec::VIP_OF.key_size.to_string())
        .arg("value")
        .arg(spec::VIP_OF.value_size.to_string())
        .args(["entries", &entries, "name", spec::VIP_OF.name, "flags"])
        .arg(spec::VIP_OF.flags.to_string())
        .status()
        .expect("bpftool map create");
    assert!(status.success(), "bpftool map create {}", old.display());
    assert_eq!(btf_id(&pins, spec::VIP_OF), 0, "the old pin has no BTF");

    let stack = Stack::start("btf", 2, pins, &[]).expect("start stack");
    // Replies come back through VIP_OF (the untyped pin), so every request completing shows
    // the pin was taken over and programmed.
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/completions"),
        8,
        4,
        false,
        4,
    )
    .expect("burst");
    for (i, r) in replies.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("request {i} through the VIP failed: {e:#}"));
    }

    // Every map this daemon made has BTF; the taken-over one keeps none.
    for map in spec::ALL {
        let id = btf_id(&stack.pins, map);
        if map.name == spec::VIP_OF.name {
            assert_eq!(id, 0, "{} was taken over as it was", map.name);
        } else {
            assert_ne!(id, 0, "{} has no BTF", map.name);
        }
    }

    // Fields by name: a backend, a service, a conntrack entry of the requests above, a
    // per-CPU counter.
    let backends = dump(&stack.pins, spec::BACKENDS);
    let backend = backends
        .iter()
        .find(|e| e["formatted"]["value"]["port_be"].as_u64().unwrap_or(0) != 0)
        .unwrap_or_else(|| panic!("no programmed backend by field in {backends:#?}"));
    assert!(
        backend["formatted"]["value"]["addr_be"].is_u64(),
        "{backend}"
    );
    let services = dump(&stack.pins, spec::SERVICES);
    assert_eq!(services.len(), 1, "{services:#?}");
    let service = &services[0]["formatted"];
    assert!(service["key"]["port_be"].is_u64(), "{service}");
    assert!(service["value"]["id"].is_u64(), "{service}");
    let flows = dump(&stack.pins, spec::CONNS);
    assert!(!flows.is_empty(), "the requests left conntrack entries");
    for flow in &flows {
        let f = &flow["formatted"];
        assert!(
            f["key"]["src_be"].is_u64() && f["value"]["backend"].is_u64(),
            "conntrack entry by field: {flow}"
        );
    }
    let stats = dump(&stack.pins, spec::BACKEND_STATS);
    let counted: u64 = stats
        .iter()
        .flat_map(|e| {
            e["formatted"]["values"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|cpu| cpu["value"]["new_flows"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        counted, 8,
        "new flows summed by field over CPUs: {stats:#?}"
    );

    // The untyped pin still dumps, as bytes.
    let owners = dump(&stack.pins, spec::VIP_OF);
    assert_eq!(owners.len(), 2, "{owners:#?}");
    assert!(
        owners
            .iter()
            .all(|e| e.get("formatted").is_none() && e["key"].is_array())
    );
}
