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

/// One `cohort.v1` JSON document (docs/src/cli.md, "JSON output").
pub fn print_json<T: crate::json::Proto>(value: &T) -> anyhow::Result<()> {
    say!("{}", serde_json::to_string_pretty(&crate::json::document(value)?)?);
    Ok(())
}

/// One JSON lines record of a `--follow` stream: one object, one line.
pub fn print_json_line<T: crate::json::Proto>(value: &T) -> anyhow::Result<()> {
    say!("{}", serde_json::to_string(&crate::json::record(value)?)?);
    Ok(())
}

/// A refused call: the controller's message is the error.
/// An error with what to do about it, where the words alone do not say.
pub fn with_hint(error: &str, insecure: bool) -> String {
    // Plaintext HTTP/2 to a TLS port dies in the HTTP/2 handshake, in one of several words.
    let broken_handshake =
        ["transport error", "h2 protocol error", "http2 error", "broken pipe", "connection error", "connection reset"]
            .iter()
            .any(|words| error.contains(words));
    let hint = if insecure && broken_handshake && !error.contains("Connection refused") {
        "the controller did not answer plaintext HTTP/2; if it uses TLS (the default), drop --insecure (and \
         COHORT_INSECURE) and pass --ca-cert with the cluster's ca.crt and a --token"
    } else if !insecure && error.contains("InvalidContentType") {
        "the controller answered without TLS: it was started with --insecure; pass --insecure too (trusted networks only)"
    } else {
        return error.to_owned();
    };
    format!("{error}\n  hint: {hint}")
}

pub fn status_error(status: tonic::Status) -> anyhow::Error {
    // A transport failure's message is only "transport error"; the why is in its causes.
    match std::error::Error::source(&status) {
        Some(cause) => {
            let chain = crate::connection::error_chain(cause);
            if status.message().is_empty() || chain.contains(status.message()) {
                anyhow::anyhow!("{chain}")
            } else {
                anyhow::anyhow!("{}: {chain}", status.message())
            }
        }
        None => anyhow::anyhow!("{}", status.message()),
    }
}

/// "3m 2s ago", or "never" for no time.
pub fn ago(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let secs = ((cohort_proto::now_unix_ms() - unix_ms).max(0) / 1000) as u64;
    format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plaintext_to_a_tls_controller_gets_the_flags_to_use() {
        for error in [
            "h2 protocol error: http2 error",
            "transport error: connection error: stream closed because of a broken pipe",
            "transport error: connection reset by peer",
        ] {
            assert!(super::with_hint(error, true).contains("drop --insecure"), "{error}");
            assert_eq!(super::with_hint(error, false), error);
        }
        let refused = "cannot reach a controller (http://127.0.0.1:1: tcp connect error: Connection refused)";
        assert_eq!(super::with_hint(refused, true), refused);
    }
}
