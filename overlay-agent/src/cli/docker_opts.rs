//! `overlay-agent docker-opts`: turns the subnet file into Docker daemon options, like
//! flannel's `mk-docker-opts.sh` (same flags, same defaults, byte-for-byte the same output),
//! so units written for flanneld (`ExecStartPost=... -k DOCKER_NETWORK_OPTIONS -d
//! /run/flannel/docker`) keep working with only the program name changed.
//!
//! Deliberate differences from the script, each one a silent failure there:
//! - a missing or unreadable subnet file is an error (the script writes empty options, and
//!   Docker then starts on its default 172.17.0.0/16 bridge, off the overlay);
//! - a line that is not `KEY=VALUE` is an error naming the line (the script would run it);
//! - the output is replaced atomically (Docker never reads a half-written file), and is not
//!   written at all when the routing table already routes our subnet through a gateway.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use ipnetwork::Ipv4Network;

/// The kernel's IPv4 main routing table, as `ip route show` sees it.
const PROC_ROUTE: &str = "/proc/net/route";
/// `RTF_GATEWAY` in /proc/net/route's Flags column: the route goes `via` a gateway.
const RTF_GATEWAY: u32 = 0x2;

pub use super::flags::DEFAULT_SUBNET_FILE;

/// Flags as `mk-docker-opts.sh` spells them (`getopts "f:d:icmk:"`), with long aliases.
/// The long names leave `--subnet-file` to the agent's global flag: `-f` overrides it.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Subnet file to read (mk-docker-opts.sh -f) [default: --subnet-file, i.e.
    /// /run/flannel/subnet.env].
    #[arg(short = 'f', long = "input")]
    pub input: Option<PathBuf>,
    /// Docker env file to write (mk-docker-opts.sh -d).
    #[arg(short = 'd', long = "output", default_value = "/run/docker_opts.env")]
    pub output: PathBuf,
    /// Write each Docker option as its own variable, DOCKER_OPT_BIP=... (mk-docker-opts.sh
    /// -i). Without -i and -c, both kinds are written.
    #[arg(short = 'i', long = "individual-only")]
    pub individual_only: bool,
    /// Write the combined options into one variable, see -k (mk-docker-opts.sh -c).
    #[arg(short = 'c', long = "combined-only")]
    pub combined_only: bool,
    /// Leave out --ip-masq, for old Docker versions (mk-docker-opts.sh -m).
    #[arg(short = 'm', long = "no-ip-masq")]
    pub no_ip_masq: bool,
    /// Name of the combined variable (mk-docker-opts.sh -k).
    #[arg(short = 'k', long = "key", default_value = "DOCKER_OPTS")]
    pub key: String,
}

impl Args {
    /// The file to read: `-f`, else the agent's `--subnet-file` value.
    pub fn subnet_file(&self, default_subnet_file: &Path) -> PathBuf {
        self.input
            .clone()
            .unwrap_or_else(|| default_subnet_file.to_owned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    // `source` is printed by the error chain (`{:#}`), so the messages do not repeat it.
    #[error(
        "cannot read the subnet file {path} (overlay-agent writes it once it holds a lease: \
         start the agent first, or point -f at the right file)"
    )]
    ReadSubnetFile { path: PathBuf, source: io::Error },
    #[error(
        "{path} line {line}: `{text}` is not KEY=VALUE; the subnet file holds only FLANNEL_* assignments"
    )]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
    // Same words as mk-docker-opts.sh, plus what is expected.
    #[error("Invalid value of FLANNEL_IPMASQ: {value} (expected true or false)")]
    InvalidIpMasq { value: String },
    #[error(
        "FLANNEL_SUBNET={value} is not an IPv4 address with a prefix length (like 10.5.52.1/24)"
    )]
    InvalidSubnet { value: String },
    #[error("cannot read the routing table {path}")]
    ReadRoutes { path: PathBuf, source: io::Error },
    #[error(
        "Your routing table already contains the subnet: {subnet} via {gateway} dev {device}; \
         Docker's bridge would conflict with it: remove that route (ip route del {subnet}) \
         or release this node's lease"
    )]
    RouteConflict {
        subnet: Ipv4Network,
        gateway: Ipv4Addr,
        device: String,
    },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// Reads the subnet file (`-f`, else `default_subnet_file`: pass the agent's `--subnet-file`),
