//! A read-only view of a ustar archive (POSIX.1-1988 "ustar" format, as `tar` writes it and
//! `cargo xtask` packs guest images): 512-byte headers, each followed by the file's data padded
//! to 512 bytes, ended by a zero block. Only regular files are listed.

use core::fmt;

const BLOCK: usize = 512;

/// Why an archive cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveError {
    /// A header's checksum does not match (at this byte offset).
    BadChecksum(usize),
    /// A header's size field is not octal (at this byte offset).
    BadSize(usize),
    /// A file's data runs past the archive's end (at this byte offset).
    Truncated(usize),
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveError::BadChecksum(at) => write!(f, "tar header at byte {at}: bad checksum"),
            ArchiveError::BadSize(at) => write!(f, "tar header at byte {at}: size is not octal"),
            ArchiveError::Truncated(at) => write!(f, "tar entry at byte {at} runs past the archive"),
        }
    }
}

impl core::error::Error for ArchiveError {}

/// One file of an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Its path in the archive.
    pub name: &'a str,
    /// Its contents.
    pub data: &'a [u8],
}

/// An archive in memory.
#[derive(Clone, Copy, Debug)]
pub struct Archive<'a> {
    bytes: &'a [u8],
}

/// The value of an octal field (NUL- or space-terminated).
fn octal(field: &[u8]) -> Option<usize> {
    let mut value: usize = 0;
    let mut digits = 0;
    for &byte in field {
        match byte {
            b'0'..=b'7' => {
                value = value.checked_mul(8)?.checked_add(usize::from(byte - b'0'))?;
                digits += 1;
            }
            b' ' | 0 if digits > 0 => break,
            b' ' => {}
            _ => return None,
        }
    }
    Some(value)
}

/// A NUL-terminated text field.
fn text(field: &[u8]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    core::str::from_utf8(&field[..end]).unwrap_or("")
}

impl<'a> Archive<'a> {
    /// A view of `bytes` as an archive (checked as it is read).
    pub fn new(bytes: &'a [u8]) -> Archive<'a> {
        Archive { bytes }
    }

    /// The regular files, in order; the first malformed header ends the list with its error.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry<'a>, ArchiveError>> + 'a {
        let bytes = self.bytes;
        let mut at = 0usize;
        let mut failed = false;
        core::iter::from_fn(move || loop {
            if failed {
                return None;
            }
            let header = bytes.get(at..at + BLOCK)?;
            if header.iter().all(|&b| b == 0) {
                return None;
            }
            let result = Self::entry(bytes, at, header);
            let Ok((entry, size, regular)) = result else {
                failed = true;
                return Some(result.map(|(entry, _, _)| entry));
            };
            at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
            if regular {
                return Some(Ok(entry));
            }
        })
    }

    fn entry(bytes: &'a [u8], at: usize, header: &'a [u8]) -> Result<(Entry<'a>, usize, bool), ArchiveError> {
        let stored = octal(&header[148..156]).ok_or(ArchiveError::BadChecksum(at))?;
        let sum: usize = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    usize::from(b' ')
                } else {
                    usize::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(ArchiveError::BadChecksum(at));
        }
        let size = octal(&header[124..136]).ok_or(ArchiveError::BadSize(at))?;
        let start = at + BLOCK;
        let data = start
            .checked_add(size)
            .and_then(|end| bytes.get(start..end))
            .ok_or(ArchiveError::Truncated(at))?;
        let regular = matches!(header[156], b'0' | 0);
        Ok((
            Entry {
                name: text(&header[0..100]),
                data,
            },
            size,
            regular,
        ))
    }

    /// The file named `name`, if the archive holds it (and is well formed up to it).
    pub fn file(&self, name: &str) -> Option<&'a [u8]> {
        self.entries()
            .map_while(Result::ok)
            .find(|entry| entry.name == name)
            .map(|entry| entry.data)
    }
}

/// A ustar archive of `files` (name, contents), as `cargo xtask` writes the ramdisk: for the
/// host side and the tests. Names longer than 99 bytes are cut.
pub fn build(files: &[(&str, &[u8])]) -> alloc::vec::Vec<u8> {
    let mut out = alloc::vec::Vec::new();
    for (name, data) in files {
        let mut header = [0u8; BLOCK];
        let name = name.as_bytes();
        let len = name.len().min(99);
        header[..len].copy_from_slice(&name[..len]);
        header[100..108].copy_from_slice(b"0000644\0");
        header[108..116].copy_from_slice(b"0000000\0");
        header[116..124].copy_from_slice(b"0000000\0");
        let size = alloc::format!("{:011o}\0", data.len());
        header[124..136].copy_from_slice(size.as_bytes());
        header[136..148].copy_from_slice(b"00000000000\0");
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: usize = header.iter().map(|&b| usize::from(b)).sum();
        let checksum = alloc::format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(checksum.as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_found_by_name_with_their_contents() {
        let bytes = build(&[("kut/manifest", b"a\tb\n"), ("kut/x.flat", &[7u8; 1000])]);
        let archive = Archive::new(&bytes);
        assert_eq!(archive.file("kut/manifest"), Some(&b"a\tb\n"[..]));
        assert_eq!(archive.file("kut/x.flat").map(<[u8]>::len), Some(1000));
        assert_eq!(archive.file("missing"), None);
        assert_eq!(archive.entries().count(), 2);
    }

    /// The archive `tar` itself wrote (GNU tar 1.34, `tar --format=ustar -cf`) reads the same.
    #[test]
    fn an_archive_written_by_tar_reads() {
        let dir = std::env::temp_dir().join(format!("loader-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hello.txt"), b"hello\n").unwrap();
        let tarball = dir.join("t.tar");
        let status = std::process::Command::new("tar")
            .args(["--format=ustar", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&dir)
            .arg("hello.txt")
            .status()
            .expect("tar runs");
        assert!(status.success());
        let bytes = std::fs::read(&tarball).unwrap();
        assert_eq!(Archive::new(&bytes).file("hello.txt"), Some(&b"hello\n"[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_header_or_a_short_archive_is_an_error_not_a_panic() {
        let mut bytes = build(&[("a", b"12345")]);
        bytes[0] = b'b';
        assert_eq!(
            Archive::new(&bytes).entries().next(),
            Some(Err(ArchiveError::BadChecksum(0)))
        );
        let bytes = build(&[("a", &[1u8; 700])]);
        assert!(matches!(
            Archive::new(&bytes[..800]).entries().next(),
            Some(Err(ArchiveError::Truncated(0)))
        ));
        assert_eq!(Archive::new(&[]).entries().count(), 0);
        assert_eq!(Archive::new(&[1, 2, 3]).entries().count(), 0);
    }
}
