//! The `flannel` CNI plugin (issue 14): the agent binary linked as `flannel`, driven as a
//! runtime drives it (CNI_* variables, netconf on stdin, real namespaces), delegating to
//! Debian's real bridge/host-local/portmap plugins; with real agents for cross-node pods
//! and for the notice that puts a pod on the eBPF fast path at once.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use overlay_tests::{
    agent::AgentProcess,
    cni::{CniRuntime, Invocation, first_ipv4, pinned_endpoints},
    netns::NetNs,
    require_root,
    topology::{Cluster, ClusterOptions, Node},
    try_wait_until, wait_until,
};
use serde_json::{Value, json};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LONG: Duration = Duration::from_secs(30);

/// A node without an agent: a hand-written subnet.env, as the agent would write it.
fn node_with_subnet_env() -> Cluster {
    let cluster = Cluster::with(ClusterOptions {
        nodes: 1,
        etcd: false,
        ..ClusterOptions::default()
    });
    std::fs::write(
        cluster.nodes[0].subnet_file(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
    )
    .expect("subnet.env");
    cluster
}

fn ip_json(ns: &NetNs, argv: &[&str]) -> Value {
    let mut full = vec!["ip", "-j", "-d"];
    full.extend_from_slice(argv);
    serde_json::from_str(&ns.stdout(&full)).expect("ip -j JSON")
}

fn host_local_files(runtime: &CniRuntime) -> Vec<String> {
    std::fs::read_dir(runtime.ipam_dir().join("cbr0"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// ADD for two pods, checked against what the conflist asks for; they reach each other;
/// DEL releases everything and is idempotent. Both result layouts (0.3.1 and 1.0.0).
#[test]
fn add_two_pods_del_releases_everything_for_0_3_1_and_1_0_0() {
    require_root();
    for version in ["0.3.1", "1.0.0"] {
        let mut cluster = node_with_subnet_env();
        let runtime = CniRuntime::new();
        let node: &mut Node = &mut cluster.nodes[0];
        let conflist = runtime.flannel_conflist(version, &node.subnet_file());
        let (_, first, first_id) = runtime.add_pod(node, &conflist);
        let (_, second, second_id) = runtime.add_pod(node, &conflist);
        for result in [&first, &second] {
            assert_eq!(result["cniVersion"], version, "{result}");
            let ip = first_ipv4(result).expect("address");
            assert!(
                "10.244.5.0/24"
                    .parse::<ipnetwork::Ipv4Network>()
                    .expect("net")
                    .contains(ip)
                    && ip != Ipv4Addr::new(10, 244, 5, 1),
                "{ip} is a pod address of FLANNEL_SUBNET"
            );
            assert_eq!(result["ips"][0]["gateway"], "10.244.5.1", "{result}");
        }
        let (a, b) = (&node.pods[0], &node.pods[1]);
        assert_ne!(a.ip, b.ip);
        // Pod side: MTU from FLANNEL_MTU, default route (isDefaultGateway) via the bridge.
        let link = ip_json(&a.ns, &["link", "show", "eth0"]);
        assert_eq!(link[0]["mtu"], 1400, "{link}");
        let routes = ip_json(&a.ns, &["route", "show"]);
        let default = routes
            .as_array()
            .expect("routes")
            .iter()
            .find(|r| r["dst"] == "default")
            .unwrap_or_else(|| panic!("no default route: {routes}"));
        assert_eq!(default["gateway"], "10.244.5.1");
        // Node side: cni0 with the gateway address, hairpin on the pod's bridge port.
        let bridge = ip_json(&node.ns, &["addr", "show", "cni0"]);
        let addrs: Vec<&str> = bridge[0]["addr_info"]
            .as_array()
            .expect("addrs")
            .iter()
            .filter_map(|a| a["local"].as_str())
            .collect();
        assert!(addrs.contains(&"10.244.5.1"), "cni0 addresses {addrs:?}");
        let host_veth = first["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .find(|i| i.get("sandbox").is_none() && i["name"] != "cni0")
            .and_then(|i| i["name"].as_str())
            .expect("host veth in the result")
            .to_owned();
        let port = ip_json(&node.ns, &["link", "show", &host_veth]);
        assert_eq!(
            port[0]["linkinfo"]["info_slave_data"]["hairpin"], true,
            "hairpin on {host_veth}: {port}"
        );
        // The delegate netconf is saved as flannel saves it.
        let saved: Value = serde_json::from_slice(
            &std::fs::read(runtime.data_dir().join(&first_id)).expect("saved netconf"),
        )
        .expect("JSON");
        assert_eq!(saved["type"], "bridge");
        assert_eq!(
            saved["ipam"]["ranges"],
            json!([[{"subnet": "10.244.5.0/24"}]])
        );
        assert_eq!(saved["ipam"]["routes"], json!([{"dst": "10.244.0.0/16"}]));
        assert_eq!(saved["mtu"], 1400);
        assert_eq!(saved["ipMasq"], true);
        assert_eq!(host_local_files(&runtime).len(), 2);

        assert!(a.ping_once(b.ip), "pod {} reaches pod {}", a.ip, b.ip);

        // DEL of the first pod (namespace still there, as kubelet does it): released.
        let pod_ns = node.pods.remove(0).ns;
        for call in runtime.del_list(&node.ns, &conflist, &first_id, Some(&pod_ns), Some(&first)) {
            call.expect_ok("DEL");
        }
        assert!(
            !runtime.data_dir().join(&first_id).exists(),
            "saved netconf removed"
        );
        assert_eq!(host_local_files(&runtime).len(), 1, "one address left");
        assert!(
            !node
                .ns
                .try_run(&["ip", "link", "show", &host_veth])
                .status
                .success(),
            "{host_veth} deleted"
        );
        // Idempotent: again, and once more without the namespace (the spec allows both).
        for call in runtime.del_list(&node.ns, &conflist, &first_id, Some(&pod_ns), None) {
            call.expect_ok("second DEL");
        }
        drop(pod_ns);
        for call in runtime.del_list(&node.ns, &conflist, &second_id, None, Some(&second)) {
            call.expect_ok("DEL without a netns");
        }
        assert!(
            host_local_files(&runtime).is_empty(),
            "every address released"
        );
    }
}

fn error_of(call: Invocation) -> (u64, String) {
    assert!(!call.success, "expected a CNI error, got {}", call.stdout);
    (
        call.stdout["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code: {}", call.stdout)),
        format!("{} {}", call.stdout["msg"], call.stdout["details"]),
    )
}

/// Bad input gives the spec's error JSON with a message that says what is wrong.
#[test]
fn bad_input_gives_cni_errors_that_name_the_problem() {
    require_root();
    let cluster = node_with_subnet_env();
    let runtime = CniRuntime::new();
    let node = &cluster.nodes[0];
    let pod = NetNs::new("op");
    let good = |extra: Value| {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": node.subnet_file(), "dataDir": runtime.data_dir(),
            "ipam": {"dataDir": runtime.ipam_dir()}
        });
        for (k, v) in extra.as_object().expect("object") {
            conf[k] = v.clone();
        }
        conf
    };
    let add = |conf: &Value| runtime.invoke(&node.ns, conf, "ADD", "c1", Some(&pod));

    let (code, text) = error_of(add(&good(json!({"subnetFile": "/nonexistent/subnet.env"}))));
    assert_eq!(code, 11, "{text}");
    assert!(text.contains("is the overlay agent running?"), "{text}");

    let (code, text) = error_of(runtime.invoke_program(
        &node.ns,
        &runtime.flannel(),
        &Value::String("{\"cniVersion\": \"1.0.0\", ".into()),
        "ADD",
        "c1",
        Some(&pod),
    ));
    assert_eq!(code, 6, "{text}");
    assert!(text.contains("not valid JSON"), "{text}");

    let (code, text) = error_of(add(&good(json!({"delegate": {"type": "no-such-plugin"}}))));
    assert_eq!(code, 7, "{text}");
    assert!(
        text.contains("no-such-plugin") && text.contains("CNI_PATH"),
        "{text}"
    );

    let (code, text) = error_of(add(&good(json!({"delegate": {"name": "mine"}}))));
    assert_eq!(code, 7, "{text}");
    assert!(text.contains("'name'"), "{text}");

    let (code, text) = error_of(add(&good(json!({"cniVersion": "9.9.9"}))));
    assert_eq!(code, 1, "{text}");

    let (code, text) = error_of(runtime.invoke_raw(
        &node.ns,
        &runtime.flannel(),
        &serde_json::to_vec(&good(json!({}))).expect("json"),
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")],
    ));
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("CNI_NETNS") && text.contains("CNI_PATH"),
        "{text}"
    );

    // A delegate's own error keeps its code (bridge refuses a netns that does not exist).
    let gone = runtime.invoke_raw(
        &node.ns,
        &runtime.flannel(),
        &serde_json::to_vec(&good(json!({}))).expect("json"),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c2"),
            ("CNI_NETNS", "/run/netns/does-not-exist"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_PATH",
                &format!("{}", runtime.flannel().parent().expect("dir").display()),
            ),
        ],
    );
    let (_, text) = error_of(gone);
    assert!(text.contains("bridge"), "names the delegate: {text}");
    assert!(
        host_local_files(&runtime).is_empty(),
        "nothing allocated by failed ADDs"
    );
}

