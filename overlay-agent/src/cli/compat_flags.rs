//! flanneld's flags that this agent does not implement (v0.7 to v0.26, from flanneld's
//! `main.go` at each release tag, plus the glog flags v0.7's global flag set carried).
//!
//! A unit file written for flanneld must not stop the agent with "unexpected argument":
//! each such flag is either accepted with one log line saying it has no effect here, or,
//! when it selects a mode this agent does not offer (the Kubernetes subnet manager, v0.7's
//! client/server and multi-network modes), refused with what to use instead. Refused flags
//! given flanneld's default value change nothing in flanneld either, so they are accepted
//! like the no-effect ones. The flags flags.rs implements are listed too, so that
//! [`FLANNELD_FLAGS`] is the whole set (docs/flags.md is checked against it).

use std::ffi::OsStr;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, builder::PossibleValue};

/// How flanneld spells a flag's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// Go bool flag: `-flag`, `-flag=true|false` (also 1/0/t/f), never `-flag false`.
    Bool,
    /// Takes a value: `-flag=x` or `-flag x`.
    Value,
}

/// What this agent does with a flanneld flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Parsed and applied by [`crate::cli::flags::Flags`] (or clap's own `--help`/`--version`).
    Implemented,
    /// Accepted; one log line says it has no effect and why.
    NoEffect { why: &'static str },
    /// Refused unless given flanneld's default (`default`); the message says what to use.
    Refused {
        default: &'static str,
        mode: &'static str,
        instead: &'static str,
    },
}

/// One of flanneld's flags.
#[derive(Clone, Copy, Debug)]
pub struct FlanneldFlag {
    /// The name without dashes, e.g. `kube-subnet-mgr`, `log_dir`.
    pub name: &'static str,
    /// `FLANNELD_<NAME>`: flanneld reads every flag from the environment too.
    pub env: &'static str,
    /// The first and last flanneld release that accepts it (`None`: still accepted in
    /// v0.26, the last release this table covers).
    pub since: &'static str,
    pub until: Option<&'static str>,
    pub kind: ValueKind,
    pub handling: Handling,
}

const KUBE_MODE: &str = "flanneld's Kubernetes subnet manager (--kube-subnet-mgr)";
const KUBE_INSTEAD: &str = "overlay-agent keeps leases in etcd only: remove the flag, point the agent at etcd with --etcd-endpoints/--etcd-prefix and write the network config there with `overlay-agent config set '<json>'`";
const CLIENT_SERVER_MODE: &str =
    "flanneld v0.7's client/server mode (--listen/--remote, removed in flanneld v0.8)";
const CLIENT_SERVER_INSTEAD: &str = "every overlay-agent talks to etcd itself: remove the flag and give each node --etcd-endpoints (with --etcd-cafile/--etcd-certfile/--etcd-keyfile for TLS)";
const MULTI_NETWORK_MODE: &str =
    "flanneld v0.7's multi-network mode (--networks/--watch-networks, removed in flanneld v0.8)";
const MULTI_NETWORK_INSTEAD: &str = "overlay-agent serves one network, <etcd-prefix>/config: remove the flag and run one agent per network with its own --etcd-prefix and --subnet-file";
const GLOG_STDERR: &str =
    "overlay-agent always logs to stderr (journald under systemd), as flanneld does by default";
const GLOG_FILTER: &str = "log filtering here is by module, not by source file: use -v=N for overlay-agent's own modules or RUST_LOG=overlay_agent::control::watch=debug (tracing's filter syntax)";

