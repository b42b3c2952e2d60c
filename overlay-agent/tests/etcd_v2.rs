//! The etcd v2 keyspace, as the seeds' clusters and flanneld <= v0.17 use it, against a real
//! etcd 3.4 started with `--enable-v2=true` and written with `ETCDCTL_API=2 etcdctl`:
//! the agent with the seeds' flags only, old leases without VNI, removals and expiry, etcd
//! restarts and outdated watch indexes (401), TLS, `--etcd-api=auto`'s three cases, the
//! operator subcommands and `migrate-etcd`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use common::{
    Etcd, LONG, Recorded, RecordingDataplane, SEEDS_CONFIG, SEEDS_PREFIX, Tls, mac, mtls_opts,
    next_event, opts, run_cli, seed_flags, spawn_agent, vxlan_lease, wait_until,
};
use ipnetwork::Ipv4Network;
use overlay_agent::{
    agent::{self, NodeSetup},
    control::config::NetworkConfig,
    control::etcd::EtcdOptions,
    control::lease::{LEASE_TTL, Lessor},
    control::store::{self, EtcdApi, EtcdApiChoice, KvStore, V2Client},
    control::watch::PeerWatcher,
    dataplane::LeaseAttrs,
    observe::status::AgentStatus,
    peer::{LeaseBackend, Peer, PeerEvent},
};
use tokio::sync::{mpsc, watch};