/// VERSION, STATUS (1.1.0) and CHECK (delegated with the runtime's prevResult).
#[test]
fn version_status_and_check() {
    require_root();
    let mut cluster = node_with_subnet_env();
    let runtime = CniRuntime::new();
    let node = &mut cluster.nodes[0];
    let version = runtime
        .invoke(
            &node.ns,
            &json!({"type": "flannel", "cniVersion": "1.0.0"}),
            "VERSION",
            "",
            None,
        )
        .expect_ok("VERSION");
    assert_eq!(version["cniVersion"], "1.0.0");
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .expect("list")
                .contains(&json!(v)),
            "{version}"
        );
    }
    let status = |subnet_file: &Path| {
        runtime.invoke(
            &node.ns,
            &json!({"type": "flannel", "name": "cbr0", "cniVersion": "1.1.0", "subnetFile": subnet_file}),
            "STATUS",
            "",
            None,
        )
    };
    status(&node.subnet_file()).expect_ok("STATUS with subnet.env");
    let (code, text) = error_of(status(Path::new("/nonexistent/subnet.env")));
    assert_eq!(code, 50, "{text}");

    let conflist = runtime.flannel_conflist("1.0.0", &node.subnet_file());
    let (_, result, id) = runtime.add_pod(node, &conflist);
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = json!("cbr0");
    conf["cniVersion"] = json!("1.0.0");
    conf["prevResult"] = result.clone();
    let pod_ns = &node.pods[0].ns;
    // Debian's bridge 1.1.1 CHECK compares routes without a gateway against the kernel's
    // (which has one): it refuses every flannel pod over the FLANNEL_NETWORK route. What
    // the test can prove is that CHECK reaches the delegate with the pod's prevResult:
    // the healthy pod passes the interface and address checks and stops at that route.
    let healthy = runtime.invoke(&node.ns, &conf, "CHECK", &id, Some(pod_ns));
    let healthy_text = if healthy.success {
        String::new()
    } else {
        let (_, text) = error_of(healthy);
        assert!(
            text.contains("Route") && text.contains("10.244.0.0"),
            "{text}"
        );
        text
    };
    pod_ns.run(&["ip", "addr", "flush", "dev", "eth0"]);
    let (_, text) = error_of(runtime.invoke(&node.ns, &conf, "CHECK", &id, Some(pod_ns)));
    assert_ne!(text, healthy_text, "the missing address is what fails now");
    // Unknown container: the spec's code 3.
    let (code, _) = error_of(runtime.invoke(&node.ns, &conf, "CHECK", "never-added", Some(pod_ns)));
    assert_eq!(code, 3);
    // CHECK does not exist before 0.4.0.
    conf["cniVersion"] = json!("0.3.1");
    let (code, _) = error_of(runtime.invoke(&node.ns, &conf, "CHECK", &id, Some(pod_ns)));
    assert_eq!(code, 1);
}

