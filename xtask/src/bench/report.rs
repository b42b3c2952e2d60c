//! Results: the typed results.json, the terminal table, report.md and an SVG chart.
//!
//! The chart is written by hand (about 80 lines): it is one kind of figure (horizontal bars
//! with min-max whiskers per metric and mode), and `plotters` would add a dependency tree and
//! font handling to xtask for it, which must build on a bare machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::MetricDef;
use super::profile::{GROUPS, Profile};
use super::stats::Summary;
use super::targets::{MIN_ROUNDS, TargetResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// "datapath" or "control-plane".
    pub kind: String,
    pub started_utc: String,
    pub finished_utc: String,
    pub quick: bool,
    pub host: Host,
    /// What was run (durations, rounds, peer counts...).
    pub settings: serde_json::Value,
    /// Mode order as run within each round.
    pub modes: Vec<String>,
    pub metrics: Vec<MetricResult>,
    /// Tests that failed (their samples are missing); empty on a clean run.
    pub errors: Vec<String>,
    /// Observations worth keeping with the numbers (e.g. the eBPF datapath's counters).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Mode -> what it runs.
    #[serde(default)]
    pub mode_descriptions: BTreeMap<String, String>,
    /// Ratios of the main table ("a/b"); empty: every ratio computed.
    #[serde(default)]
    pub headline_ratios: Vec<String>,
    /// Ratios of the fast-path steps table ("step/previous").
    #[serde(default)]
    pub step_ratios: Vec<String>,
    /// Rounds each mode ran (the targets are stated for medians of >= 5).
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub targets: Vec<TargetResult>,
    /// One CPU profile per mode (empty with --no-profile).
    #[serde(default)]
    pub profiles: Vec<Profile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub load_avg_at_start: String,
}

