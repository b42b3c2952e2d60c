//! `cargo xtask soak --seconds 45` runs end to end against the real agent: three agents, lease
//! churn, pings, and at least three leak checks that all pass. Needs root: fails without it.

use std::process::Command;

#[test]
fn short_soak_finds_no_leak() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["soak", "--seconds", "45", "--check-every", "10"])
        .output()
        .expect("run xtask soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "xtask soak failed ({})", out.status);
    let checks = stdout.lines().filter(|l| l.contains("] check ")).count();
    assert!(checks >= 3, "expected at least 3 checks, got {checks}");
    assert!(stdout.contains("soak PASSED"), "{stdout}");
}
