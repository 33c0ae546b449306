//! Cohort's domain: the job spec model and its validation, the parallelism
//! math and `megatron sft` rendering, pipelines, training-log parsers,
//! dataset checks and human durations. No network, TLS or tracing setup:
//! those are `cohort-runtime`'s.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod checkpoint_interval;
pub mod dataset;
pub mod duration;
pub mod failure;
pub mod job_file;
pub mod megatron;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod spec;
pub mod swarm;
