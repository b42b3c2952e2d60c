//! `cargo xtask bench`: datapath benchmarks of the real agent on one two-node topology: the
//! node-to-node reference without any overlay, pod to pod with `host-gw`, `vxlan`, and `ebpf`
//! with its fast-path pieces switched on one by one (see [`modes`]); with `--control-plane`
//! the agent's behaviour with 1,000 / 10,000 peer leases in etcd.
//!
//! Modes run interleaved (A B C A B C ...) so that the machine's noise hits all of them; the
//! report gives medians, min-max spread, ratios, the targets met or missed, and a CPU profile
//! per mode. Nothing here asserts anything about speed.

mod agent;
mod control_plane;
mod cpu;
mod etcd_http;
mod lab;
mod measure;
mod modes;
mod probe;
mod profile;
mod report;
mod stats;
mod targets;
mod tools;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use report::{Host, Results, Samples};

/// The control-plane benchmark's modes: the agent backends, with flannel's routes and with
/// `--nexthop-objects`.
const CONTROL_PLANE_MODES: [&str; 4] = ["vxlan", "ebpf", "vxlan-nexthop", "ebpf-nexthop"];

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// A short run (about a minute) that proves the harness works; its numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Control-plane scale instead of the datapath: N peer leases in etcd, sync time,
    /// change latency, agent RSS and CPU (vxlan and ebpf, each also with --nexthop-objects).
    #[arg(long)]
    control_plane: bool,
    /// Rounds; each round runs every mode once (default: 5, or 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per datapath test (default: 4, or 1 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// CPUs (taskset -c list) for every client process, in every mode.
    #[arg(long)]
    client_cpus: Option<String>,
    /// CPUs (taskset -c list) for every server process, in every mode (default: 1, or 0 on
    /// a single-CPU machine).
    #[arg(long)]
    server_cpus: Option<String>,
    /// Skip the CPU profiles (one perf-recorded bulk TCP run per mode, in the last round).
    #[arg(long)]
    no_profile: bool,
    /// Length of each profiled bulk TCP run (default: 3, or 1 with --quick).
    #[arg(long)]
    profile_seconds: Option<f64>,
    /// Rate of the paced iperf3 run that measures CPU per Gbit/s.
    #[arg(long, default_value_t = 2.0)]
    paced_gbit: f64,
    /// Modes to run, comma separated, in this order within a round (default: node, host-gw,
    /// vxlan, ebpf-kernel, ebpf-r1, ebpf-r1r2, ebpf; --control-plane: vxlan, ebpf,
    /// vxlan-nexthop, ebpf-nexthop).
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
    let explicit_modes = args.modes.is_some();
    let mut modes = args.modes.clone().unwrap_or_else(|| {
        if args.control_plane {
            CONTROL_PLANE_MODES.map(String::from).to_vec()
        } else {
            modes::DEFAULT.map(String::from).to_vec()
        }
    });
    for m in &modes {
        if args.control_plane {
            if !CONTROL_PLANE_MODES.contains(&m.as_str()) {
                bail!(
                    "--control-plane measures {} only (host-gw peers need reachable PublicIPs), not {m:?}",
                    CONTROL_PLANE_MODES.join(", ")
                );
            }
        } else if modes::find(m).is_none() {
            bail!("unknown mode {m:?} in --modes: use {}", modes::names());
        }
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let pin = measure::Pinning {
        client_cpus: args.client_cpus.clone().unwrap_or_else(|| "0".into()),
        server_cpus: args
            .server_cpus
            .clone()
            .unwrap_or_else(|| measure::Pinning::default_for(Host::probe().cpus).server_cpus),
    };
    let want_profile = !args.control_plane && !args.no_profile;
    if !args.control_plane {
        pin.check()?;
        if want_profile {
            profile::check_perf()?;
        }
    }
    let agent_bin = agent_binary(&args, &progress)?;
    let mut notes = Vec::new();
    if !args.control_plane {
        let skipped = modes_the_agent_lacks(&agent_bin, &modes, explicit_modes)?;
        if !skipped.is_empty() {
            let line = format!(
                "skipped modes {}: agent {} has no {} flag (it predates the fast-path pieces); \
                 they run once the agent has it",
                skipped
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", "),
                agent_bin.display(),
                skipped[0].1
            );
            progress.line(&format!("NOTE {line}"));
            notes.push(line);
            modes.retain(|m| !skipped.iter().any(|(s, _)| s == m));
        }
    }
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
    let mut profiles = Vec::new();
    catch_signals();
    let (settings, metrics) = if args.control_plane {
        let settings = control_plane::Settings {
            peers: args.peers.clone().unwrap_or_else(|| {
                if args.quick {
                    vec![200]
                } else {
                    vec![1000, 10_000, 20_000]
                }
            }),
            changes: args.changes.unwrap_or(if args.quick { 40 } else { 400 }),
            change_budget_secs: args
                .change_budget
                .unwrap_or(if args.quick { 30 } else { 180 }),
            rounds,
            cpu_window_secs: if args.quick { 10 } else { 30 },
        };
        let (defs, samples) =
            control_plane::run(&settings, &modes, &progress, &mut errors, &mut notes)?;
        let metrics = report::summarize(
            &defs,
            &modes,
            &samples,
            &[
                ("ebpf", "vxlan"),
                ("vxlan-nexthop", "vxlan"),
                ("ebpf-nexthop", "ebpf"),
            ],
        );
        (serde_json::to_value(&settings)?, metrics)
    } else {
        let settings = measure::Settings {
            seconds: args.seconds.unwrap_or(if args.quick { 1.0 } else { 4.0 }),
            paced_gbit: args.paced_gbit,
            pin: pin.clone(),
        };
        let profile_seconds = want_profile.then(|| {
            args.profile_seconds
                .unwrap_or(if args.quick { 1.0 } else { 3.0 })
        });
        let estimate = estimate_run(&modes, rounds, settings.seconds, profile_seconds);
        progress.line(&format!(
            "estimated duration: about {} ({rounds} round(s) x {} mode(s) at {} s per test{}); \
             a line per test follows",
            fmt_duration(estimate),
            modes.len(),
            settings.seconds,
            profile_seconds.map_or(", no profiles".into(), |p| format!(
                ", {p} s profile per mode"
            ))
        ));
        let run = DatapathRun {
            settings: &settings,
            modes: &modes,
            rounds,
            profile_seconds,
            out_dir: &out_dir,
            progress: &progress,
        };
        let samples = run.run(&mut errors, &mut notes, &mut profiles);
        measure::remove_tool_exe();
        let samples = samples?;
        let pairs: Vec<(&str, &str)> = modes::HEADLINE_RATIOS
            .iter()
            .chain(modes::STEPS.iter())
            .copied()
            .collect();
        let metrics = report::summarize(measure::METRICS, &modes, &samples, &pairs);
        let json = serde_json::json!({
            "seconds_per_test": settings.seconds,
            "paced_gbit": settings.paced_gbit,
            "rounds": rounds,
            "pinning": pin,
            "profile_seconds": profile_seconds,
            "topology": "2 nodes, direct veth underlay MTU 1500, cni0 bridge + 1 pod per node, etcd on a management link",
            "agent": agent_bin.display().to_string(),
        });
        (json, metrics)
    };
    let datapath_run = !args.control_plane;
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
        modes: modes.clone(),
        targets: if datapath_run {
            targets::evaluate(&metrics)
        } else {
            Vec::new()
        },
        metrics,
        errors,
        notes,
        mode_descriptions: if datapath_run {
            modes
                .iter()
                .filter_map(|m| modes::find(m))
                .map(|m| (m.name.to_string(), m.about.to_string()))
                .collect()
        } else {
            Default::default()
        },
        headline_ratios: if datapath_run {
            modes::HEADLINE_RATIOS
                .iter()
                .map(|(a, b)| format!("{a}/{b}"))
                .collect()
        } else {
            Vec::new()
        },
        step_ratios: if datapath_run {
            modes::STEPS
                .iter()
                .map(|(a, b)| format!("{a}/{b}"))
                .collect()
        } else {
            Vec::new()
        },
        rounds,
        profiles,
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

