//! The eBPF datapath on real kernel objects: two node namespaces joined by a veth "underlay",
//! a pod namespace behind a bridge on each. Node A runs `EbpfDataplane` (over a flannel-style
//! kernel vxlan device), node B is a plain flannel kernel-vxlan node. Pods talk to each other;
//! the STATS map proves which path A's packets took (fast paths R1/R2/R3 or the kernel, and
//! why), and B's kernel device accepting A's packets (and A accepting B's) proves wire
//! compatibility.
//!
//! Needs root; fails loudly otherwise. Namespaces, links and pins are removed on drop.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use ipnetwork::Ipv4Network;
use overlay_agent::{
    dataplane::{
        Dataplane, DataplaneError, LocalLease,
        ebpf::{EbpfDataplane, EbpfSettings, FastPath, read_pinned_stats},
    },
    os::iface::Uplink,
    peer::{MacAddr6, Peer, PeerEvent},
};
use overlay_common::{FlowKey, FlowState, map_names, program_names, stat};

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run(&["ip", "netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.0];
        full.extend_from_slice(args);
        run(&full)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec")
    }
    fn sysctl(&self, key: &str, value: &str) {
        let out = self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
        assert!(out.status.success(), "sysctl {key}: {out:?}");
    }
    fn ifindex(&self, name: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", name]);
        out.split(':')
            .next()
            .expect("index")
            .trim()
            .parse()
            .expect("ifindex")
    }
    fn mac(&self, name: &str) -> MacAddr6 {
        let out = self.ip(&["-o", "link", "show", name]);
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("link/ether");
        mac.parse().expect("mac")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Switches the current thread into a namespace; back on drop.
struct InNs {
    original: File,
}

impl InNs {
    fn enter(ns: &Ns) -> Self {
        let original = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(format!("/run/netns/{}", ns.0)).expect("target netns");
        // SAFETY: plain syscall on valid fds; affects only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self { original }
    }
}

impl Drop for InNs {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A unique bpffs pin directory, removed on drop (unpinning detaches the links).
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique("ovl-netns-test-")
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The kernel vxlan device exactly as flannel programs it, via `ip` in the node namespace:
/// the kernel path underneath the eBPF one on node A, and all of node B.
struct FlannelDevice {
    ns: String,
    dev: String,
}

impl FlannelDevice {
    fn create(ns: &Ns, local: Ipv4Addr, subnet: Ipv4Network) -> Self {
        let dev = "flannel.1".to_string();
        ns.ip(&[
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local.to_string(),
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ]);
        ns.ip(&["link", "set", &dev, "mtu", "1450", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/32", subnet.network()),
            "dev",
            &dev,
        ]);
        Self {
            ns: ns.0.clone(),
            dev,
        }
    }
    fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.ns];
        full.extend_from_slice(args);
        run(&full);
    }
    fn add_peer(&self, peer: &Peer) {
        let gw = peer.subnet.network().to_string();
        let mac = peer.vtep_mac.expect("vxlan peer").to_string();
        self.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            &self.dev,
            "nud",
            "permanent",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "bridge",
            "fdb",
            "replace",
            &mac,
            "dst",
            &peer.public_ip.to_string(),
            "dev",
            &self.dev,
            "self",
            "permanent",
        ]);
        self.ip(&[
            "route",
            "replace",
            &peer.subnet.to_string(),
            "via",
            &gw,
            "dev",
            &self.dev,
            "onlink",
        ]);
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
                self.ip(&["route", "del", &subnet.to_string()]);
            }
        }
        Ok(())
    }
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

struct Node {
    ns: Ns,
    pod: Ns,
    pod_ip: Ipv4Addr,
}

