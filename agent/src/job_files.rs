//! Files a job names (its `stage:` sources, its datasets, its shared paths)
//! are touched only as the job's user, never as the agent's root (issue 14:
//! a submitter could read `/etc/shadow` through a staging, hang the agent on
//! a FIFO dataset, or create directories anywhere).
//!
//! The agent starts itself as `cohort-agent files-as uid:gid:groups`, with one
//! [`Request`] as JSON on stdin. That helper becomes the job's user first
//! ([`crate::rank_user::become_user`]), sets its resource limits
//! ([`Limits`]: address space, CPU time, size of the files it may write), and
//! only then opens anything; it answers with JSON lines ([`Reply`]) on stdout.
//! The agent kills it at its wall-clock deadline, so a FIFO, `/dev/zero`, a
//! hung NFS mount or a huge line costs the agent nothing but a child process.
//! Only regular files are read: a path that opens as anything else is refused
//! (the check is on the opened file, not on a name that could change).

mod checkpoint;
mod helper;
mod paths;
pub mod unpack;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use cohort_shared::dataset::DatasetReport;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::rank_user::RankIdentity;
use crate::stage::gc::{CacheEntry, EvictReport};
use crate::stage::{StageItem, StageProgress, StagedItem};

pub(crate) use helper::read_stdin_json;
pub use helper::{invoked, main as files_as_main};

/// The first argument that makes `cohort-agent` touch a job's files as its user.
pub const FILES_AS: &str = "files-as";
/// The most stderr kept from a helper, for the error that names its failure.
const MAX_STDERR: usize = 64 << 10;
/// The most a single reply line may hold (a dataset report is a few KiB).
const MAX_REPLY: usize = 16 << 20;

/// The bytes a request carries after its line on stdin (a sync archive).
pub type BodyStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, String>> + Send>>;

/// One thing the helper does as the job's user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Checks every row of a JSONL dataset.
    CheckDataset {
        path: PathBuf,
    },
    /// Creates `dir` (and its parents) and writes `marker` to a new file in it.
    WriteMarker {
        dir: PathBuf,
        file: PathBuf,
        marker: String,
    },
    /// Waits up to `wait_ms` for `file` to hold `marker`.
    ReadMarker {
        file: PathBuf,
        marker: String,
        wait_ms: u64,
    },
    RemoveMarker {
        file: PathBuf,
    },
    /// Stages `items` into `cache_dir` (the job user's own cache).
    Stage {
        cache_dir: PathBuf,
        parallel_files: usize,
        items: Vec<StageItem>,
    },
    /// Lists the content of `cache_dir` (one user's staging cache).
    ListCache {
        cache_dir: PathBuf,
    },
    /// Removes `digests` from `cache_dir` (one user's staging cache), each
    /// under its lock.
    EvictCache {
        cache_dir: PathBuf,
        digests: Vec<String>,
    },
    /// Finds the newest complete checkpoint under a job's save directory and
    /// repoints a tracker that names a half-written one.
    FindCheckpoint {
        directory: PathBuf,
    },
    /// Looks at a pipeline's path: its digest, its files, or removes it.
    InspectPath(InspectRequest),
    /// Unpacks the job's `sync:` archive into `dest`: its bytes follow this
    /// request's line on stdin ([`unpack`]).
    UnpackSync {
        dest: PathBuf,
        sha256: String,
        bytes: u64,
        files: u32,
        unpacked_bytes: u64,
    },
}

/// What [`Request::InspectPath`] does (the fields of `InspectPathCommand`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InspectRequest {
    pub path: PathBuf,
    pub digest: bool,
    pub read: bool,
    pub suffix: String,
    /// The most bytes read in all.
    pub max_bytes: u64,
    pub remove: bool,
}

/// The answer to [`Request::FindCheckpoint`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FoundCheckpoint {
    /// The newest complete checkpoint: iteration, path, layout name.
    pub checkpoint: Option<(u64, String, String)>,
    /// Why newer ones were passed over.
    pub skipped: Vec<String>,
}

