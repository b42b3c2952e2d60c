//! The BPF filesystem: mounted when missing, and pin directories that go with the test.

use std::path::{Path, PathBuf};

use crate::unique_name;

/// Where the fixtures pin BPF objects: one directory per node or [`PinDir`] below it.
pub const PIN_ROOT: &str = "/sys/fs/bpf/overlay-test";

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (pinning needs it).
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        crate::run_checked(std::process::Command::new("mount").args([
            "-t",
            "bpf",
            "bpf",
            "/sys/fs/bpf",
        ]));
    }
}

/// A pin directory of its own under [`PIN_ROOT`] (not created: the loader creates it),
/// removed with everything pinned in it on drop. Removing a link's pin detaches the link.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Needs root and bpffs (mounted when missing). Like namespace names, the name comes from
    /// the pid: one a killed run with the same pid left behind is skipped.
    #[expect(
        clippy::new_without_default,
        reason = "it needs root and picks a fresh directory: no default value"
    )]
    pub fn new() -> PinDir {
        crate::require_root();
        ensure_bpffs();
        let path = std::iter::repeat_with(|| Path::new(PIN_ROOT).join(unique_name("pin")))
            .find(|path| !path.exists())
            .expect("an unused pin directory");
        PinDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
