//! The fast path's targets (issue 12), as ratios of medians within one run, each judged
//! met or missed with the margin.

use serde::{Deserialize, Serialize};

use super::report::MetricResult;

/// Rounds below which a verdict is only indicative (the targets are stated for >= 5).
pub const MIN_ROUNDS: u32 = 5;

#[derive(Debug)]
pub struct Target {
    pub label: &'static str,
    pub metric: &'static str,
    pub numerator: &'static str,
    pub denominator: &'static str,
    /// true: ratio >= bound; false: ratio <= bound.
    pub at_least: bool,
    pub bound: f64,
}

pub const TARGETS: &[Target] = &[
    Target {
        label: "TCP 1 stream, ebpf / node-to-node",
        metric: "tcp_1_stream",
        numerator: "ebpf",
        denominator: "node",
        at_least: true,
        bound: 0.95,
    },
    Target {
        label: "TCP 1 stream, ebpf / host-gw",
        metric: "tcp_1_stream",
        numerator: "ebpf",
        denominator: "host-gw",
        at_least: true,
        bound: 1.0,
    },
    Target {
        label: "TCP 1 stream, ebpf / kernel vxlan",
        metric: "tcp_1_stream",
        numerator: "ebpf",
        denominator: "vxlan",
        at_least: true,
        bound: 1.1,
    },
    Target {
        label: "TCP request/response rate, ebpf / host-gw",
        metric: "tcp_rr",
        numerator: "ebpf",
        denominator: "host-gw",
        at_least: true,
        bound: 1.2,
    },
    Target {
        label: "TCP RR p99 latency, ebpf / host-gw",
        metric: "tcp_rr_p99",
        numerator: "ebpf",
        denominator: "host-gw",
        at_least: false,
        bound: 1.0,
    },
    Target {
        label: "UDP small-packet rate, ebpf / host-gw",
        metric: "udp_pps",
        numerator: "ebpf",
        denominator: "host-gw",
        at_least: true,
        bound: 1.2,
    },
    Target {
        label: "CPU-s per Gbit at the paced rate (experiment's tasks), ebpf / host-gw",
        metric: "cpu_per_gbit",
        numerator: "ebpf",
        denominator: "host-gw",
        at_least: false,
        bound: 1.0,
    },
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetResult {
    pub label: String,
    pub metric: String,
    /// "ebpf/host-gw".
    pub ratio_of: String,
    /// ">= 1.2" or "<= 1.0".
    pub target: String,
    /// None when a mode is missing from the run (or its median is 0).
    pub ratio: Option<f64>,
    pub met: Option<bool>,
    /// How far the ratio is from the bound, relative to it: positive = met with room,
    /// negative = missed by that much.
    pub margin: Option<f64>,
}

impl TargetResult {
    pub fn verdict(&self) -> String {
        match (self.met, self.margin) {
            (Some(true), Some(m)) => format!("met ({:+.1} % margin)", m * 100.0),
            (Some(false), Some(m)) => format!("**missed** by {:.1} %", -m * 100.0),
            _ => "not measured (a mode is missing)".into(),
        }
    }
}

pub fn evaluate(metrics: &[MetricResult]) -> Vec<TargetResult> {
    TARGETS
        .iter()
        .map(|t| {
            let median = |mode: &str| {
                metrics
                    .iter()
                    .find(|m| m.key == t.metric)
                    .and_then(|m| m.per_mode.get(mode))
                    .map(|s| s.median)
            };
            let ratio = match (median(t.numerator), median(t.denominator)) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            let margin = ratio.map(|r| {
                if t.at_least {
                    r / t.bound - 1.0
                } else {
                    1.0 - r / t.bound
                }
            });
            TargetResult {
                label: t.label.into(),
                metric: t.metric.into(),
                ratio_of: format!("{}/{}", t.numerator, t.denominator),
                target: format!("{} {}", if t.at_least { ">=" } else { "<=" }, t.bound),
                ratio,
                met: margin.map(|m| m >= 0.0),
                margin,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::stats::Summary;

    fn metric(key: &str, per_mode: &[(&str, f64)]) -> MetricResult {
        MetricResult {
            key: key.into(),
            label: key.into(),
            unit: String::new(),
            higher_is_better: true,
            per_mode: per_mode
                .iter()
                .map(|(m, v)| (m.to_string(), Summary::of(&[*v]).expect("finite")))
                .collect(),
            ratios: BTreeMap::new(),
        }
    }

    #[test]
    fn met_missed_and_margins() {
        let metrics = [
            metric(
                "tcp_1_stream",
                &[("node", 20.0), ("host-gw", 18.0), ("ebpf", 18.9)],
            ),
            metric("tcp_rr_p99", &[("host-gw", 50.0), ("ebpf", 55.0)]),
        ];
        let r = evaluate(&metrics);
        assert_eq!(r.len(), TARGETS.len());
        let node = &r[0];
        assert_eq!(node.ratio_of, "ebpf/node");
        assert_eq!(node.met, Some(false));
        assert!((node.margin.expect("margin") - (0.945 / 0.95 - 1.0)).abs() < 1e-9);
        assert!(
            node.verdict().starts_with("**missed** by 0.5 %"),
            "{}",
            node.verdict()
        );
        assert_eq!(r[1].met, Some(true), "18.9/18 = 1.05 >= 1.0");
        assert!(
            r[1].verdict().starts_with("met (+5.0 %"),
            "{}",
            r[1].verdict()
        );
        assert_eq!(r[2].met, None, "no vxlan in this run");
        let p99 = &r[4];
        assert_eq!(p99.target, "<= 1");
        assert_eq!(p99.met, Some(false), "1.1 > 1.0");
        assert!(p99.verdict().contains("10.0 %"), "{}", p99.verdict());
    }
}
