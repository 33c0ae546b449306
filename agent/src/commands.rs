//! What the agent checks in every command from a controller before acting on
//! it. The controller is authenticated (mutual TLS), but a command names
//! directories under the work dir and starts processes as root's delegate, so
//! a field that would escape the work dir, smuggle a NUL into an argv or env
//! entry, or repeat a process index is refused, naming the field, instead of
//! being half carried out.

use std::collections::HashSet;

use cohort_proto::ControllerMessage;
use cohort_proto::controller_message::Command;
use prost::Message as _;

/// The longest job id the agent accepts: one path component.
const MAX_ID_LEN: usize = 255;

/// A command the agent will not carry out, with the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("controller message does not decode: {0}")]
    Decode(String),
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl CommandError {
    fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        CommandError::Field { field: field.into(), message: message.into() }
    }

    /// The field at fault (`LaunchCommand.processes[1].argv`), if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            CommandError::Decode(_) => None,
            CommandError::Field { field, .. } => Some(field),
        }
    }
}

/// Decodes one message of the session stream (protobuf, as tonic hands it
/// over) and checks it.
pub fn decode(bytes: &[u8]) -> Result<ControllerMessage, CommandError> {
    let message = ControllerMessage::decode(bytes).map_err(|e| CommandError::Decode(e.to_string()))?;
    check(&message)?;
    Ok(message)
}

/// Checks a decoded command; Ok means the agent may act on it.
pub fn check(message: &ControllerMessage) -> Result<(), CommandError> {
    match &message.command {
        None | Some(Command::HeartbeatAck(_)) | Some(Command::ClearGpu(_)) => Ok(()),
        Some(Command::Launch(launch)) => {
            job_id("LaunchCommand.job_id", &launch.job_id)?;
            text("LaunchCommand.workdir", &launch.workdir)?;
            text("LaunchCommand.metrics_dir", &launch.metrics_dir)?;
            if launch.user.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(CommandError::at(
                    "LaunchCommand.user",
                    format!("{:?} is not a user name or uid", launch.user),
                ));
            }
            let mut indices = HashSet::new();
            for (i, process) in launch.processes.iter().enumerate() {
                let field = |f: &str| format!("LaunchCommand.processes[{i}].{f}");
                if !indices.insert(process.index) {
                    return Err(CommandError::at(
                        field("index"),
                        format!("{} is used by another process", process.index),
                    ));
                }
                if process.argv.first().is_none_or(|program| program.is_empty()) {
                    return Err(CommandError::at(field("argv"), "is empty: no program to start"));
                }
                for (j, arg) in process.argv.iter().enumerate() {
                    text(&field(&format!("argv[{j}]")), arg)?;
                }
                for var in &process.env {
                    let name = field(&format!("env.{}", var.name));
                    if var.name.is_empty() || var.name.contains('=') || var.name.contains('\0') {
                        return Err(CommandError::at(name, "is not an environment variable name"));
                    }
                    text(&name, &var.value)?;
                }
            }
            Ok(())
        }
        Some(Command::Stop(stop)) => job_id("StopCommand.job_id", &stop.job_id),
        Some(Command::Prepare(prepare)) => {
            job_id("PrepareCommand.job_id", &prepare.job_id)?;
            for (i, input) in prepare.stage.iter().enumerate() {
                component(&format!("PrepareCommand.stage[{i}].name"), &input.name)?;
                text(&format!("PrepareCommand.stage[{i}].source"), &input.source)?;
            }
            for (i, path) in prepare.shared_paths.iter().enumerate() {
                text(&format!("PrepareCommand.shared_paths[{i}]"), path)?;
            }
            for (i, path) in prepare.datasets.iter().enumerate() {
                text(&format!("PrepareCommand.datasets[{i}]"), path)?;
            }
            text("PrepareCommand.output_dir", &prepare.output_dir)?;
            text("PrepareCommand.workdir", &prepare.workdir)?;
            user_name("PrepareCommand.user", &prepare.user)?;
            env_vars("PrepareCommand.env", &prepare.env)?;
            if let Some(check) = &prepare.swift_argcheck {
                argcheck("PrepareCommand.swift_argcheck", check)?;
            }
            text("PrepareCommand.python", &prepare.python)
        }
        Some(Command::SwiftArgcheck(cmd)) => {
            match &cmd.check {
                Some(check) => argcheck("SwiftArgcheckCommand.check", check)?,
                None => return Err(CommandError::at("SwiftArgcheckCommand.check", "is missing")),
            }
            user_name("SwiftArgcheckCommand.user", &cmd.user)?;
            env_vars("SwiftArgcheckCommand.env", &cmd.env)?;
            text("SwiftArgcheckCommand.workdir", &cmd.workdir)?;
            text("SwiftArgcheckCommand.python", &cmd.python)
        }
        Some(Command::FindCheckpoint(find)) => text("FindCheckpointCommand.directory", &find.directory),
        Some(Command::InspectPath(inspect)) => {
            if !inspect.path.starts_with('/') {
                return Err(CommandError::at("InspectPathCommand.path", format!("{:?} is not absolute", inspect.path)));
            }
            text("InspectPathCommand.path", &inspect.path)
        }
        Some(Command::Cache(cache)) => {
            match cache.evict.iter().find(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit())) {
                Some(bad) => Err(CommandError::at("CacheCommand.evict", format!("{bad:?} is not 64 hex digits"))),
                None => Ok(()),
            }
        }
        Some(Command::StageDigest(digest)) => {
            job_id("StageDigestCommand.job_id", &digest.job_id)?;
            component("StageDigestCommand.item", &digest.item)?;
            if !digest.sha256.is_empty() && !crate::job_files::is_sha256_hex(&digest.sha256) {
                return Err(CommandError::at(
                    "StageDigestCommand.sha256",
                    format!("{:?} is not 64 hex digits", digest.sha256),
                ));
            }
            Ok(())
        }
        Some(Command::DumpStacks(dump)) => job_id("DumpStacksCommand.job_id", &dump.job_id),
        Some(Command::FetchLogs(fetch)) => job_id("FetchLogsCommand.job_id", &fetch.job_id),
    }
}