/// Does the agent accept the flags the modes need? An explicit `--modes` must run as given
/// (error); the default list skips what this agent cannot run (returned, said in the report).
fn modes_the_agent_lacks(
    agent_bin: &Path,
    modes: &[String],
    explicit: bool,
) -> Result<Vec<(&'static str, &'static str)>> {
    let wanted: Vec<&modes::Mode> = modes.iter().filter_map(|m| modes::find(m)).collect();
    if wanted.iter().all(|m| m.needs_flags.is_empty()) {
        return Ok(Vec::new());
    }
    let out = std::process::Command::new(agent_bin)
        .arg("--help")
        .output()
        .with_context(|| format!("run {} --help", agent_bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let missing = modes::missing_flags(&wanted, &help);
    if explicit && !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(m, f)| format!("{m} needs {f}"))
            .collect();
        bail!(
            "agent {} cannot run the modes asked for: {} (not in its --help); use an agent \
             with the flag or leave those modes out of --modes",
            agent_bin.display(),
            list.join(", ")
        );
    }
    Ok(missing)
}

/// Seconds of one mode's round: its tests, bring-up and teardown. Calibrated on quick runs
/// on the shared 2-CPU VM (1 s tests: about 7.5 s of tests per mode, agents up in about a
/// second, teardown 0.3 s).
fn mode_round_secs(mode: &str, seconds: f64) -> f64 {
    let whole = seconds.ceil().max(1.0);
    // iperf3 1 and 4 streams, the idle window and the paced run take whole seconds; rr,
    // crr and udp take `seconds`; process starts and waits add about a second in all.
    let tests = 4.0 * whole + 3.0 * seconds + 1.0;
    let setup = match modes::find(mode).and_then(|m| m.backend) {
        None => 0.5,
        Some(_) => 2.5,
    };
    tests + setup
}

