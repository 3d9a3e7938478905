//! The TOML config: serde types, then `validate()`, which turns them into a checked
//! [`Config`]. Every error names the field and the value. Nothing here touches BPF.

use std::{
    collections::HashMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use lb_common::{MAGLEV_DEFAULT_SIZE, MAGLEV_MAX_SIZE, MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/gpulb";
/// Smallest and largest conntrack size accepted (entries).
const CONNTRACK_MIN: u64 = 1024;
const CONNTRACK_MAX: u64 = 1 << 26;
const WEIGHT_MAX: i64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    pin_path: Option<PathBuf>,
    conntrack_size: Option<i64>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: String,
    address: String,
    port: i64,
    #[serde(default = "default_protocol")]
    protocol: String,
    maglev_table_size: Option<i64>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    port: i64,
    #[serde(default = "default_weight")]
    weight: i64,
}

fn default_protocol() -> String {
    "tcp".into()
}

fn default_weight() -> i64 {
    1
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub pin_path: PathBuf,
    pub conntrack_size: u32,
    pub vips: Vec<Vip>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub maglev_table_size: u32,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

impl Config {
    /// Read, parse, validate, and check that the interface exists in this network namespace.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(path, &text)?;
        if nix::net::if_::if_nametoindex(config.interface.as_str()).is_err() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "interface".into(),
                message: format!("no network interface named {:?}", config.interface),
            });
        }
        Ok(config)
    }

    /// Parse and validate text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })
    }
}

type FieldError = (String, String);

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

fn parse_port(field: &str, port: i64) -> Result<u16, FieldError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{port} is out of range 1-65535"))),
    }
}

fn parse_addr(field: &str, addr: &str) -> Result<Ipv4Addr, FieldError> {
    let ip: Ipv4Addr = addr
        .parse()
        .map_err(|_| invalid(field, format!("{addr:?} is not an IPv4 address")))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(invalid(field, format!("{addr:?} is not a unicast address")));
    }
    Ok(ip)
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

impl RawConfig {
    fn validate(self) -> Result<Config, FieldError> {
        if self.interface.trim().is_empty() {
            return Err(invalid("interface", "must name a network interface"));
        }
        let pin_path = self.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into());
        if !pin_path.is_absolute() {
            return Err(invalid(
                "pin_path",
                format!("{} is not an absolute path", pin_path.display()),
            ));
        }
        let conntrack_size = match self.conntrack_size {
            None => lb_common::CONNTRACK_DEFAULT_SIZE,
            Some(n) if (CONNTRACK_MIN as i64..=CONNTRACK_MAX as i64).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "conntrack_size",
                    format!("{n} is out of range {CONNTRACK_MIN}-{CONNTRACK_MAX}"),
                ));
            }
        };
        if self.vip.len() > MAX_SERVICES as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{} VIPs, at most {MAX_SERVICES} are supported",
                    self.vip.len()
                ),
            ));
        }

        let mut vips: Vec<Vip> = Vec::with_capacity(self.vip.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<(Ipv4Addr, u16, Protocol), usize> = HashMap::new();
        let mut total_backends = 0usize;
        for (i, raw) in self.vip.into_iter().enumerate() {
            let vip = raw.validate(i)?;
            if let Some(prev) = names.insert(vip.name.clone(), i) {
                return Err(invalid(
                    format!("vip[{i}].name"),
                    format!("{:?} already used by vip[{prev}]", vip.name),
                ));
            }
            if let Some(prev) = keys.insert((vip.address, vip.port, vip.protocol), i) {
                return Err(invalid(
                    format!("vip[{i}]"),
                    format!(
                        "{}:{}/{} already defined by vip[{prev}] ({:?})",
                        vip.address, vip.port, vip.protocol, vips[prev].name
                    ),
                ));
            }
            total_backends += vip.backends.len();
            vips.push(vip);
        }
        // Backend id 0 is reserved.
        if total_backends >= MAX_BACKENDS as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{total_backends} backends in all, at most {} are supported",
                    MAX_BACKENDS - 1
                ),
            ));
        }
        Ok(Config {
            interface: self.interface,
            xdp_mode: self.xdp_mode,
            pin_path,
            conntrack_size,
            vips,
        })
    }
}

