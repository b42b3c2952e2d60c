//! How a `--backend=ebpf` agent starts on a real host (issue 11): started with `ip netns exec`
//! (a private /sys without bpffs) it mounts bpffs itself and runs the eBPF datapath; when the
//! eBPF datapath cannot start, the fallback removes what an earlier run left attached, so a
//! node that joins afterwards is reached.

use std::{process::Command, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use overlay_tests::{
    agent::AgentProcess, netns::NetNs, topology::Cluster, try_wait_until, wait_until,
};
use serde_json::Value;

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTH_PORT: u16 = 9931;
const LONG: Duration = Duration::from_secs(30);

/// The names of the programs on `ifname`'s TCX hook in `ns` (cut to 15 bytes by the kernel).
fn tcx_programs(ns: &NetNs, ifname: &str, attach: TcAttachType) -> Vec<String> {
    ns.enter(|| {
        let (_, programs) = SchedClassifier::query_tcx(ifname, attach)
            .unwrap_or_else(|err| panic!("querying TCX {attach:?} on {ifname}: {err}"));
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

/// The programs on the uplink's ingress and the vxlan device's egress.
fn attached(ns: &NetNs) -> (Vec<String>, Vec<String>) {
    (
        tcx_programs(ns, "eth0", TcAttachType::Ingress),
        tcx_programs(ns, "flannel.1", TcAttachType::Egress),
    )
}

fn ebpf_attached() -> (Vec<String>, Vec<String>) {
    (
        vec!["overlay_uplink_".to_owned()],
        vec!["overlay_vxlan_l".to_owned()],
    )
}

/// The agent's `/status` JSON, fetched inside the node's namespace.
fn status(ns: &NetNs) -> Value {
    let out = ns.http_get(HEALTH_PORT, "/status");
    let body = out.split_once("\r\n\r\n").map_or(out.as_str(), |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|err| panic!("/status is not JSON ({err}): {out}"))
}

fn start(cluster: &Cluster, node: usize, backend: &str) -> AgentProcess {
    let n = &cluster.nodes[node];
    let mut args = n.agent_args(&cluster.etcd_endpoint(), backend);
    args.push(format!("--healthz-port={HEALTH_PORT}"));
    AgentProcess::spawn(&n.ns, &args)
}

/// Waits for node `node`'s subnet.env and puts a pod behind its bridge.
fn add_pod(cluster: &mut Cluster, node: usize, agent: &AgentProcess) {
    let found = try_wait_until(LONG, || cluster.nodes[node].subnet_env().is_some());
    assert!(
        found,
        "node {node} wrote no subnet.env; log:\n{}",
        agent.log()
    );
    let env = cluster.nodes[node].subnet_env().expect("subnet.env");
    let subnet = env["FLANNEL_SUBNET"].clone();
    let mtu = env["FLANNEL_MTU"].parse().expect("FLANNEL_MTU");
    cluster.nodes[node].add_pod(&subnet, mtu);
}

fn assert_pods_reach_each_other(cluster: &Cluster, a: usize, b: usize, agents: &[&AgentProcess]) {
    let (pod_a, pod_b) = (&cluster.nodes[a].pods[0], &cluster.nodes[b].pods[0]);
    for (from, to, what) in [
        (pod_a, pod_b.ip, format!("pod {a} -> pod {b}")),
        (pod_b, pod_a.ip, format!("pod {b} -> pod {a}")),
    ] {
        let reached = try_wait_until(LONG, || from.ping_once(to));
        let logs: Vec<String> = agents.iter().map(|agent| agent.log()).collect();
        assert!(
            reached,
            "{what} never answered; agent logs:\n{}",
            logs.join("\n---\n")
        );
    }
}

#[test]
fn ebpf_agent_started_with_ip_netns_exec_mounts_bpffs_and_runs_the_ebpf_datapath() {
    let mut cluster = Cluster::new(2);
    cluster.put_config(PREFIX, CONFIG);
    let node0 = &cluster.nodes[0];
    let mut args = node0.agent_args(&cluster.etcd_endpoint(), "ebpf");
    args.push(format!("--healthz-port={HEALTH_PORT}"));
    let mut agent0 = AgentProcess::spawn_ip_netns_exec(&node0.ns, &args);
    let agent1 = start(&cluster, 1, "ebpf");
    add_pod(&mut cluster, 0, &agent0);
    add_pod(&mut cluster, 1, &agent1);
    assert_pods_reach_each_other(&cluster, 0, 1, &[&agent0, &agent1]);

    let node0 = &cluster.nodes[0];
    let status0 = status(&node0.ns);
    assert_eq!(
        status0["node"]["active_datapath"],
        "ebpf",
        "{status0:#}\n{}",
        agent0.log()
    );
    assert_eq!(
        status0["node"]["fallback_reason"],
        Value::Null,
        "{status0:#}"
    );
    assert_eq!(attached(&node0.ns), ebpf_attached(), "{}", agent0.log());
    agent0.wait_for_log("mounted bpffs there", LONG);
    // The programs carry the pods' traffic (the status copies the counters every 5 s).
    let target = cluster.nodes[1].pods[0].ip.to_string();
    node0.pods[0]
        .ns
        .run(&["ping", "-c", "10", "-i", "0.05", "-q", &target]);
    wait_until(
        LONG,
        "node 0's status to count the >= 10 pings its pod veth program handed to the kernel",
        || {
            status(&node0.ns)["datapath_counters"]["kernel_not_ours"]
                .as_u64()
                .is_some_and(|n| n >= 10)
        },
    );
    assert!(
        !node0.pin_dir.exists(),
        "the pins live on the agent's private bpffs, not the host's ({})",
        node0.pin_dir.display()
    );

    // What the agent's warning says: the private mount, and the programs with it, go away
    // when the agent exits; the kernel path underneath keeps the pods connected.
    agent0.kill();
    wait_until(
        LONG,
        "node 0's programs to be detached with the agent gone",
        || attached(&cluster.nodes[0].ns) == (vec![], vec![]),
    );
    assert_pods_reach_each_other(&cluster, 0, 1, &[&agent1]);
}

#[test]
fn a_failed_ebpf_start_detaches_the_earlier_runs_programs_and_a_node_joining_later_is_reached() {
    let mut cluster = Cluster::new(3);
    cluster.put_config(PREFIX, CONFIG);
    let mut agent0 = start(&cluster, 0, "ebpf");
    let agent1 = start(&cluster, 1, "ebpf");
    add_pod(&mut cluster, 0, &agent0);
    add_pod(&mut cluster, 1, &agent1);
    assert_pods_reach_each_other(&cluster, 0, 1, &[&agent0, &agent1]);
    assert_eq!(
        attached(&cluster.nodes[0].ns),
        ebpf_attached(),
        "{}",
        agent0.log()
    );

    // A clean stop leaves the datapath pinned and attached, as designed.
    agent0.signal(libc::SIGTERM);
    assert_eq!(agent0.wait_exit(LONG), Some(0), "{}", agent0.log());
    let pin_dir = cluster.nodes[0].pin_dir.clone();
    // The next start fails to load: a map of another layout sits where OVL_CONFIG was pinned
    // (as an incompatible version would leave it). The attached programs keep their maps.
    let config_pin = pin_dir.join(overlay_common::map_names::CONFIG);
    std::fs::remove_file(&config_pin)
        .unwrap_or_else(|err| panic!("removing {}: {err}", config_pin.display()));
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&config_pin)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
        .args(["name", overlay_common::map_names::CONFIG])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool map create: {out:?}");
    assert_eq!(attached(&cluster.nodes[0].ns), ebpf_attached());

    let agent0 = start(&cluster, 0, "ebpf");
    agent0.wait_for_log("cannot run here", LONG);
    wait_until(LONG, "node 0's /status to say it fell back", || {
        let s = status(&cluster.nodes[0].ns);
        s["node"]["active_datapath"] == "vxlan" && s["node"]["fallback_reason"].is_string()
    });

    // A node joining after the fallback: its VXLAN must not meet the earlier run's programs,
    // whose maps know only node 1.
    let agent2 = start(&cluster, 2, "vxlan");
    add_pod(&mut cluster, 2, &agent2);
    assert_pods_reach_each_other(&cluster, 0, 2, &[&agent0, &agent2]);
    assert_pods_reach_each_other(&cluster, 0, 1, &[&agent0, &agent1]);
    assert_pods_reach_each_other(&cluster, 1, 2, &[&agent1, &agent2]);

    assert_eq!(
        attached(&cluster.nodes[0].ns),
        (vec![], vec![]),
        "a fallen-back node is a plain flannel node; log:\n{}",
        agent0.log()
    );
    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    agent0.wait_for_log("detached and unpinned the eBPF programs", LONG);
}
