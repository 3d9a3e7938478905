//! `gpulb-sim`: the simulated GPU instance (see `gpulb::sim`), for the demo and the tests
//! where no GPU exists. Supervised exactly as vLLM would be.
#![forbid(unsafe_code)]

use clap::Parser;
use gpulb::sim::{SimConfig, serve};

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
    gpulb::init_logging(gpulb::LogFormat::Text);
    let shutdown = gpulb::daemon::shutdown_signal()?;
    serve(args.sim, async move {
        let signal = shutdown.await;
        tracing::info!(signal, "shutting down: finishing the requests in flight");
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}
