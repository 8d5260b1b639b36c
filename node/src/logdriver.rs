//! The containers' log writer: a containerd `binary://` logging driver that
//! writes the Kubernetes CRI log format with size-based rotation, so that
//! `kubectl logs` (see `podlogs.rs`, the reader) works as with the kubelet.
//!
//! How containerd 1.6 runs it (runtime/v2/logging, pkg/process/io.go): for
//! a task whose stdout URI is `binary:///path/to/bin?k1=v1&k2=v2`, the
//! shim starts `/path/to/bin k1 v1 k2 v2` with env CONTAINER_ID and
//! CONTAINER_NAMESPACE, the read ends of the container's stdout and stderr
//! pipes as fds 3 and 4, and the write end of a "ready" pipe as fd 5; it
//! blocks starting the container until that pipe is written to or closed.
//! On task deletion it closes its pipe ends, sends SIGTERM, and kills the
//! driver if it is still there 12 s later.
//!
//! The query arguments reach argv in Go map order, i.e. shuffled, so a
//! URI with several keys cannot carry a subcommand and its flags. [`log_uri`]
//! therefore uses one key, the subcommand, whose value is the whole
//! configuration as JSON: argv is exactly
//! `capstan-node log-driver '{"path":...,"max_size":...,"max_files":...}'`.
//! (For people, `capstan-node log-driver --path P --max-size N --max-files N`
//! does the same.)
//!
//! Layout: pure [`format_entry`], [`LineSplitter`] (lines, and partial
//! lines cut at `max_line`), [`needs_rotation`], [`rotated_path`] /
//! [`expired`] (which old files to delete), [`log_files`]; the thin shell
//! [`LogWriter`] (file + rotation) and [`run`] (threads on fds 3/4, the
//! ready pipe, SIGTERM).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// containerd's CRI plugin cuts lines at 16 KiB too (max_container_log_line_size).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;
/// The kubelet's defaults (containerLogMaxSize 10Mi, containerLogMaxFiles 5).
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_FILES: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogDriverConfig {
    /// The current log file; rotated ones are `<path>.<timestamp>`.
    pub path: PathBuf,
    /// Rotate when the current file would grow past this (0: never).
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_files: usize,
    #[serde(default = "default_max_line")]
    pub max_line: usize,
    /// Read the container's stdout and stderr from these FIFOs instead of
    /// fds 3 and 4 (no ready pipe): how the agent runs the driver itself for
    /// a container whose main process takes stdin without a terminal, whose
    /// task then has FIFOs for all three streams (see `containerd/attach.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifos: Option<[PathBuf; 2]>,
}

fn default_max_line() -> usize {
    DEFAULT_MAX_LINE
}

impl LogDriverConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LogDriverConfig {
            path: path.into(),
            max_size: DEFAULT_MAX_SIZE,
            max_files: DEFAULT_MAX_FILES,
            max_line: DEFAULT_MAX_LINE,
            fifos: None,
        }
    }
}

/// The containerd stdout/stderr URI that makes the shim run `binary` as
/// this log driver (give the same URI for stdout and stderr; the shim
/// starts one driver for both).
pub fn log_uri(binary: &Path, cfg: &LogDriverConfig) -> String {
    let json = serde_json::to_string(cfg).unwrap_or_default();
    let path = binary.to_string_lossy();
    format!("binary://{}?log-driver={}", percent_encode(&path, true), percent_encode(&json, false))
}

