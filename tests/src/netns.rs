//! A network namespace that exists for the life of the value.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

use crate::{run_checked, unique_name};

/// A named network namespace (`ip netns add`), deleted on drop. Deleting the namespace also
/// deletes every interface inside it (and so the veth peers outside it).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `<prefix><unique>` with loopback up. `prefix` should be short (<= 6 bytes).
    pub fn new(prefix: &str) -> NetNs {
        crate::require_root();
        // Names come from the pid: a namespace a killed run with the same pid left behind
        // must not make this test fail, so such names are skipped.
        let name = std::iter::repeat_with(|| unique_name(prefix))
            .find(|name| !std::path::Path::new("/run/netns").join(name).exists())
            .expect("an unused namespace name");
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace (`ip netns exec <name> <program>`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// A command that runs with only its network namespace switched (`nsenter --net`). Unlike
    /// `ip netns exec`, it keeps the host's mounts: /sys/fs/bpf stays the host's bpffs, so
    /// pinned BPF objects outlive the process. Use it for the agent.
    pub fn nsenter_command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `argv` inside the namespace; panics with the output on failure.
    pub fn run(&self, argv: &[&str]) -> Output {
        let mut command = self.command(argv[0]);
        command.args(&argv[1..]);
        run_checked(&mut command)
    }

    /// Runs `argv` inside the namespace and returns its stdout as text.
    pub fn stdout(&self, argv: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(argv).stdout).into_owned()
    }

    /// Runs `argv` inside the namespace, returning the output whatever the exit status.
    pub fn try_run(&self, argv: &[&str]) -> Output {
        let mut command = self.command(argv[0]);
        command.args(&argv[1..]);
        command
            .output()
            .unwrap_or_else(|err| panic!("cannot run {argv:?} in {}: {err}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered this namespace, so every socket and netlink
    /// request it makes lives here. Returns what `f` returns (panics propagate).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
                    // SAFETY: setns on a valid namespace fd; it affects only this thread, which
                    // ends when `f` returns.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface index of `name` inside the namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        let text = self.stdout(&["cat", &format!("/sys/class/net/{name}/ifindex")]);
        text.trim()
            .parse()
            .unwrap_or_else(|err| panic!("ifindex of {name} in {}: {err}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// A background process inside a namespace, SIGKILLed and reaped on drop. Use it for servers
/// (iperf3 -s, listeners) instead of their daemon modes, which outlive a failed test.
#[derive(Debug)]
pub struct Background {
    child: std::process::Child,
}

impl Background {
    /// Starts `argv` inside the namespace named `netns` with its output discarded.
    pub fn spawn(netns: &str, argv: &[&str]) -> Background {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {argv:?} in {netns}: {err}"));
        Background { child }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

impl NetNs {
    /// Starts `argv` inside the namespace in the background; stopped when the guard drops.
    pub fn spawn_background(&self, argv: &[&str]) -> Background {
        Background::spawn(&self.name, argv)
    }
}