/// The answer to [`Request::InspectPath`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathInfo {
    pub exists: bool,
    pub digest: String,
    pub files: Vec<FileRead>,
}

/// One file read by [`Request::InspectPath`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileRead {
    pub path: String,
    pub truncated: bool,
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

/// Bytes as base64 in the helper's JSON (a number per byte would quadruple it).
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// One line of the helper's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Dataset(Box<DatasetReport>),
    Progress(StageProgress),
    Staged(Vec<StagedItem>),
    CacheList(Vec<CacheEntry>),
    Evicted(EvictReport),
    Checkpoint(FoundCheckpoint),
    Path(PathInfo),
    /// A sync archive: unpacked (true), or already there (false).
    Unpacked(bool),
    Done,
    /// The operation failed; the message names the path and the fix.
    Failed(String),
}

/// What a helper may use. Exceeding the address space or the file size kills
/// it (or fails its allocation); CPU time past the limit, SIGKILL; the wall
/// clock is the agent's and covers a helper blocked in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_AS, bytes.
    pub address_space: u64,
    /// RLIMIT_CPU, seconds; None: unlimited.
    pub cpu_secs: Option<u64>,
    /// RLIMIT_FSIZE, bytes; None: unlimited.
    pub file_size: Option<u64>,
    /// Killed after this long; None: only when the agent drops the request.
    pub wall: Option<Duration>,
}

impl Request {
    /// The limits of each operation: a dataset check reads one line at a time
    /// and writes nothing; markers are a few bytes; a staging copies files of
    /// any size, as long as the job waits for it, in 1 MiB chunks.
    pub fn limits(&self) -> Limits {
        match self {
            Request::CheckDataset { .. } => Limits {
                address_space: 2 << 30,
                cpu_secs: Some(600),
                file_size: Some(0),
                wall: Some(Duration::from_secs(600)),
            },
            Request::WriteMarker { .. } | Request::RemoveMarker { .. } => Limits {
                address_space: 512 << 20,
                cpu_secs: Some(10),
                file_size: Some(4096),
                wall: Some(Duration::from_secs(30)),
            },
            Request::ReadMarker { wait_ms, .. } => Limits {
                address_space: 512 << 20,
                cpu_secs: Some(10),
                file_size: Some(0),
                wall: Some(Duration::from_millis(*wait_ms) + Duration::from_secs(30)),
            },
            Request::Stage { .. } => Limits { address_space: 16 << 30, cpu_secs: None, file_size: None, wall: None },
            // Lists, or removes; writes only empty lock files.
            Request::ListCache { .. } | Request::EvictCache { .. } => Limits {
                address_space: 2 << 30,
                cpu_secs: Some(600),
                file_size: Some(0),
                wall: Some(Duration::from_secs(1800)),
            },
            // Reads small files (tracker, metadata); writes only the tracker.
            Request::FindCheckpoint { .. } => Limits {
                address_space: 2 << 30,
                cpu_secs: Some(120),
                file_size: Some(64),
                wall: Some(Duration::from_secs(300)),
            },
            // Writes the archive's files, none larger than all of them together.
            Request::UnpackSync { unpacked_bytes, .. } => Limits {
                address_space: 2 << 30,
                cpu_secs: Some(1200),
                file_size: Some((*unpacked_bytes).max(1)),
                wall: Some(Duration::from_secs(1800)),
            },
            // A digest reads a whole model (16 GB for Qwen3-8B); a read takes at most `max_bytes`.
            Request::InspectPath(inspect) => Limits {
                address_space: 4 << 30,
                cpu_secs: None,
                file_size: Some(0),
                wall: Some(Duration::from_secs(if inspect.digest || inspect.remove { 3600 } else { 300 })),
            },
        }
    }

