//! The cluster network config (`<prefix>/config` in etcd), parsed and validated once into
//! typed values.
//!
//! Parsing follows flannel: keys match case-insensitively, unknown keys are ignored, and
//! SubnetLen/SubnetMin/SubnetMax get flannel's defaults. Where flannel is vague this module
//! is explicit: a config without `Backend` means **vxlan** (flannel silently means `udp`,
//! which this agent does not implement), and the caller is told so via
//! [`ParsedConfig::backend_defaulted`] so it can log it.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

/// Which dataplane this node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendType {
    /// eBPF fast path over the kernel vxlan device (publishes `vxlan` leases).
    Ebpf,
    /// The kernel vxlan device alone, as flanneld programs it.
    Vxlan,
    /// Plain routes via each peer's PublicIP (flat L2 underlays).
    HostGw,
}

impl BackendType {
    /// The name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Ebpf => "ebpf",
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }

    /// What this backend publishes as `BackendType` in leases and expects from peers: an
    /// eBPF node is a vxlan node on the wire.
    pub fn lease_backend(self) -> crate::peer::LeaseBackend {
        match self {
            BackendType::Ebpf | BackendType::Vxlan => crate::peer::LeaseBackend::Vxlan,
            BackendType::HostGw => crate::peer::LeaseBackend::HostGw,
        }
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ebpf" => Ok(BackendType::Ebpf),
            "vxlan" => Ok(BackendType::Vxlan),
            "host-gw" => Ok(BackendType::HostGw),
            other => Err(format!(
                "unknown backend {other:?}: use ebpf, vxlan or host-gw"
            )),
        }
    }
}

/// `Backend` of the network config, with flannel's defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub kind: BackendType,
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// VXLAN UDP port (flannel's 0 is resolved to 8472).
    pub port: u16,
    /// `Backend.MTU` if set: the underlay MTU to assume instead of the uplink's.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendType::Vxlan,
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            gbp: false,
            learning: false,
            direct_routing: false,
        }
    }
}

/// The validated network config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    /// First and last subnet that may be leased (network addresses).
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

/// Default VXLAN network identifier (flannel's).
pub const DEFAULT_VNI: u32 = 1;
/// flannel's VXLAN port (Linux's default), defined once in overlay-common.
pub use overlay_common::DEFAULT_VXLAN_PORT;
/// The largest VNI a VXLAN header can carry (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The smallest `Backend.MTU` that leaves an IPv4 minimum MTU (68) inside a 50-byte VXLAN
/// encapsulation.
pub const MIN_BACKEND_MTU: u32 = 68 + overlay_common::VXLAN_OVERHEAD;

/// Shown in every error so the operator sees what a valid config looks like.
pub const EXAMPLE_CONFIG: &str =
    r#"{"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}"#;

