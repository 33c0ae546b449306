//! Finding the checkpoint a megatron-sft job resumes from on the shared filesystem (the agent reads it for the controller).
//!
//! Two layouts exist on the shared filesystem (see the ms-swift reference, section 3):
//! - Megatron-LM's: `<dir>/latest_checkpointed_iteration.txt` + `<dir>/iter_NNNNNNN/`;
//!   ms-swift <= 3.9 puts these in `<save>/vN-TIMESTAMP/` (or `<save>/` with `add_version false`).
//! - ms-swift 3.10+ and 4.x: `<output_dir>/vN-TIMESTAMP/checkpoint-N/`, each holding its own
//!   tracker and `iter_NNNNNNN/` (plus safetensors when `--save_safetensors true`).
//!
//! Only complete checkpoints count: a rank that died mid-save leaves directories that
//! Megatron cannot load, and resuming from one would fail the next attempt too.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use cohort_shared::checkpoint::{Checkpoint, CheckpointLayout, TRACKER_FILE};

/// Why the save dir could not be searched.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "checkpoint directory {} does not exist: check the job's save/output_dir and that the shared filesystem is mounted",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("checkpoint directory {} is not a directory: point save/output_dir at a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The newest complete checkpoint under a save/output dir, searching its `vN-*` run dirs
/// (newest run first: by version number, then timestamp) and then the dir itself. The newest
/// run that holds any complete checkpoint wins, even when an older run reached a higher
/// iteration: a later run is a later attempt.
///
/// "Complete" means: the tracker exists and names an iteration whose `iter_XXXXXXX` dir holds
/// a whole checkpoint with the model's weights: `common.pt`, `.metadata` or `metadata.json` and
/// `.distcp` shards for `torch_dist`, or `mp_rank_*` dirs that each hold `model_optim_rng.pt` for
/// the legacy format; and a `model.safetensors.index.json` beside the tracker names only files
/// that exist. An `iter_*` dir with `common.pt` and no shards holds no weights: ms-swift with
/// `save_safetensors` (its default) and `no_save_optim` saves the mcore checkpoint without the
/// model and puts the weights only in the Hugging Face safetensors beside it (4.6.0
/// `swift/megatron/trainers/base.py:837-838` and `utils/megatron_lm_utils.py:339-345`;
/// 3.12.6 `swift/megatron/trainers/base.py:1051-1052`), which `--load`/`--mcore_model` do not read.
/// Half-written checkpoints (an `iter_*` dir without its metadata, a tracker naming a missing
/// `iter_*` dir, a `checkpoint-N` dir without a tracker, an unparsable tracker) are skipped,
/// and the next older complete one is used: within one tracker's dir that is an older `iter_*`
/// dir (note that `--load <dir>` still reads the tracker, which names the broken one).
///
/// A tracker that says `release` names the `release/` dir, reported as iteration 0.
pub fn latest_complete(save_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    Ok(search(save_dir)?.found)
}

/// A checkpoint the search passed over, and why: shown where the resume decision is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The `iter_*` dir, or the dir of the tracker when the tracker itself is the problem.
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What [`search`] found: the checkpoint to resume from, and the newer ones it passed over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    pub found: Option<Checkpoint>,
    /// Checkpoints newer than `found` (all of them when it is None) that cannot be resumed from.
    pub skipped: Vec<Skipped>,
}

/// [`latest_complete`], and why each newer checkpoint was not taken.
pub fn search(save_dir: &Path) -> Result<Search, CheckpointError> {
    match fs::metadata(save_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(CheckpointError::NotADirectory { path: save_dir.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing { path: save_dir.to_path_buf() });
        }
        Err(source) => return Err(CheckpointError::Read { path: save_dir.to_path_buf(), source }),
    }
    let mut runs = run_dirs(save_dir)?;
    runs.push(save_dir.to_path_buf());
    let mut skipped = Vec::new();
    for run in runs {
        let (found, passed_over) = latest_in_run(&run)?;
        skipped.extend(passed_over);
        if found.is_some() {
            return Ok(Search { found, skipped });
        }
    }
    Ok(Search { found: None, skipped })
}

