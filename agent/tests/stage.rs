#![allow(clippy::unwrap_used)]
//! Staging against real files in temp dirs and a real HTTP server on 127.0.0.1.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cohort_agent::stage::{StageError, StageItem, StageProgress, StageState, StagedItem, Stager};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Bytes that do not repeat at any short period.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn item(name: &str, source: impl ToString, sha256: Option<&str>) -> StageItem {
    StageItem { name: name.into(), source: source.to_string(), sha256: sha256.map(str::to_owned), model: None }
}

/// Runs a staging and collects its progress reports.
async fn run(stager: &Stager, items: &[StageItem]) -> (Result<Vec<StagedItem>, StageError>, Vec<StageProgress>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let collect = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(p) = rx.recv().await {
            seen.push(p);
        }
        seen
    });
    let result = stager.stage(items, tx).await;
    (result, collect.await.unwrap())
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
}

// ---------------------------------------------------------------- HTTP server

/// Serves `files` over HTTP/1.1, one request per connection, honouring
/// `Range: bytes=N-` unless told not to; can cut the first response short.
#[derive(Default)]
struct Server {
    files: HashMap<String, Vec<u8>>,
    /// The first GET gets its headers (full length) and this many body bytes, then the connection drops.
    cut_first_after: Option<usize>,
    ignore_range: bool,
    delay: Duration,
    gets: AtomicUsize,
    ranges: Mutex<Vec<Option<String>>>,
}

impl Server {
    async fn start(self) -> (Arc<Self>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = Arc::new(self);
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(s.clone().answer(socket));
            }
        });
        (server, base)
    }

    async fn answer(self: Arc<Self>, mut socket: TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let range = head.lines().find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("range")).map(|(_, v)| v.trim().to_owned())
        });
        let nth = self.gets.fetch_add(1, Ordering::SeqCst);
        self.ranges.lock().await.push(range.clone());
        let Some(body) = self.files.get(&path) else {
            let _ = socket.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
            return;
        };
        tokio::time::sleep(self.delay).await;
        let len = body.len();
        let start = range.filter(|_| !self.ignore_range).and_then(|r| {
            r.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse::<usize>().ok())
        });
        let (status, extra, part) = match start {
            Some(start) if start >= len => {
                ("416 Range Not Satisfiable", format!("Content-Range: bytes */{len}\r\n"), &body[..0])
            }
            Some(start) => {
                ("206 Partial Content", format!("Content-Range: bytes {start}-{}/{len}\r\n", len - 1), &body[start..])
            }
            None => ("200 OK", String::new(), &body[..]),
        };
        let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n", part.len());
        let cut = if nth == 0 { self.cut_first_after } else { None };
        let sent = cut.map_or(part.len(), |c| c.min(part.len()));
        let _ = socket.write_all(head.as_bytes()).await;
        let _ = socket.write_all(&part[..sent]).await;
        let _ = socket.flush().await;
    }

    async fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().await.clone()
    }
}

// ---------------------------------------------------------------- local files

#[tokio::test]
async fn file_without_digest_is_copied_hashed_and_keeps_its_mode() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(3 * 1024 * 1024 + 5, 1);
    let file = src.path().join("train.jsonl");
    std::fs::write(&file, &data).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o750)).unwrap();

    let stager = Stager::new(cache.path().to_owned(), 4);
    let (result, progress) = run(&stager, &[item("train", file.display(), None)]).await;
    let staged = result.unwrap();

    assert_eq!(staged[0].sha256, sha(&data));
    assert_eq!(staged[0].path, cache.path().join("sha256").join(sha(&data)).join("train.jsonl"));
    assert_eq!(staged[0].bytes, data.len() as u64);
    assert!(!staged[0].from_cache);
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    assert_eq!(std::fs::metadata(&staged[0].path).unwrap().permissions().mode() & 0o777, 0o750);
    assert_eq!(progress.first().map(|p| &p.state), Some(&StageState::Checking));
    let last = progress.last().unwrap();
    assert_eq!(
        (&last.state, last.bytes_done, last.bytes_total),
        (&StageState::Ready, data.len() as u64, Some(data.len() as u64))
    );
    assert!(entries(&cache.path().join("partial")).is_empty(), "no partial left behind");
}

