//! Staging: copies a job's inputs that are not on a shared filesystem into this
//! node's cache before launch, verified by SHA-256. The job starts only when
//! every node has reported its items ready.
//!
//! Cache layout, under the cache dir:
//! - `sha256/<hex>/<basename>`: a staged file.
//! - `sha256/<hex>/`: a staged directory, and `sha256/<hex>.manifest` its
//!   manifest; the directory counts as cached only when both are there.
//! - `partial/<key>/`: work in progress: `<basename>.partial` for a file,
//!   `incoming/` (files being copied) and `tree/` (files done) for a directory.
//!   `<key>` is `sha256-<hex>` for an item that declares its digest, else
//!   `source-<hash of the source string>`.
//! - `locks/<key>.lock`: held (flock) while an item is staged, so that concurrent
//!   stagings of the same content, by tasks of one agent or by agents sharing
//!   the cache dir, make one copy: the second waits, then finds it cached.
//! - `sha256/<hex>.used`: its mtime is the content's last use (see `gc`).
//! - `hub/modelscope/...`, `hub/huggingface/...`: links to staged models in
//!   the hub libraries' cache layouts (see `hub`).
//! - `sources/<hash of the source>.json`: the digest of each file of a local
//!   source directory as last staged, with the files' identity and change
//!   times (see `record`): an unchanged source is not read again to learn its
//!   digest.
//!
//! Everything lands in the cache by a rename of data already flushed to disk and
//! verified, so a crash never leaves a complete-looking bad file. The files of a
//! directory are not flushed one by one as they are written: large ones are
//! flushed by a thread of their own while the next ones are copied, and one
//! `syncfs` at the end makes all of them, their directories and modes durable;
//! only then is the completion marker (the manifest, then the tree, renamed
//! into `sha256/`) written. The files of a directory are hashed and copied
//! several at a time (`parallel_files`), and a large file's hashing runs on a
//! thread of its own beside its reads and writes (a file's digest is one
//! sequential SHA-256, which cannot be split by chunk). SHA-256 is `sha2`'s,
//! which uses the CPU's SHA extensions (SHA-NI, ARMv8 crypto) when present. A leftover
//! partial is resumed (the digest covers the whole file) only when the item
//! declares its digest: without one nothing could tell a stale prefix from a
//! good one. For the same reason an item without a digest is always read from
//! its source; the controller should pin the digest a first staging reports.
//!
//! The digest of a directory is the SHA-256 of its manifest: one line per file
//! and per symlink, sorted bytewise by relative path ('/'-separated),
//! `<sha256> <size> <path>` for a file and `<sha256 of the link's target>
//! symlink <path>` for a link; directories and modes are not listed. For a
//! directory without symlinks:
//! ```sh
//! cd DIR && find . -type f -printf '%P\n' | LC_ALL=C sort | while IFS= read -r f; do
//!   printf '%s %s %s\n' "$(sha256sum < "$f" | cut -c1-64)" "$(stat -c %s "$f")" "$f"
//! done | sha256sum
//! ```

mod directory;
mod fetch;
pub mod gc;
pub mod hub;
mod lock;
mod progress;
mod record;
#[cfg(test)]
mod tests;
mod tree;
pub(crate) use fetch::MODE_BITS;
pub(crate) use tree::{ManifestOf, parse_manifest, prune_to, single_file_manifest, walk};

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

use self::fetch::RetryPolicy;
use self::lock::ContentLock;
use self::progress::Meter;