/// `vN-TIMESTAMP` children of `save_dir`, newest first.
fn run_dirs(save_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut runs: Vec<((u64, String), PathBuf)> = list_dir(save_dir)?
        .into_iter()
        .filter_map(|(name, path)| Some((run_version(&name)?, path)))
        .filter(|(_, path)| path.is_dir())
        .collect();
    runs.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(runs.into_iter().map(|(_, path)| path).collect())
}

/// `v12-20260822-101500` -> (12, "20260822-101500"); the timestamp sorts as text.
fn run_version(name: &str) -> Option<(u64, String)> {
    let (version, timestamp) = name.strip_prefix('v')?.split_once('-')?;
    Some((parse_digits(version)?, timestamp.to_owned()))
}

/// The complete checkpoint with the highest iteration in one run dir: its own tracker
/// (Megatron layout) and its `checkpoint-N` children (ms-swift 3.10+/4.x layout), and the
/// newer ones passed over.
fn latest_in_run(run: &Path) -> Result<(Option<Checkpoint>, Vec<Skipped>), CheckpointError> {
    let mut tracker_dirs = vec![(run.to_path_buf(), layout_of(run))];
    for (name, path) in list_dir(run)? {
        if name.strip_prefix("checkpoint-").and_then(parse_digits).is_some() && path.is_dir() {
            tracker_dirs.push((path, CheckpointLayout::SwiftCheckpointN));
        }
    }
    let mut best: Option<Checkpoint> = None;
    // (the iteration it was for, when known; what was wrong)
    let mut skipped: Vec<(Option<u64>, Skipped)> = Vec::new();
    for (dir, layout) in tracker_dirs {
        let Some(iteration) = complete_iteration(&dir, &mut skipped)? else {
            continue;
        };
        if best.as_ref().is_none_or(|b| iteration > b.iteration) {
            best = Some(Checkpoint { iteration, path: dir, layout, run_dir: run.to_path_buf() });
        }
    }
    let newer = |iteration: Option<u64>| match (&best, iteration) {
        (Some(best), Some(iteration)) => iteration > best.iteration,
        _ => true,
    };
    let skipped = skipped.into_iter().filter(|(iteration, _)| newer(*iteration)).map(|(_, s)| s).collect();
    Ok((best, skipped))
}

/// A save dir given as a `checkpoint-N` dir itself still reports the ms-swift layout.
fn layout_of(dir: &Path) -> CheckpointLayout {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.strip_prefix("checkpoint-").and_then(parse_digits).is_some() {
        CheckpointLayout::SwiftCheckpointN
    } else {
        CheckpointLayout::MegatronIter
    }
}

/// The newest complete iteration in a dir holding a tracker: the one the tracker names or,
/// when that is incomplete, the newest older `iter_*` dir that is complete. What it passes
/// over goes to `skipped`.
fn complete_iteration(dir: &Path, skipped: &mut Vec<(Option<u64>, Skipped)>) -> Result<Option<u64>, CheckpointError> {
    let tracker = dir.join(TRACKER_FILE);
    let text = match fs::read_to_string(&tracker) {
        Ok(text) => text,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Ok(None),
        Err(source) => return Err(CheckpointError::Read { path: tracker, source }),
    };
    let text = text.trim();
    let tracked = parse_digits(text);
    let mut skip = |iteration: Option<u64>, path: PathBuf, reason: String| {
        tracing::debug!(dir = %path.display(), reason, "skipping checkpoint");
        skipped.push((iteration, Skipped { path, reason }));
    };
    if !safetensors_complete(dir)? {
        skip(
            tracked,
            dir.to_path_buf(),
            "model.safetensors.index.json names safetensors files that are missing (still being written)".into(),
        );
        return Ok(None);
    }
    if text == "release" {
        let release = dir.join("release");
        return Ok(match iter_dir_state(&release)? {
            IterDir::Complete => Some(0),
            state => {
                skip(Some(0), release, state.reason());
                None
            }
        });
    }
    let Some(tracked) = tracked else {
        skip(None, tracker, format!("the tracker says {text:?}, not an iteration"));
        return Ok(None);
    };
    let mut iterations: Vec<(u64, PathBuf)> = list_dir(dir)?
        .into_iter()
        .filter_map(|(name, path)| Some((parse_digits(name.strip_prefix("iter_")?)?, path)))
        .filter(|(iteration, _)| *iteration <= tracked)
        .collect();
    iterations.sort_by_key(|(iteration, _)| Reverse(*iteration));
    if iterations.first().is_none_or(|(newest, _)| *newest != tracked) {
        skip(
            Some(tracked),
            dir.join(format!("iter_{tracked:07}")),
            "the tracker names it but it does not exist".into(),
        );
    }
    for (iteration, path) in iterations {
        match iter_dir_state(&path)? {
            IterDir::Complete => return Ok(Some(iteration)),
            state => skip(Some(iteration), path, state.reason()),
        }
    }
    Ok(None)
}

