//! The archives of jobs' `sync:` directories (SkyPilot's `workdir`): the CLI
//! packs a local directory and uploads it (`UploadSync`); the controller keeps
//! it on its own disk, under the uploading user, at
//! `<data-dir>/sync/<user, hex>/<sha256>.tar.gz`; each node of the job fetches
//! it (`FetchSync`) before the launch and unpacks it as the job's user.
//!
//! An archive is checked against the digest and size the client declared
//! before it is kept, and one bigger than `--max-sync-bytes` is refused as it
//! arrives. Archives no stored job names are removed an hour after their
//! upload ([`SyncStore::collect`], at every upload and every job deletion).
//!
//! The archives live on the controller that received them, not in the store:
//! after a takeover by another controller, a job whose archive is not on the
//! new leader's disk fails its preparation, saying so (docs: sync.md).

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cohort_proto::{SyncArchive, SyncChunk};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

/// The size of the chunks an archive is sent in.
pub const CHUNK_BYTES: usize = 1 << 20;
/// An archive no job names is kept this long after its upload (the time
/// between `cohort submit`'s upload and its submit, with room for retries).
pub const UNREFERENCED_FOR: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the sync archive's first chunk must say what it is (SyncChunk.archive)")]
    NoHeader,
    #[error("{0:?} is not a hex SHA-256 (64 characters 0-9a-f)")]
    BadDigest(String),
    #[error(
        "the sync archive is {bytes} bytes, more than this controller takes ({max} bytes, --max-sync-bytes): \
         leave large files out with `sync: {{dir: ..., exclude: [...]}}` or a .cohortignore, or stage them (`stage:`)"
    )]
    TooLarge { bytes: u64, max: u64 },
    #[error("the sync archive ended after {got} of the {declared} bytes its header declared; upload it again")]
    Short { got: u64, declared: u64 },
    #[error("the sync archive's bytes hash to {got}, not the declared {declared}; upload it again")]
    Mismatch { got: String, declared: String },
    #[error("the upload broke: {0}")]
    Stream(String),
    #[error("the controller cannot store the sync archive in {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
}

impl From<SyncError> for Status {
    fn from(error: SyncError) -> Self {
        match error {
            SyncError::TooLarge { .. } => Status::out_of_range(error.to_string()),
            SyncError::Io { .. } => Status::internal(error.to_string()),
            SyncError::Stream(_) => Status::aborted(error.to_string()),
            _ => Status::invalid_argument(error.to_string()),
        }
    }
}

/// Sync archives on this controller's disk.
pub struct SyncStore {
    dir: PathBuf,
    max_bytes: u64,
}

fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl SyncStore {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        SyncStore { dir, max_bytes }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// One directory per user: the name in hex, so that any token user name is a safe path.
    fn user_dir(&self, user: &str) -> PathBuf {
        let hex: String = user.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(if hex.is_empty() { "-".to_owned() } else { hex })
    }

    fn archive_path(&self, user: &str, sha256: &str) -> PathBuf {
        self.user_dir(user).join(format!("{sha256}.tar.gz"))
    }

    /// Whether `user` has uploaded the archive `sha256`.
    pub fn has(&self, user: &str, sha256: &str) -> bool {
        is_digest(sha256) && self.archive_path(user, sha256).is_file()
    }

    /// Receives one upload of `user`: the first chunk declares the archive,
    /// the bytes follow. An archive already stored is answered at once.
    pub async fn receive<S>(&self, user: &str, mut chunks: S) -> Result<SyncArchive, SyncError>
    where
        S: Stream<Item = Result<SyncChunk, Status>> + Unpin,
    {
        let first = match chunks.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(status)) => return Err(SyncError::Stream(status.message().to_owned())),
            None => return Err(SyncError::NoHeader),
        };
        let declared = first.archive.clone().ok_or(SyncError::NoHeader)?;
        if !is_digest(&declared.sha256) {
            return Err(SyncError::BadDigest(declared.sha256));
        }
        if declared.bytes > self.max_bytes {
            return Err(SyncError::TooLarge { bytes: declared.bytes, max: self.max_bytes });
        }
        let dir = self.user_dir(user);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |error| SyncError::Io { path, error }
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let path = self.archive_path(user, &declared.sha256);
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() == declared.bytes) {
            touch(&path);
            return Ok(declared);
        }
        let part = dir.join(format!(".{}.{}.part", declared.sha256, rand::random::<u64>()));
        let result = self.write_part(&part, &declared, first.data, &mut chunks).await;
        match result {
            Ok(()) => tokio::fs::rename(&part, &path).await.map_err(io(&path))?,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e);
            }
        }
        tracing::info!(user, sha256 = %declared.sha256, bytes = declared.bytes, "sync archive stored");
        Ok(declared)
    }

    async fn write_part<S>(
        &self,
        part: &Path,
        declared: &SyncArchive,
        first: Vec<u8>,
        chunks: &mut S,
    ) -> Result<(), SyncError>
    where
        S: Stream<Item = Result<SyncChunk, Status>> + Unpin,
    {
        let io = |error| SyncError::Io { path: part.to_owned(), error };
        let mut file = tokio::fs::File::create(part).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut data = first;
        loop {
            got += data.len() as u64;
            if got > declared.bytes || got > self.max_bytes {
                return Err(SyncError::TooLarge { bytes: got, max: self.max_bytes.min(declared.bytes) });
            }
            hasher.update(&data);
            file.write_all(&data).await.map_err(io)?;
            data = match chunks.next().await {
                Some(Ok(chunk)) => chunk.data,
                Some(Err(status)) => return Err(SyncError::Stream(status.message().to_owned())),
                None => break,
            };
        }
        if got != declared.bytes {
            return Err(SyncError::Short { got, declared: declared.bytes });
        }
        let digest = format!("{:x}", hasher.finalize());
        if digest != declared.sha256 {
            return Err(SyncError::Mismatch { got: digest, declared: declared.sha256.clone() });
        }
        file.sync_all().await.map_err(io)?;
        Ok(())
    }

    /// The chunks of `user`'s archive `sha256`, for a node of its job.
    pub async fn send(
        &self,
        user: &str,
        sha256: &str,
    ) -> Result<impl Stream<Item = Result<SyncChunk, Status>> + use<>, Status> {
        if !is_digest(sha256) {
            return Err(SyncError::BadDigest(sha256.to_owned()).into());
        }
        let path = self.archive_path(user, sha256);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Status::not_found(format!(
                    "the sync archive {sha256} is not on this controller's disk (archives stay on the controller \
                     that received them; after a takeover, submit the job again)"
                )));
            }
            Err(error) => return Err(SyncError::Io { path, error }.into()),
        };
        Ok(futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Some((Err(Status::internal(format!("reading the sync archive: {e}"))), None)),
                }
            }
            if filled == 0 {
                return None;
            }
            buf.truncate(filled);
            Some((Ok(SyncChunk { archive: None, data: buf }), Some(file)))
        }))
    }

    /// Removes archives that no job in `referenced` (user, digest) names and
    /// that were uploaded more than `older_than` ago; returns how many.
    pub fn collect(&self, referenced: &HashSet<(String, String)>, older_than: Duration) -> usize {
        let Ok(users) = std::fs::read_dir(&self.dir) else { return 0 };
        let now = SystemTime::now();
        let mut removed = 0;
        for user_dir in users.flatten() {
            let Some(user) = decode_hex(&user_dir.file_name().to_string_lossy()) else { continue };
            let Ok(entries) = std::fs::read_dir(user_dir.path()) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let digest = name.strip_suffix(".tar.gz").unwrap_or_else(|| name.split('.').nth(1).unwrap_or(""));
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= older_than);
                if old && !referenced.contains(&(user.clone(), digest.to_owned())) {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) => {
                            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a sync archive")
                        }
                    }
                }
            }
        }
        removed
    }
}

