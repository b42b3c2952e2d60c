//! flannel's CNI netconf (`{"type": "flannel", "delegate": {...}}`) and the delegate netconf
//! it becomes, built exactly as flannel's plugin builds it: the delegate is an open JSON
//! object (unknown keys pass through to the delegate untouched), completed from subnet.env.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::control::subnet_file::SubnetEnv;

/// Where flannel's plugin looks for the agent's subnet file by default.
pub const DEFAULT_SUBNET_FILE: &str = crate::cli::flags::DEFAULT_SUBNET_FILE;
/// Where the delegate netconf of each container is kept between ADD and DEL.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// The plugin's own netconf, as read from stdin.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlannelConf {
    /// As declared ("" when absent: the delegate then gets none either, as with flannel).
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub subnet_file: Option<PathBuf>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// This project's addition: the running agent's notification socket (default: next to
    /// the subnet file). flannel ignores the key.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub delegate: Option<Map<String, Value>>,
    #[serde(default)]
    pub ipam: Option<Map<String, Value>>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    /// What the runtime passes to DEL and CHECK (spec 0.4.0+).
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// Why a netconf cannot become a delegate netconf.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetconfError {
    #[error("'delegate', if present, must have a string 'type' field (e.g. \"bridge\"), not {0}")]
    DelegateTypeNotString(String),
    #[error("'delegate' must not have a '{0}' field: flannel sets it (remove it from the netconf)")]
    DelegateFieldReserved(&'static str),
    #[error(
        "ipam.routes must be a list of objects with a 'dst' CIDR, e.g. [{{\"dst\": \"10.0.0.0/8\"}}]; got {0}"
    )]
    BadRoutes(String),
    #[error("ipam.type must be a string (e.g. \"host-local\"), not {0}")]
    IpamTypeNotString(String),
}

impl FlannelConf {
    pub fn subnet_file(&self) -> PathBuf {
        self.subnet_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    /// The agent's socket: `agentSocket`, else the default beside the subnet file (the
    /// agent derives its own default from `--subnet-file` the same way).
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| super::agent_socket::default_socket_path(&self.subnet_file()))
    }

    /// The delegate netconf for ADD: `delegate` completed with name, type (bridge), ipMasq
    /// (= !FLANNEL_IPMASQ), mtu (FLANNEL_MTU), isGateway (bridge), cniVersion and the IPAM
    /// section (host-local, the node's subnet as the range, a route to FLANNEL_NETWORK).
    /// Keys the user set win, except name and ipam, which flannel owns.
    pub fn delegate_for(&self, env: &SubnetEnv) -> Result<Map<String, Value>, NetconfError> {
        let mut delegate = self.delegate.clone().unwrap_or_default();
        match delegate.get("type") {
            None | Some(Value::String(_)) => {}
            Some(other) => return Err(NetconfError::DelegateTypeNotString(other.to_string())),
        }
        for reserved in ["name", "ipam"] {
            if delegate.contains_key(reserved) {
                return Err(NetconfError::DelegateFieldReserved(reserved));
            }
        }
        if let Some(runtime_config) = &self.runtime_config {
            delegate.insert("runtimeConfig".into(), runtime_config.clone());
        }
        delegate.insert("name".into(), Value::String(self.name.clone()));
        delegate
            .entry("type")
            .or_insert_with(|| Value::String("bridge".into()));
        // Masquerade in the bridge plugin only when the agent does not (--ip-masq).
        delegate.entry("ipMasq").or_insert(Value::Bool(!env.ipmasq));
        delegate.entry("mtu").or_insert(json!(env.mtu));
        if delegate.get("type").and_then(Value::as_str) == Some("bridge") {
            delegate.entry("isGateway").or_insert(Value::Bool(true));
        }
        if !self.cni_version.is_empty() {
            delegate.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        }
        delegate.insert("ipam".into(), Value::Object(self.delegate_ipam(env)?));
        Ok(delegate)
    }

    fn delegate_ipam(&self, env: &SubnetEnv) -> Result<Map<String, Value>, NetconfError> {
        let mut ipam = self.ipam.clone().unwrap_or_default();
        match ipam.get("type") {
            None => {
                ipam.insert("type".into(), Value::String("host-local".into()));
            }
            Some(Value::String(_)) => {}
            Some(other) => return Err(NetconfError::IpamTypeNotString(other.to_string())),
        }
        // host-local rejects a range with host bits: the network form, 10.5.52.0/24.
        ipam.insert(
            "ranges".into(),
            json!([[{ "subnet": env.subnet.to_string() }]]),
        );
        let mut routes = match ipam.remove("routes") {
            None => Vec::new(),
            Some(Value::Array(routes)) => {
                for route in &routes {
                    let dst = route.get("dst").and_then(Value::as_str);
                    if dst.is_none_or(|dst| dst.parse::<ipnetwork::IpNetwork>().is_err()) {
                        return Err(NetconfError::BadRoutes(route.to_string()));
                    }
                }
                routes
            }
            Some(other) => return Err(NetconfError::BadRoutes(other.to_string())),
        };
        routes.push(json!({ "dst": env.network.to_string() }));
        ipam.insert("routes".into(), Value::Array(routes));
        Ok(ipam)
    }
}

