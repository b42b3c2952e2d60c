//! `cargo xtask soak --minutes N` (or `--seconds N`): three real agents (two eBPF, one kernel
//! vxlan) in node namespaces with a real etcd, a writer churning fake peer leases, a ping
//! between pods on different nodes, and a check every `--check-every` seconds that nothing
//! leaks: per agent the open fds (/proc/PID/fd) and RSS, per node the kernel objects on
//! flannel.1 (routes, permanent neighbours, FDB entries) and, on eBPF nodes, the entries of
//! the pinned peers map, each of which must equal the live peers. Prints one line per check
//! and a verdict; fails (non-zero exit) on a leak, a diverged datapath, a dead agent or lost
//! pings.

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    agent::AgentProcess, bpffs::ensure_bpffs, netns::NetNs, topology::Cluster, try_wait_until,
};

use crate::util::{self, Workspace, step};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const BACKENDS: [&str; 3] = ["ebpf", "ebpf", "vxlan"];
/// Fake peers the writer adds and removes (10.5.200.0/24 ..), far from the agents' picks
/// only by luck: the writer skips subnets an agent holds.
const FAKE_POOL: u8 = 24;
/// Growth over the first check's figures that counts as a leak.
const FD_SLACK: usize = 8;
const RSS_SLACK_KIB: u64 = 24 * 1024;

