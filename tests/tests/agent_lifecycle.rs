//! The real `overlay-agent` binary in node namespaces, started the way the seeds' systemd
//! units start flanneld (one-dash flags, /kube-centos/network prefix): it leases a subnet,
//! programs the datapath, writes subnet.env, says READY=1, serves /readyz; pods on two nodes
//! reach each other; `docker-opts` and `status` work against it; SIGTERM/SIGINT leave lease,
//! datapath and subnet.env in place (traffic keeps flowing while the agent is down) and a
//! restart keeps the subnet; a deleted lease comes back.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use overlay_tests::{
    agent::{AgentProcess, agent_binary},
    require_root,
    topology::Cluster,
    wait_until,
};

const PREFIX: &str = "/kube-centos/network";
/// The seeds' config (written there with etcdctl v2 `mk`; here through the v3 API).
const SEEDS_CONFIG: &str =
    r#"{ "Network": "172.30.0.0/16", "SubnetLen": 24, "Backend": { "Type": "vxlan" } }"#;
const LONG: Duration = Duration::from_secs(30);

fn seeds_args(cluster: &Cluster, node: usize, backend: &str) -> Vec<String> {
    let node = &cluster.nodes[node];
    vec![
        format!("-etcd-endpoints={}", cluster.etcd_endpoint()),
        format!("-etcd-prefix={PREFIX}"),
        format!("-subnet-file={}", node.subnet_file().display()),
        format!("-bpf-pin-dir={}", node.pin_dir.display()),
        "-iface=eth0".to_owned(),
        format!("--backend={backend}"),
    ]
}

fn subnet_of(cluster: &Cluster, node: usize) -> String {
    cluster.nodes[node].subnet_env().expect("subnet.env")["FLANNEL_SUBNET"].clone()
}

fn lease_key(subnet_env_value: &str) -> String {
    // FLANNEL_SUBNET=172.30.7.1/24 -> <prefix>/subnets/172.30.7.0-24
    let (ip, len) = subnet_env_value.split_once('/').expect("CIDR");
    let mut octets: Vec<u8> = ip.split('.').map(|o| o.parse().expect("octet")).collect();
    octets[3] -= 1;
    format!(
        "{PREFIX}/subnets/{}.{}.{}.{}-{len}",
        octets[0], octets[1], octets[2], octets[3]
    )
}

/// The status line of node `node`'s /readyz.
fn readyz(cluster: &Cluster, node: usize, port: u16) -> String {
    let response = cluster.nodes[node].ns.http_get(port, "/readyz");
    response.lines().next().unwrap_or("").trim().to_owned()
}

/// `overlay-agent status` run in node 0's namespace against its agent.
fn status_text(cluster: &Cluster, port: u16) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cluster.nodes[0].ns.name()))
        .arg(agent_binary())
        .args([
            "status".to_owned(),
            format!("-healthz-port={port}"),
            format!("-etcd-endpoints={}", cluster.etcd_endpoint()),
            format!("-etcd-prefix={PREFIX}"),
            format!("-subnet-file={}", cluster.nodes[0].subnet_file().display()),
        ])
        .output()
        .expect("overlay-agent status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A counter's value from the status table (`  name   value`), 0 when absent.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
}

#[test]
fn seeds_style_vxlan_agents_connect_pods_and_survive_sigterm_restart_and_lease_deletion() {
    lifecycle("vxlan");
}

#[test]
fn seeds_style_ebpf_agents_connect_pods_and_survive_sigterm_restart_and_lease_deletion() {
    lifecycle("ebpf");
}

#[test]
fn host_gw_agents_connect_pods_and_survive_sigterm_restart_and_lease_deletion() {
    lifecycle("host-gw");
}

