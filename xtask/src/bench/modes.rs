//! The datapath benchmark's modes as data: what each one starts on the nodes. The eBPF
//! fast path's pieces are toggled with the agent's `--ebpf-fast-path=<pieces>` (`all`,
//! `none`, or a comma-separated subset of `rx-after-decap`, `tx`, `rx-before-decap`), so each
//! sub-mode is the ebpf backend plus extra agent arguments and the report shows what each
//! piece adds. A new sub-mode is one more entry here.

/// One column of the datapath report.
#[derive(Debug)]
pub struct Mode {
    pub name: &'static str,
    /// The agent's `--backend`; `None`: no agent and no pods at all, the load tools run in
    /// the node namespaces and talk over the underlay veth (the physical reference).
    pub backend: Option<&'static str>,
    /// Extra agent arguments on top of the fixtures' standard ones.
    pub agent_args: &'static [&'static str],
    /// Agent flags this mode needs: an agent binary without them cannot run the mode.
    pub needs_flags: &'static [&'static str],
    /// eBPF counters that must move during the tests; otherwise the column would silently
    /// be another path's numbers.
    pub must_count: &'static [&'static str],
    pub about: &'static str,
}

const FAST_PATH: &str = "--ebpf-fast-path";

pub const MODES: &[Mode] = &[
    Mode {
        name: "node",
        backend: None,
        agent_args: &[],
        needs_flags: &[],
        must_count: &[],
        about: "node to node over the underlay veth, no overlay, no agent (the physical reference)",
    },
    Mode {
        name: "host-gw",
        backend: Some("host-gw"),
        agent_args: &[],
        needs_flags: &[],
        must_count: &[],
        about: "pod to pod, routed by the kernel (--backend=host-gw)",
    },
    Mode {
        name: "vxlan",
        backend: Some("vxlan"),
        agent_args: &[],
        needs_flags: &[],
        must_count: &[],
        about: "pod to pod, the kernel vxlan device (--backend=vxlan)",
    },
    Mode {
        name: "ebpf-kernel",
        backend: Some("ebpf"),
        agent_args: &["--ebpf-fast-path=none"],
        needs_flags: &[FAST_PATH],
        must_count: &["kernel_disabled"],
        about: "--backend=ebpf --ebpf-fast-path=none: no fast-path piece",
    },
    Mode {
        name: "ebpf-r1",
        backend: Some("ebpf"),
        agent_args: &["--ebpf-fast-path=rx-after-decap"],
        needs_flags: &[FAST_PATH],
        must_count: &["fast_rx_after_decap_packets"],
        about: "R1: flannel.<VNI> TCX ingress redirect_peer into the pod after kernel decap",
    },
    Mode {
        name: "ebpf-r1r2",
        backend: Some("ebpf"),
        agent_args: &["--ebpf-fast-path=rx-after-decap,tx"],
        needs_flags: &[FAST_PATH],
        must_count: &["fast_rx_after_decap_packets", "fast_tx_packets"],
        about: "R1 + R2: pod veth TCX ingress encap and redirect to the uplink",
    },
    Mode {
        name: "ebpf",
        backend: Some("ebpf"),
        agent_args: &[],
        needs_flags: &[],
        must_count: &["fast_tx_packets", "fast_rx_before_decap_packets"],
        about: "--backend=ebpf with its default fast path (all pieces: R1 + R2 + R3 uplink decap)",
    },
];

/// The default datapath run, in the order modes run within a round: the reference first.
pub const DEFAULT: [&str; 7] = [
    "node",
    "host-gw",
    "vxlan",
    "ebpf-kernel",
    "ebpf-r1",
    "ebpf-r1r2",
    "ebpf",
];

/// Headline ratios of the report's main table, as (numerator, denominator).
pub const HEADLINE_RATIOS: [(&str, &str); 3] =
    [("ebpf", "node"), ("ebpf", "host-gw"), ("ebpf", "vxlan")];

/// The fast path built up piece by piece: each step against the one before it.
pub const STEPS: [(&str, &str); 4] = [
    ("ebpf-kernel", "vxlan"),
    ("ebpf-r1", "ebpf-kernel"),
    ("ebpf-r1r2", "ebpf-r1"),
    ("ebpf", "ebpf-r1r2"),
];

pub fn find(name: &str) -> Option<&'static Mode> {
    MODES.iter().find(|m| m.name == name)
}

pub fn names() -> String {
    MODES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The agent flags `modes` need that the agent's `--help` does not mention.
pub fn missing_flags<'a>(modes: &[&'a Mode], agent_help: &str) -> Vec<(&'a str, &'static str)> {
    modes
        .iter()
        .flat_map(|m| m.needs_flags.iter().map(move |f| (m.name, *f)))
        .filter(|(_, f)| !agent_help.contains(f))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_mode_exists() {
        for name in DEFAULT
            .iter()
            .chain(HEADLINE_RATIOS.iter().flat_map(|(a, b)| [a, b]))
            .chain(STEPS.iter().flat_map(|(a, b)| [a, b]))
        {
            assert!(find(name).is_some(), "{name} is not in MODES");
        }
        assert_eq!(DEFAULT[0], "node", "the physical reference runs first");
    }

    #[test]
    fn sub_modes_need_the_fast_path_flag() {
        let sub: Vec<&Mode> = ["ebpf-r1", "ebpf", "node"]
            .iter()
            .map(|n| find(n).expect("mode"))
            .collect();
        assert_eq!(
            missing_flags(&sub, "  --backend <BACKEND>\n"),
            [("ebpf-r1", FAST_PATH)]
        );
        assert!(missing_flags(&sub, "  --ebpf-fast-path <PIECES>\n").is_empty());
    }
}