fn start_agent(cluster: &Cluster, index: usize, backend: &str, extra: &[&str]) -> AgentProcess {
    let node = &cluster.nodes[index];
    let mut args = node.agent_args(&cluster.etcd_endpoint(), backend);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let agent = AgentProcess::spawn(&node.ns, &args);
    assert!(
        try_wait_until(LONG, || node.subnet_env().is_some()),
        "node {} wrote no subnet.env; log:\n{}",
        index + 1,
        agent.log()
    );
    agent
}

/// Pods made by the plugin on two nodes with real agents (eBPF and kernel vxlan) reach
/// each other across nodes.
#[test]
fn plugin_pods_reach_pods_on_another_node() {
    let mut cluster = Cluster::new(2);
    cluster.put_config(PREFIX, CONFIG);
    let _agents = [
        start_agent(&cluster, 0, "ebpf", &[]),
        start_agent(&cluster, 1, "vxlan", &[]),
    ];
    let runtime = CniRuntime::new();
    for node in cluster.nodes.iter_mut() {
        let conflist = runtime.flannel_conflist("0.3.1", &node.subnet_file());
        runtime.add_pod(node, &conflist);
    }
    let (a, b) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
    wait_until(
        LONG,
        &format!("pod {} reaches pod {} across nodes", a.ip, b.ip),
        || a.ping_once(b.ip),
    );
    assert!(b.ping_once(a.ip), "and back");
    // The eBPF node knows its pod (the notice, or the poll since).
    let map = cluster.nodes[0].pin_dir.join("OVL_ENDPOINTS");
    wait_until(LONG, "the eBPF node's pod in ENDPOINTS", || {
        pinned_endpoints(&map).contains(&a.ip)
    });
}

