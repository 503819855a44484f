//! The spool: the disk is the truth about every accepted message.
//!
//! Layout (see docs/spool.md):
//! ```text
//! SPOOL/tmp/ID.msg, ID.env         being written; never acted on
//! SPOOL/queue/TENANT/ID.msg        message, CRLF lines, not dot-stuffed
//! SPOOL/queue/TENANT/ID.env        envelope records (envelope.rs)
//! SPOOL/quarantine/TENANT-ID.*     damaged entries, kept for an admin
//! SPOOL/pickup.sock                datagram hints "TENANT ID" to the daemon
//! ```
//! A message is committed by fsync of both files, rename of `.msg` then `.env`
//! into the tenant's folder, and fsync of that folder: an `.env` in `queue/`
//! always has its `.msg` beside it. A submitter holds an exclusive lock on its
//! `.msg` until it is done, so recovery removes only what nobody is writing.

pub mod envelope;

use envelope::{Envelope, EnvelopeError, Record};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(String);

impl MessageId {
    /// Unique across processes: time, pid and a per-process counter.
    pub fn generate() -> MessageId {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let count = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
        MessageId(format!(
            "{:09X}{:05X}{:06X}{:03X}",
            now.as_secs() & 0xf_ffff_ffff,
            now.subsec_micros(),
            std::process::id() & 0xff_ffff,
            count
        ))
    }

    /// Accepts only what `generate` can produce, so an ID is always a safe file name.
    pub fn parse(s: &str) -> Option<MessageId> {
        let ok = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| MessageId(s.to_ascii_uppercase()))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug)]
pub enum SpoolError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Envelope {
        path: PathBuf,
        source: EnvelopeError,
    },
}

impl SpoolError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
            || matches!(self, SpoolError::Envelope { source: EnvelopeError::Io(e), .. } if e.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            SpoolError::Envelope { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Io { source, .. } => Some(source),
            SpoolError::Envelope { source, .. } => Some(source),
        }
    }
}

pub type Result<T> = std::result::Result<T, SpoolError>;