/// Go's url.Parse decodes %XX in the path and the query (and `+` as a
/// space in the query), so everything but unreserved characters is encoded.
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One CRI log line: `<RFC3339Nano> <stream> <F|P> <content>\n`. The
/// timestamp is UTC with all nine fraction digits (Go's RFC3339Nano trims
/// zeros; readers parse both, and fixed width keeps lines aligned).
pub fn format_entry(out: &mut Vec<u8>, at: DateTime<Utc>, stream: Stream, partial: bool, content: &[u8]) {
    out.extend_from_slice(at.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Cuts one stream's bytes into log lines: full lines (newline dropped)
/// and, for a line longer than `max_line`, partial pieces of `max_line`
/// bytes. Bytes of an unfinished line wait for the next push.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter { pending: Vec::new(), max_line: max_line.max(1) }
    }

    /// Returns (content, partial) pairs in order.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            let room = self.max_line - self.pending.len();
            match chunk.iter().take(room + 1).position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&chunk[..i]);
                    out.push((std::mem::take(&mut self.pending), false));
                    chunk = &chunk[i + 1..];
                }
                None => {
                    let n = room.min(chunk.len());
                    self.pending.extend_from_slice(&chunk[..n]);
                    chunk = &chunk[n..];
                    // Full to max_line, and the next byte is not the newline.
                    if self.pending.len() == self.max_line && !chunk.is_empty() && chunk[0] != b'\n' {
                        out.push((std::mem::take(&mut self.pending), true));
                    }
                }
            }
        }
        out
    }

    /// Output that waits for its newline (written as a partial line if the
    /// stream goes quiet: see [`IDLE_FLUSH`]).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// At end of stream, output without a final newline is a partial line,
    /// as containerd's CRI logger writes it.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// How long output without a newline waits for one before it is written as
/// a partial line: a shell's prompt then reaches `kubectl attach` (which
/// follows the file) while the shell waits for input. Readers join partial
/// pieces again, so `kubectl logs` shows the same lines either way.
pub const IDLE_FLUSH: Duration = Duration::from_millis(50);

/// Whether `fd` has input (or hang-up) within `wait`.
fn readable_within(fd: std::os::fd::RawFd, wait: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, wait.as_millis() as libc::c_int) };
    // An error (EINTR) counts as readable: the read that follows decides.
    r != 0
}

/// Whether writing `entry_len` more bytes must go to a fresh file. An
/// empty file takes any entry, so one huge line cannot rotate forever.
pub fn needs_rotation(current_size: u64, entry_len: u64, max_size: u64) -> bool {
    max_size > 0 && current_size > 0 && current_size + entry_len > max_size
}

/// Where the current file goes on rotation: `<path>.<UTC timestamp>`, a
/// fixed-width suffix so names sort oldest first (kubelet names rotated
/// files the same way, to the second; we add the nanoseconds so that fast
/// rotations never collide).
pub fn rotated_path(path: &Path, at: DateTime<Utc>) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{}", at.format("%Y%m%d-%H%M%S%.9f")));
    PathBuf::from(s)
}

/// The name for the next rotation at `at`, given the newest rotated file:
/// strictly after it, so that names never collide (one read can rotate
/// several times within one timestamp) and order stays true even if the
/// clock steps back.
pub fn next_rotated_path(path: &Path, at: DateTime<Utc>, newest: Option<&Path>) -> PathBuf {
    let newest_at = newest
        .and_then(|p| {
            p.file_name()?.to_str()?.rsplit_once('.').map(|(head, nanos)| (head.to_string(), nanos.to_string()))
        })
        .and_then(|(head, nanos)| {
            let stamp = format!("{}.{nanos}", head.rsplit_once('.')?.1);
            chrono::NaiveDateTime::parse_from_str(&stamp, "%Y%m%d-%H%M%S%.9f").ok()
        })
        .map(|t| t.and_utc());
    match newest_at {
        Some(n) if n >= at => rotated_path(path, n + chrono::Duration::nanoseconds(1)),
        _ => rotated_path(path, at),
    }
}

fn is_rotation_suffix(s: &str) -> bool {
    // 20240102-150405.123456789
    let b = s.as_bytes();
    b.len() == 25
        && b.iter().enumerate().all(|(i, c)| match i {
            8 => *c == b'-',
            15 => *c == b'.',
            _ => c.is_ascii_digit(),
        })
}

