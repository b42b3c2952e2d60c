//! deploy/overlay-agent.service must be accepted by `systemd-analyze verify` without a single
//! warning, and its ExecStartPost must be a valid `overlay-agent docker-opts` command line.
//! `systemd-analyze verify` works without systemd as PID 1 (the test machines have none);
//! `cargo xtask setup` installs the Debian `systemd` package that provides it.

use std::{path::Path, process::Command};

use clap::Parser;
use overlay_agent::cli::docker_opts;

const UNIT: &str = include_str!("../../deploy/overlay-agent.service");
const ENV_EXAMPLE: &str = include_str!("../../deploy/overlay-agent.env.example");
const INSTALLED_BIN: &str = "/usr/local/bin/overlay-agent";

/// Runs `systemd-analyze verify` on `unit_text` saved as overlay-agent.service; returns
/// (success, everything it printed).
fn verify(unit_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("overlay-agent.service");
    std::fs::write(&path, unit_text).expect("write unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run systemd-analyze ({error}); run `cargo xtask setup` to install Debian's systemd package")
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// The unit as installed, except that its program path points at the binary cargo built:
/// verify checks that ExecStart programs exist and are executable.
fn unit_with_built_binary() -> String {
    let built = env!("CARGO_BIN_EXE_overlay-agent");
    assert!(Path::new(built).is_file(), "{built} was not built");
    UNIT.replace(INSTALLED_BIN, built)
}

#[test]
fn systemd_analyze_accepts_the_unit_without_warnings() {
    let (success, printed) = verify(&unit_with_built_binary());
    assert!(
        success && printed.trim().is_empty(),
        "systemd-analyze verify rejected or warned about deploy/overlay-agent.service:\n{printed}"
    );
}

#[test]
fn the_verifier_does_catch_mistakes() {
    // Guards the test above: a misspelt value must produce output, or an empty output
    // would prove nothing.
    let broken = unit_with_built_binary().replace("Type=notify", "Type=notifyy");
    let (_, printed) = verify(&broken);
    assert!(
        printed.contains("notifyy"),
        "systemd-analyze verify did not complain about Type=notifyy:\n{printed}"
    );
}

fn directive<'a>(name: &str) -> Vec<&'a str> {
    UNIT.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('='))
        .collect()
}

#[test]
fn unit_has_the_ordering_and_service_life_flanneld_units_rely_on() {
    assert_eq!(directive("Type"), ["notify"]);
    assert_eq!(directive("After"), ["network-online.target etcd.service"]);
    assert_eq!(directive("Wants"), ["network-online.target"]);
    assert_eq!(directive("Before"), ["docker.service"]);
    assert_eq!(directive("Restart"), ["on-failure"]);
    // Requires/RequiredBy would restart Docker (and its containers) with the agent.
    assert_eq!(directive("WantedBy"), ["multi-user.target docker.service"]);
    assert!(directive("RequiredBy").is_empty() && directive("Requires").is_empty());
    assert_eq!(
        directive("EnvironmentFile"),
        ["-/etc/sysconfig/overlay-agent"]
    );
    assert_eq!(
        directive("ExecStart"),
        [format!("{INSTALLED_BIN} $FLANNEL_OPTIONS").as_str()]
    );
}

#[derive(Parser)]
struct DockerOptsCli {
    #[command(flatten)]
    args: docker_opts::Args,
}

#[test]
fn exec_start_post_is_a_valid_docker_opts_command() {
    let [post] = directive("ExecStartPost")[..] else {
        panic!("expected one ExecStartPost in the unit");
    };
    let words: Vec<&str> = post.split_whitespace().collect();
    assert_eq!(words[..2], [INSTALLED_BIN, "docker-opts"]);
    let cli = DockerOptsCli::try_parse_from(&words[1..])
        .unwrap_or_else(|error| panic!("ExecStartPost flags do not parse: {error}"));
    assert_eq!(cli.args.key, "DOCKER_NETWORK_OPTIONS");
    assert_eq!(cli.args.output, Path::new("/run/flannel/docker"));
    assert_eq!(
        cli.args.input, None,
        "the unit should rely on --subnet-file / FLANNELD_SUBNET_FILE"
    );
}

#[test]
fn env_example_holds_only_assignments_systemd_can_read() {
    for line in ENV_EXAMPLE.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        assert!(
            name == "FLANNEL_OPTIONS" || name.starts_with("FLANNELD_"),
            "unexpected variable {name}"
        );
        assert!(!value.is_empty(), "{name} has no value");
    }
}
