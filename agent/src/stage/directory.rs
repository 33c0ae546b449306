//! Staging of a directory: its files copied several at a time into a work
//! copy, the manifest checked, then the copy renamed into the cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::task::{JoinHandle, JoinSet};

use super::fetch::{self, RetryPolicy};
use super::lock::ContentLock;
use super::progress::Meter;
use super::tree::{self, Listed, Tree};
use super::{Plan, Run, StageError, StageState, StagedItem, Step, io_error, record, sync_dir, task_error};

impl Run {
    pub(super) async fn stage_tree(
        &self,
        plan: &Plan,
        root: &Path,
        meter: &Arc<Meter>,
        lock: Arc<ContentLock>,
    ) -> Result<StagedItem, StageError> {
        let (item, from) = (plan.name.clone(), root.to_owned());
        let listed_at = SystemTime::now();
        let tree = Arc::new(tokio::task::spawn_blocking(move || tree::walk(&item, &from)).await.map_err(task_error)??);
        let bytes = tree.bytes();
        let files = u32::try_from(tree.files.len()).unwrap_or(u32::MAX);
        meter.set_totals(Some(bytes), files);
        let record_path = self.layout.record(&plan.source.describe());
        if plan.expected.is_none() {
            let (r, from, t) = (record_path.clone(), root.to_owned(), tree.clone());
            let known =
                tokio::task::spawn_blocking(move || record::known_digest(&r, &from, &t)).await.map_err(task_error)?;
            if let Some(digest) = known
                && self.tree_is_cached(&digest).await
            {
                tracing::debug!(item = %plan.name, %digest, "source unchanged since it was staged; found in the cache");
                meter.set_done(bytes, files);
                let path = self.layout.content(&digest);
                return Ok(StagedItem {
                    name: plan.name.clone(),
                    path,
                    sha256: digest,
                    bytes,
                    from_cache: true,
                    hub_cache: None,
                });
            }
        }
        let work = self.layout.work(&plan.key);
        let resume = plan.expected.is_some();
        let (item, w, t) = (plan.name.clone(), work.clone(), tree.clone());
        // Opened before any data is written, so that `syncfs` on it reports
        // every writeback error from here on (Linux 5.8 and later).
        let sync_handle = tokio::task::spawn_blocking(move || {
            prepare_work(&item, &w, &t, resume)?;
            File::open(&w).map_err(io_error(&item, "read", &w))
        })
        .await
        .map_err(task_error)??;
        meter.state(StageState::Copying).await;

        let (flush_queue, flushing) = start_flusher(plan.name.clone(), work.join("tree"));
        let shared = Arc::new(TreeCopy {
            item: plan.name.clone(),
            root: root.to_owned(),
            work: work.clone(),
            resume,
            retry: self.retry,
        });
        let copied = self.copy_files(shared, &tree, meter, &lock, flush_queue).await;
        let flushed = flushing.await.map_err(task_error).and_then(|r| r);
        let mut listed = copied?;
        flushed?;
        let digests: Vec<(PathBuf, String)> = listed
            .iter()
            .filter_map(|(rel, l)| match l {
                Listed::File { sha256, .. } => Some((rel.clone(), sha256.clone())),
                Listed::Link { .. } => None,
            })
            .collect();
        listed.extend(tree.links.iter().map(|l| (l.rel.clone(), Listed::Link { target: l.target.clone() })));

        meter.state(StageState::Verifying).await;
        let manifest = tree::manifest(listed);
        let digest = format!("{:x}", Sha256::digest(&manifest));
        if let Some(expected) = &plan.expected
            && *expected != digest
        {
            let _ = tokio::fs::remove_dir_all(&work).await;
            return Err(StageError::DigestMismatch {
                item: plan.name.clone(),
                from: plan.source.describe(),
                expected: expected.clone(),
                actual: digest,
            });
        }
        let copy = work.join("tree");
        let (c, t, hook) = (copy.clone(), tree.clone(), self.hook.clone());
        tokio::task::spawn_blocking(move || {
            tree::seal(&c, &t)?;
            hook.at(Step::BeforeSync)?;
            // Every file, directory entry and mode of the copy on disk at once
            // (one journal commit), before anything marks it complete.
            nix::unistd::syncfs(&sync_handle).map_err(std::io::Error::from)?;
            hook.at(Step::Synced)
        })
        .await
        .map_err(task_error)?
        .map_err(io_error(&plan.name, "write", &copy))?;
        // The completion marker: the manifest, then the tree, renamed into
        // `sha256/`; a tree without its manifest is not taken as cached.
        let manifest_path = self.layout.manifest(&digest);
        let (m, tmp, hook) = (manifest.clone(), work.join("manifest"), self.hook.clone());
        tokio::task::spawn_blocking(move || {
            hook.at(Step::BeforeMarker)?;
            let mut file = File::create(&tmp)?;
            file.write_all(&m)?;
            file.sync_all()
        })
        .await
        .map_err(task_error)?
        .map_err(io_error(&plan.name, "write", &work.join("manifest")))?;
        tokio::fs::rename(work.join("manifest"), &manifest_path).await.map_err(io_error(
            &plan.name,
            "write",
            &manifest_path,
        ))?;
        let content = self.layout.content(&digest);
        if let Err(error) = tokio::fs::rename(&copy, &content).await {
            // Staged meanwhile from another source with the same content.
            if !tokio::fs::metadata(&content).await.is_ok_and(|m| m.is_dir()) {
                return Err(io_error(&plan.name, "write", &content)(error));
            }
            tracing::info!(item = %plan.name, path = %content.display(), "same content staged meanwhile; keeping that copy");
        }
        let parent = self.layout.0.join("sha256");
        sync_dir(&parent).await.map_err(io_error(&plan.name, "write", &parent))?;
        self.hook.at(Step::Marked).map_err(io_error(&plan.name, "write", &content))?;
        let (w, from, t, settle) = (work.clone(), root.to_owned(), tree.clone(), self.record_settle);
        let _ = tokio::task::spawn_blocking(move || {
            // Only when every file was read from the source now: a resumed
            // partial's bytes came from the source as it was then.
            if !resume {
                record::save(&record_path, &from, &t, &digests, listed_at, settle);
            }
            tree::remove_all(&w)
        })
        .await;
        meter.set_done(bytes, files);
        Ok(StagedItem {
            name: plan.name.clone(),
            path: content,
            sha256: digest,
            bytes,
            from_cache: false,
            hub_cache: None,
        })
    }

