//! `bench --control-plane`: N peer leases in etcd (flannel's key/JSON format), then for each
//! mode: time from agent start until all N peers are in the datapath; the agent's CPU while
//! nothing changes; a re-list that changes nothing (etcd restarted under the agent: how long
//! applying the snapshot took and how many netlink writes it made, read from /metrics);
//! latency from one etcd write to the datapath holding it (adds and removals); the agent's
//! CPU under 10 lease changes per second; and its peak RSS.
//!
//! One node namespace and etcd per N; the leases are written once and the modes take turns
//! on them (interleaved rounds), with the node cleaned between runs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use overlay_tests::topology::{Cluster, ClusterOptions, UnderlayKind};
use overlay_tests::try_wait_until;
use serde::Serialize;

use super::agent::BenchAgent;
use super::cpu::{process_cpu_seconds, process_peak_rss};
use super::etcd_http::EtcdHttp;
use super::lab::{AGENT_ENV, ETCD_PREFIX, caught, clean_node, tail};
use super::probe::{PeerMap, RouteMonitor, count_vxlan_routes};
use super::report::Samples;
use super::stats::percentile;
use super::{MetricDef, Progress};

const NETWORK: &str = "10.0.0.0/8";
/// Lease changes use subnets from this index on, far from the N leases and the agent's own.
const CHANGE_BASE: u32 = 40_000;
/// Lease changes of the 10-per-second CPU window use subnets from this index on.
const CHURN_BASE: u32 = 50_000;
/// Between the sync and the idle CPU window.
const SETTLE: Duration = Duration::from_secs(5);
/// Where the agent serves /metrics inside the node namespace.
const HEALTHZ_PORT: u16 = 9876;
/// A change not in the datapath by then counts as lost (at 10,000 peers a debug-built agent
/// was seen taking 4-7 s per change).
const CHANGE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub peers: Vec<usize>,
    pub changes: usize,
    /// Time allowed for the lease changes of one run; a slow agent gets fewer changes
    /// (said in the notes) instead of an endless run.
    pub change_budget_secs: u64,
    pub rounds: u32,
    /// Seconds of each CPU window (idle, and 10 changes per second).
    pub cpu_window_secs: u64,
}

/// The i-th /24 of 10.0.0.0/8 (i >= 1; i = 0 is below flannel's default SubnetMin).
fn subnet(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 8) as u8, (i & 0xff) as u8, 0)
}

fn lease(i: u32) -> (String, String) {
    let s = subnet(i);
    let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i);
    let b = i.to_be_bytes();
    let value = format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0a:58:{:02x}:{:02x}:{:02x}:{:02x}"}}}}"#,
        b[0], b[1], b[2], b[3]
    );
    (format!("{ETCD_PREFIX}/subnets/{s}-24"), value)
}

fn defs_for(n: usize) -> Vec<MetricDef> {
    let d = |key: &str, label: &str, unit: &'static str| MetricDef {
        key: format!("{key}_{n}").into(),
        label: format!("{label}, N={n}").into(),
        unit,
        higher_is_better: false,
    };
    vec![
        d("sync", "Agent start to all peers in datapath", "s"),
        d(
            "routes_final",
            "Agent start to every route in its final form",
            "s",
        ),
        d("change_p50", "Lease change to datapath p50", "ms"),
        d("change_p99", "Lease change to datapath p99", "ms"),
        d("peak_rss", "Agent peak RSS", "MiB"),
        d("cpu_sync", "Agent CPU until synced", "CPU-s"),
        d("cpu_idle", "Agent CPU with no changes, % of a core", "%"),
        d(
            "cpu_churn",
            "Agent CPU at 10 lease changes/s, % of a core",
            "%",
        ),
        d("relist", "Re-list with nothing changed, applying it", "ms"),
        d(
            "relist_writes",
            "Re-list with nothing changed, netlink writes",
            "writes",
        ),
    ]
}

