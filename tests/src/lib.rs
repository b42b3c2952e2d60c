//! Fixtures for the integration tests, the demo and the benchmarks: real network namespaces,
//! real etcd-server processes and real agent processes, each cleaned up on drop (also when a
//! test panics). Names are unique per process and call, so tests run in parallel.
//!
//! Fixtures panic with context instead of returning errors: a broken fixture is a failed test.

pub mod agent;
pub mod bpffs;
pub mod cni;
pub mod etcd;
pub mod flanneld;
pub mod netns;
pub mod stats;
pub mod tls;
pub mod topology;

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `timeout`.
/// Tests wait for conditions, never for fixed sleeps: CI runs them in parallel on 2 cores.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    if !try_wait_until(timeout, &mut condition) {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// Like [`wait_until`] but returns whether the condition held in time.
pub fn try_wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Panics loudly unless we run as root: privileged tests must fail, never skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, BPF); run it through `cargo xtask test` as root"
    );
}

/// A short name unique to this process and call: `<prefix><pid36><n>`, at most 15 bytes so it
/// also fits an interface name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{}", radix36(std::process::id()), radix36(n));
    assert!(
        name.len() <= 15,
        "unique_name({prefix:?}) = {name:?} is too long"
    );
    name
}

fn radix36(mut value: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run_checked(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Sends SIGKILL to a child we started and reaps it. Used by drop guards.
pub(crate) fn kill_and_reap(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}
