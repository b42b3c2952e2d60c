//! Reliability under faults (issue 8), with real agents, a real etcd, real namespaces and pod
//! traffic flowing throughout:
//! - etcd down for [`OUTAGE`] (stop/restart) and one node cut off from etcd for [`OUTAGE`]
//!   (nft in its namespace) while a third party changes leases: no ping lost, and the changes
//!   are applied within 2 s of etcd's return;
//! - `kill -9` and restart under a 100 pps ping (vxlan and ebpf): no loss, same subnet, one
//!   lease key, no duplicate datapath state (routes/neighbours/FDB, TCX links, map entries);
//! - our own lease deleted by hand: back within 5 s and the peer routes to us again;
//! - bad peer leases and a bad config written while running: a warning naming the key and the
//!   problem, the agent stays up, the other peers stay, traffic keeps flowing.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use overlay_tests::{
    agent::AgentProcess,
    bpffs::ensure_bpffs,
    netns::NetNs,
    require_root,
    topology::{Cluster, Pod, parse_cidr},
    try_wait_until, wait_until,
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const LONG: Duration = Duration::from_secs(30);
/// How long etcd is away in the outage tests (the issue's figure).
const OUTAGE: Duration = Duration::from_secs(60);
/// The issue's bound for applying changes made while etcd was away, plus polling slack
/// (50 ms poll + one `ip route` run on a busy 2-core machine).
const CATCH_UP: Duration = Duration::from_millis(2_000);
const POLL_SLACK: Duration = Duration::from_millis(500);

/// A cluster of agents with one pod per node, pods reaching each other.
struct Setup {
    // Field order matters for drop: agents first, then the namespaces.
    agents: Vec<AgentProcess>,
    cluster: Cluster,
    /// FLANNEL_SUBNET per node (e.g. "10.5.7.1/24").
    subnets: Vec<String>,
    pods: Vec<Ipv4Addr>,
}

impl Setup {
    fn new(nodes: usize, backend: &str) -> Setup {
        require_root();
        ensure_bpffs();
        let mut cluster = Cluster::new(nodes);
        cluster.put_config(PREFIX, CONFIG);
        let agents: Vec<_> = (0..nodes)
            .map(|i| {
                let node = &cluster.nodes[i];
                AgentProcess::spawn(
                    &node.ns,
                    &node.agent_args(&cluster.etcd_endpoint(), backend),
                )
            })
            .collect();
        let mut subnets = Vec::new();
        for (i, agent) in agents.iter().enumerate() {
            agent.wait_for_log("wrote the subnet file", LONG);
            subnets
                .push(cluster.nodes[i].subnet_env().expect("subnet.env")["FLANNEL_SUBNET"].clone());
        }
        let pods: Vec<_> = (0..nodes)
            .map(|i| cluster.nodes[i].add_pod(&subnets[i], 1450).ip)
            .collect();
        let setup = Setup {
            agents,
            cluster,
            subnets,
            pods,
        };
        for i in 0..nodes {
            for j in 0..nodes {
                if i != j {
                    wait_until(LONG, &format!("pod {i} -> pod {j}"), || {
                        setup.pod(i).ping_once(setup.pods[j])
                    });
                }
            }
        }
        setup
    }

    fn pod(&self, node: usize) -> &Pod {
        &self.cluster.nodes[node].pods[0]
    }

    fn ns(&self, node: usize) -> &NetNs {
        &self.cluster.nodes[node].ns
    }

    /// Node `node`'s pod subnet as a network ("10.5.7.0/24").
    fn net(&self, node: usize) -> String {
        network_of(&self.subnets[node])
    }

    fn lease_key(&self, node: usize) -> String {
        format!("{PREFIX}/subnets/{}", self.net(node).replace('/', "-"))
    }
}

fn network_of(subnet_env_value: &str) -> String {
    let (ip, len) = parse_cidr(subnet_env_value);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & mask))
}

/// A flannel vxlan lease value for a (fake) peer.
fn vxlan_lease(public_ip: &str, mac_last: u8) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:{mac_last:02x}"}}}}"#
    )
}

