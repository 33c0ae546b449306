//! Why an attempt failed: a cause read from a rank's exit (code, signal,
//! torchrun's root cause) and the last lines of its output, with the lines
//! that decided it. The cause drives the restart decision: out-of-memory and
//! user errors are not retried by default, infrastructure failures are.

use std::fmt;

/// What broke an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    /// `torch.OutOfMemoryError: CUDA out of memory` and its relatives.
    CudaOom,
    /// The kernel's OOM killer ended a rank (`Out of memory: Killed process`).
    KernelOom,
    /// An NCCL error or collective timeout (the message is the detail).
    Nccl,
    /// A module that does not import or lacks an attribute
    /// (`module 'transformer_engine' has no attribute 'pytorch'`): the node's environment.
    ImportError,
    /// `No space left on device` (errno 28).
    DiskFull,
    /// Bad arguments or a bad file: argparse errors, a missing program or workdir.
    UserError,
    /// Any other non-zero exit or fatal signal of a rank.
    RankFailed,
    /// A node's agent stopped answering.
    NodeLost,
    /// No progress for the hang timeout.
    Hang,
    /// The attempt ran past the job's `time_limit` and was stopped.
    TimeLimit,
    /// Preflight, shared-path, dataset or staging checks refused the launch.
    PreflightFailed,
}

/// Every cause, in the order the docs list them.
pub const ALL_CAUSES: &[FailureCause] = &[
    FailureCause::CudaOom,
    FailureCause::KernelOom,
    FailureCause::Nccl,
    FailureCause::ImportError,
    FailureCause::DiskFull,
    FailureCause::UserError,
    FailureCause::RankFailed,
    FailureCause::NodeLost,
    FailureCause::Hang,
    FailureCause::TimeLimit,
    FailureCause::PreflightFailed,
];

impl FailureCause {
    /// The name used in job files (`restart.on`), `cohort status` and metrics.
    pub fn name(self) -> &'static str {
        match self {
            FailureCause::CudaOom => "cuda_oom",
            FailureCause::KernelOom => "kernel_oom",
            FailureCause::Nccl => "nccl",
            FailureCause::ImportError => "import_error",
            FailureCause::DiskFull => "disk_full",
            FailureCause::UserError => "user_error",
            FailureCause::RankFailed => "rank_failed",
            FailureCause::NodeLost => "node_lost",
            FailureCause::Hang => "hang",
            FailureCause::TimeLimit => "time_limit",
            FailureCause::PreflightFailed => "preflight_failed",
        }
    }

    pub fn from_name(name: &str) -> Option<FailureCause> {
        ALL_CAUSES.iter().copied().find(|c| c.name() == name)
    }

    /// The restart event a cause belongs to: a rank failure of any kind is
    /// `rank_failed`; the others are their own event.
    pub fn event(self) -> FailureCause {
        match self {
            FailureCause::CudaOom
            | FailureCause::KernelOom
            | FailureCause::Nccl
            | FailureCause::ImportError
            | FailureCause::DiskFull
            | FailureCause::UserError
            | FailureCause::RankFailed => FailureCause::RankFailed,
            other => other,
        }
    }

    /// Whether a restart on its event retries it without the cause being named:
    /// a second attempt of the same memory footprint, arguments, environment
    /// or full disk fails the same way.
    pub fn retried_by_default(self) -> bool {
        !matches!(
            self,
            FailureCause::CudaOom
                | FailureCause::KernelOom
                | FailureCause::ImportError
                | FailureCause::UserError
                | FailureCause::DiskFull
        )
    }

    /// Whether the node is to blame (for `exclude_failed_nodes`).
    pub fn blames_node(self) -> bool {
        matches!(
            self,
            FailureCause::NodeLost
                | FailureCause::Hang
                | FailureCause::Nccl
                | FailureCause::RankFailed
                | FailureCause::KernelOom
                | FailureCause::PreflightFailed
                | FailureCause::ImportError
        )
    }
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is known about one rank's end.
#[derive(Debug, Clone, Default)]
pub struct ExitEvidence<'a> {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// torchrun's root-cause summary, when its output had one.
    pub root_cause: &'a str,
    /// The last lines of the rank's output (stdout and stderr), oldest first;
    /// the agent adds kernel OOM-killer lines seen while the rank ran.
    pub lines: &'a [String],
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub cause: FailureCause,
    /// One line saying what happened, e.g. the NCCL message or the exception.
    pub detail: String,
    /// The output lines that decided it (at most [`MAX_DECISIVE`]).
    pub decisive: Vec<String>,
}

