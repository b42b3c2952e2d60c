//! overlay-agent: flanneld's drop-in replacement. `run` (the default) is the daemon; the
//! other subcommands are operator tools.

use std::{io::IsTerminal, process::ExitCode};

use overlay_agent::{
    agent,
    cli::{
        commands, docker_opts,
        flags::{Cli, Command},
        report::error_chain,
    },
};
use tracing_subscriber::EnvFilter;

fn init_logging(verbosity: u8) {
    // -v follows flanneld's klog levels loosely and, like them, is about this agent's own
    // messages: dependencies (tonic, hyper, h2, tower) stay at info. RUST_LOG, when set, wins.
    let own = match verbosity {
        0 => "info",
        1 | 2 => "debug",
        _ => "trace",
    };
    let default = format!("info,overlay_agent={own}");
    let mut bad_rust_log = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|err| {
            bad_rust_log = Some(format!(
                "ignoring RUST_LOG={spec:?} ({err}); using -v={verbosity}"
            ));
            EnvFilter::new(&default)
        }),
        _ => EnvFilter::new(&default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal: journald and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if let Some(message) = bad_rust_log {
        tracing::warn!("{message}");
    }
}

/// Whether the binary runs as the CNI plugin: installed (copied or linked) as
/// `/opt/cni/bin/flannel`, it must never parse flanneld's flags.
fn invoked_as_cni_plugin() -> bool {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .is_some_and(|name| name == overlay_agent::cni::PLUGIN_NAME)
}

/// Two malloc arenas instead of glibc's default of eight per CPU, unless MALLOC_ARENA_MAX
/// says otherwise. Each thread that allocates gets an arena of its own, and what the first
/// sync frees in one arena is not reused by another: at 20,000 peers the agent's peak RSS
/// was 61-66 MiB with the default, 51 MiB with two arenas, 47 MiB with one (`cargo xtask
/// bench --control-plane`, ebpf). Two keep the tokio workers from contending on one lock.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    if invoked_as_cni_plugin() {
        return overlay_agent::cni::main();
    }
    let cli = Cli::parse_args();
    init_logging(cli.flags.verbosity);
    match cli.flags.compat.check() {
        Ok(notes) => notes.iter().for_each(|note| tracing::info!("{note}")),
        Err(refused) => {
            for message in &refused.refused {
                tracing::error!("{message}");
            }
            // flanneld exits 2 on a flag it cannot take, as clap does.
            return ExitCode::from(2);
        }
    }
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
    let daemon = matches!(cli.command, None | Some(Command::Run));
    let result: anyhow::Result<Option<String>> = runtime.block_on(async {
        Ok(match cli.command {
            None | Some(Command::Run) => {
                agent::run(flags).await?;
                None
            }
            Some(Command::Config(cmd)) => Some(commands::config(&flags, &cmd).await?),
            Some(Command::Leases) => Some(commands::leases(&flags).await?),
            Some(Command::Lease(cmd)) => Some(commands::lease(&flags, &cmd).await?),
            Some(Command::Status(args)) => Some(commands::status(&flags, &args).await?),
            Some(Command::MigrateEtcd(args)) => Some(commands::migrate_etcd(&flags, &args).await?),
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
            // Once: the daemon's log goes to stderr too, so a second copy would repeat it.
            let message = error_chain(err.as_ref());
            if daemon {
                tracing::error!("{message}");
            } else {
                eprintln!("overlay-agent: {message}");
            }
            ExitCode::FAILURE
        }
    }
}