#[tokio::test]
async fn declared_digest_is_cached_and_not_copied_again() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(200_000, 2);
    let file = src.path().join("tokenizer.json");
    std::fs::write(&file, &data).unwrap();
    // Upper case, as some tools print it.
    let digest = sha(&data).to_uppercase();
    let stager = Stager::new(cache.path().to_owned(), 2);

    let first = run(&stager, &[item("tok", file.display(), Some(&digest))]).await.0.unwrap();
    assert!(!first[0].from_cache);
    assert_eq!(std::fs::read(&first[0].path).unwrap(), data);
    let mtime = std::fs::metadata(&first[0].path).unwrap().mtime_nsec();

    // Without its source, only the cache can answer.
    std::fs::remove_file(&file).unwrap();
    let (second, progress) = run(&stager, &[item("tok", file.display(), Some(&digest))]).await;
    let second = second.unwrap();
    assert!(second[0].from_cache);
    assert_eq!(second[0].path, first[0].path);
    assert_eq!(second[0].bytes, data.len() as u64);
    assert_eq!(std::fs::metadata(&second[0].path).unwrap().mtime_nsec(), mtime);
    assert_eq!(progress.last().map(|p| &p.state), Some(&StageState::Cached));

    // The same content under another name: a hard link, no copy.
    let other = run(&stager, &[item("tok2", src.path().join("vocab.json").display(), Some(&digest))]).await.0.unwrap();
    assert!(other[0].from_cache);
    assert_eq!(other[0].path.file_name().unwrap(), "vocab.json");
    assert_eq!(std::fs::metadata(&other[0].path).unwrap().ino(), std::fs::metadata(&first[0].path).unwrap().ino());
}

#[tokio::test]
async fn digest_mismatch_names_everything_and_caches_nothing() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let file = src.path().join("weights.bin");
    std::fs::write(&file, pattern(1_500_000, 3)).unwrap();
    let wrong = sha(b"something else");

    let (result, progress) =
        run(&Stager::new(cache.path().to_owned(), 2), &[item("weights", file.display(), Some(&wrong))]).await;
    let error = result.unwrap_err();
    assert!(matches!(error, StageError::DigestMismatch { .. }), "{error}");
    let text = error.to_string();
    for needle in ["weights", &wrong, &sha(&std::fs::read(&file).unwrap()), &file.display().to_string()] {
        assert!(text.contains(needle), "{text:?} should name {needle}");
    }
    assert!(entries(&cache.path().join("sha256")).is_empty(), "nothing cached");
    assert!(entries(&cache.path().join("partial")).is_empty(), "no partial kept");
    assert!(matches!(progress.last().map(|p| &p.state), Some(StageState::Failed(_))));
}

#[tokio::test]
async fn leftover_partial_of_a_local_copy_is_continued() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(2 * 1024 * 1024 + 123, 4);
    let file = src.path().join("shard-0.bin");
    std::fs::write(&file, &data).unwrap();
    let digest = sha(&data);
    let partial_dir = cache.path().join("partial").join(format!("sha256-{digest}"));
    let partial = partial_dir.join("shard-0.bin.partial");
    let stager = Stager::new(cache.path().to_owned(), 2);
    let items = [item("shard", file.display(), Some(&digest))];

    // A prefix that differs from the source: continuing from it must give a
    // wrong digest, which shows the prefix is used and not read again.
    std::fs::create_dir_all(&partial_dir).unwrap();
    let mut bad = data[..1_048_583].to_vec();
    bad[10] ^= 0xff;
    std::fs::write(&partial, &bad).unwrap();
    assert!(matches!(run(&stager, &items).await.0, Err(StageError::DigestMismatch { .. })));
    assert!(!partial.exists(), "a bad prefix is thrown away");

    // A good prefix: the copy goes on from its length and the digest covers it.
    std::fs::create_dir_all(&partial_dir).unwrap();
    std::fs::write(&partial, &data[..1_048_583]).unwrap();
    let staged = run(&stager, &items).await.0.unwrap();
    assert_eq!(staged[0].sha256, digest);
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    assert!(!partial.exists());
}

