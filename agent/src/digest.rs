//! Content digests of files and directory trees: a model directory is the
//! same model when every file has the same relative path, size and content.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct DigestError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Hex SHA-256 over the sorted lines `<relative path>\t<size>\t<sha256>` of
/// every regular file under `path` (symbolic links followed); for a file, its
/// own line with an empty relative path. The files are hashed on as many
/// threads as there are cores (a file's own digest is one sequential SHA-256);
/// `sha2` uses the CPU's SHA extensions where it has them.
pub fn tree_digest(path: &Path) -> Result<String, DigestError> {
    let mut files = Vec::new();
    collect(path, Path::new(""), &mut files)?;
    files.sort();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len()).max(1);
    let next = AtomicUsize::new(0);
    let mut digests: Vec<Option<Result<(u64, String), DigestError>>> = Vec::new();
    digests.resize_with(files.len(), || None);
    let digests = Mutex::new(digests);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(rel) = files.get(index) else { break };
                    let full = if rel.as_os_str().is_empty() { path.to_path_buf() } else { path.join(rel) };
                    let digest = file_digest(&full);
                    let failed = digest.is_err();
                    if let Ok(mut digests) = digests.lock() {
                        digests[index] = Some(digest);
                    }
                    if failed {
                        // The others stop at their next file.
                        next.store(files.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let digests = digests.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut manifest = Sha256::new();
    for (rel, digest) in files.iter().zip(digests) {
        // A file is left out only after one before it in this order failed.
        let not_hashed = || DigestError { path: path.join(rel), source: std::io::Error::other("not hashed") };
        let (size, digest) = digest.ok_or_else(not_hashed)??;
        manifest.update(format!("{}\t{size}\t{digest}\n", rel.display()).as_bytes());
    }
    Ok(hex(&manifest.finalize()))
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), DigestError> {
    let full = root.join(rel);
    let error = |source| DigestError { path: full.clone(), source };
    let meta = std::fs::metadata(&full).map_err(error)?;
    if meta.is_file() {
        out.push(rel.to_path_buf());
    } else if meta.is_dir() {
        for entry in std::fs::read_dir(&full).map_err(error)? {
            let entry = entry.map_err(error)?;
            collect(root, &rel.join(entry.file_name()), out)?;
        }
    }
    Ok(())
}

fn file_digest(path: &Path) -> Result<(u64, String), DigestError> {
    let error = |source| DigestError { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(error)?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((size, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn same_tree_same_digest_any_change_differs() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for dir in [a.path(), b.path()] {
            std::fs::create_dir_all(dir.join("sub")).unwrap();
            std::fs::write(dir.join("config.json"), "{}").unwrap();
            std::fs::write(dir.join("sub/model.safetensors"), "weights").unwrap();
        }
        let first = tree_digest(a.path()).unwrap();
        assert_eq!(first, tree_digest(b.path()).unwrap(), "location does not matter");
        std::fs::write(b.path().join("sub/model.safetensors"), "weightz").unwrap();
        assert_ne!(first, tree_digest(b.path()).unwrap(), "content matters");
        std::fs::write(b.path().join("sub/model.safetensors"), "weights").unwrap();
        std::fs::rename(b.path().join("config.json"), b.path().join("config2.json")).unwrap();
        assert_ne!(first, tree_digest(b.path()).unwrap(), "names matter");
        assert!(tree_digest(&a.path().join("missing")).is_err());
    }

    #[test]
    fn files_hashed_in_parallel_are_listed_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for i in 0..40 {
            let rel = format!("d{}/f{i:02}", i % 3);
            let data = vec![i as u8; i * 1000];
            std::fs::create_dir_all(dir.path().join(format!("d{}", i % 3))).unwrap();
            std::fs::write(dir.path().join(&rel), &data).unwrap();
            lines.push(format!("{rel}\t{}\t{}\n", data.len(), hex(&Sha256::digest(&data))));
        }
        lines.sort();
        assert_eq!(tree_digest(dir.path()).unwrap(), hex(&Sha256::digest(lines.concat().as_bytes())));
    }
}
