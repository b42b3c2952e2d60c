//! The kernel vxlan and host-gw dataplanes in real network namespaces. Every check reads the
//! kernel's state back through iproute2 (`ip -j`, `bridge -j`), never the dataplane's memory.
//! The dataplanes run in-process on a thread that entered the namespace, on a current-thread
//! runtime built inside it (so their netlink sockets live there).

use std::{net::Ipv4Addr, time::Duration};

use overlay_agent::{
    control::config::{BackendConfig, BackendType},
    dataplane::{
        Dataplane, LeaseAttrs, LocalLease,
        host_gw::HostGwDataplane,
        vxlan::{self, VxlanDataplane},
    },
    os::iface::{IfaceOptions, Uplink, select_uplink},
    peer::{MacAddr6, Peer, PeerEvent},
};
use overlay_tests::{
    flanneld,
    netns::NetNs,
    topology::{Cluster, ClusterOptions, UnderlayKind},
    wait_until,
};
use serde_json::Value;

const NETWORK: &str = "10.5.0.0/16";

/// A node namespace whose uplink `eth0` (one end of a veth pair; its peer `eth0p` stays in the
/// namespace) holds `ip`/24, with a default route via .254 of that subnet.
fn node_ns(prefix: &str, ip: &str) -> NetNs {
    let ns = NetNs::new(prefix);
    ns.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    ns.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.run(&["ip", "link", "set", "eth0", "up"]);
    ns.run(&["ip", "link", "set", "eth0p", "up"]);
    let gateway = format!("{}.254", ip.rsplit_once('.').expect("dotted ip").0);
    ns.run(&["ip", "route", "add", "default", "via", &gateway]);
    ns
}

fn backend(vni: u32, port: u16, direct_routing: bool) -> BackendConfig {
    BackendConfig {
        kind: BackendType::Vxlan,
        vni,
        port,
        mtu: None,
        gbp: false,
        learning: false,
        direct_routing,
    }
}

fn lease(subnet: &str, public_ip: &str) -> LocalLease {
    LocalLease {
        subnet: subnet.parse().expect("subnet"),
        network: NETWORK.parse().expect("network"),
        public_ip: public_ip.parse().expect("ip"),
    }
}

fn peer(subnet: &str, public_ip: &str, mac: Option<&str>) -> Peer {
    Peer {
        subnet: subnet.parse().expect("subnet"),
        public_ip: public_ip.parse().expect("ip"),
        vtep_mac: mac.map(|mac| mac.parse().expect("mac")),
    }
}

async fn uplink(iface: &str, public_ip: Option<&str>) -> Uplink {
    select_uplink(&IfaceOptions {
        iface: vec![iface.to_owned()],
        public_ip: public_ip.map(|ip| ip.parse().expect("ip")),
        ..IfaceOptions::default()
    })
    .await
    .expect("select uplink")
}

fn json(ns: &NetNs, argv: &[&str]) -> Vec<Value> {
    let text = ns.stdout(argv);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{argv:?}: {err}: {text}"))
}

/// The vxlan dataplane of node 192.168.100.1 (VNI 1, port 8472), activated for
/// 10.5.1.0/24, in the current namespace.
async fn activated_vxlan() -> (VxlanDataplane, LeaseAttrs) {
    let uplink = uplink("eth0", None).await;
    let (mut dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 8472, false))
        .await
        .expect("dataplane");
    dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
        .await
        .expect("activate");
    (dp, attrs)
}

fn device_is_up(ns: &NetNs, name: &str) -> bool {
    link(ns, name).is_some_and(|device| {
        device["flags"]
            .as_array()
            .is_some_and(|flags| flags.iter().any(|f| f == "UP"))
    })
}

fn link(ns: &NetNs, name: &str) -> Option<Value> {
    let out = ns.try_run(&["ip", "-j", "-d", "link", "show", "dev", name]);
    if !out.status.success() {
        return None;
    }
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("link json");
    list.into_iter().next()
}

