//! The datapath benchmark's topology and one mode's life on it: start the real agent with
//! the mode's `--backend` and extra arguments on both nodes, wait for subnet.env, create the
//! pod bridge and a pod from FLANNEL_SUBNET on each node, wait for pod-to-pod ping; afterwards
//! stop the agents and remove everything they left (flanneld-style agents keep the datapath
//! on exit, on purpose). The `node` mode starts nothing: its endpoints are the nodes.
//!
//! The fixtures panic on failure (they are test fixtures); here a panic during one mode's
//! bring-up becomes an error for that mode, so a long run keeps its other results.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use overlay_tests::topology::{Cluster, ClusterOptions, Node, UnderlayKind};
use overlay_tests::try_wait_until;

use super::agent::BenchAgent;
use super::measure::PodPair;
use super::modes::Mode;
use super::{Progress, probe};

pub const ETCD_PREFIX: &str = "/coreos.com/network";
pub const POD_NETWORK: &str = "10.244.0.0/16";

/// Generous: on 2 shared cores a debug agent may take a while to load its programs.
const AGENT_READY: Duration = Duration::from_secs(60);
const PING_READY: Duration = Duration::from_secs(60);

/// The fixtures log at debug level; a benchmark measures the agent, not its debug logging
/// (debug logs every map write, 10,000 of them in the control-plane runs).
pub(super) const AGENT_ENV: &[(&str, &str)] = &[("RUST_LOG", "info")];

pub struct Lab {
    cluster: Cluster,
}

/// One mode, running: agents (killed on drop) and the pod pair to measure.
pub struct ModeUp {
    agents: Vec<BenchAgent>,
    pub pair: PodPair,
}

pub(super) fn caught<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        anyhow!("{what}: {msg}")
    })
}

impl Lab {
    /// Two nodes whose eth0s are one veth pair (MTU 1500), etcd on a management link.
    pub fn new() -> Result<Self> {
        let cluster = caught("build the two-node topology", || {
            Cluster::with(ClusterOptions {
                nodes: 2,
                underlay: UnderlayKind::DirectVeth,
                underlay_mtu: 1500,
                etcd: true,
            })
        })?;
        // The agent's --backend picks the mode; the config's type is the flannel default.
        cluster.put_config(
            ETCD_PREFIX,
            &format!(
                r#"{{"Network":"{POD_NETWORK}","SubnetLen":24,"Backend":{{"Type":"vxlan"}}}}"#
            ),
        );
        Ok(Self { cluster })
    }

    /// The eBPF datapath counters summed over both nodes (None when an agent has no STATS
    /// map, e.g. in the kernel-only modes).
    pub fn ebpf_counters(&self, up: &ModeUp) -> Result<Option<Vec<u64>>> {
        let mut total: Option<Vec<u64>> = None;
        for (node, agent) in self.cluster.nodes.iter().zip(&up.agents) {
            let Some(c) = probe::read_stats(&node.pin_dir, agent.pid())? else {
                return Ok(None);
            };
            match &mut total {
                None => total = Some(c),
                Some(t) => t.iter_mut().zip(c).for_each(|(a, b)| *a += b),
            }
        }
        Ok(total)
    }

    pub fn bring_up(&mut self, mode: &Mode, progress: &Progress) -> Result<ModeUp> {
        let Some(backend) = mode.backend else {
            return self.bring_up_nodes(progress);
        };
        let endpoint = self.cluster.etcd_endpoint();
        let mut agents = Vec::new();
        for node in &self.cluster.nodes {
            let mut args = node.agent_args(&endpoint, backend);
            args.extend(mode.agent_args.iter().map(|a| a.to_string()));
            agents.push(BenchAgent::spawn(&node.ns, &args, AGENT_ENV)?);
        }
        let mode = mode.name;
        let mut envs = Vec::new();
        for (node, agent) in self.cluster.nodes.iter().zip(&mut agents) {
            let env = wait_subnet_env(node, agent).map_err(|e| {
                anyhow!(
                    "{mode} agent on node {}: {e:#}; its log ends:\n{}",
                    node.index,
                    tail(&agent.log())
                )
            })?;
            envs.push(env);
        }
        let mut pods = Vec::new();
        for (node, env) in self.cluster.nodes.iter_mut().zip(&envs) {
            let subnet = env["FLANNEL_SUBNET"].clone();
            let mtu: u32 = env
                .get("FLANNEL_MTU")
                .and_then(|m| m.parse().ok())
                .context("subnet.env has no numeric FLANNEL_MTU")?;
            progress.line(&format!(
                "    node {}: FLANNEL_SUBNET={subnet} FLANNEL_MTU={mtu}, adding pod",
                node.index
            ));
            let pod = caught("add pod", || {
                let p = node.add_pod(&subnet, mtu);
                (p.ns.name().to_string(), p.ip)
            })?;
            pods.push(pod);
        }
        let pair = PodPair {
            client_ns: pods[0].0.clone(),
            server_ns: pods[1].0.clone(),
            server_ip: pods[1].1,
            scope_ns: pods
                .iter()
                .map(|p| p.0.clone())
                .chain(self.cluster.nodes.iter().map(|n| n.ns.name().to_string()))
                .collect(),
        };
        let (a, b) = (
            &self.cluster.nodes[0].pods[0],
            &self.cluster.nodes[1].pods[0],
        );
        let client_ip: Ipv4Addr = pods[0].1;
        if !try_wait_until(PING_READY, || {
            a.ping_once(pair.server_ip) && b.ping_once(client_ip)
        }) {
            let logs: Vec<String> = agents.iter().map(|a| tail(&a.log())).collect();
            bail!(
                "{mode}: pods {client_ip} and {} cannot ping each other after {PING_READY:?}; agent logs:\n{}",
                pair.server_ip,
                logs.join("\n-----\n")
            );
        }
        progress.line(&format!(
            "    pods {client_ip} <-> {} answer ping",
            pair.server_ip
        ));
        Ok(ModeUp { agents, pair })
    }

