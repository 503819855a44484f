//! Durable file-system steps shared by the spool and the archive: a rename or
//! unlink counts only once its folder is fsynced, a new file only once it is
//! fsynced itself. Errors are plain `io::Error`s; callers add the path.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and its parents) if missing, then gives it `mode`; an
/// existing folder is left as it is.
pub fn make_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Creates `path`, which must not exist, with `mode` whatever the umask.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

/// Creates `path` with `mode`, lets `fill` write it and fsyncs it.
pub fn write_new_file(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut file = create_new(path, mode)?;
    fill(&mut file)?;
    file.sync_all()
}

/// The entries of `dir`, unsorted; a missing folder has none.
pub fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pbxmail-basefs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_file_gets_its_mode_and_refuses_to_overwrite() {
        let dir = temp("new");
        make_dir(&dir, 0o750).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        let path = dir.join("f");
        write_new_file(&path, 0o660, |f| f.write_all(b"x")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        let again = write_new_file(&path, 0o660, |f| f.write_all(b"y"));
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(list_dir(&dir).unwrap(), vec![path]);
        sync_dir(&dir).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_folder_lists_as_empty() {
        assert!(list_dir(&temp("missing")).unwrap().is_empty());
    }
}
