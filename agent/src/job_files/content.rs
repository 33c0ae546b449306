//! The helper's side of content moving between nodes (`crate::peer`): a
//! file of a user's staging cache read for a peer, a file from a peer
//! written into a staging under way, and that staging completed once every
//! file of its manifest is there. All of it as the cache's user, in the
//! layout of `crate::stage` (`sha256/<hex>/`, `sha256/<hex>.manifest`,
//! `partial/sha256-<hex>/tree/`, with files on their way in
//! `partial/sha256-<hex>/from-peers/`), so that the content ends up as a
//! staging from the source would leave it.
//!
//! Names a peer sends (the digest, a file's path) are checked before
//! anything is opened: 64 lowercase hex digits, and a relative path of plain
//! names. The file itself is opened without following a symlink in its
//! place (`O_NOFOLLOW`), and only a regular file is read (checked on the
//! opened file). A link the user left higher up is followed, with that
//! user's own permissions only: it gains nothing the user could not read or
//! write anyway, and whatever it leads to is checked against the digests.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::Reply;
use crate::stage::{MODE_BITS, ManifestOf, parse_manifest};

/// The largest manifest read or written (a million files of long names).
pub const MAX_MANIFEST: u64 = 256 << 20;
/// Bytes a piece takes in a record of piece digests: 64 hex digits and a newline.
pub const PIECE_RECORD_LINE: u64 = 65;
/// The largest record of a file's piece digests kept (a million pieces, 64
/// TiB in pieces of 64 MiB); a file of more pieces has them hashed again
/// when asked.
pub const MAX_PIECES_RECORD: u64 = 64 << 20;
/// Bytes read from stdin at once while receiving a file.
const BLOCK: usize = 1 << 20;
/// The most [`PathMode`]s listed for a content, or applied to one: past
/// them, paths keep the defaults.
pub const MAX_MODES: usize = 10_000;
/// The most entries (files, directories, links) [`modes`] looks at.
const MAX_WALK: usize = 4_000_000;
/// The modes a file and a directory from peers get unless listed otherwise.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// The permission bits of one path of a content (`""`: its root), where
/// they differ from [`FILE_MODE`] or [`DIR_MODE`]: what the digest does not
/// cover, sent beside the manifest so that a copy from peers has the modes
/// a staging from the source gives (an executable stays executable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathMode {
    pub path: String,
    pub mode: u32,
}

/// Where a content's pieces are in a cache.
struct Layout<'a> {
    cache: &'a Path,
    hex: &'a str,
}

impl Layout<'_> {
    fn sha256_dir(&self) -> PathBuf {
        self.cache.join("sha256")
    }
    fn content(&self) -> PathBuf {
        self.sha256_dir().join(self.hex)
    }
    fn manifest(&self) -> PathBuf {
        self.sha256_dir().join(format!("{}.manifest", self.hex))
    }
    fn work(&self) -> PathBuf {
        self.cache.join("partial").join(format!("sha256-{}", self.hex))
    }
    /// Where files from peers are written until they are checked: not the
    /// staging's own `incoming/`, whose partial files a staging from the
    /// source resumes (a file half received from a peer, or holding only
    /// some of its pieces, is no prefix of the source's).
    fn arriving(&self) -> PathBuf {
        self.work().join("from-peers")
    }
    fn lock(&self) -> PathBuf {
        self.cache.join("locks").join(format!("sha256-{}.lock", self.hex))
    }
    /// Where the piece digests of a file of this content whose digest is
    /// `file_sha256`, cut in pieces of `piece_bytes`, are kept once known
    /// ([`record_pieces`]); collected with the content (`crate::stage::gc`).
    fn pieces_record(&self, file_sha256: &str, piece_bytes: u64) -> PathBuf {
        pieces_dir(self.cache, self.hex).join(format!("{file_sha256}-{piece_bytes}"))
    }
    /// The file `done` (in `tree/`) of `size` bytes is here already, or the
    /// whole content is complete.
    fn holds(&self, done: &Path, size: u64) -> bool {
        self.is_complete() || std::fs::symlink_metadata(done).is_ok_and(|m| m.is_file() && m.len() == size)
    }
    /// The directory and its manifest are there (as `stage` takes content to be cached).
    fn is_complete(&self) -> bool {
        std::fs::symlink_metadata(self.content()).is_ok_and(|m| m.is_dir())
            && std::fs::symlink_metadata(self.manifest()).is_ok_and(|m| m.is_file())
    }
    /// A staged file (or URL): its directory holds the file (under one
    /// name or several, hard links), and there is no manifest.
    fn is_file_content(&self) -> bool {
        std::fs::symlink_metadata(self.content()).is_ok_and(|m| m.is_dir())
            && std::fs::symlink_metadata(self.manifest()).is_err()
    }
}

