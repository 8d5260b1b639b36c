//! Durable storage for openraft: the Raft log, the vote and the MVCC state
//! machine, all in one RocksDB instance.
//!
//! # Column families and key layout
//!
//! | cf      | key                                   | value                          |
//! |---------|---------------------------------------|--------------------------------|
//! | `log`   | log index, u64 big-endian             | postcard `Entry`               |
//! | `meta`  | `vote`, `committed`, `purged`         | postcard `Vote` / `LogId`      |
//! | `meta`  | `applied`, `membership`, `removed`    | postcard, written with the kv batch |
//! | `meta`  | `revision`, `compacted`               | i64 big-endian                 |
//! | `kv`    | `escape(key) 00 01` ++ revision u64 BE | postcard `mvcc::Version`       |
//! | `lease` | lease id, i64 big-endian              | TTL seconds, i64 big-endian    |
//!
//! `escape` doubles every 0x00 byte as `00 ff` and the terminator `00 01`
//! sorts below any continuation, so RocksDB's byte order over `kv` is
//! (user key, revision): the rows of one key are adjacent and ordered.
//!
//! # Durability
//! Votes are written with `sync = true`. Log appends are group-committed: an
//! entry is reported flushed to openraft (and so counted towards a quorum)
//! only after a WAL sync that follows its write (see `spawn_flusher`). State machine batches go through the same WAL without sync; they
//! can always be replayed from the log. Before the log is purged behind a
//! snapshot the WAL is synced, so the state that replaced those entries is
//! durable first. A received snapshot is staged (synced) before it replaces
//! the rows, so a crash mid-install never pairs new rows with an old
//! snapshot file (see `finish_staged_install`).
//!
//! The MVCC state also lives in memory (`SmState`), rebuilt from `kv` at
//! start; reads are served from memory, writes go to both in one step.
//!
//! # Snapshots
//! `snapshot.bin` beside the database (layout in `snapfile`), written by a
//! blocking task from a copy of the in-memory image and read by openraft
//! straight from the file when a follower needs it; `snapshot.recv` is a
//! snapshot arriving from the leader, `snapshot.install` one being
//! installed.

// openraft's StorageError is large, and it is what the traits return.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, Membership, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageError, StorageIOError,
};
use parking_lot::RwLock;
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Serialize};

use crate::failpoints::crash_point;
use crate::metrics::StorageMetrics;
use crate::mvcc::{Image, Mvcc, RowChange, Version};
use crate::snapfile;
use crate::types::*;
use crate::watch::WatchHub;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_KV: &str = "kv";
const CF_LEASE: &str = "lease";

type StResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::new(&e)).into()
}