/// A fake peer's subnet that no agent picks: agents choose at random among free subnets, so
/// write these before the agents start or pick numbers the agents do not hold.
fn free_net(setup: &Setup, from: u8) -> String {
    (from..=254)
        .map(|n| format!("10.5.{n}.0/24"))
        .find(|net| !(0..setup.subnets.len()).any(|i| &setup.net(i) == net))
        .expect("a free subnet")
}

fn key_of(net: &str) -> String {
    format!("{PREFIX}/subnets/{}", net.replace('/', "-"))
}

// ---- datapath inspection -------------------------------------------------------------------

/// Routes in `ns` whose destination is exactly `net`.
fn routes_to(ns: &NetNs, net: &str) -> usize {
    ns.stdout(&["ip", "-4", "route", "show", "table", "main"])
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(net))
        .count()
}

/// Neighbour entries on flannel.1 for `ip`.
fn neighs_for(ns: &NetNs, ip: &str) -> usize {
    ns.stdout(&["ip", "-4", "neigh", "show", "dev", "flannel.1"])
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(ip))
        .count()
}

/// FDB entries on flannel.1 pointing at `public_ip`.
fn fdbs_to(ns: &NetNs, public_ip: &str) -> usize {
    ns.stdout(&["bridge", "fdb", "show", "dev", "flannel.1"])
        .lines()
        .filter(|l| {
            l.contains(&format!(" dst {public_ip} ")) || l.ends_with(&format!(" dst {public_ip}"))
        })
        .count()
}

/// Every kernel route/neighbour/FDB entry the agent keeps for peers on flannel.1.
fn flannel_objects(ns: &NetNs) -> (usize, usize, usize) {
    let routes = ns
        .stdout(&["ip", "-4", "route", "show", "dev", "flannel.1"])
        .lines()
        .count();
    let neighs = ns
        .stdout(&["ip", "-4", "neigh", "show", "dev", "flannel.1"])
        .lines()
        .filter(|l| l.contains("PERMANENT"))
        .count();
    let fdbs = ns
        .stdout(&["bridge", "fdb", "show", "dev", "flannel.1"])
        .lines()
        .filter(|l| l.contains(" dst "))
        .count();
    (routes, neighs, fdbs)
}