#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    pub fn new(root: &Path) -> Spool {
        Spool {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    pub fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.queue_dir().join(tenant)
    }

    pub fn pickup_socket(&self) -> PathBuf {
        self.root.join("pickup.sock")
    }

    fn message_path(&self, tenant: &str, id: &MessageId) -> PathBuf {
        self.tenant_dir(tenant).join(format!("{id}.msg"))
    }

    fn envelope_path(&self, tenant: &str, id: &MessageId) -> PathBuf {
        self.tenant_dir(tenant).join(format!("{id}.env"))
    }

    /// Creates the folders if missing (the daemon at start; packages make them too).
    /// Submitters write as members of the spool's group (sendmail is setgid),
    /// so tmp/ and queue/ are group-writable and setgid: what is made inside
    /// keeps the group.
    pub fn create_layout(&self) -> Result<()> {
        for (dir, mode) in [
            (self.root.clone(), 0o2750),
            (self.tmp_dir(), 0o2770),
            (self.queue_dir(), 0o2770),
            (self.quarantine_dir(), 0o2750),
        ] {
            make_dir(&dir, mode)?;
        }
        Ok(())
    }

    /// Start-up recovery: removes abandoned temp files and message files whose
    /// envelope never arrived. Neither was ever acknowledged to a submitter,
    /// and a submitter still at work holds a lock that keeps its files safe.
    pub fn remove_abandoned(&self) -> Result<usize> {
        let mut removed = 0;
        for path in list_dir(&self.tmp_dir())? {
            if remove_if_abandoned(&path, || true) {
                removed += 1;
            }
        }
        for tenant in self.tenants()? {
            for path in list_dir(&self.tenant_dir(&tenant))? {
                let orphan = path.extension().is_some_and(|e| e == "msg")
                    && !path.with_extension("env").exists();
                let env = path.with_extension("env");
                if orphan && remove_if_abandoned(&path, || !env.exists()) {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Tenant folders present in the spool (configured or not).
    pub fn tenants(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = list_dir(&self.queue_dir())?
            .iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The tenant folder holding message `id`, if any.
    pub fn tenant_of(&self, id: &MessageId) -> Option<String> {
        self.tenants()
            .ok()?
            .into_iter()
            .find(|t| self.envelope_path(t, id).exists())
    }

    /// IDs of the messages queued for one tenant (those with an envelope).
    pub fn message_ids(&self, tenant: &str) -> Result<Vec<MessageId>> {
        let mut ids: Vec<MessageId> = list_dir(&self.tenant_dir(tenant))?
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "env"))
            .filter_map(|p| MessageId::parse(p.file_stem()?.to_str()?))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn load_envelope(&self, tenant: &str, id: &MessageId) -> Result<Envelope> {
        let path = self.envelope_path(tenant, id);
        let file = File::open(&path).map_err(SpoolError::io(&path))?;
        envelope::read_envelope(&mut BufReader::new(file))
            .map_err(|source| SpoolError::Envelope { path, source })
    }

    pub fn open_message(&self, tenant: &str, id: &MessageId) -> Result<File> {
        let path = self.message_path(tenant, id);
        File::open(&path).map_err(SpoolError::io(&path))
    }

    /// Appends a record and waits until it is on stable storage. A torn
    /// final record (a crash mid-append) is cut off first: nothing acted on
    /// it, and appending after it would fuse the two into one bad line.
    pub fn append(&self, tenant: &str, id: &MessageId, record: &Record) -> Result<()> {
        let path = self.envelope_path(tenant, id);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        cut_torn_tail(&mut file).map_err(SpoolError::io(&path))?;
        envelope::write_record(&mut file, record).map_err(SpoolError::io(&path))?;
        file.sync_data().map_err(SpoolError::io(&path))
    }

    /// Removes a finished message: envelope first, so a crash in between leaves
    /// only an orphan `.msg` that start-up recovery removes.
    pub fn remove(&self, tenant: &str, id: &MessageId) -> Result<()> {
        let env = self.envelope_path(tenant, id);
        fs::remove_file(&env).map_err(SpoolError::io(&env))?;
        let msg = self.message_path(tenant, id);
        match fs::remove_file(&msg) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(SpoolError::io(&msg)(e)),
            _ => {}
        }
        sync_dir(&self.tenant_dir(tenant))
    }

    /// Moves a damaged entry aside with a note of why; never deletes it.
    pub fn quarantine(&self, tenant: &str, id: &MessageId, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        for (from, ext) in [
            (self.message_path(tenant, id), "msg"),
            (self.envelope_path(tenant, id), "env"),
        ] {
            let to = dir.join(format!("{tenant}-{id}.{ext}"));
            match fs::rename(&from, &to) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SpoolError::io(&from)(e))
                }
                _ => {}
            }
        }
        let note = dir.join(format!("{tenant}-{id}.reason"));
        fs::write(&note, format!("{reason}\n")).map_err(SpoolError::io(&note))?;
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// The daemon's claim on this spool: an exclusive lock on `daemon.lock`,
    /// held as long as the returned file is open. A second daemon is refused.
    pub fn lock_for_daemon(&self) -> Result<File> {
        let path = self.root.join("daemon.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::Io {
                path: path.clone(),
                source: io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another pbxmail daemon is already running on this spool; stop it first",
                ),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(SpoolError::io(&path)(e)),
        }
    }

    /// Bytes available to unprivileged writers, and the filesystem's size.
    pub fn free_space(&self) -> Result<(u64, u64)> {
        let stat =
            rustix::fs::statvfs(&self.root).map_err(|e| SpoolError::io(&self.root)(e.into()))?;
        Ok((
            stat.f_bavail.saturating_mul(stat.f_frsize),
            stat.f_blocks.saturating_mul(stat.f_frsize),
        ))
    }

    /// Entries moved aside as damaged, with the reason recorded for each.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        let mut entries = Vec::new();
        for path in list_dir(&self.quarantine_dir())? {
            if path.extension().is_none_or(|e| e != "reason") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            // A note describes a quarantined message (stem.env / stem.msg) or
            // stray (stem itself); a stray whose own name ends in .reason is not one.
            let describes = |suffix: &str| path.with_file_name(format!("{stem}{suffix}")).exists();
            if !(describes("") || describes(".env") || describes(".msg")) {
                continue;
            }
            // TENANT-ID or TENANT-stray.NAME: an ID has no '-', a tenant name may.
            let (tenant, id) = match stem.find("-stray.") {
                Some(at) => (
                    stem.get(..at).unwrap_or_default(),
                    stem.get(at + 1..).unwrap_or_default(),
                ),
                None => stem.rsplit_once('-').unwrap_or(("", stem)),
            };
            let reason = fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_string();
            let envelope = File::open(path.with_extension("env"))
                .ok()
                .and_then(|f| envelope::read_envelope(&mut BufReader::new(f)).ok());
            entries.push(Quarantined {
                tenant: tenant.to_string(),
                id: id.to_string(),
                reason,
                envelope,
            });
        }
        entries.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        Ok(entries)
    }

    /// Files in a tenant's folder that are not ID.msg / ID.env: they do not
    /// belong in the spool and are never acted on. (An ID.msg without its
    /// .env is a submission between its two renames, or one recovery removes.)
    pub fn stray_files(&self, tenant: &str) -> Result<Vec<PathBuf>> {
        Ok(list_dir(&self.tenant_dir(tenant))?
            .into_iter()
            .filter(|p| {
                let known_ext = p.extension().is_some_and(|e| e == "msg" || e == "env");
                let valid_id = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(MessageId::parse)
                    .is_some();
                !(p.is_file() && known_ext && valid_id)
            })
            .collect())
    }

    /// Moves a file that is not a spool entry into quarantine, with the reason.
    pub fn quarantine_stray(&self, tenant: &str, path: &Path, reason: &str) -> Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("unnamed");
        let base = format!("{tenant}-stray.{name}");
        fs::rename(path, dir.join(&base)).map_err(SpoolError::io(path))?;
        let note = dir.join(format!("{base}.reason"));
        fs::write(&note, format!("{reason}\n")).map_err(SpoolError::io(&note))?;
        sync_dir(&dir)?;
        sync_dir(&self.tenant_dir(tenant))
    }

    /// fsck's check of one entry: envelope records and the message checksum.
    pub fn verify(&self, tenant: &str, id: &MessageId) -> std::result::Result<(), String> {
        let envelope = self.load_envelope(tenant, id).map_err(|e| e.to_string())?;
        let mut file = self
            .open_message(tenant, id)
            .map_err(|e| format!("message file missing or unreadable: {e}"))?;
        let scan = scan_message(&mut file).map_err(|e| format!("message file unreadable: {e}"))?;
        if scan.sha256 != envelope.sha256 {
            return Err(format!(
                "message file checksum mismatch (SHA-256 {}, envelope says {})",
                scan.sha256, envelope.sha256
            ));
        }
        Ok(())
    }

    /// Starts writing a new message into `tmp/`, locked against recovery.
    pub fn begin_submission(&self) -> Result<Submission> {
        // Recovery may remove a file between its creation and our lock; then
        // its link count is 0 and we start over with a new one.
        for _ in 0..8 {
            let (id, path, file) = self.create_locked_tmp()?;
            let linked = file
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 0);
            if linked.map_err(SpoolError::io(&path))? {
                return Ok(self.submission(id, path, file));
            }
        }
        let tmp = self.tmp_dir();
        Err(SpoolError::io(&tmp)(io::Error::other(
            "new spool files keep disappearing; is a second recovery running?",
        )))
    }

    fn create_locked_tmp(&self) -> Result<(MessageId, PathBuf, File)> {
        let id = MessageId::generate();
        let path = self.tmp_dir().join(format!("{id}.msg"));
        let create = || OpenOptions::new().write(true).create_new(true).open(&path);
        let file = match create() {
            // A spool the daemon has not run on yet: make its folders.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_layout()?;
                create()
            }
            other => other,
        }
        .map_err(SpoolError::io(&path))?;
        group_writable(&file).map_err(SpoolError::io(&path))?;
        // Held until this process closes the file: recovery leaves it alone.
        file.lock().map_err(SpoolError::io(&path))?;
        Ok((id, path, file))
    }

    fn submission(&self, id: MessageId, path: PathBuf, file: File) -> Submission {
        Submission {
            spool: self.clone(),
            id,
            out: BufWriter::with_capacity(64 * 1024, file),
            sha256: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            tmp_message: path,
            committed: false,
        }
    }

    /// Tells a running daemon that a message is waiting. Only a hint: if no
    /// daemon listens, it finds the message when it starts.
    pub fn notify(&self, tenant: &str, id: &MessageId) {
        let Ok(socket) = UnixDatagram::unbound() else {
            return;
        };
        let _ = socket.set_nonblocking(true);
        let _ = socket.send_to(format!("{tenant} {id}").as_bytes(), self.pickup_socket());
    }
}

