//! Test clusters: node namespaces joined by an underlay, a real etcd, pods behind bridges.
//!
//! ```text
//!  fabric ns: bridge sw0 192.168.100.254/24 (etcd :2379)
//!     |-- node ns 1: eth0 192.168.100.1/24 (default route via .254)
//!     |-- node ns 2: eth0 192.168.100.2/24        [pod ns] eth0 --- cni0 (bridge, subnet .1)
//!     ...
//! ```
//! With [`UnderlayKind::DirectVeth`] (two nodes), `eth0` of node 1 and node 2 are the two ends
//! of one veth pair (no switch hop, for benchmarks) and etcd is reached over a separate
//! management link `eth1` (192.168.200.0/24, etcd at 192.168.200.254).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    agent::AgentProcess,
    bpffs::{PIN_ROOT, ensure_bpffs},
    etcd::{EtcdOptions, EtcdServer},
    netns::NetNs,
    try_wait_until, unique_name,
};

/// The underlay network's addresses.
pub const UNDERLAY_PREFIX: &str = "192.168.100";
pub const MGMT_PREFIX: &str = "192.168.200";

/// How node namespaces are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayKind {
    /// Every node's eth0 on one switch bridge (any number of nodes); etcd on the switch.
    Switch,
    /// Exactly two nodes whose eth0s are one veth pair; etcd on a management link eth1.
    DirectVeth,
}

/// How to build a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub underlay: UnderlayKind,
    pub underlay_mtu: u32,
    /// Start etcd in the fabric namespace.
    pub etcd: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 2,
            underlay: UnderlayKind::Switch,
            underlay_mtu: 1500,
            etcd: true,
        }
    }
}

/// A pod: a namespace whose eth0 hangs off its node's `cni0` bridge.
#[derive(Debug)]
pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// One ping to `ip` with a 1 s timeout; true when it was answered.
    pub fn ping_once(&self, ip: Ipv4Addr) -> bool {
        self.ns
            .try_run(&["ping", "-c1", "-W1", "-q", &ip.to_string()])
            .status
            .success()
    }

    /// Pings `ip` until it answers; panics naming `what` after `timeout`.
    pub fn wait_ping(&self, ip: Ipv4Addr, timeout: Duration, what: &str) {
        let found = try_wait_until(timeout, || self.ping_once(ip));
        assert!(found, "ping {what} ({} -> {ip}) never answered", self.ip);
    }
}

/// A node: a namespace with the underlay on eth0, and its own scratch directory.
#[derive(Debug)]
pub struct Node {
    pub pods: Vec<Pod>,
    pub ns: NetNs,
    /// 1-based node number; the node's underlay address is 192.168.100.<index>.
    pub index: usize,
    pub ip: Ipv4Addr,
    /// Where the agent keeps its pinned BPF objects (removed on drop).
    pub pin_dir: PathBuf,
    dir: TempDir,
}