/// What an `iter_*` (or `release`) dir holds; see [`latest_complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IterDir {
    Complete,
    /// A save that has not finished (or died): shards without metadata, rank files missing.
    HalfWritten,
    /// `common.pt` without any shard: saved without the model (`save_safetensors` + `no_save_optim`).
    NoWeights,
}

impl IterDir {
    fn reason(self) -> String {
        match self {
            IterDir::Complete => String::new(),
            IterDir::HalfWritten => "half-written: its save did not finish".into(),
            IterDir::NoWeights => "not resumable: it holds no model weights, only common.pt (what ms-swift \
                 writes with save_safetensors and no_save_optim: the weights are then only in the safetensors \
                 beside it, which --load/--mcore_model do not read); drop no_save_optim to keep checkpoints \
                 resumable"
                .into(),
        }
    }
}

fn iter_dir_state(dir: &Path) -> Result<IterDir, CheckpointError> {
    let names: HashSet<String> = list_dir(dir)?.into_iter().map(|(name, _)| name).collect();
    let mp_ranks: Vec<&String> = names.iter().filter(|name| name.starts_with("mp_rank_")).collect();
    if !mp_ranks.is_empty() {
        let all = mp_ranks.iter().all(|rank| dir.join(rank).join("model_optim_rng.pt").is_file());
        return Ok(if all { IterDir::Complete } else { IterDir::HalfWritten });
    }
    let has_metadata = names.contains(".metadata") || names.contains("metadata.json");
    let has_shards = names.iter().any(|name| name.ends_with(".distcp"));
    Ok(match (names.contains("common.pt"), has_shards, has_metadata) {
        (true, true, true) => IterDir::Complete,
        (true, false, _) => IterDir::NoWeights,
        _ => IterDir::HalfWritten,
    })
}

/// False when `model.safetensors.index.json` exists but is unreadable as JSON or names a
/// shard that is not there (rank 0 was still writing the weights); true without an index.
fn safetensors_complete(dir: &Path) -> Result<bool, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    let text = match fs::read_to_string(&index) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(source) => return Err(CheckpointError::Read { path: index, source }),
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(false);
    };
    let Some(weight_map) = json.get("weight_map").and_then(|map| map.as_object()) else {
        return Ok(false);
    };
    let shards: HashSet<&str> = weight_map.values().filter_map(|file| file.as_str()).collect();
    Ok(shards.iter().all(|shard| dir.join(shard).is_file()))
}

/// The entries of a dir as (name, path); a dir that vanished (rotated away by
/// `--save_total_limit` while we looked) is empty. Names that are not UTF-8 are skipped.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, CheckpointError> {
    let read_error = |source| CheckpointError::Read { path: dir.to_path_buf(), source };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Ok(Vec::new());
        }
        Err(source) => return Err(read_error(source)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read_error)?;
        if let Ok(name) = entry.file_name().into_string() {
            listed.push((name, entry.path()));
        }
    }
    Ok(listed)
}

/// A run of ASCII digits as a number; None for anything else (no sign, no spaces).
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}
