//! A LazyFS-style FUSE filesystem that can lose every write not yet
//! fsynced, as a real power failure would.
//!
//! Why: `kill -9` of a process never loses the OS page cache, so a build
//! that forgets an fsync (or fsyncs the wrong file, or renames before the
//! data is durable) passes every crash test. Mount a [`LazyFs`] over a
//! backing directory, run the processes with their data under the mount,
//! kill them, call [`LazyFs::power_cut`], restart them on the same mount:
//! they see only what was fsynced.
//!
//! Semantics (a deliberate model, simpler than a real disk):
//! - Passthrough: every path under the mount is the same path under the
//!   backing directory. Inodes are tracked by `O_PATH` descriptors of the
//!   backing files (as libfuse's `passthrough_ll` does), so a rename never
//!   loses track of a file and its unsynced data.
//! - Metadata is durable at once: create, mkdir, mknod, symlink, link,
//!   unlink, rmdir, rename, chmod/chown/utimes, truncate and fallocate go
//!   straight to the backing directory and survive a cut. A real file
//!   system may lose a fresh directory entry until the directory is
//!   fsynced; modelling that is future work, so `fsyncdir` only fsyncs.
//! - File data is lazy: a write is kept in memory per inode as dirty
//!   extents ([`DirtyExtents`]) and never reaches the backing file until
//!   fsync or fdatasync on that file (any descriptor of it, as in Linux)
//!   writes the extents and fsyncs the backing file. Files opened with
//!   `O_SYNC`/`O_DSYNC` sync after every write. Close (`flush`/`release`)
//!   is not durability and syncs nothing.
//! - So write-then-rename without an fsync of the data leaves the new name
//!   empty after a cut: stricter than ext4's `auto_da_alloc` heuristic, on
//!   purpose, as that heuristic is no guarantee.
//! - Reads see the backing data overlaid with the dirty extents; sizes are
//!   max(backing size, end of the dirty extents); a gap between the backing
//!   end and a dirty extent reads as zeros (a hole). Truncate cuts the dirty
//!   extents and truncates the backing file.
//! - fallocate: plain and `KEEP_SIZE` allocation (RocksDB preallocates its
//!   WAL and SST files so) change no data and go to the backing file;
//!   punching or zeroing ranges answers `EOPNOTSUPP`. No xattrs (`ENOSYS`).
//! - [`LazyFs::power_cut`] forgets every dirty extent of every file. Kill
//!   the processes using the mount first: a process still writing during
//!   the cut just keeps writing to the "rebooted" disk.
//!
//! The kernel must not serve forgotten data from its caches afterwards:
//! no writeback cache is negotiated (writes reach us synchronously), opens
//! never set `keep_cache` (each open drops the inode's page cache), the
//! entry and attribute TTLs are zero (sizes are asked for every time), and
//! the cut tells the kernel to drop the cached pages and attributes of
//! every file it touched. The page cache stays on otherwise, so `mmap`
//! works. POSIX locks (`fcntl(F_SETLK)`, RocksDB's LOCK file) and `flock`
//! are left to the kernel: fuser does not ask for `FUSE_POSIX_LOCKS`, so
//! the kernel keeps them locally, which is right for one machine.
//!
//! Mounting needs root (mount(2) on `/dev/fuse`; no libfuse, no
//! `fusermount`). Nothing from the kernel may panic the server: every
//! failure is an errno, and unexpected ones are logged on stderr with a
//! `lazyfs:` prefix.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow,
    WriteFlags,
};

/// Largest file end we accept: the kernel's `loff_t` is signed.
pub const MAX_FILE_END: u64 = i64::MAX as u64;

/// Entry and attribute TTL: zero, so the kernel asks for sizes every time
/// and never trusts a size from before a cut.
const TTL: Duration = Duration::ZERO;

// ------------------------------------------------------------ extents ----

/// A write that would end past [`MAX_FILE_END`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentOverflow;

impl std::fmt::Display for ExtentOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "write ends past the largest file offset")
    }
}

impl std::error::Error for ExtentOverflow {}

/// The unsynced data of one file: non-empty extents, sorted, neither
/// overlapping nor touching (touching ones are merged, so an append stream
/// is one growing buffer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyExtents {
    map: BTreeMap<u64, Vec<u8>>,
}

impl DirtyExtents {
    pub fn new() -> DirtyExtents {
        DirtyExtents::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Dirty bytes (what a cut would lose).
    pub fn bytes(&self) -> u64 {
        self.map.values().map(|b| b.len() as u64).sum()
    }

    /// End of the last extent, 0 if none: the file is at least this long.
    pub fn end(&self) -> u64 {
        self.map.iter().next_back().map_or(0, |(&s, b)| s + b.len() as u64)
    }

    /// The extents, in offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(&s, b)| (s, b.as_slice()))
    }

