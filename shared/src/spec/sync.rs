//! The `sync` field: a directory on the submitter's machine that the CLI
//! packs and uploads, and that every node unpacks as the job's working
//! directory (SkyPilot's `workdir`), for clusters without a shared file system.
//!
//! ```yaml
//! sync: .                  # the job file's directory; or, with exclusions:
//! sync:
//!   dir: ./src             # relative to the job file
//!   exclude: ["*.ckpt", "data/"]   # gitignore patterns, besides .gitignore and .cohortignore
//! ```
//!
//! The processes start in the unpacked copy (`<agent --work-dir>/jobs/<job
//! id>/workdir` on each node), so relative paths in the command, in
//! `megatron:` and in datasets resolve inside it. It replaces `workdir:`.

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::typed;
use crate::job_file::Problems;

/// What the CLI packs for a job (`sync:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSpec {
    /// The directory, as written: relative paths are relative to the job file.
    pub dir: String,
    /// Extra gitignore-style patterns left out of the archive.
    pub exclude: Vec<String>,
}

/// The most an archive may hold, compressed, unless the controller sets less.
pub const MAX_SYNC_BYTES: u64 = 256 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncText {
    dir: String,
    #[serde(default)]
    exclude: Vec<String>,
}

pub(super) fn read_sync(root: &Mapping, problems: &mut Problems) -> Option<SyncSpec> {
    let spec = match root.get("sync") {
        None | Some(Value::Null) => return None,
        Some(Value::String(dir)) => SyncSpec { dir: dir.clone(), exclude: Vec::new() },
        Some(Value::Mapping(_)) => {
            let text = typed::<SyncText>(root, "sync", problems)?;
            SyncSpec { dir: text.dir, exclude: text.exclude }
        }
        Some(_) => {
            problems.at(
                &["sync"],
                "must be a directory (`sync: .`) or a mapping (`sync: {dir: ., exclude: [\"*.ckpt\"]}`)",
            );
            return None;
        }
    };
    if spec.dir.trim().is_empty() {
        problems.at(&["sync"], "names no directory; write `sync: .` for the job file's own directory");
    }
    for (i, pattern) in spec.exclude.iter().enumerate() {
        if pattern.trim().is_empty() {
            problems.at_field(format!("sync.exclude[{i}]"), &["sync", "exclude"], "is empty; remove it");
        }
    }
    if root.get("workdir").is_some() {
        problems.at(
            &["workdir"],
            "cannot be set with `sync:`: each node unpacks the synced directory into the job's own working \
             directory and starts the processes there; remove `workdir:` (or `sync:` to run in a shared directory)",
        );
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::spec::JobSpec;
    use crate::spec::tests_support::command_job_with as parse;

    #[test]
    fn a_directory_or_a_mapping_with_exclusions() {
        let spec = parse("sync: .\n").unwrap().sync.unwrap();
        assert_eq!((spec.dir.as_str(), spec.exclude.len()), (".", 0));
        let spec = parse("sync: {dir: src, exclude: ['*.ckpt', data/]}\n").unwrap().sync.unwrap();
        assert_eq!(spec.dir, "src");
        assert_eq!(spec.exclude, vec!["*.ckpt".to_owned(), "data/".to_owned()]);
        assert!(parse("").unwrap().sync.is_none());
    }

    #[test]
    fn bad_forms_name_the_field_and_the_fix() {
        let err = parse("sync: [a]\n").unwrap_err();
        assert!(err.contains("sync") && err.contains("sync: ."), "{err}");
        let err = parse("sync: {dir: ., excludes: [x]}\n").unwrap_err();
        assert!(err.contains("excludes"), "{err}");
        let err = parse("sync: ' '\n").unwrap_err();
        assert!(err.contains("names no directory"), "{err}");
        let err = parse("sync: {dir: ., exclude: ['']}\n").unwrap_err();
        assert!(err.contains("sync.exclude[0]"), "{err}");
    }

    #[test]
    fn sync_replaces_workdir() {
        let err = parse("sync: .\nworkdir: /shared/x\n").unwrap_err();
        assert!(err.contains("workdir") && err.contains("cannot be set with `sync:`"), "{err}");
    }

    #[test]
    fn relative_megatron_paths_are_not_flagged_when_the_directory_is_synced() {
        let yaml = "name: j\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\nsync: .\nmegatron:\n  model: Qwen/Qwen3-8B\n  dataset: data/train.jsonl\n  save: out\n";
        let spec = JobSpec::from_yaml(yaml, "j.yaml").unwrap();
        let warnings = spec.warnings();
        assert!(!warnings.iter().any(|w| w.field == "megatron.dataset"), "{warnings:?}");
        let unsynced = JobSpec::from_yaml(&yaml.replace("sync: .\n", ""), "j.yaml").unwrap();
        assert!(unsynced.warnings().iter().any(|w| w.field == "megatron.dataset"), "{:?}", unsynced.warnings());
    }
}