/// The directory of a content's piece digests: `sha256/<hex>.pieces`.
pub fn pieces_dir(cache: &Path, hex: &str) -> PathBuf {
    cache.join("sha256").join(format!("{hex}.pieces"))
}

/// Whether `hex` is a SHA-256 as `sha256sum` prints it: 64 lowercase hex digits.
pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `hex` as the name of content: 64 lowercase hex digits, as `sha256sum` prints them.
fn check_digest(what: &str, hex: &str) -> Result<(), String> {
    if is_sha256_hex(hex) {
        Ok(())
    } else {
        Err(format!("{what} {hex:?} is not 64 lowercase hex digits; give the digest as sha256sum prints it"))
    }
}

/// `rel` as a file of content: relative, '/'-separated plain names (no
/// empty, `.` or `..` component, no NUL or newline), as a manifest lists it.
fn check_rel(hex: &str, rel: &Path) -> Result<(), String> {
    let bytes = rel.as_os_str().as_bytes();
    let plain = !bytes.is_empty()
        && !bytes.contains(&0)
        && !bytes.contains(&b'\n')
        && bytes.split(|b| *b == b'/').all(|name| !name.is_empty() && name != b"." && name != b"..");
    if plain {
        Ok(())
    } else {
        Err(format!(
            "the path {rel:?} of content {hex} is not relative with plain names; give it as the manifest lists it"
        ))
    }
}

/// A file of content, opened for [`send`].
#[derive(Debug)]
pub struct Opened {
    file: File,
    path: PathBuf,
    /// Its size when opened: what is sent.
    pub bytes: u64,
}

/// Opens what [`super::Request::ReadContent`] asks for: the manifest of
/// complete content (`part` None), or one of its files: from the content
/// directory when the content is complete, else from the `tree/` of a
/// staging under way (the files it has done). None: not here (yet).
///
/// With `pieces`, a file still coming in pieces (`from-peers/<rel>`, whose
/// verified pieces only the agent knows) is opened too, as the last choice.
pub fn open(cache_dir: &Path, hex: &str, part: Option<&Path>, pieces: bool) -> Result<Option<Opened>, String> {
    check_digest("the content digest", hex)?;
    let layout = Layout { cache: cache_dir, hex };
    let Some(rel) = part else {
        if !layout.is_complete() {
            return Ok(None);
        }
        let opened = open_file(&layout.manifest())?;
        if let Some(opened) = &opened
            && opened.bytes > MAX_MANIFEST
        {
            return Err(format!(
                "the manifest {} is {} bytes, over the {MAX_MANIFEST} served; remove that content from the cache",
                opened.path.display(),
                opened.bytes
            ));
        }
        return Ok(opened);
    };
    check_rel(hex, rel)?;
    let complete = || std::fs::symlink_metadata(layout.content()).is_ok_and(|m| m.is_dir());
    if complete() {
        return open_file(&layout.content().join(rel));
    }
    if let Some(opened) = open_file(&layout.work().join("tree").join(rel))? {
        return Ok(Some(opened));
    }
    if pieces && let Some(opened) = open_file(&layout.arriving().join(rel))? {
        return Ok(Some(opened));
    }
    // Completed meanwhile: moved from `from-peers/` to `tree/`, or its `tree/`
    // renamed into `sha256/`.
    if let Some(opened) = open_file(&layout.work().join("tree").join(rel))? {
        return Ok(Some(opened));
    }
    if complete() { open_file(&layout.content().join(rel)) } else { Ok(None) }
}

/// Opens `path` for reading, not through a symlink at that name; None when
/// nothing is there.
fn open_file(path: &Path) -> Result<Option<Opened>, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(format!("{} is a symlink, which is not served; remove it", path.display()));
        }
        Err(e) => return Err(format!("cannot open {} as the cache's user: {e}", path.display())),
    };
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is {}, not a regular file; it is not served",
            path.display(),
            super::helper::kind(&meta.file_type())
        ));
    }
    Ok(Some(Opened { file, path: path.to_owned(), bytes: meta.len() }))
}