impl Node {
    /// Node namespace with `eth0` (already moved in), bridge cni0 = subnet .1, one pod (.2).
    fn setup(ns: Ns, public_ip: Ipv4Addr, subnet: Ipv4Network) -> Self {
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.ip(&["addr", "add", &format!("{public_ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let pod_ip = Ipv4Addr::from(u32::from(subnet.network()) + 2);
        ns.ip(&["link", "add", "cni0", "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{gw}/{}", subnet.prefix()),
            "dev",
            "cni0",
        ]);
        ns.ip(&["link", "set", "cni0", "up"]);
        let pod = Ns::new("ovlpod");
        ns.ip(&[
            "link", "add", "vethpod", "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
        ]);
        ns.ip(&["link", "set", "vethpod", "master", "cni0", "up"]);
        pod.ip(&[
            "addr",
            "add",
            &format!("{pod_ip}/{}", subnet.prefix()),
            "dev",
            "eth0",
        ]);
        // FLANNEL_MTU: the uplink's 1500 less VXLAN's 50, as the CNI plugin sets it.
        pod.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
        pod.ip(&["route", "add", "default", "via", &gw.to_string()]);
        Self { ns, pod, pod_ip }
    }
}

fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates namespaces and loads BPF programs: run it as root"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    assert!(
        mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")),
        "/sys/fs/bpf is not a bpf filesystem: run `mount -t bpf bpf /sys/fs/bpf`"
    );
}

fn ping(from: &Ns, to: Ipv4Addr, count: u32, interval: &str) -> std::process::Output {
    from.exec(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        interval,
        "-W",
        "2",
        &to.to_string(),
    ])
}

fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node A (eBPF over a flannel device) and node B (flannel device only), peered both ways.
/// Field order is drop order: the datapath, then its pins, then the namespaces.
struct Topology {
    dataplane: Option<EbpfDataplane<FlannelDevice>>,
    pin: PinDir,
    settings: EbpfSettings,
    lease: LocalLease,
    peer_b: Peer,
    rt: tokio::runtime::Runtime,
    a: Node,
    b: Node,
}

impl Topology {
    fn new() -> Self {
        Self::with_fast_path(FastPath::ALL)
    }

