//! `--ip-masq` rules in a real namespace: pods reaching the outside are masqueraded to the
//! node's address, pod-to-pod traffic keeps its source, and deleted rules come back.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    time::Duration,
};

use ipnetwork::Ipv4Network;
use overlay_agent::os::masq;
use overlay_tests::{netns::NetNs, topology::Cluster, wait_until};

/// Accepts one connection on `ip:port` inside `ns` and returns the client's address, while
/// `connect` runs.
fn source_seen_by(ns: &NetNs, ip: Ipv4Addr, port: u16, connect: impl FnOnce() + Send) -> Ipv4Addr {
    let listener = ns.enter(|| TcpListener::bind((ip, port)).expect("bind in fabric"));
    std::thread::scope(|scope| {
        let accept = scope.spawn(move || {
            let (mut stream, peer) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf);
            peer
        });
        connect();
        match accept.join().expect("accept thread") {
            SocketAddr::V4(peer) => *peer.ip(),
            SocketAddr::V6(peer) => panic!("unexpected IPv6 peer {peer}"),
        }
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn ip_masq_masquerades_outside_traffic_only_and_restores_deleted_rules() {
    let mut cluster = Cluster::new(1);
    let network: Ipv4Network = "10.5.0.0/16".parse().expect("net");
    let subnet: Ipv4Network = "10.5.52.0/24".parse().expect("net");
    // "Another node's pod" 10.5.99.2 lives in the fabric, routed both ways without NAT.
    cluster
        .fabric
        .run(&["ip", "addr", "add", "10.5.99.2/32", "dev", "lo"]);
    cluster
        .fabric
        .run(&["ip", "route", "add", "10.5.52.0/24", "via", "192.168.100.1"]);
    let node = &mut cluster.nodes[0];
    node.ns.run(&[
        "ip",
        "route",
        "add",
        "10.5.99.0/24",
        "via",
        "192.168.100.254",
    ]);
    node.add_pod("10.5.52.1/24", 1450);
    let node = &cluster.nodes[0];
    let pod = &node.pods[0];

    node.ns
        .enter(|| runtime().block_on(masq::apply(network, subnet)))
        .expect("apply rules");
    let listing = node.ns.stdout(&["nft", "list", "table", "ip", masq::TABLE]);
    assert!(listing.contains("masquerade fully-random"), "{listing}");
    // FORWARD accepts belong to iptables' filter table (overlay_agent::os::forward): here they
    // could not override a FORWARD policy of DROP.
    assert!(!listing.contains("hook forward"), "{listing}");

    let connect = |target: &'static str| {
        move || {
            pod.ns.run(&[
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{target}; exec 3>&-"),
            ]);
        }
    };
    let outside = source_seen_by(
        &cluster.fabric,
        "192.168.100.254".parse().expect("ip"),
        7001,
        connect("192.168.100.254/7001"),
    );
    assert_eq!(
        outside, node.ip,
        "a pod reaching the outside is masqueraded to the node's address"
    );
    let pod_to_pod = source_seen_by(
        &cluster.fabric,
        "10.5.99.2".parse().expect("ip"),
        7002,
        connect("10.5.99.2/7002"),
    );
    assert_eq!(
        pod_to_pod, pod.ip,
        "pod-to-pod traffic keeps the pod's address"
    );

    // Someone deletes the table: the keeper puts it back.
    let keeper = node.ns.enter(|| {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let ns_thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                tokio::select! {
                    _ = masq::keep_rules(network, subnet, Duration::from_millis(200)) => {}
                    _ = tokio::task::spawn_blocking(move || stop_rx.recv()) => {}
                }
            })
        });
        (stop_tx, ns_thread)
    });
    node.ns.run(&["nft", "delete", "table", "ip", masq::TABLE]);
    wait_until(
        Duration::from_secs(10),
        "the ip-masq table to be re-applied",
        || {
            node.ns
                .try_run(&["nft", "list", "table", "ip", masq::TABLE])
                .status
                .success()
        },
    );
    drop(keeper.0);
    keeper.1.join().expect("keeper thread");
}
