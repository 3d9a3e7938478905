//! The Debian package (`cargo xtask dist`; `cargo xtask test` builds one of the debug
//! binaries and names it in `GPULB_TEST_DEB`): it installs with `dpkg -i`, its binary,
//! example config and systemd unit work, and `dpkg --purge` removes it all. Needs root.

use std::{path::Path, process::Command};

use gpulb_testbed::{NetNs, bin, unique};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{text}",
        out.status
    );
    text
}

/// Purges the package on drop, so a failed assertion leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "gpulb"]).status();
    }
}

#[test]
fn the_package_installs_runs_and_purges_cleanly() {
    let deb = std::env::var("GPULB_TEST_DEB")
        .expect("GPULB_TEST_DEB: run through `cargo xtask test`, which builds the package");
    let status = Command::new("dpkg")
        .args(["-s", "gpulb"])
        .output()
        .expect("dpkg -s");
    assert!(
        !status.status.success(),
        "a gpulb package is already installed on this machine; not touching it"
    );
    let contents = run("dpkg-deb", &["--contents", &deb]);
    for path in [
        "./usr/bin/gpulb",
        "./usr/bin/gpulb-sim",
        "./lib/systemd/system/gpulb.service",
        "./etc/gpulb/gpulb.toml",
        "./usr/share/man/man1/gpulb.1",
        "./usr/share/bash-completion/completions/gpulb",
        "./usr/share/zsh/vendor-completions/_gpulb",
        "./usr/share/doc/gpulb/alerts.yml",
    ] {
        assert!(
            contents.contains(path),
            "{path} in the package:\n{contents}"
        );
    }

    let _installed = Installed;
    run("dpkg", &["-i", &deb]);
    let version = run("/usr/bin/gpulb", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("gpulb {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        run("/usr/bin/gpulb", &["--version"]),
        run(bin("gpulb").to_str().expect("UTF-8"), &["--version"])
    );
    // The example config names `eth0`: checked where an eth0 exists, a namespace of the
    // test's own.
    let ns = NetNs::new(&unique("pkg")).expect("netns");
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0-peer",
    ])
    .expect("an eth0 in the namespace");
    let checked = run(
        "nsenter",
        &[
            &format!("--net={}", ns.path().display()),
            "/usr/bin/gpulb",
            "check-config",
            "/etc/gpulb/gpulb.toml",
        ],
    );
    assert!(checked.contains("/etc/gpulb/gpulb.toml: ok"), "{checked}");
    let verify = run(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/gpulb.service"],
    );
    assert!(
        !verify.contains("gpulb.service:"),
        "systemd-analyze has remarks on the unit:\n{verify}"
    );
    let man = run("man", &["-l", "-P", "cat", "/usr/share/man/man1/gpulb.1"]);
    assert!(man.contains("check-config"), "{man}");

    run("dpkg", &["--purge", "gpulb"]);
    for gone in [
        "/usr/bin/gpulb",
        "/usr/bin/gpulb-sim",
        "/lib/systemd/system/gpulb.service",
        "/etc/gpulb/gpulb.toml",
        "/usr/share/man/man1/gpulb.1",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
}