    fn with_fast_path(fast_path: FastPath) -> Self {
        require_root();
        let subnet_a: Ipv4Network = "10.244.1.0/24".parse().expect("cidr");
        let subnet_b: Ipv4Network = "10.244.2.0/24".parse().expect("cidr");
        let (ip_a, ip_b) = (
            Ipv4Addr::new(192, 168, 77, 1),
            Ipv4Addr::new(192, 168, 77, 2),
        );
        let ns_a = Ns::new("ovlA");
        let ns_b = Ns::new("ovlB");
        // The underlay: one veth pair between the two node namespaces.
        ns_a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &ns_b.0,
        ]);
        let a = Node::setup(ns_a, ip_a, subnet_a);
        let b = Node::setup(ns_b, ip_b, subnet_b);
        let kernel_a = FlannelDevice::create(&a.ns, ip_a, subnet_a);
        let kernel_b = FlannelDevice::create(&b.ns, ip_b, subnet_b);
        let peer_a = Peer {
            subnet: subnet_a,
            public_ip: ip_a,
            vtep_mac: Some(a.ns.mac("flannel.1")),
        };
        let peer_b = Peer {
            subnet: subnet_b,
            public_ip: ip_b,
            vtep_mac: Some(b.ns.mac("flannel.1")),
        };
        kernel_b.add_peer(&peer_a);
        let pin = PinDir::new();
        let settings = EbpfSettings {
            pin_dir: pin.0.clone(),
            bridge: None,
            uplink: Uplink {
                name: "eth0".into(),
                index: a.ns.ifindex("eth0"),
                address: ip_a,
                public_ip: ip_a,
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
            subnet: subnet_a,
            network: "10.244.0.0/16".parse().expect("cidr"),
            public_ip: ip_a,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut topo = Self {
            dataplane: None,
            pin,
            settings,
            lease,
            peer_b,
            rt,
            a,
            b,
        };
        topo.start_agent(kernel_a);
        topo
    }

    /// What the agent does at start: load + attach, activate, resync peers, one maintenance
    /// pass (next hops).
    fn start_agent(&mut self, kernel: FlannelDevice) {
        let _in_a = InNs::enter(&self.a.ns);
        let _rt = self.rt.enter();
        let mut dp = EbpfDataplane::new(kernel, self.settings.clone())
            .unwrap_or_else(|e| panic!("eBPF datapath loads and attaches: {e}"));
        self.rt
            .block_on(dp.activate(&self.lease))
            .expect("activate");
        self.rt
            .block_on(dp.apply(&PeerEvent::Snapshot(vec![self.peer_b.clone()])))
            .expect("snapshot");
        self.rt.block_on(dp.maintain()).expect("maintain");
        // The previous instance (if any) goes only now: its links were already replaced.
        self.dataplane = Some(dp);
    }

    /// One maintenance pass of A's dataplane (what the agent runs every second).
    fn maintain(&mut self) {
        self.in_a(|t| {
            let rt = &t.rt;
            let dp = t.dataplane.as_mut().expect("dp");
            rt.block_on(dp.maintain()).expect("maintain");
        });
    }

    fn dp(&mut self) -> &mut EbpfDataplane<FlannelDevice> {
        self.dataplane.as_mut().expect("dataplane")
    }

    fn stats(&mut self) -> [u64; stat::COUNT as usize] {
        self.dp().stats().expect("stats")
    }

    fn in_a<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let ns = Ns(self.a.ns.0.clone());
        let guard = InNs::enter(&ns);
        std::mem::forget(ns); // not ours to delete
        let result = f(self);
        drop(guard);
        result
    }

    /// The learned flows in A's pinned FLOWS map.
    fn flows(&self) -> Vec<(FlowKey, FlowState)> {
        let data =
            aya::maps::MapData::from_pin(self.pin.0.join(map_names::FLOWS)).expect("FLOWS pin");
        let map = aya::maps::Map::from_map_data(data).expect("map");
        let flows: aya::maps::HashMap<_, FlowKey, FlowState> =
            aya::maps::HashMap::try_from(map).expect("hash map");
        flows.iter().filter_map(Result::ok).collect()
    }
}

fn delta(before: &[u64], after: &[u64], index: u32) -> u64 {
    after[index as usize] - before[index as usize]
}

fn moved(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    (0..stat::COUNT)
        .filter(|&i| delta(before, after, i) > 0)
        .map(|i| (stat::NAMES[i as usize], delta(before, after, i)))
        .collect()
}

