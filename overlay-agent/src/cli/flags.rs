//! flanneld's command line: the same flag names and defaults, Go's one-dash spellings, and
//! every flag also from `FLANNELD_<FLAG>` (the command line wins), plus this project's
//! `--backend`, `--bpf-pin-dir`, `--bridge` and subcommands.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::{
    control::config::BackendType,
    control::etcd::EtcdOptions,
    control::store::{EtcdApi, EtcdApiChoice},
    os::iface::IfaceOptions,
};

/// Default `--subnet-file` (where docker and the flannel CNI plugin look).
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default `--bpf-pin-dir`: versioned so an incompatible layout gets a fresh directory.
pub const DEFAULT_BPF_PIN_DIR: &str = crate::dataplane::ebpf::DEFAULT_PIN_DIR;

#[derive(Debug, Parser)]
#[command(
    name = "overlay-agent",
    version,
    about = "flannel-compatible pod overlay network agent with an eBPF VXLAN datapath",
    long_about = "flannel-compatible pod overlay network agent with an eBPF VXLAN datapath.\n\n\
        Takes flanneld's flags (one or two dashes) and FLANNELD_* environment variables;\n\
        flanneld flags without an effect here are accepted with a note, those of modes this\n\
        agent does not offer (e.g. --kube-subnet-mgr) are refused (see docs/flags.md).\n\
        Without a subcommand it runs the agent (`run`)."
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: Flags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default when no subcommand is given).
    Run,
    /// Read or write the network config at <etcd-prefix>/config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List the subnet leases at <etcd-prefix>/subnets/.
    Leases,
    /// Manage one lease.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Show this node's lease, backend, peers and datapath counters: from the running agent
    /// (its health port) when it answers, else from the subnet file, etcd and the pinned maps.
    Status(StatusArgs),
    /// Write docker options from the subnet file (like flannel's mk-docker-opts.sh).
    DockerOpts(crate::cli::docker_opts::Args),
    /// Copy the network config and the live leases (with their remaining TTLs) from one etcd
    /// keyspace to the other, e.g. `--from v2 --to v3` once no flanneld <= v0.17 node is left.
    /// Prints the plan; writes only with --apply; never overwrites different data.
    MigrateEtcd(MigrateArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The keyspace to copy from.
    #[arg(long, value_enum)]
    pub from: EtcdApi,
    /// The keyspace to copy to.
    #[arg(long, value_enum)]
    pub to: EtcdApi,
    /// Write (without it: only print what would be written).
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON (the same document as the agent's /status endpoint).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a network config and write it to etcd; prints the normalized config.
    Set {
        /// The config as JSON, e.g. '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        json: Option<String>,
        /// Read the config from this file instead.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print the network config from etcd and its normalized form.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Delete a lease so its subnet can be reused: the answer to "out of subnets" caused by
    /// dead nodes, whose leases otherwise last 24 h. Do not release the lease of a running
    /// node: it re-acquires it, and its pods are unreachable meanwhile.
    Release {
        /// The subnet, e.g. 10.5.52.0/24 (or the key form 10.5.52.0-24).
        #[arg(required_unless_present = "public_ip", conflicts_with = "public_ip")]
        subnet: Option<String>,
        /// Release every lease held by this PublicIP instead.
        #[arg(long)]
        public_ip: Option<Ipv4Addr>,
    },
}

/// flanneld's flags (and this project's additions). Global, so they may also follow a
/// subcommand.
#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// etcd prefix under which the config and leases live.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// TLS client key file for etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// TLS client certificate file for etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// TLS CA file that signed etcd's server certificate.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// etcd v3 auth user name.
    #[arg(long, global = true, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd v3 auth password.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// Which etcd keyspace holds the network: v3 (flannel >= v0.18), v2 (flanneld <= v0.17,
    /// `etcdctl mk`/`set`), or auto: v3 when it holds <prefix>/config, else v2.
    #[arg(long, global = true, env = "FLANNELD_ETCD_API", value_enum, default_value_t = EtcdApiChoice::Auto)]
    pub etcd_api: EtcdApiChoice,
    /// Interface (name or IPv4 address) to use for inter-host traffic; repeatable, first
    /// match wins. Default: the interface of the default route.
    #[arg(long, global = true, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// Regex matched against interface addresses, then names; repeatable.
    #[arg(long, global = true, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface of the route to this address.
    #[arg(long, global = true, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// Address to advertise in the lease (default: the chosen interface's).
    #[arg(long, global = true, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Where to write FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ.
    #[arg(long, global = true, env = "FLANNELD_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires (0 < m < 1440).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..1440)
    )]
    pub subnet_lease_renew_margin: u32,
    /// Install masquerade rules for traffic leaving the overlay network.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_IP_MASQ",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = crate::cli::compat_flags::GoBool,
        action = clap::ArgAction::Set
    )]
    pub ip_masq: bool,
    /// Re-check the --ip-masq rules every this many seconds (restoring them when removed).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_IPTABLES_RESYNC",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub iptables_resync: u64,
    /// Install flanneld's FORWARD accept rules for the pod network in iptables' filter table
    /// (needed when Docker sets the FORWARD policy to DROP); kept by the same resync.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub iptables_forward_rules: bool,
    /// Address for the /healthz and /readyz endpoint.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_HEALTHZ_IP",
        default_value = "0.0.0.0"
    )]
    pub healthz_ip: IpAddr,
    /// Port for /healthz and /readyz (0 = off).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_HEALTHZ_PORT",
        default_value_t = 0
    )]
    pub healthz_port: u16,
    /// Log verbosity (0 = info, 1-2 = debug, 3+ = trace; RUST_LOG overrides).
    #[arg(
        short = 'v',
        long = "v",
        global = true,
        env = "FLANNELD_V",
        default_value_t = 0
    )]
    pub verbosity: u8,
    /// flanneld's flags that are not implemented here: accepted with a note, or refused.
    #[command(flatten)]
    pub compat: crate::cli::compat_flags::CompatFlags,
    /// Dataplane: ebpf, vxlan or host-gw (default: the config's Backend.Type).
    #[arg(long, global = true, env = "FLANNELD_BACKEND")]
    pub backend: Option<BackendType>,
    /// Which fast-path pieces `--backend=ebpf` uses for flows that crossed the kernel path
    /// unchanged: `all` (default), `none` (anti-spoofing and counters only; the kernel
    /// forwards everything), or a comma-separated list of `rx-after-decap`, `tx`,
    /// `rx-before-decap` (see docs/ebpf-datapath.md).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_EBPF_FAST_PATH",
        default_value = "all"
    )]
    pub ebpf_fast_path: crate::dataplane::ebpf::FastPath,
    /// bpffs directory for pinned maps and links (versioned layout).
    #[arg(long, global = true, env = "FLANNELD_BPF_PIN_DIR", default_value = DEFAULT_BPF_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// The pod bridge (default: the interface holding an address in our subnet).
    #[arg(long, global = true, env = "FLANNELD_BRIDGE")]
    pub bridge: Option<String>,
    /// Unix socket where the `flannel` CNI plugin tells the agent about pods it adds and
    /// deletes (default: overlay-agent.sock beside --subnet-file, where the plugin looks;
    /// an empty value turns it off).
    #[arg(long, global = true, env = "FLANNELD_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// Seconds between the dataplane's netlink re-checks (pods, bridge, devices, next
    /// hops). CNI notices and peer changes apply at once regardless.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_MAINTAIN_INTERVAL",
        default_value_t = 1,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub maintain_interval: u64,
    /// Route each peer through a kernel nexthop object (`ip nexthop`; Linux 5.3+) instead
    /// of flannel's gateway route: the same forwarding, but `ip route` shows
    /// `<subnet> nhid <id> via ...`, and the kernel inserts these in constant time where
    /// flannel's routes cost time growing with the number of peers (10,000 peers: ~2 s of
    /// route inserts, 20,000: ~10-24 s). vxlan and ebpf backends; off by default, when from
    /// 1,000 peers new routes go in this way for the sync and are rewritten in flannel's
    /// form while the agent is idle; with the flag they stay (no rewrite).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_NEXTHOP_OBJECTS",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = crate::cli::compat_flags::GoBool,
        action = clap::ArgAction::Set
    )]
    pub nexthop_objects: bool,
}