/// The manifest peers are sent for content `hex` that is a staged file
/// (see `crate::stage::ManifestOf`): its file, by the first of its names
/// bytewise (a file staged under several names is hard-linked), with its size.
/// None: not a file's content here. The file is not hashed: the peer checks
/// what it fetches against `hex`.
pub fn file_manifest(cache_dir: &Path, hex: &str) -> Result<Option<String>, String> {
    check_digest("the content digest", hex)?;
    let layout = Layout { cache: cache_dir, hex };
    if !layout.is_file_content() {
        return Ok(None);
    }
    let dir = layout.content();
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files: Vec<(String, u64)> = entries
        .flatten()
        .take(MAX_MODES)
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(std::fs::Metadata::is_file)?;
            Some((entry.file_name().into_string().ok()?, meta.len()))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().find_map(|(name, size)| crate::stage::single_file_manifest(hex, size, &name)))
}

/// [`Reply::Content`] for `bytes` bytes, as the line that goes before them.
fn content_line(bytes: u64) -> Result<Vec<u8>, String> {
    let mut line = serde_json::to_vec(&Reply::Content { bytes }).map_err(|e| e.to_string())?;
    line.push(b'\n');
    Ok(line)
}

/// Writes [`Reply::Content`] as a line, then `bytes` to `out`.
pub fn send_bytes(bytes: &[u8], out: &mut impl Write) -> Result<(), String> {
    let mut message = content_line(bytes.len() as u64)?;
    message.extend_from_slice(bytes);
    out.write_all(&message).and_then(|()| out.flush()).map_err(|e| format!("sending {} bytes: {e}", bytes.len()))
}

/// Writes [`Reply::Content`] as a line, then exactly `opened.bytes` bytes of
/// the file to `out`. An error after the line (the file shrank, the reader
/// went away) can only be told by the exit status: the bytes come short.
pub fn send(opened: Opened, out: &mut impl Write) -> Result<(), String> {
    let Opened { file, path, bytes } = opened;
    let header = content_line(bytes)?;
    let broken = |e: io::Error| format!("sending {}: {e}", path.display());
    out.write_all(&header).map_err(broken)?;
    out.flush().map_err(broken)?;
    // `io::copy` moves the bytes in the kernel (splice) where it can.
    let sent = io::copy(&mut file.take(bytes), out).map_err(broken)?;
    out.flush().map_err(broken)?;
    if sent != bytes {
        return Err(format!("{} shrank from {bytes} to {sent} bytes while it was sent", path.display()));
    }
    Ok(())
}

/// `len` bytes of a file from `offset`: one piece of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

/// [`send`] for the bytes of `span` only (fewer at the end of the file);
/// an offset past the end is refused.
pub fn send_span(opened: Opened, span: Span, out: &mut impl Write) -> Result<(), String> {
    let Opened { mut file, path, bytes } = opened;
    if span.offset > bytes {
        return Err(format!("{} is {bytes} bytes; there is no piece at {}", path.display(), span.offset));
    }
    let len = span.len.min(bytes - span.offset);
    file.seek(SeekFrom::Start(span.offset)).map_err(|e| format!("reading {}: {e}", path.display()))?;
    send(Opened { file, path, bytes: len }, out)
}

/// The SHA-256 of each `piece_bytes`-long piece of the file `rel` of
/// content `hex` (complete, or done in a staging under way), in order, if
/// the whole file still hashes to `file_sha256` (else [`Reply::Corrupt`]:
/// the copy here went bad, and its pieces' digests would vouch for bad bytes).
pub fn piece_digests(
    cache_dir: &Path,
    hex: &str,
    rel: &Path,
    piece_bytes: u64,
    file_sha256: &str,
) -> Result<Reply, String> {
    if piece_bytes == 0 {
        return Err("a piece size of 0 bytes; give one of at least a byte".into());
    }
    check_digest(&format!("the digest of {}", rel.display()), file_sha256)?;
    let Some(Opened { file, path, bytes }) = open(cache_dir, hex, Some(rel), false)? else {
        return Ok(Reply::Missing);
    };
    let layout = Layout { cache: cache_dir, hex };
    let record = layout.pieces_record(file_sha256, piece_bytes);
    if let Some(digests) = recorded_pieces(&record, bytes.div_ceil(piece_bytes)) {
        return Ok(Reply::Pieces(digests));
    }
    let mut file = file.take(bytes);
    let mut digests = Vec::new();
    let mut whole = Sha256::new();
    let mut block = vec![0; BLOCK];
    loop {
        let mut hasher = Sha256::new();
        let mut left = piece_bytes;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(BLOCK).min(BLOCK);
            let n = match file.read(&mut block[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            };
            hasher.update(&block[..n]);
            whole.update(&block[..n]);
            left -= n as u64;
        }
        if left == piece_bytes {
            break;
        }
        digests.push(format!("{:x}", hasher.finalize()));
        if left > 0 {
            break;
        }
    }
    let actual = format!("{:x}", whole.finalize());
    if actual != file_sha256 {
        return Ok(Reply::Corrupt { actual });
    }
    record_pieces(&record, &digests);
    Ok(Reply::Pieces(digests))
}

