//! Cohort's common crate: the job spec model and its validation, the
//! parallelism math and `megatron sft` rendering, training-log parsers,
//! human durations, and the tracing setup shared by the daemons.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config_file;
pub mod dataset;
pub mod digest;
pub mod duration;
pub mod failure;
pub mod megatron;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod service;
pub mod spec;
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