/// One input to stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageItem {
    pub name: String,
    /// An absolute local path (a file or a directory, e.g. on an NFS mount) or
    /// the http:// or https:// URL of a single file.
    pub source: String,
    /// Expected hex SHA-256 of a file, or of a directory's manifest.
    pub sha256: Option<String>,
    /// A hub model: the staged directory is also placed in that hub's cache
    /// layout under its id (see `hub`).
    #[serde(default)]
    pub model: Option<hub::HubModel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    Checking,
    Copying,
    Verifying,
    Ready,
    Cached,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    pub item: String,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub files_done: u32,
    pub files_total: u32,
    pub state: StageState,
    /// A file of a directory just done (copied and hashed), as the manifest
    /// will list it: what this node may serve its peers before the whole
    /// directory is staged (see `crate::peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileDone>,
    /// Once `Ready` or `Cached`: the content's hex SHA-256, which the
    /// controller passes to the nodes waiting for it (`crate::peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Once `Ready` or `Cached`: where it is (a directory's content
    /// directory, or the file in its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One file of a directory being staged, done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDone {
    /// Relative, '/'-separated, as in the manifest.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// An item in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedItem {
    pub name: String,
    /// Where the job finds it.
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// Found in the cache, not copied.
    pub from_cache: bool,
    /// For a model: the hub cache root it was placed in (see `hub`).
    #[serde(default)]
    pub hub_cache: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("stage item #{index} has no name; give every stage entry a name")]
    EmptyName { index: usize },
    #[error("stage item {item} is listed twice; give each stage entry its own name")]
    DuplicateName { item: String },
    #[error(
        "stage item {item}: source {from:?} is neither an absolute path nor an http:// or https:// URL of a file; \
         give an absolute path on the node or a URL"
    )]
    BadSource { item: String, from: String },
    #[error("stage item {item}: sha256 {digest:?} is not 64 hex digits; give the digest as sha256sum prints it")]
    BadDigest { item: String, digest: String },
    #[error(
        "stage item {item}: sha256 mismatch for {from}: declared {expected}, got {actual}; \
         fix the digest in the job's stage entry or restore the source (nothing was cached)"
    )]
    DigestMismatch { item: String, from: String, expected: String, actual: String },
    #[error("stage item {item}: cannot {action} {path}: {error}")]
    Io {
        item: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("stage item {item}: GET {url} answered {status}; check that the URL is right and the file is served")]
    HttpStatus { item: String, url: String, status: StatusCode },
    #[error("stage item {item}: downloading {url} failed {attempts} times, last: {error}")]
    Download { item: String, url: String, attempts: usize, error: String },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error(
        "stage item {item}: symlink {link} points to {target}, outside {root}; \
         make it point inside the directory or stage its target as an item of its own"
    )]
    LinkOutside { item: String, link: PathBuf, target: PathBuf, root: PathBuf },
    #[error("stage item {item}: symlink {link} -> {target} cannot be followed ({error}); fix or remove the link")]
    LinkUnresolved {
        item: String,
        link: PathBuf,
        target: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error(
        "stage item {item}: {path} is neither a file, a directory nor a symlink; remove it from the staged directory"
    )]
    Unsupported { item: String, path: PathBuf },
    #[error("stage item {item}: the name of {path:?} holds a newline, which the manifest cannot list; rename it")]
    NewlineInName { item: String, path: PathBuf },
    #[error("stage item {item}: model {model:?} is not a hub model id; write owner/name, e.g. Qwen/Qwen3-8B")]
    BadModel { item: String, model: String },
    #[error(
        "stage item {item}: model {model} must be staged from a directory (the model's files), not a single file; \
         give the model's directory as the source"
    )]
    ModelNotDirectory { item: String, model: String },
    #[error("stage item {item}: cancelled")]
    Cancelled { item: String },
    #[error("staging task failed: {0}")]
    Task(String),
}

/// Copies job inputs into the node's content-addressed cache.
#[derive(Debug, Clone)]
pub struct Stager {
    cache_dir: PathBuf,
    parallel_files: usize,
    retry: RetryPolicy,
    record_settle: Duration,
    source_read: Arc<AtomicU64>,
    hook: Hook,
}

/// How long before the listing of a source directory a file must have last
/// changed for its recorded digest to be trusted later (see `record`).
const RECORD_SETTLE: Duration = Duration::from_secs(2);

