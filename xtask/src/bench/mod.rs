//! `cargo xtask bench`: pod-to-pod datapath benchmarks of the real agent in its three modes
//! (`host-gw`, `vxlan`, `ebpf`) on one two-node topology, and with `--control-plane` the
//! agent's behaviour with 1,000 / 10,000 peer leases in etcd.
//!
//! Modes run interleaved (A B C A B C ...) so that the machine's noise hits all of them; the
//! report gives medians, min-max spread and ratios. Nothing here asserts anything about speed.

mod agent;
mod control_plane;
mod cpu;
mod etcd_http;
mod lab;
mod measure;
mod probe;
mod report;
mod stats;
mod tools;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use report::{Host, Results, Samples};

/// The modes, in the order they run within a round.
pub const MODES: [&str; 3] = ["host-gw", "vxlan", "ebpf"];

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// A short run (about a minute) that proves the harness works; its numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Control-plane scale instead of the datapath: N peer leases in etcd, sync time,
    /// change latency, agent RSS and CPU (modes ebpf and vxlan).
    #[arg(long)]
    control_plane: bool,
    /// Rounds; each round runs every mode once (default: 5, or 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per datapath test (default: 5, or 1 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Rate of the paced iperf3 run that measures CPU per Gbit/s.
    #[arg(long, default_value_t = 2.0)]
    paced_gbit: f64,
    /// Modes to run, comma separated (default: all three; --control-plane: vxlan,ebpf).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Control plane: peer counts (default: 1000,10000, or 200 with --quick).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<usize>>,
    /// Control plane: lease changes timed per run, half adds and half removals
    /// (default: 400, or 40 with --quick).
    #[arg(long)]
    changes: Option<usize>,
    /// Control plane: seconds allowed for the lease changes of one run (default: 180, or 30
    /// with --quick); a slower agent gets fewer changes, said in the report's notes.
    #[arg(long)]
    change_budget: Option<u64>,
    /// The agent binary. Default: build it (release; debug with --quick) and use that.
    #[arg(long, env = "OVERLAY_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Where results.json, report.md and chart.svg go (default: bench-results/<kind>-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// Load tools the harness runs inside pod namespaces (not for direct use).
    #[command(hide = true)]
    Tool {
        #[command(subcommand)]
        tool: tools::Tool,
    },
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C (or SIGTERM, e.g. from `timeout`) stops the run after the current test (whose
/// tools get the same SIGINT and end) so that agents, namespaces and etcd are torn down by
/// their guards and partial results are written; a second Ctrl-C during the teardown is
/// ignored for the same reason.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_sigint as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// A metric as shown in the report.
#[derive(Clone, Debug)]
pub struct MetricDef {
    pub key: Cow<'static, str>,
    pub label: Cow<'static, str>,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

impl MetricDef {
    pub const fn new(
        key: &'static str,
        label: &'static str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> Self {
        Self {
            key: Cow::Borrowed(key),
            label: Cow::Borrowed(label),
            unit,
            higher_is_better,
        }
    }
}

/// Progress lines on stderr, stamped with the time since the start.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn line(&self, msg: &str) {
        eprintln!("[bench {:>6.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }
}

impl BenchArgs {
    /// True for the harness's own helper processes (load tools run inside pod namespaces),
    /// which must not run the machine set-up.
    pub fn is_internal_tool(&self) -> bool {
        self.internal.is_some()
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(Internal::Tool { tool }) = args.internal {
        return tools::run(tool);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench needs root (network namespaces, BPF maps): run it as root");
    }
    let progress = Progress {
        start: Instant::now(),
    };
    let modes = args.modes.clone().unwrap_or_else(|| {
        if args.control_plane {
            vec!["vxlan".into(), "ebpf".into()]
        } else {
            MODES.map(String::from).to_vec()
        }
    });
    for m in &modes {
        if !MODES.contains(&m.as_str()) {
            bail!("unknown mode {m:?} in --modes: use host-gw, vxlan and/or ebpf");
        }
        if args.control_plane && m == "host-gw" {
            bail!(
                "--control-plane measures vxlan and ebpf only (host-gw peers need reachable PublicIPs)"
            );
        }
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let agent_bin = agent_binary(&args, &progress)?;
    // The fixtures start the agent from $OVERLAY_AGENT_BIN.
    // SAFETY: set once here, before this process starts any thread.
    unsafe { std::env::set_var("OVERLAY_AGENT_BIN", &agent_bin) };
    let started_utc = utc_now();
    let kind = if args.control_plane {
        "control-plane"
    } else {
        "datapath"
    };
    let out_dir = args.out.clone().unwrap_or_else(|| {
        workspace_root()
            .join("bench-results")
            .join(format!("{kind}-{}", started_utc.replace([':', '-'], "")))
    });
    progress.line(&format!(
        "{kind} benchmark: modes {}, {rounds} round(s), agent {}, results in {}",
        modes.join(","),
        agent_bin.display(),
        out_dir.display()
    ));
    let host = Host::probe();
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    catch_signals();
    let (settings, metrics) = if args.control_plane {
        let settings = control_plane::Settings {
            peers: args.peers.clone().unwrap_or_else(|| {
                if args.quick {
                    vec![200]
                } else {
                    vec![1000, 10_000]
                }
            }),
            changes: args.changes.unwrap_or(if args.quick { 40 } else { 400 }),
            change_budget_secs: args
                .change_budget
                .unwrap_or(if args.quick { 30 } else { 180 }),
            rounds,
        };
        let (defs, samples) =
            control_plane::run(&settings, &modes, &progress, &mut errors, &mut notes)?;
        let metrics = report::summarize(&defs, &modes, &samples, &[("ebpf", "vxlan")]);
        (serde_json::to_value(&settings)?, metrics)
    } else {
        let settings = measure::Settings {
            seconds: args.seconds.unwrap_or(if args.quick { 1.0 } else { 5.0 }),
            paced_gbit: args.paced_gbit,
        };
        let samples = datapath(
            &settings,
            &modes,
            rounds,
            &progress,
            &mut errors,
            &mut notes,
        );
        measure::remove_tool_exe();
        let samples = samples?;
        let metrics = report::summarize(
            measure::METRICS,
            &modes,
            &samples,
            &[("ebpf", "host-gw"), ("ebpf", "vxlan")],
        );
        let json = serde_json::json!({
            "seconds_per_test": settings.seconds,
            "paced_gbit": settings.paced_gbit,
            "rounds": rounds,
            "topology": "2 nodes, direct veth underlay MTU 1500, cni0 bridge + 1 pod per node, etcd on a management link",
            "agent": agent_bin.display().to_string(),
        });
        (json, metrics)
    };
    if interrupted() && !errors.iter().any(|e| e.starts_with("interrupted")) {
        errors.push("interrupted (Ctrl-C) during the last test".into());
    }
    let results = Results {
        kind: kind.into(),
        started_utc,
        finished_utc: utc_now(),
        quick: args.quick,
        host,
        settings,
        modes,
        metrics,
        errors,
        notes,
    };
    report::write_all(&results, &out_dir)?;
    println!("\n{}", report::terminal_table(&results));
    progress.line(&format!(
        "wrote {0}/results.json, {0}/report.md, {0}/chart.svg",
        out_dir.display()
    ));
    if !results.errors.is_empty() {
        bail!(
            "{} test(s) failed (listed in {}/report.md); the results that exist were written",
            results.errors.len(),
            out_dir.display()
        );
    }
    Ok(())
}

fn datapath(
    settings: &measure::Settings,
    modes: &[String],
    rounds: u32,
    progress: &Progress,
    errors: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<Samples> {
    progress.line("building the topology: 2 node namespaces, direct veth underlay, etcd");
    let mut lab = lab::Lab::new()?;
    let mut samples = Samples::new();
    for round in 1..=rounds {
        for mode in modes {
            if interrupted() {
                errors.push(format!("interrupted (Ctrl-C) before round {round} {mode}"));
                return Ok(samples);
            }
            progress.line(&format!("round {round}/{rounds} {mode}: starting agents"));
            let up = match lab.bring_up(mode, progress) {
                Ok(up) => up,
                Err(e) => {
                    let msg = format!("round {round} {mode}: bring-up failed: {e:#}");
                    progress.line(&msg);
                    errors.push(msg);
                    lab.tear_down(None, progress);
                    continue;
                }
            };
            progress.line(&format!("round {round}/{rounds} {mode}: measuring"));
            let mut mode_errors = Vec::new();
            let before = lab.ebpf_counters(&up);
            let values = measure::measure_mode(&up.pair, settings, progress, &mut mode_errors);
            if mode == "ebpf" {
                // Without this the ebpf column could silently be the kernel vxlan path.
                match (before, lab.ebpf_counters(&up)) {
                    (Ok(Some(b)), Ok(Some(a))) => {
                        let delta: Vec<u64> = a.iter().zip(&b).map(|(a, b)| a.saturating_sub(*b)).collect();
                        let shown: Vec<String> = overlay_common::stat::NAMES
                            .iter()
                            .zip(&delta)
                            .filter(|(_, v)| **v > 0)
                            .map(|(n, v)| format!("{n}={v}"))
                            .collect();
                        let line = format!("round {round} ebpf datapath counters during the tests: {}", if shown.is_empty() { "all zero".into() } else { shown.join(" ") });
                        progress.line(&format!("    {line}"));
                        notes.push(line);
                        use overlay_common::stat;
                        let tx = delta[stat::FAST_TX_PACKETS as usize];
                        let rx = delta[stat::FAST_RX_BEFORE_DECAP_PACKETS as usize]
                            + delta[stat::FAST_RX_AFTER_DECAP_PACKETS as usize];
                        if tx == 0 || rx == 0 {
                            mode_errors.push(format!(
                                "the eBPF fast path sent {tx} and delivered {rx} packets during the tests: these numbers are not the eBPF fast path's"
                            ));
                        }
                    }
                    (Ok(None), _) | (_, Ok(None)) => mode_errors.push(
                        "no OVL_STATS map found (pinned under --bpf-pin-dir or held by the agent): cannot show that traffic took the eBPF path".into(),
                    ),
                    (Err(e), _) | (_, Err(e)) => mode_errors.push(format!("read the eBPF counters: {e:#}")),
                }
            }
            errors.extend(
                mode_errors
                    .into_iter()
                    .map(|e| format!("round {round} {mode}: {e}")),
            );
            for (k, v) in values {
                samples
                    .entry((k.to_string(), mode.clone()))
                    .or_default()
                    .push(v);
            }
            progress.line(&format!(
                "round {round}/{rounds} {mode}: stopping agents, cleaning datapath"
            ));
            lab.tear_down(Some(up), progress);
        }
    }
    Ok(samples)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `--agent-bin` / `$OVERLAY_AGENT_BIN`, else build the agent: release for measurements,
/// debug for `--quick` (the test suite has built it already).
fn agent_binary(args: &BenchArgs, progress: &Progress) -> Result<PathBuf> {
    if let Some(p) = &args.agent_bin {
        if !p.is_file() {
            bail!(
                "agent binary {} does not exist (--agent-bin / OVERLAY_AGENT_BIN)",
                p.display()
            );
        }
        return Ok(p.clone());
    }
    let profile = if args.quick { "debug" } else { "release" };
    progress.line(&format!("building overlay-agent ({profile})"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "overlay-agent"]);
    if !args.quick {
        cmd.arg("--release");
    }
    // The agent's build script runs bpf-linker by name; `cargo install` puts it in cargo's
    // bin dir, which a root shell's PATH may lack.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path).any(|d| d.join("bpf-linker").is_file());
    if !on_path {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        if let Some(bin) = cargo_home.map(|h| h.join("bin")) {
            let dirs = std::iter::once(bin).chain(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(dirs).context("PATH")?);
        }
    }
    let status = cmd.status().context("run cargo build -p overlay-agent")?;
    if !status.success() {
        bail!("cargo build -p overlay-agent failed ({status}); fix the build or pass --agent-bin");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join(profile).join("overlay-agent"))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