pub fn run(
    s: &Settings,
    modes: &[String],
    progress: &Progress,
    errors: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<(Vec<MetricDef>, Samples)> {
    if s.changes < 2 {
        bail!("--changes must be at least 2 (one add and one removal)");
    }
    let mut defs = Vec::new();
    let mut samples = Samples::new();
    for &n in &s.peers {
        if !(1..=30_000).contains(&n) {
            bail!("--peers values must be 1..=30000, got {n}");
        }
        defs.extend(defs_for(n));
        progress.line(&format!(
            "control plane N={n}: building a node namespace and etcd"
        ));
        let mut cluster = caught("build the one-node topology", || {
            Cluster::with(ClusterOptions {
                nodes: 1,
                underlay: UnderlayKind::Switch,
                underlay_mtu: 1500,
                etcd: true,
            })
        })?;
        cluster.put_config(
            ETCD_PREFIX,
            &format!(r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"vxlan"}}}}"#),
        );
        let mut etcd = connect_etcd(&cluster)?;
        let t = Instant::now();
        let leases: Vec<(String, String)> = (1..=n as u32).map(lease).collect();
        etcd.put_many(&leases)?;
        progress.line(&format!(
            "    wrote {n} leases in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        for round in 1..=s.rounds {
            for mode in modes {
                if super::interrupted() {
                    errors.push(format!(
                        "interrupted (Ctrl-C) before N={n} round {round} {mode}"
                    ));
                    return Ok((defs, samples));
                }
                progress.line(&format!(
                    "N={n} round {round}/{} {mode}: starting the agent",
                    s.rounds
                ));
                match one_run(&mut cluster, &mut etcd, n, mode, s, progress, notes) {
                    Ok((values, lost)) => {
                        if let Some(lost) = lost {
                            let msg = format!("N={n} round {round} {mode}: {lost}");
                            progress.line(&format!("    FAILED {msg}"));
                            errors.push(msg);
                        }
                        for (def, v) in defs_for(n).iter().zip(values) {
                            samples
                                .entry((def.key.to_string(), mode.clone()))
                                .or_default()
                                .push(v);
                        }
                    }
                    Err(e) => {
                        let msg = format!("N={n} round {round} {mode}: {e:#}");
                        progress.line(&format!("    FAILED {msg}"));
                        errors.push(msg);
                    }
                }
                // Back to exactly the N leases (drops the agent's own lease and anything a
                // run changed), so every run starts from the same etcd state.
                etcd.delete_prefix(&format!("{ETCD_PREFIX}/subnets/"))?;
                etcd.put_many(&leases)?;
                for p in clean_node(&mut cluster.nodes[0], NETWORK) {
                    progress.line(&format!("    cleanup: {p}"));
                }
            }
        }
    }
    Ok((defs, samples))
}

enum Datapath {
    Map(PeerMap),
    Routes(String),
}

impl Datapath {
    fn count(&mut self) -> Result<usize> {
        match self {
            Datapath::Map(m) => m.count(),
            Datapath::Routes(ns) => count_vxlan_routes(ns),
        }
    }
}