fn s(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `ip neigh show dev DEV` as "IP lladdr MAC STATE" lines, sorted.
fn neighbours(ns: &NetNs, dev: &str) -> Vec<String> {
    let mut lines: Vec<String> = json(ns, &["ip", "-j", "neigh", "show", "dev", dev])
        .iter()
        .map(|n| {
            let states: Vec<String> = n["state"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            format!(
                "{} lladdr {} {}",
                s(&n["dst"]),
                s(&n["lladdr"]),
                states.join(",")
            )
        })
        .collect();
    lines.sort();
    lines
}

/// `bridge fdb show dev DEV` as "MAC dst IP FLAGS STATE" lines, sorted.
fn fdb(ns: &NetNs, dev: &str) -> Vec<String> {
    let mut lines: Vec<String> = json(ns, &["bridge", "-j", "fdb", "show", "dev", dev])
        .iter()
        .map(|e| {
            let flags: Vec<String> = e["flags"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            format!(
                "{} dst {} {} {}",
                s(&e["mac"]),
                s(&e["dst"]),
                flags.join(","),
                s(&e["state"])
            )
        })
        .collect();
    lines.sort();
    lines
}

/// " onlink" when `ip -j`'s flags of a route or nexthop say so.
fn onlink(entry: &Value) -> &'static str {
    match entry["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "onlink"))
    {
        true => " onlink",
        false => "",
    }
}

/// Main-table routes as "DST [nhid N] via GW dev DEV proto P [onlink]" lines, sorted.
fn routes(ns: &NetNs, table: &str) -> Vec<String> {
    let mut lines: Vec<String> = json(ns, &["ip", "-j", "-d", "route", "show", "table", table])
        .iter()
        .map(|r| {
            let mut line = s(&r["dst"]);
            if !r["nhid"].is_null() {
                line += &format!(" nhid {}", r["nhid"]);
            }
            if !r["gateway"].is_null() {
                line += &format!(" via {}", s(&r["gateway"]));
            }
            line += &format!(" dev {} proto {}", s(&r["dev"]), s(&r["protocol"]));
            line + onlink(r)
        })
        .collect();
    lines.sort();
    lines
}

fn vtep_mac(attrs: &LeaseAttrs) -> MacAddr6 {
    match attrs {
        LeaseAttrs::Vxlan { vtep_mac, .. } => *vtep_mac,
        other => panic!("expected vxlan lease attributes, got {other:?}"),
    }
}

/// Checks the device is exactly flannel's: vxlan id, local, dev, dstport, nolearning, MTU,
/// MAC, up, one /32 address.
fn assert_flannel_device(
    ns: &NetNs,
    name: &str,
    vni: u64,
    port: u64,
    mac: MacAddr6,
    subnet_ip: &str,
) {
    let device = link(ns, name).unwrap_or_else(|| panic!("{name} missing"));
    let info = &device["linkinfo"];
    assert_eq!(info["info_kind"], "vxlan", "{device}");
    let data = &info["info_data"];
    assert_eq!(data["id"], vni, "{device}");
    assert_eq!(data["local"], "192.168.100.1", "{device}");
    assert_eq!(data["link"], "eth0", "{device}");
    assert_eq!(data["port"], port, "{device}");
    assert_eq!(data["learning"], false, "{device}");
    assert_eq!(device["mtu"], 1450, "{device}");
    assert_eq!(
        device["address"],
        mac.to_string().to_lowercase(),
        "{device}"
    );
    assert!(
        device["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|f| f == "UP"),
        "{name} is not up: {device}"
    );
    let addresses: Vec<String> = json(ns, &["ip", "-j", "-4", "addr", "show", "dev", name])
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", s(&a["local"]), s(&a["prefixlen"])))
        .collect();
    assert_eq!(addresses, vec![format!("{subnet_ip}/32")]);
}

const MAC_A: &str = "02:aa:00:00:00:02";
const MAC_B: &str = "02:bb:00:00:00:03";
const MAC_C: &str = "02:cc:00:00:00:04";

#[test]
fn vxlan_programs_device_and_peers_exactly_like_flannel() {
    let ns = node_ns("kvx", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        assert_eq!(
            (uplink.name.as_str(), uplink.address, uplink.mtu),
            ("eth0", Ipv4Addr::new(192, 168, 100, 1), 1500)
        );
        let (mut dp, attrs) = VxlanDataplane::new(uplink.clone(), &backend(1, 8472, false))
            .await
            .expect("create vxlan dataplane");
        let mac = vtep_mac(&attrs);
        assert_eq!(
            mac.as_bytes()[0] & 0x03,
            0x02,
            "VtepMAC {mac} must be unicast, locally administered"
        );
        assert!(matches!(attrs, LeaseAttrs::Vxlan { vni: 1, .. }));

        dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
            .await
            .expect("activate");
        assert_flannel_device(&ns, "flannel.1", 1, 8472, mac, "10.5.1.0");

        dp.apply(&PeerEvent::Upsert(peer(
            "10.5.2.0/24",
            "192.168.100.2",
            Some(MAC_A),
        )))
        .await
        .expect("upsert A");
        dp.apply(&PeerEvent::Upsert(peer(
            "10.5.3.0/24",
            "192.168.100.3",
            Some(MAC_B),
        )))
        .await
        .expect("upsert B");
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            vec![
                format!("10.5.2.0 lladdr {MAC_A} PERMANENT"),
                format!("10.5.3.0 lladdr {MAC_B} PERMANENT"),
            ]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![
                format!("{MAC_A} dst 192.168.100.2 self permanent"),
                format!("{MAC_B} dst 192.168.100.3 self permanent"),
            ]
        );
        assert_eq!(
            routes(&ns, "main"),
            vec![
                "10.5.2.0/24 via 10.5.2.0 dev flannel.1 proto boot onlink".to_owned(),
                "10.5.3.0/24 via 10.5.3.0 dev flannel.1 proto boot onlink".to_owned(),
                "192.168.100.0/24 dev eth0 proto kernel".to_owned(),
                "default via 192.168.100.254 dev eth0 proto boot".to_owned(),
            ]
        );

        // Applying the same event twice changes nothing (and does not fail).
        dp.apply(&PeerEvent::Upsert(peer(
            "10.5.2.0/24",
            "192.168.100.2",
            Some(MAC_A),
        )))
        .await
        .expect("idempotent upsert");
        assert_eq!(fdb(&ns, "flannel.1").len(), 2);

        // A peer whose VtepMAC changed (its flanneld re-created the device): no stale entry.
        dp.apply(&PeerEvent::Upsert(peer(
            "10.5.3.0/24",
            "192.168.100.3",
            Some(MAC_C),
        )))
        .await
        .expect("upsert B with new MAC");
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![
                format!("{MAC_A} dst 192.168.100.2 self permanent"),
                format!("{MAC_C} dst 192.168.100.3 self permanent"),
            ]
        );

        // Removal undoes all three.
        dp.apply(&PeerEvent::Remove("10.5.3.0/24".parse().expect("subnet")))
            .await
            .expect("remove B");
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            vec![format!("10.5.2.0 lladdr {MAC_A} PERMANENT")]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![format!("{MAC_A} dst 192.168.100.2 self permanent")]
        );
        assert!(
            !routes(&ns, "main")
                .iter()
                .any(|r| r.starts_with("10.5.3.0/24"))
        );

        // A restarted agent reuses the device and so keeps its VtepMAC.
        let index_before = link(&ns, "flannel.1").expect("device")["ifindex"].clone();
        drop(dp);
        let (_dp, attrs) = VxlanDataplane::new(uplink.clone(), &backend(1, 8472, false))
            .await
            .expect("re-create dataplane");
        assert_eq!(vtep_mac(&attrs), mac, "VtepMAC must survive a restart");
        assert_eq!(
            link(&ns, "flannel.1").expect("device")["ifindex"],
            index_before,
            "device was not reused"
        );
        // Peer state stays in place across the restart (zero-downtime restart).
        assert_eq!(fdb(&ns, "flannel.1").len(), 1);

        // A device with other settings (here: another dstport) is replaced.
        let (_dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 4789, false))
            .await
            .expect("dataplane with another port");
        let device = link(&ns, "flannel.1").expect("device");
        assert_eq!(device["linkinfo"]["info_data"]["port"], 4789, "{device}");
        assert_ne!(
            device["ifindex"], index_before,
            "mismatched device must be replaced"
        );
        assert_ne!(vtep_mac(&attrs), mac, "a replaced device gets a fresh MAC");
    });
}

#[test]
fn vxlan_snapshot_sweeps_only_its_own_stale_state() {
    let ns = node_ns("kvs", "192.168.100.1");
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        // Left over on our device by an earlier run: a peer that is gone now.
        flanneld::add_peer(
            &ns,
            "10.5.7.0/24",
            "02:77:00:00:00:07",
            Ipv4Addr::new(192, 168, 100, 7),
        );
        // Not ours: a route on the uplink into the cluster network, one elsewhere, another table.
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.5.9.0/24",
            "via",
            "192.168.100.9",
            "dev",
            "eth0",
        ]);
        ns.run(&[
            "ip",
            "route",
            "add",
            "172.16.0.0/16",
            "via",
            "192.168.100.9",
            "dev",
            "eth0",
        ]);
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.5.7.0/24",
            "via",
            "192.168.100.7",
            "dev",
            "eth0",
            "table",
            "100",
        ]);

        dp.apply(&PeerEvent::Snapshot(vec![
            peer("10.5.2.0/24", "192.168.100.2", Some(MAC_A)),
            peer("10.5.4.0/24", "192.168.100.4", Some(MAC_C)),
        ]))
        .await
        .expect("snapshot");

        assert_eq!(
            neighbours(&ns, "flannel.1"),
            vec![
                format!("10.5.2.0 lladdr {MAC_A} PERMANENT"),
                format!("10.5.4.0 lladdr {MAC_C} PERMANENT"),
            ]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![
                format!("{MAC_A} dst 192.168.100.2 self permanent"),
                format!("{MAC_C} dst 192.168.100.4 self permanent"),
            ]
        );
        assert_eq!(
            routes(&ns, "main"),
            vec![
                "10.5.2.0/24 via 10.5.2.0 dev flannel.1 proto boot onlink".to_owned(),
                "10.5.4.0/24 via 10.5.4.0 dev flannel.1 proto boot onlink".to_owned(),
                "10.5.9.0/24 via 192.168.100.9 dev eth0 proto boot".to_owned(),
                "172.16.0.0/16 via 192.168.100.9 dev eth0 proto boot".to_owned(),
                "192.168.100.0/24 dev eth0 proto kernel".to_owned(),
                "default via 192.168.100.254 dev eth0 proto boot".to_owned(),
            ]
        );
        assert_eq!(
            routes(&ns, "100"),
            vec!["10.5.7.0/24 via 192.168.100.7 dev eth0 proto boot".to_owned()]
        );

        // A second snapshot without 10.5.4.0/24 removes exactly that peer.
        dp.apply(&PeerEvent::Snapshot(vec![peer(
            "10.5.2.0/24",
            "192.168.100.2",
            Some(MAC_A),
        )]))
        .await
        .expect("second snapshot");
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![format!("{MAC_A} dst 192.168.100.2 self permanent")]
        );
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            vec![format!("10.5.2.0 lladdr {MAC_A} PERMANENT")]
        );
        assert!(
            !routes(&ns, "main")
                .iter()
                .any(|r| r.starts_with("10.5.4.0/24"))
        );
    });
}