    /// Records a write of `data` at `offset`; newer bytes win.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> Result<(), ExtentOverflow> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= MAX_FILE_END).ok_or(ExtentOverflow)?;
        // The extent starting at or before `offset` that reaches it (touching
        // counts) becomes the merged one, so appends grow a buffer in place.
        let first = match self.map.range(..=offset).next_back() {
            Some((&s, b)) if s + b.len() as u64 >= offset => Some(s),
            _ => None,
        };
        let (start, mut buf) = match first.and_then(|s| self.map.remove_entry(&s)) {
            Some(e) => e,
            None => (offset, Vec::with_capacity(data.len())),
        };
        // Extents starting inside [offset, end] are swallowed; only the last
        // can reach past `end`, and its tail is kept.
        let later: Vec<u64> = self.map.range(offset..=end).map(|(&s, _)| s).collect();
        let mut tail = None;
        for s in later {
            if let Some(b) = self.map.remove(&s) {
                if s + b.len() as u64 > end {
                    tail = Some((s, b));
                }
            }
        }
        let rel = (offset - start) as usize;
        if buf.len() < rel + data.len() {
            buf.resize(rel + data.len(), 0);
        }
        buf[rel..rel + data.len()].copy_from_slice(data);
        if let Some((s, b)) = tail {
            // `buf` ends exactly at `end` here: the first extent ended before `s`.
            buf.extend_from_slice(&b[(end - s) as usize..]);
        }
        self.map.insert(start, buf);
        Ok(())
    }

    /// Copies the dirty bytes that fall in `[offset, offset + buf.len())`
    /// over `buf` (which holds what the backing file has there).
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let Some(end) = offset.checked_add(buf.len() as u64) else { return };
        if buf.is_empty() {
            return;
        }
        let before = self.map.range(..offset).next_back();
        for (&s, b) in before.into_iter().chain(self.map.range(offset..end)) {
            let e = s + b.len() as u64;
            let (lo, hi) = (s.max(offset), e.min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&b[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// Forgets every dirty byte at or past `size` (the file was truncated).
    pub fn truncate(&mut self, size: u64) {
        let _gone = self.map.split_off(&size);
        if let Some((&s, b)) = self.map.iter_mut().next_back() {
            if s + b.len() as u64 > size {
                b.truncate((size - s) as usize);
            }
        }
    }

    /// Forgets everything (after a sync wrote it, or on a power cut).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

// --------------------------------------------------------------- mount ----

/// What a power cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CutStats {
    /// Unsynced bytes forgotten.
    pub bytes: u64,
    /// Files that had unsynced bytes.
    pub files: u64,
}

/// A mounted lazy filesystem. Dropping it unmounts (lazily, if a process
/// still has files open under it).
pub struct LazyFs {
    shared: Arc<Shared>,
    notifier: Notifier,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    /// The mount's device (st_dev): tells our mount from what lies below.
    dev: Option<u64>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("backing", &self.shared.backing)
            .field("mountpoint", &self.mountpoint)
            .field("dirty_bytes", &self.dirty_bytes())
            .finish()
    }
}

impl LazyFs {
    /// Mounts a lazy view of `backing` on `mountpoint` (both existing
    /// directories), served by background threads. Needs root.
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<LazyFs> {
        let backing = backing.canonicalize().with_context(|| format!("backing dir {}", backing.display()))?;
        let mountpoint = mountpoint.canonicalize().with_context(|| format!("mountpoint {}", mountpoint.display()))?;
        let root = open_path(&backing, libc::O_DIRECTORY).with_context(|| format!("open {}", backing.display()))?;
        let st = fstat(root.as_raw_fd())?;
        let shared = Arc::new(Shared::new(backing.clone(), root, &st));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::DefaultPermissions];
        // allow_other: processes of any user may use the mount; with
        // default_permissions the kernel checks modes as on a plain disk.
        config.acl = SessionACL::All;
        // Several server threads: one fsync of a large file must not stall
        // every other request.
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(Ops(shared.clone()), &mountpoint, &config)
            .with_context(|| format!("mount lazyfs over {} on {}", backing.display(), mountpoint.display()))?;
        let notifier = session.notifier();
        let dev = std::fs::metadata(&mountpoint).ok().map(|m| m.dev());
        Ok(LazyFs { shared, notifier, session: Some(session), mountpoint, dev })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.shared.backing
    }

    /// Unsynced bytes held in memory over all files.
    pub fn dirty_bytes(&self) -> u64 {
        self.shared.nodes().iter().map(|(_, n)| lock(&n.data).dirty.bytes()).sum()
    }

    /// Simulates a power failure: every unsynced byte of every file is
    /// forgotten, and the kernel is told to drop what it cached of those
    /// files. Kill the processes using the mount first.
    pub fn power_cut(&self) -> CutStats {
        let mut stats = CutStats::default();
        let mut touched = Vec::new();
        for (ino, node) in self.shared.nodes() {
            let mut data = lock(&node.data);
            if !data.dirty.is_empty() {
                stats.bytes += data.dirty.bytes();
                stats.files += 1;
                data.dirty.clear();
                data.written_at = None;
                touched.push(ino);
            }
        }
        self.shared.drop_unreferenced();
        for ino in touched {
            // Offset 0, length 0: every cached page and the attributes. ENOENT
            // just means the kernel holds nothing of that inode.
            if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    eprintln!("lazyfs: power cut: invalidating inode {ino} in the kernel: {e}");
                }
            }
        }
        stats
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else { return };
        // Keep only the server thread. Dropping the rest is fuser's plain
        // unmount: it ends the connection, so the server threads end, unless
        // a process still has files open under the mount (EBUSY).
        let guard: JoinHandle<io::Result<()>> = {
            let session = session;
            session.guard
        };
        // Still ours at the mountpoint (same device; or a dead connection)?
        // Then detach: the mount leaves the tree now and the connection
        // lives until the last file is closed. Checking the device first
        // keeps us from unmounting whatever lies below.
        let ours = match (std::fs::metadata(&self.mountpoint), self.dev) {
            (Ok(m), Some(dev)) => m.dev() == dev,
            (Ok(_), None) => false,
            (Err(_), _) => true,
        };
        let mut wait = Duration::from_secs(5);
        if ours {
            if let Ok(path) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
                if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                    eprintln!("lazyfs: lazy unmount of {}: {}", self.mountpoint.display(), io::Error::last_os_error());
                }
            }
            if !wait_finished(&guard, Duration::from_millis(500)) {
                // Files are still open: abort the connection if fusectl is
                // mounted (their operations then fail with ENOTCONN), else
                // leave the thread serving the detached mount until they
                // are closed.
                wait = Duration::ZERO;
                if let Some(dev) = self.dev {
                    // The kernel's dev_t (major << 20 | minor) names the connection.
                    let conn = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
                    let abort = format!("/sys/fs/fuse/connections/{conn}/abort");
                    if Path::new(&abort).exists() && std::fs::write(&abort, "1").is_ok() {
                        wait = Duration::from_secs(2);
                    }
                }
            }
        }
        if wait_finished(&guard, wait) {
            match guard.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("lazyfs: server of {} ended with: {e}", self.mountpoint.display()),
                Err(_) => eprintln!("lazyfs: server of {} panicked", self.mountpoint.display()),
            }
        } else {
            eprintln!(
                "lazyfs: {} detached; files still open under it, its server ends when they are closed",
                self.mountpoint.display()
            );
        }
    }
}

