//! `overlay-agent status --json` and `/metrics` against real agents: the JSON matches what
//! etcd and the pinned datapath hold, with the agent running and after it died; the
//! Prometheus text parses and its counters rise with traffic.

use std::{process::Command, time::Duration};

use overlay_agent::dataplane::ebpf::{counters_by_name, read_pinned_stats};
use overlay_tests::{
    agent::{AgentProcess, agent_binary},
    topology::Cluster,
    wait_until,
};
use serde_json::Value;

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTH_PORT: u16 = 9911;
const LONG: Duration = Duration::from_secs(30);

fn status_json(cluster: &Cluster, node: usize) -> Value {
    let n = &cluster.nodes[node];
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.ns.name()))
        .arg(agent_binary())
        .args([
            "status".to_owned(),
            "--json".to_owned(),
            format!("--healthz-port={HEALTH_PORT}"),
            format!("--etcd-endpoints={}", cluster.etcd_endpoint()),
            format!("--subnet-file={}", n.subnet_file().display()),
            format!("--bpf-pin-dir={}", n.pin_dir.display()),
            "--backend=ebpf".to_owned(),
        ])
        .output()
        .expect("overlay-agent status --json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "status --json is not JSON ({err}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn http_get(cluster: &Cluster, node: usize, path: &str) -> String {
    cluster.nodes[node].ns.http_get(HEALTH_PORT, path)
}

/// Parses Prometheus text exposition: every non-comment line is `name{labels} value`.
fn parse_metrics(body: &str) -> Vec<(String, f64)> {
    let text = body.split_once("\r\n\r\n").map_or(body, |(_, b)| b);
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            assert!(
                name.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_'),
                "bad metric name in {l:?}"
            );
            (name.to_owned(), value)
        })
        .collect()
}

fn metric(metrics: &[(String, f64)], name: &str) -> f64 {
    metrics
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0.0, |(_, v)| *v)
}

fn lease_json(cluster: &Cluster, subnet: &str) -> Value {
    let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
    let value = cluster
        .etcd()
        .get(&key)
        .unwrap_or_else(|| panic!("no lease at {key}"));
    serde_json::from_str(&value).expect("lease JSON")
}

#[test]
fn status_json_matches_etcd_and_the_datapath_and_metrics_count_traffic() {
    let mut cluster = Cluster::new(2);
    cluster.put_config("/coreos.com/network", CONFIG);
    let endpoint = cluster.etcd_endpoint();
    let mut agents: Vec<AgentProcess> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut args = node.agent_args(&endpoint, "ebpf");
            args.push(format!("--healthz-port={HEALTH_PORT}"));
            args.push("--healthz-ip=127.0.0.1".to_owned());
            AgentProcess::spawn(&node.ns, &args)
        })
        .collect();
    for node in &cluster.nodes {
        wait_until(LONG, "subnet.env", || node.subnet_env().is_some());
    }
    let subnets: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.subnet_env().expect("env")["FLANNEL_SUBNET"].clone())
        .collect();
    for (node, subnet) in cluster.nodes.iter_mut().zip(&subnets) {
        node.add_pod(subnet, 1450);
    }
    let target = cluster.nodes[1].pods[0].ip;
    wait_until(LONG, "pod 0 reaches pod 1", || {
        cluster.nodes[0].pods[0].ping_once(target)
    });

    // /metrics parses and its counters rise with traffic (the agent copies them every few s).
    let before = parse_metrics(&http_get(&cluster, 0, "/metrics"));
    assert_eq!(metric(&before, "overlay_ready"), 1.0);
    assert_eq!(metric(&before, "overlay_kernel_fallback"), 0.0);
    assert_eq!(metric(&before, "overlay_peers{backend=\"vxlan\"}"), 1.0);
    // Pings are not TCP/UDP: every one is seen by the pod veth program and handed to the kernel.
    let encap = "overlay_datapath_packets_total{counter=\"kernel_not_ours\"}";
    let encap_before = metric(&before, encap);
    cluster.nodes[0].pods[0]
        .ns
        .run(&["ping", "-c", "20", "-i", "0.01", "-q", &target.to_string()]);
    wait_until(
        LONG,
        "/metrics kernel_not_ours to rise by the 20 pings",
        || metric(&parse_metrics(&http_get(&cluster, 0, "/metrics")), encap) >= encap_before + 20.0,
    );

    // status --json from the running agent matches etcd and the pinned maps.
    let check = |status: &Value, live: bool| {
        let own_network = subnets[0].replace(".1/", ".0/");
        assert_eq!(status["node"]["subnet"], own_network.as_str(), "{status:#}");
        assert_eq!(status["node"]["public_ip"], "192.168.100.1", "{status:#}");
        assert_eq!(status["node"]["active_datapath"], "ebpf", "{status:#}");
        let own_lease = lease_json(&cluster, &own_network);
        assert_eq!(
            status["node"]["vtep_mac"], own_lease["BackendData"]["VtepMAC"],
            "{status:#}"
        );
        let peers = status["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1, "{status:#}");
        let peer_network = subnets[1].replace(".1/", ".0/");
        let peer_lease = lease_json(&cluster, &peer_network);
        assert_eq!(peers[0]["subnet"], peer_network.as_str());
        assert_eq!(peers[0]["public_ip"], peer_lease["PublicIP"]);
        assert_eq!(peers[0]["vtep_mac"], peer_lease["BackendData"]["VtepMAC"]);
        assert_eq!(peers[0]["backend"], "vxlan");
        let pinned =
            counters_by_name(&read_pinned_stats(&cluster.nodes[0].pin_dir).expect("pinned stats"));
        let reported = status["datapath_counters"]["kernel_not_ours"]
            .as_u64()
            .expect("kernel_not_ours");
        assert!(reported >= 20, "{status:#}");
        assert!(
            reported <= pinned["kernel_not_ours"],
            "reported {reported} > pinned {pinned:?}"
        );
        assert_eq!(status["ready"], live, "{status:#}");
    };
    check(&status_json(&cluster, 0), true);

    // The agent dies: status --json still answers from etcd and the pinned maps.
    agents[0].kill();
    let offline = status_json(&cluster, 0);
    check(&offline, false);
    let pinned =
        counters_by_name(&read_pinned_stats(&cluster.nodes[0].pin_dir).expect("pinned stats"));
    // The programs stay attached and keep counting (IPv6 neighbour discovery, ...), so the
    // pinned value read after the offline status can only be larger.
    let offline_count = offline["datapath_counters"]["kernel_not_ours"]
        .as_u64()
        .expect("count");
    assert!(
        offline_count >= 20 && offline_count <= pinned["kernel_not_ours"],
        "offline status {offline_count} vs pinned {pinned:?}"
    );
    drop(agents);
}