/// Points of a directory's staging where a test can stop it, as a crash would.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Every file written and renamed into the work copy; nothing synced.
    BeforeSync,
    /// The work copy is on disk.
    Synced,
    /// About to write the completion marker.
    BeforeMarker,
    /// Marked complete in the cache.
    Marked,
}

/// A test's hook at each `Step`; nothing outside tests.
#[derive(Clone, Default)]
struct Hook(#[cfg(test)] Option<Arc<dyn Fn(Step) -> io::Result<()> + Send + Sync>>);

impl Hook {
    fn at(&self, step: Step) -> io::Result<()> {
        #[cfg(test)]
        if let Some(hook) = &self.0 {
            return hook(step);
        }
        let _ = step;
        Ok(())
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl Stager {
    /// `parallel_files`: how many files are copied at once, over all items of a
    /// `stage` call.
    pub fn new(cache_dir: PathBuf, parallel_files: usize) -> Self {
        let retry =
            RetryPolicy { attempts: 6, first_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) };
        Self {
            cache_dir,
            parallel_files: parallel_files.max(1),
            retry,
            record_settle: RECORD_SETTLE,
            source_read: Arc::default(),
            hook: Hook::default(),
        }
    }

    /// How long before a source directory is listed its files must have last
    /// changed for their digests, recorded then, to be trusted by a later
    /// staging (default 2 s; more for a network filesystem with coarse
    /// timestamps, or whose clock runs behind this node's).
    pub fn with_record_settle(mut self, settle: Duration) -> Self {
        self.record_settle = settle;
        self
    }

    /// Bytes read from local sources (copied or hashed) by this stager and its
    /// clones so far.
    pub fn source_bytes_read(&self) -> u64 {
        self.source_read.load(Ordering::Relaxed)
    }

    /// How many times a transiently failing download or read is tried, and the
    /// first delay between tries (it doubles, up to 30 s).
    pub fn with_retries(mut self, attempts: usize, first_delay: Duration) -> Self {
        self.retry.attempts = attempts.max(1);
        self.retry.first_delay = first_delay;
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn parallel_files(&self) -> usize {
        self.parallel_files
    }

    /// Stages all items (several files at a time), reporting to `progress` as it
    /// goes; state changes wait for room in the channel, so drain it. Fails with
    /// the first item that fails; what was copied of the others stays for a
    /// resume.
    pub async fn stage(
        &self,
        items: &[StageItem],
        progress: mpsc::Sender<StageProgress>,
    ) -> Result<Vec<StagedItem>, StageError> {
        let plans = plan(items)?;
        let layout = Layout(self.cache_dir.clone());
        for dir in [layout.0.join("sha256"), layout.0.join("partial"), layout.0.join("locks"), layout.0.join("sources")]
        {
            let cache_error =
                |error| StageError::Io { item: "(cache)".into(), action: "create", path: dir.clone(), error };
            tokio::fs::create_dir_all(&dir).await.map_err(cache_error)?;
            // What is staged is its user's (or the agent's) alone; see `job_files::user_cache`.
            tokio::fs::set_permissions(&dir, Permissions::from_mode(0o700)).await.map_err(cache_error)?;
        }
        let http = if plans.iter().any(|p| matches!(p.source, Source::Url(_))) { Some(http_client()?) } else { None };
        let run = Arc::new(Run {
            layout,
            http,
            permits: Arc::new(Semaphore::new(self.parallel_files)),
            parallel_files: self.parallel_files,
            retry: self.retry,
            record_settle: self.record_settle,
            hook: self.hook.clone(),
        });
        let jobs = plans.into_iter().map(|plan| {
            let meter = Arc::new(Meter::new(plan.name.clone(), progress.clone(), self.source_read.clone()));
            let run = run.clone();
            async move { run.stage_item(plan, meter).await }
        });
        futures::future::try_join_all(jobs).await
    }
}

fn http_client() -> Result<reqwest::Client, StageError> {
    reqwest::Client::builder()
        .user_agent(concat!("cohort-agent/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| StageError::HttpClient(e.to_string()))
}

enum Source {
    Path(PathBuf),
    Url(Url),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Url(u) => u.to_string(),
        }
    }
}

/// A validated item.
struct Plan {
    name: String,
    source: Source,
    expected: Option<String>,
    /// Names the lock and the work dir: the digest when declared, else the source.
    key: String,
    /// The file name in the cache.
    basename: String,
    model: Option<hub::HubModel>,
}

/// Checks every item before anything is copied.
fn plan(items: &[StageItem]) -> Result<Vec<Plan>, StageError> {
    let mut names = HashSet::new();
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let name = item.name.trim().to_owned();
            if name.is_empty() {
                return Err(StageError::EmptyName { index });
            }
            if !names.insert(name.clone()) {
                return Err(StageError::DuplicateName { item: name });
            }
            let expected = match &item.sha256 {
                None => None,
                Some(digest) => {
                    let hex = digest.trim().to_ascii_lowercase();
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(StageError::BadDigest { item: name, digest: digest.clone() });
                    }
                    Some(hex)
                }
            };
            let bad_source = || StageError::BadSource { item: name.clone(), from: item.source.clone() };
            let fallback = if tree::is_plain_name(OsStr::new(&name)) { name.clone() } else { "input".to_owned() };
            let (source, basename) = if item.source.starts_with("http://") || item.source.starts_with("https://") {
                let url = Url::parse(&item.source).map_err(|_| bad_source())?;
                let last = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default().to_owned();
                let basename = if tree::is_plain_name(OsStr::new(&last)) { last } else { fallback };
                (Source::Url(url), basename)
            } else {
                let path = PathBuf::from(&item.source);
                if !path.is_absolute() {
                    return Err(bad_source());
                }
                let basename = path
                    .file_name()
                    .filter(|n| tree::is_plain_name(n))
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(bad_source)?;
                (Source::Path(path), basename)
            };
            let key = match &expected {
                Some(hex) => format!("sha256-{hex}"),
                None => format!("source-{:.32x}", Sha256::digest(item.source.as_bytes())),
            };
            if let Some(model) = &item.model
                && !cohort_shared::spec::is_model_id(&model.id)
            {
                return Err(StageError::BadModel { item: name, model: model.id.clone() });
            }
            Ok(Plan { name, source, expected, key, basename, model: item.model.clone() })
        })
        .collect()
}

