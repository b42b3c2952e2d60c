//! `cargo xtask setup`: makes a machine of the project's kind (Debian 12, root, kernel >= 6.6)
//! ready to build and test, idempotently. Every step says whether it was already done.
//! The recipe for bpf-linker is the one verified in ../shared/design/toolchain.md.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::util::{self, note, step};

/// The bpf-linker release that builds against LLVM 22 with the crate versions we pin.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Oldest kernel with TCX links, which aya 0.14 uses for TC programs.
const MIN_KERNEL: (u32, u32) = (6, 6);

/// What shows that a package's content is on the machine, installed by dpkg or otherwise.
#[derive(Clone, Copy)]
enum Provides {
    /// A program on PATH.
    Program(&'static str),
    /// A file that is not a program (headers, data files).
    File(&'static str),
}

impl Provides {
    fn present(self) -> bool {
        match self {
            Self::Program(program) => util::which(program).is_some(),
            Self::File(path) => Path::new(path).exists(),
        }
    }
}

/// The well-known proto files protoc resolves `import "google/protobuf/...";` against.
/// `protobuf-compiler` alone does not ship them (they come with `libprotobuf-dev`, a
/// recommendation that `--no-install-recommends` leaves out), and etcd-client's build script
/// imports them.
const WELL_KNOWN_PROTOS: &str = "/usr/include/google/protobuf/descriptor.proto";

/// Debian packages and, for each, something it installs: a package counts as present when
/// dpkg says so or when that program or file is there (tools installed some other way are
/// fine).
const PACKAGES: &[(&str, Provides, &str)] = &[
    (
        "etcd-server",
        Provides::Program("etcd"),
        "a real etcd for tests and the demo",
    ),
    (
        "etcd-client",
        Provides::Program("etcdctl"),
        "etcdctl for fixtures and `overlay-agent config`",
    ),
    (
        "protobuf-compiler",
        Provides::Program("protoc"),
        "etcd-client's build script",
    ),
    (
        "libprotobuf-dev",
        Provides::File(WELL_KNOWN_PROTOS),
        "the google/protobuf/*.proto files etcd-client's protos import",
    ),
    (
        "iproute2",
        Provides::Program("ip"),
        "namespaces, links, routes",
    ),
    (
        "iputils-ping",
        Provides::Program("ping"),
        "reachability checks",
    ),
    (
        "ethtool",
        Provides::Program("ethtool"),
        "offload settings on veths",
    ),
    (
        "bpftool",
        Provides::Program("bpftool"),
        "inspecting loaded programs and maps",
    ),
    (
        "iperf3",
        Provides::Program("iperf3"),
        "throughput benchmarks",
    ),
    (
        "sockperf",
        Provides::Program("sockperf"),
        "latency benchmarks",
    ),
    (
        "openssl",
        Provides::Program("openssl"),
        "certificates for etcd mTLS tests",
    ),
    (
        "iptables",
        Provides::Program("iptables"),
        "--ip-masq rules (iptables mode)",
    ),
    (
        "nftables",
        Provides::Program("nft"),
        "--ip-masq rules (nftables mode)",
    ),
    (
        "containernetworking-plugins",
        Provides::File("/usr/lib/cni/bridge"),
        "the bridge/host-local/loopback/portmap CNI plugins the `flannel` plugin delegates to",
    ),
    (
        "systemd",
        Provides::Program("systemd-analyze"),
        "`systemd-analyze verify` of deploy/overlay-agent.service",
    ),
];

#[derive(clap::Args, Default)]
pub struct Args {
    /// Only report what is missing; change nothing (exit status 1 when something is missing).
    #[arg(long)]
    pub check: bool,
}

/// Runs every step; stops at the first one that cannot be completed, saying why.
pub fn run(args: &Args) -> anyhow::Result<()> {
    step("checking privileges");
    ensure!(
        util::is_root(),
        "cargo xtask must run as root: it installs packages, mounts bpffs, and the tests create \
         network namespaces and load BPF programs (try `sudo -E cargo xtask ...`)"
    );
    note("running as root: ok");

    check_kernel()?;
    let mut missing = Vec::new();
    packages(args.check, &mut missing)?;
    protoc_imports(args.check, &mut missing)?;
    bpffs(args.check, &mut missing)?;
    rust_src(args.check, &mut missing)?;
    bpf_linker(args.check, &mut missing)?;

    if args.check && !missing.is_empty() {
        bail!(
            "not ready: {}; run `cargo xtask setup` to fix",
            missing.join(", ")
        );
    }
    step("setup complete");
    Ok(())
}

fn check_kernel() -> anyhow::Result<()> {
    step("checking the kernel");
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    ensure!(
        version >= MIN_KERNEL,
        "kernel {release} is too old: the eBPF datapath attaches TC programs with TCX links, \
         which need Linux {}.{} or newer",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    );
    note(&format!(
        "kernel {release}: ok (>= {}.{})",
        MIN_KERNEL.0, MIN_KERNEL.1
    ));

    ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "/sys/kernel/btf/vmlinux is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF, \
         which the eBPF programs need (BTF-based relocations); use a kernel with BTF enabled"
    );
    note("kernel BTF (/sys/kernel/btf/vmlinux): ok");

    // Informational only: the sysctl exists only in the initial network namespace (setup may
    // run inside one, e.g. from the benchmarks), and programs also run without the JIT.
    match fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
        Ok(value) if value.trim() != "0" => note("BPF JIT: enabled"),
        Ok(_) => note("BPF JIT: disabled (programs run interpreted, slower)"),
        Err(_) => note("BPF JIT: not visible from this network namespace (not checked)"),
    }
    ensure!(
        Path::new("/proc/self/ns/net").exists(),
        "/proc/self/ns/net is missing: the kernel lacks network namespaces (CONFIG_NET_NS)"
    );
    note("network namespaces: ok");
    Ok(())
}

