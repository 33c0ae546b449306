//! Garbage collection of a staging cache: least recently used content goes
//! first, until the cache holds at most its size limit; content that a
//! running or preparing job uses (pinned) and content being staged right now
//! (its lock held) stay.
//!
//! Last use: `sha256/<hex>.used`, whose mtime every staging that copies or
//! finds the content sets ([`record_use`]); content without it counts as
//! last used when its directory last changed.
//!
//! One removal, under the content's lock (`locks/sha256-<hex>.lock`, the lock a
//! staging of that digest holds): the content directory is renamed out of
//! `sha256/` into `partial/gc-<hex>` (from then on it is not cached: a
//! staging that comes after copies it again), then its manifest and use
//! record go, then the lock is let go and the renamed copy deleted. A crash
//! leaves a `partial/gc-*` the next collection deletes, or a manifest without
//! its directory, which no staging takes as cached.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// One content in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub sha256: String,
    /// Bytes of its files (a file hard-linked under two names counts once).
    pub bytes: u64,
    pub files: u64,
    pub last_use: SystemTime,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Bytes in the cache before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub removed: Vec<CacheEntry>,
    /// Over the limit but kept: pinned by a job.
    pub pinned: Vec<String>,
    /// Over the limit but kept: being staged (its lock held).
    pub busy: Vec<String>,
}

fn used_path(cache: &Path, hex: &str) -> PathBuf {
    cache.join("sha256").join(format!("{hex}.used"))
}

/// Records that the content at `content` (`<cache>/sha256/<hex>`) was used
/// now. Best effort: a lost record only makes the content look older.
pub fn record_use(cache: &Path, content: &Path) {
    let Some(hex) = content.file_name().and_then(|n| n.to_str()) else { return };
    let path = used_path(cache, hex);
    let touched = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(error) = touched {
        tracing::debug!(path = %path.display(), %error, "cannot record the use of cached content");
    }
}

