//! `cohort status`: why an attempt failed (cause, decisive lines, hang
//! suspect, stack dumps), progress and the hang timeout, and the per-node
//! straggler report.

use std::time::Duration;

use comfy_table::Table;
use comfy_table::presets::NOTHING;

use cohort_proto::{Job, JobState};

pub fn print_failure_status(job: &Job) {
    if let Some(f) = job.failure.as_ref().filter(|f| !f.cause.is_empty()) {
        let rank = if f.node_name.is_empty() {
            String::new()
        } else {
            format!(" on {} (node rank {})", f.node_name, f.node_rank)
        };
        say!("cause:     {}{rank}", f.cause);
        if !f.detail.is_empty() && f.detail != f.message {
            say!("detail:    {}", f.detail);
        }
        if !f.suspect_node.is_empty() {
            say!("suspect:   {}: {}", f.suspect_node, f.suspect_reason);
        }
        if !f.decisive_lines.is_empty() {
            say!("decisive lines:");
            for line in &f.decisive_lines {
                say!("  | {line}");
            }
        }
    }
    if let Some(dumps) = job.attempts.last().map(|a| &a.stack_dumps).filter(|d| !d.is_empty()) {
        say!("stack dumps (attempt {}):", job.attempts.last().map(|a| a.attempt).unwrap_or(0));
        for d in dumps {
            say!("  {d}");
        }
    }
    if !job.excluded_nodes.is_empty() {
        say!(
            "avoids:    {} (blamed for earlier failures; used only if nothing else fits)",
            job.excluded_nodes.join(", ")
        );
    }
    // Only a running attempt can hang; after it, "last progress" only grows.
    if job.state == JobState::Running as i32 && job.hang_timeout_ms > 0 && job.last_progress_unix_ms > 0 {
        let quiet = (cohort_proto::now_unix_ms() - job.last_progress_unix_ms).max(0) as f64 / 1000.0;
        say!(
            "hang:      last progress {quiet:.0}s ago; hung after {:.0}s without progress",
            job.hang_timeout_ms as f64 / 1000.0
        );
    }
    if job.time_limit_ms > 0 {
        let limit = humantime::format_duration(Duration::from_millis(job.time_limit_ms as u64));
        let placed = [JobState::Starting as i32, JobState::Running as i32].contains(&job.state);
        if placed && job.started_unix_ms > 0 {
            let ran_ms = (cohort_proto::now_unix_ms() - job.started_unix_ms).max(0);
            let left = Duration::from_secs(((job.time_limit_ms - ran_ms).max(0) / 1000) as u64);
            say!("limit:     time_limit {limit}, {} left", humantime::format_duration(left));
        } else {
            say!("limit:     time_limit {limit} per attempt, from its placement");
        }
    }
    if job.node_progress.iter().any(|n| n.events > 0 || n.gpu_utilization_pct >= 0.0) {
        let mut t = Table::new();
        t.load_preset(NOTHING).set_header(vec!["NODE", "LAST OUTPUT", "STEP INTERVAL", "GPU UTIL", "STRAGGLER"]);
        for n in &job.node_progress {
            let ago = if n.last_output_unix_ms > 0 {
                format!("{:.1}s ago", (cohort_proto::now_unix_ms() - n.last_output_unix_ms).max(0) as f64 / 1000.0)
            } else {
                "-".into()
            };
            t.add_row(vec![
                n.node_name.clone(),
                ago,
                if n.step_interval_s > 0.0 { format!("{:.2}s", n.step_interval_s) } else { "-".into() },
                if n.gpu_utilization_pct >= 0.0 { format!("{:.0}%", n.gpu_utilization_pct) } else { "-".into() },
                if n.straggler { "yes".into() } else { String::new() },
            ]);
        }
        say!("nodes:");
        say!("{t}");
    }
}
