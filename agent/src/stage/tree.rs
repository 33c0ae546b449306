//! A source directory as a list of files, directories and symlinks, and its
//! manifest (whose SHA-256 is the directory's digest).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::StageError;
use super::fetch::MODE_BITS;

pub(crate) struct TreeFile {
    pub rel: PathBuf,
    pub size: u64,
    pub mode: u32,
    /// What the source's record of digests checks: see `record`.
    pub stat: FileStat,
}

/// The identity and change times of a source file as the listing saw it: when
/// all of these are unchanged, so is the content (ctime cannot be set back by
/// a user, unlike mtime), unless it changed within the timestamps' resolution
/// of the listing; `record` leaves such recent files out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStat {
    pub(super) fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |secs: i64, nsecs: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsecs);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

pub(crate) struct TreeLink {
    pub rel: PathBuf,
    /// As it will be written in the copy: relative, pointing inside.
    pub target: PathBuf,
}

pub(crate) struct Tree {
    pub root_mode: u32,
    /// Relative path and mode; parents before children.
    pub dirs: Vec<(PathBuf, u32)>,
    pub files: Vec<TreeFile>,
    pub links: Vec<TreeLink>,
}

impl Tree {
    pub(super) fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Lists `root` without following symlinks. Fails on a special file, a name
/// with a newline (the manifest could not list it) and a symlink that leads
/// out of `root` or nowhere.
pub(crate) fn walk(item: &str, root: &Path) -> Result<Tree, StageError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |error| StageError::Io { item: item.to_owned(), action: "read", path, error }
    };
    let canonical_root = fs::canonicalize(root).map_err(read_error(root))?;
    let root_mode = fs::metadata(root).map_err(read_error(root))?.permissions().mode() & MODE_BITS;
    let mut tree = Tree { root_mode, dirs: Vec::new(), files: Vec::new(), links: Vec::new() };
    let mut pending = vec![PathBuf::new()];
    while let Some(rel_dir) = pending.pop() {
        let dir = root.join(&rel_dir);
        for entry in fs::read_dir(&dir).map_err(read_error(&dir))? {
            let entry = entry.map_err(read_error(&dir))?;
            let rel = rel_dir.join(entry.file_name());
            let path = root.join(&rel);
            if entry.file_name().as_bytes().contains(&b'\n') {
                return Err(StageError::NewlineInName { item: item.to_owned(), path });
            }
            // DirEntry::metadata does not follow a symlink.
            let meta = entry.metadata().map_err(read_error(&path))?;
            let kind = meta.file_type();
            let mode = meta.permissions().mode() & MODE_BITS;
            if kind.is_dir() {
                tree.dirs.push((rel.clone(), mode));
                pending.push(rel);
            } else if kind.is_file() {
                tree.files.push(TreeFile { rel, size: meta.len(), mode, stat: FileStat::of(&meta) });
            } else if kind.is_symlink() {
                let target = link_target(item, root, &canonical_root, &rel)?;
                tree.links.push(TreeLink { rel, target });
            } else {
                return Err(StageError::Unsupported { item: item.to_owned(), path });
            }
        }
    }
    Ok(tree)
}

