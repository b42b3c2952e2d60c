//! The eBPF datapath on real kernel objects: two node namespaces joined by a veth "underlay",
//! a pod namespace behind a bridge on each. Node A runs `EbpfDataplane` (over a flannel-style
//! kernel vxlan device), node B is a plain flannel kernel-vxlan node. Pods talk to each other;
//! the STATS map proves which path A's packets took (fast paths R1/R2/R3 or the kernel, and
//! why), and B's kernel device accepting A's packets (and A accepting B's) proves wire
//! compatibility.
//!
//! The namespaces, pods and pins are the shared fixtures (`overlay_tests`); what is this
//! file's own is the datapath under test, driven in-process on node A, and [`FlannelDevice`].
//! Needs root; fails loudly otherwise. Namespaces, links and pins are removed on drop.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use overlay_agent::{
    dataplane::{
        Dataplane, DataplaneError, LocalLease,
        ebpf::{EbpfDataplane, EbpfSettings, FastPath, read_pinned_stats},
    },
    os::iface::Uplink,
    peer::{MacAddr6, Peer, PeerEvent},
};
use overlay_common::{FlowKey, FlowState, map_names, program_names, stat};
use overlay_tests::{
    flanneld,
    netns::{Background, NetNs, iperf3_received_bytes},
    stats::{delta, fast_rx_bytes, fast_rx_packets, moved},
    topology::{Cluster, ClusterOptions, Node, Pod, UnderlayKind},
    wait_until,
};

const SUBNET_A: &str = "10.244.1.0/24";
const SUBNET_B: &str = "10.244.2.0/24";

/// The kernel vxlan device exactly as flannel programs it (the shared flanneld fixture) as a
/// [`Dataplane`]: the kernel path underneath the eBPF one on node A, and all of node B.
struct FlannelDevice {
    ns: NetNs,
}

impl FlannelDevice {
    /// Creates `flannel.1` on `node` for its lease of `subnet`.
    fn create(node: &Node, subnet: &str) -> Self {
        flanneld::add_device(&node.ns, node.ip, subnet, None);
        Self::on(node)
    }

    /// The `flannel.1` that already exists on `node`.
    fn on(node: &Node) -> Self {
        Self {
            ns: node.ns.handle(),
        }
    }

    fn add_peer(&self, peer: &Peer) {
        let mac = peer.vtep_mac.expect("vxlan peer").to_string();
        flanneld::add_peer(&self.ns, &peer.subnet.to_string(), &mac, peer.public_ip);
    }
}

impl Dataplane for FlannelDevice {
    fn name(&self) -> &'static str {
        "test-kernel-vxlan"
    }
    async fn activate(&mut self, _lease: &LocalLease) -> Result<(), DataplaneError> {
        Ok(())
    }
    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        match event {
            PeerEvent::Upsert(peer) => self.add_peer(peer),
            PeerEvent::Snapshot(peers) => peers.iter().for_each(|p| self.add_peer(p)),
            PeerEvent::Remove(subnet) => {
                self.ns.run(&["ip", "route", "del", &subnet.to_string()]);
            }
        }
        Ok(())
    }
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// A pod behind `cni0` (holding `gateway`, the subnet's first address), its eth0 at
/// FLANNEL_MTU: the uplink's 1500 less VXLAN's 50, as the CNI plugin sets it.
fn add_pod(node: &mut Node, gateway: &str) {
    let pod = node.add_pod(gateway, 1500);
    pod.ns.run(&["ip", "link", "set", "eth0", "mtu", "1450"]);
}

/// The host end of the one pod veth on `node`.
fn pod_veth(node: &Node) -> String {
    let veths = node.pod_host_veths();
    assert_eq!(
        veths.len(),
        1,
        "one pod veth on {}: {veths:?}",
        node.ns.name()
    );
    veths[0].clone()
}

fn vtep_mac(node: &Node) -> MacAddr6 {
    node.ns.mac("flannel.1").parse().expect("mac")
}

/// Node A (eBPF over a flannel device) and node B (flannel device only), peered both ways.
/// Field order is drop order: A's datapath, then the cluster (pins, then namespaces).
struct Topology {
    agent: AgentA,
    cluster: Cluster,
}

