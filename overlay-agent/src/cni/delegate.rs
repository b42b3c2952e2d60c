//! Running the delegate plugin (bridge by default) the way libcni's `invoke` does: found in
//! CNI_PATH, the runtime's CNI_* environment passed on, the netconf on stdin, its stdout
//! returned as it is. And the scratch netconf kept under `dataDir` between ADD and DEL.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Deserialize;

/// Why a delegate could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error(
        "delegate plugin {plugin:?} not found in CNI_PATH ({cni_path}): install it there or set delegate.type to an installed plugin (default: bridge)"
    )]
    NotFound { plugin: String, cni_path: String },
    #[error("delegate type {0:?} is not a plugin name (no '/' allowed)")]
    BadName(String),
    #[error("cannot run delegate plugin {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The delegate's own CNI error, kept with its code.
    #[error("delegate plugin {plugin} failed: {msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
    Failed {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error("delegate plugin {plugin} exited with {status} and printed no CNI error: {output:?}")]
    Crashed {
        plugin: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// A delegate's CNI error output (`{"code": .., "msg": .., "details": ..}`).
#[derive(Deserialize)]
struct PluginErrorOutput {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// The executable for plugin `name`: the first CNI_PATH directory that has it.
pub fn find_plugin(name: &str, cni_path: &str) -> Result<PathBuf, DelegateError> {
    if name.is_empty() || name.contains('/') {
        return Err(DelegateError::BadName(name.to_owned()));
    }
    std::env::split_paths(cni_path)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| DelegateError::NotFound {
            plugin: name.to_owned(),
            cni_path: cni_path.to_owned(),
        })
}

/// Runs `plugin` with `command` (ADD, DEL, CHECK) and `netconf` on stdin; the rest of the
/// environment (CNI_CONTAINERID, CNI_NETNS, ...) is the runtime's. Its stderr is ours (the
/// runtime logs it); its stdout is the result.
pub fn run(plugin: &Path, command: &str, netconf: &[u8]) -> Result<Vec<u8>, DelegateError> {
    let name = plugin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| DelegateError::Spawn {
            path: plugin.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading stdin closes the pipe: its status says why.
        let _ = stdin.write_all(netconf);
    }
    let output = child
        .wait_with_output()
        .map_err(|source| DelegateError::Spawn {
            path: plugin.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    match serde_json::from_slice::<PluginErrorOutput>(&output.stdout) {
        Ok(error) => Err(DelegateError::Failed {
            plugin: name,
            code: error.code,
            msg: error.msg,
            details: error.details,
        }),
        Err(_) => Err(DelegateError::Crashed {
            plugin: name,
            status: output.status,
            output: String::from_utf8_lossy(&output.stdout).into_owned(),
        }),
    }
}

/// Saving and reading the delegate netconf of one container under `dataDir` (flannel's
/// layout: one file named by the container ID holding the netconf JSON).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}; check that the plugin's dataDir is writable")]
pub struct ScratchError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes `netconf` as `<data_dir>/<container_id>` atomically (flannel truncates in place,
/// which a crash can leave empty), directory 0700 and file 0600 as flannel does.
pub fn save(data_dir: &Path, container_id: &str, netconf: &[u8]) -> Result<(), ScratchError> {
    let path = data_dir.join(container_id);
    let err = |what| {
        let path = path.clone();
        move |source| ScratchError { what, path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(err("cannot create the directory for"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(data_dir)
        .map_err(err("cannot write"))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err("cannot write"))?;
    tmp.write_all(netconf).map_err(err("cannot write"))?;
    tmp.as_file().sync_all().map_err(err("cannot write"))?;
    tmp.persist(&path)
        .map_err(|e| err("cannot write")(e.error))?;
    Ok(())
}

/// The saved netconf, `None` when there is none (DEL of an unknown container succeeds).
pub fn load(data_dir: &Path, container_id: &str) -> Result<Option<Vec<u8>>, ScratchError> {
    let path = data_dir.join(container_id);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ScratchError {
            what: "cannot read",
            path,
            source,
        }),
    }
}

/// Removes the saved netconf (gone already is fine).
pub fn remove(data_dir: &Path, container_id: &str) -> Result<(), ScratchError> {
    let path = data_dir.join(container_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ScratchError {
            what: "cannot remove",
            path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_files_round_trip_with_flannels_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("flannel");
        assert!(load(&data_dir, "abc").expect("load").is_none());
        save(&data_dir, "abc", b"{\"type\":\"bridge\"}").expect("save");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&data_dir), 0o700);
        assert_eq!(mode(&data_dir.join("abc")), 0o600);
        assert_eq!(
            load(&data_dir, "abc").expect("load").as_deref(),
            Some(&b"{\"type\":\"bridge\"}"[..])
        );
        remove(&data_dir, "abc").expect("remove");
        remove(&data_dir, "abc").expect("removing twice is fine");
        let left: Vec<_> = std::fs::read_dir(&data_dir).expect("ls").collect();
        assert!(left.is_empty(), "no temp files left: {left:?}");
    }

    #[test]
    fn plugins_are_found_in_cni_path_order_and_bad_names_refused() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        std::fs::write(second.path().join("bridge"), b"").expect("write");
        let cni_path = format!("{}:{}", first.path().display(), second.path().display());
        assert_eq!(
            find_plugin("bridge", &cni_path).expect("found"),
            second.path().join("bridge")
        );
        std::fs::write(first.path().join("bridge"), b"").expect("write");
        assert_eq!(
            find_plugin("bridge", &cni_path).expect("found"),
            first.path().join("bridge")
        );
        let missing = find_plugin("nope", &cni_path).expect_err("missing");
        assert!(
            missing.to_string().contains("not found in CNI_PATH"),
            "{missing}"
        );
        assert!(matches!(
            find_plugin("../bridge", &cni_path),
            Err(DelegateError::BadName(_))
        ));
    }
}