/// A user name or uid for the rank-user policy: no blanks or control characters.
fn user_name(field: &str, user: &str) -> Result<(), CommandError> {
    if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CommandError::at(field, format!("{user:?} is not a user name or uid")));
    }
    Ok(())
}

/// Variables that become a process's environment.
fn env_vars(field: &str, env: &[cohort_proto::EnvVar]) -> Result<(), CommandError> {
    for var in env {
        let name = format!("{field}.{}", var.name);
        if var.name.is_empty() || var.name.contains('=') || var.name.contains('\0') {
            return Err(CommandError::at(name, "is not an environment variable name"));
        }
        text(&name, &var.value)?;
    }
    Ok(())
}

/// An ms-swift command line to check: its words become arguments.
fn argcheck(field: &str, check: &cohort_proto::SwiftArgcheck) -> Result<(), CommandError> {
    text(&format!("{field}.command"), &check.command)?;
    for (i, arg) in check.argv.iter().enumerate() {
        text(&format!("{field}.argv[{i}]"), arg)?;
    }
    Ok(())
}

/// A job id names a directory under the work dir: one path component.
fn job_id(field: &str, id: &str) -> Result<(), CommandError> {
    if id.is_empty() {
        return Err(CommandError::at(field, "is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(CommandError::at(field, format!("is {} bytes long; at most {MAX_ID_LEN}", id.len())));
    }
    component(field, id)
}

fn component(field: &str, name: &str) -> Result<(), CommandError> {
    let fine = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if fine {
        Ok(())
    } else {
        Err(CommandError::at(
            field,
            format!("{name:?} must be letters, digits, '.', '-' or '_', not starting with '.'"),
        ))
    }
}

/// Text that becomes a path, an argument or an environment value: no NUL.
fn text(field: &str, value: &str) -> Result<(), CommandError> {
    if value.contains('\0') {
        return Err(CommandError::at(field, "contains a NUL byte"));
    }
    Ok(())
}

/// The property the fuzz target (`fuzz/`) and the stable corpus test
/// (`agent/tests/command_corpus.rs`) hold every input to: decoding and checking
/// any bytes gives a command that encodes back to itself, a decode error, or
/// an error naming the field at fault. Panics when that breaks.
#[doc(hidden)]
pub fn check_bytes(bytes: &[u8]) {
    match decode(bytes) {
        Ok(message) => {
            let again = ControllerMessage::decode(message.encode_to_vec().as_slice());
            assert_eq!(again.as_ref(), Ok(&message), "a checked command does not survive encoding");
        }
        Err(CommandError::Decode(_)) => {}
        Err(e @ CommandError::Field { .. }) => {
            let field = e.field().unwrap_or_default();
            assert!(field.contains("Command.") && !e.to_string().trim().is_empty(), "{e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::{EnvVar, LaunchCommand, ProcessSpec, StopCommand};

    fn launch(job_id: &str, processes: Vec<ProcessSpec>) -> ControllerMessage {
        ControllerMessage {
            command_id: 1,
            command: Some(Command::Launch(LaunchCommand { job_id: job_id.into(), processes, ..Default::default() })),
        }
    }

    fn process(index: u32, argv: &[&str]) -> ProcessSpec {
        ProcessSpec { index, argv: argv.iter().map(|a| (*a).to_owned()).collect(), ..Default::default() }
    }

    #[test]
    fn a_launch_the_controller_sends_passes() {
        let ok = launch("pipe-3.train", vec![process(0, &["python3", "train.py"]), process(1, &["python3"])]);
        assert_eq!(check(&ok), Ok(()));
        assert_eq!(decode(&ok.encode_to_vec()), Ok(ok));
    }

    #[test]
    fn job_ids_that_leave_the_work_dir_are_refused() {
        for bad in ["", "..", "../etc", "a/b", ".hidden"] {
            let err = check(&launch(bad, vec![process(0, &["true"])])).unwrap_err();
            assert_eq!(err.field(), Some("LaunchCommand.job_id"), "{bad:?}: {err}");
        }
        let stop = ControllerMessage {
            command_id: 2,
            command: Some(Command::Stop(StopCommand { job_id: "x/../../y".into(), ..Default::default() })),
        };
        assert_eq!(check(&stop).unwrap_err().field(), Some("StopCommand.job_id"));
    }

    #[test]
    fn processes_are_checked_one_by_one() {
        let dup = launch("j-1", vec![process(0, &["a"]), process(0, &["b"])]);
        assert_eq!(check(&dup).unwrap_err().field(), Some("LaunchCommand.processes[1].index"));
        let empty = launch("j-1", vec![process(0, &[])]);
        assert_eq!(check(&empty).unwrap_err().field(), Some("LaunchCommand.processes[0].argv"));
        let nul = launch("j-1", vec![process(0, &["a", "b\0c"])]);
        assert_eq!(check(&nul).unwrap_err().field(), Some("LaunchCommand.processes[0].argv[1]"));
        let mut env = process(0, &["a"]);
        env.env.push(EnvVar { name: "A=B".into(), value: String::new() });
        assert_eq!(check(&launch("j-1", vec![env])).unwrap_err().field(), Some("LaunchCommand.processes[0].env.A=B"));
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        assert!(matches!(decode(&[0xff, 0xff, 0xff]), Err(CommandError::Decode(_))));
    }
}
