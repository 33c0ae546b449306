//! What Cohort's processes share at run time, as opposed to the pure domain
//! of `cohort-shared`: TLS and tokens, tracing (with OTLP export), systemd
//! notify, daemon config files and the shutdown signal.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// An error with its causes, "transport error: ... invalid peer certificate:
/// UnknownIssuer": the top-level messages of tonic and reqwest are terse, the
/// reason is further down.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        // Layers that repeat their cause's words ("tcp connect error: tcp connect error") say them once.
        let said = e.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

/// A daemon's or tool's exit: the error as one line on stderr (`error: ...:
/// cause`), never a backtrace, whatever `RUST_BACKTRACE` says; exit status 1.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