fn packages(check_only: bool, missing_out: &mut Vec<String>) -> anyhow::Result<()> {
    step("checking Debian packages");
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(package, provides, why)| {
            let present = provides.present() || dpkg_installed(package);
            if present {
                note(&format!("{package}: already installed"));
            } else {
                note(&format!("{package}: missing (needed for {why})"));
            }
            !present
        })
        .map(|(package, _, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if check_only {
        missing_out.push(format!("Debian packages {}", missing.join(" ")));
        return Ok(());
    }
    ensure!(
        util::which("apt-get").is_some(),
        "apt-get is not available; install these packages by hand: {}",
        missing.join(" ")
    );
    // Waits for another apt/dpkg (shared machines, unattended upgrades) instead of failing.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    step("apt-get update (once, before installing)");
    util::run_checked(
        Command::new("apt-get")
            .args(lock_wait)
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(30),
    )
    .context("`apt-get update` failed: check the machine's Debian mirror and network access")?;
    step(&format!("installing {}", missing.join(" ")));
    util::run_checked(
        Command::new("apt-get")
            .args(lock_wait)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(30),
    )
    .with_context(|| format!("could not install Debian packages {}", missing.join(" ")))?;
    let still_missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(package, provides, _)| missing.contains(package) && !provides.present())
        .map(|(package, _, _)| *package)
        .collect();
    ensure!(
        still_missing.is_empty(),
        "after installing, these packages' programs are still not found: {}",
        still_missing.join(" ")
    );
    note("installed");
    Ok(())
}

