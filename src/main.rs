//! The walshuttle binary: parse the command line, dispatch, and turn any error into
//! one clear line and a non-zero exit.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use walshuttle::cli::{Cli, Command, ConfigAction};
use walshuttle::config::{endpoint, Side};
use walshuttle::exit;
use walshuttle::settings::{FileConfig, Resolved};

#[cfg(feature = "profiling")]
mod profiling;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // verify reserves 1 for "different"; its errors exit 2. Other commands exit 75
    // when a server is down or unreachable (try again later), 1 when a person must
    // act (see `walshuttle::exit`).
    let is_verify = matches!(cli.command, Command::Verify(_));
    let error_code = |e: &anyhow::Error| {
        if is_verify {
            exit::USAGE
        } else {
            exit::code_for(e)
        }
    };
    // The config file fills what neither a flag nor the environment set.
    let file = match cli.connections.config.as_deref().map(FileConfig::load) {
        None => None,
        Some(Ok(resolved)) => {
            resolved.apply(&mut cli, &matches);
            Some(resolved)
        }
        Some(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::from(error_code(&e));
        }
    };
    init_logging(&cli.connections.log_format);
    let json_logs = cli.connections.log_format == "json";
    #[cfg(feature = "profiling")]
    let profile = profiling::start();
    // `run` runs on one thread: its streaming is one task that receives, decodes and
    // applies, and every message the connections' tasks hand it woke another thread
    // (futex, context switch) under a runtime with a worker per core, and still with
    // one worker (the `block_on` future runs on the main thread, beside it).
    // Measured under TPC-B on 2 cores: walshuttle's CPU per source transaction fell
    // from 127-140 µs (a worker per core) to 90-106 µs (one worker) and 64 µs (one
    // thread); see docs/design.md, "One thread for run". Other commands keep a
    // worker per core; TOKIO_WORKER_THREADS gives any command that many workers.
    let one_thread = matches!(cli.command, Command::Run(_))
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none();
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli, file, matches));
    #[cfg(feature = "profiling")]
    if let Some(profile) = profile {
        profile.finish();
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = error_code(&e);
            if json_logs {
                // A log collector reading JSON lines gets the error as one too.
                tracing::error!(exit_code = code, "error: {}", one_line(&e));
            } else {
                eprintln!("error: {}", one_line(&e));
            }
            ExitCode::from(code)
        }
    }
}

async fn dispatch(
    cli: Cli,
    file: Option<Resolved>,
    matches: clap::ArgMatches,
) -> anyhow::Result<ExitCode> {
    let conns = &cli.connections;
    match &cli.command {
        Command::Status(args) => {
            let opts = args.options()?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let source = match conns.source.as_deref() {
                Some(url) => Some(endpoint(Side::Source, Some(url))?),
                None => None,
            };
            let report = walshuttle::status::status(source.as_ref(), &target, &opts).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let jobs = args.jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            });
            let opts = walshuttle::demo::DemoOptions {
                seconds: (args.seconds > 0).then_some(args.seconds),
                scale: args.scale.max(1),
                jobs: jobs.max(1),
            };
            let equal = walshuttle::demo::demo(&opts, shutdown_signal()).await?;
            Ok(if equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Teardown(args) => {
            let opts = args.options();
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let summary = walshuttle::teardown::teardown(&source, &target, &opts, args.yes).await?;
            for line in &summary.lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Switchover(args) => {
            let opts = args.options();
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let report =
                walshuttle::switchover::switchover(&source, &target, &opts, shutdown_signal())
                    .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.render());
            }
            Ok(if report.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Tables(args) => {
            let opts = args.options()?;
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            for line in walshuttle::tables::change(&source, &target, &opts).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(args) => match args.action {
            ConfigAction::Check => {
                let Some(file) = file else {
                    anyhow::bail!(
                        "config check needs a file: pass --config walshuttle.toml (or set WALSHUTTLE_CONFIG)"
                    );
                };
                let report = file.report(&cli, &matches)?;
                if let Some(path) = &conns.config {
                    println!("config file {}: valid", path.display());
                }
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Bootstrap(args) => {
            let opts = args.options()?;
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let summary = walshuttle::bootstrap::bootstrap(&source, &target, &opts).await?;
            println!("{}", summary.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let opts = args.options()?;
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let shutdown = shutdown_signal();
            walshuttle::run::run(&source, &target, &opts, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CatchUp(args) => {
            if args.bootstrap.online {
                anyhow::bail!(
                    "--online applies to `bootstrap` and `run`, not to `catch-up`: run catch-up without it"
                );
            }
            let b = args.bootstrap.options()?;
            let opts = args.watermarks.catch_up_options(&b, args.poll.is_some())?;
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let Some(interval) = args.poll else {
                let summary = walshuttle::catchup::catch_up(&source, &target, &opts).await?;
                println!("{}", summary.render());
                return Ok(ExitCode::SUCCESS);
            };
            let mut shutdown = shutdown_signal();
            loop {
                let summary = walshuttle::catchup::catch_up(&source, &target, &opts).await?;
                println!("{}", summary.render());
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => return Ok(ExitCode::SUCCESS),
                }
                if *shutdown.borrow() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        Command::Verify(args) => {
            let opts = args.options()?;
            let source = endpoint(Side::Source, conns.source.as_deref())?;
            let target = endpoint(Side::Target, conns.target.as_deref())?;
            let report = walshuttle::verify::verify(&source, &target, &opts).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.render());
            }
            Ok(if report.equal() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// A flag that turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers: stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested: finishing the transaction in flight");
        let _ = tx.send(true);
    });
    rx
}

/// Joins an error chain into one line, outermost context first.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALSHUTTLE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    // Colours only for a person at a terminal: a file, a pipe or journald gets plain
    // text (and NO_COLOR turns them off anywhere).
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
