//! SCRATCH (not committed): hand-programmed topology to validate measurement + reporting.
use super::*;
use overlay_tests::topology::{Cluster, ClusterOptions, UnderlayKind};

fn program(c: &mut Cluster, mode: &str) {
    let ips: Vec<String> = c.nodes.iter().map(|n| n.ip.to_string()).collect();
    let mut macs = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let me = i + 1;
        let other = 3 - me;
        if mode == "host-gw" {
            n.ns.run(&[
                "ip",
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &ips[other - 1],
                "dev",
                "eth0",
            ]);
        } else {
            n.ns.run(&[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &ips[i],
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ]);
            n.ns.run(&["ip", "link", "set", "flannel.1", "mtu", "1450", "up"]);
            n.ns.run(&[
                "ip",
                "addr",
                "add",
                &format!("10.244.{me}.0/32"),
                "dev",
                "flannel.1",
            ]);
            let mac =
                n.ns.stdout(&["cat", "/sys/class/net/flannel.1/address"])
                    .trim()
                    .to_string();
            macs.push(mac);
        }
    }
    if mode == "vxlan" {
        for (i, n) in c.nodes.iter().enumerate() {
            let other = 2 - i; // 1-based index of the other node
            n.ns.run(&[
                "ip",
                "neigh",
                "add",
                &format!("10.244.{other}.0"),
                "lladdr",
                &macs[other - 1],
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ]);
            n.ns.run(&[
                "bridge",
                "fdb",
                "append",
                &macs[other - 1],
                "dev",
                "flannel.1",
                "dst",
                &ips[other - 1],
                "self",
                "permanent",
            ]);
            n.ns.run(&[
                "ip",
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &format!("10.244.{other}.0"),
                "dev",
                "flannel.1",
                "onlink",
            ]);
        }
    }
}

