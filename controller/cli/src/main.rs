//! `cohort`: the command line client of a Cohort controller.

use std::process::ExitCode;

use clap::Parser;
use cohort_cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    cohort_runtime::telemetry::init("warn");
    let cli = Cli::parse();
    let insecure = cli.connection.insecure;
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cohort_cli::output::with_hint(&format!("{e:#}"), insecure));
            ExitCode::from(1)
        }
    }
}