/// The names of the programs attached to `ifname`'s TCX hook in `ns` (bpftool 7.1 here does
/// not list TCX, so ask the kernel directly).
fn tcx_programs(ns: &NetNs, ifname: &str, attach: TcAttachType) -> Vec<String> {
    ns.enter(|| {
        let (_, programs) = SchedClassifier::query_tcx(ifname, attach)
            .unwrap_or_else(|err| panic!("querying TCX on {ifname}: {err}"));
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

/// Entries in a pinned map (`bpftool -j map dump pinned`).
fn pinned_map_entries(path: &std::path::Path) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    value.as_array().expect("array").len()
}

// ---- continuous ping -----------------------------------------------------------------------

/// A ping of a known count at a fixed rate from a pod; killed on drop.
struct Ping {
    child: Option<Child>,
    what: String,
}

impl Ping {
    fn start(pod: &Pod, target: Ipv4Addr, pps: u32, duration: Duration) -> Ping {
        let count = (duration.as_secs_f64() * f64::from(pps)).ceil() as u64;
        let interval = format!("{:.3}", 1.0 / f64::from(pps));
        let child = pod
            .ns
            .command("ping")
            .args(["-q", "-i", &interval, "-c", &count.to_string(), "-W", "2"])
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ping");
        Ping {
            child: Some(child),
            what: format!("{count} pings at {pps} pps to {target}"),
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().expect("child").try_wait(), Ok(None))
    }

    /// Waits for the ping to end; returns (transmitted, received).
    fn finish(mut self) -> (u64, u64) {
        let out = self
            .child
            .take()
            .expect("child")
            .wait_with_output()
            .expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| {
                panic!(
                    "{}: no summary: {text} {}",
                    self.what,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let numbers: Vec<u64> = line
            .split(',')
            .filter_map(|part| part.split_whitespace().next()?.parse().ok())
            .collect();
        eprintln!("{}: {line}", self.what);
        (numbers[0], numbers[1])
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn assert_no_loss(ping: Ping) {
    let what = ping.what.clone();
    let (sent, received) = ping.finish();
    assert!(
        sent > 0 && sent == received,
        "{what}: {sent} sent, {received} received"
    );
}

/// Waits until one line of the agent's log contains every needle.
fn wait_log_line(agent: &AgentProcess, needles: &[&str]) {
    let found = try_wait_until(LONG, || {
        agent
            .log()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    });
    assert!(
        found,
        "no log line with all of {needles:?}; log:\n{}",
        agent.log()
    );
}

// ---- 1: etcd unavailable -------------------------------------------------------------------

/// etcd itself goes away for [`OUTAGE`] under traffic; right after it is back a third party
/// adds one peer lease and deletes another: both agents apply both changes within 2 s.
#[test]
fn etcd_outage_under_traffic_loses_no_packet_and_catches_up_within_2s() {
    let mut setup = Setup::new(2, "vxlan");
    let gone = free_net(&setup, 200);
    setup
        .cluster
        .etcd()
        .put(&key_of(&gone), &vxlan_lease("192.168.100.60", 0x60));
    for i in 0..2 {
        wait_until(LONG, "the fake peer's route", || {
            routes_to(setup.ns(i), &gone) == 1
        });
    }

    let ping = Ping::start(
        setup.pod(0),
        setup.pods[1],
        50,
        OUTAGE + Duration::from_secs(15),
    );
    let down = Instant::now();
    setup.cluster.etcd_mut().stop();
    // No fixed sleep for the outage itself: while etcd is away we keep checking that traffic
    // and the datapath stay as they were.
    while down.elapsed() < OUTAGE {
        assert!(
            setup.agents.iter_mut().all(|a| a.is_running()),
            "an agent died while etcd was away"
        );
        assert_eq!(
            routes_to(setup.ns(0), &setup.net(1)),
            1,
            "node 0 kept its route to node 1"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    setup.cluster.etcd_mut().restart();
    let back = Instant::now();
    let added = free_net(&setup, 210);
    setup
        .cluster
        .etcd()
        .put(&key_of(&added), &vxlan_lease("192.168.100.61", 0x61));
    setup.cluster.etcd().delete(&key_of(&gone));
    for i in 0..2 {
        let ok = try_wait_until(CATCH_UP + POLL_SLACK, || {
            routes_to(setup.ns(i), &added) == 1 && routes_to(setup.ns(i), &gone) == 0
        });
        eprintln!(
            "node {i} applied the changes {:?} after etcd's return",
            back.elapsed()
        );
        assert!(
            ok,
            "node {i} did not apply the lease changes within {CATCH_UP:?} (+ slack) of etcd's return; log:\n{}",
            setup.agents[i].log()
        );
    }
    assert!(
        setup.agents[0].log().contains("listing again"),
        "the agent noticed the outage and reconnected"
    );
    assert_no_loss(ping);
}

/// One node is cut off from etcd (nft in its namespace, both directions) for [`OUTAGE`] while
/// a third party adds and removes peer leases; after the cut is lifted the node has applied
/// them within 2 s.
#[test]
fn agent_cut_off_from_etcd_applies_missed_lease_changes_within_2s_of_reconnect() {
    let mut setup = Setup::new(2, "vxlan");
    let gone = free_net(&setup, 200);
    setup
        .cluster
        .etcd()
        .put(&key_of(&gone), &vxlan_lease("192.168.100.62", 0x62));
    wait_until(LONG, "the fake peer's route on node 0", || {
        routes_to(setup.ns(0), &gone) == 1
    });

    let ping = Ping::start(
        setup.pod(1),
        setup.pods[0],
        50,
        OUTAGE + Duration::from_secs(15),
    );
    let ns = setup.ns(0);
    ns.run(&["nft", "add", "table", "inet", "reliab"]);
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "reliab",
        "out",
        "{ type filter hook output priority 0 ; }",
    ]);
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "reliab",
        "in",
        "{ type filter hook input priority 0 ; }",
    ]);
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "reliab",
        "out",
        "ip",
        "daddr",
        "192.168.100.254",
        "tcp",
        "dport",
        "2379",
        "drop",
    ]);
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "reliab",
        "in",
        "ip",
        "saddr",
        "192.168.100.254",
        "tcp",
        "sport",
        "2379",
        "drop",
    ]);
    let cut = Instant::now();
    // The third party's changes while node 0 cannot hear them.
    let added = free_net(&setup, 210);
    setup
        .cluster
        .etcd()
        .put(&key_of(&added), &vxlan_lease("192.168.100.63", 0x63));
    setup.cluster.etcd().delete(&key_of(&gone));
    wait_until(LONG, "node 1 applied them", || {
        routes_to(setup.ns(1), &added) == 1 && routes_to(setup.ns(1), &gone) == 0
    });
    while cut.elapsed() < OUTAGE {
        assert!(setup.agents[0].is_running(), "agent 0 died while cut off");
        assert_eq!(
            routes_to(setup.ns(0), &added),
            0,
            "node 0 cannot have heard of the new lease"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    setup
        .ns(0)
        .run(&["nft", "delete", "table", "inet", "reliab"]);
    let back = Instant::now();
    let ok = try_wait_until(CATCH_UP + POLL_SLACK, || {
        routes_to(setup.ns(0), &added) == 1 && routes_to(setup.ns(0), &gone) == 0
    });
    eprintln!(
        "node 0 applied the missed changes {:?} after the cut was lifted",
        back.elapsed()
    );
    assert!(
        ok,
        "node 0 did not apply the missed lease changes within {CATCH_UP:?} (+ slack); log:\n{}",
        setup.agents[0].log()
    );
    assert_no_loss(ping);
}

// ---- 2: kill -9 and restart ----------------------------------------------------------------

#[test]
fn kill_9_and_restart_under_traffic_vxlan() {
    kill_and_restart("vxlan");
}

#[test]
fn kill_9_and_restart_under_traffic_ebpf() {
    kill_and_restart("ebpf");
}

fn kill_and_restart(backend: &str) {
    let mut setup = Setup::new(2, backend);
    let ping = Ping::start(setup.pod(1), setup.pods[0], 100, Duration::from_secs(20));
    let ping_back = Ping::start(setup.pod(0), setup.pods[1], 100, Duration::from_secs(20));
    let mut ping = ping;
    let started = Instant::now();
    setup.agents[0].kill();
    let args = setup.cluster.nodes[0].agent_args(&setup.cluster.etcd_endpoint(), backend);
    setup.agents[0] = AgentProcess::spawn(setup.ns(0), &args);
    setup.agents[0].wait_for_log("wrote the subnet file", LONG);
    eprintln!("restarted after kill -9 in {:?}", started.elapsed());
    assert!(
        ping.is_running(),
        "the restart took longer than the ping: the test proves nothing"
    );
    let env = setup.cluster.nodes[0].subnet_env().expect("subnet.env");
    assert_eq!(
        env["FLANNEL_SUBNET"], setup.subnets[0],
        "same subnet after kill -9"
    );

    // Exactly one lease key holds node 0's PublicIP.
    let ours: Vec<_> = setup
        .cluster
        .etcd()
        .keys(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .filter(|k| {
            setup
                .cluster
                .etcd()
                .get(k)
                .is_some_and(|v| v.contains("\"192.168.100.1\""))
        })
        .collect();
    assert_eq!(
        ours,
        vec![setup.lease_key(0)],
        "exactly one lease for node 0"
    );

    // No duplicate datapath state for the one peer.
    let peer_net = setup.net(1);
    let check = |what: &str| {
        let ns = setup.ns(0);
        assert_eq!(routes_to(ns, &peer_net), 1, "{what}: routes to {peer_net}");
        assert_eq!(
            neighs_for(ns, &peer_net.replace(".0/24", ".0")),
            1,
            "{what}: neighbour of {peer_net}"
        );
        assert_eq!(
            fdbs_to(ns, "192.168.100.2"),
            1,
            "{what}: FDB entries to node 1"
        );
        assert_eq!(
            flannel_objects(ns),
            (1, 1, 1),
            "{what}: flannel.1 objects for one peer"
        );
    };
    // The restarted agent's resync is done once its log says so; wait for the state to settle.
    wait_until(LONG, "one route per peer", || {
        routes_to(setup.ns(0), &peer_net) == 1
    });
    check("after restart");
    if backend == "ebpf" {
        let ns = setup.ns(0);
        // Program names are cut to 15 bytes by the kernel.
        let uplink = tcx_programs(ns, "eth0", TcAttachType::Ingress);
        assert_eq!(uplink, vec!["overlay_uplink_"], "TCX ingress of eth0");
        let vxlan = tcx_programs(ns, "flannel.1", TcAttachType::Egress);
        assert_eq!(vxlan, vec!["overlay_vxlan_l"], "TCX egress of flannel.1");
        let vxlan = tcx_programs(ns, "flannel.1", TcAttachType::Ingress);
        assert_eq!(vxlan, vec!["overlay_vxlan_d"], "TCX ingress of flannel.1");
        // Every pod veth carries one program per direction.
        let veths = ns.stdout(&["ip", "-o", "link", "show", "master", "cni0"]);
        for veth in veths.lines().filter_map(|l| l.split(':').nth(1)) {
            let veth = veth.trim().split('@').next().unwrap_or("");
            assert_eq!(
                tcx_programs(ns, veth, TcAttachType::Ingress),
                vec!["overlay_pod_enc"],
                "{veth}"
            );
            assert_eq!(
                tcx_programs(ns, veth, TcAttachType::Egress),
                vec!["overlay_pod_lea"],
                "{veth}"
            );
        }
        let pin = &setup.cluster.nodes[0].pin_dir;
        wait_until(LONG, "one PEERS entry per peer", || {
            pinned_map_entries(&pin.join(overlay_common::map_names::PEERS)) == 1
        });
    }
    assert_no_loss(ping);
    assert_no_loss(ping_back);
    check("after the pings");
}

// ---- 3: own lease deleted by hand ----------------------------------------------------------

#[test]
fn own_lease_deleted_by_hand_is_taken_back_within_5s_and_peers_route_again() {
    let setup = Setup::new(2, "vxlan");
    let key = setup.lease_key(0);
    let net0 = setup.net(0);
    let deleted = Instant::now();
    setup.cluster.etcd().delete(&key);
    let back = try_wait_until(Duration::from_secs(5), || {
        setup.cluster.etcd().get(&key).is_some()
    });
    eprintln!("lease back after {:?}", deleted.elapsed());
    assert!(
        back,
        "node 0's lease was not taken back within 5 s; log:\n{}",
        setup.agents[0].log()
    );
    let value = setup.cluster.etcd().get(&key).expect("lease");
    assert!(value.contains("\"192.168.100.1\""), "{value}");
    wait_until(
        Duration::from_secs(5),
        "node 1's route to node 0 again",
        || routes_to(setup.ns(1), &net0) == 1,
    );
    eprintln!("peer routes again after {:?}", deleted.elapsed());
    wait_until(LONG, "pod 1 -> pod 0", || {
        setup.pod(1).ping_once(setup.pods[0])
    });
    assert_eq!(
        setup.cluster.nodes[0].subnet_env().expect("env")["FLANNEL_SUBNET"],
        setup.subnets[0]
    );
}

// ---- 4: bad input --------------------------------------------------------------------------

#[test]
fn bad_peer_leases_and_bad_config_are_reported_and_disturb_nothing() {
    let mut setup = Setup::new(2, "vxlan");
    // A good fake peer that must stay through everything.
    let keep = free_net(&setup, 200);
    setup
        .cluster
        .etcd()
        .put(&key_of(&keep), &vxlan_lease("192.168.100.70", 0x70));
    wait_until(LONG, "the good fake peer", || {
        routes_to(setup.ns(0), &keep) == 1
    });
    let ping = Ping::start(setup.pod(0), setup.pods[1], 50, Duration::from_secs(30));
    let etcd = setup.cluster.etcd();

    // Wrong JSON types.
    let wrong_types = key_of(&free_net(&setup, 220));
    etcd.put(&wrong_types, r#"{"PublicIP":5,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:71"}}"#);
    wait_log_line(&setup.agents[0], &[&wrong_types, "PublicIP"]);

    // PublicIP that is not unicast.
    for (n, ip) in [
        (221u8, "0.0.0.0"),
        (222, "224.0.0.1"),
        (223, "255.255.255.255"),
    ] {
        let net = free_net(&setup, n);
        let key = key_of(&net);
        etcd.put(&key, &vxlan_lease(ip, n));
        wait_log_line(&setup.agents[0], &[&key, ip]);
        assert_eq!(
            routes_to(setup.ns(0), &net),
            0,
            "a route for a lease with PublicIP {ip}"
        );
    }

    // A lease overlapping other peers (and us): the whole network as one subnet.
    let overlap = format!("{PREFIX}/subnets/10.5.0.0-16");
    etcd.put(&overlap, &vxlan_lease("192.168.100.72", 0x72));
    wait_log_line(&setup.agents[0], &[&overlap, "overlaps"]);
    assert_eq!(
        routes_to(setup.ns(0), "10.5.0.0/16"),
        0,
        "a route for an overlapping lease"
    );

    // An invalid config while running: the running agents carry on.
    etcd.put(&format!("{PREFIX}/config"), "{ this is not json");
    for agent in &setup.agents {
        wait_log_line(agent, &["config", "invalid", "keeps running"]);
    }
    // A valid but different config: a restart applies it, and the agent says so.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    wait_log_line(&setup.agents[0], &["config changed", "restarted"]);

    // Nothing else disturbed: the agents run, the good peers stay, node 0 keeps its subnet.
    assert_no_loss(ping);

    // Someone else claims node 0's own subnet key with another PublicIP. Node 0 writes its
    // lease back, but node 1 follows the foreign lease until then, so pod traffic to node 0
    // may miss a packet in that window (seen under load): checked apart from the ping above.
    let own = setup.lease_key(0);
    etcd.put(&own, &vxlan_lease("192.168.100.73", 0x73));
    wait_log_line(
        &setup.agents[0],
        &[&own, "192.168.100.73", "another writer"],
    );
    wait_until(LONG, "node 0's own lease written back", || {
        etcd.get(&own)
            .is_some_and(|v| v.contains("\"192.168.100.1\""))
    });
    let back = setup.pods[0];
    wait_until(LONG, "pod 1 reaches pod 0 again", || {
        setup.pod(1).ping_once(back)
    });
    for (i, agent) in setup.agents.iter_mut().enumerate() {
        assert!(agent.is_running(), "agent {i} died; log:\n{}", agent.log());
    }
    assert_eq!(
        routes_to(setup.ns(0), &keep),
        1,
        "node 0 keeps the good fake peer"
    );
    assert_eq!(
        routes_to(setup.ns(0), &setup.net(1)),
        1,
        "node 0 keeps node 1"
    );
    assert_eq!(
        setup.cluster.nodes[0].subnet_env().expect("env")["FLANNEL_SUBNET"],
        setup.subnets[0],
        "node 0 keeps its subnet"
    );
    wait_until(LONG, "node 0's lease is node 0's again", || {
        setup
            .cluster
            .etcd()
            .get(&own)
            .is_some_and(|v| v.contains("\"192.168.100.1\""))
    });
    assert!(setup.pod(1).ping_once(setup.pods[0]));
    assert!(setup.pod(0).ping_once(setup.pods[1]));
}
