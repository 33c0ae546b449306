//! The `preempt` section: how a job saves before it is preempted.
//!
//! ```yaml
//! preempt:
//!   signal: SIGUSR1          # sent to every rank's process group first; default SIGTERM
//!   grace: 120s              # how long the ranks get to save and exit; default 120s, at most 1h
//!   checkpoints: /shared/ckpt/run1   # where the job writes Megatron-layout checkpoints
//!                                    # (absolute): the controller finds the one it resumes
//!                                    # from, and counts the iterations lost
//!   checkpoint_wait: 15m     # optional: before the signal, wait up to this long for the job's
//!                            # next periodic checkpoint (a trainer that cannot save on a signal)
//! ```
//!
//! With `checkpoint_wait`, the controller first watches the checkpoint
//! directory until a checkpoint newer than the one there at the preemption is
//! complete (or the wait runs out); then the signal. After the grace (or once
//! every rank has exited) the gang gets the usual stop: SIGTERM, `stop_grace`,
//! SIGKILL.

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::typed;
use crate::job_file::{Problems, suggestion};

/// How a job is asked to save before a preemption stops it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptPolicy {
    /// The signal's name, one of [`SIGNALS`].
    pub signal: String,
    /// How long the ranks have after the signal before the usual stop.
    pub grace: Duration,
    /// The job's checkpoint directory (absolute), when it declares one.
    pub checkpoints: Option<String>,
    /// How long a preemption waits for the job's next periodic checkpoint
    /// before the signal; None: the signal at once.
    pub checkpoint_wait: Option<Duration>,
}

/// The signals a job may ask for.
pub const SIGNALS: &[&str] = &["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"];
pub const DEFAULT_PREEMPT_SIGNAL: &str = "SIGTERM";
pub const DEFAULT_PREEMPT_GRACE: Duration = Duration::from_secs(120);
pub const MAX_PREEMPT_GRACE: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreemptText {
    #[serde(default)]
    signal: Option<String>,
    #[serde(default, with = "crate::duration::serde_duration::option")]
    grace: Option<Duration>,
    #[serde(default)]
    checkpoints: Option<String>,
    #[serde(default, with = "crate::duration::serde_duration::option")]
    checkpoint_wait: Option<Duration>,
}