    /// A directory with this digest and its manifest are in the cache.
    async fn tree_is_cached(&self, digest: &str) -> bool {
        tokio::fs::metadata(self.layout.content(digest)).await.is_ok_and(|m| m.is_dir())
            && tokio::fs::metadata(self.layout.manifest(digest)).await.is_ok_and(|m| m.is_file())
    }

    /// Copies the files of a directory, `parallel_files` at a time (shared
    /// with the other items); after a failure, waits for the copies under way
    /// to stop before returning.
    async fn copy_files(
        &self,
        copy: Arc<TreeCopy>,
        tree: &Arc<Tree>,
        meter: &Arc<Meter>,
        lock: &Arc<ContentLock>,
        flush_queue: SyncSender<File>,
    ) -> Result<Vec<(PathBuf, Listed)>, StageError> {
        let mut listed = Vec::with_capacity(tree.files.len());
        let mut running = JoinSet::new();
        let mut failure = None;
        let mut next = 0;
        loop {
            while failure.is_none() && next < tree.files.len() && running.len() < self.parallel_files {
                let permit = self.permits.clone().acquire_owned().await.map_err(|e| StageError::Task(e.to_string()))?;
                let (copy, tree, meter, lock, flush) =
                    (copy.clone(), tree.clone(), meter.clone(), lock.clone(), flush_queue.clone());
                let index = next;
                running.spawn_blocking(move || {
                    let (_permit, _lock) = (permit, lock);
                    copy_tree_file(&copy, &tree.files[index], &meter, &flush)
                });
                next += 1;
            }
            let Some(done) = running.join_next().await else { break };
            match done.map_err(task_error).and_then(|r| r) {
                Ok(entry) => listed.push(entry),
                Err(error) => {
                    meter.cancel();
                    failure.get_or_insert(error);
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(listed),
        }
    }
}

/// Makes the work dir of a directory item: `incoming/` and `tree/` with the
/// source's subdirectories, and its symlinks in `tree/`. Without a declared
/// digest a leftover is not trusted and goes first.
fn prepare_work(item: &str, work: &Path, tree: &Tree, resume: bool) -> Result<(), StageError> {
    if !resume && work.exists() {
        tree::remove_all(work).map_err(io_error(item, "remove", work))?;
    }
    let copy = work.join("tree");
    if copy.exists() {
        tree::prune(&copy, tree).map_err(io_error(item, "remove", &copy))?;
    }
    for base in [work.join("incoming"), work.join("tree")] {
        std::fs::create_dir_all(&base).map_err(io_error(item, "create", &base))?;
        for (rel, _) in &tree.dirs {
            let dir = base.join(rel);
            std::fs::create_dir_all(&dir).map_err(io_error(item, "create", &dir))?;
        }
    }
    for link in &tree.links {
        let path = work.join("tree").join(&link.rel);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).map_err(io_error(item, "remove", &path))?;
        }
        std::os::unix::fs::symlink(&link.target, &path).map_err(io_error(item, "create", &path))?;
    }
    Ok(())
}