/// The target a symlink gets in the copy. It must resolve inside the root (as
/// the kernel resolves it, through other links) and, when relative, never
/// climb above the root on the way; an absolute target inside is rewritten as
/// a relative one, since the copy lives elsewhere.
fn link_target(item: &str, root: &Path, canonical_root: &Path, rel: &Path) -> Result<PathBuf, StageError> {
    let link = root.join(rel);
    let target = fs::read_link(&link).map_err(|error| StageError::Io {
        item: item.to_owned(),
        action: "read",
        path: link.clone(),
        error,
    })?;
    let resolved = fs::canonicalize(&link).map_err(|error| StageError::LinkUnresolved {
        item: item.to_owned(),
        link: link.clone(),
        target: target.clone(),
        error,
    })?;
    let outside = || StageError::LinkOutside {
        item: item.to_owned(),
        link: link.clone(),
        target: target.clone(),
        root: root.to_owned(),
    };
    let Ok(inside) = resolved.strip_prefix(canonical_root) else { return Err(outside()) };
    let parent_depth = rel.components().count().saturating_sub(1);
    if target.is_absolute() {
        let mut relative: PathBuf = std::iter::repeat_n(Component::ParentDir, parent_depth).collect();
        relative.push(inside);
        if relative.as_os_str().is_empty() {
            relative.push(".");
        }
        return Ok(relative);
    }
    let mut depth = parent_depth;
    for component in target.components() {
        match component {
            Component::ParentDir => depth = depth.checked_sub(1).ok_or_else(outside)?,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    Ok(target)
}

/// One line of the manifest.
pub(super) enum Listed {
    File { sha256: String, size: u64 },
    Link { target: PathBuf },
}

/// The manifest: one line per file and symlink, sorted bytewise by relative
/// path: `<sha256> <size> <path>` for a file, `<sha256 of the target> symlink
/// <path>` for a link.
pub(super) fn manifest(mut entries: Vec<(PathBuf, Listed)>) -> Vec<u8> {
    entries.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    let mut text = Vec::new();
    for (rel, listed) in entries {
        match listed {
            Listed::File { sha256, size } => text.extend_from_slice(format!("{sha256} {size} ").as_bytes()),
            Listed::Link { target } => {
                let digest = Sha256::digest(target.as_os_str().as_bytes());
                text.extend_from_slice(format!("{digest:x} symlink ").as_bytes());
            }
        }
        text.extend_from_slice(rel.as_os_str().as_bytes());
        text.push(b'\n');
    }
    text
}

/// Bytes and files a manifest lists.
pub(super) fn manifest_totals(text: &[u8]) -> (u64, u32) {
    let mut totals = (0u64, 0u32);
    for line in text.split(|b| *b == b'\n') {
        let mut fields = line.splitn(3, |b| *b == b' ');
        let size = fields.nth(1).and_then(|f| std::str::from_utf8(f).ok()).and_then(|f| f.parse::<u64>().ok());
        if let Some(size) = size {
            totals.0 += size;
            totals.1 += 1;
        }
    }
    totals
}

/// The most lines [`parse_manifest`] takes: a directory of a million files
/// is larger than any job input staged so far.
pub(crate) const MAX_MANIFEST_LINES: usize = 1_000_000;

/// A file a manifest lists (see [`parse_manifest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ManifestEntry {
    /// Relative to the directory; every component a plain name.
    pub path: PathBuf,
    pub size: u64,
    /// Hex SHA-256 of the file's bytes, lowercase.
    pub sha256: String,
}

/// A manifest taken apart: its files, and how many symlinks it lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ParsedManifest {
    /// In the manifest's order (bytewise by path).
    pub files: Vec<ManifestEntry>,
    pub links: usize,
}

/// Reads a manifest that came from elsewhere (a peer) as [`manifest`] writes
/// it, and nothing else: every line `<64 lowercase hex> <decimal size>
/// <path>` or `<64 lowercase hex> symlink <path>`, each ended by a newline
/// (an empty directory's manifest is empty), sorted strictly bytewise by
/// path, which is relative with plain components ('/'-separated; no empty,
/// `.` or `..` component, no NUL) and never both a file and a directory. At
/// most [`MAX_MANIFEST_LINES`] lines.
pub(crate) fn parse_manifest(text: &[u8]) -> Result<ParsedManifest, String> {
    parse_manifest_bounded(text, MAX_MANIFEST_LINES)
}

fn parse_manifest_bounded(text: &[u8], max_lines: usize) -> Result<ParsedManifest, String> {
    let mut parsed = ParsedManifest::default();
    if text.is_empty() {
        return Ok(parsed);
    }
    let Some(body) = text.strip_suffix(b"\n") else {
        return Err("the manifest does not end with a newline".into());
    };
    let lines = body.iter().filter(|b| **b == b'\n').count() + 1;
    if lines > max_lines {
        return Err(format!("the manifest has {lines} lines, more than the {max_lines} taken"));
    }
    let mut paths: HashSet<&[u8]> = HashSet::with_capacity(lines);
    let mut previous: Option<&[u8]> = None;
    for (index, line) in body.split(|b| *b == b'\n').enumerate() {
        let number = index + 1;
        let bad = |why: &str| format!("line {number} of the manifest {why}");
        let mut fields = line.splitn(3, |b| *b == b' ');
        let (Some(digest), Some(size), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("is not `<sha256> <size> <path>`"));
        };
        if digest.len() != 64 || !digest.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
            return Err(bad("does not start with 64 lowercase hex digits"));
        }
        if !is_plain_rel(path) {
            return Err(bad("has a path that is not relative with plain names"));
        }
        if previous.is_some_and(|p| p >= path) {
            return Err(bad("is out of order or repeats a path (lines are sorted bytewise by path)"));
        }
        previous = Some(path);
        paths.insert(path);
        if size == b"symlink" {
            parsed.links += 1;
            continue;
        }
        let canonical = !size.is_empty() && size.iter().all(u8::is_ascii_digit) && (size == b"0" || size[0] != b'0');
        let size = std::str::from_utf8(size).ok().filter(|_| canonical).and_then(|s| s.parse::<u64>().ok());
        let Some(size) = size else {
            return Err(bad("has a size that is neither a decimal number nor `symlink`"));
        };
        // Checked above: ASCII.
        let sha256 = String::from_utf8_lossy(digest).into_owned();
        parsed.files.push(ManifestEntry { path: PathBuf::from(OsStr::from_bytes(path)), size, sha256 });
    }
    // A path under another listed path: that one would be a file and a directory.
    for path in &paths {
        for (i, _) in path.iter().enumerate().filter(|(_, b)| **b == b'/') {
            if paths.contains(&path[..i]) {
                let (parent, child) = (String::from_utf8_lossy(&path[..i]), String::from_utf8_lossy(path));
                return Err(format!("the manifest lists {parent} both as a file and as the directory of {child}"));
            }
        }
    }
    Ok(parsed)
}