/// Proves protoc can build what etcd-client's build script builds: a proto that imports a
/// well-known type. A package list can look complete while this fails (protoc without
/// libprotobuf-dev), so compile one for real.
fn protoc_imports(check_only: bool, missing: &mut Vec<String>) -> anyhow::Result<()> {
    step("checking that protoc resolves google/protobuf imports (as etcd-client's build needs)");
    let Some(protoc) = util::which("protoc") else {
        ensure!(
            check_only,
            "protoc is not on PATH after installing protobuf-compiler"
        );
        note("protoc: not installed");
        return Ok(()); // already listed among the missing packages
    };
    let dir = tempfile::tempdir().context("creating a temporary directory for the protoc check")?;
    let proto = dir.path().join("setup_check.proto");
    fs::write(
        &proto,
        "syntax = \"proto3\";\n\
         package setup_check;\n\
         import \"google/protobuf/descriptor.proto\";\n\
         message Probe { google.protobuf.FileDescriptorProto file = 1; }\n",
    )
    .with_context(|| format!("writing {}", proto.display()))?;
    let output = Command::new(&protoc)
        .arg("--proto_path")
        .arg(dir.path())
        .arg("--descriptor_set_out")
        .arg(dir.path().join("out.pb"))
        .arg(&proto)
        .output()
        .with_context(|| format!("running {}", protoc.display()))?;
    if output.status.success() {
        note("compiled a proto importing google/protobuf/descriptor.proto: ok");
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problem = format!(
        "protoc cannot resolve google/protobuf/descriptor.proto ({WELL_KNOWN_PROTOS} missing? \
         `apt-get install libprotobuf-dev`): {}",
        stderr.trim()
    );
    ensure!(check_only, "{problem}");
    note(&problem);
    missing.push(problem);
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    util::output_of("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.ends_with(" installed"))
}

fn bpffs(check_only: bool, missing: &mut Vec<String>) -> anyhow::Result<()> {
    step("checking bpffs at /sys/fs/bpf");
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        note("already mounted");
        return Ok(());
    }
    if check_only {
        missing.push("bpffs not mounted at /sys/fs/bpf".into());
        return Ok(());
    }
    util::run_checked(
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        Duration::from_secs(30),
    )
    .context(
        "could not mount bpffs at /sys/fs/bpf (pinned maps need it); the kernel needs \
         CONFIG_BPF_SYSCALL and this process CAP_SYS_ADMIN",
    )?;
    note("mounted");
    Ok(())
}

fn rust_src(check_only: bool, missing: &mut Vec<String>) -> anyhow::Result<()> {
    step("checking the nightly toolchain's rust-src (for -Z build-std=core on bpfel-unknown-none)");
    ensure!(
        util::which("rustup").is_some(),
        "rustup is not on PATH: the eBPF build needs rustup's nightly toolchain (install rustup \
         from https://rustup.rs, then `rustup toolchain install nightly`)"
    );
    let installed = util::output_of(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .with_context(|| {
        "the nightly toolchain is not installed; the eBPF programs are built with it: \
         run `rustup toolchain install nightly --profile minimal`"
    })?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        note("rust-src: already installed");
        return Ok(());
    }
    if check_only {
        missing.push("rust-src for nightly".into());
        return Ok(());
    }
    util::run_checked(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        Duration::from_secs(30),
    )
    .context("`rustup component add rust-src --toolchain nightly` failed")?;
    note("rust-src: installed");
    Ok(())
}

/// cargo's own bin directory: `cargo install` puts binaries there and rustup puts it on PATH.
pub fn cargo_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home).join("bin"));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo").join("bin"))
}

/// The version string of a working bpf-linker at `path`, if it runs at all (a binary whose
/// libLLVM went away fails to start).
fn bpf_linker_version(path: &Path) -> Option<String> {
    let output = Command::new(path).arg("--version").output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn bpf_linker(check_only: bool, missing: &mut Vec<String>) -> anyhow::Result<()> {
    step(&format!("checking bpf-linker {BPF_LINKER_VERSION}"));
    let bin_dir = cargo_bin_dir()?;
    let installed = bin_dir.join("bpf-linker");
    let on_path = util::which("bpf-linker");
    // Prefer what a plain `cargo build` would run (PATH), then cargo's bin dir.
    let candidate = on_path.clone().unwrap_or_else(|| installed.clone());
    match bpf_linker_version(&candidate) {
        Some(version) if version.ends_with(BPF_LINKER_VERSION) => {
            note(&format!(
                "{version} at {}: already installed",
                candidate.display()
            ));
            if on_path.is_none() {
                note(&format!(
                    "warning: {} is not on PATH; `cargo xtask` adds it for its own builds, \
                     but a plain `cargo build` needs it: add it to PATH",
                    bin_dir.display()
                ));
            }
            return Ok(());
        }
        Some(version) => note(&format!(
            "found {version} at {}, need {BPF_LINKER_VERSION}: rebuilding",
            candidate.display()
        )),
        None if candidate.exists() => note(&format!(
            "{} does not run (its libLLVM is gone?): rebuilding",
            candidate.display()
        )),
        None => note("not installed"),
    }
    if check_only {
        missing.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        return Ok(());
    }

    let llvm = NightlyLlvm::find()?;
    let prefix = llvm.prepare_prefix()?;
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} (takes a minute or two)",
        llvm.major
    ));
    util::run_checked(
        Command::new(util::cargo())
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", llvm.major))
            .arg("--force")
            .env("LLVM_PREFIX", &prefix)
            // Out of the workspace so its .cargo/config.toml does not apply.
            .current_dir(prefix.parent().unwrap_or(&prefix)),
        Duration::from_secs(30),
    )
    .with_context(|| {
        format!(
            "building bpf-linker failed; it needs crates.io access and a C toolchain (cc), and \
             links against {}",
            llvm.library.display()
        )
    })?;
    let version = bpf_linker_version(&installed)
        .with_context(|| format!("{} was installed but does not run", installed.display()))?;
    note(&format!("installed {version} at {}", installed.display()));
    Ok(())
}

