//! The Raft snapshot on disk, and the handle openraft reads it through.
//!
//! A snapshot file is `postcard(SnapshotMeta)`, `varint(len)`, then `len`
//! bytes of data (the postcard `mvcc::Image`): the same bytes as postcard
//! encoding `{ meta, data: Vec<u8> }`, the layout since the first release,
//! so older data dirs read unchanged.
//!
//! Why it is streamed rather than built in memory: a snapshot holds every
//! key at every revision not yet compacted (hundreds of MB on a busy
//! cluster). Encoding it into one `Vec`, then copying that into the file
//! record, cost seconds of leader CPU per snapshot (memcpy and fresh pages
//! faulted in as the `Vec` grew) and held the memory twice. Now the image
//! is written through a buffer into the file, its length computed first;
//! and openraft reads the data region straight from the file ([`Region`])
//! when a follower needs it, instead of the whole file being loaded.

use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::mvcc::Image;
use crate::types::SnapshotMeta;

/// Header of a snapshot file: what precedes the data.
#[derive(Serialize)]
struct HeaderRef<'a> {
    meta: &'a SnapshotMeta,
    len: usize,
}

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {e}"))
}

/// Writes a snapshot of `image` at `path` (through `<path>.tmp`, synced,
/// then renamed over it); returns the data's length.
///
/// Callers serialize writers of one path: the temporary name is fixed.
pub fn write_image(path: &Path, meta: &SnapshotMeta, image: &Image) -> io::Result<u64> {
    let len = postcard::experimental::serialized_size(image).map_err(bad)?;
    write_with(path, meta, len, |w| postcard::to_io(image, w).map(drop).map_err(bad))
}

/// Writes a snapshot whose data is `data` at `path`, as [`write_image`].
pub fn write_data(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<u64> {
    write_with(path, meta, data.len(), |w| w.write_all(data))
}

fn write_with(
    path: &Path,
    meta: &SnapshotMeta,
    len: usize,
    body: impl FnOnce(&mut BufWriter<std::fs::File>) -> io::Result<()>,
) -> io::Result<u64> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let header = postcard::to_stdvec(&HeaderRef { meta, len }).map_err(bad)?;
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    w.write_all(&header)?;
    body(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    if file.metadata()?.len() != (header.len() + len) as u64 {
        return Err(bad("data length differs from the length computed for it"));
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(len as u64)
}

/// Reads a snapshot file's header: its meta, where the data starts, and
/// the data's length. A file shorter than its header says is an error (a
/// torn write).
pub fn read_header(file: &mut std::fs::File) -> io::Result<(SnapshotMeta, u64, u64)> {
    let size = file.metadata()?.len();
    let mut buf = Vec::new();
    let mut want = 4096u64;
    loop {
        buf.clear();
        file.seek(SeekFrom::Start(0))?;
        Read::by_ref(file).take(want).read_to_end(&mut buf)?;
        match postcard::take_from_bytes::<(SnapshotMeta, usize)>(&buf) {
            Ok(((meta, len), rest)) => {
                let base = (buf.len() - rest.len()) as u64;
                // A corrupt length must not overflow.
                if base.checked_add(len as u64) != Some(size) {
                    return Err(bad(format!("{size} bytes, but its header says {base} + {len}")));
                }
                return Ok((meta, base, len as u64));
            }
            Err(postcard::Error::DeserializeUnexpectedEnd) if want < size => want = (want * 4).min(size),
            Err(e) => return Err(bad(e)),
        }
    }
}

/// Opens the snapshot at `path` (None: there is none) for openraft to read.
pub fn open(path: &Path) -> io::Result<Option<(SnapshotMeta, Region)>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (meta, base, _) = read_header(&mut file)?;
    file.seek(SeekFrom::Start(base))?;
    Ok(Some((meta, Region { file: tokio::fs::File::from_std(file), base })))
}

/// A file seen from offset `base` on: a snapshot's data region, which is
/// what openraft seeks in and reads (sending) or writes (receiving, with
/// `base` 0 in a file of data only). An open file keeps reading the same
/// snapshot after a newer one is renamed over its path.
pub struct Region {
    file: tokio::fs::File,
    base: u64,
}

impl Region {
    /// A new, empty file at `path` to receive a snapshot's data into.
    pub async fn create(path: &Path) -> io::Result<Region> {
        // Read and write: the install reads back what arrived.
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).await?;
        Ok(Region { file, base: 0 })
    }
}