fn encode<T: Serialize>(v: &T) -> StResult<Vec<u8>> {
    crate::types::postcard_sized(v).map_err(write_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> StResult<T> {
    postcard::from_bytes(b).map_err(read_err)
}

/// `escape(key) 00 01`: order-preserving, prefix-free encoding of a user key.
pub fn encode_key(key: &[u8], out: &mut Vec<u8>) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Inverse of [`encode_key`] applied to a `kv` row key; `None` if malformed.
pub fn decode_row_key(row: &[u8]) -> Option<(Bytes, i64)> {
    if row.len() < 10 {
        return None;
    }
    let (enc, rev) = row.split_at(row.len() - 8);
    let rev = i64::from_be_bytes(rev.try_into().ok()?);
    let mut key = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b == 0 {
            match enc.get(i + 1) {
                Some(0xff) => key.push(0),
                Some(1) if i + 2 == enc.len() => return Some((Bytes::from(key), rev)),
                _ => return None,
            }
            i += 2;
        } else {
            key.push(b);
            i += 1;
        }
    }
    None
}

fn row_key(key: &[u8], rev: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    encode_key(key, &mut out);
    out.extend_from_slice(&rev.to_be_bytes());
    out
}

/// State machine contents shared with readers (the etcd API, watchers).
#[derive(Debug, Default)]
pub struct SmState {
    pub mvcc: Mvcc,
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Members removed from the cluster (every id that left an applied
    /// membership). A removed master never hears of its removal (the leader
    /// stops replicating to it first), so its peers tell it when it asks
    /// for votes. Ids are random per join, so a tombstone is never reused.
    /// Kept locally, not in snapshots: a master that caught up by snapshot
    /// knows the removals since, and the others know the rest.
    pub removed: BTreeSet<NodeId>,
}

impl SmState {
    /// Move to a newer membership, remembering who left.
    fn set_membership(&mut self, next: StoredMembership) {
        self.removed.extend(removed_between(self.membership.membership(), next.membership()));
        self.membership = next;
    }
}

/// Nodes (voters or learners) of `old` that are not in `new`, a later
/// membership: the members removed between the two.
pub fn removed_between(old: &Membership<NodeId, Member>, new: &Membership<NodeId, Member>) -> Vec<NodeId> {
    old.nodes().map(|(id, _)| *id).filter(|id| new.get_node(id).is_none()).collect()
}

pub type SharedState = Arc<RwLock<SmState>>;

/// Opens (or creates) the RocksDB instance and loads the state machine.
pub struct Storage {
    db: Arc<DB>,
    dir: PathBuf,
    pub metrics: Arc<StorageMetrics>,
}

impl Storage {
    pub fn open(dir: &Path) -> anyhow::Result<Storage> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = [CF_LOG, CF_META, CF_KV, CF_LEASE].map(|n| {
            let mut o = Options::default();
            // Larger memtables: fewer flushes under write bursts.
            o.set_write_buffer_size(64 << 20);
            if n == CF_LOG {
                // The log is written once, read soon and purged: compressing it costs CPU for nothing.
                o.set_compression_type(rocksdb::DBCompressionType::None);
            }
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
        Ok(Storage { db: Arc::new(db), dir: dir.to_path_buf(), metrics: Arc::default() })
    }

    pub fn log_store(&self) -> std::io::Result<LogStore> {
        Ok(LogStore {
            db: self.db.clone(),
            flusher: spawn_flusher(self.db.clone(), self.metrics.clone())?,
            metrics: self.metrics.clone(),
            cache: Arc::default(),
        })
    }

    /// Builds the state machine, loading the MVCC state from disk.
    pub fn state_machine(&self, hub: Arc<WatchHub>) -> anyhow::Result<StateMachine> {
        let db = &self.db;
        let meta = cf(db, CF_META);
        let get_i64 = |k: &str| -> anyhow::Result<i64> {
            Ok(db.get_cf(meta, k)?.and_then(|v| v.try_into().ok()).map(i64::from_be_bytes).unwrap_or(0))
        };
        let (revision, compacted) = (get_i64("revision")?, get_i64("compacted")?);
        let mut rows = Vec::new();
        for item in db.iterator_cf(cf(db, CF_KV), IteratorMode::Start) {
            let (k, v) = item?;
            let (key, _) = decode_row_key(&k).ok_or_else(|| anyhow::anyhow!("corrupt kv row key"))?;
            rows.push((key, postcard::from_bytes::<Version>(&v)?));
        }
        let mut leases = Vec::new();
        for item in db.iterator_cf(cf(db, CF_LEASE), IteratorMode::Start) {
            let (k, v) = item?;
            let id = i64::from_be_bytes(k[..].try_into()?);
            let ttl = i64::from_be_bytes(v[..].try_into()?);
            leases.push((id, ttl));
        }
        let mvcc = Mvcc::restore(revision, compacted, rows, leases);
        let applied = db.get_cf(meta, "applied")?.map(|b| postcard::from_bytes(&b)).transpose()?.flatten();
        let membership =
            db.get_cf(meta, "membership")?.map(|b| postcard::from_bytes(&b)).transpose()?.unwrap_or_default();
        let removed = db.get_cf(meta, "removed")?.map(|b| postcard::from_bytes(&b)).transpose()?.unwrap_or_default();
        let snapshot_path = self.dir.join("snapshot.bin");
        finish_staged_install(&snapshot_path, applied)?;
        let state = Arc::new(RwLock::new(SmState { mvcc, applied, membership, removed }));
        let snapshot_file = Arc::default();
        Ok(StateMachine {
            db: self.db.clone(),
            state,
            hub,
            snapshot_path,
            snapshot_file,
            metrics: self.metrics.clone(),
        })
    }

    /// Replace the state machine's contents with a backup image, before Raft
    /// starts (restore into a new cluster). The log stays empty.
    pub fn load_image(&self, image: Image) -> anyhow::Result<()> {
        let db = &self.db;
        if db.iterator_cf(cf(db, CF_KV), IteratorMode::Start).next().is_some() {
            anyhow::bail!("refusing to restore over existing data");
        }
        let st = SmState { mvcc: Mvcc::from_image(image), ..SmState::default() };
        let mut batch = WriteBatch::default();
        write_rows(db, &mut batch, &image_rows(&st.mvcc))?;
        write_meta(db, &mut batch, &st, true)?;
        db.write_opt(batch, &sync_opts())?;
        Ok(())
    }

    /// Approximate on-disk size of the database.
    pub fn disk_size(&self) -> u64 {
        self.db.property_int_value("rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0)
            + self.db.property_int_value("rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0)
    }
}

/// Where `install_snapshot` stages the received snapshot before replacing
/// the rows (see there).
fn staged_install_path(snapshot_path: &Path) -> PathBuf {
    snapshot_path.with_extension("install")
}

/// Maps IO errors writing (or receiving) a snapshot to openraft's error.
fn snapshot_write_err(meta: Option<&SnapshotMeta>) -> impl Fn(std::io::Error) -> StorageError<NodeId> + '_ {
    move |e| StorageIOError::write_snapshot(meta.map(SnapshotMeta::signature), &e).into()
}

/// Where a snapshot a leader is sending arrives (data only).
fn receiving_path(snapshot_path: &Path) -> PathBuf {
    snapshot_path.with_extension("recv")
}

/// Completes or discards a snapshot install that a crash interrupted.
///
/// A staged file whose snapshot the state machine already holds (`applied`
/// at or past its last log id: the synced rows were written) becomes the
/// current snapshot; otherwise the rows were never replaced and it is
/// dropped, as is a staged file shorter than its header says (a crash
/// while staging). Without this, a restart after the rows were replaced but before
/// the snapshot file was saved pairs the new state with the old snapshot:
/// openraft purges its log up to the new applied index, past that snapshot,
/// and its RaftCore panics on the invalid state (found by the failpoint
/// matrix, `raft::snapshot_install`).
fn finish_staged_install(snapshot_path: &Path, applied: Option<LogId>) -> anyhow::Result<()> {
    let staged = staged_install_path(snapshot_path);
    let mut file = match std::fs::File::open(&staged) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // The header checks the length too: a torn file is an error here.
    match snapfile::read_header(&mut file) {
        Ok((meta, _, _)) if meta.last_log_id.is_some() && applied >= meta.last_log_id => {
            tracing::warn!(snapshot = %meta.snapshot_id, "completing a snapshot install interrupted by a crash");
            std::fs::rename(&staged, snapshot_path)?;
        }
        _ => {
            tracing::warn!("discarding a snapshot install interrupted before its rows were written");
            std::fs::remove_file(&staged)?;
        }
    }
    Ok(())
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // The column families are created at open; a missing one is a bug.
    db.cf_handle(name).expect("column family created at open")
}

fn write_rows(db: &DB, batch: &mut WriteBatch, rows: &[RowChange]) -> StResult<()> {
    let (kv, lease) = (cf(db, CF_KV), cf(db, CF_LEASE));
    for r in rows {
        match r {
            RowChange::Put { key, row } => batch.put_cf(kv, row_key(key, row.mod_revision), encode(row)?),
            RowChange::Remove { key, mod_revision } => batch.delete_cf(kv, row_key(key, *mod_revision)),
            RowChange::LeasePut { id, ttl } => batch.put_cf(lease, id.to_be_bytes(), ttl.to_be_bytes()),
            RowChange::LeaseRemove { id } => batch.delete_cf(lease, id.to_be_bytes()),
        }
    }
    Ok(())
}

/// Every row of a whole state (snapshot install, restore).
fn image_rows(mvcc: &Mvcc) -> Vec<RowChange> {
    let mut rows: Vec<RowChange> =
        mvcc.rows().map(|(k, v)| RowChange::Put { key: k.clone(), row: v.clone() }).collect();
    rows.extend(mvcc.leases().map(|(id, l)| RowChange::LeasePut { id: *id, ttl: l.ttl }));
    rows
}

/// The state machine's meta rows. Membership changes rarely, so the apply
/// path writes it only when a membership entry was applied.
fn write_meta(db: &DB, batch: &mut WriteBatch, st: &SmState, membership: bool) -> StResult<()> {
    let meta = cf(db, CF_META);
    batch.put_cf(meta, "applied", encode(&st.applied)?);
    if membership {
        batch.put_cf(meta, "membership", encode(&st.membership)?);
        batch.put_cf(meta, "removed", encode(&st.removed)?);
    }
    batch.put_cf(meta, "revision", st.mvcc.revision().to_be_bytes());
    batch.put_cf(meta, "compacted", st.mvcc.compacted().to_be_bytes());
    Ok(())
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

// ---------------------------------------------------------------- log ----

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
    metrics: Arc<StorageMetrics>,
    /// The log's tail, decoded; shared with the readers cloned from this
    /// store, and changed only together with the log itself.
    cache: Arc<parking_lot::Mutex<crate::logcache::LogCache>>,
}

/// Group commit: appends are written without sync and their completion
/// callbacks queued here; one thread syncs the WAL for everything queued so
/// far (one fsync for many appends) and only then reports those entries
/// flushed. RocksDB's WAL is sequential, so a sync covers every earlier write.
fn spawn_flusher(
    db: Arc<DB>,
    metrics: Arc<StorageMetrics>,
) -> std::io::Result<std::sync::mpsc::Sender<LogFlushed<TypeConfig>>> {
    let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
    std::thread::Builder::new().name("log-fsync".into()).spawn(move || {
        // Ends when every LogStore (every sender) is gone.
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            crash_point!("raft::log_append_before_fsync");
            let started = std::time::Instant::now();
            let sync = true;
            // The planted bug: the WAL is written to the OS but never
            // synced, so a power cut loses acknowledged entries.
            #[cfg(feature = "planted-bugs")]
            let sync = sync && !crate::planted::armed("skip-fsync");
            let res = db.flush_wal(sync).map_err(|e| e.to_string());
            metrics.fsync.observe(started.elapsed().as_secs_f64());
            crash_point!("raft::log_append_after_fsync");
            for cb in batch {
                cb.log_io_completed(res.clone().map_err(std::io::Error::other));
            }
        }
    })?;
    Ok(tx)
}

impl LogStore {
    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> StResult<Option<T>> {
        match self.db.get_cf(cf(&self.db, CF_META), key).map_err(read_err)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> StResult<()> {
        self.db.put_cf_opt(cf(&self.db, CF_META), key, encode(v)?, &sync_opts()).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry>> {
        if let Some(hit) = self.cache.lock().get(&range) {
            return Ok(hit);
        }
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it =
            self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::From(&start.to_be_bytes(), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k[..].try_into().map_err(read_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode::<Entry>(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta("purged")?;
        let last = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End).next();
        let last_log_id = match last {
            Some(item) => Some(decode::<Entry>(&item.map_err(read_err)?.1)?.log_id),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> StResult<()> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote>> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StResult<()> {
        // Not synced: losing it only means re-deciding commitment, which is safe.
        let v = encode(&committed)?;
        self.db.put_cf(cf(&self.db, CF_META), "committed", v).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        let entries: Vec<Entry> = entries.into_iter().collect();
        for e in &entries {
            batch.put_cf(log, e.log_id.index.to_be_bytes(), encode(e)?);
        }
        self.metrics.appended_entries.inc_by(batch.len() as u64);
        // Written now (readable at once), durable when the flusher reports it.
        // The cache changes under its lock together with the log, so a
        // reader sees both before or both after.
        let mut cache = self.cache.lock();
        if let Err(e) = self.db.write(batch) {
            // What reached the log is unknown: read it from there.
            cache.clear();
            return Err(write_err(e));
        }
        for e in entries {
            cache.append(e);
        }
        drop(cache);
        self.flusher.send(callback).map_err(|_| write_err(std::io::Error::other("log fsync thread is gone")))
    }

    async fn truncate(&mut self, log_id: LogId) -> StResult<()> {
        // Dropped first: should the delete fail halfway, no reader is
        // answered from entries the log may no longer hold.
        self.cache.lock().truncate(log_id.index);
        let log = cf(&self.db, CF_LOG);
        self.db
            .delete_range_cf_opt(log, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes(), &sync_opts())
            .map_err(write_err)?;
        // delete_range excludes the end key
        self.db.delete_cf_opt(log, u64::MAX.to_be_bytes(), &sync_opts()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> StResult<()> {
        // The state machine rows these entries produced must be durable first.
        self.db.flush_wal(true).map_err(write_err)?;
        self.put_meta("purged", &log_id)?;
        self.cache.lock().purge(log_id.index);
        let log = cf(&self.db, CF_LOG);
        self.db.delete_range_cf(log, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes()).map_err(write_err)
    }
}

// ------------------------------------------------------ state machine ----

pub struct StateMachine {
    db: Arc<DB>,
    state: SharedState,
    hub: Arc<WatchHub>,
    snapshot_path: PathBuf,
    /// Held while the snapshot file is replaced, from reading the state
    /// it is made of to the rename: a build and an install never
    /// interleave, so the file is never older than the state.
    snapshot_file: Arc<parking_lot::Mutex<()>>,
    metrics: Arc<StorageMetrics>,
}

impl StateMachine {
    pub fn shared(&self) -> SharedState {
        self.state.clone()
    }

    /// Apply one command to the MVCC state, queue its rows and events.
    fn apply_command(
        &self,
        st: &mut SmState,
        cmd: &Command,
        batch: &mut WriteBatch,
        published: &mut Vec<(i64, Vec<crate::mvcc::Event>)>,
    ) -> StResult<CommandResult> {
        let timer = matches!(cmd, Command::Compact { .. }).then(|| self.metrics.compaction.start_timer());
        let applied = st.mvcc.apply(cmd);
        drop(timer);
        if matches!(cmd, Command::Compact { .. }) {
            crash_point!("raft::compaction");
        }
        write_rows(&self.db, batch, &applied.rows)?;
        if !applied.events.is_empty() {
            published.push((applied.result.revision, applied.events));
        }
        Ok(applied.result)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StResult<Snapshot<TypeConfig>> {
        let _timer = self.metrics.snapshot_build.start_timer();
        let (state, path, file_lock) = (self.state.clone(), self.snapshot_path.clone(), self.snapshot_file.clone());
        // Seconds of encoding and IO for a big store: off the async
        // workers, and the state lock is held only to copy the image
        // (keys and values are shared `Bytes`).
        let build = move || -> std::io::Result<(SnapshotMeta, u64, snapfile::Region)> {
            let _file = file_lock.lock();
            let (image, applied, membership) = {
                let st = state.read();
                (st.mvcc.image(), st.applied, st.membership.clone())
            };
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, image.revision),
                None => format!("0-0-{}", image.revision),
            };
            let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
            crash_point!("raft::snapshot_build");
            let len = snapfile::write_image(&path, &meta, &image)?;
            // Opened before the lock is released, so no install can put
            // another snapshot's data behind this meta.
            let (_, data) =
                snapfile::open(&path)?.ok_or_else(|| std::io::Error::other("snapshot just written is gone"))?;
            Ok((meta, len, data))
        };
        let snapshot_io = snapshot_write_err(None);
        let (meta, len, data) = tokio::task::spawn_blocking(build)
            .await
            .map_err(|e| snapshot_io(std::io::Error::other(e.to_string())))?
            .map_err(snapshot_io)?;
        self.metrics.snapshot_size.set(len as i64);
        // openraft keeps only the meta of a snapshot it had built; the data
        // is read from the file when a follower needs it.
        Ok(Snapshot { meta, snapshot: Box::new(data) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StResult<(Option<LogId>, StoredMembership)> {
        let st = self.state.read();
        Ok((st.applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut results = Vec::new();
        let mut published = Vec::new();
        let mut membership_changed = false;
        {
            let mut st = self.state.write();
            for entry in entries {
                st.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {
                        results.push(CommandResult { revision: st.mvcc.revision(), ..Default::default() })
                    }
                    EntryPayload::Membership(m) => {
                        st.set_membership(StoredMembership::new(Some(entry.log_id), m));
                        membership_changed = true;
                        results.push(CommandResult { revision: st.mvcc.revision(), ..Default::default() });
                    }
                    EntryPayload::Normal(Command::Batch(cmds)) => {
                        let out = cmds
                            .iter()
                            .map(|cmd| self.apply_command(&mut st, cmd, &mut batch, &mut published))
                            .collect::<StResult<Vec<_>>>()?;
                        results.push(CommandResult { revision: st.mvcc.revision(), outcome: None, batch: out });
                    }
                    EntryPayload::Normal(cmd) => {
                        results.push(self.apply_command(&mut st, &cmd, &mut batch, &mut published)?);
                    }
                }
            }
            write_meta(&self.db, &mut batch, &st, membership_changed)?;
        }
        crash_point!("raft::apply_before_write");
        self.db.write(batch).map_err(write_err)?;
        crash_point!("raft::apply_before_notify");
        for (rev, events) in published {
            self.hub.publish(rev, events);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            db: self.db.clone(),
            state: self.state.clone(),
            hub: self.hub.clone(),
            snapshot_path: self.snapshot_path.clone(),
            snapshot_file: self.snapshot_file.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StResult<Box<snapfile::Region>> {
        let region = snapfile::Region::create(&receiving_path(&self.snapshot_path)).await;
        Ok(Box::new(region.map_err(snapshot_write_err(None))?))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, mut snapshot: Box<snapfile::Region>) -> StResult<()> {
        let _timer = self.metrics.snapshot_install.start_timer();
        let io = snapshot_write_err(Some(meta));
        let data = {
            use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
            snapshot.flush().await.map_err(&io)?;
            snapshot.seek(std::io::SeekFrom::Start(0)).await.map_err(&io)?;
            let mut data = Vec::new();
            snapshot.read_to_end(&mut data).await.map_err(&io)?;
            data
        };
        drop(snapshot);
        let _ = std::fs::remove_file(receiving_path(&self.snapshot_path));
        let image: Image = decode(&data)?;
        let _file = self.snapshot_file.lock();
        // Staged first, synced: once the rows below are replaced, a crash
        // must not leave the old snapshot file as the current one
        // (`finish_staged_install` completes the install at restart).
        let staged = staged_install_path(&self.snapshot_path);
        snapfile::write_data(&staged, meta, &data).map_err(&io)?;
        drop(data);
        let mvcc = Mvcc::from_image(image);
        // Replace every row: clear kv and lease, then write the image.
        let mut batch = WriteBatch::default();
        for name in [CF_KV, CF_LEASE] {
            let handle = cf(&self.db, name);
            for item in self.db.iterator_cf(handle, IteratorMode::Start) {
                batch.delete_cf(handle, item.map_err(read_err)?.0);
            }
        }
        write_rows(&self.db, &mut batch, &image_rows(&mvcc))?;
        let revision = mvcc.revision();
        {
            let mut st = self.state.write();
            st.mvcc = mvcc;
            st.applied = meta.last_log_id;
            st.set_membership(meta.last_membership.clone());
            write_meta(&self.db, &mut batch, &st, true)?;
            self.db.write_opt(batch, &sync_opts()).map_err(write_err)?;
        }
        crash_point!("raft::snapshot_install");
        std::fs::rename(&staged, &self.snapshot_path).map_err(&io)?;
        tracing::info!(snapshot = %meta.snapshot_id, revision, "installed snapshot");
        self.hub.reset(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot<TypeConfig>>> {
        let opened = snapfile::open(&self.snapshot_path).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(opened.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(data) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_sort_by_key_then_revision() {
        let keys: Vec<&[u8]> = vec![b"", b"\x00", b"\x00\x00", b"\x00\x01", b"a", b"a\x00", b"a\x00b", b"ab", b"b"];
        let mut rows = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            for rev in [1i64, 300, 70000] {
                rows.push((row_key(k, rev), i, rev));
            }
        }
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(sorted, rows, "encoding must preserve (key, revision) order");
        for (row, i, rev) in rows {
            assert_eq!(decode_row_key(&row), Some((Bytes::copy_from_slice(keys[i]), rev)));
        }
        assert_eq!(decode_row_key(b"\x00\x02garbage!"), None);
    }

    /// A crash inside `install_snapshot` after the rows were replaced leaves
    /// a staged file that restart promotes; one before leaves a staged file
    /// (possibly torn) that restart drops.
    #[test]
    fn interrupted_snapshot_installs_are_finished_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("snapshot.bin");
        let staged = staged_install_path(&current);
        let log_id = |index| Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index));
        let meta = |index| SnapshotMeta {
            last_log_id: log_id(index),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}-7"),
        };
        let write = |path: &Path, index| snapfile::write_data(path, &meta(index), &[1, 2, 3]).unwrap();
        let snapshot_at = |path: &Path| snapfile::read_header(&mut std::fs::File::open(path).unwrap()).unwrap().0;

        finish_staged_install(&current, log_id(5)).unwrap();
        assert!(!current.exists(), "nothing staged, nothing changes");

        write(&current, 100);
        write(&staged, 200);
        finish_staged_install(&current, log_id(100)).unwrap();
        assert!(!staged.exists());
        assert_eq!(snapshot_at(&current).last_log_id, log_id(100), "rows not replaced: old snapshot stays");

        write(&staged, 200);
        finish_staged_install(&current, log_id(200)).unwrap();
        assert!(!staged.exists());
        assert_eq!(snapshot_at(&current).last_log_id, log_id(200), "rows replaced: install completed");

        std::fs::write(&staged, b"\xff torn").unwrap();
        finish_staged_install(&current, log_id(300)).unwrap();
        assert!(!staged.exists());
        assert_eq!(snapshot_at(&current).last_log_id, log_id(200));

        write(&staged, 400);
        let whole = std::fs::read(&staged).unwrap();
        std::fs::write(&staged, &whole[..whole.len() - 1]).unwrap();
        finish_staged_install(&current, log_id(400)).unwrap();
        assert!(!staged.exists());
        assert_eq!(snapshot_at(&current).last_log_id, log_id(200), "a staged file cut short is dropped");
    }

    /// Applying memberships {1,2,3} -> {1,2,3,4} -> joint -> {1,2,4}
    /// leaves 3 (and only 3) as a tombstone, which survives a restart.
    #[tokio::test]
    async fn members_that_leave_an_applied_membership_are_remembered_as_removed() {
        use openraft::Entry;
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let member =
            |id: u64| (id, Member { name: format!("m{id}"), peer_addr: String::new(), client_url: String::new() });
        let config = |voters: &[&[u64]], nodes: &[u64]| {
            let sets = voters.iter().map(|v| v.iter().copied().collect()).collect();
            Membership::new(sets, nodes.iter().map(|id| member(*id)).collect::<BTreeMap<_, _>>())
        };
        let entry = |index, m| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Membership(m),
        };
        {
            let storage = Storage::open(dir.path()).unwrap();
            let mut sm = storage.state_machine(Arc::new(WatchHub::new(16))).unwrap();
            sm.apply([entry(1, config(&[&[1, 2, 3]], &[1, 2, 3]))]).await.unwrap();
            sm.apply([entry(2, config(&[&[1, 2, 3]], &[1, 2, 3, 4]))]).await.unwrap();
            assert!(sm.shared().read().removed.is_empty(), "adding a learner removes nobody");
            sm.apply([entry(3, config(&[&[1, 2, 3], &[1, 2, 4]], &[1, 2, 3, 4]))]).await.unwrap();
            assert!(sm.shared().read().removed.is_empty(), "a joint config still holds 3");
            sm.apply([entry(4, config(&[&[1, 2, 4]], &[1, 2, 4]))]).await.unwrap();
            assert_eq!(sm.shared().read().removed, BTreeSet::from([3]));
        }
        let storage = Storage::open(dir.path()).unwrap();
        let sm = storage.state_machine(Arc::new(WatchHub::new(16))).unwrap();
        assert_eq!(sm.shared().read().removed, BTreeSet::from([3]), "tombstones survive a restart");
    }

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let storage = Storage::open(dir.path()).map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
            let sm = storage
                .state_machine(Arc::new(WatchHub::new(16)))
                .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
            Ok((dir, storage.log_store().map_err(write_err)?, sm))
        }
    }

    #[test]
    fn openraft_storage_conformance() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }
}
