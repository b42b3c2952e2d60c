//! One mode's datapath tests between two pods on different nodes: iperf3 (1 and 4 streams,
//! and a paced run for CPU cost), and the xtask tools for request/response, connect rate and
//! UDP packet rate. Every test is bounded in time and talks only inside our namespaces.
//!
//! Every client and server process is pinned with `taskset` to the same CPUs in every mode:
//! on a small VM a wake-up across CPUs costs several times one on the same CPU, so latency
//! figures compare only with the same placement.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::cpu::{CpuTimes, MachineRuntime, Scope};
use super::tools::{self, CrrResult, RrResult, ServerProcess, UdpFloodResult, UdpSinkResult};
use super::{MetricDef, Progress};

const IPERF_PORT: u16 = 5201;
const TCP_TOOL_PORT: u16 = 7001;
const UDP_TOOL_PORT: u16 = 7002;

/// The datapath metrics, in report order.
pub const METRICS: &[MetricDef] = &[
    MetricDef::new("tcp_1_stream", "TCP throughput, 1 stream", "Gbit/s", true),
    MetricDef::new("tcp_4_streams", "TCP throughput, 4 streams", "Gbit/s", true),
    MetricDef::new("tcp_rr", "TCP 1-byte request/response", "trans/s", true),
    MetricDef::new("tcp_rr_p50", "TCP RR latency p50", "us", false),
    MetricDef::new("tcp_rr_p99", "TCP RR latency p99", "us", false),
    MetricDef::new("tcp_crr", "TCP connect+req+close", "conn/s", true),
    MetricDef::new("udp_pps", "UDP small packets received", "pkt/s", true),
    MetricDef::new("udp_loss", "UDP loss", "%", false),
    MetricDef::new(
        "cpu_per_gbit",
        "CPU at paced rate, experiment's tasks",
        "CPU-s/Gbit",
        false,
    ),
    MetricDef::new(
        "cpu_per_gbit_machine",
        "CPU at paced rate, all tasks",
        "CPU-s/Gbit",
        false,
    ),
    MetricDef::new(
        "cpu_per_gbit_procstat",
        "CPU at paced rate, /proc/stat (ticks)",
        "CPU-s/Gbit",
        false,
    ),
];

/// Two pods on different nodes; the client runs in `client_ns`, servers in `server_ns`.
#[derive(Clone, Debug)]
pub struct PodPair {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
    /// Every namespace of the experiment (pods and nodes): whose tasks' CPU counts.
    pub scope_ns: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Length of each throughput/rate test.
    pub seconds: f64,
    /// Rate of the paced run that measures CPU cost (Gbit/s).
    pub paced_gbit: f64,
    pub pin: Pinning,
}

/// CPU lists (taskset -c syntax) for the load tools' client and server processes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pinning {
    pub client_cpus: String,
    pub server_cpus: String,
}

impl Pinning {
    /// Client on CPU 0 and server on CPU 1 (as on two hosts), or both on CPU 0 when the
    /// machine has one.
    pub fn default_for(cpus: usize) -> Self {
        Self {
            client_cpus: "0".into(),
            server_cpus: if cpus >= 2 { "1" } else { "0" }.into(),
        }
    }