#[test]
fn vxlan_maintain_recreates_deleted_device_and_restores_peers() {
    let ns = node_ns("kvm", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let (mut dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 8472, false))
            .await
            .expect("dataplane");
        let mac = vtep_mac(&attrs);
        dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
            .await
            .expect("activate");
        dp.apply(&PeerEvent::Snapshot(vec![
            peer("10.5.2.0/24", "192.168.100.2", Some(MAC_A)),
            peer("10.5.3.0/24", "192.168.100.3", Some(MAC_B)),
        ]))
        .await
        .expect("snapshot");
        let programmed = (
            neighbours(&ns, "flannel.1"),
            fdb(&ns, "flannel.1"),
            routes(&ns, "main"),
        );

        // Someone deletes a route: maintain puts it back.
        ns.run(&["ip", "route", "del", "10.5.2.0/24"]);
        dp.maintain().await.expect("maintain after route deletion");
        assert_eq!(routes(&ns, "main"), programmed.2);

        // Someone deletes a neighbour and an FDB entry: back too.
        ns.run(&["ip", "neigh", "del", "10.5.3.0", "dev", "flannel.1"]);
        ns.run(&[
            "bridge",
            "fdb",
            "del",
            MAC_A,
            "dev",
            "flannel.1",
            "dst",
            "192.168.100.2",
            "self",
        ]);
        dp.maintain()
            .await
            .expect("maintain after neigh/fdb deletion");
        assert_eq!(neighbours(&ns, "flannel.1"), programmed.0);
        assert_eq!(fdb(&ns, "flannel.1"), programmed.1);

        // Someone deletes the device: maintain re-creates it with the same MAC and re-programs
        // the address and every peer.
        ns.run(&["ip", "link", "del", "flannel.1"]);
        assert!(link(&ns, "flannel.1").is_none());
        dp.maintain().await.expect("maintain after device deletion");
        assert_flannel_device(&ns, "flannel.1", 1, 8472, mac, "10.5.1.0");
        assert_eq!(
            (
                neighbours(&ns, "flannel.1"),
                fdb(&ns, "flannel.1"),
                routes(&ns, "main")
            ),
            programmed
        );

        // Nothing to do: maintain is quiet and changes nothing.
        dp.maintain().await.expect("idle maintain");
        assert_eq!(
            (
                neighbours(&ns, "flannel.1"),
                fdb(&ns, "flannel.1"),
                routes(&ns, "main")
            ),
            programmed
        );
    });
}

#[test]
fn vxlan_direct_routing_uses_plain_routes_on_the_same_segment() {
    let ns = node_ns("kvd", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let (mut dp, _) = VxlanDataplane::new(uplink, &backend(1, 8472, true))
            .await
            .expect("dataplane");
        dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
            .await
            .expect("activate");
        dp.apply(&PeerEvent::Snapshot(vec![
            // Same L2 segment as eth0: a direct route.
            peer("10.5.2.0/24", "192.168.100.2", Some(MAC_A)),
            // Behind the default gateway: through the vxlan device.
            peer("10.5.3.0/24", "172.20.0.3", Some(MAC_B)),
        ]))
        .await
        .expect("snapshot");
        assert_eq!(
            routes(&ns, "main"),
            vec![
                "10.5.2.0/24 via 192.168.100.2 dev eth0 proto boot".to_owned(),
                "10.5.3.0/24 via 10.5.3.0 dev flannel.1 proto boot onlink".to_owned(),
                "192.168.100.0/24 dev eth0 proto kernel".to_owned(),
                "default via 192.168.100.254 dev eth0 proto boot".to_owned(),
            ]
        );
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            vec![format!("10.5.3.0 lladdr {MAC_B} PERMANENT")]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            vec![format!("{MAC_B} dst 172.20.0.3 self permanent")]
        );
        // Removing the direct peer removes its route; a stale direct route is swept by the
        // full check (the first snapshot sweeps leftovers, later ones only diff).
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.5.8.0/24",
            "via",
            "192.168.100.8",
            "dev",
            "eth0",
        ]);
        dp.apply(&PeerEvent::Snapshot(vec![peer(
            "10.5.3.0/24",
            "172.20.0.3",
            Some(MAC_B),
        )]))
        .await
        .expect("second snapshot");
        dp.maintain().await.expect("full check");
        assert_eq!(
            routes(&ns, "main"),
            vec![
                "10.5.3.0/24 via 10.5.3.0 dev flannel.1 proto boot onlink".to_owned(),
                "192.168.100.0/24 dev eth0 proto kernel".to_owned(),
                "default via 192.168.100.254 dev eth0 proto boot".to_owned(),
            ]
        );
    });
}

#[test]
fn host_gw_routes_sweeps_and_restores() {
    let ns = node_ns("khg", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let (mut dp, attrs) = HostGwDataplane::new(uplink)
            .await
            .expect("host-gw dataplane");
        assert_eq!(attrs, LeaseAttrs::HostGw);
        dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
            .await
            .expect("activate");
        // Foreign routes that must survive the sweep, and one stale host-gw route.
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            "192.168.100.9",
            "dev",
            "eth0",
        ]);
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.5.8.0/24",
            "via",
            "192.168.100.8",
            "dev",
            "eth0",
            "proto",
            "static",
        ]);
        ns.run(&[
            "ip",
            "route",
            "add",
            "10.5.7.0/24",
            "via",
            "192.168.100.7",
            "dev",
            "eth0",
        ]);
        dp.apply(&PeerEvent::Snapshot(vec![
            peer("10.5.2.0/24", "192.168.100.2", None),
            peer("10.5.3.0/24", "192.168.100.3", None),
        ]))
        .await
        .expect("snapshot");
        let expected = vec![
            "10.5.2.0/24 via 192.168.100.2 dev eth0 proto boot".to_owned(),
            "10.5.3.0/24 via 192.168.100.3 dev eth0 proto boot".to_owned(),
            "10.5.8.0/24 via 192.168.100.8 dev eth0 proto static".to_owned(),
            "10.99.0.0/16 via 192.168.100.9 dev eth0 proto boot".to_owned(),
            "192.168.100.0/24 dev eth0 proto kernel".to_owned(),
            "default via 192.168.100.254 dev eth0 proto boot".to_owned(),
        ];
        assert_eq!(routes(&ns, "main"), expected);

        ns.run(&["ip", "route", "del", "10.5.3.0/24"]);
        dp.maintain().await.expect("maintain");
        assert_eq!(routes(&ns, "main"), expected);

        dp.apply(&PeerEvent::Remove("10.5.2.0/24".parse().expect("subnet")))
            .await
            .expect("remove");
        assert!(
            !routes(&ns, "main")
                .iter()
                .any(|r| r.starts_with("10.5.2.0/24"))
        );

        // A peer not on our segment is a clear error, not a silent half-route.
        let err = dp
            .apply(&PeerEvent::Upsert(peer("10.5.5.0/24", "172.20.0.5", None)))
            .await
            .expect_err("unreachable gateway");
        assert!(
            err.to_string()
                .contains("host-gw needs every node on one L2 network"),
            "{err}"
        );
    });
}

#[test]
fn host_gw_refuses_a_public_ip_that_is_not_the_interface_address() {
    let ns = node_ns("khr", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", Some("203.0.113.5")).await;
        assert_eq!(uplink.public_ip, Ipv4Addr::new(203, 0, 113, 5));
        let err = HostGwDataplane::new(uplink).await.expect_err("must refuse");
        let message = err.to_string();
        assert!(
            message.contains("203.0.113.5")
                && message.contains("not an address of eth0 (192.168.100.1)"),
            "{message}"
        );
    });
}