/// With the netlink poll slowed to an hour, only the plugin's notice can put a new pod
/// into the ENDPOINTS map (and take it out): ADD returns with the endpoint there; a DEL
/// notice removes it before the delegate releases the address, and a later full pass (the
/// next ADD's) does not bring back the dying pod's veth.
#[test]
fn notice_puts_the_pod_on_the_fast_path_at_once_and_del_takes_it_off() {
    let mut cluster = Cluster::new(1);
    cluster.put_config(PREFIX, CONFIG);
    let agent = start_agent(&cluster, 0, "ebpf", &["--maintain-interval=3600"]);
    agent.wait_for_log("listening for CNI plugin notices", LONG);
    let runtime = CniRuntime::new();
    let map = cluster.nodes[0].pin_dir.join("OVL_ENDPOINTS");
    let node = &mut cluster.nodes[0];
    let conflist = runtime.flannel_conflist("1.0.0", &node.subnet_file());
    assert!(pinned_endpoints(&map).is_empty(), "no pods yet");

    let (pod, first, first_id) = runtime.add_pod(node, &conflist);
    let first_ip = pod.ip;
    assert_eq!(
        pinned_endpoints(&map),
        vec![first_ip],
        "the endpoint is there when ADD returns; agent log:\n{}",
        agent.log()
    );

    // The plugin's first step of DEL, on its own: the veth still exists afterwards.
    let socket = node.subnet_file().with_file_name("overlay-agent.sock");
    let reply = notice(&socket, "DEL", &first_id, &[]);
    assert_eq!(reply["applied"], true, "{reply}");
    assert!(
        pinned_endpoints(&map).is_empty(),
        "endpoint removed by the DEL notice"
    );

    // A second pod's ADD runs a full netlink pass: the dying pod stays off.
    let (second_pod, _, second_id) = runtime.add_pod(node, &conflist);
    let second_ip = second_pod.ip;
    assert_eq!(pinned_endpoints(&map), vec![second_ip], "only the live pod");

    // The real DEL (notice + delegate) of the first pod, then of the second.
    let first_ns = node.pods.remove(0).ns;
    for call in runtime.del_list(
        &node.ns,
        &conflist,
        &first_id,
        Some(&first_ns),
        Some(&first),
    ) {
        call.expect_ok("DEL");
    }
    let second_ns = node.pods.remove(0).ns;
    let del = runtime.del_list(&node.ns, &conflist, &second_id, Some(&second_ns), None);
    let stderr: String = del.iter().map(|c| c.stderr.clone()).collect();
    for call in del {
        call.expect_ok("DEL");
    }
    assert!(
        pinned_endpoints(&map).is_empty(),
        "DEL without prevResult: the agent remembered the address from the ADD; plugin stderr:\n{stderr}"
    );
    assert!(stderr.contains("agent notified"), "{stderr}");
}

/// One notice as the plugin sends it.
fn notice(socket: &Path, op: &str, container_id: &str, ips: &[Ipv4Addr]) -> Value {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|err| panic!("connect {}: {err}", socket.display()));
    let line = json!({"op": op, "containerId": container_id, "ips": ips}).to_string() + "\n";
    stream.write_all(line.as_bytes()).expect("send");
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .expect("reply");
    serde_json::from_str(&reply).expect("JSON reply")
}

/// A kernel-vxlan agent answers the notice without acting, and with no agent at all ADD
/// still succeeds: the notice never makes a CNI command fail.
#[test]
fn notice_never_fails_add_without_an_ebpf_agent() {
    let mut cluster = Cluster::new(1);
    cluster.put_config(PREFIX, CONFIG);
    let runtime = CniRuntime::new();
    let conflist = runtime.flannel_conflist("1.0.0", &cluster.nodes[0].subnet_file());
    {
        let _agent = start_agent(&cluster, 0, "vxlan", &[]);
        let node = &mut cluster.nodes[0];
        let ns = NetNs::new("op");
        let call = runtime.invoke(&node.ns, &conf_of(&conflist), "ADD", "v1", Some(&ns));
        let stderr = call.stderr.clone();
        call.expect_ok("ADD with a vxlan agent");
        assert!(stderr.contains("keeps no per-pod state"), "{stderr}");
    }
    // Agent gone (its socket file may stay behind): ADD works, with a note on stderr.
    let node = &mut cluster.nodes[0];
    let ns = NetNs::new("op");
    let call = runtime.invoke(&node.ns, &conf_of(&conflist), "ADD", "v2", Some(&ns));
    let stderr = call.stderr.clone();
    call.expect_ok("ADD without an agent");
    assert!(stderr.contains("agent not notified"), "{stderr}");
}

fn conf_of(conflist: &Value) -> Value {
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf
}
