//! The MVCC key-value core: etcd's data model as a pure, in-memory state
//! machine. No IO lives here: `apply` takes a command and returns its result,
//! the watch events it produced and the row changes the storage layer must
//! persist in the same RocksDB write batch.
//!
//! Model (as etcd v3):
//! - one global `revision`, bumped once by each command that changes at least
//!   one key; the writes of one revision carry increasing sub-revisions;
//! - every key keeps its history: `(mod_revision, sub) -> version row`, a
//!   delete is a tombstone row; `create_revision`/`version` restart after a
//!   delete;
//! - `compact(r)` forgets every row a read at any revision >= r cannot see;
//! - leases own keys; revoking (or expiring) a lease deletes its keys in one
//!   revision.
//!
//! Values are `Bytes`, so reads and watch events share buffers with the store.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::*;

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// One row of a key's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub mod_revision: i64,
    pub sub: u32,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// `None` marks a delete (tombstone).
    pub value: Option<Bytes>,
}

impl Version {
    fn is_live(&self) -> bool {
        self.value.is_some()
    }

    fn to_kv(&self, key: &Bytes) -> KeyValue {
        KeyValue {
            key: key.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone().unwrap_or_default(),
            lease: self.lease,
        }
    }

    fn size(&self, key: &[u8]) -> u64 {
        (key.len() + self.value.as_ref().map_or(0, |v| v.len()) + 40) as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key at one revision, as etcd's `mvccpb.Event`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

/// What the storage layer must write for an applied command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowChange {
    Put { key: Bytes, row: Version },
    Remove { key: Bytes, mod_revision: i64 },
    LeasePut { id: i64, ttl: i64 },
    LeaseRemove { id: i64 },
}

/// Everything `apply` produced.
#[derive(Debug, Default)]
pub struct Applied {
    pub result: CommandResult,
    /// Events of the new revision (empty if the revision did not move).
    pub events: Vec<Event>,
    pub rows: Vec<RowChange>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ttl: i64,
    pub keys: BTreeSet<Bytes>,
}

/// The whole state, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub revision: i64,
    pub compacted: i64,
    pub keys: Vec<(Bytes, Vec<Version>)>,
    pub leases: Vec<(i64, i64)>,
}

#[derive(Clone, Debug)]
pub struct Mvcc {
    revision: i64,
    compacted: i64,
    keys: BTreeMap<Bytes, Vec<Version>>,
    leases: BTreeMap<i64, Lease>,
    /// Approximate bytes held (keys + values + row overhead, all revisions).
    bytes: u64,
    live_keys: u64,
    pub max_txn_ops: usize,
}

impl Default for Mvcc {
    fn default() -> Self {
        Mvcc {
            revision: 1,
            compacted: 0,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
            bytes: 0,
            live_keys: 0,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
        }
    }
}

/// Scratch state of one txn being applied.
struct TxnCtx {
    rev: i64,
    sub: u32,
    events: Vec<Event>,
    rows: Vec<RowChange>,
}