#[test]
fn uplink_selection_in_a_namespace() {
    let ns = node_ns("kif", "192.168.100.1");
    ns.run(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ]);
    ns.run(&["ip", "addr", "add", "10.9.0.1/24", "dev", "eth1"]);
    ns.run(&["ip", "link", "set", "eth1", "mtu", "9000", "up"]);
    ns.run(&["ip", "link", "set", "eth1p", "mtu", "9000", "up"]);
    ns.run(&["ip", "route", "add", "172.30.0.0/16", "via", "10.9.0.254"]);
    ns.block_on(|| async {
        let default = select_uplink(&IfaceOptions::default())
            .await
            .expect("default route");
        assert_eq!((default.name.as_str(), default.mtu), ("eth0", 1500));
        let by_ip = select_uplink(&IfaceOptions {
            iface: vec!["10.9.0.1".into()],
            ..IfaceOptions::default()
        })
        .await
        .expect("by ip");
        assert_eq!((by_ip.name.as_str(), by_ip.mtu), ("eth1", 9000));
        let by_regex = select_uplink(&IfaceOptions {
            iface_regex: vec!["^10\\.9\\.".into()],
            ..IfaceOptions::default()
        })
        .await
        .expect("by regex");
        assert_eq!(by_regex.name, "eth1");
        let can_reach = select_uplink(&IfaceOptions {
            iface_can_reach: Some(Ipv4Addr::new(172, 30, 1, 1)),
            ..IfaceOptions::default()
        })
        .await
        .expect("can reach");
        assert_eq!(
            (can_reach.name.as_str(), can_reach.address),
            ("eth1", Ipv4Addr::new(10, 9, 0, 1))
        );
        let err = select_uplink(&IfaceOptions {
            iface: vec!["eth9".into()],
            ..IfaceOptions::default()
        })
        .await
        .expect_err("no eth9");
        let message = err.to_string();
        assert!(
            message.starts_with(
                "no interface matches --iface=eth9; interfaces here: lo (127.0.0.1), "
            ) && message.contains("eth0 (192.168.100.1)")
                && message.contains("eth1 (10.9.0.1)"),
            "{message}"
        );
    });
}

/// The interoperability foundation: node 1 is programmed by hand exactly as flanneld does it,
/// node 2 by [`VxlanDataplane`]; pods behind each node's bridge ping each other both ways.
#[test]
fn vxlan_dataplane_interoperates_with_a_flanneld_programmed_node() {
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 2,
        underlay: UnderlayKind::Switch,
        underlay_mtu: 1500,
        etcd: false,
    });
    let flannel_mac = "02:f1:a0:00:00:01";
    cluster.nodes[0].add_pod("10.5.1.1/24", 1450);
    cluster.nodes[1].add_pod("10.5.2.1/24", 1450);
    let node2 = &cluster.nodes[1];
    let pod1_ip = cluster.nodes[0].pods[0].ip;
    let pod2_ip = node2.pods[0].ip;

    node2.ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        assert_eq!(uplink.address, Ipv4Addr::new(192, 168, 100, 2));
        let (mut dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 8472, false))
            .await
            .expect("dataplane on node 2");
        dp.activate(&lease("10.5.2.0/24", "192.168.100.2"))
            .await
            .expect("activate");
        dp.apply(&PeerEvent::Snapshot(vec![peer(
            "10.5.1.0/24",
            "192.168.100.1",
            Some(flannel_mac),
        )]))
        .await
        .expect("peer node 1");

        // Node 1, by hand, as flanneld's vxlan backend programs it.
        let node1 = &cluster.nodes[0].ns;
        let our_mac = vtep_mac(&attrs).to_string().to_lowercase();
        let node1_ip = cluster.nodes[0].ip;
        flanneld::add_device(node1, node1_ip, "10.5.1.0/24", Some(flannel_mac));
        flanneld::add_peer(node1, "10.5.2.0/24", &our_mac, node2.ip);

        // The two nodes' state must be the same shape: compare node 2 (ours) with node 1.
        let node2_ns = &node2.ns;
        assert_eq!(
            fdb(node2_ns, "flannel.1"),
            vec![format!("{flannel_mac} dst 192.168.100.1 self permanent")]
        );
        assert_eq!(
            routes(node2_ns, "main")
                .iter()
                .filter(|r| r.contains("flannel.1"))
                .count(),
            routes(node1, "main")
                .iter()
                .filter(|r| r.contains("flannel.1"))
                .count()
        );
        let strip = |v: Option<Value>| {
            let mut data = v.expect("device")["linkinfo"]["info_data"].clone();
            data.as_object_mut().expect("object").remove("local");
            data
        };
        assert_eq!(
            strip(link(node2_ns, "flannel.1")),
            strip(link(node1, "flannel.1"))
        );

        let pod1 = &cluster.nodes[0].pods[0];
        let pod2 = &node2.pods[0];
        wait_until(
            Duration::from_secs(20),
            "pod on node 1 pings pod on node 2",
            || pod1.ping_once(pod2_ip),
        );
        wait_until(
            Duration::from_secs(20),
            "pod on node 2 pings pod on node 1",
            || pod2.ping_once(pod1_ip),
        );
        // Full-size packets through the overlay both ways (1450 MTU - 28 bytes of IP+ICMP).
        for (from, to) in [(pod1, pod2_ip), (pod2, pod1_ip)] {
            let out = from.ns.try_run(&[
                "ping",
                "-c3",
                "-i0.2",
                "-W2",
                "-M",
                "do",
                "-s",
                "1422",
                &to.to_string(),
            ]);
            assert!(
                out.status.success(),
                "full-size ping to {to} failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    });
}

#[test]
fn vxlan_backend_mtu_and_gbp_are_honoured() {
    let ns = node_ns("kvg", "192.168.100.1");
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let mut config = backend(7, 8472, false);
        config.mtu = Some(1400);
        config.gbp = true;
        let (_dp, attrs) = VxlanDataplane::new(uplink, &config)
            .await
            .expect("dataplane");
        assert!(matches!(attrs, LeaseAttrs::Vxlan { vni: 7, .. }));
        let device = link(&ns, "flannel.7").expect("flannel.7");
        assert_eq!(device["mtu"], 1350, "Backend.MTU 1400 - 50: {device}");
        assert_eq!(device["linkinfo"]["info_data"]["id"], 7, "{device}");
        assert_eq!(device["linkinfo"]["info_data"]["gbp"], true, "{device}");
    });
}

/// Node 192.168.100.1's vxlan dataplane in the agent's dataplane task, told our lease of
/// 10.5.1.0/24 and then `peers`: the command channel, the ready flag, the task, and the
/// lease attributes.
async fn vxlan_task_with(
    peers: Vec<Peer>,
) -> (
    tokio::sync::mpsc::Sender<overlay_agent::dataplane::DataplaneCommand>,
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
    LeaseAttrs,
) {
    use overlay_agent::dataplane::{DataplaneCommand, run_dataplane};
    let uplink = uplink("eth0", None).await;
    let (dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 8472, false))
        .await
        .expect("dataplane");
    let (commands, receiver) = tokio::sync::mpsc::channel(16);
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(run_dataplane(dp, receiver, ready));
    commands
        .send(DataplaneCommand::Activate(lease(
            "10.5.1.0/24",
            "192.168.100.1",
        )))
        .await
        .expect("send activate");
    commands
        .send(DataplaneCommand::Peers(PeerEvent::Snapshot(peers)))
        .await
        .expect("send snapshot");
    (commands, ready_rx, task, attrs)
}

