//! `sync:` on the client: the job's local directory packed into a gzip
//! tar (what `.gitignore`, `.ignore`, `.cohortignore` and `exclude` leave
//! out is left out; `.git/` never goes), uploaded to the controller
//! (`UploadSync`) and named in the submitted `JobFile.sync`. Headers are
//! deterministic (no times or owners), so the same files pack to the same
//! digest and a repeated submit stores nothing new.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{JobFile, SyncArchive, SyncChunk};
use cohort_shared::spec::JobSpec;
use cohort_shared::spec::sync::SyncSpec;
use sha2::{Digest, Sha256};

use crate::connection::ApiChannel;

/// The most entries an archive may hold (the nodes refuse more).
pub const MAX_ENTRIES: u32 = 100_000;
/// The size of each upload chunk.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("sync: {}: {error} (`sync:` names a directory relative to the job file)", dir.display())]
    Dir { dir: PathBuf, error: std::io::Error },
    #[error("sync: {} is not a directory (`sync:` names a directory relative to the job file)", .0.display())]
    NotADirectory(PathBuf),
    #[error("sync.exclude: {pattern:?} is not a gitignore pattern: {error}")]
    Pattern { pattern: String, error: ignore::Error },
    #[error("sync: reading {}: {error}", path.display())]
    Read { path: PathBuf, error: String },
    #[error(
        "sync: {} holds more than {MAX_ENTRIES} files and directories; leave some out with `sync: {{dir: ..., \
         exclude: [...]}}` or a .cohortignore",
        .0.display()
    )]
    TooManyEntries(PathBuf),
    #[error(
        "sync: {dir} packs to {packed} compressed, more than the {max} the controller takes (--max-sync-bytes); \
         the largest files: {largest}; leave them out with `sync: {{dir: ..., exclude: [...]}}` or a \
         .cohortignore, and `stage:` what is big (models, datasets)"
    )]
    TooLarge { dir: String, packed: String, max: String, largest: String },
}

/// A packed directory, ready to upload.
#[derive(Debug)]
pub struct Packed {
    pub archive: SyncArchive,
    pub bytes: Vec<u8>,
    pub dir: PathBuf,
}

impl Packed {
    /// "14 files and directories, 38.2 KiB packed (112.0 KiB unpacked)".
    pub fn summary(&self) -> String {
        format!(
            "{} files and directories, {} packed ({} unpacked)",
            self.archive.files,
            bytesize(self.archive.bytes),
            bytesize(self.archive.unpacked_bytes)
        )
    }
}