/// Node A's agent: its datapath and what starting it takes.
struct AgentA {
    dataplane: Option<EbpfDataplane<FlannelDevice>>,
    settings: EbpfSettings,
    lease: LocalLease,
    peer_b: Peer,
    rt: tokio::runtime::Runtime,
}

impl Topology {
    fn new() -> Self {
        Self::with_fast_path(FastPath::ALL)
    }

    fn with_fast_path(fast_path: FastPath) -> Self {
        // The underlay: one veth pair between the two node namespaces.
        let mut cluster = Cluster::with(ClusterOptions {
            nodes: 2,
            underlay: UnderlayKind::DirectVeth,
            etcd: false,
            ..ClusterOptions::default()
        });
        add_pod(&mut cluster.nodes[0], "10.244.1.1/24");
        add_pod(&mut cluster.nodes[1], "10.244.2.1/24");
        let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
        let kernel_a = FlannelDevice::create(a, SUBNET_A);
        let kernel_b = FlannelDevice::create(b, SUBNET_B);
        let peer_a = Peer {
            subnet: SUBNET_A.parse().expect("cidr"),
            public_ip: a.ip,
            vtep_mac: Some(vtep_mac(a)),
        };
        let peer_b = Peer {
            subnet: SUBNET_B.parse().expect("cidr"),
            public_ip: b.ip,
            vtep_mac: Some(vtep_mac(b)),
        };
        kernel_b.add_peer(&peer_a);
        let settings = EbpfSettings {
            pin_dir: a.pin_dir.clone(),
            bridge: None,
            uplink: Uplink {
                name: "eth0".into(),
                index: a.ns.ifindex("eth0"),
                address: a.ip,
                public_ip: a.ip,
                mtu: 1500,
            },
            vni: 1,
            port: 8472,
            // Read from A's flannel.1, as the agent does by default.
            vtep_mac: None,
            vxlan_device: "flannel.1".into(),
            fast_path,
        };
        let lease = LocalLease {
            subnet: peer_a.subnet,
            network: "10.244.0.0/16".parse().expect("cidr"),
            public_ip: a.ip,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut topo = Self {
            agent: AgentA {
                dataplane: None,
                settings,
                lease,
                peer_b,
                rt,
            },
            cluster,
        };
        topo.start_agent(kernel_a);
        topo
    }

    fn a(&self) -> &Node {
        &self.cluster.nodes[0]
    }

    fn b(&self) -> &Node {
        &self.cluster.nodes[1]
    }

    fn pod_a(&self) -> &Pod {
        &self.a().pods[0]
    }

    fn pod_b(&self) -> &Pod {
        &self.b().pods[0]
    }

    /// What the agent does at start: load + attach, activate, resync peers, one maintenance
    /// pass (next hops).
    fn start_agent(&mut self, kernel: FlannelDevice) {
        let dp = self.in_a(move |agent| {
            let rt = &agent.rt;
            let _rt = rt.enter();
            let mut dp = EbpfDataplane::new(kernel, agent.settings.clone())
                .unwrap_or_else(|e| panic!("eBPF datapath loads and attaches: {e}"));
            rt.block_on(dp.activate(&agent.lease)).expect("activate");
            rt.block_on(dp.apply(&PeerEvent::Snapshot(vec![agent.peer_b.clone()])))
                .expect("snapshot");
            rt.block_on(dp.maintain()).expect("maintain");
            dp
        });
        // The previous instance (if any) goes only now: its links were already replaced.
        self.agent.dataplane = Some(dp);
    }

    /// One maintenance pass of A's dataplane (what the agent runs every second).
    fn maintain(&mut self) {
        self.in_a(|agent| {
            let dp = agent.dataplane.as_mut().expect("dp");
            agent.rt.block_on(dp.maintain()).expect("maintain");
        });
    }

    fn dp(&self) -> &EbpfDataplane<FlannelDevice> {
        self.agent.dataplane.as_ref().expect("dataplane")
    }

    fn stats(&self) -> [u64; stat::COUNT as usize] {
        self.dp().stats().expect("stats")
    }

    /// Runs `f` on A's agent from a thread inside node A's namespace.
    fn in_a<T: Send>(&mut self, f: impl FnOnce(&mut AgentA) -> T + Send) -> T {
        let Self { agent, cluster } = self;
        cluster.nodes[0].ns.enter(|| f(agent))
    }

    /// The learned flows in A's pinned FLOWS map.
    fn flows(&self) -> Vec<(FlowKey, FlowState)> {
        let data = aya::maps::MapData::from_pin(self.a().pin_dir.join(map_names::FLOWS))
            .expect("FLOWS pin");
        let map = aya::maps::Map::from_map_data(data).expect("map");
        let flows: aya::maps::HashMap<_, FlowKey, FlowState> =
            aya::maps::HashMap::try_from(map).expect("hash map");
        flows.iter().filter_map(Result::ok).collect()
    }
}

fn tcx_programs(t: &mut Topology, ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    t.in_a(|_| {
        let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type).expect("query tcx");
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect()
    })
}