/// The piece digests kept at `record` if it holds exactly `count` of them
/// (one per line, as [`record_pieces`] writes them); None for anything else
/// (absent, torn by a crash, written by hand), and the pieces are hashed
/// again. The digests are those of the file as it was checked whole: if the
/// bytes here went bad since, a peer finds out by the piece it fetched, names
/// this node and fetches that piece elsewhere.
fn recorded_pieces(record: &Path, count: u64) -> Option<Vec<String>> {
    let Opened { file, bytes, .. } = open_file(record).ok()??;
    if bytes != count.checked_mul(PIECE_RECORD_LINE)? {
        return None;
    }
    let mut text = String::new();
    file.take(bytes).read_to_string(&mut text).ok()?;
    let digests: Vec<String> = text.lines().map(str::to_owned).collect();
    (digests.len() as u64 == count && digests.iter().all(|d| is_sha256_hex(d))).then_some(digests)
}

/// Keeps `digests` (a file's piece digests, each checked) at `record` for the
/// next time a peer asks, across agent restarts: written beside and renamed
/// into place, so that a reader sees all of them or none. Best effort: without
/// the record the pieces are hashed again.
fn record_pieces(record: &Path, digests: &[String]) {
    let Some(dir) = record.parent() else { return };
    if digests.len() as u64 * PIECE_RECORD_LINE > MAX_PIECES_RECORD {
        return;
    }
    let temp =
        dir.join(format!(".{}.{}", record.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let text: String = digests.iter().map(|d| format!("{d}\n")).collect();
    let written = DirBuilder::new()
        .recursive(true)
        .create(dir)
        .and_then(|()| std::fs::write(&temp, text))
        .and_then(|()| std::fs::rename(&temp, record));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp);
        tracing::debug!(record = %record.display(), %error, "cannot keep a file's piece digests");
    }
}

/// What [`super::Request::ReceiveFile`] writes.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub cache_dir: &'a Path,
    /// The content's digest.
    pub hex: &'a str,
    /// The file, relative to the content's directory.
    pub rel: &'a Path,
    pub size: u64,
    /// The file's digest.
    pub sha256: &'a str,
}

/// Writes the file whose bytes `body` yields into the staging of its
/// content: to `from-peers/<rel>`, hashed as it comes, then renamed to
/// `tree/<rel>` if it is `size` bytes that hash to its digest. Fewer bytes
/// ([`Reply::Short`]) or other ones ([`Reply::Corrupt`]) leave nothing
/// behind; more than `size` bytes is an error. Nothing is flushed: the
/// completion ([`finish_tree`]) syncs the filesystem once. Content already
/// complete here is not written again (the body is not read).
pub fn receive(incoming: Incoming<'_>, body: &mut impl Read) -> Result<Reply, String> {
    let Incoming { cache_dir, hex, rel, size, sha256 } = incoming;
    check_digest("the content digest", hex)?;
    check_digest(&format!("the digest of {}", rel.display()), sha256)?;
    check_rel(hex, rel)?;
    let layout = Layout { cache: cache_dir, hex };
    if layout.is_complete() {
        return Ok(Reply::Done);
    }
    let work = layout.work();
    let (temp, done) = (layout.arriving().join(rel), work.join("tree").join(rel));
    let file = open_incoming(&temp, &done)?;
    // One transfer of a file at a time: another would write the same bytes over these.
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((_, Errno::EWOULDBLOCK)) => {
            return Err(format!("{} is being received already; wait for that transfer", temp.display()));
        }
        Err((_, errno)) => return Err(format!("cannot lock {}: {errno}", temp.display())),
    };
    // Still the file at that name: not one a transfer that just ended removed or renamed.
    let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| (a.dev(), a.ino()) == (b.dev(), b.ino());
    match (file.metadata(), std::fs::symlink_metadata(&temp)) {
        (Ok(opened), Ok(named)) if same(&opened, &named) => {}
        _ => return Err(format!("{} is being received already; wait for that transfer", temp.display())),
    }
    file.set_len(0).map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
    let written = write_hashed(&mut *file, body, size);
    // Whatever does not end in `tree/` goes.
    let discard = || {
        let _ = std::fs::remove_file(&temp);
    };
    let failed = |why: String| {
        discard();
        why
    };
    let (got, actual) = match written {
        Ok(written) => written,
        Err(Failure::Body(e)) => return Err(failed(format!("reading the bytes of {}: {e}", rel.display()))),
        Err(Failure::Write(e)) => return Err(failed(format!("cannot write {}: {e}", temp.display()))),
        Err(Failure::TooMany) => {
            return Err(failed(format!("more than the {size} bytes of {} arrived; not kept", rel.display())));
        }
    };
    if got != size {
        discard();
        return Ok(Reply::Short { got });
    }
    if actual != sha256 {
        discard();
        return Ok(Reply::Corrupt { actual });
    }
    std::fs::rename(&temp, &done).map_err(|e| failed(format!("cannot write {}: {e}", done.display())))?;
    Ok(Reply::Done)
}

