//! "Is this peer in the datapath?" for the control-plane benchmark.
//!
//! - ebpf: the agent's pinned PEERS LPM trie, read with the bpf syscalls (what bpftool does,
//!   without a process per poll: change latency is polled every 100 us).
//! - vxlan: the route `<subnet> via ... dev flannel.<VNI>` flanneld adds last for each peer
//!   (after neighbour and FDB); counted from a route dump, timed from `ip monitor route`.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
use overlay_common::{PeerInfo, PeerSubnet, map_names, peer_flags, stat};

pub const VXLAN_DEV: &str = "flannel.1";

/// The agent's PEERS map, opened once the agent has created it.
///
/// Found by its pin under the agent's `--bpf-pin-dir` when that is visible from here, else
/// among the BPF map fds the agent process holds (`/proc/<pid>/fdinfo`). The second way is
/// needed because `ip netns exec` (how the fixtures start the agent) gives the agent its own
/// mount namespace with a fresh /sys, where /sys/fs/bpf is not the host's bpffs: whatever
/// the agent pins there is invisible from outside.
pub struct PeerMap {
    pin_dir: PathBuf,
    agent_pid: Option<u32>,
    trie: Option<LpmTrie<MapData, PeerSubnet, PeerInfo>>,
}

impl PeerMap {
    pub fn new(pin_dir: &Path, agent_pid: Option<u32>) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            agent_pid,
            trie: None,
        }
    }

    fn open(&self) -> Result<Option<MapData>> {
        open_agent_map(&self.pin_dir, self.agent_pid, map_names::PEERS)
    }

    /// The map, or None while the agent has not created it yet.
    fn trie(&mut self) -> Result<Option<&LpmTrie<MapData, PeerSubnet, PeerInfo>>> {
        if self.trie.is_none() {
            let Some(data) = self.open()? else {
                return Ok(None);
            };
            let map = Map::from_map_data(data).context("PEERS map")?;
            self.trie = Some(
                LpmTrie::try_from(map).context("the PEERS map is not an LPM trie of PeerInfo")?,
            );
        }
        Ok(self.trie.as_ref())
    }

    /// Entries marked valid.
    pub fn count(&mut self) -> Result<usize> {
        let Some(trie) = self.trie()? else {
            return Ok(0);
        };
        let mut n = 0;
        for entry in trie.iter() {
            // An entry deleted between get_next_key and lookup is not an error here.
            if let Ok((_, info)) = entry
                && info.flags & peer_flags::VALID != 0
            {
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn has(&mut self, subnet: Ipv4Addr, prefix_len: u8) -> Result<bool> {
        let Some(trie) = self.trie()? else {
            return Ok(false);
        };
        match trie.get(&Key::new(u32::from(prefix_len), subnet.octets()), 0) {
            Ok(info) => Ok(info.flags & peer_flags::VALID != 0),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("look up PEERS"),
        }
    }
}

/// Opens one of the agent's maps by name: its pin under `pin_dir` when visible from here,
/// else the map of that name among the fds the agent process `pid` holds.
pub fn open_agent_map(pin_dir: &Path, pid: Option<u32>, name: &str) -> Result<Option<MapData>> {
    if let Some(path) = find_file(pin_dir, name) {
        let data = MapData::from_pin(&path)
            .with_context(|| format!("open pinned map {}", path.display()))?;
        return Ok(Some(data));
    }
    let Some(pid) = pid else {
        return Ok(None);
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Ok(None);
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let named = MapInfo::from_id(id)
            .ok()
            .is_some_and(|i| i.name_as_str() == Some(name));
        if named {
            let data = MapData::from_id(id).with_context(|| format!("open map id {id}"))?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Sums of the agent's per-CPU datapath counters (`overlay_common::stat`), or None when the
/// agent has no such map.
pub fn read_stats(pin_dir: &Path, pid: u32) -> Result<Option<Vec<u64>>> {
    let Some(data) = open_agent_map(pin_dir, Some(pid), map_names::STATS)? else {
        return Ok(None);
    };
    let map = Map::from_map_data(data).context("STATS map")?;
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(map).context("the STATS map is not a per-CPU array of u64")?;
    let mut sums = Vec::new();
    for i in 0..stat::COUNT {
        let per_cpu = stats
            .get(&i, 0)
            .with_context(|| format!("read STATS[{i}]"))?;
        sums.push(per_cpu.iter().sum());
    }
    Ok(Some(sums))
}

/// Finds a file by name under `dir` (the agent may pin maps in a subdirectory).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if e.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find_file(&p, name)
        {
            return Some(found);
        }
    }
    None
}

/// Routes towards peer subnets through the vxlan device in namespace `ns`.
pub fn count_vxlan_routes(ns: &str) -> Result<usize> {
    let out = Command::new("ip")
        .args(["-n", ns, "-4", "route", "show", "dev", VXLAN_DEV])
        .output()
        .context("run ip route show")?;
    if !out.status.success() {
        // No device yet: no peers.
        return Ok(0);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" via "))
        .count())
}

/// `ip monitor route` in a namespace; lines arrive with the time they were read.
pub struct RouteMonitor {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl RouteMonitor {
    pub fn start(ns: &str) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn ip monitor route")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let monitor = Self { child, lines: rx };
        monitor.wait_until_listening(ns)?;
        Ok(monitor)
    }

    /// `ip monitor` subscribes some time after it starts: a change made before then would be
    /// missed and counted as lost. Add and remove a blackhole route (TEST-NET-2, no device)
    /// until the monitor reports it.
    fn wait_until_listening(&self, ns: &str) -> Result<()> {
        const PROBE: &str = "198.51.100.1";
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let _ = Command::new("ip")
                .args(["-n", ns, "route", "replace", "blackhole", PROBE])
                .status();
            let seen = loop {
                match self.lines.recv_timeout(Duration::from_millis(200)) {
                    Ok((_, line)) if line.contains(PROBE) => break true,
                    Ok(_) => {}
                    Err(_) => break false,
                }
            };
            let _ = Command::new("ip")
                .args(["-n", ns, "route", "del", "blackhole", PROBE])
                .status();
            if seen {
                std::thread::sleep(Duration::from_millis(50));
                self.drain();
                return Ok(());
            }
        }
        bail!("ip monitor route in {ns} reported nothing for 10 s")
    }

    /// Drops lines already read (events of earlier changes).
    pub fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// Waits for the route to `subnet` to be added (or deleted); returns when it was seen.
    pub fn wait_for(&self, subnet: &str, added: bool, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        let prefix = if added {
            format!("{subnet} ")
        } else {
            format!("Deleted {subnet} ")
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) if line.starts_with(&prefix) && line.contains(VXLAN_DEV) => {
                    return Ok(t);
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no route {} for {subnet} within {limit:?}",
                        if added { "add" } else { "removal" }
                    )
                }
                Err(RecvTimeoutError::Disconnected) => bail!("ip monitor route exited"),
            }
        }
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
