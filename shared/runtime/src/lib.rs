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
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