/// One piece of a file to write: its place and its digest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PieceOf {
    #[serde(flatten)]
    pub span: Span,
    /// Hex SHA-256 of the piece's bytes.
    pub sha256: String,
}

/// Writes one piece of a file of `incoming.size` bytes, whose bytes `body`
/// yields, at its place in `from-peers/<rel>` (the file is made, as large as
/// it will be, by the first piece), hashed as it comes. Fewer bytes than
/// the piece's ([`Reply::Short`]) or other ones ([`Reply::Corrupt`]) are
/// answers: what they wrote is written over by the piece fetched again, and
/// [`finish_file`] checks the whole file. More bytes are an error. Pieces
/// of one file may be written at once (by as many helpers); a file already
/// complete (in `tree/`, or the content) is [`Reply::Done`] without a byte read.
pub fn receive_piece(incoming: Incoming<'_>, piece: &PieceOf, body: &mut impl Read) -> Result<Reply, String> {
    let Incoming { cache_dir, hex, rel, size, sha256: _ } = incoming;
    check_digest("the content digest", hex)?;
    check_digest(&format!("the digest of a piece of {}", rel.display()), &piece.sha256)?;
    check_rel(hex, rel)?;
    let Span { offset, len } = piece.span;
    if offset.checked_add(len).is_none_or(|end| end > size) || len == 0 {
        return Err(format!("a piece of {len} bytes at {offset} does not fit {} of {size} bytes", rel.display()));
    }
    let layout = Layout { cache: cache_dir, hex };
    let work = layout.work();
    let (temp, done) = (layout.arriving().join(rel), work.join("tree").join(rel));
    if layout.holds(&done, size) {
        return Ok(Reply::Done);
    }
    let mut file = open_incoming(&temp, &done)?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", temp.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file; remove it", temp.display()));
    }
    if meta.len() != size {
        // Made by this first piece (or left by another file of that name): sparse until filled.
        file.set_len(size).map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
    let (got, actual) = match write_hashed(&mut file, body, len) {
        Ok(written) => written,
        Err(Failure::Body(e)) => return Err(format!("reading the bytes of {}: {e}", rel.display())),
        Err(Failure::Write(e)) => return Err(format!("cannot write {}: {e}", temp.display())),
        Err(Failure::TooMany) => {
            return Err(format!("more than the {len} bytes of a piece of {} arrived", rel.display()));
        }
    };
    if got != len {
        return Ok(Reply::Short { got });
    }
    if actual != piece.sha256 {
        return Ok(Reply::Corrupt { actual });
    }
    Ok(Reply::Done)
}

