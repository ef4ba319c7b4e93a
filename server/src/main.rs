//! The `plait` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use plait_server::cli::{Cli, Command, ImportCommand};
use plait_server::config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keygen(args) => keygen(args),
        Command::Import(ImportCommand::Statebus {
            source,
            data_dir,
            database_url,
            config,
        }) => import_statebus(&source, data_dir, database_url, config),
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
        web_dir: args.web_dir,
        proxy: args.proxy,
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

fn import_statebus(
    source: &str,
    data_dir: Option<std::path::PathBuf>,
    database_url: Option<String>,
    config: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use plait_server::statebus::import;
    let overrides = Overrides {
        data_dir,
        database_url,
        ..Default::default()
    };
    let cfg = Config::load(config.as_deref(), &overrides).map_err(anyhow::Error::msg)?;
    init_logging(LogFormat::Text);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let source = import::Source::detect(source)?;
            let entries = source.entries().await?;
            let instance = plait_server::serve::open_instance(&cfg).await?;
            let mut engine_cfg = cfg.engine_config();
            engine_cfg.limits.writes_per_second = 0;
            let engine = plait_server::engine::Engine::new(instance.storage.clone(), engine_cfg);
            let accounts = plait_server::accounts::Accounts::new(engine.clone(), instance.keys.clone());
            let report = import::import(&engine, &accounts, instance.keys.identity(), entries).await?;
            for (key, why) in &report.skipped {
                eprintln!("skipped {key}: {why}");
            }
            println!("imported from {source:?}: {report}");
            Ok(())
        })
}
