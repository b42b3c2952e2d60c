//! A v2-only cluster as the seeds run it (issue 13): etcd 3.4 with `--enable-v2=true`, the
//! config written with `ETCDCTL_API=2 etcdctl mk`, a node programmed by hand as flanneld 0.7
//! does (its lease set with `etcdctl set --ttl`, old JSON without VNI), and a real agent
//! started with the seeds' flags only. Pods reach each other both ways; removing the
//! flanneld node's lease removes the agent's route to it.

use std::{net::Ipv4Addr, time::Duration};

use overlay_tests::{
    agent::AgentProcess,
    etcd::{EtcdOptions, EtcdServer},
    require_root,
    topology::{Cluster, ClusterOptions, Pod, UNDERLAY_PREFIX, parse_cidr},
    try_wait_until, wait_until,
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LONG: Duration = Duration::from_secs(30);
const MAC_A: &str = "0a:5e:11:22:33:44";

fn ping_ok(from: &Pod, to: Ipv4Addr, what: &str) {
    let found = try_wait_until(LONG, || from.ping_once(to));
    assert!(found, "ping {what} ({} -> {to}) never answered", from.ip);
}

#[test]
fn a_flanneld_0_7_node_and_an_agent_on_a_v2_only_cluster_reach_each_other() {
    require_root();
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 2,
        etcd: false,
        ..ClusterOptions::default()
    });
    let etcd_ip: Ipv4Addr = format!("{UNDERLAY_PREFIX}.254").parse().expect("ip");
    cluster.etcd = Some(EtcdServer::start_in_with(
        &cluster.fabric,
        etcd_ip,
        &EtcdOptions {
            enable_v2: true,
            ..EtcdOptions::default()
        },
    ));
    let etcd = cluster.etcd();
    etcd.etcdctl_v2(&["mk", &format!("{PREFIX}/config"), CONFIG]);
    // Node A: flanneld 0.7, by hand. Lease without VNI, device flannel.1.
    etcd.etcdctl_v2(&[
        "set",
        "--ttl",
        "86400",
        &format!("{PREFIX}/subnets/10.5.1.0-24"),
        &format!(
            r#"{{"PublicIP":"192.168.100.1","BackendType":"vxlan","BackendData":{{"VtepMAC":"{MAC_A}"}}}}"#
        ),
    ]);
    let a = &cluster.nodes[0].ns;
    for argv in [
        &[
            "ip",
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "192.168.100.1",
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ][..],
        &[
            "ip",
            "link",
            "set",
            "flannel.1",
            "address",
            MAC_A,
            "mtu",
            "1450",
        ],
        &["ip", "addr", "add", "10.5.1.0/32", "dev", "flannel.1"],
        &["ip", "link", "set", "flannel.1", "up"],
    ] {
        a.run(argv);
    }

    // Node B: the agent with the seeds' flags (no --etcd-api, no --backend).
    let node_b = &cluster.nodes[1];
    let args: Vec<String> = node_b
        .agent_args(&cluster.etcd_endpoint(), "vxlan")
        .into_iter()
        .filter(|a| !a.starts_with("--backend"))
        .collect();
    let agent = AgentProcess::spawn(&node_b.ns, &args);
    let found = try_wait_until(LONG, || cluster.nodes[1].subnet_env().is_some());
    assert!(
        found,
        "the agent wrote no subnet.env; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("etcd API v2 chosen"),
        "{}",
        agent.log()
    );
    let env = cluster.nodes[1].subnet_env().expect("subnet.env");
    let sb = env["FLANNEL_SUBNET"].clone();
    let mtu: u32 = env["FLANNEL_MTU"].parse().expect("mtu");
    let (b_ip, len) = parse_cidr(&sb);
    let b_net = Ipv4Addr::from(u32::from(b_ip) - 1);
    // Its lease is a v2 key with a TTL, in flannel's JSON.
    let b_key = format!("{PREFIX}/subnets/{b_net}-{len}");
    let lease = cluster
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

    // flanneld's programming on node A for B: neighbour, FDB, route.
    let a = &cluster.nodes[0].ns;
    a.run(&[
        "ip",
        "neigh",
        "replace",
        &b_net.to_string(),
        "lladdr",
        &b_mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    a.run(&[
        "bridge",
        "fdb",
        "append",
        &b_mac,
        "dev",
        "flannel.1",
        "dst",
        "192.168.100.2",
        "self",
        "permanent",
    ]);
    a.run(&[
        "ip",
        "route",
        "add",
        &format!("{b_net}/{len}"),
        "via",
        &b_net.to_string(),
        "dev",
        "flannel.1",
        "onlink",
    ]);
    cluster.nodes[0].add_pod("10.5.1.1/24", 1450);
    cluster.nodes[1].add_pod(&sb, mtu);
    let c = &cluster;
    let route_to_a = || {
        c.nodes[1]
            .ns
            .stdout(&["ip", "route", "show", "10.5.1.0/24"])
            .contains("flannel.1")
    };
    wait_until(
        LONG,
        "the agent's route to the flanneld 0.7 node",
        route_to_a,
    );
    let (pod_a, pod_b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    ping_ok(pod_b, pod_a.ip, "agent node -> flanneld node");
    ping_ok(pod_a, pod_b.ip, "flanneld node -> agent node");

    // The flanneld node's lease is removed (`etcdctl rm`): the agent drops its route.
    c.etcd()
        .etcdctl_v2(&["rm", &format!("{PREFIX}/subnets/10.5.1.0-24")]);
    wait_until(LONG, "the route to the removed peer to go", || {
        !route_to_a()
    });
    assert!(
        !pod_b.ping_once(pod_a.ip),
        "the removed peer is still reached"
    );
}
