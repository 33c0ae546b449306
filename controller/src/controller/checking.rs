//! Checking a job file a client sent: parse and validate on a blocking
//! thread, a few at a time, within a deadline. A hostile file then costs at
//! most one blocking thread for a while, never the runtime threads that answer
//! agents' heartbeats (issue 14, finding 3).

use std::path::Path;
use std::sync::Arc;

use cohort_proto::JobFile;
use cohort_shared::spec::JobSpec;
use tokio::sync::Semaphore;

use super::{Controller, normalize};
use crate::error::ControllerError;

/// How many job files are checked at once: at most half the cores, so that
/// the runtime keeps CPU for agents whatever clients send.
pub(super) fn concurrent_checks() -> Arc<Semaphore> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Arc::new(Semaphore::new(cores.div_ceil(2)))
}

/// Parses and validates a job file and resolves a relative `workdir`; the
/// file is refused above `max_bytes`. Synchronous: see [`Controller::check_file`].
pub(super) fn parse_job_file(file: &JobFile, max_bytes: usize) -> Result<JobSpec, ControllerError> {
    if file.yaml.len() > max_bytes {
        return Err(ControllerError::InvalidRequest(format!(
            "job file {} is {} bytes; the controller accepts at most {max_bytes} (--max-job-file-size)",
            file.source_name,
            file.yaml.len()
        )));
    }
    let source = if file.source_name.is_empty() { "<job>" } else { file.source_name.as_str() };
    let mut spec = JobSpec::from_yaml(&file.yaml, source)?;
    crate::security::run_as::apply_default_user(&mut spec, file);
    if let Some(dir) = spec.workdir.as_deref()
        && !dir.starts_with('/')
    {
        if file.base_dir.is_empty() {
            return Err(ControllerError::InvalidRequest(format!(
                "job file {source}: workdir {dir:?} is relative but no base directory was sent; use an absolute path"
            )));
        }
        spec.workdir = Some(normalize(&Path::new(&file.base_dir).join(dir)));
    }
    Ok(spec)
}

impl Controller {
    /// [`parse_job_file`] for a file from a client: on a blocking thread, at
    /// most [`concurrent_checks`] at once, and refused when waiting plus
    /// checking takes longer than `--job-file-check-timeout`.
    pub async fn check_file(&self, file: &JobFile) -> Result<JobSpec, ControllerError> {
        let deadline = self.config.limits.job_file_check_timeout;
        let max_bytes = self.config.limits.max_job_file_bytes;
        let too_slow = || {
            ControllerError::InvalidRequest(format!(
                "job file {} took too long to check (over {}, --job-file-check-timeout): make it smaller or simpler \
                 (fewer nesting levels, anchors and keys), or try again when the controller is less busy",
                if file.source_name.is_empty() { "<job>" } else { file.source_name.as_str() },
                humantime::format_duration(deadline)
            ))
        };
        let checks = self.checks.clone();
        let owned = file.clone();
        let check = async move {
            let permit = checks
                .acquire_owned()
                .await
                .map_err(|_| ControllerError::FailedPrecondition("the controller is shutting down".into()))?;
            let checked = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                parse_job_file(&owned, max_bytes)
            });
            checked.await.map_err(|e| ControllerError::InvalidRequest(format!("checking the job file failed: {e}")))?
        };
        match tokio::time::timeout(deadline, check).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(file = %file.source_name, bytes = file.yaml.len(), ?deadline, "job file took too long to check");
                Err(too_slow())
            }
        }
    }
}