/// The dataplane driven the way the agent drives it: by `run_dataplane` with commands, its
/// own 1 s maintenance loop repairing a deleted device without being asked.
#[test]
fn run_dataplane_task_programs_and_self_heals_vxlan() {
    let ns = node_ns("kvt", "192.168.100.1");
    ns.block_on(|| async {
        let (commands, mut ready_rx, task, attrs) =
            vxlan_task_with(vec![peer("10.5.2.0/24", "192.168.100.2", Some(MAC_A))]).await;
        let mac = vtep_mac(&attrs);
        tokio::time::timeout(Duration::from_secs(20), ready_rx.wait_for(|ready| *ready))
            .await
            .expect("ready in time")
            .expect("ready channel");
        let expected_route = "10.5.2.0/24 via 10.5.2.0 dev flannel.1 proto boot onlink";
        let ns = &ns;
        let has_everything = move || {
            link(ns, "flannel.1").is_some_and(|d| d["address"] == mac.to_string().to_lowercase())
                && routes(ns, "main").iter().any(|r| r == expected_route)
                && fdb(ns, "flannel.1") == vec![format!("{MAC_A} dst 192.168.100.2 self permanent")]
                && neighbours(ns, "flannel.1") == vec![format!("10.5.2.0 lladdr {MAC_A} PERMANENT")]
        };
        // The task runs on this thread's runtime: poll with async sleeps so it gets to work.
        let wait = |what: &'static str| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !has_everything() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for: {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        wait("peer programmed by the task").await;
        ns.run(&["ip", "link", "del", "flannel.1"]);
        assert!(link(ns, "flannel.1").is_none());
        wait("device and peer restored by the maintenance loop").await;
        drop(commands);
        task.await
            .expect("dataplane task ends when its command channel closes");
        // Stopping leaves the datapath in place (zero-downtime restart).
        assert!(has_everything());
    });
}

#[test]
fn link_events_report_new_and_deleted_links() {
    use futures_util::StreamExt;
    use overlay_agent::os::netlink::{LinkEvent, Netlink};
    let ns = NetNs::new("kle");
    ns.block_on(|| async {
        let mut events = Box::pin(Netlink::link_events().expect("subscribe"));
        ns.run(&[
            "ip", "link", "add", "vtest0", "type", "veth", "peer", "name", "vtest1",
        ]);
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            while let Some(event) = events.next().await {
                if matches!(&event, LinkEvent::Changed(link) if link.name == "vtest0") {
                    return;
                }
            }
            panic!("event stream ended");
        })
        .await
        .expect("no event for the new link");
        ns.run(&["ip", "link", "del", "vtest0"]);
        tokio::time::timeout(deadline, async {
            while let Some(event) = events.next().await {
                if matches!(&event, LinkEvent::Deleted { name, .. } if name == "vtest0") {
                    return;
                }
            }
            panic!("event stream ended");
        })
        .await
        .expect("no event for the deleted link");
    });
}

/// One subscription serves several subscribers, each handed only the kinds it asked for: a
/// subscriber that does not want route additions never sees one (a vxlan first sync's own
/// 20,000 route additions must not wake its repair loop), one that does sees both.
/// What `changes` receives up to the deletion of the test route 10.99.0.0/24. The kernel
/// announces the addition before the deletion, so by then the addition was delivered or
/// filtered out.
async fn until_test_route_deleted(
    changes: &mut overlay_agent::dataplane::changes::Changes,
) -> Vec<overlay_agent::os::netlink::KernelChange> {
    use overlay_agent::os::netlink::KernelChange;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !all.iter().any(|c| {
            matches!(c, KernelChange::RouteDeleted(r) if r.destination.to_string() == "10.99.0.0/24")
        }) {
            changes.changed().await;
            all.extend(changes.take());
        }
    })
    .await
    .expect("no notification of the deleted route");
    all
}

#[test]
fn one_change_feed_hands_each_subscriber_only_what_it_wants() {
    use overlay_agent::{dataplane::changes::ChangeFeed, os::netlink::KernelChange};
    let ns = node_ns("kcf", "192.168.77.1");
    ns.block_on(|| async {
        let feed = ChangeFeed::start();
        let mut repairs = feed.subscribe(|c| !matches!(c, KernelChange::RouteAdded(_)));
        let mut routes = feed.subscribe(|c| {
            matches!(
                c,
                KernelChange::RouteAdded(_) | KernelChange::RouteDeleted(_)
            )
        });
        assert!(repairs.live() && routes.live());
        ns.run(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.77.2"]);
        ns.run(&["ip", "route", "del", "10.99.0.0/24"]);
        let for_repairs = until_test_route_deleted(&mut repairs).await;
        let for_routes = until_test_route_deleted(&mut routes).await;
        assert!(
            !for_repairs
                .iter()
                .any(|c| matches!(c, KernelChange::RouteAdded(_))),
            "a subscriber that wants no route additions got one: {for_repairs:?}"
        );
        assert!(
            for_routes.iter().any(
                |c| matches!(c, KernelChange::RouteAdded(r) if r.destination.to_string() == "10.99.0.0/24")
            ),
            "the route subscriber missed the addition: {for_routes:?}"
        );
        assert!(
            for_routes.iter().all(|c| matches!(
                c,
                KernelChange::RouteAdded(_) | KernelChange::RouteDeleted(_)
            )),
            "the route subscriber got other kinds: {for_routes:?}"
        );
    });
}

/// An unjoined feed is told nothing (a first sync's own writes are never copied to it);
/// joining asks each subscriber for one full check, then the notifications flow.
#[test]
fn an_unjoined_change_feed_hears_nothing_until_it_joins_and_then_asks_for_a_full_check() {
    use overlay_agent::{dataplane::changes::ChangeFeed, os::netlink::KernelChange};
    let ns = node_ns("kcj", "192.168.78.1");
    ns.block_on(|| async {
        let feed = ChangeFeed::start_unjoined();
        let mut changes = feed.subscribe(|_| true);
        assert!(!feed.joined());
        ns.run(&["ip", "route", "add", "10.98.0.0/24", "via", "192.168.78.2"]);
        ns.run(&["ip", "route", "del", "10.98.0.0/24"]);
        feed.join();
        assert!(feed.joined());
        ns.run(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.78.2"]);
        ns.run(&["ip", "route", "del", "10.99.0.0/24"]);
        // The same socket carries both pairs, in order: all of the first would come before
        // the end of the second.
        let seen = until_test_route_deleted(&mut changes).await;
        assert!(
            matches!(seen.first(), Some(KernelChange::Overrun)),
            "joining asks for a full check first: {seen:?}"
        );
        assert!(
            !seen.iter().any(|c| matches!(
                c,
                KernelChange::RouteAdded(r) | KernelChange::RouteDeleted(r)
                    if r.destination.to_string() == "10.98.0.0/24"
            )),
            "a change from before the join was delivered: {seen:?}"
        );
    });
}

/// A vxlan dataplane that never gets a snapshot (etcd unreachable at start) still starts
/// following the kernel's notifications, at the latest 10 s after it was made: its device
/// is repaired from then on.
#[test]
fn vxlan_without_a_snapshot_joins_the_change_feed_after_ten_seconds() {
    let ns = node_ns("kjd", "192.168.100.1");
    ns.block_on(|| async {
        let (mut dp, _attrs) = activated_vxlan().await;
        let feed = dp.change_feed();
        assert!(!feed.joined(), "no snapshot yet: not joined");
        ns.run(&["ip", "link", "set", "flannel.1", "down"]);
        // What the dataplane task does: a pass every second, and one per notification.
        let started = std::time::Instant::now();
        while !device_is_up(&ns, "flannel.1") {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the downed device was not repaired within 20 s (joined: {})",
                feed.joined()
            );
            tokio::select! {
                () = dp.kernel_changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            dp.maintain_changes().await.expect("maintain");
        }
        assert!(feed.joined());
    });
}

#[test]
fn vxlan_maintain_sets_a_downed_device_up_again() {
    let ns = node_ns("kvu", "192.168.100.1");
    ns.block_on(|| async {
        let (mut dp, attrs) = activated_vxlan().await;
        ns.run(&["ip", "link", "set", "flannel.1", "down"]);
        ns.run(&["ip", "addr", "flush", "dev", "flannel.1"]);
        dp.maintain().await.expect("maintain");
        assert_flannel_device(&ns, "flannel.1", 1, 8472, vtep_mac(&attrs), "10.5.1.0");
    });
}

/// Programs a node's vxlan dataplane for `subnet` with `peers` and returns its VtepMAC. The
/// dataplane value is dropped afterwards; its kernel state stays, as on an agent stop.
fn program_vxlan_node(
    ns: &NetNs,
    subnet: &str,
    public_ip: &str,
    (direct, nexthops): (bool, bool),
    peers: Vec<Peer>,
) -> MacAddr6 {
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let (mut dp, attrs) = VxlanDataplane::new(uplink, &backend(1, 8472, direct))
            .await
            .expect("dataplane");
        if nexthops {
            dp.use_nexthop_objects().await.expect("nexthop objects");
        }
        dp.activate(&lease(subnet, public_ip))
            .await
            .expect("activate");
        dp.apply(&PeerEvent::Snapshot(peers)).await.expect("peers");
        vtep_mac(&attrs)
    })
}

