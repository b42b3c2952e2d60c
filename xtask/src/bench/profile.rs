//! A CPU profile per mode: `perf record -a -g` around one bulk TCP test (its own short run,
//! never a measured one), then which kernel functions the experiment spent its time in and
//! which ones a mode no longer passes through.
//!
//! The machine is shared, so only the experiment's samples count: those of the load tool
//! (`iperf3`, client and server: on veth the whole receive path runs in the sender's
//! context) and of `ksoftirqd/*` (softirq work deferred there). Two figures per mode:
//! - self share per kernel function: where the time went (`perf report --no-children`);
//! - for groups of functions (the bridge, netfilter, forwarding, the vxlan device, ...):
//!   the share of samples with any of them on the call chain, which is what shows that a
//!   fast-path piece removed a layer (a self share would hide callees).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Progress;
use super::measure::{self, Pinning, PodPair};

/// Sampling rate: enough samples for shares to about 1 % in a few seconds, little overhead.
const FREQUENCY_HZ: u32 = 999;
const TOP_KERNEL: usize = 15;

/// The layers a fast path is meant to skip (and what it adds), as symbol patterns: `x*`
/// prefix, `*x` suffix, `*x*` substring, else exact. Compiler suffixes (`.isra.0`, `.cold`)
/// are stripped before matching.
pub const GROUPS: &[(&str, &[&str])] = &[
    ("bridge (br_*)", &["br_*"]),
    (
        "netfilter (nf_*, nft_*, ipt_*)",
        &["nf_*", "nft_*", "ipt_*", "iptable_*", "ipv4_conntrack_*"],
    ),
    ("ip_forward", &["ip_forward", "ip_forward_finish"]),
    (
        "ip_rcv",
        &[
            "ip_rcv",
            "ip_rcv_core",
            "ip_rcv_finish",
            "ip_list_rcv",
            "ip_sublist_rcv",
        ],
    ),
    (
        "route lookup (fib_*, ip_route_*)",
        &[
            "fib_table_lookup",
            "fib_lookup*",
            "ip_route_input*",
            "ip_route_output*",
        ],
    ),
    (
        "backlog (process_backlog, enqueue_to_backlog)",
        &["process_backlog", "enqueue_to_backlog"],
    ),
    ("vxlan device (vxlan_*)", &["vxlan_*"]),
    (
        "UDP tunnel GSO (skb_udp_tunnel_segment)",
        &["skb_udp_tunnel_segment", "__skb_udp_tunnel_segment"],
    ),
    (
        "TCP GSO (tcp_gso_segment, skb_segment)",
        &[
            "tcp_gso_segment",
            "tcp4_gso_segment",
            "__tcp_gso_segment",
            "skb_segment",
        ],
    ),
    (
        "UDP receive (udp_rcv)",
        &[
            "udp_rcv",
            "__udp4_lib_rcv",
            "udp_unicast_rcv_skb",
            "udp_queue_rcv_skb",
        ],
    ),
    (
        "GRO (*gro_receive*)",
        &["*gro_receive*", "napi_gro_*", "gro_*"],
    ),
    ("veth_xmit", &["veth_xmit"]),
    ("eBPF programs (bpf_prog_*)", &["bpf_prog_*"]),
    (
        "socket copies (copy to/from user)",
        &[
            "_copy_to_iter",
            "_copy_from_iter",
            "rep_movs_alternative",
            "copy_user_*",
            "skb_copy_datagram_iter",
        ],
    ),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Profile {
    pub mode: String,
    /// The profiled iperf3 run's throughput (not a measurement: perf is running).
    pub gbit_per_s: f64,
    pub samples_all: u64,
    /// Samples of iperf3 and ksoftirqd: what every share below is a fraction of.
    pub samples_experiment: u64,
    /// Share of the experiment's samples that were in the kernel (incl. BPF programs).
    pub kernel_share: f64,
    /// Kernel functions by self share, highest first.
    pub top_kernel: Vec<(String, f64)>,
    /// GROUPS label -> share of the experiment's samples with the group on the call chain.
    pub groups: BTreeMap<String, f64>,
    /// The `perf report` text, relative to the out dir.
    pub report_file: String,
}

/// Is `comm` one of the experiment's tasks?
fn is_experiment(comm: &str) -> bool {
    comm == "iperf3" || comm.starts_with("ksoftirqd/")
}

fn experiment_comms() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::iter::once("iperf3".to_string())
        .chain((0..cpus).map(|c| format!("ksoftirqd/{c}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Fails early when perf cannot sample the whole machine with kernel call chains.
pub fn check_perf() -> Result<()> {
    let out = Command::new("perf")
        .args(["record", "-q", "-a", "-g", "-o", "/dev/null", "--", "true"])
        .output()
        .context("run perf (Debian: apt-get install linux-perf), or pass --no-profile")?;
    if !out.status.success() {
        bail!(
            "perf record -a -g does not work here ({}): {}; pass --no-profile to skip the profiles",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Profiles one bulk TCP test of `seconds` in the running mode; writes perf-<mode>.data and
/// perf-<mode>.txt into `out_dir`.
pub fn profile_mode(
    mode: &str,
    pair: &PodPair,
    pin: &Pinning,
    seconds: f64,
    out_dir: &Path,
    progress: &Progress,
) -> Result<Profile> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let data = out_dir.join(format!("perf-{mode}.data"));
    let report_name = format!("perf-{mode}.txt");
    progress.line(&format!(
        "    profile {mode}: perf record -a -g -F {FREQUENCY_HZ} during iperf3 1 stream, {seconds} s (not a measurement)"
    ));
    let _server = measure::start_iperf_server(&pair.server_ns, &pin.server_cpus)?;
    let client = measure::iperf_client(pair, pin, seconds, 1, None);
    // perf starts the client itself: recording starts when it does and ends when it exits.
    let mut cmd = Command::new("perf");
    cmd.args([
        "record",
        "-q",
        "-a",
        "-g",
        "-F",
        &FREQUENCY_HZ.to_string(),
        "-o",
    ])
    .arg(&data)
    .arg("--")
    .arg(client.get_program())
    .args(client.get_args());
    let out = cmd.output().context("run perf record")?;
    let iperf = measure::parse_iperf_json(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "perf record ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let gbit_per_s = iperf.context("the profiled iperf3 run")?.gbit_per_s;
    progress.line(&format!(
        "    profile {mode}: {gbit_per_s:.2} Gbit/s under perf; perf script and perf report"
    ));
    let script = Command::new("perf")
        .args(["script", "-F", "comm,tid,ip,sym", "-i"])
        .arg(&data)
        .output()
        .context("run perf script")?;
    if !script.status.success() {
        bail!(
            "perf script: {}",
            String::from_utf8_lossy(&script.stderr).trim()
        );
    }
    let samples = parse_script(&String::from_utf8_lossy(&script.stdout));
    let mut profile = summarize(mode, &samples);
    profile.gbit_per_s = gbit_per_s;
    profile.report_file = report_name.clone();

    let comms = experiment_comms();
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "sym",
            "-g",
            "none",
            "--percentage",
            "relative",
            "--percent-limit",
            "0.2",
            "--comms",
            &comms,
            "-i",
        ])
        .arg(&data)
        .output()
        .context("run perf report")?;
    if !report.status.success() {
        bail!(
            "perf report: {}",
            String::from_utf8_lossy(&report.stderr).trim()
        );
    }
    let header = format!(
        "# mode {mode}: perf record -a -g -F {FREQUENCY_HZ} during one iperf3 1-stream run ({gbit_per_s:.2} Gbit/s under perf)\n\
         # shown: samples of {comms} ({} of {} samples), self time, percentages relative to those\n\
         # call graphs: perf report -i perf-{mode}.data --children --comms {comms}\n",
        profile.samples_experiment, profile.samples_all
    );
    let path = out_dir.join(&report_name);
    std::fs::write(&path, header + &String::from_utf8_lossy(&report.stdout))
        .with_context(|| format!("write {}", path.display()))?;
    if profile.samples_experiment == 0 {
        bail!(
            "perf recorded {} samples, none of them iperf3's or ksoftirqd's",
            profile.samples_all
        );
    }
    let top: Vec<String> = profile
        .top_kernel
        .iter()
        .take(3)
        .map(|(s, v)| format!("{s} {:.1}%", v * 100.0))
        .collect();
    progress.line(&format!(
        "    profile {mode}: {} samples of the experiment, kernel {:.0}%; top: {}",
        profile.samples_experiment,
        profile.kernel_share * 100.0,
        top.join(", ")
    ));
    Ok(profile)
}

/// One sample: its task's comm and its call chain (innermost first): (symbol, in kernel).
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub comm: String,
    pub frames: Vec<(String, bool)>,
}

/// Parses `perf script -F comm,tid,ip,sym`: a `<comm> <tid>` line (comm may contain spaces),
/// then one indented `<address> <symbol>` line per frame, then a blank line.
pub fn parse_script(text: &str) -> Vec<Sample> {
    let mut out: Vec<Sample> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            let head = line.trim_end();
            let comm = match head.rsplit_once(' ') {
                Some((c, tid)) if tid.bytes().all(|b| b.is_ascii_digit()) => c.trim_end(),
                _ => head,
            };
            out.push(Sample {
                comm: comm.to_string(),
                frames: Vec::new(),
            });
            continue;
        }
        let Some(sample) = out.last_mut() else {
            continue;
        };
        let Some((addr, sym)) = line.trim().split_once(' ') else {
            continue;
        };
        // Kernel text, modules and JITed BPF programs live in the top half of the space.
        let kernel = addr.len() == 16 && addr.starts_with("ffff");
        sample.frames.push((sym.trim().to_string(), kernel));
    }
    out
}

/// `tcp_v4_rcv.cold` -> `tcp_v4_rcv`, `foo.isra.0` -> `foo`.
fn base_name(sym: &str) -> &str {
    sym.split('.').next().unwrap_or(sym)
}

fn matches(pattern: &str, sym: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(rest), _) if rest.ends_with('*') => sym.contains(&rest[..rest.len() - 1]),
        (Some(suffix), None) => sym.ends_with(suffix),
        (None, Some(prefix)) => sym.starts_with(prefix),
        _ => sym == pattern,
    }
}