/// The kernel truncates program names to 15 bytes.
fn short(name: &str) -> String {
    name[..name.len().min(15)].to_string()
}

fn start_iperf_server(t: &Topology, port: u16) -> Background {
    t.pod_b().ns.iperf3_server(port)
}

/// iperf3 from pod A to pod B (`reverse`: B sends); returns the bytes the receiver got.
fn iperf(t: &Topology, port: u16, reverse: bool, seconds: u32) -> u64 {
    let _server = start_iperf_server(t, port);
    let target = t.pod_b().ip.to_string();
    let duration = seconds.to_string();
    let mut args = vec!["-t", &duration, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = t.pod_a().ns.iperf3_client(&target, port, &args);
    assert!(out.status.success(), "iperf3: {out:?}");
    let bytes = iperf3_received_bytes(&out);
    eprintln!(
        "iperf3 (reverse {reverse}): {:.2} Gbit/s, {bytes} bytes",
        bytes as f64 * 8.0 / f64::from(seconds) / 1e9
    );
    bytes
}

#[test]
fn ebpf_node_talks_to_kernel_vxlan_node_both_ways() {
    let mut t = Topology::new();
    let before = t.stats();
    let out = t.pod_a().ns.ping(t.pod_b().ip, 3, "0.2");
    assert!(out.status.success(), "pod A -> pod B ping failed: {out:?}");
    let out = t.pod_b().ns.ping(t.pod_a().ip, 3, "0.2");
    assert!(out.status.success(), "pod B -> pod A ping failed: {out:?}");
    let after = t.stats();
    // ICMP is never fast-pathed: the programs saw it and handed it to the kernel.
    assert!(
        delta(&before, &after, stat::KERNEL_NOT_OURS) >= 6,
        "{:?}",
        moved(&before, &after)
    );
    assert_eq!(delta(&before, &after, stat::FAST_TX_PACKETS), 0);
    // The agent-down path (`status`) reads the same counters from the pins.
    let pinned = read_pinned_stats(&t.a().pin_dir).expect("pinned stats");
    assert!(pinned[stat::KERNEL_NOT_OURS as usize] >= after[stat::KERNEL_NOT_OURS as usize]);
    // The pod was learned from netlink, its veth carries both pod programs.
    let endpoints = t.dp().endpoints();
    assert_eq!(
        endpoints.keys().copied().collect::<Vec<_>>(),
        [t.pod_a().ip],
        "{endpoints:?}"
    );
    let veth = pod_veth(t.a());
    assert_eq!(
        tcx_programs(&mut t, &veth, TcAttachType::Ingress),
        [short(program_names::POD_INGRESS)]
    );
    assert_eq!(
        tcx_programs(&mut t, &veth, TcAttachType::Egress),
        [short(program_names::POD_EGRESS)]
    );
}

#[test]
fn bulk_tcp_in_both_directions_takes_the_fast_path() {
    let t = Topology::new();
    let before = t.stats();
    let sent = iperf(&t, 5201, false, 2);
    let after = t.stats();
    let fast_tx = delta(&before, &after, stat::FAST_TX_BYTES);
    assert!(
        fast_tx * 10 >= sent * 9,
        "pod A -> pod B: {fast_tx} of {sent} bytes were encapsulated at the pod veth: {:?}",
        moved(&before, &after)
    );
    let before = t.stats();
    let received = iperf(&t, 5202, true, 2);
    let after = t.stats();
    let fast_rx = fast_rx_bytes(&before, &after);
    assert!(
        fast_rx * 10 >= received * 9,
        "pod B -> pod A: {fast_rx} of {received} bytes were delivered into the pod by redirect_peer: {:?}",
        moved(&before, &after)
    );
    for bad in [stat::KERNEL_HELPER_ERROR, stat::DROP_HELPER_ERROR] {
        assert_eq!(
            delta(&before, &after, bad),
            0,
            "{:?}",
            moved(&before, &after)
        );
    }
}

#[test]
fn each_fast_path_piece_can_be_turned_off() {
    let t = Topology::with_fast_path(FastPath::NONE);
    let before = t.stats();
    iperf(&t, 5203, false, 1);
    iperf(&t, 5204, true, 1);
    let after = t.stats();
    assert_eq!(
        delta(&before, &after, stat::FAST_TX_PACKETS),
        0,
        "{:?}",
        moved(&before, &after)
    );
    assert_eq!(
        fast_rx_bytes(&before, &after),
        0,
        "{:?}",
        moved(&before, &after)
    );
    assert!(delta(&before, &after, stat::KERNEL_DISABLED) > 0);
}

#[test]
fn restart_under_traffic_loses_nothing() {
    let mut t = Topology::new();
    let pinger = std::thread::spawn({
        let mut ping = t.pod_a().ns.command("ping");
        ping.args(["-c", "150", "-i", "0.01", "-W", "2"])
            .arg(t.pod_b().ip.to_string());
        move || ping.output().expect("ping")
    });
    let before = t.stats();
    wait_until(
        Duration::from_secs(10),
        "traffic through the first instance",
        || {
            delta(
                &before,
                &t.dp().stats().expect("stats"),
                stat::KERNEL_NOT_OURS,
            ) >= 20
        },
    );
    // A second instance on the same pins while the first is still alive (as when the old
    // process lingers): it attaches first, then the old links are unpinned.
    let kernel = FlannelDevice::on(t.a());
    t.start_agent(kernel);
    let out = pinger.join().expect("pinger");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "traffic interrupted by the restart: {text}"
    );
    // The fast path works after the handoff too.
    let before = t.stats();
    let sent = iperf(&t, 5205, false, 1);
    let after = t.stats();
    assert!(
        delta(&before, &after, stat::FAST_TX_BYTES) * 10 >= sent * 8,
        "{:?}",
        moved(&before, &after)
    );
    // Exactly one TCX program per hook after the handoff (the old links are gone).
    let veth = pod_veth(t.a());
    for (ifname, hook, program) in [
        ("eth0", TcAttachType::Ingress, program_names::UPLINK_INGRESS),
        (
            "flannel.1",
            TcAttachType::Ingress,
            program_names::VXLAN_INGRESS,
        ),
        (
            "flannel.1",
            TcAttachType::Egress,
            program_names::VXLAN_EGRESS,
        ),
        (&veth, TcAttachType::Ingress, program_names::POD_INGRESS),
        (&veth, TcAttachType::Egress, program_names::POD_EGRESS),
    ] {
        assert_eq!(
            tcx_programs(&mut t, ifname, hook),
            [short(program)],
            "{ifname} {hook:?}"
        );
    }
}