impl Flags {
    /// The etcd connection options.
    pub fn etcd_options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self
                .etcd_endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            prefix: self.etcd_prefix.trim_end_matches('/').to_string(),
            keyfile: self.etcd_keyfile.clone(),
            certfile: self.etcd_certfile.clone(),
            cafile: self.etcd_cafile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }

    /// Where to serve CNI plugin notices, if anywhere (`--cni-socket`).
    pub fn cni_socket_path(&self) -> Option<PathBuf> {
        match &self.cni_socket {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path.clone()),
            None => Some(crate::cni::agent_socket::default_socket_path(
                &self.subnet_file,
            )),
        }
    }

    /// The interface selection options.
    pub fn iface_options(&self) -> IfaceOptions {
        IfaceOptions {
            iface: self.iface.clone(),
            iface_regex: self.iface_regex.clone(),
            iface_can_reach: self.iface_can_reach,
            public_ip: self.public_ip,
        }
    }

    /// `--iptables-resync` as a duration.
    pub fn iptables_resync(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.iptables_resync)
    }

    /// `--subnet-lease-renew-margin` as a duration.
    pub fn renew_margin(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60)
    }
}

impl Cli {
    /// Parses the process arguments, accepting Go's one-dash long flags.
    pub fn parse_args() -> Cli {
        Cli::parse_from(normalize_args(std::env::args_os()))
    }

