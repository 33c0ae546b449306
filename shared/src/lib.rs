//! Cohort's common crate: the job spec model and its validation, the
//! parallelism math and `megatron sft` rendering, training-log parsers,
//! human durations, and the tracing setup shared by the daemons.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod dataset;
pub mod digest;
pub mod duration;
pub mod failure;
pub mod megatron;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod spec;
pub mod telemetry;
pub mod tls;