fn fast_rx_bytes(before: &[u64], after: &[u64]) -> u64 {
    delta(before, after, stat::FAST_RX_BEFORE_DECAP_BYTES)
        + delta(before, after, stat::FAST_RX_AFTER_DECAP_BYTES)
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

fn start_iperf_server(t: &Topology, port: u16) -> overlay_tests::netns::Background {
    let port = port.to_string();
    let server =
        overlay_tests::netns::Background::spawn(&t.b.pod.0, &["iperf3", "-s", "-1", "-p", &port]);
    wait_until(Duration::from_secs(10), "iperf3 server listening", || {
        let out = t.b.pod.exec(&["ss", "-ltn", &format!("sport = :{port}")]);
        String::from_utf8_lossy(&out.stdout).contains(&port)
    });
    server
}

/// iperf3 from pod A to pod B (`reverse`: B sends); returns the bytes the receiver got.
fn iperf(t: &Topology, port: u16, reverse: bool, seconds: u32) -> u64 {
    let _server = start_iperf_server(t, port);
    let port = port.to_string();
    let target = t.b.pod_ip.to_string();
    let seconds = seconds.to_string();
    let mut args = vec!["iperf3", "-c", &target, "-t", &seconds, "-p", &port, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = t.a.pod.exec(&args);
    assert!(out.status.success(), "iperf3: {out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    let bytes = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .expect("bytes") as u64;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bps");
    eprintln!(
        "iperf3 (reverse {reverse}): {:.2} Gbit/s, {bytes} bytes",
        bps / 1e9
    );
    bytes
}

#[test]
fn ebpf_node_talks_to_kernel_vxlan_node_both_ways() {
    let mut t = Topology::new();
    let before = t.stats();
    let out = ping(&t.a.pod, t.b.pod_ip, 3, "0.2");
    assert!(out.status.success(), "pod A -> pod B ping failed: {out:?}");
    let out = ping(&t.b.pod, t.a.pod_ip, 3, "0.2");
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
    let pinned = read_pinned_stats(&t.pin.0).expect("pinned stats");
    assert!(pinned[stat::KERNEL_NOT_OURS as usize] >= after[stat::KERNEL_NOT_OURS as usize]);
    // The pod was learned from netlink, its veth carries both pod programs.
    let endpoints = t.dp().endpoints();
    assert_eq!(
        endpoints.keys().copied().collect::<Vec<_>>(),
        [t.a.pod_ip],
        "{endpoints:?}"
    );
    assert_eq!(
        tcx_programs(&mut t, "vethpod", TcAttachType::Ingress),
        [short(program_names::POD_INGRESS)]
    );
    assert_eq!(
        tcx_programs(&mut t, "vethpod", TcAttachType::Egress),
        [short(program_names::POD_EGRESS)]
    );
}

#[test]
fn bulk_tcp_in_both_directions_takes_the_fast_path() {
    let mut t = Topology::new();
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
    let mut t = Topology::with_fast_path(FastPath::NONE);
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
        let pod = t.a.pod.0.clone();
        let target = t.b.pod_ip.to_string();
        move || {
            Command::new("ip")
                .args([
                    "netns", "exec", &pod, "ping", "-c", "150", "-i", "0.01", "-W", "2", &target,
                ])
                .output()
                .expect("ping")
        }
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
    let kernel = FlannelDevice {
        ns: t.a.ns.0.clone(),
        dev: "flannel.1".into(),
    };
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
        ("vethpod", TcAttachType::Ingress, program_names::POD_INGRESS),
        ("vethpod", TcAttachType::Egress, program_names::POD_EGRESS),
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
            let out = t.a.ns.exec(&cmd);
            assert!(out.status.success(), "{cmd:?}: {out:?}");
        }
        let target = format!("10.244.2.2:{port}");
        t.a.ns.exec(&[
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
        t.a.ns.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("10.244.2.2:{port}"),
        ])
    };
    assert!(rule.status.success(), "DNAT rule: {rule:?}");
    let before = t.stats();
    let out = t.a.pod.exec(&[
        "iperf3",
        "-c",
        "10.96.0.10",
        "-p",
        "80",
        "-t",
        "2",
        "--connect-timeout",
        "3000",
        "-J",
    ]);
    let after = t.stats();
    assert!(
        out.status.success(),
        "TCP through a DNAT 'Service' to the remote pod failed (replies bypassed conntrack?): {out:?}; counters {:?}",
        moved(&before, &after)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    assert!(
        report["end"]["sum_received"]["bytes"]
            .as_f64()
            .unwrap_or(0.0)
            > 1e6,
        "data flowed"
    );
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
        let _ =
            t.a.ns
                .exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
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
    let mut t = Topology::new();
    // hostPort on node A (the portmap plugin's DNAT): pod B connects to A's node address,
    // A DNATs to its pod; the replies leave pod A and must be un-DNATed by A's conntrack.
    let port = 5311u16;
    let server = overlay_tests::netns::Background::spawn(
        &t.a.pod.0,
        &["iperf3", "-s", "-1", "-p", &port.to_string()],
    );
    wait_until(Duration::from_secs(10), "iperf3 server in pod A", || {
        let out = t.a.pod.exec(&["ss", "-ltn", &format!("sport = :{port}")]);
        String::from_utf8_lossy(&out.stdout).contains(&port.to_string())
    });
    let dnat = t.a.ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "10.244.1.0",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("10.244.1.2:{port}"),
    ]);
    assert!(dnat.status.success(), "{dnat:?}");
    let before = t.stats();
    let out = t.b.pod.exec(&[
        "iperf3",
        "-c",
        "10.244.1.0",
        "-p",
        "8080",
        "-t",
        "2",
        "--connect-timeout",
        "3000",
    ]);
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
    let masq = t.a.ns.exec(&[
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
    let out = t.a.ns.exec(&[
        "iperf3",
        "-c",
        &t.b.pod_ip.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        "1",
        "--connect-timeout",
        "3000",
    ]);
    assert!(
        out.status.success(),
        "host -> remote pod with masquerade failed: {out:?}"
    );
}

#[test]
fn removed_peer_is_no_longer_reached_and_its_vxlan_is_dropped() {
    let mut t = Topology::new();
    assert!(
        ping(&t.b.pod, t.a.pod_ip, 1, "0.2").status.success(),
        "baseline"
    );
    let subnet_b = t.peer_b.subnet;
    t.in_a(|t| {
        let rt = &t.rt;
        let dp = t.dataplane.as_mut().expect("dp");
        rt.block_on(dp.apply(&PeerEvent::Remove(subnet_b)))
            .expect("remove");
    });
    let before = t.stats();
    // B still believes in A and sends VXLAN; A no longer accepts it from B.
    assert!(
        !ping(&t.b.pod, t.a.pod_ip, 2, "0.2").status.success(),
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
    let mut t = Topology::new();
    // A full-size DF ping (1450 bytes, the pod MTU) passes.
    let out = t.a.pod.exec(&[
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
        &t.b.pod_ip.to_string(),
    ]);
    assert!(out.status.success(), "full-size DF ping: {out:?}");
    // A pod whose MTU is larger than the overlay's sends a DF packet one byte over: the
    // kernel path answers "frag needed" with the overlay MTU.
    t.a.pod.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let before = t.stats();
    let out = t.a.pod.exec(&[
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1423",
        &t.b.pod_ip.to_string(),
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
    t.a.pod.ip(&["link", "set", "eth0", "mtu", "1450"]);
    let off = t.a.pod.exec(&[
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
    let old = std::mem::replace(&mut t.a.pod, Ns::new("ovlpod"));
    drop(old); // deleting the namespace deletes the old veth pair
    wait_until(Duration::from_secs(5), "the old veth to go", || {
        !t.a.ns
            .exec(&["ip", "link", "show", old_veth])
            .status
            .success()
    });
    let pod = &t.a.pod;
    let mut add = vec!["link", "add", veth];
    let index_text = index.map(|i| i.to_string());
    if let Some(index) = &index_text {
        add.extend_from_slice(&["index", index]);
    }
    add.extend_from_slice(&["type", "veth", "peer", "name", "eth0", "netns", &pod.0]);
    t.a.ns.ip(&add);
    t.a.ns.ip(&["link", "set", veth, "master", "cni0", "up"]);
    pod.ip(&["addr", "add", &format!("{}/24", t.a.pod_ip), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.244.1.1"]);
}

/// TCP from pod B to pod A's address (an iperf3 server in the current pod A).
fn b_to_a_tcp(t: &Topology, port: u16) {
    let port_text = port.to_string();
    let _server = overlay_tests::netns::Background::spawn(
        &t.a.pod.0,
        &["iperf3", "-s", "-1", "-p", &port_text],
    );
    wait_until(Duration::from_secs(10), "iperf3 server in pod A", || {
        let out = t.a.pod.exec(&["ss", "-ltn", &format!("sport = :{port}")]);
        String::from_utf8_lossy(&out.stdout).contains(&port_text)
    });
    let out = t.b.pod.exec(&[
        "iperf3",
        "-c",
        &t.a.pod_ip.to_string(),
        "-p",
        &port_text,
        "-t",
        "1",
        "--connect-timeout",
        "3000",
    ]);
    assert!(out.status.success(), "pod B -> new pod A: {out:?}");
}

#[test]
fn recreated_pods_with_reused_ip_and_ifindex_are_reached_at_once_and_never_cross_delivered() {
    let mut t = Topology::new();
    b_to_a_tcp(&t, 5401);
    let mut old_veth = "vethpod".to_string();
    for round in 0..3u16 {
        let old_index = t.a.ns.ifindex(&old_veth);
        let old_mac = t.a.pod.mac("eth0");
        // Same IP, same ifindex, new MAC: the agent has not looked yet (no maintain).
        let name = format!("vethnew{round}");
        recreate_pod_a(&mut t, &old_veth, &name, Some(old_index));
        assert_eq!(
            t.a.ns.ifindex(&name),
            old_index,
            "the kernel reused the ifindex"
        );
        old_veth = name;
        assert_ne!(t.a.pod.mac("eth0"), old_mac);
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
        assert_eq!(t.dp().endpoints().get(&t.a.pod_ip), Some(&old_index));
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
    let gone = std::mem::replace(&mut t.a.pod, Ns::new("ovlpod"));
    drop(gone);
    wait_until(Duration::from_secs(5), "the veth to go", || {
        t.a.ns
            .exec(&["ip", "link", "show", "master", "cni0", "type", "veth"])
            .stdout
            .is_empty()
    });
    t.maintain();
    assert!(t.dp().endpoints().is_empty());
    let pod_ip = t.a.pod_ip.octets();
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
    for ns in [&t.a.ns, &t.b.ns] {
        let out = ns.exec(&[
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
    let liberal =
        t.a.ns
            .exec(&["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal"]);
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
    let out = t.a.pod.exec(&["ss", "-tn", "state", "established"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&t.b.pod_ip.to_string()),
        "connections stuck open: {text}"
    );
    // The agent made conntrack follow the fast flows (the first maintenance pass after the
    // rule loaded conntrack): none of their kernel-path packets was INVALID on node A.
    for ns in [&t.a.ns, &t.b.ns] {
        let rules = ns.exec(&["iptables", "-vnxL", "FORWARD"]);
        eprintln!("{}", String::from_utf8_lossy(&rules.stdout));
    }
    let rules = t.a.ns.exec(&["iptables", "-vnxL", "FORWARD"]);
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
    let mut t = Topology::new();
    for (port, reverse) in [(5601u16, false), (5602, true)] {
        let _server = overlay_tests::netns::Background::spawn(
            &t.b.pod.0,
            &["iperf3", "-s", "-1", "-p", &port.to_string()],
        );
        wait_until(Duration::from_secs(10), "iperf3 server listening", || {
            let out = t.b.pod.exec(&["ss", "-ltn", &format!("sport = :{port}")]);
            String::from_utf8_lossy(&out.stdout).contains(&port.to_string())
        });
        let before = t.stats();
        let mut args = vec![
            "iperf3",
            "-c",
            "10.244.2.2",
            "-u",
            "-b",
            "200M",
            "-l",
            "1000",
            "-t",
            "1",
            "-p",
        ];
        let port_text = port.to_string();
        args.push(&port_text);
        if reverse {
            args.push("-R");
        }
        let out = t.a.pod.exec(&args);
        assert!(out.status.success(), "{out:?}");
        let after = t.stats();
        // ~25,000 datagrams one way: all but the first take the fast path (TX on A, or RX
        // into A's pod when B sends).
        let fast = if reverse {
            delta(&before, &after, stat::FAST_RX_BEFORE_DECAP_PACKETS)
                + delta(&before, &after, stat::FAST_RX_AFTER_DECAP_PACKETS)
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
