//! The fixtures themselves work: real etcd, real namespaces, real links, and cleanup.

use std::{process::Command, time::Duration};

use overlay_tests::{
    etcd::EtcdServer,
    topology::{Cluster, ClusterOptions, UnderlayKind},
    wait_until,
};

#[test]
fn etcd_fixture_serves_reads_and_writes_and_survives_a_restart() {
    let mut etcd = EtcdServer::start();
    etcd.put("/coreos.com/network/config", r#"{"Network":"10.5.0.0/16"}"#);
    assert_eq!(
        etcd.get("/coreos.com/network/config").as_deref(),
        Some(r#"{"Network":"10.5.0.0/16"}"#)
    );
    assert_eq!(
        etcd.keys("/coreos.com/"),
        vec!["/coreos.com/network/config".to_owned()]
    );
    etcd.stop();
    assert!(!etcd.is_running());
    etcd.restart();
    assert_eq!(
        etcd.keys("/coreos.com/").len(),
        1,
        "data survives a restart"
    );
    etcd.delete("/coreos.com/network/config");
    assert_eq!(etcd.get("/coreos.com/network/config"), None);
}

#[test]
fn switched_cluster_nodes_reach_each_other_and_etcd() {
    let cluster = Cluster::new(3);
    for node in &cluster.nodes {
        for other in &cluster.nodes {
            node.ns.run(&["ping", "-c1", "-W2", &other.ip.to_string()]);
        }
        // etcd answers from inside every node namespace.
        let output = node
            .ns
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", cluster.etcd_endpoint()))
            .args(["endpoint", "health"])
            .output()
            .expect("etcdctl");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn pods_behind_bridges_reach_their_gateway_and_namespaces_are_removed_on_drop() {
    let (node_ns, pod_ns) = {
        let mut cluster = Cluster::with(ClusterOptions {
            nodes: 2,
            underlay: UnderlayKind::DirectVeth,
            ..ClusterOptions::default()
        });
        cluster.nodes[0]
            .ns
            .run(&["ping", "-c1", "-W2", "192.168.100.2"]);
        let pod = cluster.nodes[0].add_pod("10.5.7.1/24", 1450);
        pod.ns.run(&["ping", "-c1", "-W2", "10.5.7.1"]);
        assert_eq!(pod.ip.to_string(), "10.5.7.2");
        let pod_name = pod.ns.name().to_owned();
        (cluster.nodes[0].ns.name().to_owned(), pod_name)
    };
    wait_until(Duration::from_secs(5), "namespaces deleted", || {
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns");
        let list = String::from_utf8_lossy(&list.stdout);
        !list.contains(&node_ns) && !list.contains(&pod_ns)
    });
}