/// Every flag flanneld v0.7.0 to v0.26.x accepts.
pub const FLANNELD_FLAGS: &[FlanneldFlag] = &[
    implemented(
        "etcd-endpoints",
        "FLANNELD_ETCD_ENDPOINTS",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-prefix",
        "FLANNELD_ETCD_PREFIX",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-keyfile",
        "FLANNELD_ETCD_KEYFILE",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-certfile",
        "FLANNELD_ETCD_CERTFILE",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-cafile",
        "FLANNELD_ETCD_CAFILE",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-username",
        "FLANNELD_ETCD_USERNAME",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "etcd-password",
        "FLANNELD_ETCD_PASSWORD",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented("iface", "FLANNELD_IFACE", "v0.7.0", ValueKind::Value),
    implemented(
        "iface-regex",
        "FLANNELD_IFACE_REGEX",
        "v0.8.0",
        ValueKind::Value,
    ),
    implemented(
        "iface-can-reach",
        "FLANNELD_IFACE_CAN_REACH",
        "v0.18.0",
        ValueKind::Value,
    ),
    implemented(
        "public-ip",
        "FLANNELD_PUBLIC_IP",
        "v0.7.0",
        ValueKind::Value,
    ),
    FlanneldFlag {
        name: "public-ipv6",
        env: "FLANNELD_PUBLIC_IPV6",
        since: "v0.15.0",
        until: None,
        kind: ValueKind::Value,
        handling: Handling::NoEffect {
            why: "overlay-agent is IPv4-only (a config with \"EnableIPv6\": true is refused), so its leases carry \"PublicIPv6\":null",
        },
    },
    implemented(
        "subnet-file",
        "FLANNELD_SUBNET_FILE",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented(
        "subnet-lease-renew-margin",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        "v0.7.0",
        ValueKind::Value,
    ),
    implemented("ip-masq", "FLANNELD_IP_MASQ", "v0.7.0", ValueKind::Bool),
    implemented(
        "healthz-ip",
        "FLANNELD_HEALTHZ_IP",
        "v0.8.0",
        ValueKind::Value,
    ),
    implemented(
        "healthz-port",
        "FLANNELD_HEALTHZ_PORT",
        "v0.8.0",
        ValueKind::Value,
    ),
    implemented(
        "iptables-resync",
        "FLANNELD_IPTABLES_RESYNC",
        "v0.11.0",
        ValueKind::Value,
    ),
    implemented(
        "iptables-forward-rules",
        "FLANNELD_IPTABLES_FORWARD_RULES",
        "v0.11.0",
        ValueKind::Bool,
    ),
    implemented("version", "FLANNELD_VERSION", "v0.7.0", ValueKind::Bool),
    FlanneldFlag {
        until: Some("v0.7.1"),
        ..implemented("help", "FLANNELD_HELP", "v0.7.0", ValueKind::Bool)
    },
    refused_kube(
        "kube-subnet-mgr",
        "FLANNELD_KUBE_SUBNET_MGR",
        "v0.7.0",
        None,
        ValueKind::Bool,
        "false",
    ),
    refused_kube(
        "kube-api-url",
        "FLANNELD_KUBE_API_URL",
        "v0.8.0",
        None,
        ValueKind::Value,
        "",
    ),
    refused_kube(
        "kubeconfig-file",
        "FLANNELD_KUBECONFIG_FILE",
        "v0.8.0",
        None,
        ValueKind::Value,
        "",
    ),
    refused_kube(
        "kube-annotation-prefix",
        "FLANNELD_KUBE_ANNOTATION_PREFIX",
        "v0.11.0",
        None,
        ValueKind::Value,
        "flannel.alpha.coreos.com",
    ),
    FlanneldFlag {
        handling: Handling::Refused {
            default: "/etc/kube-flannel/net-conf.json",
            mode: KUBE_MODE,
            instead: "overlay-agent reads the network config from <etcd-prefix>/config: store that file there with `overlay-agent config set --file /etc/kube-flannel/net-conf.json` and remove the flag",
        },
        ..refused_kube(
            "net-config-path",
            "FLANNELD_NET_CONFIG_PATH",
            "v0.12.0",
            None,
            ValueKind::Value,
            "",
        )
    },
    refused_kube(
        "set-node-network-unavailable",
        "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE",
        "v0.15.0",
        None,
        ValueKind::Bool,
        "true",
    ),
    refused_kube(
        "use-multi-cluster-cidr",
        "FLANNELD_USE_MULTI_CLUSTER_CIDR",
        "v0.21.0",
        Some("v0.22.3"),
        ValueKind::Bool,
        "false",
    ),
    refused_v07(
        "listen",
        "FLANNELD_LISTEN",
        ValueKind::Value,
        "",
        CLIENT_SERVER_MODE,
        CLIENT_SERVER_INSTEAD,
    ),
    refused_v07(
        "remote",
        "FLANNELD_REMOTE",
        ValueKind::Value,
        "",
        CLIENT_SERVER_MODE,
        CLIENT_SERVER_INSTEAD,
    ),
    refused_v07(
        "remote-keyfile",
        "FLANNELD_REMOTE_KEYFILE",
        ValueKind::Value,
        "",
        CLIENT_SERVER_MODE,
        CLIENT_SERVER_INSTEAD,
    ),
    refused_v07(
        "remote-certfile",
        "FLANNELD_REMOTE_CERTFILE",
        ValueKind::Value,
        "",
        CLIENT_SERVER_MODE,
        CLIENT_SERVER_INSTEAD,
    ),
    refused_v07(
        "remote-cafile",
        "FLANNELD_REMOTE_CAFILE",
        ValueKind::Value,
        "",
        CLIENT_SERVER_MODE,
        CLIENT_SERVER_INSTEAD,
    ),
    refused_v07(
        "networks",
        "FLANNELD_NETWORKS",
        ValueKind::Value,
        "",
        MULTI_NETWORK_MODE,
        MULTI_NETWORK_INSTEAD,
    ),
    refused_v07(
        "watch-networks",
        "FLANNELD_WATCH_NETWORKS",
        ValueKind::Bool,
        "false",
        MULTI_NETWORK_MODE,
        MULTI_NETWORK_INSTEAD,
    ),
    refused_v07(
        "subnet-dir",
        "FLANNELD_SUBNET_DIR",
        ValueKind::Value,
        "/run/flannel/networks",
        MULTI_NETWORK_MODE,
        MULTI_NETWORK_INSTEAD,
    ),
    // glog/klog. v0.7 registered flags on Go's global flag set, so all of glog's were
    // accepted; v0.8+ copies only v, vmodule and log_backtrace_at into its own set.
    implemented("v", "FLANNELD_V", "v0.7.0", ValueKind::Value),
    no_effect(
        "vmodule",
        "FLANNELD_VMODULE",
        "v0.7.0",
        None,
        ValueKind::Value,
        GLOG_FILTER,
    ),
    no_effect(
        "log_backtrace_at",
        "FLANNELD_LOG_BACKTRACE_AT",
        "v0.7.0",
        None,
        ValueKind::Value,
        "overlay-agent does not print stack traces at a source line; errors carry their cause instead",
    ),
    no_effect(
        "logtostderr",
        "FLANNELD_LOGTOSTDERR",
        "v0.7.0",
        Some("v0.7.1"),
        ValueKind::Bool,
        GLOG_STDERR,
    ),
    no_effect(
        "alsologtostderr",
        "FLANNELD_ALSOLOGTOSTDERR",
        "v0.7.0",
        Some("v0.7.1"),
        ValueKind::Bool,
        GLOG_STDERR,
    ),
    no_effect(
        "stderrthreshold",
        "FLANNELD_STDERRTHRESHOLD",
        "v0.7.0",
        Some("v0.7.1"),
        ValueKind::Value,
        "everything goes to stderr (flanneld's own default, logtostderr=true, ignores this flag too); choose the level with -v=N or RUST_LOG",
    ),
    no_effect(
        "log_dir",
        "FLANNELD_LOG_DIR",
        "v0.7.0",
        Some("v0.7.1"),
        ValueKind::Value,
        "overlay-agent writes no log files; it logs to stderr (journald under systemd)",
    ),
];

const fn implemented(
    name: &'static str,
    env: &'static str,
    since: &'static str,
    kind: ValueKind,
) -> FlanneldFlag {
    FlanneldFlag {
        name,
        env,
        since,
        until: None,
        kind,
        handling: Handling::Implemented,
    }
}

const fn no_effect(
    name: &'static str,
    env: &'static str,
    since: &'static str,
    until: Option<&'static str>,
    kind: ValueKind,
    why: &'static str,
) -> FlanneldFlag {
    FlanneldFlag {
        name,
        env,
        since,
        until,
        kind,
        handling: Handling::NoEffect { why },
    }
}

const fn refused_kube(
    name: &'static str,
    env: &'static str,
    since: &'static str,
    until: Option<&'static str>,
    kind: ValueKind,
    default: &'static str,
) -> FlanneldFlag {
    FlanneldFlag {
        name,
        env,
        since,
        until,
        kind,
        handling: Handling::Refused {
            default,
            mode: KUBE_MODE,
            instead: KUBE_INSTEAD,
        },
    }
}

const fn refused_v07(
    name: &'static str,
    env: &'static str,
    kind: ValueKind,
    default: &'static str,
    mode: &'static str,
    instead: &'static str,
) -> FlanneldFlag {
    FlanneldFlag {
        name,
        env,
        since: "v0.7.0",
        until: Some("v0.7.1"),
        kind,
        handling: Handling::Refused {
            default,
            mode,
            instead,
        },
    }
}

/// Parses a Go bool flag value like Go's `strconv.ParseBool`.
pub fn parse_go_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!(
            "{other:?} is not a boolean: use true or false (Go also takes 1, 0, t, f)"
        )),
    }
}

