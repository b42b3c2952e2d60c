//! The eBPF datapath's STATS counters (`overlay_common::stat`) as tests compare them: what
//! moved between two reads.

use overlay_common::stat;

/// By how much counter `index` grew from `before` to `after`.
pub fn delta(before: &[u64], after: &[u64], index: u32) -> u64 {
    after[index as usize] - before[index as usize]
}

/// The counters that moved, by name, with how much: for failure messages.
pub fn moved(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    (0..stat::COUNT)
        .filter(|&i| delta(before, after, i) > 0)
        .map(|i| (stat::NAMES[i as usize], delta(before, after, i)))
        .collect()
}

/// Packets delivered into pods by a fast path (R1 after the kernel's decap, R3 before it).
pub fn fast_rx_packets(before: &[u64], after: &[u64]) -> u64 {
    delta(before, after, stat::FAST_RX_BEFORE_DECAP_PACKETS)
        + delta(before, after, stat::FAST_RX_AFTER_DECAP_PACKETS)
}

/// Bytes delivered into pods by a fast path (R1 + R3).
pub fn fast_rx_bytes(before: &[u64], after: &[u64]) -> u64 {
    delta(before, after, stat::FAST_RX_BEFORE_DECAP_BYTES)
        + delta(before, after, stat::FAST_RX_AFTER_DECAP_BYTES)
}
