//! The agent process for the benchmarks: like the fixtures' `AgentProcess` (binary from
//! `$OVERLAY_AGENT_BIN`, log in a temp file, SIGKILL and reap on drop), but it enters the node
//! with `nsenter --net` instead of `ip netns exec`.
//!
//! Why: `ip netns exec` gives the process its own mount namespace with a fresh sysfs on /sys,
//! so /sys/fs/bpf there is not the host's bpffs. The ebpf agent then cannot pin under
//! `--bpf-pin-dir` (or pins into a private bpffs that nobody else sees and that vanishes with
//! it). `nsenter --net` switches only the network namespace: netlink, sockets and
//! /proc/sys/net are the node's, and the pins land in the host's bpffs where the harness reads
//! and removes them.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use overlay_tests::netns::NetNs;
use tempfile::NamedTempFile;

pub struct BenchAgent {
    child: Child,
    log: NamedTempFile,
}

impl BenchAgent {
    pub fn spawn(ns: &NetNs, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let log =
            NamedTempFile::with_prefix("overlay-agent-bench-log-").context("agent log file")?;
        let binary =
            std::panic::catch_unwind(overlay_tests::agent::agent_binary).map_err(|_| {
                anyhow::anyhow!("no agent binary: pass --agent-bin or set OVERLAY_AGENT_BIN")
            })?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name()))
            .arg("--")
            .arg(&binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} in {} with nsenter", binary.display(), ns.name()))?;
        Ok(Self { child, log })
    }

    /// nsenter execs the agent, so this is the agent's own pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.kill();
    }
}