/// checks the routing table and writes the Docker env file.
pub fn run(args: &Args, default_subnet_file: &Path) -> Result<(), DockerOptsError> {
    let subnet_file = args.subnet_file(default_subnet_file);
    let text =
        fs::read_to_string(&subnet_file).map_err(|source| DockerOptsError::ReadSubnetFile {
            path: subnet_file.clone(),
            source,
        })?;
    let file_vars = parse_env_file(&subnet_file, &text)?;
    let docker_env = render(args, std::env::vars(), file_vars)?;
    if let Some(subnet) = docker_env.subnet {
        check_routes(Path::new(PROC_ROUTE), subnet)?;
    }
    write_atomically(&args.output, &docker_env.text)
}

/// The rendered Docker env file and the subnet it was made for.
#[derive(Debug, PartialEq, Eq)]
pub struct DockerEnv {
    pub text: String,
    pub subnet: Option<Ipv4Network>,
}

/// Parses the subnet file the way a shell `.` would read flannel's: `KEY=VALUE` lines,
/// optional `export`, optional surrounding quotes, blank lines and `#` comments.
pub fn parse_env_file(path: &Path, text: &str) -> Result<Vec<(String, String)>, DockerOptsError> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let assignment = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let syntax_error = || DockerOptsError::Syntax {
            path: path.to_owned(),
            line: index + 1,
            text: raw.to_owned(),
        };
        let (name, value) = assignment.split_once('=').ok_or_else(syntax_error)?;
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(syntax_error());
        }
        let value = ['"', '\'']
            .iter()
            .find_map(|quote| {
                value
                    .strip_prefix(*quote)
                    .and_then(|inner| inner.strip_suffix(*quote))
            })
            .unwrap_or(value);
        vars.push((name.to_owned(), value.to_owned()));
    }
    Ok(vars)
}

/// Builds the output exactly as mk-docker-opts.sh does. `environment` is the process
/// environment (the script sees it too: a `DOCKER_OPT_*` variable or a preset combined
/// variable there ends up in the output); `file_vars` come from the subnet file and win.
pub fn render(
    args: &Args,
    environment: impl IntoIterator<Item = (String, String)>,
    file_vars: impl IntoIterator<Item = (String, String)>,
) -> Result<DockerEnv, DockerOptsError> {
    let mut vars: BTreeMap<String, String> = environment.into_iter().collect();
    vars.extend(file_vars);
    let nonempty = |name: &str| vars.get(name).filter(|value| !value.is_empty()).cloned();

    let mut subnet = None;
    let mut computed = Vec::new();
    if let Some(value) = nonempty("FLANNEL_SUBNET") {
        subnet =
            Some(
                value
                    .parse::<Ipv4Network>()
                    .map_err(|_| DockerOptsError::InvalidSubnet {
                        value: value.clone(),
                    })?,
            );
        computed.push(("DOCKER_OPT_BIP", format!("--bip={value}")));
    }
    if let Some(value) = nonempty("FLANNEL_MTU") {
        computed.push(("DOCKER_OPT_MTU", format!("--mtu={value}")));
    }
    if let Some(value) = nonempty("FLANNEL_IPMASQ").filter(|_| !args.no_ip_masq) {
        // Docker must not masquerade when the agent already does, and must when it does not.
        let docker = match value.as_str() {
            "true" => "false",
            "false" => "true",
            _ => return Err(DockerOptsError::InvalidIpMasq { value }),
        };
        computed.push(("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker}")));
    }
    for (name, value) in computed {
        vars.insert(name.to_owned(), value);
    }

    let (individual, combined) = if args.individual_only || args.combined_only {
        (args.individual_only, args.combined_only)
    } else {
        (true, true)
    };
    let mut combined_value = vars.get(&args.key).cloned().unwrap_or_default();
    if !combined_value.is_empty() {
        combined_value.push(' ');
    }
    let mut text = String::new();
    // The script lists them with `set | grep DOCKER_OPT_`: sorted by name, and each value
    // passes through an unquoted `echo`, which collapses whitespace.
    for (name, value) in vars.iter().filter(|(name, _)| name.contains("DOCKER_OPT_")) {
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        if individual {
            text.push_str(&format!("{name}=\"{value}\"\n"));
        }
        combined_value.push(' ');
        combined_value.push_str(&value);
    }
    if combined {
        text.push_str(&format!("{}=\"{combined_value}\"\n", args.key));
    }
    Ok(DockerEnv { text, subnet })
}