/// Writes a tree of 50 files (nested dirs, an empty file, modes, two inner
/// symlinks) and returns its manifest digest, computed here from the spec.
fn write_tree(root: &Path) -> String {
    let mut manifest: Vec<(String, String)> = Vec::new();
    for i in 0..50u64 {
        let rel = match i % 5 {
            0 => format!("f{i:02}.bin"),
            1 => format!("a/f{i:02}.bin"),
            2 => format!("a/b/f{i:02}.bin"),
            3 => format!("c/d/e/f{i:02}.json"),
            _ => format!("a-b/f{i:02}.txt"),
        };
        let data = if i == 7 { Vec::new() } else { pattern((i as usize * 37_919) % 300_000 + 1, i) };
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        if i % 10 == 3 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        manifest.push((rel.clone(), format!("{} {} {rel}\n", sha(&data), data.len())));
    }
    std::os::unix::fs::symlink("b/f02.bin", root.join("a/latest")).unwrap();
    manifest.push(("a/latest".into(), format!("{} symlink a/latest\n", sha(b"b/f02.bin"))));
    // Absolute but inside: rewritten as relative in the copy.
    std::os::unix::fs::symlink(root.join("c/d"), root.join("a/b/d-link")).unwrap();
    manifest.push(("a/b/d-link".into(), format!("{} symlink a/b/d-link\n", sha(b"../../c/d"))));
    std::fs::set_permissions(root.join("c/d"), std::fs::Permissions::from_mode(0o750)).unwrap();
    manifest.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    sha(manifest.into_iter().map(|(_, line)| line).collect::<String>().as_bytes())
}

#[tokio::test]
async fn directory_is_copied_file_by_file_with_layout_modes_and_manifest_digest() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("qwen-sft-data");
    let digest = write_tree(&root);
    let stager = Stager::new(cache.path().to_owned(), 4);

    let (result, progress) = run(&stager, &[item("data", root.display(), Some(&digest))]).await;
    let staged = result.unwrap();
    let copy = &staged[0].path;
    assert_eq!(*copy, cache.path().join("sha256").join(&digest));
    assert_eq!(staged[0].sha256, digest);
    assert!(!staged[0].from_cache);
    let last = progress.last().unwrap();
    assert_eq!((&last.state, last.files_done, last.files_total), (&StageState::Ready, 50, 50));

    let mut total = 0;
    for i in 0..50u64 {
        let rel = ["f", "a/f", "a/b/f", "c/d/e/f", "a-b/f"][(i % 5) as usize];
        let ext = ["bin", "bin", "bin", "json", "txt"][(i % 5) as usize];
        let rel = format!("{rel}{i:02}.{ext}");
        let original = std::fs::read(root.join(&rel)).unwrap();
        assert_eq!(std::fs::read(copy.join(&rel)).unwrap(), original, "{rel}");
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(copy.join(&rel)), mode(root.join(&rel)), "mode of {rel}");
        total += original.len() as u64;
    }
    assert_eq!(staged[0].bytes, total);
    assert_eq!(std::fs::read_link(copy.join("a/latest")).unwrap(), PathBuf::from("b/f02.bin"));
    assert_eq!(std::fs::read_link(copy.join("a/b/d-link")).unwrap(), PathBuf::from("../../c/d"));
    assert!(copy.join("a/b/d-link/e/f03.json").is_file(), "the rewritten link resolves inside the copy");
    assert_eq!(std::fs::metadata(copy.join("c/d")).unwrap().permissions().mode() & 0o777, 0o750);
    assert!(entries(&cache.path().join("partial")).is_empty());

    std::fs::remove_dir_all(&root).unwrap();
    let again = run(&stager, &[item("data", root.display(), Some(&digest))]).await.0.unwrap();
    assert!(again[0].from_cache);
    assert_eq!((again[0].path.clone(), again[0].bytes), (copy.clone(), total));
}

