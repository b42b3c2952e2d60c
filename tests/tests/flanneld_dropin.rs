//! The agent started as flanneld is: every flag of docs/flags.md (flanneld v0.7 to v0.26),
//! the seeds' FLANNEL_OPTIONS, and `--backend=ebpf` on a vxlan config without a false
//! "the network config changed" warning.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Command, time::Duration};

use overlay_agent::cli::compat_flags::{FLANNELD_FLAGS, Handling};
use overlay_tests::{
    agent::{AgentProcess, agent_binary},
    etcd::EtcdOptions,
    require_root,
    tls::TestPki,
    topology::{Cluster, ClusterOptions},
    wait_until,
};

const LONG: Duration = Duration::from_secs(30);
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
const SEEDS_PREFIX: &str = "/kube-centos/network";
const SEEDS_CONFIG: &str =
    r#"{ "Network": "172.30.0.0/16", "SubnetLen": 24, "Backend": { "Type": "vxlan" } }"#;

/// How this test passes each flag of docs/flags.md (data, so that a flag added to the table
/// is one line here). Placeholders: {etcd} {ca} {cert} {key} {subnet_file} {pin_dir} {port}.
/// Refused flags get a value that selects their mode (not flanneld's default).
const FLAG_ARGS: &[(&str, &[&str])] = &[
    ("etcd-endpoints", &["-etcd-endpoints={etcd}"]),
    ("etcd-prefix", &["-etcd-prefix=/every-flag"]),
    ("etcd-keyfile", &["-etcd-keyfile={key}"]),
    ("etcd-certfile", &["-etcd-certfile", "{cert}"]),
    ("etcd-cafile", &["--etcd-cafile={ca}"]),
    ("etcd-username", &["-etcd-username=root"]),
    ("etcd-password", &["-etcd-password=rootpw"]),
    ("iface", &["-iface=eth0", "-iface=192.168.100.1"]),
    ("iface-regex", &["-iface-regex=^eth0$"]),
    ("iface-can-reach", &["-iface-can-reach=192.168.100.254"]),
    ("public-ip", &["-public-ip=192.168.100.1"]),
    ("public-ipv6", &["-public-ipv6=fd00::1"]),
    ("subnet-file", &["-subnet-file={subnet_file}"]),
    (
        "subnet-lease-renew-margin",
        &["-subnet-lease-renew-margin=30"],
    ),
    ("ip-masq", &["-ip-masq"]),
    ("healthz-ip", &["-healthz-ip=127.0.0.1"]),
    ("healthz-port", &["-healthz-port={port}"]),
    ("iptables-resync", &["-iptables-resync=7"]),
    ("iptables-forward-rules", &["-iptables-forward-rules=true"]),
    ("version", &["-version"]),
    ("help", &["-help"]),
    ("v", &["-v=1"]),
    ("vmodule", &["-vmodule=main=2"]),
    ("log_backtrace_at", &["-log_backtrace_at=main.go:1"]),
    ("logtostderr", &["-logtostderr"]),
    ("alsologtostderr", &["-alsologtostderr=false"]),
    ("stderrthreshold", &["-stderrthreshold=INFO"]),
    ("log_dir", &["-log_dir=/var/log/flannel"]),
    ("kube-subnet-mgr", &["-kube-subnet-mgr"]),
    ("kube-api-url", &["-kube-api-url=https://10.0.0.1:6443"]),
    (
        "kubeconfig-file",
        &["-kubeconfig-file=/etc/kubernetes/kubeconfig"],
    ),
    (
        "kube-annotation-prefix",
        &["-kube-annotation-prefix=example.com"],
    ),
    (
        "net-config-path",
        &["-net-config-path=/etc/flannel/net-conf.json"],
    ),
    (
        "set-node-network-unavailable",
        &["-set-node-network-unavailable=false"],
    ),
    ("use-multi-cluster-cidr", &["-use-multi-cluster-cidr=true"]),
    ("listen", &["-listen=:8888"]),
    ("remote", &["-remote=10.0.0.1:8888"]),
    ("remote-keyfile", &["-remote-keyfile=/etc/flannel/key.pem"]),
    (
        "remote-certfile",
        &["-remote-certfile=/etc/flannel/cert.pem"],
    ),
    ("remote-cafile", &["-remote-cafile=/etc/flannel/ca.pem"]),
    ("networks", &["-networks=blue,green"]),
    ("watch-networks", &["-watch-networks"]),
    ("subnet-dir", &["-subnet-dir=/run/flannel/other"]),
];