    /// What the request touches, for errors.
    fn describe(&self) -> String {
        match self {
            Request::CheckDataset { path } => format!("the check of dataset {}", path.display()),
            Request::WriteMarker { file, .. } => format!("writing the marker {}", file.display()),
            Request::ReadMarker { file, .. } => format!("reading the marker {}", file.display()),
            Request::RemoveMarker { file } => format!("removing the marker {}", file.display()),
            Request::Stage { items, .. } => {
                let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
                format!("the staging of {}", names.join(", "))
            }
            Request::ListCache { cache_dir } => format!("the listing of the cache {}", cache_dir.display()),
            Request::EvictCache { cache_dir, .. } => format!("removing content from the cache {}", cache_dir.display()),
            Request::FindCheckpoint { directory } => format!("the checkpoint search in {}", directory.display()),
            Request::InspectPath(inspect) => format!("looking at {}", inspect.path.display()),
            Request::UnpackSync { dest, .. } => format!("unpacking the job's sync archive into {}", dest.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobFilesError {
    /// The helper ran and refused: the path and the fix are in the message.
    #[error("{0}")]
    Refused(String),
    #[error("{what} did not finish within {limit:?} and was killed (a FIFO, a device or a hung mount?)")]
    Timeout { what: String, limit: Duration },
    #[error("{what} was killed: {cause}")]
    Killed { what: String, cause: String },
    #[error("{what}: the helper failed ({status}): {stderr}")]
    Helper { what: String, status: String, stderr: String },
    #[error("cannot start the helper for {what}: {error}")]
    Spawn { what: String, error: std::io::Error },
    #[error("cannot prepare the staging cache {}: {error}; check --cache-dir", path.display())]
    Cache { path: PathBuf, error: std::io::Error },
}

/// Runs [`Request`]s as one job's user, through `helper` (`/proc/self/exe`
/// in the daemon).
#[derive(Clone, Copy)]
pub struct AsJobUser<'a> {
    pub identity: &'a RankIdentity,
    pub helper: &'a Path,
}

impl AsJobUser<'_> {
    /// Checks a JSONL dataset; a file that cannot be read is an error.
    pub async fn check_dataset(&self, path: &Path) -> Result<DatasetReport, JobFilesError> {
        match self.run(Request::CheckDataset { path: path.to_owned() }, None).await? {
            Reply::Dataset(report) => Ok(*report),
            other => Err(unexpected(other)),
        }
    }

    pub async fn write_marker(&self, dir: &Path, file: &Path, marker: &str) -> Result<(), JobFilesError> {
        let request = Request::WriteMarker { dir: dir.to_owned(), file: file.to_owned(), marker: marker.to_owned() };
        self.run(request, None).await.map(|_| ())
    }

    pub async fn read_marker(&self, file: &Path, marker: &str, wait: Duration) -> Result<(), JobFilesError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let request = Request::ReadMarker { file: file.to_owned(), marker: marker.to_owned(), wait_ms };
        self.run(request, None).await.map(|_| ())
    }

    pub async fn remove_marker(&self, file: &Path) -> Result<(), JobFilesError> {
        self.run(Request::RemoveMarker { file: file.to_owned() }, None).await.map(|_| ())
    }

    /// Stages `items` into this user's cache under `cache_root` (see
    /// [`user_cache`]), reporting progress as it goes.
    pub async fn stage(
        &self,
        cache_root: &Path,
        parallel_files: usize,
        items: Vec<StageItem>,
        progress: mpsc::Sender<StageProgress>,
    ) -> Result<Vec<StagedItem>, JobFilesError> {
        let cache_dir = user_cache(cache_root, self.identity)?;
        let request = Request::Stage { cache_dir, parallel_files, items };
        match self.run(request, Some(progress)).await? {
            Reply::Staged(staged) => Ok(staged),
            other => Err(unexpected(other)),
        }
    }

    /// The content of this user's cache at `cache_dir` (from [`user_cache`]), least recently used first.
    pub async fn list_cache(&self, cache_dir: &Path) -> Result<Vec<CacheEntry>, JobFilesError> {
        match self.run(Request::ListCache { cache_dir: cache_dir.to_owned() }, None).await? {
            Reply::CacheList(entries) => Ok(entries),
            other => Err(unexpected(other)),
        }
    }

    /// Removes `digests` from this user's cache at `cache_dir`.
    pub async fn evict_cache(&self, cache_dir: &Path, digests: Vec<String>) -> Result<EvictReport, JobFilesError> {
        match self.run(Request::EvictCache { cache_dir: cache_dir.to_owned(), digests }, None).await? {
            Reply::Evicted(report) => Ok(report),
            other => Err(unexpected(other)),
        }
    }

    /// The newest complete checkpoint under a job's save directory.
    pub async fn find_checkpoint(&self, directory: &Path) -> Result<FoundCheckpoint, JobFilesError> {
        match self.run(Request::FindCheckpoint { directory: directory.to_owned() }, None).await? {
            Reply::Checkpoint(found) => Ok(found),
            other => Err(unexpected(other)),
        }
    }

    /// Digests, reads or removes a pipeline's path.
    pub async fn inspect_path(&self, inspect: InspectRequest) -> Result<PathInfo, JobFilesError> {
        match self.run(Request::InspectPath(inspect), None).await? {
            Reply::Path(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Unpacks a job's `sync:` archive, whose bytes `body` yields, into
    /// `dest` (made by the agent, owned by the user). Returns false when
    /// `dest` already held it (an earlier attempt on this node).
    pub async fn unpack_sync(
        &self,
        dest: &Path,
        archive: &cohort_proto::SyncArchive,
        body: BodyStream,
    ) -> Result<bool, JobFilesError> {
        let request = Request::UnpackSync {
            dest: dest.to_owned(),
            sha256: archive.sha256.clone(),
            bytes: archive.bytes,
            files: archive.files,
            unpacked_bytes: archive.unpacked_bytes,
        };
        match self.run_with_body(request, None, Some(body)).await? {
            Reply::Unpacked(fresh) => Ok(fresh),
            other => Err(unexpected(other)),
        }
    }

    /// Runs one request; progress lines go to `progress`, the last line is the answer.
    async fn run(
        &self,
        request: Request,
        progress: Option<mpsc::Sender<StageProgress>>,
    ) -> Result<Reply, JobFilesError> {
        self.run_with_body(request, progress, None).await
    }

    /// [`Self::run`], with `body`'s bytes on stdin after the request's line.
    async fn run_with_body(
        &self,
        request: Request,
        progress: Option<mpsc::Sender<StageProgress>>,
        body: Option<BodyStream>,
    ) -> Result<Reply, JobFilesError> {
        let what = request.describe();
        let limits = request.limits();
        let mut command = tokio::process::Command::new(self.helper);
        command
            .arg0("cohort-agent")
            .arg(FILES_AS)
            .arg(self.identity.to_arg())
            // Nothing of the agent's environment reaches a process of the job's user.
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| JobFilesError::Spawn { what: what.clone(), error })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let body_error = std::sync::Mutex::new(None);
        let talk = async {
            let write = async {
                let Some(mut stdin) = stdin else { return };
                let mut input = serde_json::to_vec(&request).unwrap_or_default();
                input.push(b'\n');
                // A helper that died before reading shows in its exit status and stderr.
                if stdin.write_all(&input).await.is_err() {
                    return;
                }
                if let Some(mut body) = body {
                    use futures::StreamExt as _;
                    while let Some(chunk) = body.next().await {
                        match chunk {
                            // A helper that stopped reading (done, or refused) closes the pipe.
                            Ok(bytes) if stdin.write_all(&bytes).await.is_ok() => {}
                            Ok(_) => break,
                            Err(e) => {
                                *body_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                                break;
                            }
                        }
                    }
                }
                // Dropped: stdin closes, the helper sees the end.
            };
            let replies = read_replies(stdout, progress);
            let (_, last, stderr, status) = tokio::join!(write, replies, read_stderr(stderr), child.wait());
            (last, stderr, status)
        };
        let (last, stderr, status) = match limits.wall {
            Some(limit) => match tokio::time::timeout(limit, talk).await {
                Ok(done) => done,
                // Dropping `talk` and `child` kills the helper (kill_on_drop).
                Err(_) => return Err(JobFilesError::Timeout { what, limit }),
            },
            None => talk.await,
        };
        if let Some(error) = body_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            return Err(JobFilesError::Refused(format!("{what}: the bytes stopped coming: {error}")));
        }
        match last {
            Some(Reply::Failed(message)) => Err(JobFilesError::Refused(message)),
            Some(reply) if status.as_ref().is_ok_and(ExitStatus::success) => Ok(reply),
            _ => Err(explain_exit(what, &limits, status, stderr)),
        }
    }
}

/// The last reply on `stdout`, after forwarding every progress line.
async fn read_replies(
    stdout: Option<tokio::process::ChildStdout>,
    progress: Option<mpsc::Sender<StageProgress>>,
) -> Option<Reply> {
    let stdout = stdout?;
    let mut lines = BufReader::new(stdout);
    let mut last = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_REPLY as u64);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return last,
            Ok(_) => {}
        }
        match serde_json::from_slice::<Reply>(&line) {
            Ok(Reply::Progress(p)) => {
                if let Some(tx) = &progress {
                    let _ = tx.send(p).await;
                }
            }
            Ok(reply) => last = Some(reply),
            Err(_) => {}
        }
    }
}