/// Completes a file whose pieces [`receive_piece`] wrote: if `from-peers/<rel>`
/// is `size` bytes that hash to the file's digest, it is renamed to
/// `tree/<rel>` ([`Reply::Done`]); other bytes are removed
/// ([`Reply::Corrupt`]), and the file is fetched again. The digests its
/// pieces of `piece_bytes` were checked against (`piece_sha256`, one per
/// piece) are kept for the peers that ask this node later.
pub fn finish_file(incoming: Incoming<'_>, piece_bytes: u64, piece_sha256: &[String]) -> Result<Reply, String> {
    let Incoming { cache_dir, hex, rel, size, sha256 } = incoming;
    check_digest("the content digest", hex)?;
    check_digest(&format!("the digest of {}", rel.display()), sha256)?;
    check_rel(hex, rel)?;
    let layout = Layout { cache: cache_dir, hex };
    let work = layout.work();
    let (temp, done) = (layout.arriving().join(rel), work.join("tree").join(rel));
    if layout.holds(&done, size) {
        return Ok(Reply::Done);
    }
    let Some(opened) = open_file(&temp)? else {
        return Err(format!("{} is not there; its pieces were not received", temp.display()));
    };
    if opened.bytes != size {
        return Err(format!("{} is {} bytes, not {size}; its pieces were not received", temp.display(), opened.bytes));
    }
    let (got, actual) = match write_hashed(&mut io::sink(), &mut opened.file.take(size), size) {
        Ok(read) => read,
        Err(Failure::Body(e) | Failure::Write(e)) => return Err(format!("reading {}: {e}", temp.display())),
        Err(Failure::TooMany) => return Err(format!("{} grew while it was read", temp.display())),
    };
    if got != size || actual != sha256 {
        let _ = std::fs::remove_file(&temp);
        return Ok(Reply::Corrupt { actual });
    }
    std::fs::rename(&temp, &done).map_err(|e| format!("cannot write {}: {e}", done.display()))?;
    if piece_bytes > 0
        && piece_sha256.len() as u64 == size.div_ceil(piece_bytes)
        && piece_sha256.iter().all(|d| is_sha256_hex(d))
    {
        record_pieces(&layout.pieces_record(sha256, piece_bytes), piece_sha256);
    }
    Ok(Reply::Done)
}

/// Opens `temp` (`from-peers/<rel>`) for writing, as it is, not through a
/// symlink, making the directories of it and of `done` (`tree/<rel>`).
fn open_incoming(temp: &Path, done: &Path) -> Result<File, String> {
    for path in [temp, done] {
        if let Some(parent) = path.parent() {
            DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(|e| {
                format!("cannot create {} as the cache's user: {e}; check the cache's permissions", parent.display())
            })?;
        }
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o644)
        .open(temp)
        .map_err(|e| format!("cannot write {} as the cache's user: {e}", temp.display()))
}

enum Failure {
    Body(io::Error),
    Write(io::Error),
    TooMany,
}

/// Copies `body` to `out` in [`BLOCK`]s, up to `size` bytes; returns the
/// bytes and their digest.
fn write_hashed(out: &mut impl Write, body: &mut impl Read, size: u64) -> Result<(u64, String), Failure> {
    let mut hasher = Sha256::new();
    let mut block = vec![0; BLOCK];
    let mut got = 0u64;
    loop {
        let n = match body.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Body(e)),
        };
        got += n as u64;
        if got > size {
            return Err(Failure::TooMany);
        }
        hasher.update(&block[..n]);
        out.write_all(&block[..n]).map_err(Failure::Write)?;
    }
    out.flush().map_err(Failure::Write)?;
    Ok((got, format!("{:x}", hasher.finalize())))
}

/// The modes of complete content `hex` in `cache_dir` that differ from
/// the defaults ([`PathMode`]), sorted by path, at most [`MAX_MODES`]
/// (names that are not UTF-8 are left out, as peers take no such content);
/// [`Reply::Missing`] if it is not complete here. Links are not followed.
pub fn modes(cache_dir: &Path, hex: &str) -> Result<Reply, String> {
    check_digest("the content digest", hex)?;
    let layout = Layout { cache: cache_dir, hex };
    if !layout.is_complete() && !layout.is_file_content() {
        return Ok(Reply::Missing);
    }
    // The listing a staging from the source makes of its source (modes already cut to MODE_BITS).
    let tree = crate::stage::walk(hex, &layout.content()).map_err(|e| e.to_string())?;
    if tree.dirs.len() + tree.files.len() + tree.links.len() > MAX_WALK {
        return Err(format!("content {hex} has more than {MAX_WALK} entries; its modes are not listed"));
    }
    let root = (PathBuf::new(), tree.root_mode, DIR_MODE);
    let dirs = tree.dirs.into_iter().map(|(rel, mode)| (rel, mode, DIR_MODE));
    let files = tree.files.into_iter().map(|f| (f.rel, f.mode, FILE_MODE));
    let mut listed: Vec<PathMode> = std::iter::once(root)
        .chain(dirs)
        .chain(files)
        .filter(|(_, mode, default)| mode != default)
        .filter_map(|(rel, mode, _)| Some(PathMode { path: rel.to_str()?.to_owned(), mode }))
        .take(MAX_MODES)
        .collect();
    listed.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(Reply::Modes(listed))
}