pub fn run(out: &std::path::Path) -> Result<()> {
    if std::env::var("SCRATCH_MAP").is_ok() {
        return map_check();
    }
    let progress = Progress {
        start: Instant::now(),
    };
    let mut c = Cluster::with(ClusterOptions {
        nodes: 2,
        underlay: UnderlayKind::DirectVeth,
        underlay_mtu: 1500,
        etcd: true,
    });
    let modes: Vec<String> = vec!["host-gw".into(), "vxlan".into()];
    let settings = measure::Settings {
        seconds: 2.0,
        paced_gbit: 2.0,
    };
    let mut samples = Samples::new();
    let mut errors = Vec::new();
    for round in 1..=2 {
        for mode in &modes {
            progress.line(&format!("round {round} {mode} (hand-programmed)"));
            program(&mut c, mode);
            let mtu = if mode == "vxlan" { 1450 } else { 1500 };
            let a = c.nodes[0]
                .add_pod("10.244.1.1/24", mtu)
                .ns
                .name()
                .to_string();
            let (b, bip) = {
                let p = c.nodes[1].add_pod("10.244.2.1/24", mtu);
                (p.ns.name().to_string(), p.ip)
            };
            overlay_tests::wait_until(std::time::Duration::from_secs(10), "ping", || {
                c.nodes[0].pods[0].ping_once(bip)
            });
            let scope_ns = vec![a.clone(), b.clone(), c.nodes[0].ns.name().to_string(), c.nodes[1].ns.name().to_string()];
            let pair = measure::PodPair { client_ns: a, server_ns: b, server_ip: bip, scope_ns };
            for (k, v) in measure::measure_mode(&pair, &settings, &progress, &mut errors) {
                samples
                    .entry((k.to_string(), mode.clone()))
                    .or_default()
                    .push(v);
            }
            for n in &mut c.nodes {
                for p in lab::clean_node(n, lab::POD_NETWORK) {
                    progress.line(&p);
                }
            }
        }
    }
    // etcd gateway + route monitor checks
    let stream = c
        .fabric
        .enter(|| std::net::TcpStream::connect(("127.0.0.1", 2379)))?;
    let mut e = etcd_http::EtcdHttp::new(stream)?;
    let kvs: Vec<(String, String)> = (0..300)
        .map(|i| (format!("/x/{i}"), format!("v{i}")))
        .collect();
    let t = Instant::now();
    e.put_many(&kvs)?;
    progress.line(&format!(
        "put_many 300 in {:?}; etcdctl sees {} keys",
        t.elapsed(),
        c.etcd().keys("/x/").len()
    ));
    let t = Instant::now();
    e.put("/y", "z")?;
    progress.line(&format!(
        "single put {:?} -> {:?}",
        t.elapsed(),
        c.etcd().get("/y")
    ));
    e.delete("/y")?;
    progress.line(&format!("after delete -> {:?}", c.etcd().get("/y")));
    let n = &c.nodes[0];
    n.ns.run(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.168.100.1",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    n.ns.run(&["ip", "link", "set", "flannel.1", "up"]);
    let m = probe::RouteMonitor::start(n.ns.name())?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t0 = Instant::now();
    n.ns.run(&[
        "ip",
        "route",
        "add",
        "10.9.9.0/24",
        "via",
        "10.9.9.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    let t = m.wait_for("10.9.9.0/24", true, std::time::Duration::from_secs(5))?;
    progress.line(&format!(
        "monitor add seen {:?} after t0; count={}",
        t - t0,
        probe::count_vxlan_routes(n.ns.name())?
    ));
    let t0 = Instant::now();
    n.ns.run(&["ip", "route", "del", "10.9.9.0/24"]);
    let t = m.wait_for("10.9.9.0/24", false, std::time::Duration::from_secs(5))?;
    progress.line(&format!(
        "monitor del seen {:?}; count={}",
        t - t0,
        probe::count_vxlan_routes(n.ns.name())?
    ));
    let metrics = report::summarize(measure::METRICS, &modes, &samples, &[("vxlan", "host-gw")]);
    let r = Results {
        kind: "datapath (SCRATCH hand-programmed)".into(),
        started_utc: utc_now(),
        finished_utc: utc_now(),
        quick: false,
        host: Host::probe(),
        settings: serde_json::json!({"seconds": 2}),
        modes,
        metrics,
        errors,
    };
    report::write_all(&r, out)?;
    println!("{}", report::terminal_table(&r));
    Ok(())
}

fn map_check() -> Result<()> {
    let dir = std::path::Path::new("/sys/fs/bpf/scratch-bench");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("sub"))?;
    let p = dir.join("sub/OVL_PEERS");
    let ps = p.to_str().unwrap();
    let sh = |a: &[&str]| {
        let o = std::process::Command::new("bpftool")
            .args(a)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{a:?} {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let mut m = probe::PeerMap::new(dir);
    println!(
        "before pin: count={} has={}",
        m.count()?,
        m.has("10.0.1.0".parse()?, 24)?
    );
    sh(&[
        "map",
        "create",
        ps,
        "type",
        "lpm_trie",
        "key",
        "8",
        "value",
        "16",
        "entries",
        "100",
        "name",
        "OVL_PEERS",
        "flags",
        "1",
    ]);
    for (third, flags) in [("1", "1"), ("2", "1"), ("3", "0")] {
        sh(&[
            "map", "update", "pinned", ps, "key", "24", "0", "0", "0", "10", "0", third, "0",
            "value", "172", "16", "0", third, "10", "0", "0", "0", "0", "1", flags, "0", "0", "0",
            "0", "0",
        ]);
    }
    let mut m = probe::PeerMap::new(dir);
    println!(
        "count={} (want 2) has1={} has3={} (invalid) has9={}",
        m.count()?,
        m.has("10.0.1.0".parse()?, 24)?,
        m.has("10.0.3.0".parse()?, 24)?,
        m.has("10.0.9.0".parse()?, 24)?
    );
    sh(&[
        "map", "delete", "pinned", ps, "key", "24", "0", "0", "0", "10", "0", "1", "0",
    ]);
    println!(
        "after delete: count={} has1={}",
        m.count()?,
        m.has("10.0.1.0".parse()?, 24)?
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
