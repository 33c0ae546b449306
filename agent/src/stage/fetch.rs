//! Copies one file into a `.partial` file while hashing it: from a local path
//! (read once, in a blocking thread) or from an HTTP URL (streamed), resuming
//! from what the partial already holds.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use nix::errno::Errno;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::StageError;
use super::progress::Meter;

/// Mode bits kept from a source: not setuid or setgid.
pub(crate) const MODE_BITS: u32 = 0o1777;

/// Read and write buffer. A pipelined copy holds `1 + HASH_DEPTH` of them.
pub(super) const CHUNK: usize = 1 << 20;

/// From this many bytes to copy on, a file's SHA-256 is computed on a thread
/// of its own while the copying thread reads and writes the next chunks (the
/// digest of a whole file is one sequential computation: it cannot be split by
/// chunk, only overlapped with the I/O).
const PIPELINE_MIN: u64 = 8 * CHUNK as u64;

/// Chunks a pipelined copy may have written but not hashed yet.
const HASH_DEPTH: usize = 3;

/// How often and how patiently transient errors are retried.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    pub attempts: usize,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The delays before the 2nd, 3rd, ... attempt.
    pub(super) fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts.saturating_sub(1))
            .with_jitter()
            .build()
    }
}

/// The SHA-256 and length of a finished file.
pub(super) struct Finished {
    pub sha256: String,
    pub bytes: u64,
}

/// A file being written from its first byte on, with the digest of what it holds.
pub(super) struct Partial {
    file: File,
    hasher: Sha256,
    len: u64,
}

impl Partial {
    /// Opens `path`; with `resume`, keeps what it holds and hashes it (the
    /// digest covers the whole file), else empties it.
    pub(super) fn open(path: &Path, resume: bool, meter: &Meter) -> io::Result<Self> {
        let open = || OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
        let file = match open() {
            // Left read-only by a crash between setting its mode and renaming it.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && path.is_file() => {
                std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
                open()?
            }
            other => other?,
        };
        let mut partial = Self { file, hasher: Sha256::new(), len: 0 };
        if resume {
            let mut buf = vec![0; CHUNK];
            loop {
                if meter.is_cancelled() {
                    return Err(io::Error::other("staging cancelled"));
                }
                let n = match partial.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                partial.hasher.update(&buf[..n]);
                partial.len += n as u64;
                meter.add(n as u64);
            }
        } else {
            partial.file.set_len(0)?;
        }
        Ok(partial)
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = Sha256::new();
        self.len = 0;
        Ok(())
    }

    /// Sets the mode and flushes the data to disk, so that a rename that
    /// survives a crash never names a file whose data did not.
    pub(super) fn finish(self, mode: Option<u32>) -> io::Result<Finished> {
        let (finished, file) = self.finish_unsynced(mode)?;
        file.sync_all()?;
        Ok(finished)
    }

    /// Sets the mode but leaves the flush to the caller, who must make the
    /// data durable (`sync_data` of the file, or `syncfs`) before anything
    /// that marks it complete.
    pub(super) fn finish_unsynced(self, mode: Option<u32>) -> io::Result<(Finished, File)> {
        if let Some(mode) = mode {
            self.file.set_permissions(Permissions::from_mode(mode))?;
        }
        Ok((Finished { sha256: format!("{:x}", self.hasher.finalize()), bytes: self.len }, self.file))
    }

    fn into_async(self) -> AsyncPartial {
        AsyncPartial {
            file: BufWriter::with_capacity(CHUNK, tokio::fs::File::from_std(self.file)),
            hasher: self.hasher,
            len: self.len,
        }
    }
}

/// A `Partial` written from async code (an HTTP body).
struct AsyncPartial {
    file: BufWriter<tokio::fs::File>,
    hasher: Sha256,
    len: u64,
}

