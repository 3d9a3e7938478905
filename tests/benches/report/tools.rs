//! The comparators and tools of the report: nginx as the reference deployment, wrk, and
//! small readers of command output and map memory.

use std::{fs, path::Path, process::Command, time::Duration};

use gpulb_testbed::{LB_ADDR, NetNs, Proc};

use super::NGINX_PORT;

pub fn sh_out(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub fn sh_err(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default()
}

pub fn memlock(map: &aya::maps::MapData) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// nginx in the lb namespace, as in the reference deployment: an upstream of the instances
/// with keepalive, `proxy_buffering off`, a long read timeout, passive health checks.
pub fn nginx(ns: &NetNs, dir: &Path, backends: &[u16]) -> Proc {
    let servers: Vec<(u16, u32)> = backends.iter().map(|p| (*p, 1)).collect();
    nginx_with(ns, dir, "nginx", NGINX_PORT, &servers, false)
}

/// The same on `port`, with weights, round-robin or `least_conn`; `name` keeps its files
/// apart from another nginx's.
pub fn nginx_with(
    ns: &NetNs,
    dir: &Path,
    name: &str,
    port: u16,
    servers: &[(u16, u32)],
    least_conn: bool,
) -> Proc {
    let servers: String = servers
        .iter()
        .map(|(p, w)| {
            format!("    server {LB_ADDR}:{p} weight={w} max_fails=2 fail_timeout=10s;\n")
        })
        .collect();
    let balance = if least_conn { "    least_conn;\n" } else { "" };
    let d = dir.display();
    let conf = format!(
        "worker_processes 2;\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/{name}-body;\n\
           proxy_temp_path {d}/{name}-proxy;\n  upstream llm {{\n{balance}{servers}    keepalive 64;\n  }}\n\
           server {{\n    listen {LB_ADDR}:{port};\n    location / {{\n\
               proxy_pass http://llm;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
               proxy_read_timeout 3600s;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join(format!("{name}.conf"));
    fs::write(&path, conf).expect("nginx.conf");
    let conf_arg = path.display().to_string();
    let p = Proc::spawn(
        name,
        ns,
        Path::new("/usr/sbin/nginx"),
        &["-c", &conf_arg, "-g", "daemon off;"],
        dir,
    )
    .expect("start nginx");
    wait_listening(ns, port, &p);
    p
}

/// Debian's HAProxy in the lb namespace, HTTP mode, `balance leastconn` over the instances
/// (with weights), kept-alive server connections, no timeout a generation would hit.
pub fn haproxy(ns: &NetNs, dir: &Path, port: u16, servers: &[(u16, u32)]) -> Proc {
    haproxy_in(ns, dir, port, servers, "http")
}

/// HAProxy as the user-space L4 balancer (`mode tcp`, `leastconn`): what people put in front
/// of instances when they want no HTTP handling.
pub fn haproxy_tcp(ns: &NetNs, dir: &Path, port: u16, servers: &[(u16, u32)]) -> Proc {
    haproxy_in(ns, dir, port, servers, "tcp")
}

fn haproxy_in(ns: &NetNs, dir: &Path, port: u16, servers: &[(u16, u32)], mode: &str) -> Proc {
    let servers: String = servers
        .iter()
        .enumerate()
        .map(|(i, (p, w))| format!("  server s{i} {LB_ADDR}:{p} weight {w}\n"))
        .collect();
    let conf = format!(
        "global\n  maxconn 4096\n\
         defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
         frontend llm\n  bind {LB_ADDR}:{port}\n  default_backend instances\n\
         backend instances\n  balance leastconn\n{reuse}{servers}",
        reuse = if mode == "http" {
            "  http-reuse safe\n"
        } else {
            ""
        },
    );
    let path = dir.join(format!("haproxy-{mode}-{port}.cfg"));
    fs::write(&path, conf).expect("haproxy.cfg");
    let conf_arg = path.display().to_string();
    let p = Proc::spawn(
        &format!("haproxy-{mode}"),
        ns,
        Path::new("/usr/sbin/haproxy"),
        &["-f", &conf_arg, "-db"],
        dir,
    )
    .expect("start haproxy");
    wait_listening(ns, port, &p);
    p
}

/// Probed from inside the namespace: 198.18.0.0/15 exists only there.
fn wait_listening(ns: &NetNs, port: u16, p: &Proc) {
    let up = gpulb_testbed::wait_until(Duration::from_secs(10), || {
        ns.run(move || std::net::TcpStream::connect((LB_ADDR, port)).is_ok())
            .unwrap_or(false)
    });
    assert!(up, "{} did not start: {}", p.name, p.log_text());
}

/// `haproxy -v`'s first line.
pub fn haproxy_version() -> String {
    sh_out("haproxy", &["-v"])
        .lines()
        .next()
        .unwrap_or("haproxy")
        .trim()
        .to_owned()
}

#[derive(Debug, Clone, Copy)]
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// How many clients `wrk_clients` runs, each with one keep-alive connection.
pub const WRK_CLIENTS: usize = 32;

/// `WRK_CLIENTS` wrk processes at once, one connection each, client `k` on `urls[k % n]`:
/// with the instances' URLs, client-side round-robin. One connection per event loop, so no
/// loop is paired with one instance on one path and spread over four on another. Such a
/// loop likely batches its wakeups with its one instance: with 4 wrk of 8 connections, each
/// on one instance, *direct* ran 6-17% ahead of gpulb in alternating runs, while gpulb's
/// programs, helpers and map lookups took about 2% of the CPU samples (1% on the direct
/// path). Requests/s and errors summed; p50 the median of the clients', p99 the worst.
pub fn wrk_clients(ns: &NetNs, urls: &[String], secs: u64) -> Wrk {
    let children: Vec<_> = (0..WRK_CLIENTS)
        .map(|k| {
            wrk_command(ns, &urls[k % urls.len()], secs)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run wrk")
        })
        .collect();
    let runs: Vec<Wrk> = children
        .into_iter()
        .map(|c| wrk_parse(&c.wait_with_output().expect("wrk").stdout))
        .collect();
    Wrk {
        rps: runs.iter().map(|w| w.rps).sum(),
        p50_ms: gpulb_testbed::percentile(runs.iter().map(|w| w.p50_ms).collect(), 0.5),
        p99_ms: runs.iter().map(|w| w.p99_ms).fold(0.0, f64::max),
        errors: runs.iter().map(|w| w.errors).sum(),
    }
}

fn wrk_command(ns: &NetNs, url: &str, secs: u64) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display())).args([
        "wrk",
        "-t1",
        "-c1",
        &format!("-d{secs}s"),
        "--latency",
        url,
    ]);
    cmd
}

fn wrk_parse(stdout: &[u8]) -> Wrk {
    let text = String::from_utf8_lossy(stdout).into_owned();
    let ms = |s: &str| -> f64 {
        let s = s.trim();
        if let Some(v) = s.strip_suffix("us") {
            v.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
        } else if let Some(v) = s.strip_suffix("ms") {
            v.parse().unwrap_or(f64::NAN)
        } else if let Some(v) = s.strip_suffix('s') {
            v.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
        } else {
            f64::NAN
        }
    };
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(&ms))
            .unwrap_or(f64::NAN)
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk output without Requests/sec:\n{text}"));
    let errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        + text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Socket errors:"))
            .map_or(0, |v| {
                v.split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum()
            });
    Wrk {
        rps,
        p50_ms: pct("50%"),
        p99_ms: pct("99%"),
        errors,
    }
}