#[tokio::test]
async fn symlink_leading_out_of_the_directory_is_an_error_naming_it() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("ckpt");
    std::fs::create_dir_all(root.join("iter_0000100")).unwrap();
    std::fs::write(root.join("iter_0000100/model.pt"), b"weights").unwrap();
    std::fs::write(src.path().join("secret"), b"outside").unwrap();
    std::os::unix::fs::symlink("../../secret", root.join("iter_0000100/escape")).unwrap();

    let error =
        run(&Stager::new(cache.path().to_owned(), 2), &[item("ckpt", root.display(), None)]).await.0.unwrap_err();
    assert!(matches!(error, StageError::LinkOutside { .. }), "{error}");
    assert!(error.to_string().contains(&root.join("iter_0000100/escape").display().to_string()), "{error}");
    assert!(entries(&cache.path().join("sha256")).is_empty());
}

#[tokio::test]
async fn bad_items_are_refused_before_anything_is_copied() {
    let cache = tempfile::tempdir().unwrap();
    let stager = Stager::new(cache.path().to_owned(), 2);
    let cases = [
        (vec![item("rel", "data/train.jsonl", None)], "absolute path"),
        (vec![item("ftp", "ftp://host/x", None)], "absolute path"),
        (vec![item("digest", "/data/x", Some("abc"))], "64 hex digits"),
        (vec![item("twice", "/data/x", None), item("twice", "/data/y", None)], "listed twice"),
        (vec![item(" ", "/data/x", None)], "no name"),
    ];
    for (items, needle) in cases {
        let error = run(&stager, &items).await.0.unwrap_err();
        assert!(error.to_string().contains(needle), "{error}");
    }
}

// ---------------------------------------------------------------- HTTP

#[tokio::test]
async fn download_is_verified_and_cached() {
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(700_000, 5);
    let (server, base) =
        Server { files: HashMap::from([("/m/config.json".into(), data.clone())]), ..Default::default() }.start().await;
    let stager = Stager::new(cache.path().to_owned(), 2);
    let url = format!("{base}/m/config.json");

    let staged = run(&stager, &[item("config", &url, Some(&sha(&data)))]).await.0.unwrap();
    assert_eq!(staged[0].path.file_name().unwrap(), "config.json");
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    let again = run(&stager, &[item("config", &url, Some(&sha(&data)))]).await.0.unwrap();
    assert!(again[0].from_cache);
    assert_eq!(server.gets.load(Ordering::SeqCst), 1);

    // Without a digest: downloaded, and the digest computed.
    let fresh = tempfile::tempdir().unwrap();
    let staged = run(&Stager::new(fresh.path().to_owned(), 2), &[item("config", &url, None)]).await.0.unwrap();
    assert_eq!(staged[0].sha256, sha(&data));
}

#[tokio::test]
async fn download_cut_mid_body_resumes_with_a_range_request() {
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(1_000_000, 6);
    let (server, base) = Server {
        files: HashMap::from([("/train.jsonl".into(), data.clone())]),
        cut_first_after: Some(300_000),
        ..Default::default()
    }
    .start()
    .await;
    let stager = Stager::new(cache.path().to_owned(), 2).with_retries(3, Duration::from_millis(10));

    let staged = run(&stager, &[item("train", format!("{base}/train.jsonl"), Some(&sha(&data)))]).await.0.unwrap();
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    assert_eq!(staged[0].sha256, sha(&data));
    assert_eq!(server.ranges().await, vec![None, Some("bytes=300000-".to_owned())]);
}

