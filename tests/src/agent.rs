//! A real `overlay-agent` process inside a node namespace.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use tempfile::NamedTempFile;

use crate::{kill_and_reap, netns::NetNs, try_wait_until};

/// The agent binary: `$OVERLAY_AGENT_BIN`, else `<target dir>/debug/overlay-agent`.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OVERLAY_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let path = target.join("debug").join("overlay-agent");
    assert!(
        path.is_file(),
        "{} does not exist: build it with `cargo build -p overlay-agent` (cargo xtask test does) or set OVERLAY_AGENT_BIN",
        path.display()
    );
    path
}

/// A running agent; SIGKILLed and reaped on drop (like a crash: state stays in place).
pub struct AgentProcess {
    child: Child,
    log: NamedTempFile,
    netns: String,
}

impl AgentProcess {
    /// Starts the agent inside `netns` with `args`, logging at debug level to a temp file.
    pub fn spawn(netns: &NetNs, args: &[String]) -> AgentProcess {
        Self::spawn_with_env(netns, args, &[])
    }

    pub fn spawn_with_env(netns: &NetNs, args: &[String], env: &[(&str, &str)]) -> AgentProcess {
        // nsenter, not `ip netns exec`: pins on the host's bpffs outlive the process.
        let command = netns.nsenter_command(agent_binary().to_str().expect("utf-8 path"));
        Self::spawn_command(netns, command, args, env)
    }

    /// Starts the agent the way many flanneld units do, with `ip netns exec`: a private mount
    /// namespace whose fresh /sys has no bpffs.
    pub fn spawn_ip_netns_exec(netns: &NetNs, args: &[String]) -> AgentProcess {
        let command = netns.command(agent_binary().to_str().expect("utf-8 path"));
        Self::spawn_command(netns, command, args, &[])
    }

    fn spawn_command(
        netns: &NetNs,
        mut command: std::process::Command,
        args: &[String],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let log = NamedTempFile::with_prefix("overlay-agent-log-").expect("agent log file");
        command
            .args(args)
            .env("RUST_LOG", "info,overlay_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start overlay-agent in {}: {err}", netns.name()));
        AgentProcess {
            child,
            log,
            netns: netns.name().to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.child.id(),
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the agent to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut status = None;
        let exited = try_wait_until(timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(
            exited,
            "agent in {} did not exit within {timeout:?}; log:\n{}",
            self.netns,
            self.log()
        );
        status.and_then(|status| status.code())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let found = try_wait_until(timeout, || self.log().contains(needle));
        assert!(
            found,
            "agent in {} never logged {needle:?} within {timeout:?}; log:\n{}",
            self.netns,
            self.log()
        );
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- overlay-agent log ({}) ---\n{}", self.netns, self.log());
        }
    }
}