/// Two nodes both run VxlanDataplane (VtepMACs exchanged as the leases would), through the
/// vxlan device and with DirectRouting, each with flannel's routes and through nexthop
/// objects; pods reach each other both ways.
#[test]
fn vxlan_dataplanes_on_both_nodes_carry_pod_traffic_with_and_without_direct_routing() {
    for (direct, nexthops) in [(false, false), (true, false), (false, true), (true, true)] {
        let layout = (direct, nexthops);
        let mut cluster = Cluster::with(ClusterOptions {
            nodes: 2,
            underlay: UnderlayKind::Switch,
            underlay_mtu: 1500,
            etcd: false,
        });
        cluster.nodes[0].add_pod("10.5.1.1/24", 1450);
        cluster.nodes[1].add_pod("10.5.2.1/24", 1450);
        // First pass learns each side's MAC (devices are reused, so MACs stay), second wires peers.
        let mac1 = program_vxlan_node(
            &cluster.nodes[0].ns,
            "10.5.1.0/24",
            "192.168.100.1",
            layout,
            vec![],
        );
        let mac2 = program_vxlan_node(
            &cluster.nodes[1].ns,
            "10.5.2.0/24",
            "192.168.100.2",
            layout,
            vec![],
        );
        let again1 = program_vxlan_node(
            &cluster.nodes[0].ns,
            "10.5.1.0/24",
            "192.168.100.1",
            layout,
            vec![Peer {
                subnet: "10.5.2.0/24".parse().expect("subnet"),
                public_ip: "192.168.100.2".parse().expect("ip"),
                vtep_mac: Some(mac2),
            }],
        );
        let again2 = program_vxlan_node(
            &cluster.nodes[1].ns,
            "10.5.2.0/24",
            "192.168.100.2",
            layout,
            vec![Peer {
                subnet: "10.5.1.0/24".parse().expect("subnet"),
                public_ip: "192.168.100.1".parse().expect("ip"),
                vtep_mac: Some(mac1),
            }],
        );
        assert_eq!(
            (again1, again2),
            (mac1, mac2),
            "VtepMACs must be stable across restarts"
        );
        let nhid = match nexthops {
            true => format!(
                " nhid {}",
                vxlan::nexthop_id("10.5.2.0/24".parse().expect("subnet"))
            ),
            false => String::new(),
        };
        let expected = if direct {
            format!("10.5.2.0/24{nhid} via 192.168.100.2 dev eth0 proto boot")
        } else {
            format!("10.5.2.0/24{nhid} via 10.5.2.0 dev flannel.1 proto boot onlink")
        };
        assert!(
            routes(&cluster.nodes[0].ns, "main").contains(&expected),
            "direct={direct} nexthops={nexthops}: no {expected:?} in {:?}",
            routes(&cluster.nodes[0].ns, "main")
        );
        let (pod1, pod2) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
        wait_until(Duration::from_secs(20), "pod 1 -> pod 2", || {
            pod1.ping_once(pod2.ip)
        });
        wait_until(Duration::from_secs(20), "pod 2 -> pod 1", || {
            pod2.ping_once(pod1.ip)
        });
    }
}

#[test]
fn host_gw_dataplanes_carry_pod_traffic() {
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 2,
        underlay: UnderlayKind::Switch,
        underlay_mtu: 1500,
        etcd: false,
    });
    cluster.nodes[0].add_pod("10.5.1.1/24", 1500);
    cluster.nodes[1].add_pod("10.5.2.1/24", 1500);
    for (node, own, other, other_ip) in [
        (0, "10.5.1.0/24", "10.5.2.0/24", "192.168.100.2"),
        (1, "10.5.2.0/24", "10.5.1.0/24", "192.168.100.1"),
    ] {
        let public_ip = cluster.nodes[node].ip.to_string();
        cluster.nodes[node].ns.block_on(|| async {
            let (mut dp, _) = HostGwDataplane::new(uplink("eth0", None).await)
                .await
                .expect("host-gw");
            assert_eq!(dp.mtu(), 1500);
            dp.activate(&lease(own, &public_ip))
                .await
                .expect("activate");
            dp.apply(&PeerEvent::Snapshot(vec![peer(other, other_ip, None)]))
                .await
                .expect("peer");
        });
    }
    assert!(
        routes(&cluster.nodes[0].ns, "main")
            .iter()
            .any(|r| r == "10.5.2.0/24 via 192.168.100.2 dev eth0 proto boot")
    );
    let (pod1, pod2) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
    wait_until(Duration::from_secs(20), "pod 1 -> pod 2", || {
        pod1.ping_once(pod2.ip)
    });
    wait_until(Duration::from_secs(20), "pod 2 -> pod 1", || {
        pod2.ping_once(pod1.ip)
    });
}

/// `n` vxlan peers 10.6.x.y/24... on distinct underlay addresses.
/// Applies `peers` again as a snapshot and asserts it wrote nothing; returns the write
/// count from before it.
async fn relist_writes_nothing(dp: &mut VxlanDataplane, peers: &[Peer]) -> u64 {
    let before = overlay_agent::os::netlink::writes_total();
    dp.apply(&PeerEvent::Snapshot(peers.to_vec()))
        .await
        .expect("the same snapshot again");
    assert_eq!(
        overlay_agent::os::netlink::writes_total() - before,
        0,
        "a re-list that changes nothing must not write"
    );
    before
}

fn many_peers(n: u32) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer {
            subnet: format!("10.5.{}.0/24", 10 + i).parse().expect("subnet"),
            public_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 10)) + i),
            vtep_mac: Some(MacAddr6::new(0x0a, 0x58, 0, 0, 0, i as u8)),
        })
        .collect()
}