impl RawVip {
    fn validate(self, i: usize) -> Result<Vip, FieldError> {
        let f = |name: &str| format!("vip[{i}].{name}");
        if self.name.trim().is_empty() {
            return Err(invalid(f("name"), "must not be empty"));
        }
        let address = parse_addr(&f("address"), &self.address)?;
        let port = parse_port(&f("port"), self.port)?;
        let protocol = match self.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(invalid(
                    f("protocol"),
                    format!("{other:?} is not \"tcp\" or \"udp\""),
                ));
            }
        };
        let size = self.maglev_table_size.unwrap_or(MAGLEV_DEFAULT_SIZE as i64);
        let maglev_table_size = match u32::try_from(size) {
            Ok(n) if n <= MAGLEV_MAX_SIZE && is_prime(n) => n,
            _ => {
                return Err(invalid(
                    f("maglev_table_size"),
                    format!("{size} must be a prime no larger than {MAGLEV_MAX_SIZE}"),
                ));
            }
        };
        if self.backend.is_empty() {
            return Err(invalid(f("backend"), "a VIP needs at least one backend"));
        }
        if self.backend.len() > maglev_table_size as usize {
            return Err(invalid(
                f("maglev_table_size"),
                format!(
                    "{maglev_table_size} is smaller than the number of backends ({})",
                    self.backend.len()
                ),
            ));
        }

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(self.backend.len());
        for (j, raw) in self.backend.into_iter().enumerate() {
            let bf = |name: &str| format!("vip[{i}].backend[{j}].{name}");
            let address = parse_addr(&bf("address"), &raw.address)?;
            let port = parse_port(&bf("port"), raw.port)?;
            let weight = match u32::try_from(raw.weight) {
                Ok(w) if i64::from(w) <= WEIGHT_MAX => w,
                _ => {
                    return Err(invalid(
                        bf("weight"),
                        format!("{} is out of range 0-{WEIGHT_MAX}", raw.weight),
                    ));
                }
            };
            if let Some(prev) = backends
                .iter()
                .position(|b| b.address == address && b.port == port)
            {
                return Err(invalid(
                    format!("vip[{i}].backend[{j}]"),
                    format!("duplicate backend {address}:{port} (also vip[{i}].backend[{prev}])"),
                ));
            }
            backends.push(BackendConfig {
                address,
                port,
                weight,
            });
        }
        if backends.iter().all(|b| b.weight == 0) {
            let field = if backends.len() == 1 {
                format!("vip[{i}].backend[0].weight")
            } else {
                format!("vip[{i}].backend")
            };
            let message = if backends.len() == 1 {
                "0 on the only backend: the VIP could serve no connection".to_owned()
            } else {
                "every backend has weight 0: the VIP could serve no connection".to_owned()
            };
            return Err(invalid(field, message));
        }
        Ok(Vip {
            name: self.name,
            address,
            port,
            protocol,
            maglev_table_size,
            backends,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "lo"
conntrack_size = 65536

[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80

[[vip.backend]]
address = "198.18.0.1"
port = 8001
weight = 2

[[vip.backend]]
address = "198.18.0.1"
port = 8002
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    /// The error message for `GOOD` with `from` replaced by `to`.
    fn error_for(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "fixture lacks {from:?}");
        parse(&GOOD.replacen(from, to, 1))
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).expect("valid config");
        assert_eq!(c.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert_eq!(c.conntrack_size, 65536);
        let vip = &c.vips[0];
        assert_eq!(vip.protocol, Protocol::Tcp);
        assert_eq!(vip.maglev_table_size, 65537);
        assert_eq!(vip.backends[0].weight, 2);
        assert_eq!(vip.backends[1].weight, 1);
    }

    #[test]
    fn duplicate_backend_is_named() {
        let e = error_for("port = 8002", "port = 8001");
        assert!(
            e.contains("vip[0].backend[1]") && e.contains("duplicate backend 198.18.0.1:8001"),
            "{e}"
        );
    }

    #[test]
    fn weight_zero_on_only_backend() {
        let text = GOOD.replace(
            "\n[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8002\n",
            "",
        );
        let e = error_for_text(&text.replace("weight = 2", "weight = 0"));
        assert!(
            e.contains("vip[0].backend[0].weight: 0 on the only backend"),
            "{e}"
        );
    }

    fn error_for_text(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn all_weights_zero() {
        let text = GOOD
            .replace("weight = 2", "weight = 0")
            .replace("port = 8002\n", "port = 8002\nweight = 0\n");
        let e = error_for_text(&text);
        assert!(
            e.contains("vip[0].backend: every backend has weight 0"),
            "{e}"
        );
    }

    #[test]
    fn port_out_of_range() {
        let e = error_for("port = 8001", "port = 70000");
        assert!(
            e.contains("vip[0].backend[0].port: 70000 is out of range 1-65535"),
            "{e}"
        );
        let e = error_for("port = 80", "port = 0");
        assert!(e.contains("vip[0].port: 0 is out of range"), "{e}");
    }

    #[test]
    fn negative_weight() {
        let e = error_for("weight = 2", "weight = -1");
        assert!(
            e.contains("vip[0].backend[0].weight: -1 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn bad_address() {
        let e = error_for("198.18.100.1", "198.18.300.1");
        assert!(
            e.contains("vip[0].address: \"198.18.300.1\" is not an IPv4 address"),
            "{e}"
        );
        let e = error_for("198.18.100.1", "0.0.0.0");
        assert!(
            e.contains("vip[0].address: \"0.0.0.0\" is not a unicast"),
            "{e}"
        );
    }

    #[test]
    fn bad_protocol() {
        let e = error_for("port = 80\n", "port = 80\nprotocol = \"sctp\"\n");
        assert!(e.contains("vip[0].protocol: \"sctp\""), "{e}");
    }

    #[test]
    fn table_size_must_be_prime_and_bounded() {
        let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 65536\n");
        assert!(
            e.contains("vip[0].maglev_table_size: 65536 must be a prime"),
            "{e}"
        );
        let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 131071\n");
        assert!(e.contains("no larger than 65537"), "{e}");
        let ok = parse(&GOOD.replace("port = 80\n", "port = 80\nmaglev_table_size = 251\n"));
        assert_eq!(ok.expect("251 is prime").vips[0].maglev_table_size, 251);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = error_for("weight = 2", "wieght = 2");
        assert!(e.contains("unknown field `wieght`"), "{e}");
    }

    #[test]
    fn duplicate_vip_and_name() {
        let second = "\n[[vip]]\nname = \"chat2\"\naddress = \"198.18.100.1\"\nport = 80\n\
                      [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 9000\n";
        let e = error_for_text(&format!("{GOOD}{second}"));
        assert!(
            e.contains("vip[1]: 198.18.100.1:80/tcp already defined by vip[0] (\"chat\")"),
            "{e}"
        );
        let e = error_for_text(&format!(
            "{GOOD}{}",
            second
                .replace("chat2", "chat")
                .replace("port = 80\n", "port = 81\n")
        ));
        assert!(
            e.contains("vip[1].name: \"chat\" already used by vip[0]"),
            "{e}"
        );
    }

    #[test]
    fn no_backends() {
        let text =
            "interface = \"lo\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.100.1\"\nport = 80\n";
        let e = error_for_text(text);
        assert!(
            e.contains("vip[0].backend: a VIP needs at least one backend"),
            "{e}"
        );
    }

    #[test]
    fn conntrack_size_bounds() {
        let e = error_for("conntrack_size = 65536", "conntrack_size = 10");
        assert!(e.contains("conntrack_size: 10 is out of range"), "{e}");
    }

    #[test]
    fn relative_pin_path() {
        let e = error_for("conntrack_size", "pin_path = \"gpulb\"\nconntrack_size");
        assert!(e.contains("pin_path: gpulb is not an absolute path"), "{e}");
    }

    #[test]
    fn unknown_interface_is_named() {
        let dir = std::env::temp_dir().join(format!("gpulb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("bad-if.toml");
        std::fs::write(&path, GOOD.replace("\"lo\"", "\"gpulb-nosuch0\"")).expect("write");
        let e = Config::load(&path)
            .expect_err("unknown interface")
            .to_string();
        std::fs::remove_dir_all(&dir).expect("clean temp dir");
        assert!(
            e.contains("interface: no network interface named \"gpulb-nosuch0\""),
            "{e}"
        );
    }
}