impl AsyncPartial {
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data).await?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    async fn reset(&mut self) -> io::Result<()> {
        self.file.flush().await?;
        self.file.get_mut().set_len(0).await?;
        self.file.seek(SeekFrom::Start(0)).await?;
        self.hasher = Sha256::new();
        self.len = 0;
        Ok(())
    }

    async fn into_sync(mut self) -> io::Result<Partial> {
        self.file.flush().await?;
        let file = self.file.into_inner().into_std().await;
        Ok(Partial { file, hasher: self.hasher, len: self.len })
    }
}

/// Hashes a file already in place (a file of a directory copied by an earlier,
/// interrupted staging), without touching the source.
pub(super) fn hash_file(path: &Path, meter: &Meter) -> io::Result<Finished> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0; CHUNK];
    loop {
        if meter.is_cancelled() {
            return Err(io::Error::other("staging cancelled"));
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        bytes += n as u64;
        meter.add(n as u64);
    }
    Ok(Finished { sha256: format!("{:x}", hasher.finalize()), bytes })
}

/// Errors of a network filesystem that are worth another try.
fn is_transient(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
        || error.raw_os_error().is_some_and(|code| {
            [Errno::ESTALE, Errno::EIO, Errno::ETIMEDOUT, Errno::EAGAIN].iter().any(|e| *e as i32 == code)
        })
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
    Cancelled,
}

/// Copies a local file into `partial_path`, continuing from what it holds when
/// `resume`. Runs in a blocking thread. Returns the partial and the source's mode.
pub(super) fn copy_local(
    item: &str,
    from: &Path,
    partial_path: &Path,
    resume: bool,
    meter: &Meter,
    retry: &RetryPolicy,
) -> Result<(Partial, u32), StageError> {
    let read_error = |error| StageError::Io { item: item.to_owned(), action: "read", path: from.to_owned(), error };
    let write_error =
        |error| StageError::Io { item: item.to_owned(), action: "write", path: partial_path.to_owned(), error };
    let mut source = open_source(from).map_err(read_error)?;
    let meta = source.metadata().map_err(read_error)?;
    let (size, mode) = (meta.len(), meta.permissions().mode() & MODE_BITS);
    let mut partial = Partial::open(partial_path, resume, meter).map_err(write_error)?;
    if partial.len() > size {
        tracing::info!(item, partial = %partial_path.display(), "partial copy is longer than the source; starting over");
        meter.rewind(partial.len());
        partial.reset().map_err(write_error)?;
    } else if partial.len() > 0 {
        tracing::info!(item, from = %from.display(), offset = partial.len(), "resuming an interrupted copy");
    }
    let mut delays = retry.delays();
    let mut buf = vec![0; CHUNK];
    loop {
        match pump(&mut source, &mut partial, size, &mut buf, meter) {
            Ok(()) => break,
            Err(PumpError::Cancelled) => return Err(StageError::Cancelled { item: item.to_owned() }),
            Err(PumpError::Write(e)) => return Err(write_error(e)),
            Err(PumpError::Read(e)) if is_transient(&e) => {
                let Some(delay) = delays.next() else { return Err(read_error(e)) };
                tracing::warn!(item, from = %from.display(), error = %e, retry_in = ?delay, "read failed; retrying");
                std::thread::sleep(delay);
                // A stale NFS handle needs a fresh open.
                source = open_source(from).map_err(read_error)?;
            }
            Err(PumpError::Read(e)) => return Err(read_error(e)),
        }
    }
    Ok((partial, mode))
}

/// Opens a source file without blocking on a FIFO, and refuses anything but
/// a regular file by the type of what was opened (not of a name that could
/// have been swapped since the directory was listed).
pub(super) fn open_source(from: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY).open(from)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file (a FIFO or a device?); stage regular files only"));
    }
    Ok(file)
}