/// Of the rotated files (sorted oldest first), those to delete so that
/// `max_files` remain counting the current one.
pub fn expired(rotated: &[PathBuf], max_files: usize) -> &[PathBuf] {
    let keep = max_files.max(1) - 1;
    &rotated[..rotated.len().saturating_sub(keep)]
}

/// The container's log files oldest first: the rotated ones, then `path`
/// itself if it exists. What `read_logs` and `follow` take.
pub fn log_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = rotated_files(path)?;
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(suffix) = entry.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)) {
            if is_rotation_suffix(suffix) {
                out.push(dir.join(entry.file_name()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The current file plus rotation. Writes go straight to the file (no
/// userspace buffer), so a kill loses at most an unfinished line.
pub struct LogWriter {
    cfg: LogDriverConfig,
    file: File,
    size: u64,
}

impl LogWriter {
    pub fn open(cfg: LogDriverConfig) -> io::Result<Self> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&cfg.path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { cfg, file, size })
    }

    pub fn write_entry(&mut self, at: DateTime<Utc>, stream: Stream, partial: bool, content: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(content.len() + 48);
        format_entry(&mut buf, at, stream, partial, content);
        if needs_rotation(self.size, buf.len() as u64, self.cfg.max_size) {
            self.rotate(at)?;
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self, at: DateTime<Utc>) -> io::Result<()> {
        // Rename, then reopen: a reader following the old file by handle
        // sees it end, then finds the new one at `path`.
        let before = rotated_files(&self.cfg.path)?;
        std::fs::rename(&self.cfg.path, next_rotated_path(&self.cfg.path, at, before.last().map(PathBuf::as_path)))?;
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.cfg.path)?;
        self.size = 0;
        let rotated = rotated_files(&self.cfg.path)?;
        for old in expired(&rotated, self.cfg.max_files) {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

/// What both reader threads share.
struct Shared {
    writer: LogWriter,
    splitters: [LineSplitter; 2],
    open_streams: usize,
}

impl Shared {
    fn write(&mut self, stream: Stream, lines: Vec<(Vec<u8>, bool)>) {
        let now = Utc::now();
        for (content, partial) in lines {
            if let Err(e) = self.writer.write_entry(now, stream, partial, &content) {
                // Nowhere better to say it: our stderr goes to the shim's log.
                eprintln!("capstan log-driver: writing {}: {e}", self.writer.cfg.path.display());
            }
        }
    }

    fn flush_partials(&mut self) {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if let Some(rest) = self.splitters[i].finish() {
                self.write(stream, vec![(rest, true)]);
            }
        }
    }
}

/// Where a stream's output comes from.
enum Source {
    Fd(File),
    Fifo(PathBuf),
}

fn take_fd(fd: i32, what: &str) -> io::Result<File> {
    // SAFETY: fcntl only inspects the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "fd {fd} ({what}) is not open: run me as containerd's binary:// log driver (fds 3, 4, 5)"
        )));
    }
    // SAFETY: the descriptor is open and nothing else in this process owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Runs the driver on fds 3 (stdout), 4 (stderr) and 5 (ready) until both
/// streams end, or shortly after SIGTERM.
pub fn run(cfg: LogDriverConfig) -> io::Result<()> {
    // SIGTERM is blocked before any thread exists, so every thread inherits
    // the mask and only the waiter below receives it.
    // SAFETY: standard signal-mask calls on a set we own.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // With FIFOs, each reader thread opens its own: the open blocks until
    // the shim opens the writing end, and the shim's open waits for ours,
    // so nothing is written before a reader is there.
    let (pipes, ready) = match &cfg.fifos {
        None => {
            let stdout = take_fd(3, "container stdout")?;
            let stderr = take_fd(4, "container stderr")?;
            ([Source::Fd(stdout), Source::Fd(stderr)], Some(take_fd(5, "ready pipe")?))
        }
        Some([out, err]) => ([Source::Fifo(out.clone()), Source::Fifo(err.clone())], None),
    };
    let max_line = cfg.max_line;
    let writer = LogWriter::open(cfg)?;
    let shared = Arc::new((
        Mutex::new(Shared {
            writer,
            splitters: [LineSplitter::new(max_line), LineSplitter::new(max_line)],
            open_streams: 2,
        }),
        std::sync::Condvar::new(),
    ));
    // The log file is open: let the shim start the container.
    drop(ready);

    for (i, (stream, source)) in [Stream::Stdout, Stream::Stderr].into_iter().zip(pipes).enumerate() {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let opened = match source {
                Source::Fd(f) => Ok(f),
                Source::Fifo(path) => File::open(&path),
            };
            let mut pipe = match opened {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("log-driver: open {stream:?} FIFO: {e}");
                    let mut s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
                    s.open_streams -= 1;
                    shared.1.notify_all();
                    return;
                }
            };
            let mut buf = vec![0u8; 64 * 1024];
            // Output waits for its newline (known from the last push).
            let mut waiting = false;
            loop {
                if waiting && !readable_within(std::os::fd::AsRawFd::as_raw_fd(&pipe), IDLE_FLUSH) {
                    let mut s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(rest) = s.splitters[i].finish() {
                        s.write(stream, vec![(rest, true)]);
                    }
                    waiting = false;
                    continue;
                }
                let n = match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
                let lines = s.splitters[i].push(&buf[..n]);
                s.write(stream, lines);
                waiting = s.splitters[i].pending() > 0;
            }
            let mut s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rest) = s.splitters[i].finish() {
                s.write(stream, vec![(rest, true)]);
            }
            s.open_streams -= 1;
            shared.1.notify_all();
        });
    }

    let terminated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (shared, terminated) = (shared.clone(), terminated.clone());
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on the set blocked above.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                terminated.store(true, std::sync::atomic::Ordering::SeqCst);
                shared.1.notify_all();
            }
        });
    }

    // After SIGTERM the shim has closed its pipe ends; give the streams a
    // moment to drain what is still buffered, then stop (a process that
    // kept a copy of the container's stdout would hold us forever).
    let (lock, cvar) = &*shared;
    let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut deadline: Option<std::time::Instant> = None;
    while s.open_streams > 0 {
        if terminated.load(std::sync::atomic::Ordering::SeqCst) {
            let d = *deadline.get_or_insert_with(|| std::time::Instant::now() + Duration::from_secs(2));
            let now = std::time::Instant::now();
            if now >= d {
                break;
            }
            s = cvar.wait_timeout(s, d - now).unwrap_or_else(|p| p.into_inner()).0;
        } else {
            s = cvar.wait_timeout(s, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
    s.flush_partials();
    Ok(())
}

/// `SystemTime` to the timestamps written in the files.
pub fn utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 2, 15, 4, 5).unwrap() + chrono::Duration::nanoseconds(120)
    }

    #[test]
    fn entries_are_in_the_cri_format() {
        let mut out = Vec::new();
        format_entry(&mut out, at(), Stream::Stdout, false, b"hello world");
        format_entry(&mut out, at(), Stream::Stderr, true, b"");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2024-01-02T15:04:05.000000120Z stdout F hello world\n2024-01-02T15:04:05.000000120Z stderr P \n"
        );
    }

    #[test]
    fn splitter_cuts_lines_and_long_lines() {
        let mut s = LineSplitter::new(4);
        assert_eq!(s.push(b"ab"), vec![]);
        assert_eq!(s.push(b"c\nde"), vec![(b"abc".to_vec(), false)]);
        // "de" + "fgh" exceeds 4: one partial of 4, "h" waits.
        assert_eq!(s.push(b"fgh"), vec![(b"defg".to_vec(), true)]);
        assert_eq!(s.push(b"\n\n"), vec![(b"h".to_vec(), false), (b"".to_vec(), false)]);
        // Exactly max_line then newline is one full line, not a partial.
        assert_eq!(s.push(b"wxyz\n"), vec![(b"wxyz".to_vec(), false)]);
        assert_eq!(s.push(b"wxyz"), vec![]);
        assert_eq!(s.push(b"\n"), vec![(b"wxyz".to_vec(), false)]);
        assert_eq!(s.push(b"0123456789"), vec![(b"0123".to_vec(), true), (b"4567".to_vec(), true)]);
        assert_eq!(s.finish(), Some(b"89".to_vec()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn rotation_decisions() {
        assert!(!needs_rotation(0, 500, 100), "an empty file takes anything");
        assert!(!needs_rotation(50, 50, 100));
        assert!(needs_rotation(51, 50, 100));
        assert!(!needs_rotation(1 << 40, 1, 0), "0 = never");

        let p = rotated_path(Path::new("/logs/0.log"), at());
        assert_eq!(p, PathBuf::from("/logs/0.log.20240102-150405.000000120"));
        assert!(is_rotation_suffix("20240102-150405.000000120"));
        assert!(!is_rotation_suffix("gz") && !is_rotation_suffix("20240102-150405.000000120.gz"));

        let newest = PathBuf::from("/logs/0.log.20240102-150405.000000120");
        assert_eq!(next_rotated_path(Path::new("/logs/0.log"), at(), None), newest);
        assert_eq!(
            next_rotated_path(Path::new("/logs/0.log"), at(), Some(&newest)),
            PathBuf::from("/logs/0.log.20240102-150405.000000121")
        );
        let later = at() + chrono::Duration::seconds(1);
        assert_eq!(
            next_rotated_path(Path::new("/logs/0.log"), later, Some(&newest)),
            PathBuf::from("/logs/0.log.20240102-150406.000000120")
        );
        let rotated: Vec<PathBuf> = (1..=4).map(|i| PathBuf::from(format!("f.{i}"))).collect();
        assert_eq!(expired(&rotated, 5), &[] as &[PathBuf]);
        assert_eq!(expired(&rotated, 3), &rotated[..2]);
        assert_eq!(expired(&rotated, 1), &rotated[..]);
        assert_eq!(expired(&rotated, 0), &rotated[..]);
    }

    #[test]
    fn writer_rotates_and_keeps_max_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c/0.log");
        let cfg = LogDriverConfig { path: path.clone(), max_size: 200, max_files: 3, max_line: 1024, fifos: None };
        let mut w = LogWriter::open(cfg).unwrap();
        // One timestamp for all, as when one read holds many lines.
        let t = at();
        for i in 0..40 {
            w.write_entry(t, Stream::Stdout, false, format!("line {i:03}").as_bytes()).unwrap();
        }
        let files = log_files(&path).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(files.last().unwrap(), &path);
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 200);
        }
        // The newest line is in the current file, and files are in order.
        let all: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
        assert!(std::fs::read_to_string(&path).unwrap().contains("line 039"));
        let nums: Vec<u32> = all.lines().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    }

    #[test]
    fn uri_carries_the_config_as_one_query_argument() {
        let cfg = LogDriverConfig {
            path: "/var/log/pods/ns_p_uid/c/0.log".into(),
            max_size: 1024,
            max_files: 2,
            max_line: 16,
            fifos: None,
        };
        let uri = log_uri(Path::new("/usr/local/bin/capstan-node"), &cfg);
        let (base, query) = uri.split_once('?').unwrap();
        assert_eq!(base, "binary:///usr/local/bin/capstan-node");
        let (key, value) = query.split_once('=').unwrap();
        assert_eq!(key, "log-driver");
        assert!(!value.contains(['&', '+', '"', '{', ' ', '/', '=']), "{value}");
        let decoded = percent_decode(value);
        assert_eq!(serde_json::from_str::<LogDriverConfig>(&decoded).unwrap(), cfg);
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
}