/// What content a manifest from a peer describes, checked against the
/// digest `hex` it was asked for: a directory, whose manifest hashes to its
/// digest, or a single file (a staged file or URL, whose digest is the
/// file's own), which peers describe by [`single_file_manifest`]: one line,
/// a plain name, whose digest is `hex`. Anything else is another content's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestOf {
    Directory,
    File,
}

impl ManifestOf {
    pub(crate) fn check(manifest: &[u8], hex: &str) -> Option<Self> {
        use sha2::{Digest, Sha256};
        if format!("{:x}", Sha256::digest(manifest)) == hex {
            return Some(Self::Directory);
        }
        let parsed = parse_manifest_bounded(manifest, 1).ok()?;
        match parsed.files.as_slice() {
            [file] if file.sha256 == hex && parsed.links == 0 && file.path.components().count() == 1 => {
                Some(Self::File)
            }
            _ => None,
        }
    }
}

/// How peers describe content that is one file, `name` of `size` bytes with
/// digest `hex`: a manifest of that file alone (see [`ManifestOf`]).
pub(crate) fn single_file_manifest(hex: &str, size: u64, name: &str) -> Option<String> {
    (is_plain_rel(name.as_bytes()) && !name.contains('/')).then(|| format!("{hex} {size} {name}\n"))
}

/// A relative path of plain names, '/'-separated (as a manifest lists it).
fn is_plain_rel(path: &[u8]) -> bool {
    !path.is_empty()
        && !path.contains(&0)
        && !path.contains(&b'\n')
        && path.split(|b| *b == b'/').all(|name| is_plain_name(OsStr::from_bytes(name)))
}

/// Gives the directories of the copy their modes, deepest first (a read-only
/// directory would refuse its own children otherwise). Nothing is flushed
/// here: the caller syncs the whole filesystem afterwards.
pub(super) fn seal(copy: &Path, tree: &Tree) -> std::io::Result<()> {
    let mut dirs: Vec<_> = tree.dirs.iter().collect();
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, mode) in dirs {
        fs::set_permissions(copy.join(rel), Permissions::from_mode(*mode))?;
    }
    fs::set_permissions(copy, Permissions::from_mode(tree.root_mode))
}

/// Removes from a leftover copy what the source does not have (any more):
/// it would end up in the cache without being in the manifest.
pub(super) fn prune(copy: &Path, tree: &Tree) -> io::Result<()> {
    let dirs: HashSet<&Path> = tree.dirs.iter().map(|(rel, _)| rel.as_path()).collect();
    let files: HashSet<&Path> = tree.files.iter().map(|f| f.rel.as_path()).collect();
    prune_to(copy, &files, &dirs)
}