fn lifecycle(backend: &str) {
    require_root();
    let mut cluster = Cluster::new(2);
    cluster.put_config(PREFIX, SEEDS_CONFIG);

    // A systemd-like notify socket for node 0 (unix sockets cross network namespaces).
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify.set_read_timeout(Some(LONG)).expect("socket timeout");

    let mut args0 = seeds_args(&cluster, 0, backend);
    // Distinct ports: the tests run in parallel and 127.0.0.1 is per namespace anyway, but
    // a clash would make a failure confusing.
    let port = match backend {
        "ebpf" => 18472,
        "host-gw" => 18473,
        _ => 18471,
    };
    let (mtu, lease_start) = if backend == "host-gw" {
        (
            1500,
            r#"{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}"#,
        )
    } else {
        (
            1450,
            r#"{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#,
        )
    };
    args0.push(format!("-healthz-port={port}"));
    let mut agent0 = AgentProcess::spawn_with_env(
        &cluster.nodes[0].ns,
        &args0,
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
    );
    // Node 1 also masquerades (--ip-masq, one dash as in flanneld units).
    let mut args1 = seeds_args(&cluster, 1, backend);
    args1.push("-ip-masq".to_owned());
    let mut agent1 = AgentProcess::spawn_with_env(&cluster.nodes[1].ns, &args1, &[]);

    let mut buf = [0u8; 64];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|err| panic!("no READY=1 within {LONG:?} ({err}); log:\n{}", agent0.log()));
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    assert!(
        cluster.nodes[0].subnet_env().is_some(),
        "READY=1 before subnet.env"
    );
    assert!(readyz(&cluster, 0, port).ends_with(" 200 OK"));
    if backend == "ebpf" {
        // The eBPF datapath really runs (no silent fallback to the kernel path).
        assert!(
            !agent0.log().contains("cannot run here"),
            "{}",
            agent0.log()
        );
        assert!(
            agent0.log().contains("uplink program attached"),
            "{}",
            agent0.log()
        );
    }
    wait_until(LONG, "node 1's subnet.env", || {
        cluster.nodes[1].subnet_env().is_some()
    });
    assert_eq!(
        cluster.nodes[1].subnet_env().expect("env")["FLANNEL_IPMASQ"],
        "true"
    );
    let rules = cluster.nodes[1]
        .ns
        .stdout(&["nft", "list", "table", "ip", "flannel-ipv4"]);
    assert!(
        rules.contains("masquerade") && rules.contains("172.30.0.0/16"),
        "ip-masq rules installed before subnet.env: {rules}"
    );

    let env0 = cluster.nodes[0].subnet_env().expect("env");
    assert_eq!(env0["FLANNEL_NETWORK"], "172.30.0.0/16");
    assert_eq!(env0["FLANNEL_MTU"], mtu.to_string());
    assert_eq!(env0["FLANNEL_IPMASQ"], "false");
    let subnet0 = subnet_of(&cluster, 0);
    let subnet1 = subnet_of(&cluster, 1);
    assert_ne!(subnet0, subnet1);
    let value0 = cluster
        .etcd()
        .get(&lease_key(&subnet0))
        .expect("node 0's lease in etcd");
    assert!(value0.starts_with(lease_start), "{value0}");

    // Pods on both nodes reach each other through the overlay.
    let pod0 = cluster.nodes[0].add_pod(&subnet0, mtu).ip;
    let pod1 = cluster.nodes[1].add_pod(&subnet1, mtu).ip;
    wait_until(LONG, "pod 0 -> pod 1", || {
        cluster.nodes[0].pods[0].ping_once(pod1)
    });
    wait_until(LONG, "pod 1 -> pod 0", || {
        cluster.nodes[1].pods[0].ping_once(pod0)
    });

    // `overlay-agent status` shows the running agent's view (from its /status endpoint).
    let text = status_text(&cluster, port);
    let subnet1_net = lease_key(&subnet1)
        .rsplit('/')
        .next()
        .expect("key")
        .replace('-', "/");
    assert!(
        text.contains("ready true") && text.contains("1 peer(s)"),
        "{text}"
    );
    assert!(
        text.contains(&subnet1_net) && text.contains("192.168.100.2"),
        "{text}"
    );
    if backend == "ebpf" {
        // The pings went through the eBPF programs (ICMP is handed to the kernel, counted),
        // and the status says which fast-path pieces run.
        wait_until(LONG, "eBPF counters in the status", || {
            let text = status_text(&cluster, port);
            counter(&text, "kernel_not_ours") > 0 && text.contains("fast-path all")
        });
    }

    // The seeds' ExecStartPost: docker options from the subnet file the agent wrote.
    let docker_file = cluster.nodes[0].dir().join("docker");
    let out = Command::new(agent_binary())
        .args([
            format!("-subnet-file={}", cluster.nodes[0].subnet_file().display()),
            "docker-opts".to_owned(),
            "-k".to_owned(),
            "DOCKER_NETWORK_OPTIONS".to_owned(),
            "-d".to_owned(),
            docker_file.display().to_string(),
        ])
        .output()
        .expect("overlay-agent docker-opts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docker = std::fs::read_to_string(&docker_file).expect("docker options file");
    assert!(
        docker.contains(&format!("DOCKER_OPT_BIP=\"--bip={subnet0}\""))
            && docker.contains(&format!("DOCKER_OPT_MTU=\"--mtu={mtu}\"")),
        "{docker}"
    );

    // SIGTERM (SIGINT for host-gw: both stop the agent the same way): a clean exit that
    // leaves lease, datapath and subnet.env in place.
    agent0.signal(if backend == "host-gw" {
        libc::SIGINT
    } else {
        libc::SIGTERM
    });
    assert_eq!(agent0.wait_exit(LONG), Some(0), "log:\n{}", agent0.log());
    assert!(
        cluster.etcd().get(&lease_key(&subnet0)).is_some(),
        "lease kept"
    );
    assert!(cluster.nodes[0].subnet_env().is_some(), "subnet.env kept");
    if backend == "host-gw" {
        let route = cluster.nodes[1].ns.stdout(&[
            "ip",
            "route",
            "show",
            &lease_key(&subnet0)
                .rsplit('/')
                .next()
                .expect("key")
                .replace('-', "/"),
        ]);
        assert!(
            route.contains("via 192.168.100.1"),
            "node 1 keeps its route to node 0's pods: {route}"
        );
    } else {
        cluster.nodes[0]
            .ns
            .run(&["ip", "link", "show", "flannel.1"]);
    }
    assert!(
        cluster.nodes[1].pods[0].ping_once(pod0),
        "traffic flows while the agent is stopped"
    );

    // Restart: same subnet.
    let mut agent0 =
        AgentProcess::spawn_with_env(&cluster.nodes[0].ns, &seeds_args(&cluster, 0, backend), &[]);
    agent0.wait_for_log("wrote the subnet file", LONG);
    assert_eq!(subnet_of(&cluster, 0), subnet0, "restart keeps the subnet");

    // Deleting node 1's lease: it comes back within seconds, same subnet, and says so.
    let started = Instant::now();
    cluster.etcd().delete(&lease_key(&subnet1));
    wait_until(
        Duration::from_secs(10),
        "node 1's lease to come back",
        || cluster.etcd().get(&lease_key(&subnet1)).is_some(),
    );
    eprintln!("lease restored after {:?}", started.elapsed());
    agent1.wait_for_log("re-acquired the same subnet", LONG);
    wait_until(LONG, "pod 0 -> pod 1 after the lease came back", || {
        cluster.nodes[0].pods[0].ping_once(pod1)
    });
    assert!(agent0.is_running() && agent1.is_running());

    if backend == "ebpf" {
        // Switching the node to --backend=vxlan removes the eBPF datapath (no stale programs)
        // and keeps the subnet and the traffic.
        agent0.signal(libc::SIGTERM);
        assert_eq!(agent0.wait_exit(LONG), Some(0), "log:\n{}", agent0.log());
        assert!(cluster.nodes[0].pin_dir.exists(), "SIGTERM leaves the pins");
        let agent0 = AgentProcess::spawn_with_env(
            &cluster.nodes[0].ns,
            &seeds_args(&cluster, 0, "vxlan"),
            &[],
        );
        agent0.wait_for_log("wrote the subnet file", LONG);
        assert!(
            !cluster.nodes[0].pin_dir.exists(),
            "the eBPF pins were removed"
        );
        assert_eq!(subnet_of(&cluster, 0), subnet0);
        wait_until(LONG, "pod 1 -> pod 0 on the kernel path", || {
            cluster.nodes[1].pods[0].ping_once(pod0)
        });
    }
}
