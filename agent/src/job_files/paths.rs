//! The helper side of [`InspectRequest`]: digest, read or remove a path, as
//! the job's user (the agent's side is `crate::inspect`).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::helper::open_regular;
use super::{FileRead, InspectRequest, PathInfo};

/// Does one [`InspectRequest`]; run by the `files-as` helper as the job's user.
pub(super) fn inspect(cmd: &InspectRequest) -> Result<PathInfo, String> {
    let path = cmd.path.as_path();
    if !path.is_absolute() {
        return Err(format!("{:?} is not an absolute path", path.display().to_string()));
    }
    let mut answer = PathInfo { exists: path.exists(), is_dir: path.is_dir(), ..PathInfo::default() };
    if !answer.exists {
        return Ok(answer);
    }
    if cmd.digest {
        answer.digest = crate::digest::tree_digest(path).map_err(|e| format!("digest: {e}"))?;
    }
    if cmd.read {
        answer.files = read_files(path, &cmd.suffix, cmd.max_bytes)?;
    }
    if cmd.remove {
        let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
        removed.map_err(|e| format!("cannot remove {} as the job's user: {e}", path.display()))?;
        answer.exists = false;
    }
    Ok(answer)
}

/// The file, or the files under the directory whose names end with `suffix`,
/// in path order, `limit` bytes in all. Only regular files are read, and
/// only up to what is left of `limit`.
fn read_files(path: &Path, suffix: &str, limit: u64) -> Result<Vec<FileRead>, String> {
    let mut paths = Vec::new();
    if path.is_dir() {
        walk(path, suffix, &mut paths).map_err(|e| format!("cannot list {} as the job's user: {e}", path.display()))?;
        paths.sort();
    } else {
        paths.push(path.to_path_buf());
    }
    let mut left = limit;
    let mut files = Vec::new();
    for file in paths {
        let opened = open_regular(&file)?;
        let size = opened.metadata().map(|m| m.len()).unwrap_or(0);
        let mut content = Vec::new();
        opened.take(left).read_to_end(&mut content).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        left -= content.len() as u64;
        files.push(FileRead { path: file.display().to_string(), truncated: (content.len() as u64) < size, content });
    }
    Ok(files)
}

/// Files under `dir`, not following links to directories (a loop of links
/// cannot make it walk forever).
fn walk(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, suffix, out)?;
        } else if entry.file_name().to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_digests_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let reports = dir.path().join("out/2026/reports/m");
        std::fs::create_dir_all(&reports).unwrap();
        std::fs::write(reports.join("gsm8k.json"), r#"{"score": 0.5}"#).unwrap();
        std::fs::write(reports.join("notes.txt"), "x").unwrap();
        let ask = |read, remove, suffix: &str| {
            inspect(&InspectRequest {
                path: dir.path().join("out"),
                digest: true,
                read,
                suffix: suffix.into(),
                max_bytes: 4 << 20,
                remove,
            })
        };
        let answer = ask(true, false, ".json").unwrap();
        assert!(answer.exists);
        assert_eq!(answer.digest.len(), 64);
        assert_eq!(answer.files.len(), 1);
        assert_eq!(answer.files[0].content, br#"{"score": 0.5}"#);
        let answer = ask(false, true, "").unwrap();
        assert!(!answer.exists && !dir.path().join("out").exists());
        assert!(!ask(true, false, "").unwrap().exists, "a missing path is an answer, not an error");
        let relative = inspect(&InspectRequest { path: "rel".into(), ..Default::default() });
        assert!(relative.unwrap_err().contains("not an absolute path"));
    }

    #[test]
    fn reads_stop_at_the_limit_and_refuse_what_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), "0123456789").unwrap();
        std::fs::write(dir.path().join("b.json"), "abcdef").unwrap();
        let read = |path: PathBuf, max_bytes| {
            inspect(&InspectRequest { path, read: true, max_bytes, suffix: ".json".into(), ..Default::default() })
        };
        let answer = read(dir.path().to_path_buf(), 12).unwrap();
        assert_eq!(answer.files.len(), 2);
        assert_eq!(answer.files[0].content, b"0123456789");
        assert_eq!((answer.files[1].content.as_slice(), answer.files[1].truncated), (&b"ab"[..], true));
        let fifo = dir.path().join("results.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read(dir.path().to_path_buf(), 1 << 20).unwrap_err();
        assert!(err.contains("results.json is a FIFO, not a regular file"), "{err}");
        let err = read("/dev/zero".into(), 1 << 20).unwrap_err();
        assert!(err.contains("character device"), "{err}");
    }
}
