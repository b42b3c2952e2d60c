//! The `flannel` CNI plugin: the agent binary run under the name `flannel` (copied or
//! linked to `/opt/cni/bin/flannel`), so kubelet's and other runtimes' unchanged
//! `10-flannel.conflist` keeps working without flannel's own binary.
//!
//! As flannel's plugin does: ADD reads subnet.env and the netconf, builds the delegate
//! netconf (bridge + host-local on the node's subnet, see [`netconf`]), saves it under
//! `dataDir` by container ID, runs the delegate from CNI_PATH and prints its result as it
//! is; DEL runs the delegate's DEL with the saved netconf and removes it (nothing saved:
//! success). Added here: the running agent is told about the pod ([`agent_socket`]), CHECK
//! is passed to the delegate, and STATUS (spec 1.1.0) reports whether subnet.env is there.
//!
//! stdout is the protocol: results and CNI errors only; logs go to stderr.

pub mod agent_socket;
pub mod delegate;
pub mod netconf;

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use rscni_types::{
    error::Error as SpecError,
    types::{CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS, CNI_PATH, Cmd, ContainerId},
    version::{PluginInfo, SpecVersion},
};
use serde::Serialize;
use tracing::{info, warn};

use self::{
    agent_socket::{PodNotice, PodOp},
    delegate::DelegateError,
    netconf::{FlannelConf, NetconfError},
};
use crate::control::subnet_file::{SubnetEnv, SubnetFileError};

/// The binary's file name that selects the plugin (`/opt/cni/bin/flannel`).
pub const PLUGIN_NAME: &str = "flannel";

/// Every version whose netconf this plugin reads. It never builds a result itself (the
/// delegate's is passed on), so it takes the old layouts flannel's plugin takes too.
fn plugin_info(declared: SpecVersion) -> PluginInfo {
    let supported = [
        (0, 1, 0),
        (0, 2, 0),
        (0, 3, 0),
        (0, 3, 1),
        (0, 4, 0),
        (1, 0, 0),
        (1, 1, 0),
    ]
    .map(|(a, b, c)| SpecVersion::new(a, b, c))
    .to_vec();
    let reported = if supported.contains(&declared) {
        declared
    } else {
        SpecVersion::CURRENT
    };
    PluginInfo::new(reported, supported)
}

