//! `gpulb-sim`: the simulated GPU instance (see `gpulb::sim`), for the demo and the tests
//! where no GPU exists. Supervised exactly as vLLM would be.
#![forbid(unsafe_code)]

use clap::Parser;
use gpulb::sim::{SimConfig, serve};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "gpulb-sim",
    version,
    about = "Simulated OpenAI-compatible GPU inference instance"
)]
struct Args {
    #[command(flatten)]
    sim: SimConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = gpulb::daemon::shutdown_signal()?;
    serve(args.sim, async move {
        shutdown.await;
    })
    .await?;
    Ok(())
}