/// What is wrong with a network config. Each message says what and how to fix it, and
/// ends with an example of a valid config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the network config is not valid JSON ({reason}); write a JSON object such as {EXAMPLE_CONFIG}"
    )]
    NotJson { reason: String },
    #[error("the network config must be a JSON object, found {found}; write e.g. {EXAMPLE_CONFIG}")]
    NotAnObject { found: &'static str },
    #[error(
        "the network config has no \"Network\" key: add the pod network CIDR, e.g. {EXAMPLE_CONFIG}"
    )]
    MissingNetwork,
    #[error(
        "\"{key}\" must be {expected}, found {found}; example of a valid config: {EXAMPLE_CONFIG}"
    )]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error(
        "\"Network\" {value:?} is not an IPv4 CIDR (like \"10.5.0.0/16\"); example of a valid config: {EXAMPLE_CONFIG}"
    )]
    BadNetwork { value: String },
    #[error(
        "\"{key}\" {value:?} is not an IPv4 address (like \"10.5.1.0\"); example of a valid config: {EXAMPLE_CONFIG}"
    )]
    BadAddress { key: &'static str, value: String },
    #[error(
        "network {network} is too small: the minimum useful network prefix is /28 (it must hold at least four subnets of four addresses); use a shorter prefix, e.g. {EXAMPLE_CONFIG}"
    )]
    NetworkTooSmall { network: Ipv4Network },
    #[error(
        "\"SubnetLen\" {subnet_len} is too long: it must be at most 30 (each subnet needs a gateway and a host); e.g. {EXAMPLE_CONFIG}"
    )]
    SubnetLenTooLong { subnet_len: u64 },
    #[error(
        "\"SubnetLen\" {subnet_len} is too short for network {network}: it must be at least /{min} so that the network holds at least four subnets; e.g. {EXAMPLE_CONFIG}"
    )]
    SubnetLenTooShort {
        subnet_len: u64,
        network: Ipv4Network,
        min: u8,
    },
    #[error(
        "\"{key}\" {value} is not inside network {network}; leave it out to use the default or pick an address inside the network; e.g. {EXAMPLE_CONFIG}"
    )]
    OutsideNetwork {
        key: &'static str,
        value: Ipv4Addr,
        network: Ipv4Network,
    },
    #[error(
        "\"{key}\" {value} is not on a /{subnet_len} boundary (a subnet's network address, like {aligned}); e.g. {EXAMPLE_CONFIG}"
    )]
    Unaligned {
        key: &'static str,
        value: Ipv4Addr,
        subnet_len: u8,
        aligned: Ipv4Addr,
    },
    #[error(
        "\"SubnetMin\" {min} is after \"SubnetMax\" {max}: no subnet could ever be leased; swap them or leave both out; e.g. {EXAMPLE_CONFIG}"
    )]
    MinAfterMax { min: Ipv4Addr, max: Ipv4Addr },
    #[error(
        "\"Backend\" must be a JSON object like {{\"Type\": \"vxlan\"}}, found {found}; e.g. {EXAMPLE_CONFIG}"
    )]
    BackendNotObject { found: String },
    #[error("\"Backend\" has no \"Type\": set \"vxlan\" or \"host-gw\"; e.g. {EXAMPLE_CONFIG}")]
    MissingBackendType,
    #[error(
        "backend type {kind:?} is not supported by overlay-agent: use \"vxlan\" (the eBPF datapath runs under it, select it with --backend=ebpf) or \"host-gw\"; e.g. {EXAMPLE_CONFIG}"
    )]
    UnsupportedBackend { kind: String },
    #[error(
        "\"Backend.VNI\" {vni} does not fit in the 24-bit VXLAN header: use 0..=16777215 (default 1); e.g. {EXAMPLE_CONFIG}"
    )]
    VniOutOfRange { vni: u64 },
    #[error(
        "\"Backend.Port\" {port} is not a UDP port: use 1..=65535, or 0 / leave it out for the kernel default 8472; e.g. {EXAMPLE_CONFIG}"
    )]
    PortOutOfRange { port: u64 },
    #[error(
        "\"Backend.MTU\" {mtu} is out of range: use {MIN_BACKEND_MTU}..=65535 (the underlay MTU; the pod MTU is 50 less), or leave it out to use the uplink's MTU; e.g. {EXAMPLE_CONFIG}"
    )]
    MtuOutOfRange { mtu: u64 },
    #[error(
        "\"EnableIPv4\": false is not supported: overlay-agent needs an IPv4 network (IPv6 is not implemented yet); remove the key or set it to true; e.g. {EXAMPLE_CONFIG}"
    )]
    Ipv4Disabled,
    #[error(
        "\"EnableIPv6\": true is not supported yet: overlay-agent is IPv4-only for now; remove the key or set it to false; e.g. {EXAMPLE_CONFIG}"
    )]
    Ipv6NotSupported,
}

