//! A v2-only cluster as the seeds run it (issue 13): etcd 3.4 with `--enable-v2=true`, the
//! config written with `ETCDCTL_API=2 etcdctl mk`, a node programmed by hand as flanneld 0.7
//! does (its lease set with `etcdctl set --ttl`, old JSON without VNI), and a real agent
//! started with the seeds' flags only. Pods reach each other both ways; removing the
//! flanneld node's lease removes the agent's route to it.
//!
//! The cluster is the shared [`FlanneldCluster`] (the same one cluster.rs runs over etcd's v3
//! API); what is here is what v2 changes.

use std::time::Duration;

use overlay_tests::{
    agent::AgentProcess,
    etcd::KeysApi,
    flanneld::{FLANNELD_SUBNET, FlanneldCluster, PREFIX, lease_key},
    require_root, wait_until,
};

const LONG: Duration = Duration::from_secs(30);
const MAC_A: &str = "0a:5e:11:22:33:44";

#[test]
fn a_flanneld_0_7_node_and_an_agent_on_a_v2_only_cluster_reach_each_other() {
    require_root();
    // Node A: flanneld 0.7, by hand. Lease without VNI, device flannel.1.
    let mut interop = FlanneldCluster::start(
        KeysApi::V2,
        MAC_A,
        &format!(
            r#"{{"PublicIP":"192.168.100.1","BackendType":"vxlan","BackendData":{{"VtepMAC":"{MAC_A}"}}}}"#
        ),
    );

    // Node B: the agent with the seeds' flags (no --etcd-api, no --backend).
    let node_b = &interop.cluster.nodes[1];
    let args: Vec<String> = node_b
        .agent_args(&interop.cluster.etcd_endpoint(), "vxlan")
        .into_iter()
        .filter(|a| !a.starts_with("--backend"))
        .collect();
    let agent = AgentProcess::spawn(&node_b.ns, &args);
    let (sb, mtu) = node_b.wait_subnet_env(&agent, LONG);
    assert!(
        agent.log().contains("etcd API v2 chosen"),
        "{}",
        agent.log()
    );
    // Its lease is a v2 key with a TTL, in flannel's JSON.
    let b_key = lease_key(PREFIX, &sb);
    let lease = interop
        .etcd()
        .etcdctl_v2(&["-o", "extended", "get", &b_key]);
    assert!(lease.contains("TTL: 86"), "{lease}");
    let b_mac = lease
        .split("\"VtepMAC\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no VtepMAC in {lease}"))
        .to_owned();
    assert!(lease.contains(r#""BackendData":{"VNI":1,"#), "{lease}");

    // flanneld's programming on node A for B (neighbour, FDB, route), a pod on each node.
    interop.connect(&sb, mtu, &b_mac, LONG);
    let (pod_a, pod_b) = interop.pods();
    pod_b.wait_ping(pod_a.ip, LONG, "agent node -> flanneld node");
    pod_a.wait_ping(pod_b.ip, LONG, "flanneld node -> agent node");

    // The flanneld node's lease is removed (`etcdctl rm`): the agent drops its route.
    interop
        .etcd()
        .etcdctl_v2(&["rm", &lease_key(PREFIX, FLANNELD_SUBNET)]);
    wait_until(LONG, "the route to the removed peer to go", || {
        !interop.agent_routes_to_flanneld()
    });
    assert!(
        !pod_b.ping_once(pod_a.ip),
        "the removed peer is still reached"
    );
}