/// The pod's IPv4 addresses in an ADD result (or a prevResult), for the agent notice:
/// `ips[].address` (spec 0.3.0 and later) or `ip4.ip` (0.1.0/0.2.0).
pub fn result_ipv4s(result: &Value) -> Vec<std::net::Ipv4Addr> {
    let from_ips = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str));
    let from_ip4 = result
        .get("ip4")
        .and_then(|ip4| ip4.get("ip"))
        .and_then(Value::as_str);
    from_ips
        .chain(from_ip4)
        .filter_map(|cidr| cidr.parse::<ipnetwork::Ipv4Network>().ok())
        .map(|net| net.ip())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().expect("net"),
            subnet: "10.244.5.0/24".parse().expect("net"),
            mtu: 1450,
            ipmasq: false,
        }
    }

    fn conf(json: &str) -> FlannelConf {
        serde_json::from_str(json).expect("netconf")
    }

    /// The standard 10-flannel.conflist entry, as flannel's plugin renders it.
    #[test]
    fn standard_conflist_entry_becomes_flannels_bridge_delegate() {
        let c = conf(
            r#"{"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
                "delegate": {"hairpinMode": true, "isDefaultGateway": true}}"#,
        );
        let delegate = c.delegate_for(&env()).expect("delegate");
        assert_eq!(
            Value::Object(delegate),
            json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge",
                "hairpinMode": true, "isDefaultGateway": true, "isGateway": true,
                "ipMasq": true, "mtu": 1450,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.5.0/24"}]],
                         "routes": [{"dst": "10.244.0.0/16"}]}
            })
        );
        assert_eq!(c.subnet_file(), PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/cni/flannel"));
        assert_eq!(
            c.agent_socket(),
            PathBuf::from("/run/flannel/overlay-agent.sock")
        );
    }

    #[test]
    fn user_keys_win_and_ipam_is_completed_not_replaced() {
        let c = conf(
            r#"{"name": "n", "type": "flannel", "subnetFile": "/tmp/s.env",
                "runtimeConfig": {"portMappings": []},
                "delegate": {"type": "ptp", "mtu": 1400, "ipMasq": false},
                "ipam": {"dataDir": "/tmp/ipam", "ranges": "ignored",
                         "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.5.1"}]}}"#,
        );
        let delegate = c.delegate_for(&SubnetEnv {
            ipmasq: true,
            ..env()
        });
        let delegate = Value::Object(delegate.expect("delegate"));
        assert_eq!(delegate["type"], "ptp");
        assert_eq!(delegate["mtu"], 1400);
        assert_eq!(delegate["ipMasq"], false);
        // Not a bridge: no isGateway; no cniVersion declared: none passed on.
        assert!(delegate.get("isGateway").is_none());
        assert!(delegate.get("cniVersion").is_none());
        assert_eq!(delegate["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(
            delegate["ipam"],
            json!({"type": "host-local", "dataDir": "/tmp/ipam",
                   "ranges": [[{"subnet": "10.244.5.0/24"}]],
                   "routes": [{"dst": "192.168.0.0/16", "gw": "10.244.5.1"},
                              {"dst": "10.244.0.0/16"}]})
        );
        assert_eq!(c.agent_socket(), PathBuf::from("/tmp/overlay-agent.sock"));
    }

    #[test]
    fn bad_delegates_and_routes_are_named() {
        let e = env();
        let err = |json: &str| conf(json).delegate_for(&e).expect_err("must fail");
        assert_eq!(
            err(r#"{"delegate": {"type": 7}}"#),
            NetconfError::DelegateTypeNotString("7".into())
        );
        assert_eq!(
            err(r#"{"delegate": {"name": "x"}}"#),
            NetconfError::DelegateFieldReserved("name")
        );
        assert_eq!(
            err(r#"{"delegate": {"ipam": {}}}"#),
            NetconfError::DelegateFieldReserved("ipam")
        );
        let routes = err(r#"{"ipam": {"routes": [{"dst": "nonsense"}]}}"#);
        assert!(routes.to_string().contains("nonsense"), "{routes}");
    }

    #[test]
    fn result_addresses_of_every_layout() {
        let v031 = json!({"cniVersion": "0.3.1", "ips": [
            {"version": "4", "address": "10.244.5.2/24", "gateway": "10.244.5.1"},
            {"version": "6", "address": "fd00::2/64"}]});
        assert_eq!(
            result_ipv4s(&v031),
            vec!["10.244.5.2".parse::<std::net::Ipv4Addr>().expect("ip")]
        );
        let v020 = json!({"ip4": {"ip": "10.244.5.3/24"}});
        assert_eq!(
            result_ipv4s(&v020),
            vec!["10.244.5.3".parse::<std::net::Ipv4Addr>().expect("ip")]
        );
        assert!(result_ipv4s(&json!({})).is_empty());
    }
}