/// (flag name, "implemented" | "no effect" | "refused") from docs/flags.md.
fn docs_table() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/flags.md"))
        .expect("docs/flags.md");
    doc.lines()
        .filter(|l| l.starts_with("| `-"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1]
                    .trim_matches('`')
                    .trim_start_matches('-')
                    .to_owned(),
                cells[3].to_owned(),
            )
        })
        .collect()
}

fn args_of(name: &str) -> &'static [&'static str] {
    FLAG_ARGS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("FLAG_ARGS has no entry for --{name}"))
        .1
}

fn fill(arg: &str, values: &[(&str, String)]) -> String {
    values.iter().fold(arg.to_owned(), |a, (k, v)| {
        a.replace(&format!("{{{k}}}"), v)
    })
}

/// Runs the binary in the test's own namespace (for flags that stop it before any network
/// work); returns (exit code, stdout, stderr). An agent still running after 20 s (e.g. one
/// that took a refused flag and went on to wait for etcd) is killed and fails the test.
fn run_quick(args: &[String], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(agent_binary())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("run overlay-agent");
    let mut status = None;
    let exited = overlay_tests::try_wait_until(Duration::from_secs(20), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(
        exited,
        "overlay-agent {args:?} still running after 20 s:\n{err}"
    );
    (status.and_then(|s| s.code()), out, err)
}

/// The status line of the node's /readyz.
fn readyz(cluster: &Cluster, port: u16) -> String {
    let response = cluster.nodes[0].ns.http_get(port, "/readyz");
    response.lines().next().unwrap_or("").trim().to_owned()
}

/// A one-node cluster whose etcd (in the fabric, 192.168.100.254:2379) serves mTLS.
fn cluster_with_tls_etcd(pki: &TestPki) -> Cluster {
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 1,
        etcd: false,
        ..ClusterOptions::default()
    });
    cluster.start_etcd(&EtcdOptions {
        tls: Some(pki.etcd_tls()),
        ..EtcdOptions::default()
    });
    cluster
}

/// The table in the docs, the agent's own table and this test's list name the same flags,
/// and every flag the docs call implemented is one the agent's command line knows.
#[test]
fn docs_code_and_this_test_list_the_same_flags() {
    let docs: BTreeSet<(String, String)> = docs_table().into_iter().collect();
    let code: BTreeSet<(String, String)> = FLANNELD_FLAGS
        .iter()
        .map(|f| {
            let word = match f.handling {
                Handling::Implemented => "implemented",
                Handling::NoEffect { .. } => "no effect",
                Handling::Refused { .. } => "refused",
            };
            (f.name.to_owned(), word.to_owned())
        })
        .collect();
    assert_eq!(docs, code, "docs/flags.md vs compat_flags::FLANNELD_FLAGS");
    let tested: BTreeSet<&str> = FLAG_ARGS.iter().map(|(n, _)| *n).collect();
    let listed: BTreeSet<&str> = docs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(tested, listed, "FLAG_ARGS vs docs/flags.md");
    // Implemented flags must be real arguments (not the compat table's catch-all).
    use clap::CommandFactory;
    let cmd = overlay_agent::cli::flags::Cli::command();
    let longs: BTreeSet<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    for (name, word) in &docs {
        if word == "implemented" && name != "help" && name != "version" {
            assert!(
                longs.contains(name.as_str()),
                "docs/flags.md says --{name} is implemented, but the agent has no such flag"
            );
        }
    }
}

