//! The Cohort node agent: GPU inventory, supervision of job processes, and the
//! session to the controller.
#![forbid(unsafe_code)]

pub mod cache_keeper;
pub mod cgroup;
pub mod checkpoint_search;
pub mod commands;
pub mod digest;
pub mod gpu;
pub mod inspect;
pub mod job_files;
pub mod join;
pub mod peer;
pub mod preflight;
pub mod prepare;
pub mod private_proc;
pub mod rank_user;
pub mod serve;
pub mod session;
pub mod stage;
pub mod submitter_account;
pub mod supervisor;

pub use serve::{AgentConfig, AgentDeps, serve};
