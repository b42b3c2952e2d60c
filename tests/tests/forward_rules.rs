//! flanneld's FORWARD accept rules (`--iptables-forward-rules`, on by default) under the
//! `iptables -P FORWARD DROP` that Docker >= 1.13 sets: pods on two nodes reach each other
//! with default flags on the vxlan, host-gw and ebpf backends, with either iptables back end
//! Debian ships (nft and legacy), and do not with `--iptables-forward-rules=false`.
//!
//! The agent runs `iptables` from PATH, as flanneld does; each test puts a directory first in
//! the agent's PATH whose `iptables*` point at one back end, as `update-alternatives` would,
//! without touching the host's choice (other tests run in parallel).

use std::{path::Path, time::Duration};

use overlay_common::stat;
use overlay_tests::{
    agent::AgentProcess,
    topology::{Cluster, parse_cidr},
    try_wait_until, wait_until,
};
use tempfile::TempDir;

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LONG: Duration = Duration::from_secs(30);
const JUMP: [&str; 6] = [
    "-m",
    "comment",
    "--comment",
    "flanneld forward",
    "-j",
    "FLANNEL-FWD",
];

/// A PATH directory whose iptables, iptables-restore and iptables-save are `variant`'s.
fn iptables_alternative(variant: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("overlay-iptables-")
        .tempdir()
        .expect("tempdir");
    for suffix in ["", "-restore", "-save"] {
        let target = Path::new("/usr/sbin").join(format!("iptables-{variant}{suffix}"));
        assert!(
            target.exists(),
            "{} is missing: install Debian's iptables package (it ships both back ends)",
            target.display()
        );
        std::os::unix::fs::symlink(&target, dir.path().join(format!("iptables{suffix}")))
            .expect("symlink");
    }
    dir
}

struct Setup {
    cluster: Cluster,
    agents: Vec<AgentProcess>,
    variant: &'static str,
    _path: TempDir,
}

