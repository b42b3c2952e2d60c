//! systemd readiness: READY=1 reaches $NOTIFY_SOCKET only once the datapath is programmed
//! and subnet.env exists. One test in this binary: it sets NOTIFY_SOCKET for the process.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::Ipv4Addr,
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use common::{Etcd, client};
use overlay_agent::{
    agent::{self, NodeSetup},
    cli::flags::Cli,
    control::etcd,
    control::lease::LEASE_TTL,
    dataplane::{Dataplane, DataplaneError, LeaseAttrs, LocalLease},
    observe::status::AgentStatus,
    peer::{MacAddr6, PeerEvent},
};
use tokio::sync::{Semaphore, watch};

/// A dataplane whose activation waits until the test opens the gate.
struct GatedDataplane {
    gate: std::sync::Arc<Semaphore>,
}

impl Dataplane for GatedDataplane {
    fn name(&self) -> &'static str {
        "gated"
    }
    async fn activate(&mut self, _lease: &LocalLease) -> Result<(), DataplaneError> {
        let _permit = self.gate.acquire().await.unwrap();
        Ok(())
    }
    async fn apply(&mut self, _event: &PeerEvent) -> Result<(), DataplaneError> {
        Ok(())
    }
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[test]
fn ready_is_sent_only_after_the_datapath_is_programmed_and_subnet_env_exists() {
    let dir = tempfile::tempdir().unwrap();
    // etcd speaks sd_notify itself: start it before NOTIFY_SOCKET exists so that only the
    // agent can write to the socket.
    let etcd = Etcd::start();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    // SAFETY: the only test in this binary, set before the runtime's threads exist.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &socket_path) };
    let subnet_file = dir.path().join("subnet.env");

    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut c = client(&etcd.endpoint).await;
        c.put(
            "/ready/config",
            r#"{"Network":"10.4.0.0/16","Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
        let flags = Cli::try_parse_args([
            "overlay-agent".to_string(),
            format!("--etcd-endpoints={}", etcd.endpoint),
            "--etcd-prefix=/ready".to_string(),
            format!("--subnet-file={}", subnet_file.display()),
            // This agent runs in the host's namespace: no FORWARD rules left behind.
            "--iptables-forward-rules=false".to_string(),
        ])
        .unwrap()
        .flags;
        let opts = flags.etcd_options();
        let mut agent_client = etcd::connect(&opts).await.unwrap();
        let (_never, mut no_stop) = watch::channel(false);
        let config = agent::wait_for_config(&mut agent_client, &opts, &mut no_stop)
            .await
            .unwrap();
        let gate = std::sync::Arc::new(Semaphore::new(0));
        let setup = NodeSetup {
            dataplane: GatedDataplane { gate: gate.clone() },
            attrs: LeaseAttrs::Vxlan {
                vni: 1,
                vtep_mac: MacAddr6::new(0x0e, 0, 0, 0, 0, 1),
            },
            public_ip: Ipv4Addr::new(192, 168, 4, 1),
            pod_mtu: 1450,
        };
        let (status_tx, mut status_rx) = watch::channel(AgentStatus::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let node = agent::run_node(
            &flags,
            agent_client,
            config,
            setup,
            LEASE_TTL,
            status_tx,
            stop_rx,
        );

        let test = async {
            // The lease is taken while activation is held back...
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (resp, _) = c
                    .get(
                        "/ready/subnets/",
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .map(|r| (r.kvs().len(), ()))
                    .unwrap();
                if resp == 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "no lease within 20 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // ...and for a while nothing is announced: no READY=1, no subnet.env, /readyz false.
            let quiet = tokio::task::spawn_blocking({
                let socket = socket.try_clone().unwrap();
                move || {
                    socket
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    let mut buf = [0u8; 256];
                    socket
                        .recv(&mut buf)
                        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                }
            })
            .await
            .unwrap();
            assert!(
                quiet.is_err(),
                "READY sent before the datapath was programmed: {quiet:?}"
            );
            assert!(
                !subnet_file.exists(),
                "subnet.env written before the datapath was programmed"
            );
            assert!(!status_rx.borrow().ready);

            // Open the gate: READY=1 arrives, and subnet.env exists by then.
            gate.add_permits(1);
            let (msg, file_existed) = tokio::task::spawn_blocking({
                let socket = socket.try_clone().unwrap();
                let subnet_file = subnet_file.clone();
                move || {
                    socket
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let n = socket.recv(&mut buf).expect("READY=1 within 20 s");
                    (
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                        subnet_file.exists(),
                    )
                }
            })
            .await
            .unwrap();
            assert_eq!(msg.trim(), "READY=1");
            assert!(file_existed, "READY=1 arrived before subnet.env existed");
            tokio::time::timeout(Duration::from_secs(5), status_rx.wait_for(|s| s.ready))
                .await
                .unwrap()
                .unwrap();
            stop_tx.send_replace(true);
        };
        let (result, ()) = tokio::join!(node, test);
        result.unwrap();
    });
}
