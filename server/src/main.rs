//! The `plait` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use plait_server::cli::{Cli, Command};
use plait_server::config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keygen(args) => keygen(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn serve(args: plait_server::cli::ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        database_url: args.database_url,
        log_format: args.log_format.map(Into::into),
    };
    let cfg = Config::load(args.config.as_deref(), &overrides).map_err(anyhow::Error::msg)?;
    init_logging(cfg.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(plait_server::serve::run(cfg))
}

fn keygen(args: plait_server::cli::KeygenArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .unwrap_or_else(plait_server::config::default_data_dir);
    let (keys, created) = plait_server::serve::open_identity(&dir)?;
    if created {
        eprintln!(
            "created {}",
            dir.join(plait_server::serve::IDENTITY_FILE).display()
        );
    }
    println!("{}", keys.identity());
    Ok(())
}