impl Host {
    pub fn probe() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        Self {
            kernel: read("/proc/sys/kernel/osrelease"),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_avg_at_start: read("/proc/loadavg"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MetricResult {
    pub key: String,
    pub label: String,
    pub unit: String,
    pub higher_is_better: bool,
    /// Mode -> summary over rounds (absent when every round of that mode failed).
    pub per_mode: BTreeMap<String, Summary>,
    /// "a/b" -> median(a) / median(b).
    pub ratios: BTreeMap<String, f64>,
}

/// Samples collected over rounds: (metric key, mode) -> one value per round.
pub type Samples = BTreeMap<(String, String), Vec<f64>>;

pub fn summarize(
    defs: &[MetricDef],
    modes: &[String],
    samples: &Samples,
    ratio_pairs: &[(&str, &str)],
) -> Vec<MetricResult> {
    defs.iter()
        .map(|d| {
            let mut per_mode = BTreeMap::new();
            for mode in modes {
                if let Some(v) = samples.get(&(d.key.to_string(), mode.clone()))
                    && let Some(s) = Summary::of(v)
                {
                    per_mode.insert(mode.clone(), s);
                }
            }
            let mut ratios = BTreeMap::new();
            for (a, b) in ratio_pairs {
                if let (Some(x), Some(y)) = (per_mode.get(*a), per_mode.get(*b))
                    && y.median != 0.0
                {
                    ratios.insert(format!("{a}/{b}"), x.median / y.median);
                }
            }
            MetricResult {
                key: d.key.to_string(),
                label: d.label.to_string(),
                unit: d.unit.to_string(),
                higher_is_better: d.higher_is_better,
                per_mode,
                ratios,
            }
        })
        .collect()
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The main table's ratios: the headline ones that were computed, else all of them.
fn ratio_names(r: &Results) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for m in &r.metrics {
        for k in m.ratios.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    if r.headline_ratios.is_empty() {
        return names;
    }
    r.headline_ratios
        .iter()
        .filter(|k| names.contains(k))
        .cloned()
        .collect()
}

/// Rows of cells: header first. Cells: metric, unit, better, one median per mode, one per
/// ratio (the spread has its own table: seven "median [min-max]" columns do not read).
fn table_cells(r: &Results) -> Vec<Vec<String>> {
    let ratios = ratio_names(r);
    let mut header = vec!["metric".to_string(), "unit".into(), "better".into()];
    header.extend(r.modes.iter().cloned());
    header.extend(ratios.iter().cloned());
    let mut rows = vec![header];
    for m in &r.metrics {
        let mut row = vec![
            m.label.clone(),
            m.unit.clone(),
            if m.higher_is_better {
                "higher"
            } else {
                "lower"
            }
            .into(),
        ];
        for mode in &r.modes {
            row.push(match m.per_mode.get(mode) {
                Some(s) => fmt_num(s.median),
                None => "failed".into(),
            });
        }
        for k in &ratios {
            row.push(m.ratios.get(k).map_or("-".into(), |v| format!("{v:.2}")));
        }
        rows.push(row);
    }
    rows
}

/// metric, then "min-max" per mode.
fn spread_cells(r: &Results) -> Vec<Vec<String>> {
    let mut header = vec!["metric".to_string()];
    header.extend(r.modes.iter().cloned());
    let mut rows = vec![header];
    for m in &r.metrics {
        let mut row = vec![m.label.clone()];
        for mode in &r.modes {
            row.push(match m.per_mode.get(mode) {
                Some(s) => format!("{}-{}", fmt_num(s.min), fmt_num(s.max)),
                None => "failed".into(),
            });
        }
        rows.push(row);
    }
    rows
}

/// metric, better, then one ratio per fast-path step that ran.
fn step_cells(r: &Results) -> Option<Vec<Vec<String>>> {
    let steps: Vec<&String> = r
        .step_ratios
        .iter()
        .filter(|k| r.metrics.iter().any(|m| m.ratios.contains_key(*k)))
        .collect();
    if steps.is_empty() {
        return None;
    }
    let mut header = vec!["metric".to_string(), "better".into()];
    header.extend(steps.iter().map(|s| s.to_string()));
    let mut rows = vec![header];
    for m in &r.metrics {
        let mut row = vec![
            m.label.clone(),
            if m.higher_is_better {
                "higher"
            } else {
                "lower"
            }
            .into(),
        ];
        for k in &steps {
            row.push(m.ratios.get(*k).map_or("-".into(), |v| format!("{v:.2}")));
        }
        rows.push(row);
    }
    Some(rows)
}

fn md_table(md: &mut String, rows: &[Vec<String>]) {
    for (i, row) in rows.iter().enumerate() {
        let _ = writeln!(md, "| {} |", row.join(" | "));
        if i == 0 {
            let _ = writeln!(md, "|{}", " --- |".repeat(row.len()));
        }
    }
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// Groups whose share differs most between two modes' profiles, as a sentence.
fn profile_difference(a: &Profile, b: &Profile) -> String {
    let mut diffs: Vec<(&str, f64)> = GROUPS
        .iter()
        .map(|(g, _)| {
            let share = |p: &Profile| p.groups.get(*g).copied().unwrap_or(0.0);
            (*g, share(a) - share(b))
        })
        .filter(|(_, d)| d.abs() >= 0.01)
        .collect();
    diffs.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
    let list = |more: bool| -> String {
        let v: Vec<String> = diffs
            .iter()
            .filter(|(_, d)| (*d > 0.0) == more)
            .take(4)
            .map(|(g, d)| format!("{g} {:+.1} pp", d * 100.0))
            .collect();
        if v.is_empty() {
            "nothing".into()
        } else {
            v.join(", ")
        }
    };
    format!(
        "{} against {}: more on the stack: {}; less: {}",
        a.mode,
        b.mode,
        list(true),
        list(false)
    )
}

fn markdown_targets(md: &mut String, r: &Results) {
    if r.targets.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Targets\n\nRatios of medians within this run (issue 12).{}\n",
        if r.rounds < MIN_ROUNDS {
            format!(
                " **Only {} round(s): the targets are stated for medians of >= {MIN_ROUNDS} \
                 interleaved rounds, so these verdicts are indicative.**",
                r.rounds
            )
        } else {
            String::new()
        }
    );
    let mut rows = vec![vec![
        "target".to_string(),
        "ratio".into(),
        "bound".into(),
        "this run".into(),
        "verdict".into(),
    ]];
    for t in &r.targets {
        rows.push(vec![
            t.label.clone(),
            t.ratio_of.clone(),
            t.target.clone(),
            t.ratio.map_or("-".into(), |v| format!("{v:.3}")),
            t.verdict(),
        ]);
    }
    md_table(md, &rows);
    let missed: Vec<&TargetResult> = r.targets.iter().filter(|t| t.met == Some(false)).collect();
    let _ = writeln!(
        md,
        "\n{} of {} targets met.",
        r.targets.iter().filter(|t| t.met == Some(true)).count(),
        r.targets.len()
    );
    if missed.is_empty() || r.profiles.is_empty() {
        return;
    }
    // What the (bulk TCP) profiles say about the modes the missed targets compare.
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for t in &missed {
        if let Some((a, b)) = t.ratio_of.split_once('/')
            && !pairs.contains(&(a, b))
        {
            pairs.push((a, b));
        }
    }
    let find = |m: &str| r.profiles.iter().find(|p| p.mode == m);
    let lines: Vec<String> = pairs
        .iter()
        .filter_map(|(a, b)| Some(profile_difference(find(a)?, find(b)?)))
        .collect();
    if !lines.is_empty() {
        let _ = writeln!(
            md,
            "\nWhere the missed targets' modes differ in the bulk TCP profiles (share of the \
             experiment's samples with the layer on the call chain; pp = percentage points):\n"
        );
        for l in lines {
            let _ = writeln!(md, "- {l}");
        }
    }
}

fn markdown_profiles(md: &mut String, r: &Results) {
    if r.profiles.is_empty() {
        return;
    }
    let files: Vec<String> = r
        .profiles
        .iter()
        .map(|p| format!("`{}`", p.report_file))
        .collect();
    let _ = writeln!(
        md,
        "\n## CPU profiles (one bulk TCP run per mode under `perf record -a -g`)\n\n\
         Separate from the measured runs. Shares are of the experiment's samples (`iperf3` \
         client and server, `ksoftirqd/*`), not of the whole shared machine. Full reports: \
         {}; call graphs: `perf report -i perf-<mode>.data --children`. Without a PMU (this \
         VM) perf samples `cpu-clock`, which charges time spent with interrupts off to the \
         function that turns them back on (`_raw_spin_unlock_irqrestore`, \
         `handle_softirqs`).\n",
        files.join(", ")
    );
    let _ = writeln!(
        md,
        "### What disappeared\n\nPercent of the experiment's samples with the layer anywhere \
         on the call chain (nested layers overlap, so columns do not add up).\n"
    );
    let mut header = vec!["layer".to_string()];
    header.extend(r.profiles.iter().map(|p| p.mode.clone()));
    let mut rows = vec![header];
    for (g, _) in GROUPS {
        let mut row = vec![g.to_string()];
        row.extend(
            r.profiles
                .iter()
                .map(|p| p.groups.get(*g).map_or("-".into(), |v| pct(*v))),
        );
        rows.push(row);
    }
    let mut kernel = vec!["(kernel share of these samples)".to_string()];
    kernel.extend(r.profiles.iter().map(|p| pct(p.kernel_share)));
    rows.push(kernel);
    let mut tput = vec!["(Gbit/s under perf)".to_string()];
    tput.extend(r.profiles.iter().map(|p| fmt_num(p.gbit_per_s)));
    rows.push(tput);
    let mut n = vec!["(samples)".to_string()];
    n.extend(r.profiles.iter().map(|p| p.samples_experiment.to_string()));
    rows.push(n);
    md_table(md, &rows);
    let _ = writeln!(
        md,
        "\n### Top kernel functions (self time, % of the experiment's samples)\n"
    );
    for p in &r.profiles {
        let top: Vec<String> = p
            .top_kernel
            .iter()
            .map(|(s, v)| format!("`{s}` {}", pct(*v)))
            .collect();
        let _ = writeln!(md, "- **{}**: {}", p.mode, top.join(", "));
    }
}

pub fn terminal_table(r: &Results) -> String {
    let rows = table_cells(r);
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
        if i == 0 {
            let _ = writeln!(
                out,
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (cols - 1))
            );
        }
    }
    out
}

pub fn markdown(r: &Results) -> String {
    let rows = table_cells(r);
    let mut md = String::new();
    let _ = writeln!(md, "# overlay-agent benchmark: {}\n", r.kind);
    let _ = writeln!(
        md,
        "Started {} UTC, finished {} UTC{}. Kernel {}, {} CPUs, load at start `{}`.\n",
        r.started_utc,
        r.finished_utc,
        if r.quick {
            " (--quick: a harness check, not a measurement)"
        } else {
            ""
        },
        r.host.kernel,
        r.host.cpus,
        r.host.load_avg_at_start
    );
    let _ = writeln!(md, "Settings: `{}`\n", r.settings);
    if let Some(pin) = r.settings.get("pinning") {
        let _ = writeln!(
            md,
            "Pinning (taskset, the same in every mode): client on CPUs {}, server on CPUs {}.\n",
            pin["client_cpus"].as_str().unwrap_or("?"),
            pin["server_cpus"].as_str().unwrap_or("?")
        );
    }
    if !r.mode_descriptions.is_empty() {
        let _ = writeln!(md, "Modes:\n");
        for m in &r.modes {
            if let Some(d) = r.mode_descriptions.get(m) {
                let _ = writeln!(md, "- `{m}`: {d}");
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "Modes ran interleaved ({}) in every round; each cell is the median over {} round(s) \
         (spread in the next table); ratios compare medians. The machine is shared and noisy: \
         compare modes within this run only.\n",
        r.modes.join(", "),
        r.rounds
    );
    md_table(&mut md, &rows);
    let _ = writeln!(md, "\n### Spread (min-max over rounds)\n");
    md_table(&mut md, &spread_cells(r));
    if let Some(steps) = step_cells(r) {
        let _ = writeln!(
            md,
            "\n### Gain of each fast-path step\n\nEach step's median over the one before it \
             (for lower-is-better metrics a ratio below 1 is the gain).\n"
        );
        md_table(&mut md, &steps);
    }
    markdown_targets(&mut md, r);
    markdown_profiles(&mut md, r);
    if r.errors.is_empty() {
        let _ = writeln!(md, "\nNo test failed.");
    } else {
        let _ = writeln!(md, "\n## Failed tests ({})\n", r.errors.len());
        for e in &r.errors {
            let _ = writeln!(md, "- {e}");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(md, "\n![chart](chart.svg)");
    md
}

const COLORS: [&str; 9] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#79706e", "#edc948", "#76b7b2", "#ff9da7",
    "#9c755f",
];

/// One colour per mode in every chart (datapath and control-plane runs list modes differently).
fn color(mode: &str, index: usize) -> &'static str {
    match mode {
        "host-gw" => COLORS[0],
        "vxlan" => COLORS[1],
        "ebpf" => COLORS[2],
        "node" => COLORS[4],
        "ebpf-kernel" => COLORS[5],
        "ebpf-r1" => COLORS[6],
        "ebpf-r1r2" => COLORS[7],
        _ => COLORS[3 + index % 2 * 5],
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel per metric, one bar per mode (median), a whisker for min-max; each panel is
/// scaled to its own largest value because units differ.
pub fn svg(r: &Results) -> String {
    let (left, bar_w, bar_h, gap): (f64, f64, f64, f64) = (330.0, 520.0, 14.0, 4.0);
    let panel_h = r.modes.len() as f64 * (bar_h + gap) + 22.0;
    let width = (left + bar_w + 140.0).max(20.0 + r.modes.len() as f64 * 120.0);
    let height = 60.0 + panel_h * r.metrics.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">overlay-agent {} benchmark, {}: median, whisker min-max over rounds</text>"#,
        esc(&r.kind),
        esc(&r.started_utc)
    );
    for (i, mode) in r.modes.iter().enumerate() {
        let x = 10.0 + i as f64 * 120.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="41">{}</text>"#,
            color(mode, i),
            x + 16.0,
            esc(mode)
        );
    }
    for (pi, m) in r.metrics.iter().enumerate() {
        let y0 = 55.0 + pi as f64 * panel_h;
        let better = if m.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" font-weight="bold">{}</text><text x="10" y="{}" fill="#555">{} ({better})</text>"##,
            y0 + 14.0,
            esc(&m.label),
            y0 + 30.0,
            esc(&m.unit)
        );
        let scale_max = m
            .per_mode
            .values()
            .map(|v| v.max.max(v.median))
            .fold(0.0_f64, f64::max);
        for (i, mode) in r.modes.iter().enumerate() {
            let y = y0 + 4.0 + i as f64 * (bar_h + gap);
            let Some(v) = m.per_mode.get(mode) else {
                let _ = writeln!(
                    s,
                    r##"<text x="{left}" y="{}" fill="#a00">failed</text>"##,
                    y + 11.0
                );
                continue;
            };
            let px = |x: f64| {
                if scale_max > 0.0 {
                    left + bar_w * (x / scale_max).max(0.0)
                } else {
                    left
                }
            };
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{y}" width="{:.1}" height="{bar_h}" fill="{}"/>"#,
                px(v.median) - left,
                color(mode, i)
            );
            let wy = y + bar_h / 2.0;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{wy}" x2="{:.1}" y2="{wy}" stroke="black"/><line x1="{:.1}" y1="{}" x2="{:.1}" y2="{}" stroke="black"/><line x1="{:.1}" y1="{}" x2="{:.1}" y2="{}" stroke="black"/>"#,
                px(v.min),
                px(v.max),
                px(v.min),
                y + 3.0,
                px(v.min),
                y + bar_h - 3.0,
                px(v.max),
                y + 3.0,
                px(v.max),
                y + bar_h - 3.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{}</text>"#,
                px(v.max.max(v.median)) + 6.0,
                y + 11.0,
                fmt_num(v.median)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let write = |name: &str, body: String| {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("write {}", p.display()))
    };
    write("results.json", serde_json::to_string_pretty(r)? + "\n")?;
    write("report.md", markdown(r))?;
    write("chart.svg", svg(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let defs = [
            MetricDef::new("tput", "Throughput", "Gbit/s", true),
            MetricDef::new("lat", "Latency <p99>", "us", false),
        ];
        let modes: Vec<String> = ["host-gw", "vxlan", "ebpf"].map(String::from).to_vec();
        let mut samples = Samples::new();
        for (mode, t) in [("host-gw", 10.0), ("vxlan", 8.0), ("ebpf", 9.0)] {
            samples.insert(("tput".into(), mode.into()), vec![t, t + 1.0, t - 1.0]);
        }
        samples.insert(("lat".into(), "vxlan".into()), vec![20.0]);
        samples.insert(("lat".into(), "ebpf".into()), vec![f64::NAN]);
        Results {
            kind: "datapath".into(),
            started_utc: "s".into(),
            finished_utc: "f".into(),
            quick: true,
            host: Host::probe(),
            settings: serde_json::json!({"seconds": 1}),
            metrics: summarize(
                &defs,
                &modes,
                &samples,
                &[("ebpf", "host-gw"), ("ebpf", "vxlan")],
            ),
            modes,
            errors: vec!["lat ebpf: boom".into()],
            notes: vec!["round 1 ebpf counters: fast_tx_packets=3".into()],
            mode_descriptions: BTreeMap::new(),
            headline_ratios: vec!["ebpf/host-gw".into(), "ebpf/vxlan".into()],
            step_ratios: Vec::new(),
            rounds: 3,
            targets: Vec::new(),
            profiles: Vec::new(),
        }
    }

    #[test]
    fn ratios_and_missing_modes() {
        let r = sample();
        assert_eq!(r.metrics[0].ratios["ebpf/host-gw"], 0.9);
        assert_eq!(r.metrics[0].ratios["ebpf/vxlan"], 9.0 / 8.0);
        assert!(r.metrics[1].ratios.is_empty());
        assert!(!r.metrics[1].per_mode.contains_key("ebpf"));
    }

    #[test]
    fn renders_table_markdown_svg() {
        let r = sample();
        let t = terminal_table(&r);
        assert!(t.contains("10.00"), "{t}");
        assert!(t.contains("failed"));
        let md = markdown(&r);
        assert!(
            md.contains("| Throughput | Gbit/s | higher | 10.00 | 8.00 | 9.00 | 0.90 | 1.12 |"),
            "{md}"
        );
        assert!(
            md.contains("| Throughput | 9.00-11.00 | 7.00-9.00 | 8.00-10.00 |"),
            "{md}"
        );
        assert!(md.contains("lat ebpf: boom"));
        assert!(
            md.contains("## Notes\n\n- round 1 ebpf counters: fast_tx_packets=3"),
            "{md}"
        );
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;p99&gt;"));
        // The JSON round-trips.
        let back: Results =
            serde_json::from_str(&serde_json::to_string(&r).expect("ser")).expect("de");
        assert_eq!(back.metrics.len(), 2);
    }
}
