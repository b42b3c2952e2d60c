//! Control plane against a real etcd: leases in flannel's format and order, renewal and
//! re-acquisition, the peer watch, TLS and auth, and the operator subcommands.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use common::{
    Etcd, LONG, Recorded, RecordingDataplane, SEEDS_CONFIG, SEEDS_PREFIX, Tls, agent_bin, client,
    mac, mtls_opts, next_event, opts, run_cli, run_cli_env, seed_flags, spawn_agent, vxlan_lease,
    wait_until,
};
use etcd_client::GetOptions;
use ipnetwork::Ipv4Network;
use overlay_agent::{
    agent::{self, NodeSetup},
    cli::flags::{Cli, Flags},
    control::config::NetworkConfig,
    control::etcd::{self, EtcdOptions},
    control::lease::{self, LEASE_TTL, LeaseError, Lessor},
    control::subnet_file::SubnetEnv,
    control::watch::{PeerRules, PeerWatcher},
    dataplane::{DataplaneCommand, LeaseAttrs, LocalLease},
    observe::status::AgentStatus,
    peer::{LeaseBackend, MacAddr6, Peer, PeerEvent},
};
use tokio::sync::{mpsc, watch};

async fn get(c: &mut etcd_client::Client, key: &str) -> Option<String> {
    let resp = c.get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().to_string())
}

