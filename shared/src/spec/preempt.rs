//! The `preempt` section: how a job saves before it is preempted.
//!
//! ```yaml
//! preempt:
//!   signal: SIGUSR1          # sent to every rank's process group first; default SIGTERM
//!   grace: 120s              # how long the ranks get to save and exit; default 120s, at most 1h
//!   checkpoints: /shared/ckpt/run1   # where the job writes Megatron-layout checkpoints
//!                                    # (absolute): the controller finds the one it resumes
//!                                    # from, and counts the iterations lost
//! ```
//!
//! After the grace (or once every rank has exited) the gang gets the usual
//! stop: SIGTERM, `stop_grace`, SIGKILL.

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
    Some(PreemptPolicy { signal, grace, checkpoints: text.checkpoints })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::spec::JobSpec;

    fn parse(extra: &str) -> Result<JobSpec, String> {
        let yaml = format!("name: j\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [x]\n{extra}");
        JobSpec::from_yaml(&yaml, "j.yaml").map_err(|e| e.to_string())
    }

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
