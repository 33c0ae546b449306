//! How every verb prints: `-o table|json`, borderless tables, and stdout
//! writes that end quietly when the reader has gone (`cohort jobs | head`).

use clap::ValueEnum;
use comfy_table::{Table, presets::NOTHING};

/// `println!` that ends the process quietly when stdout is closed (`cohort jobs | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `-o table|json` for the verbs that print records.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Format {
    /// Output format.
    #[arg(long = "output", short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// A borderless table with this header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.iter().map(|h| h.to_string()));
    t
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    say!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A refused call: the controller's message is the error.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// "3m 2s ago", or "never" for no time.
pub fn ago(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let secs = ((cohort_proto::now_unix_ms() - unix_ms).max(0) / 1000) as u64;
    format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(secs)))
}
