//! What a local source directory was found to hold the last time it was
//! staged: each file's digest with the file's identity and change times. When
//! a later staging lists the same files with the same identity and times, the
//! directory's digest is known without reading a byte of it, so an item
//! without a declared digest whose content is cached is not read again.
//!
//! The record is kept at `sources/<key>.json` in the cache dir. Validity key,
//! per file: device, inode, size, mtime and ctime (nanoseconds). A rewrite in
//! place changes mtime and ctime; `touch -d` can set mtime back but not ctime;
//! a replaced file has another inode. What these miss is a change within the
//! timestamps' resolution of the listing: a file whose ctime is less than
//! `settle` before the listing began is recorded as unsettled and never
//! trusted. A record that does not match in every file and symlink is not used
//! at all (the directory is copied and hashed, and the record made again). A
//! lost or damaged record only costs a read of the source.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tree::{self, FileStat, Listed, Tree};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    source: PathBuf,
    files: Vec<RecordedFile>,
    links: Vec<(PathBuf, PathBuf)>,
}

#[derive(Serialize, Deserialize)]
struct RecordedFile {
    rel: PathBuf,
    stat: FileStat,
    sha256: String,
    /// Changed too shortly before the listing to be trusted later.
    unsettled: bool,
}

/// The directory's digest, if the record at `path` describes `tree` (listed
/// from `source`) in every file and symlink.
pub(super) fn known_digest(path: &Path, source: &Path, tree: &Tree) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let record: Record = serde_json::from_slice(&text).ok()?;
    if record.version != VERSION || record.source != source || record.files.len() != tree.files.len() {
        return None;
    }
    let mut files: Vec<_> = tree.files.iter().collect();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut listed = Vec::with_capacity(files.len() + tree.links.len());
    for (file, recorded) in files.into_iter().zip(&record.files) {
        if recorded.unsettled || recorded.rel != file.rel || recorded.stat != file.stat {
            return None;
        }
        listed.push((file.rel.clone(), Listed::File { sha256: recorded.sha256.clone(), size: file.stat.size }));
    }
    let mut links: Vec<_> = tree.links.iter().map(|l| (l.rel.clone(), l.target.clone())).collect();
    links.sort();
    if links != record.links {
        return None;
    }
    listed.extend(links.into_iter().map(|(rel, target)| (rel, Listed::Link { target })));
    Some(format!("{:x}", Sha256::digest(tree::manifest(listed))))
}

/// Writes the record of `tree`, listed from `source` at `listed_at`, whose
/// files hashed to `digests` (relative path, sha256). Best effort: a record
/// that cannot be written is only a later re-read.
pub(super) fn save(
    path: &Path,
    source: &Path,
    tree: &Tree,
    digests: &[(PathBuf, String)],
    listed_at: SystemTime,
    settle: Duration,
) {
    let by_rel: std::collections::HashMap<&Path, &str> =
        digests.iter().map(|(rel, sha)| (rel.as_path(), sha.as_str())).collect();
    let settled_before = listed_at
        .checked_sub(settle)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    let mut files = Vec::with_capacity(tree.files.len());
    for file in &tree.files {
        let Some(sha256) = by_rel.get(file.rel.as_path()) else { return };
        files.push(RecordedFile {
            rel: file.rel.clone(),
            stat: file.stat,
            sha256: (*sha256).to_owned(),
            unsettled: file.stat.ctime_ns >= settled_before || file.stat.mtime_ns >= settled_before,
        });
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut links: Vec<_> = tree.links.iter().map(|l| (l.rel.clone(), l.target.clone())).collect();
    links.sort();
    let record = Record { version: VERSION, source: source.to_owned(), files, links };
    let Ok(text) = serde_json::to_vec(&record) else {
        // A path that is not UTF-8: that source is always read.
        return;
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(record = %path.display(), %error, "cannot save the record of a staged source");
    }
}
