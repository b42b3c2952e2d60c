//! `cargo xtask bench --quick` (and `--quick --control-plane`) run end to end against the real
//! agent and write well-formed results. Nothing here checks speed: only that every mode came
//! up, every test produced a number, and the files say so. Needs root (namespaces, BPF):
//! fails loudly without it.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// The two runs would compete for 2 cores and make each other's bring-up slow: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn run_bench(extra: &[&str], out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--quick", "--out"])
        .arg(out)
        .args(extra)
        .status()
        .expect("run xtask bench");
    assert!(
        status.success(),
        "xtask bench --quick {extra:?} failed ({status}); see its output above and {}/report.md",
        out.display()
    );
}

/// Checks results.json, report.md and chart.svg; returns the parsed results.
fn check_files(out: &Path, modes: &[&str], ratios: &[&str], metric_count: usize) -> Value {
    let json = std::fs::read_to_string(out.join("results.json")).expect("results.json exists");
    let r: Value = serde_json::from_str(&json).expect("results.json is JSON");
    assert_eq!(r["quick"], true);
    assert_eq!(
        r["errors"].as_array().expect("errors array").len(),
        0,
        "{json}"
    );
    let got_modes: Vec<&str> = r["modes"]
        .as_array()
        .expect("modes")
        .iter()
        .map(|m| m.as_str().expect("mode name"))
        .collect();
    assert_eq!(got_modes, modes);
    let metrics = r["metrics"].as_array().expect("metrics array");
    assert_eq!(metrics.len(), metric_count, "{json}");
    for m in metrics {
        for mode in modes {
            let s = &m["per_mode"][mode];
            let median = s["median"].as_f64();
            assert!(
                median.is_some_and(f64::is_finite),
                "{} has no median for {mode}: {json}",
                m["key"]
            );
            let (min, max) = (
                s["min"].as_f64().expect("min"),
                s["max"].as_f64().expect("max"),
            );
            assert!(min <= median.expect("median") && median.expect("median") <= max);
            assert!(!s["samples"].as_array().expect("samples").is_empty());
        }
        for ratio in ratios {
            // A ratio exists unless its denominator is 0 (e.g. no UDP loss at all).
            let (a, b) = ratio.split_once('/').expect("a/b");
            let median = |mode: &str| m["per_mode"][mode]["median"].as_f64().expect("median");
            if median(b) != 0.0 {
                let want = median(a) / median(b);
                let got = m["ratios"][ratio].as_f64();
                assert!(
                    got.is_some_and(|r| (r - want).abs() <= 1e-9 * want.abs().max(1.0)),
                    "{} ratio {ratio} is {got:?}, the medians give {want}",
                    m["key"]
                );
            }
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md exists");
    assert!(md.starts_with("# overlay-agent benchmark"), "{md}");
    assert!(md.contains("| metric | unit | better |"), "{md}");
    assert!(md.contains("No test failed."), "{md}");
    let svg = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg exists");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let header = md
        .lines()
        .find(|l| l.starts_with("| metric | unit | better |"))
        .expect("main table header");
    for mode in modes {
        assert!(
            header.contains(&format!(" {mode} |")),
            "report.md's table lacks {mode}: {header}"
        );
        assert!(
            svg.contains(&format!(">{mode}</text>")),
            "chart.svg lacks {mode}"
        );
    }
    assert_eq!(
        svg.matches("<rect").count(),
        1 + modes.len() + metric_count * modes.len(),
        "background + legend + one bar per metric and mode"
    );
    r
}

/// The default datapath modes in run order; the fast-path sub-modes need the agent's
/// `--ebpf-fast-path` flag and are skipped (with a note) by an agent without it.
const DATAPATH_MODES: [&str; 7] = [
    "node",
    "host-gw",
    "vxlan",
    "ebpf-kernel",
    "ebpf-r1",
    "ebpf-r1r2",
    "ebpf",
];
const FAST_PATH_SUB_MODES: [&str; 3] = ["ebpf-kernel", "ebpf-r1", "ebpf-r1r2"];

#[test]
fn quick_datapath_bench_writes_results_for_every_mode() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    run_bench(&[], out.path());
    let json = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&json).expect("JSON");
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // "skipped modes ebpf-kernel, ebpf-r1, ebpf-r1r2: agent ... has no --ebpf-fast-path flag"
    let skipped: Vec<&str> = notes
        .iter()
        .find_map(|n| n.strip_prefix("skipped modes "))
        .and_then(|n| n.split_once(':'))
        .map(|(list, _)| list.split(", ").collect())
        .unwrap_or_default();
    assert!(
        skipped.iter().all(|m| FAST_PATH_SUB_MODES.contains(m)),
        "only the fast-path sub-modes may be skipped: {skipped:?}"
    );
    let expected: Vec<&str> = DATAPATH_MODES
        .into_iter()
        .filter(|m| !skipped.contains(m))
        .collect();
    let r = check_files(
        out.path(),
        &expected,
        &["ebpf/node", "ebpf/host-gw", "ebpf/vxlan"],
        11,
    );
    assert_eq!(r["kind"], "datapath");
    assert_eq!(r["settings"]["pinning"]["client_cpus"], "0");
    assert_eq!(
        r["targets"].as_array().expect("targets").len(),
        7,
        "every issue-12 target judged"
    );
    assert!(
        r["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .all(|t| t["met"].is_boolean()),
        "every target has a verdict: {}",
        r["targets"]
    );
    let profiles = r["profiles"].as_array().expect("profiles");
    assert_eq!(profiles.len(), expected.len(), "one CPU profile per mode");
    for (p, mode) in profiles.iter().zip(&expected) {
        assert_eq!(p["mode"], *mode);
        assert!(
            p["samples_experiment"].as_u64().expect("samples") > 0,
            "{p}"
        );
        assert!(!p["top_kernel"].as_array().expect("top").is_empty(), "{p}");
        let txt = std::fs::read_to_string(out.path().join(format!("perf-{mode}.txt")))
            .expect("perf-<mode>.txt");
        assert!(
            txt.contains("[k]"),
            "perf report lists kernel symbols: {txt}"
        );
    }
    // The physical reference has no bridge and no vxlan device on the stack; vxlan has it.
    let share = |mode: &str, group: &str| {
        profiles
            .iter()
            .find(|p| p["mode"] == mode)
            .expect("profile")["groups"][group]
            .as_f64()
            .expect("group share")
    };
    assert_eq!(share("node", "bridge (br_*)"), 0.0);
    assert!(share("vxlan", "vxlan device (vxlan_*)") > 0.0);
    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    for section in [
        "## Targets",
        "### What disappeared",
        "### Spread",
        "Pinning (taskset",
    ] {
        assert!(md.contains(section), "report.md lacks {section}");
    }
}

#[test]
fn quick_control_plane_bench_writes_results_for_ebpf_and_vxlan_with_and_without_nexthop_objects() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    run_bench(&["--control-plane"], out.path());
    // sync, routes in their final form, change p50/p99, RSS, CPU to sync, idle CPU, CPU under
    // churn, re-list time and re-list netlink writes.
    let modes = ["vxlan", "ebpf", "vxlan-nexthop", "ebpf-nexthop"];
    let r = check_files(
        out.path(),
        &modes,
        &["ebpf/vxlan", "vxlan-nexthop/vxlan", "ebpf-nexthop/ebpf"],
        10,
    );
    assert_eq!(r["kind"], "control-plane");
    assert_eq!(r["settings"]["peers"], serde_json::json!([200]));
    let metric = |key: &str| {
        r["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .find(|m| m["key"] == key)
            .unwrap_or_else(|| panic!("no metric {key}"))
            .clone()
    };
    for mode in modes {
        assert_eq!(
            metric("relist_writes_200")["per_mode"][mode]["median"].as_f64(),
            Some(0.0),
            "a re-list that changes nothing must write nothing ({mode})"
        );
        assert!(
            metric("cpu_idle_200")["per_mode"][mode]["median"]
                .as_f64()
                .is_some_and(|cpu| cpu >= 0.0)
        );
        let median = |key: &str| metric(key)["per_mode"][mode]["median"].as_f64();
        assert!(
            median("routes_final_200") >= median("sync_200"),
            "routes reach their final form no earlier than the sync ({mode})"
        );
    }
}