/// The most decisive lines kept with a failure.
pub const MAX_DECISIVE: usize = 6;

/// A pattern and the cause it reveals, strongest first: an OOM explains the
/// NCCL error the other ranks then see, not the other way round.
const PATTERNS: &[(FailureCause, &[&str])] = &[
    (FailureCause::KernelOom, &["Out of memory: Killed process", "oom-kill:", "oom_reaper: reaped process"]),
    (
        FailureCause::CudaOom,
        &["CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED"],
    ),
    (FailureCause::DiskFull, &["No space left on device", "[Errno 28]", "ENOSPC"]),
    (
        FailureCause::ImportError,
        &[
            "ModuleNotFoundError:",
            "ImportError:",
            "AttributeError: module '",
            "undefined symbol:",
            "Supported flash-attn versions are",
        ],
    ),
    (
        FailureCause::Nccl,
        &[
            "NCCL error",
            "NCCL Error",
            "ncclSystemError",
            "ncclInternalError",
            "ncclUnhandledCudaError",
            "ncclRemoteError",
            "ncclInvalidUsage",
            "Watchdog caught collective operation timeout",
            "NCCL communicator was aborted",
            "DistBackendError",
            "NCCL WARN",
        ],
    ),
    (
        FailureCause::UserError,
        &[
            "error: unrecognized arguments",
            "error: argument ",
            "error: the following arguments are required",
            "SyntaxError:",
        ],
    ),
];

/// Classifies one rank's end from its exit and its last lines.
pub fn classify(evidence: &ExitEvidence<'_>) -> Classification {
    for (cause, needles) in PATTERNS {
        if let Some(i) = evidence.lines.iter().rposition(|l| needles.iter().any(|n| l.contains(n))) {
            let detail = evidence.lines[i].trim().to_string();
            return Classification { cause: *cause, detail, decisive: decisive(evidence.lines, i) };
        }
    }
    let exception = last_exception(evidence.lines);
    let how = describe_end(evidence);
    // argparse exits 2 after its usage line.
    if evidence.exit_code == Some(2) && evidence.lines.iter().any(|l| l.starts_with("usage:") || l.contains(": error:"))
    {
        let i = evidence.lines.iter().rposition(|l| l.contains("error")).unwrap_or(evidence.lines.len() - 1);
        return Classification {
            cause: FailureCause::UserError,
            detail: evidence.lines[i].trim().to_string(),
            decisive: decisive(evidence.lines, i),
        };
    }
    match exception {
        Some(i) => Classification {
            cause: FailureCause::RankFailed,
            detail: format!("{how}: {}", evidence.lines[i].trim()),
            decisive: decisive(evidence.lines, i),
        },
        None => {
            let tail: Vec<String> = evidence.lines.iter().rev().take(3).rev().cloned().collect();
            Classification { cause: FailureCause::RankFailed, detail: how, decisive: tail }
        }
    }
}

/// "exited with code 3", "killed by signal 9 (SIGKILL)", with torchrun's root cause.
fn describe_end(evidence: &ExitEvidence<'_>) -> String {
    let mut how = match (evidence.exit_code, evidence.signal) {
        (_, Some(sig)) => match crate::metrics::signal_name(sig.unsigned_abs()) {
            Some(name) => format!("killed by signal {sig} ({name})"),
            None => format!("killed by signal {sig}"),
        },
        (Some(code), None) => format!("exited with code {code}"),
        (None, None) => "ended with an unknown status".to_string(),
    };
    if !evidence.root_cause.is_empty() {
        how.push_str(&format!(" ({})", evidence.root_cause));
    }
    how
}

/// The last line that states a Python exception (`SomeError: message`).
fn last_exception(lines: &[String]) -> Option<usize> {
    lines.iter().rposition(|l| {
        let l = l.trim();
        let Some((name, _)) = l.split_once(": ") else { return false };
        let name = name.rsplit('.').next().unwrap_or(name);
        (name.ends_with("Error") || name.ends_with("Exception") || name == "KeyboardInterrupt")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The matched line with up to a few lines before it for context.
fn decisive(lines: &[String], i: usize) -> Vec<String> {
    let from = i.saturating_sub(MAX_DECISIVE - 1);
    lines[from..=i].iter().filter(|l| !l.trim().is_empty()).map(|l| l.trim_end().to_string()).collect()
}

#[cfg(test)]
mod tests;