#[derive(clap::Args)]
pub struct Args {
    /// How long to run, in minutes.
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<u64>,
    /// How long to run, in seconds (for short runs such as the test suite's).
    #[arg(long)]
    seconds: Option<u64>,
    /// Seconds between checks.
    #[arg(long, default_value_t = 10)]
    check_every: u64,
    /// Do not build the agent first (use $OVERLAY_AGENT_BIN or target/debug/overlay-agent).
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("soak needs root (network namespaces, BPF): run it with sudo");
    }
    let duration = match (args.minutes, args.seconds) {
        (Some(m), _) => Duration::from_secs(m * 60),
        (None, Some(s)) => Duration::from_secs(s),
        (None, None) => Duration::from_secs(10 * 60),
    };
    let workspace = Workspace::locate()?;
    if !args.no_build {
        step("building the agent (cargo build -p overlay-agent)");
        util::run_checked(
            Command::new(util::cargo())
                .args(["build", "-p", "overlay-agent"])
                .current_dir(&workspace.root),
            Duration::from_secs(60),
        )
        .context("building overlay-agent failed; see cargo's messages above")?;
    }
    if std::env::var_os("OVERLAY_AGENT_BIN").is_none() {
        // SAFETY: no other threads exist yet; the fixtures read this to find the agent.
        unsafe { std::env::set_var("OVERLAY_AGENT_BIN", workspace.agent_bin()) };
    }
    ensure_bpffs();

    step(&format!(
        "soak for {}: {} agents ({}), churning fake peer leases, ping between pods, a check every {} s",
        util::fmt_duration(duration),
        BACKENDS.len(),
        BACKENDS.join(", "),
        args.check_every
    ));
    let mut cluster = Cluster::new(BACKENDS.len());
    cluster.put_config(PREFIX, CONFIG);
    let mut agents: Vec<AgentProcess> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, backend)| {
            let node = &cluster.nodes[i];
            AgentProcess::spawn(
                &node.ns,
                &node.agent_args(&cluster.etcd_endpoint(), backend),
            )
        })
        .collect();
    let mut subnets = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        if !try_wait_until(Duration::from_secs(60), || {
            agent.log().contains("wrote the subnet file")
        }) {
            bail!("agent {} did not come up; log:\n{}", i + 1, agent.log());
        }
        subnets
            .push(cluster.nodes[i].subnet_env().context("subnet.env")?["FLANNEL_SUBNET"].clone());
    }
    let nets: Vec<String> = subnets.iter().map(|s| network_of(s)).collect();
    let pod_ips: Vec<_> = (0..BACKENDS.len())
        .map(|i| cluster.nodes[i].add_pod(&subnets[i], 1450).ip)
        .collect();
    for (i, j) in [(0, 1), (1, 2), (2, 0)] {
        if !try_wait_until(Duration::from_secs(30), || {
            cluster.nodes[i].pods[0].ping_once(pod_ips[j])
        }) {
            bail!("pod {} cannot reach pod {} before the soak", i + 1, j + 1);
        }
    }
    // Two cross-node pings for the whole run: eBPF -> eBPF and eBPF -> kernel vxlan.
    let mut pings = [
        PingRun::start(&cluster.nodes[0].pods[0].ns, &pod_ips[1].to_string()),
        PingRun::start(&cluster.nodes[1].pods[0].ns, &pod_ips[2].to_string()),
    ];

    let fake_nets: Vec<String> = (0..FAKE_POOL)
        .map(|n| format!("10.5.{}.0/24", 200 + n))
        .filter(|net| !nets.contains(net))
        .collect();
    let live = Mutex::new(BTreeSet::<usize>::new());
    let stop = AtomicBool::new(false);
    let changes = AtomicU64::new(0);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut baseline: Vec<Option<(usize, u64)>> = vec![None; BACKENDS.len()];
    let mut checks = 0;

    std::thread::scope(|scope| {
        // The writer: one lease change every ~100 ms, toggling a pseudo-random fake peer.
        scope.spawn(|| {
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let idx = (seed % fake_nets.len() as u64) as usize;
                let key = format!("{PREFIX}/subnets/{}", fake_nets[idx].replace('/', "-"));
                let mut live = live.lock().expect("lock");
                if live.remove(&idx) {
                    cluster.etcd().delete(&key);
                } else {
                    let mac = 0x10 + idx;
                    cluster.etcd().put(
                        &key,
                        &format!(
                            r#"{{"PublicIP":"192.168.100.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:01:{mac:02x}"}}}}"#,
                            100 + idx
                        ),
                    );
                    live.insert(idx);
                }
                drop(live);
                changes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });

        let check_every = Duration::from_secs(args.check_every.max(1));
        let mut next = Instant::now() + check_every;
        let end = started + duration;
        loop {
            // Wait for the next check (or the end) in short steps: wake early when an agent
            // dies.
            while Instant::now() < next.min(end) {
                if let Some(i) = agents.iter_mut().position(|a| !a.is_running()) {
                    failures.push(format!("agent {} exited; log:\n{}", i + 1, agents[i].log()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !failures.is_empty() {
                break;
            }
            // Holding the lock stops the writer (it changes etcd only while holding it), so
            // the live set cannot move under the check.
            let guard = live.lock().expect("lock");
            let live_fakes = guard.len();
            let peers = BACKENDS.len() - 1 + live_fakes;
            checks += 1;
            let mut line = format!(
                "[{:>6}] check {checks}: {} lease changes so far, {peers} live peers per node;",
                util::fmt_duration(started.elapsed()),
                changes.load(Ordering::Relaxed)
            );
            for (i, agent) in agents.iter().enumerate() {
                let ns = &cluster.nodes[i].ns;
                let pin = cluster.nodes[i]
                    .pin_dir
                    .join(overlay_common::map_names::PEERS);
                let ebpf = BACKENDS[i] == "ebpf";
                // Converged: every kernel object (and map entry) matches the live peers.
                let mut seen = (0, 0, 0, 0);
                let ok = try_wait_until(Duration::from_secs(15), || {
                    let (r, n, f) = flannel_objects(ns);
                    let m = if ebpf { map_entries(&pin) } else { peers };
                    seen = (r, n, f, m);
                    (r, n, f, m) == (peers, peers, peers, peers)
                });
                let (fds, rss) = (fd_count(agent.pid()), rss_kib(agent.pid()));
                line += &format!(
                    " node{} fds {fds} rss {:.1}MiB routes/neigh/fdb {}/{}/{}{}",
                    i + 1,
                    rss as f64 / 1024.0,
                    seen.0,
                    seen.1,
                    seen.2,
                    if ebpf {
                        format!(" map {}", seen.3)
                    } else {
                        String::new()
                    }
                );
                if !ok {
                    failures.push(format!(
                        "node {}: datapath does not match the {peers} live peers after 15 s: routes {} neighbours {} fdb {} map {}",
                        i + 1,
                        seen.0,
                        seen.1,
                        seen.2,
                        seen.3
                    ));
                }
                // The first check sets the baseline (start-up allocations are done by then).
                match baseline[i] {
                    None => baseline[i] = Some((fds, rss)),
                    Some((fds0, rss0)) => {
                        if fds > fds0 + FD_SLACK {
                            failures.push(format!(
                                "node {}: agent fds grew from {fds0} to {fds} (leak)",
                                i + 1
                            ));
                        }
                        if rss > rss0 + RSS_SLACK_KIB {
                            failures.push(format!(
                                "node {}: agent RSS grew from {rss0} KiB to {rss} KiB (leak)",
                                i + 1
                            ));
                        }
                    }
                }
            }
            println!("{line}");
            drop(guard);
            next = Instant::now() + check_every;
            if Instant::now() >= end || !failures.is_empty() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
    });

    let mut lost_total = 0;
    for (n, ping) in pings.iter_mut().enumerate() {
        let (sent, received) = ping.finish();
        // SIGINT may catch one echo in flight.
        let lost = sent.saturating_sub(received).saturating_sub(1);
        println!("ping {}: {sent} sent, {received} received", n + 1);
        lost_total += lost;
        if sent == 0 {
            failures.push(format!("ping {} sent nothing", n + 1));
        }
    }
    if lost_total > 0 {
        failures.push(format!("{lost_total} pings lost"));
    }
    if checks < 2 {
        failures.push(format!(
            "only {checks} check(s) ran: run longer than two --check-every periods"
        ));
    }
    if failures.is_empty() {
        println!(
            "soak PASSED: {} in {checks} checks, {} lease changes, no leaks, no lost pings",
            util::fmt_duration(started.elapsed()),
            changes.load(Ordering::Relaxed)
        );
        Ok(())
    } else {
        for f in &failures {
            println!("FAIL: {f}");
        }
        bail!("soak FAILED: {} problem(s)", failures.len())
    }
}

fn network_of(subnet_env_value: &str) -> String {
    let (ip, len) = overlay_tests::topology::parse_cidr(subnet_env_value);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(ip) & mask))
}

/// Routes, permanent neighbours and FDB entries with a destination on flannel.1.
fn flannel_objects(ns: &NetNs) -> (usize, usize, usize) {
    let count = |argv: &[&str], filter: &dyn Fn(&str) -> bool| {
        ns.stdout(argv).lines().filter(|l| filter(l)).count()
    };
    (
        count(&["ip", "-4", "route", "show", "dev", "flannel.1"], &|_| {
            true
        }),
        count(&["ip", "-4", "neigh", "show", "dev", "flannel.1"], &|l| {
            l.contains("PERMANENT")
        }),
        count(&["bridge", "fdb", "show", "dev", "flannel.1"], &|l| {
            l.contains(" dst ")
        }),
    )
}

/// Entries of a pinned BPF map (`bpftool -j map dump pinned`); usize::MAX when unreadable.
fn map_entries(path: &std::path::Path) -> usize {
    Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(usize::MAX)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A ping at 20 pps until stopped (SIGINT, which makes ping print its summary).
struct PingRun {
    child: Option<Child>,
}

impl PingRun {
    fn start(ns: &NetNs, target: &str) -> PingRun {
        let child = ns
            .command("ping")
            .args(["-q", "-i", "0.05", "-W", "2", target])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        PingRun { child: Some(child) }
    }

    fn finish(&mut self) -> (u64, u64) {
        let Some(child) = self.child.take() else {
            return (0, 0);
        };
        // SAFETY: kill(2) on the pid of our own unreaped child (`ip netns exec` execs ping).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let Ok(out) = child.wait_with_output() else {
            return (0, 0);
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find(|l| l.contains("packets transmitted")) else {
            return (0, 0);
        };
        let n: Vec<u64> = line
            .split(',')
            .filter_map(|p| p.split_whitespace().next()?.parse().ok())
            .collect();
        (
            n.first().copied().unwrap_or(0),
            n.get(1).copied().unwrap_or(0),
        )
    }
}

impl Drop for PingRun {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