/// A clap value parser for Go bool flags (normalized to "true"/"false" for the table's
/// flags, a `bool` for flags.rs's).
#[derive(Clone, Copy, Debug, Default)]
pub struct GoBool;

impl clap::builder::TypedValueParser for GoBool {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &Command,
        arg: Option<&Arg>,
        value: &OsStr,
    ) -> Result<bool, clap::Error> {
        let text = value.to_str().unwrap_or_default();
        parse_go_bool(text).map_err(|reason| {
            let name = arg.and_then(Arg::get_long).unwrap_or("flag");
            clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!("invalid value for --{name}: {reason}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            ["true", "false"].into_iter().map(PossibleValue::new),
        ))
    }
}

/// The table's flags that flags.rs does not implement, as given on the command line or in
/// the environment.
#[derive(Clone, Debug, Default)]
pub struct CompatFlags {
    /// (flag, value as given; "true"/"false" for bool flags).
    pub given: Vec<(&'static FlanneldFlag, String)>,
}

/// flanneld flags that select a mode this agent does not offer.
#[derive(Debug, thiserror::Error)]
#[error("{}", .refused.join("\n"))]
pub struct RefusedFlags {
    /// One message per refused flag.
    pub refused: Vec<String>,
}

impl CompatFlags {
    /// One line per given no-effect flag (to be logged once at start-up), or the refusal
    /// of every given flag that selects a mode this agent does not offer.
    pub fn check(&self) -> Result<Vec<String>, RefusedFlags> {
        let mut notes = Vec::new();
        let mut refused = Vec::new();
        for (flag, value) in &self.given {
            let name = flag.name;
            match flag.handling {
                Handling::Implemented => {}
                Handling::NoEffect { why } => {
                    notes.push(format!("-{name}={value} (a flanneld flag) has no effect here: {why}"));
                }
                Handling::Refused { default, .. } if value.as_str() == default => notes.push(format!(
                    "-{name}={value} (a flanneld flag, given its default) has no effect here"
                )),
                Handling::Refused { mode, instead, .. } => refused.push(format!(
                    "-{name}={value} is refused: it belongs to {mode}, which overlay-agent does not offer; {instead}"
                )),
            }
        }
        if refused.is_empty() {
            Ok(notes)
        } else {
            Err(RefusedFlags { refused })
        }
    }
}

fn unhandled() -> impl Iterator<Item = &'static FlanneldFlag> {
    FLANNELD_FLAGS
        .iter()
        .filter(|f| f.handling != Handling::Implemented)
}

