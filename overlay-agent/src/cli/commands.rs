//! The operator subcommands: `config set|show`, `leases`, `lease release`, `status`.

use std::fmt::Write as _;

use crate::{
    cli::flags::{ConfigCommand, Flags, LeaseCommand, MigrateArgs},
    cli::migrate::MigrateError,
    control::config::{ConfigError, NetworkConfig},
    control::etcd::{self, EtcdError},
    control::lease::{self, LeaseError, format_mac},
    control::store::{self, KeyTtl, KvStore, Store},
    control::subnet_file::{SubnetEnv, SubnetFileError},
};

/// Errors of a subcommand; printed to stderr by main, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid network config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    SubnetFile(#[from] SubnetFileError),
    #[error(
        "no network config at {key}: write one with `overlay-agent config set '<json>'`, e.g. {}",
        crate::control::config::EXAMPLE_CONFIG
    )]
    NoConfig { key: String },
    #[error("no lease for {what} under {prefix}/subnets/ (see `overlay-agent leases`)")]
    NoSuchLease { what: String, prefix: String },
    #[error("{0}")]
    NoConfigAnywhere(String),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// The keyspace `--etcd-api` names (or, for `auto`, the one holding the config).
async fn connect(flags: &Flags) -> Result<Store, CliError> {
    store::connect_store(&flags.etcd_options(), flags.etcd_api)
        .await?
        .map_err(CliError::NoConfigAnywhere)
}

/// `config set` / `config show`. Returns what to print on stdout.
pub async fn config(flags: &Flags, cmd: &ConfigCommand) -> Result<String, CliError> {
    let opts = flags.etcd_options();
    let key = opts.config_key();
    match cmd {
        ConfigCommand::Set { json, file } => {
            let text = match (json, file) {
                (Some(j), _) => j.clone(),
                (None, Some(path)) => {
                    std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
                        path: path.clone(),
                        source,
                    })?
                }
                (None, None) => unreachable!("clap requires one of them"),
            };
            // Validate before touching etcd: a bad config must never reach the nodes.
            let parsed = NetworkConfig::parse_verbose(&text)?;
            // With `auto` and no config anywhere yet, a new cluster gets v3.
            let mut client = match store::connect_store(&opts, flags.etcd_api).await? {
                Ok(store) => store,
                Err(_) => Store::V3(etcd::connect(&opts).await?),
            };
            // Written as given (flanneld nodes may read keys we do not know); printed normalized.
            client.put(&key, text.trim()).await?;
            let mut out = format!(
                "wrote {key} (etcd {} keyspace)\n{}\n",
                client.api(),
                parsed.config.to_json()
            );
            if parsed.backend_defaulted {
                out.push_str("note: no Backend given; overlay-agent uses vxlan (flanneld would use udp): add \"Backend\": {\"Type\": \"vxlan\"} to be explicit\n");
            }
            Ok(out)
        }
        ConfigCommand::Show => {
            let mut client = connect(flags).await?;
            let (kv, _) = client.get(&key).await?;
            let kv = kv.ok_or(CliError::NoConfig { key: key.clone() })?;
            let raw = String::from_utf8_lossy(&kv.value).into_owned();
            let mut out = format!("{key}: {raw}\n");
            match NetworkConfig::parse_verbose(&raw) {
                Ok(parsed) => {
                    let _ = writeln!(out, "normalized: {}", parsed.config.to_json());
                }
                Err(err) => {
                    let _ = writeln!(out, "INVALID: {err}");
                }
            }
            Ok(out)
        }
    }
}

/// `leases`: one line per key under subnets/.
pub async fn leases(flags: &Flags) -> Result<String, CliError> {
    let opts = flags.etcd_options();
    let mut client = connect(flags).await?;
    let (leases, _) = lease::list_leases(&mut client, &opts).await?;
    let mut out = format!(
        "{:<20} {:<16} {:<8} {:<18} {}\n",
        "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "EXPIRES-IN"
    );
    for l in &leases {
        let ttl = match client.time_to_live(&l.kv).await {
            Ok(KeyTtl::Remaining(left)) => format_ttl(left.as_secs() as i64),
            Ok(KeyTtl::Never) => "never".to_string(),
            Ok(KeyTtl::Expired) | Err(_) => "expired".to_string(),
        };
        match (&l.subnet, &l.value) {
            (Some(subnet), Ok(v)) => {
                let _ = writeln!(
                    out,
                    "{:<20} {:<16} {:<8} {:<18} {}",
                    subnet.to_string(),
                    v.public_ip.to_string(),
                    v.backend_type,
                    v.vtep_mac.as_ref().map_or("-".to_string(), format_mac),
                    ttl
                );
            }
            (Some(subnet), Err(err)) => {
                let _ = writeln!(out, "{:<20} (unreadable value: {err})", subnet.to_string());
            }
            (None, _) => {
                let _ = writeln!(out, "{} (not a subnet key; ignored by the agents)", l.key);
            }
        }
    }
    let _ = writeln!(
        out,
        "{} lease(s) under {} (etcd {} keyspace)",
        leases.len(),
        opts.subnets_prefix(),
        client.api()
    );
    Ok(out)
}