/// A stored archive's upload time is its modification time: a repeated upload renews it.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn decode_hex(text: &str) -> Option<String> {
    if text == "-" {
        return Some(String::new());
    }
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn chunks(header: SyncArchive, data: &[&[u8]]) -> impl Stream<Item = Result<SyncChunk, Status>> + Unpin {
        let mut out = vec![Ok(SyncChunk { archive: Some(header), data: Vec::new() })];
        out.extend(data.iter().map(|d| Ok(SyncChunk { archive: None, data: d.to_vec() })));
        futures::stream::iter(out)
    }

    fn header(data: &[u8]) -> SyncArchive {
        SyncArchive { sha256: format!("{:x}", Sha256::digest(data)), bytes: data.len() as u64, ..Default::default() }
    }

    #[tokio::test]
    async fn an_upload_is_kept_under_its_user_and_sent_back_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path().join("sync"), 1 << 30);
        let data = vec![7u8; CHUNK_BYTES + 10];
        let archive = store.receive("alice", chunks(header(&data), &[&data[..5], &data[5..]])).await.unwrap();
        assert!(store.has("alice", &archive.sha256));
        assert!(!store.has("bob", &archive.sha256), "another user's upload is not theirs");
        let sent: Vec<SyncChunk> =
            store.send("alice", &archive.sha256).await.unwrap().map(|c| c.unwrap()).collect().await;
        assert_eq!(sent.len(), 2);
        assert_eq!(sent.concat_data(), data);
        assert_eq!(store.send("bob", &archive.sha256).await.err().unwrap().code(), tonic::Code::NotFound);
    }

    trait Concat {
        fn concat_data(&self) -> Vec<u8>;
    }
    impl Concat for Vec<SyncChunk> {
        fn concat_data(&self) -> Vec<u8> {
            self.iter().flat_map(|c| c.data.clone()).collect()
        }
    }

    #[tokio::test]
    async fn wrong_digests_sizes_and_headers_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path().join("sync"), 100);
        let data = b"0123456789";
        let mut wrong = header(data);
        wrong.sha256 = "0".repeat(64);
        let err = store.receive("a", chunks(wrong, &[data])).await.unwrap_err();
        assert!(matches!(err, SyncError::Mismatch { .. }), "{err}");
        let err = store.receive("a", chunks(header(data), &[&data[..4]])).await.unwrap_err();
        assert!(matches!(err, SyncError::Short { got: 4, declared: 10 }), "{err}");
        let mut understated = header(data);
        understated.bytes = 4;
        let err = store.receive("a", chunks(understated, &[data])).await.unwrap_err();
        assert!(matches!(err, SyncError::TooLarge { .. }), "{err}");
        let big = vec![1u8; 101];
        let err = store.receive("a", chunks(header(&big), &[&big])).await.unwrap_err();
        assert!(err.to_string().contains("--max-sync-bytes"), "{err}");
        let mut bad = header(data);
        bad.sha256 = "../../etc/passwd".into();
        assert!(matches!(store.receive("a", chunks(bad, &[data])).await.unwrap_err(), SyncError::BadDigest(_)));
        let no_header = futures::stream::iter(vec![Ok(SyncChunk { archive: None, data: data.to_vec() })]);
        assert!(matches!(store.receive("a", no_header).await.unwrap_err(), SyncError::NoHeader));
        let left: Vec<_> = std::fs::read_dir(store.user_dir("a")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn collect_keeps_what_jobs_name_and_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path().join("sync"), 1 << 20);
        let kept = store.receive("alice", chunks(header(b"kept"), &[b"kept"])).await.unwrap();
        let dropped = store.receive("alice", chunks(header(b"dropped"), &[b"dropped"])).await.unwrap();
        let referenced = HashSet::from([("alice".to_owned(), kept.sha256.clone())]);
        assert_eq!(store.collect(&referenced, Duration::from_secs(3600)), 0, "both are new");
        assert_eq!(store.collect(&referenced, Duration::ZERO), 1);
        assert!(store.has("alice", &kept.sha256));
        assert!(!store.has("alice", &dropped.sha256));
    }
}