/// A quarantined entry as `queue` and `fsck` show it.
#[derive(Debug)]
pub struct Quarantined {
    pub tenant: String,
    /// The message ID, or `stray.NAME` for a file that was never a message.
    pub id: String,
    pub reason: String,
    /// The envelope, if it is still readable.
    pub envelope: Option<Envelope>,
}

/// A message being written. Dropped without `commit`, it leaves nothing behind.
pub struct Submission {
    spool: Spool,
    id: MessageId,
    out: BufWriter<File>,
    sha256: ring::digest::Context,
    size: u64,
    tmp_message: PathBuf,
    committed: bool,
}

impl Write for Submission {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        if let Some(written) = buf.get(..n) {
            self.sha256.update(written);
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Submission {
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Makes the message durable in `tenant`'s queue; on `Ok` it may be acknowledged.
    pub fn commit(self, tenant: &str, sender: &str, recipients: &[String]) -> Result<MessageId> {
        self.commit_as(tenant, sender, recipients, None)
    }

    /// `commit` for a bounce pbxmail made itself.
    pub fn commit_as(
        mut self,
        tenant: &str,
        sender: &str,
        recipients: &[String],
        bounce: Option<envelope::BounceOf>,
    ) -> Result<MessageId> {
        let tmp_msg = self.tmp_message.clone();
        self.out.flush().map_err(SpoolError::io(&tmp_msg))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(SpoolError::io(&tmp_msg))?;

        let digest = self.sha256.clone().finish();
        let record = Record::Created {
            version: envelope::FORMAT_VERSION,
            tenant: tenant.to_string(),
            sender: sender.to_string(),
            recipients: recipients.to_vec(),
            queued_at_ms: unix_millis(),
            size: self.size,
            sha256: hex(digest.as_ref()),
            bounce,
        };
        let tmp_env = self.tmp_message.with_extension("env");
        let result = write_new_file(&tmp_env, |f| envelope::write_record(f, &record))
            .and_then(|()| self.move_into_queue(tenant, &tmp_env));
        if result.is_err() {
            let _ = fs::remove_file(&tmp_env);
        }
        result?;
        self.committed = true;
        Ok(self.id.clone())
    }

    fn move_into_queue(&self, tenant: &str, tmp_env: &Path) -> Result<()> {
        let dir = self.spool.tenant_dir(tenant);
        if !dir.is_dir() {
            make_dir(&dir, 0o2770)?;
            sync_dir(&self.spool.queue_dir())?;
        }
        let msg = self.spool.message_path(tenant, &self.id);
        let env = self.spool.envelope_path(tenant, &self.id);
        fs::rename(&self.tmp_message, &msg).map_err(SpoolError::io(&msg))?;
        if let Err(e) = fs::rename(tmp_env, &env) {
            let _ = fs::remove_file(&msg);
            return Err(SpoolError::io(&env)(e));
        }
        sync_dir(&dir)?;
        sync_dir(&self.spool.tmp_dir())
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_message);
        }
    }
}

