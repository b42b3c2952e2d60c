//! flanneld's FORWARD accept rules (`--iptables-forward-rules`, on by default): Docker since
//! 1.13 sets `iptables -P FORWARD DROP`, which drops every forwarded pod packet unless
//! something accepts it in that same chain. An accept in another table or nftables base chain
//! does not help: netfilter runs every base chain on the hook and any one of them may drop.
//!
//! So the rules go where flanneld puts them, in iptables' own filter table, with flanneld's
//! chain and comment (a node migrating from flanneld finds its rules already in place):
//! ```text
//! -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
//! -A FLANNEL-FWD -s <Network> -m comment --comment "flanneld forward" -j ACCEPT
//! -A FLANNEL-FWD -d <Network> -m comment --comment "flanneld forward" -j ACCEPT
//! ```
//! They go through the `iptables` command found in PATH, as flanneld (go-iptables), Docker and
//! kube-proxy use it: that is the back end (nft or legacy) the host selected with
//! `update-alternatives`, and so the one whose FORWARD policy Docker set to DROP.

use std::{io, process::Stdio, time::Duration};

use ipnetwork::Ipv4Network;
use tokio::{io::AsyncWriteExt, process::Command};
use tracing::{info, warn};

/// flanneld's chain and rule comment.
pub const CHAIN: &str = "FLANNEL-FWD";
pub const COMMENT: &str = "flanneld forward";
/// Wait at most this long for the xtables lock (legacy back end): a stuck holder must not stop
/// the agent before READY; the resync tries again.
const LOCK_WAIT: [&str; 2] = ["-w", "5"];

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "cannot run {program} for the FORWARD accept rules (install Debian's iptables package, or pass --iptables-forward-rules=false): {source}"
    )]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The iptables command the rules go through (and its `-restore` companion).
#[derive(Clone, Debug)]
pub struct Iptables {
    program: String,
}

impl Default for Iptables {
    /// `iptables` from PATH: whichever back end the host uses.
    fn default() -> Self {
        Self::new("iptables")
    }
}

