//! The order of a directory's staging against a crash, through the hooks only
//! tests can set: the copy is on disk before anything marks it complete, and a
//! staging stopped before the marker leaves nothing that looks complete.

#![allow(clippy::unwrap_used)]

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Hook, StageItem, StagedItem, Stager, Step};

/// Three files (one large enough to be flushed early) in two directories;
/// returns the manifest digest as `sha256sum` would make it.
fn write_source(root: &Path) -> String {
    use sha2::{Digest, Sha256};
    let files: [(&str, Vec<u8>); 3] =
        [("a.bin", vec![7; 5 << 20]), ("sub/b.txt", b"hello\n".to_vec()), ("sub/deeper/c", Vec::new())];
    let mut manifest = String::new();
    for (rel, data) in &files {
        std::fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
        std::fs::write(root.join(rel), data).unwrap();
        manifest.push_str(&format!("{:x} {} {rel}\n", Sha256::digest(data), data.len()));
    }
    format!("{:x}", Sha256::digest(manifest.as_bytes()))
}

async fn stage(stager: &Stager, root: &Path, digest: &str) -> Result<Vec<StagedItem>, super::StageError> {
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let item = StageItem {
        name: "m".into(),
        source: root.display().to_string(),
        sha256: Some(digest.to_owned()),
        model: None,
    };
    let result = stager.stage(&[item], tx).await;
    drain.await.unwrap();
    result
}

fn with_hook(stager: Stager, hook: impl Fn(Step) -> io::Result<()> + Send + Sync + 'static) -> Stager {
    Stager { hook: Hook(Some(Arc::new(hook))), ..stager }
}

#[tokio::test]
async fn the_copy_is_synced_before_the_marker_is_written() {
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let digest = write_source(src.path());
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = steps.clone();
    let manifest = cache.path().join("sha256").join(format!("{digest}.manifest"));
    let marker = manifest.clone();
    let stager = with_hook(Stager::new(cache.path().to_owned(), 2), move |step| {
        // What is on disk at each step, as a crash there would leave it.
        seen.lock().unwrap().push((step, marker.exists()));
        Ok(())
    });
    let staged = stage(&stager, src.path(), &digest).await.unwrap();
    assert_eq!(staged[0].sha256, digest);
    assert_eq!(
        *steps.lock().unwrap(),
        [(Step::BeforeSync, false), (Step::Synced, false), (Step::BeforeMarker, false), (Step::Marked, true)]
    );
}

#[tokio::test]
async fn a_staging_stopped_before_the_marker_is_not_taken_as_complete() {
    for stop_at in [Step::BeforeSync, Step::Synced, Step::BeforeMarker] {
        let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let digest = write_source(src.path());
        let crashing = with_hook(Stager::new(cache.path().to_owned(), 2), move |step| {
            if step == stop_at { Err(io::Error::other("simulated crash")) } else { Ok(()) }
        });
        let error = stage(&crashing, src.path(), &digest).await.unwrap_err();
        assert!(error.to_string().contains("simulated crash"), "{error}");
        let content = cache.path().join("sha256").join(&digest);
        assert!(!content.exists(), "{stop_at:?}: no tree in the cache");
        assert!(!cache.path().join("sha256").join(format!("{digest}.manifest")).exists(), "{stop_at:?}");

        // The next staging (another agent process) is not fooled and completes it.
        let stager = Stager::new(cache.path().to_owned(), 2);
        let staged = stage(&stager, src.path(), &digest).await.unwrap();
        assert!(!staged[0].from_cache, "{stop_at:?}: staged again, not found complete");
        assert_eq!(std::fs::read(content.join("sub/b.txt")).unwrap(), b"hello\n");
        assert_eq!(std::fs::read(content.join("a.bin")).unwrap().len(), 5 << 20);
    }
}
