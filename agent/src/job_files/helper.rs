//! `cohort-agent files-as uid:gid:groups`: the helper's side. It becomes the
//! user, limits itself, then does one [`Request`] read from stdin and prints
//! [`Reply`] lines.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};

use super::{FILES_AS, Limits, Reply, Request};
use crate::stage::Stager;

/// More than this on stdin is refused (a staging of many items is a few KiB).
const MAX_REQUEST: u64 = 16 << 20;
/// The most of a marker file that is read.
const MAX_MARKER: u64 = 4096;

/// Whether this process was started as `cohort-agent files-as`.
pub fn invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == FILES_AS)
}

/// The exit status after content was sent on stdout: an error after the
/// answer's line can only be told by the status (the bytes came short).
fn exit_after_sending(sent: Result<(), String>) -> i32 {
    match sent {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("cohort-agent {FILES_AS}: {message}");
            1
        }
    }
}

/// Runs the helper; returns its exit status (0: the last line is the answer,
/// or for `ReadContent` the content's line and all its bytes; 1: the last
/// line is a `Failed`, or a content's bytes came short; 127: the helper could
/// not start as the user).
pub fn main() -> i32 {
    let fail = |message: String| {
        eprintln!("cohort-agent {FILES_AS}: {message}");
        127
    };
    let Some(run_as) = std::env::args().nth(2) else {
        return fail("usage: files-as uid:gid:groups < request.json".into());
    };
    // The request is the first line; a sync archive's bytes (or a received
    // file's, or a manifest) follow it.
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let request: Request = match read_request_line(&mut stdin) {
        Ok(request) => request,
        Err(message) => return fail(message),
    };
    // The user first: nothing of the job's is opened with the agent's privileges.
    if let Err(e) = crate::rank_user::become_user(&run_as) {
        return fail(e.to_string());
    }
    if let Err(e) = apply(&request.limits()) {
        return fail(format!("setting resource limits: {e}"));
    }
    let reply = match request {
        Request::CheckDataset { path } => check_dataset(&path).map(|r| Reply::Dataset(Box::new(r))),
        Request::WriteMarker { dir, file, marker } => write_marker(&dir, &file, &marker).map(|()| Reply::Done),
        Request::ReadMarker { file, marker, wait_ms } => {
            read_marker(&file, &marker, Duration::from_millis(wait_ms)).map(|()| Reply::Done)
        }
        Request::RemoveMarker { file } => match std::fs::remove_file(&file) {
            Ok(()) => Ok(Reply::Done),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Reply::Done),
            Err(e) => Err(format!("cannot remove {}: {e}", file.display())),
        },
        Request::Stage { cache_dir, parallel_files, items } => stage(cache_dir, parallel_files, items),
        Request::ListCache { cache_dir } => crate::stage::gc::list(&cache_dir)
            .map(Reply::CacheList)
            .map_err(|e| format!("cannot list the staging cache {}: {e}", cache_dir.display())),
        Request::EvictCache { cache_dir, digests } => crate::stage::gc::evict(&cache_dir, &digests)
            .map(Reply::Evicted)
            .map_err(|e| format!("cannot remove content from the staging cache {}: {e}", cache_dir.display())),
        Request::FindCheckpoint { directory } => {
            super::checkpoint::find_checkpoint_in(&directory).map(Reply::Checkpoint)
        }
        Request::InspectPath(inspect) => super::paths::inspect(&inspect).map(Reply::Path),
        Request::UnpackSync { dest, sha256, bytes, files, unpacked_bytes } => {
            let declared = super::unpack::Declared { sha256: &sha256, bytes, files, unpacked_bytes };
            super::unpack::unpack(&dest, declared, &mut stdin).map(Reply::Unpacked)
        }
        Request::ReadContent { cache_dir, sha256, part, span } => {
            match super::content::open(&cache_dir, &sha256, part.as_deref(), span.is_some()) {
                // The answer's line, then the file's bytes.
                Ok(Some(opened)) => {
                    let out = &mut std::io::stdout().lock();
                    let sent = match span {
                        Some(span) => super::content::send_span(opened, span, out),
                        None => super::content::send(opened, out),
                    };
                    return exit_after_sending(sent);
                }
                // No directory's manifest: a staged file's, made for peers.
                Ok(None) if part.is_none() => match super::content::file_manifest(&cache_dir, &sha256) {
                    Ok(Some(manifest)) => {
                        let out = &mut std::io::stdout().lock();
                        return exit_after_sending(super::content::send_bytes(manifest.as_bytes(), out));
                    }
                    Ok(None) => Ok(Reply::Missing),
                    Err(message) => Err(message),
                },
                Ok(None) => Ok(Reply::Missing),
                Err(message) => Err(message),
            }
        }
        Request::ReceiveFile { file, piece } => match piece {
            Some(piece) => super::content::receive_piece(file.incoming(), &piece, &mut stdin),
            None => super::content::receive(file.incoming(), &mut stdin),
        },
        Request::FinishFile(file) => super::content::finish_file(file.incoming(), file.piece_bytes, &file.piece_sha256),
        Request::PieceDigests { cache_dir, sha256, rel, piece_bytes, file_sha256 } => {
            super::content::piece_digests(&cache_dir, &sha256, &rel, piece_bytes, &file_sha256)
        }
        Request::ContentModes { cache_dir, sha256 } => super::content::modes(&cache_dir, &sha256),
        Request::FinishTree { cache_dir, sha256, manifest_bytes, modes } => {
            super::content::finish_tree(&cache_dir, &sha256, manifest_bytes, &modes, &mut stdin)
        }
    };
    let (reply, code) = match reply {
        Ok(reply) => (reply, 0),
        Err(message) => (Reply::Failed(message), 1),
    };
    if print(&reply).is_err() {
        return 127;
    }
    code
}

