//! Durable file-system steps shared by the spool and the archive: a rename or
//! unlink counts only once its folder is fsynced, a new file only once it is
//! fsynced itself; and the bounded read of the small files a config value
//! names (passwords, secrets, tokens, CA bundles). Errors are plain
//! `io::Error`s; callers add the path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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

/// Largest password, client secret or token file: each holds one short
/// string; anything bigger is the wrong file.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Largest `ca_file`: a PEM bundle of a few hundred CA certificates is
/// well below this.
pub const MAX_CA_FILE: u64 = 16 * 1024 * 1024;

/// Opens `path` to read if it is a regular file of at most `max` bytes.
/// The open never blocks (O_NONBLOCK: a FIFO would wait for a writer), and
/// only then is the file's type checked, on the open file itself: a
/// device (`/dev/zero` never ends), FIFO, socket or folder is refused.
/// What is not the OS's own error says what is wrong in words (an error of
/// kind `InvalidInput` or `FileTooLarge`, no raw OS error).
pub fn open_small_file(path: &Path, max: u64) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    // openat, as std's File::open issues it: what the syscall traces of
    // tests/it/dispatcher_io.rs look for.
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a folder")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(what) = what {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        ));
    }
    if meta.len() > max {
        return Err(too_large(max));
    }
    Ok(file)
}

/// The whole of `path`, a regular file of at most `max` bytes (see
/// [`open_small_file`]); a file that grows past `max` while read is
/// refused too, having been read no further than that.
pub fn read_small_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_small_file(path, max)?;
    let mut content = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut content)?;
    if u64::try_from(content.len()).map_or(true, |n| n > max) {
        return Err(too_large(max));
    }
    Ok(content)
}

fn too_large(max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("larger than {max} bytes, too large for what it should hold"),
    )
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

    #[test]
    fn small_files_are_read_whole() {
        let dir = temp("small");
        make_dir(&dir, 0o700).unwrap();
        let path = dir.join("secret");
        fs::write(&path, b"hunter2\n").unwrap();
        assert_eq!(read_small_file(&path, 8).unwrap(), b"hunter2\n");
        let empty = dir.join("empty");
        fs::write(&empty, b"").unwrap();
        assert!(read_small_file(&empty, 8).unwrap().is_empty());
        let missing = read_small_file(&dir.join("absent"), 8).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What a config value may name by mistake is refused at once, without
    /// reading on forever, allocating without end or waiting for a writer.
    #[test]
    fn devices_fifos_folders_and_big_files_are_refused_quickly() {
        let dir = temp("refused");
        make_dir(&dir, 0o700).unwrap();
        let fifo = dir.join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        let big = dir.join("big");
        fs::write(&big, vec![b'x'; 65]).unwrap();
        let started = std::time::Instant::now();
        for (path, words) in [
            (
                Path::new("/dev/zero"),
                "a character device, not a regular file",
            ),
            (&fifo, "a FIFO, not a regular file"),
            (&dir, "a folder, not a regular file"),
            (&big, "larger than 64 bytes"),
        ] {
            let e = read_small_file(path, 64).unwrap_err();
            assert!(e.to_string().starts_with(words), "{}: {e}", path.display());
            assert!(e.raw_os_error().is_none(), "{e:?}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // The same bound holds for a file that is not too big to open.
        fs::write(&big, vec![b'x'; 64]).unwrap();
        assert_eq!(read_small_file(&big, 64).unwrap().len(), 64);
        fs::remove_dir_all(&dir).unwrap();
    }
}
