//! A bpf filesystem under `--bpf-pin-dir`, mounted by the agent when it is missing.
//!
//! `ip netns exec` (how many units start flanneld in a namespace) gives the process a private
//! mount namespace with a fresh sysfs on /sys, where /sys/fs/bpf is an empty sysfs directory.
//! Pinning there fails, and the node used to fall back to the kernel path. Like Cilium's
//! agent, mount bpffs on the pin root ourselves and fall back only when that fails.

use std::{
    io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::{info, warn};

/// What [`ensure_pin_root`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinRoot {
    /// The pin directory already lives on a bpf filesystem.
    Ready,
    /// There was none: we mounted one at `at`.
    Mounted {
        at: PathBuf,
        /// Only this process's mount namespace sees the mount (not PID 1's), so the pinned
        /// programs and maps go away with the process instead of outliving it.
        private: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot check which filesystem {path} is on (for --bpf-pin-dir): {source}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "{path} is not a bpf filesystem and not an empty directory, so bpffs is not mounted over it (mount one yourself: `mount -t bpf bpf {path}`, or choose a --bpf-pin-dir on bpffs)"
    )]
    NotEmpty { path: PathBuf },
    #[error("cannot list {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a bpf filesystem and mounting one there failed: {source} (mount it yourself: `mount -t bpf bpf {path}`)"
    )]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mounted bpffs at {path} but it still is not a bpf filesystem")]
    StillNotBpffs { path: PathBuf },
}

/// The pin root of `pin_dir`: its nearest existing ancestor (itself included), i.e. where the
/// agent's `create_dir_all` starts and where a bpffs must be. Normally /sys/fs/bpf.
pub fn pin_root(pin_dir: &Path) -> PathBuf {
    pin_dir
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let stat = statfs(path).map_err(|source| BpffsError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}

/// Whether this process sees another mount namespace than PID 1 (e.g. `ip netns exec`).
fn private_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    matches!((ns("self"), ns("1")), (Some(own), Some(init)) if own != init)
}

/// Makes sure `pin_dir` can live on a bpf filesystem: when its pin root is not one, mounts
/// bpffs there (only over an empty directory, so nothing is hidden) and says so.
pub fn ensure_pin_root(pin_dir: &Path) -> Result<PinRoot, BpffsError> {
    let root = pin_root(pin_dir);
    if is_bpffs(&root)? {
        return Ok(PinRoot::Ready);
    }
    let mut entries = std::fs::read_dir(&root).map_err(|source| BpffsError::ReadDir {
        path: root.clone(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(BpffsError::NotEmpty { path: root });
    }
    // mode=0700 as systemd mounts /sys/fs/bpf: pinned maps are not for other users.
    mount(
        Some("bpf"),
        &root,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|source| BpffsError::Mount {
        path: root.clone(),
        source,
    })?;
    if !is_bpffs(&root)? {
        return Err(BpffsError::StillNotBpffs { path: root });
    }
    let private = private_mount_namespace();
    info!(path = %root.display(), "{} was not a bpf filesystem; mounted bpffs there for the pinned eBPF datapath", root.display());
    if private {
        warn!(
            path = %root.display(),
            "the bpffs mount is private to the agent's mount namespace (started with `ip netns exec`?): the pinned programs and maps go away when the agent exits, and the node forwards through the kernel vxlan device until it is back; start it with `nsenter --net=/run/netns/<name>` to keep the datapath across restarts"
        );
    }
    Ok(PinRoot::Mounted { at: root, private })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_root_is_the_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = dir.path().join("overlay/v1");
        assert_eq!(pin_root(&pin), dir.path());
        std::fs::create_dir_all(&pin).expect("mkdir");
        assert_eq!(pin_root(&pin), pin);
        assert_eq!(
            pin_root(Path::new("no-such-dir-here/v1")),
            Path::new("."),
            "a relative pin dir starts at the working directory"
        );
    }

    #[test]
    fn a_non_empty_directory_is_never_mounted_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("keep"), b"x").expect("write");
        let err = ensure_pin_root(&dir.path().join("overlay/v1")).expect_err("must refuse");
        assert!(
            matches!(&err, BpffsError::NotEmpty { path } if path == dir.path()),
            "{err}"
        );
        assert!(
            dir.path().join("keep").exists(),
            "the directory's content is still visible"
        );
    }
}
