//! Mixed clusters of real agents (issues 4 and 5): eBPF and kernel-vxlan nodes side by side,
//! full-size packets, bulk TCP with and without offloads, a SIGKILL + restart of an eBPF agent
//! under 100 pps of ping, a deleted lease cutting a peer off, interoperability with a node
//! programmed by hand exactly as flanneld does, and recovery of a deleted `flannel.1`.
//!
//! Every test uses the `Cluster` fixture (real namespaces, real etcd) and real
//! `overlay-agent` processes; counters come from `overlay-agent status` (the agent's /status).

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overlay_agent::dataplane::ebpf::{counters_by_name, read_pinned_stats};
use overlay_common::stat;
use overlay_tests::{
    agent::{AgentProcess, agent_binary},
    etcd::KeysApi,
    flanneld::{self, FlanneldCluster, vtep_mac_of},
    netns::{Background, NetNs},
    require_root,
    topology::{Cluster, Pod},
    try_wait_until, wait_until,
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LONG: Duration = Duration::from_secs(30);
const HEALTHZ_PORT: u16 = 18480;
/// Bytes of each bulk TCP transfer.
const BULK_BYTES: u64 = 10 * 1024 * 1024;

/// Starts the agent of node `index` (0-based) with `backend` and a /status endpoint.
fn start_agent(cluster: &Cluster, index: usize, backend: &str) -> AgentProcess {
    let node = &cluster.nodes[index];
    let mut args = node.agent_args(&cluster.etcd_endpoint(), backend);
    args.push(format!("--healthz-port={HEALTHZ_PORT}"));
    AgentProcess::spawn(&node.ns, &args)
}

/// Waits for node `index`'s subnet.env; returns (FLANNEL_SUBNET, FLANNEL_MTU).
fn wait_subnet(cluster: &Cluster, index: usize, agent: &AgentProcess) -> (String, u32) {
    cluster.nodes[index].wait_subnet_env(agent, LONG)
}

/// `<prefix>/subnets/10.5.7.0-24` for FLANNEL_SUBNET `10.5.7.1/24`.
fn lease_key(subnet: &str) -> String {
    flanneld::lease_key(PREFIX, subnet)
}

/// `overlay-agent status` against node `index`'s running agent.
fn status(cluster: &Cluster, index: usize) -> String {
    let node = &cluster.nodes[index];
    let out = node
        .ns
        .nsenter_command(agent_binary().to_str().expect("utf-8"))
        .args([
            format!("--healthz-port={HEALTHZ_PORT}"),
            format!("--etcd-endpoints={}", cluster.etcd_endpoint()),
            format!("--subnet-file={}", node.subnet_file().display()),
            "status".to_owned(),
        ])
        .output()
        .expect("overlay-agent status");
    assert!(
        out.status.success(),
        "overlay-agent status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The live eBPF counters of node `index`, summed over CPUs from its pinned STATS map (the
/// status copies them only every few seconds).
fn counters(cluster: &Cluster, index: usize) -> Counters {
    let values = read_pinned_stats(&cluster.nodes[index].pin_dir)
        .unwrap_or_else(|err| panic!("node {}'s eBPF counters: {err}", index + 1));
    let get = |i: u32| values[i as usize];
    Counters {
        fast_tx_packets: get(stat::FAST_TX_PACKETS),
        fast_tx_bytes: get(stat::FAST_TX_BYTES),
        fast_rx_packets: get(stat::FAST_RX_BEFORE_DECAP_PACKETS)
            + get(stat::FAST_RX_AFTER_DECAP_PACKETS),
        fast_rx_bytes: get(stat::FAST_RX_BEFORE_DECAP_BYTES) + get(stat::FAST_RX_AFTER_DECAP_BYTES),
        seen: (0..stat::COUNT)
            .filter(|&i| stat::is_reason(i))
            .map(get)
            .sum(),
        drop_unknown_source: get(stat::DROP_UNKNOWN_SOURCE),
        text: format!("{:?}", counters_by_name(&values)),
    }
}

#[derive(Debug)]
struct Counters {
    /// R2: packets/bytes encapsulated at pod veths.
    fast_tx_packets: u64,
    fast_tx_bytes: u64,
    /// R1 + R3: packets/bytes delivered into pods by redirect_peer.
    fast_rx_packets: u64,
    fast_rx_bytes: u64,
    /// Every packet any of the programs saw (fast or handed to the kernel).
    seen: u64,
    drop_unknown_source: u64,
    text: String,
}

fn pod(cluster: &Cluster, node: usize) -> &Pod {
    &cluster.nodes[node].pods[0]
}

/// An iperf3 server in the pod's namespace, once it listens.
fn iperf_server(pod: &Pod) -> Background {
    let server = pod.ns.spawn_background(&["iperf3", "-s", "-p", "5201"]);
    pod.ns.wait_listening(5201, LONG);
    server
}

fn iperf_client(from: &NetNs, to: Ipv4Addr, extra: &[&str]) -> Command {
    let mut command = from.command("iperf3");
    command
        .args([
            "-c",
            &to.to_string(),
            "-p",
            "5201",
            "--connect-timeout",
            "5000",
        ])
        .args(extra);
    command
}

/// A TCP sink in a pod: reads each connection to its end and appends the byte count to a
/// file, so a test knows exactly what arrived (iperf3 -n stops once the client has *written*
/// its bytes and may discard what is still in flight).
struct Sink {
    _server: Background,
    dir: tempfile::TempDir,
}

const SINK_PORT: u16 = 5202;
const SINK_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(8)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    c.close()
    with open(sys.argv[1], "a") as f:
        f.write("%d\n" % n)
"#;

impl Sink {
    fn start(pod: &Pod) -> Sink {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("received");
        let port = SINK_PORT.to_string();
        let server = pod.ns.spawn_background(&[
            "python3",
            "-c",
            SINK_PY,
            file.to_str().expect("utf-8"),
            &port,
        ]);
        pod.ns.wait_listening(SINK_PORT, LONG);
        Sink {
            _server: server,
            dir,
        }
    }

    fn counts(&self) -> Vec<u64> {
        std::fs::read_to_string(self.dir.path().join("received"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().expect("count"))
            .collect()
    }
}

/// Sends `BULK_BYTES` over one TCP connection from `from` to the [`Sink`] of the pod at `to`
/// and waits until all of it arrived; returns the byte count.
fn bulk_tcp(from: &Pod, to: Ipv4Addr, sink: &Sink, what: &str) -> u64 {
    let started = Instant::now();
    let done = sink.counts().len();
    let out = from
        .ns
        .command("bash")
        .arg("-c")
        .arg(format!(
            "head -c {BULK_BYTES} /dev/zero > /dev/tcp/{to}/{SINK_PORT}"
        ))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "TCP {what} ({} -> {to}) failed after {:?}: {}",
        from.ip,
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    let arrived = try_wait_until(LONG, || sink.counts().len() > done);
    let counts = sink.counts();
    assert!(
        arrived && counts[done] == BULK_BYTES,
        "TCP {what}: the sink got {:?} of {BULK_BYTES} bytes",
        counts.get(done)
    );
    eprintln!("TCP {what}: {BULK_BYTES} bytes in {:?}", started.elapsed());
    BULK_BYTES
}

fn ping_ok(from: &Pod, to: Ipv4Addr, what: &str) {
    from.wait_ping(to, LONG, what);
}

/// A 3-node cluster: nodes 1 and 2 eBPF, node 3 kernel vxlan; one pod per node.
struct Mixed {
    cluster: Cluster,
    agents: Vec<AgentProcess>,
    subnets: Vec<String>,
    mtu: u32,
}

fn mixed_cluster() -> Mixed {
    require_root();
    let mut cluster = Cluster::new(3);
    cluster.put_config(PREFIX, CONFIG);
    let backends = ["ebpf", "ebpf", "vxlan"];
    let agents: Vec<AgentProcess> = backends
        .iter()
        .enumerate()
        .map(|(i, backend)| start_agent(&cluster, i, backend))
        .collect();
    let mut subnets = Vec::new();
    let mut mtu = 0;
    for (i, agent) in agents.iter().enumerate() {
        let (subnet, node_mtu) = wait_subnet(&cluster, i, agent);
        subnets.push(subnet);
        mtu = node_mtu;
    }
    for (i, subnet) in subnets.iter().enumerate() {
        cluster.nodes[i].add_pod(subnet, mtu);
    }
    // The eBPF agents learn their pod from netlink within a maintenance pass; until then the
    // pod is served by the kernel path (tests that count fast-path bytes wait for this).
    for (agent, backend) in agents.iter().zip(backends) {
        if backend == "ebpf" {
            agent.wait_for_log("pod on the fast path", LONG);
        }
    }
    Mixed {
        cluster,
        agents,
        subnets,
        mtu,
    }
}

const PAIRS: [(usize, usize); 6] = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)];

#[test]
fn mixed_ebpf_and_vxlan_nodes_carry_ping_and_tcp_between_every_pair_and_count_it() {
    let m = mixed_cluster();
    let c = &m.cluster;
    assert_eq!(m.mtu, 1450);
    for (i, agent) in m.agents.iter().enumerate().take(2) {
        agent.wait_for_log("uplink program attached", LONG);
        let text = status(c, i);
        assert!(
            text.contains("datapath in use: ebpf"),
            "node {}: {text}",
            i + 1
        );
    }
    // The vxlan node runs no eBPF datapath at all.
    let text = status(c, 2);
    assert!(
        text.contains("datapath in use: vxlan") && !text.contains("fast_tx_packets"),
        "node 3: {text}"
    );
    assert!(!c.nodes[2].pin_dir.exists(), "node 3 pinned BPF objects");
    let tc = c.nodes[2].ns.stdout(&["bpftool", "net", "show"]);
    assert!(
        !tc.contains("overlay"),
        "BPF programs on the vxlan node: {tc}"
    );

    let sinks: Vec<Sink> = (0..3).map(|i| Sink::start(pod(c, i))).collect();
    for (from, to) in PAIRS {
        let what = format!("node {} -> node {}", from + 1, to + 1);
        ping_ok(pod(c, from), pod(c, to).ip, &what);
        let before: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
        let got = bulk_tcp(pod(c, from), pod(c, to).ip, &sinks[to], &what);
        // The counters are read from another process: wait until they caught up.
        // Only the handshake and the few packets that re-validate the learned flow cross
        // the kernel path: at least 90% of the bytes must take the fast paths.
        let ok = try_wait_until(LONG, || {
            let after: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
            // A sending eBPF node encapsulates the stream at the pod veth.
            let sender_ok = from >= 2
                || (after[from].fast_tx_bytes - before[from].fast_tx_bytes) * 10 >= got * 9;
            // A receiving eBPF node delivers it into the pod (before or after the kernel's
            // decap), whoever sent it.
            let receiver_ok =
                to >= 2 || (after[to].fast_rx_bytes - before[to].fast_rx_bytes) * 10 >= got * 9;
            // Between eBPF nodes the ACKs take the receiver's fast TX too.
            let acks_ok =
                !(from < 2 && to < 2) || after[to].fast_tx_packets > before[to].fast_tx_packets;
            sender_ok && receiver_ok && acks_ok
        });
        let after: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
        assert!(
            ok,
            "{what}: eBPF counters do not account for {got} bytes:\nbefore {before:#?}\nafter {after:#?}"
        );
        for i in 0..2 {
            eprintln!(
                "{what}: node {} fast tx +{} B, fast rx +{} B",
                i + 1,
                after[i].fast_tx_bytes - before[i].fast_tx_bytes,
                after[i].fast_rx_bytes - before[i].fast_rx_bytes,
            );
        }
    }
    drop(sinks);
}

/// A statistic of the pod's eth0 on node `node`.
fn pod_stat(cluster: &Cluster, node: usize, name: &str) -> u64 {
    pod(cluster, node)
        .ns
        .stdout(&["cat", &format!("/sys/class/net/eth0/statistics/{name}")])
        .trim()
        .parse()
        .expect("counter")
}

#[test]
fn mtu_sized_packets_and_tcp_without_offloads_cross_ebpf_and_vxlan_nodes() {
    let m = mixed_cluster();
    let c = &m.cluster;
    let size = (m.mtu - 28).to_string();
    for (from, to) in PAIRS {
        let what = format!("node {} -> node {}", from + 1, to + 1);
        ping_ok(pod(c, from), pod(c, to).ip, &what);
        let out = pod(c, from).ns.try_run(&[
            "ping",
            "-M",
            "do",
            "-s",
            &size,
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &pod(c, to).ip.to_string(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("3 received"),
            "{what}: {size}-byte DF pings at the pod MTU {}: {text}{}",
            m.mtu,
            String::from_utf8_lossy(&out.stderr)
        );
        // One byte more must not fit (the MTU is really the limit, no silent fragmenting).
        let over = (m.mtu - 27).to_string();
        let out = pod(c, from).ns.try_run(&[
            "ping",
            "-M",
            "do",
            "-s",
            &over,
            "-c",
            "1",
            "-W",
            "1",
            &pod(c, to).ip.to_string(),
        ]);
        assert!(!out.status.success(), "{what}: {over}-byte DF ping passed");
    }
    let before: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
    let pod_tx_before: Vec<u64> = (0..2).map(|i| pod_stat(c, i, "tx_bytes")).collect();
    for node in 0..3 {
        let ns = &c.nodes[node].ns;
        let mut links = c.nodes[node].pod_host_veths();
        links.push("eth0".to_owned());
        for link in &links {
            ns.run(&[
                "ethtool", "-K", link, "gso", "off", "tso", "off", "gro", "off",
            ]);
        }
        pod(c, node).ns.run(&[
            "ethtool", "-K", "eth0", "gso", "off", "tso", "off", "gro", "off",
        ]);
    }
    let sinks: Vec<Sink> = (0..3).map(|i| Sink::start(pod(c, i))).collect();
    let (mut sent, mut received) = ([0u64; 3], [0u64; 3]);
    for (from, to) in PAIRS {
        let got = bulk_tcp(
            pod(c, from),
            pod(c, to).ip,
            &sinks[to],
            &format!("without offloads, node {} -> node {}", from + 1, to + 1),
        );
        sent[from] += got;
        received[to] += got;
    }
    drop(sinks);
    // Without GSO/GRO every segment is MTU-sized and fits the underlay: each eBPF node's fast
    // paths carried (nearly) all it sent and received.
    let ok = try_wait_until(LONG, || {
        let after: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
        (0..2).all(|i| {
            (after[i].fast_tx_bytes - before[i].fast_tx_bytes) * 10 >= sent[i] * 9
                && (after[i].fast_rx_bytes - before[i].fast_rx_bytes) * 10 >= received[i] * 9
        })
    });
    let after: Vec<Counters> = (0..2).map(|i| counters(c, i)).collect();
    for i in 0..2 {
        eprintln!(
            "node {}: pod tx +{} B, fast tx +{} B / {} pkts",
            i + 1,
            pod_stat(c, i, "tx_bytes") - pod_tx_before[i],
            after[i].fast_tx_bytes - before[i].fast_tx_bytes,
            after[i].fast_tx_packets - before[i].fast_tx_packets
        );
    }
    assert!(
        ok,
        "eBPF counters do not account for the transfers:\nbefore {before:#?}\nafter {after:#?}"
    );
}

/// A child process whose output is collected at the end; killed on drop.
struct Collect(Option<Child>);

impl Collect {
    fn spawn(mut command: Command) -> Collect {
        Collect(Some(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ))
    }

    fn finish(mut self, timeout: Duration) -> (bool, String) {
        let mut child = self.0.take().expect("child");
        let done = try_wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_))));
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("output");
        (
            done && out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Collect {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// (transmitted, received) from ping's summary line.
fn ping_summary(text: &str) -> (u64, u64) {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let numbers: Vec<u64> = line
        .split(|ch: char| !ch.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn sigkill_and_restart_of_an_ebpf_agent_loses_no_packet_at_100_pps() {
    let mut m = mixed_cluster();
    let c = &m.cluster;
    m.agents[0].wait_for_log("uplink program attached", LONG);
    ping_ok(pod(c, 0), pod(c, 1).ip, "pod1 -> pod2");
    ping_ok(pod(c, 2), pod(c, 0).ip, "pod3 -> pod1");
    let subnet = m.subnets[0].clone();
    let _server = iperf_server(pod(c, 1));

    let ping = |from: usize, to: usize| {
        let mut command = pod(c, from).ns.command("ping");
        command.args([
            "-i",
            "0.01",
            "-c",
            "800",
            "-W",
            "2",
            &pod(c, to).ip.to_string(),
        ]);
        Collect::spawn(command)
    };
    let before = counters(c, 0).seen;
    let ping12 = ping(0, 1);
    let ping31 = ping(2, 0);
    let stream = Collect::spawn(iperf_client(&pod(c, 0).ns, pod(c, 1).ip, &["-t", "8"]));
    // Kill only once traffic demonstrably flows through node 1's programs.
    wait_until(LONG, "pings flowing through node 1's programs", || {
        counters(c, 0).seen >= before + 100
    });
    m.agents[0].kill();
    let restarted = start_agent(c, 0, "ebpf");
    restarted.wait_for_log("wrote the subnet file", LONG);
    let mid = counters(c, 0).seen;
    wait_until(
        LONG,
        "the programs keep seeing the traffic after the restart",
        || counters(c, 0).seen > mid + 50,
    );

    let (ok, text) = ping12.finish(LONG);
    assert!(ok, "pod1 -> pod2 ping: {text}\nlog:\n{}", restarted.log());
    let (sent, got) = ping_summary(&text);
    assert_eq!((sent, got), (800, 800), "pod1 -> pod2 lost packets: {text}");
    let (ok, text) = ping31.finish(LONG);
    assert!(ok, "pod3 -> pod1 ping: {text}");
    assert_eq!(
        ping_summary(&text),
        (800, 800),
        "pod3 -> pod1 lost packets: {text}"
    );
    let (ok, text) = stream.finish(LONG);
    assert!(ok, "TCP stream across the restart failed: {text}");

    assert_eq!(
        wait_subnet(c, 0, &restarted).0,
        subnet,
        "same subnet after restart"
    );
    let ours: Vec<String> = c
        .etcd()
        .keys(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .filter(|key| {
            c.etcd()
                .get(key)
                .is_some_and(|v| v.contains(r#""PublicIP":"192.168.100.1""#))
        })
        .collect();
    assert_eq!(ours, vec![lease_key(&subnet)], "node 1's leases");
    m.agents[0] = restarted;
}

#[test]
fn a_deleted_lease_of_a_dead_node_stops_ebpf_encap_and_its_vxlan_is_dropped() {
    require_root();
    let mut cluster = Cluster::new(2);
    cluster.put_config(PREFIX, CONFIG);
    let agent1 = start_agent(&cluster, 0, "ebpf");
    let mut agent2 = start_agent(&cluster, 1, "ebpf");
    let (s1, mtu) = wait_subnet(&cluster, 0, &agent1);
    let (s2, _) = wait_subnet(&cluster, 1, &agent2);
    cluster.nodes[0].add_pod(&s1, mtu);
    cluster.nodes[1].add_pod(&s2, mtu);
    let c = &cluster;
    agent1.wait_for_log("uplink program attached", LONG);
    ping_ok(pod(c, 0), pod(c, 1).ip, "pod1 -> pod2");
    ping_ok(pod(c, 1), pod(c, 0).ip, "pod2 -> pod1");
    assert!(status(c, 0).contains("1 peer(s)"));

    // Node 2 dies (its pinned datapath keeps sending), then its lease is released.
    agent2.kill();
    c.etcd().delete(&lease_key(&s2));
    wait_until(LONG, "node 1 to forget node 2", || {
        status(c, 0).contains("0 peer(s)")
    });
    let before = counters(c, 0);
    assert!(
        !pod(c, 0).ping_once(pod(c, 1).ip),
        "pod1 still reaches pod2"
    );
    assert!(
        !pod(c, 1).ping_once(pod(c, 0).ip),
        "pod2 still reaches pod1"
    );
    let after = counters(c, 0);
    assert_eq!(
        after.fast_tx_packets, before.fast_tx_packets,
        "node 1 still encapsulates to node 2: {}",
        after.text
    );
    assert!(
        after.drop_unknown_source > before.drop_unknown_source,
        "node 2's VXLAN was not dropped as drop_unknown_source: {}",
        after.text
    );
}

/// A random locally administered unicast MAC.
fn random_mac() -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .subsec_nanos()
        ^ std::process::id().rotate_left(16);
    let b = seed.to_le_bytes();
    format!("0a:{:02x}:{:02x}:{:02x}:{:02x}:5e", b[0], b[1], b[2], b[3])
}

fn flanneld_by_hand_interop(backend: &str) {
    require_root();
    // Node A (192.168.100.1) is a flanneld node: lease and device written by hand.
    let mac = random_mac();
    let mut interop = FlanneldCluster::start(
        KeysApi::V3,
        &mac,
        &format!(
            r#"{{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
    );
    let agent = start_agent(&interop.cluster, 1, backend);
    let (sb, mtu) = wait_subnet(&interop.cluster, 1, &agent);
    assert_ne!(
        sb, "10.5.1.1/24",
        "the agent took the flanneld node's subnet"
    );
    let b_mac = vtep_mac_of(&interop.etcd().get(&lease_key(&sb)).expect("B's lease"));
    // flanneld's neighbour, FDB entry and route for B; then the agent programs node A as a
    // peer from the hand-written lease.
    interop.connect(&sb, mtu, &b_mac, LONG);
    let c = &interop.cluster;
    if backend == "ebpf" {
        // The pod is reached at once through the kernel path; the fast path joins once the
        // agent has learned the pod from netlink (within a maintenance pass).
        agent.wait_for_log("pod on the fast path", LONG);
    }
    let before = (backend == "ebpf").then(|| counters(c, 1));
    ping_ok(pod(c, 1), pod(c, 0).ip, "agent node -> flanneld node");
    ping_ok(pod(c, 0), pod(c, 1).ip, "flanneld node -> agent node");
    let sink = Sink::start(pod(c, 0));
    let got = bulk_tcp(
        pod(c, 1),
        pod(c, 0).ip,
        &sink,
        "agent node -> flanneld node",
    );
    if let Some(before) = before {
        let ok = try_wait_until(LONG, || {
            let after = counters(c, 1);
            (after.fast_tx_bytes - before.fast_tx_bytes) * 10 >= got * 9
                && after.fast_rx_packets > before.fast_rx_packets
        });
        let after = counters(c, 1);
        assert!(
            ok,
            "the eBPF programs did not carry the traffic ({got} bytes): {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_node_programmed_like_flanneld_and_an_ebpf_agent_reach_each_other() {
    flanneld_by_hand_interop("ebpf");
}

#[test]
fn a_node_programmed_like_flanneld_and_a_vxlan_agent_reach_each_other() {
    flanneld_by_hand_interop("vxlan");
}

#[test]
fn a_deleted_flannel_device_comes_back_with_the_published_mac() {
    require_root();
    let mut cluster = Cluster::new(2);
    cluster.put_config(PREFIX, CONFIG);
    let agent1 = start_agent(&cluster, 0, "vxlan");
    let agent2 = start_agent(&cluster, 1, "vxlan");
    let (s1, mtu) = wait_subnet(&cluster, 0, &agent1);
    let (s2, _) = wait_subnet(&cluster, 1, &agent2);
    cluster.nodes[0].add_pod(&s1, mtu);
    cluster.nodes[1].add_pod(&s2, mtu);
    let c = &cluster;
    ping_ok(pod(c, 1), pod(c, 0).ip, "pod2 -> pod1");
    let published = vtep_mac_of(&c.etcd().get(&lease_key(&s1)).expect("lease"));

    c.nodes[0].ns.run(&["ip", "link", "del", "flannel.1"]);
    let deleted = Instant::now();
    let recovered = try_wait_until(LONG, || pod(c, 1).ping_once(pod(c, 0).ip));
    assert!(
        recovered,
        "pod traffic did not recover after flannel.1 was deleted; log:\n{}",
        agent1.log()
    );
    eprintln!("recovered {:?} after the delete", deleted.elapsed());
    let link = c.nodes[0]
        .ns
        .stdout(&["ip", "-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains(&format!("link/ether {published}")) && link.contains("vxlan id 1"),
        "flannel.1 came back different from the lease's VtepMAC {published}: {link}"
    );
    assert!(agent1.log().contains("flannel.1"), "{}", agent1.log());
    ping_ok(pod(c, 0), pod(c, 1).ip, "pod1 -> pod2 after recovery");
}
