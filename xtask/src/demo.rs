//! `cargo xtask run`: 4 simulated GPU instances behind gpulb in a two-namespace topology, a
//! burst of streaming chats from the client namespace, then wait for the user.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use gpulb_testbed::{PinDir, Stack, VIP, VIP_PORT, bin, burst, gpulb_cli, set_bin_dir, vip_url};

const PIN_PATH: &str = "/sys/fs/bpf/gpulb";
const BACKENDS: usize = 4;
const BURST: usize = 24;

pub fn run(duration: Option<u64>) -> anyhow::Result<()> {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    set_bin_dir(
        target
            .canonicalize()
            .context("target/release (build first)")?,
    );
    if PathBuf::from(PIN_PATH).exists() {
        bail!(
            "{PIN_PATH} exists: another gpulb is running (stop it first, or remove the directory if none is)"
        );
    }

    println!("[demo] starting {BACKENDS} simulated GPU instances and gpulb in network namespaces");
    let stack = Stack::start("demo", BACKENDS, PinDir::at(PIN_PATH.into()), &[])?;
    let ns = stack.topo.client.name.clone();

    println!("[demo] sending {BURST} streaming chat completions to {VIP}:{VIP_PORT} from {ns}");
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/chat/completions"),
        BURST,
        6,
        true,
        16,
    )?;
    let mut split: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    let mut failed = 0;
    for r in replies {
        match r {
            Ok(r) if r.done => {
                let e = split.entry(r.instance).or_default();
                e.0 += 1;
                e.1 += r.time_to_first_token;
            }
            Ok(r) => {
                failed += 1;
                eprintln!("[demo] stream from {} ended without [DONE]", r.instance);
            }
            Err(e) => {
                failed += 1;
                eprintln!("[demo] request failed: {e:#}");
            }
        }
    }
    println!("\nper-backend split ({BURST} requests, {failed} failed):");
    for (instance, (n, ttft)) in &split {
        println!(
            "  {instance}: {n:>3} requests, mean time to first token {:?}",
            *ttft / *n as u32
        );
    }
    println!("\n$ gpulb backends");
    print!("{}", gpulb_cli(&["backends"])?);

    let gpulb = bin("gpulb");
    println!("\ngpulb demo ready: netns={ns} vip={VIP}:{VIP_PORT}");
    println!(
        "\nTry it:\n  ip netns exec {ns} curl -N http://{VIP}/v1/chat/completions \\\n    \
         -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"sim-llm\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":true}}'\n\n\
         Inspect it (another terminal):\n  {g} backends\n  {g} flows\n  {g} maglev\n  {g} stats\n  {g} vips\n",
        g = gpulb.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match duration {
            Some(secs) => {
                println!("[demo] running for {secs} s (Ctrl-C stops earlier)");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                }
            }
            None => {
                println!("[demo] running until Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    });
    println!("[demo] stopping: gpulb detaches and unpins, instances stop, namespaces go");
    drop(stack);
    println!("[demo] done");
    Ok(())
}
