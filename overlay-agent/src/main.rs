//! overlay-agent: flanneld's drop-in replacement. `run` (the default) is the daemon; the
//! other subcommands are operator tools.

use std::process::ExitCode;

use overlay_agent::{
    agent, cli, docker_opts,
    flags::{Cli, Command},
};
use tracing_subscriber::EnvFilter;

fn init_logging(verbosity: u8) {
    // -v follows flanneld's klog levels loosely; RUST_LOG, when set, wins.
    let default = match verbosity {
        0 => "info",
        1 | 2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    init_logging(cli.flags.verbosity);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("overlay-agent: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let flags = cli.flags;
    let result: anyhow::Result<Option<String>> = runtime.block_on(async {
        Ok(match cli.command {
            None | Some(Command::Run) => {
                agent::run(flags).await?;
                None
            }
            Some(Command::Config(cmd)) => Some(cli::config(&flags, &cmd).await?),
            Some(Command::Leases) => Some(cli::leases(&flags).await?),
            Some(Command::Lease(cmd)) => Some(cli::lease(&flags, &cmd).await?),
            Some(Command::Status(args)) => Some(cli::status(&flags, &args).await?),
            Some(Command::MigrateEtcd(args)) => Some(cli::migrate_etcd(&flags, &args).await?),
            Some(Command::DockerOpts(args)) => {
                docker_opts::run(&args, &flags.subnet_file)?;
                None
            }
        })
    });
    match result {
        Ok(Some(out)) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("overlay-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}
