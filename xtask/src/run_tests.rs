//! `cargo xtask test`: set up, build everything, run every test, print one summary.
//!
//! Runner: cargo-nextest when installed, `cargo test` otherwise. nextest runs each test in
//! its own process, so a test that leaks a namespace switch, a signal handler or a child
//! process cannot disturb the others, and `.config/nextest.toml` gives every test a hard
//! time limit so one hung namespace test cannot eat the whole budget. Doc tests (which
//! nextest does not run) follow with `cargo test --doc`.
//!
//! Parallelism: most integration tests wait (for etcd, a lease, a ping) rather than compute,
//! and each uses uniquely named namespaces, so the default runs twice as many tests as
//! there are cores.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    host_state, setup,
    util::{self, Workspace, note, step},
};

#[derive(clap::Args)]
pub struct Args {
    /// How many tests run at once (default: twice the number of cores, at least 4).
    #[arg(long)]
    test_threads: Option<usize>,
    /// Use `cargo test` even when cargo-nextest is installed.
    #[arg(long)]
    no_nextest: bool,
    /// Stop the test run after this many minutes (the CI budget is 90 for everything).
    #[arg(long, default_value_t = 75)]
    timeout_minutes: u64,
    /// Skip `cargo xtask setup` (when you know the machine is ready).
    #[arg(long)]
    no_setup: bool,
    /// Only run tests whose name matches (passed to the runner as its filter).
    filter: Vec<String>,
}

/// What one runner invocation reported.
struct Outcome {
    label: &'static str,
    success: bool,
    elapsed: Duration,
    /// The runner's own count lines (nextest's "Summary", libtest's "test result").
    summary: Vec<String>,
    /// Names of failed tests as the runner printed them.
    failures: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    if !args.no_setup {
        setup::run(&setup::Args::default())?;
    }
    let workspace = Workspace::locate()?;
    let path = path_with_cargo_bin()?;

    step("building the workspace (agent, eBPF programs, fixtures, xtask)");
    let build_elapsed = util::run_checked(
        Command::new(util::cargo())
            .args(["build", "--workspace"])
            .current_dir(&workspace.root)
            .env("PATH", &path),
        Duration::from_secs(60),
    )
    .context("the build failed; see cargo's messages above")?;
    let agent = workspace.agent_bin();
    if !agent.is_file() {
        bail!(
            "the build succeeded but {} does not exist; is the overlay-agent binary target missing?",
            agent.display()
        );
    }
    note(&format!(
        "built in {}; OVERLAY_AGENT_BIN={}",
        util::fmt_duration(build_elapsed),
        agent.display()
    ));

    let threads = args.test_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        (cores * 2).max(4)
    });
    let deadline = started + Duration::from_secs(args.timeout_minutes * 60);
    let nextest = !args.no_nextest && nextest_available();

    let host_before = host_state::capture();
    let mut outcomes = Vec::new();
    let mut runner = Command::new(util::cargo());
    runner
        .current_dir(&workspace.root)
        .env("PATH", &path)
        .env("OVERLAY_AGENT_BIN", &agent)
        .env("RUST_BACKTRACE", "1");
    if nextest {
        step(&format!(
            "running tests with cargo-nextest, {threads} at a time"
        ));
        runner
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .arg(format!("--test-threads={threads}"))
            .args(&args.filter);
        outcomes.push(run_runner(
            "tests (nextest)",
            Runner::Nextest,
            runner,
            deadline,
        )?);
        step("running doc tests (nextest does not run them)");
        let mut doc = Command::new(util::cargo());
        doc.current_dir(&workspace.root)
            .env("PATH", &path)
            .args(["test", "--workspace", "--doc"])
            .args(&args.filter);
        outcomes.push(run_runner("doc tests", Runner::Libtest, doc, deadline)?);
    } else {
        step(&format!(
            "running tests with cargo test, {threads} threads per test binary (cargo-nextest not found)"
        ));
        runner
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(&args.filter)
            .arg("--")
            .arg(format!("--test-threads={threads}"));
        outcomes.push(run_runner(
            "tests (cargo test)",
            Runner::Libtest,
            runner,
            deadline,
        )?);
    }

    let leaks = host_state::leaked(&host_before, &host_state::capture());
    step("summary");
    note(&format!("build: {}", util::fmt_duration(build_elapsed)));
    for outcome in &outcomes {
        note(&format!(
            "{}: {} in {}",
            outcome.label,
            if outcome.success { "passed" } else { "FAILED" },
            util::fmt_duration(outcome.elapsed)
        ));
        for line in &outcome.summary {
            note(&format!("  {line}"));
        }
        for failure in &outcome.failures {
            note(&format!("  failed: {failure}"));
        }
    }
    if leaks.is_empty() {
        note("host: no namespace, link, firewall rule or BPF pin left behind");
    } else {
        note(&format!(
            "host: the tests left {} thing(s) behind (a test's clean-up is missing; remove them by hand):",
            leaks.len()
        ));
        for leak in &leaks {
            note(&format!("  left: {leak}"));
        }
    }
    note(&format!(
        "total wall time: {} (set-up, build and tests)",
        util::fmt_duration(started.elapsed())
    ));
    let mut failed: Vec<&str> = outcomes
        .iter()
        .filter(|outcome| !outcome.success)
        .map(|outcome| outcome.label)
        .collect();
    if !leaks.is_empty() {
        failed.push("host clean-up");
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn nextest_available() -> bool {
    Command::new(util::cargo())
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// PATH with cargo's bin dir in front when bpf-linker is not already on it, so the agent's
/// build script finds it. An unchanged PATH keeps cargo's build-script fingerprints (and so
/// a later plain `cargo build`) from rebuilding.
fn path_with_cargo_bin() -> anyhow::Result<std::ffi::OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    if util::which("bpf-linker").is_some() {
        return Ok(current);
    }
    let bin = setup::cargo_bin_dir()?;
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&current)))
        .context("building PATH")
}