/// Truncates `file` after its last newline if it does not end with one: a
/// record torn by a crash mid-append, never acted on (spool envelopes and
/// the archive journal share this framing).
pub fn cut_torn_tail(file: &mut File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Envelopes are a few records long: reading one whole is cheap.
    let mut content = Vec::with_capacity(len as usize);
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut content)?;
    let keep = content
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    file.set_len(keep as u64)?;
    file.sync_data()
}

fn write_new_file(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(SpoolError::io(path))?;
    group_writable(&file).map_err(SpoolError::io(path))?;
    fill(&mut file).map_err(SpoolError::io(path))?;
    file.sync_all().map_err(SpoolError::io(path))
}

/// 0660 whatever the submitter's umask: the daemon (the spool's group) appends
/// delivery results to envelopes that a PBX user's sendmail created.
fn group_writable(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o660))
}

/// Creates a spool folder with its mode (setgid keeps the spool's group below).
fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(SpoolError::io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(SpoolError::io(dir))
}

/// A rename or unlink is durable only once its directory is fsynced.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SpoolError::io(dir))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpoolError::io(dir)(e)),
    };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

/// Removes `path` if no submitter holds its lock (it died or finished).
/// The lock is held while unlinking, so a submitter that takes it next sees
/// its file gone (link count 0) and starts over. A `.env` in tmp/ belongs to
/// the `.msg` beside it and follows its lock.
/// `still_removable` is checked again under the lock: a submitter may have
/// finished its commit between the caller's look and the lock.
fn remove_if_abandoned(path: &Path, still_removable: impl Fn() -> bool) -> bool {
    let lock_holder = if path.extension().is_some_and(|e| e == "env") {
        path.with_extension("msg")
    } else {
        path.to_path_buf()
    };
    let _lock = match File::open(&lock_holder) {
        Ok(file) => match file.try_lock() {
            Ok(()) => Some(file),
            Err(_) => return false,
        },
        // The .msg is gone: the .env is left over from a finished or failed commit.
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return false,
    };
    still_removable() && fs::remove_file(path).is_ok()
}

pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one streamed read of a message file learns.
pub struct MessageScan {
    pub sha256: String,
    pub eight_bit: bool,
}

/// SHA-256 of a message file (the check before sending) and whether it has
/// 8-bit content (BODY=8BITMIME), in one pass.
pub fn scan_message(file: &mut File) -> io::Result<MessageScan> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut eight_bit = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = io::Read::read(file, &mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(chunk) = buf.get(..n) {
            ctx.update(chunk);
            eight_bit = eight_bit || !chunk.is_ascii();
        }
    }
    Ok(MessageScan {
        sha256: hex(ctx.finish().as_ref()),
        eight_bit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envelope::{RcptResult, RcptStatus};
    use std::io::Read;

    fn temp_spool(name: &str) -> Spool {
        let dir = std::env::temp_dir().join(format!("pbxmail-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spool = Spool::new(&dir);
        spool.create_layout().unwrap();
        spool
    }

    #[test]
    fn commit_then_load_round_trips() {
        let spool = temp_spool("roundtrip");
        let mut sub = spool.begin_submission().unwrap();
        sub.write_all(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
        let id = sub
            .commit("acme", "101@acme.example", &["a@x.example".into()])
            .unwrap();
        assert_eq!(spool.message_ids("acme").unwrap(), vec![id.clone()]);
        let env = spool.load_envelope("acme", &id).unwrap();
        assert_eq!(env.size, b"Subject: hi\r\n\r\nbody\r\n".len() as u64);
        let mut msg = spool.open_message("acme", &id).unwrap();
        assert_eq!(scan_message(&mut msg).unwrap().sha256, env.sha256);
        assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());

        spool
            .append(
                "acme",
                &id,
                &Record::Attempt {
                    at_ms: 1,
                    results: vec![RcptResult {
                        rcpt: 0,
                        status: RcptStatus::Sent,
                        reply: "250".into(),
                    }],
                    next_attempt_ms: None,
                    error: None,
                },
            )
            .unwrap();
        assert!(spool.load_envelope("acme", &id).unwrap().is_done());
        spool.remove("acme", &id).unwrap();
        assert!(spool.message_ids("acme").unwrap().is_empty());
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn append_after_a_torn_tail_cuts_it_first() {
        let spool = temp_spool("torn");
        let mut sub = spool.begin_submission().unwrap();
        sub.write_all(b"x\r\n").unwrap();
        let id = sub
            .commit("acme", "a@acme.example", &["b@x.example".into()])
            .unwrap();
        let env_path = spool.envelope_path("acme", &id);
        let mut f = OpenOptions::new().append(true).open(&env_path).unwrap();
        f.write_all(b"57 0badc0de {\"type\":\"attem").unwrap();
        drop(f);
        let sent = Record::Attempt {
            at_ms: 1,
            results: vec![envelope::RcptResult {
                rcpt: 0,
                status: envelope::RcptStatus::Sent,
                reply: "250".into(),
            }],
            next_attempt_ms: None,
            error: None,
        };
        spool.append("acme", &id, &sent).unwrap();
        assert!(spool.load_envelope("acme", &id).unwrap().is_done());
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn dropped_submission_leaves_nothing() {
        let spool = temp_spool("drop");
        let mut sub = spool.begin_submission().unwrap();
        sub.write_all(b"partial").unwrap();
        drop(sub);
        assert!(list_dir(&spool.tmp_dir()).unwrap().is_empty());
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn quarantine_keeps_files_and_reason() {
        let spool = temp_spool("quarantine");
        let mut sub = spool.begin_submission().unwrap();
        sub.write_all(b"x\r\n").unwrap();
        let id = sub
            .commit("acme", "a@acme.example", &["b@x.example".into()])
            .unwrap();
        spool.quarantine("acme", &id, "checksum mismatch").unwrap();
        assert!(spool.message_ids("acme").unwrap().is_empty());
        let mut reason = String::new();
        File::open(spool.quarantine_dir().join(format!("acme-{id}.reason")))
            .unwrap()
            .read_to_string(&mut reason)
            .unwrap();
        assert!(reason.contains("checksum"));
        assert!(spool
            .quarantine_dir()
            .join(format!("acme-{id}.msg"))
            .exists());
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn recovery_spares_a_live_submission_and_removes_abandoned_files() {
        let spool = temp_spool("recovery");
        let mut live = spool.begin_submission().unwrap();
        live.write_all(b"still being written").unwrap();
        live.flush().unwrap();
        // A dead submitter's leftovers: no lock held on them.
        let dead = spool.tmp_dir().join("0000DEAD.msg");
        fs::write(&dead, b"partial").unwrap();
        fs::create_dir_all(spool.tenant_dir("acme")).unwrap();
        let orphan = spool.tenant_dir("acme").join("0000BEEF.msg");
        fs::write(&orphan, b"orphan").unwrap();

        assert_eq!(spool.remove_abandoned().unwrap(), 2);
        assert_eq!(
            list_dir(&spool.tmp_dir()).unwrap().len(),
            1,
            "the live submission is kept"
        );
        let id = live
            .commit("acme", "a@acme.example", &["b@x.example".into()])
            .unwrap();
        assert_eq!(spool.message_ids("acme").unwrap(), vec![id]);
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn strays_are_listed_and_quarantined_with_their_reason() {
        let spool = temp_spool("strays");
        let mut sub = spool.begin_submission().unwrap();
        sub.write_all(b"x\r\n").unwrap();
        let id = sub
            .commit("acme-eu", "a@acme.example", &["b@x.example".into()])
            .unwrap();
        let junk = spool.tenant_dir("acme-eu").join("core-dump.1");
        fs::write(&junk, b"garbage").unwrap();

        assert_eq!(spool.stray_files("acme-eu").unwrap(), vec![junk.clone()]);
        spool
            .quarantine_stray("acme-eu", &junk, "not a spool file")
            .unwrap();
        spool
            .quarantine("acme-eu", &id, "checksum mismatch")
            .unwrap();
        let listed: Vec<(String, String)> = spool
            .quarantined()
            .unwrap()
            .into_iter()
            .map(|q| (q.tenant, q.id))
            .collect();
        assert!(
            listed.contains(&("acme-eu".into(), "stray.core-dump.1".into())),
            "{listed:?}"
        );
        assert!(
            listed.contains(&("acme-eu".into(), id.to_string())),
            "{listed:?}"
        );
        let _ = fs::remove_dir_all(spool.root());
    }

    #[test]
    fn message_ids_are_unique_and_safe() {
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert!(MessageId::parse(&a.to_string()).is_some());
        assert!(MessageId::parse("../etc").is_none());
    }
}
