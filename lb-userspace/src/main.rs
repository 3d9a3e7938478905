//! `gpulb`: the daemon (`gpulb run`) and the CLI that reads its pinned maps.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser, Subcommand};
use gpulb::{
    EXIT_USAGE, cli,
    config::{CONTROL_SOCKET, Config, DEFAULT_PIN_PATH, DEFAULT_STATE_DIR},
    datapath::ErrorChain,
    gpu::{self, InstanceSpec, Inventory},
};

#[derive(Parser)]
#[command(
    name = "gpulb",
    version,
    about = "XDP layer-4 load balancer for GPU inference hosts"
)]
struct Args {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "GPULB_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: gpulb::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Read {
    /// Where the daemon pinned its maps (`pin_path` in the config).
    #[arg(long, env = "GPULB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct Socket {
    /// The daemon's control socket (`state_dir`/control.sock).
    #[arg(long, env = "GPULB_SOCKET", default_value_t = default_socket())]
    socket: String,
}

fn default_socket() -> String {
    format!("{DEFAULT_STATE_DIR}/{CONTROL_SOCKET}")
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: start the model instances, load (or take over) the data path and keep
    /// it programmed. SIGTERM stops everything, SIGHUP reloads the config, SIGUSR2 hands over
    /// to the next `gpulb run` leaving the data path and instances running.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config (and find its GPUs) without touching the kernel (exit 64 if invalid).
    CheckConfig {
        file: PathBuf,
        /// Print the effective config: every default filled in (probe header values as
        /// written, `${VAR}`s not expanded).
        #[arg(long)]
        print: bool,
    },
    /// What this kernel has of what gpulb needs (program, map and attach types, helpers,
    /// BTF), and whether gpulb's programs load (with the verifier's instruction counts).
    /// Attaches nothing (exit 1 if gpulb cannot run here).
    CheckKernel {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// VIPs and their traffic.
    Vips(Read),
    /// Backends: model, GPU, pid, state, restarts, probe latency, live flows, weight, share.
    Backends {
        #[command(flatten)]
        read: Read,
        #[command(flatten)]
        socket: Socket,
    },
    /// Stop sending new flows to a backend (instance name, address:port or vip/address:port);
    /// its established flows continue. Shows its live flows until they reach zero.
    Drain {
        backend: String,
        /// Seconds to show the live flows for (0: return at once; default: the daemon's
        /// drain_timeout_ms).
        #[arg(long)]
        wait: Option<u64>,
        #[command(flatten)]
        socket: Socket,
    },
    /// Send new flows to a drained backend again.
    Undrain {
        backend: String,
        #[command(flatten)]
        socket: Socket,
    },
    /// Set a backend's weight (0: no new flows). Kept across daemon restarts and config
    /// reloads until set again; setting the config's weight ends the override.
    Weight {
        backend: String,
        weight: u32,
        #[command(flatten)]
        socket: Socket,
    },
    /// Rolling restart of a model: drain, restart and re-admit its instances one at a time.
    Restart {
        model: String,
        #[command(flatten)]
        socket: Socket,
    },
    /// Reload the daemon's config (as SIGHUP); prints what changed or why it was rejected.
    Reload {
        #[command(flatten)]
        socket: Socket,
    },
    /// Tracked flows (conntrack), most recently active first.
    Flows {
        #[command(flatten)]
        read: Read,
        /// Show at most this many flows (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Each backend's share of its VIP's Maglev table.
    Maglev(Read),
    /// Packets by verdict reason.
    Stats(Read),
    /// A live view, redrawn 4 times a second: VIPs' new flows and refusals, backends'
    /// state, flows, scheduler inputs and new flows (sparkline), and recent events. `q` quits.
    Top {
        #[arg(long, env = "GPULB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        #[command(flatten)]
        socket: Socket,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of gpulb and its subcommands.
    #[command(hide = true)]
    Man,
}

/// gpulb(1), with a section per subcommand.
fn man() -> anyhow::Result<()> {
    use std::io::Write as _;
    let command = Args::command();
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(command.clone()).render(&mut out)?;
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        writeln!(out, ".SH \"GPULB {}\"", sub.get_name().to_uppercase())?;
        let man = clap_mangen::Man::new(sub.clone().bin_name(format!("gpulb {}", sub.get_name())));
        man.render_synopsis_section(&mut out)?;
        man.render_description_section(&mut out)?;
        man.render_options_section(&mut out)?;
    }
    Ok(())
}

/// The config and the instances it asks for (GPUs found), or exit 64.
fn load_config(path: &Path) -> Result<(Config, Vec<InstanceSpec>), ExitCode> {
    let usage = |e: &dyn std::error::Error| {
        eprintln!("gpulb: invalid config: {}", ErrorChain(e));
        ExitCode::from(EXIT_USAGE as u8)
    };
    let config = Config::load(path).map_err(|e| usage(&e))?;
    let specs = Inventory::discover(&config)
        .and_then(|inv| gpu::instances(&config, &inv))
        .map_err(|e| usage(&e))?;
    Ok((config, specs))
}

fn main() -> ExitCode {
    let args = Args::parse();
    gpulb::init_logging(args.log_format);

    let result = match args.command {
        Command::Run { config: path } => {
            let (config, specs) = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| Ok(rt.block_on(gpulb::daemon::run(config, path, specs))?))
        }
        Command::CheckConfig { file, print } => match load_config(&file) {
            Ok((c, _)) if print => {
                print!("{}", c.effective());
                Ok(())
            }
            Ok((c, specs)) => {
                println!(
                    "{}: ok ({} VIPs, {} static backends, {} models with {} instances)",
                    file.display(),
                    c.vips.len(),
                    c.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
                    c.models.len(),
                    specs.len(),
                );
                Ok(())
            }
            Err(code) => return code,
        },
        Command::CheckKernel { json } => match cli::kernel::run(json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Vips(r) => cli::vips::run(&r.pin_path, r.json),
        Command::Backends { read, socket } => {
            cli::backends::run(&read.pin_path, socket.socket.as_ref(), read.json)
        }
        Command::Drain {
            backend,
            wait,
            socket,
        } => cli::control::drain(socket.socket.as_ref(), &backend, wait),
        Command::Undrain { backend, socket } => cli::control::simple(
            socket.socket.as_ref(),
            gpulb::control::Request::Undrain { backend },
        ),
        Command::Weight {
            backend,
            weight,
            socket,
        } => cli::control::simple(
            socket.socket.as_ref(),
            gpulb::control::Request::Weight { backend, weight },
        ),
        Command::Restart { model, socket } => cli::control::restart(socket.socket.as_ref(), model),
        Command::Reload { socket } => {
            cli::control::simple(socket.socket.as_ref(), gpulb::control::Request::Reload)
        }
        Command::Flows { read, limit } => cli::flows::run(&read.pin_path, limit, read.json),
        Command::Maglev(r) => cli::maglev::run(&r.pin_path, r.json),
        Command::Stats(r) => cli::stats::run(&r.pin_path, r.json),
        Command::Top { pin_path, socket } => cli::top::run(&pin_path, socket.socket.as_ref()),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "gpulb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