async fn keys(c: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    let resp = c
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

/// Runs one agent node (recording dataplane) until `body` finishes, then stops it like
/// SIGTERM would. Returns the body's result and everything the dataplane saw.
async fn with_node<T>(
    flags: &Flags,
    public_ip: Ipv4Addr,
    vtep_mac: MacAddr6,
    body: impl AsyncFnOnce(watch::Receiver<AgentStatus>, common::RecordLog) -> T,
) -> (T, Vec<Recorded>) {
    let opts = flags.etcd_options();
    let mut c = etcd::connect(&opts).await.unwrap();
    let (_never, mut no_stop) = watch::channel(false);
    let config = agent::wait_for_config(&mut c, &opts, &mut no_stop)
        .await
        .unwrap();
    let (dp, mut rec) = RecordingDataplane::new();
    let log = dp.log.clone();
    let setup = NodeSetup {
        dataplane: dp,
        attrs: LeaseAttrs::Vxlan {
            vni: config.backend.vni,
            vtep_mac,
        },
        public_ip,
        pod_mtu: agent::pod_mtu(&config, 1500),
    };
    let (status_tx, status_rx) = watch::channel(AgentStatus::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = agent::run_node(flags, c, config, setup, LEASE_TTL, status_tx, stop_rx);
    let test = async {
        let out = body(status_rx, log).await;
        stop_tx.send_replace(true);
        out
    };
    let (node_result, out) = tokio::join!(node, test);
    node_result.expect("the node stops cleanly");
    let mut seen = Vec::new();
    while let Ok(r) = rec.try_recv() {
        seen.push(r);
    }
    (out, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_config_gives_flannels_lease_json_and_subnet_env_and_restart_reuses_it() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    c.put(format!("{SEEDS_PREFIX}/config"), SEEDS_CONFIG, None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("run/flannel/subnet.env");
    let flags = seed_flags(&etcd.endpoint, SEEDS_PREFIX, &subnet_file);
    let public_ip = Ipv4Addr::new(192, 168, 64, 3);

    let (subnet, seen) = with_node(&flags, public_ip, mac(0x44), async |mut ready, log| {
        wait_until(LONG, "READY (subnet.env written)", || {
            let r = ready.borrow_and_update().ready;
            async move { r }
        })
        .await;
        let env = SubnetEnv::read(&subnet_file)
            .unwrap()
            .expect("subnet.env exists when ready");
        wait_until(LONG, "the first peer snapshot at the dataplane", || {
            let got = log
                .lock()
                .unwrap()
                .contains(&Recorded::Applied(PeerEvent::Snapshot(vec![])));
            async move { got }
        })
        .await;
        let status = ready.borrow().clone();
        assert_eq!(status.node.subnet, env.subnet.to_string());
        assert_eq!(status.node.public_ip, "192.168.64.3");
        assert_eq!(status.node.vtep_mac.as_deref(), Some("c6:d2:32:6f:8f:44"));
        assert!(status.etcd.connected && status.peers.is_empty());
        env.subnet
    })
    .await;

    // The lease: one key, flannel's exact JSON, attached to a ~24 h etcd lease.
    let leased = keys(&mut c, &format!("{SEEDS_PREFIX}/subnets/")).await;
    let key = format!("{SEEDS_PREFIX}/subnets/{}-24", subnet.ip());
    assert_eq!(leased, vec![key.clone()]);
    assert_eq!(
        get(&mut c, &key).await.unwrap(),
        r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
    );
    let kv = c.get(key.as_str(), None).await.unwrap().kvs()[0].clone();
    let ttl = c.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 86400);
    let network: Ipv4Network = "172.30.0.0/16".parse().unwrap();
    assert!(network.contains(subnet.ip()) && subnet.prefix() == 24 && subnet.ip() != network.ip());

    // subnet.env: exact text, mode 0644.
    let text = std::fs::read_to_string(&subnet_file).unwrap();
    let o = subnet.ip().octets();
    assert_eq!(
        text,
        format!(
            "FLANNEL_NETWORK=172.30.0.0/16\nFLANNEL_SUBNET={}.{}.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            o[0], o[1], o[2]
        )
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&subnet_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );

    // The dataplane was activated for that lease, then got an (empty) peer snapshot.
    assert_eq!(
        seen.first(),
        Some(&Recorded::Activated(LocalLease {
            subnet,
            network,
            public_ip
        }))
    );
    assert!(
        seen.contains(&Recorded::Applied(PeerEvent::Snapshot(vec![]))),
        "{seen:?}"
    );

    // Stopping left the lease in place (zero-downtime restart)...
    assert!(
        get(&mut c, &key).await.is_some(),
        "the lease survives a clean stop"
    );
    // ...and a restart reuses it (found by PublicIP), with the new VtepMAC.
    let (again, _) = with_node(&flags, public_ip, mac(0x55), async |mut ready, _log| {
        wait_until(LONG, "READY after restart", || {
            let r = ready.borrow_and_update().ready;
            async move { r }
        })
        .await;
        SubnetEnv::read(&subnet_file).unwrap().unwrap().subnet
    })
    .await;
    assert_eq!(again, subnet, "restart reuses the subnet");
    assert_eq!(
        keys(&mut c, &format!("{SEEDS_PREFIX}/subnets/")).await,
        vec![key.clone()]
    );
    assert!(
        get(&mut c, &key)
            .await
            .unwrap()
            .contains("c6:d2:32:6f:8f:55")
    );

    // With the lease gone but subnet.env left, a node (even with a new PublicIP) takes the
    // previous subnet back.
    c.delete(key.as_str(), None).await.unwrap();
    let (third, _) = with_node(
        &flags,
        Ipv4Addr::new(192, 168, 64, 9),
        mac(0x66),
        async |mut ready, _log| {
            wait_until(LONG, "READY with the subnet file's subnet", || {
                let r = ready.borrow_and_update().ready;
                async move { r }
            })
            .await;
            SubnetEnv::read(&subnet_file).unwrap().unwrap().subnet
        },
    )
    .await;
    assert_eq!(
        third, subnet,
        "the previous subnet.env's subnet is reused when free"
    );
}

/// A pool of exactly 24 /29s: 10.9.0.8 .. 10.9.0.192.
const POOL_24: &str = r#"{"Network":"10.9.0.0/24","SubnetLen":29,"SubnetMin":"10.9.0.8","SubnetMax":"10.9.0.192","Backend":{"Type":"vxlan"}}"#;

fn lessor(
    c: &etcd_client::Client,
    o: &EtcdOptions,
    config: &NetworkConfig,
    n: u8,
) -> Lessor<etcd_client::Client> {
    Lessor::new(
        c.clone(),
        o.clone(),
        config.clone(),
        Ipv4Addr::new(192, 168, 1, n),
        LeaseAttrs::Vxlan {
            vni: 1,
            vtep_mac: mac(n),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_racing_nodes_get_distinct_subnets_and_a_full_pool_says_out_of_subnets() {
    let etcd = Etcd::start();
    let c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/race");
    let config = NetworkConfig::parse(POOL_24).unwrap();
    assert_eq!(config.subnet_count(), 24);

    let mut set = tokio::task::JoinSet::new();
    for n in 1..=20u8 {
        let mut l = lessor(&c, &o, &config, n);
        set.spawn(async move { l.acquire(None).await });
    }
    let mut subnets = HashSet::new();
    while let Some(r) = set.join_next().await {
        let held = r.unwrap().expect("every racing node gets a subnet");
        assert!(config.fits(held.subnet));
        assert!(
            subnets.insert(held.subnet),
            "subnet {} handed out twice",
            held.subnet
        );
    }
    assert_eq!(subnets.len(), 20);
    let mut cc = c.clone();
    assert_eq!(keys(&mut cc, "/race/subnets/").await.len(), 20);

    for n in 21..=24u8 {
        lessor(&c, &o, &config, n)
            .acquire(None)
            .await
            .expect("the pool still has room");
    }
    let err = lessor(&c, &o, &config, 25)
        .acquire(None)
        .await
        .expect_err("the pool is full");
    assert!(
        matches!(err, LeaseError::OutOfSubnets { total: 24, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("out of subnets"), "{msg}");
    assert!(
        msg.contains("lease release"),
        "the message says how to free a dead node's subnet: {msg}"
    );

    // The documented answer: release a dead node's lease, and the 25th node gets it.
    let mut cc = c.clone();
    let freed = lease::release_by_public_ip(&mut cc, &o, Ipv4Addr::new(192, 168, 1, 7))
        .await
        .unwrap();
    assert_eq!(freed.len(), 1);
    let held = lessor(&c, &o, &config, 25)
        .acquire(None)
        .await
        .expect("a released subnet is free again");
    assert_eq!(held.subnet, freed[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_no_longer_fits_is_deleted_and_replaced() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/refit");
    let old = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#).unwrap();
    let held = lessor(&c, &o, &old, 3).acquire(None).await.unwrap();
    let new = NetworkConfig::parse(r#"{"Network":"10.2.0.0/16"}"#).unwrap();
    let again = lessor(&c, &o, &new, 3)
        .acquire(Some(held.subnet))
        .await
        .unwrap();
    assert!(new.fits(again.subnet));
    let left = keys(&mut c, "/refit/subnets/").await;
    assert_eq!(
        left,
        vec![lease::subnet_key(&o, again.subnet)],
        "the unfitting lease is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_comes_back_within_seconds_and_renewal_keeps_it_alive() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/keep");
    let config = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16"}"#).unwrap();
    // A short TTL so renewal (at half the TTL when the margin is longer) is observable.
    let mut l = lessor(&c, &o, &config, 9).with_ttl(Duration::from_secs(4));
    let held = l.acquire(None).await.unwrap();
    let key = lease::subnet_key(&o, held.subnet);
    let (held_tx, mut held_rx) = watch::channel(held.clone());
    let keeper = tokio::spawn(l.keep(held.clone(), Duration::from_secs(3600), held_tx));

    // Renewal: the key outlives several TTLs on the same etcd lease.
    let first_lease = held.etcd_lease;
    let mut cc = c.clone();
    let mut renewals = 0;
    let mut last_ttl = i64::MAX;
    let deadline = std::time::Instant::now() + LONG;
    while renewals < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "three renewals of the 4 s lease within {LONG:?}"
        );
        let ttl = cc
            .lease_time_to_live(first_lease, None)
            .await
            .unwrap()
            .ttl();
        assert!(ttl > 0, "the lease expired: renewal did not happen");
        if ttl > last_ttl {
            renewals += 1;
        }
        last_ttl = ttl;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(get(&mut cc, &key).await.is_some());

    // Deletion: the keeper puts the same subnet back and says so.
    c.delete(key.as_str(), None).await.unwrap();
    let started = std::time::Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the deleted lease to come back",
        || {
            let mut cc = c.clone();
            let key = key.clone();
            async move { get(&mut cc, &key).await.is_some() }
        },
    )
    .await;
    println!("lease came back after {:?}", started.elapsed());
    tokio::time::timeout(LONG, held_rx.changed())
        .await
        .unwrap()
        .unwrap();
    let new = held_rx.borrow().clone();
    assert_eq!(
        new.subnet, held.subnet,
        "the same subnet is taken back when free"
    );
    assert_ne!(new.etcd_lease, first_lease);
    assert!(
        get(&mut c, &key)
            .await
            .unwrap()
            .contains("\"PublicIP\":\"192.168.1.9\"")
    );
    keeper.abort();
}

/// The rules of a vxlan node in `network` whose PublicIP is `own_ip`.
fn rules(network: &str, own_ip: &str) -> PeerRules {
    PeerRules {
        backend: LeaseBackend::Vxlan,
        network: network.parse().unwrap(),
        own_public_ip: own_ip.parse().unwrap(),
    }
}

/// A node reads every lease once on start, not twice: the peer watcher's first snapshot is
/// the listing the lease was chosen from, and its watch starts at that listing's revision,
/// so a lease written after the listing (here before the watcher even starts) still comes,
/// as an event. A watcher that listed again would put it in the snapshot instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_snapshot_is_the_acquisitions_listing_and_nothing_after_it_is_missed() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/reuse");
    let config = NetworkConfig::parse(r#"{"Network":"10.8.0.0/16"}"#).unwrap();
    c.put(
        "/reuse/subnets/10.8.2.0-24",
        vxlan_lease("192.168.1.2", "c6:d2:32:6f:8f:02"),
        None,
    )
    .await
    .unwrap();
    let mut l = lessor(&c, &o, &config, 1);
    let held = l.acquire(None).await.unwrap();
    let listing = l.take_listing().expect("the acquisition keeps its listing");
    assert!(l.take_listing().is_none(), "handed over once");
    assert_eq!(
        listing.leases.len(),
        1,
        "read before our own key was created"
    );

    c.put(
        "/reuse/subnets/10.8.3.0-24",
        vxlan_lease("192.168.1.3", "c6:d2:32:6f:8f:03"),
        None,
    )
    .await
    .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let (_own_tx, own_rx) = watch::channel(held.subnet);
    let watcher = tokio::spawn(
        PeerWatcher::new(
            etcd::connect(&o).await.unwrap(),
            o.clone(),
            rules("10.8.0.0/16", "192.168.1.1"),
            own_rx,
            tx,
        )
        .with_first_listing(Some(listing))
        .run(),
    );
    let peer = |n: u8| Peer {
        subnet: format!("10.8.{n}.0/24").parse().unwrap(),
        public_ip: Ipv4Addr::new(192, 168, 1, n),
        vtep_mac: Some(mac(n)),
    };
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![peer(2)])
    );
    // Our own key's creation (after the listing) is skipped; the later lease comes.
    assert_eq!(next_event(&mut rx).await, PeerEvent::Upsert(peer(3)));
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_leases_reach_the_dataplane_as_the_right_events() {
    let mut etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/peers");
    let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
    let p2: Ipv4Network = "10.5.2.0/24".parse().unwrap();
    let p3: Ipv4Network = "10.5.3.0/24".parse().unwrap();
    // Before the watcher starts: our own lease, one peer, a host-gw lease and garbage.
    c.put(
        "/peers/subnets/10.5.1.0-24",
        vxlan_lease("192.168.1.1", "c6:d2:32:6f:8f:01"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "/peers/subnets/10.5.2.0-24",
        vxlan_lease("192.168.1.2", "c6:d2:32:6f:8f:02"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "/peers/subnets/10.5.4.0-24",
        r#"{"PublicIP":"192.168.1.4","PublicIPv6":null,"BackendType":"host-gw"}"#,
        None,
    )
    .await
    .unwrap();
    c.put("/peers/subnets/garbage", "{}", None).await.unwrap();
    c.put("/peers/subnets/10.5.9.0-24", "not json", None)
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::channel(64);
    let (_own_tx, own_rx) = watch::channel(own);
    let agent_client = etcd::connect(&o).await.unwrap();
    let watcher = tokio::spawn(
        PeerWatcher::new(
            agent_client,
            o.clone(),
            rules("10.5.0.0/16", "192.168.1.1"),
            own_rx,
            tx,
        )
        .run(),
    );

    let peer2 = Peer {
        subnet: p2,
        public_ip: Ipv4Addr::new(192, 168, 1, 2),
        vtep_mac: Some(mac(0x02)),
    };
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![peer2.clone()])
    );

    // Appearing.
    c.put(
        "/peers/subnets/10.5.3.0-24",
        vxlan_lease("192.168.1.3", "c6:d2:32:6f:8f:03"),
        None,
    )
    .await
    .unwrap();
    let peer3 = Peer {
        subnet: p3,
        public_ip: Ipv4Addr::new(192, 168, 1, 3),
        vtep_mac: Some(mac(0x03)),
    };
    assert_eq!(next_event(&mut rx).await, PeerEvent::Upsert(peer3.clone()));
    // Garbage and our own subnet produce nothing, and remove nobody.
    c.put("/peers/subnets/10.5.3.0-24junk", "x", None)
        .await
        .unwrap();
    c.put("/peers/subnets/10.5.2.0-24", "{broken", None)
        .await
        .unwrap();
    c.put(
        "/peers/subnets/10.5.1.0-24",
        vxlan_lease("192.168.1.1", "c6:d2:32:6f:8f:11"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "/peers/subnets/10.5.5.0-24",
        r#"{"PublicIP":"192.168.1.5","BackendType":"host-gw"}"#,
        None,
    )
    .await
    .unwrap();
    // Changing (new VtepMAC, e.g. the peer restarted).
    c.put(
        "/peers/subnets/10.5.3.0-24",
        vxlan_lease("192.168.1.3", "c6:d2:32:6f:8f:33"),
        None,
    )
    .await
    .unwrap();
    let peer3b = Peer {
        vtep_mac: Some(mac(0x33)),
        ..peer3.clone()
    };
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Upsert(peer3b.clone()),
        "garbage/own/host-gw made no event"
    );
    // Disappearing.
    c.delete("/peers/subnets/10.5.3.0-24", None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, PeerEvent::Remove(p3));
    // Deleting an ignored lease (host-gw) says nothing; the peer with a broken value was kept.
    c.delete("/peers/subnets/10.5.4.0-24", None).await.unwrap();
    c.delete("/peers/subnets/10.5.2.0-24", None).await.unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Remove(p2),
        "the broken-value peer stayed until deleted"
    );

    // Reconnect: etcd restarts; the watcher lists again and sends a snapshot (not removals).
    c.put(
        "/peers/subnets/10.5.2.0-24",
        vxlan_lease("192.168.1.2", "c6:d2:32:6f:8f:02"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut rx).await, PeerEvent::Upsert(peer2.clone()));
    etcd.restart();
    let mut c = client(&etcd.endpoint).await;
    c.put(
        "/peers/subnets/10.5.3.0-24",
        vxlan_lease("192.168.1.3", "c6:d2:32:6f:8f:03"),
        None,
    )
    .await
    .unwrap();
    // Depending on timing the watch resumes (an Upsert) or re-lists (a Snapshot); a
    // Snapshot must hold both peers.
    let mut saw_snapshot_or_upsert = false;
    while !saw_snapshot_or_upsert {
        match next_event(&mut rx).await {
            PeerEvent::Snapshot(peers) => {
                if peers.len() == 2 {
                    assert_eq!(peers, vec![peer2.clone(), peer3.clone()]);
                    saw_snapshot_or_upsert = true;
                } else {
                    assert_eq!(
                        peers,
                        vec![peer2.clone()],
                        "a snapshot never drops a live peer"
                    );
                }
            }
            PeerEvent::Upsert(p) => {
                assert_eq!(p, peer3);
                saw_snapshot_or_upsert = true;
            }
            PeerEvent::Remove(s) => panic!("reconnect removed {s}"),
        }
    }
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_the_watcher_list_again_and_send_a_snapshot() {
    let etcd = Etcd::start();
    compaction_round(&etcd, "/compact").await;
}

/// The watcher lists, blocks on a full channel before it watches, and its watch then starts
/// from a revision we compact away meanwhile.
async fn compaction_round(etcd: &Etcd, prefix: &str) {
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, prefix);
    let own: Ipv4Network = "10.6.1.0/24".parse().unwrap();
    c.put(
        format!("{prefix}/subnets/10.6.2.0-24"),
        vxlan_lease("192.168.2.2", "c6:d2:32:6f:8f:02"),
        None,
    )
    .await
    .unwrap();
    let (tx, mut rx) = mpsc::channel(1);
    let (_own_tx, own_rx) = watch::channel(own);
    let agent_client = etcd::connect(&o).await.unwrap();
    // Fill the channel so the watcher blocks right after listing, before it watches: its
    // watch then starts from a revision we compact away meanwhile.
    tx.send(DataplaneCommand::Peers(PeerEvent::Snapshot(vec![])))
        .await
        .unwrap();
    let (status_tx, mut status_rx) = watch::channel(AgentStatus::default());
    let watcher = tokio::spawn(
        PeerWatcher::new(
            agent_client,
            o.clone(),
            rules("10.6.0.0/16", "192.168.2.1"),
            own_rx,
            tx,
        )
        .with_status(status_tx)
        .run(),
    );
    // It reports itself connected once it has listed, right before it sends (and blocks).
    tokio::time::timeout(LONG, status_rx.wait_for(|s| s.etcd.connected))
        .await
        .expect("the watcher lists within LONG")
        .expect("status channel");
    for i in 0..5 {
        c.put(format!("{prefix}/other"), format!("{i}"), None)
            .await
            .unwrap();
    }
    c.put(
        format!("{prefix}/subnets/10.6.3.0-24"),
        vxlan_lease("192.168.2.3", "c6:d2:32:6f:8f:03"),
        None,
    )
    .await
    .unwrap();
    let rev = c
        .get(format!("{prefix}/other"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![]),
        "our filler"
    );
    // The watcher's first snapshot, from before the compaction...
    match next_event(&mut rx).await {
        PeerEvent::Snapshot(p) if p.len() == 1 => {}
        other => panic!("expected the first snapshot with one peer, got {other:?}"),
    }
    // ...then, its watch being refused as compacted, a fresh snapshot with both peers.
    match next_event(&mut rx).await {
        PeerEvent::Snapshot(peers) => assert_eq!(peers.len(), 2, "{peers:?}"),
        other => panic!("expected a re-list snapshot after compaction, got {other:?}"),
    }
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_outside_the_network_or_with_our_public_ip_are_refused_naming_the_key() {
    let logs = common::capture_logs();
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let o = opts(&etcd.endpoint, "/foreign");
    let own: Ipv4Network = "10.7.1.0/24".parse().unwrap();
    // Listed at start: a subnet outside the network, our PublicIP on another subnet, and
    // a good peer.
    let outside = "/foreign/subnets/8.8.8.0-24";
    let ours = "/foreign/subnets/10.7.9.0-24";
    c.put(
        outside,
        vxlan_lease("192.168.7.8", "c6:d2:32:6f:8f:08"),
        None,
    )
    .await
    .unwrap();
    c.put(ours, vxlan_lease("192.168.7.1", "c6:d2:32:6f:8f:09"), None)
        .await
        .unwrap();
    c.put(
        "/foreign/subnets/10.7.2.0-24",
        vxlan_lease("192.168.7.2", "c6:d2:32:6f:8f:02"),
        None,
    )
    .await
    .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let (_own_tx, own_rx) = watch::channel(own);
    let agent_client = etcd::connect(&o).await.unwrap();
    let watcher = tokio::spawn(
        PeerWatcher::new(
            agent_client,
            o.clone(),
            rules("10.7.0.0/16", "192.168.7.1"),
            own_rx,
            tx,
        )
        .run(),
    );
    let peer2 = Peer {
        subnet: "10.7.2.0/24".parse().unwrap(),
        public_ip: Ipv4Addr::new(192, 168, 7, 2),
        vtep_mac: Some(mac(0x02)),
    };
    assert_eq!(
        next_event(&mut rx).await,
        PeerEvent::Snapshot(vec![peer2.clone()])
    );
    // The same through the watch: neither makes an event; the good one after them does.
    let outside_later = "/foreign/subnets/1.1.1.0-24";
    let ours_later = "/foreign/subnets/10.7.10.0-24";
    c.put(
        outside_later,
        vxlan_lease("192.168.7.11", "c6:d2:32:6f:8f:11"),
        None,
    )
    .await
    .unwrap();
    c.put(
        ours_later,
        vxlan_lease("192.168.7.1", "c6:d2:32:6f:8f:10"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "/foreign/subnets/10.7.3.0-24",
        vxlan_lease("192.168.7.3", "c6:d2:32:6f:8f:03"),
        None,
    )
    .await
    .unwrap();
    match next_event(&mut rx).await {
        PeerEvent::Upsert(p) => assert_eq!(p.subnet.to_string(), "10.7.3.0/24"),
        other => panic!("a refused lease reached the dataplane: {other:?}"),
    }
    watcher.abort();
    let text = logs.text();
    for key in [outside, outside_later] {
        assert!(
            text.lines().any(|l| l.contains("WARN")
                && l.contains(key)
                && l.contains("outside the cluster network 10.7.0.0/16")),
            "no warning naming {key}:\n{text}"
        );
    }
    for key in [ours, ours_later] {
        assert!(
            text.lines().any(|l| l.contains("WARN")
                && l.contains(key)
                && l.contains("PublicIP 192.168.7.1 is this node's own address")),
            "no warning naming {key}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_wrong_certificate_fails_clearly() {
    let tls = Tls::generate();
    let etcd = Etcd::start_tls(&tls);
    let good = mtls_opts(&etcd.endpoint, "/tls", &tls);
    // etcd needs a moment to be ready; the first good connection proves mTLS end to end.
    let deadline = std::time::Instant::now() + LONG;
    let mut c = loop {
        match etcd::connect(&good).await {
            Ok(client) => break client,
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "no mTLS connection within {LONG:?}: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    c.put("/tls/config", r#"{"Network":"10.7.0.0/16"}"#, None)
        .await
        .unwrap();
    let config = NetworkConfig::parse(r#"{"Network":"10.7.0.0/16"}"#).unwrap();
    let held = lessor(&c, &good, &config, 1)
        .acquire(None)
        .await
        .expect("a lease over mTLS");
    assert!(config.fits(held.subnet));

    // A client certificate from another CA is refused, and the error says where.
    let rogue = EtcdOptions {
        certfile: Some(tls.path("rogue-client.pem")),
        keyfile: Some(tls.path("rogue-client.key")),
        ..good.clone()
    };
    let err = etcd::connect(&rogue)
        .await
        .err()
        .expect("a rogue client certificate is refused");
    let msg = err.to_string();
    println!("rogue certificate: {msg}");
    assert!(
        msg.contains("cannot connect to etcd at https://127.0.0.1"),
        "{msg}"
    );
    assert!(
        msg.contains("TLS handshake failed") && msg.contains("--etcd-certfile"),
        "{msg}"
    );
    // Not trusting etcd's certificate (wrong --etcd-cafile) fails clearly as well.
    let wrong_ca = EtcdOptions {
        cafile: Some(tls.path("rogue-ca.pem")),
        ..good.clone()
    };
    let msg = etcd::connect(&wrong_ca)
        .await
        .err()
        .expect("an untrusted server certificate")
        .to_string();
    println!("wrong CA: {msg}");
    assert!(
        msg.contains("TLS handshake failed") && msg.contains("--etcd-cafile"),
        "{msg}"
    );
    // No client certificate at all is refused too.
    let anonymous = EtcdOptions {
        certfile: None,
        keyfile: None,
        ..good.clone()
    };
    assert!(etcd::connect(&anonymous).await.is_err());
    // An unreadable file names the file and the flag.
    let missing = EtcdOptions {
        keyfile: Some(tls.path("nope.key")),
        ..good.clone()
    };
    let msg = etcd::connect(&missing)
        .await
        .err()
        .expect("missing key file")
        .to_string();
    assert!(
        msg.contains("nope.key") && msg.contains("--etcd-keyfile"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_work_and_a_wrong_password_fails_clearly() {
    let etcd = Etcd::start();
    let mut admin = client(&etcd.endpoint).await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let good = EtcdOptions {
        username: Some("root".into()),
        password: Some("rootpw".into()),
        ..opts(&etcd.endpoint, "/auth")
    };
    let c = etcd::connect(&good).await.expect("user/password accepted");
    let config = NetworkConfig::parse(r#"{"Network":"10.8.0.0/16"}"#).unwrap();
    lessor(&c, &good, &config, 1)
        .acquire(None)
        .await
        .expect("a lease with auth");

    let bad = EtcdOptions {
        password: Some("wrong".into()),
        ..good.clone()
    };
    let msg = etcd::connect(&bad)
        .await
        .err()
        .expect("wrong password")
        .to_string();
    println!("wrong password: {msg}");
    assert!(
        msg.contains("cannot connect to etcd") && msg.contains("authentication failed"),
        "{msg}"
    );
    assert!(
        msg.contains("check --etcd-username and --etcd-password"),
        "{msg}"
    );
    let anonymous = EtcdOptions {
        username: None,
        password: None,
        ..good.clone()
    };
    let msg = etcd::connect(&anonymous)
        .await
        .err()
        .expect("no credentials")
        .to_string();
    println!("no credentials: {msg}");
    assert!(
        msg.contains("pass --etcd-username and --etcd-password"),
        "{msg}"
    );
}

// ---- The binary: subcommands, environment, one-dash flags, config waiting. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommands_validate_show_list_and_release() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let ep = format!("-etcd-endpoints={}", etcd.endpoint);

    // An invalid config is refused before anything is written, with the reason.
    let (ok, _, err) = run_cli(&[
        &ep,
        "-etcd-prefix=/cli",
        "config",
        "set",
        r#"{"Network":"10.0.0.0/30"}"#,
    ]);
    assert!(!ok);
    assert!(err.contains("network 10.0.0.0/30 is too small"), "{err}");
    assert!(get(&mut c, "/cli/config").await.is_none());

    // A valid one is written as given and printed normalized.
    let (ok, out, err) = run_cli(&[
        &ep,
        "-etcd-prefix=/cli",
        "config",
        "set",
        r#"{"network":"10.5.0.0/16"}"#,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(r#""SubnetMin":"10.5.1.0""#) && out.contains("no Backend given"),
        "{out}"
    );
    assert_eq!(
        get(&mut c, "/cli/config").await.unwrap(),
        r#"{"network":"10.5.0.0/16"}"#
    );

    // The prefix from FLANNELD_ETCD_PREFIX; the command line wins over the environment.
    let (ok, out, err) = run_cli_env(
        &["config", "show"],
        &[
            ("FLANNELD_ETCD_ENDPOINTS", &etcd.endpoint),
            ("FLANNELD_ETCD_PREFIX", "/cli"),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("/cli/config") && out.contains("normalized:"),
        "{out}"
    );
    let (ok, _, err) = run_cli_env(
        &["config", "show", "--etcd-prefix=/elsewhere"],
        &[
            ("FLANNELD_ETCD_ENDPOINTS", &etcd.endpoint),
            ("FLANNELD_ETCD_PREFIX", "/cli"),
        ],
    );
    assert!(
        !ok && err.contains("no network config at /elsewhere/config"),
        "{err}"
    );

    // --file, and `config show` on an invalid stored config says why.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.json");
    std::fs::write(
        &file,
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}"#,
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let (ok, out, err) = run_cli(&[
        &ep,
        "-etcd-prefix=/file",
        "config",
        "set",
        "--file",
        &file_arg,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(r#""Type":"host-gw""#), "{out}");
    c.put(
        "/bad/config",
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"udp"}}"#,
        None,
    )
    .await
    .unwrap();
    let (ok, out, err) = run_cli(&[&ep, "-etcd-prefix=/bad", "config", "show"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("INVALID: backend type \"udp\" is not supported"),
        "{out}"
    );

    // leases / lease release.
    let o = opts(&etcd.endpoint, "/cli");
    let config = NetworkConfig::parse(r#"{"network":"10.5.0.0/16"}"#).unwrap();
    let held = lessor(&c, &o, &config, 4).acquire(None).await.unwrap();
    c.put("/cli/subnets/garbage", "x", None).await.unwrap();
    let (ok, out, err) = run_cli(&[&ep, "-etcd-prefix=/cli", "leases"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&held.subnet.to_string())
            && out.contains("192.168.1.4")
            && out.contains("c6:d2:32:6f:8f:04"),
        "{out}"
    );
    assert!(out.contains("23h59m") || out.contains("24h00m"), "{out}");
    assert!(
        out.contains("/cli/subnets/garbage (not a subnet key"),
        "{out}"
    );
    let (ok, out, err) = run_cli(&[
        &ep,
        "-etcd-prefix=/cli",
        "lease",
        "release",
        &held.subnet.to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("released"), "{out}");
    assert!(
        get(&mut c, &lease::subnet_key(&o, held.subnet))
            .await
            .is_none()
    );
    let (ok, _, err) = run_cli(&[
        &ep,
        "-etcd-prefix=/cli",
        "lease",
        "release",
        &held.subnet.to_string(),
    ]);
    assert!(!ok && err.contains("no lease for"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_for_a_valid_config_logging_each_problem_once() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    // An interface that does not exist: once the config is valid the agent goes on to
    // choose the uplink and stops there, touching nothing on this host. -v: its debug line
    // per re-check shows how many re-checks passed.
    let mut child = spawn_agent(
        &[
            &format!("-etcd-endpoints={}", etcd.endpoint),
            "-etcd-prefix=/wait",
            "-iface=ovl-none0",
            "-v=1",
            &format!("-subnet-file={}", dir.path().join("subnet.env").display()),
        ],
        &log_path,
    );
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(LONG, "the missing-config line", || {
        let t = read();
        async move { t.contains("no network config at /wait/config") }
    })
    .await;
    c.put(
        "/wait/config",
        r#"{"Network":"10.0.0.0/16","SubnetLen":8}"#,
        None,
    )
    .await
    .unwrap();
    wait_until(LONG, "the invalid-config line", || {
        let t = read();
        async move { t.contains("\"SubnetLen\" 8 is too short") }
    })
    .await;
    // Several re-checks (every 2 s) pass without repeating the same line: the one that
    // logged it and two more.
    c.put("/wait/unrelated", "1", None).await.unwrap();
    wait_until(LONG, "two re-checks after the invalid-config line", || {
        let t = read();
        async move {
            let after = t
                .find("\"SubnetLen\" 8 is too short")
                .map_or("", |at| &t[at..]);
            after.matches("no usable network config yet").count() >= 3
        }
    })
    .await;
    let text = read();
    assert_eq!(
        text.matches("no network config at /wait/config").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("\"SubnetLen\" 8 is too short").count(),
        1,
        "{text}"
    );
    c.put("/wait/config", r#"{"Network":"10.0.0.0/16"}"#, None)
        .await
        .unwrap();
    wait_until(
        LONG,
        "the agent to accept the config and exit on the bad interface",
        || {
            let t = read();
            async move { t.contains("network config loaded") && t.contains("using vxlan") }
        },
    )
    .await;
    let status = tokio::task::block_in_place(|| child.wait_exit(LONG));
    let status = status.expect("the agent exits when the interface cannot be chosen");
    assert!(!status.success());
    // The reason, once: not repeated by the error chain, not printed a second time.
    let text = read();
    let line = text
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{text}"));
    assert!(
        line.contains("choosing the uplink interface: no interface matches --iface=ovl-none0; interfaces here: "),
        "{line}"
    );
    assert_eq!(
        text.matches("no interface matches --iface=ovl-none0")
            .count(),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minus_v_2_into_a_pipe_is_plain_text_with_debug_lines_of_the_agent_only() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    c.put("/plain/config", r#"{"Network":"10.0.0.0/16"}"#, None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // As under systemd: stderr is a pipe (journald's is a socket), not a terminal. The
    // interface does not exist, so the agent stops after talking to etcd.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(agent_bin())
            .args([
                &format!("-etcd-endpoints={}", etcd.endpoint),
                "-etcd-prefix=/plain",
                "-iface=ovl-none0",
                "-v=2",
                &format!("-subnet-file={}", dir.path().join("subnet.env").display()),
            ])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("\x1b["), "ANSI escapes in a pipe:\n{text}");
    // `<time> LEVEL target: message`
    let debug: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip(1);
            let level = words.next()?;
            let target = words.next()?.trim_end_matches(':');
            matches!(level, "DEBUG" | "TRACE").then_some((level, target))
        })
        .collect();
    assert!(
        debug
            .iter()
            .any(|(_, t)| t.starts_with("overlay_agent::control::etcd")),
        "-v=2 shows the agent's debug lines:\n{text}"
    );
    let foreign: Vec<_> = debug
        .iter()
        .filter(|(_, t)| !t.starts_with("overlay_agent"))
        .collect();
    assert!(
        foreign.is_empty(),
        "dependency debug lines {foreign:?}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_up_and_readyz_turns_ready_only_once_the_node_holds_a_lease() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn status(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }
    // The node's debug line per failed acquisition, among every test's lines.
    let logs = common::capture_logs();
    let failed_acquisitions = || {
        logs.text()
            .lines()
            .filter(|l| l.contains("no subnet lease yet") && l.contains(r#"prefix="/ready""#))
            .count()
    };
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoint).await;
    // Three leasable subnets (10.12.0.64/26 .. 10.12.0.192/26), all held by other nodes:
    // the node keeps retrying "out of subnets" until one is freed.
    c.put(
        "/ready/config",
        r#"{"Network":"10.12.0.0/24","SubnetLen":26}"#,
        None,
    )
    .await
    .unwrap();
    for (n, net) in ["64", "128", "192"].into_iter().enumerate() {
        c.put(
            format!("/ready/subnets/10.12.0.{net}-26"),
            vxlan_lease(&format!("192.168.12.{}", n + 2), "c6:d2:32:6f:8f:0c"),
            None,
        )
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let flags = seed_flags(&etcd.endpoint, "/ready", &subnet_file);
    let public_ip = Ipv4Addr::new(192, 168, 12, 1);
    let ((), _) = with_node(&flags, public_ip, mac(0x0c), async |ready, _log| {
        // The health server reads the status the running node publishes.
        let (addr, task) =
            overlay_agent::observe::health::serve("127.0.0.1:0".parse().unwrap(), ready.clone())
                .await
                .unwrap();
        assert_eq!(status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        wait_until(LONG, "the node to start asking for a lease", || {
            let started = ready.borrow().node.public_ip == public_ip.to_string();
            async move { started }
        })
        .await;
        // Several failed acquisitions later (one per 5 s; the first is immediate) it is
        // still not ready.
        wait_until(LONG, "two failed lease acquisitions", || {
            let failed = failed_acquisitions();
            async move { failed >= 2 }
        })
        .await;
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert!(!subnet_file.exists());
        c.delete("/ready/subnets/10.12.0.128-26", None)
            .await
            .unwrap();
        wait_until(LONG, "/readyz to answer 200", || async {
            status(addr, "/readyz").await == "HTTP/1.1 200 OK"
        })
        .await;
        assert!(subnet_file.exists(), "ready before subnet.env was written");
        assert_eq!(ready.borrow().node.subnet, "10.12.0.128/26");
        assert_eq!(status(addr, "/metrics").await, "HTTP/1.1 200 OK");
        // `overlay-agent status` reads the same value back.
        let fetched = overlay_agent::observe::health::fetch_status(addr)
            .await
            .unwrap();
        assert_eq!(fetched.node, ready.borrow().node);
        assert!(fetched.ready);
        // A taken port fails at start-up, naming the flags to change.
        let err =
            overlay_agent::observe::health::serve(addr, watch::channel(AgentStatus::default()).1)
                .await
                .err()
                .unwrap();
        assert!(err.to_string().contains("--healthz-port"), "{err}");
        task.abort();
    })
    .await;
}

#[test]
fn every_flag_also_reads_its_flanneld_environment_variable() {
    use clap::CommandFactory;
    let cmd = Cli::command();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else {
            if arg.get_short() == Some('v') {
                assert_eq!(arg.get_env().unwrap(), "FLANNELD_V");
            }
            continue;
        };
        if long == "help" || long == "version" {
            continue;
        }
        let want = format!("FLANNELD_{}", long.to_uppercase().replace('-', "_"));
        assert_eq!(
            arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            Some(want),
            "--{long}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_work_when_one_of_them_is_down() {
    let etcd = Etcd::start();
    // A port nobody listens on (bound, then released).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let o = EtcdOptions {
        endpoints: vec![dead.clone(), etcd.endpoint.clone()],
        prefix: "/multi".into(),
        ..Default::default()
    };
    let c = etcd::connect(&o).await.expect("the live endpoint serves");
    let config = NetworkConfig::parse(r#"{"Network":"10.10.0.0/16"}"#).unwrap();
    for n in 1..=5 {
        lessor(&c, &o, &config, n)
            .acquire(None)
            .await
            .expect("requests go to the live endpoint");
    }
    // All endpoints down: a clear error naming them.
    let o = EtcdOptions {
        endpoints: vec![dead.clone()],
        ..o
    };
    let msg = etcd::connect(&o)
        .await
        .err()
        .expect("nothing listens")
        .to_string();
    println!("all down: {msg}");
    assert!(
        msg.contains(&format!("cannot connect to etcd at {dead}")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_events_keep_flowing_when_the_etcd_member_in_use_dies() {
    let mut cluster = overlay_tests::etcd::EtcdCluster::start();
    // The agent knows members 0 and 1; member 2 keeps quorum while either of them is down.
    let o = EtcdOptions {
        endpoints: cluster.endpoints[..2].to_vec(),
        prefix: "/failover".into(),
        ..Default::default()
    };
    let mut writer = client(&cluster.endpoints[2]).await;
    let deadline = std::time::Instant::now() + LONG;
    let agent_client = loop {
        match etcd::connect(&o).await {
            Ok(c) => break c,
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "cluster not up: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (tx, mut rx) = mpsc::channel(64);
    let (_own_tx, own_rx) = watch::channel("10.11.1.0/24".parse::<Ipv4Network>().unwrap());
    let watcher = tokio::spawn(
        PeerWatcher::new(
            agent_client,
            o.clone(),
            rules("10.11.0.0/16", "192.168.11.1"),
            own_rx,
            tx,
        )
        .run(),
    );
    assert_eq!(next_event(&mut rx).await, PeerEvent::Snapshot(vec![]));

    // Kill member 0, then (after it is back) member 1: whichever one carries the watch
    // dies at some point, and events must still arrive.
    for (round, member) in [0usize, 1].into_iter().enumerate() {
        cluster.kill(member);
        let n = 2 + round as u8;
        // A new leader may take a moment to be elected when the leader died.
        let key = format!("/failover/subnets/10.11.{n}.0-24");
        let value = vxlan_lease(
            &format!("192.168.11.{n}"),
            &format!("c6:d2:32:6f:8f:{n:02x}"),
        );
        let deadline = std::time::Instant::now() + LONG;
        while let Err(err) = writer.put(key.as_str(), value.as_str(), None).await {
            assert!(
                std::time::Instant::now() < deadline,
                "cluster without quorum: {err}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Either the watch survives (an Upsert) or it re-lists elsewhere (a Snapshot holding
        // the new peer); nothing is removed.
        let subnet: Ipv4Network = format!("10.11.{n}.0/24").parse().unwrap();
        loop {
            match next_event(&mut rx).await {
                PeerEvent::Upsert(p) if p.subnet == subnet => break,
                PeerEvent::Snapshot(peers) if peers.iter().any(|p| p.subnet == subnet) => break,
                PeerEvent::Snapshot(_) => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        cluster.restart(member);
        // `client` waits until the member answers reads again.
        let _ = client(&cluster.endpoints[member]).await;
    }
    watcher.abort();
}
