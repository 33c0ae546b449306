//! The helper's side of a job's `sync:` archive: unpacked as the job's user
//! into the agent's directory for the job, from the bytes that follow the
//! request on stdin (the agent streams them from the controller).
//!
//! Refused: an entry whose path is absolute or climbs out with `..`, one
//! that would be written through a link (tar's `unpack_in` checks that every
//! parent resolves inside the destination), anything but files, directories
//! and links, more entries or bytes than the archive declared, and bytes
//! that do not hash to its digest. Set-id bits are not kept.
//!
//! The digest is known only once every byte is read, after the entries are
//! written: a mismatch leaves them there and fails the preparation (the job
//! fails; nothing runs them). A complete unpack writes `.cohort-sync` with
//! the digest, so a later attempt of the job on this node finds it done.

use std::io::Read;
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

/// Names the archive a directory holds, once unpacked.
pub const MARKER: &str = ".cohort-sync";

/// What one unpack may hold: the archive's own declaration.
#[derive(Debug, Clone, Copy)]
pub struct Declared<'a> {
    pub sha256: &'a str,
    pub bytes: u64,
    pub files: u32,
    pub unpacked_bytes: u64,
}

/// Reads, counts and hashes the archive's bytes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(std::io::Error::other(format!("more than the {} bytes the archive declared", self.limit)));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the archive read from `body` into `dest` (which exists and is
/// the user's). Returns false when `dest` already holds this archive.
pub fn unpack(dest: &Path, declared: Declared<'_>, body: impl Read) -> Result<bool, String> {
    let marker = dest.join(MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == declared.sha256) {
        return Ok(false);
    }
    let mut hashing = Hashing { inner: body, hasher: Sha256::new(), read: 0, limit: declared.bytes };
    let broken = |e: std::io::Error| format!("the sync archive cannot be read: {e}");
    {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&mut hashing));
        archive.set_preserve_permissions(false);
        archive.set_preserve_mtime(false);
        archive.set_unpack_xattrs(false);
        archive.set_overwrite(true);
        let (mut entries, mut written) = (0u32, 0u64);
        for entry in archive.entries().map_err(broken)? {
            let mut entry = entry.map_err(broken)?;
            let path = entry.path().map_err(broken)?.into_owned();
            entries += 1;
            if entries > declared.files {
                return Err(format!("the sync archive holds more than the {} entries it declared", declared.files));
            }
            if path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)))
            {
                return Err(format!("the sync archive's entry {} leaves the job's directory; refused", path.display()));
            }
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
                return Err(format!(
                    "the sync archive's entry {} is a {kind:?}, not a file, directory or link; refused",
                    path.display()
                ));
            }
            written += entry.size();
            if written > declared.unpacked_bytes {
                return Err(format!(
                    "the sync archive unpacks to more than the {} bytes it declared; refused",
                    declared.unpacked_bytes
                ));
            }
            let unpacked = entry.unpack_in(dest).map_err(|e| format!("unpacking {}: {e}", path.display()))?;
            if !unpacked {
                return Err(format!("the sync archive's entry {} leaves the job's directory; refused", path.display()));
            }
        }
    }
    // What the tar reader left unread (its end blocks, gzip's trailer) counts in the digest too.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(broken)?;
    let digest = format!("{:x}", hashing.hasher.finalize());
    if digest != declared.sha256 {
        return Err(format!(
            "the sync archive's bytes hash to {digest}, not the job's {}: it was damaged on the way; submit the job \
             again",
            declared.sha256
        ));
    }
    std::fs::write(&marker, declared.sha256).map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn gz(tar: Vec<u8>) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    }

    fn header(kind: tar::EntryType, name: &[u8], size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    /// An archive of raw entries (names as given, `..` included), gzipped.
    fn archive(entries: &[(tar::EntryType, &[u8], &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, data, mode) in entries {
            b.append(&header(*kind, name, data.len() as u64, *mode), *data).unwrap();
        }
        gz(b.into_inner().unwrap())
    }

    fn run(dest: &Path, bytes: &[u8], tweak: impl Fn(&mut Declared<'_>)) -> Result<bool, String> {
        let sha = format!("{:x}", Sha256::digest(bytes));
        let mut d = Declared { sha256: &sha, bytes: bytes.len() as u64, files: 10, unpacked_bytes: 1 << 20 };
        tweak(&mut d);
        unpack(dest, d, bytes)
    }

    #[test]
    fn files_links_and_the_exec_bit_arrive_and_a_second_unpack_is_skipped() {
        use tar::EntryType::*;
        let dest = tempfile::tempdir().unwrap();
        let bytes = archive(&[
            (Directory, b"src", b"", 0o755),
            (Regular, b"src/train.sh", b"echo hi", 0o4755),
            (Regular, b"data.txt", b"rows", 0o644),
        ]);
        assert_eq!(run(dest.path(), &bytes, |_| {}), Ok(true));
        assert_eq!(std::fs::read_to_string(dest.path().join("data.txt")).unwrap(), "rows");
        let mode = std::fs::metadata(dest.path().join("src/train.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "exec bit kept, setuid dropped: {mode:o}");
        assert_eq!(run(dest.path(), &bytes, |_| {}), Ok(false), "the marker says it is there");
    }

    #[test]
    fn escapes_devices_and_lies_are_refused() {
        use tar::EntryType::*;
        let dest = tempfile::tempdir().unwrap();
        let climb = archive(&[(Regular, b"../outside.txt", b"x", 0o644)]);
        let err = run(dest.path(), &climb, |_| {}).unwrap_err();
        assert!(err.contains("leaves the job's directory"), "{err}");
        assert!(!dest.path().parent().unwrap().join("outside.txt").exists());

        let absolute = archive(&[(Regular, b"/tmp/abs.txt", b"x", 0o644)]);
        assert!(run(dest.path(), &absolute, |_| {}).unwrap_err().contains("leaves the job's directory"));

        // A link to outside, then a file written through it.
        let outside = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut link = header(Symlink, b"out", 0, 0o777);
        link.set_link_name(outside.path()).unwrap();
        link.set_cksum();
        b.append(&link, std::io::empty()).unwrap();
        b.append(&header(Regular, b"out/planted.txt", 1, 0o644), &b"x"[..]).unwrap();
        let through = gz(b.into_inner().unwrap());
        let err = run(dest.path(), &through, |_| {}).unwrap_err();
        assert!(err.contains("planted.txt"), "{err}");
        assert!(!outside.path().join("planted.txt").exists(), "written through a link");

        let fifo = archive(&[(Fifo, b"pipe", b"", 0o644)]);
        assert!(run(dest.path(), &fifo, |_| {}).unwrap_err().contains("Fifo"));

        let fine = archive(&[(Regular, b"a.txt", b"12345", 0o644), (Regular, b"b.txt", b"12345", 0o644)]);
        let err = run(dest.path(), &fine, |d| d.unpacked_bytes = 6).unwrap_err();
        assert!(err.contains("more than the 6 bytes"), "{err}");
        let err = run(dest.path(), &fine, |d| d.files = 1).unwrap_err();
        assert!(err.contains("more than the 1 entries"), "{err}");
        let err = run(dest.path(), &fine, |d| d.bytes -= 1).unwrap_err();
        assert!(err.contains("declared"), "{err}");
        let err = run(dest.path(), &fine, |d| d.sha256 = "00").unwrap_err();
        assert!(err.contains("hash to"), "{err}");
        assert!(!dest.path().join(MARKER).exists(), "no marker for a refused archive");
    }
}
