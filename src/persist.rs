//! Writing a file so that a crash leaves either the old contents or the new,
//! never a mix: write a temporary file beside it, flush it to disk, rename it
//! over the old one (atomic on POSIX), then flush the directory entry.
//!
//! State files often live in shared directories, so the temporary file has
//! an unpredictable name and is created exclusively without following a
//! symlink (a link planted at its name makes the write fail, not write
//! elsewhere). The new file keeps the old one's permissions, and a target
//! that is a symlink is written through: the link stays, the file it points
//! to is replaced.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let target = resolve_symlink(path)?;
    let mode = existing_mode(&target)?;
    let (temporary, mut file) = create_temporary(&target, mode.is_some())?;
    let written = (|| {
        if let Some(mode) = mode {
            set_mode(&file, mode)?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)
    })();
    drop(file);
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written?;
    // The rename itself is durable only once the directory is flushed.
    #[cfg(unix)]
    if let Some(dir) = directory_of(&target) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The file a symlink at `path` points to (following a chain of them), or
/// `path` itself. A dangling link is an error: there is no file to replace.
fn resolve_symlink(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("it is a symlink whose target cannot be resolved: {e}"),
            )
        }),
        _ => Ok(path.to_path_buf()),
    }
}

#[cfg(unix)]
fn existing_mode(path: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn existing_mode(_path: &Path) -> io::Result<Option<u32>> {
    Ok(None)
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &File, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Creates `.NAME.RANDOM.tmp` beside `path`, exclusively and without
/// following a symlink; tries other names if one exists. A new file gets
/// the usual mode (0666 less the umask); one replacing a file starts
/// private and takes the old file's mode before it is renamed.
fn create_temporary(path: &Path, replacing: bool) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut last = None;
    for _ in 0..16 {
        let candidate = path.with_file_name(format!(".{name}.{:016x}.tmp", unpredictable()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(not(unix))]
        let _ = replacing;
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mode = if replacing { 0o600 } else { 0o666 };
            options.custom_flags(libc::O_NOFOLLOW).mode(mode);
        }
        match options.open(&candidate) {
            Ok(file) => return Ok((candidate, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name was free")))
}

/// 64 bits nobody can guess: std's hasher keys come from the OS's random
/// source, and each call hashes a new count with them.
fn unpredictable() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(unix)] // only POSIX makes a rename durable by syncing the directory
fn directory_of(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("necrocode-persist-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn it_replaces_the_file_and_leaves_no_temporary() {
        let dir = scratch("replace");
        let path = dir.join("state.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = scratch("fail");
        let path = dir.join("state.json");
        write_atomically(&path, b"old").unwrap();
        // A directory where the file should go: the rename fails.
        let blocked = dir.join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomically(&blocked, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_mode_is_kept_and_a_symlinked_target_is_written_through() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = scratch("mode");
        let real = dir.join("real.json");
        write_atomically(&real, b"old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomically(&real, b"new").unwrap();
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let link = dir.join("link.json");
        symlink(&real, &link).unwrap();
        write_atomically(&link, b"through").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"through");
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dangling = dir.join("dangling.json");
        symlink(dir.join("nowhere"), &dangling).unwrap();
        assert!(write_atomically(&dangling, b"x").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temporary_names_are_not_predictable() {
        let a = unpredictable();
        let b = unpredictable();
        assert_ne!(a, b);
    }
}