/// Appends the source from the partial's length up to `size`, and checks that
/// the source ends there.
fn pump(source: &mut File, partial: &mut Partial, size: u64, buf: &mut [u8], meter: &Meter) -> Result<(), PumpError> {
    source.seek(SeekFrom::Start(partial.len())).map_err(PumpError::Read)?;
    if size.saturating_sub(partial.len()) >= PIPELINE_MIN {
        pump_pipelined(source, partial, size, meter)?;
    } else {
        while partial.len() < size {
            if meter.is_cancelled() {
                return Err(PumpError::Cancelled);
            }
            let want = buf.len().min(usize::try_from(size - partial.len()).unwrap_or(usize::MAX));
            let n = match source.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PumpError::Read(e)),
            };
            partial.write(&buf[..n]).map_err(PumpError::Write)?;
            meter.read_from_source(n as u64);
            meter.add(n as u64);
        }
    }
    let mut probe = [0u8; 1];
    let grew = loop {
        match source.read(&mut probe) {
            Ok(n) => break n > 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PumpError::Read(e)),
        }
    };
    if partial.len() != size || grew {
        let now = source.metadata().map(|m| m.len()).unwrap_or(partial.len());
        return Err(PumpError::Read(io::Error::other(format!(
            "the file changed while it was copied ({size} bytes at the start, {now} now); \
             stage it when nothing writes to it"
        ))));
    }
    Ok(())
}

/// `pump`'s loop with the hashing on a second thread: this one reads a chunk
/// and writes it, the other hashes the chunks in order, so that one large file
/// uses two cores. Every chunk written is hashed before this returns, also on
/// an error, so the partial's digest always covers exactly what it holds (a
/// retry continues from there).
fn pump_pipelined(source: &mut File, partial: &mut Partial, size: u64, meter: &Meter) -> Result<(), PumpError> {
    let Partial { file, hasher, len } = partial;
    std::thread::scope(|scope| {
        let (to_hash, chunks) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_DEPTH);
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let hashing = scope.spawn(move || {
            for (chunk, n) in chunks {
                hasher.update(&chunk[..n]);
                // Fails only once the copying side is done.
                let _ = give_back.send(chunk);
            }
        });
        let mut fresh = HASH_DEPTH + 1;
        let copied = (|| {
            while *len < size {
                if meter.is_cancelled() {
                    return Err(PumpError::Cancelled);
                }
                let mut chunk = if fresh > 0 {
                    fresh -= 1;
                    vec![0; CHUNK]
                } else {
                    spare.recv().map_err(|_| PumpError::Write(io::Error::other("the hashing thread stopped")))?
                };
                let want = CHUNK.min(usize::try_from(size - *len).unwrap_or(usize::MAX));
                let n = loop {
                    match source.read(&mut chunk[..want]) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other.map_err(PumpError::Read)?,
                    }
                };
                if n == 0 {
                    break;
                }
                file.write_all(&chunk[..n]).map_err(PumpError::Write)?;
                *len += n as u64;
                meter.read_from_source(n as u64);
                meter.add(n as u64);
                to_hash
                    .send((chunk, n))
                    .map_err(|_| PumpError::Write(io::Error::other("the hashing thread stopped")))?;
            }
            Ok(())
        })();
        drop(to_hash);
        let hashed = hashing.join().map_err(|_| PumpError::Write(io::Error::other("the hashing thread panicked")));
        copied.and(hashed)
    })
}

enum Failure {
    /// The server's answer, final (404, 403, ...).
    Status(StatusCode),
    Write(io::Error),
    /// Worth another try, from the partial's length.
    Transient(String),
}