impl Args for CompatFlags {
    fn augment_args(mut cmd: Command) -> Command {
        for flag in unhandled() {
            let arg = Arg::new(flag.name)
                .long(flag.name)
                .env(flag.env)
                .global(true)
                .hide(true)
                .help(format!("flanneld's --{}: see docs/flags.md", flag.name));
            let arg = match flag.kind {
                // Go: `-flag` means true; a value must be attached with `=`.
                ValueKind::Bool => arg
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true")
                    .value_parser(GoBool),
                ValueKind::Value => arg.num_args(1).allow_hyphen_values(true),
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for CompatFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for flag in unhandled() {
            let value = match flag.kind {
                ValueKind::Bool => matches.get_one::<bool>(flag.name).map(bool::to_string),
                ValueKind::Value => matches.get_one::<String>(flag.name).cloned(),
            };
            if let Some(value) = value {
                given.push((flag, value));
            }
        }
        Ok(CompatFlags { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::flags::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["overlay-agent"];
        argv.extend_from_slice(args);
        Cli::try_parse_args(argv)
    }

    /// The word docs/flags.md uses for a handling.
    pub(crate) fn doc_word(handling: Handling) -> &'static str {
        match handling {
            Handling::Implemented => "implemented",
            Handling::NoEffect { .. } => "no effect",
            Handling::Refused { .. } => "refused",
        }
    }

    #[test]
    fn docs_flags_md_lists_exactly_this_table() {
        let doc = include_str!("../../../docs/flags.md");
        let mut rows: Vec<(String, String)> = doc
            .lines()
            .filter(|l| l.starts_with("| `-"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells[1]
                    .trim_matches('`')
                    .trim_start_matches('-')
                    .to_owned();
                (name, cells[3].to_owned())
            })
            .collect();
        let mut table: Vec<(String, String)> = FLANNELD_FLAGS
            .iter()
            .map(|f| (f.name.to_owned(), doc_word(f.handling).to_owned()))
            .collect();
        rows.sort();
        table.sort();
        assert_eq!(rows, table, "docs/flags.md and FLANNELD_FLAGS differ");
    }

    #[test]
    fn go_bools_parse_like_strconv() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false), "{f}");
        }
        assert!(parse_go_bool("yes").is_err());
        assert!(parse_go_bool("").is_err());
    }

    #[test]
    fn table_names_are_unique_and_envs_follow_flanneld() {
        let mut seen = std::collections::HashSet::new();
        for flag in FLANNELD_FLAGS {
            assert!(seen.insert(flag.name), "{} listed twice", flag.name);
            assert_eq!(
                flag.env,
                format!("FLANNELD_{}", flag.name.to_uppercase().replace('-', "_")),
                "{}",
                flag.name
            );
        }
    }

    #[test]
    fn no_effect_flags_give_one_note_each_in_go_spellings() {
        let cli = parse(&[
            "-logtostderr",
            "-alsologtostderr=false",
            "-v=2",
            "-vmodule=main=3",
            "-log_dir",
            "/var/log/x",
            "--public-ipv6=fd00::1",
        ])
        .expect("accepted");
        let notes = cli.flags.compat.check().expect("nothing refused");
        assert_eq!(notes.len(), 5, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("-logtostderr=true (a flanneld flag) has no effect here")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.starts_with("-log_dir=/var/log/x")),
            "{notes:?}"
        );
        assert_eq!(cli.flags.verbosity, 2);
        // Go takes two dashes for every flag, one-letter ones too, and strconv's bools.
        assert_eq!(parse(&["--v=3"]).expect("--v").flags.verbosity, 3);
        assert!(parse(&["-ip-masq=1"]).expect("-ip-masq=1").flags.ip_masq);
        assert!(!parse(&["-ip-masq=F"]).expect("-ip-masq=F").flags.ip_masq);
    }

    #[test]
    fn mode_flags_are_refused_with_what_to_use_instead_unless_default() {
        let cli = parse(&["-kube-subnet-mgr", "--kubeconfig-file=/etc/k.conf"]).expect("parses");
        let err = cli.flags.compat.check().expect_err("refused");
        assert_eq!(err.refused.len(), 2, "{err}");
        assert!(
            err.refused[0].starts_with("-kube-subnet-mgr=true is refused")
                && err.refused[0].contains("--etcd-endpoints"),
            "{err}"
        );
        // flanneld's defaults select nothing, so they are accepted (with a note).
        let cli = parse(&[
            "-kube-subnet-mgr=false",
            "-set-node-network-unavailable=true",
        ])
        .expect("parses");
        assert_eq!(cli.flags.compat.check().expect("accepted").len(), 2);
        // Go never takes a bool's value as the next argument.
        assert!(parse(&["-kube-subnet-mgr", "false"]).is_err());
        assert!(parse(&["-kube-subnet-mgr=maybe"]).is_err());
    }
}