/// One agent run; returns values in [`defs_for`] order, and what went wrong with lease
/// changes that never reached the datapath (the other values still stand).
fn one_run(
    cluster: &mut Cluster,
    etcd: &mut EtcdHttp,
    n: usize,
    mode: &str,
    settings: &Settings,
    progress: &Progress,
    notes: &mut Vec<String>,
) -> Result<(Vec<f64>, Option<String>)> {
    let changes = settings.changes;
    let endpoint = cluster.etcd_endpoint();
    let node = &cluster.nodes[0];
    // "vxlan-nexthop" / "ebpf-nexthop": the backend with --nexthop-objects.
    let (backend, nexthops) = match mode.strip_suffix("-nexthop") {
        Some(backend) => (backend, true),
        None => (mode, false),
    };
    let mut args = node.agent_args(&endpoint, backend);
    args.push(format!("--healthz-port={HEALTHZ_PORT}"));
    if nexthops {
        args.push("--nexthop-objects".to_string());
    }
    let start = Instant::now();
    let mut agent = BenchAgent::spawn(&node.ns, &args, AGENT_ENV)?;
    let pid = agent.pid();
    let ns_name = node.ns.name().to_string();
    let mut dp = match backend {
        "ebpf" => Datapath::Map(PeerMap::new(&node.pin_dir, Some(pid))),
        _ => Datapath::Routes(ns_name.clone()),
    };
    let limit = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
    let sync = time_first_sync(&mut agent, &mut dp, &node.ns, n, start, limit)?;
    let cpu_sync = process_cpu_seconds(pid)?;
    progress.line(&format!(
        "    {n} peers in the datapath {:.2} s after start (agent CPU {cpu_sync:.2} s)",
        sync.as_secs_f64()
    ));
    let routes_final = time_interim_routes_rewritten(&mut agent, &node.ns, start, limit)?;
    // More than one poll later: there were interim routes to rewrite.
    if routes_final > sync + Duration::from_millis(100) {
        progress.line(&format!(
            "    every route in its final form {:.2} s after start (interim routes rewritten while idle)",
            routes_final.as_secs_f64()
        ));
    }
    if !try_wait_until(Duration::from_secs(30), || {
        cluster.nodes[0].subnet_env().is_some()
    }) {
        bail!("no subnet file after 30 s");
    }

    // Idle: nothing changes in etcd; what the agent spends keeping n peers. After a settle
    // time, so the one-off work that follows a sync (the eBPF agent's next-hop lookups for
    // every peer) is not counted as idle.
    std::thread::sleep(SETTLE);
    let window = Duration::from_secs(settings.cpu_window_secs);
    let cpu_idle = cpu_percent_over(pid, window, || Ok(()))?;
    progress.line(&format!(
        "    idle for {window:?}: agent CPU {cpu_idle:.2}% of a core"
    ));

    // A re-list that changes nothing: etcd restarts, the agent's watch breaks, it lists
    // again and applies the same n peers.
    let metrics = |what: &str| -> Result<Metrics> { Metrics::fetch(&cluster.nodes[0].ns, what) };
    let before = metrics("before the etcd restart")?;
    cluster.etcd_mut().restart();
    *etcd = connect_etcd(cluster)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = Metrics::fetch(&cluster.nodes[0].ns, "after the etcd restart")?;
        if now.snapshots > before.snapshots {
            break now;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not list its peers again within 60 s of the etcd restart; log tail:\n{}",
                tail(&agent.log())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let relist_ms = after.last_snapshot_micros as f64 / 1e3;
    let relist_writes = (after.netlink_writes - before.netlink_writes) as f64;
    progress.line(&format!(
        "    re-list after an etcd restart: applied in {relist_ms:.1} ms with {relist_writes} netlink writes"
    ));

    let monitor = match backend {
        "ebpf" => None,
        _ => Some(RouteMonitor::start(&ns_name)?),
    };
    let mut lat_ms = Vec::new();
    let mut failures = Vec::new();
    let budget = Duration::from_secs(settings.change_budget_secs);
    let changes_start = Instant::now();
    for j in 0..(changes / 2) as u32 {
        if super::interrupted() {
            bail!("interrupted (Ctrl-C) after {} lease changes", lat_ms.len());
        }
        if changes_start.elapsed() > budget {
            let note = format!(
                "N={n} {mode}: only {} of {changes} lease changes measured within the {budget:?} budget ({:.0} ms per change on average)",
                lat_ms.len(),
                changes_start.elapsed().as_secs_f64() * 1e3 / lat_ms.len().max(1) as f64
            );
            progress.line(&format!("    {note}"));
            notes.push(note);
            break;
        }
        let (key, value) = lease(CHANGE_BASE + j);
        let s = subnet(CHANGE_BASE + j);
        for added in [true, false] {
            if let Some(m) = &monitor {
                m.drain();
            }
            let t0 = Instant::now();
            if added {
                etcd.put(&key, &value)?;
            } else {
                etcd.delete(&key)?;
            }
            let seen_at = match (&mut dp, &monitor) {
                (Datapath::Map(map), _) => poll_map(map, s, added),
                (_, Some(m)) => m.wait_for(&format!("{s}/24"), added, CHANGE_LIMIT),
                _ => unreachable!("vxlan runs with a route monitor"),
            };
            match seen_at {
                Ok(t) => lat_ms.push(t.duration_since(t0).as_secs_f64() * 1e3),
                Err(e) => failures.push(format!(
                    "{s}/24 {}: {e:#}",
                    if added { "add" } else { "removal" }
                )),
            }
        }
    }
    drop(monitor);

    // Churn: 10 lease changes per second (an add, then its removal), paced, not timed.
    let mut j = 0u32;
    let mut next = Instant::now();
    let cpu_churn = cpu_percent_over(pid, window, || {
        if Instant::now() >= next {
            let (key, value) = lease(CHURN_BASE + j / 2);
            if j.is_multiple_of(2) {
                etcd.put(&key, &value)?;
            } else {
                etcd.delete(&key)?;
            }
            j += 1;
            next += Duration::from_millis(100);
        }
        Ok(())
    })?;
    progress.line(&format!(
        "    {j} lease changes in {window:?}: agent CPU {cpu_churn:.2}% of a core"
    ));

    let rss = process_peak_rss(pid)? as f64 / (1024.0 * 1024.0);
    agent.signal(libc::SIGTERM);
    if !try_wait_until(Duration::from_secs(10), || !agent.is_running()) {
        agent.kill();
    }
    let lost = (!failures.is_empty()).then(|| {
        format!(
            "{} of {} timed lease changes did not reach the datapath within {CHANGE_LIMIT:?}, e.g. {}",
            failures.len(),
            failures.len() + lat_ms.len(),
            failures[0]
        )
    });
    let (p50, p99) = (percentile(&lat_ms, 0.5), percentile(&lat_ms, 0.99));
    progress.line(&format!(
        "    {} changes: p50 {p50:.2} ms, p99 {p99:.2} ms; peak RSS {rss:.1} MiB",
        lat_ms.len()
    ));
    Ok((
        vec![
            sync.as_secs_f64(),
            routes_final.as_secs_f64(),
            p50,
            p99,
            rss,
            cpu_sync,
            cpu_idle,
            cpu_churn,
            relist_ms,
            relist_writes,
        ],
        lost,
    ))
}

/// The v3 JSON gateway, reached from inside the fabric namespace (etcd listens on its
/// loopback too).
fn connect_etcd(cluster: &Cluster) -> Result<EtcdHttp> {
    let stream = cluster
        .fabric
        .enter(|| TcpStream::connect(("127.0.0.1", 2379)))
        .context("connect to etcd inside the fabric namespace")?;
    EtcdHttp::new(stream)
}

/// The agent's CPU over `window` as a percentage of one core, calling `tick` every 10 ms
/// meanwhile (to pace lease changes).
fn cpu_percent_over(
    pid: u32,
    window: Duration,
    mut tick: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let cpu_before = process_cpu_seconds(pid)?;
    let started = Instant::now();
    while started.elapsed() < window {
        tick()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = process_cpu_seconds(pid)? - cpu_before;
    Ok(cpu / started.elapsed().as_secs_f64() * 100.0)
}

/// The agent's work counters from its /metrics.
struct Metrics {
    netlink_writes: u64,
    snapshots: u64,
    last_snapshot_micros: u64,
    interim_routes: u64,
}

impl Metrics {
    fn fetch(ns: &overlay_tests::netns::NetNs, what: &str) -> Result<Metrics> {
        let text = ns
            .enter(|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect(("127.0.0.1", HEALTHZ_PORT))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok(text)
            })
            .with_context(|| format!("read the agent's /metrics {what}"))?;
        let value = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .with_context(|| format!("no {name} in the agent's /metrics {what}"))?
                .trim()
                .parse()
                .with_context(|| format!("{name} in the agent's /metrics {what}"))
        };
        Ok(Metrics {
            netlink_writes: value("overlay_netlink_writes_total")?,
            snapshots: value("overlay_peer_snapshots_applied_total")?,
            last_snapshot_micros: value("overlay_peer_snapshot_last_apply_microseconds")?,
            interim_routes: value("overlay_interim_routes")?,
        })
    }
}

