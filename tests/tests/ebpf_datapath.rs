//! The eBPF datapath over the real kernel vxlan dataplane, on the shared fixtures: two nodes
//! joined by a veth underlay, a pod behind `cni0` on each. Node A runs
//! `EbpfDataplane<VxlanDataplane>`, node B only `VxlanDataplane` (a flannel node). Traffic in
//! both directions, counted by A's programs, proves wire compatibility with flannel's device;
//! a kube-proxy-style DNAT proves Service replies still meet conntrack.
//!
//! The dataplanes run in-process on a thread that entered node A's namespace, on one
//! current-thread runtime for the whole scenario (their netlink connections live on it).

use std::time::Duration;

use overlay_agent::{
    control::config::{BackendConfig, BackendType},
    dataplane::{
        Dataplane, LeaseAttrs, LocalLease,
        ebpf::{EbpfDataplane, EbpfSettings, FastPath},
        vxlan::VxlanDataplane,
    },
    os::iface::{IfaceOptions, Uplink, select_uplink},
    peer::{MacAddr6, Peer, PeerEvent},
};
use overlay_common::stat;
use overlay_tests::{
    stats::{delta, fast_rx_packets, moved},
    topology::{Cluster, ClusterOptions, Node, UnderlayKind},
    wait_until,
};

const SUBNET_A: &str = "10.5.1.0/24";
const SUBNET_B: &str = "10.5.2.0/24";

fn backend() -> BackendConfig {
    BackendConfig {
        kind: BackendType::Vxlan,
        vni: 1,
        port: 8472,
        mtu: None,
        gbp: false,
        learning: false,
        direct_routing: false,
    }
}

fn lease(subnet: &str, node: &Node) -> LocalLease {
    LocalLease {
        subnet: subnet.parse().expect("subnet"),
        network: "10.5.0.0/16".parse().expect("network"),
        public_ip: node.ip,
    }
}

fn vtep_mac(attrs: &LeaseAttrs) -> MacAddr6 {
    match attrs {
        LeaseAttrs::Vxlan { vtep_mac, .. } => *vtep_mac,
        other => panic!("expected vxlan lease attributes, got {other:?}"),
    }
}

async fn uplink() -> Uplink {
    select_uplink(&IfaceOptions {
        iface: vec!["eth0".to_owned()],
        ..IfaceOptions::default()
    })
    .await
    .expect("select uplink")
}

fn cluster() -> Cluster {
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 2,
        underlay: UnderlayKind::DirectVeth,
        etcd: false,
        ..ClusterOptions::default()
    });
    cluster.nodes[0].add_pod("10.5.1.1/24", 1450);
    cluster.nodes[1].add_pod("10.5.2.1/24", 1450);
    cluster
}

/// Node B as a flannel node that knows A; returns B's VtepMAC.
fn start_kernel_node_b(cluster: &Cluster, mac_a: MacAddr6) -> MacAddr6 {
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let peer_a = Peer {
        subnet: SUBNET_A.parse().expect("subnet"),
        public_ip: a.ip,
        vtep_mac: Some(mac_a),
    };
    let lease_b = lease(SUBNET_B, b);
    b.ns.block_on(|| async move {
        let (mut kernel_b, attrs) = VxlanDataplane::new(uplink().await, &backend())
            .await
            .expect("node B vxlan dataplane");
        kernel_b.activate(&lease_b).await.expect("activate B");
        kernel_b
            .apply(&PeerEvent::Snapshot(vec![peer_a]))
            .await
            .expect("peers B");
        // Dropping the dataplane leaves the device, neighbours and routes programmed.
        vtep_mac(&attrs)
    })
}

