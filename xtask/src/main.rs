use clap::{Parser, Subcommand};

mod bench;

#[derive(Parser)]
#[command(about = "Build helpers: setup, test, demo, bench.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks of the agent's datapath modes (and with --control-plane, its control plane).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
    }
}