pub(super) fn read_preempt(root: &Mapping, problems: &mut Problems) -> Option<PreemptPolicy> {
    match root.get("preempt") {
        None | Some(Value::Null) => return None,
        Some(Value::Mapping(_)) => {}
        Some(_) => {
            problems.at(&["preempt"], "must be a mapping, e.g. `preempt: {signal: SIGUSR1, grace: 120s}`");
            return None;
        }
    }
    let text = typed::<PreemptText>(root, "preempt", problems)?;
    let signal = text.signal.unwrap_or_else(|| DEFAULT_PREEMPT_SIGNAL.to_string());
    if !SIGNALS.contains(&signal.as_str()) {
        problems.at(
            &["preempt", "signal"],
            format!(
                "{signal:?} is not a signal a job may ask for{}; use one of {}",
                suggestion(&signal, SIGNALS.iter().copied()),
                SIGNALS.join(", ")
            ),
        );
    }
    let grace = text.grace.unwrap_or(DEFAULT_PREEMPT_GRACE);
    if grace.is_zero() || grace > MAX_PREEMPT_GRACE {
        problems.at(
            &["preempt", "grace"],
            format!(
                "{} must be longer than zero and at most {}, e.g. `120s`",
                humantime::format_duration(grace),
                humantime::format_duration(MAX_PREEMPT_GRACE)
            ),
        );
    }
    if let Some(dir) = &text.checkpoints
        && !dir.starts_with('/')
    {
        problems.at(
            &["preempt", "checkpoints"],
            format!("{dir:?} must be an absolute path (a directory every node sees), e.g. /shared/ckpt/run1"),
        );
    }
    if let Some(wait) = text.checkpoint_wait {
        if wait.is_zero() || wait > MAX_PREEMPT_GRACE {
            problems.at(
                &["preempt", "checkpoint_wait"],
                format!(
                    "{} must be longer than zero and at most {}, e.g. `15m` (a little over the job's save interval)",
                    humantime::format_duration(wait),
                    humantime::format_duration(MAX_PREEMPT_GRACE)
                ),
            );
        }
        let command_job = root.get("kind").and_then(Value::as_str) == Some("command");
        if command_job && text.checkpoints.is_none() && root.get("checkpoints").is_none() {
            problems.at(
                &["preempt", "checkpoint_wait"],
                "needs `checkpoints:`, the directory a command job writes its checkpoints to \
                 (megatron-sft jobs have their `save`/`output_dir`)",
            );
        }
    }
    Some(PreemptPolicy { signal, grace, checkpoints: text.checkpoints, checkpoint_wait: text.checkpoint_wait })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::spec::tests_support::command_job_with as parse;

    #[test]
    fn a_declared_signal_grace_and_directory_are_kept() {
        let spec = parse("preempt: {signal: SIGUSR1, grace: 90s, checkpoints: /shared/ckpt}\n").unwrap();
        let policy = spec.preempt.unwrap();
        assert_eq!(policy.signal, "SIGUSR1");
        assert_eq!(policy.grace.as_secs(), 90);
        assert_eq!(policy.checkpoints.as_deref(), Some("/shared/ckpt"));
        let policy = parse("preempt: {}\n").unwrap().preempt.unwrap();
        assert_eq!((policy.signal.as_str(), policy.grace.as_secs()), ("SIGTERM", 120));
        assert_eq!(parse("").unwrap().preempt, None);
        assert_eq!(policy.checkpoint_wait, None);
        let policy = parse("preempt: {checkpoints: /c, checkpoint_wait: 10m}\n").unwrap().preempt.unwrap();
        assert_eq!(policy.checkpoint_wait, Some(std::time::Duration::from_secs(600)));
    }

    #[test]
    fn a_checkpoint_wait_needs_a_directory_and_a_bounded_time() {
        let e = parse("preempt: {checkpoint_wait: 10m}\n").unwrap_err();
        assert!(e.contains("preempt.checkpoint_wait") && e.contains("needs `checkpoints:`"), "{e}");
        assert!(parse("checkpoints: /c\npreempt: {checkpoint_wait: 10m}\n").is_ok());
        let e = parse("preempt: {checkpoints: /c, checkpoint_wait: 2h}\n").unwrap_err();
        assert!(e.contains("preempt.checkpoint_wait") && e.contains("at most 1h"), "{e}");
        let e = parse("preempt: {checkpoints: /c, checkpoint_wait: 0s}\n").unwrap_err();
        assert!(e.contains("preempt.checkpoint_wait") && e.contains("longer than zero"), "{e}");
    }

    #[test]
    fn bad_fields_are_named_with_their_fix() {
        let e = parse("preempt: {signal: SIGUSR3}\n").unwrap_err();
        assert!(e.contains("preempt.signal") && e.contains("use one of SIGTERM, SIGUSR1"), "{e}");
        let e = parse("preempt: {grace: 2h}\n").unwrap_err();
        assert!(e.contains("preempt.grace") && e.contains("at most 1h"), "{e}");
        let e = parse("preempt: {checkpoints: ckpt}\n").unwrap_err();
        assert!(e.contains("preempt.checkpoints") && e.contains("absolute"), "{e}");
        let e = parse("preempt: {sginal: SIGUSR1}\n").unwrap_err();
        assert!(e.contains("sginal"), "{e}");
        let e = parse("preempt: SIGUSR1\n").unwrap_err();
        assert!(e.contains("preempt") && e.contains("must be a mapping"), "{e}");
    }
}