impl Setup {
    /// Two nodes whose FORWARD policy is DROP in `variant`'s tables, agents on `backend`
    /// with `extra` flags, a pod on each; returns once both nodes route to each other.
    fn new(backend: &str, variant: &'static str, extra: &[&str]) -> Setup {
        let mut cluster = Cluster::new(2);
        cluster.put_config(PREFIX, CONFIG);
        let iptables = format!("iptables-{variant}");
        for node in &cluster.nodes {
            node.ns.run(&[&iptables, "-P", "FORWARD", "DROP"]);
        }
        let path_dir = iptables_alternative(variant);
        let path = format!(
            "{}:{}",
            path_dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let endpoint = cluster.etcd_endpoint();
        let agents: Vec<AgentProcess> = cluster
            .nodes
            .iter()
            .map(|node| {
                let mut args = node.agent_args(&endpoint, backend);
                args.push("--iptables-resync=1".to_owned());
                args.extend(extra.iter().map(|s| (*s).to_owned()));
                AgentProcess::spawn_with_env(&node.ns, &args, &[("PATH", &path)])
            })
            .collect();
        let mut subnets = Vec::new();
        for (node, agent) in cluster.nodes.iter().zip(&agents) {
            let found = try_wait_until(LONG, || node.subnet_env().is_some());
            assert!(found, "no subnet.env; log:\n{}", agent.log());
            subnets.push(node.subnet_env().expect("env"));
        }
        for (node, env) in cluster.nodes.iter_mut().zip(&subnets) {
            node.add_pod(
                &env["FLANNEL_SUBNET"],
                env["FLANNEL_MTU"].parse().expect("mtu"),
            );
        }
        // Each node routes the other's subnet: whatever happens next is up to FORWARD.
        for (i, node) in cluster.nodes.iter().enumerate() {
            let (ip, len) = parse_cidr(&subnets[1 - i]["FLANNEL_SUBNET"]);
            let peer = ipnetwork::Ipv4Network::new(ip, len).expect("subnet");
            let peer = format!("{}/{len}", peer.network());
            wait_until(LONG, &format!("node {i}'s route to {peer}"), || {
                !node
                    .ns
                    .stdout(&["ip", "-4", "route", "show", &peer])
                    .trim()
                    .is_empty()
            });
        }
        Setup {
            cluster,
            agents,
            variant,
            _path: path_dir,
        }
    }

    fn iptables(&self, node: usize, args: &[&str]) -> std::process::Output {
        let program = format!("iptables-{}", self.variant);
        let mut argv = vec![program.as_str()];
        argv.extend_from_slice(args);
        self.cluster.nodes[node].ns.try_run(&argv)
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(AgentProcess::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    fn pings(&self, from: usize, to: usize) -> bool {
        let target = self.cluster.nodes[to].pods[0].ip;
        self.cluster.nodes[from].pods[0].ping_once(target)
    }

    fn assert_pods_reach_each_other(&self) {
        for (from, to) in [(0, 1), (1, 0)] {
            let reached = try_wait_until(LONG, || self.pings(from, to));
            assert!(
                reached,
                "pod {from} -> pod {to} under FORWARD DROP ({}); FORWARD on node {from}:\n{}\nlogs:\n{}",
                self.variant,
                String::from_utf8_lossy(&self.iptables(from, &["-S", "FORWARD"]).stdout),
                self.logs()
            );
        }
    }

    /// The rules are flanneld's, in the back end the agent's `iptables` points at.
    fn assert_rules_installed(&self) {
        let version = if self.variant == "nft" {
            "(nf_tables)"
        } else {
            "(legacy)"
        };
        for (i, agent) in self.agents.iter().enumerate() {
            agent.wait_for_log("FORWARD accept rules installed", LONG);
            assert!(
                agent.log().contains(version),
                "agent {i} used another back end:\n{}",
                agent.log()
            );
            let chain = self.iptables(i, &["-S", "FLANNEL-FWD"]);
            let chain = String::from_utf8_lossy(&chain.stdout);
            for dir in ["-s", "-d"] {
                let rule = format!(
                    "-A FLANNEL-FWD {dir} 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
                );
                assert!(chain.contains(&rule), "node {i} lacks {rule:?}:\n{chain}");
            }
            let mut check = vec!["-C", "FORWARD"];
            check.extend_from_slice(&JUMP);
            assert!(
                self.iptables(i, &check).status.success(),
                "node {i}: no jump from FORWARD"
            );
        }
    }
}

fn default_flags_reach_pods_under_forward_drop(backend: &str, variant: &'static str) -> Setup {
    let setup = Setup::new(backend, variant, &[]);
    setup.assert_pods_reach_each_other();
    setup.assert_rules_installed();
    setup
}

/// Someone deletes the jump (a firewall reload does this): the resync puts it back.
fn deleted_jump_comes_back(setup: &Setup) {
    let mut delete = vec!["-D", "FORWARD"];
    delete.extend_from_slice(&JUMP);
    let out = setup.iptables(0, &delete);
    assert!(out.status.success(), "deleting the jump: {out:?}");
    let mut check = vec!["-C", "FORWARD"];
    check.extend_from_slice(&JUMP);
    wait_until(LONG, "the jump to FLANNEL-FWD to be re-applied", || {
        setup.iptables(0, &check).status.success()
    });
    setup.agents[0].wait_for_log("FORWARD accept rules were changed or removed", LONG);
    setup.assert_pods_reach_each_other();
}

/// With the rules off, forwarded pod traffic is dropped; the same cluster works once the
/// policy is ACCEPT, so the missing rule is what stopped it.
fn without_forward_rules_pods_are_dropped(variant: &'static str) {
    let setup = Setup::new("vxlan", variant, &["--iptables-forward-rules=false"]);
    for (from, to) in [(0, 1), (1, 0)] {
        for _ in 0..3 {
            assert!(
                !setup.pings(from, to),
                "pod {from} -> pod {to} got through FORWARD DROP without the rules"
            );
        }
    }
    for i in 0..2 {
        let chain = setup.iptables(i, &["-S", "FLANNEL-FWD"]);
        assert!(!chain.status.success(), "node {i} has a FLANNEL-FWD chain");
    }
    setup.agents[0].wait_for_log("--iptables-forward-rules=false", LONG);
    for i in 0..2 {
        let out = setup.iptables(i, &["-P", "FORWARD", "ACCEPT"]);
        assert!(out.status.success(), "{out:?}");
    }
    setup.assert_pods_reach_each_other();
}

#[test]
fn vxlan_pods_reach_each_other_under_forward_drop_with_iptables_nft() {
    let setup = default_flags_reach_pods_under_forward_drop("vxlan", "nft");
    deleted_jump_comes_back(&setup);
}

#[test]
fn vxlan_pods_reach_each_other_under_forward_drop_with_iptables_legacy() {
    let setup = default_flags_reach_pods_under_forward_drop("vxlan", "legacy");
    deleted_jump_comes_back(&setup);
}

#[test]
fn host_gw_pods_reach_each_other_under_forward_drop_with_iptables_nft() {
    default_flags_reach_pods_under_forward_drop("host-gw", "nft");
}

#[test]
fn host_gw_pods_reach_each_other_under_forward_drop_with_iptables_legacy() {
    default_flags_reach_pods_under_forward_drop("host-gw", "legacy");
}

/// The eBPF path: new flows (and ICMP) cross FORWARD on the kernel path before a flow is
/// learned, so the accept rules matter here too.
fn ebpf_pods_reach_each_other_under_forward_drop(variant: &'static str) {
    let setup = default_flags_reach_pods_under_forward_drop("ebpf", variant);
    let encap = |node: usize| {
        let values =
            overlay_agent::dataplane::ebpf::read_pinned_stats(&setup.cluster.nodes[node].pin_dir)
                .unwrap_or_else(|err| panic!("node {node}'s eBPF counters: {err}"));
        values[stat::KERNEL_NOT_OURS as usize]
    };
    let before = encap(0);
    let target = setup.cluster.nodes[1].pods[0].ip.to_string();
    setup.cluster.nodes[0].pods[0]
        .ns
        .run(&["ping", "-c", "5", "-i", "0.1", "-q", &target]);
    assert!(
        encap(0) >= before + 5,
        "node 0's pod veth program saw the pings and handed them to the kernel path"
    );
}

#[test]
fn ebpf_pods_reach_each_other_under_forward_drop_with_iptables_nft() {
    ebpf_pods_reach_each_other_under_forward_drop("nft");
}

#[test]
fn ebpf_pods_reach_each_other_under_forward_drop_with_iptables_legacy() {
    ebpf_pods_reach_each_other_under_forward_drop("legacy");
}

#[test]
fn without_forward_rules_a_drop_policy_stops_pods_with_iptables_nft() {
    without_forward_rules_pods_are_dropped("nft");
}

#[test]
fn without_forward_rules_a_drop_policy_stops_pods_with_iptables_legacy() {
    without_forward_rules_pods_are_dropped("legacy");
}