/// The whole run, printed at the start so that nobody starts a half-hour run by surprise.
fn estimate_run(
    modes: &[String],
    rounds: u32,
    seconds: f64,
    profile_seconds: Option<f64>,
) -> Duration {
    let per_round: f64 = modes.iter().map(|m| mode_round_secs(m, seconds)).sum();
    // perf record, then perf script and perf report: 3-8 s for a 1 s profile here.
    let profiles = profile_seconds.map_or(0.0, |p| modes.len() as f64 * (3.0 * p.ceil() + 4.0));
    // The topology and etcd.
    Duration::from_secs_f64(3.0 + per_round * f64::from(rounds) + profiles)
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

struct DatapathRun<'a> {
    settings: &'a measure::Settings,
    modes: &'a [String],
    rounds: u32,
    /// Some: profile each mode in the last round, for this long.
    profile_seconds: Option<f64>,
    out_dir: &'a Path,
    progress: &'a Progress,
}

impl DatapathRun<'_> {
    fn run(
        &self,
        errors: &mut Vec<String>,
        notes: &mut Vec<String>,
        profiles: &mut Vec<profile::Profile>,
    ) -> Result<Samples> {
        let (progress, rounds) = (self.progress, self.rounds);
        progress.line("building the topology: 2 node namespaces, direct veth underlay, etcd");
        let mut lab = lab::Lab::new()?;
        let mut samples = Samples::new();
        let started = Instant::now();
        let total = rounds as usize * self.modes.len();
        for round in 1..=rounds {
            for (i, name) in self.modes.iter().enumerate() {
                let mode = modes::find(name).expect("modes checked at the start");
                if interrupted() {
                    errors.push(format!("interrupted (Ctrl-C) before round {round} {name}"));
                    return Ok(samples);
                }
                let done = (round as usize - 1) * self.modes.len() + i;
                let eta = if done == 0 {
                    String::new()
                } else {
                    let per = started.elapsed().as_secs_f64() / done as f64;
                    format!(
                        ", about {} left",
                        fmt_duration(Duration::from_secs_f64(per * (total - done) as f64))
                    )
                };
                progress.line(&format!(
                    "round {round}/{rounds} {name} ({}/{total}{eta}): starting",
                    done + 1
                ));
                let up = match lab.bring_up(mode, progress) {
                    Ok(up) => up,
                    Err(e) => {
                        let msg = format!("round {round} {name}: bring-up failed: {e:#}");
                        progress.line(&msg);
                        errors.push(msg);
                        lab.tear_down(None, progress);
                        continue;
                    }
                };
                progress.line(&format!("round {round}/{rounds} {name}: measuring"));
                let mut mode_errors = Vec::new();
                let before = lab.ebpf_counters(&up);
                let values =
                    measure::measure_mode(&up.pair, self.settings, progress, &mut mode_errors);
                if mode.backend == Some("ebpf") {
                    check_counters(
                        mode,
                        round,
                        before,
                        lab.ebpf_counters(&up),
                        progress,
                        notes,
                        &mut mode_errors,
                    );
                }
                if round == rounds
                    && let Some(secs) = self.profile_seconds
                    && !interrupted()
                {
                    match profile::profile_mode(
                        name,
                        &up.pair,
                        &self.settings.pin,
                        secs,
                        self.out_dir,
                        progress,
                    ) {
                        Ok(p) => profiles.push(p),
                        Err(e) => mode_errors.push(format!("profile: {e:#}")),
                    }
                }
                errors.extend(
                    mode_errors
                        .into_iter()
                        .map(|e| format!("round {round} {name}: {e}")),
                );
                for (k, v) in values {
                    samples
                        .entry((k.to_string(), name.clone()))
                        .or_default()
                        .push(v);
                }
                progress.line(&format!(
                    "round {round}/{rounds} {name}: stopping agents, cleaning datapath"
                ));
                lab.tear_down(Some(up), progress);
            }
        }
        progress.line(&format!(
            "all rounds done in {}",
            fmt_duration(started.elapsed())
        ));
        Ok(samples)
    }
}