impl Mvcc {
    /// The current revision. Like etcd, an empty store is at revision 1.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    pub fn size_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn live_keys(&self) -> u64 {
        self.live_keys
    }

    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = (&i64, &Lease)> {
        self.leases.iter()
    }

    /// Rebuild from persisted rows (any order) and meta.
    pub fn restore(
        revision: i64,
        compacted: i64,
        rows: impl IntoIterator<Item = (Bytes, Version)>,
        leases: impl IntoIterator<Item = (i64, i64)>,
    ) -> Mvcc {
        let mut m = Mvcc { revision: revision.max(1), compacted, ..Mvcc::default() };
        for (key, row) in rows {
            m.bytes += row.size(&key);
            m.keys.entry(key).or_default().push(row);
        }
        for (id, ttl) in leases {
            m.leases.insert(id, Lease { ttl, keys: BTreeSet::new() });
        }
        for (key, hist) in m.keys.iter_mut() {
            hist.sort_by_key(|v| v.mod_revision);
            if let Some(last) = hist.last() {
                if last.is_live() {
                    m.live_keys += 1;
                    if last.lease != 0 {
                        if let Some(l) = m.leases.get_mut(&last.lease) {
                            l.keys.insert(key.clone());
                        }
                    }
                }
            }
        }
        m
    }

    pub fn image(&self) -> Image {
        Image {
            revision: self.revision,
            compacted: self.compacted,
            keys: self.keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            leases: self.leases.iter().map(|(id, l)| (*id, l.ttl)).collect(),
        }
    }

    pub fn from_image(image: Image) -> Mvcc {
        let rows = image.keys.into_iter().flat_map(|(k, hist)| hist.into_iter().map(move |v| (k.clone(), v)));
        Mvcc::restore(image.revision, image.compacted, rows, image.leases)
    }

    /// Every persisted row, for rewriting storage after a snapshot install.
    pub fn rows(&self) -> impl Iterator<Item = (&Bytes, &Version)> {
        self.keys.iter().flat_map(|(k, h)| h.iter().map(move |v| (k, v)))
    }

    fn keys_in<'a>(&'a self, range: &KeyRange) -> Box<dyn Iterator<Item = (&'a Bytes, &'a Vec<Version>)> + 'a> {
        if range.end.is_empty() {
            return Box::new(self.keys.get_key_value(&range.start).into_iter());
        }
        let upper = if range.end[..] == [0] {
            Bound::Unbounded
        } else if range.end <= range.start {
            return Box::new(std::iter::empty());
        } else {
            Bound::Excluded(range.end.clone())
        };
        Box::new(self.keys.range((Bound::Included(range.start.clone()), upper)))
    }

    /// The row visible at `rev` in a key's history.
    fn visible(hist: &[Version], rev: i64) -> Option<&Version> {
        let idx = hist.partition_point(|v| v.mod_revision <= rev);
        idx.checked_sub(1).map(|i| &hist[i]).filter(|v| v.is_live())
    }

    fn latest(&self, key: &Bytes) -> Option<&Version> {
        self.keys.get(key).and_then(|h| h.last()).filter(|v| v.is_live())
    }

    fn check_read_revision(&self, rev: i64) -> Result<i64, MvccError> {
        if rev <= 0 {
            return Ok(self.revision);
        }
        if rev > self.revision {
            return Err(MvccError::FutureRevision { current: self.revision });
        }
        if rev < self.compacted {
            return Err(MvccError::Compacted { compacted: self.compacted });
        }
        Ok(rev)
    }

    /// A read, never changing anything.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let rev = self.check_read_revision(req.revision)?;
        let within = |v: i64, min: i64, max: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        let mut kvs: Vec<&Version> = Vec::new();
        let mut keys: Vec<&Bytes> = Vec::new();
        for (k, hist) in self.keys_in(&req.range) {
            if let Some(v) = Self::visible(hist, rev) {
                if within(v.mod_revision, req.min_mod_revision, req.max_mod_revision)
                    && within(v.create_revision, req.min_create_revision, req.max_create_revision)
                {
                    keys.push(k);
                    kvs.push(v);
                }
            }
        }
        let count = kvs.len() as i64;
        if req.count_only {
            return Ok(RangeResponse { kvs: vec![], more: false, count });
        }
        let mut pairs: Vec<(&Bytes, &Version)> = keys.into_iter().zip(kvs).collect();
        let order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::Ascend,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        if !(order == SortOrder::Ascend && req.sort_target == SortTarget::Key) {
            pairs.sort_by(|a, b| {
                let ord = match req.sort_target {
                    SortTarget::Key => a.0.cmp(b.0),
                    SortTarget::Version => a.1.version.cmp(&b.1.version),
                    SortTarget::Create => a.1.create_revision.cmp(&b.1.create_revision),
                    SortTarget::Mod => a.1.mod_revision.cmp(&b.1.mod_revision),
                    SortTarget::Value => a.1.value.cmp(&b.1.value),
                };
                if order == SortOrder::Descend {
                    ord.reverse()
                } else {
                    ord
                }
            });
        }
        let limit = if req.limit > 0 { req.limit as usize } else { usize::MAX };
        let more = pairs.len() > limit;
        let kvs = pairs
            .into_iter()
            .take(limit)
            .map(|(k, v)| {
                let mut kv = v.to_kv(k);
                if req.keys_only {
                    kv.value = Bytes::new();
                }
                kv
            })
            .collect();
        Ok(RangeResponse { kvs, more, count })
    }

    /// Events with revision in `[from, to]` for keys in `range`, ordered by
    /// (revision, sub-revision), with previous values.
    ///
    /// `from` must be above the compacted revision: compaction at `c` drops
    /// the tombstones and previous values of revision `c` itself, so a replay
    /// from `c` could silently miss events (an etcd bug we do not repeat).
    pub fn history(&self, range: &KeyRange, from: i64, to: i64) -> Result<Vec<(i64, Event)>, MvccError> {
        if from <= self.compacted {
            return Err(MvccError::Compacted { compacted: self.compacted });
        }
        let mut out: Vec<(i64, u32, Event)> = Vec::new();
        for (k, hist) in self.keys_in(range) {
            let start = hist.partition_point(|v| v.mod_revision < from);
            for i in start..hist.len() {
                let v = &hist[i];
                if v.mod_revision > to {
                    break;
                }
                let prev = i.checked_sub(1).map(|p| &hist[p]).filter(|p| p.is_live()).map(|p| p.to_kv(k));
                out.push((v.mod_revision, v.sub, Self::event_of(k, v, prev)));
            }
        }
        out.sort_by_key(|(r, s, _)| (*r, *s));
        Ok(out.into_iter().map(|(r, _, e)| (r, e)).collect())
    }

    fn event_of(key: &Bytes, v: &Version, prev_kv: Option<KeyValue>) -> Event {
        if v.is_live() {
            Event { kind: EventKind::Put, kv: v.to_kv(key), prev_kv }
        } else {
            Event {
                kind: EventKind::Delete,
                kv: KeyValue { key: key.clone(), mod_revision: v.mod_revision, ..KeyValue::default() },
                prev_kv,
            }
        }
    }

    /// Apply one committed command. Deterministic: every replica produces the
    /// same result from the same state. A rejected command changes nothing.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        let before = self.revision;
        let outcome = match cmd {
            Command::Txn(txn) => self.apply_txn(txn).map(|(resp, ev, rows)| (Outcome::Txn(resp), ev, rows)),
            Command::Compact { revision } => self.compact(*revision).map(|rows| (Outcome::Compacted, vec![], rows)),
            Command::LeaseGrant { id, ttl } => self.lease_grant(*id, *ttl),
            Command::LeaseRevoke { id } => self.lease_revoke(*id),
            // Batches are unpacked by the storage layer; one inside another is not valid.
            Command::Batch(_) => Err(MvccError::Invalid("nested command batch".into())),
        };
        match outcome {
            Ok((out, events, rows)) => Applied {
                result: CommandResult { revision: self.revision, outcome: Some(Ok(out)), batch: vec![] },
                events,
                rows,
            },
            Err(e) => {
                debug_assert_eq!(before, self.revision);
                Applied {
                    result: CommandResult { revision: self.revision, outcome: Some(Err(e)), batch: vec![] },
                    ..Default::default()
                }
            }
        }
    }

    fn lease_grant(&mut self, id: i64, ttl: i64) -> Result<(Outcome, Vec<Event>, Vec<RowChange>), MvccError> {
        if id <= 0 {
            return Err(MvccError::Invalid("lease id must be positive".into()));
        }
        if ttl <= 0 {
            return Err(MvccError::Invalid("lease TTL must be positive".into()));
        }
        if self.leases.contains_key(&id) {
            return Err(MvccError::LeaseExists);
        }
        self.leases.insert(id, Lease { ttl, keys: BTreeSet::new() });
        Ok((Outcome::LeaseGranted { id, ttl }, vec![], vec![RowChange::LeasePut { id, ttl }]))
    }

    fn lease_revoke(&mut self, id: i64) -> Result<(Outcome, Vec<Event>, Vec<RowChange>), MvccError> {
        let lease = self.leases.get(&id).ok_or(MvccError::LeaseNotFound)?;
        let mut ctx = TxnCtx { rev: self.revision + 1, sub: 0, events: vec![], rows: vec![] };
        let keys: Vec<Bytes> = lease.keys.iter().cloned().collect();
        for k in keys {
            self.delete_key(&k, &mut ctx);
        }
        self.leases.remove(&id);
        ctx.rows.push(RowChange::LeaseRemove { id });
        if !ctx.events.is_empty() {
            self.revision = ctx.rev;
        }
        Ok((Outcome::LeaseRevoked, ctx.events, ctx.rows))
    }

    fn count_ops(ops: &[Op]) -> Result<usize, MvccError> {
        let mut n = 0;
        for op in ops {
            match op {
                Op::Txn(_) => return Err(MvccError::NestedTxn),
                _ => n += 1,
            }
        }
        Ok(n)
    }

    /// Checks done before anything is written, so a txn is all or nothing.
    fn validate_ops(&self, ops: &[Op]) -> Result<(), MvccError> {
        let mut written: Vec<KeyRange> = Vec::new();
        for op in ops {
            match op {
                Op::Put(p) => {
                    if p.key.is_empty() {
                        return Err(MvccError::EmptyKey);
                    }
                    if written.iter().any(|r| r.contains(&p.key)) {
                        return Err(MvccError::DuplicateKey);
                    }
                    let prev = self.latest(&p.key);
                    if (p.ignore_value || p.ignore_lease) && prev.is_none() {
                        return Err(MvccError::KeyNotFoundForIgnore);
                    }
                    if p.ignore_value && !p.value.is_empty() {
                        return Err(MvccError::Invalid("value is provided with ignore_value".into()));
                    }
                    if p.ignore_lease && p.lease != 0 {
                        return Err(MvccError::Invalid("lease is provided with ignore_lease".into()));
                    }
                    if !p.ignore_lease && p.lease != 0 && !self.leases.contains_key(&p.lease) {
                        return Err(MvccError::LeaseNotFound);
                    }
                    written.push(KeyRange::key(p.key.clone()));
                }
                Op::Delete(d) => {
                    if d.range.start.is_empty() && d.range.end.is_empty() {
                        return Err(MvccError::EmptyKey);
                    }
                    if written.iter().any(|r| ranges_overlap(r, &d.range)) {
                        return Err(MvccError::DuplicateKey);
                    }
                    written.push(d.range.clone());
                }
                Op::Range(r) => {
                    self.check_read_revision(r.revision)?;
                }
                Op::Txn(_) => return Err(MvccError::NestedTxn),
            }
        }
        Ok(())
    }

    fn compare(&self, c: &Compare) -> bool {
        let rev = self.revision;
        let mut matched = false;
        for (_, hist) in self.keys_in(&c.range) {
            if let Some(v) = Self::visible(hist, rev) {
                matched = true;
                if !Self::compare_one(c, Some(v)) {
                    return false;
                }
            }
        }
        if !matched {
            // etcd: a missing key compares as version/create/mod/lease 0; a
            // value compare against a missing key fails.
            return Self::compare_one(c, None);
        }
        true
    }

    fn compare_one(c: &Compare, v: Option<&Version>) -> bool {
        use std::cmp::Ordering;
        let ord: Ordering = match (&c.target, v) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(want), Some(v)) => v.value.as_deref().unwrap_or_default().cmp(&want[..]),
            (CompareTarget::Version(n), v) => v.map_or(0, |v| v.version).cmp(n),
            (CompareTarget::Create(n), v) => v.map_or(0, |v| v.create_revision).cmp(n),
            (CompareTarget::Mod(n), v) => v.map_or(0, |v| v.mod_revision).cmp(n),
            (CompareTarget::Lease(n), v) => v.map_or(0, |v| v.lease).cmp(n),
        };
        match c.result {
            CompareResult::Equal => ord == Ordering::Equal,
            CompareResult::NotEqual => ord != Ordering::Equal,
            CompareResult::Greater => ord == Ordering::Greater,
            CompareResult::Less => ord == Ordering::Less,
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply_txn(&mut self, txn: &TxnRequest) -> Result<(TxnResponse, Vec<Event>, Vec<RowChange>), MvccError> {
        let n = Self::count_ops(&txn.success)?.max(Self::count_ops(&txn.failure)?);
        if n > self.max_txn_ops || txn.compare.len() > self.max_txn_ops {
            return Err(MvccError::TooManyOps { max: self.max_txn_ops });
        }
        let succeeded = txn.compare.iter().all(|c| self.compare(c));
        let ops = if succeeded { &txn.success } else { &txn.failure };
        self.validate_ops(ops)?;
        let mut ctx = TxnCtx { rev: self.revision + 1, sub: 0, events: vec![], rows: vec![] };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                Op::Range(r) => {
                    // Reads inside a txn see the txn's earlier writes.
                    let mut r = r.clone();
                    if r.revision <= 0 && !ctx.events.is_empty() {
                        r.revision = ctx.rev;
                        let saved = self.revision;
                        self.revision = ctx.rev;
                        let out = self.range(&r);
                        self.revision = saved;
                        OpResponse::Range(out?)
                    } else {
                        OpResponse::Range(self.range(&r)?)
                    }
                }
                Op::Put(p) => {
                    let prev = self.put_key(p, &mut ctx);
                    OpResponse::Put { prev_kv: if p.prev_kv { prev } else { None } }
                }
                Op::Delete(d) => {
                    let keys: Vec<Bytes> = self
                        .keys_in(&d.range)
                        .filter(|(_, h)| h.last().is_some_and(|v| v.is_live()))
                        .map(|(k, _)| k.clone())
                        .collect();
                    let mut prev_kvs = Vec::new();
                    for k in &keys {
                        if let Some(p) = self.delete_key(k, &mut ctx) {
                            if d.prev_kv {
                                prev_kvs.push(p);
                            }
                        }
                    }
                    OpResponse::Delete { deleted: keys.len() as i64, prev_kvs }
                }
                Op::Txn(_) => return Err(MvccError::NestedTxn),
            });
        }
        if !ctx.events.is_empty() {
            self.revision = ctx.rev;
        }
        Ok((TxnResponse { succeeded, responses }, ctx.events, ctx.rows))
    }

    fn put_key(&mut self, p: &PutRequest, ctx: &mut TxnCtx) -> Option<KeyValue> {
        let prev = self.latest(&p.key).cloned();
        let (create_revision, version) = match &prev {
            Some(v) => (v.create_revision, v.version + 1),
            None => (ctx.rev, 1),
        };
        let value = if p.ignore_value { prev.as_ref().and_then(|v| v.value.clone()) } else { Some(p.value.clone()) };
        let lease = if p.ignore_lease { prev.as_ref().map_or(0, |v| v.lease) } else { p.lease };
        let row = Version { mod_revision: ctx.rev, sub: ctx.sub, create_revision, version, lease, value };
        ctx.sub += 1;
        if let Some(pv) = &prev {
            if pv.lease != 0 && pv.lease != lease {
                if let Some(l) = self.leases.get_mut(&pv.lease) {
                    l.keys.remove(&p.key);
                }
            }
        } else {
            self.live_keys += 1;
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(p.key.clone());
            }
        }
        let prev_kv = prev.as_ref().map(|v| v.to_kv(&p.key));
        ctx.events.push(Event { kind: EventKind::Put, kv: row.to_kv(&p.key), prev_kv: prev_kv.clone() });
        self.bytes += row.size(&p.key);
        ctx.rows.push(RowChange::Put { key: p.key.clone(), row: row.clone() });
        self.keys.entry(p.key.clone()).or_default().push(row);
        prev_kv
    }

    fn delete_key(&mut self, key: &Bytes, ctx: &mut TxnCtx) -> Option<KeyValue> {
        let prev = self.latest(key).cloned()?;
        if prev.lease != 0 {
            if let Some(l) = self.leases.get_mut(&prev.lease) {
                l.keys.remove(key);
            }
        }
        let row =
            Version { mod_revision: ctx.rev, sub: ctx.sub, create_revision: 0, version: 0, lease: 0, value: None };
        ctx.sub += 1;
        let prev_kv = prev.to_kv(key);
        ctx.events.push(Self::event_of(key, &row, Some(prev_kv.clone())));
        self.bytes += row.size(key);
        self.live_keys -= 1;
        ctx.rows.push(RowChange::Put { key: key.clone(), row: row.clone() });
        self.keys.entry(key.clone()).or_default().push(row);
        Some(prev_kv)
    }

    /// Forget history no read at revision >= `rev` can see.
    fn compact(&mut self, rev: i64) -> Result<Vec<RowChange>, MvccError> {
        if rev <= self.compacted {
            return Err(MvccError::Compacted { compacted: self.compacted });
        }
        if rev > self.revision {
            return Err(MvccError::FutureRevision { current: self.revision });
        }
        let mut rows = Vec::new();
        let mut emptied = Vec::new();
        for (k, hist) in self.keys.iter_mut() {
            // Rows at or below `rev`; the newest of them stays if it is live.
            let upto = hist.partition_point(|v| v.mod_revision <= rev);
            if upto == 0 {
                continue;
            }
            let keep_last = hist[upto - 1].is_live();
            let drop = if keep_last { upto - 1 } else { upto };
            for v in hist.drain(..drop) {
                self.bytes = self.bytes.saturating_sub(v.size(k));
                rows.push(RowChange::Remove { key: k.clone(), mod_revision: v.mod_revision });
            }
            if hist.is_empty() {
                emptied.push(k.clone());
            }
        }
        for k in emptied {
            self.keys.remove(&k);
        }
        self.compacted = rev;
        Ok(rows)
    }

    /// etcd-style HashKV: a hash over every row with revision in
    /// `(compacted, rev]`, equal across replicas that agree on history.
    pub fn hash_kv(&self, rev: i64) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, hist) in &self.keys {
            for v in hist.iter().filter(|v| v.mod_revision <= rev) {
                k.hash(&mut h);
                v.mod_revision.hash(&mut h);
                v.sub.hash(&mut h);
                v.create_revision.hash(&mut h);
                v.version.hash(&mut h);
                v.lease.hash(&mut h);
                v.value.hash(&mut h);
            }
        }
        h.finish()
    }
}

fn ranges_overlap(a: &KeyRange, b: &KeyRange) -> bool {
    let end = |r: &KeyRange| -> Option<Bytes> {
        if r.end.is_empty() {
            let mut e = r.start.to_vec();
            e.push(0);
            Some(Bytes::from(e))
        } else if r.end[..] == [0] {
            None
        } else {
            Some(r.end.clone())
        }
    };
    let (ae, be) = (end(a), end(b));
    let a_before_b = ae.as_ref().is_some_and(|e| e <= &b.start);
    let b_before_a = be.as_ref().is_some_and(|e| e <= &a.start);
    !(a_before_b || b_before_a)
}

#[cfg(test)]
#[path = "mvcc_test.rs"]
mod tests;
