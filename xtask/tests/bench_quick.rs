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
    for mode in modes {
        assert!(
            md.contains(&format!("{mode} median")),
            "report.md lacks {mode}"
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

#[test]
fn quick_datapath_bench_writes_results_for_every_mode() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    run_bench(&[], out.path());
    let r = check_files(
        out.path(),
        &["host-gw", "vxlan", "ebpf"],
        &["ebpf/host-gw", "ebpf/vxlan"],
        11,
    );
    assert_eq!(r["kind"], "datapath");
}

#[test]
fn quick_control_plane_bench_writes_results_for_ebpf_and_vxlan() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    run_bench(&["--control-plane"], out.path());
    let r = check_files(out.path(), &["vxlan", "ebpf"], &["ebpf/vxlan"], 6);
    assert_eq!(r["kind"], "control-plane");
    assert_eq!(r["settings"]["peers"], serde_json::json!([200]));
}