pub fn summarize(mode: &str, samples: &[Sample]) -> Profile {
    let experiment: Vec<&Sample> = samples.iter().filter(|s| is_experiment(&s.comm)).collect();
    let n = experiment.len().max(1) as f64;
    let mut self_counts: HashMap<&str, u64> = HashMap::new();
    let mut kernel = 0u64;
    let mut groups: BTreeMap<String, f64> =
        GROUPS.iter().map(|(g, _)| (g.to_string(), 0.0)).collect();
    for s in &experiment {
        if let Some((sym, true)) = s.frames.first() {
            kernel += 1;
            *self_counts.entry(sym.as_str()).or_default() += 1;
        }
        for (label, patterns) in GROUPS {
            let on_chain = s.frames.iter().any(|(sym, in_kernel)| {
                *in_kernel && patterns.iter().any(|p| matches(p, base_name(sym)))
            });
            if on_chain {
                *groups.get_mut(*label).expect("initialised") += 1.0 / n;
            }
        }
    }
    let mut top: Vec<(String, f64)> = self_counts
        .into_iter()
        .map(|(s, c)| (s.to_string(), c as f64 / n))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(TOP_KERNEL);
    Profile {
        mode: mode.to_string(),
        gbit_per_s: f64::NAN,
        samples_all: samples.len() as u64,
        samples_experiment: experiment.len() as u64,
        kernel_share: kernel as f64 / n,
        top_kernel: top,
        groups,
        report_file: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
iperf3 4242 
\tffffffff815a4b55 br_handle_frame
\tffffffff815a4fbd __netif_receive_skb_core.constprop.0
\tffffffff815a4fbd process_backlog

opt 69pcf35h4re 19634 
\t         8addf15 (anonymous namespace)::ELFWriter::writeObject

ksoftirqd/1 17 
\tffffffff81000c82 vxlan_rcv
\tffffffff81000c82 udp_queue_rcv_one_skb
\tffffffff81000c82 udp_rcv

iperf3 4243 
\t    7f6b7bb97090 memcpy
\tffffffffc0001234 bpf_prog_6deef7357e7b4530_tc_ingress
";

    #[test]
    fn parses_perf_script_and_shares_only_the_experiment() {
        let samples = parse_script(SCRIPT);
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[1].comm, "opt 69pcf35h4re");
        assert_eq!(samples[0].frames[0], ("br_handle_frame".to_string(), true));
        assert!(!samples[3].frames[0].1, "user-space address");
        let p = summarize("vxlan", &samples);
        assert_eq!((p.samples_all, p.samples_experiment), (4, 3));
        assert!((p.kernel_share - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(p.top_kernel.len(), 2);
        let g = |label: &str| p.groups[label];
        assert!((g("bridge (br_*)") - 1.0 / 3.0).abs() < 1e-9);
        assert!((g("backlog (process_backlog, enqueue_to_backlog)") - 1.0 / 3.0).abs() < 1e-9);
        assert!((g("vxlan device (vxlan_*)") - 1.0 / 3.0).abs() < 1e-9);
        assert!((g("UDP receive (udp_rcv)") - 1.0 / 3.0).abs() < 1e-9);
        assert!((g("eBPF programs (bpf_prog_*)") - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(g("netfilter (nf_*, nft_*, ipt_*)"), 0.0);
    }

    #[test]
    fn patterns() {
        assert!(matches("br_*", "br_handle_frame"));
        assert!(!matches("br_*", "ebr_x"));
        assert!(matches("*gro_receive*", "inet_gro_receive"));
        assert!(matches("*_segment", "skb_segment"));
        assert!(matches("ip_forward", base_name("ip_forward.cold")));
        assert!(!matches("ip_forward", "ip_forward_finish"));
    }
}