/// Files from this size on are flushed as soon as they are written (by the
/// flusher, while the next ones are copied), so that the disk writes overlap
/// the copying and the final `syncfs` has little left to do. Smaller ones are
/// left to the `syncfs`: a flush each would cost a disk cache flush per file.
const FLUSH_EARLY_MIN: u64 = 4 << 20;

/// Files written but maybe not flushed yet, waiting for the flusher; a copy
/// waits when the disk is this far behind.
const FLUSH_QUEUE: usize = 16;

/// Starts the thread that flushes finished files (`sync_data`) in the order
/// they come, until the queue's senders are gone. It stops at the first error,
/// which it returns; the files queued after it are left to the `syncfs`
/// (which is not reached: the staging fails).
fn start_flusher(item: String, copy: PathBuf) -> (SyncSender<File>, JoinHandle<Result<(), StageError>>) {
    let (queue, files) = std::sync::mpsc::sync_channel::<File>(FLUSH_QUEUE);
    let flushing = tokio::task::spawn_blocking(move || {
        for file in files {
            file.sync_data().map_err(io_error(&item, "write", &copy))?;
        }
        Ok(())
    });
    (queue, flushing)
}

/// What the copies of one directory's files share.
struct TreeCopy {
    item: String,
    /// The source directory.
    root: PathBuf,
    /// The item's work dir.
    work: PathBuf,
    resume: bool,
    retry: RetryPolicy,
}

/// Copies one file of a directory into `tree/` through `incoming/`; a file
/// already in `tree/` (an earlier, interrupted staging) is hashed there
/// instead of read again from the source. A large file goes to the flusher.
fn copy_tree_file(
    copy: &TreeCopy,
    file: &tree::TreeFile,
    meter: &Meter,
    flush: &SyncSender<File>,
) -> Result<(PathBuf, Listed), StageError> {
    let TreeCopy { item, root, work, resume, retry } = copy;
    let (item, resume) = (item.as_str(), *resume);
    let done = work.join("tree").join(&file.rel);
    if resume
        && let Ok(meta) = std::fs::symlink_metadata(&done)
        && meta.is_file()
        && meta.len() == file.size
    {
        let finished = fetch::hash_file(&done, meter).map_err(io_error(item, "read", &done))?;
        meter.tree_file_done(&file.rel, finished.bytes, &finished.sha256);
        return Ok((file.rel.clone(), Listed::File { sha256: finished.sha256, size: finished.bytes }));
    }
    let incoming = work.join("incoming").join(&file.rel);
    let (partial, _) = fetch::copy_local(item, &root.join(&file.rel), &incoming, resume, meter, retry)?;
    let (finished, written) = partial.finish_unsynced(Some(file.mode)).map_err(io_error(item, "write", &incoming))?;
    if finished.bytes >= FLUSH_EARLY_MIN {
        // Fails only when the flusher stopped on an error, which fails the staging.
        let _ = flush.send(written);
    }
    std::fs::rename(&incoming, &done).map_err(io_error(item, "write", &done))?;
    meter.tree_file_done(&file.rel, finished.bytes, &finished.sha256);
    Ok((file.rel.clone(), Listed::File { sha256: finished.sha256, size: finished.bytes }))
}