/// Runs a test runner, copying its output through while picking out the count lines and
/// failures, and stops it (SIGTERM, then SIGKILL) if it passes the deadline.
fn run_runner(
    label: &'static str,
    kind: Runner,
    mut cmd: Command,
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    note(&format!("$ {}", util::describe(&cmd)));
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", util::describe(&cmd)))?;
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|out| Box::new(out) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|err| Box::new(err) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut stderr = std::io::stderr().lock();
                let _ = writeln!(stderr, "{line}");
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        })
    })
    .collect();

    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the test runner")? {
            break status;
        }
        if !timed_out && Instant::now() >= deadline {
            timed_out = true;
            eprintln!("==> time budget exhausted: stopping {label}");
            signal(child.id(), libc::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(200));
            }
            if child.try_wait()?.is_none() {
                signal(child.id(), libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let lines = lines.lock().map(|lines| lines.clone()).unwrap_or_default();
    let (mut summary, mut failures) = match kind {
        Runner::Nextest => nextest_lines(&lines),
        Runner::Libtest => libtest_lines(&lines),
    };
    if timed_out {
        summary.push("stopped: time budget exhausted".into());
    }
    failures.sort();
    failures.dedup();
    Ok(Outcome {
        label,
        success: status.success() && !timed_out,
        elapsed: started.elapsed(),
        summary,
        failures,
    })
}

/// Which output format a runner prints.
#[derive(Clone, Copy)]
enum Runner {
    Nextest,
    Libtest,
}

/// nextest's "Summary [...] N tests run: ..." line and its failed tests, from lines such as
/// "FAIL [   0.186s] (1/1) overlay-tests::binary test_name" (also TIMEOUT and signals).
/// Captured test output is indented by nextest, so libtest's own lines there are ignored.
fn nextest_lines(lines: &[String]) -> (Vec<String>, Vec<String>) {
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    for line in lines.iter().map(|line| line.trim_start()) {
        if line.starts_with("Summary [") {
            summary.push(line.to_owned());
            continue;
        }
        let Some((status, rest)) = line.split_once(" [") else {
            continue;
        };
        let failed = status == "FAIL" || status == "TIMEOUT" || status.starts_with("SIG");
        if !failed {
            continue;
        }
        if let Some((_, name)) = rest.split_once("] ") {
            // Drop the "(1/43) " progress counter.
            let name = match name.split_once(") ") {
                Some((counter, name)) if counter.starts_with('(') => name,
                _ => name,
            };
            failures.push(format!("{name} ({status})"));
        }
    }
    (summary, failures)
}

/// libtest's "test result:" lines (added up) and its "test name ... FAILED" lines, which it
/// prints at the start of a line.
fn libtest_lines(lines: &[String]) -> (Vec<String>, Vec<String>) {
    let results: Vec<String> = lines
        .iter()
        .filter(|line| line.starts_with("test result:"))
        .cloned()
        .collect();
    let failures = lines
        .iter()
        .filter_map(|line| {
            line.strip_prefix("test ")?
                .strip_suffix(" ... FAILED")
                .map(str::to_owned)
        })
        .collect();
    let summary = if results.is_empty() {
        Vec::new()
    } else {
        vec![sum_libtest(&results)]
    };
    (summary, failures)
}

/// Adds up libtest's per-binary "test result: ok. 3 passed; 0 failed; 1 ignored; ..." lines.
fn sum_libtest(lines: &[String]) -> String {
    let mut totals = [0u64; 3];
    for line in lines {
        for (index, word) in ["passed", "failed", "ignored"].iter().enumerate() {
            let count = line
                .split([';', '.'])
                .filter_map(|part| part.trim().strip_suffix(word))
                .filter_map(|number| number.trim().parse::<u64>().ok())
                .next();
            totals[index] += count.unwrap_or(0);
        }
    }
    format!(
        "{} binaries: {} passed, {} failed, {} ignored",
        lines.len(),
        totals[0],
        totals[1],
        totals[2]
    )
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{nextest_lines, sum_libtest};

    #[test]
    fn picks_nextest_summary_and_failures_but_not_captured_output() {
        let lines: Vec<String> = [
            "        PASS [   0.010s] ( 1/3) overlay-agent a::passes",
            "        FAIL [   0.186s] ( 2/3) overlay-tests::zz broken",
            "    test broken ... FAILED",
            "    test result: FAILED. 0 passed; 1 failed; 0 ignored",
            "     TIMEOUT [ 300.001s] ( 3/3) overlay-tests::zz hangs",
            "     Summary [ 300.191s] 3 tests run: 1 passed, 1 failed, 1 timed out, 0 skipped",
            "        FAIL [   0.186s] ( 2/3) overlay-tests::zz broken",
        ]
        .map(str::to_owned)
        .to_vec();
        let (summary, mut failures) = nextest_lines(&lines);
        failures.dedup();
        assert_eq!(
            summary,
            ["Summary [ 300.191s] 3 tests run: 1 passed, 1 failed, 1 timed out, 0 skipped"]
        );
        assert_eq!(
            failures,
            [
                "overlay-tests::zz broken (FAIL)",
                "overlay-tests::zz hangs (TIMEOUT)",
                "overlay-tests::zz broken (FAIL)"
            ]
        );
    }

    #[test]
    fn sums_libtest_result_lines() {
        let lines = vec![
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s".to_owned(),
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s".to_owned(),
        ];
        assert_eq!(
            sum_libtest(&lines),
            "2 binaries: 5 passed, 1 failed, 1 ignored"
        );
    }
}