/// Removes from `copy` every entry that is neither one of `files` (relative
/// paths) nor one of `dirs` (the directories on the way to them).
pub(crate) fn prune_to(copy: &Path, files: &HashSet<&Path>, dirs: &HashSet<&Path>) -> io::Result<()> {
    let mut pending = vec![PathBuf::new()];
    while let Some(rel_dir) = pending.pop() {
        for entry in fs::read_dir(copy.join(&rel_dir))? {
            let entry = entry?;
            let rel = rel_dir.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() && dirs.contains(rel.as_path()) {
                pending.push(rel);
            } else if kind.is_file() && files.contains(rel.as_path()) {
                // Kept.
            } else if kind.is_dir() {
                remove_all(&entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

/// `remove_dir_all`, also through directories that a sealed copy made read-only.
pub(super) fn remove_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path)?;
            fs::remove_dir_all(path)
        }
        other => other,
    }
}

fn make_writable(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// The file name an item gets in the cache.
pub(super) fn is_plain_name(name: &OsStr) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.as_bytes().contains(&b'/')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A directory's manifest hashes to its digest; a single file's lists
    /// that file alone, by a plain name, under the content's digest; any
    /// other manifest is another content's.
    #[test]
    fn a_manifest_names_a_directory_or_a_single_file_or_nothing() {
        use sha2::{Digest, Sha256};
        let hex = "ab".repeat(32);
        let one = single_file_manifest(&hex, 10, "train.jsonl").unwrap();
        assert_eq!(one, format!("{hex} 10 train.jsonl\n"));
        assert_eq!(ManifestOf::check(one.as_bytes(), &hex), Some(ManifestOf::File));
        assert_eq!(ManifestOf::check(one.as_bytes(), &"cd".repeat(32)), None, "another file's digest");
        let dir = format!("{hex} 10 a/train.jsonl\n");
        assert_eq!(ManifestOf::check(dir.as_bytes(), &hex), None, "not at the top: a directory's, of another digest");
        let dir_digest = format!("{:x}", Sha256::digest(dir.as_bytes()));
        assert_eq!(ManifestOf::check(dir.as_bytes(), &dir_digest), Some(ManifestOf::Directory));
        let two = format!("{hex} 10 a\n{hex} 10 b\n");
        assert_eq!(ManifestOf::check(two.as_bytes(), &hex), None, "two files");
        let link = format!("{hex} symlink a\n");
        assert_eq!(ManifestOf::check(link.as_bytes(), &hex), None, "a link");
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            assert_eq!(single_file_manifest(&hex, 1, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn manifest_is_sorted_bytewise_and_counted() {
        let text = manifest(vec![
            (PathBuf::from("a/b"), Listed::File { sha256: "11".into(), size: 3 }),
            (PathBuf::from("a-b"), Listed::File { sha256: "22".into(), size: 4 }),
            (PathBuf::from("l"), Listed::Link { target: PathBuf::from("a-b") }),
        ]);
        let text_str = String::from_utf8_lossy(&text);
        let lines: Vec<_> = text_str.lines().collect();
        assert_eq!(lines[0], "22 4 a-b", "'-' sorts before '/'");
        assert_eq!(lines[1], "11 3 a/b");
        assert!(lines[2].ends_with(" symlink l"));
        assert_eq!(manifest_totals(&text), (7, 2));
    }

    const D1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

    #[test]
    fn a_manifest_parses_back_to_what_was_listed() {
        let text = manifest(vec![
            (PathBuf::from("sub/deeper/c"), Listed::File { sha256: D2.into(), size: 0 }),
            (PathBuf::from("a-b"), Listed::File { sha256: D1.into(), size: 5 << 20 }),
            (PathBuf::from("link"), Listed::Link { target: PathBuf::from("a-b") }),
            (PathBuf::from("a/b c"), Listed::File { sha256: D1.into(), size: 18_446_744_073_709_551_615 }),
        ]);
        let parsed = parse_manifest(&text).unwrap();
        assert_eq!(parsed.links, 1);
        let files: Vec<_> =
            parsed.files.iter().map(|f| (f.path.to_str().unwrap(), f.size, f.sha256.as_str())).collect();
        assert_eq!(
            files,
            [("a-b", 5 << 20, D1), ("a/b c", u64::MAX, D1), ("sub/deeper/c", 0, D2)],
            "in the manifest's order; a space in a name is part of the path"
        );
        assert_eq!(parse_manifest(&manifest(Vec::new())).unwrap(), ParsedManifest::default(), "an empty directory");
    }

    #[test]
    fn a_manifest_not_written_as_manifest_writes_it_is_refused() {
        let line = |size: &str, path: &str| format!("{D1} {size} {path}\n");
        let refused = |text: String, why: &str| {
            let err = parse_manifest(text.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        };
        refused(line("1", "a").trim_end().to_owned(), "does not end with a newline");
        refused(format!("{}\n", line("1", "a")), "line 2 of the manifest is not");
        refused(line("1", "b") + &line("1", "a"), "line 2 of the manifest is out of order");
        refused(line("1", "a") + &line("2", "a"), "out of order or repeats");
        refused(line("1", "a/b") + &line("1", "a-b"), "out of order");
        refused(format!("{} 1 a\n", D2.to_uppercase()), "64 lowercase hex");
        refused(format!("{} 1 a\n", &D1[1..]), "64 lowercase hex");
        for size in ["+1", "01", "-1", "", " 1", "1.0", "18446744073709551616", "link"] {
            refused(line(size, "a"), "has a size");
        }
        for path in ["/etc/passwd", "..", "a/../b", ".", "a/./b", "a//b", "a/", "", "a\0b"] {
            refused(line("1", path), "not relative with plain names");
        }
        refused(line("1", "a") + &line("1", "a/b"), "lists a both as a file and as the directory of a/b");
        refused(line("1", "a") + &line("1", "a-c") + &line("1", "a/b/c"), "lists a both as a file");
        let lines = line("1", "a") + &line("1", "b") + &line("1", "c");
        assert_eq!(parse_manifest_bounded(lines.as_bytes(), 3).unwrap().files.len(), 3);
        let err = parse_manifest_bounded(lines.as_bytes(), 2).unwrap_err();
        assert!(err.contains("3 lines, more than the 2 taken"), "{err}");
    }
}