struct Layout(PathBuf);

impl Layout {
    fn content(&self, hex: &str) -> PathBuf {
        self.0.join("sha256").join(hex)
    }
    fn manifest(&self, hex: &str) -> PathBuf {
        self.0.join("sha256").join(format!("{hex}.manifest"))
    }
    fn work(&self, key: &str) -> PathBuf {
        self.0.join("partial").join(key)
    }
    fn lock(&self, key: &str) -> PathBuf {
        self.0.join("locks").join(format!("{key}.lock"))
    }
    fn record(&self, source: &str) -> PathBuf {
        self.0.join("sources").join(format!("{:.32x}.json", Sha256::digest(source.as_bytes())))
    }
}

/// One `stage` call.
struct Run {
    layout: Layout,
    http: Option<reqwest::Client>,
    permits: Arc<Semaphore>,
    parallel_files: usize,
    retry: RetryPolicy,
    record_settle: Duration,
    hook: Hook,
}

/// Stops the item's blocking copies when its staging ends or is dropped.
struct CancelOnDrop(Arc<Meter>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn io_error(item: &str, action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StageError {
    let (item, path) = (item.to_owned(), path.to_owned());
    move |error| StageError::Io { item, action, path, error }
}

fn task_error(error: tokio::task::JoinError) -> StageError {
    StageError::Task(error.to_string())
}

impl Run {
    async fn stage_item(&self, plan: Plan, meter: Arc<Meter>) -> Result<StagedItem, StageError> {
        let _cancel = CancelOnDrop(meter.clone());
        let started = Instant::now();
        let result = match self.stage_item_inner(&plan, &meter).await {
            Ok(staged) => self.finish_item(&plan, staged).await,
            Err(error) => Err(error),
        };
        match &result {
            Ok(staged) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    item = %plan.name,
                    path = %staged.path.display(),
                    bytes = staged.bytes,
                    from_cache = staged.from_cache,
                    mib_per_s = if staged.from_cache || secs == 0.0 { 0.0 } else { staged.bytes as f64 / 1048576.0 / secs },
                    "staged"
                );
                let state = if staged.from_cache { StageState::Cached } else { StageState::Ready };
                meter.finished(state, &staged.sha256, &staged.path).await;
            }
            Err(error) => {
                tracing::warn!(item = %plan.name, from = %plan.source.describe(), %error, "staging failed");
                meter.state(StageState::Failed(error.to_string())).await;
            }
        }
        result
    }

    /// Records the content's use (for the garbage collection's LRU) and places
    /// a model in its hub layout.
    async fn finish_item(&self, plan: &Plan, mut staged: StagedItem) -> Result<StagedItem, StageError> {
        let content = if staged.path.parent() == Some(&self.layout.content(&staged.sha256)) {
            staged.path.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            staged.path.clone()
        };
        let (cache, model, item) = (self.layout.0.clone(), plan.model.clone(), plan.name.clone());
        let is_file = content != staged.path;
        let hub_cache = tokio::task::spawn_blocking(move || {
            gc::record_use(&cache, &content);
            match model {
                Some(model) if is_file => Err(StageError::ModelNotDirectory { item, model: model.id }),
                Some(model) => hub::place(&cache, &model, &item, &content).map(Some),
                None => Ok(None),
            }
        })
        .await
        .map_err(task_error)??;
        staged.hub_cache = hub_cache;
        Ok(staged)
    }

    async fn stage_item_inner(&self, plan: &Plan, meter: &Arc<Meter>) -> Result<StagedItem, StageError> {
        meter.state(StageState::Checking).await;
        if let Some(hit) = self.cached(plan, meter).await? {
            return Ok(hit);
        }
        let lock = Arc::new(lock::acquire(&plan.name, self.layout.lock(&plan.key)).await?);
        if let Some(hit) = self.cached(plan, meter).await? {
            return Ok(hit);
        }
        match &plan.source {
            Source::Url(url) => self.stage_file(plan, None, Some(url), meter, lock).await,
            Source::Path(path) => {
                let meta = tokio::fs::metadata(path).await.map_err(io_error(&plan.name, "read", path))?;
                if meta.is_dir() {
                    self.stage_tree(plan, path, meter, lock).await
                } else if meta.is_file() {
                    // A stat needs no read permission: nothing of the file is reported until it opens.
                    let from = path.clone();
                    tokio::task::spawn_blocking(move || fetch::open_source(&from))
                        .await
                        .map_err(task_error)?
                        .map_err(io_error(&plan.name, "read", path))?;
                    meter.set_totals(Some(meta.len()), 1);
                    self.stage_file(plan, Some(path), None, meter, lock).await
                } else {
                    Err(StageError::Unsupported { item: plan.name.clone(), path: path.clone() })
                }
            }
        }
    }

    /// The item if its declared digest is in the cache. A file cached under
    /// another name gets a hard link with this item's name.
    async fn cached(&self, plan: &Plan, meter: &Meter) -> Result<Option<StagedItem>, StageError> {
        let Some(hex) = &plan.expected else { return Ok(None) };
        let content = self.layout.content(hex);
        let hit = |path: PathBuf, bytes: u64, files: u32| {
            meter.set_totals(Some(bytes), files);
            meter.set_done(bytes, files);
            tracing::debug!(item = %plan.name, path = %path.display(), "found in the cache");
            Some(StagedItem {
                name: plan.name.clone(),
                path,
                sha256: hex.clone(),
                bytes,
                from_cache: true,
                hub_cache: None,
            })
        };
        if !tokio::fs::metadata(&content).await.is_ok_and(|m| m.is_dir()) {
            return Ok(None);
        }
        if let Ok(text) = tokio::fs::read(self.layout.manifest(hex)).await {
            let (bytes, files) = tree::manifest_totals(&text);
            return Ok(hit(content, bytes, files));
        }
        let file = content.join(&plan.basename);
        if let Ok(meta) = tokio::fs::symlink_metadata(&file).await
            && meta.is_file()
        {
            return Ok(hit(file, meta.len(), 1));
        }
        let mut entries = tokio::fs::read_dir(&content).await.map_err(io_error(&plan.name, "read", &content))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            if entry.file_type().await.is_ok_and(|t| t.is_file()) {
                match tokio::fs::hard_link(entry.path(), &file).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    // Nothing lost: the item is copied instead.
                    Err(_) => return Ok(None),
                }
                let bytes = tokio::fs::metadata(&file).await.map_err(io_error(&plan.name, "read", &file))?.len();
                return Ok(hit(file, bytes, 1));
            }
        }
        Ok(None)
    }

    async fn stage_file(
        &self,
        plan: &Plan,
        path: Option<&PathBuf>,
        url: Option<&Url>,
        meter: &Arc<Meter>,
        lock: Arc<ContentLock>,
    ) -> Result<StagedItem, StageError> {
        let work = self.layout.work(&plan.key);
        tokio::fs::create_dir_all(&work).await.map_err(io_error(&plan.name, "create", &work))?;
        let partial_path = work.join(format!("{}.partial", plan.basename));
        let resume = plan.expected.is_some();
        meter.state(StageState::Copying).await;
        let (partial, mode) = match (path, url, &self.http) {
            (Some(from), _, _) => {
                let (item, from, to, m, retry, thread_lock) =
                    (plan.name.clone(), from.clone(), partial_path.clone(), meter.clone(), self.retry, lock.clone());
                tokio::task::spawn_blocking(move || {
                    // Held as long as this thread writes the partial, even if the staging is dropped.
                    let _lock = thread_lock;
                    fetch::copy_local(&item, &from, &to, resume, &m, &retry)
                })
                .await
                .map_err(task_error)??
            }
            (None, Some(url), Some(client)) => {
                (fetch::download(client, &plan.name, url, &partial_path, resume, meter, &self.retry).await?, 0o644)
            }
            _ => return Err(StageError::Task("a file item without a source".into())),
        };
        meter.state(StageState::Verifying).await;
        let finished = tokio::task::spawn_blocking(move || partial.finish(Some(mode)))
            .await
            .map_err(task_error)?
            .map_err(io_error(&plan.name, "write", &partial_path))?;
        if let Some(expected) = &plan.expected
            && *expected != finished.sha256
        {
            let _ = tokio::fs::remove_dir_all(&work).await;
            return Err(StageError::DigestMismatch {
                item: plan.name.clone(),
                from: plan.source.describe(),
                expected: expected.clone(),
                actual: finished.sha256,
            });
        }
        let content = self.layout.content(&finished.sha256);
        tokio::fs::create_dir_all(&content).await.map_err(io_error(&plan.name, "create", &content))?;
        let target = content.join(&plan.basename);
        tokio::fs::rename(&partial_path, &target).await.map_err(io_error(&plan.name, "write", &target))?;
        sync_dir(&content).await.map_err(io_error(&plan.name, "write", &content))?;
        let _ = tokio::fs::remove_dir(&work).await;
        meter.set_done(finished.bytes, 1);
        drop(lock);
        Ok(StagedItem {
            name: plan.name.clone(),
            path: target,
            sha256: finished.sha256,
            bytes: finished.bytes,
            from_cache: false,
            hub_cache: None,
        })
    }
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await.map_err(io::Error::other)?
}
