//! The pure planner: spec + inventory → [`Placement`] → one [`LaunchPlan`].
//!
//! [`place`] chooses the nodes and GPUs of a job attempt, all or nothing;
//! [`next_master_port`] its MASTER_PORT; [`layout`] records that choice (what the
//! job record keeps); [`launch_plan`] renders from it each node's prepare and
//! launch commands as the agents receive them: environment, argv, staged
//! inputs, the checkpoint to resume. [`reserve`] and [`backfill`] decide,
//! behind a job that does not fit, which later jobs may start now;
//! [`choose_victims`] which running gangs to preempt for one. No I/O, no clock, no store: time, ports,
//! ids and randomness are passed in.

mod backfill;
mod launch_plan;
mod placement;
mod ports;
mod preempt;
pub mod swift_argcheck;

pub use backfill::{BackfillRefusal, Reservation, RunningGang, backfill, node_range, reserve};
pub use launch_plan::{
    AttemptInputs, LaunchPlan, NodeLaunch, RenderInput, attempt_spec, checkpoint_dir, command_line, job_env,
    launch_plan, layout, node_processes, nproc_per_node, output_dir, render, to_shared_checkpoint,
};
pub use placement::{NodeView, Placement, PlacementError, place, place_setting_aside};
pub use ports::next_master_port;
pub use preempt::{Candidate, Grounds, choose_victims};

/// GPU indices as CUDA_VISIBLE_DEVICES writes them: "0,1,3".
fn join(gpus: &[u32]) -> String {
    gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
