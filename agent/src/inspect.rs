//! Answers the controller's questions about paths on this node for pipeline
//! jobs: the digest of a model directory (conversion-cache key), the result
//! files of infer and eval runs (the report), removal of a cache entry.

use std::path::{Path, PathBuf};

use cohort_proto::{
    AgentMessage, FileContent, InspectPathCommand, PathAnswer, QueryResult, agent_message::Msg,
    query_result::Result as QueryAnswer,
};

use crate::prepare::Preparer;
use crate::supervisor::Outbound;

/// What one answer may carry unless the controller asks for less.
const DEFAULT_MAX_BYTES: u64 = 4 << 20;

impl Preparer {
    pub async fn inspect_path(&self, command_id: u64, cmd: InspectPathCommand) {
        let answer = tokio::task::spawn_blocking(move || inspect(&cmd)).await;
        let mut result = QueryResult { command_id, ..QueryResult::default() };
        match answer {
            Ok(Ok(path)) => result.result = Some(QueryAnswer::Path(path)),
            Ok(Err(error)) => result.error = error,
            Err(e) => result.error = format!("inspecting the path crashed: {e}"),
        }
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(result)) })).await;
    }
}

fn inspect(cmd: &InspectPathCommand) -> Result<PathAnswer, String> {
    let path = PathBuf::from(&cmd.path);
    if !path.is_absolute() {
        return Err(format!("{:?} is not an absolute path", cmd.path));
    }
    let mut answer = PathAnswer { exists: path.exists(), ..PathAnswer::default() };
    if !answer.exists {
        return Ok(answer);
    }
    if cmd.digest {
        answer.digest = cohort_shared::digest::tree_digest(&path).map_err(|e| format!("digest: {e}"))?;
    }
    if cmd.read {
        let limit = if cmd.max_bytes == 0 { DEFAULT_MAX_BYTES } else { cmd.max_bytes };
        answer.files = read_files(&path, &cmd.suffix, limit)?;
    }
    if cmd.remove {
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
        answer.exists = false;
    }
    Ok(answer)
}

/// The file, or the files under the directory whose names end with `suffix`,
/// in path order, `limit` bytes in all.
fn read_files(path: &Path, suffix: &str, limit: u64) -> Result<Vec<FileContent>, String> {
    let mut paths = Vec::new();
    if path.is_dir() {
        walk(path, suffix, &mut paths).map_err(|e| format!("cannot list {}: {e}", path.display()))?;
        paths.sort();
    } else {
        paths.push(path.to_path_buf());
    }
    let mut left = limit;
    let mut files = Vec::new();
    for file in paths {
        let content = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let take = (content.len() as u64).min(left) as usize;
        left -= take as u64;
        files.push(FileContent {
            path: file.display().to_string(),
            truncated: take < content.len(),
            content: content[..take].to_vec(),
        });
    }
    Ok(files)
}

fn walk(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
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
            inspect(&InspectPathCommand {
                path: dir.path().join("out").display().to_string(),
                digest: true,
                read,
                suffix: suffix.into(),
                max_bytes: 0,
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
        let relative = inspect(&InspectPathCommand { path: "rel".into(), ..Default::default() });
        assert!(relative.unwrap_err().contains("not an absolute path"));
    }
}