/// What went wrong, each with the spec's error code.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{0}")]
    Spec(SpecError),
    #[error("the netconf on stdin is not valid JSON: {0}")]
    Decode(#[source] serde_json::Error),
    #[error(transparent)]
    Netconf(#[from] NetconfError),
    #[error(
        "no subnet file at {0}: is the overlay agent running? It writes the file once it holds this node's lease (the netconf's subnetFile names another path)"
    )]
    NoSubnetFile(PathBuf),
    #[error(
        "the subnet file {path} has a bad {key} line ({value:?}); the overlay agent rewrites it when it starts, check its log"
    )]
    BadSubnetFile {
        path: PathBuf,
        key: &'static str,
        value: String,
    },
    #[error("cannot read the subnet file: {0}")]
    ReadSubnetFile(#[source] SubnetFileError),
    #[error(transparent)]
    Scratch(#[from] delegate::ScratchError),
    #[error(transparent)]
    Delegate(#[from] DelegateError),
    #[error("the saved netconf {path} is not valid JSON ({source}); remove it to let DEL succeed")]
    BadSaved {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the delegate's result is not JSON: {0}")]
    BadResult(#[source] serde_json::Error),
    #[error("cannot read stdin: {0}")]
    Stdin(#[source] std::io::Error),
}

impl CniError {
    /// (code, msg, details) as the spec's error output wants them.
    fn wire(&self) -> (u32, String, String) {
        let details = self.to_string();
        let spec = match self {
            Self::Spec(error) => error.clone(),
            // The delegate's own code and message, with ours as the details.
            Self::Delegate(DelegateError::Failed { code, msg, .. }) => {
                return (*code, msg.clone(), details);
            }
            Self::Decode(_) | Self::BadSaved { .. } | Self::BadResult(_) => {
                SpecError::FailedToDecode(details)
            }
            Self::Netconf(_)
            | Self::Delegate(DelegateError::NotFound { .. } | DelegateError::BadName(_)) => {
                SpecError::InvalidNetworkConfig(details)
            }
            // Transient: the agent writes it once it holds a lease.
            Self::NoSubnetFile(_) | Self::BadSubnetFile { .. } => SpecError::TryAgainLater(details),
            Self::ReadSubnetFile(_) | Self::Scratch(_) | Self::Stdin(_) => {
                SpecError::IOFailure(details)
            }
            Self::Delegate(_) => SpecError::Custom(999, "delegate plugin failed".into(), details),
        };
        (
            u32::from(&spec),
            spec.msg().to_owned(),
            spec.details().to_owned(),
        )
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorOutput<'a> {
    cni_version: String,
    code: u32,
    msg: &'a str,
    details: &'a str,
}

fn init_logging() {
    // Quiet by default: the runtime shows stderr to people only when something failed.
    let filter = tracing_subscriber::EnvFilter::try_from_env("OVERLAY_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,overlay_agent=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

/// The plugin's `main`: reads CNI_COMMAND and stdin, prints a result or a CNI error.
pub fn main() -> ExitCode {
    init_logging();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command.is_empty() {
        // What libcni's skel does for a person running the plugin by hand.
        eprintln!(
            "CNI flannel plugin (overlay-agent {}): run by a container runtime with CNI_COMMAND set",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // The version to report errors under: the netconf's when it can be read.
    let declared = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .and_then(|v| v.parse::<SpecVersion>().ok());
    let outcome = read
        .map_err(CniError::Stdin)
        .and_then(|_| dispatch(&command, &stdin));
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(output) => {
            let _ = stdout.write_all(&output);
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(err) => {
            let (code, msg, details) = err.wire();
            warn!(command = %command, code, "{details}");
            let output = ErrorOutput {
                cni_version: declared.unwrap_or(SpecVersion::CURRENT).to_string(),
                code,
                msg: &msg,
                details: &details,
            };
            let _ = serde_json::to_writer(&mut stdout, &output);
            let _ = stdout.write_all(b"\n");
            let _ = stdout.flush();
            ExitCode::FAILURE
        }
    }
}

/// The environment a command needs, read once.
struct Env {
    container_id: String,
    cni_path: String,
}

fn require_env(cmd: Cmd) -> Result<Env, CniError> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut needed: Vec<&str> = vec![CNI_CONTAINERID, CNI_IFNAME, CNI_PATH];
    if cmd != Cmd::Del {
        // DEL may come after the namespace is gone (the spec lets CNI_NETNS be empty).
        needed.push(CNI_NETNS);
    }
    let missing: Vec<&str> = needed.into_iter().filter(|n| get(n).is_none()).collect();
    if !missing.is_empty() {
        return Err(CniError::Spec(SpecError::missing_env(&missing)));
    }
    let container_id = get(CNI_CONTAINERID).unwrap_or_default();
    // It names a file under dataDir: the spec's character rule keeps it inside.
    ContainerId::try_from(container_id.clone()).map_err(CniError::Spec)?;
    Ok(Env {
        container_id,
        cni_path: get(CNI_PATH).unwrap_or_default(),
    })
}

fn dispatch(command: &str, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let cmd: Cmd = command.parse().map_err(CniError::Spec)?;
    if cmd == Cmd::Version {
        // stdin is `{"cniVersion": ...}` or empty.
        let declared = serde_json::from_slice::<FlannelConf>(stdin)
            .ok()
            .and_then(|c| c.cni_version.parse().ok())
            .unwrap_or(SpecVersion::CURRENT);
        return to_json(&plugin_info(declared));
    }
    let conf: FlannelConf = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
    let version = if conf.cni_version.is_empty() {
        SpecVersion::new(0, 1, 0)
    } else {
        conf.cni_version.parse().map_err(CniError::Spec)?
    };
    version.allows(cmd).map_err(CniError::Spec)?;
    plugin_info(version)
        .validate(version)
        .map_err(CniError::Spec)?;
    match cmd {
        Cmd::Add => add(&conf, &require_env(cmd)?),
        Cmd::Del => del(&conf, &require_env(cmd)?).map(|()| Vec::new()),
        Cmd::Check => check(&conf, &require_env(cmd)?).map(|()| Vec::new()),
        Cmd::Status => read_subnet_env(&conf.subnet_file())
            .map(|_| Vec::new())
            .map_err(|err| CniError::Spec(SpecError::PluginNotAvailable(err.to_string()))),
        // Nothing of ours outlives a DEL but the saved netconfs, which DEL removes; the
        // delegate's own leftovers are its business (Debian's 1.1.1 plugins predate GC).
        Cmd::Gc => Ok(Vec::new()),
        Cmd::Version => unreachable!("answered above"),
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, CniError> {
    let mut out = serde_json::to_vec(value).map_err(CniError::BadResult)?;
    out.push(b'\n');
    Ok(out)
}

fn read_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    match SubnetEnv::read(path) {
        Ok(Some(env)) => Ok(env),
        Ok(None) => Err(CniError::NoSubnetFile(path.to_owned())),
        Err(SubnetFileError::Malformed { path, key, value }) => {
            Err(CniError::BadSubnetFile { path, key, value })
        }
        Err(other) => Err(CniError::ReadSubnetFile(other)),
    }
}

fn delegate_type(netconf: &serde_json::Value) -> &str {
    netconf.get("type").and_then(|t| t.as_str()).unwrap_or("")
}

fn add(conf: &FlannelConf, env: &Env) -> Result<Vec<u8>, CniError> {
    let subnet_env = read_subnet_env(&conf.subnet_file())?;
    let delegate = serde_json::Value::Object(conf.delegate_for(&subnet_env)?);
    let bytes = serde_json::to_vec(&delegate).map_err(CniError::BadResult)?;
    let plugin = delegate::find_plugin(delegate_type(&delegate), &env.cni_path)?;
    // Saved first, as flannel does: a DEL after a half-done ADD finds what to undo.
    delegate::save(&conf.data_dir(), &env.container_id, &bytes)?;
    info!(container = %env.container_id, delegate = %plugin.display(), netconf = %delegate, "ADD: delegating");
    let output = delegate::run(&plugin, "ADD", &bytes)?;
    let result: serde_json::Value = serde_json::from_slice(&output).map_err(CniError::BadResult)?;
    notify_agent(
        conf,
        PodNotice {
            op: PodOp::Add,
            container_id: env.container_id.clone(),
            ips: netconf::result_ipv4s(&result),
        },
    );
    Ok(output)
}

fn del(conf: &FlannelConf, env: &Env) -> Result<(), CniError> {
    let data_dir = conf.data_dir();
    // Before the delegate releases the addresses: see agent_socket.
    notify_agent(
        conf,
        PodNotice {
            op: PodOp::Del,
            container_id: env.container_id.clone(),
            ips: conf
                .prev_result
                .as_ref()
                .map(netconf::result_ipv4s)
                .unwrap_or_default(),
        },
    );
    let Some(saved) = delegate::load(&data_dir, &env.container_id)? else {
        info!(container = %env.container_id, "DEL: nothing saved for this container; nothing to undo");
        return Ok(());
    };
    let netconf: serde_json::Value =
        serde_json::from_slice(&saved).map_err(|source| CniError::BadSaved {
            path: data_dir.join(&env.container_id),
            source,
        })?;
    let plugin = delegate::find_plugin(delegate_type(&netconf), &env.cni_path)?;
    delegate::run(&plugin, "DEL", &saved)?;
    // Only after the delegate's DEL worked: a retried DEL must find it again.
    delegate::remove(&data_dir, &env.container_id)?;
    Ok(())
}

/// The saved delegate netconf with the runtime's prevResult, passed to the delegate's CHECK.
fn check(conf: &FlannelConf, env: &Env) -> Result<(), CniError> {
    let data_dir = conf.data_dir();
    let Some(saved) = delegate::load(&data_dir, &env.container_id)? else {
        return Err(CniError::Spec(SpecError::NotExist(format!(
            "no netconf saved for container {} in {}: it was never added here (or was deleted)",
            env.container_id,
            data_dir.display()
        ))));
    };
    let mut netconf: serde_json::Value =
        serde_json::from_slice(&saved).map_err(|source| CniError::BadSaved {
            path: data_dir.join(&env.container_id),
            source,
        })?;
    if let Some(object) = netconf.as_object_mut() {
        if let Some(prev) = &conf.prev_result {
            object.insert("prevResult".into(), prev.clone());
        }
        object.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    let bytes = serde_json::to_vec(&netconf).map_err(CniError::BadResult)?;
    let plugin = delegate::find_plugin(delegate_type(&netconf), &env.cni_path)?;
    delegate::run(&plugin, "CHECK", &bytes)?;
    Ok(())
}

/// Tells the agent; never fails the command (see [`agent_socket`]).
fn notify_agent(conf: &FlannelConf, notice: PodNotice) {
    let path = conf.agent_socket();
    match agent_socket::send(&path, &notice) {
        Ok(reply) => info!(
            op = ?notice.op, container = %notice.container_id, applied = reply.applied,
            endpoints = ?reply.endpoints, "agent notified: {}", reply.message
        ),
        Err(err) => warn!(
            op = ?notice.op, container = %notice.container_id,
            "agent not notified ({err}); it learns the pod from netlink within a second instead"
        ),
    }
}