impl AsyncRead for Region {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for Region {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for Region {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let position = match position {
            SeekFrom::Start(p) => SeekFrom::Start(p.checked_add(self.base).ok_or_else(|| bad("seek past the end"))?),
            other => other,
        };
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        // Saturating: before its first seek, tokio's file reports offset 0
        // whatever the descriptor's is (every reader here seeks first).
        let base = self.base;
        Pin::new(&mut self.file).poll_complete(cx).map(|r| r.map(|p| p.saturating_sub(base)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LogId, StoredMembership};
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    /// The layout every earlier release wrote.
    #[derive(Serialize)]
    struct Legacy {
        meta: SnapshotMeta,
        data: Vec<u8>,
    }

    /// Reads the data of the snapshot at `path`.
    fn read_data(path: &Path) -> io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let (_, base, len) = read_header(&mut file)?;
        file.seek(SeekFrom::Start(base))?;
        let mut data = Vec::with_capacity(len as usize);
        file.read_to_end(&mut data)?;
        Ok(data)
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("3-{index}-9"),
        }
    }

    fn image() -> Image {
        let v = |rev: i64, value: &'static [u8]| crate::mvcc::Version {
            mod_revision: rev,
            sub: 0,
            create_revision: 2,
            version: rev - 1,
            lease: 0,
            value: Some(Bytes::from_static(value)),
        };
        Image {
            revision: 9,
            compacted: 1,
            keys: vec![(Bytes::from_static(b"/a"), vec![v(2, b"x"), v(3, &[7; 300])])],
            leases: vec![(5, 60)],
        }
    }

    #[tokio::test]
    async fn files_read_back_and_match_the_layout_earlier_releases_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        assert!(open(&path).unwrap().is_none(), "no snapshot yet");
        let data = postcard::to_stdvec(&image()).unwrap();
        let len = write_image(&path, &meta(40), &image()).unwrap();
        assert_eq!(len, data.len() as u64);
        let legacy = postcard::to_stdvec(&Legacy { meta: meta(40), data: data.clone() }).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), legacy, "same bytes as the old format");
        assert!(!dir.path().join("snapshot.bin.tmp").exists());

        // openraft's sender: the length from End(0), chunks from Start(offset).
        let (m, mut region) = open(&path).unwrap().unwrap();
        assert_eq!(m, meta(40));
        assert_eq!(region.seek(SeekFrom::End(0)).await.unwrap(), data.len() as u64);
        region.seek(SeekFrom::Start(100)).await.unwrap();
        let mut tail = Vec::new();
        region.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, data[100..]);
        assert_eq!(read_data(&path).unwrap(), data);

        // A newer snapshot renamed over the path leaves an open one intact.
        let (_, mut old) = open(&path).unwrap().unwrap();
        write_data(&path, &meta(80), b"newer").unwrap();
        let mut all = Vec::new();
        old.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, data);
        assert_eq!(read_data(&path).unwrap(), b"newer");
    }

    /// openraft's receiver writes chunks at offsets; the install reads
    /// them back through the same handle.
    #[tokio::test]
    async fn a_received_snapshot_reads_back() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let mut r = Region::create(&dir.path().join("snapshot.recv")).await.unwrap();
        r.write_all(b"first ").await.unwrap();
        r.seek(SeekFrom::Start(6)).await.unwrap();
        r.write_all(b"second").await.unwrap();
        r.flush().await.unwrap();
        r.seek(SeekFrom::Start(0)).await.unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"first second");
    }

    #[test]
    fn torn_and_foreign_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        write_data(&path, &meta(7), &[1; 10_000]).unwrap();
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(read_data(&path).is_err(), "one byte short");
        std::fs::write(&path, &whole[..20]).unwrap();
        assert!(open(&path).is_err(), "header only in part");
        std::fs::write(&path, b"\xff\xff\xff not a snapshot").unwrap();
        assert!(open(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(open(&path).is_err(), "empty");
        let mut huge = postcard::to_stdvec(&meta(7)).unwrap();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        std::fs::write(&path, &huge).unwrap();
        assert!(open(&path).is_err(), "a length near u64::MAX is an error, not an overflow");
    }
}