/// Runs `check` with node A on `EbpfDataplane<VxlanDataplane>` and node B on
/// `VxlanDataplane`, both programmed.
fn with_nodes(
    check: impl FnOnce(&Cluster, &mut EbpfDataplane<VxlanDataplane>, &tokio::runtime::Runtime) + Send,
) {
    let cluster = cluster();
    let a = &cluster.nodes[0];
    let cluster_ref = &cluster;
    a.ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let a = &cluster_ref.nodes[0];
        let b = &cluster_ref.nodes[1];
        let uplink_a = rt.block_on(uplink());
        let (kernel_a, attrs) = rt
            .block_on(VxlanDataplane::new(uplink_a.clone(), &backend()))
            .expect("node A vxlan dataplane");
        let mac_a = vtep_mac(&attrs);
        let mac_b = start_kernel_node_b(cluster_ref, mac_a);
        let settings = EbpfSettings {
            pin_dir: a.pin_dir.clone(),
            bridge: None,
            uplink: uplink_a,
            vni: 1,
            port: 8472,
            vtep_mac: Some(mac_a),
            vxlan_device: kernel_a.device_name().to_owned(),
            fast_path: FastPath::ALL,
        };
        let _runtime = rt.enter();
        let mut dp = EbpfDataplane::new(kernel_a, settings)
            .unwrap_or_else(|unavailable| panic!("{unavailable}"));
        rt.block_on(dp.activate(&lease(SUBNET_A, a)))
            .expect("activate A");
        let peer_b = Peer {
            subnet: SUBNET_B.parse().expect("subnet"),
            public_ip: b.ip,
            vtep_mac: Some(mac_b),
        };
        rt.block_on(dp.apply(&PeerEvent::Snapshot(vec![peer_b])))
            .expect("peers A");
        check(cluster_ref, &mut dp, &rt);
    });
}

#[test]
fn ebpf_node_and_flannel_kernel_node_talk_both_ways() {
    with_nodes(|cluster, dp, rt| {
        let (pod_a, pod_b) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
        rt.block_on(dp.maintain()).expect("maintain");
        let before = dp.stats().expect("stats");
        wait_until(Duration::from_secs(20), "pod A reaches pod B", || {
            pod_a.ping_once(pod_b.ip)
        });
        for (from, to) in [(pod_a, pod_b), (pod_b, pod_a)] {
            let out = from.ns.ping(to.ip, 5, "0.2");
            assert!(out.status.success(), "{} -> {}: {out:?}", from.ip, to.ip);
        }
        // TCP both ways: after the handshake crossed the kernel path, the flow is learned
        // and its data takes the fast path (wire-compatible with the kernel vxlan node).
        for (port, reverse) in [(5201u16, false), (5202, true)] {
            let _server = pod_b.ns.iperf3_server(port);
            let mut args = vec!["-t", "1"];
            if reverse {
                args.push("-R");
            }
            let out = pod_a.ns.iperf3_client(&pod_b.ip.to_string(), port, &args);
            assert!(out.status.success(), "iperf3 reverse {reverse}: {out:?}");
        }
        let after = dp.stats().expect("stats");
        assert!(
            delta(&before, &after, stat::FAST_TX_PACKETS) > 0
                && fast_rx_packets(&before, &after) > 0,
            "A's fast paths carried the TCP data: {:?}",
            moved(&before, &after)
        );
        for bad in [
            stat::KERNEL_HELPER_ERROR,
            stat::DROP_HELPER_ERROR,
            stat::DROP_UNKNOWN_SOURCE,
        ] {
            assert_eq!(
                delta(&before, &after, bad),
                0,
                "{:?}",
                moved(&before, &after)
            );
        }
    });
}

#[test]
fn service_dnat_replies_meet_conntrack() {
    with_nodes(|cluster, dp, rt| {
        let (a, pod_a, pod_b) = (
            &cluster.nodes[0],
            &cluster.nodes[0].pods[0],
            &cluster.nodes[1].pods[0],
        );
        rt.block_on(dp.maintain()).expect("maintain");
        // br_netfilter on (if the module exists), as kube-proxy requires.
        let _ =
            a.ns.try_run(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        let _server = pod_b.ns.iperf3_server(5201);
        let dnat =
            a.ns.add_tcp_dnat("10.96.0.10", 80, &format!("{}:5201", pod_b.ip));
        assert!(dnat.status.success(), "DNAT rule: {dnat:?}");
        let before = dp.stats().expect("stats");
        let out = pod_a.ns.iperf3_client("10.96.0.10", 80, &["-t", "1"]);
        let after = dp.stats().expect("stats");
        assert!(
            out.status.success(),
            "TCP to a DNAT 'Service' backed by the remote pod failed: {out:?}; counters {:?}",
            moved(&before, &after)
        );
        assert!(
            delta(&before, &after, stat::FAST_TX_PACKETS) == 0
                && delta(&before, &after, stat::FAST_RX_BEFORE_DECAP_PACKETS) == 0
                && delta(&before, &after, stat::FAST_RX_AFTER_DECAP_PACKETS) == 0
                && delta(&before, &after, stat::KERNEL_NOT_LEARNED) > 0,
            "the NATed Service flow stayed on the kernel path: {:?}",
            moved(&before, &after)
        );
    });
}