async fn read_stderr(stderr: Option<tokio::process::ChildStderr>) -> String {
    let Some(stderr) = stderr else { return String::new() };
    let mut kept = Vec::new();
    let _ = stderr.take(MAX_STDERR as u64).read_to_end(&mut kept).await;
    String::from_utf8_lossy(&kept).trim().to_owned()
}

fn explain_exit(what: String, limits: &Limits, status: std::io::Result<ExitStatus>, stderr: String) -> JobFilesError {
    let status = match status {
        Ok(status) => status,
        Err(e) => return JobFilesError::Helper { what, status: "not waited for".into(), stderr: e.to_string() },
    };
    let gib = |bytes: u64| format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30));
    let cause = match status.signal() {
        Some(nix::libc::SIGXCPU) | Some(nix::libc::SIGKILL) if limits.cpu_secs.is_some() => {
            Some(format!("it used up its {} s of CPU time (or was killed)", limits.cpu_secs.unwrap_or_default()))
        }
        Some(nix::libc::SIGABRT) | Some(nix::libc::SIGSEGV) | Some(nix::libc::SIGBUS) => Some(format!(
            "it ran out of its {} memory limit (a line or file too large to check?)",
            gib(limits.address_space)
        )),
        Some(nix::libc::SIGXFSZ) => Some("it wrote more than its file size limit".to_owned()),
        Some(signal) => Some(format!("signal {signal}")),
        None => None,
    };
    match cause {
        Some(cause) => JobFilesError::Killed { what, cause },
        None => JobFilesError::Helper { what, status: status.to_string(), stderr },
    }
}

