//! A flanneld node, programmed by hand exactly as flanneld's vxlan backend programs it (with
//! iproute2): the device `flannel.1`, then per remote host one neighbour, one FDB entry and one
//! route. Tests put one beside the agent's dataplanes to prove the wire formats agree.

use std::{net::Ipv4Addr, time::Duration};

use crate::{
    etcd::{EtcdOptions, EtcdServer, KeysApi},
    netns::NetNs,
    topology::{Cluster, ClusterOptions, Pod, network, parse_cidr},
    wait_until,
};

/// flanneld's vxlan device (VNI 1).
pub const DEVICE: &str = "flannel.1";
/// flanneld's default etcd prefix.
pub const PREFIX: &str = "/coreos.com/network";
/// The network config of a [`FlanneldCluster`].
pub const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The subnet the flanneld node of a [`FlanneldCluster`] leases.
pub const FLANNELD_SUBNET: &str = "10.5.1.0/24";

/// Creates `flannel.1` as flanneld does: VNI 1, UDP port 8472, no learning, over `eth0` from
/// `local`, MTU 1450 (eth0's 1500 less VXLAN's 50), holding the network address of `subnet`
/// (e.g. "10.5.1.0/24") as a /32, up. `vtep_mac`: the lease's VtepMAC; `None` lets the kernel
/// choose one.
pub fn add_device(ns: &NetNs, local: Ipv4Addr, subnet: &str, vtep_mac: Option<&str>) {
    let local = local.to_string();
    let mut add = vec!["ip", "link", "add", DEVICE];
    if let Some(mac) = vtep_mac {
        add.extend(["address", mac]);
    }
    add.extend([
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.run(&add);
    let (ip, len) = parse_cidr(subnet);
    let address = format!("{}/32", network(ip, len));
    ns.run(&["ip", "addr", "add", &address, "dev", DEVICE]);
    ns.run(&["ip", "link", "set", DEVICE, "mtu", "1450", "up"]);
}

/// flanneld's entries for one remote host, in its order: the neighbour (the network address
/// of the host's `subnet` at its `vtep_mac`), the FDB entry (that MAC at its `public_ip`) and
/// the route (the subnet via that address, onlink). All `replace`, as flanneld's netlink
/// calls are, so repeating a host changes nothing.
pub fn add_peer(ns: &NetNs, subnet: &str, vtep_mac: &str, public_ip: Ipv4Addr) {
    let (ip, len) = parse_cidr(subnet);
    let gateway = network(ip, len).to_string();
    ns.run(&[
        "ip",
        "neigh",
        "replace",
        &gateway,
        "lladdr",
        vtep_mac,
        "dev",
        DEVICE,
        "nud",
        "permanent",
    ]);
    ns.run(&[
        "bridge",
        "fdb",
        "replace",
        vtep_mac,
        "dev",
        DEVICE,
        "dst",
        &public_ip.to_string(),
        "self",
        "permanent",
    ]);
    ns.run(&[
        "ip",
        "route",
        "replace",
        &format!("{gateway}/{len}"),
        "via",
        &gateway,
        "dev",
        DEVICE,
        "onlink",
    ]);
}

/// flannel's lease key for FLANNEL_SUBNET `subnet`: `<prefix>/subnets/10.5.7.0-24` for
/// `10.5.7.1/24`.
pub fn lease_key(prefix: &str, subnet: &str) -> String {
    let (ip, len) = parse_cidr(subnet);
    format!("{prefix}/subnets/{}-{len}", network(ip, len))
}

/// The VtepMAC of a lease's JSON value.
pub fn vtep_mac_of(lease: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(lease)
        .unwrap_or_else(|err| panic!("lease value is not JSON ({err}): {lease}"));
    json["BackendData"]["VtepMAC"]
        .as_str()
        .unwrap_or_else(|| panic!("no VtepMAC in {lease}"))
        .to_owned()
}

/// Two nodes on one etcd whose keys are written through a chosen API: node 1
/// (192.168.100.1) is a flanneld node programmed by hand, its lease of [`FLANNELD_SUBNET`]
/// and its `flannel.1`; node 2 (192.168.100.2) is for the agent under test.
pub struct FlanneldCluster {
    pub cluster: Cluster,
    pub api: KeysApi,
}

impl FlanneldCluster {
    /// Starts etcd (serving the v2 keys API too for [`KeysApi::V2`]), writes [`CONFIG`] and the
    /// flanneld node's `lease` (its JSON, shaped like the flanneld version's, naming
    /// `vtep_mac`) through `api`, and creates the node's `flannel.1` with `vtep_mac`.
    pub fn start(api: KeysApi, vtep_mac: &str, lease: &str) -> FlanneldCluster {
        let mut cluster = Cluster::with(ClusterOptions {
            nodes: 2,
            etcd: false,
            ..ClusterOptions::default()
        });
        let etcd = cluster.start_etcd(&EtcdOptions {
            enable_v2: api == KeysApi::V2,
            ..EtcdOptions::default()
        });
        etcd.put_config_in(api, PREFIX, CONFIG);
        etcd.put_lease_in(api, &lease_key(PREFIX, FLANNELD_SUBNET), lease);
        let flanneld = &cluster.nodes[0];
        add_device(&flanneld.ns, flanneld.ip, FLANNELD_SUBNET, Some(vtep_mac));
        FlanneldCluster { cluster, api }
    }

    pub fn etcd(&self) -> &EtcdServer {
        self.cluster.etcd()
    }

    /// Once the agent on node 2 holds `agent_subnet` (FLANNEL_SUBNET, with FLANNEL_MTU
    /// `agent_mtu`) and publishes `agent_vtep_mac`: programs node 1 for node 2 as flanneld does
    /// on that lease event, puts a pod on each node and waits (up to `timeout`) for the
    /// agent's route to node 1.
    pub fn connect(
        &mut self,
        agent_subnet: &str,
        agent_mtu: u32,
        agent_vtep_mac: &str,
        timeout: Duration,
    ) {
        let (ip, len) = parse_cidr(agent_subnet);
        let agent_ip = self.cluster.nodes[1].ip;
        add_peer(
            &self.cluster.nodes[0].ns,
            &format!("{}/{len}", network(ip, len)),
            agent_vtep_mac,
            agent_ip,
        );
        self.cluster.nodes[0].add_pod("10.5.1.1/24", 1450);
        self.cluster.nodes[1].add_pod(agent_subnet, agent_mtu);
        wait_until(timeout, "the agent's route to the flanneld node", || {
            self.agent_routes_to_flanneld()
        });
    }

    /// Whether node 2 routes the flanneld node's subnet through `flannel.1`.
    pub fn agent_routes_to_flanneld(&self) -> bool {
        self.cluster.nodes[1]
            .ns
            .stdout(&["ip", "route", "show", FLANNELD_SUBNET])
            .contains(DEVICE)
    }

    /// The flanneld node's pod and the agent node's pod (after [`FlanneldCluster::connect`]).
    pub fn pods(&self) -> (&Pod, &Pod) {
        (
            &self.cluster.nodes[0].pods[0],
            &self.cluster.nodes[1].pods[0],
        )
    }
}