/// A parsed config plus what the operator should be told about defaults that were chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedConfig {
    pub config: NetworkConfig,
    /// The config had no `Backend` and vxlan was assumed (flannel would assume udp).
    pub backend_defaulted: bool,
}

/// Lower-cased keys of a JSON object: flannel (Go's encoding/json) matches case-insensitively.
fn lowercase_keys(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::WrongType {
        key: key.to_string(),
        expected,
        found: format!("{} ({found})", json_kind(found)),
    }
}

/// A present, non-null value: Go leaves absent and `null` fields alike at their zero value.
fn field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn get_str<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match field(map, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(name, "a string", other)),
    }
}

fn get_u64(map: &Map<String, Value>, key: &str, name: &str) -> Result<Option<u64>, ConfigError> {
    match field(map, key) {
        None => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong_type(name, "a non-negative integer", v)),
        Some(other) => Err(wrong_type(name, "a non-negative integer", other)),
    }
}

fn get_bool(map: &Map<String, Value>, key: &str, name: &str) -> Result<Option<bool>, ConfigError> {
    match field(map, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(name, "true or false", other)),
    }
}

fn get_addr(
    map: &Map<String, Value>,
    key: &str,
    name: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    match get_str(map, key, name)? {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse::<Ipv4Addr>()
            .map(Some)
            .map_err(|_| ConfigError::BadAddress {
                key: name,
                value: s.to_string(),
            }),
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

impl NetworkConfig {
    /// Parses and validates a config; see [`NetworkConfig::parse_verbose`].
    pub fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        Self::parse_verbose(json).map(|p| p.config)
    }

    /// Parses and validates a config, reporting which defaults the operator should hear about.
    pub fn parse_verbose(json: &str) -> Result<ParsedConfig, ConfigError> {
        let value: Value = serde_json::from_str(json).map_err(|e| ConfigError::NotJson {
            reason: e.to_string(),
        })?;
        let Value::Object(raw) = &value else {
            return Err(ConfigError::NotAnObject {
                found: json_kind(&value),
            });
        };
        let top = lowercase_keys(raw);
        if get_bool(&top, "enableipv4", "EnableIPv4")? == Some(false) {
            return Err(ConfigError::Ipv4Disabled);
        }
        if get_bool(&top, "enableipv6", "EnableIPv6")? == Some(true) {
            return Err(ConfigError::Ipv6NotSupported);
        }
        let network = parse_network(&top)?;
        let subnet_len = parse_subnet_len(&top, network)?;
        let (subnet_min, subnet_max) = parse_subnet_range(&top, network, subnet_len)?;
        let (backend, backend_defaulted) = match field(&top, "backend") {
            None => (BackendConfig::default(), true),
            Some(Value::Object(b)) => (parse_backend(&lowercase_keys(b))?, false),
            Some(other) => {
                return Err(ConfigError::BackendNotObject {
                    found: format!("{} ({other})", json_kind(other)),
                });
            }
        };
        Ok(ParsedConfig {
            config: NetworkConfig {
                network,
                subnet_len,
                subnet_min,
                subnet_max,
                backend,
            },
            backend_defaulted,
        })
    }

    /// The config with every default spelled out, as flannel's key names (for
    /// `config set`/`config show`). An eBPF backend is written as `vxlan`: that is what
    /// it is on the wire and what flanneld nodes understand.
    pub fn to_json(&self) -> String {
        let mut backend = serde_json::json!({
            "Type": match self.backend.kind {
                BackendType::Ebpf | BackendType::Vxlan => "vxlan",
                BackendType::HostGw => "host-gw",
            },
        });
        if self.backend.kind != BackendType::HostGw {
            let obj = backend.as_object_mut().expect("built as an object");
            obj.insert("VNI".into(), self.backend.vni.into());
            obj.insert("Port".into(), self.backend.port.into());
            if self.backend.gbp {
                obj.insert("GBP".into(), true.into());
            }
            if self.backend.learning {
                obj.insert("Learning".into(), true.into());
            }
            if self.backend.direct_routing {
                obj.insert("DirectRouting".into(), true.into());
            }
        }
        if let Some(mtu) = self.backend.mtu {
            backend
                .as_object_mut()
                .expect("built as an object")
                .insert("MTU".into(), mtu.into());
        }
        serde_json::json!({
            "Network": self.network.to_string(),
            "SubnetLen": self.subnet_len,
            "SubnetMin": self.subnet_min.to_string(),
            "SubnetMax": self.subnet_max.to_string(),
            "Backend": backend,
        })
        .to_string()
    }

    /// The config with `--backend` applied (`None`: the config's own Backend.Type).
    pub fn with_backend_override(mut self, backend: Option<BackendType>) -> NetworkConfig {
        if let Some(kind) = backend {
            self.backend.kind = kind;
        }
        self
    }

    /// Whether `subnet` is one this config may lease: the right length, inside the
    /// network, between SubnetMin and SubnetMax.
    pub fn fits(&self, subnet: Ipv4Network) -> bool {
        let start = u32::from(subnet.ip());
        subnet.prefix() == self.subnet_len
            && subnet.network() == subnet.ip()
            && self.network.contains(subnet.ip())
            && start >= u32::from(self.subnet_min)
            && start <= u32::from(self.subnet_max)
    }

    /// Every leasable subnet, SubnetMin to SubnetMax in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        let step = 1u64 << (32 - self.subnet_len);
        let min = u64::from(u32::from(self.subnet_min));
        let max = u64::from(u32::from(self.subnet_max));
        (0..)
            .map(move |i| min + i * step)
            .take_while(move |start| *start <= max)
            .map(move |start| {
                Ipv4Network::new(Ipv4Addr::from(start as u32), self.subnet_len)
                    .expect("subnet_len <= 30")
            })
    }

    /// How many subnets can be leased.
    pub fn subnet_count(&self) -> u64 {
        let step = 1u64 << (32 - self.subnet_len);
        (u64::from(u32::from(self.subnet_max)) - u64::from(u32::from(self.subnet_min))) / step + 1
    }
}