impl Node {
    /// The subnet file the agent of this node writes (pass as `--subnet-file`).
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    /// A scratch directory for this node.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The subnet file's variables, if it exists.
    pub fn subnet_env(&self) -> Option<HashMap<String, String>> {
        let text = std::fs::read_to_string(self.subnet_file()).ok()?;
        Some(
            text.lines()
                .filter_map(|line| line.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// Waits until the agent of this node wrote its subnet file (panics with the agent's log
    /// after `timeout`); returns (FLANNEL_SUBNET, FLANNEL_MTU).
    pub fn wait_subnet_env(&self, agent: &AgentProcess, timeout: Duration) -> (String, u32) {
        let found = try_wait_until(timeout, || self.subnet_env().is_some());
        assert!(
            found,
            "node {} wrote no subnet.env; log:\n{}",
            self.index,
            agent.log()
        );
        let env = self.subnet_env().expect("subnet.env");
        (
            env["FLANNEL_SUBNET"].clone(),
            env["FLANNEL_MTU"].parse().expect("FLANNEL_MTU"),
        )
    }

    /// The pods' veth ends on this node (the veth ports of `cni0`), in ifindex order.
    pub fn pod_host_veths(&self) -> Vec<String> {
        self.ns
            .stdout(&["ip", "-o", "link", "show", "master", "cni0", "type", "veth"])
            .lines()
            .filter_map(|line| line.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or("").to_owned())
            .collect()
    }

    /// Standard agent arguments for this node: etcd endpoint, subnet file, pin dir, uplink.
    pub fn agent_args(&self, etcd_endpoint: &str, backend: &str) -> Vec<String> {
        vec![
            format!("--etcd-endpoints={etcd_endpoint}"),
            format!("--subnet-file={}", self.subnet_file().display()),
            format!("--bpf-pin-dir={}", self.pin_dir.display()),
            "--iface=eth0".to_owned(),
            format!("--backend={backend}"),
        ]
    }

    /// Adds a pod behind bridge `cni0` (created on first use with the subnet's first address,
    /// as docker's `--bip=$FLANNEL_SUBNET` or the CNI bridge plugin would). `subnet` is
    /// `FLANNEL_SUBNET` (e.g. "10.5.52.1/24"); `mtu` is `FLANNEL_MTU`.
    pub fn add_pod(&mut self, subnet: &str, mtu: u32) -> &Pod {
        let (gateway, prefix_len) = parse_cidr(subnet);
        let gateway = first_host(gateway, prefix_len);
        let has_bridge = self
            .ns
            .try_run(&["ip", "link", "show", "cni0"])
            .status
            .success();
        if !has_bridge {
            add_bridge(
                &self.ns,
                "cni0",
                &format!("{gateway}/{prefix_len}"),
                Some(mtu),
            );
        }
        let pod_ip = Ipv4Addr::from(u32::from(gateway) + 1 + self.pods.len() as u32);
        let pod_ns = NetNs::new("op");
        let host_end = unique_name("vp");
        self.ns.add_veth(&host_end, &pod_ns, "eth0", Some(mtu));
        self.ns
            .run(&["ip", "link", "set", &host_end, "master", "cni0", "up"]);
        pod_ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{pod_ip}/{prefix_len}"),
            "dev",
            "eth0",
        ]);
        pod_ns.run(&["ip", "link", "set", "eth0", "up"]);
        pod_ns.run(&["ip", "route", "add", "default", "via", &gateway.to_string()]);
        self.pods.push(Pod {
            ns: pod_ns,
            ip: pod_ip,
        });
        self.pods.last().expect("just pushed")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Nodes, their underlay and a real etcd. Everything is removed on drop.
pub struct Cluster {
    // Drop order matters: processes and nodes first, the fabric (switch) last.
    pub etcd: Option<EtcdServer>,
    pub nodes: Vec<Node>,
    pub fabric: NetNs,
    pub underlay: UnderlayKind,
    /// Where etcd listens (on the fabric), as the nodes reach it.
    etcd_ip: Ipv4Addr,
}

impl Cluster {
    /// `nodes` nodes on a switch, MTU 1500, with etcd.
    pub fn new(nodes: usize) -> Cluster {
        Cluster::with(ClusterOptions {
            nodes,
            ..ClusterOptions::default()
        })
    }

    pub fn with(options: ClusterOptions) -> Cluster {
        crate::require_root();
        ensure_bpffs();
        let fabric = NetNs::new("of");
        let mtu = Some(options.underlay_mtu);
        let mut nodes = Vec::new();
        for index in 1..=options.nodes {
            let ns = NetNs::new("on");
            ns.sysctl("net.ipv4.ip_forward", "1");
            let ip: Ipv4Addr = format!("{UNDERLAY_PREFIX}.{index}").parse().expect("ip");
            let pin_dir = Path::new(PIN_ROOT).join(ns.name());
            let dir = tempfile::Builder::new()
                .prefix("overlay-node-")
                .tempdir()
                .expect("tempdir");
            nodes.push(Node {
                pods: Vec::new(),
                ns,
                index,
                ip,
                pin_dir,
                dir,
            });
        }
        let etcd_ip: Ipv4Addr = match options.underlay {
            UnderlayKind::Switch => {
                add_bridge(&fabric, "sw0", &format!("{UNDERLAY_PREFIX}.254/24"), mtu);
                for node in &nodes {
                    let port = format!("p{}", node.index);
                    fabric.add_veth(&port, &node.ns, "eth0", mtu);
                    fabric.run(&["ip", "link", "set", &port, "master", "sw0", "up"]);
                    setup_node_link(node, "eth0", &format!("{}/24", node.ip));
                    node.ns.run(&[
                        "ip",
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("{UNDERLAY_PREFIX}.254"),
                    ]);
                }
                format!("{UNDERLAY_PREFIX}.254").parse().expect("ip")
            }
            UnderlayKind::DirectVeth => {
                assert_eq!(
                    options.nodes, 2,
                    "a direct veth underlay joins exactly two nodes"
                );
                nodes[0].ns.add_veth("eth0", &nodes[1].ns, "eth0", mtu);
                add_bridge(&fabric, "mg0", &format!("{MGMT_PREFIX}.254/24"), None);
                for node in &nodes {
                    setup_node_link(node, "eth0", &format!("{}/24", node.ip));
                    let port = format!("m{}", node.index);
                    fabric.add_veth(&port, &node.ns, "eth1", None);
                    fabric.run(&["ip", "link", "set", &port, "master", "mg0", "up"]);
                    setup_node_link(node, "eth1", &format!("{MGMT_PREFIX}.{}/24", node.index));
                }
                // The default route uses the underlay so that default-route interface
                // selection picks eth0, as on a real host.
                nodes[0].ns.run(&[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &nodes[1].ip.to_string(),
                ]);
                nodes[1].ns.run(&[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &nodes[0].ip.to_string(),
                ]);
                format!("{MGMT_PREFIX}.254").parse().expect("ip")
            }
        };
        let etcd = options.etcd.then(|| EtcdServer::start_in(&fabric, etcd_ip));
        Cluster {
            etcd,
            nodes,
            fabric,
            underlay: options.underlay,
            etcd_ip,
        }
    }

    /// Starts etcd with `options` (mTLS, the v2 keys API) where the nodes reach it, for a
    /// cluster built without one (`etcd: false`).
    pub fn start_etcd(&mut self, options: &EtcdOptions) -> &mut EtcdServer {
        assert!(self.etcd.is_none(), "this cluster already runs etcd");
        self.etcd.insert(EtcdServer::start_in_with(
            &self.fabric,
            self.etcd_ip,
            options,
        ))
    }

    /// The running etcd (panics when the cluster was built without one).
    pub fn etcd(&self) -> &EtcdServer {
        self.etcd.as_ref().expect("this cluster has no etcd")
    }

    pub fn etcd_mut(&mut self) -> &mut EtcdServer {
        self.etcd.as_mut().expect("this cluster has no etcd")
    }

    /// The etcd endpoint as the nodes reach it.
    pub fn etcd_endpoint(&self) -> String {
        self.etcd().endpoint().to_owned()
    }

    /// Writes the network config at `<prefix>/config`.
    pub fn put_config(&self, prefix: &str, json: &str) {
        self.etcd().put(&format!("{prefix}/config"), json);
    }
}

/// A bridge `name` holding `cidr`, up, at `mtu` (None: the kernel's default).
fn add_bridge(ns: &NetNs, name: &str, cidr: &str, mtu: Option<u32>) {
    let mtu = mtu.map(|mtu| mtu.to_string());
    let mut argv = vec!["ip", "link", "add", name];
    if let Some(mtu) = &mtu {
        argv.extend(["mtu", mtu.as_str()]);
    }
    argv.extend(["type", "bridge"]);
    ns.run(&argv);
    ns.run(&["ip", "addr", "add", cidr, "dev", name]);
    ns.run(&["ip", "link", "set", name, "up"]);
}

fn setup_node_link(node: &Node, name: &str, cidr: &str) {
    node.ns.run(&["ip", "addr", "add", cidr, "dev", name]);
    node.ns.run(&["ip", "link", "set", name, "up"]);
}

/// Parses "a.b.c.d/len".
pub fn parse_cidr(cidr: &str) -> (Ipv4Addr, u8) {
    let (ip, len) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("not a CIDR: {cidr}"));
    (
        ip.parse()
            .unwrap_or_else(|_| panic!("bad address in {cidr}")),
        len.parse()
            .unwrap_or_else(|_| panic!("bad prefix length in {cidr}")),
    )
}

/// The network address of `ip`/`prefix_len` (host bits cleared).
pub fn network(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

/// The first host address of the network containing `ip`.
pub fn first_host(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network(ip, prefix_len)) + 1)
}