/// Fails when the main routing table sends `subnet` through a gateway: Docker would put a
/// bridge on addresses that this host routes elsewhere (mk-docker-opts.sh's last check).
pub fn check_routes(route_table: &Path, subnet: Ipv4Network) -> Result<(), DockerOptsError> {
    let table = fs::read_to_string(route_table).map_err(|source| DockerOptsError::ReadRoutes {
        path: route_table.to_owned(),
        source,
    })?;
    let network = Ipv4Network::new(subnet.network(), subnet.prefix()).unwrap_or(subnet);
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses are the raw
    // network-order u32 printed in hex, so the host's byte order turns them back.
    let hex_addr = |field: &str| {
        u32::from_str_radix(field, 16)
            .ok()
            .map(|raw| Ipv4Addr::from(raw.to_ne_bytes()))
    };
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [device, destination, gateway, flags, _, _, _, mask, ..] = fields.as_slice() else {
            continue;
        };
        let (Some(destination), Some(gateway), Some(mask), Ok(flags)) = (
            hex_addr(destination),
            hex_addr(gateway),
            hex_addr(mask),
            u32::from_str_radix(flags, 16),
        ) else {
            continue;
        };
        if destination == network.network() && mask == network.mask() && flags & RTF_GATEWAY != 0 {
            return Err(DockerOptsError::RouteConflict {
                subnet: network,
                gateway,
                device: (*device).to_owned(),
            });
        }
    }
    Ok(())
}