fn is_hex64(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every content in the cache at `cache`, least recently used first.
pub fn list(cache: &Path) -> io::Result<Vec<CacheEntry>> {
    let dir = cache.join("sha256");
    let reader = match std::fs::read_dir(&dir) {
        Ok(reader) => reader,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for entry in reader {
        let entry = entry?;
        let name = entry.file_name();
        let Some(hex) = name.to_str().filter(|n| is_hex64(n)) else { continue };
        let meta = std::fs::symlink_metadata(entry.path())?;
        if !meta.is_dir() {
            continue;
        }
        let (bytes, files) = tree_size(&entry.path())?;
        let last_use =
            std::fs::metadata(used_path(cache, hex)).and_then(|m| m.modified()).or_else(|_| meta.modified())?;
        entries.push(CacheEntry { sha256: hex.to_owned(), bytes, files, last_use });
    }
    entries.sort_by(|a, b| (a.last_use, &a.sha256).cmp(&(b.last_use, &b.sha256)));
    Ok(entries)
}

/// Bytes and files under `root`, each inode once, symlinks not followed.
fn tree_size(root: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut seen = HashSet::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

/// What a collection over one or several caches of a node removes: least
/// recently used content first, over all of them together, until they hold
/// at most `max_bytes`; pinned content stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    pub bytes_before: u64,
    /// What the caches would hold once `evict` is gone.
    pub bytes_after: u64,
    /// (index of the cache in the caller's list, content), oldest first.
    pub evict: Vec<(usize, CacheEntry)>,
    /// Over the limit but kept: pinned by a job.
    pub pinned: Vec<(usize, String)>,
}

/// Chooses what goes from `caches` (each listed by [`list`]) so that they
/// hold at most `max_bytes` together; `pinned(cache, digest)` keeps content.
pub fn choose(caches: &[Vec<CacheEntry>], max_bytes: u64, pinned: impl Fn(usize, &str) -> bool) -> Choice {
    let mut all: Vec<(usize, &CacheEntry)> =
        caches.iter().enumerate().flat_map(|(i, entries)| entries.iter().map(move |e| (i, e))).collect();
    all.sort_by(|a, b| (a.1.last_use, a.0, &a.1.sha256).cmp(&(b.1.last_use, b.0, &b.1.sha256)));
    let total: u64 = all.iter().map(|(_, e)| e.bytes).sum();
    let mut choice = Choice { bytes_before: total, bytes_after: total, ..Choice::default() };
    for (cache, entry) in all {
        if choice.bytes_after <= max_bytes {
            break;
        }
        if pinned(cache, &entry.sha256) {
            choice.pinned.push((cache, entry.sha256.clone()));
            continue;
        }
        choice.bytes_after -= entry.bytes;
        choice.evict.push((cache, entry.clone()));
    }
    choice
}

/// What [`evict`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictReport {
    pub removed: Vec<String>,
    /// Kept: being staged (its lock held).
    pub busy: Vec<String>,
}

/// Removes `digests` from the cache at `cache`, each under its lock (content
/// a staging holds stays, as `busy`; content not there counts as removed),
/// and what an earlier collection left half-done.
pub fn evict(cache: &Path, digests: &[String]) -> io::Result<EvictReport> {
    remove_leftovers(cache);
    let mut report = EvictReport::default();
    for hex in digests.iter().filter(|hex| is_hex64(hex)) {
        if remove(cache, hex)? {
            report.removed.push(hex.clone());
        } else {
            report.busy.push(hex.clone());
        }
    }
    if !report.removed.is_empty() {
        super::hub::prune_dangling(cache);
    }
    Ok(report)
}

/// Removes least recently used content of the cache at `cache` until it
/// holds at most `max_bytes`, keeping `pinned` digests and content whose
/// lock another staging holds: [`choose`] and [`evict`] over one cache.
pub fn collect(cache: &Path, max_bytes: u64, pinned: &HashSet<String>) -> io::Result<GcReport> {
    let entries = list(cache)?;
    let choice = choose(std::slice::from_ref(&entries), max_bytes, |_, hex| pinned.contains(hex));
    let digests: Vec<String> = choice.evict.iter().map(|(_, e)| e.sha256.clone()).collect();
    let evicted = evict(cache, &digests)?;
    let mut report = GcReport {
        bytes_before: choice.bytes_before,
        bytes_after: choice.bytes_before,
        pinned: choice.pinned.into_iter().map(|(_, hex)| hex).collect(),
        busy: evicted.busy,
        ..GcReport::default()
    };
    for (_, entry) in choice.evict.into_iter().filter(|(_, e)| evicted.removed.contains(&e.sha256)) {
        report.bytes_after -= entry.bytes;
        report.removed.push(entry);
    }
    Ok(report)
}

/// Removes one content under its lock; false when a staging holds the lock.
pub fn remove(cache: &Path, hex: &str) -> io::Result<bool> {
    let Some(lock) = try_lock(&lock_path(cache, hex))? else {
        return Ok(false);
    };
    let content = cache.join("sha256").join(hex);
    let trash = cache.join("partial").join(format!("gc-{hex}"));
    std::fs::create_dir_all(cache.join("partial"))?;
    remove_any(&trash)?;
    match std::fs::rename(&content, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let pieces = crate::job_files::content::pieces_dir(cache, hex);
    for done in [cache.join("sha256").join(format!("{hex}.manifest")), used_path(cache, hex), pieces] {
        remove_any(&done)?;
    }
    drop(lock);
    remove_any(&trash)?;
    Ok(true)
}

/// The lock a staging of content `hex` holds (see `crate::stage`).
fn lock_path(cache: &Path, hex: &str) -> PathBuf {
    cache.join("locks").join(format!("sha256-{hex}.lock"))
}

fn try_lock(path: &Path) -> io::Result<Option<Flock<File>>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// Removes a file, a link or a whole directory (links not followed); absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What a collection that crashed half-way left in `partial/`, and the
/// piece digests of content that is not in the cache (kept by a staging that
/// failed, or that a crashed collection left) unless a staging of it runs.
fn remove_leftovers(cache: &Path) {
    if let Ok(reader) = std::fs::read_dir(cache.join("partial")) {
        for entry in reader.flatten() {
            if entry.file_name().to_str().is_some_and(|n| n.starts_with("gc-")) {
                let _ = remove_any(&entry.path());
            }
        }
    }
    let Ok(reader) = std::fs::read_dir(cache.join("sha256")) else { return };
    for entry in reader.flatten() {
        let name = entry.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".pieces")).filter(|n| is_hex64(n)) else {
            continue;
        };
        if std::fs::symlink_metadata(cache.join("sha256").join(hex)).is_ok() {
            continue;
        }
        if let Ok(Some(_lock)) = try_lock(&lock_path(cache, hex)) {
            let _ = remove_any(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    /// Content `hex` of `size` bytes last used `age_s` seconds ago (a directory with a manifest).
    fn put(cache: &Path, n: u8, size: usize, age_s: u64) -> String {
        let hex = format!("{n:02x}").repeat(32);
        let dir = cache.join("sha256").join(&hex);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/w.bin"), vec![n; size]).unwrap();
        std::fs::hard_link(dir.join("sub/w.bin"), dir.join("again.bin")).unwrap();
        std::fs::write(cache.join("sha256").join(format!("{hex}.manifest")), b"m").unwrap();
        let pieces = crate::job_files::content::pieces_dir(cache, &hex);
        std::fs::create_dir_all(&pieces).unwrap();
        std::fs::write(pieces.join(format!("{}-65536", "ab".repeat(32))), b"digests").unwrap();
        record_use(cache, &dir);
        let when = SystemTime::now() - Duration::from_secs(age_s);
        File::options().write(true).open(used_path(cache, &hex)).unwrap().set_modified(when).unwrap();
        hex
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_cache_fits() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        let old = put(c, 1, 1000, 300);
        let older = put(c, 2, 1000, 600);
        let recent = put(c, 3, 1000, 10);
        assert_eq!(
            list(c).unwrap().iter().map(|e| e.sha256.clone()).collect::<Vec<_>>(),
            [older.clone(), old.clone(), recent.clone()]
        );
        assert_eq!(list(c).unwrap()[0].bytes, 1000, "a hard-linked file counts once");

        let report = collect(c, 2000, &HashSet::new()).unwrap();
        assert_eq!((report.bytes_before, report.bytes_after), (3000, 2000));
        assert_eq!(report.removed.iter().map(|e| e.sha256.as_str()).collect::<Vec<_>>(), [older.as_str()]);
        assert!(!c.join("sha256").join(&older).exists());
        assert!(!c.join("sha256").join(format!("{older}.manifest")).exists(), "not taken as cached later");
        assert!(!c.join("sha256").join(format!("{older}.pieces")).exists(), "its piece digests go with it");
        assert!(c.join("sha256").join(format!("{old}.pieces")).is_dir());
        assert!(!c.join("partial").join(format!("gc-{older}")).exists());
        assert!(c.join("sha256").join(&old).join("sub/w.bin").exists());

        // Under the limit: nothing goes.
        assert!(collect(c, 2000, &HashSet::new()).unwrap().removed.is_empty());
        // A use makes the older one the newest.
        record_use(c, &c.join("sha256").join(&old));
        let report = collect(c, 1000, &HashSet::new()).unwrap();
        assert_eq!(report.removed.iter().map(|e| e.sha256.clone()).collect::<Vec<_>>(), [recent]);
    }

    #[test]
    fn pinned_content_and_content_being_staged_stay() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        let pinned = put(c, 1, 100, 900);
        let staging = put(c, 2, 100, 800);
        let free = put(c, 3, 100, 700);
        let held = try_lock(&lock_path(c, &staging)).unwrap().unwrap();

        let report = collect(c, 0, &HashSet::from([pinned.clone()])).unwrap();
        assert_eq!(report.pinned, [pinned.as_str()]);
        assert_eq!(report.busy, [staging.as_str()]);
        assert_eq!(report.removed.iter().map(|e| e.sha256.clone()).collect::<Vec<_>>(), [free]);
        assert_eq!(report.bytes_after, 200);
        assert!(c.join("sha256").join(&staging).exists() && c.join("sha256").join(&pinned).exists());

        drop(held);
        assert_eq!(collect(c, 0, &HashSet::from([pinned])).unwrap().removed.len(), 1, "the lock let go");
    }

    #[test]
    fn a_node_wide_choice_takes_the_oldest_of_every_cache_together() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a_old = put(a.path(), 1, 1000, 900);
        let a_new = put(a.path(), 2, 1000, 10);
        let b_mid = put(b.path(), 3, 1000, 500);
        let b_pinned = put(b.path(), 4, 1000, 1000);
        let caches = [list(a.path()).unwrap(), list(b.path()).unwrap()];

        // 4000 bytes in both, 2000 allowed: the two oldest unpinned go, whichever cache holds them.
        let choice = choose(&caches, 2000, |cache, hex| cache == 1 && hex == b_pinned);
        let chosen: Vec<(usize, &str)> = choice.evict.iter().map(|(c, e)| (*c, e.sha256.as_str())).collect();
        assert_eq!(chosen, [(0, a_old.as_str()), (1, b_mid.as_str())]);
        assert_eq!(choice.pinned, [(1, b_pinned.clone())]);
        assert_eq!((choice.bytes_before, choice.bytes_after), (4000, 2000));
        // Each cache alone is at its 2000: a per-cache limit would remove nothing.
        assert!(choose(&caches[..1], 2000, |_, _| false).evict.is_empty());

        let report = evict(b.path(), std::slice::from_ref(&b_mid)).unwrap();
        assert_eq!(report.removed, std::slice::from_ref(&b_mid));
        assert!(!b.path().join("sha256").join(&b_mid).exists());
        assert!(a.path().join("sha256").join(&a_new).exists());
    }

    #[test]
    fn a_collection_stopped_half_way_is_finished_by_the_next() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        let hex = put(c, 1, 100, 100);
        // As a crash after the rename leaves it.
        std::fs::create_dir_all(c.join("partial")).unwrap();
        std::fs::rename(c.join("sha256").join(&hex), c.join("partial").join(format!("gc-{hex}"))).unwrap();
        assert!(list(c).unwrap().is_empty(), "not listed: not cached");
        // Piece digests of content being staged (its lock held) stay; of
        // content no longer here, or never completed, they go.
        let staging = "cd".repeat(32);
        std::fs::create_dir_all(crate::job_files::content::pieces_dir(c, &staging)).unwrap();
        let held = try_lock(&lock_path(c, &staging)).unwrap().unwrap();
        collect(c, u64::MAX, &HashSet::new()).unwrap();
        assert!(!c.join("partial").join(format!("gc-{hex}")).exists());
        assert!(!c.join("sha256").join(format!("{hex}.pieces")).exists());
        assert!(c.join("sha256").join(format!("{staging}.pieces")).exists());
        drop(held);
        collect(c, u64::MAX, &HashSet::new()).unwrap();
        assert!(!c.join("sha256").join(format!("{staging}.pieces")).exists());
    }
}
