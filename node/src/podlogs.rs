//! Reading containers' CRI log files for `kubectl logs`: the files the log
//! driver (`logdriver.rs`) writes, `<RFC3339Nano> <stream> <F|P> <content>`.
//!
//! [`Assembler`] (pure) turns file lines back into the container's lines:
//! partial pieces (`P`) are joined, per stream, up to their `F`, and a line
//! is stamped with the time of its first piece, as the kubelet shows it.
//! [`render`] applies kubectl's options (`--since-time`, `--tail`,
//! `--timestamps`, `--limit-bytes`) to whole files' bytes; [`read_logs`] is
//! it over files on disk, and [`follow`] keeps reading the current file as
//! it grows and across rotations (`kubectl logs -f`).
//!
//! Malformed lines (a torn write, a foreign file) are skipped, never fatal.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use crate::logdriver::Stream;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Only the last n lines.
    pub tail: Option<usize>,
    /// Only lines written at or after this time.
    pub since: Option<SystemTime>,
    /// Prefix each line with its RFC3339Nano timestamp and a space.
    pub timestamps: bool,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<usize>,
}

/// One line of a log file.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time: DateTime<Utc>,
    /// The timestamp as written (shown with `timestamps`).
    pub raw_time: &'a [u8],
    pub stream: Stream,
    pub partial: bool,
    pub content: &'a [u8],
}

/// Parses one file line (without its newline); None if malformed.
pub fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let raw_time = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let content = parts.next().unwrap_or_default();
    let time = DateTime::parse_from_rfc3339(std::str::from_utf8(raw_time).ok()?).ok()?.with_timezone(&Utc);
    Some(Entry { time, raw_time, stream, partial, content })
}

/// A reassembled container line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub time: DateTime<Utc>,
    pub raw_time: Vec<u8>,
    pub stream: Stream,
    pub content: Vec<u8>,
    /// False for output that ended without a newline (the stream's last
    /// partial pieces).
    pub complete: bool,
}

impl LogLine {
    fn render(&self, timestamps: bool, out: &mut Vec<u8>) {
        if timestamps {
            out.extend_from_slice(&self.raw_time);
            out.push(b' ');
        }
        out.extend_from_slice(&self.content);
        if self.complete {
            out.push(b'\n');
        }
    }
}

/// Joins partial pieces per stream.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: [Option<LogLine>; 2],
}

impl Assembler {
    /// Feeds one file line; returns the container line it completes.
    pub fn push(&mut self, line: &[u8]) -> Option<LogLine> {
        let e = parse_entry(line)?;
        let slot = &mut self.pending[e.stream as usize];
        let acc = slot.get_or_insert_with(|| LogLine {
            time: e.time,
            raw_time: e.raw_time.to_vec(),
            stream: e.stream,
            content: Vec::new(),
            complete: false,
        });
        acc.content.extend_from_slice(e.content);
        if e.partial {
            return None;
        }
        let mut done = slot.take()?;
        done.complete = true;
        Some(done)
    }

    /// Lines still waiting for their end (output without a final newline).
    pub fn unfinished(&mut self) -> Vec<LogLine> {
        let mut v: Vec<LogLine> = self.pending.iter_mut().filter_map(Option::take).collect();
        v.sort_by_key(|l| l.time);
        v
    }
}

/// The lines of whole files' contents, oldest first.
pub fn assemble(files: &[&[u8]]) -> Vec<LogLine> {
    let mut a = Assembler::default();
    let mut lines = Vec::new();
    for data in files {
        // A file cut mid-line (a crash) ends with a torn line: skipped by
        // the parser if it is malformed, kept if it still parses.
        lines.extend(data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).filter_map(|l| a.push(l)));
    }
    lines.extend(a.unfinished());
    lines
}

