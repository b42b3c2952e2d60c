//! Counting: every packet bumps exactly one reason counter; fast-path packets also add
//! their length to the matching byte counter.

use overlay_common::stat;

use crate::maps::STATS;

/// What a program decided about one packet: the TC action to return and why.
pub struct Verdict {
    pub action: i32,
    pub reason: u32,
    /// Bytes to add to the reason's byte counter (encap/decap only).
    pub bytes: u32,
}

#[inline(always)]
fn add(index: u32, amount: u64) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer, a plain add is enough.
        unsafe { *counter += amount };
    }
}

#[inline(always)]
pub fn count(verdict: &Verdict) {
    add(verdict.reason, 1);
    if let Some(bytes_index) = stat::bytes_of(verdict.reason) {
        add(bytes_index, u64::from(verdict.bytes));
    }
}