/// Gives the paths of `tree` the modes listed (at most [`MAX_MODES`], only
/// the bits [`MODE_BITS`]): files first, then directories deepest first (a
/// read-only directory would refuse its own children otherwise), as a
/// staging from the source seals its copy. A path not in the tree, or not a
/// file or directory, is passed over; a path that is not relative with
/// plain names is refused.
fn apply_modes(hex: &str, tree: &Path, modes: &[PathMode]) -> Result<(), String> {
    let mut dirs = Vec::new();
    for entry in modes.iter().take(MAX_MODES) {
        let path = if entry.path.is_empty() {
            tree.to_owned()
        } else {
            check_rel(hex, Path::new(&entry.path))?;
            tree.join(&entry.path)
        };
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let mode = std::fs::Permissions::from_mode(entry.mode & MODE_BITS);
        if meta.is_file() {
            std::fs::set_permissions(&path, mode)
                .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
        } else if meta.is_dir() {
            dirs.push((entry.path.split('/').count() * usize::from(!entry.path.is_empty()), path, mode));
        }
    }
    dirs.sort_by_key(|(depth, _, _)| std::cmp::Reverse(*depth));
    for (_, path, mode) in dirs {
        std::fs::set_permissions(&path, mode).map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Completes the staging of directory content `hex` whose files came from
/// peers, as a staging from the source completes it: once the manifest
/// (`manifest_bytes` bytes of `body`) hashes to `hex` and every file it lists
/// is in `tree/` with its size (what is not listed there goes), the paths
/// get the `modes` its sender listed ([`apply_modes`]), the filesystem is
/// synced, then the manifest and the tree renamed into
/// `sha256/`. The files' digests are not read again here: [`receive`]
/// checked each against the digest it was sent with. Held under the
/// content's lock, which a staging of it and the garbage collection hold
/// too. Content already complete is left as it is.
pub fn finish_tree(
    cache_dir: &Path,
    hex: &str,
    manifest_bytes: u64,
    modes: &[PathMode],
    body: &mut impl Read,
) -> Result<Reply, String> {
    check_digest("the content digest", hex)?;
    if manifest_bytes > MAX_MANIFEST {
        return Err(format!("the manifest of {hex} is {manifest_bytes} bytes, over the {MAX_MANIFEST} taken"));
    }
    let mut manifest = Vec::with_capacity(usize::try_from(manifest_bytes).unwrap_or(0));
    body.take(manifest_bytes + 1)
        .read_to_end(&mut manifest)
        .map_err(|e| format!("reading the manifest of {hex}: {e}"))?;
    if manifest.len() as u64 != manifest_bytes {
        return Err(format!(
            "the manifest of {hex} came as {} bytes, not the {manifest_bytes} declared",
            manifest.len()
        ));
    }
    let Some(of) = ManifestOf::check(&manifest, hex) else {
        let actual = format!("{:x}", Sha256::digest(&manifest));
        return Err(format!("the manifest given for content {hex} hashes to {actual}: it is another content's"));
    };
    let parsed = parse_manifest(&manifest).map_err(|e| format!("content {hex}: {e}"))?;
    if parsed.links > 0 {
        return Err(format!(
            "content {hex} has symlinks ({}); staged from its source instead, not from peers",
            parsed.links
        ));
    }
    let layout = Layout { cache: cache_dir, hex };
    for dir in [layout.sha256_dir(), cache_dir.join("locks")] {
        DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| {
            format!("cannot create {} as the cache's user: {e}; check the cache's permissions", dir.display())
        })?;
    }
    let _lock = lock(&layout.lock())?;
    if layout.is_complete() || (of == ManifestOf::File && layout.is_file_content()) {
        return Ok(Reply::Done);
    }
    let work = layout.work();
    let tree = work.join("tree");
    // An empty directory has no file that would have made it.
    DirBuilder::new().recursive(true).mode(0o755).create(&tree).map_err(|e| {
        format!("cannot create {} as the cache's user: {e}; check the cache's permissions", tree.display())
    })?;
    for entry in &parsed.files {
        let path = tree.join(&entry.path);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == entry.size => {}
            Ok(meta) if meta.is_file() => {
                return Err(format!(
                    "{} is {} bytes, not the {} its manifest lists; content {hex} is not complete",
                    path.display(),
                    meta.len(),
                    entry.size
                ));
            }
            Ok(_) => return Err(format!("{} is not a regular file; content {hex} is not complete", path.display())),
            Err(e) => {
                return Err(format!("{} is not there ({e}); content {hex} is not complete", path.display()));
            }
        }
    }
    let listed: Vec<&Path> = parsed.files.iter().map(|f| f.path.as_path()).collect();
    prune(&tree, &listed)
        .map_err(|e| format!("cannot remove what {hex} does not list from {}: {e}", tree.display()))?;
    apply_modes(hex, &tree, modes)?;
    let written = |path: &Path| {
        let path = path.to_owned();
        move |e: io::Error| format!("cannot write {}: {e}", path.display())
    };
    // Every file, directory entry and mode of the tree on disk at once,
    // before anything marks it complete.
    let handle = File::open(&work).map_err(written(&work))?;
    nix::unistd::syncfs(&handle).map_err(|e| written(&work)(io::Error::from(e)))?;
    // The completion marker: the manifest, then the tree, renamed into
    // `sha256/`; a file's content is its directory alone, as a staging of
    // the file from its source leaves it.
    if of == ManifestOf::Directory {
        write_manifest(&layout, &work, &manifest)?;
    }
    let content = layout.content();
    if let Err(e) = std::fs::rename(&tree, &content) {
        // Staged meanwhile by another process that shares this cache.
        if !std::fs::symlink_metadata(&content).is_ok_and(|m| m.is_dir()) {
            return Err(written(&content)(e));
        }
    }
    let sha256_dir = layout.sha256_dir();
    File::open(&sha256_dir).and_then(|d| d.sync_all()).map_err(written(&sha256_dir))?;
    // What is left (`from-peers/`, and `incoming/` of an interrupted staging): nothing of the content.
    let _ = std::fs::remove_dir_all(&work);
    Ok(Reply::Done)
}

