//! Small helpers shared by the subcommands: workspace paths, running commands with progress.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where the workspace and its build output live (from `cargo metadata`, so a custom
/// `CARGO_TARGET_DIR` is honoured).
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> anyhow::Result<Self> {
        let output = Command::new(cargo())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .context("running `cargo metadata`")?;
        if !output.status.success() {
            bail!(
                "`cargo metadata` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("parsing `cargo metadata` output")?;
        let field = |name: &str| -> anyhow::Result<PathBuf> {
            meta[name]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("`cargo metadata` has no {name}"))
        };
        Ok(Self {
            root: field("workspace_root")?,
            target_dir: field("target_directory")?,
        })
    }

    /// The agent binary that `cargo build` produces (debug profile).
    pub fn agent_bin(&self) -> PathBuf {
        self.target_dir.join("debug").join("overlay-agent")
    }
}

/// The cargo that runs us (`CARGO` is set by `cargo run`), so child builds use the same
/// toolchain; plain `cargo` otherwise.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// Prints a step header in the same style everywhere.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Prints the outcome of a step that had nothing to do or that finished.
pub fn note(what: &str) {
    eprintln!("    {what}");
}

/// Formats a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with inherited stdout/stderr, printing the command first and a line every
/// `heartbeat` while it runs (so silent long steps show they are alive). Returns the exit
/// status and the elapsed time; the caller decides whether failure is fatal.
pub fn run_with_progress(
    cmd: &mut Command,
    heartbeat: Duration,
) -> anyhow::Result<(ExitStatus, Duration)> {
    note(&format!("$ {}", describe(cmd)));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    let mut next_beat = heartbeat;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok((status, started.elapsed()));
        }
        if started.elapsed() >= next_beat {
            note(&format!(
                "... still running after {}s: {}",
                started.elapsed().as_secs(),
                cmd.get_program().to_string_lossy()
            ));
            next_beat += heartbeat;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `cmd` and fails with the command line when it does not succeed.
pub fn run_checked(cmd: &mut Command, heartbeat: Duration) -> anyhow::Result<Duration> {
    let (status, elapsed) = run_with_progress(cmd, heartbeat)?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(elapsed)
}

/// Runs a command and returns its trimmed stdout when it succeeds, `None` otherwise
/// (including when the program is not installed).
pub fn output_of<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Finds `program` on PATH, also looking in the sbin directories that a non-login root
/// shell may lack.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn fmt_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", elapsed.as_secs() / 60, elapsed.as_secs() % 60)
    }
}