impl Iptables {
    /// `program` is e.g. `iptables`, `iptables-nft` or `iptables-legacy`; the restore command
    /// is `<program>-restore`, as update-alternatives pairs them.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
        }
    }

    fn spawn_err(&self, program: &str) -> impl FnOnce(io::Error) -> ForwardError {
        let program = program.to_owned();
        move |source| ForwardError::Spawn { program, source }
    }

    async fn output(&self, args: &[&str]) -> Result<std::process::Output, ForwardError> {
        Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(self.spawn_err(&self.program))
    }

    /// `args` on the filter table, waiting for the xtables lock.
    async fn filter(&self, args: &[&str]) -> Result<std::process::Output, ForwardError> {
        let mut full = LOCK_WAIT.to_vec();
        full.extend_from_slice(&["-t", "filter"]);
        full.extend_from_slice(args);
        self.output(&full).await
    }

    /// Runs `args`; Ok(false) when iptables says no (rule or chain missing), Err only when it
    /// cannot run at all.
    async fn succeeds(&self, args: &[&str]) -> Result<bool, ForwardError> {
        Ok(self.filter(args).await?.status.success())
    }

    async fn run(&self, args: &[&str]) -> Result<(), ForwardError> {
        let output = self.filter(args).await?;
        if output.status.success() {
            return Ok(());
        }
        Err(ForwardError::Failed {
            command: format!("{} {}", self.program, args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    /// `iptables --version`, e.g. "iptables v1.8.9 (nf_tables)": says which back end is used.
    pub async fn version(&self) -> Result<String, ForwardError> {
        let output = self.output(&["--version"]).await?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// The rule spec (after `-A <chain>`) of the jump from FORWARD into our chain.
fn jump_spec() -> Vec<String> {
    ["-m", "comment", "--comment", COMMENT, "-j", CHAIN]
        .map(String::from)
        .to_vec()
}

/// The rule specs of our chain: everything from or to the cluster network is accepted.
fn accept_specs(network: Ipv4Network) -> [Vec<String>; 2] {
    let net = network.to_string();
    ["-s", "-d"].map(|dir| {
        [
            dir,
            &net,
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "ACCEPT",
        ]
        .map(String::from)
        .to_vec()
    })
}

/// iptables-restore input that creates (or with --noflush, empties) our chain and fills it,
/// in one transaction: a chain being rewritten is never seen empty.
pub fn restore_input(network: Ipv4Network) -> String {
    let mut text = format!("*filter\n:{CHAIN} - [0:0]\n");
    for spec in accept_specs(network) {
        let quoted: Vec<String> = spec
            .iter()
            .map(|arg| {
                if arg.contains(' ') {
                    format!("\"{arg}\"")
                } else {
                    arg.clone()
                }
            })
            .collect();
        text.push_str(&format!("-A {CHAIN} {}\n", quoted.join(" ")));
    }
    text.push_str("COMMIT\n");
    text
}

fn with_prefix<'a>(prefix: &[&'a str], spec: &'a [String]) -> Vec<&'a str> {
    prefix
        .iter()
        .copied()
        .chain(spec.iter().map(String::as_str))
        .collect()
}

/// Whether exactly our rules are in place: the jump from FORWARD, and our chain holding our
/// two rules and nothing else (rules for an earlier Network are replaced).
pub async fn installed(iptables: &Iptables, network: Ipv4Network) -> Result<bool, ForwardError> {
    let jump = jump_spec();
    if !iptables
        .succeeds(&with_prefix(&["-C", "FORWARD"], &jump))
        .await?
    {
        return Ok(false);
    }
    for spec in accept_specs(network) {
        if !iptables
            .succeeds(&with_prefix(&["-C", CHAIN], &spec))
            .await?
        {
            return Ok(false);
        }
    }
    let listing = iptables.filter(&["-S", CHAIN]).await?;
    let rules = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|line| line.starts_with("-A "))
        .count();
    Ok(listing.status.success() && rules == 2)
}

/// Installs the rules: our chain rewritten in one iptables-restore transaction, then the jump
/// from FORWARD appended (as flanneld does) unless it is there already.
pub async fn apply(iptables: &Iptables, network: Ipv4Network) -> Result<(), ForwardError> {
    let restore = format!("{}-restore", iptables.program);
    let mut child = Command::new(&restore)
        .args(LOCK_WAIT)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(iptables.spawn_err(&restore))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(restore_input(network).as_bytes())
            .await
            .map_err(iptables.spawn_err(&restore))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(iptables.spawn_err(&restore))?;
    if !output.status.success() {
        return Err(ForwardError::Failed {
            command: format!("{restore} --noflush (chain {CHAIN})"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let jump = jump_spec();
    if !iptables
        .succeeds(&with_prefix(&["-C", "FORWARD"], &jump))
        .await?
    {
        iptables
            .run(&with_prefix(&["-A", "FORWARD"], &jump))
            .await?;
    }
    Ok(())
}

/// Installs the rules once and says where (which iptables back end).
pub async fn install(iptables: &Iptables, network: Ipv4Network) -> Result<(), ForwardError> {
    apply(iptables, network).await?;
    let version = iptables.version().await.unwrap_or_default();
    info!(%network, chain = CHAIN, iptables = %version, "FORWARD accept rules installed for the pod network");
    Ok(())
}

/// Keeps the rules: re-checks every `interval` and re-applies them when someone deleted or
/// changed them (e.g. a firewall reload). Runs until the agent stops; errors are logged once
/// per distinct message, never fatal.
pub async fn keep_rules(
    iptables: Iptables,
    network: Ipv4Network,
    interval: Duration,
    mut installed_once: bool,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut last_error: Option<String> = None;
    let mut report = |err: ForwardError| {
        let message = err.to_string();
        if last_error.as_deref() != Some(message.as_str()) {
            warn!(error = %message, "the FORWARD accept rules are not in place; retrying every {interval:?}");
            last_error = Some(message);
        }
    };
    loop {
        ticker.tick().await;
        match installed(&iptables, network).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(err) => {
                report(err);
                continue;
            }
        }
        if installed_once {
            match apply(&iptables, network).await {
                Ok(()) => warn!(
                    chain = CHAIN,
                    "the FORWARD accept rules were changed or removed; re-applied them"
                ),
                Err(err) => report(err),
            }
        } else {
            match install(&iptables, network).await {
                Ok(()) => installed_once = true,
                Err(err) => report(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::flags::Cli;

    #[test]
    fn rules_are_flanneld_s() {
        let network: Ipv4Network = "10.5.0.0/16".parse().expect("net");
        assert_eq!(
            restore_input(network),
            "*filter\n:FLANNEL-FWD - [0:0]\n\
             -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
        assert_eq!(
            jump_spec().join(" "),
            "-m comment --comment flanneld forward -j FLANNEL-FWD"
        );
    }

    #[test]
    fn the_flag_is_on_by_default_and_takes_go_values() {
        let parse = |args: &[&str]| {
            let argv = std::iter::once("overlay-agent").chain(args.iter().copied());
            Cli::try_parse_args(argv)
                .unwrap_or_else(|e| panic!("{args:?}: {e}"))
                .flags
                .iptables_forward_rules
        };
        assert!(parse(&[]), "flanneld's default is true");
        assert!(parse(&["--iptables-forward-rules"]));
        assert!(parse(&["-iptables-forward-rules=true"]));
        assert!(!parse(&["--iptables-forward-rules=false"]));
        assert!(!parse(&["-iptables-forward-rules=false"]));
    }
}