fn unexpected(reply: Reply) -> JobFilesError {
    JobFilesError::Helper {
        what: "a job file operation".into(),
        status: "bad answer".into(),
        stderr: format!("{reply:?}"),
    }
}

/// The staging cache of `identity`: `cache_root` itself for the agent's own
/// user, else `cache_root/users/<uid>`, owned by that user and mode 0700, so
/// that nothing staged from a source only that user could read is readable
/// by any other (and one user's cached digests never answer another's).
pub fn user_cache(cache_root: &Path, identity: &RankIdentity) -> Result<PathBuf, JobFilesError> {
    if !identity.needs_switch() {
        return Ok(cache_root.to_owned());
    }
    let users = cache_root.join("users");
    let error = |path: &Path| {
        let path = path.to_owned();
        move |error| JobFilesError::Cache { path, error }
    };
    std::fs::create_dir_all(&users).map_err(error(&users))?;
    let dir = users.join(identity.uid.to_string());
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(error(&dir)(e)),
    }
    // `users/` is the agent's: only it could have put something else here.
    let meta = std::fs::symlink_metadata(&dir).map_err(error(&dir))?;
    if !meta.is_dir() {
        return Err(error(&dir)(std::io::Error::other("not a directory; remove it")));
    }
    std::os::unix::fs::lchown(&dir, Some(identity.uid), Some(identity.gid)).map_err(error(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(error(&dir))?;
    Ok(dir)
}
