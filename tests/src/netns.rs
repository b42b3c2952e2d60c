//! A network namespace that exists for the life of the value.

use std::{
    fs::File,
    future::Future,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::{Command, Output},
    time::Duration,
};

use crate::{run_checked, unique_name, wait_until};

/// A named network namespace (`ip netns add`), deleted on drop. Deleting the namespace also
/// deletes every interface inside it (and so the veth peers outside it).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// False for a [`NetNs::handle`]: only the value that created the namespace deletes it.
    owner: bool,
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
        let ns = NetNs { name, owner: true };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another value for this namespace that does not delete it on drop, for something that
    /// must own its way in (a dataplane that runs commands there) while the fixture keeps the
    /// namespace. Commands through it fail once the namespace is gone.
    pub fn handle(&self) -> NetNs {
        NetNs {
            name: self.name.clone(),
            owner: false,
        }
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

    /// A veth pair: `name` here, `peer_name` in `peer`, both at `mtu` (None: the kernel's
    /// default). Neither end is up.
    pub fn add_veth(&self, name: &str, peer: &NetNs, peer_name: &str, mtu: Option<u32>) {
        let mtu = mtu.map(|mtu| mtu.to_string());
        let mtu_args: Vec<&str> = mtu.iter().flat_map(|mtu| ["mtu", mtu.as_str()]).collect();
        let mut argv = vec!["ip", "link", "add", name];
        argv.extend(&mtu_args);
        argv.extend(["type", "veth", "peer", "name", peer_name]);
        argv.extend(&mtu_args);
        argv.extend(["netns", peer.name()]);
        self.run(&argv);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// `GET path` (HTTP/1.0) from 127.0.0.1:`port` inside the namespace, through bash's
    /// /dev/tcp: the whole response, status line and headers included; empty when nothing
    /// answers.
    pub fn http_get(&self, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        let out = self.try_run(&["bash", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Appends the nat rule kube-proxy installs for a ClusterIP (and the portmap plugin for a
    /// hostPort): TCP to `dest`:`dport` is DNATed to `to` ("ip:port"). Returns the output
    /// whatever the status.
    pub fn add_tcp_dnat(&self, dest: &str, dport: u16, to: &str) -> Output {
        self.try_run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            dest,
            "-p",
            "tcp",
            "--dport",
            &dport.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ])
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

    /// Runs `make()`'s future to completion inside the namespace, on a current-thread runtime
    /// built there (so the netlink sockets the future opens live here).
    pub fn block_on<T: Send, F: Future<Output = T>>(&self, make: impl FnOnce() -> F + Send) -> T {
        self.enter(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make())
        })
    }

    /// The interface index of `name` inside the namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        let text = self.stdout(&["cat", &format!("/sys/class/net/{name}/ifindex")]);
        text.trim()
            .parse()
            .unwrap_or_else(|err| panic!("ifindex of {name} in {}: {err}", self.name))
    }

    /// The MAC address of `name` inside the namespace, as the kernel prints it
    /// (`aa:bb:cc:dd:ee:ff`).
    pub fn mac(&self, name: &str) -> String {
        self.stdout(&["cat", &format!("/sys/class/net/{name}/address")])
            .trim()
            .to_owned()
    }

    /// `ping -c COUNT -i INTERVAL -W 2 TO` from the namespace, whatever its status.
    pub fn ping(&self, to: Ipv4Addr, count: u32, interval: &str) -> Output {
        self.try_run(&[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "2",
            &to.to_string(),
        ])
    }

    /// Waits until a TCP socket in the namespace listens on `port` (a server started in the
    /// background is not ready when its process is).
    pub fn wait_listening(&self, port: u16, timeout: Duration) {
        let filter = format!("sport = :{port}");
        wait_until(
            timeout,
            &format!("a TCP listener on port {port} in {}", self.name),
            || !self.stdout(&["ss", "-Hltn", &filter]).trim().is_empty(),
        );
    }

    /// `iperf3 -s -1 -p PORT` (serves one test, then exits) in the background, once it listens.
    pub fn iperf3_server(&self, port: u16) -> Background {
        let server = self.spawn_background(&["iperf3", "-s", "-1", "-p", &port.to_string()]);
        self.wait_listening(port, Duration::from_secs(10));
        server
    }

    /// `iperf3 -c TO -p PORT --connect-timeout 3000 ARGS...` from the namespace, whatever its
    /// status (add `-J` for [`iperf3_received_bytes`]).
    pub fn iperf3_client(&self, to: &str, port: u16, args: &[&str]) -> Output {
        let port = port.to_string();
        let mut argv = vec!["iperf3", "-c", to, "-p", &port, "--connect-timeout", "3000"];
        argv.extend_from_slice(args);
        self.try_run(&argv)
    }
}

/// The bytes the receiving side counted, from an `iperf3 -J` report.
pub fn iperf3_received_bytes(output: &Output) -> u64 {
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("iperf3 -J printed no JSON ({err}): {output:?}"));
    report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bytes in the iperf3 report: {report}"))
        as u64
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
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
