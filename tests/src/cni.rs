//! Driving the `flannel` CNI plugin exactly as a container runtime does: the agent binary
//! linked as `flannel` in a scratch bin directory, Debian's reference plugins
//! (`containernetworking-plugins`) in /usr/lib/cni, CNI_* variables, the netconf on stdin,
//! a conflist run plugin by plugin with each result as the next one's prevResult (what
//! libcni does for kubelet's `10-flannel.conflist`), inside the node's namespace.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    agent::agent_binary,
    netns::NetNs,
    topology::{Node, Pod},
    unique_name,
};

/// How long a runtime waits for one plugin call.
const PLUGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where Debian's `containernetworking-plugins` installs bridge, host-local, portmap...
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// A runtime's view: plugin directory, netconf defaults and scratch state, all in a temp
/// directory removed on drop.
pub struct CniRuntime {
    dir: TempDir,
    cni_path: String,
}

/// What one plugin invocation printed and how it ended.
#[derive(Debug)]
pub struct Invocation {
    pub success: bool,
    /// stdout parsed as JSON (Null when empty).
    pub stdout: Value,
    pub stderr: String,
}

impl Invocation {
    fn from_output(out: Output) -> Invocation {
        let text = String::from_utf8_lossy(&out.stdout);
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("plugin stdout is not JSON ({err}): {text:?}"))
        };
        Invocation {
            success: out.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the CNI error and stderr unless the call succeeded.
    pub fn expect_ok(self, what: &str) -> Value {
        assert!(
            self.success,
            "{what} failed: {}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self.stdout
    }
}

impl Default for CniRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl CniRuntime {
    /// A bin dir holding `flannel` -> the agent binary (as `/opt/cni/bin/flannel` would),
    /// searched before Debian's plugin dir.
    pub fn new() -> CniRuntime {
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            let path = Path::new(DEBIAN_CNI_DIR).join(plugin);
            assert!(
                path.is_file(),
                "{} is missing: install Debian's containernetworking-plugins (cargo xtask setup does)",
                path.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("overlay-cni-")
            .tempdir()
            .expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        std::os::unix::fs::symlink(agent_binary(), bin.join("flannel")).expect("symlink flannel");
        let cni_path = format!("{}:{DEBIAN_CNI_DIR}", bin.display());
        CniRuntime { dir, cni_path }
    }

    /// The `flannel` plugin's path (the symlink).
    pub fn flannel(&self) -> PathBuf {
        self.dir.path().join("bin/flannel")
    }

    /// flannel's data dir (saved delegate netconfs) for this runtime.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("flannel")
    }

    /// host-local's state directory (one file per allocated address).
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// The standard `10-flannel.conflist` (flannel then portmap), pointed at this runtime's
    /// scratch dirs and `subnet_file`.
    pub fn flannel_conflist(&self, cni_version: &str, subnet_file: &Path) -> Value {
        json!({
            "name": "cbr0",
            "cniVersion": cni_version,
            "plugins": [
                {
                    "type": "flannel",
                    "subnetFile": subnet_file,
                    "dataDir": self.data_dir(),
                    "ipam": {"dataDir": self.ipam_dir()},
                    "delegate": {"hairpinMode": true, "isDefaultGateway": true}
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    /// Runs one plugin (`type` of `conf`) with `command`, in `node_ns`.
    pub fn invoke(
        &self,
        node_ns: &NetNs,
        conf: &Value,
        command: &str,
        container_id: &str,
        pod_netns: Option<&NetNs>,
    ) -> Invocation {
        let plugin_type = conf["type"].as_str().expect("plugin type");
        let program = std::env::split_paths(&self.cni_path)
            .map(|dir| dir.join(plugin_type))
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("plugin {plugin_type} not in {}", self.cni_path));
        self.invoke_program(node_ns, &program, conf, command, container_id, pod_netns)
    }

    /// Runs `program` as a plugin with the given netconf (any JSON, even invalid text via
    /// a string value) and environment.
    pub fn invoke_program(
        &self,
        node_ns: &NetNs,
        program: &Path,
        conf: &Value,
        command: &str,
        container_id: &str,
        pod_netns: Option<&NetNs>,
    ) -> Invocation {
        let stdin = match conf {
            Value::String(raw) => raw.clone().into_bytes(),
            other => serde_json::to_vec(other).expect("netconf"),
        };
        self.invoke_raw(
            node_ns,
            program,
            &stdin,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container_id),
                (
                    "CNI_NETNS",
                    &pod_netns
                        .map(|ns| format!("/run/netns/{}", ns.name()))
                        .unwrap_or_default(),
                ),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &self.cni_path),
            ],
        )
    }

    /// The lowest level: `program` with exactly `env` (CNI_* only) and `stdin`.
    pub fn invoke_raw(
        &self,
        node_ns: &NetNs,
        program: &Path,
        stdin: &[u8],
        env: &[(&str, &str)],
    ) -> Invocation {
        use std::io::Write as _;
        let mut command = node_ns.nsenter_command(program.to_str().expect("utf-8 path"));
        command
            .env_remove("CNI_COMMAND")
            .env("OVERLAY_CNI_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write netconf");
        // A plugin that does not answer (e.g. a stale agent binary that starts the daemon
        // instead) fails the test in a minute instead of hanging it until nextest kills it
        // without cleanup.
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let output = child.wait_with_output();
            let _ = done_tx.send(());
            output
        });
        if done_rx.recv_timeout(PLUGIN_TIMEOUT).is_err() {
            // SAFETY: kill(2) on our own child, not yet reaped (the waiter still waits).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = waiter.join();
            panic!(
                "{} did not answer within {PLUGIN_TIMEOUT:?}",
                program.display()
            );
        }
        Invocation::from_output(
            waiter
                .join()
                .expect("plugin waiter")
                .expect("plugin output"),
        )
    }

    /// A plugin's netconf inside `conflist`, as libcni builds it (the list's name and
    /// cniVersion injected, the previous result as prevResult).
    fn plugin_conf(conflist: &Value, index: usize, prev_result: Option<&Value>) -> Value {
        let mut conf = conflist["plugins"][index].clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// ADD of a whole conflist; the last plugin's result (the runtime's result).
    pub fn add_list(
        &self,
        node_ns: &NetNs,
        conflist: &Value,
        container_id: &str,
        pod_netns: &NetNs,
    ) -> Result<Value, Invocation> {
        let mut result: Option<Value> = None;
        for index in 0..conflist["plugins"].as_array().expect("plugins").len() {
            let conf = Self::plugin_conf(conflist, index, result.as_ref());
            let call = self.invoke(node_ns, &conf, "ADD", container_id, Some(pod_netns));
            if !call.success {
                return Err(call);
            }
            result = Some(call.stdout);
        }
        Ok(result.expect("at least one plugin"))
    }

    /// DEL of a whole conflist, in reverse order, with the cached result as prevResult for
    /// spec 0.4.0 and later (libcni does so; 0.3.x gets none).
    pub fn del_list(
        &self,
        node_ns: &NetNs,
        conflist: &Value,
        container_id: &str,
        pod_netns: Option<&NetNs>,
        cached_result: Option<&Value>,
    ) -> Vec<Invocation> {
        let version = conflist["cniVersion"].as_str().unwrap_or("");
        let prev = cached_result.filter(|_| !version.starts_with("0.3"));
        let count = conflist["plugins"].as_array().expect("plugins").len();
        (0..count)
            .rev()
            .map(|index| {
                let conf = Self::plugin_conf(conflist, index, prev);
                self.invoke(node_ns, &conf, "DEL", container_id, pod_netns)
            })
            .collect()
    }

    /// A pod on `node` made through the conflist (a fresh namespace, CNI ADD), as kubelet
    /// would; returns it with the ADD result.
    pub fn add_pod<'n>(&self, node: &'n mut Node, conflist: &Value) -> (&'n Pod, Value, String) {
        let ns = NetNs::new("op");
        let container_id = unique_name("ctr");
        let result = self
            .add_list(&node.ns, conflist, &container_id, &ns)
            .unwrap_or_else(|call| {
                panic!(
                    "CNI ADD on {} failed: {}\nstderr:\n{}",
                    node.ns.name(),
                    call.stdout,
                    call.stderr
                )
            });
        let ip = first_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in {result}"));
        node.pods.push(Pod { ns, ip });
        (node.pods.last().expect("pushed"), result, container_id)
    }
}

/// The first IPv4 address of a CNI result.
pub fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .next()
}

/// The pod addresses in a pinned ENDPOINTS map (`bpftool -j map dump pinned`), with or
/// without BTF formatting.
pub fn pinned_endpoints(map: &Path) -> Vec<Ipv4Addr> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(map)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        map.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let byte = |v: &Value| -> u8 {
        match v {
            Value::String(hex) => {
                u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex byte")
            }
            other => other.as_u64().expect("byte") as u8,
        }
    };
    entries
        .as_array()
        .expect("array")
        .iter()
        .map(|entry| {
            let key = entry
                .get("key")
                .or_else(|| entry.get("formatted").and_then(|f| f.get("key")))
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("no key in {entry}"));
            let bytes: Vec<u8> = key.iter().map(byte).collect();
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
        })
        .collect()
}