/// Notes the eBPF counters that moved during one mode's tests, and fails the mode when the
/// counters it must move did not: without this an ebpf column could silently be the kernel
/// vxlan path.
fn check_counters(
    mode: &modes::Mode,
    round: u32,
    before: Result<Option<Vec<u64>>>,
    after: Result<Option<Vec<u64>>>,
    progress: &Progress,
    notes: &mut Vec<String>,
    mode_errors: &mut Vec<String>,
) {
    let names = overlay_common::stat::NAMES;
    match (before, after) {
        (Ok(Some(b)), Ok(Some(a))) => {
            let delta: Vec<u64> = a.iter().zip(&b).map(|(a, b)| a.saturating_sub(*b)).collect();
            let shown: Vec<String> = names
                .iter()
                .zip(&delta)
                .filter(|(_, v)| **v > 0)
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            let line = format!(
                "round {round} {} datapath counters during the tests: {}",
                mode.name,
                if shown.is_empty() { "all zero".into() } else { shown.join(" ") }
            );
            progress.line(&format!("    {line}"));
            notes.push(line);
            for counter in mode.must_count {
                match names.iter().position(|n| n == counter) {
                    Some(i) if delta.get(i).copied().unwrap_or(0) > 0 => {}
                    Some(_) => mode_errors.push(format!(
                        "the eBPF counter {counter} did not move during the tests: these numbers are not the eBPF fast path's"
                    )),
                    None => mode_errors.push(format!(
                        "mode {} expects counter {counter}, which overlay_common::stat::NAMES lacks: update must_count in xtask/src/bench/modes.rs",
                        mode.name
                    )),
                }
            }
        }
        // A partial fast path may load no counters at all: only a mode that must show
        // its counters fails without them.
        (Ok(None), _) | (_, Ok(None)) if mode.must_count.is_empty() => notes.push(format!(
            "round {round} {}: no OVL_STATS map, no eBPF counters to show",
            mode.name
        )),
        (Ok(None), _) | (_, Ok(None)) => mode_errors.push(
            "no OVL_STATS map found (pinned under --bpf-pin-dir or held by the agent): cannot show that traffic took the eBPF path".into(),
        ),
        (Err(e), _) | (_, Err(e)) => mode_errors.push(format!("read the eBPF counters: {e:#}")),
    }
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
