//! Helpers the control-plane tests share (`mod common;`): config lines for managed stacks.

/// A `command = [...]` line for the simulator with extra flags (for `Stack::managed`'s
/// `model_extra`).
pub fn sim_command(flags: &[&str]) -> String {
    let mut args = gpulb::config::SIM_COMMAND.to_vec();
    args.extend_from_slice(flags);
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("command = [{}]\n", quoted.join(", "))
}

/// `[model.health]` probing every 100 ms, for `model_extra`.
pub const FAST_PROBES: &str = "[model.health]\ninterval_ms = 100\n";