/// How long after `start` all `n` peers were in the datapath. The agent counts a snapshot
/// (overlay_peer_snapshots_applied_total) once every peer in it is programmed: netlink has
/// answered and the maps are written. Polling that every 10 ms is cheap, where one probe of
/// 10,000 routes or map entries costs tens of milliseconds of CPU that the agent, on a
/// small machine, would miss, and the sleep between such probes blurs the figure by as
/// much. One probe then checks that all `n` are really there; if they are not, probing
/// decides, as it always did.
fn time_first_sync(
    agent: &mut BenchAgent,
    dp: &mut Datapath,
    ns: &overlay_tests::netns::NetNs,
    n: usize,
    start: Instant,
    limit: Duration,
) -> Result<Duration> {
    let mut stuck = |seen: usize| -> Result<()> {
        if super::interrupted() {
            bail!("interrupted (Ctrl-C) while waiting for {seen}/{n} peers");
        }
        if !agent.is_running() {
            bail!(
                "the agent exited with {seen}/{n} peers programmed; its log ends:\n{}",
                tail(&agent.log())
            );
        }
        if start.elapsed() > limit {
            bail!(
                "only {seen}/{n} peers in the datapath after {limit:?}; log tail:\n{}",
                tail(&agent.log())
            );
        }
        Ok(())
    };
    // Not served yet, or no snapshot yet: both mean "not synced".
    while !Metrics::fetch(ns, "during the first sync").is_ok_and(|m| m.snapshots > 0) {
        stuck(0)?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let reported = start.elapsed();
    let mut first_probe = true;
    loop {
        let probe_start = Instant::now();
        let seen = dp.count()?;
        if seen >= n {
            // The first probe agrees: the agent's report is the time. Otherwise that
            // snapshot was not all of them, and the probe that saw them all is.
            return Ok(if first_probe {
                reported
            } else {
                start.elapsed()
            });
        }
        first_probe = false;
        stuck(seen)?;
        std::thread::sleep((probe_start.elapsed() * 4).max(Duration::from_millis(20)));
    }
}

/// How long after `start` the agent had no interim route left (overlay_interim_routes: a
/// large sync writes flannel's routes through nexthop objects first and rewrites them while
/// idle); the idle and change figures are taken only after that. Polled every 50 ms.
fn time_interim_routes_rewritten(
    agent: &mut BenchAgent,
    ns: &overlay_tests::netns::NetNs,
    start: Instant,
    limit: Duration,
) -> Result<Duration> {
    loop {
        let m = Metrics::fetch(ns, "while interim routes are rewritten")?;
        if m.interim_routes == 0 {
            return Ok(start.elapsed());
        }
        if !agent.is_running() || start.elapsed() > limit {
            bail!(
                "{} routes still interim {:?} after start (agent running: {}); log tail:\n{}",
                m.interim_routes,
                start.elapsed(),
                agent.is_running(),
                tail(&agent.log())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the map every 100 us until `subnet` is present (or absent); when it changed.
fn poll_map(map: &mut PeerMap, subnet: Ipv4Addr, present: bool) -> Result<Instant> {
    let deadline = Instant::now() + CHANGE_LIMIT;
    loop {
        if map.has(subnet, 24)? == present {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("PEERS map did not change within {CHANGE_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_in_flannel_format() {
        assert_eq!(subnet(1), Ipv4Addr::new(10, 0, 1, 0));
        assert_eq!(subnet(10_000), Ipv4Addr::new(10, 39, 16, 0));
        let (k, v) = lease(258);
        assert_eq!(k, "/coreos.com/network/subnets/10.1.2.0-24");
        let j: serde_json::Value = serde_json::from_str(&v).expect("json");
        assert_eq!(j["PublicIP"], "172.16.1.2");
        assert_eq!(j["BackendType"], "vxlan");
        assert_eq!(j["BackendData"]["VtepMAC"], "0a:58:00:00:01:02");
    }
}
