//! `rds-csi-plugin`: parse flags, set up logging, run.

#[cfg(not(loom))]
use clap::Parser;
#[cfg(not(loom))]
use rds_csi::cli::Cli;

/// Under `--cfg loom` only the lock-table core is built (see `lib.rs`).
#[cfg(loom)]
fn main() {}

#[cfg(not(loom))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = rds_csi::telemetry::init(cli.log_format, &cli.log_level) {
        eprintln!("rds-csi-plugin: {e}");
        return std::process::ExitCode::from(2);
    }
    let settings = match cli.settings() {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("rds-csi-plugin: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rds_csi::compose::run(settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("rds-csi-plugin: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
