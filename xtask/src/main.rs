//! `cargo xtask <command>`: the project's one entry point for setting up a machine, running
//! every test and showing the agent at work. Must build on a bare machine (no protoc, no
//! bpf-linker), so it depends only on light crates and the fixtures library.

mod bench;
mod demo;
mod host_state;
mod run_tests;
mod setup;
mod soak;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set-up, tests and demo for overlay-agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and check everything the build and the tests need (idempotent; needs root).
    Setup(setup::Args),
    /// Set up, build the workspace, run every test and print a summary.
    Test(run_tests::Args),
    /// Set up, then run three real agents in network namespaces and show what they do.
    Demo(demo::Args),
    /// Set up, then benchmark the datapath modes side by side (or, with --control-plane, the
    /// control plane at 1,000 and 10,000 peers) and write a report.
    Bench(Box<bench::BenchArgs>),
    /// Run agents for a while under lease churn and traffic; fail on fd/RSS/datapath leaks.
    Soak(soak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => run_tests::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Bench(args) if args.is_internal_tool() => bench::run(*args),
        Command::Bench(args) => {
            setup::run(&setup::Args::default()).and_then(|()| bench::run(*args))
        }
    };
    // The error chain only: a backtrace of xtask itself (RUST_BACKTRACE is set for the tests)
    // would bury the message.
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
