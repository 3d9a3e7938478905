//! `gpulb top` in a real terminal: tmux runs it, `capture-pane` reads the screen, and
//! `send-keys` quits it. A killed instance shows as ejected, on its row and as an event.
//! Needs root (the daemon).

use std::{process::Command, time::Duration};

use gpulb_testbed::{MODEL, PinDir, Stack, bin, unique, wait_until};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A tmux server of the test's own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux (cargo xtask test installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_shows_a_killed_instance_as_ejected_and_quits_on_q() {
    let stack = Stack::managed(
        "top",
        2,
        PinDir::new("top"),
        "restart_delay_ms = 4000\n[model.health]\ninterval_ms = 100\n",
    )
    .expect("stack");
    stack.wait_ready(2, Duration::from_secs(30)).expect("ready");
    let tmux = Tmux {
        socket: unique("top"),
    };
    let top = format!(
        "{} top --pin-path {} --socket {}",
        bin("gpulb").display(),
        stack.pin_arg(),
        stack.socket_arg()
    );
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "200",
        "-y",
        "45",
        &top,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let victim = format!("{MODEL}-1");
    let mut screen = String::new();
    let shown = wait_until(Duration::from_secs(10), || {
        screen = tmux.screen();
        screen.contains("VIPs")
            && screen.contains(&format!("{MODEL}-0"))
            && screen
                .lines()
                .any(|l| l.contains(&victim) && l.contains("ready"))
    });
    assert!(shown, "top shows both ready instances:\n{screen}");

    let rows = stack.backends().expect("backends");
    let pid = rows
        .iter()
        .find(|r| r["daemon"]["instance"] == victim.as_str())
        .and_then(|r| r["daemon"]["pid"].as_u64())
        .expect("victim pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the instance");
    let ejected = wait_until(Duration::from_secs(3), || {
        screen = tmux.screen();
        let row = screen
            .lines()
            .any(|l| l.contains(&victim) && l.contains("ejected") && !l.contains(": ejected"));
        let event = screen
            .lines()
            .any(|l| l.contains(&format!("{victim}: ejected")));
        row && event
    });
    assert!(ejected, "the killed instance shows as ejected:\n{screen}");

    tmux.cmd(&["send-keys", "-t", "top", "q"]);
    let quit = wait_until(Duration::from_secs(5), || {
        !tmux.cmd(&["has-session", "-t", "top"]).status.success()
    });
    assert!(quit, "q quits:\n{}", tmux.screen());
}
