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
pub mod content;
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

pub use content::{PieceOf, Span, is_sha256_hex};
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
    /// Sends a file of content `sha256` in the cache `cache_dir` (one user's
    /// staging cache): its manifest (`part` None; complete content only) or
    /// the file `part` (relative, as the manifest lists it), from the
    /// complete content or else from a staging of it under way. Answered by
    /// [`Reply::Content`] and then the file's bytes on stdout, or by
    /// [`Reply::Missing`].
    ReadContent {
        cache_dir: PathBuf,
        sha256: String,
        part: Option<PathBuf>,
        /// Only these bytes of the file `part` (one piece of it), which may
        /// then also be a file still coming in pieces.
        #[serde(default)]
        span: Option<content::Span>,
    },
    /// Writes the file `rel` of directory content `sha256` into the staging
    /// of it under way in `cache_dir` (`partial/sha256-<hex>/tree/`), if its
    /// `size` bytes, which follow this request's line on stdin, hash to
    /// `file_sha256`: [`Reply::Done`], [`Reply::Short`] or [`Reply::Corrupt`].
    ReceiveFile {
        #[serde(flatten)]
        file: FileAt,
        /// Only this piece of the file, which hashes to the piece's own
        /// digest, written at its place ([`content::receive_piece`]); the
        /// file is completed by [`Request::FinishFile`].
        #[serde(default)]
        piece: Option<content::PieceOf>,
    },
    /// Completes the file `rel` whose pieces were received: moved into the
    /// staging's `tree/` if its `size` bytes hash to `file_sha256`
    /// ([`Reply::Done`]), else removed ([`Reply::Corrupt`]).
    FinishFile(FileAt),
    /// The digest of each `piece_bytes`-long piece of the file `rel` of
    /// content `sha256` ([`Reply::Pieces`], or [`Reply::Missing`]), if the
    /// whole still hashes to `file_sha256` (else [`Reply::Corrupt`]).
    PieceDigests {
        cache_dir: PathBuf,
        sha256: String,
        rel: PathBuf,
        piece_bytes: u64,
        file_sha256: String,
    },
    /// Completes the staging of directory content `sha256` in `cache_dir`
    /// whose files were received ([`Request::ReceiveFile`]): its manifest,
    /// `manifest_bytes` bytes, follows this request's line on stdin (a
    /// manifest may be larger than a request line may be).
    FinishTree {
        cache_dir: PathBuf,
        sha256: String,
        manifest_bytes: u64,
        /// The modes the content's paths get ([`Request::ContentModes`] of
        /// the node that sent the manifest).
        #[serde(default)]
        modes: Vec<content::PathMode>,
    },
    /// The modes of complete content `sha256` in `cache_dir` that differ
    /// from the defaults ([`Reply::Modes`], or [`Reply::Missing`]).
    ContentModes {
        cache_dir: PathBuf,
        sha256: String,
    },
}

/// A file of directory content `sha256` in a user's staging cache: `rel`
/// (as the manifest lists it), `size` bytes that hash to `file_sha256`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileAt {
    pub cache_dir: PathBuf,
    pub sha256: String,
    pub rel: PathBuf,
    pub size: u64,
    pub file_sha256: String,
    /// For [`Request::FinishFile`]: the digests its pieces of `piece_bytes`
    /// were checked against, kept once the whole matches (a peer asking
    /// later, also of a restarted agent, gets them without a hash).
    #[serde(default)]
    pub piece_bytes: u64,
    #[serde(default)]
    pub piece_sha256: Vec<String>,
}

impl FileAt {
    pub fn new(cache_dir: &Path, sha256: &str, rel: &Path, size: u64, file_sha256: &str) -> Self {
        Self {
            cache_dir: cache_dir.to_owned(),
            sha256: sha256.to_owned(),
            rel: rel.to_owned(),
            size,
            file_sha256: file_sha256.to_owned(),
            piece_bytes: 0,
            piece_sha256: Vec::new(),
        }
    }

    /// The file, completed from pieces of `piece_bytes` with these digests.
    pub fn with_pieces(self, piece_bytes: u64, piece_sha256: Vec<String>) -> Self {
        Self { piece_bytes, piece_sha256, ..self }
    }