/// Temp file in the same directory, then rename: readers see the old or the new file.
fn write_atomically(path: &Path, text: &str) -> Result<(), DockerOptsError> {
    let write_error = |source| DockerOptsError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_error(io::Error::other("the output path has no file name")))?;
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
    if let Some(dir) = dir {
        fs::create_dir_all(dir).map_err(write_error)?;
    }
    let temp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = fs::write(&temp, text)
        .and_then(|()| fs::set_permissions(&temp, fs::Permissions::from_mode(0o644)))
        .and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// flannel's example subnet file (flannel-compat.md).
    const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("docker-opts").chain(flags.iter().copied()))
            .expect("flags parse")
            .args
    }

    /// The agent's CLI has global flanneld flags (`--subnet-file`, `-v`, ...): these flags
    /// must not collide with them when flattened into its `docker-opts` subcommand.
    #[test]
    fn flags_fit_under_the_agents_global_flags() {
        #[derive(Parser)]
        struct Agent {
            #[arg(long, global = true, default_value = DEFAULT_SUBNET_FILE)]
            subnet_file: PathBuf,
            #[arg(short = 'v', global = true, default_value_t = 0)]
            verbosity: u8,
            #[command(subcommand)]
            command: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            DockerOpts(Args),
        }
        use clap::CommandFactory as _;
        Agent::command().debug_assert();
        let agent = Agent::try_parse_from([
            "overlay-agent",
            "docker-opts",
            "--subnet-file=/tmp/s.env",
            "-k",
            "K",
        ])
        .expect("parses");
        let Sub::DockerOpts(parsed) = agent.command;
        assert_eq!(
            parsed.subnet_file(&agent.subnet_file),
            Path::new("/tmp/s.env")
        );
        assert_eq!(parsed.key, "K");
        assert_eq!(agent.verbosity, 0);
    }

    /// Renders with an empty process environment, like `env -i sh mk-docker-opts.sh`.
    fn render_text(flags: &[&str], subnet_env: &str) -> String {
        let vars = parse_env_file(Path::new("subnet.env"), subnet_env).expect("subnet file parses");
        render(&args(flags), [], vars).expect("renders").text
    }

    // Expected texts below are what flannel's dist/mk-docker-opts.sh (v0.2x, /bin/sh) wrote
    // for the same input under `env -i` on Debian 12 (dash).

    #[test]
    fn seeds_flags_rename_the_combined_key_and_keep_individual_lines() {
        let parsed = args(&["-k", "DOCKER_NETWORK_OPTIONS", "-d", "/run/flannel/docker"]);
        assert_eq!(parsed.output, PathBuf::from("/run/flannel/docker"));
        assert_eq!(
            parsed.subnet_file(Path::new(DEFAULT_SUBNET_FILE)),
            PathBuf::from("/run/flannel/subnet.env")
        );
        assert_eq!(
            render_text(
                &["-k", "DOCKER_NETWORK_OPTIONS", "-d", "/run/flannel/docker"],
                SUBNET_ENV
            ),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_NETWORK_OPTIONS=\" --bip=10.5.52.1/24 --ip-masq=true --mtu=1450\"\n"
        );
    }

    #[test]
    fn defaults_match_the_script() {
        let parsed = args(&[]);
        assert_eq!(parsed.input, None);
        assert_eq!(
            parsed.subnet_file(Path::new("/etc/elsewhere.env")),
            PathBuf::from("/etc/elsewhere.env")
        );
        assert_eq!(parsed.output, PathBuf::from("/run/docker_opts.env"));
        assert_eq!(parsed.key, "DOCKER_OPTS");
        assert_eq!(
            render_text(&[], SUBNET_ENV),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=true --mtu=1450\"\n"
        );
    }

    #[test]
    fn individual_only_and_combined_only() {
        assert_eq!(
            render_text(&["-i"], SUBNET_ENV),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        assert_eq!(
            render_text(&["-c"], SUBNET_ENV),
            "DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=true --mtu=1450\"\n"
        );
        assert_eq!(
            render_text(&["-i", "-c"], SUBNET_ENV),
            render_text(&[], SUBNET_ENV)
        );
    }

    #[test]
    fn no_ip_masq_flag_drops_the_option() {
        assert_eq!(
            render_text(&["-m"], SUBNET_ENV),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=10.5.52.1/24 --mtu=1450\"\n"
        );
        assert_eq!(
            render_text(&["-c", "-m", "-k", "X"], SUBNET_ENV),
            "X=\" --bip=10.5.52.1/24 --mtu=1450\"\n"
        );
    }

    #[test]
    fn agent_masquerading_turns_docker_masquerading_off() {
        let env = SUBNET_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true");
        assert_eq!(
            render_text(&[], &env),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }

    #[test]
    fn environment_presets_are_merged_in_name_order() {
        let env = SUBNET_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true");
        let vars = parse_env_file(Path::new("subnet.env"), &env).expect("parses");
        let environment = [
            ("DOCKER_OPTS", "--foo"),
            ("DOCKER_OPT_ZZ", "--zz"),
            ("DOCKER_OPT_AA", "--aa"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        let text = render(&args(&[]), environment, vars).expect("renders").text;
        assert_eq!(
            text,
            "DOCKER_OPT_AA=\"--aa\"\n\
             DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPT_ZZ=\"--zz\"\n\
             DOCKER_OPTS=\"--foo  --aa --bip=10.5.52.1/24 --ip-masq=false --mtu=1450 --zz\"\n"
        );
    }

    #[test]
    fn quoted_values_and_missing_fields() {
        assert_eq!(
            render_text(&[], "FLANNEL_SUBNET=\"10.5.52.1/24\"\nFLANNEL_MTU=1450\n"),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=10.5.52.1/24 --mtu=1450\"\n"
        );
        assert_eq!(
            render_text(&[], "FLANNEL_SUBNET=10.5.52.1/24\n"),
            "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPTS=\" --bip=10.5.52.1/24\"\n"
        );
    }

    #[test]
    fn bad_input_is_named() {
        let vars = parse_env_file(
            Path::new("s"),
            "FLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_IPMASQ=yes\n",
        )
        .expect("parses");
        let error = render(&args(&[]), [], vars).expect_err("yes is not a boolean");
        assert_eq!(
            error.to_string(),
            "Invalid value of FLANNEL_IPMASQ: yes (expected true or false)"
        );

        let error = parse_env_file(
            Path::new("/run/flannel/subnet.env"),
            "FLANNEL_MTU=1450\nrm -rf /\n",
        )
        .expect_err("not an assignment");
        assert!(error.to_string().contains("subnet.env line 2"), "{error}");

        let vars =
            parse_env_file(Path::new("s"), "FLANNEL_SUBNET=10.5.52.300/24\n").expect("parses");
        assert!(matches!(
            render(&args(&[]), [], vars),
            Err(DockerOptsError::InvalidSubnet { .. })
        ));
    }

    #[test]
    fn missing_subnet_file_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = dir.path().join("docker");
        let parsed = args(&[
            "-f",
            dir.path().join("absent.env").to_str().expect("utf-8"),
            "-d",
            output.to_str().expect("utf-8"),
        ]);
        let error = run(&parsed, Path::new(DEFAULT_SUBNET_FILE)).expect_err("no subnet file");
        assert!(
            matches!(error, DockerOptsError::ReadSubnetFile { .. }),
            "{error}"
        );
        assert!(!output.exists());
    }

    #[test]
    fn writes_the_file_with_mode_0644() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("subnet.env");
        // An address no real route table routes through a gateway (TEST-NET-3).
        fs::write(&input, SUBNET_ENV.replace("10.5.52.1/24", "203.0.113.1/24")).expect("write");
        let output = dir.path().join("run/flannel/docker");
        let parsed = args(&[
            "-f",
            input.to_str().expect("utf-8"),
            "-k",
            "DOCKER_NETWORK_OPTIONS",
            "-d",
            output.to_str().expect("utf-8"),
        ]);
        // The test's own environment may hold DOCKER_OPT_* presets; compare with render().
        run(&parsed, Path::new("/nonexistent")).expect("docker-opts runs");
        let expected = render(
            &parsed,
            std::env::vars(),
            parse_env_file(&input, &fs::read_to_string(&input).expect("read")).expect("parse"),
        )
        .expect("renders");
        assert_eq!(fs::read_to_string(&output).expect("output"), expected.text);
        assert!(expected.text.ends_with(
            "DOCKER_NETWORK_OPTIONS=\" --bip=203.0.113.1/24 --ip-masq=true --mtu=1450\"\n"
        ));
        let mode = fs::metadata(&output).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let leftovers: Vec<_> = fs::read_dir(output.parent().expect("dir"))
            .expect("list")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }

    #[test]
    fn a_gateway_route_to_our_subnet_is_a_conflict() {
        let dir = tempfile::tempdir().expect("temp dir");
        let table = dir.path().join("route");
        // 10.5.52.0/24 via 192.168.1.1 dev eth0, a default route, and 10.5.53.0/24 on a bridge.
        fs::write(
            &table,
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t0034050A\t0101A8C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             cni0\t0035050A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
        )
        .expect("write");
        let subnet: Ipv4Network = "10.5.52.1/24".parse().expect("cidr");
        let error = check_routes(&table, subnet).expect_err("conflict");
        assert_eq!(
            error.to_string().split(';').next(),
            Some(
                "Your routing table already contains the subnet: 10.5.52.0/24 via 192.168.1.1 dev eth0"
            )
        );
        // A directly connected route (no gateway) to our own subnet is what we expect.
        let ours: Ipv4Network = "10.5.53.1/24".parse().expect("cidr");
        check_routes(&table, ours).expect("no conflict");
    }
}