/// A lease as flanneld 0.7 wrote it: no PublicIPv6, no VNI.
fn old_lease(ip: &str, m: &str) -> String {
    format!(r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VtepMAC":"{m}"}}}}"#)
}

/// `ETCDCTL_API=2 etcdctl -o extended get KEY`: (value, TTL).
fn v2_get_with_ttl(etcd: &Etcd, key: &str) -> Option<(String, i64)> {
    let out = etcd.v2_output(&["-o", "extended", "get", key]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ttl = text
        .lines()
        .find_map(|l| l.strip_prefix("TTL: "))
        .map(|t| t.trim().parse::<i64>().unwrap())
        .unwrap_or(0);
    // etcdctl prints the header lines, a blank line, then the value.
    let value = text.split("\n\n").nth(1).unwrap_or("").trim().to_string();
    Some((value, ttl))
}

/// v3 keys under `prefix`.
fn v3_keys(etcd: &Etcd, prefix: &str) -> Vec<String> {
    etcd.v3(&["get", "--prefix", "--keys-only", "--", prefix])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn recorded_peers(log: &common::RecordLog) -> Vec<Recorded> {
    log.lock().unwrap().clone()
}

/// What the dataplane was told to hold (the latest snapshot plus the events since), and
/// every subnet it held at some point. A re-list (which the watcher may do at any time,
/// e.g. after a broken long poll) hands over a change as part of a snapshot instead of as
/// an event; both must count.
fn dataplane_peers(log: &common::RecordLog) -> (BTreeMap<Ipv4Network, Peer>, Vec<Ipv4Network>) {
    let mut held: BTreeMap<Ipv4Network, Peer> = BTreeMap::new();
    let mut ever: Vec<Ipv4Network> = Vec::new();
    for recorded in recorded_peers(log) {
        let Recorded::Applied(event) = recorded else {
            continue;
        };
        match event {
            PeerEvent::Snapshot(peers) => {
                held = peers.into_iter().map(|p| (p.subnet, p)).collect();
            }
            PeerEvent::Upsert(peer) => {
                held.insert(peer.subnet, peer);
            }
            PeerEvent::Remove(subnet) => {
                held.remove(&subnet);
            }
        }
        for subnet in held.keys() {
            if !ever.contains(subnet) {
                ever.push(*subnet);
            }
        }
    }
    (held, ever)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flags_on_a_v2_cluster_take_a_v2_lease_and_follow_flanneld_0_7_peers() {
    let _logs = common::LogsOnFailure::install();
    let etcd = Etcd::start_v2();
    // The seeds' setup: config with `etcdctl mk`, a flanneld 0.7 node's lease by hand.
    etcd.v2(&["mk", &format!("{SEEDS_PREFIX}/config"), SEEDS_CONFIG]);
    let old_peer_key = format!("{SEEDS_PREFIX}/subnets/172.30.9.0-24");
    etcd.v2(&[
        "set",
        "--ttl",
        "86400",
        &old_peer_key,
        &old_lease("192.168.64.9", "c6:d2:32:6f:8f:09"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let flags = seed_flags(&etcd.endpoint, SEEDS_PREFIX, &subnet_file);
    assert_eq!(flags.etcd_api, EtcdApiChoice::Auto, "the default");
    let opts = flags.etcd_options();

    let mut store = store::connect_store(&opts, flags.etcd_api)
        .await
        .unwrap()
        .expect("auto finds the v2 config");
    assert_eq!(store.api(), EtcdApi::V2);
    let (_never, mut no_stop) = watch::channel(false);
    let config = agent::wait_for_config(&mut store, &opts, &mut no_stop)
        .await
        .unwrap();
    assert_eq!(config.backend.vni, 1);
    let (dp, _rx) = RecordingDataplane::new();
    let log = dp.log.clone();
    let public_ip = Ipv4Addr::new(192, 168, 64, 3);
    let setup = NodeSetup {
        dataplane: dp,
        attrs: LeaseAttrs::Vxlan {
            vni: config.backend.vni,
            vtep_mac: mac(0x44),
        },
        public_ip,
        pod_mtu: agent::pod_mtu(&config, 1500),
    };
    let (status_tx, mut status_rx) = watch::channel(AgentStatus::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = agent::run_node(&flags, store, config, setup, LEASE_TTL, status_tx, stop_rx);
    let old_peer = Peer {
        subnet: "172.30.9.0/24".parse().unwrap(),
        public_ip: Ipv4Addr::new(192, 168, 64, 9),
        vtep_mac: Some(mac(0x09)),
    };
    let test = async {
        wait_until(LONG, "READY", || {
            let r = status_rx.borrow_and_update().ready;
            async move { r }
        })
        .await;
        let status = status_rx.borrow().clone();
        assert_eq!(status.etcd.api, "v2", "the choice is in /status");
        let subnet: Ipv4Network = status.node.subnet.parse().unwrap();

        // Our lease: a v2 key with flannel's JSON and a ~24 h TTL; nothing in v3.
        let key = format!("{SEEDS_PREFIX}/subnets/{}-24", subnet.ip());
        let (value, ttl) = v2_get_with_ttl(&etcd, &key).expect("our lease is a v2 key");
        assert_eq!(value, vxlan_lease("192.168.64.3", "c6:d2:32:6f:8f:44"));
        assert!((86_000..=86_400).contains(&ttl), "TTL {ttl}");
        assert!(v3_keys(&etcd, SEEDS_PREFIX).is_empty(), "nothing in v3");

        // The flanneld 0.7 node (no VNI in its lease) is a peer: the config's VNI 1 is the
        // one the device uses for it.
        wait_until(LONG, "the old peer in the first snapshot", || {
            let got = recorded_peers(&log).contains(&Recorded::Applied(PeerEvent::Snapshot(vec![
                old_peer.clone(),
            ])));
            async move { got }
        })
        .await;

        // Subnets for the peers written by hand below: not ours, which the agent picked at
        // random among the free ones (a fixed pick collided now and then: a lease written on
        // our own key is no peer, and the test waited for it in vain).
        let mut free = (10u8..=12).filter(|n| subnet.ip().octets()[2] != *n);
        let (new_n, short_n) = (free.next().unwrap(), free.next().unwrap());
        // A new peer by hand, then its removal with `etcdctl rm`.
        let new_key = format!("{SEEDS_PREFIX}/subnets/172.30.{new_n}.0-24");
        etcd.v2(&[
            "set",
            "--ttl",
            "600",
            &new_key,
            &old_lease("192.168.64.10", "c6:d2:32:6f:8f:10"),
        ]);
        let new_peer = Peer {
            subnet: format!("172.30.{new_n}.0/24").parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 64, 10),
            vtep_mac: Some(mac(0x10)),
        };
        wait_until(LONG, "the new peer in the dataplane", || {
            let got = dataplane_peers(&log).0.get(&new_peer.subnet) == Some(&new_peer);
            async move { got }
        })
        .await;
        etcd.v2(&["rm", &old_peer_key]);
        wait_until(LONG, "the deleted peer gone from the dataplane", || {
            let got = !dataplane_peers(&log).0.contains_key(&old_peer.subnet);
            async move { got }
        })
        .await;
        // A lease that expires (action "expire") is a removal too.
        etcd.v2(&[
            "set",
            "--ttl",
            "600",
            &new_key,
            &old_lease("192.168.64.10", "c6:d2:32:6f:8f:10"),
        ]);
        let short_key = format!("{SEEDS_PREFIX}/subnets/172.30.{short_n}.0-24");
        etcd.v2(&[
            "set",
            "--ttl",
            "2",
            &short_key,
            &old_lease("192.168.64.11", "c6:d2:32:6f:8f:11"),
        ]);
        let short: Ipv4Network = format!("172.30.{short_n}.0/24").parse().unwrap();
        wait_until(
            LONG,
            "the expiring peer in the dataplane, then gone",
            || {
                let (held, ever) = dataplane_peers(&log);
                let got = ever.contains(&short) && !held.contains_key(&short);
                async move { got }
            },
        )
        .await;
        let peers: Vec<String> = status_rx
            .borrow()
            .peers
            .iter()
            .map(|p| p.subnet.clone())
            .collect();
        assert_eq!(peers, vec![format!("172.30.{new_n}.0/24")]);
        stop_tx.send_replace(true);
        key
    };
    let (result, key) = tokio::join!(node, test);
    result.expect("the node stops cleanly");
    assert!(
        v2_get_with_ttl(&etcd, &key).is_some(),
        "the lease survives a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_leases_are_renewed_and_re_acquired_when_deleted() {
    let etcd = Etcd::start_v2();
    let o = opts(&etcd.endpoint, "/renew");
    let mut c = V2Client::connect(&o).await.unwrap();
    c.put(
        "/renew/config",
        r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .await
    .unwrap();
    let config = NetworkConfig::parse(r#"{"Network":"10.7.0.0/16"}"#).unwrap();
    let attrs = LeaseAttrs::Vxlan {
        vni: 1,
        vtep_mac: mac(0x21),
    };
    let mut lessor = Lessor::new(
        c.clone(),
        o.clone(),
        config,
        Ipv4Addr::new(10, 1, 1, 21),
        attrs,
    )
    .with_ttl(Duration::from_secs(4));
    let held = lessor.acquire(None).await.unwrap();
    let key = format!(
        "/renew/subnets/{}-{}",
        held.subnet.ip(),
        held.subnet.prefix()
    );
    let (_, ttl) = v2_get_with_ttl(&etcd, &key).expect("created with prevExist=false");
    assert!((1..=4).contains(&ttl), "TTL {ttl}");
    // Creating it again must fail: prevExist=false.
    let mut other = c.clone();
    assert_eq!(
        other
            .create(&key, "x", Duration::from_secs(5))
            .await
            .unwrap(),
        None,
        "create-if-absent refuses an existing key"
    );

    let (held_tx, mut held_rx) = watch::channel(held.clone());
    let keeper = tokio::spawn(lessor.keep(held.clone(), Duration::from_secs(3600), held_tx));
    // Renewed every TTL/2: still there well past its first TTL.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (value, _) = v2_get_with_ttl(&etcd, &key).expect("renewal keeps the key");
    assert!(value.contains("c6:d2:32:6f:8f:21"), "{value}");
    // Deleted by hand: taken back (the same subnet, still free).
    etcd.v2(&["rm", &key]);
    tokio::time::timeout(LONG, held_rx.changed())
        .await
        .expect("re-acquired in time")
        .unwrap();
    assert_eq!(held_rx.borrow().subnet, held.subnet);
    assert!(v2_get_with_ttl(&etcd, &key).is_some());
    keeper.abort();
}

/// Applies peer events to a map, as the dataplane would.
fn apply(state: &mut BTreeMap<Ipv4Network, Peer>, event: &PeerEvent) {
    match event {
        PeerEvent::Upsert(p) => {
            state.insert(p.subnet, p.clone());
        }
        PeerEvent::Remove(s) => {
            state.remove(s);
        }
        PeerEvent::Snapshot(all) => {
            *state = all.iter().map(|p| (p.subnet, p.clone())).collect();
        }
    }
}

fn peer(n: u8) -> Peer {
    Peer {
        subnet: format!("10.5.{n}.0/24").parse().unwrap(),
        public_ip: Ipv4Addr::new(192, 168, 1, n),
        vtep_mac: Some(mac(n)),
    }
}

async fn put_peer(c: &mut V2Client, n: u8) {
    c.put(
        &format!("/relist/subnets/10.5.{n}.0-24"),
        &old_lease(
            &format!("192.168.1.{n}"),
            &overlay_agent::control::lease::format_mac(&mac(n)),
        ),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_watch_index_and_an_etcd_restart_recover_by_listing_again() {
    let mut etcd = Etcd::start_v2();
    let o = opts(&etcd.endpoint, "/relist");
    let mut c = V2Client::connect(&o).await.unwrap();
    put_peer(&mut c, 2).await;
    let (_own_tx, own_rx) = watch::channel::<Ipv4Network>("10.5.1.0/24".parse().unwrap());
    // Room for one event: the watcher stalls on the second, holding its watch index.
    let (tx, mut rx) = mpsc::channel(1);
    let watcher = tokio::spawn(
        PeerWatcher::new(
            V2Client::connect(&o).await.unwrap(),
            o.clone(),
            overlay_agent::control::watch::PeerRules {
                backend: LeaseBackend::Vxlan,
                network: "10.5.0.0/16".parse().unwrap(),
                own_public_ip: "192.168.1.1".parse().unwrap(),
            },
            own_rx,
            tx,
        )
        .run(),
    );
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![peer(2)])
    );

    // 401: two changes fill the channel; then 1100 writes elsewhere push the watcher's next
    // index out of etcd's 1000-event history.
    put_peer(&mut c, 3).await;
    put_peer(&mut c, 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for i in 0..1100 {
        c.put(&format!("/flood/{}", i % 10), &i.to_string())
            .await
            .unwrap();
    }
    put_peer(&mut c, 5).await;
    assert_eq!(next_event(&mut rx).await, PeerEvent::Upsert(peer(3)));
    assert_eq!(next_event(&mut rx).await, PeerEvent::Upsert(peer(4)));
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![peer(2), peer(3), peer(4), peer(5)]),
        "after 'event index cleared' the watcher lists again"
    );

    // etcd restarts (same data); changes made after it are applied.
    etcd.restart();
    let mut c = V2Client::connect(&o).await.unwrap();
    c.delete("/relist/subnets/10.5.2.0-24").await.unwrap();
    put_peer(&mut c, 6).await;
    let want: BTreeMap<Ipv4Network, Peer> = [3, 4, 5, 6]
        .into_iter()
        .map(|n| (peer(n).subnet, peer(n)))
        .collect();
    let mut state: BTreeMap<Ipv4Network, Peer> = [2, 3, 4, 5]
        .into_iter()
        .map(|n| (peer(n).subnet, peer(n)))
        .collect();
    let mut snapshots = 0;
    while state != want {
        let event = next_event(&mut rx).await;
        snapshots += matches!(event, PeerEvent::Snapshot(_)) as u32;
        apply(&mut state, &event);
    }
    assert!(
        snapshots >= 1,
        "the broken watch was replaced by a fresh listing"
    );
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_over_mutual_tls_works_and_a_foreign_certificate_fails_clearly() {
    let tls = Tls::generate();
    let etcd = Etcd::start_tls_with(&tls, true);
    let good = mtls_opts(&etcd.endpoint, "/tls", &tls);
    assert!(etcd.endpoint.starts_with("https://"));
    let mut c = V2Client::connect(&good).await.expect("mTLS accepted");
    c.put("/tls/config", r#"{"Network":"10.8.0.0/16"}"#)
        .await
        .unwrap();
    assert!(
        c.create(
            "/tls/subnets/10.8.1.0-24",
            &vxlan_lease("10.0.0.1", "c6:d2:32:6f:8f:01"),
            Duration::from_secs(60)
        )
        .await
        .unwrap()
        .is_some()
    );
    // Written through TLS, visible to etcdctl v2.
    assert!(
        etcd.v2(&["get", "/tls/subnets/10.8.1.0-24"])
            .contains("10.0.0.1")
    );
    // auto finds the config in v2 over TLS.
    let store = store::connect_store(&good, EtcdApiChoice::Auto)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.api(), EtcdApi::V2);

    let rogue = EtcdOptions {
        certfile: Some(tls.path("rogue-client.pem")),
        keyfile: Some(tls.path("rogue-client.key")),
        ..good.clone()
    };
    let err = V2Client::connect(&rogue)
        .await
        .expect_err("foreign client certificate");
    let msg = err.to_string();
    assert!(
        msg.contains(&etcd.endpoint)
            && msg.contains("certificate")
            && msg.contains("--etcd-certfile"),
        "{msg}"
    );
    let wrong_ca = EtcdOptions {
        cafile: Some(tls.path("rogue-ca.pem")),
        ..good.clone()
    };
    let msg = V2Client::connect(&wrong_ca)
        .await
        .expect_err("wrong CA")
        .to_string();
    assert!(
        msg.contains("TLS handshake")
            && msg.contains("UnknownIssuer")
            && msg.contains("--etcd-cafile"),
        "{msg}"
    );
}

/// Runs the agent binary with the seeds' flags on an interface that does not exist: it
/// chooses the etcd API, reads the config, then stops at the interface. Returns its log
/// (panics, with the log, when it does not stop within 20 s).
fn agent_log_until_exit(endpoint: &str, prefix: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    let mut child = spawn_agent(
        &[
            &format!("-etcd-endpoints={endpoint}"),
            &format!("-etcd-prefix={prefix}"),
            "-iface=ovl-none0",
            &format!("-subnet-file={}", dir.path().join("subnet.env").display()),
        ],
        &log_path,
    );
    let status = child.wait_exit(LONG);
    drop(child);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("the agent did not stop at the interface:\n{log}"));
    assert!(!status.success(), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_chooses_v3_v2_or_v3_with_a_split_warning() {
    let etcd = Etcd::start_v2();
    let config = r#"{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}"#;
    etcd.v3(&["put", "/only3/config", config]);
    etcd.v2(&["mk", "/only2/config", config]);
    etcd.v3(&["put", "/both/config", config]);
    etcd.v2(&["mk", "/both/config", config]);

    let run =
        |prefix: &str| tokio::task::block_in_place(|| agent_log_until_exit(&etcd.endpoint, prefix));
    let log = run("/only3");
    assert!(
        log.contains("etcd API v3 chosen") && !log.contains("split"),
        "{log}"
    );
    assert!(log.contains("network config loaded"), "{log}");

    let log = run("/only2");
    assert!(
        log.contains("etcd API v2 chosen") && !log.contains("split"),
        "{log}"
    );
    assert!(log.contains("network config loaded"), "{log}");

    let log = run("/both");
    assert!(
        log.contains("etcd API v3 chosen") && log.contains("the cluster is split"),
        "{log}"
    );

    // Neither: it waits and names the key it looked for in both keyspaces.
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    let _child = spawn_agent(
        &[
            &format!("-etcd-endpoints={}", etcd.endpoint),
            "-etcd-prefix=/none",
            "-iface=ovl-none0",
        ],
        &log_path,
    );
    wait_until(LONG, "the line naming both keyspaces", || {
        let t = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move {
            t.contains("no network config at /none/config in either etcd keyspace")
                && t.contains("v3 keyspace: absent")
                && t.contains("v2 keyspace: absent")
        }
    })
    .await;
    // Explicit choices skip the detection.
    let (ok, out, err) = run_cli(&[
        &format!("-etcd-endpoints={}", etcd.endpoint),
        "-etcd-prefix=/both",
        "--etcd-api=v2",
        "config",
        "show",
    ]);
    assert!(
        ok && out.contains("10.6.0.0/16") && !err.contains("split"),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommands_work_on_v2_and_migration_copies_exactly_once_and_refuses_conflicts() {
    let etcd = Etcd::start_v2();
    let ep = format!("-etcd-endpoints={}", etcd.endpoint);
    let cli = |args: &[&str]| {
        let mut all = vec![ep.as_str(), "-etcd-prefix=/mig"];
        all.extend_from_slice(args);
        run_cli(&all)
    };
    // config set into v2 (explicitly), show / leases / release with auto.
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    let (ok, out, err) = cli(&["--etcd-api=v2", "config", "set", config]);
    assert!(ok && out.contains("etcd v2 keyspace"), "{out}{err}");
    assert_eq!(etcd.v2(&["get", "/mig/config"]).trim(), config);
    assert!(v3_keys(&etcd, "/mig").is_empty());
    let (ok, out, err) = cli(&["config", "show"]);
    assert!(
        ok && out.contains(r#""SubnetMin":"10.5.1.0""#),
        "{out}{err}"
    );

    let one = old_lease("192.168.1.1", "c6:d2:32:6f:8f:01");
    let two = vxlan_lease("192.168.1.2", "c6:d2:32:6f:8f:02");
    etcd.v2(&["set", "--ttl", "3600", "/mig/subnets/10.5.1.0-24", &one]);
    etcd.v2(&["set", "--ttl", "7200", "/mig/subnets/10.5.2.0-24", &two]);
    let (ok, out, err) = cli(&["leases"]);
    assert!(ok, "{err}");
    assert!(out.contains("2 lease(s)"), "{out}");
    for (subnet, ttl) in [("10.5.1.0/24", 3600), ("10.5.2.0/24", 7200)] {
        let line = out.lines().find(|l| l.starts_with(subnet)).expect(subnet);
        let expires = line.split_whitespace().last().unwrap();
        let (h, rest) = expires.split_once('h').unwrap();
        let (m, rest) = rest.split_once('m').unwrap();
        let secs: i64 = h.parse::<i64>().unwrap() * 3600
            + m.parse::<i64>().unwrap() * 60
            + rest.trim_end_matches('s').parse::<i64>().unwrap();
        assert!(secs <= ttl && secs > ttl - 60, "{line}: the v2 key's TTL");
    }
    // `status` (no agent running) reads etcd and says which keyspace.
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = format!("-subnet-file={}", dir.path().join("subnet.env").display());
    let (ok, out, err) = cli(&[&subnet_file, "status"]);
    assert!(ok && out.contains("etcd      api v2"), "{out}{err}");
    etcd.v2(&[
        "set",
        "--ttl",
        "60",
        "/mig/subnets/10.5.3.0-24",
        &vxlan_lease("192.168.1.3", "c6:d2:32:6f:8f:03"),
    ]);
    let (ok, out, err) = cli(&["lease", "release", "10.5.3.0/24"]);
    assert!(ok && out.contains("released 10.5.3.0/24"), "{out}{err}");
    assert!(
        !etcd
            .v2_output(&["get", "/mig/subnets/10.5.3.0-24"])
            .status
            .success()
    );

    // Dry run: the plan, nothing written.
    let (ok, out, err) = cli(&["migrate-etcd", "--from", "v2", "--to", "v3"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("dry run") && out.contains("3 key(s) to write"),
        "{out}"
    );
    assert!(
        v3_keys(&etcd, "/mig").is_empty(),
        "a dry run writes nothing"
    );

    // --apply: exact values, leases with their remaining TTL.
    let (ok, out, err) = cli(&["migrate-etcd", "--from", "v2", "--to", "v3", "--apply"]);
    assert!(ok && out.contains("3 key(s) written"), "{out}{err}");
    let mut c = common::client(&etcd.endpoint).await;
    let value = |kv: &etcd_client::KeyValue| kv.value_str().unwrap().to_string();
    let got = c.get("/mig/config", None).await.unwrap();
    assert_eq!(value(&got.kvs()[0]), config);
    assert_eq!(got.kvs()[0].lease(), 0, "the config has no TTL");
    for (key, want, max) in [
        ("/mig/subnets/10.5.1.0-24", &one, 3600),
        ("/mig/subnets/10.5.2.0-24", &two, 7200),
    ] {
        let got = c.get(key, None).await.unwrap();
        let kv = &got.kvs()[0];
        assert_eq!(&value(kv), want, "{key} copied byte for byte");
        let ttl = c.lease_time_to_live(kv.lease(), None).await.unwrap().ttl();
        assert!(
            ttl <= max && ttl > max - 120,
            "{key}: remaining TTL {ttl} (of {max})"
        );
    }
    assert_eq!(v3_keys(&etcd, "/mig").len(), 3);

    // Idempotent.
    let (ok, out, err) = cli(&["migrate-etcd", "--from", "v2", "--to", "v3", "--apply"]);
    assert!(
        ok && out.contains("0 key(s) written, 3 already there"),
        "{out}{err}"
    );

    // Now both keyspaces hold a config: auto uses v3 and warns.
    let (ok, out, err) = cli(&["leases"]);
    assert!(
        ok && out.contains("etcd v3 keyspace") && err.contains("the cluster is split"),
        "{out}{err}"
    );

    // Different data in the target: refused, and nothing else written either.
    c.put(
        "/mig/subnets/10.5.2.0-24",
        vxlan_lease("192.168.1.99", "c6:d2:32:6f:8f:99"),
        None,
    )
    .await
    .unwrap();
    etcd.v2(&[
        "set",
        "--ttl",
        "600",
        "/mig/subnets/10.5.4.0-24",
        &vxlan_lease("192.168.1.4", "c6:d2:32:6f:8f:04"),
    ]);
    let (ok, out, err) = cli(&["migrate-etcd", "--from", "v2", "--to", "v3", "--apply"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("different data") && err.contains("/mig/subnets/10.5.2.0-24"),
        "{err}"
    );
    assert!(
        c.get("/mig/subnets/10.5.4.0-24", None)
            .await
            .unwrap()
            .kvs()
            .is_empty(),
        "a refused migration writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_basic_auth_works_and_a_wrong_password_fails_clearly() {
    let etcd = Etcd::start_v2();
    etcd.v2(&["mk", "/auth/config", r#"{"Network":"10.4.0.0/16"}"#]);
    // v2 auth: a root user, then auth on (etcdctl v2 reads the password from the argument).
    etcd.v2(&["user", "add", "root:s3cret"]);
    etcd.v2(&["auth", "enable"]);
    let good = EtcdOptions {
        username: Some("root".into()),
        password: Some("s3cret".into()),
        ..opts(&etcd.endpoint, "/auth")
    };
    let mut c = V2Client::connect(&good)
        .await
        .expect("user/password accepted");
    assert!(
        c.create(
            "/auth/subnets/10.4.1.0-24",
            &vxlan_lease("10.0.0.1", "c6:d2:32:6f:8f:01"),
            Duration::from_secs(60)
        )
        .await
        .unwrap()
        .is_some()
    );
    let (kvs, _) = c.list("/auth/subnets/").await.unwrap();
    assert_eq!(kvs.len(), 1);
    let bad = EtcdOptions {
        password: Some("wrong".into()),
        ..good.clone()
    };
    let msg = V2Client::connect(&bad)
        .await
        .expect_err("wrong password")
        .to_string();
    assert!(
        msg.contains("--etcd-username") && msg.contains("--etcd-password"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_uses_the_endpoints_that_answer() {
    let etcd = Etcd::start_v2();
    etcd.v2(&["mk", "/eps/config", r#"{"Network":"10.3.0.0/16"}"#]);
    // A port nobody listens on (bound, then released).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let both = EtcdOptions {
        endpoints: vec![dead.clone(), etcd.endpoint.clone()],
        ..opts(&etcd.endpoint, "/eps")
    };
    let store = store::connect_store(&both, EtcdApiChoice::Auto)
        .await
        .unwrap()
        .expect("auto finds v2 through the live endpoint");
    assert_eq!(store.api(), EtcdApi::V2);
    let mut c = V2Client::connect(&both)
        .await
        .expect("the live endpoint serves");
    for n in 1..=3u8 {
        let key = format!("/eps/subnets/10.3.{n}.0-24");
        assert!(
            c.create(
                &key,
                &vxlan_lease("10.0.0.1", "c6:d2:32:6f:8f:01"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
            .is_some()
        );
    }
    assert_eq!(c.list("/eps/subnets/").await.unwrap().0.len(), 3);
    let only_dead = EtcdOptions {
        endpoints: vec![dead.clone()],
        ..both.clone()
    };
    let msg = V2Client::connect(&only_dead)
        .await
        .expect_err("nothing answers")
        .to_string();
    assert!(
        msg.contains(&dead) && msg.contains("--etcd-endpoints"),
        "{msg}"
    );
}