    /// No overlay: the client in node 1, the server at node 2's underlay address.
    fn bring_up_nodes(&self, progress: &Progress) -> Result<ModeUp> {
        let (a, b) = (&self.cluster.nodes[0], &self.cluster.nodes[1]);
        let pair = PodPair {
            client_ns: a.ns.name().to_string(),
            server_ns: b.ns.name().to_string(),
            server_ip: b.ip,
            scope_ns: vec![a.ns.name().to_string(), b.ns.name().to_string()],
        };
        let ping = |from: &Node, to: Ipv4Addr| {
            from.ns
                .try_run(&["ping", "-c1", "-W1", "-q", &to.to_string()])
                .status
                .success()
        };
        if !try_wait_until(PING_READY, || ping(a, b.ip) && ping(b, a.ip)) {
            bail!(
                "node: nodes {} and {} cannot ping each other over the underlay",
                a.ip,
                b.ip
            );
        }
        progress.line(&format!(
            "    nodes {} <-> {} answer ping (no overlay, no agent)",
            a.ip, b.ip
        ));
        Ok(ModeUp {
            agents: Vec::new(),
            pair,
        })
    }

    /// Stops the agents (SIGTERM, then SIGKILL) and removes what they and the pods left, so
    /// the next mode starts from a bare topology. Keeps going after errors, reports them all.
    pub fn tear_down(&mut self, up: Option<ModeUp>, progress: &Progress) {
        if let Some(mut up) = up {
            for agent in &mut up.agents {
                agent.signal(libc::SIGTERM);
                if !try_wait_until(Duration::from_secs(10), || !agent.is_running()) {
                    progress.line("    agent ignored SIGTERM for 10 s: killing it");
                    agent.kill();
                }
            }
        }
        let etcd = self.cluster.etcd();
        let out =
            etcd.etcdctl_output(&["del", "--prefix", "--", &format!("{ETCD_PREFIX}/subnets/")]);
        let mut problems = Vec::new();
        if !out.status.success() {
            problems.push(format!(
                "etcd lease cleanup: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for node in &mut self.cluster.nodes {
            problems.extend(clean_node(node, POD_NETWORK));
        }
        for p in problems {
            progress.line(&format!("    cleanup: {p}"));
        }
    }
}

fn wait_subnet_env(node: &Node, agent: &mut BenchAgent) -> Result<HashMap<String, String>> {
    let mut env = None;
    let mut exited = false;
    try_wait_until(AGENT_READY, || {
        if !agent.is_running() {
            exited = true;
            return true;
        }
        env = node
            .subnet_env()
            .filter(|e| e.contains_key("FLANNEL_SUBNET"));
        env.is_some()
    });
    if exited {
        bail!(
            "the agent exited before writing {}",
            node.subnet_file().display()
        );
    }
    env.with_context(|| {
        format!(
            "no FLANNEL_SUBNET in {} after {AGENT_READY:?}",
            node.subnet_file().display()
        )
    })
}

/// Removes pods, the bridge, the agent's devices, routes and BPF attachments and pins.
pub(super) fn clean_node(node: &mut Node, network: &str) -> Vec<String> {
    let mut problems = Vec::new();
    node.pods.clear(); // deletes the pod namespaces (and their veths)
    let try_cmd = |argv: &[&str]| node.ns.try_run(argv);
    for dev in ["cni0", "flannel.1"] {
        if try_cmd(&["ip", "link", "show", dev]).status.success() {
            let out = try_cmd(&["ip", "link", "del", dev]);
            if !out.status.success() {
                problems.push(format!(
                    "node {}: ip link del {dev}: {}",
                    node.index,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    // host-gw routes (and anything else towards the pod network).
    let _ = try_cmd(&["ip", "route", "flush", "root", network]);
    // Programs attached through netlink (cls_bpf, XDP) outlive the agent; TCX/XDP links pinned
    // in the pin dir go away when it is removed.
    let _ = try_cmd(&["tc", "qdisc", "del", "dev", "eth0", "clsact"]);
    let _ = try_cmd(&["ip", "link", "set", "dev", "eth0", "xdp", "off"]);
    if node.pin_dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&node.pin_dir)
    {
        problems.push(format!(
            "node {}: remove {}: {e}",
            node.index,
            node.pin_dir.display()
        ));
    }
    let _ = std::fs::remove_file(node.subnet_file());
    let left = node
        .ns
        .try_run(&["bpftool", "-j", "net", "show", "dev", "eth0"]);
    let text = String::from_utf8_lossy(&left.stdout);
    if text.contains("\"id\"") {
        problems.push(format!(
            "node {}: BPF programs still attached to eth0: {text}",
            node.index
        ));
    }
    problems
}

/// The last 30 lines of an agent log (error messages stay readable).
pub(super) fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
