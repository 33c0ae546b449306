//! `cohort`, the command line client of a Cohort controller: gRPC (and TLS
//! with a bearer token) to the JobService and SecurityService, tables, JSON
//! and plots. It links none of the controller: no store, no HTTP server.
#![forbid(unsafe_code)]

#[macro_use]
pub mod output;

pub mod checkpoints;
pub mod commands;
pub mod compose;
pub mod connection;
pub mod dev;
pub mod failures;
pub mod json;
pub mod metrics;
pub mod node_caches;
pub mod nodes;
pub mod pipeline;
pub mod plan;
pub mod plot;
pub mod queues;
pub mod sync;
pub mod token;

pub use commands::{Cli, run};
pub use output::{Format, Output};