/// Downloads `url` into `partial_path`, continuing from what it holds when
/// `resume` (a `Range` request; a server that answers 200 sends it all again).
pub(super) async fn download(
    client: &reqwest::Client,
    item: &str,
    url: &Url,
    partial_path: &Path,
    resume: bool,
    meter: &Arc<Meter>,
    retry: &RetryPolicy,
) -> Result<Partial, StageError> {
    let write_error =
        |error| StageError::Io { item: item.to_owned(), action: "write", path: partial_path.to_owned(), error };
    let (path, m) = (partial_path.to_owned(), meter.clone());
    let partial = tokio::task::spawn_blocking(move || Partial::open(&path, resume, &m))
        .await
        .map_err(|e| StageError::Task(e.to_string()))?
        .map_err(write_error)?;
    let mut sink = partial.into_async();
    let mut delays = retry.delays();
    let mut attempts = 1;
    loop {
        match fetch_once(client, item, url, &mut sink, meter).await {
            Ok(()) => break,
            Err(Failure::Status(status)) => {
                return Err(StageError::HttpStatus { item: item.to_owned(), url: url.to_string(), status });
            }
            Err(Failure::Write(e)) => return Err(write_error(e)),
            Err(Failure::Transient(error)) => {
                let Some(delay) = delays.next() else {
                    return Err(StageError::Download { item: item.to_owned(), url: url.to_string(), attempts, error });
                };
                tracing::warn!(item, %url, attempt = attempts, %error, retry_in = ?delay, "download failed; retrying");
                tokio::time::sleep(delay).await;
                attempts += 1;
            }
        }
    }
    sink.into_sync().await.map_err(write_error)
}

async fn fetch_once(
    client: &reqwest::Client,
    item: &str,
    url: &Url,
    sink: &mut AsyncPartial,
    meter: &Meter,
) -> Result<(), Failure> {
    let offset = sink.len;
    let mut request = client.get(url.clone());
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request.send().await.map_err(|e| Failure::Transient(cohort_runtime::error_chain(&e)))?;
    let status = response.status();
    let content_range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let total = match status {
        StatusCode::PARTIAL_CONTENT if offset > 0 => match content_range.as_deref().and_then(parse_content_range) {
            Some((Some(start), total)) if start == offset => {
                tracing::info!(item, %url, offset, "resuming an interrupted download");
                total.or(response.content_length().map(|n| offset + n))
            }
            _ => {
                restart(sink, meter).await?;
                return Err(Failure::Transient(format!(
                    "asked for bytes {offset}- but the server sent {}",
                    content_range.as_deref().unwrap_or("no Content-Range")
                )));
            }
        },
        StatusCode::OK => {
            if offset > 0 {
                tracing::info!(item, %url, offset, "the server ignored the Range request; downloading the whole file");
                restart(sink, meter).await?;
            }
            response.content_length()
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            // `bytes */N` with N == offset: the partial is already whole.
            if let Some((None, Some(total))) = content_range.as_deref().and_then(parse_content_range)
                && total == offset
            {
                return Ok(());
            }
            restart(sink, meter).await?;
            return Err(Failure::Transient(format!("the server refused bytes {offset}-; downloading the whole file")));
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT => {
            return Err(Failure::Transient(format!("the server answered {s}")));
        }
        s => return Err(Failure::Status(s)),
    };
    meter.set_bytes_total(total);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::Transient(cohort_runtime::error_chain(&e)))?;
        sink.write(&chunk).await.map_err(Failure::Write)?;
        meter.add(chunk.len() as u64);
    }
    match total {
        Some(total) if sink.len != total => {
            let got = sink.len;
            if got > total {
                restart(sink, meter).await?;
            }
            Err(Failure::Transient(format!("the body ended at byte {got} of {total}")))
        }
        _ => Ok(()),
    }
}

async fn restart(sink: &mut AsyncPartial, meter: &Meter) -> Result<(), Failure> {
    meter.rewind(sink.len);
    sink.reset().await.map_err(Failure::Write)
}

/// `bytes START-END/TOTAL` -> (Some(START), Some(TOTAL)); `bytes */TOTAL` ->
/// (None, Some(TOTAL)); a `*` total is None.
fn parse_content_range(value: &str) -> Option<(Option<u64>, Option<u64>)> {
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
    let start = if range.trim() == "*" { None } else { Some(range.split_once('-')?.0.trim().parse().ok()?) };
    Some((start, total))
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((Some(100), Some(200))));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((Some(100), None)));
        assert_eq!(parse_content_range("bytes */200"), Some((None, Some(200))));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
