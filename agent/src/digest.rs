//! Content digests of files and directory trees: a model directory is the
//! same model when every file has the same relative path, size and content.

use std::io::Read;
use std::path::{Path, PathBuf};

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
/// own line with an empty relative path.
pub fn tree_digest(path: &Path) -> Result<String, DigestError> {
    let mut files = Vec::new();
    collect(path, Path::new(""), &mut files)?;
    files.sort();
    let mut manifest = Sha256::new();
    for rel in files {
        let full = if rel.as_os_str().is_empty() { path.to_path_buf() } else { path.join(&rel) };
        let (size, digest) = file_digest(&full)?;
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
}
