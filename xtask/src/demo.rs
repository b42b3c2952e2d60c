//! `cargo xtask demo`: three node namespaces, a real etcd, the real `overlay-agent` on each
//! (nodes 1 and 2 with the eBPF datapath, node 3 with the kernel vxlan device, as a flanneld
//! node would have), pods on every node, then ping and TCP between pods across nodes.
//! Everything is torn down at the end (drop guards, also on failure or Ctrl-C).
//!
//! Nothing here stands in for the agent: when the built agent cannot do a step, the demo
//! says which step and why, and exits non-zero.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    agent::AgentProcess,
    cni::CniRuntime,
    topology::{Cluster, Node},
};

use crate::{
    setup,
    util::{self, Workspace, note, step},
};

const PREFIX: &str = "/coreos.com/network";
/// The network config written to etcd. Leases say "vxlan" whatever the node's datapath, so
/// eBPF nodes and kernel-vxlan (flanneld-style) nodes are peers of each other.
const CONFIG: &str =
    r#"{"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}"#;
/// Node 1 and 2 run the eBPF datapath, node 3 the kernel's vxlan device.
const BACKENDS: [&str; 3] = ["ebpf", "ebpf", "vxlan"];
/// The agents' /healthz, /readyz and /status port, on loopback inside each node namespace.
const HEALTHZ_PORT: u16 = 9901;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds to wait for each agent to hold a lease and write its subnet file.
    #[arg(long, default_value_t = 60)]
    lease_timeout: u64,
    /// Seconds of iperf3 per TCP pair.
    #[arg(long, default_value_t = 2)]
    tcp_seconds: u32,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Panics (so drop guards remove namespaces, etcd and agents) once Ctrl-C was pressed.
fn check_interrupt() {
    assert!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted (Ctrl-C): cleaning up"
    );
}

/// What the agent binary offers, from its --help (so we can say what cannot be shown).
struct AgentAbilities {
    runs: bool,
    config_set: bool,
    /// Serves its status as JSON on `--healthz-port` (`GET /status`).
    status_endpoint: bool,
    help: String,
}

impl AgentAbilities {
    fn probe(agent: &std::path::Path) -> Self {
        let help = |args: &[&str]| {
            Command::new(agent)
                .args(args)
                .output()
                .map(|out| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                })
                .unwrap_or_default()
        };
        let top = help(&["--help"]);
        Self {
            runs: top.contains("--etcd-endpoints"),
            config_set: help(&["config", "set", "--help"]).contains("Usage"),
            status_endpoint: top.contains("--healthz-port"),
            help: top,
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::run(&setup::Args::default())?;
    let workspace = Workspace::locate()?;
    step("building the agent (cargo build -p overlay-agent)");
    util::run_checked(
        Command::new(util::cargo())
            .args(["build", "-p", "overlay-agent"])
            .current_dir(&workspace.root),
        Duration::from_secs(60),
    )
    .context("building overlay-agent failed; see cargo's messages above")?;
    let agent = workspace.agent_bin();
    // SAFETY: no other threads exist yet; the fixtures read this to find the agent.
    unsafe {
        std::env::set_var("OVERLAY_AGENT_BIN", &agent);
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let abilities = AgentAbilities::probe(&agent);

    let mut report = Report::default();
    let outcome = catch_unwind(AssertUnwindSafe(|| demo(args, &abilities, &mut report)));
    // Drop guards have removed namespaces, agents and etcd by now (also after a panic).
    println!("{}", report.render());
    match outcome {
        Ok(()) if report.problems.is_empty() => Ok(()),
        Ok(()) => bail!(
            "the demo could not show everything: {}",
            report.problems.join("; ")
        ),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            bail!("the demo stopped: {message}")
        }
    }
}

/// Everything the summary prints, filled in as the demo goes.
#[derive(Default)]
struct Report {
    leases: Vec<(String, String)>,
    nodes: Vec<NodeReport>,
    pings: Vec<PingResult>,
    tcp: Vec<TcpResult>,
    /// What could not be shown, and why.
    problems: Vec<String>,
}

#[derive(Default)]
struct NodeReport {
    name: String,
    underlay_ip: String,
    backend: String,
    subnet_env: Option<String>,
    pod: Option<String>,
    status: Option<serde_json::Value>,
    routes: String,
    log_tail: String,
}

struct PingResult {
    from: String,
    to: String,
    sent: u32,
    received: u32,
    rtt_avg_ms: Option<f64>,
}

struct TcpResult {
    from: String,
    to: String,
    outcome: Result<f64, String>,
}

fn demo(args: &Args, abilities: &AgentAbilities, report: &mut Report) {
    step("building 3 node namespaces on a switch, with etcd at 192.168.100.254:2379");
    let mut cluster = Cluster::new(3);
    let endpoint = cluster.etcd_endpoint();
    note(&format!("etcd: {endpoint}"));
    for node in &cluster.nodes {
        note(&format!("{}: eth0 {}", node.ns.name(), node.ip));
    }
    check_interrupt();

    if !abilities.runs {
        let first = abilities.help.lines().next().unwrap_or("").trim();
        report.problems.push(format!(
            "the built overlay-agent has no run path yet (its --help does not list \
             --etcd-endpoints; it printed {first:?}): agents, leases and pod traffic cannot be \
             shown. `git merge main` once the agent has landed"
        ));
        cluster.put_config(PREFIX, CONFIG);
        note(&format!("wrote {PREFIX}/config with etcdctl: {CONFIG}"));
        return;
    }

    step(&format!("writing the network config to {PREFIX}/config"));
    if abilities.config_set {
        let node = &cluster.nodes[0];
        let output = node
            .ns
            .command(&util_agent())
            .arg(format!("--etcd-endpoints={endpoint}"))
            .args(["config", "set", CONFIG])
            .output()
            .expect("run overlay-agent config set");
        assert!(
            output.status.success(),
            "overlay-agent config set failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        note(&format!(
            "$ overlay-agent config set '{CONFIG}'\n    {}",
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .replace('\n', "\n    ")
        ));
    } else {
        cluster.put_config(PREFIX, CONFIG);
        note("(the agent has no `config set` yet: wrote it with etcdctl)");
    }

