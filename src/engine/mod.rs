//! The engine: project model, image import, dataset preparation, models, training, inspection and
//! metrics. No GUI code lives here; the command line and the desktop app both drive it.

pub mod dataset;
pub mod demo;
pub mod device;
pub mod inference;
pub mod metrics;
pub mod model;
pub mod project;
pub mod training;
pub mod visual;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A shared flag that asks background work to stop. Cheap to clone; all clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A new flag, not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work to stop.
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `path` with `suffix` appended to its file name (`m.ink` + `.lock` = `m.ink.lock`).
pub fn path_with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// `$XDG_DATA_HOME/inkspect`, else `~/.local/share/inkspect`.
pub fn data_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    std::env::var_os("XDG_DATA_HOME")
        .map(|d| PathBuf::from(d).join("inkspect"))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h)
                    .join(".local")
                    .join("share")
                    .join("inkspect")
            })
        })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, flushed to
/// disk (fsync) and renamed over `path`, so a crash leaves either the old file or the new one,
/// never a partial file. Creates the parent folder if needed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_rename(path, bytes, true)
}

/// Like [`atomic_write`] but without the fsync: readers never see a partial file, but a power
/// loss may lose the file. For caches, where an fsync per entry would cost more than the entry.
pub fn atomic_write_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_rename(path, bytes, false)
}

fn write_via_rename(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".inkspect-")
        .suffix(".tmp")
        .tempfile_in(parent)?;
    tmp.write_all(bytes)?;
    // Temporary files are private (0600); give the result the permissions of the file it replaces,
    // or the usual 0644 for a new file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o644);
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    if sync {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
