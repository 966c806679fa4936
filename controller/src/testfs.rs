//! Test helper: a small real tmpfs, to fill up for disk-full tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a fresh temp dir; unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

/// A file filling the rest of a [`Tmpfs`]; removed on drop.
pub struct Filler(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB, or `None` where mounting is not
    /// allowed (not root).
    pub fn mount(mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    /// Its root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full.
    pub fn fill(&self) -> Filler {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        Filler(path)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