fn bytesize(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    for unit in ["KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

/// The `sync:` of a job file, when it has one and parses (a file that does
/// not parse is the controller's to explain).
pub fn sync_of(file: &JobFile) -> Option<SyncSpec> {
    JobSpec::from_yaml(&file.yaml, &file.source_name).ok()?.sync
}

/// Packs `spec.dir` (relative to `base_dir`, the job file's directory).
pub fn pack(base_dir: &Path, spec: &SyncSpec, max_bytes: u64) -> Result<Packed, PackError> {
    let dir = base_dir.join(&spec.dir);
    let meta = std::fs::metadata(&dir).map_err(|error| PackError::Dir { dir: dir.clone(), error })?;
    if !meta.is_dir() {
        return Err(PackError::NotADirectory(dir));
    }
    let mut overrides = ignore::overrides::OverrideBuilder::new(&dir);
    for pattern in &spec.exclude {
        overrides
            .add(&format!("!{pattern}"))
            .map_err(|error| PackError::Pattern { pattern: pattern.clone(), error })?;
    }
    let overrides =
        overrides.build().map_err(|error| PackError::Pattern { pattern: spec.exclude.join(", "), error })?;
    let walk = ignore::WalkBuilder::new(&dir)
        .hidden(false)
        .parents(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .add_custom_ignore_filename(".cohortignore")
        .overrides(overrides)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    let (mut files, mut unpacked) = (0u32, 0u64);
    let mut sizes: Vec<(u64, PathBuf)> = Vec::new();
    for entry in walk {
        let entry = entry.map_err(|e| PackError::Read { path: dir.clone(), error: e.to_string() })?;
        let path = entry.path();
        let Ok(relative) = path.strip_prefix(&dir) else { continue };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let Some(kind) = entry.file_type() else { continue };
        // Sockets, FIFOs and devices are not packed.
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            continue;
        }
        files += 1;
        if files > MAX_ENTRIES {
            return Err(PackError::TooManyEntries(dir));
        }
        if kind.is_file() {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            unpacked += size;
            sizes.push((size, relative.to_owned()));
        }
        builder
            .append_path_with_name(path, relative)
            .map_err(|e| PackError::Read { path: path.to_owned(), error: e.to_string() })?;
    }
    let read_error = |e: std::io::Error| PackError::Read { path: dir.clone(), error: e.to_string() };
    let mut gz = builder.into_inner().map_err(read_error)?;
    gz.flush().map_err(read_error)?;
    let bytes = gz.finish().map_err(read_error)?;
    if bytes.len() as u64 > max_bytes {
        sizes.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        let largest: Vec<String> =
            sizes.iter().take(3).map(|(size, path)| format!("{} ({})", path.display(), bytesize(*size))).collect();
        return Err(PackError::TooLarge {
            dir: dir.display().to_string(),
            packed: bytesize(bytes.len() as u64),
            max: bytesize(max_bytes),
            largest: largest.join(", "),
        });
    }
    let archive = SyncArchive {
        sha256: format!("{:x}", Sha256::digest(&bytes)),
        bytes: bytes.len() as u64,
        files,
        unpacked_bytes: unpacked,
    };
    Ok(Packed { archive, bytes, dir })
}

/// Uploads a packed directory; the controller answers with what it stored.
pub async fn upload(client: &mut JobServiceClient<ApiChannel>, packed: &Packed) -> Result<SyncArchive, tonic::Status> {
    let mut chunks = vec![SyncChunk { archive: Some(packed.archive.clone()), data: Vec::new() }];
    chunks.extend(packed.bytes.chunks(CHUNK).map(|data| SyncChunk { archive: None, data: data.to_vec() }));
    Ok(client.upload_sync(tokio_stream::iter(chunks)).await?.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn unpack_names(bytes: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect()
    }

    fn spec(dir: &str, exclude: &[&str]) -> SyncSpec {
        SyncSpec { dir: dir.into(), exclude: exclude.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn ignore_files_and_exclusions_leave_files_out_and_the_digest_is_stable() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("code");
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(dir.join("train.py"), "print(1)").unwrap();
        std::fs::write(dir.join("src/model.py"), "x = 1").unwrap();
        std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(dir.join("run.log"), "noise").unwrap();
        std::fs::write(dir.join(".cohortignore"), "secret.txt\n").unwrap();
        std::fs::write(dir.join("secret.txt"), "token").unwrap();
        std::fs::write(dir.join("big.ckpt"), "weights").unwrap();
        std::os::unix::fs::symlink("train.py", dir.join("link.py")).unwrap();
        let packed = pack(root.path(), &spec("code", &["*.ckpt"]), 1 << 20).unwrap();
        let names = unpack_names(&packed.bytes);
        assert_eq!(
            names,
            [".cohortignore", ".gitignore", "link.py", "src", "src/model.py", "train.py"],
            "{}",
            packed.summary()
        );
        assert_eq!(packed.archive.files, 6);
        assert_eq!(packed.archive.unpacked_bytes, ("secret.txt\n".len() + "*.log\n".len() + 8 + 5) as u64);
        // Times are not packed: touching every file changes nothing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("train.py"), "print(1)").unwrap();
        let again = pack(root.path(), &spec("code", &["*.ckpt"]), 1 << 20).unwrap();
        assert_eq!(again.archive.sha256, packed.archive.sha256);
        std::fs::write(dir.join("train.py"), "print(2)").unwrap();
        let changed = pack(root.path(), &spec("code", &["*.ckpt"]), 1 << 20).unwrap();
        assert_ne!(changed.archive.sha256, packed.archive.sha256);
    }

    #[test]
    fn too_large_names_the_largest_files_and_a_missing_dir_the_field() {
        let root = tempfile::tempdir().unwrap();
        // Random bytes do not compress.
        let mut x: u32 = 0x9E37_79B9;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        std::fs::write(root.path().join("data.bin"), &noise).unwrap();
        std::fs::write(root.path().join("a.py"), "1").unwrap();
        let err = pack(root.path(), &spec(".", &[]), 50_000).unwrap_err().to_string();
        assert!(err.contains("data.bin (195.3 KiB)") && err.contains("--max-sync-bytes"), "{err}");
        let err = pack(root.path(), &spec("nope", &[]), 1 << 20).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("relative to the job file"), "{err}");
        let err = pack(root.path(), &spec("a.py", &[]), 1 << 20).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
