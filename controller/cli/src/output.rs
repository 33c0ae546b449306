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
