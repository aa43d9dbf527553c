//! `rds-csi-plugin`: parse flags, set up logging, run.

use clap::Parser;
use rds_csi::config::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = rds_csi::telemetry::init(cli.log_format, &cli.log_level) {
        eprintln!("rds-csi-plugin: {e}");
        return std::process::ExitCode::from(2);
    }
    match rds_csi::server::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("rds-csi-plugin: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