    /// Like [`Cli::parse_args`] for a given argv (tests).
    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Cli::try_parse_from(normalize_args(args))
    }
}

/// Every long flag name the command knows (including subcommands').
fn long_flag_names() -> Vec<String> {
    fn collect(cmd: &clap::Command, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                out.push(long.to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            collect(sub, out);
        }
    }
    let mut names = vec!["help".to_string(), "version".to_string()];
    collect(&Cli::command(), &mut names);
    names
}

/// Rewrites Go-style `-etcd-endpoints=...` / `-etcd-prefix X` to the double-dash form.
/// Only known long flag names are rewritten, so short flags (`-v 2`, `-v=2`, `-k KEY`) and
/// values that happen to start with a dash are left alone; nothing after `--` is touched.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let names = long_flag_names();
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        if let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) {
            let name = rest.split_once('=').map_or(rest, |(n, _)| n);
            if name.len() > 1 && names.iter().any(|n| n == name) {
                out.push(OsString::from(format!("-{s}")));
                continue;
            }
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut argv = vec!["overlay-agent"];
        argv.extend_from_slice(args);
        Cli::try_parse_args(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn defaults_match_flanneld() {
        let cli = parse(&[]);
        let f = &cli.flags;
        assert!(cli.command.is_none());
        assert_eq!(f.etcd_endpoints, "http://127.0.0.1:2379");
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq);
        assert_eq!(f.healthz_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.iptables_resync, 5);
        assert_eq!(f.verbosity, 0);
        assert_eq!(f.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/overlay/v2"));
        assert_eq!(f.backend, None);
    }

    #[test]
    fn go_one_dash_spellings_work() {
        let cli = parse(&[
            "-etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "-etcd-prefix=/kube-centos/network",
            "-etcd-cafile",
            "/etc/ca.pem",
            "-ip-masq",
            "-iface=eth1",
            "-iface",
            "10.0.0.5",
            "-v",
            "2",
        ]);
        let f = &cli.flags;
        assert_eq!(
            f.etcd_options().endpoints,
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(f.etcd_prefix, "/kube-centos/network");
        assert_eq!(f.etcd_cafile, Some(PathBuf::from("/etc/ca.pem")));
        assert!(f.ip_masq);
        assert_eq!(f.iface, vec!["eth1", "10.0.0.5"]);
        assert_eq!(f.verbosity, 2);
        assert_eq!(parse(&["-v=3"]).flags.verbosity, 3);
        assert_eq!(parse(&["-v4"]).flags.verbosity, 4);
    }

    #[test]
    fn bool_flag_takes_go_values() {
        assert!(!parse(&["--ip-masq=false"]).flags.ip_masq);
        assert!(parse(&["-ip-masq=true"]).flags.ip_masq);
    }

    #[test]
    fn renew_margin_range_is_enforced() {
        let argv = ["overlay-agent", "--subnet-lease-renew-margin=0"];
        assert!(Cli::try_parse_args(argv).is_err());
        let argv = ["overlay-agent", "--subnet-lease-renew-margin=1440"];
        assert!(Cli::try_parse_args(argv).is_err());
        assert_eq!(
            parse(&["--subnet-lease-renew-margin=1439"])
                .flags
                .subnet_lease_renew_margin,
            1439
        );
    }

    #[test]
    fn backend_and_project_flags() {
        let cli = parse(&[
            "--backend=ebpf",
            "--bpf-pin-dir=/sys/fs/bpf/t1",
            "--bridge",
            "cni0",
            "-ebpf-fast-path=rx-after-decap,tx",
        ]);
        assert_eq!(
            cli.flags.ebpf_fast_path,
            crate::dataplane::ebpf::FastPath {
                rx_after_decap: true,
                tx: true,
                rx_before_decap: false
            }
        );
        assert_eq!(
            parse(&[]).flags.ebpf_fast_path,
            crate::dataplane::ebpf::FastPath::ALL
        );
        assert!(Cli::try_parse_args(["overlay-agent", "--ebpf-fast-path=turbo"]).is_err());
        assert_eq!(cli.flags.backend, Some(BackendType::Ebpf));
        assert_eq!(cli.flags.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/t1"));
        assert_eq!(cli.flags.bridge.as_deref(), Some("cni0"));
        assert!(Cli::try_parse_args(["overlay-agent", "--backend=udp"]).is_err());
    }

    #[test]
    fn subcommands_parse_and_flags_may_follow_them() {
        let cli = parse(&[
            "config",
            "set",
            r#"{"Network":"10.5.0.0/16"}"#,
            "-etcd-prefix=/p",
        ]);
        assert!(matches!(
            cli.command,
            Some(Command::Config(ConfigCommand::Set {
                json: Some(_),
                file: None
            }))
        ));
        assert_eq!(cli.flags.etcd_prefix, "/p");
        let cli = parse(&["lease", "release", "10.5.3.0/24"]);
        assert!(matches!(
            cli.command,
            Some(Command::Lease(LeaseCommand::Release {
                subnet: Some(_),
                public_ip: None
            }))
        ));
        let cli = parse(&["lease", "release", "--public-ip", "192.168.1.9"]);
        assert!(matches!(
            cli.command,
            Some(Command::Lease(LeaseCommand::Release {
                subnet: None,
                public_ip: Some(_)
            }))
        ));
        assert!(matches!(parse(&["leases"]).command, Some(Command::Leases)));
        assert!(matches!(parse(&["run"]).command, Some(Command::Run)));
        assert!(Cli::try_parse_args(["overlay-agent", "config", "set"]).is_err());
    }

    #[test]
    fn values_starting_with_a_dash_and_after_double_dash_are_untouched() {
        let out = normalize_args(["a", "-etcd-password", "-secret", "--", "-etcd-prefix"]);
        assert_eq!(
            out,
            vec!["a", "--etcd-password", "-secret", "--", "-etcd-prefix"]
        );
    }
}