    fn incoming(&self) -> content::Incoming<'_> {
        content::Incoming {
            cache_dir: &self.cache_dir,
            hex: &self.sha256,
            rel: &self.rel,
            size: self.size,
            sha256: &self.file_sha256,
        }
    }
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
    /// A directory (followed through symlinks), as the user sees it.
    #[serde(default)]
    pub is_dir: bool,
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
    /// A file of content follows: exactly `bytes` bytes after this line
    /// ([`Request::ReadContent`]).
    Content {
        bytes: u64,
    },
    /// The content, or that file of it, is not in this cache (yet).
    Missing,
    /// Hex SHA-256 of each piece of a file, in order ([`Request::PieceDigests`]).
    Pieces(Vec<String>),
    /// The modes of a content's paths ([`Request::ContentModes`]).
    Modes(Vec<content::PathMode>),
    /// A received file came short: only `got` bytes arrived (nothing kept).
    Short {
        got: u64,
    },
    /// A received file's bytes hash to `actual`, not to its digest (nothing kept).
    Corrupt {
        actual: String,
    },
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
            // Sends one file, for as long as the agent reads it (a large one
            // over a slow link): dropping the reader kills the helper.
            Request::ReadContent { .. } => {
                Limits { address_space: 1 << 30, cpu_secs: None, file_size: Some(0), wall: None }
            }
            // Writes one file of `size` bytes (or a piece of it), for as long as its bytes come.
            Request::ReceiveFile { file: FileAt { size, .. }, .. } => {
                Limits { address_space: 1 << 30, cpu_secs: None, file_size: Some((*size).max(1)), wall: None }
            }
            // Reads one file (a 4 GB shard of a model) and renames it;
            // keeps its piece digests.
            Request::FinishFile(file) => Limits {
                address_space: 1 << 30,
                cpu_secs: None,
                file_size: Some(
                    (file.piece_sha256.len() as u64 * content::PIECE_RECORD_LINE).clamp(1, content::MAX_PIECES_RECORD),
                ),
                wall: Some(Duration::from_secs(3600)),
            },
            Request::PieceDigests { .. } => Limits {
                address_space: 1 << 30,
                cpu_secs: None,
                file_size: Some(content::MAX_PIECES_RECORD),
                wall: Some(Duration::from_secs(3600)),
            },
            // Reads and checks a manifest (up to a million files), writes it
            // once, syncs the filesystem; may wait for the content's lock.
            Request::FinishTree { manifest_bytes, .. } => Limits {
                address_space: 4 << 30,
                cpu_secs: Some(600),
                file_size: Some((*manifest_bytes).max(1)),
                wall: Some(Duration::from_secs(3600)),
            },
            // Looks at every entry of a content (up to a few million).
            Request::ContentModes { .. } => Limits {
                address_space: 2 << 30,
                cpu_secs: Some(300),
                file_size: Some(0),
                wall: Some(Duration::from_secs(600)),
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
            Request::ReadContent { cache_dir, sha256, part: None, .. } => {
                format!("reading the manifest of {sha256} in the cache {}", cache_dir.display())
            }
            Request::ReadContent { cache_dir, sha256, part: Some(part), .. } => {
                format!("reading {} of {sha256} in the cache {}", part.display(), cache_dir.display())
            }
            Request::ReceiveFile { file: FileAt { cache_dir, sha256, rel, .. }, .. } => {
                format!("receiving {} of {sha256} into the cache {}", rel.display(), cache_dir.display())
            }
            Request::FinishTree { cache_dir, sha256, .. } => {
                format!("completing {sha256} in the cache {}", cache_dir.display())
            }
            Request::FinishFile(FileAt { cache_dir, sha256, rel, .. }) => {
                format!("completing {} of {sha256} in the cache {}", rel.display(), cache_dir.display())
            }
            Request::PieceDigests { cache_dir, sha256, rel, .. } => {
                format!("hashing the pieces of {} of {sha256} in the cache {}", rel.display(), cache_dir.display())
            }
            Request::ContentModes { cache_dir, sha256 } => {
                format!("listing the modes of {sha256} in the cache {}", cache_dir.display())
            }
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

    /// Reads a file of content `sha256` in this user's cache at `cache_dir`
    /// (from [`user_cache`]): its manifest (`part` None; only once the
    /// content is complete), or its file `part` (relative, as the manifest
    /// lists it) from the complete content or else from a staging of it under
    /// way. None: that is not here (yet). The bytes come from the helper as
    /// the [`ContentReader`] is read; dropping it kills the helper.
    ///
    /// With `span`, only those bytes of the file `part` (one piece of it),
    /// which may also be a file still coming in pieces.
    pub async fn read_content(
        &self,
        cache_dir: &Path,
        sha256: &str,
        part: Option<&Path>,
        span: Option<Span>,
    ) -> Result<Option<ContentReader>, JobFilesError> {
        let request = Request::ReadContent {
            cache_dir: cache_dir.to_owned(),
            sha256: sha256.to_owned(),
            part: part.map(Path::to_owned),
            span,
        };
        let what = request.describe();
        let limits = request.limits();
        let mut child = self.spawn(&what)?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut input = serde_json::to_vec(&request).unwrap_or_default();
            input.push(b'\n');
            // A helper that died before reading shows in its exit status and stderr.
            let _ = stdin.write_all(&input).await;
        }
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let answer = async {
            let mut stdout = BufReader::with_capacity(CONTENT_CHUNK, stdout?);
            let mut line = Vec::new();
            (&mut stdout).take(MAX_REPLY as u64).read_until(b'\n', &mut line).await.ok()?;
            Some((serde_json::from_slice::<Reply>(&line).ok(), stdout))
        };
        // Dropping `child` on a timeout kills the helper (kill_on_drop).
        let answer = tokio::time::timeout(CONTENT_ANSWER_WAIT, answer)
            .await
            .map_err(|_| JobFilesError::Timeout { what: what.clone(), limit: CONTENT_ANSWER_WAIT })?;
        let reply = match answer {
            Some((Some(Reply::Content { bytes }), stdout)) => {
                let flow = ContentFlow { child, stdout, stderr, left: bytes, bytes, what, limits };
                return Ok(Some(ContentReader::new(bytes, flow)));
            }
            Some((reply, _)) => reply,
            None => None,
        };
        let status = tokio::time::timeout(CONTENT_ANSWER_WAIT, child.wait()).await.unwrap_or_else(|_| {
            Err(std::io::Error::other(format!("it did not exit within {CONTENT_ANSWER_WAIT:?} of its answer")))
        });
        match reply {
            Some(Reply::Missing) if status.as_ref().is_ok_and(ExitStatus::success) => Ok(None),
            Some(Reply::Failed(message)) => Err(JobFilesError::Refused(message)),
            Some(reply) if status.as_ref().is_ok_and(ExitStatus::success) => Err(unexpected(reply)),
            _ => Err(explain_exit(what, &limits, status, read_stderr(stderr).await)),
        }
    }

    /// Writes the file `rel` of directory content `sha256`, `size` bytes that
    /// `body` yields, into the staging of that content under way in this
    /// user's cache at `cache_dir`, if they hash to `file_sha256`. Short and
    /// corrupt bytes leave nothing behind and are answers, not errors; a
    /// `body` that fails is an error. Content already complete there is
    /// [`Received::Done`] without a byte read.
    ///
    /// With `piece`, `body` yields only that piece, checked against the
    /// piece's digest and written at its place; the file is then completed
    /// by [`Self::finish_file`] once every piece is there. Pieces are
    /// received at once, and short or corrupt ones are written over.
    #[allow(clippy::too_many_arguments)]
    pub async fn receive_file(
        &self,
        cache_dir: &Path,
        sha256: &str,
        rel: &Path,
        size: u64,
        file_sha256: &str,
        piece: Option<PieceOf>,
        body: BodyStream,
    ) -> Result<Received, JobFilesError> {
        let request = Request::ReceiveFile { file: FileAt::new(cache_dir, sha256, rel, size, file_sha256), piece };
        received(self.run_with_body(request, None, Some(body)).await?)
    }

    /// Completes `file` whose pieces [`Self::receive_file`] wrote:
    /// [`Received::Done`] if it hashes to its digest (then it counts as
    /// received), else [`Received::Corrupt`] (and it is gone).
    pub async fn finish_file(&self, file: FileAt) -> Result<Received, JobFilesError> {
        received(self.run(Request::FinishFile(file), None).await?)
    }

    /// The SHA-256 of each `piece_bytes`-long piece of the file `rel` of
    /// content `sha256` in this user's cache (complete, or done in a
    /// staging under way), read in one pass that checks the whole against
    /// `file_sha256`: a copy that went bad is refused. None: not here.
    pub async fn piece_digests(
        &self,
        cache_dir: &Path,
        sha256: &str,
        rel: &Path,
        piece_bytes: u64,
        file_sha256: &str,
    ) -> Result<Option<Vec<String>>, JobFilesError> {
        let request = Request::PieceDigests {
            cache_dir: cache_dir.to_owned(),
            sha256: sha256.to_owned(),
            rel: rel.to_owned(),
            piece_bytes,
            file_sha256: file_sha256.to_owned(),
        };
        match self.run(request, None).await? {
            Reply::Pieces(digests) => Ok(Some(digests)),
            Reply::Missing => Ok(None),
            Reply::Corrupt { actual } => Err(JobFilesError::Refused(format!(
                "{} of {sha256} in the cache {} hashes to {actual}, not to its digest {file_sha256}: the copy there is corrupt; evict it (cohort cache evict)",
                rel.display(),
                cache_dir.display()
            ))),
            other => Err(unexpected(other)),
        }
    }

    /// The modes of complete content `sha256` in this user's cache at
    /// `cache_dir` that differ from a file's 0644 and a directory's 0755,
    /// for a peer that fetches it; None: not complete here.
    pub async fn content_modes(
        &self,
        cache_dir: &Path,
        sha256: &str,
    ) -> Result<Option<Vec<content::PathMode>>, JobFilesError> {
        let request = Request::ContentModes { cache_dir: cache_dir.to_owned(), sha256: sha256.to_owned() };
        match self.run(request, None).await? {
            Reply::Modes(modes) => Ok(Some(modes)),
            Reply::Missing => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Completes directory content `sha256` whose files
    /// [`Self::receive_file`] wrote into this user's cache at `cache_dir`,
    /// given its `manifest` (which hashes to `sha256`): checked against the
    /// files, synced, then marked complete as a staging from the source
    /// would. Content already complete there is left as it is.
    pub async fn finish_tree(
        &self,
        cache_dir: &Path,
        sha256: &str,
        manifest: &str,
        modes: &[content::PathMode],
    ) -> Result<(), JobFilesError> {
        let bytes = manifest.as_bytes().to_vec();
        let request = Request::FinishTree {
            cache_dir: cache_dir.to_owned(),
            sha256: sha256.to_owned(),
            manifest_bytes: bytes.len() as u64,
            modes: modes.iter().take(content::MAX_MODES).cloned().collect(),
        };
        let body: BodyStream = Box::pin(futures::stream::iter([Ok(bytes)]));
        match self.run_with_body(request, None, Some(body)).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The helper, started for `what` with its stdin, stdout and stderr
    /// piped; killed when dropped.
    fn spawn(&self, what: &str) -> Result<tokio::process::Child, JobFilesError> {
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
        command.spawn().map_err(|error| JobFilesError::Spawn { what: what.to_owned(), error })
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
        let mut child = self.spawn(&what)?;
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

/// A file's (or a piece's) bytes taken in, as the helper answered.
fn received(reply: Reply) -> Result<Received, JobFilesError> {
    match reply {
        Reply::Done => Ok(Received::Done),
        Reply::Short { got } => Ok(Received::Short { got }),
        Reply::Corrupt { actual } => Ok(Received::Corrupt { actual }),
        other => Err(unexpected(other)),
    }
}

/// What [`AsJobUser::receive_file`] made of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// In the staging's `tree/`, verified (or the content was complete already).
    Done,
    /// The bytes ended after `got`, short of the size; nothing kept.
    Short { got: u64 },
    /// The bytes hash to `actual`, not to the file's digest; nothing kept.
    Corrupt { actual: String },
}

/// The most bytes of a file [`ContentReader`] yields at once.
pub const CONTENT_CHUNK: usize = 256 << 10;
/// How long [`AsJobUser::read_content`] waits for the helper to open the file.
const CONTENT_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// A file of content read by the helper ([`AsJobUser::read_content`]): a
/// stream of chunks of at most [`CONTENT_CHUNK`] bytes, exactly
/// [`ContentReader::bytes`] in all, then the end once the helper exited
/// well. An item is an error when the bytes came short or the helper failed
/// (and then the stream ends). Dropping the reader kills the helper.
pub struct ContentReader {
    /// The size of the file: the bytes the stream yields in all.
    pub bytes: u64,
    chunks: std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Vec<u8>>> + Send>>,
}

impl ContentReader {
    fn new(bytes: u64, flow: ContentFlow) -> Self {
        use futures::StreamExt as _;
        let chunks = futures::stream::unfold(Some(flow), |flow| async move {
            let mut flow = flow?;
            match flow.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(flow))),
                Ok(None) => None,
                // The helper goes with `flow`.
                Err(error) => Some((Err(error), None)),
            }
        });
        Self { bytes, chunks: Box::pin(chunks.fuse()) }
    }
}