#[tokio::test]
async fn download_starts_over_when_the_server_ignores_range() {
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(1_000_000, 7);
    let (server, base) = Server {
        files: HashMap::from([("/train.jsonl".into(), data.clone())]),
        cut_first_after: Some(300_000),
        ignore_range: true,
        ..Default::default()
    }
    .start()
    .await;
    let stager = Stager::new(cache.path().to_owned(), 2).with_retries(3, Duration::from_millis(10));

    let staged = run(&stager, &[item("train", format!("{base}/train.jsonl"), None)]).await.0.unwrap();
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    assert_eq!(staged[0].sha256, sha(&data));
    assert_eq!(server.gets.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn leftover_partial_download_is_continued() {
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(500_000, 8);
    let digest = sha(&data);
    let (server, base) =
        Server { files: HashMap::from([("/v1/eval.parquet".into(), data.clone())]), ..Default::default() }
            .start()
            .await;
    let partial_dir = cache.path().join("partial").join(format!("sha256-{digest}"));
    std::fs::create_dir_all(&partial_dir).unwrap();
    std::fs::write(partial_dir.join("eval.parquet.partial"), &data[..4096]).unwrap();

    let staged = run(
        &Stager::new(cache.path().to_owned(), 2),
        &[item("eval", format!("{base}/v1/eval.parquet"), Some(&digest))],
    )
    .await
    .0
    .unwrap();
    assert_eq!(std::fs::read(&staged[0].path).unwrap(), data);
    assert_eq!(server.ranges().await, vec![Some("bytes=4096-".to_owned())]);
}

#[tokio::test]
async fn missing_url_is_an_error_naming_the_url_and_status() {
    let cache = tempfile::tempdir().unwrap();
    let (server, base) = Server::default().start().await;
    let url = format!("{base}/nope/model.safetensors");
    let stager = Stager::new(cache.path().to_owned(), 2).with_retries(3, Duration::from_millis(10));

    let error = run(&stager, &[item("model", &url, None)]).await.0.unwrap_err();
    assert!(matches!(error, StageError::HttpStatus { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains(&url) && text.contains("404"), "{text}");
    assert_eq!(server.gets.load(Ordering::SeqCst), 1, "a 404 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stagings_of_the_same_content_make_one_copy() {
    let cache = tempfile::tempdir().unwrap();
    let data = pattern(2_000_000, 9);
    let digest = sha(&data);
    let (server, base) = Server {
        files: HashMap::from([("/shared/data.bin".into(), data.clone())]),
        delay: Duration::from_millis(300),
        ..Default::default()
    }
    .start()
    .await;
    let url = format!("{base}/shared/data.bin");
    // Two stagers on one cache dir stand for two agents (or jobs) on one host.
    let (a, b) = (Stager::new(cache.path().to_owned(), 2), Stager::new(cache.path().to_owned(), 2));
    let (items_a, items_b) = ([item("job-a", &url, Some(&digest))], [item("job-b", &url, Some(&digest))]);
    let (one, two) = tokio::join!(run(&a, &items_a), run(&b, &items_b));
    let (one, two) = (one.0.unwrap(), two.0.unwrap());
    assert_eq!(server.gets.load(Ordering::SeqCst), 1, "one download for both");
    assert_eq!(one[0].path, two[0].path);
    assert_eq!([one[0].from_cache, two[0].from_cache].iter().filter(|c| **c).count(), 1);
    assert_eq!(std::fs::read(&one[0].path).unwrap(), data);

    // Local directories too: one of the two copies, the other finds it cached.
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("tree");
    let digest = write_tree(&root);
    let items = [item("tree", root.display(), Some(&digest))];
    let (one, two) = tokio::join!(run(&a, &items), run(&b, &items));
    let (one, two) = (one.0.unwrap(), two.0.unwrap());
    assert_eq!([one[0].from_cache, two[0].from_cache].iter().filter(|c| **c).count(), 1);
}

/// A tree with files large enough to be hashed on a thread of their own and
/// flushed early, and small ones left to the final sync.
fn write_large_tree(root: &Path) -> (String, u64) {
    let sizes = [9 << 20, (8 << 20) + 1, 5 << 20, 3 << 20, 1, 0];
    let mut lines = Vec::new();
    let mut total = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        let rel = format!("part-{}/shard-{i}.bin", i % 2);
        let data = pattern(size, 100 + i as u64);
        std::fs::create_dir_all(root.join(&rel).parent().unwrap()).unwrap();
        std::fs::write(root.join(&rel), &data).unwrap();
        lines.push((rel.clone(), format!("{} {size} {rel}\n", sha(&data))));
        total += size as u64;
    }
    lines.sort();
    (sha(lines.into_iter().map(|(_, line)| line).collect::<String>().as_bytes()), total)
}

#[tokio::test]
async fn large_files_are_hashed_beside_their_copy_and_match_sha256sum() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("weights");
    let (digest, total) = write_large_tree(&root);
    let stager = Stager::new(cache.path().to_owned(), 2);

    let staged = run(&stager, &[item("w", root.display(), None)]).await.0.unwrap();
    assert_eq!((staged[0].sha256.as_str(), staged[0].bytes), (digest.as_str(), total));
    for i in 0..6 {
        let rel = format!("part-{}/shard-{i}.bin", i % 2);
        assert_eq!(std::fs::read(staged[0].path.join(&rel)).unwrap(), std::fs::read(root.join(&rel)).unwrap(), "{rel}");
    }
    assert_eq!(stager.source_bytes_read(), total, "each source byte read once");
}

#[tokio::test]
async fn unchanged_source_directory_is_not_read_again_for_its_digest() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("model");
    let digest = write_tree(&root);
    let stager = Stager::new(cache.path().to_owned(), 4).with_record_settle(Duration::ZERO);

    let first = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert_eq!((first[0].sha256.as_str(), first[0].from_cache), (digest.as_str(), false));
    let read_once = stager.source_bytes_read();
    assert_eq!(read_once, first[0].bytes);
    assert_eq!(entries(&cache.path().join("sources")).len(), 1, "the source's record is kept");

    let (again, progress) = run(&stager, &[item("m", root.display(), None)]).await;
    let again = again.unwrap();
    assert_eq!((again[0].sha256.as_str(), again[0].from_cache), (digest.as_str(), true));
    assert_eq!(again[0].path, first[0].path);
    assert_eq!(stager.source_bytes_read(), read_once, "not a byte of the source read again");
    assert!(!progress.iter().any(|p| p.state == StageState::Copying));
    assert_eq!(progress.last().map(|p| (&p.state, p.files_done)), Some((&StageState::Cached, 50)));

    // A record is no proof of the cache: with the copy gone, the source is read again.
    std::fs::remove_file(cache.path().join("sha256").join(format!("{digest}.manifest"))).unwrap();
    let third = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert!(!third[0].from_cache);
    assert_eq!(stager.source_bytes_read(), 2 * read_once);
}

#[tokio::test]
async fn source_file_changed_after_its_record_is_read_and_hashed_again() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("model");
    let digest = write_tree(&root);
    let stager = Stager::new(cache.path().to_owned(), 4).with_record_settle(Duration::ZERO);
    let first = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert_eq!(first[0].sha256, digest);

    // Same size, other bytes, and mtime set back: only ctime tells.
    let victim = root.join("a/b/f02.bin");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    data[0] ^= 0xff;
    std::fs::write(&victim, &data).unwrap();
    std::fs::File::options().write(true).open(&victim).unwrap().set_modified(meta.modified().unwrap()).unwrap();
    assert_eq!(std::fs::metadata(&victim).unwrap().mtime_nsec(), meta.mtime_nsec());
    let before = stager.source_bytes_read();
    let second = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert!(!second[0].from_cache);
    assert_ne!(second[0].sha256, digest, "the change is in the digest");
    assert_eq!(std::fs::read(second[0].path.join("a/b/f02.bin")).unwrap(), data);
    assert_eq!(stager.source_bytes_read() - before, second[0].bytes, "the source was read again");

    // Another file one byte longer than it was: a new size.
    std::fs::write(root.join("f00.bin"), pattern(2, 0)).unwrap();
    let third = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert!(!third[0].from_cache);
    assert_ne!(third[0].sha256, second[0].sha256);
}

#[tokio::test]
async fn files_changed_just_before_the_listing_are_not_trusted_later() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let root = src.path().join("model");
    let digest = write_tree(&root);
    // The default settle time: the files were written a moment ago.
    let stager = Stager::new(cache.path().to_owned(), 4);
    let first = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    let again = run(&stager, &[item("m", root.display(), None)]).await.0.unwrap();
    assert_eq!(again[0].sha256, digest);
    assert!(!again[0].from_cache, "a file that may have changed within the timestamps' resolution is read again");
    assert_eq!(stager.source_bytes_read(), 2 * first[0].bytes);
}