/// `Network`: a CIDR with its prefix length, normalized like Go's net.ParseCIDR.
fn parse_network(top: &Map<String, Value>) -> Result<Ipv4Network, ConfigError> {
    let network_str = get_str(top, "network", "Network")?.ok_or(ConfigError::MissingNetwork)?;
    let bad_network = || ConfigError::BadNetwork {
        value: network_str.to_string(),
    };
    // A CIDR needs its prefix length (ipnetwork alone would read "10.5.0.0" as a /32).
    if !network_str.contains('/') {
        return Err(bad_network());
    }
    let parsed: Ipv4Network = network_str.trim().parse().map_err(|_| bad_network())?;
    // Like Go's net.ParseCIDR, "10.5.1.0/16" means the network 10.5.0.0/16.
    Ok(Ipv4Network::new(parsed.network(), parsed.prefix()).expect("a prefix that parsed is valid"))
}

/// `SubnetLen`, with flannel's default (24, or the network's prefix + 2 for small ones).
fn parse_subnet_len(top: &Map<String, Value>, network: Ipv4Network) -> Result<u8, ConfigError> {
    let prefix = network.prefix();
    match get_u64(top, "subnetlen", "SubnetLen")? {
        // flannel treats 0 as "not set".
        None | Some(0) => {
            if prefix > 28 {
                Err(ConfigError::NetworkTooSmall { network })
            } else if prefix <= 22 {
                Ok(24)
            } else {
                Ok(prefix + 2)
            }
        }
        Some(len) if len > 30 => Err(ConfigError::SubnetLenTooLong { subnet_len: len }),
        Some(len) if len < u64::from(prefix) + 2 => Err(ConfigError::SubnetLenTooShort {
            subnet_len: len,
            network,
            min: prefix + 2,
        }),
        Some(len) => Ok(len as u8),
    }
}