    /// Fails early, with the reason, when taskset refuses a CPU list (e.g. a CPU that does
    /// not exist here).
    pub fn check(&self) -> Result<()> {
        for (what, cpus) in [("client", &self.client_cpus), ("server", &self.server_cpus)] {
            let out = Command::new("taskset")
                .args(["-c", cpus, "true"])
                .output()
                .context("run taskset (util-linux)")?;
            if !out.status.success() {
                bail!(
                    "--{what}-cpus {cpus:?} is not usable here: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// `program` in `ns`, pinned to `cpus`. `ip netns exec` and taskset both exec, so the
/// child's pid is the program's.
pub fn in_ns_pinned(ns: &str, cpus: &str, program: &str) -> Command {
    let mut c = in_ns(ns, "taskset");
    c.args(["-c", cpus, program]);
    c
}

/// A private copy of this binary for the tools: a `cargo build` during a long run replaces
/// target/debug/xtask, and the tools would then exec a deleted file.
static TOOL_EXE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();

fn tool_exe() -> Result<&'static std::path::Path> {
    if TOOL_EXE.get().is_none() {
        let exe = std::env::current_exe().context("find the xtask binary to run its tools")?;
        let copy = tempfile::Builder::new()
            .prefix("xtask-bench-tools-")
            .tempfile()
            .context("temp file for the tools' binary")?
            .into_temp_path();
        std::fs::copy(&exe, &copy).with_context(|| format!("copy {}", exe.display()))?;
        let _ = TOOL_EXE.set(copy);
    }
    Ok(TOOL_EXE.get().expect("set above"))
}

/// Removes the tools' binary copy (a static is never dropped, so its TempPath would not).
pub fn remove_tool_exe() {
    if let Some(p) = TOOL_EXE.get() {
        let _ = std::fs::remove_file(p);
    }
}

fn self_tool(ns: &str, cpus: &str) -> Result<Command> {
    let exe = tool_exe()?;
    let mut c = in_ns_pinned(ns, cpus, &exe.to_string_lossy());
    c.args(["bench", "tool"]);
    Ok(c)
}

/// Runs every test once; a failing test leaves NaN and an error line instead of ending the run.
pub fn measure_mode(
    pair: &PodPair,
    s: &Settings,
    progress: &Progress,
    errors: &mut Vec<String>,
) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for m in METRICS {
        out.insert(m.key.as_ref(), f64::NAN);
    }
    let mut note = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            let msg = format!("{what}: {e:#}");
            progress.line(&format!("    FAILED {msg}"));
            errors.push(msg);
        }
    };
    // Time-wait sockets of the connect test must not exhaust the client's ports.
    note(
        "client sysctls",
        sh(in_ns(&pair.client_ns, "sysctl").args([
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])),
    );

    note(
        "iperf3",
        (|| {
            let _server = start_iperf_server(&pair.server_ns, &s.pin.server_cpus)?;
            let r1 = iperf(pair, &s.pin, s.seconds, 1, None)?;
            out.insert("tcp_1_stream", r1.gbit_per_s);
            progress.line(&format!(
                "    tcp 1 stream   {:>10.2} Gbit/s",
                r1.gbit_per_s
            ));
            let r4 = iperf(pair, &s.pin, s.seconds, 4, None)?;
            out.insert("tcp_4_streams", r4.gbit_per_s);
            progress.line(&format!(
                "    tcp 4 streams  {:>10.2} Gbit/s",
                r4.gbit_per_s
            ));
            // The machine is shared: measure an equal window without our traffic just
            // before, and charge the run only for what it added (scaled to its length).
            let scope = Scope::of_namespaces(
                &pair.scope_ns.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
            let wall = Instant::now();
            let (idle_stat, idle_rt) = (CpuTimes::now()?, MachineRuntime::now(&scope)?);
            std::thread::sleep(Duration::from_secs_f64(s.seconds.ceil().max(1.0)));
            let idle_rt = MachineRuntime::now(&scope)?.since(&idle_rt);
            let idle_stat = CpuTimes::now()?.since(&idle_stat).busy;
            let idle_wall = wall.elapsed().as_secs_f64();
            let wall = Instant::now();
            let (run_stat, run_rt) = (CpuTimes::now()?, MachineRuntime::now(&scope)?);
            let rp = iperf(pair, &s.pin, s.seconds, 1, Some(s.paced_gbit))?;
            let run_rt = MachineRuntime::now(&scope)?.since(&run_rt);
            let run_stat = CpuTimes::now()?.since(&run_stat).busy;
            let scale = wall.elapsed().as_secs_f64() / idle_wall;
            let gbit = rp.bytes as f64 * 8.0 / 1e9;
            if gbit <= 0.0 {
                bail!("paced run moved no data");
            }
            let cost = |run: f64, idle: f64| (run - idle * scale).max(0.0) / gbit;
            let scoped = cost(run_rt.scoped, idle_rt.scoped);
            let machine = cost(run_rt.all, idle_rt.all);
            let procstat = cost(run_stat, idle_stat);
            out.insert("cpu_per_gbit", scoped);
            out.insert("cpu_per_gbit_machine", machine);
            out.insert("cpu_per_gbit_procstat", procstat);
            progress.line(&format!(
                "    paced {:.1} Gbit/s: {:.2} Gbit/s moved; CPU-s run/background: experiment \
                 {:.2}/{:.2} = {scoped:.3} CPU-s/Gbit, machine {:.2}/{:.2} = {machine:.3}, \
                 /proc/stat {run_stat:.2}/{:.2} = {procstat:.3}",
                s.paced_gbit,
                rp.gbit_per_s,
                run_rt.scoped,
                idle_rt.scoped * scale,
                run_rt.all,
                idle_rt.all * scale,
                idle_stat * scale
            ));
            Ok(())
        })(),
    );

    let server_tcp = SocketAddr::from((pair.server_ip, TCP_TOOL_PORT));
    note(
        "tcp rr/crr",
        (|| {
            let mut cmd = self_tool(&pair.server_ns, &s.pin.server_cpus)?;
            cmd.args(["tcp-echo", "--port", &TCP_TOOL_PORT.to_string()]);
            let _server = ServerProcess::start(cmd, "tcp-echo server")?;
            let mut rr = self_tool(&pair.client_ns, &s.pin.client_cpus)?;
            rr.args([
                "rr",
                "--server",
                &server_tcp.to_string(),
                "--seconds",
                &s.seconds.to_string(),
            ]);
            let r: RrResult = tools::run_client(rr, "rr client")?;
            let rate = r.transactions as f64 / r.seconds;
            out.insert("tcp_rr", rate);
            out.insert("tcp_rr_p50", r.p50_us);
            out.insert("tcp_rr_p99", r.p99_us);
            progress.line(&format!(
                "    tcp rr         {rate:>10.0} trans/s  p50 {:.1} us  p99 {:.1} us",
                r.p50_us, r.p99_us
            ));
            let mut crr = self_tool(&pair.client_ns, &s.pin.client_cpus)?;
            crr.args([
                "crr",
                "--server",
                &server_tcp.to_string(),
                "--seconds",
                &s.seconds.to_string(),
            ]);
            let c: CrrResult = tools::run_client(crr, "crr client")?;
            let rate = c.connections as f64 / c.seconds;
            out.insert("tcp_crr", rate);
            progress.line(&format!(
                "    tcp crr        {rate:>10.0} conn/s ({} failed)",
                c.failures
            ));
            Ok(())
        })(),
    );

    note(
        "udp",
        (|| {
            let mut cmd = self_tool(&pair.server_ns, &s.pin.server_cpus)?;
            cmd.args(["udp-sink", "--port", &UDP_TOOL_PORT.to_string()]);
            cmd.args(["--max-seconds", &((s.seconds as u64) + 30).to_string()]);
            let sink = ServerProcess::start(cmd, "udp-sink")?;
            let mut flood = self_tool(&pair.client_ns, &s.pin.client_cpus)?;
            let target = SocketAddr::from((pair.server_ip, UDP_TOOL_PORT));
            flood.args([
                "udp-flood",
                "--server",
                &target.to_string(),
                "--seconds",
                &s.seconds.to_string(),
            ]);
            let f: UdpFloodResult = tools::run_client(flood, "udp-flood client")?;
            let r: UdpSinkResult = sink.finish(Duration::from_secs(10))?;
            // The flood's own count is the sent figure; the end marker only ends the sink
            // early (it stops after a second of silence otherwise).
            if r.received == 0 {
                bail!("udp-sink received none of {} datagrams", f.sent);
            }
            // Rate over the sender's interval: packets the receiver got per second of sending.
            let pps = r.received as f64 / f.seconds;
            let loss = 100.0 * (1.0 - r.received as f64 / f.sent.max(1) as f64);
            out.insert("udp_pps", pps);
            out.insert("udp_loss", loss.max(0.0));
            progress.line(&format!(
                "    udp            {pps:>10.0} pkt/s received, {:.0} pkt/s sent, loss {loss:.1} %",
                f.sent as f64 / f.seconds
            ));
            Ok(())
        })(),
    );
    out
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An iperf3 server in a namespace, killed by pid on drop.
pub struct IperfServer(std::process::Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_iperf_server(ns: &str, cpus: &str) -> Result<IperfServer> {
    let child = in_ns_pinned(ns, cpus, "iperf3")
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("spawn iperf3 server (is iperf3 installed? `cargo xtask setup` installs it)")?;
    let server = IperfServer(child);
    wait_listening(ns, IPERF_PORT, Duration::from_secs(10))?;
    Ok(server)
}

/// Waits until a TCP port listens inside a namespace (iperf3 has no readiness signal).
fn wait_listening(ns: &str, port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let out = in_ns(ns, "ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .context("run ss")?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on tcp {port} in {ns} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct IperfResult {
    pub gbit_per_s: f64,
    pub bytes: u64,
}

fn iperf(
    pair: &PodPair,
    pin: &Pinning,
    seconds: f64,
    streams: u32,
    rate_gbit: Option<f64>,
) -> Result<IperfResult> {
    let mut cmd = iperf_client(pair, pin, seconds, streams, rate_gbit);
    let out = cmd.output().context("spawn iperf3 client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_iperf_json(&text).with_context(|| {
        format!(
            "iperf3 -P {streams} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// The pinned iperf3 client command (JSON output on stdout).
pub fn iperf_client(
    pair: &PodPair,
    pin: &Pinning,
    seconds: f64,
    streams: u32,
    rate_gbit: Option<f64>,
) -> Command {
    let mut cmd = in_ns_pinned(&pair.client_ns, &pin.client_cpus, "iperf3");
    cmd.args([
        "-J",
        "-c",
        &pair.server_ip.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
    ]);
    cmd.args(["-t", &format!("{}", seconds.ceil().max(1.0) as u64)]);
    cmd.args(["-P", &streams.to_string()]);
    if let Some(r) = rate_gbit {
        // Per-stream pacing; with 1 stream this is the total rate.
        cmd.args(["-b", &format!("{}M", (r * 1000.0).round() as u64)]);
    }
    cmd
}

pub fn parse_iperf_json(text: &str) -> Result<IperfResult> {
    let v: Value = serde_json::from_str(text).context("iperf3 -J output is not JSON")?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3 reported: {err}");
    }
    let sum = v
        .pointer("/end/sum_received")
        .context("iperf3 JSON has no end.sum_received")?;
    let bps = sum
        .get("bits_per_second")
        .and_then(Value::as_f64)
        .context("end.sum_received.bits_per_second")?;
    let bytes = sum
        .get("bytes")
        .and_then(Value::as_u64)
        .context("end.sum_received.bytes")?;
    Ok(IperfResult {
        gbit_per_s: bps / 1e9,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_end_summary() {
        let j = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bytes":10,"bits_per_second":1.0},
            "sum_received":{"bytes":7500000000,"bits_per_second":12000000000.0}}}"#;
        let r = parse_iperf_json(j).expect("valid");
        assert_eq!(r.bytes, 7_500_000_000);
        assert!((r.gbit_per_s - 12.0).abs() < 1e-9);
        let e = parse_iperf_json(r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("unable to connect"));
    }
}
