//! `cargo xtask run`: gpulb in a two-namespace topology, starting and supervising 4
//! simulated GPU instances (`gpus = "simulated:4"`, the same path as real GPUs), a burst of
//! streaming chats from the client namespace, then wait for the user.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use gpulb_testbed::{MODEL, PinDir, Stack, VIP, VIP_PORT, bin, burst, set_bin_dir, vip_url};

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

    println!(
        "[demo] starting gpulb in network namespaces; it starts {BACKENDS} simulated GPU instances"
    );
    let stack = Stack::managed(
        "demo",
        BACKENDS,
        PinDir::at(PIN_PATH.into()),
        "[model.health]\ninterval_ms = 500\n",
    )?;
    stack.wait_ready(BACKENDS, Duration::from_secs(60))?;
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
    let gpulb = bin("gpulb");
    let socket = stack.socket_arg();
    println!("\n$ gpulb backends");
    print!("{}", stack.ctl(&["backends"])?);

    println!("\ngpulb demo ready: netns={ns} vip={VIP}:{VIP_PORT}");
    println!(
        "\nTry it:\n  ip netns exec {ns} curl -N http://{VIP}/v1/chat/completions \\\n    \
         -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"sim-llm\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":true}}'\n\n\
         Inspect it (another terminal):\n  export GPULB_SOCKET={socket}\n  {g} backends\n  {g} flows\n  \
         {g} maglev\n  {g} stats\n  {g} vips\n\n\
         Operate it:\n  {g} drain {MODEL}-0\n  {g} undrain {MODEL}-0\n  {g} weight {MODEL}-1 3\n  \
         {g} restart {MODEL}\n  kill -9 <pid of {MODEL}-2>   # ejected at once, restarted\n",
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
    println!(
        "[demo] stopping: gpulb drains, stops its instances, detaches and unpins; namespaces go"
    );
    drop(stack);
    println!("[demo] done");
    Ok(())
}