/// `SubnetMin` and `SubnetMax`: inside the network, aligned to `subnet_len`, min <= max;
/// by default the second and the last subnet (flannel's).
fn parse_subnet_range(
    top: &Map<String, Value>,
    network: Ipv4Network,
    subnet_len: u8,
) -> Result<(Ipv4Addr, Ipv4Addr), ConfigError> {
    let net_start = u32::from(network.network());
    let subnet_size = 1u32 << (32 - subnet_len);
    let net_last_subnet = net_start | (!mask(network.prefix()) & mask(subnet_len));
    let check_bound = |key: &'static str, addr: Option<Ipv4Addr>, default: u32| {
        // Go's zero value 0.0.0.0 also means "not set".
        let value = match addr {
            None => return Ok(Ipv4Addr::from(default)),
            Some(a) if a.is_unspecified() => return Ok(Ipv4Addr::from(default)),
            Some(a) => a,
        };
        if !network.contains(value) {
            return Err(ConfigError::OutsideNetwork {
                key,
                value,
                network,
            });
        }
        let aligned = u32::from(value) & mask(subnet_len);
        if aligned != u32::from(value) {
            return Err(ConfigError::Unaligned {
                key,
                value,
                subnet_len,
                aligned: Ipv4Addr::from(aligned),
            });
        }
        Ok(value)
    };
    let subnet_min = check_bound(
        "SubnetMin",
        get_addr(top, "subnetmin", "SubnetMin")?,
        net_start + subnet_size,
    )?;
    let subnet_max = check_bound(
        "SubnetMax",
        get_addr(top, "subnetmax", "SubnetMax")?,
        net_last_subnet,
    )?;
    if u32::from(subnet_min) > u32::from(subnet_max) {
        return Err(ConfigError::MinAfterMax {
            min: subnet_min,
            max: subnet_max,
        });
    }
    Ok((subnet_min, subnet_max))
}