/// A ClusterIP-style DNAT on node A (what kube-proxy installs) towards pod B, with iptables
/// or nftables: the replies come back from B and must meet node A's conntrack to be
/// un-NATed. Returns the counters that moved.
fn service_dnat_works(t: &mut Topology, port: u16, nft: bool) -> Vec<(&'static str, u64)> {
    let _server = start_iperf_server(t, port);
    let rule = if nft {
        for cmd in [
            vec!["nft", "add", "table", "ip", "svc"],
            vec![
                "nft",
                "add",
                "chain",
                "ip",
                "svc",
                "pre",
                "{ type nat hook prerouting priority -100; }",
            ],
        ] {
            let out = t.a().ns.try_run(&cmd);
            assert!(out.status.success(), "{cmd:?}: {out:?}");
        }
        let target = format!("10.244.2.2:{port}");
        t.a().ns.try_run(&[
            "nft",
            "add",
            "rule",
            "ip",
            "svc",
            "pre",
            "ip",
            "daddr",
            "10.96.0.10",
            "tcp",
            "dport",
            "80",
            "dnat",
            "to",
            &target,
        ])
    } else {
        t.a()
            .ns
            .add_tcp_dnat("10.96.0.10", 80, &format!("10.244.2.2:{port}"))
    };
    assert!(rule.status.success(), "DNAT rule: {rule:?}");
    let before = t.stats();
    let out = t
        .pod_a()
        .ns
        .iperf3_client("10.96.0.10", 80, &["-t", "2", "-J"]);
    let after = t.stats();
    assert!(
        out.status.success(),
        "TCP through a DNAT 'Service' to the remote pod failed (replies bypassed conntrack?): {out:?}; counters {:?}",
        moved(&before, &after)
    );
    assert!(iperf3_received_bytes(&out) > 1_000_000, "data flowed");
    // The Service flow's tuple changes on the way: it never becomes a learned flow.
    let learned: Vec<_> = t
        .flows()
        .into_iter()
        .filter(|(k, v)| {
            u16::from_be(k.remote_port_be) == port
                && v.egress_seen_ns != 0
                && v.ingress_seen_ns != 0
        })
        .collect();
    assert!(
        learned.is_empty(),
        "a NATed flow was learned for the fast path: {learned:?}"
    );
    moved(&before, &after)
}