#[test]
fn every_flag_in_docs_flags_md_is_handled_as_the_table_says() {
    require_root();
    let pki = TestPki::generate(&[ETCD_IP]);
    let mut cluster = cluster_with_tls_etcd(&pki);
    cluster.put_config(
        "/every-flag",
        r#"{"Network":"10.40.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    // etcd v3 auth on top of mTLS: --etcd-username/--etcd-password are really used.
    let etcd = cluster.etcd_mut();
    etcd.etcdctl(&["user", "add", "root:rootpw"]);
    etcd.etcdctl(&["user", "grant-role", "root", "root"]);
    etcd.etcdctl(&["auth", "enable"]);
    etcd.set_etcdctl_user("root:rootpw");

    let port: u16 = 18490;
    let node = &cluster.nodes[0];
    let values = [
        ("etcd", format!("https://{ETCD_IP}:2379")),
        ("ca", pki.path("ca.pem").display().to_string()),
        ("cert", pki.path("client.pem").display().to_string()),
        ("key", pki.path("client.key").display().to_string()),
        ("subnet_file", node.subnet_file().display().to_string()),
        ("pin_dir", node.pin_dir.display().to_string()),
        ("port", port.to_string()),
    ];
    let table = docs_table();

    // 1. Every implemented and no-effect flag at once (but --help/--version, which exit):
    //    the agent starts, becomes ready, and logs each no-effect line exactly once.
    let mut args = vec![format!("-bpf-pin-dir={}", node.pin_dir.display())];
    for (name, word) in &table {
        if word != "refused" && name != "help" && name != "version" {
            args.extend(args_of(name).iter().map(|a| fill(a, &values)));
        }
    }
    let mut agent = AgentProcess::spawn(&node.ns, &args);
    wait_until(LONG, "subnet.env from the agent given every flag", || {
        assert!(agent.is_running(), "the agent stopped:\n{}", agent.log());
        node.subnet_env().is_some()
    });
    wait_until(LONG, "/readyz 200", || {
        readyz(&cluster, port).ends_with(" 200 OK")
    });
    let env = node.subnet_env().expect("subnet.env");
    assert_eq!(env["FLANNEL_IPMASQ"], "true", "-ip-masq applied");
    assert_eq!(
        env["FLANNEL_NETWORK"], "10.40.0.0/16",
        "-etcd-prefix applied"
    );
    let log = agent.log();
    for (name, word) in &table {
        if word == "no effect" {
            let note = format!("-{name}=");
            let lines = log
                .lines()
                .filter(|l| l.contains(&note) && l.contains("has no effect here"))
                .count();
            assert_eq!(lines, 1, "one note for -{name}:\n{log}");
        }
    }
    assert!(!log.contains("is refused: it belongs to"), "{log}");
    drop(agent);

    // 2. --help and --version answer and exit 0, like flanneld's.
    let (code, out, err) = run_quick(&["-help".into()], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Usage"), "{out}");
    let (code, out, err) = run_quick(&["-version".into()], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");

    // 3. Each refused flag on its own: exit 2 before touching anything, naming the flag and
    //    saying what to use instead.
    for (name, word) in &table {
        if word != "refused" {
            continue;
        }
        let mut args: Vec<String> = args_of(name).iter().map(|a| fill(a, &values)).collect();
        args.push("-etcd-endpoints=http://127.0.0.1:9".into());
        let (code, _, err) = run_quick(&args, &[]);
        assert_eq!(code, Some(2), "-{name}: {err}");
        assert!(
            err.contains(&format!("-{name}="))
                && err.contains("is refused")
                && err.contains("which overlay-agent does not offer"),
            "-{name}: {err}"
        );
    }
    // flanneld reads FLANNELD_<FLAG> for every flag: so are the refused ones.
    let (code, _, err) = run_quick(
        &["-etcd-endpoints=http://127.0.0.1:9".into()],
        &[("FLANNELD_KUBE_SUBNET_MGR", "true")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--etcd-endpoints/--etcd-prefix"), "{err}");
}

/// The seeds' /etc/sysconfig/flanneld FLANNEL_OPTIONS plus the two flags real units add.
/// (-subnet-file and -bpf-pin-dir only keep the test off the host's own files.)
#[test]
fn the_seeds_flannel_options_start_the_agent() {
    require_root();
    let pki = TestPki::generate(&[ETCD_IP]);
    let cluster = cluster_with_tls_etcd(&pki);
    cluster.put_config(SEEDS_PREFIX, SEEDS_CONFIG);
    let node = &cluster.nodes[0];
    let args = vec![
        format!("-etcd-endpoints=https://{ETCD_IP}:2379"),
        format!("-etcd-prefix={SEEDS_PREFIX}"),
        "-iface=eth0".to_owned(),
        "-ip-masq".to_owned(),
        format!("-etcd-cafile={}", pki.path("ca.pem").display()),
        format!("-etcd-certfile={}", pki.path("client.pem").display()),
        format!("-etcd-keyfile={}", pki.path("client.key").display()),
        "-logtostderr".to_owned(),
        "--iptables-forward-rules".to_owned(),
        format!("-subnet-file={}", node.subnet_file().display()),
        format!("-bpf-pin-dir={}", node.pin_dir.display()),
    ];
    let mut agent = AgentProcess::spawn(&node.ns, &args);
    wait_until(LONG, "subnet.env from the seeds' options", || {
        assert!(agent.is_running(), "the agent stopped:\n{}", agent.log());
        node.subnet_env().is_some()
    });
    assert!(agent.is_running(), "{}", agent.log());
    let env = node.subnet_env().expect("subnet.env");
    assert_eq!(env["FLANNEL_NETWORK"], "172.30.0.0/16");
    assert_eq!(env["FLANNEL_IPMASQ"], "true");
    assert_eq!(env["FLANNEL_MTU"], "1450");
    let key_prefix = format!("{SEEDS_PREFIX}/subnets/172.30.");
    let keys = cluster.etcd().keys(&format!("{SEEDS_PREFIX}/subnets/"));
    assert!(
        keys.len() == 1 && keys[0].starts_with(&key_prefix),
        "one lease: {keys:?}"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("-logtostderr=true (a flanneld flag) has no effect here")
            .count(),
        1,
        "{log}"
    );
}

/// `--backend=ebpf` on a config saying vxlan is the normal eBPF node; the config watch
/// must compare that with etcd's config after the same override, not warn at once.
#[test]
fn an_ebpf_override_of_a_vxlan_config_is_no_config_change_but_a_real_change_is() {
    require_root();
    let cluster = Cluster::new(1);
    let config = r#"{"Network":"10.41.0.0/16","Backend":{"Type":"vxlan"}}"#;
    cluster.put_config("/override", config);
    let node = &cluster.nodes[0];
    let mut args = node.agent_args(&cluster.etcd_endpoint(), "ebpf");
    args.push("-etcd-prefix=/override".into());
    let agent = AgentProcess::spawn(&node.ns, &args);
    agent.wait_for_log("watching the network config for changes", LONG);
    // Rewritten with other spelling: still the same config.
    cluster.put_config(
        "/override",
        r#"{"network": "10.41.0.0/16", "backend": {"type": "vxlan"}}"#,
    );
    agent.wait_for_log("network config rewritten without changes", LONG);
    let log = agent.log();
    assert!(
        !log.contains("the network config changed"),
        "a config equal to the running one (after --backend) was reported as changed:\n{log}"
    );
    // A real change (another VNI) is still reported.
    cluster.put_config(
        "/override",
        r#"{"Network":"10.41.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#,
    );
    agent.wait_for_log("the network config changed", LONG);
}
