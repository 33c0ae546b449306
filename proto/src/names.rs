//! The words `cohort status`, the logs and /metrics use for the wire enums'
//! values: one spelling for the controller and the CLI.

use crate::{JobState, StageState};

/// How a pending job's reason starts when no idle cluster of the current
/// nodes (cordoned ones included) could hold it: `--wait` stops there.
pub const NEVER_FITS: &str = "cannot fit this cluster even when idle";

/// "Pending", "Running", ... ("Unknown" for a value this build does not know).
pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "Unknown",
        JobState::Pending => "Pending",
        JobState::Preparing => "Preparing",
        JobState::Starting => "Starting",
        JobState::Running => "Running",
        JobState::Succeeded => "Succeeded",
        JobState::Failed => "Failed",
        JobState::Cancelled => "Cancelled",
        JobState::Restarting => "Restarting",
        JobState::Preempted => "Preempted",
    }
}

/// "Waiting", "Running", ... for a pipeline stage.
pub fn stage_state_name(state: i32) -> &'static str {
    match StageState::try_from(state).unwrap_or(StageState::Unspecified) {
        StageState::Unspecified => "Unknown",
        StageState::Waiting => "Waiting",
        StageState::Running => "Running",
        StageState::Succeeded => "Succeeded",
        StageState::Failed => "Failed",
        StageState::Cached => "Cached",
        StageState::Skipped => "Skipped",
        StageState::Resolving => "Resolving",
    }
}