#[test]
fn service_dnat_replies_meet_conntrack_iptables_and_nftables() {
    for nft in [false, true] {
        let mut t = Topology::new();
        // br_netfilter on, as kube-proxy requires (the module may be absent: then nothing to set).
        let _ = t
            .a()
            .ns
            .try_run(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        let moved = service_dnat_works(&mut t, 5301 + u16::from(nft), nft);
        let fast = moved
            .iter()
            .filter(|(name, _)| name.starts_with("fast_"))
            .count();
        assert_eq!(
            fast, 0,
            "nft {nft}: the Service flow stayed on the kernel path: {moved:?}"
        );
        assert!(
            moved
                .iter()
                .any(|(name, n)| *name == "kernel_not_learned" && *n > 0),
            "nft {nft}: {moved:?}"
        );
    }
}

#[test]
fn hostport_dnat_and_masquerade_replies_are_correct() {
    let t = Topology::new();
    // hostPort on node A (the portmap plugin's DNAT): pod B connects to A's node address,
    // A DNATs to its pod; the replies leave pod A and must be un-DNATed by A's conntrack.
    let port = 5311u16;
    let server = t.pod_a().ns.iperf3_server(port);
    let dnat = t
        .a()
        .ns
        .add_tcp_dnat("10.244.1.0", 8080, &format!("10.244.1.2:{port}"));
    assert!(dnat.status.success(), "{dnat:?}");
    let before = t.stats();
    let out = t.pod_b().ns.iperf3_client("10.244.1.0", 8080, &["-t", "2"]);
    let after = t.stats();
    assert!(
        out.status.success(),
        "hostPort-style DNAT connection failed: {out:?}; {:?}",
        moved(&before, &after)
    );
    drop(server);
    assert_eq!(
        delta(&before, &after, stat::FAST_TX_PACKETS),
        0,
        "hostPort replies took the fast path: {:?}",
        moved(&before, &after)
    );
    // Masquerade: node A's host talks to pod B (flannel masquerades host -> overlay to the
    // flannel.1 address); the replies are for a non-pod address and go to the kernel.
    let masq = t.a().ns.try_run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "!",
        "-s",
        "10.244.0.0/16",
        "-d",
        "10.244.0.0/16",
        "-j",
        "MASQUERADE",
    ]);
    assert!(masq.status.success(), "{masq:?}");
    let port = 5312u16;
    let _server = start_iperf_server(&t, port);
    let out = t
        .a()
        .ns
        .iperf3_client(&t.pod_b().ip.to_string(), port, &["-t", "1"]);
    assert!(
        out.status.success(),
        "host -> remote pod with masquerade failed: {out:?}"
    );
}

