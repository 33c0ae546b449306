//! A job file as text: where a field is written (`locate`), YAML scalars as
//! command-line text (`scalar`), and the problems found in it with their
//! lines (`report`). The spec, megatron and pipeline readers all use these;
//! they use none of them.

pub(crate) mod locate;
mod report;
pub(crate) mod scalar;

pub(crate) use report::{Problems, did_you_mean, suggestion};
pub use report::{SpecErrors, SpecIssue};
