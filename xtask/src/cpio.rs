//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//! Written here (not with the cpio tool) so that device nodes and root
//! ownership need no privileges.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
        self
    }

    /// Adds every directory above `name` (`a`, `a/b` for `a/b/c`).
    pub fn parent_dirs(&mut self, name: &str) -> &mut Self {
        let mut end = 0;
        while let Some(slash) = name[end..].find('/') {
            end += slash;
            self.dir(&name[..end]);
            end += 1;
        }
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | mode, data, (0, 0));
        self
    }

    pub fn file_from(&mut self, name: &str, mode: u32, path: &Path) -> Result<&mut Self> {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(self.file(name, mode, &data))
    }

    /// Adds a host file, symlink or whole directory tree as `name`.
    pub fn add_path(&mut self, name: &str, path: &Path) -> Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path)?;
            self.symlink(name, &target.to_string_lossy());
        } else if meta.is_dir() {
            self.dir(name);
            let mut entries: Vec<_> = fs::read_dir(path)?.collect::<std::io::Result<_>>()?;
            entries.sort_by_key(fs::DirEntry::file_name);
            for entry in entries {
                let child = format!("{name}/{}", entry.file_name().to_string_lossy());
                self.add_path(&child, &entry.path())?;
            }
        } else {
            self.file_from(name, meta.permissions().mode() & 0o7777, path)?;
        }
        Ok(self)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
        self
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor));
        self
    }

    /// Finishes the archive and writes it atomically to `dest`.
    pub fn write_to(mut self, dest: &Path) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&self.bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_headers_well_formed() {
        let mut a = Archive::default();
        a.dir("dev")
            .char_device("dev/console", 5, 1)
            .file("init", 0o755, b"abc");
        a.entry("TRAILER!!!", 0, &[], (0, 0));
        assert!(a.bytes.starts_with(b"070701"));
        assert_eq!(a.bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&a.bytes);
        assert!(text.contains("dev/console\0"));
        assert!(text.contains("TRAILER!!!"));
    }
}