/// Writes a directory's manifest into `sha256/` (through `work/manifest`, flushed).
fn write_manifest(layout: &Layout<'_>, work: &Path, manifest: &[u8]) -> Result<(), String> {
    let written = |path: &Path| {
        let path = path.to_owned();
        move |e: io::Error| format!("cannot write {}: {e}", path.display())
    };
    let temp = work.join("manifest");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&temp)
        .map_err(written(&temp))?;
    file.write_all(manifest).and_then(|()| file.sync_all()).map_err(written(&temp))?;
    let manifest_path = layout.manifest();
    std::fs::rename(&temp, &manifest_path).map_err(written(&manifest_path))
}

/// The content's lock (see `crate::stage`), waited for.
fn lock(path: &Path) -> Result<Flock<File>, String> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create the lock file {}: {e}", path.display()))?;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => return Ok(locked),
            Err((again, Errno::EINTR)) => file = again,
            Err((_, errno)) => return Err(format!("cannot lock {}: {errno}", path.display())),
        }
    }
}

/// Removes from `tree` whatever is not a file of `listed` or a directory on
/// the way to one (a file a peer sent that the manifest does not list).
fn prune(tree: &Path, listed: &[&Path]) -> io::Result<()> {
    let files: HashSet<&Path> = listed.iter().copied().collect();
    let dirs: HashSet<&Path> = listed.iter().flat_map(|p| p.ancestors().skip(1)).collect();
    crate::stage::prune_to(tree, &files, &dirs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_and_lowercase_digests_are_taken() {
        let hex = "0".repeat(64);
        for rel in ["a", "a/b.txt", "a b/.hidden", "..a"] {
            assert!(check_rel(&hex, Path::new(rel)).is_ok(), "{rel}");
        }
        for rel in ["", "/etc/passwd", "..", "a/../../b", ".", "./a", "a//b", "a/", "a\nb", "a\0b"] {
            let err = check_rel(&hex, Path::new(rel)).unwrap_err();
            assert!(err.contains("not relative with plain names"), "{rel:?}: {err}");
        }
        assert!(check_digest("d", &hex).is_ok());
        for bad in ["0".repeat(63), "A".repeat(64), "g".repeat(64), format!("{}/", "0".repeat(63))] {
            assert!(check_digest("d", &bad).unwrap_err().contains("64 lowercase hex"), "{bad}");
        }
    }

    #[test]
    fn more_bytes_than_declared_stop_the_write() {
        let mut out = Vec::new();
        assert!(matches!(write_hashed(&mut out, &mut &b"12345"[..], 4), Err(Failure::TooMany)));
        let (got, digest) = write_hashed(&mut Vec::new(), &mut &b"1234"[..], 4).ok().unwrap();
        assert_eq!((got, digest), (4, format!("{:x}", Sha256::digest(b"1234"))));
    }
}