impl std::fmt::Debug for ContentReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentReader").field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

impl futures::Stream for ContentReader {
    type Item = std::io::Result<Vec<u8>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.chunks.as_mut().poll_next(cx)
    }
}

/// The helper sending a file, and what of it is left to read.
struct ContentFlow {
    child: tokio::process::Child,
    stdout: BufReader<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    left: u64,
    bytes: u64,
    what: String,
    limits: Limits,
}

impl ContentFlow {
    /// The next chunk; None once every byte came and the helper exited well.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.left == 0 {
            let status = self.exit().await;
            if status.as_ref().is_ok_and(ExitStatus::success) {
                return Ok(None);
            }
            return Err(self.failed(status, "after sending every byte").await);
        }
        let want = usize::try_from(self.left).unwrap_or(CONTENT_CHUNK).min(CONTENT_CHUNK);
        let mut chunk = vec![0; want];
        let mut filled = 0;
        while filled < want {
            match self.stdout.read(&mut chunk[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            let status = self.exit().await;
            let got = self.bytes - self.left;
            return Err(self.failed(status, &format!("after {got} of its {} bytes", self.bytes)).await);
        }
        chunk.truncate(filled);
        self.left -= filled as u64;
        Ok(Some(chunk))
    }

    async fn exit(&mut self) -> std::io::Result<ExitStatus> {
        tokio::time::timeout(CONTENT_ANSWER_WAIT, self.child.wait()).await.unwrap_or_else(|_| {
            Err(std::io::Error::other(format!("it did not exit within {CONTENT_ANSWER_WAIT:?} of its last byte")))
        })
    }

    /// Why the helper stopped `when`, as an error.
    async fn failed(&mut self, status: std::io::Result<ExitStatus>, when: &str) -> std::io::Error {
        let stderr = read_stderr(self.stderr.take()).await;
        let what = format!("{} (stopped {when})", self.what);
        let error = match status {
            // Exited well, yet short: the file shrank after it was opened.
            Ok(status) if status.success() => JobFilesError::Helper { what, status: status.to_string(), stderr },
            status => explain_exit(what, &self.limits, status, stderr),
        };
        std::io::Error::other(error)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::{Path, PathBuf};

    use futures::StreamExt as _;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::stage::{StageItem, Stager};

    /// The `cohort-agent` binary, which runs the helper. `cargo test -p
    /// cohort-agent` builds it (the crate has integration tests).
    fn helper_binary() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().and_then(Path::parent).unwrap().join("cohort-agent");
        assert!(bin.exists(), "{} not found: run `cargo build -p cohort-agent` first", bin.display());
        bin
    }

    /// This test's own user: the helper switches nothing.
    fn me() -> RankIdentity {
        let (uid, gid) = (nix::unistd::Uid::current().as_raw(), nix::unistd::Gid::current().as_raw());
        RankIdentity { name: uid.to_string(), uid, gid, groups: Vec::new(), home: PathBuf::from("/") }
    }

    fn sha(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// A manifest of `files` only, as staging writes it.
    fn manifest_of(files: &[(&str, &[u8])]) -> String {
        let mut files = files.to_vec();
        files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        files.iter().map(|(rel, data)| format!("{} {} {rel}\n", sha(data), data.len())).collect()
    }

    fn write(path: &Path, data: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// `files` as complete content in `cache`, laid out as a staging leaves it; its digest.
    fn complete(cache: &Path, files: &[(&str, &[u8])]) -> String {
        let manifest = manifest_of(files);
        let digest = sha(manifest.as_bytes());
        for (rel, data) in files {
            write(&cache.join("sha256").join(&digest).join(rel), data);
        }
        write(&cache.join("sha256").join(format!("{digest}.manifest")), manifest.as_bytes());
        digest
    }

    fn body(chunks: Vec<Result<Vec<u8>, String>>) -> BodyStream {
        Box::pin(futures::stream::iter(chunks))
    }

    /// Everything a read yields; None: missing.
    async fn read(
        user: AsJobUser<'_>,
        cache: &Path,
        digest: &str,
        part: Option<&str>,
    ) -> Result<Option<Vec<u8>>, JobFilesError> {
        let Some(mut reader) = user.read_content(cache, digest, part.map(Path::new), None).await? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = reader.next().await {
            let chunk = chunk.map_err(|e| JobFilesError::Refused(e.to_string()))?;
            assert!(!chunk.is_empty() && chunk.len() <= CONTENT_CHUNK, "{}", chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        assert_eq!(bytes.len() as u64, reader.bytes);
        Ok(Some(bytes))
    }

    fn refused(result: Result<impl std::fmt::Debug, JobFilesError>, why: &str) {
        match result {
            Err(JobFilesError::Refused(message)) => assert!(message.contains(why), "{message}"),
            other => panic!("expected a refusal with {why:?}, got {other:?}"),
        }
    }

    /// Nothing of a received file left outside `tree/`, nor (unless kept) in it.
    fn left_behind(cache: &Path, digest: &str, rel: &str) -> (bool, bool) {
        let work = cache.join("partial").join(format!("sha256-{digest}"));
        (work.join("from-peers").join(rel).exists(), work.join("tree").join(rel).exists())
    }

    #[tokio::test]
    async fn content_is_read_from_the_cache_and_from_a_staging_under_way() {
        let (cache, identity, helper) = (tempfile::tempdir().unwrap(), me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let large: Vec<u8> = (0..(600u32 << 10)).map(|i| (i % 251) as u8).collect();
        let files: [(&str, &[u8]); 3] = [("large.bin", &large), ("sub/b.txt", b"hello\n"), ("sub/empty", b"")];
        let digest = complete(cache.path(), &files);
        let manifest = read(user, cache.path(), &digest, None).await.unwrap().unwrap();
        assert_eq!(manifest, manifest_of(&files).as_bytes());
        for (rel, data) in files {
            assert_eq!(read(user, cache.path(), &digest, Some(rel)).await.unwrap().unwrap(), data, "{rel}");
        }
        assert_eq!(read(user, cache.path(), &digest, Some("sub/other")).await.unwrap(), None);

        // A staging under way: its done files are read, its manifest is not there yet.
        let staging = sha(b"another content");
        let work = cache.path().join("partial").join(format!("sha256-{staging}"));
        write(&work.join("tree/done.txt"), b"done");
        write(&work.join("incoming/half.txt"), b"ha");
        assert_eq!(read(user, cache.path(), &staging, Some("done.txt")).await.unwrap().unwrap(), b"done");
        assert_eq!(read(user, cache.path(), &staging, Some("half.txt")).await.unwrap(), None, "not done");
        assert_eq!(read(user, cache.path(), &staging, None).await.unwrap(), None, "not complete");
        let nowhere = sha(b"nowhere");
        assert_eq!(read(user, cache.path(), &nowhere, None).await.unwrap(), None);
        assert_eq!(read(user, cache.path(), &nowhere, Some("a")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_file_that_shrinks_while_it_is_sent_ends_in_an_error() {
        let (cache, identity, helper) = (tempfile::tempdir().unwrap(), me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let staging = sha(b"a content");
        let file = cache.path().join("partial").join(format!("sha256-{staging}")).join("tree/big.bin");
        write(&file, &vec![1; 4 << 20]);
        let mut reader =
            user.read_content(cache.path(), &staging, Some(Path::new("big.bin")), None).await.unwrap().unwrap();
        assert_eq!(reader.bytes, 4 << 20);
        // The helper waits on the full pipe meanwhile.
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(1 << 20).unwrap();
        let (mut got, mut error) = (0, None);
        while let Some(chunk) = reader.next().await {
            match chunk {
                Ok(chunk) => got += chunk.len(),
                Err(e) => error = Some(e.to_string()),
            }
        }
        assert_eq!(got, 1 << 20);
        let error = error.unwrap();
        assert!(error.contains("shrank from 4194304 to 1048576 bytes"), "{error}");
        assert!(error.contains("stopped after 1048576 of its 4194304 bytes"), "{error}");
    }

    #[tokio::test]
    async fn what_is_not_a_plain_file_of_the_content_is_refused() {
        let (cache, identity, helper) = (tempfile::tempdir().unwrap(), me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let digest = complete(cache.path(), &[("a.txt", b"a"), ("sub/b.txt", b"b")]);
        let content = cache.path().join("sha256").join(&digest);
        let secret = cache.path().join("secret");
        std::fs::write(&secret, "not content").unwrap();
        std::os::unix::fs::symlink(&secret, content.join("link.txt")).unwrap();
        refused(read(user, cache.path(), &digest, Some("link.txt")).await, "is a symlink, which is not served");
        nix::unistd::mkfifo(&content.join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        refused(read(user, cache.path(), &digest, Some("pipe")).await, "is a FIFO, not a regular file");
        refused(read(user, cache.path(), &digest, Some("sub")).await, "is a directory, not a regular file");
        for climb in ["../secret", "sub/../../secret", "/etc/passwd", "./a.txt", "a.txt/", ""] {
            refused(read(user, cache.path(), &digest, Some(climb)).await, "is not relative with plain names");
        }
        refused(read(user, cache.path(), "../../etc", None).await, "is not 64 lowercase hex digits");
        refused(read(user, cache.path(), &digest.to_uppercase(), None).await, "is not 64 lowercase hex digits");
        // Planted in place of the manifest: not followed either (not complete content).
        let manifest = cache.path().join("sha256").join(format!("{digest}.manifest"));
        std::fs::remove_file(&manifest).unwrap();
        std::os::unix::fs::symlink(&secret, &manifest).unwrap();
        assert_eq!(read(user, cache.path(), &digest, None).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_received_file_is_kept_only_whole_and_intact() {
        let (cache, identity, helper) = (tempfile::tempdir().unwrap(), me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let digest = sha(b"some directory's manifest");
        let receive = |rel: &'static str, size: u64, file_sha256: String, chunks: Vec<Result<Vec<u8>, String>>| {
            let (cache, digest) = (cache.path().to_owned(), digest.clone());
            async move { user.receive_file(&cache, &digest, Path::new(rel), size, &file_sha256, None, body(chunks)).await }
        };
        let data = b"hello\n".to_vec();
        let got = receive("sub/b.txt", 6, sha(&data), vec![Ok(data[..2].to_vec()), Ok(data[2..].to_vec())]).await;
        assert_eq!(got.unwrap(), Received::Done);
        assert_eq!(left_behind(cache.path(), &digest, "sub/b.txt"), (false, true));
        let tree = cache.path().join("partial").join(format!("sha256-{digest}")).join("tree");
        assert_eq!(std::fs::read(tree.join("sub/b.txt")).unwrap(), data);

        // Large, in many small chunks.
        let large: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
        let chunks = large.chunks(100 << 10).map(|c| Ok(c.to_vec())).collect();
        assert_eq!(receive("large.bin", large.len() as u64, sha(&large), chunks).await.unwrap(), Received::Done);
        assert_eq!(std::fs::read(tree.join("large.bin")).unwrap(), large);

        // The peer's stream ended early.
        let got = receive("short.txt", 6, sha(&data), vec![Ok(data[..3].to_vec())]).await.unwrap();
        assert_eq!(got, Received::Short { got: 3 });
        assert_eq!(left_behind(cache.path(), &digest, "short.txt"), (false, false));
        // Other bytes than announced.
        let got = receive("bad.txt", 6, sha(&data), vec![Ok(b"HELLO\n".to_vec())]).await.unwrap();
        assert_eq!(got, Received::Corrupt { actual: sha(b"HELLO\n") });
        assert_eq!(left_behind(cache.path(), &digest, "bad.txt"), (false, false));
        // The peer's stream broke: never taken as done, even when every byte had come.
        for chunks in
            [vec![Ok(data[..3].to_vec()), Err("peer reset".into())], vec![Ok(data.clone()), Err("trailer".into())]]
        {
            let got = receive("broken.txt", 6, sha(&data), chunks).await;
            refused(got, "the bytes stopped coming: ");
            assert!(!left_behind(cache.path(), &digest, "broken.txt").0);
        }
        // More than the size.
        refused(receive("long.txt", 3, sha(&data), vec![Ok(data.clone())]).await, "more than the 3 bytes");
        assert_eq!(left_behind(cache.path(), &digest, "long.txt"), (false, false));
        refused(receive("../escape.txt", 6, sha(&data), vec![Ok(data.clone())]).await, "not relative");
        assert!(!cache.path().join("partial").join("escape.txt").exists());
        refused(receive("x.txt", 6, "abc".into(), vec![Ok(data.clone())]).await, "not 64 lowercase hex");
        // A symlink planted at the incoming name is not written through.
        let incoming = cache.path().join("partial").join(format!("sha256-{digest}")).join("from-peers");
        let victim = cache.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, incoming.join("planted.txt")).unwrap();
        refused(receive("planted.txt", 6, sha(&data), vec![Ok(data.clone())]).await, "cannot write");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[tokio::test]
    async fn finish_tree_completes_content_as_a_staging_would() {
        let (cache, identity, helper) = (tempfile::tempdir().unwrap(), me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let files: [(&str, &[u8]); 3] = [("a.txt", b"a"), ("sub/b.txt", b"bb"), ("sub/deeper/empty", b"")];
        let manifest = manifest_of(&files);
        let digest = sha(manifest.as_bytes());
        for (rel, data) in files.iter().take(2) {
            let (size, file_sha256) = (data.len() as u64, sha(data));
            let got = user.receive_file(
                cache.path(),
                &digest,
                Path::new(rel),
                size,
                &file_sha256,
                None,
                body(vec![Ok(data.to_vec())]),
            );
            assert_eq!(got.await.unwrap(), Received::Done);
        }
        // Not all there.
        refused(user.finish_tree(cache.path(), &digest, &manifest, &[]).await, "sub/deeper/empty is not there");
        let (rel, data) = files[2];
        let file_sha256 = sha(data);
        let got = user.receive_file(cache.path(), &digest, Path::new(rel), 0, &file_sha256, None, body(Vec::new()));
        assert_eq!(got.await.unwrap(), Received::Done);
        // Another content's manifest, one with links, one whose files are not here, an unsorted one.
        refused(user.finish_tree(cache.path(), &digest, "", &[]).await, "hashes to");
        let with_link = format!("{manifest}{} symlink zz\n", sha(b"a.txt"));
        refused(user.finish_tree(cache.path(), &sha(with_link.as_bytes()), &with_link, &[]).await, "has symlinks");
        let resized = manifest_of(&[("a.txt", b"aa"), ("sub/b.txt", b"bb"), ("sub/deeper/empty", b"")]);
        refused(user.finish_tree(cache.path(), &sha(resized.as_bytes()), &resized, &[]).await, "is not there");
        let unsorted: String = manifest.lines().rev().map(|l| format!("{l}\n")).collect();
        refused(user.finish_tree(cache.path(), &sha(unsorted.as_bytes()), &unsorted, &[]).await, "out of order");
        // A file of another size than listed.
        let work = cache.path().join("partial").join(format!("sha256-{digest}"));
        let same_size = manifest_of(&[("a.txt", b"b"), ("sub/b.txt", b"bb"), ("sub/deeper/empty", b"")]);
        let other = sha(same_size.as_bytes());
        write(&cache.path().join("partial").join(format!("sha256-{other}/tree/a.txt")), b"aa");
        refused(
            user.finish_tree(cache.path(), &other, &same_size, &[]).await,
            "is 2 bytes, not the 1 its manifest lists",
        );
        assert!(work.join("tree").exists(), "nothing changed by a refusal");

        // A mode for a path that is not relative with plain names is refused.
        let mode = |path: &str, mode: u32| content::PathMode { path: path.into(), mode };
        let climbs = [mode("../a.txt", 0o755)];
        refused(user.finish_tree(cache.path(), &digest, &manifest, &climbs).await, "not relative with plain names");
        assert!(user.content_modes(cache.path(), &digest).await.unwrap().is_none(), "not complete yet");

        // A file a peer sent that the manifest does not list goes. The
        // paths get the modes listed with the manifest, less set-user-ID;
        // a path not held is passed over.
        write(&work.join("tree/stray/file"), b"x");
        write(&work.join("tree/sub/stray"), b"x");
        let modes = [
            mode("", 0o750),
            mode("a.txt", 0o4755),
            mode("not/there", 0o777),
            mode("sub", 0o700),
            mode("sub/deeper/empty", 0o600),
        ];
        user.finish_tree(cache.path(), &digest, &manifest, &modes).await.unwrap();
        let content = cache.path().join("sha256").join(&digest);
        for (rel, data) in files {
            assert_eq!(std::fs::read(content.join(rel)).unwrap(), data);
        }
        let mode_of = |rel: &str| std::fs::symlink_metadata(content.join(rel)).unwrap().permissions().mode() & 0o7777;
        let got = [mode_of(""), mode_of("a.txt"), mode_of("sub"), mode_of("sub/deeper/empty")];
        assert_eq!(got, [0o750, 0o755, 0o700, 0o600]);
        // What a peer fetching it is sent: every path whose mode is not a file's 0644 or a directory's 0755.
        let expected: Vec<content::PathMode> = ["", "a.txt", "sub", "sub/b.txt", "sub/deeper", "sub/deeper/empty"]
            .into_iter()
            .filter(|rel| {
                let default = if content.join(rel).is_dir() { 0o755 } else { 0o644 };
                mode_of(rel) != default
            })
            .map(|rel| mode(rel, mode_of(rel)))
            .collect();
        assert_eq!(user.content_modes(cache.path(), &digest).await.unwrap(), Some(expected));
        assert!(!content.join("stray").exists() && !content.join("sub/stray").exists());
        let listed = std::fs::read_to_string(cache.path().join("sha256").join(format!("{digest}.manifest"))).unwrap();
        assert_eq!(listed, manifest);
        assert!(!work.exists(), "the work dir is gone");
        // Complete already: nothing to do.
        user.finish_tree(cache.path(), &digest, &manifest, &[]).await.unwrap();
        let a_sha256 = sha(b"a");
        let got = user.receive_file(
            cache.path(),
            &digest,
            Path::new("a.txt"),
            1,
            &a_sha256,
            None,
            body(vec![Ok(b"a".to_vec())]),
        );
        assert_eq!(got.await.unwrap(), Received::Done);
        assert!(!work.exists(), "nothing received into complete content");
        assert_eq!(read(user, cache.path(), &digest, None).await.unwrap().unwrap(), manifest.as_bytes());

        // An empty directory.
        let empty = sha(b"");
        user.finish_tree(cache.path(), &empty, "", &[]).await.unwrap();
        assert!(cache.path().join("sha256").join(&empty).is_dir());
    }

    async fn stage(cache: &Path, source: &Path, sha256: Option<String>) -> Vec<crate::stage::StagedItem> {
        let (tx, mut rx) = mpsc::channel(1024);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let item = StageItem { name: "model".into(), source: source.display().to_string(), sha256, model: None };
        let staged = Stager::new(cache.to_owned(), 2).stage(&[item], tx).await.unwrap();
        drain.await.unwrap();
        staged
    }

    /// A staged file (or URL) is content too: peers are sent a manifest of
    /// that one file (its digest the content's), fetch the file by its name
    /// and complete it into the layout a staging of the file leaves (the
    /// file in `sha256/<digest>/`, no manifest), which the staging then
    /// finds cached under its own name.
    #[tokio::test]
    async fn a_staged_file_travels_between_caches_as_one_file_content() {
        let (source, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, helper) = (me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 227) as u8).collect();
        write(&source.path().join("train.jsonl"), &data);
        let staged = stage(a.path(), &source.path().join("train.jsonl"), None).await;
        let digest = staged[0].sha256.clone();
        assert_eq!(digest, sha(&data), "a file's content digest is the file's own");

        let manifest = read(user, a.path(), &digest, None).await.unwrap().unwrap();
        assert_eq!(String::from_utf8(manifest.clone()).unwrap(), format!("{digest} {} train.jsonl\n", data.len()));
        assert_eq!(crate::stage::ManifestOf::check(&manifest, &digest), Some(crate::stage::ManifestOf::File));
        assert_eq!(read(user, a.path(), &sha(b"other"), None).await.unwrap(), None, "no such content");

        let rel = Path::new("train.jsonl");
        let bytes = read(user, a.path(), &digest, Some("train.jsonl")).await.unwrap().unwrap();
        let got = user.receive_file(b.path(), &digest, rel, data.len() as u64, &digest, None, body(vec![Ok(bytes)]));
        assert_eq!(got.await.unwrap(), Received::Done);
        let text = std::str::from_utf8(&manifest).unwrap();
        // A manifest that names the file under another digest is another content's.
        let other = text.replacen(&digest, &sha(b"other"), 1);
        refused(user.finish_tree(b.path(), &digest, &other, &[]).await, "it is another content's");
        user.finish_tree(b.path(), &digest, text, &[]).await.unwrap();
        assert_eq!(std::fs::read(b.path().join("sha256").join(&digest).join(rel)).unwrap(), data);
        assert!(!b.path().join("sha256").join(format!("{digest}.manifest")).exists(), "laid out as a staged file");
        assert_eq!(read(user, b.path(), &digest, None).await.unwrap().unwrap(), manifest, "served on as it came");

        // The staging of the same file under another name finds it cached.
        let again = StageItem {
            name: "data".into(),
            source: source.path().join("renamed.jsonl").display().to_string(),
            sha256: Some(digest.clone()),
            model: None,
        };
        let (tx, mut rx) = mpsc::channel(1024);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let found = Stager::new(b.path().to_owned(), 2).stage(&[again], tx).await.unwrap();
        drain.await.unwrap();
        assert!(found[0].from_cache, "{found:?}");
        assert_eq!(std::fs::read(&found[0].path).unwrap(), data);
        assert_eq!(found[0].path.file_name().unwrap(), "renamed.jsonl");
    }

    #[tokio::test]
    async fn a_staged_directory_travels_between_caches_through_the_helper() {
        let (source, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, helper) = (me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let large: Vec<u8> = (0..(1u32 << 20) + 17).map(|i| (i % 241) as u8).collect();
        write(&source.path().join("model.safetensors"), &large);
        write(&source.path().join("config.json"), b"{}\n");
        write(&source.path().join("tokenizer/vocab.txt"), b"a\nb\n");
        write(&source.path().join("tokenizer/empty"), b"");
        let digest = stage(a.path(), source.path(), None).await[0].sha256.clone();

        let manifest = read(user, a.path(), &digest, None).await.unwrap().unwrap();
        let parsed = crate::stage::parse_manifest(&manifest).unwrap();
        assert_eq!((parsed.files.len(), parsed.links), (4, 0));
        for file in &parsed.files {
            let reader = user.read_content(a.path(), &digest, Some(&file.path), None).await.unwrap().unwrap();
            assert_eq!(reader.bytes, file.size);
            let bytes: BodyStream = Box::pin(reader.map(|chunk| chunk.map_err(|e| e.to_string())));
            let got = user.receive_file(b.path(), &digest, &file.path, file.size, &file.sha256, None, bytes).await;
            assert_eq!(got.unwrap(), Received::Done, "{}", file.path.display());
        }
        user.finish_tree(b.path(), &digest, std::str::from_utf8(&manifest).unwrap(), &[]).await.unwrap();

        let manifest_path = |cache: &Path| cache.join("sha256").join(format!("{digest}.manifest"));
        assert_eq!(std::fs::read(manifest_path(b.path())).unwrap(), manifest);
        for file in &parsed.files {
            let (in_a, in_b) = (a.path().join("sha256").join(&digest), b.path().join("sha256").join(&digest));
            assert_eq!(std::fs::read(in_b.join(&file.path)).unwrap(), std::fs::read(in_a.join(&file.path)).unwrap());
        }
        // Found in B as a staging leaves it: the source is not read again.
        std::fs::remove_dir_all(source.path()).unwrap();
        let staged = stage(b.path(), source.path(), Some(digest.clone())).await;
        assert!(staged[0].from_cache, "{staged:?}");
        assert_eq!(staged[0].bytes, large.len() as u64 + 3 + 4);
    }

    /// A directory read from its source without a digest is super-seeded
    /// once staged: every small file whole and every piece of a large one
    /// is offered, none sent yet; a directory with a symlink is not
    /// (peers do not fetch it).
    #[tokio::test]
    async fn content_read_whole_from_its_source_is_super_seeded_file_by_file_and_piece_by_piece() {
        let (source, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, helper) = (me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        write(&source.path().join("model.safetensors"), &vec![7u8; (2 << 20) + 1]);
        write(&source.path().join("tokenizer/vocab.txt"), b"a\nb\n");
        let digest = stage(cache.path(), source.path(), None).await[0].sha256.clone();
        let peers = crate::peer::Peers::new(
            "me".into(),
            None,
            helper.clone(),
            cache.path().to_owned(),
            crate::rank_user::RankUserPolicy::agent_user(),
            1 << 20,
            crate::peer::STALL,
        );
        peers.seed_complete(user, cache.path(), &digest).await;
        let piece = |i: u32| format!("model.safetensors\0{i}");
        assert_eq!(
            peers.unsent_seeds(cache.path(), &digest),
            Some(vec![piece(0), piece(1), piece(2), "tokenizer/vocab.txt".to_owned()])
        );

        std::os::unix::fs::symlink("vocab.txt", source.path().join("tokenizer/link")).unwrap();
        let linked = stage(cache.path(), source.path(), None).await[0].sha256.clone();
        peers.seed_complete(user, cache.path(), &linked).await;
        assert_eq!(peers.unsent_seeds(cache.path(), &linked), None);
    }

    /// A large file travels in pieces: hashed by piece where it is complete
    /// (checked whole in the same pass), each piece read by its span, written
    /// at its place in another cache in any order and checked against its
    /// own digest (a bad one refused, and written over), served from there
    /// while the rest is still coming, and the file completed only if the
    /// whole hashes to its digest.
    #[tokio::test]
    async fn a_large_file_travels_in_pieces_each_checked_and_the_whole_checked_at_the_end() {
        let (source, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, helper) = (me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let piece_bytes = 64 << 10;
        let large: Vec<u8> = (0..(3 * piece_bytes + 1000) as u32).map(|i| (i % 251) as u8).collect();
        write(&source.path().join("model.safetensors"), &large);
        let digest = stage(a.path(), source.path(), None).await[0].sha256.clone();
        let rel = Path::new("model.safetensors");
        let (size, file_sha256) = (large.len() as u64, sha(&large));

        let digests = user.piece_digests(a.path(), &digest, rel, piece_bytes, &file_sha256).await.unwrap().unwrap();
        let expected: Vec<String> = large.chunks(piece_bytes as usize).map(sha).collect();
        assert_eq!(digests, expected, "one digest per piece, the last one short");
        // Kept: asked again (a restarted agent's first peer), they are read,
        // not hashed; the copy going bad since is found by the peer's check
        // of the piece it fetched.
        let record =
            a.path().join("sha256").join(format!("{digest}.pieces")).join(format!("{file_sha256}-{piece_bytes}"));
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            expected.iter().map(|d| format!("{d}\n")).collect::<String>()
        );
        let copy = a.path().join("sha256").join(&digest).join(rel);
        let mut bad = large.clone();
        bad[5] ^= 1;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&copy, &bad).unwrap();
        assert_eq!(
            user.piece_digests(a.path(), &digest, rel, piece_bytes, &file_sha256).await.unwrap().unwrap(),
            expected
        );
        // A record torn or made by hand is not taken: the pieces are hashed again.
        let not_hex = std::iter::once("G".repeat(64)).chain(expected[1..].iter().cloned());
        let not_hex: String = not_hex.map(|d| format!("{d}\n")).collect();
        for torn in [&b"short\n"[..], not_hex.as_bytes(), &[0; 260][..]] {
            std::fs::write(&record, torn).unwrap();
            refused(
                user.piece_digests(a.path(), &digest, rel, piece_bytes, &file_sha256).await,
                "the copy there is corrupt",
            );
        }
        std::fs::write(&copy, &large).unwrap();
        std::fs::remove_file(&record).unwrap();
        refused(
            user.piece_digests(a.path(), &digest, rel, piece_bytes, &sha(b"other")).await,
            "the copy there is corrupt",
        );
        assert!(
            user.piece_digests(a.path(), &digest, Path::new("absent"), piece_bytes, &file_sha256)
                .await
                .unwrap()
                .is_none()
        );

        let piece = |i: usize| PieceOf {
            span: Span {
                offset: (i * piece_bytes as usize) as u64,
                len: large.chunks(piece_bytes as usize).nth(i).unwrap().len() as u64,
            },
            sha256: digests[i].clone(),
        };
        let digest_ref = &digest;
        let read_piece = |cache: PathBuf, i: usize| {
            let span = piece(i).span;
            let digest = digest_ref;
            async move {
                let reader = user.read_content(&cache, digest, Some(rel), Some(span)).await.unwrap().unwrap();
                let chunks: Vec<Vec<u8>> = reader.map(|c| c.unwrap()).collect().await;
                chunks.concat()
            }
        };
        let receive = |i: usize, bytes: Vec<u8>| {
            user.receive_file(b.path(), &digest, rel, size, &file_sha256, Some(piece(i)), body(vec![Ok(bytes)]))
        };
        // The last piece first, then a bad copy of the second, refused.
        for i in [3, 0] {
            let bytes = read_piece(a.path().to_owned(), i).await;
            assert_eq!(bytes, large.chunks(piece_bytes as usize).nth(i).unwrap());
            assert_eq!(receive(i, bytes).await.unwrap(), Received::Done);
        }
        let mut bad = read_piece(a.path().to_owned(), 1).await;
        bad[7] ^= 1;
        assert_eq!(receive(1, bad.clone()).await.unwrap(), Received::Corrupt { actual: sha(&bad) });
        assert_eq!(receive(1, bad[..10].to_vec()).await.unwrap(), Received::Short { got: 10 });
        // A piece received here is served from here before the file is complete.
        assert_eq!(read_piece(b.path().to_owned(), 3).await, large.chunks(piece_bytes as usize).nth(3).unwrap());
        // Not complete yet: the whole does not hash to the file's digest.
        assert_eq!(
            user.finish_file(FileAt::new(b.path(), &digest, rel, size, &file_sha256)).await.unwrap(),
            Received::Corrupt {
                actual: {
                    // The corrupt second piece stayed (written over only by the piece
                    // fetched again); the third never came.
                    let mut have = large.clone();
                    have[piece_bytes as usize..2 * piece_bytes as usize].copy_from_slice(&bad);
                    have[2 * piece_bytes as usize..3 * piece_bytes as usize].fill(0);
                    sha(&have)
                }
            }
        );
        refused(
            user.finish_file(FileAt::new(b.path(), &digest, rel, size, &file_sha256)).await,
            "its pieces were not received",
        );
        // All four again, in order, and the file completes into `tree/`.
        for i in 0..4 {
            let bytes = read_piece(a.path().to_owned(), i).await;
            assert_eq!(receive(i, bytes).await.unwrap(), Received::Done);
        }
        let completion =
            FileAt::new(b.path(), &digest, rel, size, &file_sha256).with_pieces(piece_bytes, digests.clone());
        assert_eq!(user.finish_file(completion).await.unwrap(), Received::Done);
        // The digests the pieces were checked against are kept for this node's peers.
        let kept =
            b.path().join("sha256").join(format!("{digest}.pieces")).join(format!("{file_sha256}-{piece_bytes}"));
        assert_eq!(std::fs::read_to_string(kept).unwrap().lines().collect::<Vec<_>>(), digests);
        let tree = b.path().join("partial").join(format!("sha256-{digest}")).join("tree").join(rel);
        assert_eq!(std::fs::read(tree).unwrap(), large);
        // A piece that does not fit the file is refused before anything is written.
        let beyond = PieceOf { span: Span { offset: size - 10, len: 20 }, sha256: sha(b"x") };
        let got = user.receive_file(b.path(), &digest, rel, size, &file_sha256, Some(beyond), body(vec![]));
        refused(got.await, "does not fit");
        let manifest = read(user, a.path(), &digest, None).await.unwrap().unwrap();
        user.finish_tree(b.path(), &digest, std::str::from_utf8(&manifest).unwrap(), &[]).await.unwrap();
        assert_eq!(std::fs::read(b.path().join("sha256").join(&digest).join(rel)).unwrap(), large);
    }

    /// A fetch from peers that stopped part-way (the peers died: the node
    /// reads the source after all) leaves nothing that staging from the
    /// source would resume: a file holding only some of its pieces is no
    /// prefix of the source's file.
    #[tokio::test]
    async fn pieces_left_by_a_failed_fetch_do_not_spoil_the_staging_from_the_source() {
        let (source, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, helper) = (me(), helper_binary());
        let user = AsJobUser { identity: &identity, helper: &helper };
        let large: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 239) as u8).collect();
        write(&source.path().join("shard.bin"), &large);
        let digest = stage(a.path(), source.path(), None).await[0].sha256.clone();
        let (rel, piece_bytes) = (Path::new("shard.bin"), 256u64 << 10);
        let whole = sha(&large);
        let digests = user.piece_digests(a.path(), &digest, rel, piece_bytes, &whole).await.unwrap().unwrap();
        let second = PieceOf { span: Span { offset: piece_bytes, len: piece_bytes }, sha256: digests[1].clone() };
        let bytes = large[piece_bytes as usize..2 * piece_bytes as usize].to_vec();
        let got =
            user.receive_file(b.path(), &digest, rel, large.len() as u64, &whole, Some(second), body(vec![Ok(bytes)]));
        assert_eq!(got.await.unwrap(), Received::Done);

        let staged = stage(b.path(), source.path(), Some(digest.clone())).await;
        assert!(!staged[0].from_cache);
        assert_eq!(std::fs::read(b.path().join("sha256").join(&digest).join(rel)).unwrap(), large);
    }
}