fn wait_finished<T>(guard: &JoinHandle<T>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !guard.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

// --------------------------------------------------------------- state ----

/// One backing inode we told the kernel about.
struct Node {
    /// `O_PATH` descriptor of the backing file: follows it across renames
    /// and keeps its inode number from being reused while we track it.
    fd: OwnedFd,
    key: (u64, u64),
    kind: FileType,
    data: Mutex<FileData>,
}

#[derive(Default)]
struct FileData {
    dirty: DirtyExtents,
    /// Time of the last unsynced write: the mtime the file would have.
    written_at: Option<SystemTime>,
}

struct Table {
    /// FUSE inode number -> node and the kernel's lookup count.
    nodes: HashMap<u64, (Arc<Node>, u64)>,
    /// (st_dev, st_ino) of the backing file -> FUSE inode number.
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
}

struct OpenFile {
    file: File,
    /// Opened for writing: fsync can write the dirty extents through it.
    writable: bool,
}

struct Shared {
    backing: PathBuf,
    table: Mutex<Table>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
}

struct DirEntry {
    name: OsString,
    kind: FileType,
    ino: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type Res<T> = Result<T, Errno>;

/// The errno for `e`, logged unless it is one a normal program meets
/// (a missing file, an existing name, a non-empty directory).
fn fail(op: &str, e: io::Error) -> Errno {
    let code = e.raw_os_error();
    if !matches!(code, Some(libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY)) {
        eprintln!("lazyfs: {op}: {e}");
    }
    match code {
        Some(c) if c > 0 => Errno::from_i32(c),
        _ => Errno::EIO,
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cname(name: &OsStr) -> Res<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

fn open_path(path: &Path, extra: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the file an `O_PATH` descriptor refers to, for real I/O.
fn reopen(fd: RawFd, flags: libc::c_int) -> io::Result<File> {
    let fd = cvt(unsafe { libc::open(proc_path(fd).as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn kind_of(mode: libc::mode_t) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nsecs = nsecs.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        // Checked: a corrupt timestamp must not panic the server.
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nsecs)).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(Duration::new(secs.unsigned_abs(), 0)).unwrap_or(UNIX_EPOCH) + Duration::new(0, nsecs)
    }
}

fn attr_of(ino: u64, st: &libc::stat, data: &FileData) -> FileAttr {
    let size = (st.st_size.max(0) as u64).max(data.dirty.end());
    let mtime = time(st.st_mtime, st.st_mtime_nsec);
    let mtime = data.written_at.map_or(mtime, |w| w.max(mtime));
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: (st.st_blocks.max(0) as u64).max(size.div_ceil(512)),
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime,
        ctime: time(st.st_ctime, st.st_ctime_nsec).max(data.written_at.unwrap_or(UNIX_EPOCH)),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// `open` flags for the backing file: only the access mode (the kernel
/// already handled creation; `O_APPEND` would make pwrite ignore offsets;
/// sync flags are ours to honour).
fn backing_flags(flags: i32) -> (libc::c_int, bool) {
    match flags & libc::O_ACCMODE {
        // Read access too: the kernel may read through a write-only handle
        // (e.g. a shared mmap); as root we may.
        libc::O_WRONLY | libc::O_RDWR => (libc::O_RDWR, true),
        _ => (libc::O_RDONLY, false),
    }
}

/// Sync after each write, and how: `Some(true)` fdatasync (`O_DSYNC`),
/// `Some(false)` fsync (`O_SYNC`).
fn sync_mode(flags: i32) -> Option<bool> {
    if flags & libc::O_SYNC == libc::O_SYNC {
        Some(false)
    } else if flags & libc::O_DSYNC != 0 {
        Some(true)
    } else {
        None
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long },
            Err(e) => {
                let d = e.duration();
                // Before the epoch: whole seconds down, positive nanoseconds.
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                libc::timespec { tv_sec: s as libc::time_t, tv_nsec: ns as libc::c_long }
            }
        },
    }
}

impl Shared {
    fn new(backing: PathBuf, root: OwnedFd, st: &libc::stat) -> Shared {
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(Node { fd: root, key, kind: FileType::Directory, data: Mutex::default() });
        let table = Table {
            // The root is never forgotten: its count starts huge.
            nodes: HashMap::from([(INodeNo::ROOT.0, (root, u64::MAX / 2))]),
            by_key: HashMap::from([(key, INodeNo::ROOT.0)]),
            next_ino: INodeNo::ROOT.0 + 1,
        };
        Shared {
            backing,
            table: Mutex::new(table),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
        }
    }

    fn nodes(&self) -> Vec<(u64, Arc<Node>)> {
        lock(&self.table).nodes.iter().map(|(&ino, (n, _))| (ino, n.clone())).collect()
    }

    fn node(&self, ino: INodeNo) -> Res<Arc<Node>> {
        match lock(&self.table).nodes.get(&ino.0) {
            Some((n, _)) => Ok(n.clone()),
            None => {
                eprintln!("lazyfs: the kernel asked for unknown inode {}", ino.0);
                Err(Errno::ESTALE)
            }
        }
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<OpenFile>> {
        match lock(&self.files).get(&fh.0) {
            Some(f) => Ok(f.clone()),
            None => {
                eprintln!("lazyfs: the kernel used unknown file handle {}", fh.0);
                Err(Errno::EBADF)
            }
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> Res<FileAttr> {
        let data = lock(&node.data);
        let st = fstat(node.fd.as_raw_fd()).map_err(|e| fail("getattr", e))?;
        Ok(attr_of(ino, &st, &data))
    }

    /// Registers one more kernel reference to the file behind `fd` (an
    /// `O_PATH` descriptor) and returns its entry.
    fn remember(&self, fd: OwnedFd) -> Res<FileAttr> {
        let st = fstat(fd.as_raw_fd()).map_err(|e| fail("lookup: fstat", e))?;
        let key = (st.st_dev, st.st_ino);
        let (ino, node) = {
            let mut t = lock(&self.table);
            let existing = t.by_key.get(&key).copied();
            match existing.and_then(|ino| t.nodes.get_mut(&ino).map(|e| (ino, e))) {
                Some((ino, (node, nlookup))) => {
                    *nlookup += 1;
                    (ino, node.clone())
                }
                None => {
                    let ino = t.next_ino;
                    t.next_ino += 1;
                    let node = Arc::new(Node { fd, key, kind: kind_of(st.st_mode), data: Mutex::default() });
                    t.nodes.insert(ino, (node.clone(), 1));
                    t.by_key.insert(key, ino);
                    (ino, node)
                }
            }
        };
        let data = lock(&node.data);
        Ok(attr_of(ino, &st, &data))
    }

    fn lookup(&self, parent: INodeNo, name: &OsStr) -> Res<FileAttr> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let fd = cvt(unsafe {
            libc::openat(p.fd.as_raw_fd(), c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        })
        .map_err(|e| fail("lookup", e))?;
        self.remember(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn forget(&self, ino: INodeNo, n: u64) {
        let mut t = lock(&self.table);
        let Some((node, nlookup)) = t.nodes.get_mut(&ino.0) else { return };
        *nlookup = nlookup.saturating_sub(n);
        if *nlookup > 0 {
            return;
        }
        // Unsynced data of a file that still has a name outlives the
        // kernel's interest in it: a later lookup must find it again.
        let dirty = !lock(&node.data).dirty.is_empty();
        let linked = fstat(node.fd.as_raw_fd()).is_ok_and(|st| st.st_nlink > 0);
        if !(dirty && linked) {
            let key = node.key;
            t.nodes.remove(&ino.0);
            t.by_key.remove(&key);
        }
    }

    /// After a cut: nodes kept only for their (now forgotten) data go.
    fn drop_unreferenced(&self) {
        let mut t = lock(&self.table);
        let gone: Vec<(u64, (u64, u64))> = t
            .nodes
            .iter()
            .filter(|(_, (n, nlookup))| *nlookup == 0 && lock(&n.data).dirty.is_empty())
            .map(|(&ino, (n, _))| (ino, n.key))
            .collect();
        for (ino, key) in gone {
            t.nodes.remove(&ino);
            t.by_key.remove(&key);
        }
    }

    fn add_file(&self, file: File, writable: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(OpenFile { file, writable }));
        fh
    }

    /// Gives a freshly created backing entry the exact mode asked for (our
    /// own umask must not apply twice) and the caller's ownership.
    fn own(&self, req: &Request, dir: RawFd, name: &CString, mode: u32, symlink: bool) {
        if !symlink {
            let rc = unsafe { libc::fchmodat(dir, name.as_ptr(), (mode & 0o7777) as libc::mode_t, 0) };
            if let Err(e) = cvt(rc) {
                eprintln!("lazyfs: chmod of new {name:?}: {e}");
            }
        }
        if req.uid() != 0 || req.gid() != 0 {
            let rc = unsafe { libc::fchownat(dir, name.as_ptr(), req.uid(), req.gid(), libc::AT_SYMLINK_NOFOLLOW) };
            if let Err(e) = cvt(rc) {
                eprintln!("lazyfs: chown of new {name:?}: {e}");
            }
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, flags: i32) -> Res<(FileAttr, u64)> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let (acc, writable) = backing_flags(flags);
        let oflags = acc | libc::O_CREAT | (flags & libc::O_EXCL) | libc::O_CLOEXEC;
        let fd = cvt(unsafe { libc::openat(p.fd.as_raw_fd(), c.as_ptr(), oflags, (mode & 0o7777) as libc::c_uint) })
            .map_err(|e| fail("create", e))?;
        let file = unsafe { File::from_raw_fd(fd) };
        self.own(req, p.fd.as_raw_fd(), &c, mode, false);
        // The O_PATH descriptor of exactly the file created, not whatever
        // the name points at by now.
        let path_fd = cvt(unsafe { libc::open(proc_path(fd).as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })
            .map_err(|e| fail("create: O_PATH", e))?;
        let attr = self.remember(unsafe { OwnedFd::from_raw_fd(path_fd) })?;
        Ok((attr, self.add_file(file, writable)))
    }

    fn open(&self, ino: INodeNo, flags: i32) -> Res<u64> {
        let node = self.node(ino)?;
        let (acc, writable) = backing_flags(flags);
        let (file, writable) = match reopen(node.fd.as_raw_fd(), acc) {
            Ok(f) => (f, writable),
            // Read access was only a convenience for write-only opens.
            Err(_) if writable && flags & libc::O_ACCMODE == libc::O_WRONLY => {
                (reopen(node.fd.as_raw_fd(), libc::O_WRONLY).map_err(|e| fail("open", e))?, true)
            }
            Err(e) => return Err(fail("open", e)),
        };
        if flags & libc::O_TRUNC != 0 && writable {
            // The kernel sends a setattr for O_TRUNC too; doing it here
            // as well keeps the dirty data right whatever it negotiated.
            let mut data = lock(&node.data);
            data.dirty.clear();
            file.set_len(0).map_err(|e| fail("open: O_TRUNC", e))?;
        }
        Ok(self.add_file(file, writable))
    }

    fn read(&self, ino: INodeNo, fh: FileHandle, offset: u64, size: u32) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        let f = self.file(fh)?;
        // Held across the backing read: a concurrent fsync moves bytes from
        // the extents to the backing file atomically for us.
        let data = lock(&node.data);
        let mut buf = vec![0u8; size as usize];
        let n = read_full_at(&f.file, &mut buf, offset).map_err(|e| fail("read", e))?;
        let window_end = offset.saturating_add(u64::from(size));
        let end = (offset + n as u64).max(data.dirty.end().min(window_end));
        buf.truncate((end - offset) as usize);
        data.dirty.overlay(offset, &mut buf);
        Ok(buf)
    }

    fn write(&self, ino: INodeNo, fh: FileHandle, offset: u64, bytes: &[u8], flags: i32) -> Res<u32> {
        let node = self.node(ino)?;
        let len = u32::try_from(bytes.len()).map_err(|_| Errno::EINVAL)?;
        {
            let mut data = lock(&node.data);
            data.dirty.insert(offset, bytes).map_err(|_| Errno::EFBIG)?;
            data.written_at = Some(SystemTime::now());
        }
        if let Some(datasync) = sync_mode(flags) {
            let f = self.file(fh)?;
            self.sync(&node, &f, datasync)?;
        }
        Ok(len)
    }

    /// fsync/fdatasync: the dirty extents go to the backing file, which is
    /// synced, and only then are they forgotten.
    fn sync(&self, node: &Node, f: &OpenFile, datasync: bool) -> Res<()> {
        let mut data = lock(&node.data);
        let own;
        let target = if data.dirty.is_empty() || f.writable {
            &f.file
        } else {
            // fsync through a read-only descriptor syncs others' writes too.
            own = reopen(node.fd.as_raw_fd(), libc::O_WRONLY).map_err(|e| fail("fsync: open for writing", e))?;
            &own
        };
        for (off, bytes) in data.dirty.iter() {
            target.write_all_at(bytes, off).map_err(|e| fail("fsync: write", e))?;
        }
        let res = if datasync { target.sync_data() } else { target.sync_all() };
        res.map_err(|e| fail("fsync", e))?;
        data.dirty.clear();
        data.written_at = None;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Res<FileAttr> {
        let node = self.node(ino)?;
        let fd = node.fd.as_raw_fd();
        let path = proc_path(fd);
        let symlink = node.kind == FileType::Symlink;
        if let Some(mode) = mode {
            if !symlink {
                cvt(unsafe { libc::chmod(path.as_ptr(), (mode & 0o7777) as libc::mode_t) })
                    .map_err(|e| fail("chmod", e))?;
            }
        }
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
            cvt(unsafe { libc::fchownat(fd, c"".as_ptr(), u, g, flags) }).map_err(|e| fail("chown", e))?;
        }
        if let Some(size) = size {
            let size_t = libc::off_t::try_from(size).map_err(|_| Errno::EFBIG)?;
            let mut data = lock(&node.data);
            data.dirty.truncate(size);
            cvt(unsafe { libc::truncate(path.as_ptr(), size_t) }).map_err(|e| fail("truncate", e))?;
        }
        if (atime.is_some() || mtime.is_some()) && !symlink {
            let times = [timespec(atime), timespec(mtime)];
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })
                .map_err(|e| fail("utimens", e))?;
            if mtime.is_some() {
                // An explicit mtime wins over the time of unsynced writes.
                lock(&node.data).written_at = None;
            }
        }
        self.attr(ino.0, &node)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32) -> Res<FileAttr> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let dir = p.fd.as_raw_fd();
        cvt(unsafe { libc::mkdirat(dir, c.as_ptr(), (mode & 0o7777) as libc::mode_t) })
            .map_err(|e| fail("mkdir", e))?;
        self.own(req, dir, &c, mode, false);
        self.lookup(parent, name)
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, rdev: u32) -> Res<FileAttr> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let dir = p.fd.as_raw_fd();
        cvt(unsafe { libc::mknodat(dir, c.as_ptr(), mode as libc::mode_t, libc::dev_t::from(rdev)) })
            .map_err(|e| fail("mknod", e))?;
        self.own(req, dir, &c, mode, false);
        self.lookup(parent, name)
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path) -> Res<FileAttr> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let t = cname(target.as_os_str())?;
        let dir = p.fd.as_raw_fd();
        cvt(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map_err(|e| fail("symlink", e))?;
        self.own(req, dir, &c, 0, true);
        self.lookup(parent, name)
    }

    fn link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Res<FileAttr> {
        let node = self.node(ino)?;
        let np = self.node(newparent)?;
        let c = cname(newname)?;
        let src = proc_path(node.fd.as_raw_fd());
        cvt(unsafe {
            libc::linkat(libc::AT_FDCWD, src.as_ptr(), np.fd.as_raw_fd(), c.as_ptr(), libc::AT_SYMLINK_FOLLOW)
        })
        .map_err(|e| fail("link", e))?;
        self.lookup(newparent, newname)
    }

    fn unlink(&self, parent: INodeNo, name: &OsStr, flags: libc::c_int) -> Res<()> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let op = if flags == 0 { "unlink" } else { "rmdir" };
        cvt(unsafe { libc::unlinkat(p.fd.as_raw_fd(), c.as_ptr(), flags) }).map_err(|e| fail(op, e))?;
        Ok(())
    }

    fn rename(&self, parent: INodeNo, name: &OsStr, np: INodeNo, newname: &OsStr, flags: RenameFlags) -> Res<()> {
        let (p, np) = (self.node(parent)?, self.node(np)?);
        let (c, nc) = (cname(name)?, cname(newname)?);
        let rc = unsafe { libc::renameat2(p.fd.as_raw_fd(), c.as_ptr(), np.fd.as_raw_fd(), nc.as_ptr(), flags.bits()) };
        cvt(rc).map_err(|e| fail("rename", e))?;
        Ok(())
    }

    fn readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        let n = unsafe { libc::readlinkat(node.fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(fail("readlink", io::Error::last_os_error()));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn opendir(&self, ino: INodeNo) -> Res<u64> {
        let node = self.node(ino)?;
        let fd = node.fd.as_raw_fd();
        let own = fstat(fd).map_err(|e| fail("opendir", e))?.st_ino;
        // A snapshot: offsets into it stay valid while the directory changes.
        let mut entries = vec![
            DirEntry { name: ".".into(), kind: FileType::Directory, ino: own },
            DirEntry { name: "..".into(), kind: FileType::Directory, ino: own },
        ];
        let path = PathBuf::from(OsString::from_vec(proc_path(fd).into_bytes()));
        for e in std::fs::read_dir(&path).map_err(|e| fail("opendir", e))? {
            let e = e.map_err(|e| fail("readdir", e))?;
            let kind =
                e.file_type().map_or(FileType::RegularFile, |t| FileType::from_std(t).unwrap_or(FileType::RegularFile));
            entries.push(DirEntry { name: e.file_name(), kind, ino: e.ino().max(1) });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    fn statfs(&self) -> Res<libc::statvfs> {
        let root = self.node(INodeNo::ROOT)?;
        let mut st = MaybeUninit::<libc::statvfs>::uninit();
        cvt(unsafe { libc::fstatvfs(root.fd.as_raw_fd(), st.as_mut_ptr()) }).map_err(|e| fail("statfs", e))?;
        Ok(unsafe { st.assume_init() })
    }

    fn fsyncdir(&self, ino: INodeNo, datasync: bool) -> Res<()> {
        let node = self.node(ino)?;
        let dir = reopen(node.fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| fail("fsyncdir", e))?;
        let res = if datasync { dir.sync_data() } else { dir.sync_all() };
        res.map_err(|e| fail("fsyncdir", e))
    }

    fn fallocate(&self, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Res<()> {
        // Plain allocation only (RocksDB preallocates with KEEP_SIZE): it
        // changes no data, so it is metadata and goes to the backing file.
        // Punching or zeroing would have to edit the dirty extents too.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let node = self.node(ino)?;
        let f = self.file(fh)?;
        let off = libc::off_t::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let len = libc::off_t::try_from(length).map_err(|_| Errno::EFBIG)?;
        let _data = lock(&node.data);
        cvt(unsafe { libc::fallocate(f.file.as_raw_fd(), mode, off, len) }).map_err(|e| fail("fallocate", e))?;
        Ok(())
    }

    fn access(&self, ino: INodeNo, mask: i32) -> Res<()> {
        let node = self.node(ino)?;
        let path = proc_path(node.fd.as_raw_fd());
        cvt(unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mask, 0) }).map_err(|e| fail("access", e))?;
        Ok(())
    }
}

// ----------------------------------------------------------- FUSE ops ----

/// The FUSE face of [`Shared`]: each call answers with a value or errno.
struct Ops(Arc<Shared>);

impl Filesystem for Ops {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.node(ino).and_then(|n| self.0.attr(ino.0, &n)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.0.setattr(ino, mode, uid, gid, size, atime, mtime) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.readlink(ino) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.0.mknod(req, parent, name, mode, rdev) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        match self.0.mkdir(req, parent, name, mode) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.unlink(parent, name, 0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.unlink(parent, name, libc::AT_REMOVEDIR) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        match self.0.symlink(req, parent, link_name, target) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.0.rename(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match self.0.link(ino, newparent, newname) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // No FOPEN_KEEP_CACHE: every open drops the inode's cached pages.
        match self.0.open(ino, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(ino, fh, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.write(ino, fh, offset, data, flags.0) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) is not durability: nothing to do.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The dirty extents belong to the inode and stay.
        lock(&self.0.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.0.node(ino).and_then(|n| self.0.file(fh).and_then(|f| self.0.sync(&n, &f, datasync))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = lock(&self.0.dirs).get(&fh.0).cloned() else {
            eprintln!("lazyfs: readdir of unknown directory handle {}", fh.0);
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            // The offset given with an entry is where the next call resumes.
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.0.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.0.fsyncdir(ino, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.0.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.0.access(ino, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.0.create(req, parent, name, mode, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.0.fallocate(ino, fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

// --------------------------------------------------------------- tests ----

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn render(d: &DirtyExtents, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        d.overlay(0, &mut buf);
        buf
    }

    fn extents(d: &DirtyExtents) -> Vec<(u64, Vec<u8>)> {
        d.iter().map(|(s, b)| (s, b.to_vec())).collect()
    }

    #[test]
    fn disjoint_writes_stay_apart() {
        let mut d = DirtyExtents::new();
        d.insert(10, b"abc").unwrap();
        d.insert(0, b"xy").unwrap();
        assert_eq!(extents(&d), vec![(0, b"xy".to_vec()), (10, b"abc".to_vec())]);
        assert_eq!((d.bytes(), d.end(), d.len()), (5, 13, 2));
    }

    #[test]
    fn touching_writes_merge_and_appends_grow_one_extent() {
        let mut d = DirtyExtents::new();
        d.insert(0, b"ab").unwrap();
        d.insert(2, b"cd").unwrap();
        d.insert(4, b"ef").unwrap();
        assert_eq!(extents(&d), vec![(0, b"abcdef".to_vec())]);
        // Touching at the front merges too.
        d.insert(10, b"zz").unwrap();
        d.insert(8, b"yy").unwrap();
        assert_eq!(extents(&d), vec![(0, b"abcdef".to_vec()), (8, b"yyzz".to_vec())]);
    }

    #[test]
    fn overlapping_writes_newest_wins() {
        let mut d = DirtyExtents::new();
        d.insert(0, b"aaaa").unwrap();
        d.insert(8, b"cccc").unwrap();
        // Spans the gap and both extents: one extent, new bytes in the middle.
        d.insert(2, b"BBBBBBBB").unwrap();
        assert_eq!(extents(&d), vec![(0, b"aaBBBBBBBBcc".to_vec())]);
        // Inside one extent.
        d.insert(1, b"x").unwrap();
        assert_eq!(extents(&d), vec![(0, b"axBBBBBBBBcc".to_vec())]);
        // Covering everything.
        d.insert(0, b"0123456789abcdef").unwrap();
        assert_eq!(extents(&d), vec![(0, b"0123456789abcdef".to_vec())]);
    }

    #[test]
    fn write_past_eof_leaves_a_hole_of_zeros() {
        let mut d = DirtyExtents::new();
        d.insert(100, b"end").unwrap();
        assert_eq!(d.end(), 103);
        // The backing file holds "base" at 0..4; the hole between reads as zeros.
        let mut buf = vec![0u8; 103];
        buf[..4].copy_from_slice(b"base");
        d.overlay(0, &mut buf);
        assert_eq!(&buf[..4], b"base");
        assert!(buf[4..100].iter().all(|&b| b == 0));
        assert_eq!(&buf[100..], b"end");
    }

    #[test]
    fn overlay_of_a_window() {
        let mut d = DirtyExtents::new();
        d.insert(2, b"abcd").unwrap();
        d.insert(10, b"wxyz").unwrap();
        let mut buf = *b"........";
        d.overlay(4, &mut buf);
        assert_eq!(&buf, b"cd....wx");
        let mut empty: [u8; 0] = [];
        d.overlay(3, &mut empty);
        let mut far = *b"..";
        d.overlay(MAX_FILE_END, &mut far);
        assert_eq!(&far, b"..");
    }

    #[test]
    fn truncate_cuts_and_drops() {
        let mut d = DirtyExtents::new();
        d.insert(0, b"hello").unwrap();
        d.insert(10, b"world").unwrap();
        d.truncate(12);
        assert_eq!(extents(&d), vec![(0, b"hello".to_vec()), (10, b"wo".to_vec())]);
        d.truncate(10);
        assert_eq!(extents(&d), vec![(0, b"hello".to_vec())]);
        d.truncate(3);
        assert_eq!(extents(&d), vec![(0, b"hel".to_vec())]);
        d.truncate(0);
        assert!(d.is_empty());
        assert_eq!(d.end(), 0);
    }

    #[test]
    fn truncate_then_write() {
        let mut d = DirtyExtents::new();
        d.insert(0, b"abcdef").unwrap();
        d.truncate(2);
        d.insert(4, b"XY").unwrap();
        // Bytes 2..4 were cut: they are whatever the backing file has (zeros here).
        assert_eq!(render(&d, 6), b"ab\0\0XY");
        assert_eq!(extents(&d), vec![(0, b"ab".to_vec()), (4, b"XY".to_vec())]);
    }

    #[test]
    fn overflow_is_refused_and_changes_nothing() {
        let mut d = DirtyExtents::new();
        d.insert(0, b"a").unwrap();
        assert_eq!(d.insert(MAX_FILE_END, b"x"), Err(ExtentOverflow));
        assert_eq!(d.insert(u64::MAX, b"x"), Err(ExtentOverflow));
        assert_eq!(extents(&d), vec![(0, b"a".to_vec())]);
        d.insert(MAX_FILE_END - 1, b"z").unwrap();
        assert_eq!(d.end(), MAX_FILE_END);
        d.insert(5, b"").unwrap();
        assert_eq!(d.len(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Truncate(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..96, proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..128).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        /// Against a byte-per-offset model: same bytes, same end, and the
        /// extents stay sorted, non-empty, non-overlapping, non-touching.
        #[test]
        fn extents_match_a_byte_model(ops in proptest::collection::vec(op(), 0..40)) {
            let mut d = DirtyExtents::new();
            let mut model: Vec<Option<u8>> = vec![None; 128];
            for op in &ops {
                match op {
                    Op::Write(o, data) => {
                        d.insert(*o, data).unwrap();
                        for (i, b) in data.iter().enumerate() {
                            model[*o as usize + i] = Some(*b);
                        }
                    }
                    Op::Truncate(s) => {
                        d.truncate(*s);
                        for m in &mut model[*s as usize..] {
                            *m = None;
                        }
                    }
                }
            }
            let want: Vec<u8> = model.iter().map(|m| m.unwrap_or(0)).collect();
            prop_assert_eq!(render(&d, 128), want);
            prop_assert_eq!(d.bytes(), model.iter().filter(|m| m.is_some()).count() as u64);
            prop_assert_eq!(d.end(), model.iter().rposition(|m| m.is_some()).map_or(0, |p| p as u64 + 1));
            let mut prev_end = None;
            for (s, b) in d.iter() {
                prop_assert!(!b.is_empty());
                if let Some(e) = prev_end {
                    prop_assert!(s > e, "extents at {} touch or overlap the one ending at {}", s, e);
                }
                prev_end = Some(s + b.len() as u64);
            }
            // Windows: overlay of any sub-range agrees with the whole.
            for start in [0u64, 7, 50, 100] {
                let mut w = vec![0u8; 20];
                d.overlay(start, &mut w);
                prop_assert_eq!(&w[..], &render(&d, 128)[start as usize..start as usize + 20]);
            }
        }
    }

    // ------------------------------------------------------ mount tests ----

    fn is_root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    struct Mounted {
        fs: Option<LazyFs>,
        backing: tempfile::TempDir,
        mnt: tempfile::TempDir,
    }

    fn mounted() -> Mounted {
        // Like the rest of the suite (nftables, namespaces): root or fail,
        // never a silent skip.
        assert!(is_root(), "the lazyfs mount tests need root (mount(2) on /dev/fuse)");
        let backing = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let fs = LazyFs::mount(backing.path(), mnt.path()).unwrap();
        Mounted { fs: Some(fs), backing, mnt }
    }

    impl Mounted {
        fn fs(&self) -> &LazyFs {
            self.fs.as_ref().unwrap()
        }
        fn m(&self, name: &str) -> PathBuf {
            self.mnt.path().join(name)
        }
        fn b(&self, name: &str) -> PathBuf {
            self.backing.path().join(name)
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            drop(self.fs.take());
        }
    }

    fn write_file(path: &Path, data: &[u8], sync: bool) {
        use std::io::Write;
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(data).unwrap();
        if sync {
            f.sync_all().unwrap();
        }
    }

    fn append(path: &Path, data: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn mount_power_cut_keeps_only_synced_data() {
        let t = mounted();
        write_file(&t.m("a"), b"synced", true);
        write_file(&t.m("b"), b"never synced", false);
        append(&t.m("a"), b" + lost tail");
        std::fs::create_dir(t.m("dir")).unwrap();
        write_file(&t.m("dir/c"), &vec![7u8; 300_000], false);

        // Through the mount everything is there; the backing dir has only
        // what was synced, but every name.
        assert_eq!(std::fs::read(t.m("a")).unwrap(), b"synced + lost tail");
        assert_eq!(std::fs::read(t.m("b")).unwrap(), b"never synced");
        assert_eq!(std::fs::metadata(t.m("b")).unwrap().len(), 12);
        assert_eq!(std::fs::read(t.b("a")).unwrap(), b"synced");
        assert_eq!(std::fs::read(t.b("b")).unwrap(), b"");
        assert_eq!(std::fs::read(t.b("dir/c")).unwrap(), b"");
        assert_eq!(t.fs().dirty_bytes(), 12 + 12 + 300_000);
        let mut names: Vec<_> =
            std::fs::read_dir(t.mnt.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "dir"]);

        // A descriptor open across the cut (the harness kills its owners
        // first, but the kernel must not serve old pages to it either).
        let held = std::fs::File::open(t.m("b")).unwrap();
        let stats = t.fs().power_cut();
        assert_eq!(stats, CutStats { bytes: 300_024, files: 3 });
        assert_eq!(t.fs().dirty_bytes(), 0);

        assert_eq!(std::fs::read(t.m("a")).unwrap(), b"synced");
        assert_eq!(std::fs::metadata(t.m("a")).unwrap().len(), 6);
        assert_eq!(std::fs::read(t.m("b")).unwrap(), b"");
        assert_eq!(std::fs::read(t.m("dir/c")).unwrap(), b"");
        let mut buf = [0u8; 32];
        assert_eq!(held.read_at(&mut buf, 0).unwrap(), 0, "a descriptor open across the cut reads old data");
        drop(held);
        assert_eq!(std::fs::read(t.b("a")).unwrap(), b"synced");
        assert_eq!(std::fs::read(t.b("b")).unwrap(), b"");
        assert_eq!(t.fs().power_cut(), CutStats::default());
    }

    #[test]
    fn mount_write_then_rename() {
        let t = mounted();
        // The safe pattern: data fsynced before the rename.
        write_file(&t.m("state.json.tmp"), b"{\"v\":1}", true);
        std::fs::rename(t.m("state.json.tmp"), t.m("state.json")).unwrap();
        // The unsafe one: rename without fsync.
        write_file(&t.m("other.json.tmp"), b"{\"v\":2}", false);
        std::fs::rename(t.m("other.json.tmp"), t.m("other.json")).unwrap();
        assert_eq!(std::fs::read(t.m("other.json")).unwrap(), b"{\"v\":2}");
        // A synced rewrite of an existing file after an unsynced one.
        write_file(&t.m("state.json.tmp"), b"{\"v\":3}", true);
        std::fs::rename(t.m("state.json.tmp"), t.m("state.json")).unwrap();

        t.fs().power_cut();
        assert_eq!(std::fs::read(t.m("state.json")).unwrap(), b"{\"v\":3}");
        assert_eq!(std::fs::read(t.m("other.json")).unwrap(), b"", "metadata is durable, data was not synced");
        assert!(!t.m("state.json.tmp").exists());
        assert_eq!(std::fs::read(t.b("state.json")).unwrap(), b"{\"v\":3}");
    }

    #[test]
    fn mount_sync_flags_truncate_holes_and_fdatasync() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let t = mounted();
        // O_DSYNC: every write is durable.
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(t.m("wal"))
            .unwrap();
        f.write_all(b"rec1").unwrap();
        f.write_all(b"rec2").unwrap();
        drop(f);
        // A hole, then fdatasync of only part of the story.
        let f = std::fs::OpenOptions::new().create_new(true).read(true).write(true).open(t.m("sparse")).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 4096).unwrap();
        let mut buf = vec![1u8; 4100];
        assert_eq!(read_full_at(&f, &mut buf, 0).unwrap(), 4100);
        assert!(buf[4..4096].iter().all(|&b| b == 0));
        f.sync_data().unwrap();
        f.write_all_at(b"more", 8192).unwrap();
        // Truncate drops dirty bytes beyond the new size and is durable.
        f.set_len(6000).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 6000);
        drop(f);
        let cut = t.fs().power_cut();
        assert_eq!(cut, CutStats::default(), "nothing unsynced should have been left");
        assert_eq!(std::fs::read(t.m("wal")).unwrap(), b"rec1rec2");
        let sparse = std::fs::read(t.m("sparse")).unwrap();
        assert_eq!(sparse.len(), 6000);
        assert_eq!(&sparse[..4], b"head");
        assert_eq!(&sparse[4096..4100], b"tail");

        // Unsynced growth, truncated back below the backing size.
        append(&t.m("wal"), b"rec3");
        std::fs::OpenOptions::new().write(true).open(t.m("wal")).unwrap().set_len(6).unwrap();
        assert_eq!(std::fs::read(t.m("wal")).unwrap(), b"rec1re");
        assert_eq!(t.fs().power_cut(), CutStats::default());
        assert_eq!(std::fs::read(t.m("wal")).unwrap(), b"rec1re");
    }

    #[test]
    fn mount_metadata_ops_and_locks() {
        use std::os::unix::fs::PermissionsExt;
        let t = mounted();
        std::fs::create_dir_all(t.m("x/y")).unwrap();
        write_file(&t.m("x/y/f"), b"data", true);
        std::fs::hard_link(t.m("x/y/f"), t.m("x/link")).unwrap();
        std::os::unix::fs::symlink("y/f", t.m("x/sym")).unwrap();
        assert_eq!(std::fs::read(t.m("x/sym")).unwrap(), b"data");
        assert_eq!(std::fs::read_link(t.m("x/sym")).unwrap(), Path::new("y/f"));
        std::fs::set_permissions(t.m("x/y/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(std::fs::metadata(t.b("x/link")).unwrap().permissions().mode() & 0o777, 0o600);
        // Unsynced data written through one name is seen through the other.
        append(&t.m("x/link"), b"+more");
        assert_eq!(std::fs::read(t.m("x/y/f")).unwrap(), b"data+more");
        std::fs::remove_file(t.m("x/link")).unwrap();
        std::fs::remove_file(t.m("x/sym")).unwrap();
        assert!(std::fs::remove_dir(t.m("x/y")).is_err());
        std::fs::rename(t.m("x/y/f"), t.m("f")).unwrap();
        std::fs::remove_dir(t.m("x/y")).unwrap();
        assert_eq!(std::fs::read(t.m("f")).unwrap(), b"data+more");
        assert!(t.b("f").exists() && !t.b("x/y").exists());

        // fcntl locks are the kernel's: a second open file description of
        // the same file conflicts with an exclusive lock.
        let a = std::fs::OpenOptions::new().read(true).write(true).open(t.m("f")).unwrap();
        let b = std::fs::OpenOptions::new().read(true).write(true).open(t.m("f")).unwrap();
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        assert_eq!(unsafe { libc::fcntl(a.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0);
        assert_eq!(unsafe { libc::fcntl(b.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, -1);
        // fallocate with KEEP_SIZE (RocksDB's preallocation) works; punching does not.
        assert_eq!(unsafe { libc::fallocate(a.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20) }, 0);
        assert_eq!(std::fs::read(t.m("f")).unwrap(), b"data+more");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(unsafe { libc::fallocate(a.as_raw_fd(), punch, 0, 2) }, -1);
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatvfs(a.as_raw_fd(), &mut sv) }, 0);
        assert!(sv.f_blocks > 0);
        drop((a, b));
        assert_eq!(t.fs().power_cut(), CutStats { bytes: 5, files: 1 });
        assert_eq!(std::fs::read(t.m("f")).unwrap(), b"data");
    }

    #[test]
    fn mount_mmap_reads_dirty_data_and_msync_makes_it_durable() {
        let t = mounted();
        write_file(&t.m("m"), b"0123456789", false);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(t.m("m")).unwrap();
        let len = 10;
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        let map = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
        assert_eq!(&map[..], b"0123456789");
        map[0] = b'X';
        assert_eq!(unsafe { libc::msync(p, len, libc::MS_SYNC) }, 0);
        assert_eq!(unsafe { libc::munmap(p, len) }, 0);
        drop(f);
        assert_eq!(t.fs().power_cut(), CutStats::default());
        assert_eq!(std::fs::read(t.m("m")).unwrap(), b"X123456789");
    }

    #[test]
    fn drop_with_a_file_open_does_not_hang() {
        let mut t = mounted();
        write_file(&t.m("open"), b"x", true);
        let f = std::fs::File::open(t.m("open")).unwrap();
        let started = Instant::now();
        drop(t.fs.take());
        assert!(started.elapsed() < Duration::from_secs(10));
        // The mount is gone from the tree even though `f` is open.
        assert!(!t.m("open").exists());
        drop(f);
    }
}
