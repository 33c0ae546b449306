//! `cohort`: the command line client of a Cohort controller.

use std::process::ExitCode;

use clap::Parser;
use cohort_cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    cohort_runtime::telemetry::init("warn");
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
