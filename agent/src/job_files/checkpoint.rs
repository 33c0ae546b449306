//! The helper side of `FindCheckpoint`: the newest complete checkpoint of a
//! job's save dir, searched as the job's user.

use std::path::Path;

use super::FoundCheckpoint;

/// The newest complete checkpoint under `directory`, its tracker repointed
/// at it; run by the `files-as` helper as the job's user.
pub(super) fn find_checkpoint_in(directory: &Path) -> Result<FoundCheckpoint, String> {
    use cohort_shared::checkpoint::CheckpointLayout;
    let found = crate::checkpoint_search::search(directory).map_err(|e| e.to_string())?;
    if let Some(c) = &found.found {
        repoint_tracker(c);
    }
    let layout = |l: CheckpointLayout| match l {
        CheckpointLayout::MegatronIter => "megatron-iter".to_owned(),
        CheckpointLayout::SwiftCheckpointN => "swift-checkpoint-n".to_owned(),
    };
    Ok(FoundCheckpoint {
        checkpoint: found.found.map(|c| (c.iteration, c.path.display().to_string(), layout(c.layout))),
        skipped: found.skipped.iter().map(ToString::to_string).collect(),
    })
}

/// `--load <dir>` resumes from whatever the tracker names. When it names a
/// half-written iteration, point it at the newest complete one (the old
/// tracker is kept beside it as `.cohort-bak`).
fn repoint_tracker(c: &cohort_shared::checkpoint::Checkpoint) {
    use cohort_shared::checkpoint::TRACKER_FILE;
    let tracker = c.path.join(TRACKER_FILE);
    let Ok(named) = std::fs::read_to_string(&tracker) else { return };
    if named.trim() == c.iteration.to_string() || named.trim() == "release" {
        return;
    }
    let backup = c.path.join(format!("{TRACKER_FILE}.cohort-bak"));
    let result = std::fs::rename(&tracker, &backup).and_then(|_| std::fs::write(&tracker, c.iteration.to_string()));
    match result {
        Ok(()) => tracing::warn!(
            tracker = %tracker.display(),
            named = named.trim(),
            complete = c.iteration,
            "the tracker named an incomplete checkpoint; it now names the newest complete one"
        ),
        Err(e) => tracing::error!(tracker = %tracker.display(), error = %e, "could not repoint the checkpoint tracker"),
    }
}
