//! Staging of a directory: its files copied several at a time into a work
//! copy, the manifest checked, then the copy renamed into the cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::fetch::{self, RetryPolicy};
use super::lock::ContentLock;
use super::progress::Meter;
use super::tree::{self, Listed, Tree};
use super::{Plan, Run, StageError, StageState, StagedItem, io_error, sync_dir, task_error};

impl Run {
    pub(super) async fn stage_tree(
        &self,
        plan: &Plan,
        root: &Path,
        meter: &Arc<Meter>,
        lock: Arc<ContentLock>,
    ) -> Result<StagedItem, StageError> {
        let (item, from) = (plan.name.clone(), root.to_owned());
        let tree = Arc::new(tokio::task::spawn_blocking(move || tree::walk(&item, &from)).await.map_err(task_error)??);
        let bytes = tree.bytes();
        meter.set_totals(Some(bytes), u32::try_from(tree.files.len()).unwrap_or(u32::MAX));
        let work = self.layout.work(&plan.key);
        let resume = plan.expected.is_some();
        let (item, w, t) = (plan.name.clone(), work.clone(), tree.clone());
        tokio::task::spawn_blocking(move || prepare_work(&item, &w, &t, resume)).await.map_err(task_error)??;
        meter.state(StageState::Copying).await;

        let mut listed = self.copy_files(plan, root, &work, &tree, meter, &lock).await?;
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
        let (c, t) = (copy.clone(), tree.clone());
        tokio::task::spawn_blocking(move || tree::seal(&c, &t))
            .await
            .map_err(task_error)?
            .map_err(io_error(&plan.name, "write", &copy))?;
        // The manifest first: a tree without one is not taken as cached.
        let manifest_path = self.layout.manifest(&digest);
        let manifest_tmp = work.join("manifest");
        tokio::fs::write(&manifest_tmp, &manifest).await.map_err(io_error(&plan.name, "write", &manifest_tmp))?;
        tokio::fs::rename(&manifest_tmp, &manifest_path).await.map_err(io_error(
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
        let w = work.clone();
        let _ = tokio::task::spawn_blocking(move || tree::remove_all(&w)).await;
        meter.set_done(bytes, u32::try_from(tree.files.len()).unwrap_or(u32::MAX));
        Ok(StagedItem { name: plan.name.clone(), path: content, sha256: digest, bytes, from_cache: false })
    }

    /// Copies the files of a directory, `parallel_files` at a time (shared
    /// with the other items); after a failure, waits for the copies under way
    /// to stop before returning.
    async fn copy_files(
        &self,
        plan: &Plan,
        root: &Path,
        work: &Path,
        tree: &Arc<Tree>,
        meter: &Arc<Meter>,
        lock: &Arc<ContentLock>,
    ) -> Result<Vec<(PathBuf, Listed)>, StageError> {
        let resume = plan.expected.is_some();
        let mut listed = Vec::with_capacity(tree.files.len());
        let mut running = JoinSet::new();
        let mut failure = None;
        let mut next = 0;
        loop {
            while failure.is_none() && next < tree.files.len() && running.len() < self.parallel_files {
                let permit = self.permits.clone().acquire_owned().await.map_err(|e| StageError::Task(e.to_string()))?;
                let (item, root, work, tree, meter, lock, retry) = (
                    plan.name.clone(),
                    root.to_owned(),
                    work.to_owned(),
                    tree.clone(),
                    meter.clone(),
                    lock.clone(),
                    self.retry,
                );
                let index = next;
                running.spawn_blocking(move || {
                    let (_permit, _lock) = (permit, lock);
                    copy_tree_file(&item, &root, &work, &tree.files[index], resume, &meter, &retry)
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

/// Copies one file of a directory into `tree/` through `incoming/`; a file
/// already in `tree/` (an earlier, interrupted staging) is hashed there
/// instead of read again from the source.
fn copy_tree_file(
    item: &str,
    root: &Path,
    work: &Path,
    file: &tree::TreeFile,
    resume: bool,
    meter: &Meter,
    retry: &RetryPolicy,
) -> Result<(PathBuf, Listed), StageError> {
    let done = work.join("tree").join(&file.rel);
    if resume
        && let Ok(meta) = std::fs::symlink_metadata(&done)
        && meta.is_file()
        && meta.len() == file.size
    {
        let finished = fetch::hash_file(&done, meter).map_err(io_error(item, "read", &done))?;
        meter.file_done();
        return Ok((file.rel.clone(), Listed::File { sha256: finished.sha256, size: finished.bytes }));
    }
    let incoming = work.join("incoming").join(&file.rel);
    let (partial, _) = fetch::copy_local(item, &root.join(&file.rel), &incoming, resume, meter, retry)?;
    let finished = partial.finish(Some(file.mode)).map_err(io_error(item, "write", &incoming))?;
    std::fs::rename(&incoming, &done).map_err(io_error(item, "write", &done))?;
    meter.file_done();
    Ok((file.rel.clone(), Listed::File { sha256: finished.sha256, size: finished.bytes }))
}