#[test]
fn removed_peer_is_no_longer_reached_and_its_vxlan_is_dropped() {
    let mut t = Topology::new();
    assert!(
        t.pod_b().ns.ping(t.pod_a().ip, 1, "0.2").status.success(),
        "baseline"
    );
    t.in_a(|agent| {
        let dp = agent.dataplane.as_mut().expect("dp");
        agent
            .rt
            .block_on(dp.apply(&PeerEvent::Remove(agent.peer_b.subnet)))
            .expect("remove");
    });
    let before = t.stats();
    // B still believes in A and sends VXLAN; A no longer accepts it from B.
    assert!(
        !t.pod_b().ns.ping(t.pod_a().ip, 2, "0.2").status.success(),
        "a removed peer's traffic must not be delivered"
    );
    let after = t.stats();
    assert!(
        delta(&before, &after, stat::DROP_UNKNOWN_SOURCE) >= 2,
        "dropped as VXLAN from a non-peer: {after:?}"
    );
}

#[test]
fn mtu_limits_hold_on_the_fast_path() {
    let t = Topology::new();
    // A full-size DF ping (1450 bytes, the pod MTU) passes.
    let out = t.pod_a().ns.try_run(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1422",
        &t.pod_b().ip.to_string(),
    ]);
    assert!(out.status.success(), "full-size DF ping: {out:?}");
    // A pod whose MTU is larger than the overlay's sends a DF packet one byte over: the
    // kernel path answers "frag needed" with the overlay MTU.
    t.pod_a()
        .ns
        .run(&["ip", "link", "set", "eth0", "mtu", "1500"]);
    let before = t.stats();
    let out = t.pod_a().ns.try_run(&[
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1423",
        &t.pod_b().ip.to_string(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "an oversized DF packet must not pass: {text}"
    );
    assert!(
        text.contains("mtu = 1450") || text.contains("Frag needed"),
        "ICMP frag needed with the overlay MTU came back: {text}"
    );
    let after = t.stats();
    assert!(
        delta(&before, &after, stat::KERNEL_TOO_BIG) > 0,
        "the oversized packet was left to the kernel: {:?}",
        moved(&before, &after)
    );
    // TCP with GSO/TSO on (the MSS comes from pod B's 1450 MTU, so GSO segments fit the
    // underlay) and with offloads off.
    let before = t.stats();
    let sent = iperf(&t, 5321, false, 1);
    let after = t.stats();
    assert!(
        delta(&before, &after, stat::FAST_TX_BYTES) * 10 >= sent * 8,
        "TSO TCP on the fast path: {:?}",
        moved(&before, &after)
    );
    t.pod_a()
        .ns
        .run(&["ip", "link", "set", "eth0", "mtu", "1450"]);
    let off = t.pod_a().ns.try_run(&[
        "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "off",
    ]);
    assert!(off.status.success(), "{off:?}");
    let before = t.stats();
    let sent = iperf(&t, 5322, false, 1);
    let after = t.stats();
    assert!(
        delta(&before, &after, stat::FAST_TX_BYTES) * 10 >= sent * 8,
        "no-offload TCP on the fast path: {:?}",
        moved(&before, &after)
    );
}

/// Replaces pod A with a new pod namespace holding the same IP but a new MAC, its host veth
/// created with `index` (to reuse the old veth's ifindex) and named `veth`.
fn recreate_pod_a(t: &mut Topology, old_veth: &str, veth: &str, index: Option<u32>) {
    let node = &mut t.cluster.nodes[0];
    let ip = node.pods[0].ip;
    node.pods.clear(); // deleting the namespace deletes the old veth pair
    wait_until(Duration::from_secs(5), "the old veth to go", || {
        !node
            .ns
            .try_run(&["ip", "link", "show", old_veth])
            .status
            .success()
    });
    let pod = NetNs::new("op");
    let mut add = vec!["ip", "link", "add", veth];
    let index_text = index.map(|i| i.to_string());
    if let Some(index) = &index_text {
        add.extend_from_slice(&["index", index]);
    }
    add.extend_from_slice(&["type", "veth", "peer", "name", "eth0", "netns", pod.name()]);
    node.ns.run(&add);
    node.ns
        .run(&["ip", "link", "set", veth, "master", "cni0", "up"]);
    pod.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    pod.run(&["ip", "link", "set", "eth0", "mtu", "1450", "up"]);
    pod.run(&["ip", "route", "add", "default", "via", "10.244.1.1"]);
    node.pods.push(Pod { ns: pod, ip });
}

/// TCP from pod B to pod A's address (an iperf3 server in the current pod A).
fn b_to_a_tcp(t: &Topology, port: u16) {
    let _server = t.pod_a().ns.iperf3_server(port);
    let out = t
        .pod_b()
        .ns
        .iperf3_client(&t.pod_a().ip.to_string(), port, &["-t", "1"]);
    assert!(out.status.success(), "pod B -> new pod A: {out:?}");
}

#[test]
fn recreated_pods_with_reused_ip_and_ifindex_are_reached_at_once_and_never_cross_delivered() {
    let mut t = Topology::new();
    b_to_a_tcp(&t, 5401);
    let mut old_veth = pod_veth(t.a());
    for round in 0..3u16 {
        let old_index = t.a().ns.ifindex(&old_veth);
        let old_mac = t.pod_a().ns.mac("eth0");
        // Same IP, same ifindex, new MAC: the agent has not looked yet (no maintain).
        let name = format!("vethnew{round}");
        recreate_pod_a(&mut t, &old_veth, &name, Some(old_index));
        assert_eq!(
            t.a().ns.ifindex(&name),
            old_index,
            "the kernel reused the ifindex"
        );
        old_veth = name;
        assert_ne!(t.pod_a().ns.mac("eth0"), old_mac);
        // Reachable at once: the stale endpoint names another MAC, so nothing is learned
        // through it and the new pod's flows take the kernel path.
        let before = t.stats();
        b_to_a_tcp(&t, 5410 + round);
        let after = t.stats();
        assert_eq!(
            fast_rx_bytes(&before, &after),
            0,
            "round {round}: delivered by a stale endpoint: {:?}",
            moved(&before, &after)
        );
        // After the agent's pass the new pod is on the fast path.
        t.maintain();
        assert_eq!(t.dp().endpoints().get(&t.pod_a().ip), Some(&old_index));
        let before = t.stats();
        let received = iperf(&t, 5420 + round, true, 1);
        let after = t.stats();
        assert!(
            fast_rx_bytes(&before, &after) * 10 >= received * 8,
            "round {round}: {:?}",
            moved(&before, &after)
        );
    }
    // A pod that goes away: its endpoint and learned flows go with the agent's next pass.
    let pod_ip = t.pod_a().ip;
    t.cluster.nodes[0].pods.clear();
    wait_until(Duration::from_secs(5), "the veth to go", || {
        t.a().pod_host_veths().is_empty()
    });
    t.maintain();
    assert!(t.dp().endpoints().is_empty());
    let pod_ip = pod_ip.octets();
    assert!(
        t.flows().iter().all(|(k, _)| k.pod_ip != pod_ip),
        "flows of a deleted pod remain"
    );
}

#[test]
fn fast_flows_close_cleanly_under_an_invalid_state_drop_rule() {
    // kube-proxy drops conntrack-INVALID packets in FORWARD. The packets a fast flow sends
    // through the kernel (FIN, re-validation) must still be in conntrack's window.
    let mut t = Topology::new();
    for ns in [&t.a().ns, &t.b().ns] {
        let out = ns.try_run(&[
            "iptables",
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    t.maintain();
    let liberal = t
        .a()
        .ns
        .try_run(&["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal"]);
    assert_eq!(
        String::from_utf8_lossy(&liberal.stdout).trim(),
        "1",
        "{liberal:?}"
    );
    let before = t.stats();
    let sent = iperf(&t, 5501, false, 2);
    let received = iperf(&t, 5502, true, 2);
    let after = t.stats();
    assert!(sent > 0 && received > 0);
    assert!(
        delta(&before, &after, stat::FAST_TX_BYTES) * 10 >= sent * 8,
        "{:?}",
        moved(&before, &after)
    );
    // Both iperf3 runs ended (their data connections closed through the kernel path, or the
    // client would have hung): no connection is left established in pod A.
    let out = t.pod_a().ns.try_run(&["ss", "-tn", "state", "established"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&t.pod_b().ip.to_string()),
        "connections stuck open: {text}"
    );
    // The agent made conntrack follow the fast flows (the first maintenance pass after the
    // rule loaded conntrack): none of their kernel-path packets was INVALID on node A.
    for ns in [&t.a().ns, &t.b().ns] {
        let rules = ns.try_run(&["iptables", "-vnxL", "FORWARD"]);
        eprintln!("{}", String::from_utf8_lossy(&rules.stdout));
    }
    let rules = t.a().ns.try_run(&["iptables", "-vnxL", "FORWARD"]);
    let dropped: u64 = String::from_utf8_lossy(&rules.stdout)
        .lines()
        .find(|l| l.contains("INVALID"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("the INVALID rule's counter");
    assert_eq!(
        dropped, 0,
        "fast-path flows' kernel packets were dropped as conntrack-INVALID on node A"
    );
}

#[test]
fn one_way_udp_takes_the_fast_path_in_both_directions() {
    let t = Topology::new();
    for (port, reverse) in [(5601u16, false), (5602, true)] {
        let _server = start_iperf_server(&t, port);
        let before = t.stats();
        let mut args = vec!["-u", "-b", "200M", "-l", "1000", "-t", "1"];
        if reverse {
            args.push("-R");
        }
        let out = t.pod_a().ns.iperf3_client("10.244.2.2", port, &args);
        assert!(out.status.success(), "{out:?}");
        let after = t.stats();
        // ~25,000 datagrams one way: all but the first take the fast path (TX on A, or RX
        // into A's pod when B sends).
        let fast = if reverse {
            fast_rx_packets(&before, &after)
        } else {
            delta(&before, &after, stat::FAST_TX_PACKETS)
        };
        assert!(
            fast > 10_000,
            "reverse {reverse}: one-way UDP on the fast path: {:?}",
            moved(&before, &after)
        );
    }
}

/// A peer that arrives on its own (a lease change, not a snapshot) is written at once and
/// gets its underlay next hop at the next maintenance pass, looked up for it alone (the
/// route to its PublicIP: here on the underlay's own segment, so the address itself).
#[test]
fn a_peer_added_alone_gets_its_next_hop_at_the_next_pass() {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    use overlay_common::PeerInfo;
    let mut t = Topology::new();
    let b_ip = t.b().ip;
    let subnet: ipnetwork::Ipv4Network = "10.244.9.0/24".parse().expect("cidr");
    let pin = t.agent.settings.pin_dir.join(map_names::PEERS);
    let next_hop_of = move |net: ipnetwork::Ipv4Network| -> [u8; 4] {
        let map =
            Map::from_map_data(MapData::from_pin(&pin).expect("PEERS pinned")).expect("PEERS map");
        let trie: LpmTrie<MapData, [u8; 4], PeerInfo> = LpmTrie::try_from(map).expect("LPM trie");
        trie.get(&Key::new(24, net.network().octets()), 0)
            .expect("the peer is in PEERS")
            .nexthop_ip
    };
    let peer = Peer {
        subnet,
        public_ip: b_ip,
        vtep_mac: Some("0a:58:00:00:09:01".parse().expect("mac")),
    };
    t.in_a(|agent| {
        let dp = agent.dataplane.as_mut().expect("dp");
        agent
            .rt
            .block_on(dp.apply(&PeerEvent::Upsert(peer)))
            .expect("upsert");
    });
    // B's address is known already (peer B uses it): written with it at once.
    assert_eq!(next_hop_of(subnet), b_ip.octets());

    // A new underlay address: unknown until the next pass, which looks it up.
    let other: ipnetwork::Ipv4Network = "10.244.10.0/24".parse().expect("cidr");
    let far = std::net::Ipv4Addr::new(192, 168, 100, 77);
    t.in_a(|agent| {
        let dp = agent.dataplane.as_mut().expect("dp");
        agent
            .rt
            .block_on(dp.apply(&PeerEvent::Upsert(Peer {
                subnet: other,
                public_ip: far,
                vtep_mac: Some("0a:58:00:00:0a:01".parse().expect("mac")),
            })))
            .expect("upsert");
    });
    assert_eq!(next_hop_of(other), [0; 4], "not looked up yet");
    t.in_a(|agent| {
        let dp = agent.dataplane.as_mut().expect("dp");
        agent
            .rt
            .block_on(dp.maintain_changes())
            .expect("the next pass");
    });
    assert_eq!(
        next_hop_of(other),
        far.octets(),
        "the next pass looked the new address up (on the underlay's segment: itself)"
    );
}
