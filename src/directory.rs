//! Emptying a directory (a slot after each attempt), without following a
//! symlink out of it: a link planted inside is removed, not what it names.

use std::fs;
use std::io;
use std::path::Path;

/// Removes everything in `path`, keeping `path` itself. Subdirectories go
/// whole, best effort (as `shutil.rmtree(..., ignore_errors=True)`); a
/// file or link that cannot be removed is an error, one already gone is not.
pub fn empty(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        let Ok(entry) = entry else { continue };
        // The entry's own type (d_type): a symlink to a directory is a link.
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            let _ = fs::remove_dir_all(entry.path());
            continue;
        }
        match fs::remove_file(entry.path()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empties_files_subdirectories_and_links_but_not_what_links_name() {
        let root = std::env::temp_dir().join(format!("nd-empty-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (slot, outside) = (root.join("slot"), root.join("outside"));
        fs::create_dir_all(slot.join("build/deep")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(slot.join("build/deep/x"), "x").unwrap();
        fs::write(slot.join("file"), "y").unwrap();
        fs::write(outside.join("keep"), "z").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, slot.join("link")).unwrap();
        empty(&slot).unwrap();
        assert_eq!(fs::read_dir(&slot).unwrap().count(), 0);
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "z");
        let missing = empty(&root.join("gone")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(&root).unwrap();
    }
}