fn format_ttl(secs: i64) -> String {
    format!(
        "{}h{:02}m{:02}s",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// `lease release`.
pub async fn lease(flags: &Flags, cmd: &LeaseCommand) -> Result<String, CliError> {
    let opts = flags.etcd_options();
    match cmd {
        LeaseCommand::Release { subnet, public_ip } => {
            let mut client = connect(flags).await?;
            if let Some(ip) = public_ip {
                let released = lease::release_by_public_ip(&mut client, &opts, *ip).await?;
                if released.is_empty() {
                    return Err(CliError::NoSuchLease {
                        what: format!("PublicIP {ip}"),
                        prefix: opts.prefix.clone(),
                    });
                }
                let list: Vec<String> = released.iter().map(ToString::to_string).collect();
                return Ok(format!("released {} (PublicIP {ip})\n", list.join(", ")));
            }
            let subnet_arg = subnet
                .as_deref()
                .expect("clap requires a subnet or --public-ip");
            let subnet = lease::parse_subnet_arg(subnet_arg)?;
            if lease::release(&mut client, &opts, subnet).await? {
                Ok(format!("released {subnet}\n"))
            } else {
                Err(CliError::NoSuchLease {
                    what: subnet.to_string(),
                    prefix: opts.prefix.clone(),
                })
            }
        }
    }
}

/// `status`: with `--healthz-port`, the running agent's own view (from its `/status`);
/// always this node's subnet file and whether etcd still holds its lease.
pub async fn status(
    flags: &Flags,
    args: &crate::cli::flags::StatusArgs,
) -> Result<String, CliError> {
    let mut agent_view = None;
    let mut unreachable = None;
    if flags.healthz_port != 0 {
        let ip = if flags.healthz_ip.is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            flags.healthz_ip
        };
        let addr = std::net::SocketAddr::new(ip, flags.healthz_port);
        match crate::observe::health::fetch_status(addr).await {
            Ok(status) => agent_view = Some(status),
            Err(err) => {
                unreachable = Some(format!(
                    "the agent's status endpoint is not answering: {err}"
                ))
            }
        }
    }
    if args.json {
        // The running agent's view when it answers; else what etcd and the pinned maps say.
        let status = match agent_view {
            Some(status) => status,
            None => offline_status(flags).await?,
        };
        return Ok(serde_json::to_string_pretty(&status).unwrap_or_default() + "\n");
    }
    let mut out = String::new();
    match (agent_view, unreachable) {
        (Some(status), _) => out.push_str(&crate::observe::status::render_table(&status)),
        (None, reason) => {
            if let Some(reason) = reason {
                let _ = writeln!(out, "{reason}");
            }
            let _ = writeln!(
                out,
                "(agent not answering: state read from etcd and the pinned maps)"
            );
            out.push_str(&crate::observe::status::render_table(
                &offline_status(flags).await?,
            ));
        }
    }
    out.push('\n');
    out.push_str(&local_status(flags).await?);
    Ok(out)
}

/// The node's status without the agent: lease from the subnet file and etcd, peers from
/// etcd, counters from the pinned BPF maps (if this node ran the eBPF datapath).
async fn offline_status(flags: &Flags) -> Result<crate::observe::status::AgentStatus, CliError> {
    use crate::observe::status::{AgentStatus, PeerStatus};
    let opts = flags.etcd_options();
    let mut status = AgentStatus::default();
    status.node.backend = flags
        .backend
        .map(|b| b.as_str().to_owned())
        .unwrap_or_default();
    let own = SubnetEnv::read(&flags.subnet_file)?.map(|env| env.subnet);
    let mut client = connect(flags).await?;
    status.etcd.connected = true;
    status.etcd.api = client.api().to_string();
    let (leases, _) = lease::list_leases(&mut client, &opts).await?;
    for listed in leases {
        let (Some(subnet), Ok(value)) = (listed.subnet, listed.value) else {
            continue;
        };
        if Some(subnet) == own {
            status.node.subnet = subnet.to_string();
            status.node.public_ip = value.public_ip.to_string();
            status.node.vtep_mac = value.vtep_mac.as_ref().map(lease::format_mac);
            continue;
        }
        status.peers.insert(
            subnet,
            PeerStatus {
                subnet: subnet.to_string(),
                public_ip: value.public_ip.to_string(),
                backend: value.backend_type.clone(),
                vtep_mac: value.vtep_mac.as_ref().map(lease::format_mac),
                since_unix: 0,
            },
        );
    }
    if let Ok(stats) = crate::dataplane::ebpf::read_pinned_stats(&flags.bpf_pin_dir) {
        status.datapath_counters = crate::dataplane::ebpf::counters_by_name(&stats);
        status.node.active_datapath = "ebpf".to_owned();
    }
    Ok(status)
}

async fn local_status(flags: &Flags) -> Result<String, CliError> {
    let opts = flags.etcd_options();
    let Some(env) = SubnetEnv::read(&flags.subnet_file)? else {
        return Ok(format!(
            "no subnet file at {}: the agent has not acquired a lease on this node yet\n",
            flags.subnet_file.display()
        ));
    };
    let mut out = format!("{}:\n{}", flags.subnet_file.display(), env.render());
    let mut client = connect(flags).await?;
    let key = lease::subnet_key(&opts, env.subnet);
    let (kv, _) = client.get(&key).await?;
    match kv {
        Some(kv) => {
            let _ = writeln!(out, "lease {key}: {}", String::from_utf8_lossy(&kv.value));
        }
        None => {
            let _ = writeln!(
                out,
                "lease {key}: MISSING (a running agent re-acquires it within seconds)"
            );
        }
    }
    Ok(out)
}

/// `migrate-etcd --from A --to B [--apply]`.
pub async fn migrate_etcd(flags: &Flags, args: &MigrateArgs) -> Result<String, CliError> {
    Ok(crate::cli::migrate::run(&flags.etcd_options(), args.from, args.to, args.apply).await?)
}