fn parse_backend(b: &Map<String, Value>) -> Result<BackendConfig, ConfigError> {
    let kind = match get_str(b, "type", "Backend.Type")? {
        None => return Err(ConfigError::MissingBackendType),
        Some(t) => match t.trim().to_ascii_lowercase().as_str() {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            _ => {
                return Err(ConfigError::UnsupportedBackend {
                    kind: t.to_string(),
                });
            }
        },
    };
    let vni = match get_u64(b, "vni", "Backend.VNI")? {
        None => DEFAULT_VNI,
        Some(v) if v > u64::from(MAX_VNI) => return Err(ConfigError::VniOutOfRange { vni: v }),
        Some(v) => v as u32,
    };
    let port = match get_u64(b, "port", "Backend.Port")? {
        None | Some(0) => DEFAULT_VXLAN_PORT,
        Some(p) if p > 65535 => return Err(ConfigError::PortOutOfRange { port: p }),
        Some(p) => p as u16,
    };
    let mtu = match get_u64(b, "mtu", "Backend.MTU")? {
        // flannel: 0 means "use the uplink's".
        None | Some(0) => None,
        Some(m) if !(u64::from(MIN_BACKEND_MTU)..=65535).contains(&m) => {
            return Err(ConfigError::MtuOutOfRange { mtu: m });
        }
        Some(m) => Some(m as u32),
    };
    Ok(BackendConfig {
        kind,
        vni,
        port,
        mtu,
        gbp: get_bool(b, "gbp", "Backend.GBP")?.unwrap_or(false),
        learning: get_bool(b, "learning", "Backend.Learning")?.unwrap_or(false),
        direct_routing: get_bool(b, "directrouting", "Backend.DirectRouting")?.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().expect("test CIDR")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn err(json: &str) -> ConfigError {
        NetworkConfig::parse(json).expect_err("config should be rejected")
    }

    #[test]
    fn seeds_config_parses_with_defaults() {
        let parsed = NetworkConfig::parse_verbose(
            r#"{ "Network": "172.30.0.0/16", "SubnetLen": 24, "Backend": { "Type": "vxlan" } }"#,
        )
        .expect("valid");
        assert!(!parsed.backend_defaulted);
        let c = parsed.config;
        assert_eq!(c.network, net("172.30.0.0/16"));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, ip("172.30.1.0"));
        assert_eq!(c.subnet_max, ip("172.30.255.0"));
        assert_eq!(c.backend.kind, BackendType::Vxlan);
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, None);
        assert_eq!(c.subnet_count(), 255);
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let c = NetworkConfig::parse(
            r#"{"network":"10.5.0.0/16","SUBNETLEN":26,"backend":{"type":"VXLAN","vni":42,"PORT":4789,"MacPrefix":"0E:2A"},"Whatever":[1,2]}"#,
        )
        .expect("valid");
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.backend.vni, 42);
        assert_eq!(c.backend.port, 4789);
    }

    #[test]
    fn subnet_len_defaults_follow_flannel() {
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/8"}"#)
                .expect("ok")
                .subnet_len,
            24
        );
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/22"}"#)
                .expect("ok")
                .subnet_len,
            24
        );
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/23"}"#)
                .expect("ok")
                .subnet_len,
            25
        );
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/28"}"#)
                .expect("ok")
                .subnet_len,
            30
        );
        // SubnetLen 0 means "not set", as in flannel.
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/16","SubnetLen":0}"#)
                .expect("ok")
                .subnet_len,
            24
        );
    }

    #[test]
    fn network_longer_than_28_is_too_small() {
        let e = err(r#"{"Network":"10.0.0.0/29"}"#);
        assert!(matches!(e, ConfigError::NetworkTooSmall { .. }), "{e}");
        assert!(e.to_string().contains("/28"), "{e}");
    }

    #[test]
    fn explicit_subnet_len_rules() {
        let e = err(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#);
        assert!(
            matches!(e, ConfigError::SubnetLenTooLong { subnet_len: 31 }),
            "{e}"
        );
        let e = err(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#);
        assert!(
            matches!(e, ConfigError::SubnetLenTooShort { min: 18, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("at least /18"), "{e}");
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/16","SubnetLen":18}"#)
                .expect("ok")
                .subnet_len,
            18
        );
        assert_eq!(
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/16","SubnetLen":30}"#)
                .expect("ok")
                .subnet_len,
            30
        );
    }

    #[test]
    fn subnet_min_max_defaults_and_rules() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetLen":20}"#).expect("ok");
        assert_eq!(c.subnet_min, ip("10.5.16.0"));
        assert_eq!(c.subnet_max, ip("10.5.240.0"));
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}"#,
        )
        .expect("ok");
        assert_eq!(
            (c.subnet_min, c.subnet_max),
            (ip("10.5.10.0"), ip("10.5.20.0"))
        );
        assert_eq!(c.subnet_count(), 11);
        assert_eq!(c.subnets().count(), 11);
        assert_eq!(c.subnets().next(), Some(net("10.5.10.0/24")));
        assert_eq!(c.subnets().last(), Some(net("10.5.20.0/24")));

        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#);
        assert!(
            matches!(
                e,
                ConfigError::OutsideNetwork {
                    key: "SubnetMin",
                    ..
                }
            ),
            "{e}"
        );
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.4.0.0"}"#);
        assert!(
            matches!(
                e,
                ConfigError::OutsideNetwork {
                    key: "SubnetMax",
                    ..
                }
            ),
            "{e}"
        );
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.5"}"#);
        assert!(
            matches!(
                e,
                ConfigError::Unaligned {
                    key: "SubnetMin",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("10.5.1.0"),
            "suggests the aligned address: {e}"
        );
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.9.128"}"#);
        assert!(
            matches!(
                e,
                ConfigError::Unaligned {
                    key: "SubnetMax",
                    ..
                }
            ),
            "{e}"
        );
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}"#);
        assert!(matches!(e, ConfigError::MinAfterMax { .. }), "{e}");
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetMin":"ten"}"#);
        assert!(
            matches!(
                e,
                ConfigError::BadAddress {
                    key: "SubnetMin",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn network_rules() {
        assert!(matches!(
            err(r#"{"SubnetLen":24}"#),
            ConfigError::MissingNetwork
        ));
        assert!(matches!(
            err(r#"{"Network":null}"#),
            ConfigError::MissingNetwork
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0"}"#),
            ConfigError::BadNetwork { .. }
        ));
        assert!(matches!(
            err(r#"{"Network":"fd00::/64"}"#),
            ConfigError::BadNetwork { .. }
        ));
        assert!(matches!(
            err(r#"{"Network":16}"#),
            ConfigError::WrongType { .. }
        ));
        // Host bits are dropped like Go's net.ParseCIDR does.
        let c = NetworkConfig::parse(r#"{"Network":"10.5.7.9/16"}"#).expect("ok");
        assert_eq!(c.network, net("10.5.0.0/16"));
    }

    #[test]
    fn not_json_or_not_an_object() {
        let e = err("{Network: 10.5.0.0/16}");
        assert!(matches!(e, ConfigError::NotJson { .. }), "{e}");
        assert!(e.to_string().contains(EXAMPLE_CONFIG), "{e}");
        assert!(matches!(
            err(r#"["10.5.0.0/16"]"#),
            ConfigError::NotAnObject { found: "an array" }
        ));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err(r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#);
        assert!(
            e.to_string()
                .contains("\"SubnetLen\" must be a non-negative integer"),
            "{e}"
        );
        let e = err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":-1}}"#);
        assert!(e.to_string().contains("\"Backend.VNI\""), "{e}");
        let e =
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#);
        assert!(
            e.to_string()
                .contains("\"Backend.DirectRouting\" must be true or false"),
            "{e}"
        );
    }

    #[test]
    fn backend_missing_defaults_to_vxlan_and_says_so() {
        let p = NetworkConfig::parse_verbose(r#"{"Network":"10.5.0.0/16"}"#).expect("ok");
        assert!(p.backend_defaulted);
        assert_eq!(p.config.backend, BackendConfig::default());
        assert_eq!(p.config.backend.kind, BackendType::Vxlan);
    }

    #[test]
    fn backend_rules() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .expect("ok");
        assert_eq!(c.backend.kind, BackendType::HostGw);
        let e = err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#);
        assert!(matches!(e, ConfigError::UnsupportedBackend { .. }), "{e}");
        assert!(e.to_string().contains("--backend=ebpf"), "{e}");
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"VNI":1}}"#),
            ConfigError::MissingBackendType
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","Backend":"vxlan"}"#),
            ConfigError::BackendNotObject { .. }
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#),
            ConfigError::VniOutOfRange { vni: 16777216 }
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#),
            ConfigError::PortOutOfRange { port: 70000 }
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":100}}"#),
            ConfigError::MtuOutOfRange { mtu: 100 }
        ));
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","Port":0,"MTU":9000,"GBP":true,"Learning":true,"DirectRouting":true,"VNI":16777215}}"#,
        )
        .expect("ok");
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, Some(9000));
        assert_eq!(c.backend.vni, MAX_VNI);
        assert!(c.backend.gbp && c.backend.learning && c.backend.direct_routing);
    }

    #[test]
    fn ip_family_rules() {
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv4":false}"#),
            ConfigError::Ipv4Disabled
        ));
        assert!(matches!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#),
            ConfigError::Ipv6NotSupported
        ));
        NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","EnableIPv4":true,"EnableIPv6":false}"#)
            .expect("explicit defaults are fine");
    }

    /// The variant's position; exhaustive (no `_` arm), so a new variant does not compile
    /// until it is added here and to the cases below.
    fn variant_index(e: &ConfigError) -> usize {
        match e {
            ConfigError::NotJson { .. } => 0,
            ConfigError::NotAnObject { .. } => 1,
            ConfigError::MissingNetwork => 2,
            ConfigError::WrongType { .. } => 3,
            ConfigError::BadNetwork { .. } => 4,
            ConfigError::BadAddress { .. } => 5,
            ConfigError::NetworkTooSmall { .. } => 6,
            ConfigError::SubnetLenTooLong { .. } => 7,
            ConfigError::SubnetLenTooShort { .. } => 8,
            ConfigError::OutsideNetwork { .. } => 9,
            ConfigError::Unaligned { .. } => 10,
            ConfigError::MinAfterMax { .. } => 11,
            ConfigError::BackendNotObject { .. } => 12,
            ConfigError::MissingBackendType => 13,
            ConfigError::UnsupportedBackend { .. } => 14,
            ConfigError::VniOutOfRange { .. } => 15,
            ConfigError::PortOutOfRange { .. } => 16,
            ConfigError::MtuOutOfRange { .. } => 17,
            ConfigError::Ipv4Disabled => 18,
            ConfigError::Ipv6NotSupported => 19,
        }
    }
    const VARIANTS: usize = 20;

    #[test]
    fn every_error_shows_a_valid_example() {
        // One config per variant, in variant order.
        let cases = [
            "nope",
            "[]",
            "{}",
            r#"{"Network":16}"#,
            r#"{"Network":"x"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMin":"ten"}"#,
            r#"{"Network":"10.0.0.0/30"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
            r#"{"Network":"10.0.0.0/16","SubnetLen":8}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMax":"10.1.0.0"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.7"}"#,
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}"#,
            r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"VNI":1}}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"aws-vpc"}}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","Port":65536}}"#,
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","MTU":117}}"#,
            r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#,
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#,
        ];
        assert_eq!(cases.len(), VARIANTS);
        for (index, json) in cases.into_iter().enumerate() {
            let e = err(json);
            assert_eq!(variant_index(&e), index, "{json} gave {e:?}");
            assert!(e.to_string().contains(EXAMPLE_CONFIG), "{json}: {e}");
        }
        // And the example itself is valid.
        NetworkConfig::parse(EXAMPLE_CONFIG).expect("the example is valid");
    }

    #[test]
    fn normalized_json_round_trips() {
        let c = NetworkConfig::parse(
            r#"{"network":"10.5.0.0/16","backend":{"type":"vxlan","vni":7,"mtu":9000}}"#,
        )
        .expect("ok");
        let json = c.to_json();
        assert_eq!(
            json,
            r#"{"Backend":{"MTU":9000,"Port":8472,"Type":"vxlan","VNI":7},"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMax":"10.5.255.0","SubnetMin":"10.5.1.0"}"#
        );
        assert_eq!(NetworkConfig::parse(&json).expect("round trip"), c);
    }

    #[test]
    fn fits_checks_length_range_and_alignment() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}"#,
        )
        .expect("ok");
        assert!(c.fits(net("10.5.10.0/24")));
        assert!(c.fits(net("10.5.20.0/24")));
        assert!(!c.fits(net("10.5.9.0/24")));
        assert!(!c.fits(net("10.5.21.0/24")));
        assert!(!c.fits(net("10.5.10.0/25")));
        assert!(!c.fits(net("10.6.10.0/24")));
    }

    #[test]
    fn backend_type_from_str() {
        assert_eq!("ebpf".parse::<BackendType>(), Ok(BackendType::Ebpf));
        assert_eq!("host-gw".parse::<BackendType>(), Ok(BackendType::HostGw));
        assert_eq!("VXLAN".parse::<BackendType>(), Ok(BackendType::Vxlan));
        assert!("udp".parse::<BackendType>().is_err());
    }
}