#[test]
fn vxlan_relist_that_changes_nothing_writes_nothing_and_a_change_writes_only_it() {
    let ns = node_ns("krl", "192.168.100.1");
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        let mut peers = many_peers(200);
        let before = overlay_agent::os::netlink::writes_total();
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("first snapshot");
        let first = overlay_agent::os::netlink::writes_total() - before;
        // A neighbour, an FDB entry and a route per peer, all there (read back by iproute2).
        assert_eq!(first, 600, "first snapshot writes");
        assert_eq!(neighbours(&ns, "flannel.1").len(), 200);
        assert_eq!(fdb(&ns, "flannel.1").len(), 200);
        assert_eq!(
            routes(&ns, "main")
                .iter()
                .filter(|r| r.contains("dev flannel.1"))
                .count(),
            200
        );

        relist_writes_nothing(&mut dp, &peers).await;

        // One peer moves to another node, one goes: only they are written.
        peers[7].public_ip = "172.20.9.9".parse().expect("ip");
        peers.remove(3);
        let before = overlay_agent::os::netlink::writes_total();
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("changed snapshot");
        let writes = overlay_agent::os::netlink::writes_total() - before;
        assert!(
            (3..=7).contains(&writes),
            "one changed and one removed peer should take a handful of writes, not {writes}"
        );
        let fdb = fdb(&ns, "flannel.1");
        assert_eq!(fdb.len(), 199);
        assert!(
            fdb.iter()
                .any(|e| e.ends_with("dst 172.20.9.9 self permanent")),
            "{fdb:?}"
        );
    });
}

#[test]
fn vxlan_hears_a_deleted_route_neighbour_or_fdb_entry_and_repairs_only_that() {
    let ns = node_ns("kev", "192.168.100.1");
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        dp.apply(&PeerEvent::Snapshot(many_peers(50)))
            .await
            .expect("snapshot");
        let programmed = (
            neighbours(&ns, "flannel.1"),
            fdb(&ns, "flannel.1"),
            routes(&ns, "main"),
        );
        // Drain the notifications of our own programming.
        while tokio::time::timeout(Duration::from_millis(200), dp.kernel_changed())
            .await
            .is_ok()
        {}
        dp.maintain_changes().await.expect("quiet");

        for deletion in [
            vec!["ip", "route", "del", "10.5.20.0/24"],
            vec!["ip", "neigh", "del", "10.5.30.0", "dev", "flannel.1"],
            vec![
                "bridge",
                "fdb",
                "del",
                "0a:58:00:00:00:28",
                "dev",
                "flannel.1",
                "dst",
                "172.20.0.50",
                "self",
            ],
        ] {
            ns.run(&deletion);
            // Notifications only (without them this times out: nothing here polls). Earlier
            // repairs' own notifications may come first, so handle them until it is back.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let before = overlay_agent::os::netlink::writes_total();
            let state = || {
                (
                    neighbours(&ns, "flannel.1"),
                    fdb(&ns, "flannel.1"),
                    routes(&ns, "main"),
                )
            };
            while state() != programmed {
                tokio::time::timeout_at(deadline, dp.kernel_changed())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("not repaired from notifications after {deletion:?}")
                    });
                dp.maintain_changes().await.expect("repair");
            }
            let writes = overlay_agent::os::netlink::writes_total() - before;
            assert_eq!(
                writes, 3,
                "{deletion:?}: exactly that peer's neighbour, FDB entry and route are written again"
            );
            assert_eq!(
                (
                    neighbours(&ns, "flannel.1"),
                    fdb(&ns, "flannel.1"),
                    routes(&ns, "main")
                ),
                programmed,
                "after {deletion:?}"
            );
        }
    });
}

/// `ip -j nexthop` as "ID via GW dev DEV [onlink]" lines, sorted.
fn nexthop_objects(ns: &NetNs) -> Vec<String> {
    let mut lines: Vec<String> = json(ns, &["ip", "-j", "nexthop", "show"])
        .iter()
        .map(|n| format!("{} via {} dev {}", n["id"], s(&n["gateway"]), s(&n["dev"])) + onlink(n))
        .collect();
    lines.sort();
    lines
}

/// `--nexthop-objects`: each peer's gateway and device go into a nexthop object whose id is
/// the subnet's address, the route names it; neighbours and FDB entries stay flannel's. A
/// re-list writes nothing; a nexthop object deleted by hand (the kernel drops the route with
/// it, without a route notification) is put back from its notification alone; a removed
/// peer takes its object along; a restart without the flag leaves exactly flannel's routes
/// and no nexthop object.
#[test]
fn vxlan_with_nexthop_objects_routes_through_them_and_converts_back_to_flannel_routes() {
    let ns = node_ns("knh", "192.168.100.1");
    let peers = many_peers(3);
    let id = |i: usize| vxlan::nexthop_id(peers[i].subnet);
    ns.block_on(|| async {
        let uplink = uplink("eth0", None).await;
        let (mut dp, _) = VxlanDataplane::new(uplink, &backend(1, 8472, false))
            .await
            .expect("dataplane");
        dp.use_nexthop_objects().await.expect("nexthop objects");
        dp.activate(&lease("10.5.1.0/24", "192.168.100.1"))
            .await
            .expect("activate");
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("snapshot");
        let flannel_neighbours = neighbours(&ns, "flannel.1");
        let flannel_fdb = fdb(&ns, "flannel.1");
        assert_eq!(flannel_neighbours.len(), 3);
        assert_eq!(flannel_fdb.len(), 3);
        let expected_routes: Vec<String> = (0..3)
            .map(|i| {
                let net = peers[i].subnet;
                format!(
                    "{net} nhid {} via {} dev flannel.1 proto boot onlink",
                    id(i),
                    net.network()
                )
            })
            .collect();
        let peer_routes = || flannel1_routes(&ns);
        assert_eq!(peer_routes(), expected_routes);
        let expected_objects: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "{} via {} dev flannel.1 onlink",
                    id(i),
                    peers[i].subnet.network()
                )
            })
            .collect();
        assert_eq!(nexthop_objects(&ns), expected_objects);

        let before = relist_writes_nothing(&mut dp, &peers).await;
        dp.maintain().await.expect("full check");
        assert_eq!(
            overlay_agent::os::netlink::writes_total() - before,
            0,
            "the full check finds everything in place"
        );

        // Drain the notifications of our own programming.
        while tokio::time::timeout(Duration::from_millis(200), dp.kernel_changed())
            .await
            .is_ok()
        {}
        dp.maintain_changes().await.expect("quiet");
        ns.run(&["ip", "nexthop", "del", "id", &id(1).to_string()]);
        assert_eq!(peer_routes().len(), 2, "the kernel took the route along");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while peer_routes() != expected_routes {
            tokio::time::timeout_at(deadline, dp.kernel_changed())
                .await
                .expect("not repaired from the nexthop notification");
            dp.maintain_changes().await.expect("repair");
        }
        assert_eq!(nexthop_objects(&ns), expected_objects);

        // The removal is announced as a route deletion (what `ip monitor route` and the
        // benchmark see), not only done silently with the nexthop object.
        let watcher = overlay_agent::dataplane::changes::ChangeFeed::start();
        let mut deletions = watcher
            .subscribe(|c| matches!(c, overlay_agent::os::netlink::KernelChange::RouteDeleted(_)));
        dp.apply(&PeerEvent::Remove(peers[2].subnet))
            .await
            .expect("remove");
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                deletions.changed().await;
                if deletions.take().iter().any(|c| {
                    matches!(c, overlay_agent::os::netlink::KernelChange::RouteDeleted(r) if r.destination == peers[2].subnet)
                }) {
                    return;
                }
            }
        })
        .await
        .expect("no route deletion announced for the removed peer");
        assert_eq!(peer_routes(), expected_routes[..2]);
        assert_eq!(nexthop_objects(&ns), expected_objects[..2]);
    });

    // A restart without the flag: flannel's routes, and the objects swept.
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        dp.apply(&PeerEvent::Snapshot(peers[..2].to_vec()))
            .await
            .expect("snapshot");
        assert_eq!(flannel1_routes(&ns), flannel_routes_to(&peers[..2]));
        assert_eq!(nexthop_objects(&ns), Vec::<String>::new());
    });
}