/// `kubectl logs` output from whole files' contents (oldest file first).
pub fn render(files: &[&[u8]], opts: &ReadOptions) -> Vec<u8> {
    let mut lines = assemble(files);
    if let Some(since) = opts.since {
        let since = DateTime::<Utc>::from(since);
        lines.retain(|l| l.time >= since);
    }
    if let Some(n) = opts.tail {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    let mut out = Vec::new();
    for l in &lines {
        l.render(opts.timestamps, &mut out);
        if opts.limit_bytes.is_some_and(|max| out.len() >= max) {
            break;
        }
    }
    if let Some(max) = opts.limit_bytes {
        out.truncate(max);
    }
    out
}

/// [`render`] over files on disk (see `logdriver::log_files`); a file that
/// vanished meanwhile (rotated out) is skipped.
pub fn read_logs(paths: &[PathBuf], opts: &ReadOptions) -> io::Result<Vec<u8>> {
    let mut contents = Vec::new();
    for p in paths {
        match std::fs::read(p) {
            Ok(c) => contents.push(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let slices: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    Ok(render(&slices, opts))
}

/// `kubectl logs -f`: sends what [`read_logs`] would for `path`'s files,
/// then every new line as it is written, following the current file across
/// rotations by polling every `poll`. Returns when the receiver goes away,
/// when `limit_bytes` is reached, or when the log files are deleted (the
/// container was removed).
pub async fn follow(
    path: PathBuf,
    opts: ReadOptions,
    poll: Duration,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    // Open the current file before listing the rotated ones: what is
    // written meanwhile is then read once, from this handle.
    let mut file = open_current(&path)?;
    let mut contents: Vec<Vec<u8>> = Vec::new();
    for p in crate::logdriver::log_files(&path)?.iter().filter(|p| **p != path) {
        if let Ok(c) = std::fs::read(p) {
            contents.push(c);
        }
    }
    let mut current = Vec::new();
    if let Some(f) = file.as_mut() {
        f.read_to_end(&mut current)?;
    }
    // A line still being written stays in `carry` until its newline comes.
    let cut = current.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let carry = current.split_off(cut);
    contents.push(current);

    // Partial pieces at the end of what exists may still be completed:
    // they stay in `live`, which goes on assembling what comes next.
    let mut live = Assembler::default();
    let mut lines = Vec::new();
    for data in &contents {
        lines.extend(data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).filter_map(|l| live.push(l)));
    }
    let since = opts.since.map(DateTime::<Utc>::from);
    lines.retain(|l| since.is_none_or(|s| l.time >= s));
    let skip = opts.tail.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = Vec::new();
    for l in &lines[skip..] {
        l.render(opts.timestamps, &mut out);
    }
    let mut sent = 0usize;
    if !send_limited(&tx, out, &mut sent, opts.limit_bytes).await {
        return Ok(());
    }

    let mut follower = Follower { live, carry, since, timestamps: opts.timestamps };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if let Some(f) = file.as_mut() {
            f.read_to_end(&mut buf)?;
        }
        if !buf.is_empty() {
            let out = follower.feed(&buf);
            if !out.is_empty() && !send_limited(&tx, out, &mut sent, opts.limit_bytes).await {
                return Ok(());
            }
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if file.as_ref().is_some_and(|f| same_file(f, &m)) => {}
            Ok(_) => {
                let (rest, next) = rotate(&path, file.take())?;
                file = next;
                let out: Vec<u8> = rest.iter().flat_map(|c| follower.feed(c)).collect();
                if !out.is_empty() && !send_limited(&tx, out, &mut sent, opts.limit_bytes).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if file.is_some() && crate::logdriver::log_files(&path)?.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
        if tx.is_closed() {
            return Ok(());
        }
        tokio::time::sleep(poll).await;
    }
}

/// The current file was rotated (maybe several times since the last
/// poll): what is left to read, in order (the rest of the old file, then
/// the rotated files newer than it), and the new current file.
#[allow(clippy::type_complexity)]
fn rotate(path: &Path, old: Option<std::fs::File>) -> io::Result<(Vec<Vec<u8>>, Option<std::fs::File>)> {
    let mut rest = Vec::new();
    if let Some(mut f) = old.as_ref() {
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        rest.push(buf);
    }
    let file = open_current(path)?;
    let files = crate::logdriver::log_files(path)?;
    let key = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let old_key = old.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
    let new_key = file.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
    let start = files.iter().position(|p| old_key.is_some() && key(p) == old_key).map_or(files.len(), |i| i + 1);
    for p in &files[start..] {
        if key(p) == new_key {
            break;
        }
        if let Ok(c) = std::fs::read(p) {
            rest.push(c);
        }
    }
    Ok((rest, file))
}

/// `kubectl attach`'s output: log file bytes in, each stream's pieces out
/// as the log driver wrote them. A partial piece comes without a newline,
/// so a prompt shows before the line it starts is finished.
#[derive(Debug, Default)]
pub struct Pieces {
    carry: Vec<u8>,
}

impl Pieces {
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(Stream, Vec<u8>)> {
        self.carry.extend_from_slice(bytes);
        let cut = self.carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let rest = self.carry.split_off(cut);
        let out = self
            .carry
            .split(|&b| b == b'\n')
            .filter_map(parse_entry)
            .map(|e| {
                let mut piece = e.content.to_vec();
                if !e.partial {
                    piece.push(b'\n');
                }
                (e.stream, piece)
            })
            .collect();
        self.carry = rest;
        out
    }
}

/// Sends what is written to `path` (the container's current log file,
/// across rotations) from now on, as [`Pieces`], polling every `poll`.
/// Returns when the receiver goes away or the log files are deleted.
pub async fn follow_pieces(
    path: PathBuf,
    poll: Duration,
    tx: tokio::sync::mpsc::Sender<(Stream, Vec<u8>)>,
) -> io::Result<()> {
    let mut file = open_current(&path)?;
    if let Some(f) = file.as_mut() {
        f.seek(SeekFrom::End(0))?;
    }
    let mut pieces = Pieces::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if let Some(f) = file.as_mut() {
            f.read_to_end(&mut buf)?;
        }
        let mut out = pieces.feed(&buf);
        match std::fs::metadata(&path) {
            Ok(m) if file.as_ref().is_some_and(|f| same_file(f, &m)) => {}
            Ok(_) => {
                let (rest, next) = rotate(&path, file.take())?;
                file = next;
                out.extend(rest.iter().flat_map(|c| pieces.feed(c)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if file.is_some() && crate::logdriver::log_files(&path)?.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
        let idle = out.is_empty();
        for piece in out {
            if tx.send(piece).await.is_err() {
                return Ok(());
            }
        }
        if tx.is_closed() {
            return Ok(());
        }
        if idle {
            tokio::time::sleep(poll).await;
        }
    }
}

fn same_file(f: &std::fs::File, m: &std::fs::Metadata) -> bool {
    f.metadata().is_ok_and(|fm| fm.ino() == m.ino() && fm.dev() == m.dev())
}

/// The live half of [`follow`]: bytes in, rendered complete lines out.
struct Follower {
    live: Assembler,
    carry: Vec<u8>,
    since: Option<DateTime<Utc>>,
    timestamps: bool,
}

impl Follower {
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.carry.extend_from_slice(bytes);
        let cut = self.carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let rest = self.carry.split_off(cut);
        let mut out = Vec::new();
        for l in self.carry.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Some(line) = self.live.push(l) {
                if self.since.is_none_or(|s| line.time >= s) {
                    line.render(self.timestamps, &mut out);
                }
            }
        }
        self.carry = rest;
        out
    }
}

fn open_current(path: &Path) -> io::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(mut f) => {
            f.seek(SeekFrom::Start(0))?;
            Ok(Some(f))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends (truncated to the byte limit); false when following must stop.
async fn send_limited(
    tx: &tokio::sync::mpsc::Sender<Vec<u8>>,
    mut out: Vec<u8>,
    sent: &mut usize,
    limit: Option<usize>,
) -> bool {
    if let Some(max) = limit {
        out.truncate(max.saturating_sub(*sent));
    }
    *sent += out.len();
    if !out.is_empty() && tx.send(out).await.is_err() {
        return false;
    }
    limit.is_none_or(|max| *sent < max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_pieces_keep_streams_and_partials_and_wait_for_whole_file_lines() {
        let mut p = Pieces::default();
        let out =
            p.feed(b"2024-01-02T15:04:05.000000001Z stdout P / # \n2024-01-02T15:04:05.1Z stderr F oops\n2024-01");
        assert_eq!(out, vec![(Stream::Stdout, b"/ # ".to_vec()), (Stream::Stderr, b"oops\n".to_vec())]);
        // The rest of a file line arrives later; a malformed line is skipped.
        let out = p.feed(b"-02T15:04:06Z stdout F ls\ngarbage\n");
        assert_eq!(out, vec![(Stream::Stdout, b"ls\n".to_vec())]);
        assert!(p.feed(b"").is_empty());
    }

    const FILE1: &[u8] = b"2024-01-02T15:04:05.000000001Z stdout F one\n\
2024-01-02T15:04:06.000000001Z stderr P tw\n\
2024-01-02T15:04:06.500000001Z stdout F three\n";
    const FILE2: &[u8] = b"2024-01-02T15:04:07Z stderr F o\n\
garbage line\n\
2024-01-02T15:04:08.1Z stdout F four\n\
2024-01-02T15:04:09.000000001Z stdout P unfini\n\
2024-01-02T15:04:09.000000002Z stdout P shed";

    fn run(opts: ReadOptions) -> String {
        String::from_utf8(render(&[FILE1, FILE2], &opts)).unwrap()
    }

    #[test]
    fn parses_entries_and_rejects_garbage() {
        let e = parse_entry(b"2024-01-02T15:04:05.5+01:00 stderr P a b c").unwrap();
        assert_eq!(e.stream, Stream::Stderr);
        assert!(e.partial);
        assert_eq!(e.content, b"a b c");
        assert_eq!(e.time.to_rfc3339(), "2024-01-02T14:04:05.500+00:00");
        assert_eq!(parse_entry(b"2024-01-02T15:04:05Z stdout F").unwrap().content, b"");
        for bad in [
            &b""[..],
            b"x stdout F a",
            b"2024-01-02T15:04:05Z stdin F a",
            b"2024-01-02T15:04:05Z stdout X a",
            b"\xff\xfe",
        ] {
            assert!(parse_entry(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn reassembles_partials_across_files_and_streams() {
        assert_eq!(run(ReadOptions::default()), "one\nthree\ntwo\nfour\nunfinished");
    }

    #[test]
    fn timestamps_are_those_of_the_first_piece() {
        let out = run(ReadOptions { timestamps: true, ..Default::default() });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "2024-01-02T15:04:05.000000001Z one");
        assert_eq!(lines[2], "2024-01-02T15:04:06.000000001Z two");
        assert_eq!(lines[4], "2024-01-02T15:04:09.000000001Z unfinished");
    }

    #[test]
    fn tail_since_and_limit() {
        assert_eq!(run(ReadOptions { tail: Some(2), ..Default::default() }), "four\nunfinished");
        assert_eq!(run(ReadOptions { tail: Some(0), ..Default::default() }), "");
        assert_eq!(run(ReadOptions { tail: Some(100), ..Default::default() }).lines().count(), 5);
        let since = DateTime::parse_from_rfc3339("2024-01-02T15:04:06.4Z").unwrap();
        let since = SystemTime::from(since.with_timezone(&Utc));
        // "two" started before `since` although it ended after.
        assert_eq!(run(ReadOptions { since: Some(since), ..Default::default() }), "three\nfour\nunfinished");
        assert_eq!(run(ReadOptions { limit_bytes: Some(6), ..Default::default() }), "one\nth");
        assert_eq!(run(ReadOptions { tail: Some(1), limit_bytes: Some(100), ..Default::default() }), "unfinished");
    }

    #[test]
    fn read_logs_skips_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        std::fs::write(&a, FILE1).unwrap();
        let out = read_logs(&[tmp.path().join("gone"), a], &ReadOptions::default()).unwrap();
        assert_eq!(out, b"one\nthree\ntw");
    }

    async fn recv_until(rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>, got: &mut Vec<u8>, want: &str) {
        let wait = async {
            while !String::from_utf8_lossy(got).contains(want) {
                got.extend(rx.recv().await.expect("follow ended early"));
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait).await.is_err() {
            panic!("timed out waiting for {want:?}; got {:?}", String::from_utf8_lossy(got));
        }
    }

    #[tokio::test]
    async fn follow_sees_growth_and_rotation() {
        use crate::logdriver::{LogDriverConfig, LogWriter};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("0.log");
        let cfg = LogDriverConfig { path: path.clone(), max_size: 120, max_files: 10, max_line: 1024, fifos: None };
        let mut w = LogWriter::open(cfg).unwrap();
        let mut t = Utc::now();
        let mut write = |w: &mut LogWriter, s: &str, partial: bool| {
            t += chrono::Duration::milliseconds(1);
            w.write_entry(t, Stream::Stdout, partial, s.as_bytes()).unwrap();
        };
        write(&mut w, "before-1", false);
        write(&mut w, "before-2", false);
        write(&mut w, "half-", true);
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let opts = ReadOptions { tail: Some(1), ..Default::default() };
        let task = tokio::spawn(follow(path.clone(), opts, Duration::from_millis(20), tx));
        let mut got = Vec::new();
        recv_until(&mut rx, &mut got, "before-2\n").await;
        write(&mut w, "done", false);
        // Enough lines to rotate several times.
        for i in 0..12 {
            write(&mut w, &format!("after-{i:02}"), false);
        }
        recv_until(&mut rx, &mut got, "after-11\n").await;
        let expected: String = std::iter::once("before-2\nhalf-done\n".to_string())
            .chain((0..12).map(|i| format!("after-{i:02}\n")))
            .collect();
        assert_eq!(String::from_utf8_lossy(&got), expected);
        assert!(crate::logdriver::log_files(&path).unwrap().len() > 2, "the test did not rotate");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
    }
}
