//! `cargo xtask run`: gpulb in a two-namespace topology, starting and supervising 4
//! simulated GPU instances (`gpus = "simulated:4"`, the same path as real GPUs), a burst of
//! streaming chats from the client namespace, then wait for the user.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use gpulb_testbed::{MODEL, PinDir, Stack, VIP, VIP_PORT, bin, burst, set_bin_dir, vip_url};

const PIN_PATH: &str = "/sys/fs/bpf/gpulb";
const BACKENDS: usize = 4;
/// Requests in the demo's burst, and how many at a time: as many as the 4 instances have
/// batch slots, so the scheduler's spread shows.
const BURST: usize = 32;
const CONCURRENT: usize = 16;

/// Copies the config the demo's daemon runs to target/demo/gpulb.toml, which outlives the
/// demo's scratch directory, and returns its path.
fn save_config(stack: &Stack) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.canonicalize()?.join("gpulb.toml");
    let text = std::fs::read_to_string(&stack.config)
        .with_context(|| format!("reading {}", stack.config.display()))?;
    std::fs::write(
        &path,
        format!(
            "# The config `cargo xtask run` ran. Its interface, pin, state and log paths are the\n\
             # demo's (gone when it stops): edit them, then `gpulb check-config` and `gpulb run`.\n\
             # GPULB_TEST_MARKER only lets the demo find its instances; drop it.\n{text}"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

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
    // The default scheduler; the simulated instances run 4 sequences at a time, as
    // `--max-num-seqs 4` would on vLLM.
    let stack = Stack::managed(
        "demo",
        BACKENDS,
        PinDir::at(PIN_PATH.into()),
        "slots = 4\n[model.health]\ninterval_ms = 500\n",
    )?;
    stack.wait_ready(BACKENDS, Duration::from_secs(60))?;
    let ns = stack.topo.client.name.clone();
    let config = save_config(&stack)?;

    println!("[demo] sending {BURST} streaming chat completions to {VIP}:{VIP_PORT} from {ns}");
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/chat/completions"),
        BURST,
        CONCURRENT,
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
    println!("\nper-backend split ({BURST} requests, {CONCURRENT} at a time, {failed} failed):");
    for (instance, (n, ttft)) in &split {
        let mean = *ttft / *n as u32;
        println!(
            "  {instance}: {n:>3} requests, mean time to first token {:.1} ms",
            mean.as_secs_f64() * 1000.0
        );
    }
    let gpulb = bin("gpulb");
    let socket = stack.socket_arg();
    println!("\n$ gpulb backends");
    print!("{}", stack.ctl(&["backends"])?);

    println!("\ngpulb demo ready: netns={ns} vip={VIP}:{VIP_PORT}");
    println!(
        "the config it runs: {} (copy it, set `interface` to your NIC, and run `gpulb run --config` on it)",
        config.display()
    );
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
