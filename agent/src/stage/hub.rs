//! A staged model placed where a hub library finds it by its id, offline, in
//! the cache layout that library reads (`stage: [{model: Qwen/Qwen3-8B, ...}]`).
//! The layouts come from the libraries' code, not their documents:
//!
//! - ModelScope (modelscope 1.40 over modelscope-hub 0.5): `snapshot_download`
//!   first looks for the layout the SDK wrote up to 1.37,
//!   `<MODELSCOPE_CACHE>/models/<owner>/<name, '.' as '___'>`
//!   (modelscope_hub/_download.py `_find_legacy_repo_dir`, used by
//!   `download_repo` and by the offline `_resolve_cached_snapshot`); the SDKs
//!   before 1.38 read and wrote that same directory. Placing the model there
//!   serves both generations.
//! - Hugging Face (huggingface_hub 1.x/2.x): `snapshot_download` without the
//!   Hub (offline, `HF_HUB_OFFLINE=1` or a failed connection) reads the commit
//!   of a branch from `<HF_HUB_CACHE>/models--<owner>--<name>/refs/<branch>`
//!   and returns `snapshots/<commit>` when it exists
//!   (huggingface_hub/_snapshot_download.py, the `tree_entries is None` branch;
//!   `repo_folder_name` in file_download.py). The commit must be 40 hex digits
//!   (`REGEX_COMMIT_HASH`): the staged content's digest, cut to 40, stands for
//!   it. `blobs/` is not read on that path.
//!
//! Each place is a symlink to the content in `sha256/`, swapped in by a rename,
//! so a reader sees the old content or the new, never a half-made directory.

use std::io;
use std::path::{Path, PathBuf};

use cohort_shared::spec::HubLayout;
use serde::{Deserialize, Serialize};

use super::StageError;

/// A staged input that is a hub model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubModel {
    /// `owner/name`, as the job's `--model` names it.
    pub id: String,
    pub layout: HubLayout,
}

/// The hub cache root (the processes' MODELSCOPE_CACHE or HF_HUB_CACHE) of
/// `layout` in the cache at `cache_dir`.
pub fn hub_root(cache_dir: &Path, layout: HubLayout) -> PathBuf {
    cache_dir.join("hub").join(layout.as_str())
}

/// Places the staged directory `content` (`<cache_dir>/sha256/<hex>`) under
/// `model`'s id in its layout; returns the hub cache root.
pub(super) fn place(cache_dir: &Path, model: &HubModel, item: &str, content: &Path) -> Result<PathBuf, StageError> {
    let hex = content.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bad = || StageError::BadModel { item: item.to_owned(), model: model.id.clone() };
    let (owner, name) = model
        .id
        .split_once('/')
        .filter(|_| {
            cohort_shared::spec::is_model_id(&model.id) && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .ok_or_else(bad)?;
    let root = hub_root(cache_dir, model.layout);
    // Every link below is four directories under the cache dir.
    let target = Path::new("../../../../sha256").join(&hex);
    let io_error = |action, path: &Path| {
        let (item, path) = (item.to_owned(), path.to_owned());
        move |error| StageError::Io { item, action, path, error }
    };
    match model.layout {
        HubLayout::Modelscope => {
            let link = cohort_shared::spec::modelscope_model_dir(&root, &model.id).ok_or_else(bad)?;
            swap_link(&target, &link).map_err(io_error("place the model at", &link))?;
        }
        HubLayout::Huggingface => {
            let repo = root.join(format!("models--{owner}--{name}"));
            let commit = &hex[..40];
            let link = repo.join("snapshots").join(commit);
            swap_link(&target, &link).map_err(io_error("place the model at", &link))?;
            let refs = repo.join("refs");
            // No newline: the library reads the whole file as the commit.
            write_atomic(&refs.join("main"), commit.as_bytes()).map_err(io_error("write", &refs))?;
        }
    }
    Ok(root)
}

/// Points `link` at `target`, replacing a link already there in one rename.
fn swap_link(target: &Path, link: &Path) -> io::Result<()> {
    let parent = link.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(parent)?;
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if std::fs::symlink_metadata(link).is_ok_and(|m| !m.file_type().is_symlink()) {
        return Err(io::Error::other(
            "something other than a link Cohort made is there; move it away or stage the model under another cache dir",
        ));
    }
    let tmp = parent.join(format!(".{}.tmp.{}", unique_name(link), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let parent = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".{}.tmp.{}", unique_name(path), std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

fn unique_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Removes the links under the hub roots of `cache_dir` whose content is gone
/// (after a garbage collection), and a Hugging Face ref that names no
/// snapshot. Returns how many were removed.
pub fn prune_dangling(cache_dir: &Path) -> usize {
    let mut removed = 0;
    let ms = hub_root(cache_dir, HubLayout::Modelscope).join("models");
    for owner in read_dirs(&ms) {
        for link in read_entries(&owner) {
            removed += usize::from(remove_if_dangling(&link));
        }
    }
    for repo in read_dirs(&hub_root(cache_dir, HubLayout::Huggingface)) {
        for link in read_entries(&repo.join("snapshots")) {
            removed += usize::from(remove_if_dangling(&link));
        }
        let main = repo.join("refs").join("main");
        if let Ok(commit) = std::fs::read_to_string(&main)
            && !repo.join("snapshots").join(commit.trim()).exists()
        {
            removed += usize::from(std::fs::remove_file(&main).is_ok());
        }
    }
    removed
}

fn remove_if_dangling(link: &Path) -> bool {
    let is_link = std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
    is_link && !link.exists() && std::fs::remove_file(link).is_ok()
}

fn read_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    read_entries(dir).into_iter().filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())).collect()
}