    step("starting overlay-agent on every node");
    let mut agents = Vec::new();
    for (node, backend) in cluster.nodes.iter().zip(BACKENDS) {
        let mut agent_args = node.agent_args(&endpoint, backend);
        // As kube-flannel runs flanneld. Without it subnet.env says FLANNEL_IPMASQ=false and
        // the CNI plugin asks the bridge plugin to masquerade everything leaving the pod
        // subnet, pod-to-pod traffic to other nodes included: NATed flows never take the
        // eBPF fast path, and the far pod sees the node's address instead of ours.
        agent_args.push("--ip-masq".into());
        if abilities.status_endpoint {
            agent_args.push("--healthz-ip=127.0.0.1".into());
            agent_args.push(format!("--healthz-port={HEALTHZ_PORT}"));
        }
        note(&format!(
            "{}: overlay-agent {}",
            node.ns.name(),
            agent_args.join(" ")
        ));
        agents.push(AgentProcess::spawn(&node.ns, &agent_args));
        report.nodes.push(NodeReport {
            name: node.ns.name().to_owned(),
            underlay_ip: node.ip.to_string(),
            backend: backend.to_owned(),
            ..NodeReport::default()
        });
    }

    step("waiting for each agent's subnet.env (lease held, datapath programmed)");
    let deadline = Instant::now() + Duration::from_secs(args.lease_timeout);
    let mut ready = vec![false; cluster.nodes.len()];
    while Instant::now() < deadline && !ready.iter().all(|r| *r) {
        check_interrupt();
        for (index, node) in cluster.nodes.iter().enumerate() {
            if !ready[index] && subnet_of(node).is_some() {
                ready[index] = true;
                note(&format!(
                    "{}: {} after {}",
                    node.ns.name(),
                    subnet_of(node).unwrap_or_default(),
                    util::fmt_duration(
                        Duration::from_secs(args.lease_timeout)
                            .saturating_sub(deadline - Instant::now())
                    )
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (index, node) in cluster.nodes.iter().enumerate() {
        if !ready[index] {
            let running = agents[index].is_running();
            report.problems.push(format!(
                "{} ({}) wrote no subnet file within {}s (agent {}); its log is below",
                node.ns.name(),
                BACKENDS[index],
                args.lease_timeout,
                if running { "still running" } else { "exited" }
            ));
        }
    }

    step(
        "adding one pod per node with CNI ADD (the agent binary as `flannel`, the standard 10-flannel.conflist: flannel -> bridge cni0 + host-local, then portmap)",
    );
    let cni = CniRuntime::new();
    for node in cluster.nodes.iter_mut() {
        if subnet_of(node).is_none() {
            continue;
        }
        let name = node.ns.name().to_owned();
        let conflist = cni.flannel_conflist("1.0.0", &node.subnet_file());
        let (pod, result, _) = cni.add_pod(node, &conflist);
        let gateway = result["ips"][0]["gateway"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        note(&format!("pod {} on {name} (gateway {gateway})", pod.ip));
    }
    for (node, node_report) in cluster.nodes.iter().zip(report.nodes.iter_mut()) {
        node_report.pod = node.pods.first().map(|pod| pod.ip.to_string());
        node_report.subnet_env = std::fs::read_to_string(node.subnet_file()).ok();
    }

    let with_pods: Vec<usize> = (0..cluster.nodes.len())
        .filter(|index| !cluster.nodes[*index].pods.is_empty())
        .collect();
    if with_pods.len() >= 2 {
        step("ping between pods on different nodes (waits up to 20 s for each path first)");
        for &from in &with_pods {
            for &to in &with_pods {
                if from == to {
                    continue;
                }
                check_interrupt();
                report
                    .pings
                    .push(ping(&cluster.nodes[from], &cluster.nodes[to]));
            }
        }
        step(&format!(
            "TCP between pods with iperf3 ({} s each)",
            args.tcp_seconds
        ));
        for (from, to) in [(0, 1), (0, 2), (2, 1)] {
            if with_pods.contains(&from) && with_pods.contains(&to) {
                check_interrupt();
                report.tcp.push(tcp(
                    &cluster.nodes[from],
                    &cluster.nodes[to],
                    args.tcp_seconds,
                ));
            }
        }
        for result in &report.pings {
            if result.received == 0 {
                report.problems.push(format!(
                    "no ping got through from {} to {}",
                    result.from, result.to
                ));
            }
        }
        for result in &report.tcp {
            if let Err(error) = &result.outcome {
                report.problems.push(format!(
                    "TCP from {} to {} failed: {error}",
                    result.from, result.to
                ));
            }
        }
    } else {
        report
            .problems
            .push("fewer than two nodes got a subnet: no pod traffic to show".into());
    }

    step("collecting leases, routes and agent status");
    report.leases = cluster
        .etcd()
        .keys(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .map(|key| {
            let value = cluster.etcd().get(&key).unwrap_or_default();
            (key, value)
        })
        .collect();
    for ((node, agent), node_report) in cluster
        .nodes
        .iter()
        .zip(&agents)
        .zip(report.nodes.iter_mut())
    {
        node_report.routes = node
            .ns
            .try_run(&["ip", "-4", "route", "show", "root", "10.5.0.0/16"])
            .stdout_text();
        if abilities.status_endpoint {
            match fetch_status(node) {
                Ok(status) => {
                    let active = status["node"]["active_datapath"].as_str().unwrap_or("?");
                    if active != node_report.backend {
                        report.problems.push(format!(
                            "{} asked for --backend={} but forwards with {active}: {}",
                            node_report.name,
                            node_report.backend,
                            status["node"]["fallback_reason"]
                                .as_str()
                                .unwrap_or("no reason given")
                        ));
                    }
                    node_report.status = Some(status);
                }
                Err(error) => report
                    .problems
                    .push(format!("{}: GET /status failed: {error}", node_report.name)),
            }
        }
        let log = agent.log();
        let lines: Vec<&str> = log.lines().collect();
        node_report.log_tail = strip_ansi(&lines[lines.len().saturating_sub(8)..].join("\n"));
    }
    if !abilities.status_endpoint {
        report.problems.push(
            "the agent has no --healthz-port (GET /status) yet: no datapath counters to show"
                .into(),
        );
    }
    step("tearing down (agents, pods, nodes, etcd)");
    drop(agents);
    drop(cluster);
}

/// The agent's status (`GET /status` on its health port), fetched from inside the node's
/// namespace where the agent listens on loopback.
fn fetch_status(node: &Node) -> Result<serde_json::Value, String> {
    use std::io::{Read as _, Write as _};
    node.ns.enter(|| {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], HEALTHZ_PORT));
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
            .map_err(|error| format!("connecting to {address}: {error}"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(|error| format!("sending the request: {error}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|error| format!("reading the response: {error}"))?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(head.lines().next().unwrap_or("").to_owned());
        }
        serde_json::from_str(body).map_err(|error| format!("not JSON: {error}"))
    })
}

/// Removes terminal colour codes (ESC [ ... letter) from the agents' logs.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for code in chars.by_ref() {
                if code.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn util_agent() -> String {
    std::env::var("OVERLAY_AGENT_BIN").unwrap_or_else(|_| "overlay-agent".into())
}

/// FLANNEL_SUBNET from the node's subnet file, once written.
fn subnet_of(node: &Node) -> Option<String> {
    node.subnet_env()?.get("FLANNEL_SUBNET").cloned()
}

trait OutputText {
    fn stdout_text(&self) -> String;
}

impl OutputText for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }
}

/// Waits (up to 20 s) for the path to work, then sends 10 pings and reads ping's summary.
fn ping(from: &Node, to: &Node) -> PingResult {
    let (source, target) = (&from.pods[0], &to.pods[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !source.ping_once(target.ip) && Instant::now() < deadline {
        check_interrupt();
    }
    let output = source.ns.try_run(&[
        "ping",
        "-c",
        "10",
        "-i",
        "0.1",
        "-W",
        "1",
        "-q",
        &target.ip.to_string(),
    ]);
    let text = output.stdout_text();
    let (sent, received) = text
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .map(|line| {
            let numbers: Vec<u32> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|part| part.parse().ok())
                .collect();
            (
                numbers.first().copied().unwrap_or(0),
                numbers.get(1).copied().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0));
    // "rtt min/avg/max/mdev = 0.045/0.071/0.098/0.012 ms"
    let rtt_avg_ms = text
        .lines()
        .find_map(|line| line.strip_prefix("rtt min/avg/max/mdev = "))
        .and_then(|values| values.split('/').nth(1))
        .and_then(|avg| avg.parse().ok());
    let result = PingResult {
        from: format!("{} ({})", source.ip, from.ns.name()),
        to: format!("{} ({})", target.ip, to.ns.name()),
        sent,
        received,
        rtt_avg_ms,
    };
    note(&format!(
        "{} -> {}: {}/{} answered",
        result.from, result.to, result.received, result.sent
    ));
    result
}

/// One iperf3 TCP stream from a pod on `from` to a pod on `to`; Gbit/s received.
fn tcp(from: &Node, to: &Node, seconds: u32) -> TcpResult {
    let (source, target) = (&from.pods[0], &to.pods[0]);
    let mut result = TcpResult {
        from: format!("{} ({})", source.ip, from.ns.name()),
        to: format!("{} ({})", target.ip, to.ns.name()),
        outcome: Err(String::new()),
    };
    // A persistent server (not `-1`): a failed attempt must not take it down before the
    // retry. Killed by pid when the guard drops.
    let server = target
        .ns
        .command("iperf3")
        .args(["-s", "-B", &target.ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let _server = match server {
        Ok(child) => ServerGuard(child),
        Err(error) => {
            result.outcome = Err(format!("cannot start iperf3 server: {error}"));
            return result;
        }
    };
    // The server needs a moment to listen: retry the client for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last_error = String::from("no attempt finished");
    while Instant::now() < deadline {
        check_interrupt();
        let output = source
            .ns
            .command("iperf3")
            .args([
                "-c",
                &target.ip.to_string(),
                "-J",
                "-t",
                &seconds.to_string(),
            ])
            .args(["--connect-timeout", "2000"])
            .output();
        let output = match output {
            Ok(output) => output,
            Err(error) => {
                last_error = format!("cannot run iperf3: {error}");
                break;
            }
        };
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            result.outcome = Ok(bps / 1e9);
            break;
        }
        last_error = json["error"].as_str().map_or_else(
            || {
                let text = String::from_utf8_lossy(&output.stdout);
                format!(
                    "iperf3 ({}) printed no result: {}",
                    output.status,
                    text.chars().take(200).collect::<String>()
                )
            },
            str::to_owned,
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    if result.outcome.is_err() {
        result.outcome = Err(last_error);
    }
    match &result.outcome {
        Ok(gbps) => note(&format!(
            "{} -> {}: {gbps:.2} Gbit/s",
            result.from, result.to
        )),
        Err(error) => note(&format!(
            "{} -> {}: failed: {error}",
            result.from, result.to
        )),
    }
    result
}

/// The iperf3 server we started; killed (by its pid) and reaped when done.
struct ServerGuard(std::process::Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Report {
    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n================ overlay-agent demo ================"
        );
        if !self.nodes.is_empty() {
            let _ = writeln!(out, "\nNodes:");
            for node in &self.nodes {
                let subnet_env: BTreeMap<&str, &str> = node
                    .subnet_env
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .filter_map(|line| line.split_once('='))
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<14} eth0 {:<15} --backend={:<6} subnet {:<15} mtu {:<5} pod {}",
                    node.name,
                    node.underlay_ip,
                    node.backend,
                    subnet_env.get("FLANNEL_SUBNET").unwrap_or(&"(none)"),
                    subnet_env.get("FLANNEL_MTU").unwrap_or(&"-"),
                    node.pod.as_deref().unwrap_or("(none)")
                );
                if let Some(status) = &node.status {
                    let datapath = status["node"]["active_datapath"].as_str().unwrap_or("?");
                    let _ = writeln!(
                        out,
                        "  {:<14} datapath {datapath}{}, {} peers",
                        "",
                        status["node"]["fallback_reason"]
                            .as_str()
                            .map(|why| format!(" (fell back: {why})"))
                            .unwrap_or_default(),
                        status["peers"].as_array().map_or(0, Vec::len)
                    );
                    if let Some(counters) = status["datapath_counters"].as_object() {
                        let nonzero: Vec<String> = counters
                            .iter()
                            .filter(|(_, value)| value.as_u64().unwrap_or(0) > 0)
                            .map(|(name, value)| format!("{name}={value}"))
                            .collect();
                        if !nonzero.is_empty() {
                            let _ = writeln!(out, "  {:<14} counters {}", "", nonzero.join(" "));
                        }
                    }
                }
                for route in node.routes.lines() {
                    let _ = writeln!(out, "  {:<14} route {route}", "");
                }
            }
        }
        if !self.leases.is_empty() {
            let _ = writeln!(out, "\nLeases in etcd:");
            for (key, value) in &self.leases {
                let _ = writeln!(out, "  {key}\n    {value}");
            }
        }
        if !self.pings.is_empty() {
            let _ = writeln!(out, "\nPing between pods (10 packets each):");
            for ping in &self.pings {
                let loss = if ping.sent == 0 {
                    100.0
                } else {
                    100.0 * f64::from(ping.sent - ping.received) / f64::from(ping.sent)
                };
                let _ = writeln!(
                    out,
                    "  {:<26} -> {:<26} loss {loss:>5.1}%  avg rtt {}",
                    ping.from,
                    ping.to,
                    ping.rtt_avg_ms
                        .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3} ms"))
                );
            }
        }
        if !self.tcp.is_empty() {
            let _ = writeln!(
                out,
                "\nTCP (iperf3, one stream; single runs on a shared machine, not a benchmark: \
                 `cargo xtask bench` compares modes):"
            );
            for tcp in &self.tcp {
                let outcome = match &tcp.outcome {
                    Ok(gbps) => format!("{gbps:.2} Gbit/s"),
                    Err(error) => format!("FAILED: {error}"),
                };
                let _ = writeln!(out, "  {:<26} -> {:<26} {outcome}", tcp.from, tcp.to);
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nNot shown / problems:");
            for problem in &self.problems {
                let _ = writeln!(out, "  - {problem}");
            }
            for node in self.nodes.iter().filter(|node| !node.log_tail.is_empty()) {
                let _ = writeln!(out, "\nLast log lines of the agent on {}:", node.name);
                for line in node.log_tail.lines() {
                    let _ = writeln!(out, "  | {line}");
                }
            }
        }
        out
    }
}