/// `n` peers of a large cluster: /28 subnets of 10.5.0.0/16 after our 10.5.1.0/24 (up to
/// 4,000), each with its own underlay address and VtepMAC.
fn large_cluster_peers(n: u32) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer {
            subnet: ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0a05_0200 + 16 * i), 28)
                .expect("subnet"),
            public_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 10)) + i),
            vtep_mac: Some(MacAddr6::new(0x0a, 0x58, 0, 0, (i >> 8) as u8, i as u8)),
        })
        .collect()
}

/// flannel's route to each of `peers`, as [`routes`] prints it.
fn flannel_routes_to(peers: &[Peer]) -> Vec<String> {
    let mut lines: Vec<String> = peers
        .iter()
        .map(|p| {
            format!(
                "{} via {} dev flannel.1 proto boot onlink",
                p.subnet,
                p.subnet.network()
            )
        })
        .collect();
    lines.sort();
    lines
}

fn flannel1_routes(ns: &NetNs) -> Vec<String> {
    routes(ns, "main")
        .into_iter()
        .filter(|r| r.contains(" dev flannel.1 ") && !r.contains(" proto kernel"))
        .collect()
}

/// From 1,000 peers on, flannel's routes are written through interim nexthop objects first
/// (the kernel inserts a flannel route in time that grows with every route before it, a
/// route through a nexthop object in constant time), then rewritten in flannel's exact form
/// as deferred work. Meanwhile the full check accepts the interim form (writes nothing), a
/// removed peer takes its object along, and a peer added at that scale goes the same way.
/// In the end: exactly flannel's routes, neighbours and FDB entries, and no nexthop object.
#[test]
fn a_large_vxlan_sync_goes_through_interim_nexthops_and_ends_in_flannels_exact_routes() {
    let ns = node_ns("kim", "192.168.100.1");
    let mut peers = large_cluster_peers(1_200);
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        assert!(dp.deferred_work_due().is_none(), "nothing deferred yet");
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("snapshot");
        let interim = flannel1_routes(&ns);
        assert_eq!(interim.len(), 1_200);
        let first = &peers[0];
        let expected_first = format!(
            "{} nhid {} via {} dev flannel.1 proto boot onlink",
            first.subnet,
            vxlan::nexthop_id(first.subnet),
            first.subnet.network()
        );
        assert!(
            interim.contains(&expected_first),
            "interim routes name their nexthop object: {:?}",
            &interim[..3]
        );
        assert!(interim.iter().all(|r| r.contains(" nhid ")));
        assert_eq!(nexthop_objects(&ns).len(), 1_200);
        assert_eq!(neighbours(&ns, "flannel.1").len(), 1_200);
        assert_eq!(fdb(&ns, "flannel.1").len(), 1_200);
        assert_eq!(overlay_agent::dataplane::interim_routes(), 1_200);
        assert!(dp.deferred_work_due().is_some());

        // The full check takes the interim form for what it is: nothing to repair.
        let before = overlay_agent::os::netlink::writes_total();
        dp.maintain().await.expect("full check");
        assert_eq!(overlay_agent::os::netlink::writes_total() - before, 0);

        // A peer removed while interim: route and object go.
        let removed = peers.remove(5);
        dp.apply(&PeerEvent::Remove(removed.subnet))
            .await
            .expect("remove");
        assert!(
            !flannel1_routes(&ns)
                .iter()
                .any(|r| r.starts_with(&format!("{} ", removed.subnet)))
        );
        assert_eq!(nexthop_objects(&ns).len(), 1_199);
        // A peer added at this scale goes through an interim object too.
        let added = large_cluster_peers(1_300).pop().expect("one more");
        dp.apply(&PeerEvent::Upsert(added.clone()))
            .await
            .expect("upsert");
        peers.push(added.clone());
        assert!(
            flannel1_routes(&ns)
                .iter()
                .any(|r| r.starts_with(&format!("{} nhid ", added.subnet))),
            "the added peer's route is interim"
        );

        // Deferred work, slice by slice, each one making progress.
        let mut left = overlay_agent::dataplane::interim_routes();
        assert_eq!(left, 1_200);
        while dp.deferred_work_due().is_some() {
            dp.do_deferred_work().await.expect("rewrite a slice");
            let now = overlay_agent::dataplane::interim_routes();
            assert!(now < left, "a slice rewrote nothing ({now} left)");
            left = now;
        }
        assert_eq!(left, 0);
        assert_eq!(flannel1_routes(&ns), flannel_routes_to(&peers));
        assert_eq!(nexthop_objects(&ns), Vec::<String>::new());
        assert_eq!(neighbours(&ns, "flannel.1").len(), 1_200);
        assert_eq!(fdb(&ns, "flannel.1").len(), 1_200);
        let before = overlay_agent::os::netlink::writes_total();
        dp.maintain().await.expect("full check");
        assert_eq!(overlay_agent::os::netlink::writes_total() - before, 0);
    });
}

/// The agent's dataplane task does the deferred rewrite on its own once commands stop
/// coming: a 1,100-peer snapshot ends in flannel's exact routes and no nexthop object.
#[test]
fn the_dataplane_task_rewrites_interim_routes_when_idle() {
    let ns = node_ns("kit", "192.168.100.1");
    let peers = large_cluster_peers(1_100);
    ns.block_on(|| async {
        let (commands, _ready, task, _) = vxlan_task_with(peers.clone()).await;
        let expected = flannel_routes_to(&peers);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = flannel1_routes(&ns);
            if now == expected && nexthop_objects(&ns).is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not rewritten in 30 s: {} routes, {} interim, {} nexthop objects",
                now.len(),
                now.iter().filter(|r| r.contains(" nhid ")).count(),
                nexthop_objects(&ns).len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(overlay_agent::dataplane::interim_routes(), 0);
        drop(commands);
        task.await.expect("dataplane task ends");
    });
}

/// A restart finds the peers in place and writes none of them again: half of 1,100 routes
/// rewritten in flannel's form and half still interim when the first run stops, the second
/// run's first snapshot (the same peers) makes no netlink write, and its deferred work
/// finishes the rewrite. Before, every route was replaced on start, each replace a scan of
/// all the others in the kernel.
#[test]
fn a_restart_keeps_the_peers_it_finds_in_place_and_finishes_the_rewrite() {
    let ns = node_ns("kia", "192.168.100.1");
    let peers = large_cluster_peers(1_100);
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("snapshot");
        while overlay_agent::dataplane::interim_routes() > 550 {
            dp.do_deferred_work().await.expect("rewrite a slice");
        }
    });
    let interim = flannel1_routes(&ns)
        .iter()
        .filter(|r| r.contains(" nhid "))
        .count();
    assert!(
        (1..=550).contains(&interim),
        "half interim at the stop: {interim}"
    );
    ns.block_on(|| async {
        let (mut dp, _) = activated_vxlan().await;
        let before = overlay_agent::os::netlink::writes_total();
        dp.apply(&PeerEvent::Snapshot(peers.clone()))
            .await
            .expect("snapshot after the restart");
        assert_eq!(
            overlay_agent::os::netlink::writes_total() - before,
            0,
            "the peers were in place: nothing to write"
        );
        assert_eq!(
            overlay_agent::dataplane::interim_routes(),
            interim as u64,
            "the interim routes found are still to be rewritten"
        );
        while dp.deferred_work_due().is_some() {
            dp.do_deferred_work().await.expect("rewrite a slice");
        }
    });
    assert_eq!(flannel1_routes(&ns), flannel_routes_to(&peers));
    assert_eq!(nexthop_objects(&ns), Vec::<String>::new());
}