/// LLVM's major version from the shared library's file name:
/// `libLLVM.so.22.1-rust-1.97.0-nightly` (current) or `libLLVM-17-rust-1.75.0-stable.so`.
fn llvm_major(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("libLLVM")?
        .split(|c: char| !c.is_ascii_digit())
        .find(|part| !part.is_empty())?
        .parse()
        .ok()
}

/// The nightly toolchain's shared libLLVM, which bpf-linker links against (there is no LLVM
/// 22 development package on Debian 12).
struct NightlyLlvm {
    library: PathBuf,
    major: u32,
}

impl NightlyLlvm {
    fn find() -> anyhow::Result<Self> {
        let sysroot = util::output_of("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
            .context("could not ask the nightly rustc for its sysroot (`rustup run nightly rustc --print sysroot`)")?;
        let lib_dir = Path::new(&sysroot).join("lib");
        let entries =
            fs::read_dir(&lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // e.g. libLLVM.so.22.1-rust-1.97.0-nightly (older: libLLVM-17-rust-1.75.0-stable.so)
            if !name.starts_with("libLLVM") || !name.contains(".so") {
                continue;
            }
            if entry.file_type()?.is_symlink() {
                continue;
            }
            if let Some(major) = llvm_major(&name) {
                return Ok(Self {
                    library: entry.path(),
                    major,
                });
            }
        }
        bail!(
            "no libLLVM shared library in {}: this nightly does not ship LLVM as a shared \
             library, so bpf-linker cannot be built against it",
            lib_dir.display()
        )
    }

    /// A stable prefix directory `P` with `P/lib/libLLVM.so` and `P/lib/<soname>` pointing at
    /// the nightly's library. bpf-linker keeps an rpath to `P/lib`, so `P` must not move.
    fn prepare_prefix(&self) -> anyhow::Result<PathBuf> {
        let home = std::env::var_os("HOME").context("HOME is not set")?;
        let prefix = PathBuf::from(home)
            .join(".cache/overlay-agent")
            .join(format!("llvm-{}-prefix", self.major));
        let lib = prefix.join("lib");
        fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
        let soname = self
            .library
            .file_name()
            .context("libLLVM path has no file name")?;
        for link_name in [Path::new("libLLVM.so"), Path::new(soname)] {
            let link = lib.join(link_name);
            if fs::read_link(&link).is_ok_and(|target| target == self.library) {
                note(&format!("{}: already in place", link.display()));
                continue;
            }
            if link.symlink_metadata().is_ok() {
                fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
            }
            symlink(&self.library, &link).with_context(|| {
                format!("linking {} -> {}", link.display(), self.library.display())
            })?;
            note(&format!("{} -> {}", link.display(), self.library.display()));
        }
        Ok(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_rust_library_names() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM-17-rust-1.75.0-stable.so"), Some(17));
        assert_eq!(llvm_major("libLLVM.so"), None);
        assert_eq!(llvm_major("librustc_driver.so"), None);
    }
}