/// The request: one JSON line of at most [`MAX_REQUEST`] bytes (or all of
/// stdin, without a newline).
fn read_request_line(stdin: &mut impl std::io::BufRead) -> Result<Request, String> {
    use std::io::BufRead as _;
    let mut line = Vec::new();
    stdin
        .take(MAX_REQUEST + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the request from stdin: {e}"))?;
    if line.len() as u64 > MAX_REQUEST {
        return Err(format!("the request on stdin is over {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("the request on stdin is not valid: {e}"))
}

/// One JSON value of at most `limit` bytes from stdin, as the agent's
/// helpers (`files-as`, `preflight-as`) take their input; `what` names it in errors.
pub(crate) fn read_stdin_json<T: serde::de::DeserializeOwned>(limit: u64, what: &str) -> Result<T, String> {
    let mut text = Vec::new();
    std::io::stdin()
        .take(limit + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("reading the {what} from stdin: {e}"))?;
    if text.len() as u64 > limit {
        return Err(format!("the {what} on stdin is over {limit} bytes"));
    }
    serde_json::from_slice(&text).map_err(|e| format!("the {what} on stdin is not valid: {e}"))
}

fn print(reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&line)?;
    stdout.flush()
}

fn apply(limits: &Limits) -> nix::Result<()> {
    const INFINITY: u64 = nix::libc::RLIM_INFINITY;
    setrlimit(Resource::RLIMIT_AS, limits.address_space, limits.address_space)?;
    if let Some(cpu) = limits.cpu_secs {
        // The soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        setrlimit(Resource::RLIMIT_CPU, cpu, cpu + 1)?;
    }
    let fsize = limits.file_size.unwrap_or(INFINITY);
    setrlimit(Resource::RLIMIT_FSIZE, fsize, fsize)?;
    // No core dump of whatever the helper read.
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
}

/// Opens `path` for reading as a regular file, or says what else it is. The
/// open does not block on a FIFO (O_NONBLOCK) and the type is that of the
/// opened file (fstat), so swapping the name afterwards changes nothing.
/// Symlinks are followed: with the user's own permissions, which is what
/// the job's processes would do.
pub(crate) fn open_regular(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open {} as the job's user: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is {}, not a regular file; give the path of a regular file",
            path.display(),
            kind(&meta.file_type())
        ));
    }
    Ok(file)
}

/// What a file that is not a regular one is, for errors.
pub(super) fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn check_dataset(path: &Path) -> Result<cohort_shared::dataset::DatasetReport, String> {
    let file = open_regular(path)?;
    // What the file held when opened: one that grows meanwhile is not read forever.
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = BufReader::with_capacity(1 << 20, file.take(size));
    Ok(cohort_shared::dataset::check_reader(&path.display().to_string(), reader))
}

fn write_marker(dir: &Path, file: &Path, marker: &str) -> Result<(), String> {
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(|e| {
        format!("cannot create {} as the job's user: {e}; name a directory that user may write", dir.display())
    })?;
    // A new file, never through a link someone left at that name.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o644)
        .open(file)
        .map_err(|e| {
            format!("cannot write {} as the job's user: {e}; name a directory that user may write", file.display())
        })?;
    out.write_all(marker.as_bytes()).map_err(|e| format!("cannot write {}: {e}", file.display()))
}

fn read_marker(file: &Path, marker: &str, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let path = file.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default();
    loop {
        let read = open_regular(file).and_then(|f| {
            let mut text = String::new();
            f.take(MAX_MARKER).read_to_string(&mut text).map(|_| text).map_err(|e| e.to_string())
        });
        match read {
            Ok(text) if text == marker => return Ok(()),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(other) => return Err(format!("{} holds {other:?}, not this job's marker", file.display())),
            Err(e) => {
                return Err(format!(
                    "the marker node rank 0 wrote is not visible here after {}s ({e}): {path} is local to each node",
                    wait.as_secs()
                ));
            }
        }
    }
}

fn stage(
    cache_dir: std::path::PathBuf,
    parallel_files: usize,
    items: Vec<crate::stage::StageItem>,
) -> Result<Reply, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(parallel_files.max(1) + 4)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the staging runtime: {e}"))?;
    runtime.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let forward = tokio::task::spawn_blocking(move || {
            while let Some(progress) = rx.blocking_recv() {
                // A closed stdout means the agent is gone; the staging ends with it.
                let _ = print(&Reply::Progress(progress));
            }
        });
        let stager = Stager::new(cache_dir, parallel_files);
        let staged = stager.stage(&items, tx).await;
        let _ = forward.await;
        staged.map(Reply::Staged).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_a_fifo_is_never_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("data.jsonl");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_regular(&fifo).unwrap_err();
        assert!(err.contains("data.jsonl is a FIFO, not a regular file"), "{err}");
        let err = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(err.contains("/dev/zero is a character device"), "{err}");
        let file = dir.path().join("ok.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        assert!(open_regular(&file).is_ok());
    }

    #[test]
    fn a_marker_is_never_written_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let marker = dir.path().join("shared/.cohort-shared-check-x");
        std::fs::create_dir_all(dir.path().join("shared")).unwrap();
        std::os::unix::fs::symlink(&victim, &marker).unwrap();
        let err = write_marker(&dir.path().join("shared"), &marker, "x").unwrap_err();
        assert!(err.contains("cannot write"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
